// moescope-cli perplexity: held-out cross-entropy of a model on a text file, and with
// --disable-experts the same text again with those experts switched off (an ablation in the
// manner of DeepSeekMoE's expert-redundancy experiment): how much the loss rises, and how much
// of each layer's traffic the disabled experts had carried.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>

#include <nlohmann/json.hpp>

#include "engine/config.h"
#include "engine/errors.h"
#include "engine/eval.h"
#include "engine/tools/cli.h"
#include "engine/tools/cli_model.h"

namespace moescope::cli {
namespace {

nlohmann::json result_json(const PerplexityResult& r) {
    nlohmann::json j{{"windows", r.windows},
                     {"tokens", r.tokens},
                     {"cross_entropy", r.cross_entropy},
                     {"perplexity", r.perplexity()}};
    if (r.mtp_tokens)
        j["mtp"] = {{"tokens", r.mtp_tokens}, {"cross_entropy", r.mtp_cross_entropy}, {"perplexity", r.mtp_perplexity()}};
    return j;
}

// Share of a layer's routings (token x slot) that went to `experts`.
double share_of(const std::vector<int64_t>& load, const std::vector<int>& experts) {
    int64_t all = 0, part = 0;
    for (int64_t c : load) all += c;
    for (int e : experts) part += load[size_t(e)];
    return all ? double(part) / double(all) : 0.0;
}

int cmd_perplexity(const std::vector<std::string>& argv) {
    Args a(argv, {"json", "no-mtp"});
    a.check_known({"corpus", "context", "max-windows", "disable-experts", "backend", "weights"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR");
    const std::string dir = a.positional()[0];
    const auto corpus = a.get("corpus");
    if (!corpus) throw UsageError("--corpus FILE is required");
    const std::string text = read_corpus(*corpus);
    PerplexityOptions o;
    o.context = int(a.integer("context", std::min(512, ModelConfig::load(dir).max_position_embeddings)));
    LoadedModel m = open_model(dir, a.get_or("backend", "auto"), o.context, weights_from_args(a));
    o.max_windows = int(a.integer("max-windows", 0));
    o.mtp = !a.has("no-mtp");
    const std::vector<int> ids = text_tokens(text, m);
    const bool json = a.has("json");
    if (!json) std::fprintf(stderr, "[%s]\n", m.notice.c_str());
    const bool tty = !json && progress_on_stderr();
    auto progress = [&](const char* what) {
        return [&, what](int done, int total) {
            if (tty) std::fprintf(stderr, "\r%s: window %d/%d", what, done, total);
            return true;
        };
    };
    const PerplexityResult base = evaluate_perplexity(*m.backend, ids, o, progress("baseline"));
    if (tty) std::fprintf(stderr, "\n");
    const auto off = disable_experts(a, *m.backend);
    std::optional<PerplexityResult> abl;
    if (!off.empty()) {
        abl = evaluate_perplexity(*m.backend, ids, o, progress("experts disabled"));
        if (tty) std::fprintf(stderr, "\n");
    }
    if (json) {
        nlohmann::json j = result_json(base);
        j["corpus"] = *corpus;
        j["context"] = o.context;
        j["corpus_tokens"] = ids.size();
        if (abl) {
            nlohmann::json layers = nlohmann::json::array();
            for (const auto& [layer, experts] : off) {
                nlohmann::json l{{"layer", layer}, {"experts", experts}};
                if (auto it = base.loads.find(layer); it != base.loads.end())
                    l["baseline_share"] = share_of(it->second, experts);
                layers.push_back(std::move(l));
            }
            nlohmann::json ab = result_json(*abl);
            ab["disabled"] = std::move(layers);
            ab["delta_cross_entropy"] = abl->cross_entropy - base.cross_entropy;
            j["ablation"] = std::move(ab);
        }
        std::cout << j.dump() << "\n";
        return 0;
    }
    std::printf("corpus        %s: %zu tokens, %d window%s of up to %d, %lld predictions scored\n", corpus->c_str(),
                ids.size(), base.windows, base.windows == 1 ? "" : "s", o.context, (long long)base.tokens);
    if (!abl) {
        std::printf("perplexity    %.3f (cross-entropy %.4f nats/token)\n", base.perplexity(), base.cross_entropy);
        if (base.mtp_tokens)
            std::printf("MTP module    perplexity %.3f (cross-entropy %.4f nats/token) on the token after next\n",
                        base.mtp_perplexity(), base.mtp_cross_entropy);
        return 0;
    }
    std::printf("%-22s %12s %18s %12s\n", "", "baseline", "experts disabled", "change");
    auto row = [](const char* name, double b, double x, bool ratio) {
        if (ratio) std::printf("%-22s %12.3f %18.3f %+11.1f%%\n", name, b, x, 100.0 * (x / b - 1.0));
        else std::printf("%-22s %12.4f %18.4f %+12.4f\n", name, b, x, x - b);
    };
    row("cross-entropy (nats)", base.cross_entropy, abl->cross_entropy, false);
    row("perplexity", base.perplexity(), abl->perplexity(), true);
    if (base.mtp_tokens) {
        row("MTP cross-entropy", base.mtp_cross_entropy, abl->mtp_cross_entropy, false);
        row("MTP perplexity", base.mtp_perplexity(), abl->mtp_perplexity(), true);
    }
    std::printf("disabled (share of the layer's routings they took in the baseline):\n");
    for (const auto& [layer, experts] : off) {
        std::string list;
        for (int e : experts) {
            if (!list.empty()) list += ',';
            list += std::to_string(e);
        }
        const auto it = base.loads.find(layer);
        if (it == base.loads.end())  // an MTP module's layer: the main model's pass does not route there
            std::printf("  layer %d: experts %s\n", layer, list.c_str());
        else
            std::printf("  layer %d: experts %s (%.1f%%)\n", layer, list.c_str(), 100.0 * share_of(it->second, experts));
    }
    return 0;
}

CliCommand perplexity_cmd("perplexity",
                          "perplexity MODEL_DIR --corpus FILE [--context N] [--max-windows N] [--no-mtp] "
                          "[--disable-experts L:E,E-E;...] [--backend cpu|cuda|auto] [--weights f32|bf16|auto] [--json]"
                          "   held-out cross-entropy; with experts disabled, against the baseline",
                          cmd_perplexity);

}  // namespace
}  // namespace moescope::cli
