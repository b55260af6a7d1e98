// Device helpers shared by the .cu files: weight element loads, warp/block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moescope::cuda {

// The first statement of every kernel (tests/gpu/emu/cu_to_cpp.py refuses a kernel without it).
// In a decode step's CUDA graph the edges between our kernels are programmatic (programmatic
// dependent launch, sm_90; see step_graph in cuda_backend.cpp): a kernel's blocks may be
// scheduled while its predecessor still runs, and wait here until that has completed and its
// writes are visible. Waiting first, before any read or write or early return, keeps every
// kernel exactly as ordered as on a plain stream, transitively: no block of a kernel ends
// before its predecessor has. A no-op without a programmatic dependency and below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// FP8: e4m3 -> f16 is exact (f16 has more exponent and mantissa bits), so is f16 -> f32.
__device__ __forceinline__ float fp8_to_f32(uint8_t b) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(b), __NV_E4M3);
    return __half2float(__half(h));
}

// Four e4m3 values packed little-endian in v (byte 0 first).
__device__ __forceinline__ void fp8x4_to_f32(uint32_t v, float* f) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(v & 0xffffu), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(v >> 16), __NV_E4M3);
    const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <class T>
__device__ T block_sum(T v) {
    __shared__ T part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    T r = 0;
    for (int i = 0; i < nw; ++i) r += part[i];
    return r;
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float r = part[0];
    for (int i = 1; i < nw; ++i) r = fmaxf(r, part[i]);
    return r;
}

// The end of a GEMV warp: each row's partial sums a[r] (r < R) reduced over the warp; lane 0
// writes y[r, o] (row stride ld_y), or adds to it when acc.
template <int N>
__device__ __forceinline__ void warp_store_rows(float* y, const float (&a)[N], int R, int64_t ld_y, int64_t o,
                                                bool acc) {
#pragma unroll
    for (int r = 0; r < N; ++r) {
        if (r < R) {  // R is the same for the whole warp: every lane joins the shuffles
            const float v = warp_sum(a[r]);
            if ((threadIdx.x & 31) == 0) {
                float* yr = y + int64_t(r) * ld_y + o;
                *yr = acc ? *yr + v : v;
            }
        }
    }
}

// SwiGLU of one gate value g and up value u: silu(g) * u, as the CPU's swiglu computes it.
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// The end of a SwiGLU GEMV warp: gate and up partial sums g[r], u[r] (r < R) reduced over the
// warp; lane 0 writes y[r, o] = silu(gate) * up.
template <int N>
__device__ __forceinline__ void warp_store_swiglu(float* y, const float (&g)[N], const float (&u)[N], int R,
                                                  int64_t ld_y, int64_t o) {
#pragma unroll
    for (int r = 0; r < N; ++r) {
        if (r < R) {
            const float gv = warp_sum(g[r]), uv = warp_sum(u[r]);
            if ((threadIdx.x & 31) == 0) y[int64_t(r) * ld_y + o] = silu_mul(gv, uv);
        }
    }
}

// YaRN rope of one interleaved pair (x[0], x[1]) at position pos and frequency inv_freq, as
// engine/model/rope.cpp: the angle pos * inv_freq in f32, full-range cosf / sinf times mscale.
__device__ __forceinline__ void rope_pair(float* x, int pos, float inv_freq, float mscale) {
    const float theta = float(pos) * inv_freq;
    const float c = cosf(theta) * mscale, s = sinf(theta) * mscale;
    const float a = x[0], b = x[1];
    x[0] = a * c - b * s;
    x[1] = a * s + b * c;
}

inline unsigned blocks_for(long long n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace moescope::cuda
