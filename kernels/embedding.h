// Embedding lookup (the LM head is a plain linear, see gemm.h), device-side weight
// initialisation for the synthetic benchmark model (no host upload), and the profile's wait.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace moescope::cuda {

// out[T, D] = table[ids[t]] as f32; ids: device [T] (checked on the host before the call).
void embed(float* out, const WRef& table, const int* ids, int T, cudaStream_t s);

// Uniform values in [-scale, scale) from a counter-based hash of (seed, index): bf16 or f32.
void fill_uniform(void* data, bool bf16, int64_t n, float scale, uint64_t seed, cudaStream_t s);
// data[i] = value (f32).
void fill_constant(float* data, int64_t n, float value, cudaStream_t s);
// Keeps the device busy (one thread, `iters` dependent multiply-adds, the result in *sink) so
// that the host can enqueue a whole step behind it: the decode profile's events then time the
// device's work, not the host's launches.
void busy_wait(int64_t iters, float* sink, cudaStream_t s);

}  // namespace moescope::cuda
