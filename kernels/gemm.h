// The matrix work: y = x W^T (PyTorch nn.Linear) with f32 activations, BF16 or F32 weights
// and f32 accumulation. Few rows (decode): our own bandwidth-bound GEMV, which reads each
// weight once and keeps the activations in f32. Many rows (prefill): cuBLAS (SGEMM for F32
// weights; BF16 x BF16 -> F32 GemmEx after casting the activations, for BF16 weights).
// Experts: a grouped GEMV whose rows each name their expert (no host round trip, capturable
// in a CUDA graph), or a host loop of cuBLAS GEMMs over the experts that received tokens.
#pragma once
#include <cublas_v2.h>

#include "kernels/common.h"

namespace moescope::cuda {

inline constexpr int kGemvMaxRows = 8;  // rows handled by the GEMV path in one pass

class Gemm {
public:
    // cast: device scratch of `cast_elems` bf16 values for the cuBLAS BF16 path.
    Gemm(cudaStream_t stream, void* workspace, size_t workspace_bytes, void* cast, int64_t cast_elems);
    ~Gemm();
    Gemm(const Gemm&) = delete;
    Gemm& operator=(const Gemm&) = delete;

    // y[T, W.rows] (= or +=) x[T, W.cols] W^T; x rows are ld_x floats apart (W.cols when 0).
    void linear(float* y, const float* x, const WRef& W, int T, bool accumulate = false, int ld_x = 0);
    // Force a path (parity tests): gemv true -> our kernel, false -> cuBLAS.
    void linear_path(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x, bool gemv);

    // Strided-batched f32 GEMM in row-major terms: C_b[M, N] = alpha A_b op B_b + beta C_b, with
    // B transposed (trans_b: B_b is [N, K]) or not ([K, N]); batch b offsets by stride_*.
    void batched_rowmajor(float* C, const float* A, const float* B, int M, int N, int K, int lda, int ldb, int ldc,
                          int64_t stride_a, int64_t stride_b, int64_t stride_c, int batch, bool trans_b, float alpha,
                          float beta);

    cudaStream_t stream() const { return stream_; }
    cublasHandle_t handle() const { return handle_; }

private:
    cudaStream_t stream_;
    cublasHandle_t handle_ = nullptr;
    void* cast_;
    int64_t cast_elems_;
};

// Grouped GEMV over experts: y[r, 0:out] = x[r, 0:in] W_{expert[r]}^T for r < R, where
// weights[e] points at expert e's [out, in] matrix (device array of device pointers).
void grouped_gemv(float* y, const float* x, const void* const* weights, bool bf16, const int* expert, int R,
                  int out, int in, cudaStream_t s);

}  // namespace moescope::cuda
