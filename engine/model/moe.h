// DeepSeekMoE (deepseek-v3.md section 2.3): the router (sigmoid/softmax scores, bias,
// group-limited top-k, normalization, scaling) and the expert mixture with shared experts.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/weights.h"

namespace moescope {

struct RouterDims {
    int E, k, n_group, topk_group;
    bool sigmoid, use_bias, norm_topk_prob;
    enum class Method { Greedy, GroupLimited, NoAuxTc } method;
    float routed_scaling_factor;
    explicit RouterDims(const ModelConfig& c);
};

// The routing of T tokens in one MoE layer.
struct Routing {
    int T = 0, k = 0, E = 0, n_group = 0;
    std::vector<int> ids;          // [T, k], in descending order of the choice score
    std::vector<float> weights;    // [T, k] mixing weights (normalized, scaled)
    std::vector<float> scores;     // [T, E] sigmoid / softmax scores (without bias)
    std::vector<uint8_t> kept_groups;  // [T, n_group] 1 when the group survived the group limit
};

// Scores from router logits[T, E]; `bias` may be null. Writes every field of `r`.
// `disabled` [E] (may be null): experts switched off for an ablation; they score -inf in every
// choice (groups and top-k), so each token takes the best enabled experts instead, and the
// mixing weights are the chosen experts' scores as usual. `drop_top` in [0, k] (DeepSeekMoE's
// other redundancy test, section 4.5): each token is routed once, its drop_top highest-ranked
// picks are switched off for that token alone, and it is routed again among the rest (groups
// re-scored). check_disabled_experts must have accepted the mask with this drop_top.
void route(Routing& r, const float* logits, int T, const float* bias, const RouterDims& d,
           const uint8_t* disabled = nullptr, int drop_top = 0);

// Error unless layer `layer` of the stack (MTP module k: num_hidden_layers + k - 1) routes: the
// ablation setters' check (Model, CudaBackend, the app's all-or-nothing check).
void check_moe_layer(const ModelConfig& c, int layer);

// The [E] mask of `experts` (1 = disabled); an Error naming `layer` for an id outside [0, E).
std::vector<uint8_t> expert_mask(const std::vector<int>& experts, int E, int layer);

// Throws Error (naming `layer`) unless every token can still take k enabled experts whatever
// its scores, also after any drop_top more are switched off for it: at least k enabled, and
// with group-limited routing every choice of topk_group groups that could be kept holds k of
// them. A mask of the wrong size is a ShapeError; drop_top outside [0, k] an Error.
void check_disabled_experts(const RouterDims& d, const std::vector<uint8_t>& disabled, int layer,
                            int drop_top = 0);

// An ablation spec, "L:E,E-E;L:E" (decoder layer : expert ids and inclusive ranges; "*" for every
// MoE layer of the main model; MTP module k is layer num_hidden_layers + k - 1), as layer ->
// ascending expert ids. Throws Error naming the part that is wrong (a layer that does not route,
// an expert out of range, a malformed range).
std::map<int, std::vector<int>> parse_expert_spec(const std::string& spec, const ModelConfig& c);

// out[T, D] = sum_e w_e E_e(x) + Shared(x), for the experts chosen in `r`.
void moe_experts_forward(float* out, const float* x, int T, const MoeWeights& w, const Routing& r,
                         const ModelConfig& cfg);

// out[T, D] = down(silu(gate(x)) * up(x)).
void mlp_forward(float* out, const float* x, int T, const MlpWeights& w, bool accumulate = false);

}  // namespace moescope
