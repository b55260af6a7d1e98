// moescope-cli trace: summarize a JSONL telemetry trace and export it in the shapes serving
// engines use (routed experts [tokens, moe_layers, k], expert load [steps, layers, experts]).
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>

#include <nlohmann/json.hpp>

#include "engine/telemetry.h"
#include "engine/tools/cli.h"

namespace moescope::cli {
namespace {

int cmd_trace(const std::vector<std::string>& argv) {
    Args a(argv, {"json"});
    a.check_known({"routes-npy", "routes-csv", "load-npy", "load-csv"});
    if (a.positional().size() != 1) throw UsageError("expected one TRACE.jsonl");
    auto recs = read_trace(a.positional()[0]);
    std::vector<RouteRecord> routes;
    std::vector<LoadRecord> loads;
    std::map<std::string, int> count;
    std::map<int, std::vector<int64_t>> total;
    int64_t drafted = 0, accepted = 0;
    std::vector<AblationRecord> ablations;  // every change, in order
    std::vector<EvaluationRecord> evaluations;
    for (const auto& r : recs) {
        count[record_type(r)]++;
        if (auto* x = std::get_if<AblationRecord>(&r)) ablations.push_back(*x);
        if (auto* x = std::get_if<EvaluationRecord>(&r)) evaluations.push_back(*x);
        if (auto* x = std::get_if<RouteRecord>(&r)) routes.push_back(*x);
        if (auto* x = std::get_if<LoadRecord>(&r)) {
            loads.push_back(*x);
            auto& t = total[x->layer];
            t.resize(std::max(t.size(), x->counts.size()));
            for (size_t e = 0; e < x->counts.size(); ++e) t[e] += x->counts[e];
        }
        if (auto* x = std::get_if<MtpRecord>(&r)) {
            drafted += int64_t(x->draft.size());
            accepted += x->accepted;
        }
    }
    if (auto f = a.get("routes-npy")) export_routed_experts_npy(*f, routes);
    if (auto f = a.get("routes-csv")) export_routed_experts_csv(*f, routes);
    if (auto f = a.get("load-npy")) export_load_npy(*f, loads);
    if (auto f = a.get("load-csv")) export_load_csv(*f, loads);
    nlohmann::json j;
    j["records"] = count;
    nlohmann::json mv = nlohmann::json::object();
    for (const auto& [layer, t] : total) mv[std::to_string(layer)] = max_violation(t);
    j["maxvio_global_per_layer"] = mv;
    j["mtp"] = {{"draft_tokens", drafted},
                {"accepted_tokens", accepted},
                {"acceptance_rate", drafted ? double(accepted) / double(drafted) : 0.0}};
    if (!ablations.empty()) {
        j["ablations"] = nlohmann::json::array();
        for (const auto& x : ablations)
            j["ablations"].push_back({{"step", x.step}, {"layer", x.layer}, {"disabled", x.disabled},
                                      {"drop_top", x.drop_top}});
    }
    // Held-out evaluations: perplexity with every expert on, with the ablation, and each sweep run.
    auto ppl = [](const PerplexityRun& p) { return std::exp(p.cross_entropy); };
    if (!evaluations.empty()) {
        j["evaluations"] = nlohmann::json::array();
        for (const auto& e : evaluations) {
            nlohmann::json x{{"step", e.step}, {"corpus", e.corpus}, {"perplexity", ppl(e.baseline)}};
            if (e.ablated) {
                x["ablation"] = e.ablation;
                x["perplexity_ablated"] = ppl(e.with_ablation);
            }
            if (!e.sweep.empty()) {
                x["sweep_perplexity"] = nlohmann::json::array();
                for (const auto& p : e.sweep) x["sweep_perplexity"].push_back(ppl(p));
                if (!e.sweep_layers.empty()) x["sweep_layers"] = e.sweep_layers;
                if (!e.sweep_experts.empty()) {
                    x["sweep_experts"] = e.sweep_experts;
                    x["sweep_expert_layer"] = e.sweep_expert_layer;
                }
            }
            j["evaluations"].push_back(x);
        }
    }
    if (a.has("json")) {
        std::cout << j.dump() << "\n";
    } else {
        std::printf("%s: %zu records\n", a.positional()[0].c_str(), recs.size());
        for (const auto& [t, n] : count) std::printf("  %-10s %d\n", t.c_str(), n);
        for (const auto& [layer, t] : total) std::printf("  layer %d: MaxVio over the trace %.3f\n", layer, max_violation(t));
        if (drafted) std::printf("  MTP acceptance %.1f%% of %lld drafted tokens\n", 100.0 * accepted / drafted,
                                 static_cast<long long>(drafted));
        for (const auto& x : ablations) {  // what was switched off, from which step
            std::string what;
            for (int e : x.disabled) what += (what.empty() ? "experts " : ",") + std::to_string(e);
            if (x.drop_top > 0)
                what += (what.empty() ? "" : "; ") + std::string("each token's top ") + std::to_string(x.drop_top) + " dropped";
            std::printf("  ablation from step %lld, layer %d: %s\n", static_cast<long long>(x.step), x.layer,
                        what.empty() ? "every expert on" : what.c_str());
        }
        for (const auto& e : evaluations) {
            std::printf("  evaluation at step %lld of %s: perplexity %.2f", static_cast<long long>(e.step),
                        e.corpus.c_str(), ppl(e.baseline));
            if (e.ablated) std::printf("; off (%s): %.2f", e.ablation.c_str(), ppl(e.with_ablation));
            const bool per_layer = !e.sweep_layers.empty(), per_expert = !e.sweep_experts.empty();
            const std::string intro = per_expert ? "; each expert of layer " + std::to_string(e.sweep_expert_layer) + " off alone,"
                                      : per_layer ? "; each token's top expert dropped in"
                                                  : "; each token's top R dropped,";
            for (size_t i = 0; i < e.sweep.size(); ++i)
                std::printf("%s %s %d: %.2f", i ? "," : intro.c_str(), per_expert ? "expert" : per_layer ? "layer" : "R",
                            per_expert ? e.sweep_experts[i] : per_layer ? e.sweep_layers[i] : int(i), ppl(e.sweep[i]));
            std::printf("\n");
        }
    }
    return 0;
}

CliCommand trace_cmd("trace",
                     "trace TRACE.jsonl [--json] [--routes-npy F] [--routes-csv F] [--load-npy F] [--load-csv F]   "
                     "summarize / export a telemetry trace",
                     cmd_trace);

}  // namespace
}  // namespace moescope::cli
