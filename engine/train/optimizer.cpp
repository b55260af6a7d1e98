// Weight init, AdamW, schedule, clipping helpers and the aux-loss-free bias update.
#include "engine/train/optimizer.h"

#include <algorithm>
#include <cmath>

#include "engine/train/train_forward.h"

namespace moescope {

double normal01(std::mt19937_64& rng) {
    // Two uniforms in (0, 1] from the top 53 bits.
    const double u1 = (double(rng() >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    const double u2 = double(rng() >> 11) * (1.0 / 9007199254740992.0);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

Weights init_weights(const ModelConfig& cfg, uint64_t seed, double std) {
    Weights w = allocate_weights(cfg);
    std::mt19937_64 rng(seed);
    const double out_std = std / std::sqrt(2.0 * std::max(1, cfg.num_hidden_layers));
    for (auto& nt : tensor_table(w, cfg)) {
        Tensor& t = *nt.tensor;
        if (t.empty()) continue;
        if (nt.name.find("e_score_correction_bias") != std::string::npos) {
            std::fill(t.data.begin(), t.data.end(), 0.0f);
        } else if (t.shape.size() == 1) {
            std::fill(t.data.begin(), t.data.end(), 1.0f);
        } else {
            const bool out = nt.name.find("o_proj") != std::string::npos ||
                             nt.name.find("down_proj") != std::string::npos;
            const double s = out ? out_std : std;
            for (auto& x : t.data) x = float(s * normal01(rng));
        }
    }
    return w;
}

void zero_grads(Weights& g, const ModelConfig& cfg) {
    for (auto& nt : tensor_table(g, cfg)) std::fill(nt.tensor->data.begin(), nt.tensor->data.end(), 0.0f);
}

double grad_global_norm(Weights& g, const ModelConfig& cfg) {
    double s = 0;
    for (auto& nt : tensor_table(g, cfg))
        for (float x : nt.tensor->data) s += double(x) * x;
    return std::sqrt(s);
}

void scale_grads(Weights& g, const ModelConfig& cfg, float s) {
    for (auto& nt : tensor_table(g, cfg))
        for (float& x : nt.tensor->data) x *= s;
}

bool all_finite(Weights& g, const ModelConfig& cfg) {
    for (auto& nt : tensor_table(g, cfg))
        for (float x : nt.tensor->data)
            if (!std::isfinite(x)) return false;
    return true;
}

AdamW::AdamW(Weights& w, const ModelConfig& cfg, AdamWOptions opt)
    : cfg_(cfg), opt_(opt), m_(zeros_like(w, cfg)), v_(zeros_like(w, cfg)) {}

void AdamW::update(Weights& w, Weights& g, double lr, int64_t t) {
    auto tw = tensor_table(w, cfg_), tg = tensor_table(g, cfg_), tm = tensor_table(m_, cfg_),
         tv = tensor_table(v_, cfg_);
    const double b1 = opt_.beta1, b2 = opt_.beta2;
    const double c1 = 1.0 - std::pow(b1, double(t)), c2 = 1.0 - std::pow(b2, double(t));
    for (size_t i = 0; i < tw.size(); ++i) {
        Tensor& p = *tw[i].tensor;
        if (p.empty() || tw[i].name.find("e_score_correction_bias") != std::string::npos) continue;
        const float* gr = tg[i].tensor->ptr();
        float* m = tm[i].tensor->ptr();
        float* v = tv[i].tensor->ptr();
        const float wd = p.shape.size() == 1 ? 0.0f : float(opt_.weight_decay);
        const float lrf = float(lr), b1f = float(b1), b2f = float(b2), c1f = float(c1), c2f = float(c2),
                    epsf = float(opt_.eps);
        float* x = p.ptr();
        const int64_t n = p.numel();
        for (int64_t j = 0; j < n; ++j) {
            m[j] = b1f * m[j] + (1.0f - b1f) * gr[j];
            v[j] = b2f * v[j] + (1.0f - b2f) * gr[j] * gr[j];
            const float mh = m[j] / c1f, vh = v[j] / c2f;
            x[j] -= lrf * (mh / (std::sqrt(vh) + epsf) + wd * x[j]);
        }
    }
}

double lr_schedule(int64_t step, int64_t warmup, int64_t total, double lr_max, double lr_min) {
    if (warmup > 0 && step < warmup) return lr_max * double(step + 1) / double(warmup);
    if (total <= warmup) return lr_max;
    const double p = std::clamp(double(step - warmup) / double(std::max<int64_t>(1, total - warmup)), 0.0, 1.0);
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + std::cos(M_PI * p));
}

double max_vio(const std::vector<int64_t>& load) {
    if (load.empty()) return 0;
    double sum = 0, mx = 0;
    for (auto n : load) {
        sum += double(n);
        mx = std::max(mx, double(n));
    }
    if (sum <= 0) return 0;
    return mx / (sum / double(load.size())) - 1.0;
}

void update_router_bias(float* bias, const std::vector<int64_t>& load, double gamma) {
    double mean = 0;
    for (auto n : load) mean += double(n);
    mean /= double(load.size());
    for (size_t e = 0; e < load.size(); ++e) {
        const double d = mean - double(load[e]);
        bias[e] += float(gamma * (d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0));
    }
}

}  // namespace moescope
