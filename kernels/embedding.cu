// Embedding gather and device-side random initialisation.
#include <cuda_bf16.h>

#include "kernels/device_util.cuh"
#include "kernels/embedding.h"

namespace moescope::cuda {
namespace {

template <class W>
__global__ void embed_kernel(float* out, const W* table, const int* ids, int D) {
    pdl_wait();
    const int t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < D) out[int64_t(t) * D + c] = to_f32(table[int64_t(ids[t]) * D + c]);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

template <class W>
__global__ void fill_uniform_kernel(W* data, int64_t n, float scale, uint64_t seed) {
    pdl_wait();
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float u = float(splitmix64(seed ^ (uint64_t(i) * 0x2545f4914f6cdd1dull)) >> 40) * (1.0f / 16777216.0f);
        const float v = (2.0f * u - 1.0f) * scale;
        if constexpr (sizeof(W) == 2)
            data[i] = __float2bfloat16_rn(v);
        else
            data[i] = v;
    }
}

__global__ void fill_constant_kernel(float* data, int64_t n, float value) {
    pdl_wait();
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        data[i] = value;
}

__global__ void busy_wait_kernel(int64_t iters, float* sink) {
    pdl_wait();
    float x = 1.0f;
    for (int64_t i = 0; i < iters; ++i) x = x * 0.9999999f + 1e-7f;
    *sink = x;
}

}  // namespace

void busy_wait(int64_t iters, float* sink, cudaStream_t s) {
    busy_wait_kernel<<<1, 1, 0, s>>>(iters, sink);
    check_launch("busy_wait_kernel");
}

void embed(float* out, const WRef& table, const int* ids, int T, cudaStream_t s) {
    if (T <= 0) return;
    if (table.fp8()) throw DeviceError("embed: the table must be BF16 or F32 (the FP8 plan keeps it BF16)");
    const int D = int(table.cols);
    dim3 grid(blocks_for(D, 256), unsigned(T));
    if (table.bf16)
        embed_kernel<<<grid, 256, 0, s>>>(out, static_cast<const __nv_bfloat16*>(table.ptr), ids, D);
    else
        embed_kernel<<<grid, 256, 0, s>>>(out, static_cast<const float*>(table.ptr), ids, D);
    check_launch("embed_kernel");
}

void fill_uniform(void* data, bool bf16, int64_t n, float scale, uint64_t seed, cudaStream_t s) {
    if (n <= 0) return;
    const unsigned blocks = unsigned(n / 256 + 1 < 65536 ? n / 256 + 1 : 65536);
    if (bf16)
        fill_uniform_kernel<<<blocks, 256, 0, s>>>(static_cast<__nv_bfloat16*>(data), n, scale, seed);
    else
        fill_uniform_kernel<<<blocks, 256, 0, s>>>(static_cast<float*>(data), n, scale, seed);
    check_launch("fill_uniform_kernel");
}

void fill_constant(float* data, int64_t n, float value, cudaStream_t s) {
    if (n <= 0) return;
    const unsigned blocks = unsigned(n / 256 + 1 < 65536 ? n / 256 + 1 : 65536);
    fill_constant_kernel<<<blocks, 256, 0, s>>>(data, n, value);
    check_launch("fill_constant_kernel");
}

}  // namespace moescope::cuda
