// Elementary CPU ops. The small-T matrix product (decoding: 1 token, or the pending token plus
// MTP drafts) is our own row kernel rather than BLAS, so a row's result never depends on how
// many rows share the call or how many threads run it; large T goes to OpenBLAS sgemm.
#include "engine/model/ops.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace moescope {

namespace {

// ---- the row kernel ----
// y[t, o] = sum_i x[t, i] W[o, i] as 16 lanes: lane l accumulates i = l, l+16, l+32, ... in
// order (a fused multiply-add on AVX2+FMA machines, multiply then add elsewhere), the lanes
// are reduced as (l, l+8) -> (l, l+4) -> (l, l+2) -> (l, l+1), then the tail (in % 16
// elements) is added in order. Every (t, o) goes through exactly this sequence whatever T,
// the blocking or the thread, so the result is a function of (x[t], W[o]) alone.
constexpr int kLanes = 16;

// A weight as f32: BF16 is the upper half of an f32 (bf16 << 16), so widening is exact and a
// BF16 weight row goes through the same arithmetic as the f32 row holding the same values.
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_f32(v); }

// Portable path (x86-64-v2: SSE; the compiler vectorizes the lane loops). ops.cpp is built
// with -ffp-contract=off so the multiply and the add are never fused here. WT: float or
// uint16_t (BF16 bits).
template <int TT, typename WT>
void rows_generic(float* y, const float* x, const WT* W, int o0, int o1, int out, int in, bool accumulate) {
    const int n16 = in / kLanes * kLanes;
    for (int o = o0; o < o1; ++o) {
        const WT* w = W + size_t(o) * in;
        float acc[TT][kLanes] = {};
        for (int i = 0; i < n16; i += kLanes)
            for (int t = 0; t < TT; ++t) {
                const float* xt = x + size_t(t) * in + i;
                for (int l = 0; l < kLanes; ++l) acc[t][l] += widen(w[i + l]) * xt[l];
            }
        for (int t = 0; t < TT; ++t) {
            float* a = acc[t];
            for (int l = 0; l < 8; ++l) a[l] += a[l + 8];
            for (int l = 0; l < 4; ++l) a[l] += a[l + 4];
            for (int l = 0; l < 2; ++l) a[l] += a[l + 2];
            float s = a[0] + a[1];
            const float* xt = x + size_t(t) * in;
            for (int i = n16; i < in; ++i) s += widen(w[i]) * xt[i];
            float& yo = y[size_t(t) * out + o];
            yo = accumulate ? yo + s : s;
        }
    }
}

__attribute__((target("avx2,fma"))) inline float reduce16_avx2(__m256 a0, __m256 a1) {
    __m256 v = _mm256_add_ps(a0, a1);                                                // l + (l+8)
    __m128 u = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l + (l+4)
    u = _mm_add_ps(u, _mm_movehl_ps(u, u));                                          // l + (l+2)
    u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));                                      // l + (l+1)
    return _mm_cvtss_f32(u);
}

// 8 weights as f32 lanes: a plain load, or 8 BF16 values zero-extended to 32 bits and shifted
// into the upper half (exact).
__attribute__((target("avx2,fma"))) inline __m256 load8_avx2(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8_avx2(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// TT rows of x against R rows of W at once: each weight row is loaded once for TT tokens.
template <int TT, int R, typename WT>
__attribute__((target("avx2,fma"))) void block_avx2(float* y, const float* x, const WT* W, int o, int out, int in,
                                                    bool accumulate) {
    const int n16 = in / kLanes * kLanes;
    __m256 acc[TT][R][2];
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r) acc[t][r][0] = acc[t][r][1] = _mm256_setzero_ps();
    for (int i = 0; i < n16; i += kLanes) {
        __m256 w[R][2];
        for (int r = 0; r < R; ++r) {
            const WT* wr = W + size_t(o + r) * in + i;
            w[r][0] = load8_avx2(wr);
            w[r][1] = load8_avx2(wr + 8);
        }
        for (int t = 0; t < TT; ++t) {
            const float* xt = x + size_t(t) * in + i;
            const __m256 x0 = _mm256_loadu_ps(xt), x1 = _mm256_loadu_ps(xt + 8);
            for (int r = 0; r < R; ++r) {
                acc[t][r][0] = _mm256_fmadd_ps(w[r][0], x0, acc[t][r][0]);
                acc[t][r][1] = _mm256_fmadd_ps(w[r][1], x1, acc[t][r][1]);
            }
        }
    }
    for (int t = 0; t < TT; ++t)
        for (int r = 0; r < R; ++r) {
            float s = reduce16_avx2(acc[t][r][0], acc[t][r][1]);
            const WT* wr = W + size_t(o + r) * in;
            const float* xt = x + size_t(t) * in;
            for (int i = n16; i < in; ++i)
                s = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(widen(wr[i])), _mm_set_ss(xt[i]), _mm_set_ss(s)));
            float& yo = y[size_t(t) * out + o + r];
            yo = accumulate ? yo + s : s;
        }
}

// Output rows per block: enough independent FMA chains to hide latency within 16 registers.
template <int TT, typename WT>
__attribute__((target("avx2,fma"))) void rows_avx2(float* y, const float* x, const WT* W, int o0, int o1, int out,
                                                   int in, bool accumulate) {
    constexpr int R = TT == 1 ? 4 : TT == 2 ? 2 : 1;
    int o = o0;
    for (; o + R <= o1; o += R) block_avx2<TT, R, WT>(y, x, W, o, out, in, accumulate);
    for (; o < o1; ++o) block_avx2<TT, 1, WT>(y, x, W, o, out, in, accumulate);
}

// ---- attention helpers: y = sum_j p[j] X[j], and softmax with a vectorized exp ----
// Each y[i] accumulates p[j] X[j, i] over j in ascending order (fused on the AVX2 path).
template <typename XT>
void rows_axpy_generic(float* y, const float* p, const XT* X, int rows, int n, int64_t ld, bool accumulate) {
    if (!accumulate) std::fill(y, y + n, 0.0f);
    for (int j = 0; j < rows; ++j) {
        const XT* xj = X + j * ld;
        const float pj = p[j];
        for (int i = 0; i < n; ++i) y[i] += pj * widen(xj[i]);
    }
}

template <int W, typename XT>  // W ymm accumulators: 8 W columns at once
__attribute__((target("avx2,fma"))) void rows_axpy_block(float* y, const float* p, const XT* X, int rows, int64_t ld,
                                                         bool accumulate) {
    __m256 acc[W];
    for (int w = 0; w < W; ++w) acc[w] = accumulate ? _mm256_loadu_ps(y + 8 * w) : _mm256_setzero_ps();
    for (int j = 0; j < rows; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const XT* xj = X + j * ld;
        for (int w = 0; w < W; ++w) acc[w] = _mm256_fmadd_ps(pj, load8_avx2(xj + 8 * w), acc[w]);
    }
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(y + 8 * w, acc[w]);
}

template <typename XT>
__attribute__((target("avx2,fma"))) void rows_axpy_avx2(float* y, const float* p, const XT* X, int rows, int n,
                                                        int64_t ld, bool accumulate) {
    int i = 0;
    for (; i + 64 <= n; i += 64) rows_axpy_block<8>(y + i, p, X + i, rows, ld, accumulate);
    for (; i + 32 <= n; i += 32) rows_axpy_block<4>(y + i, p, X + i, rows, ld, accumulate);
    for (; i + 16 <= n; i += 16) rows_axpy_block<2>(y + i, p, X + i, rows, ld, accumulate);
    for (; i + 8 <= n; i += 8) rows_axpy_block<1>(y + i, p, X + i, rows, ld, accumulate);
    for (; i < n; ++i) {
        float s = accumulate ? y[i] : 0.0f;
        for (int j = 0; j < rows; ++j)
            s = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(p[j]), _mm_set_ss(widen(X[j * ld + i])), _mm_set_ss(s)));
        y[i] = s;
    }
}

// exp for x <= 0 (softmax arguments): 2^k * p(r), r = x - k ln2 in [-ln2/2, ln2/2], p the
// degree-6 Taylor polynomial (relative error ~2e-7, below float's own rounding of the sum).
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) void softmax_avx2(float* x, int n) {
    float m = x[0];
    for (int i = 1; i < n; ++i) m = std::max(m, x[i]);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();  // 16 lanes, as the row kernel
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 e0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        const __m256 e1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm));
        _mm256_storeu_ps(x + i, e0);
        _mm256_storeu_ps(x + i + 8, e1);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    float s = reduce16_avx2(s0, s1);
    for (; i < n; ++i) {
        float e[8];
        _mm256_storeu_ps(e, exp_avx2(_mm256_set1_ps(x[i] - m)));
        x[i] = e[0];
        s += e[0];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / s);
    i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    for (; i < n; ++i) x[i] *= 1.0f / s;
}

__attribute__((target("avx2,fma"))) double log_sum_exp_avx2(const float* x, int n) {
    float m = x[0];
    for (int i = 1; i < n; ++i) m = std::max(m, x[i]);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_ps(s0, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
        s1 = _mm256_add_ps(s1, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm)));
    }
    double s = reduce16_avx2(s0, s1);
    for (; i < n; ++i) s += std::exp(double(x[i]) - m);
    return m + std::log(s);
}

double log_sum_exp_generic(const float* x, int n) {
    float m = x[0];
    for (int i = 1; i < n; ++i) m = std::max(m, x[i]);
    double s = 0;
    for (int i = 0; i < n; ++i) s += std::exp(double(x[i]) - m);
    return m + std::log(s);
}

template <typename WT>
using RowsFn = void (*)(float*, const float*, const WT*, int, int, int, int, bool);
template <typename XT>
using AxpyFn = void (*)(float*, const float*, const XT*, int, int, int64_t, bool);

struct Kernels {
    RowsFn<float> fn[4];
    RowsFn<uint16_t> fn_bf16[4];
    AxpyFn<float> rows_axpy;
    AxpyFn<uint16_t> rows_axpy_bf16;
    void (*softmax)(float*, int);
    double (*lse)(const float*, int);

    const RowsFn<float>* rows(const float*) const { return fn; }
    const RowsFn<uint16_t>* rows(const uint16_t*) const { return fn_bf16; }
};

constexpr Kernels kPortable{
    {rows_generic<1, float>, rows_generic<2, float>, rows_generic<3, float>, rows_generic<4, float>},
    {rows_generic<1, uint16_t>, rows_generic<2, uint16_t>, rows_generic<3, uint16_t>, rows_generic<4, uint16_t>},
    rows_axpy_generic<float>,
    rows_axpy_generic<uint16_t>,
    softmax_inplace,
    log_sum_exp_generic};
constexpr Kernels kAvx2{{rows_avx2<1, float>, rows_avx2<2, float>, rows_avx2<3, float>, rows_avx2<4, float>},
                        {rows_avx2<1, uint16_t>, rows_avx2<2, uint16_t>, rows_avx2<3, uint16_t>, rows_avx2<4, uint16_t>},
                        rows_axpy_avx2<float>,
                        rows_axpy_avx2<uint16_t>,
                        softmax_avx2,
                        log_sum_exp_avx2};

bool have_avx2_fma() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Read by every thread on every product: on a line of its own, so that no neighbour in .bss
// that is written (the pool's fields were once) makes the threads fetch it again and again.
struct alignas(64) KernelSlot {
    std::atomic<const Kernels*> k;
};
std::atomic<const Kernels*>& kernel_slot() {
    static KernelSlot s{have_avx2_fma() ? &kAvx2 : &kPortable};
    return s.k;
}

const Kernels& kernels() { return *kernel_slot().load(std::memory_order_relaxed); }

// Output rows o0..o1 for all T rows of x, 4 rows of x at a time.
template <typename WT>
void rows_range(float* y, const float* x, const WT* W, int T, int o0, int o1, int out, int in, bool accumulate) {
    const auto* fn = kernels().rows(W);
    for (int t = 0; t < T; t += 4) {
        const int tt = std::min(4, T - t);
        fn[tt - 1](y + size_t(t) * out, x + size_t(t) * in, W, o0, o1, out, in, accumulate);
    }
}

// ---- a small persistent thread pool ----
// Decoding calls hundreds of products of a few microseconds each per token: starting threads
// per call (or waking BLAS's) costs more than the work. A job is cut into chunks that the
// caller and the workers claim from a shared counter, so a worker the OS has not scheduled
// (the machine is shared, or busy with OpenBLAS's spinning threads) delays nothing: the caller
// takes its chunks. Which thread computes a chunk never changes its result. Workers spin
// briefly for the next job, then sleep on a condition variable, so an idle session costs no CPU.
class Pool {
public:
    static Pool& get() {
        static Pool p;
        return p;
    }
    int threads() const { return threads_.load(std::memory_order_relaxed); }
    void set_threads(int n) { threads_.store(std::max(1, n), std::memory_order_relaxed); }

    // fn(begin, end) over chunks covering [0, n) once, on up to nt threads (the caller included);
    // `chunks` > 0 asks for that many chunks (at most n) instead of 4 per thread.
    void run(int n, int nt, const std::function<void(int, int)>& fn, int chunks = 0) {
        nt = std::min({nt, n, kMaxThreads});
        if (nt <= 1 || busy_.exchange(true)) {  // nested or concurrent use runs inline
            if (n > 0) fn(0, n);
            return;
        }
        ensure_workers(nt - 1);
        job_ = &fn;
        n_ = n;
        chunks_ = chunks > 0 ? std::min(n, chunks) : std::min(n, 4 * nt);
        next_.store(0);
        {
            std::lock_guard<std::mutex> lk(m_);
            gen_.fetch_add(1);
            active_.store(true);
        }
        cv_.notify_all();
        work();
        // No worker may start on this job from now on; wait for those inside it.
        active_.store(false);
        for (int spin = 0; inside_.load() > 0; ++spin)
            if (spin < 4000) _mm_pause();
            else std::this_thread::yield();
        job_ = nullptr;
        busy_.store(false);
    }

private:
    static constexpr int kMaxThreads = 64;
    Pool() { threads_ = int(std::max(1u, std::thread::hardware_concurrency())); }
    ~Pool() {
        {
            std::lock_guard<std::mutex> lk(m_);
            quit_ = true;
            gen_.fetch_add(1);
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }
    void work() {
        for (int c; (c = next_.fetch_add(1)) < chunks_;)
            (*job_)(int(int64_t(n_) * c / chunks_), int(int64_t(n_) * (c + 1) / chunks_));
    }
    void ensure_workers(int n) {
        while (int(workers_.size()) < n) {
            const uint64_t now = gen_.load();  // the worker's first job is the next one
            workers_.emplace_back([this, now] { loop(now); });
        }
    }
    void loop(uint64_t seen) {
        for (;;) {
            uint64_t g;
            // Spin ~20 us (a pause is ~11 ns here), then keep polling with sched_yield for
            // ~200 us: longer than the gaps between a token's products (sampling, telemetry),
            // so the worker rarely needs a wake-up, while yielding lets OpenBLAS's threads
            // (which poll the same way after a large product) run on this core at once.
            for (int spin = 0; (g = gen_.load()) == seen && spin < 2000; ++spin) _mm_pause();
            if (g == seen) {
                const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
                while ((g = gen_.load()) == seen && std::chrono::steady_clock::now() < until) std::this_thread::yield();
            }
            if (g == seen) {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return gen_.load() != seen; });
                g = gen_.load();
            }
            seen = g;
            if (quit_) return;
            // Enter, then check that job g is still open: the caller waits for everyone inside
            // after closing it, so job_, n_ and chunks_ stay valid while we use them.
            inside_.fetch_add(1);
            if (active_.load() && gen_.load() == g) work();
            inside_.fetch_sub(1);
        }
    }

    // Each group of fields on its own cache line, by who writes it when: idle workers poll
    // gen_, so a write to its line by the caller between jobs (the mutex, the job fields, a
    // chunk claim) would pull the line away from every polling worker and back. Left to the
    // linker, the fields fell across lines by where the object happened to land in .bss; one
    // placement (the mutex and job fields on gen_'s line) cost up to 10% of a 2-thread decode
    // step at context 512 (docs/performance.md).
    static constexpr size_t kLine = 64;
    alignas(kLine) std::atomic<uint64_t> gen_{0};  // a new job opens: what idle workers poll
    std::atomic<bool> active_{false};              // the job is still open to new workers
    alignas(kLine) std::atomic<int> next_{0};      // chunk claims of every thread during a job
    alignas(kLine) std::atomic<int> inside_{0};    // workers inside a job (the caller waits for 0)
    alignas(kLine) const std::function<void(int, int)>* job_ = nullptr;  // set before gen_ moves
    int n_ = 0, chunks_ = 1;
    alignas(kLine) std::atomic<int> threads_{1};   // the caller's side
    std::atomic<bool> busy_{false};
    alignas(kLine) std::atomic<bool> quit_{false};  // sleeping and shutting down
    std::mutex m_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
};

// Below this many multiply-adds a product runs on the calling thread: waking a worker costs
// a few microseconds.
constexpr int64_t kParallelWork = 1 << 16;

}  // namespace

void parallel_range(int n, int64_t work, const std::function<void(int, int)>& fn) {
    Pool& p = Pool::get();
    const int nt = work >= kParallelWork ? p.threads() : 1;
    p.run(n, nt, fn);
}

namespace {

// OpenBLAS's thread count is process-wide. parallel_tasks regions hold it at 1 (counted, so
// regions on several threads overlap safely) and set_num_threads during a region only records
// the count, applied when the last region ends.
struct BlasThreads {
    std::mutex m;
    int holds = 0;
    int wanted = 0;  // the count to restore
    static BlasThreads& get() {
        static BlasThreads b;
        return b;
    }
};

struct BlasSingleThreaded {
    BlasSingleThreaded() {
        BlasThreads& b = BlasThreads::get();
        std::lock_guard<std::mutex> lk(b.m);
        if (b.holds++ == 0) {
            b.wanted = openblas_get_num_threads();
            if (b.wanted != 1) openblas_set_num_threads(1);
        }
    }
    ~BlasSingleThreaded() {
        BlasThreads& b = BlasThreads::get();
        std::lock_guard<std::mutex> lk(b.m);
        if (--b.holds == 0 && b.wanted != 1) openblas_set_num_threads(b.wanted);
    }
    BlasSingleThreaded(const BlasSingleThreaded&) = delete;
    BlasSingleThreaded& operator=(const BlasSingleThreaded&) = delete;
};

thread_local int t_fixed_order = 0;  // FixedOrderProducts scopes open on this thread
thread_local int t_in_task = 0;      // parallel_tasks tasks running on this thread

}  // namespace

void parallel_tasks(int n, int threads, const std::function<void(int)>& fn) {
    BlasSingleThreaded hold;
    Pool::get().run(
        n, threads,
        [&](int i0, int i1) {
            ++t_in_task;
            for (int i = i0; i < i1; ++i) fn(i);
            --t_in_task;
        },
        n);
}

FixedOrderProducts::FixedOrderProducts() { ++t_fixed_order; }
FixedOrderProducts::~FixedOrderProducts() { --t_fixed_order; }
bool fixed_order_products() { return t_fixed_order > 0 && t_in_task == 0; }

void for_each_fixed_block(int n, const std::function<void(int, int)>& fn) {
    const int blocks = (n + kFixedOrderBlock - 1) / kFixedOrderBlock;
    parallel_tasks(blocks, num_threads(), [&](int b) {
        const int c0 = b * kFixedOrderBlock;
        fn(c0, std::min(n, c0 + kFixedOrderBlock));
    });
}

void matmul_nt_rows(float* y, const float* x, const float* W, int T, int out, int in, bool accumulate) {
    parallel_range(out, int64_t(T) * out * in, [&](int o0, int o1) { rows_range(y, x, W, T, o0, o1, out, in, accumulate); });
}

void matmul_nt_rows_bf16(float* y, const float* x, const uint16_t* W, int T, int out, int in, bool accumulate) {
    parallel_range(out, int64_t(T) * out * in, [&](int o0, int o1) { rows_range(y, x, W, T, o0, o1, out, in, accumulate); });
}

const char* row_kernel_name() { return &kernels() == &kAvx2 ? "avx2-fma" : "portable"; }

void use_portable_row_kernel(bool on) { kernel_slot().store(on || !have_avx2_fma() ? &kPortable : &kAvx2); }

void matmul_nt_rows_range(float* y, const float* x, const float* W, int T, int o0, int o1, int out, int in,
                          bool accumulate) {
    rows_range(y, x, W, T, o0, o1, out, in, accumulate);
}

void matmul_nt_rows_range_bf16(float* y, const float* x, const uint16_t* W, int T, int o0, int o1, int out, int in,
                               bool accumulate) {
    rows_range(y, x, W, T, o0, o1, out, in, accumulate);
}

void linear_rows_range(float* y, const float* x, const Tensor& W, int T, int o0, int o1, bool accumulate) {
    const int out = int(W.shape[0]), in = int(W.shape[1]);
    if (W.is_bf16()) rows_range(y, x, W.bf16.data(), T, o0, o1, out, in, accumulate);
    else rows_range(y, x, W.ptr(), T, o0, o1, out, in, accumulate);
}

void matvec_t(float* y, const float* p, const float* X, int rows, int n, int64_t ld, bool accumulate) {
    kernels().rows_axpy(y, p, X, rows, n, ld, accumulate);
}

void matvec_t_bf16(float* y, const float* p, const uint16_t* X, int rows, int n, int64_t ld, bool accumulate) {
    kernels().rows_axpy_bf16(y, p, X, rows, n, ld, accumulate);
}

void softmax_fast(float* x, int n) { kernels().softmax(x, n); }

double log_sum_exp(const float* x, int n) { return kernels().lse(x, n); }

float dot(const float* a, const float* b, int n) {
    float y;
    rows_range(&y, a, b, 1, 0, 1, 1, n, false);
    return y;
}

void matmul_nt(float* y, const float* x, const float* W, int T, int out, int in, bool accumulate) {
    if (T <= kSmallT) {
        matmul_nt_rows(y, x, W, T, out, in, accumulate);
        return;
    }
    if (fixed_order_products()) {  // y[:, o0:o1] = x W[o0:o1]^T, block by block
        for_each_fixed_block(out, [&](int o0, int o1) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, o1 - o0, in, 1.0f, x, in, W + size_t(o0) * size_t(in),
                        in, accumulate ? 1.0f : 0.0f, y + o0, out);
        });
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1.0f, x, in, W, in, accumulate ? 1.0f : 0.0f, y,
                out);
}

void matmul_nt_bf16(float* y, const float* x, const uint16_t* W, int T, int out, int in, bool accumulate) {
    if (T <= kSmallT) {
        matmul_nt_rows_bf16(y, x, W, T, out, in, accumulate);
        return;
    }
    // Panels of kBf16PanelValues weights (at least 16 rows) widened into f32 scratch, each one
    // sgemm writing its own columns of y: the f32 values and f32 accumulation of the f32 path,
    // only the product is cut along `out` (OpenBLAS sums each y[t, o] over `in` the same way
    // whatever the width, so in practice the bits agree; tests allow sgemm's rounding).
    const int rows = std::min(out, std::max(16, int(kBf16PanelValues / std::max(1, in))));
    thread_local std::vector<float> panel;  // [rows, in]
    panel.resize(size_t(rows) * size_t(in));
    for (int o0 = 0; o0 < out; o0 += rows) {
        const int n = std::min(rows, out - o0);
        const uint16_t* src = W + size_t(o0) * size_t(in);
        float* dst = panel.data();
        parallel_range(n, int64_t(n) * in, [&](int r0, int r1) {
            for (size_t i = size_t(r0) * size_t(in); i < size_t(r1) * size_t(in); ++i) dst[i] = bf16_to_f32(src[i]);
        });
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, n, in, 1.0f, x, in, dst, in, accumulate ? 1.0f : 0.0f,
                    y + o0, out);
    }
}

void linear_forward(float* y, const float* x, const Tensor& W, int T, bool accumulate) {
    if (W.is_bf16()) matmul_nt_bf16(y, x, W.bf16.data(), T, int(W.shape[0]), int(W.shape[1]), accumulate);
    else matmul_nt(y, x, W.ptr(), T, int(W.shape[0]), int(W.shape[1]), accumulate);
}

void rmsnorm_forward(float* out, const float* x, const float* w, int T, int n, float eps) {
    for (int t = 0; t < T; ++t) {
        const float* xt = x + int64_t(t) * n;
        float* ot = out + int64_t(t) * n;
        double ss = 0;
        for (int i = 0; i < n; ++i) ss += double(xt[i]) * xt[i];
        float r = float(1.0 / std::sqrt(ss / n + eps));
        for (int i = 0; i < n; ++i) ot[i] = xt[i] * r * w[i];
    }
}

void swiglu_forward(float* out, const float* g, const float* u, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = silu(g[i]) * u[i];
}

void softmax_inplace(float* x, int n) {
    float m = x[0];
    for (int i = 1; i < n; ++i) m = std::max(m, x[i]);
    double s = 0;
    for (int i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - m);
        s += x[i];
    }
    float inv = float(1.0 / s);
    for (int i = 0; i < n; ++i) x[i] *= inv;
}

void set_num_threads(int n) {
    if (n <= 0) n = int(std::max(1u, std::thread::hardware_concurrency()));
    BlasThreads& b = BlasThreads::get();
    {
        std::lock_guard<std::mutex> lk(b.m);
        if (b.holds > 0) b.wanted = n;  // a parallel_tasks region applies it when it ends
        else openblas_set_num_threads(n);
    }
    Pool::get().set_threads(n);
}

int num_threads() {
    BlasThreads& b = BlasThreads::get();
    std::lock_guard<std::mutex> lk(b.m);
    return b.holds > 0 ? b.wanted : openblas_get_num_threads();
}

}  // namespace moescope
