// DeepSeekMoE (deepseek-v3.md section 2.3): the router (sigmoid/softmax scores, bias,
// group-limited top-k, normalization, scaling) and the expert mixture with shared experts.
#pragma once
#include <cstdint>
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
void route(Routing& r, const float* logits, int T, const float* bias, const RouterDims& d);

// out[T, D] = sum_e w_e E_e(x) + Shared(x), for the experts chosen in `r`.
void moe_experts_forward(float* out, const float* x, int T, const MoeWeights& w, const Routing& r,
                         const ModelConfig& cfg);

// out[T, D] = down(silu(gate(x)) * up(x)).
void mlp_forward(float* out, const float* x, int T, const MlpWeights& w, bool accumulate = false);

}  // namespace moescope
