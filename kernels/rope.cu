// RoPE kernel: one thread per (token, vector, pair).
#include "kernels/device_util.cuh"
#include "kernels/rope.h"

namespace moescope::cuda {
namespace {

__global__ void rope_kernel(float* x, int T, int n_vec, int64_t ld_t, int64_t ld_v, int pos0,
                            const float* inv_freq, float mscale, int half, const int* d_pos0) {
    if (d_pos0) pos0 = *d_pos0;
    int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(T) * n_vec * half) return;
    const int p = int(i % half);
    const int v = int((i / half) % n_vec);
    const int t = int(i / (int64_t(half) * n_vec));
    // The angle in f32 (as the CPU reference and the frameworks compute it), full-range cosf/sinf.
    const float theta = float(pos0 + t) * inv_freq[p];
    const float c = cosf(theta) * mscale, s = sinf(theta) * mscale;
    float* q = x + t * ld_t + v * ld_v + 2 * p;
    const float a = q[0], b = q[1];
    q[0] = a * c - b * s;
    q[1] = a * s + b * c;
}

}  // namespace

void rope_apply(float* x, int T, int n_vec, int64_t ld_t, int64_t ld_v, int pos0, const float* inv_freq,
                float mscale, int dim, cudaStream_t s, const int* d_pos0) {
    const int64_t n = int64_t(T) * n_vec * (dim / 2);
    if (n <= 0) return;
    rope_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, T, n_vec, ld_t, ld_v, pos0, inv_freq, mscale, dim / 2, d_pos0);
    check_launch("rope_kernel");
}

}  // namespace moescope::cuda
