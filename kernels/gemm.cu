// GEMV kernels and the cuBLAS wrapper.
#include <cuda_bf16.h>

#include "kernels/device_util.cuh"
#include "kernels/gemm.h"

namespace moescope::cuda {
namespace {

void cublas_check(cublasStatus_t st, const char* what) {
    if (st != CUBLAS_STATUS_SUCCESS)
        throw DeviceError(std::string(what) + ": cuBLAS status " + cublasGetStatusString(st));
}

// One warp per output row o (8 per block), all R <= 8 token rows at once, so each weight is
// read exactly once. Lanes walk the row in 16-byte vectors when the row allows it.
template <class W>
__global__ void gemv_kernel(float* y, const float* x, const W* w, int R, int out, int in, int ld_x, bool acc) {
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= out) return;
    const W* wr = w + int64_t(o) * in;
    float a[kGemvMaxRows];
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) a[r] = 0.0f;
    constexpr int VW = 16 / sizeof(W);  // elements per 16-byte vector
    const bool vec = (in % VW == 0) && (ld_x % 4 == 0) && ((reinterpret_cast<uintptr_t>(w) & 15) == 0) &&
                     ((reinterpret_cast<uintptr_t>(x) & 15) == 0);
    if (vec) {
        for (int i = lane * VW; i < in; i += 32 * VW) {
            W wv[VW];
            *reinterpret_cast<int4*>(wv) = *reinterpret_cast<const int4*>(wr + i);
#pragma unroll
            for (int r = 0; r < kGemvMaxRows; ++r) {
                if (r < R) {
                    const float* xr = x + int64_t(r) * ld_x + i;
#pragma unroll
                    for (int j = 0; j < VW; j += 4) {
                        const float4 xv = *reinterpret_cast<const float4*>(xr + j);
                        a[r] += to_f32(wv[j]) * xv.x + to_f32(wv[j + 1]) * xv.y + to_f32(wv[j + 2]) * xv.z +
                                to_f32(wv[j + 3]) * xv.w;
                    }
                }
            }
        }
    } else {
        for (int i = lane; i < in; i += 32) {
            const float wv = to_f32(wr[i]);
#pragma unroll
            for (int r = 0; r < kGemvMaxRows; ++r)
                if (r < R) a[r] += wv * x[int64_t(r) * ld_x + i];
        }
    }
#pragma unroll
    for (int r = 0; r < kGemvMaxRows; ++r) {
        if (r < R) {
            const float v = warp_sum(a[r]);
            if (lane == 0) {
                float* yr = y + int64_t(r) * out + o;
                *yr = acc ? *yr + v : v;
            }
        }
    }
}

// Grid (ceil(out / 8), R): warp = output row o of token row r, weights of expert[r].
template <class W>
__global__ void grouped_gemv_kernel(float* y, const float* x, const void* const* weights, const int* expert, int out,
                                    int in) {
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int r = blockIdx.y;
    if (o >= out) return;
    const W* wr = static_cast<const W*>(weights[expert[r]]) + int64_t(o) * in;
    const float* xr = x + int64_t(r) * in;
    float a = 0.0f;
    constexpr int VW = 16 / sizeof(W);
    if (in % VW == 0 && ((reinterpret_cast<uintptr_t>(wr) & 15) == 0) && ((reinterpret_cast<uintptr_t>(xr) & 15) == 0)) {
        for (int i = lane * VW; i < in; i += 32 * VW) {
            W wv[VW];
            *reinterpret_cast<int4*>(wv) = *reinterpret_cast<const int4*>(wr + i);
#pragma unroll
            for (int j = 0; j < VW; j += 4) {
                const float4 xv = *reinterpret_cast<const float4*>(xr + i + j);
                a += to_f32(wv[j]) * xv.x + to_f32(wv[j + 1]) * xv.y + to_f32(wv[j + 2]) * xv.z +
                     to_f32(wv[j + 3]) * xv.w;
            }
        }
    } else {
        for (int i = lane; i < in; i += 32) a += to_f32(wr[i]) * xr[i];
    }
    a = warp_sum(a);
    if (lane == 0) y[int64_t(r) * out + o] = a;
}

__global__ void cast_bf16_kernel(__nv_bfloat16* out, const float* x, int T, int n, int ld_x) {
    int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(T) * n) return;
    out[i] = __float2bfloat16_rn(x[(i / n) * ld_x + i % n]);
}

}  // namespace

Gemm::Gemm(cudaStream_t stream, void* workspace, size_t workspace_bytes, void* cast, int64_t cast_elems)
    : stream_(stream), cast_(cast), cast_elems_(cast_elems) {
    cublas_check(cublasCreate(&handle_), "cublasCreate");
    cublas_check(cublasSetStream(handle_, stream_), "cublasSetStream");
    // Plain f32 math: no TF32, so F32 weights reproduce the CPU reference to rounding.
    cublas_check(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    if (workspace) cublas_check(cublasSetWorkspace(handle_, workspace, workspace_bytes), "cublasSetWorkspace");
}

Gemm::~Gemm() {
    if (handle_) cublasDestroy(handle_);
}

void Gemm::linear(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x) {
    linear_path(y, x, W, T, accumulate, ld_x, T <= kGemvMaxRows);
}

void Gemm::linear_path(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x, bool gemv) {
    if (T <= 0) return;
    const int out = int(W.rows), in = int(W.cols);
    if (!ld_x) ld_x = in;
    if (gemv) {
        for (int r0 = 0; r0 < T; r0 += kGemvMaxRows) {
            const int R = T - r0 < kGemvMaxRows ? T - r0 : kGemvMaxRows;
            const float* xr = x + int64_t(r0) * ld_x;
            float* yr = y + int64_t(r0) * out;
            if (W.bf16)
                gemv_kernel<<<blocks_for(out, 8), 256, 0, stream_>>>(
                    yr, xr, static_cast<const __nv_bfloat16*>(W.ptr), R, out, in, ld_x, accumulate);
            else
                gemv_kernel<<<blocks_for(out, 8), 256, 0, stream_>>>(yr, xr, static_cast<const float*>(W.ptr), R, out,
                                                                     in, ld_x, accumulate);
            check_launch("gemv_kernel");
        }
        return;
    }
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    // Row-major y[T, out] = x[T, in] W[out, in]^T is column-major y^T = W^T-op... : (OP_T on W, OP_N on x).
    if (!W.bf16) {
        cublas_check(cublasSgemm(handle_, CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &alpha,
                                 static_cast<const float*>(W.ptr), in, x, ld_x, &beta, y, out),
                     "cublasSgemm (linear)");
        return;
    }
    if (int64_t(T) * in > cast_elems_)
        throw DeviceError("linear: the bf16 cast buffer holds " + std::to_string(cast_elems_) + " values, " +
                          std::to_string(int64_t(T) * in) + " needed");
    auto* xb = static_cast<__nv_bfloat16*>(cast_);
    cast_bf16_kernel<<<blocks_for(int64_t(T) * in, 256), 256, 0, stream_>>>(xb, x, T, in, ld_x);
    check_launch("cast_bf16_kernel");
    cublas_check(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &alpha, W.ptr, CUDA_R_16BF, in, xb,
                              CUDA_R_16BF, in, &beta, y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (linear, bf16)");
}

void Gemm::batched_rowmajor(float* C, const float* A, const float* B, int M, int N, int K, int lda, int ldb, int ldc,
                            int64_t stride_a, int64_t stride_b, int64_t stride_c, int batch, bool trans_b, float alpha,
                            float beta) {
    // Column-major view: C^T[N, M] = op(B)^T-view x A^T-view.
    cublas_check(cublasSgemmStridedBatched(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, M, K,
                                           &alpha, B, ldb, stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch),
                 "cublasSgemmStridedBatched");
}

void grouped_gemv(float* y, const float* x, const void* const* weights, bool bf16, const int* expert, int R, int out,
                  int in, cudaStream_t s) {
    if (R <= 0) return;
    dim3 grid(blocks_for(out, 8), unsigned(R));
    if (bf16)
        grouped_gemv_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(y, x, weights, expert, out, in);
    else
        grouped_gemv_kernel<float><<<grid, 256, 0, s>>>(y, x, weights, expert, out, in);
    check_launch("grouped_gemv_kernel");
}

}  // namespace moescope::cuda
