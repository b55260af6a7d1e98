// RMSNorm and elementwise kernels.
#include "kernels/device_util.cuh"
#include "kernels/norm.h"

namespace moescope::cuda {
namespace {

// One block per row; the f64 sum of squares mirrors engine/model/ops.cpp rmsnorm_forward.
__global__ void rmsnorm_kernel(float* out, const float* x, const float* w, int n, float eps, int ld_out, int ld_x) {
    pdl_wait();
    const float* xr = x + int64_t(blockIdx.x) * ld_x;
    float* orow = out + int64_t(blockIdx.x) * ld_out;
    double ss = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += double(xr[i]) * double(xr[i]);
    ss = block_sum(ss);
    const float r = float(1.0 / sqrt(ss / n + double(eps)));
    __syncthreads();  // out may alias x: every thread has read its x before anyone writes
    for (int i = threadIdx.x; i < n; i += blockDim.x) orow[i] = xr[i] * r * w[i];
}

__global__ void add_kernel(float* h, const float* y, int64_t n) {
    pdl_wait();
    int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) h[i] += y[i];
}

__global__ void swiglu_kernel(float* out, const float* gu, int R, int I) {
    pdl_wait();
    int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(R) * I) return;
    const int64_t r = i / I, c = i % I;
    out[i] = silu_mul(gu[r * 2 * I + c], gu[r * 2 * I + I + c]);
}

}  // namespace

void rmsnorm(float* out, const float* x, const float* w, int T, int n, float eps, cudaStream_t s, int ld_out,
             int ld_x) {
    if (T <= 0) return;
    rmsnorm_kernel<<<T, 256, 0, s>>>(out, x, w, n, eps, ld_out ? ld_out : n, ld_x ? ld_x : n);
    check_launch("rmsnorm_kernel");
}

void add_inplace(float* h, const float* y, int64_t n, cudaStream_t s) {
    if (n <= 0) return;
    add_kernel<<<blocks_for(n, 256), 256, 0, s>>>(h, y, n);
    check_launch("add_kernel");
}

void swiglu(float* out, const float* gu, int R, int I, cudaStream_t s) {
    if (R <= 0) return;
    swiglu_kernel<<<blocks_for(int64_t(R) * I, 256), 256, 0, s>>>(out, gu, R, I);
    check_launch("swiglu_kernel");
}

}  // namespace moescope::cuda
