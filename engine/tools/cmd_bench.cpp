// moescope-cli bench: prefill and decode throughput at several context lengths, with and
// without MTP, with and without telemetry, the cost of one decode / verify / draft forward,
// peak memory, tokenizer and training throughput. JSON out. --synthetic HIDDEN benchmarks a
// random-weight model shaped like MODEL but HIDDEN wide (where MTP's economics differ).
#include <sys/resource.h>
#include <time.h>

#include <algorithm>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "engine/errors.h"
#include "engine/loader.h"
#include "engine/model/ops.h"
#include "engine/session.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/train/optimizer.h"
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

double cpu_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct DecodeRun {
    double tokens_per_s = 0;
    double tokens_per_cpu_s = 0;  // tokens per CPU-second of the process (all threads)
    double acceptance_rate = 0, mean_acceptance_length = 1;
};

// Decodes `n` tokens greedily after a prompt of `ctx` tokens (and 2 warm-up tokens); keeps the
// best run in `best`.
void decode_run(DecodeRun& best, const LoadedModel& m, const std::vector<int>& prompt, int n, bool mtp,
                bool telemetry) {
    Session s(m.backend, nullptr);
    MemorySink sink;
    if (telemetry) {
        s.set_sink(&sink);
        s.set_latent_layer(0);
    }
    s.append(prompt);
    SamplingParams p;
    p.temperature = 0;
    p.mtp = mtp;
    // Two tokens first, untimed: with MTP the module's first step runs it over the whole
    // prompt once (a one-off of about a fifth of the prefill, part of the time to first
    // tokens); the timed tokens are the steady state, for every variant alike.
    p.max_tokens = 2;
    s.generate(p);
    p.max_tokens = n;
    auto t0 = Clock::now();
    const double c0 = cpu_seconds();
    GenerationResult r = s.generate(p);
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    double tps = r.tokens.size() / secs;
    best.tokens_per_cpu_s = std::max(best.tokens_per_cpu_s, r.tokens.size() / (cpu_seconds() - c0));
    if (tps > best.tokens_per_s) {
        best.tokens_per_s = tps;
        best.acceptance_rate = r.stats.mtp.acceptance_rate();
        best.mean_acceptance_length = r.stats.mtp.mean_acceptance_length();
    }
}

// Seconds of one forward pass after a context of ctx tokens, the minimum over `reps` calls
// (the call least disturbed by other work on the machine): one-token decode, verification of
// the pending token plus `depth` drafts, and one MTP draft step. The caches are cut back to the
// context after each call.
struct StepCosts {
    double decode = 0, verify = 0, draft = 0;
    int verify_tokens = 1;
};

StepCosts step_costs(Backend& be, const std::vector<int>& prompt, int reps) {
    const ModelConfig& cfg = be.config();
    const int ctx = int(prompt.size()), depth = std::min(1, cfg.num_nextn_predict_layers);
    auto cache = be.new_cache(0, ctx + 8);
    ForwardOptions pre;
    pre.absorbed = false;
    pre.all_logits = false;
    ForwardResult r;
    be.forward(prompt.data(), ctx, *cache, pre, r);
    const std::vector<float> hidden = r.hidden;  // [ctx, D]
    // Each call feeds other tokens (from the prompt), so the experts they route to vary as in
    // real decoding instead of staying hot in the cache.
    int call = 0;
    auto tok = [&](int j) { return prompt[size_t((11 * call + 3 * j) % ctx)]; };
    ForwardOptions dec;
    dec.absorbed = true;
    dec.all_logits = true;
    StepCosts c;
    c.verify_tokens = 1 + depth;
    c.decode = c.verify = c.draft = 1e30;
    std::unique_ptr<BackendCache> mc;
    const int D = cfg.hidden_size;
    if (depth > 0 && ctx > 1) {
        // MTP module 1 has seen positions 0..ctx-2 (it predicts one further than the main model).
        mc = be.new_cache(1, ctx + 8);
        be.forward_mtp(1, hidden.data(), prompt.data() + 1, ctx - 1, *mc, pre, r);
    }
    // The three calls alternate so that load elsewhere on the machine hits them alike.
    auto timed = [](double& best, const std::function<void()>& fn) {
        auto t0 = Clock::now();
        fn();
        best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    };
    for (; call < reps; ++call) {
        const int one = tok(0), two[2] = {tok(1), tok(2)}, draft = tok(3);
        timed(c.decode, [&] { be.forward(&one, 1, *cache, dec, r); });
        cache->truncate(ctx);
        timed(c.verify, [&] { be.forward(two, c.verify_tokens, *cache, dec, r); });
        cache->truncate(ctx);
        if (mc) {
            timed(c.draft, [&] { be.forward_mtp(1, hidden.data() + size_t(ctx - 1) * D, &draft, 1, *mc, dec, r); });
            mc->truncate(ctx - 1);
        }
    }
    if (!mc) c.draft = 0;
    return c;
}

// MODEL's config at another width: heads of the same shape, every other width scaled.
ModelConfig synthetic_config(ModelConfig c, int hidden, int layers) {
    auto scaled = [&](int v) { return std::max(16, int(std::lround(double(v) * hidden / c.hidden_size / 16.0)) * 16); };
    c.intermediate_size = scaled(c.intermediate_size);
    c.moe_intermediate_size = scaled(c.moe_intermediate_size);
    if (c.q_lora_rank > 0) c.q_lora_rank = scaled(c.q_lora_rank);
    c.kv_lora_rank = scaled(c.kv_lora_rank);
    c.num_attention_heads = c.num_key_value_heads = std::max(1, int(std::lround(double(c.num_attention_heads) * hidden / c.hidden_size)));
    c.hidden_size = hidden;
    if (layers > 0) c.num_hidden_layers = layers;
    c.source = "synthetic (hidden " + std::to_string(hidden) + ")";
    return c;
}

int cmd_bench(const std::vector<std::string>& argv) {
    Args a(argv, {"json", "quick", "no-train"});
    a.check_known({"backend", "contexts", "tokens", "repeats", "threads", "prompt", "synthetic", "layers", "step-reps",
                   "weights"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR");
    const std::string dir = a.positional()[0];
    const std::string backend = a.get_or("backend", "cpu");
    if (a.has("threads")) set_num_threads(int(a.integer("threads", 0)));
    const WeightStorage weights = weights_from_args(a);
    LoadedModel m = open_model(dir, backend, 0, weights);
    if (a.has("synthetic")) {
        // Random weights: throughput and step costs are meaningful, MTP acceptance is not.
        // --weights bf16 rounds them to BF16 storage (auto and f32 keep f32).
        ModelConfig sc = synthetic_config(m.backend->config(), int(a.integer("synthetic", 1024)),
                                          int(a.integer("layers", 0)));
        Weights sw = init_weights(sc, 1);
        if (weights == WeightStorage::BF16) convert_storage(sw, sc, WeightStorage::BF16);
        m.model = std::make_shared<Model>(sc, std::move(sw));
        m.backend = make_cpu_backend(m.model);
        m.notice = "synthetic random-weight model on the CPU";
    }
    const ModelConfig& cfg = m.backend->config();
    const int step_reps = int(a.integer("step-reps", 50));
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
    out["row_kernel"] = row_kernel_name();
    out["hidden_size"] = cfg.hidden_size;
    if (m.model) {
        int64_t params = 0;
        for (const auto& e : tensor_table(m.model->mutable_weights(), cfg)) params += e.tensor->numel();
        out["parameters"] = params;
        const ModelCard card = loaded_model_card(*m.model);
        out["weight_storage"] = card.weight_storage;
        out["weight_bytes"] = card.weight_bytes;
    }
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
        // The variants alternate within each repeat, so a burst of load elsewhere on the machine
        // hits them alike; each keeps its best repeat.
        const bool has_mtp = cfg.num_nextn_predict_layers > 0;
        DecodeRun plain, traced, mtp;
        for (int rep = 0; rep < repeats; ++rep) {
            decode_run(plain, m, prompt, n, false, false);
            decode_run(traced, m, prompt, n, false, true);
            if (has_mtp) decode_run(mtp, m, prompt, n, true, false);
        }
        nlohmann::json row{{"context", ctx},
                           {"prefill_tokens_per_s", prefill},
                           {"decode_tokens_per_s", plain.tokens_per_s},
                           {"decode_tokens_per_cpu_s", plain.tokens_per_cpu_s},
                           {"decode_tokens_per_s_telemetry", traced.tokens_per_s},
                           {"telemetry_overhead", plain.tokens_per_s / traced.tokens_per_s - 1.0}};
        if (has_mtp) {
            row["decode_tokens_per_s_mtp"] = mtp.tokens_per_s;
            row["decode_tokens_per_cpu_s_mtp"] = mtp.tokens_per_cpu_s;
            row["mtp_speedup"] = mtp.tokens_per_s / plain.tokens_per_s;
            row["mtp_acceptance_rate"] = mtp.acceptance_rate;
            row["mtp_mean_acceptance_length"] = mtp.mean_acceptance_length;
        }
        if (step_reps > 0) {
            StepCosts c = step_costs(*m.backend, prompt, step_reps);
            row["step_seconds_decode"] = c.decode;
            row["step_seconds_verify"] = c.verify;
            row["verify_tokens"] = c.verify_tokens;
            if (c.draft > 0) {
                row["step_seconds_draft"] = c.draft;
                // One MTP step emits 1 + (accepted drafts) tokens for a draft and a verify pass.
                const double acc = row.contains("mtp_acceptance_rate") ? row["mtp_acceptance_rate"].get<double>() : 0.0;
                row["verify_cost_in_decode_steps"] = c.verify / c.decode;
                row["draft_cost_in_decode_steps"] = c.draft / c.decode;
                row["mtp_speedup_predicted"] = (1.0 + acc) * c.decode / (c.draft + c.verify);
                // The acceptance rate at which a draft + verify step costs as much as the
                // 1 + acceptance plain decode steps it replaces.
                row["mtp_break_even_acceptance"] = (c.draft + c.verify) / c.decode - 1.0;
            }
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
                     "[--threads T] [--no-train] [--step-reps N] [--synthetic HIDDEN [--layers L]] [--backend cpu|cuda|auto] "
                     "[--weights f32|bf16|auto]   "
                     "throughput benchmark (JSON)",
                     cmd_bench);

}  // namespace
}  // namespace moescope::cli
