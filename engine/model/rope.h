// Rotary embedding on interleaved pairs (2i, 2i+1), with YaRN frequency interpolation.
#pragma once
#include <vector>

#include "engine/config.h"

namespace moescope {

struct Rope {
    int dim = 0;                 // d_rope
    std::vector<float> inv_freq; // [d_rope / 2]
    float mscale = 1.0f;         // yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)

    explicit Rope(const ModelConfig& cfg);
    Rope() = default;
    // Rotates x[n_vec][dim] (stride `stride` floats between vectors) in place for position pos.
    void apply(float* x, int n_vec, int stride, int pos) const;
    // The transposed map (R^T times mscale): the backward pass of apply.
    void apply_transpose(float* x, int n_vec, int stride, int pos) const;
};

}  // namespace moescope
