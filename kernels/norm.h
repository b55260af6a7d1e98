// RMSNorm and the small elementwise ops of a decoder layer (residual add, SwiGLU).
#pragma once
#include "kernels/common.h"

namespace moescope::cuda {

// out[T, n] = x / sqrt(mean(x^2) + eps) * w; sum of squares in f64 like the CPU reference.
// Rows of x and out are `ld_x` / `ld_out` floats apart (n when packed); out may alias x.
void rmsnorm(float* out, const float* x, const float* w, int T, int n, float eps, cudaStream_t s,
             int ld_out = 0, int ld_x = 0);

// h[n] += y[n]
void add_inplace(float* h, const float* y, int64_t n, cudaStream_t s);

// out[R, I] = silu(gu[:, :I]) * gu[:, I:]   (gu [R, 2I]: gate and up projections stacked)
void swiglu(float* out, const float* gu, int R, int I, cudaStream_t s);

}  // namespace moescope::cuda
