// moescope-cli perplexity: held-out cross-entropy of a model on a text file, and with
// --disable-experts / --drop-top-experts the same text again with experts switched off (the
// ablations of DeepSeekMoE's expert-redundancy experiments: fixed experts removed, or each
// token's top-ranked ones, swept over R): how much the loss rises, and how much of each
// layer's traffic the disabled experts had carried.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/config.h"
#include "engine/errors.h"
#include "engine/eval.h"
#include "engine/expert_analysis.h"
#include "engine/loader.h"
#include "engine/model/moe.h"
#include "engine/safetensors.h"
#include "engine/telemetry.h"
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

// What an ablation run switched off, for its column and JSON.
struct AblationRun {
    bool masked = false;  // --disable-experts too
    int drop_top = 0;
    int layer = -1;       // --per-layer: the one MoE layer dropping them (-1: every MoE layer)
    PerplexityResult result;
    std::vector<TokenImpact> hurt;  // the tokens it hurt most (--show-tokens, --min-count)
    std::string label() const {
        if (drop_top == 0) return "experts off";
        if (layer >= 0) return "layer " + std::to_string(layer) + ": top " + std::to_string(drop_top) + " off";
        return (masked ? "off + top " : "top ") + std::to_string(drop_top) + " dropped";
    }
};

// A run's ablation in words (an evaluation record's `ablation`): the experts off, then the top
// ranks dropped, e.g. "layer 1: experts 0,5; each token's top 1 in layer 2".
std::string ablation_words(const std::map<int, std::vector<int>>& off, const AblationRun& run) {
    std::string w;
    if (run.masked)
        for (const auto& [layer, experts] : off) {
            w += w.empty() ? "layer " : "; layer ";
            w += std::to_string(layer);
            for (size_t i = 0; i < experts.size(); ++i) {
                w += i ? "," : ": experts ";
                w += std::to_string(experts[i]);
            }
        }
    if (run.drop_top > 0) {
        w += w.empty() ? "each token's top " : "; each token's top ";
        w += std::to_string(run.drop_top);
        if (run.layer >= 0) w += " in layer " + std::to_string(run.layer);
    }
    return w;
}

// An evaluation record's common part: the text, the windows and the baseline.
EvaluationRecord evaluation_of(const std::string& corpus, const PerplexityOptions& o, const std::vector<int>& ids,
                               const PerplexityResult& base) {
    EvaluationRecord e;
    e.corpus = corpus;
    e.context = o.context;
    e.text_tokens = int64_t(ids.size());
    e.baseline = perplexity_run(base);
    return e;
}

// A trace of evaluations (`--telemetry`): the meta record, then the records, written to a
// temporary file and renamed.
void write_trace(const std::string& path, const LoadedModel& m, const std::string& dir, const std::string& corpus,
                 const std::vector<EvaluationRecord>& evals) {
    const ModelConfig& cfg = m.backend->config();
    std::vector<Record> recs{MetaRecord{loaded_model_card(*m.model).to_json(cfg), cfg.to_json(),
                                        {{"model", dir}, {"mode", "perplexity"}, {"source", corpus},
                                         {"backend", m.backend->name()}}}};
    recs.insert(recs.end(), evals.begin(), evals.end());
    write_file_atomic(path, [&](std::ostream& out) {
        for (const Record& r : recs)
            out << to_json(r).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    });
}

// Per scored prediction: index in the text, the token, its text, -ln p in the baseline and in
// each ablation run (written to a temporary file, then renamed).
void write_losses_csv(const std::string& path, const std::vector<int>& ids, const PerplexityResult& base,
                      const std::vector<AblationRun>& runs, const LoadedModel& m) {
    write_file_atomic(path, [&](std::ostream& o) {
        o << "index,token,text,baseline";
        for (const AblationRun& run : runs) o << ',' << csv_field(run.label());
        o << '\n';
        char buf[32];
        for (size_t i = 0; i < base.losses.size(); ++i) {
            const int64_t at = base.targets[i];
            o << at << ',' << ids[size_t(at)] << ',' << csv_field(token_piece(m.tokenizer.get(), ids[size_t(at)]));
            std::snprintf(buf, sizeof buf, ",%.9g", base.losses[i]);
            o << buf;
            for (const AblationRun& run : runs) {
                std::snprintf(buf, sizeof buf, ",%.9g", run.result.losses[i]);
                o << buf;
            }
            o << '\n';
        }
    });
}

// --per-expert L: the baseline, then each routed expert of layer L switched off alone (the
// --disable-experts ones staying off in every run): how much each one's absence costs.
int per_expert(const Args& a, const LoadedModel& m, const std::string& dir, const std::string& corpus,
               const std::vector<int>& ids, const PerplexityOptions& o, const std::map<int, std::vector<int>>& off,
               bool json, bool tty) {
    const ModelConfig& cfg = m.backend->config();
    const int layer = int(a.integer("per-expert", -1));
    check_moe_layer(cfg, layer);
    auto window = [&](const std::string& what) {
        return [&, what](int done, int total) {
            if (tty) std::fprintf(stderr, "\r%s: window %d/%d   ", what.c_str(), done, total);
            return true;
        };
    };
    const PerplexityResult base = evaluate_perplexity(*m.backend, ids, o, window("baseline"));
    Ablation masked = current_ablation(*m.backend);
    for (const auto& [l, experts] : off) masked.masks[size_t(l)] = expert_mask(experts, cfg.n_routed_experts, l);
    set_ablation(*m.backend, masked);
    int current = -1;  // the expert whose run is going on, for the progress line
    auto on_run = [&](int e, int, int) {
        current = e;
        return true;
    };
    const std::vector<ExpertImportance> points = expert_importance(
        *m.backend, ids, o, layer, on_run,
        [&](int done, int total) { return window("expert " + std::to_string(current) + " off")(done, total); });
    if (tty) std::fprintf(stderr, "\n");
    const auto load = base.loads.find(layer);
    auto share = [&](int e) { return load == base.loads.end() ? 0.0 : share_of(load->second, {e}); };
    if (auto f = a.get("telemetry")) {
        EvaluationRecord r = evaluation_of(corpus, o, ids, base);
        r.sweep_expert_layer = layer;
        for (const ExpertImportance& p : points) {
            r.sweep.push_back(perplexity_run(p.result));
            r.sweep_experts.push_back(p.expert);
        }
        write_trace(*f, m, dir, corpus, {r});
    }
    if (json) {
        nlohmann::json j = result_json(base);
        j["corpus"] = corpus;
        j["context"] = o.context;
        j["corpus_tokens"] = ids.size();
        j["layer"] = layer;
        j["experts"] = nlohmann::json::array();
        for (const ExpertImportance& p : points) {
            nlohmann::json x = result_json(p.result);
            x["expert"] = p.expert;
            x["baseline_share"] = share(p.expert);
            x["delta_cross_entropy"] = p.result.cross_entropy - base.cross_entropy;
            j["experts"].push_back(std::move(x));
        }
        std::cout << j.dump() << "\n";
        return 0;
    }
    std::printf("corpus        %s: %zu tokens, %d window%s of up to %d, %lld predictions scored\n", corpus.c_str(),
                ids.size(), base.windows, base.windows == 1 ? "" : "s", o.context, (long long)base.tokens);
    std::printf("perplexity    %.3f with every expert on%s\n", base.perplexity(),
                off.empty() ? "" : " (the --disable-experts ones stay off in each run below)");
    if (base.mtp_tokens) std::printf("MTP module    perplexity %.3f on the token after next\n", base.mtp_perplexity());
    std::printf("\neach routed expert of layer %d switched off alone (share: of the layer's routings in the baseline):\n",
                layer);
    std::printf("  expert   share   perplexity    change%s\n", base.mtp_tokens ? "   MTP perplexity" : "");
    for (const ExpertImportance& p : points) {
        std::printf("  %6d  %5.1f%%  %11.3f  %+7.1f%%", p.expert, 100.0 * share(p.expert), p.result.perplexity(),
                    100.0 * (p.result.perplexity() / base.perplexity() - 1.0));
        if (base.mtp_tokens) std::printf("  %15.3f", p.result.mtp_perplexity());
        std::printf("\n");
    }
    if (int(points.size()) + int(off.count(layer) ? off.at(layer).size() : 0) < cfg.n_routed_experts)
        std::printf("(experts left out: the router cannot lose them, a token would keep fewer than %d)\n",
                    cfg.num_experts_per_tok);
    return 0;
}

int cmd_perplexity(const std::vector<std::string>& argv) {
    Args a(argv, {"json", "no-mtp", "per-layer"});
    a.check_known({"corpus", "context", "max-windows", "disable-experts", "drop-top-experts", "backend", "weights",
                   "show-tokens", "min-count", "losses-csv", "telemetry", "per-expert"});
    const int show_tokens = int(a.integer("show-tokens", 10));  // 0: none
    const int min_count = int(a.integer("min-count", 3));
    if (show_tokens < 0) throw UsageError("--show-tokens must be >= 0");
    if (min_count < 1) throw UsageError("--min-count must be >= 1");
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
    auto evaluate = [&](const std::string& what) {
        PerplexityResult r = evaluate_perplexity(*m.backend, ids, o, [&](int done, int total) {
            if (tty) std::fprintf(stderr, "\r%s: window %d/%d", what.c_str(), done, total);
            return true;
        });
        if (tty) std::fprintf(stderr, "\n");
        return r;
    };
    // The ablations: --disable-experts, --drop-top-experts R or a sweep R,R,... (with the mask
    // in every run); each is checked before the baseline runs.
    const ModelConfig& cfg = m.backend->config();
    const auto spec = a.get("disable-experts");
    const std::map<int, std::vector<int>> off = spec ? parse_expert_spec(*spec, cfg) : std::map<int, std::vector<int>>{};
    std::vector<int> drops = a.int_list("drop-top-experts");
    if (!drops.empty() && cfg.n_routed_experts == 0) throw UsageError("--drop-top-experts: the model has no routed experts");
    if (a.has("per-layer") && drops.empty()) throw UsageError("--per-layer needs --drop-top-experts R");
    if (a.has("per-expert")) {
        if (!drops.empty() || a.has("losses-csv"))
            throw UsageError("--per-expert goes alone (with --disable-experts at most), not with --drop-top-experts "
                             "or --losses-csv");
        return per_expert(a, m, dir, *corpus, ids, o, off, json, tty);
    }
    if (drops.empty() && !off.empty()) drops.push_back(0);
    if (a.has("losses-csv") && drops.empty()) throw UsageError("--losses-csv needs an ablation to compare with");
    o.keep_losses = !drops.empty();
    // The runs: R in every MoE layer of the main model, or with --per-layer in each one alone.
    std::vector<AblationRun> runs;
    for (int r : drops) {
        if (!a.has("per-layer") || r == 0) {
            runs.push_back(AblationRun{!off.empty(), r, -1, {}, {}});
            continue;
        }
        for (int l = 0; l < cfg.num_hidden_layers; ++l)
            if (cfg.is_moe_layer(l)) runs.push_back(AblationRun{!off.empty(), r, l, {}, {}});
    }
    // A run's ablation: the --disable-experts masks (or none), and drop_top r in every MoE layer
    // of the main model or in `layer` alone.
    const Ablation none = current_ablation(*m.backend);
    auto ablate = [&](bool mask, int r, int layer) {
        Ablation a = none;
        if (mask)
            for (const auto& [l, experts] : off) a.masks[size_t(l)] = expert_mask(experts, cfg.n_routed_experts, l);
        for (int l = 0; l < cfg.num_hidden_layers; ++l)
            if (cfg.is_moe_layer(l) && (layer < 0 || l == layer)) a.drop_top[size_t(l)] = r;
        set_ablation(*m.backend, a);
    };
    for (const AblationRun& run : runs) ablate(true, run.drop_top, run.layer);
    ablate(false, 0, -1);
    const PerplexityResult base = evaluate("baseline");
    for (AblationRun& run : runs) {
        ablate(true, run.drop_top, run.layer);
        run.result = evaluate(run.label());
        if (show_tokens > 0) run.hurt = token_impact(ids, base, run.result, min_count, show_tokens);
    }
    if (auto f = a.get("telemetry")) {
        // A trace the app replays into its Evaluate view: the meta record, then one evaluation
        // record per ablation run (each against the baseline, with the tokens it hurt most), or
        // the baseline alone.
        std::vector<EvaluationRecord> evals;
        const EvaluationRecord e = evaluation_of(*corpus, o, ids, base);
        if (runs.empty()) evals.push_back(e);
        for (const AblationRun& run : runs) {
            EvaluationRecord x = e;
            x.ablated = true;
            x.with_ablation = perplexity_run(run.result);
            x.ablation = ablation_words(off, run);
            for (const TokenImpact& t : run.hurt)
                x.hurt.push_back({t.token, token_piece(m.tokenizer.get(), t.token), t.count, t.baseline, t.ablated,
                                  t.added});
            evals.push_back(std::move(x));
        }
        write_trace(*f, m, dir, *corpus, evals);
    }
    if (json) {
        nlohmann::json j = result_json(base);
        j["corpus"] = *corpus;
        j["context"] = o.context;
        j["corpus_tokens"] = ids.size();
        nlohmann::json disabled = nlohmann::json::array();
        for (const auto& [layer, experts] : off) {
            nlohmann::json l{{"layer", layer}, {"experts", experts}};
            if (auto it = base.loads.find(layer); it != base.loads.end())
                l["baseline_share"] = share_of(it->second, experts);
            disabled.push_back(std::move(l));
        }
        if (!runs.empty()) j["ablations"] = nlohmann::json::array();
        for (const AblationRun& run : runs) {
            nlohmann::json ab = result_json(run.result);
            ab["disabled"] = disabled;
            ab["drop_top"] = run.drop_top;
            if (run.layer >= 0) ab["layer"] = run.layer;
            ab["delta_cross_entropy"] = run.result.cross_entropy - base.cross_entropy;
            nlohmann::json hurt = nlohmann::json::array();
            for (const TokenImpact& t : run.hurt)
                hurt.push_back({{"token", t.token}, {"text", token_piece(m.tokenizer.get(), t.token)}, {"count", t.count},
                                {"baseline_nll", t.baseline}, {"ablated_nll", t.ablated}, {"added_nll", t.added}});
            ab["most_affected"] = std::move(hurt);
            j["ablations"].push_back(std::move(ab));
        }
        if (auto f = a.get("losses-csv")) write_losses_csv(*f, ids, base, runs, m);
        std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
        return 0;
    }
    if (auto f = a.get("losses-csv")) write_losses_csv(*f, ids, base, runs, m);
    std::printf("corpus        %s: %zu tokens, %d window%s of up to %d, %lld predictions scored\n", corpus->c_str(),
                ids.size(), base.windows, base.windows == 1 ? "" : "s", o.context, (long long)base.tokens);
    if (runs.empty()) {
        std::printf("perplexity    %.3f (cross-entropy %.4f nats/token)\n", base.perplexity(), base.cross_entropy);
        if (base.mtp_tokens)
            std::printf("MTP module    perplexity %.3f (cross-entropy %.4f nats/token) on the token after next\n",
                        base.mtp_perplexity(), base.mtp_cross_entropy);
        return 0;
    }
    // One column per run: the value, then its change from the baseline.
    std::printf("%-22s %10s", "", "baseline");
    for (const AblationRun& run : runs) std::printf(" %22s", run.label().c_str());
    std::printf("\n");
    auto row = [&](const char* name, double b, auto value, bool ratio) {
        std::printf(ratio ? "%-22s %10.3f" : "%-22s %10.4f", name, b);
        for (const AblationRun& run : runs) {
            const double x = value(run.result);
            char cell[64];
            if (ratio) std::snprintf(cell, sizeof cell, "%.3f (%+.1f%%)", x, 100.0 * (x / b - 1.0));
            else std::snprintf(cell, sizeof cell, "%.4f (%+.4f)", x, x - b);
            std::printf(" %22s", cell);
        }
        std::printf("\n");
    };
    row("cross-entropy (nats)", base.cross_entropy, [](const PerplexityResult& r) { return r.cross_entropy; }, false);
    row("perplexity", base.perplexity(), [](const PerplexityResult& r) { return r.perplexity(); }, true);
    if (base.mtp_tokens) {
        row("MTP cross-entropy", base.mtp_cross_entropy, [](const PerplexityResult& r) { return r.mtp_cross_entropy; },
            false);
        row("MTP perplexity", base.mtp_perplexity(), [](const PerplexityResult& r) { return r.mtp_perplexity(); }, true);
    }
    if (!off.empty()) {
        std::printf("experts off%s (share of the layer's routings they took in the baseline):\n",
                    runs.size() > 1 || runs[0].drop_top > 0 ? " in every run" : "");
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
                std::printf("  layer %d: experts %s (%.1f%%)\n", layer, list.c_str(),
                            100.0 * share_of(it->second, experts));
        }
    }
    if (runs.size() > 1 || runs[0].drop_top > 0)
        std::printf("top R dropped: each token's R highest-ranked experts switched off for it, in %s\n",
                    a.has("per-layer") ? "the layer named" : "every MoE layer of the main model");
    for (const AblationRun& run : runs) {
        if (show_tokens == 0) break;
        const std::vector<TokenImpact>& hurt = run.hurt;
        if (hurt.empty()) continue;
        const double rise = (run.result.cross_entropy - base.cross_entropy) * double(base.tokens);
        std::printf("\ntokens it hurt most, %s (predicted >= %d times; -ln p baseline -> ablated, share of the rise):\n",
                    run.label().c_str(), min_count);
        for (const TokenImpact& t : hurt) {
            std::printf("  %-16s ×%-5lld %6.2f -> %6.2f (%+.2f each", quote_token(token_piece(m.tokenizer.get(), t.token)).c_str(),
                        static_cast<long long>(t.count), t.baseline, t.ablated, t.ablated - t.baseline);
            if (rise > 0) std::printf(", %4.1f%%", 100.0 * t.added / rise);
            std::printf(")\n");
        }
    }
    return 0;
}

CliCommand perplexity_cmd("perplexity",
                          "perplexity MODEL_DIR --corpus FILE [--context N] [--max-windows N] [--no-mtp] "
                          "[--disable-experts L:E,E-E;...] [--drop-top-experts R[,R...] [--per-layer] | --per-expert L] [--show-tokens N] "
                          "[--min-count N] [--losses-csv FILE] [--telemetry OUT.jsonl] [--backend cpu|cuda|auto] "
                          "[--weights f32|bf16|auto] [--json]"
                          "   held-out cross-entropy; with experts switched off, against the baseline",
                          cmd_perplexity);

}  // namespace
}  // namespace moescope::cli
