// Training building blocks: weight initialisation, AdamW with decoupled weight decay over the
// tensor table, the warm-up + cosine learning-rate schedule, global-norm gradient clipping, and
// the aux-loss-free bias update with its MaxVio metric.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "engine/config.h"
#include "engine/weights.h"

namespace moescope {

// Deterministic N(0, 1) from a 64-bit Mersenne twister (Box-Muller), the same on every platform.
double normal01(std::mt19937_64& rng);

// Fresh weights: norms 1, router bias 0, matrices N(0, std^2); the projections that write into
// the residual stream (o_proj, down_proj) get std / sqrt(2 * layers), as GPT-2 does.
Weights init_weights(const ModelConfig& cfg, uint64_t seed, double std = 0.02);

// Set every tensor of g to zero (keeps shapes).
void zero_grads(Weights& g, const ModelConfig& cfg);

// sqrt(sum of squares) over every gradient tensor; NaN/inf propagate.
double grad_global_norm(Weights& g, const ModelConfig& cfg);
void scale_grads(Weights& g, const ModelConfig& cfg, float s);
bool all_finite(Weights& g, const ModelConfig& cfg);

struct AdamWOptions {
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

// AdamW with f32 master weights and f32 moments (m, v: shaped like the weights). Norm weights
// and biases (1-D tensors) get no weight decay; the router's e_score_correction_bias is not a
// gradient-trained parameter and is skipped entirely.
class AdamW {
public:
    AdamW(Weights& w, const ModelConfig& cfg, AdamWOptions opt);
    // One update with learning rate lr; t is the 1-based step count for bias correction.
    void update(Weights& w, Weights& g, double lr, int64_t t);
    Weights& m() { return m_; }
    Weights& v() { return v_; }
    const AdamWOptions& options() const { return opt_; }

private:
    ModelConfig cfg_;
    AdamWOptions opt_;
    Weights m_, v_;
};

// Linear warm-up over `warmup` steps to lr_max, then cosine decay to lr_min at `total`.
double lr_schedule(int64_t step, int64_t warmup, int64_t total, double lr_max, double lr_min);

// MaxVio = max_e n_e / mean(n) - 1.
double max_vio(const std::vector<int64_t>& load);

// bias_e += gamma * sign(mean - n_e): overloaded experts lose bias, underloaded ones gain.
void update_router_bias(float* bias, const std::vector<int64_t>& load, double gamma);

}  // namespace moescope
