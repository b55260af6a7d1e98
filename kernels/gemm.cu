// GEMV kernels, the cuBLAS wrapper and the FP8 prefill paths (cuBLASLt block-scaled GEMM, bf16
// fallback).
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>

#include "kernels/device_util.cuh"
#include "kernels/gemm.h"
#include "kernels/norm.h"

namespace moescope::cuda {
namespace {

void cublas_check(cublasStatus_t st, const char* what) {
    if (st != CUBLAS_STATUS_SUCCESS)
        throw DeviceError(std::string(what) + ": cuBLAS status " + cublasGetStatusString(st));
}

// This lane's share of the dot products of weight row wr with the R <= 8 rows of x (a[r] +=).
// Lanes walk the row in 16-byte vectors when `vec` (the row and x allow it).
template <class W>
__device__ __forceinline__ void gemv_lane(float (&a)[kGemvMaxRows], const W* wr, const float* x, int R, int in,
                                          int ld_x, bool vec) {
    const int lane = threadIdx.x & 31;
    constexpr int VW = 16 / sizeof(W);  // elements per 16-byte vector
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
}

// One warp per output row o (8 per block), all R <= 8 token rows at once, so each weight is
// read exactly once. kSwiglu: w is a stacked [2 out, in] gate|up and the warp computes gate
// row o and up row out + o, writing y[r, o] = silu(gate) * up (the SwiGLU kernel's numbers,
// without its launch or the [R, 2 out] buffer).
template <class W, bool kSwiglu>
__global__ void gemv_kernel(float* y, const float* x, const W* w, int R, int out, int in, int ld_x, bool acc) {
    pdl_wait();
    const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= out) return;
    constexpr int VW = 16 / sizeof(W);
    const bool vec = (in % VW == 0) && (ld_x % 4 == 0) && ((reinterpret_cast<uintptr_t>(w) & 15) == 0) &&
                     ((reinterpret_cast<uintptr_t>(x) & 15) == 0);
    float a[kGemvMaxRows] = {};
    gemv_lane(a, w + int64_t(o) * in, x, R, in, ld_x, vec);
    if constexpr (kSwiglu) {
        float u[kGemvMaxRows] = {};
        gemv_lane(u, w + int64_t(out + o) * in, x, R, in, ld_x, vec);
        warp_store_swiglu(y, a, u, R, out, o);
    } else {
        warp_store_rows(y, a, R, out, o, acc);
    }
}

// Grid (ceil(n_out / 8), R): warp = output o of token row r, weights of expert[r], x row
// rows.x_row(r). kSwiglu: stacked [out, in] gate|up, n_out = out / 2 outputs silu(gate) * up.
template <class W, bool kSwiglu>
__global__ void grouped_gemv_kernel(float* y, const float* x, const void* const* weights, const int* expert, int out,
                                    int in, GemvRows rows) {
    pdl_wait();
    const int lane = threadIdx.x & 31;
    const int n_out = kSwiglu ? out / 2 : out;
    const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int r = blockIdx.y;
    if (o >= n_out) return;
    const W* w = static_cast<const W*>(weights[expert[r]]);
    const float* xr = x + int64_t(rows.x_row(r)) * in;
    constexpr int VW = 16 / sizeof(W);
    const bool vec = in % VW == 0 && ((reinterpret_cast<uintptr_t>(w) & 15) == 0) &&
                     ((reinterpret_cast<uintptr_t>(xr) & 15) == 0);
    float a[kGemvMaxRows] = {};
    gemv_lane(a, w + int64_t(o) * in, xr, 1, in, in, vec);
    if constexpr (kSwiglu) {
        float u[kGemvMaxRows] = {};
        gemv_lane(u, w + int64_t(n_out + o) * in, xr, 1, in, in, vec);
        const float g = warp_sum(a[0]), v = warp_sum(u[0]);
        if (lane == 0) y[int64_t(r) * n_out + o] = silu_mul(g, v);
    } else {
        const float v = warp_sum(a[0]);
        if (lane == 0) y[int64_t(r) * out + o] = v;
    }
}

__global__ void cast_bf16_kernel(__nv_bfloat16* out, const float* x, int T, int n, int ld_x) {
    pdl_wait();
    int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(T) * n) return;
    out[i] = __float2bfloat16_rn(x[(i / n) * ld_x + i % n]);
}

// Our GEMV over R <= kGemvMaxRows rows of x for a BF16 or F32 weight: y[R, n_out] with n_out =
// W.rows, or W.rows / 2 SwiGLU outputs of a stacked gate|up.
template <bool kSwiglu>
void launch_gemv(float* y, const float* x, const WRef& W, int R, int n_out, int ld_x, bool acc, cudaStream_t s) {
    const int in = int(W.cols);
    if (W.bf16)
        gemv_kernel<__nv_bfloat16, kSwiglu><<<blocks_for(n_out, 8), 256, 0, s>>>(
            y, x, static_cast<const __nv_bfloat16*>(W.ptr), R, n_out, in, ld_x, acc);
    else
        gemv_kernel<float, kSwiglu><<<blocks_for(n_out, 8), 256, 0, s>>>(y, x, static_cast<const float*>(W.ptr), R,
                                                                        n_out, in, ld_x, acc);
    check_launch("gemv_kernel");
}

}  // namespace

Gemm::Gemm(cudaStream_t stream, void* workspace, size_t workspace_bytes, void* cast, int64_t cast_elems)
    : stream_(stream), workspace_(workspace), workspace_bytes_(workspace ? workspace_bytes : 0), cast_(cast),
      cast_elems_(cast_elems) {
    cublas_check(cublasCreate(&handle_), "cublasCreate");
    cublas_check(cublasSetStream(handle_, stream_), "cublasSetStream");
    // Plain f32 math: no TF32, so F32 weights reproduce the CPU reference to rounding.
    cublas_check(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    if (workspace) cublas_check(cublasSetWorkspace(handle_, workspace, workspace_bytes), "cublasSetWorkspace");
    // The same workspace serves cuBLASLt: both run in order on the one stream.
    cublas_check(cublasLtCreate(&lt_), "cublasLtCreate");
}

Gemm::~Gemm() {
    if (lt_) cublasLtDestroy(lt_);
    if (handle_) cublasDestroy(handle_);
}

void Gemm::linear(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x) {
    linear_path(y, x, W, T, accumulate, ld_x, T <= kGemvMaxRows);
}

void Gemm::linear_swiglu(float* act, const float* x, const WRef& W, int T, float* gu) {
    if (T <= 0) return;
    if (W.rows % 2) throw DeviceError("linear_swiglu: a gate|up matrix of " + std::to_string(W.rows) + " rows");
    const int I = int(W.rows / 2), in = int(W.cols);
    if (T > kGemvMaxRows) {
        linear(gu, x, W, T);
        swiglu(act, gu, T, I, stream_);
        return;
    }
    if (W.fp8())
        gemv_fp8(act, x, static_cast<const uint8_t*>(W.ptr), W.scale, W.grid(), T, in, false, stream_, true);
    else
        launch_gemv<true>(act, x, W, T, I, in, false, stream_);
}

void Gemm::linear_path(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x, bool gemv) {
    if (T <= 0) return;
    const int out = int(W.rows), in = int(W.cols);
    if (!ld_x) ld_x = in;
    if (W.fp8()) {
        if (gemv) {
            for (int r0 = 0; r0 < T; r0 += kGemvMaxRows)
                gemv_fp8(y + int64_t(r0) * out, x + int64_t(r0) * ld_x, static_cast<const uint8_t*>(W.ptr), W.scale,
                         W.grid(), std::min(kGemvMaxRows, T - r0), ld_x, accumulate, stream_);
            return;
        }
        std::string why;
        if (lt_on_ && linear_fp8(y, x, W, T, accumulate, ld_x, Fp8Prefill::Lt, &why)) return;
        if (lt_on_) {
            ++lt_refusals_;
            lt_last_refusal_ = why;
        }
        fp8_fallback(y, x, W, T, accumulate, ld_x);
        return;
    }
    if (gemv) {
        for (int r0 = 0; r0 < T; r0 += kGemvMaxRows)
            launch_gemv<false>(y + int64_t(r0) * out, x + int64_t(r0) * ld_x, W, std::min(kGemvMaxRows, T - r0), out,
                               ld_x, accumulate, stream_);
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

namespace {

// Largest power of two (<= 256) that divides the address: cuBLASLt's alignment preference.
int alignment_of(const void* p) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    int al = 256;
    while (al > 1 && (a % uintptr_t(al)) != 0) al >>= 1;
    return al;
}

// Owns the descriptors of one cuBLASLt call.
struct LtCall {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    ~LtCall() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (c) cublasLtMatrixLayoutDestroy(c);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (desc) cublasLtMatmulDescDestroy(desc);
    }
};

}  // namespace

// Column-major view of the row-major product y[T, m] = x[T, K] W[m, K]^T: D (m x T_pad, ld ld_y)
// = A^T B with A = W as a K x m column-major matrix (TRANSA = T, 128x128 block scales: the
// row-major [row_blocks, ld] grid is the column-major K-block x m-block grid) and B = the
// quantized activations as K x T_pad (TRANSB = N, VEC128 scales [K-blocks, T_pad], token-major).
bool Gemm::lt_gemm(float* y, int ld_y, const uint8_t* a, const float* a_scale, int m, int T, int T_pad, int K,
                   bool accumulate, std::string* why) {
    (void)T;
    auto fail = [&](const std::string& w) {
        if (why) *why = w;
        return false;
    };
    auto st = [](cublasStatus_t s) { return std::string(cublasGetStatusString(s)); };
    LtCall c;
    cublasStatus_t e;
    if ((e = cublasLtMatmulDescCreate(&c.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) != CUBLAS_STATUS_SUCCESS)
        return fail("cublasLtMatmulDescCreate: " + st(e));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    const void* b_scale = fp8_.act_scale;
    for (auto [attr, ptr, size] :
         {std::tuple{CUBLASLT_MATMUL_DESC_TRANSA, static_cast<const void*>(&ta), sizeof ta},
          std::tuple{CUBLASLT_MATMUL_DESC_TRANSB, static_cast<const void*>(&tb), sizeof tb},
          std::tuple{CUBLASLT_MATMUL_DESC_A_SCALE_MODE, static_cast<const void*>(&a_mode), sizeof a_mode},
          std::tuple{CUBLASLT_MATMUL_DESC_B_SCALE_MODE, static_cast<const void*>(&b_mode), sizeof b_mode},
          std::tuple{CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(&a_scale), sizeof a_scale},
          std::tuple{CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(&b_scale), sizeof b_scale}})
        if ((e = cublasLtMatmulDescSetAttribute(c.desc, attr, ptr, size)) != CUBLAS_STATUS_SUCCESS)
            return fail("cublasLtMatmulDescSetAttribute(" + std::to_string(int(attr)) + "): " + st(e));
    if ((e = cublasLtMatrixLayoutCreate(&c.a, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(m), K)) != CUBLAS_STATUS_SUCCESS ||
        (e = cublasLtMatrixLayoutCreate(&c.b, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(T_pad), K)) !=
            CUBLAS_STATUS_SUCCESS ||
        (e = cublasLtMatrixLayoutCreate(&c.c, CUDA_R_32F, uint64_t(m), uint64_t(T_pad), ld_y)) != CUBLAS_STATUS_SUCCESS)
        return fail("cublasLtMatrixLayoutCreate: " + st(e));
    const int al_a = alignment_of(a), al_b = alignment_of(fp8_.act_q), al_c = alignment_of(y);
    const int al_code = (al_a << 18) | (al_b << 9) | al_c;
    LtAlgo& algo = lt_algos_[std::tuple{m, T_pad, K, ld_y, accumulate, al_code}];
    if (!algo.ok && algo.why.empty()) {
        if ((e = cublasLtMatmulPreferenceCreate(&c.pref)) != CUBLAS_STATUS_SUCCESS)
            return fail("cublasLtMatmulPreferenceCreate: " + st(e));
        const uint64_t ws = workspace_bytes_;
        const uint32_t aa = uint32_t(al_a), ab = uint32_t(al_b), ac = uint32_t(al_c);
        cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
        cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa);
        cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab);
        cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof ac);
        cublasLtMatmulPreferenceSetAttribute(c.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof ac);
        cublasLtMatmulHeuristicResult_t h{};
        int found = 0;
        e = cublasLtMatmulAlgoGetHeuristic(lt_, c.desc, c.a, c.b, c.c, c.c, c.pref, 1, &h, &found);
        const std::string shape = "[" + std::to_string(m) + " x " + std::to_string(K) + "] weight, " +
                                  std::to_string(T_pad) + " rows";
        if (e != CUBLAS_STATUS_SUCCESS) algo.why = "cublasLtMatmulAlgoGetHeuristic: " + st(e) + " for " + shape;
        else if (found == 0) algo.why = "cuBLASLt has no block-scaled FP8 algorithm for " + shape;
        else {
            algo.ok = true;
            algo.algo = h.algo;
        }
    }
    if (!algo.ok) return fail(algo.why);
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    e = cublasLtMatmul(lt_, c.desc, &alpha, a, c.a, fp8_.act_q, c.b, &beta, y, c.c, y, c.c, &algo.algo, workspace_,
                       workspace_bytes_, stream_);
    if (e != CUBLAS_STATUS_SUCCESS) {
        algo.ok = false;
        algo.why = "cublasLtMatmul: " + st(e);
        return fail(algo.why);
    }
    return true;
}

bool Gemm::linear_fp8(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x, Fp8Prefill path,
                      std::string* why) {
    if (T <= 0) return true;
    const int out = int(W.rows), K = int(W.cols);
    if (!ld_x) ld_x = K;
    if (path == Fp8Prefill::Fallback) {
        fp8_fallback(y, x, W, T, accumulate, ld_x);
        return true;
    }
    const int T_pad = (T + 3) / 4 * 4;  // the VEC128 scale tensor's leading dimension is the row count
    if (!fp8_.act_q || T_pad > fp8_.rows || K > fp8_.max_k) {
        if (why) *why = "the FP8 activation scratch holds " + std::to_string(fp8_.rows) + " x " +
                        std::to_string(fp8_.max_k) + ", " + std::to_string(T) + " x " + std::to_string(K) + " needed";
        return false;
    }
    quantize_act_fp8(fp8_.act_q, fp8_.act_scale, x, T, T_pad, K, ld_x, stream_);
    const Fp8Grid g = W.grid();
    // A stacked gate|up whose split is not on a block boundary is two block grids: two GEMMs.
    const bool two = g.first_rows() < out && g.first_rows() % kFp8Block != 0;
    const auto* w8 = static_cast<const uint8_t*>(W.ptr);
    const bool direct = !two && T == T_pad && out % 4 == 0;
    if (direct) return lt_gemm(y, out, w8, W.scale, out, T, T_pad, K, accumulate, why);
    if (int64_t(T_pad) * out > int64_t(fp8_.rows) * fp8_.max_out) {
        if (why) *why = "the FP8 output scratch is too small for " + std::to_string(T_pad) + " x " + std::to_string(out);
        return false;
    }
    // Each part into its own contiguous [T_pad, m] block of the scratch; y is written only once
    // every GEMM has been accepted, so a refusal leaves y untouched for the fallback.
    const int parts[2][2] = {{0, two ? int(g.first_rows()) : out}, {two ? int(g.first_rows()) : out, out}};
    for (const auto& p : parts) {
        const int r0 = p[0], m = p[1] - p[0];
        if (m <= 0) continue;
        if (!lt_gemm(fp8_.out + int64_t(T_pad) * r0, m, w8 + int64_t(r0) * K, W.scale + g.scale_row(r0) * g.ld(), m, T,
                     T_pad, K, false, why))
            return false;
    }
    for (const auto& p : parts)
        if (p[1] > p[0])
            scatter_cols(y, out, p[0], fp8_.out + int64_t(T_pad) * p[0], T, p[1] - p[0], accumulate, stream_);
    return true;
}

void Gemm::fp8_fallback(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x) {
    const int out = int(W.rows), K = int(W.cols);
    if (!ld_x) ld_x = K;
    if (int64_t(T) * K > cast_elems_)
        throw DeviceError("linear (fp8 fallback): the bf16 cast buffer holds " + std::to_string(cast_elems_) +
                          " values, " + std::to_string(int64_t(T) * K) + " needed");
    if (!fp8_.dequant || fp8_.dequant_elems < K)
        throw DeviceError("linear (fp8 fallback): no dequantization scratch for a row of " + std::to_string(K));
    auto* xb = static_cast<__nv_bfloat16*>(cast_);
    cast_bf16_kernel<<<blocks_for(int64_t(T) * K, 256), 256, 0, stream_>>>(xb, x, T, K, ld_x);
    check_launch("cast_bf16_kernel");
    const int64_t chunk = std::min<int64_t>(out, fp8_.dequant_elems / K);
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    for (int64_t r0 = 0; r0 < out; r0 += chunk) {
        const int n = int(std::min<int64_t>(chunk, out - r0));
        dequantize_fp8_rows(fp8_.dequant, static_cast<const uint8_t*>(W.ptr), W.scale, W.grid(), r0, n, stream_);
        cublas_check(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, T, K, &alpha, fp8_.dequant, CUDA_R_16BF, K, xb,
                                  CUDA_R_16BF, K, &beta, y + r0, CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx (linear, fp8 dequantized to bf16)");
    }
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
                  int in, cudaStream_t s, const GemvRows& rows) {
    if (R <= 0) return;
    if (rows.swiglu && out % 2) throw DeviceError("grouped_gemv: a SwiGLU gate|up needs an even number of rows");
    dim3 grid(blocks_for(rows.swiglu ? out / 2 : out, 8), unsigned(R));
    if (bf16 && rows.swiglu)
        grouped_gemv_kernel<__nv_bfloat16, true><<<grid, 256, 0, s>>>(y, x, weights, expert, out, in, rows);
    else if (bf16)
        grouped_gemv_kernel<__nv_bfloat16, false><<<grid, 256, 0, s>>>(y, x, weights, expert, out, in, rows);
    else if (rows.swiglu)
        grouped_gemv_kernel<float, true><<<grid, 256, 0, s>>>(y, x, weights, expert, out, in, rows);
    else
        grouped_gemv_kernel<float, false><<<grid, 256, 0, s>>>(y, x, weights, expert, out, in, rows);
    check_launch("grouped_gemv_kernel");
}

// ---- Grouped GEMM over experts ------------------------------------------------------------

namespace {

constexpr int kGN = 64;          // output columns of a block
constexpr int kGK = 32;          // k step
constexpr int kGLd = kGK + 8;    // smem row of bf16: a multiple of 8 elements (WMMA), 80 bytes

__global__ void expert_tiles_kernel(int2* map, const int* offsets, int E, int max_tiles) {
    pdl_wait();
    __shared__ int scan[1024];
    __shared__ int base;
    const int tid = threadIdx.x;
    if (tid == 0) base = 0;
    __syncthreads();
    for (int e0 = 0; e0 < E; e0 += 1024) {
        const int e = e0 + tid;
        const int tiles = e < E ? (offsets[e + 1] - offsets[e] + kGroupedRows - 1) / kGroupedRows : 0;
        scan[tid] = tiles;
        __syncthreads();
        for (int d = 1; d < 1024; d <<= 1) {  // inclusive scan (Hillis-Steele)
            const int v = tid >= d ? scan[tid - d] : 0;
            __syncthreads();
            scan[tid] += v;
            __syncthreads();
        }
        const int first = base + scan[tid] - tiles;
        for (int j = 0; j < tiles && first + j < max_tiles; ++j) map[first + j] = make_int2(e, j);
        __syncthreads();  // every thread has read base
        if (tid == 1023) base += scan[1023];
        __syncthreads();
    }
    for (int t = base + tid; t < max_tiles; t += 1024) map[t] = make_int2(-1, 0);
}

// The weight side of the grouped GEMM: rows [o0, o0 + 64) x columns [k0, k0 + 32) of expert e's
// [out, in] matrix into Bs as bf16, zeros past `out` and `in`. kScaled: the partial sums of each
// 128-column block are multiplied by a scale per output row (scale()); BF16 has none.
struct Bf16Tiles {
    static constexpr bool kScaled = false;
    const void* const* weights;
    __device__ bool vec(int e, int in) const {
        return in % 8 == 0 && (reinterpret_cast<uintptr_t>(weights[e]) & 15) == 0;
    }
    __device__ void load(__nv_bfloat16 (*Bs)[kGLd], int e, int o0, int k0, int out, int in, bool vec) const {
        const auto* w = static_cast<const __nv_bfloat16*>(weights[e]);
        if (vec) {  // 16-byte vectors; in % 8 == 0 keeps each one inside or outside the row
            for (int i = threadIdx.x; i < kGN * kGK / 8; i += blockDim.x) {
                const int r = i / (kGK / 8), c = (i % (kGK / 8)) * 8;
                int4 v = make_int4(0, 0, 0, 0);  // +0.0 in bf16 is all-zero bits
                if (o0 + r < out && k0 + c < in) v = *reinterpret_cast<const int4*>(w + int64_t(o0 + r) * in + k0 + c);
                *reinterpret_cast<int4*>(&Bs[r][c]) = v;
            }
            return;
        }
        for (int i = threadIdx.x; i < kGN * kGK; i += blockDim.x) {
            const int r = i / kGK, c = i % kGK;
            Bs[r][c] = o0 + r < out && k0 + c < in ? w[int64_t(o0 + r) * in + k0 + c] : __float2bfloat16_rn(0.0f);
        }
    }
};

// FP8 experts (kernels/fp8.h carves: e4m3 values, then 128x128 block scales; `split`: the gate
// rows of a stacked gate|up, each part on its own block grid). The e4m3 values go into Bs as
// they are (every e4m3 value is a bf16 value: 3 mantissa bits, exponents 2^-9..2^8) and each
// 128-column block's partial sums are multiplied by the block scale of their output row in
// f32, as DeepSeek's FP8 GEMM promotes per 128-block: the weights are exactly the CPU's
// e4m3 * scale, with no bf16 rounding of the product.
struct Fp8Tiles {
    static constexpr bool kScaled = true;
    const void* const* weights;
    int64_t split;
    __device__ bool vec(int e, int in) const {
        return in % 4 == 0 && (reinterpret_cast<uintptr_t>(weights[e]) & 3) == 0;
    }
    __device__ void load(__nv_bfloat16 (*Bs)[kGLd], int e, int o0, int k0, int out, int in, bool vec) const {
        const auto* w = static_cast<const uint8_t*>(weights[e]);
        if (vec) {  // 4 bytes at a time; in % 4 == 0 keeps each group inside or outside the row
            for (int i = threadIdx.x; i < kGN * kGK / 4; i += blockDim.x) {
                const int r = i / (kGK / 4), c = (i % (kGK / 4)) * 4;
                float f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                if (o0 + r < out && k0 + c < in)
                    fp8x4_to_f32(*reinterpret_cast<const uint32_t*>(w + int64_t(o0 + r) * in + k0 + c), f);
#pragma unroll
                for (int j = 0; j < 4; ++j) Bs[r][c + j] = __float2bfloat16_rn(f[j]);  // exact
            }
            return;
        }
        for (int i = threadIdx.x; i < kGN * kGK; i += blockDim.x) {
            const int r = i / kGK, c = i % kGK;
            Bs[r][c] = __float2bfloat16_rn(o0 + r < out && k0 + c < in ? fp8_to_f32(w[int64_t(o0 + r) * in + k0 + c])
                                                                       : 0.0f);
        }
    }
    // The block scale of output row o (< out) for the 128-column block starting at kb.
    __device__ float scale(int e, int o, int kb, int out, int in) const {
        const Fp8Grid g{out, in, split};
        const auto* sc = reinterpret_cast<const float*>(static_cast<const uint8_t*>(weights[e]) + g.scale_offset());
        return sc[g.scale_row(o) * g.ld() + kb / kFp8Block];
    }
};

// Block = 4 warps over a 64-row x 64-column tile of y (2 x 2 warps of 32 x 32, WMMA 16x16x16
// bf16 fragments, f32 accumulators); grid (column blocks, max_tiles). Rows past the expert's
// count and columns past `out` are computed on zeros and not stored.
// The f32 activations enter as two bf16 parts, hi = bf16(x) and lo = bf16(x - hi) (x - hi is
// exact in f32), each multiplied with the weights: x is carried to ~2^-17 relative instead of
// bf16's 2^-9, so the products are the CPU's f32 products up to summation order, at twice the
// tensor-core work of a kernel that is bound by reading the weights anyway. (An activation
// beyond bf16's range gives hi = inf, lo = NaN: NaN where the GEMV gives inf.)
// Shared memory: the running sums Cs, and one region that holds the k-step tiles (activations
// hi and lo, weights) or, between 128-column blocks of FP8 weights, the block's partial sums.
template <class Tiles>
__global__ void __launch_bounds__(128) grouped_gemm_kernel(float* y, const float* x, Tiles wt, const int* offsets,
                                                           const int2* map, int out, int in) {
    pdl_wait();
    using namespace nvcuda;
    constexpr int kLdC = kGN + 4;  // f32 row of a 64-wide tile: 272 bytes, a multiple of 16
    constexpr int kTileBytes = 3 * kGroupedRows * kGLd * 2, kPartBytes = kGroupedRows * kLdC * 4;
    __shared__ __align__(32) unsigned char region[kTileBytes > kPartBytes ? kTileBytes : kPartBytes];
    __shared__ __align__(32) float Cs[kGroupedRows][kLdC];
    auto* Ahi = reinterpret_cast<__nv_bfloat16 (*)[kGLd]>(region);                       // [64][kGLd]
    auto* Alo = reinterpret_cast<__nv_bfloat16 (*)[kGLd]>(region + kGroupedRows * kGLd * 2);
    auto* Bs = reinterpret_cast<__nv_bfloat16 (*)[kGLd]>(region + 2 * kGroupedRows * kGLd * 2);  // [64][kGLd]
    auto* Cp = reinterpret_cast<float (*)[kLdC]>(region);                                // [64][kLdC]
    static_assert(kGN == kGroupedRows, "Bs has as many rows as the A tiles");

    const int2 tile = map[blockIdx.y];
    if (tile.x < 0) return;
    const int row0 = offsets[tile.x] + tile.y * kGroupedRows;
    const int rows = min(kGroupedRows, offsets[tile.x + 1] - row0);
    const int o0 = blockIdx.x * kGN;
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    const bool xvec = in % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
    const bool wvec = wt.vec(tile.x, in);
    const int block_k = Tiles::kScaled ? kFp8Block : in;  // k extent of one scale (in > 0)
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int kb = 0; kb < in; kb += block_k) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
        for (int k0 = kb; k0 < min(in, kb + block_k); k0 += kGK) {
            for (int i = tid; i < kGroupedRows * kGK / 4; i += 128) {
                const int r = i / (kGK / 4), c = (i % (kGK / 4)) * 4;
                float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                if (r < rows) {
                    const float* xr = x + int64_t(row0 + r) * in + k0 + c;
                    if (xvec) {  // in % 8 == 0 keeps each float4 inside or outside the row
                        if (k0 + c < in) *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(xr);
                    } else {
#pragma unroll
                        for (int j = 0; j < 4; ++j)
                            if (k0 + c + j < in) v[j] = xr[j];
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const __nv_bfloat16 hi = __float2bfloat16_rn(v[j]);
                    Ahi[r][c + j] = hi;
                    Alo[r][c + j] = __float2bfloat16_rn(v[j] - __bfloat162float(hi));
                }
            }
            wt.load(Bs, tile.x, o0, k0, out, in, wvec);
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < kGK; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[wn * 32 + j * 16][kk], kGLd);
#pragma unroll
                for (int part = 0; part < 2; ++part) {
                    auto* A = part == 0 ? Ahi : Alo;
#pragma unroll
                    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &A[wm * 32 + i * 16][kk], kGLd);
#pragma unroll
                    for (int i = 0; i < 2; ++i)
#pragma unroll
                        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
                }
            }
            __syncthreads();  // the tiles are read before the next k step (or Cp) overwrites them
        }
        // BF16: one block over all of `in`, straight into Cs. FP8: this block's partial sums into
        // Cp, then times each output row's block scale into Cs.
        auto* dst = Tiles::kScaled ? Cp : Cs;
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
                wmma::store_matrix_sync(&dst[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kLdC,
                                        wmma::mem_row_major);
        if constexpr (Tiles::kScaled) {
            __syncthreads();
            // Thread tid owns column tid % 64 of every row it visits (128 is a multiple of 64):
            // one scale load per thread and block.
            const int c = tid % kGN;
            const float sc = o0 + c < out ? wt.scale(tile.x, o0 + c, kb, out, in) : 0.0f;
            for (int r = tid / kGN; r < kGroupedRows; r += 128 / kGN) {
                const float part = Cp[r][c] * sc;
                Cs[r][c] = kb == 0 ? part : Cs[r][c] + part;
            }
            __syncthreads();  // Cp is read before the next block's tiles overwrite it
        }
    }
    __syncthreads();
    for (int i = tid; i < kGroupedRows * kGN; i += 128) {
        const int r = i / kGN, c = i % kGN;
        if (r < rows && o0 + c < out) y[int64_t(row0 + r) * out + o0 + c] = Cs[r][c];
    }
}

template <class Tiles>
void launch_grouped(float* y, const float* x, Tiles wt, const int* offsets, const int2* map, int max_tiles, int out,
                    int in, cudaStream_t s) {
    if (max_tiles <= 0 || out <= 0) return;
    if (in <= 0) throw DeviceError("grouped expert GEMM: matrices of " + std::to_string(in) + " columns");
    if (max_tiles > 65535)
        throw DeviceError("grouped expert GEMM: " + std::to_string(max_tiles) + " row tiles, at most 65535 per launch");
    grouped_gemm_kernel<<<dim3(blocks_for(out, kGN), unsigned(max_tiles)), 128, 0, s>>>(y, x, wt, offsets, map, out,
                                                                                     in);
    check_launch("grouped_gemm_kernel");
}

}  // namespace

void expert_tiles(int2* map, const int* offsets, int E, int max_tiles, cudaStream_t s) {
    if (max_tiles <= 0) return;
    expert_tiles_kernel<<<1, 1024, 0, s>>>(map, offsets, E, max_tiles);
    check_launch("expert_tiles_kernel");
}

void grouped_gemm_bf16(float* y, const float* x, const void* const* weights, const int* offsets, const int2* map,
                       int max_tiles, int out, int in, cudaStream_t s) {
    launch_grouped(y, x, Bf16Tiles{weights}, offsets, map, max_tiles, out, in, s);
}

void grouped_gemm_fp8(float* y, const float* x, const void* const* weights, const int* offsets, const int2* map,
                      int max_tiles, int out, int in, int64_t split, cudaStream_t s) {
    launch_grouped(y, x, Fp8Tiles{weights, split}, offsets, map, max_tiles, out, in, s);
}

namespace {
__global__ void one_group_kernel(const void** table, const void* w, int* offsets, int rows) {
    pdl_wait();
    table[0] = w;
    offsets[0] = 0;
    offsets[1] = rows;
}
}  // namespace

void gemm_fp8_exact(float* y, const float* x, const WRef& W, int R, const OneGroupScratch& z, cudaStream_t s) {
    if (R <= 0) return;
    if (!W.fp8()) throw DeviceError("gemm_fp8_exact: the weight is not FP8");
    if ((R + kGroupedRows - 1) / kGroupedRows > z.max_tiles)
        throw DeviceError("gemm_fp8_exact: " + std::to_string(R) + " rows need more than the " +
                          std::to_string(z.max_tiles) + " tiles of the scratch");
    one_group_kernel<<<1, 1, 0, s>>>(z.table, W.ptr, z.offsets, R);
    check_launch("one_group_kernel");
    expert_tiles(z.map, z.offsets, 1, z.max_tiles, s);
    grouped_gemm_fp8(y, x, z.table, z.offsets, z.map, z.max_tiles, int(W.rows), int(W.cols), W.split, s);
}

}  // namespace moescope::cuda
