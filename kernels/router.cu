// Router kernel: one warp per token. Lane l owns experts e = l, l + 32, ...; each selection
// round (top groups, then top experts) every lane proposes its best candidate and a warp
// argmax picks the winner, ties to the lower index. The sums (softmax denominator, group
// scores, weights) run in the CPU's sequential order, so every value and decision is the one
// route() of engine/model/moe.cpp makes. (One thread per token, the first version, scanned
// E experts k times with a k-long "already taken" check of global memory each: ~10^4 serial
// L2 reads per token and MoE layer, milliseconds per decoded token.)
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>

#include "kernels/device_util.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/router.h"

namespace moescope::cuda {
namespace {

constexpr int kRouterThreads = 128;  // 4 tokens per block

// (va, ia) ranks before (vb, ib): larger value first, ties to the lower index (top_n's order).
__device__ __forceinline__ bool ranks_before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// Warp argmax of (v, i) under ranks_before; every lane gets lane 0's result (so the warp
// agrees even if a NaN made the order partial).
__device__ __forceinline__ void warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ranks_before(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
    v = __shfl_sync(0xffffffffu, v, 0);
    i = __shfl_sync(0xffffffffu, i, 0);
}

// Token t routed by the calling warp (all 32 lanes).
__device__ void route_token(int64_t t, int* ids_out, float* w_out, float* scores, uint8_t* kept_out,
                            const float* logits, const float* bias, const uint8_t* disabled, const uint8_t* drop_top,
                            const RouterParams& p) {
    const int lane = threadIdx.x & 31;
    const int E = p.E, k = p.k;
    const bool grouped = p.method != 0;
    const int G = grouped ? p.n_group : 1, gs = E / G;
    float* s = scores + t * E;
    const float* lg = logits + t * E;
    if (p.sigmoid) {
        for (int e = lane; e < E; e += 32) s[e] = 1.0f / (1.0f + expf(-lg[e]));
    } else {  // softmax_inplace: f32 max and exp, f64 sum in index order, multiply by the f32 inverse
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32) m = fmaxf(m, lg[e]);
        m = warp_max(m);
        for (int e = lane; e < E; e += 32) s[e] = expf(lg[e] - m);
        __syncwarp();
        float inv = 0.0f;
        if (lane == 0) {
            double sum = 0;
            for (int e = 0; e < E; ++e) sum += s[e];
            inv = float(1.0 / sum);
        }
        inv = __shfl_sync(0xffffffffu, inv, 0);
        for (int e = lane; e < E; e += 32) s[e] *= inv;
    }
    __syncwarp();  // from here lanes read scores other lanes wrote
    const bool add_bias = p.use_bias && bias != nullptr;
    int dropped[kRouterMaxK];  // this token's experts switched off for it (drop_top)
    int n_dropped = 0;
    auto choose = [&](int e) {
        if (disabled && disabled[e]) return -INFINITY;
        for (int j = 0; j < n_dropped; ++j)
            if (dropped[j] == e) return -INFINITY;
        return s[e] + (add_bias ? bias[e] : 0.0f);
    };
    // The topk_group best groups (bit g of the result: group g kept; G <= 64), then the n best
    // experts of the kept groups into picks[0..n) (warp-uniform).
    auto select = [&](int n, int* picks) {
        uint64_t kept = grouped ? 0 : 1;
        if (grouped) {
            float gscore[2];  // groups lane and lane + 32, each scored sequentially like the CPU
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int g = lane + 32 * j;
                float score = -INFINITY;
                if (g < G) {
                    if (p.method == 2) {
                        float a = -INFINITY, b = a;  // two largest
                        for (int i = 0; i < gs; ++i) {
                            const float v = choose(g * gs + i);
                            if (v > a) {
                                b = a;
                                a = v;
                            } else if (v > b) {
                                b = v;
                            }
                        }
                        score = a + b;
                    } else {
                        float a = choose(g * gs);
                        for (int i = 1; i < gs; ++i) a = fmaxf(a, choose(g * gs + i));  // max_element
                        score = a;
                    }
                }
                gscore[j] = score;
            }
            for (int r = 0; r < p.topk_group; ++r) {  // top groups, ties to the lower index
                float bv = -INFINITY;
                int bi = INT_MAX;  // no candidate
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int g = lane + 32 * j;
                    if (g < G && !((kept >> g) & 1) && ranks_before(gscore[j], g, bv, bi)) {
                        bv = gscore[j];
                        bi = g;
                    }
                }
                warp_best(bv, bi);
                if (bi < G) kept |= uint64_t(1) << bi;  // always, as topk_group <= n_group
            }
        }
        // Round r takes the best expert ranking after round r-1's pick, i.e. the r-th of top_n's
        // order; experts of dropped groups score -inf (never chosen: k <= kept experts).
        float pv = INFINITY;
        int pi = -1;
        for (int r = 0; r < n; ++r) {
            float bv = -INFINITY;
            int bi = INT_MAX;
            for (int e = lane; e < E; e += 32) {
                const float v = ((kept >> (e / gs)) & 1) ? choose(e) : -INFINITY;
                if (ranks_before(pv, pi, v, e) && ranks_before(v, e, bv, bi)) {
                    bv = v;
                    bi = e;
                }
            }
            warp_best(bv, bi);
            picks[r] = bi;
            pv = bv;
            pi = bi;
        }
        return kept;
    };
    const int drop = drop_top ? min(int(*drop_top), k) : 0;
    if (drop > 0) {  // route once; the first `drop` picks are off for this token
        select(drop, dropped);
        n_dropped = drop;
    }
    int picks[kRouterMaxK];
    const uint64_t kept = select(k, picks);
    if (lane == 0) {  // the CPU's arithmetic, in its order
        int* ids = ids_out + t * k;
        float* w = w_out + t * k;
        float sum = 0.0f;
        for (int i = 0; i < k; ++i) {
            ids[i] = picks[i];
            w[i] = s[picks[i]];
            sum += w[i];
        }
        if (p.norm_topk_prob && k > 1)
            for (int i = 0; i < k; ++i) w[i] /= (sum + 1e-20f);
        for (int i = 0; i < k; ++i) w[i] *= p.routed_scaling_factor;
    }
    for (int g = lane; g < G; g += 32) kept_out[t * G + g] = uint8_t((kept >> g) & 1);
}

__global__ void route_kernel(int* ids_out, float* w_out, float* scores, uint8_t* kept_out, const float* logits,
                             const float* bias, const uint8_t* disabled, const uint8_t* drop_top, int T,
                             RouterParams p) {
    pdl_wait();
    const int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    if (t < T)  // whole warps: every shuffle has all 32 lanes
        route_token(t, ids_out, w_out, scores, kept_out, logits, bias, disabled, drop_top, p);
}

// One block: warp t routes token t, then the block dispatches the T * k slots (dispatch.cuh).
__global__ void route_dispatch_kernel(int* ids_out, float* w_out, float* scores, uint8_t* kept_out,
                                      const float* logits, const float* bias, const uint8_t* disabled,
                                      const uint8_t* drop_top, int T, RouterParams p, DispatchOut d) {
    pdl_wait();
    const int t = threadIdx.x >> 5;
    if (t < T) route_token(t, ids_out, w_out, scores, kept_out, logits, bias, disabled, drop_top, p);
    __syncthreads();  // the ids are written (global memory: visible to the block after the barrier)
    dispatch_block(d, ids_out, T * p.k, p.E);
}

void check_params(const RouterParams& p) {
    if (p.k > kRouterMaxK || (p.method != 0 && p.n_group > kRouterMaxGroups))
        throw DeviceError("route: at most " + std::to_string(kRouterMaxK) + " experts per token and " +
                          std::to_string(kRouterMaxGroups) + " groups are supported on the device");
}

}  // namespace

void route(int* ids, float* weights, float* scores, uint8_t* kept, const float* logits, const float* bias,
           const uint8_t* disabled, const uint8_t* drop_top, int T, const RouterParams& p, cudaStream_t s) {
    if (T <= 0) return;
    check_params(p);
    route_kernel<<<blocks_for(int64_t(T) * 32, kRouterThreads), kRouterThreads, 0, s>>>(ids, weights, scores, kept,
                                                                                       logits, bias, disabled, drop_top, T, p);
    check_launch("route_kernel");
}

bool route_dispatch_fits(int T, const RouterParams& p) { return T > 0 && T <= 32 && p.E <= 1024; }

void route_and_dispatch(int* ids, float* weights, float* scores, uint8_t* kept, const float* logits, const float* bias,
                        const uint8_t* disabled, const uint8_t* drop_top, int T, const RouterParams& p,
                        const DispatchOut& d, cudaStream_t s) {
    if (T <= 0) return;
    check_params(p);
    if (!route_dispatch_fits(T, p))
        throw DeviceError("route_and_dispatch: " + std::to_string(T) + " tokens over " + std::to_string(p.E) +
                          " experts do not fit one block (at most 32 tokens and 1024 experts)");
    const int threads = std::max(32 * T, (p.E + 31) / 32 * 32);
    route_dispatch_kernel<<<1, threads, 0, s>>>(ids, weights, scores, kept, logits, bias, disabled, drop_top, T, p, d);
    check_launch("route_dispatch_kernel");
}

}  // namespace moescope::cuda
