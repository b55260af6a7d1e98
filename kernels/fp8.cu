// FP8 kernels: the decode GEMV and grouped GEMV over e4m3 weights with 128x128 block scales,
// the 1x128 activation quantization for cuBLASLt, dequantization to bf16 (the prefill
// fallback), and random FP8 weights for the benchmark.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels/device_util.cuh"
#include "kernels/fp8.h"
#include "kernels/gemm.h"

namespace moescope::cuda {
namespace {

// 16 weights of one row starting at a multiple of 16 (so inside one 128-column block), each
// e4m3 * scale rounded to f32: exactly the value load_weights gives the CPU.
__device__ __forceinline__ void load16(const uint8_t* p, float s, float* wv) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    fp8x4_to_f32(raw.x, wv);
    fp8x4_to_f32(raw.y, wv + 4);
    fp8x4_to_f32(raw.z, wv + 8);
    fp8x4_to_f32(raw.w, wv + 12);
#pragma unroll
    for (int j = 0; j < 16; ++j) wv[j] *= s;
}

// This lane's share of the dot products of FP8 weight row wr (block scales srow) with the R <= 8
// rows of x (a[r] +=). Lanes walk the row in 16-byte vectors when `vec`.
__device__ __forceinline__ void gemv_fp8_lane(float (&a)[kGemvMaxRows], const uint8_t* wr, const float* srow,
                                              const float* x, int R, int in, int ld_x, bool vec) {
    const int lane = threadIdx.x & 31;
    if (vec) {
        for (int i = lane * 16; i < in; i += 32 * 16) {
            float wv[16];
            load16(wr + i, srow[i / kFp8Block], wv);
#pragma unroll
            for (int r = 0; r < kGemvMaxRows; ++r) {
                if (r < R) {
                    const float* xr = x + int64_t(r) * ld_x + i;
#pragma unroll
                    for (int j = 0; j < 16; j += 4) {
                        const float4 xv = *reinterpret_cast<const float4*>(xr + j);
                        a[r] += wv[j] * xv.x + wv[j + 1] * xv.y + wv[j + 2] * xv.z + wv[j + 3] * xv.w;
                    }
                }
            }
        }
    } else {
        for (int i = lane; i < in; i += 32) {
            const float wv = fp8_to_f32(wr[i]) * srow[i / kFp8Block];
#pragma unroll
            for (int r = 0; r < kGemvMaxRows; ++r)
                if (r < R) a[r] += wv * x[int64_t(r) * ld_x + i];
        }
    }
}

// One warp per output row o (8 per block), all R <= 8 token rows at once: each weight byte is
// read once. kSwiglu: a stacked gate|up of g.rows = 2 n_out rows; the warp computes gate row o
// and up row n_out + o and writes y[r, o] = silu(gate) * up.
template <bool kSwiglu>
__global__ void gemv_fp8_kernel(float* y, const float* x, const uint8_t* w, const float* scales, Fp8Grid g, int R,
                                int ld_x, bool acc) {
    pdl_wait();
    const int64_t n_out = kSwiglu ? g.rows / 2 : g.rows;
    const int64_t o = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= n_out) return;
    const int in = int(g.cols);
    const bool vec = (in % 16 == 0) && (ld_x % 4 == 0) && ((reinterpret_cast<uintptr_t>(w) & 15) == 0) &&
                     ((reinterpret_cast<uintptr_t>(x) & 15) == 0);
    float a[kGemvMaxRows] = {};
    gemv_fp8_lane(a, w + o * in, scales + g.scale_row(o) * g.ld(), x, R, in, ld_x, vec);
    if constexpr (kSwiglu) {
        float u[kGemvMaxRows] = {};
        gemv_fp8_lane(u, w + (n_out + o) * in, scales + g.scale_row(n_out + o) * g.ld(), x, R, in, ld_x, vec);
        warp_store_swiglu(y, a, u, R, n_out, o);
    } else {
        warp_store_rows(y, a, R, g.rows, o, acc);
    }
}

// Grid (ceil(n_out / 8), R): warp = output o of token row r, weights of expert[r], x row
// rows.x_row(r). kSwiglu: stacked gate|up, n_out = g.rows / 2 outputs silu(gate) * up.
template <bool kSwiglu>
__global__ void grouped_gemv_fp8_kernel(float* y, const float* x, const void* const* weights, const int* expert,
                                        Fp8Grid g, GemvRows rows) {
    pdl_wait();
    const int lane = threadIdx.x & 31;
    const int64_t n_out = kSwiglu ? g.rows / 2 : g.rows;
    const int64_t o = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int r = blockIdx.y;
    if (o >= n_out) return;
    const int in = int(g.cols);
    const uint8_t* base = static_cast<const uint8_t*>(weights[expert[r]]);
    const float* scales = reinterpret_cast<const float*>(base + g.scale_offset());
    const float* xr = x + int64_t(rows.x_row(r)) * in;
    const bool vec = in % 16 == 0 && ((reinterpret_cast<uintptr_t>(base) & 15) == 0) &&
                     ((reinterpret_cast<uintptr_t>(xr) & 15) == 0);
    float a[kGemvMaxRows] = {};
    gemv_fp8_lane(a, base + o * in, scales + g.scale_row(o) * g.ld(), xr, 1, in, in, vec);
    if constexpr (kSwiglu) {
        float u[kGemvMaxRows] = {};
        gemv_fp8_lane(u, base + (n_out + o) * in, scales + g.scale_row(n_out + o) * g.ld(), xr, 1, in, in, vec);
        const float gv = warp_sum(a[0]), uv = warp_sum(u[0]);
        if (lane == 0) y[int64_t(r) * n_out + o] = silu_mul(gv, uv);
    } else {
        const float v = warp_sum(a[0]);
        if (lane == 0) y[int64_t(r) * g.rows + o] = v;
    }
}

// Block (t, b) of 128 threads: row t, columns [128 b, 128 b + 128).
__global__ void quantize_act_kernel(uint8_t* q, float* scales, const float* x, int T, int T_pad, int K, int ld_x) {
    pdl_wait();
    const int t = blockIdx.x, b = blockIdx.y, c = b * kFp8Block + threadIdx.x;
    const bool real = t < T && c < K;
    const float v = real ? x[int64_t(t) * ld_x + c] : 0.0f;
    const float amax = block_max(fabsf(v));  // every thread takes part (it synchronizes)
    const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
    if (c < K) q[int64_t(t) * K + c] = real ? __nv_cvt_float_to_fp8(v / s, __NV_SATFINITE, __NV_E4M3) : 0;
    if (threadIdx.x == 0) scales[int64_t(b) * T_pad + t] = s;
}

__global__ void dequantize_rows_kernel(__nv_bfloat16* out, const uint8_t* w, const float* scales, Fp8Grid g, int64_t r0,
                                       int64_t n) {
    pdl_wait();
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n * g.cols) return;
    const int64_t r = r0 + i / g.cols, c = i % g.cols;
    out[i] = __float2bfloat16_rn(fp8_to_f32(w[r * g.cols + c]) * scales[g.scale_row(r) * g.ld() + c / kFp8Block]);
}

__global__ void scatter_cols_kernel(float* y, int ld_y, int col0, const float* src, int T, int n, bool acc) {
    pdl_wait();
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(T) * n) return;
    float* d = y + (i / n) * ld_y + col0 + i % n;
    *d = acc ? *d + src[i] : src[i];
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

__global__ void fill_fp8_kernel(uint8_t* q, float* scales, Fp8Grid g, float bound, uint64_t seed) {
    pdl_wait();
    const int64_t n = g.rows * g.cols, ns = g.scale_count();
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n + ns; i += int64_t(gridDim.x) * blockDim.x) {
        if (i < n) {
            const float u = float(mix64(seed ^ (uint64_t(i) * 0x2545f4914f6cdd1dull)) >> 40) * (1.0f / 16777216.0f);
            q[i] = __nv_cvt_float_to_fp8((2.0f * u - 1.0f) * 448.0f, __NV_SATFINITE, __NV_E4M3);
        } else {
            const int64_t j = i - n;
            scales[j] = j % g.ld() < g.col_blocks() ? bound / 448.0f : 0.0f;
        }
    }
}

}  // namespace

void gemv_fp8(float* y, const float* x, const uint8_t* w, const float* scales, const Fp8Grid& g, int R, int ld_x,
              bool accumulate, cudaStream_t s, bool swiglu) {
    if (R <= 0 || g.rows <= 0) return;
    if (swiglu) {
        if (g.rows % 2) throw DeviceError("gemv_fp8: a SwiGLU gate|up needs an even number of rows");
        gemv_fp8_kernel<true><<<blocks_for(g.rows / 2, 8), 256, 0, s>>>(y, x, w, scales, g, R, ld_x, false);
    } else {
        gemv_fp8_kernel<false><<<blocks_for(g.rows, 8), 256, 0, s>>>(y, x, w, scales, g, R, ld_x, accumulate);
    }
    check_launch("gemv_fp8_kernel");
}

void grouped_gemv_fp8(float* y, const float* x, const void* const* weights, const int* expert, int R, int out, int in,
                      int64_t split, cudaStream_t s, const GemvRows& rows) {
    if (R <= 0) return;
    if (rows.swiglu && out % 2) throw DeviceError("grouped_gemv_fp8: a SwiGLU gate|up needs an even number of rows");
    dim3 grid(blocks_for(rows.swiglu ? out / 2 : out, 8), unsigned(R));
    if (rows.swiglu)
        grouped_gemv_fp8_kernel<true><<<grid, 256, 0, s>>>(y, x, weights, expert, Fp8Grid{out, in, split}, rows);
    else
        grouped_gemv_fp8_kernel<false><<<grid, 256, 0, s>>>(y, x, weights, expert, Fp8Grid{out, in, split}, rows);
    check_launch("grouped_gemv_fp8_kernel");
}

void quantize_act_fp8(uint8_t* q, float* scales, const float* x, int T, int T_pad, int K, int ld_x, cudaStream_t s) {
    if (T_pad <= 0 || K <= 0) return;
    dim3 grid(unsigned(T_pad), unsigned(fp8_cdiv(K, kFp8Block)));
    quantize_act_kernel<<<grid, kFp8Block, 0, s>>>(q, scales, x, T, T_pad, K, ld_x ? ld_x : K);
    check_launch("quantize_act_kernel");
}

void dequantize_fp8_rows(void* bf16_out, const uint8_t* w, const float* scales, const Fp8Grid& g, int64_t r0,
                         int64_t n, cudaStream_t s) {
    if (n <= 0) return;
    dequantize_rows_kernel<<<blocks_for(n * g.cols, 256), 256, 0, s>>>(static_cast<__nv_bfloat16*>(bf16_out), w,
                                                                        scales, g, r0, n);
    check_launch("dequantize_rows_kernel");
}

void scatter_cols(float* y, int ld_y, int col0, const float* src, int T, int n, bool accumulate, cudaStream_t s) {
    if (T <= 0 || n <= 0) return;
    scatter_cols_kernel<<<blocks_for(int64_t(T) * n, 256), 256, 0, s>>>(y, ld_y, col0, src, T, n, accumulate);
    check_launch("scatter_cols_kernel");
}

void fill_fp8_random(void* carve, const Fp8Grid& g, float bound, uint64_t seed, cudaStream_t s) {
    auto* q = static_cast<uint8_t*>(carve);
    auto* sc = reinterpret_cast<float*>(q + g.scale_offset());
    const int64_t n = g.rows * g.cols + g.scale_count();
    const unsigned blocks = unsigned(n / 256 + 1 < 65536 ? n / 256 + 1 : 65536);
    fill_fp8_kernel<<<blocks, 256, 0, s>>>(q, sc, g, bound, seed);
    check_launch("fill_fp8_kernel");
}

}  // namespace moescope::cuda
