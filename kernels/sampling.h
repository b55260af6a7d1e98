// Sampling on the device: greedy (argmax, ties to the lower id), or temperature with top-k and
// top-p filtering, so only the chosen ids cross to the host. Filters are thresholds on an
// order-preserving integer key of the logit found by bisection (no sort): top-k keeps every
// token whose logit is >= the k-th largest (ties at the boundary are all kept); top-p then keeps
// the smallest set of the most likely tokens whose probability reaches top_p (again whole ties).
// The draw: u in [0, 1) per row (from the host's seeded generator) times the kept mass, walked
// in token-id order.
#pragma once
#include "kernels/common.h"

namespace moescope::cuda {

struct SampleParams {
    float temperature = 0.0f;  // <= 0: greedy
    int top_k = 0;             // 0: off
    float top_p = 1.0f;        // >= 1: off
};

// ids[R] from logits[R, V]; u: device [R] uniforms (ignored when greedy).
void sample(int* ids, const float* logits, const float* u, int R, int V, const SampleParams& p, cudaStream_t s);

// lp[R]: ln p(ids[r]) under the unfiltered softmax of logits row r.
void token_logprob(float* lp, const float* logits, const int* ids, int R, int V, cudaStream_t s);

}  // namespace moescope::cuda
