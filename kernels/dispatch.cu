// Dispatch / gather / combine kernels.
#include "kernels/device_util.cuh"
#include "kernels/dispatch.cuh"

namespace moescope::cuda {
namespace {

__global__ void dispatch_kernel(DispatchOut d, const int* ids, int slots, int E) {
    pdl_wait(); dispatch_block(d, ids, slots, E); }

__global__ void gather_kernel(float* xin, const float* x, const int* perm, int R, int k, int D) {
    pdl_wait();
    int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(R) * D) return;
    const int64_t row = i / D, c = i % D;
    xin[i] = x[int64_t(perm[row] / k) * D + c];
}

__global__ void combine_kernel(float* h, const float* shared, const float* y, const int* ids, const float* weights,
                               const int* row_of_slot, int k, int D) {
    pdl_wait();
    const int t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= D) return;
    // Slots of token t in ascending expert id (k <= 16: insertion order by a tiny selection).
    int order[16];
    for (int i = 0; i < k; ++i) order[i] = i;
    for (int i = 1; i < k; ++i)
        for (int j = i; j > 0 && ids[t * k + order[j]] < ids[t * k + order[j - 1]]; --j) {
            const int tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
    float acc = shared ? shared[int64_t(t) * D + c] : 0.0f;
    for (int i = 0; i < k; ++i) {
        const int slot = t * k + order[i];
        acc += weights[slot] * y[int64_t(row_of_slot[slot]) * D + c];
    }
    h[int64_t(t) * D + c] += acc;
}

}  // namespace

void dispatch(const DispatchOut& d, const int* ids, int T, int k, int E, cudaStream_t s) {
    if (E > 1024) throw DeviceError("dispatch: at most 1024 routed experts are supported on the device");
    const int threads = (E + 31) / 32 * 32;
    dispatch_kernel<<<1, threads, 0, s>>>(d, ids, T * k, E);
    check_launch("dispatch_kernel");
}

void gather_rows(float* xin, const float* x, const int* perm, int R, int k, int D, cudaStream_t s) {
    if (R <= 0) return;
    gather_kernel<<<blocks_for(int64_t(R) * D, 256), 256, 0, s>>>(xin, x, perm, R, k, D);
    check_launch("gather_kernel");
}

void combine(float* h, const float* shared, const float* y, const int* ids, const float* weights,
             const int* row_of_slot, int T, int k, int D, cudaStream_t s) {
    if (T <= 0) return;
    if (k > 16) throw DeviceError("combine: at most 16 experts per token are supported on the device");
    dim3 grid(blocks_for(D, 256), unsigned(T));
    combine_kernel<<<grid, 256, 0, s>>>(h, shared, y, ids, weights, row_of_slot, k, D);
    check_launch("combine_kernel");
}

}  // namespace moescope::cuda
