// Multi-head latent attention kernels (deepseek-v3.md 2.1). The cache keeps, per layer and
// position, the normalized latent c (d_c floats) and the rope'd k_pe (d_rope floats), f32.
// Absorbed path: q_lat = W_UK^T q_nope per head, split-sequence attention over the latent
// cache with an online softmax (flash-decoding; one block reads a cache row once for a group
// of heads), a combine of the splits, o = W_UV o_lat. kv_b may be f32, BF16 or FP8.
// Naive path (prefill): kv_b(c) decompressed by a GEMM, scores and P V by batched cuBLAS.
#pragma once
#include "kernels/common.h"

namespace moescope::cuda {

struct MlaShape {
    int H, d_nope, d_rope, d_v, d_c;
    float scale;  // softmax_scale (YaRN m^2 included)
};

// For t < T: cache_c[start + t] = RMSNorm(kv[t, :d_c]) * norm_w (eps 1e-6);
// cache_kpe[start + t] = rope(kv[t, d_c:], position start + t). kv: [T, d_c + d_rope]. The YaRN
// rope (inv_freq: device [d_rope / 2], engine/model/rope.cpp's Rope::inv_freq and mscale) also
// turns the q_pe of every head of q [T, H, d_nope + d_rope] when q is non-null, so a layer has
// one launch for its positions. d_start (here and below): when non-null, the device int used
// instead of `start`, so that one captured CUDA graph serves every decode position. norms
// (telemetry): when non-null, norms[t] = |cache_c[start + t]|.
void latent_append(float* cache_c, float* cache_kpe, const float* kv, const float* norm_w, int T, int start,
                   const MlaShape& m, const float* inv_freq, float mscale, cudaStream_t s,
                   const int* d_start = nullptr, float* norms = nullptr, float* q = nullptr);

// q_lat[T, H, d_c] = per head W_UK_h^T q_nope_h; q: [T, H, d_nope + d_rope]; kv_b: [H*(d_nope+d_v), d_c].
void absorb_query(float* q_lat, const float* q, const WRef& kv_b, int T, const MlaShape& m, cudaStream_t s);

// Splits used for T query rows (more splits when few rows: keeps the SMs busy in decode).
int attention_splits(int T, int n_max, int max_splits);

// Heads one attention block serves for T rows and `splits` splits (at most 16; fewer when the
// shared memory or the number of blocks asks for it).
int attention_heads_per_block(int H, int T, int splits, const MlaShape& m);

// Causal attention of query t (position start + t) over cache positions [0, start + t], in
// latent space. partial: [T, H, splits, d_c + 2] scratch; o_lat: [T, H, d_c] normalized.
void attention_absorbed(float* o_lat, float* partial, const float* q_lat, const float* q, const float* cache_c,
                        const float* cache_kpe, int T, int start, int splits, const MlaShape& m, cudaStream_t s,
                        const int* d_start = nullptr);

// o[T, H, d_v] = per head W_UV_h o_lat_h.
void project_values(float* o, const float* o_lat, const WRef& kv_b, int T, const MlaShape& m, cudaStream_t s);

// Naive path: scores[H, T, S] (scaled) -> causal softmax in place; rows past position start + t are zeroed.
void causal_softmax(float* scores, int H, int T, int S, int start, float scale, cudaStream_t s);

}  // namespace moescope::cuda
