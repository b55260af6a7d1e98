// moescope-cli inspect / forward: the model card and one full-sequence forward pass.
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "engine/config.h"
#include "engine/loader.h"
#include "engine/safetensors.h"
#include "engine/tools/cli.h"
#include "engine/tools/cli_model.h"

namespace moescope::cli {
namespace {

int cmd_inspect(const std::vector<std::string>& argv) {
    Args a(argv, {"json"});
    a.check_known({"weights"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR or config.json");
    ModelConfig cfg = ModelConfig::load(a.positional()[0]);
    ModelCard card = model_card(cfg);
    if (std::filesystem::is_directory(a.positional()[0])) {
        // The storage a load would choose and its resident bytes, from the safetensors headers
        // (nothing is read but the headers).
        Checkpoint ck = Checkpoint::open(a.positional()[0]);
        const WeightMemory wm = planned_weight_memory(cfg, ck, resolve_storage(weights_from_args(a), cfg, ck));
        card.weight_storage = wm.storage;
        card.weight_bytes = wm.bytes;
    }
    if (a.has("json")) {
        std::cout << card.to_json(cfg).dump(2) << "\n";
    } else {
        std::cout << card.to_text(cfg);
    }
    return 0;
}

int cmd_forward(const std::vector<std::string>& argv) {
    Args a(argv, {"json", "naive"});
    a.check_known({"tokens", "backend", "weights", "disable-experts", "drop-top-experts"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR");
    std::vector<int> tokens = a.int_list("tokens");
    if (tokens.empty()) throw UsageError("--tokens 1,2,3 is required");
    std::string backend = a.get_or("backend", "cpu");
    if (backend != "cpu" && backend != "cuda" && backend != "auto")
        throw UsageError("--backend cpu|cuda|auto; got '" + backend + "'");
    auto model = load_model(a.positional()[0], LoadOptions{weights_from_args(a)});
    const ModelConfig& cfg = model->config();
    const int T = int(tokens.size()), V = cfg.vocab_size;
    BackendSelection sel = select_backend(backend, model, T);
    if (!a.has("json")) std::fprintf(stderr, "%s\n", sel.notice.c_str());
    Backend& be = *sel.backend;
    disable_experts(a, be);
    drop_top_experts(a, be);
    auto cache = be.new_cache(0, T);
    ForwardOptions opt;
    opt.absorbed = !a.has("naive");
    ForwardResult res;
    be.forward(tokens.data(), T, *cache, opt, res);
    // MTP depth d at position i needs token i + d.
    std::vector<ForwardResult> mtp;
    std::vector<float> h_prev = res.hidden;
    for (int d = 1; d <= cfg.num_nextn_predict_layers && T - d > 0; ++d) {
        auto mc = be.new_cache(d, T);
        ForwardResult mr;
        be.forward_mtp(d, h_prev.data(), tokens.data() + d, T - d, *mc, opt, mr);
        h_prev = mr.raw_hidden;
        mtp.push_back(std::move(mr));
    }
    if (!a.has("json")) {
        std::printf("position  token  argmax  logit\n");
        for (int t = 0; t < T; ++t) {
            const float* lg = res.logits.data() + size_t(t) * V;
            int best = 0;
            for (int v = 1; v < V; ++v)
                if (lg[v] > lg[best]) best = v;
            std::printf("%8d  %5d  %6d  %.5f\n", t, tokens[size_t(t)], best, lg[best]);
        }
        for (const auto& lr : res.routing) {
            std::printf("layer %d experts (last position):", lr.layer);
            for (int i = 0; i < lr.r.k; ++i)
                std::printf(" %d(%.3f)", lr.r.ids[size_t((T - 1) * lr.r.k + i)], lr.r.weights[size_t((T - 1) * lr.r.k + i)]);
            std::printf("\n");
        }
        return 0;
    }
    nlohmann::json j;
    nlohmann::json logits = nlohmann::json::array();
    for (int t = 0; t < T; ++t)
        logits.push_back(std::vector<float>(res.logits.begin() + size_t(t) * V, res.logits.begin() + size_t(t + 1) * V));
    j["logits"] = std::move(logits);
    nlohmann::json routing = nlohmann::json::array();
    for (const auto& lr : res.routing) {
        nlohmann::json ex = nlohmann::json::array(), wt = nlohmann::json::array();
        for (int t = 0; t < T; ++t) {
            ex.push_back(std::vector<int>(lr.r.ids.begin() + t * lr.r.k, lr.r.ids.begin() + (t + 1) * lr.r.k));
            wt.push_back(std::vector<float>(lr.r.weights.begin() + t * lr.r.k, lr.r.weights.begin() + (t + 1) * lr.r.k));
        }
        routing.push_back({{"layer", lr.layer}, {"experts", ex}, {"weights", wt}});
    }
    j["routing"] = std::move(routing);
    nlohmann::json mtpj = nlohmann::json::array();
    for (const auto& mr : mtp) {
        nlohmann::json depth = nlohmann::json::array();
        for (int t = 0; t < mr.T; ++t)
            depth.push_back(std::vector<float>(mr.logits.begin() + size_t(t) * V, mr.logits.begin() + size_t(t + 1) * V));
        mtpj.push_back(std::move(depth));
    }
    j["mtp_logits"] = std::move(mtpj);
    std::cout << j.dump() << "\n";
    return 0;
}

CliCommand inspect_cmd("inspect", "inspect MODEL_DIR|config.json [--json] [--weights f32|bf16|auto]   the model card", cmd_inspect);
CliCommand forward_cmd("forward", "forward MODEL_DIR --tokens 1,2,3 [--json] [--naive] [--backend cpu|cuda|auto] [--weights f32|bf16|auto] [--disable-experts L:E,E-E;...] [--drop-top-experts R]   one full-sequence forward",
                       cmd_forward);

}  // namespace
}  // namespace moescope::cli
