// YaRN rotary embedding on interleaved pairs (2i, 2i+1), with the same inv_freq / mscale as
// engine/model/rope.cpp (the backend uploads Rope::inv_freq; the angle is pos * inv_freq in f32).
#pragma once
#include "kernels/common.h"

namespace moescope::cuda {

// For token t (position pos0 + t) and vector v: rotates x + t*ld_t + v*ld_v, `dim` values.
// inv_freq: device [dim / 2].
// d_pos0: when non-null, the device int read instead of pos0 (a CUDA graph replays one launch
// for every decode position).
void rope_apply(float* x, int T, int n_vec, int64_t ld_t, int64_t ld_v, int pos0, const float* inv_freq,
                float mscale, int dim, cudaStream_t s, const int* d_pos0 = nullptr);

}  // namespace moescope::cuda
