// The matrix work: y = x W^T (PyTorch nn.Linear) with f32 activations, BF16 or F32 weights
// and f32 accumulation. Few rows (decode): our own bandwidth-bound GEMV, which reads each
// weight once and keeps the activations in f32. Many rows (prefill): cuBLAS (SGEMM for F32
// weights; BF16 x BF16 -> F32 GemmEx after casting the activations, for BF16 weights).
// Experts: a grouped GEMV whose rows each name their expert (no host round trip, capturable
// in a CUDA graph), or a host loop of cuBLAS GEMMs over the experts that received tokens.
// FP8 weights (e4m3 + 128x128 block scales, kernels/fp8.h): few rows read the bytes in our
// GEMV (dequantized to the CPU's f32 values in registers); many rows quantize the activations
// per 1x128 block and run cuBLASLt's block-scaled FP8 GEMM (sm_90), or, when that is off or
// refuses a shape, dequantize the weight rows chunk by chunk to bf16 and use cuBLAS BF16.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>

#include <map>
#include <string>
#include <tuple>

#include "kernels/common.h"
#include "kernels/memory_plan.h"

namespace moescope::cuda {

inline constexpr int kGemvMaxRows = 8;  // rows handled by the GEMV path in one pass

// How the grouped GEMVs of decode read and write rows. x_rows: output row r reads x row
// x_rows[r] / x_div (the MoE permutation: slot s belongs to token s / k), so the experts read the
// normed hidden states without a gather; r when null. swiglu: the weights are stacked
// [2I, in] gate|up matrices and y gets I columns, silu(gate) * up (no SwiGLU launch or buffer).
struct GemvRows {
    const int* x_rows = nullptr;
    int x_div = 1;
    bool swiglu = false;
    MOESCOPE_HD int x_row(int r) const { return x_rows ? x_rows[r] / x_div : r; }
};

// Device scratch of the FP8 prefill paths, for calls of at most `rows` token rows (sizes from
// fp8_scratch_sizes in kernels/memory_plan.h).
struct Fp8Scratch {
    uint8_t* act_q = nullptr;      // [rows_pad, max_k] e4m3 activations
    float* act_scale = nullptr;    // [ceil(max_k / 128), rows_pad] their 1x128 scales
    float* out = nullptr;          // [rows_pad, max_out] f32 GEMM output when y cannot take it directly
    void* dequant = nullptr;       // [dequant_elems] bf16 weight rows (fallback)
    int rows = 0, max_k = 0, max_out = 0;
    int64_t dequant_elems = 0;
};

enum class Fp8Prefill { Lt, Fallback };

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
    // act[T, I] = silu(x W_g^T) * (x W_u^T) for a stacked W = [W_g; W_u] of 2I rows. Decode (T <=
    // kGemvMaxRows): one GEMV computes both halves and the product. Otherwise the product goes
    // through `gu` ([T, 2I] scratch) and the SwiGLU kernel.
    void linear_swiglu(float* act, const float* x, const WRef& W, int T, float* gu);

    // Strided-batched f32 GEMM in row-major terms: C_b[M, N] = alpha A_b op B_b + beta C_b, with
    // B transposed (trans_b: B_b is [N, K]) or not ([K, N]); batch b offsets by stride_*.
    void batched_rowmajor(float* C, const float* A, const float* B, int M, int N, int K, int lda, int ldb, int ldc,
                          int64_t stride_a, int64_t stride_b, int64_t stride_c, int batch, bool trans_b, float alpha,
                          float beta);

    cudaStream_t stream() const { return stream_; }
    cublasHandle_t handle() const { return handle_; }

    // FP8 prefill: the scratch, and whether cuBLASLt is used (the backend turns it on after its
    // self-check; off: the bf16 fallback).
    void set_fp8_scratch(const Fp8Scratch& s) { fp8_ = s; }
    void set_fp8_lt(bool on) { lt_on_ = on; }
    bool fp8_lt() const { return lt_on_; }
    // One FP8 many-row product on a chosen path. Lt returns false (nothing written to y) when
    // cuBLASLt has no algorithm for the shape or fails, with the reason in *why.
    bool linear_fp8(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x, Fp8Prefill path,
                    std::string* why = nullptr);
    // Calls that cuBLASLt refused and the fallback computed (reported by the backend).
    int64_t fp8_lt_refusals() const { return lt_refusals_; }
    const std::string& fp8_lt_last_refusal() const { return lt_last_refusal_; }

private:
    bool lt_gemm(float* y, int ld_y, const uint8_t* a, const float* a_scale, int m, int T, int T_pad, int K,
                 bool accumulate, std::string* why);
    void fp8_fallback(float* y, const float* x, const WRef& W, int T, bool accumulate, int ld_x);

    cudaStream_t stream_;
    cublasHandle_t handle_ = nullptr;
    cublasLtHandle_t lt_ = nullptr;
    void* workspace_ = nullptr;
    size_t workspace_bytes_ = 0;
    void* cast_;
    int64_t cast_elems_;
    Fp8Scratch fp8_;
    bool lt_on_ = false;
    int64_t lt_refusals_ = 0;
    std::string lt_last_refusal_;
    // cuBLASLt algorithms by (m, n, k, ld_c, accumulate, alignments): heuristics run once per shape.
    struct LtAlgo {
        bool ok = false;
        cublasLtMatmulAlgo_t algo{};
        std::string why;
    };
    std::map<std::tuple<int, int, int, int, bool, int>, LtAlgo> lt_algos_;
};

// Grouped GEMV over experts: y[r, 0:out] = x[r, 0:in] W_{expert[r]}^T for r < R, where
// weights[e] points at expert e's [out, in] matrix (device array of device pointers); rows:
// the x row of each r and the SwiGLU epilogue (GemvRows).
void grouped_gemv(float* y, const float* x, const void* const* weights, bool bf16, const int* expert, int R,
                  int out, int in, cudaStream_t s, const GemvRows& rows = {});

// ---- Grouped GEMM over experts (prefill) ------------------------------------------------------
// The rows of one MoE layer sorted by expert (expert e owns rows [offsets[e], offsets[e+1])),
// multiplied by each expert's BF16 (or FP8) matrix in one launch, with the offsets read on the
// device: no host round trip and no launch per expert. Rows go in tiles of kGroupedRows; tile t
// of the layer is (expert, tile within the expert) from a tile map that expert_tiles builds on
// the device. Tensor cores (WMMA bf16, f32 accumulation) with f32-accurate numbers: the
// activations enter as bf16 hi + lo parts, so the products are the f32 GEMV's (the CPU's) up
// to summation order.

// (kGroupedRows and grouped_max_tiles, which size the tile map, are in kernels/memory_plan.h.)

// map[t] = {expert, tile within it} for the layer's tiles in expert order; {-1, 0} after the
// last, up to max_tiles. One block; E is any size.
void expert_tiles(int2* map, const int* offsets, int E, int max_tiles, cudaStream_t s);

// y[r, 0:out] = x[r, 0:in] W_e^T for every row r of every expert e (rows and y are [R, in] and
// [R, out], contiguous); weights[e]: device pointer to expert e's [out, in] bf16 matrix.
void grouped_gemm_bf16(float* y, const float* x, const void* const* weights, const int* offsets, const int2* map,
                       int max_tiles, int out, int in, cudaStream_t s);
// The same over FP8 experts (weights[e]: the start of expert e's carve, kernels/fp8.h; split:
// the gate rows of a stacked gate|up): the e4m3 values enter exactly (each is a bf16 value) and
// each 128-column block's partial sums are multiplied by the row's block scale in f32, so the
// weights are the CPU's e4m3 x scale.
void grouped_gemm_fp8(float* y, const float* x, const void* const* weights, const int* offsets, const int2* map,
                      int max_tiles, int out, int in, int64_t split, cudaStream_t s);

// y[R, out] = x[R, in] W^T for one FP8 matrix with the f32-accurate numbers of the grouped GEMM
// (the matrix as a single group: weights exactly the CPU's, activations as bf16 hi + lo), for
// products where the e4m3 activations of cuBLASLt's path or the bf16 weights of its fallback
// cost too much accuracy (the naive attention's kv_b(c)). Scratch: one device pointer, two
// offsets and a tile map of at least ceil(R / kGroupedRows) entries.
struct OneGroupScratch {
    const void** table = nullptr;
    int* offsets = nullptr;
    int2* map = nullptr;
    int max_tiles = 0;
};
void gemm_fp8_exact(float* y, const float* x, const WRef& W, int R, const OneGroupScratch& z, cudaStream_t s);

// ---- FP8 kernels (fp8.cu) -------------------------------------------------------------------

// y[r, 0:out] (= or +=) x[r, 0:in] W^T for r < R <= kGemvMaxRows, W an FP8 matrix: each weight
// is read once, dequantized as e4m3 * block scale in f32 (the CPU's value exactly) and
// multiplied with the f32 activations, f32 accumulation.
// swiglu: g is a stacked gate|up of 2I rows and y[r, 0:I] = silu(gate) * up (accumulate ignored).
void gemv_fp8(float* y, const float* x, const uint8_t* w, const float* scales, const Fp8Grid& g, int R, int ld_x,
              bool accumulate, cudaStream_t s, bool swiglu = false);

// Grouped GEMV over FP8 experts: y[r, 0:out] = x[r, 0:in] W_{expert[r]}^T; weights[e] is the
// start of expert e's carve (its scales at Fp8Grid::scale_offset()).
void grouped_gemv_fp8(float* y, const float* x, const void* const* weights, const int* expert, int R, int out, int in,
                      int64_t split, cudaStream_t s, const GemvRows& rows = {});

// DeepSeek's act_quant: per row t < T and 128-column block b, s = amax / 448 (1 when the block is
// zero), q = e4m3(x / s). q: [T_pad, K] (rows T..T_pad zeroed); scales: [ceil(K/128), T_pad]
// (token-major, as cuBLASLt's VEC128 scale tensor of the B operand; padding rows get 1).
void quantize_act_fp8(uint8_t* q, float* scales, const float* x, int T, int T_pad, int K, int ld_x, cudaStream_t s);

// Rows [r0, r0 + n) of an FP8 matrix dequantized to bf16 (row-major [n, cols]).
void dequantize_fp8_rows(void* bf16_out, const uint8_t* w, const float* scales, const Fp8Grid& g, int64_t r0,
                         int64_t n, cudaStream_t s);

// y[t, col0 + j] (= or +=) src[t, j] for t < T, j < n; y rows are ld_y apart.
void scatter_cols(float* y, int ld_y, int col0, const float* src, int T, int n, bool accumulate, cudaStream_t s);

// Random FP8 matrix (benchmarks): values uniform in [-bound, bound], one scale bound / 448.
void fill_fp8_random(void* carve, const Fp8Grid& g, float bound, uint64_t seed, cudaStream_t s);


}  // namespace moescope::cuda
