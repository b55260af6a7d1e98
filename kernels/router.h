// The DeepSeekMoE router on the device (deepseek-v3.md 2.3), mirroring engine/model/moe.cpp
// route() step by step: sigmoid/softmax scores, + bias for the choice only, group scores
// (sum of the 2 largest for noaux_tc, max for group_limited_greedy), the topk_group best groups,
// -inf for the experts of the other groups, top-k with ties to the lower index, weights =
// scores of the chosen (normalized when norm_topk_prob and k > 1, then scaled).
#pragma once
#include <cstdint>

#include "kernels/common.h"
#include "kernels/dispatch.h"

namespace moescope::cuda {

struct RouterParams {
    int E, k, n_group, topk_group;
    bool sigmoid, use_bias, norm_topk_prob;
    int method;  // 0 greedy, 1 group_limited_greedy, 2 noaux_tc (RouterDims::Method order)
    float routed_scaling_factor;
};

inline constexpr int kRouterMaxK = 16, kRouterMaxGroups = 64;

// logits [T, E] -> ids [T, k] (descending choice), weights [T, k], scores [T, E],
// kept [T, G] (G = n_group when grouped, else 1). bias: device [E] or null. disabled: device
// [E] or null, 1 for an expert switched off (-inf in every choice, as route() on the CPU).
// drop_top: device, one byte, or null (0): each token's that many highest-ranked picks are
// switched off for it and it is routed again (route()'s drop_top; read on the device, so a
// captured graph sees a change).
void route(int* ids, float* weights, float* scores, uint8_t* kept, const float* logits, const float* bias,
           const uint8_t* disabled, const uint8_t* drop_top, int T, const RouterParams& p, cudaStream_t s);

// route() then dispatch() (dispatch.h) in one launch of one block, for decode: at most 32 tokens
// and 1024 experts (route_dispatch_fits). The same outputs as the two calls.
bool route_dispatch_fits(int T, const RouterParams& p);
void route_and_dispatch(int* ids, float* weights, float* scores, uint8_t* kept, const float* logits, const float* bias,
                        const uint8_t* disabled, const uint8_t* drop_top, int T, const RouterParams& p,
                        const DispatchOut& d, cudaStream_t s);

}  // namespace moescope::cuda
