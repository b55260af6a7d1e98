// Elementary CPU ops of the reference model, llm.c style: outputs first, sizes last, f32
// with f32 accumulation. Matrix products of up to kSmallT rows (decoding) use our row kernel
// on a small thread pool; larger ones OpenBLAS sgemm.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>

#include "engine/weights.h"

namespace moescope {

// y[T, out] = x[T, in] W^T  (W stored [out, in], PyTorch nn.Linear); accumulate adds to y.
// W may be f32 or BF16-stored (matmul_nt or matmul_nt_bf16).
void linear_forward(float* y, const float* x, const Tensor& W, int T, bool accumulate = false);
// Output columns [o0, o1) of linear_forward by the row kernel (y keeps its [T, out] layout), on
// the calling thread, for f32 or BF16 W: the MoE decode path splits experts' rows with it.
void linear_rows_range(float* y, const float* x, const Tensor& W, int T, int o0, int o1, bool accumulate = false);
// For T <= kSmallT this is matmul_nt_rows, so a row's result does not depend on T: MTP
// verification (pending token + drafts) gives the same logits as one-token decoding.
void matmul_nt(float* y, const float* x, const float* W, int T, int out, int in, bool accumulate = false);
constexpr int kSmallT = 8;

// matmul_nt by the row kernel at any T: every y[t, o] is the same 16-lane dot product of
// x[t] and W[o] (identical bits whatever T and the thread count); W is read once for 4 rows.
// Output rows are split across the pool's threads when the product is large enough.
void matmul_nt_rows(float* y, const float* x, const float* W, int T, int out, int in, bool accumulate = false);

// Only output columns [o0, o1) of matmul_nt_rows (y keeps its [T, out] layout), on the calling
// thread: the building block for callers that split several products over the pool.
void matmul_nt_rows_range(float* y, const float* x, const float* W, int T, int o0, int o1, int out, int in,
                          bool accumulate = false);

// The same products with W (or X below) as BF16 bit patterns [out, in]. The row kernel widens
// each weight in registers (bf16 << 16, exact) and keeps the f32 kernel's accumulation order,
// so y is bit-identical to the f32 kernels on a W holding the same (BF16-representable)
// values. matmul_nt_bf16 with T > kSmallT widens panels of kBf16PanelValues weights into a
// per-thread f32 scratch and runs sgemm on each: f32 inputs identical to the f32 path and f32
// accumulation, so results agree with matmul_nt to within sgemm's rounding.
void matmul_nt_bf16(float* y, const float* x, const uint16_t* W, int T, int out, int in, bool accumulate = false);
void matmul_nt_rows_bf16(float* y, const float* x, const uint16_t* W, int T, int out, int in, bool accumulate = false);
void matmul_nt_rows_range_bf16(float* y, const float* x, const uint16_t* W, int T, int o0, int o1, int out, int in,
                               bool accumulate = false);
void matvec_t_bf16(float* y, const float* p, const uint16_t* X, int rows, int n, int64_t ld, bool accumulate = false);
constexpr int64_t kBf16PanelValues = int64_t(1) << 20;  // 4 MiB of f32 per widened panel

// The row kernel's dot product: dot(a, b, n) == y[t, o] of matmul_nt_rows for x[t] = a, W[o] = b.
float dot(const float* a, const float* b, int n);

// y[n] (=|+=) sum_j p[j] X[j, :n] over rows j of X with leading dimension ld (attention's
// weighted sum of values); each y[i] sums over j in ascending order (fused on the AVX2 path).
void matvec_t(float* y, const float* p, const float* X, int rows, int n, int64_t ld, bool accumulate = false);

// softmax_inplace with a vectorized exp on the AVX2 path (relative error ~2e-7 per value, 16
// fixed summation lanes; the portable path is softmax_inplace itself). For decoding's attention;
// the trainer keeps softmax_inplace.
void softmax_fast(float* x, int n);

// log(sum exp x) over n values (vectorized exp on the AVX2 path, as softmax_fast); for the
// per-token surprisal of generated text.
double log_sum_exp(const float* x, int n);

// The row kernel in use: "avx2-fma" where the CPU has AVX2 and FMA, else "portable" (SSE,
// separate multiply and add; the two round differently). use_portable_row_kernel(true) forces
// the portable one (tests, benchmarks); switch only while no product is running.
const char* row_kernel_name();
void use_portable_row_kernel(bool on);

// Runs fn(begin, end) over contiguous chunks covering [0, n) once, on the engine's thread pool
// (the caller included, which takes the chunks of workers that are not scheduled) when `work`
// (multiply-adds, roughly) is worth waking threads for, else fn(0, n) inline. Chunks must write
// disjoint outputs; fn must not throw. Nested and concurrent calls run inline.
void parallel_range(int n, int64_t work, const std::function<void(int, int)>& fn);

// Runs fn(i) once for every i in [0, n) on up to `threads` threads of the same pool (the caller
// included), claimed one task at a time (callers put the longest first), with OpenBLAS held at
// one thread meanwhile: for independent tasks of small sgemm products (the experts of the
// trainer's MoE layers), whose BLAS calls would each wake OpenBLAS's own threads and
// oversubscribe the cores. It also keeps the bits: threaded OpenBLAS splits long sums into
// other blocks than single-threaded OpenBLAS (results differ in the last bits), so a task's
// products give the same results whatever `threads` is.
// The BLAS setting is process-wide: products of other threads during the call run on one
// thread too; overlapping calls keep it at 1 until the last one ends, and num_threads() still
// reports the configured count. Nested calls, and calls while the pool is busy, run inline,
// in order. fn must not throw.
void parallel_tasks(int n, int threads, const std::function<void(int)>& fn);

// Training's products, the same bits at every thread count: while an instance lives on this
// thread, the sgemm products of matmul_nt and matmul_nt_backward called on it are cut into
// fixed blocks of kFixedOrderBlock output columns (rows of dW), each a single-threaded sgemm
// run through parallel_tasks, so no sum is split by thread count (threaded OpenBLAS splits
// long sums into other blocks than single-threaded OpenBLAS). Products inside a parallel_tasks
// task are single-threaded already and stay whole. Nests (counted).
inline constexpr int kFixedOrderBlock = 64;
class FixedOrderProducts {
public:
    FixedOrderProducts();
    ~FixedOrderProducts();
    FixedOrderProducts(const FixedOrderProducts&) = delete;
    FixedOrderProducts& operator=(const FixedOrderProducts&) = delete;
};
// Whether products on this thread are cut into fixed blocks now (inside a FixedOrderProducts
// scope, outside a parallel_tasks task).
bool fixed_order_products();
// fn(c0, c1) for each fixed block [c0, c1) of n columns (kFixedOrderBlock wide), as tasks of
// parallel_tasks on num_threads() threads.
void for_each_fixed_block(int n, const std::function<void(int, int)>& fn);

// out[T, n] = x / sqrt(mean(x^2) + eps) * w
void rmsnorm_forward(float* out, const float* x, const float* w, int T, int n, float eps);

// out[i] = silu(g[i]) * u[i]
void swiglu_forward(float* out, const float* g, const float* u, int64_t n);

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// In-place softmax over n values.
void softmax_inplace(float* x, int n);

void set_num_threads(int n);  // BLAS and pool threads; 0 = all cores
int num_threads();            // the configured count (also inside parallel_tasks)

}  // namespace moescope
