// moescope-cli bench: prefill and decode throughput at several context lengths, with and
// without MTP, with and without telemetry, peak memory, tokenizer throughput. JSON out.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "engine/errors.h"
#include "engine/model/ops.h"
#include "engine/session.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/train/trainer.h"
#include "engine/tools/cli.h"
#include "engine/tools/cli_model.h"

namespace moescope::cli {
namespace {

using Clock = std::chrono::steady_clock;

double peak_rss_mb() {
    struct rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return double(ru.ru_maxrss) / 1024.0;
}

struct DecodeRun {
    double tokens_per_s = 0;
    double acceptance_rate = 0, mean_acceptance_length = 1;
};

// Best of `repeats` runs: decode `n` tokens greedily after a prompt of `ctx` tokens.
DecodeRun decode_run(const LoadedModel& m, const std::vector<int>& prompt, int n, bool mtp, bool telemetry,
                     int repeats) {
    DecodeRun best;
    for (int rep = 0; rep < repeats; ++rep) {
        Session s(m.backend, nullptr);
        MemorySink sink;
        if (telemetry) {
            s.set_sink(&sink);
            s.set_latent_layer(0);
        }
        s.append(prompt);
        SamplingParams p;
        p.temperature = 0;
        p.max_tokens = n;
        p.mtp = mtp;
        auto t0 = Clock::now();
        GenerationResult r = s.generate(p);
        double secs = std::chrono::duration<double>(Clock::now() - t0).count();
        double tps = r.tokens.size() / secs;
        if (tps > best.tokens_per_s) {
            best.tokens_per_s = tps;
            best.acceptance_rate = r.stats.mtp.acceptance_rate();
            best.mean_acceptance_length = r.stats.mtp.mean_acceptance_length();
        }
    }
    return best;
}

int cmd_bench(const std::vector<std::string>& argv) {
    Args a(argv, {"json", "quick", "no-train"});
    a.check_known({"backend", "contexts", "tokens", "repeats", "threads", "prompt"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR");
    const std::string dir = a.positional()[0];
    const std::string backend = a.get_or("backend", "cpu");
    if (a.has("threads")) set_num_threads(int(a.integer("threads", 0)));
    LoadedModel m = open_model(dir, backend, 0);
    const ModelConfig& cfg = m.backend->config();
    const bool quick = a.has("quick");
    std::vector<int> contexts = a.int_list("contexts");
    if (contexts.empty()) contexts = quick ? std::vector<int>{16, 128} : std::vector<int>{16, 128, 512};
    const int n = int(a.integer("tokens", quick ? 16 : 64));
    const int repeats = int(a.integer("repeats", quick ? 1 : 3));
    // Prompts: text through the tokenizer when there is one (realistic routing), else random ids.
    std::vector<int> source;
    if (m.tokenizer) {
        std::string text = a.get_or("prompt", "");
        for (const char* f : {"/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"}) {
            if (!text.empty()) break;
            std::ifstream in(f);
            std::stringstream ss;
            ss << in.rdbuf();
            text = ss.str();
        }
        if (!text.empty()) source = m.tokenizer->encode(text);
    }
    std::mt19937 g(1);
    while (source.size() < 4096) source.push_back(int(g() % uint32_t(cfg.vocab_size)));

    nlohmann::json out;
    out["model"] = dir;
    out["backend"] = m.backend->name();
    out["notice"] = m.notice;
    out["threads"] = num_threads();
    out["decode_tokens"] = n;
    nlohmann::json rows = nlohmann::json::array();
    for (int ctx : contexts) {
        if (ctx + n + 2 > cfg.max_position_embeddings) continue;
        std::vector<int> prompt(source.begin(), source.begin() + ctx);
        double prefill = 0;
        for (int rep = 0; rep < repeats; ++rep) {
            Session s(m.backend, nullptr);
            auto t0 = Clock::now();
            s.append(prompt);
            prefill = std::max(prefill, ctx / std::chrono::duration<double>(Clock::now() - t0).count());
        }
        DecodeRun plain = decode_run(m, prompt, n, false, false, repeats);
        DecodeRun traced = decode_run(m, prompt, n, false, true, repeats);
        nlohmann::json row{{"context", ctx},
                           {"prefill_tokens_per_s", prefill},
                           {"decode_tokens_per_s", plain.tokens_per_s},
                           {"decode_tokens_per_s_telemetry", traced.tokens_per_s},
                           {"telemetry_overhead", plain.tokens_per_s / traced.tokens_per_s - 1.0}};
        if (cfg.num_nextn_predict_layers > 0) {
            DecodeRun mtp = decode_run(m, prompt, n, true, false, repeats);
            row["decode_tokens_per_s_mtp"] = mtp.tokens_per_s;
            row["mtp_speedup"] = mtp.tokens_per_s / plain.tokens_per_s;
            row["mtp_acceptance_rate"] = mtp.acceptance_rate;
            row["mtp_mean_acceptance_length"] = mtp.mean_acceptance_length;
        }
        rows.push_back(row);
        if (!a.has("json"))
            std::fprintf(stderr, "context %d: prefill %.0f tok/s, decode %.1f tok/s\n", ctx, prefill, plain.tokens_per_s);
    }
    out["runs"] = rows;
    if (m.tokenizer) {
        std::string text;
        std::ifstream in("/usr/share/common-licenses/GPL-3");
        std::stringstream ss;
        ss << in.rdbuf();
        text = ss.str();
        if (!text.empty()) out["tokenizer_mb_per_s"] = tokenizer_bench_mb_per_s(*m.tokenizer, text);
    }
    if (!a.has("no-train")) {
        const int seq = std::min(64, cfg.max_position_embeddings);
        out["train_tokens_per_s"] = bench_train_tokens_per_s(cfg, quick ? 2 : 4, seq, quick ? 2 : 3);
        out["train_batch"] = quick ? 2 : 4;
        out["train_seq_len"] = seq;
    }
    out["peak_rss_mb"] = peak_rss_mb();
    std::cout << out.dump(a.has("json") ? -1 : 2) << "\n";
    return 0;
}

CliCommand bench_cmd("bench",
                     "bench MODEL_DIR [--json] [--quick] [--contexts 16,128,512] [--tokens N] [--repeats R] "
                     "[--threads T] [--no-train] [--backend cpu|cuda|auto]   throughput benchmark (JSON)",
                     cmd_bench);

}  // namespace
}  // namespace moescope::cli
