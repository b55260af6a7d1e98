// Sampling kernel: one block of 1024 threads per row.
#include <cfloat>
#include <cmath>

#include "kernels/device_util.cuh"
#include "kernels/sampling.h"

namespace moescope::cuda {
namespace {

constexpr int kThreads = 1024;

// Order-preserving key of a logit; -0 takes +0's key, so a tie between them (equal
// probabilities on the host) stays a tie at a threshold.
__device__ __forceinline__ uint32_t key_of(float v) {
    if (v == 0.0f) return 0x80000000u;
    const uint32_t b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ int block_count_ge(const float* lg, int V, uint32_t K) {
    int n = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) n += key_of(lg[i]) >= K;
    return int(block_sum(float(n)) + 0.5f);
}

__device__ float block_mass_ge(const float* lg, int V, uint32_t K, uint32_t Kk, float m, float inv_temp) {
    float a = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const uint32_t k = key_of(lg[i]);
        if (k >= K && k >= Kk) a += expf((lg[i] - m) * inv_temp);
    }
    return block_sum(a);
}

__global__ void sample_kernel(int* ids, const float* logits, const float* u, int V, SampleParams p) {
    pdl_wait();
    __shared__ float seg_mass[kThreads];
    __shared__ float best_v[kThreads];
    __shared__ int best_i[kThreads];
    const float* lg = logits + int64_t(blockIdx.x) * V;
    if (p.temperature <= 0.0f) {
        // (-inf, V) is "no candidate": any real logit, -inf included, beats it (lower index).
        // A NaN never does (std::max_element's order, the host's greedy): taken as a thread's
        // first candidate it would stay, every comparison with it being false, and in the
        // reduction swallow each candidate that meets it (a NaN at id 1 of 2048 chose 360, the
        // host 549). Only a NaN at id 0 wins, as max_element starts there: see the end.
        float bv = -INFINITY;
        int bi = V;
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            if (lg[i] > bv || (bi == V && lg[i] == -INFINITY)) {  // ascending i: strict > keeps the lower id on ties
                bv = lg[i];
                bi = i;
            }
        best_v[threadIdx.x] = bv;
        best_i[threadIdx.x] = bi;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
            if (threadIdx.x < stride) {
                const float ov = best_v[threadIdx.x + stride];
                const int oi = best_i[threadIdx.x + stride];
                if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                    best_v[threadIdx.x] = ov;
                    best_i[threadIdx.x] = oi;
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) ids[blockIdx.x] = best_i[0] < V && !isnan(lg[0]) ? best_i[0] : 0;
        return;
    }
    float m = -FLT_MAX;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, lg[i]);
    m = block_max(m);
    const float inv_temp = 1.0f / p.temperature;
    // top-k: the largest key K with count(key >= K) >= top_k.
    uint32_t Kk = 0;
    if (p.top_k > 0 && p.top_k < V) {
        uint64_t lo = 0, hi = 0xffffffffull;
        while (lo < hi) {
            const uint64_t mid = lo + (hi - lo + 1) / 2;
            if (block_count_ge(lg, V, uint32_t(mid)) >= p.top_k) lo = mid;
            else hi = mid - 1;
        }
        Kk = uint32_t(lo);
    }
    // top-p: the largest key K >= Kk whose kept mass reaches top_p of the top-k mass. The mass
    // must also be positive (the largest logit, exp(0) = 1, is always kept): top_p <= 0 keeps
    // the top ties, as the host does, instead of nothing (which drew token 0).
    uint32_t K = Kk;
    if (p.top_p < 1.0f) {
        const float target = p.top_p * block_mass_ge(lg, V, Kk, Kk, m, inv_temp);
        uint64_t lo = Kk, hi = 0xffffffffull;
        while (lo < hi) {
            const uint64_t mid = lo + (hi - lo + 1) / 2;
            const float mass = block_mass_ge(lg, V, uint32_t(mid), Kk, m, inv_temp);
            if (mass >= target && mass > 0.0f) lo = mid;
            else hi = mid - 1;
        }
        K = uint32_t(lo);
    }
    // The draw, in token-id order over contiguous segments.
    const int seg = (V + blockDim.x - 1) / blockDim.x;
    const int b = threadIdx.x * seg, e = min(V, b + seg);
    float a = 0.0f;
    for (int i = b; i < e; ++i)
        if (key_of(lg[i]) >= K) a += expf((lg[i] - m) * inv_temp);
    seg_mass[threadIdx.x] = a;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int i = 0; i < int(blockDim.x); ++i) total += seg_mass[i];
        const float target = u[blockIdx.x] * total;
        float acc = 0.0f;
        int pick = -1, last = -1;
        for (int sgi = 0; sgi < int(blockDim.x) && pick < 0; ++sgi) {
            if (acc + seg_mass[sgi] <= target && sgi + 1 < int(blockDim.x)) {
                acc += seg_mass[sgi];
                continue;
            }
            const int sb = sgi * seg, se = min(V, sb + seg);
            for (int i = sb; i < se; ++i) {
                if (key_of(lg[i]) < K) continue;
                last = i;
                acc += expf((lg[i] - m) * inv_temp);
                if (acc > target) {
                    pick = i;
                    break;
                }
            }
        }
        if (pick < 0) {  // rounding past the end: the last kept token
            for (int i = V - 1; i >= 0 && last < 0; --i)
                if (key_of(lg[i]) >= K) last = i;
            pick = last < 0 ? 0 : last;
        }
        ids[blockIdx.x] = pick;
    }
}

// lp[r] = logits[r, ids[r]] - logsumexp(logits[r, :]): the chosen token's log-probability
// under the unfiltered softmax (the surprisal telemetry reports).
__global__ void logprob_kernel(float* lp, const float* logits, const int* ids, int V) {
    pdl_wait();
    const float* lg = logits + int64_t(blockIdx.x) * V;
    float m = -FLT_MAX;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, lg[i]);
    m = block_max(m);
    float a = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) a += expf(lg[i] - m);
    a = block_sum(a);
    if (threadIdx.x == 0) lp[blockIdx.x] = lg[ids[blockIdx.x]] - m - logf(a);
}

}  // namespace

void token_logprob(float* lp, const float* logits, const int* ids, int R, int V, cudaStream_t s) {
    if (R <= 0) return;
    logprob_kernel<<<unsigned(R), 256, 0, s>>>(lp, logits, ids, V);
    check_launch("logprob_kernel");
}

void sample(int* ids, const float* logits, const float* u, int R, int V, const SampleParams& p, cudaStream_t s) {
    if (R <= 0) return;
    sample_kernel<<<unsigned(R), kThreads, 0, s>>>(ids, logits, u, V, p);
    check_launch("sample_kernel");
}

}  // namespace moescope::cuda
