// Elementary CPU ops of the reference model, llm.c style: outputs first, sizes last, f32
// with f32 accumulation (OpenBLAS for the matrix work, which uses every core).
#pragma once
#include <cmath>
#include <cstdint>

#include "engine/weights.h"

namespace moescope {

// y[T, out] = x[T, in] W^T  (W stored [out, in], PyTorch nn.Linear); accumulate adds to y.
void linear_forward(float* y, const float* x, const Tensor& W, int T, bool accumulate = false);
void matmul_nt(float* y, const float* x, const float* W, int T, int out, int in, bool accumulate = false);

// out[T, n] = x / sqrt(mean(x^2) + eps) * w
void rmsnorm_forward(float* out, const float* x, const float* w, int T, int n, float eps);

// out[i] = silu(g[i]) * u[i]
void swiglu_forward(float* out, const float* g, const float* u, int64_t n);

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// In-place softmax over n values.
void softmax_inplace(float* x, int n);

void set_num_threads(int n);  // BLAS threads; 0 = all cores
int num_threads();

}  // namespace moescope
