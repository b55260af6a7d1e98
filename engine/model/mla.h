// Multi-head latent attention (deepseek-v3.md section 2.1): the latent cache and the
// naive (decompressing) and absorbed (attention in latent space) forward paths.
#pragma once
#include <vector>

#include "engine/config.h"
#include "engine/model/rope.h"
#include "engine/weights.h"

namespace moescope {

// What MLA caches for one layer: only the normalized latent c and the rope'd k_pe.
struct LatentCache {
    std::vector<float> c;     // [positions, d_c]
    std::vector<float> k_pe;  // [positions, d_rope]
};

struct MlaDims {
    int D, H, d_nope, d_rope, d_v, d_c, q_lora;
    float scale, eps;
    explicit MlaDims(const ModelConfig& c);
};

// Attention for T new tokens at positions start..start+T-1. Appends their c / k_pe to
// `cache` (which holds exactly `start` positions on entry), attends causally over the
// whole cache and writes out[T, D]. `absorbed` selects the latent-space path.
void mla_forward(float* out, const float* x, int T, int start, const AttentionWeights& w, const MlaDims& d,
                 const Rope& rope, LatentCache& cache, bool absorbed);

}  // namespace moescope
