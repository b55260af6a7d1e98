// RoPE with YaRN (deepseek-v3.md section 2.2).
#include "engine/model/rope.h"

#include <algorithm>
#include <cmath>

namespace moescope {

static double yarn_mscale(double s, double m) { return s <= 1.0 ? 1.0 : 0.1 * m * std::log(s) + 1.0; }

Rope::Rope(const ModelConfig& cfg) : dim(cfg.qk_rope_head_dim) {
    const int half = dim / 2;
    const double base = cfg.rope_theta;
    inv_freq.resize(size_t(half));
    std::vector<double> extra(static_cast<size_t>(half));
    for (int i = 0; i < half; ++i) extra[size_t(i)] = std::pow(base, -2.0 * i / dim);
    if (cfg.rope_scaling) {
        const auto& y = *cfg.rope_scaling;
        const double s = y.factor, L0 = y.original_max_position_embeddings;
        const double pi2 = 2.0 * M_PI;
        auto corr = [&](double rot) { return dim * std::log(L0 / (rot * pi2)) / (2.0 * std::log(base)); };
        double low = std::floor(corr(y.beta_fast)), high = std::ceil(corr(y.beta_slow));
        low = std::max(low, 0.0);
        high = std::min(high, double(dim - 1));
        if (low == high) high += 0.001;
        for (int i = 0; i < half; ++i) {
            double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
            double f = extra[size_t(i)];
            inv_freq[size_t(i)] = float(f * (1.0 - ramp) + (f / s) * ramp);
        }
        mscale = float(yarn_mscale(s, y.mscale) / yarn_mscale(s, y.mscale_all_dim));
    } else {
        for (int i = 0; i < half; ++i) inv_freq[size_t(i)] = float(extra[size_t(i)]);
    }
}

// Rotates each pair by +theta (forward) or -theta (the transpose, for the backward pass),
// scaled by mscale either way.
static void rotate(const Rope& r, float* x, int n_vec, int stride, int pos, float sign) {
    const int half = r.dim / 2;
    for (int i = 0; i < half; ++i) {
        // The angle in f32, as the reference frameworks compute pos * inv_freq.
        float theta = float(pos) * r.inv_freq[size_t(i)];
        float c = std::cos(theta) * r.mscale, s = sign * std::sin(theta) * r.mscale;
        for (int v = 0; v < n_vec; ++v) {
            float* p = x + int64_t(v) * stride + 2 * i;
            float a = p[0], b = p[1];
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

void Rope::apply(float* x, int n_vec, int stride, int pos) const { rotate(*this, x, n_vec, stride, pos, 1.0f); }

void Rope::apply_transpose(float* x, int n_vec, int stride, int pos) const {
    rotate(*this, x, n_vec, stride, pos, -1.0f);
}

}  // namespace moescope
