// Router kernel: one thread per token, the CPU algorithm line by line (E is at most a few
// hundred, so a sequential scan per token is cheap and keeps the decisions identical).
#include <cfloat>
#include <cmath>

#include "kernels/device_util.cuh"
#include "kernels/router.h"

namespace moescope::cuda {
namespace {

__global__ void route_kernel(int* ids_out, float* w_out, float* scores, uint8_t* kept_out, const float* logits,
                             const float* bias, int T, RouterParams p) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int E = p.E, k = p.k;
    const bool grouped = p.method != 0;
    const int G = grouped ? p.n_group : 1, gs = E / G;
    float* s = scores + int64_t(t) * E;
    const float* lg = logits + int64_t(t) * E;
    if (p.sigmoid) {
        for (int e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + expf(-lg[e]));
    } else {  // softmax_inplace: f32 max and exp, f64 sum, multiply by the f32 inverse
        float m = lg[0];
        for (int e = 1; e < E; ++e) m = fmaxf(m, lg[e]);
        double sum = 0;
        for (int e = 0; e < E; ++e) {
            s[e] = expf(lg[e] - m);
            sum += s[e];
        }
        const float inv = float(1.0 / sum);
        for (int e = 0; e < E; ++e) s[e] *= inv;
    }
    const bool add_bias = p.use_bias && bias != nullptr;
    auto choose = [&](int e) { return s[e] + (add_bias ? bias[e] : 0.0f); };
    uint8_t kept[kRouterMaxGroups];
    for (int g = 0; g < G; ++g) kept[g] = grouped ? 0 : 1;
    if (grouped) {
        float gscore[kRouterMaxGroups];
        for (int g = 0; g < G; ++g) {
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
                gscore[g] = a + b;
            } else {
                float a = choose(g * gs);
                for (int i = 1; i < gs; ++i) a = fmaxf(a, choose(g * gs + i));  // max_element
                gscore[g] = a;
            }
        }
        for (int n = 0; n < p.topk_group; ++n) {  // top groups, ties to the lower index
            int best = -1;
            for (int g = 0; g < G; ++g)
                if (!kept[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            kept[best] = 1;
        }
    }
    int* ids = ids_out + int64_t(t) * k;
    float* w = w_out + int64_t(t) * k;
    for (int n = 0; n < k; ++n) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int i = 0; i < n; ++i) taken |= ids[i] == e;
            if (taken) continue;
            const float v = kept[e / gs] ? choose(e) : -INFINITY;
            if (best < 0 || v > bv) {
                best = e;
                bv = v;
            }
        }
        ids[n] = best;
    }
    float sum = 0.0f;
    for (int i = 0; i < k; ++i) {
        w[i] = s[ids[i]];
        sum += w[i];
    }
    if (p.norm_topk_prob && k > 1)
        for (int i = 0; i < k; ++i) w[i] /= (sum + 1e-20f);
    for (int i = 0; i < k; ++i) w[i] *= p.routed_scaling_factor;
    for (int g = 0; g < G; ++g) kept_out[int64_t(t) * G + g] = kept[g];
}

}  // namespace

void route(int* ids, float* weights, float* scores, uint8_t* kept, const float* logits, const float* bias, int T,
           const RouterParams& p, cudaStream_t s) {
    if (T <= 0) return;
    if (p.k > kRouterMaxK || (p.method != 0 && p.n_group > kRouterMaxGroups))
        throw DeviceError("route: at most " + std::to_string(kRouterMaxK) + " experts per token and " +
                          std::to_string(kRouterMaxGroups) + " groups are supported on the device");
    route_kernel<<<blocks_for(T, 64), 64, 0, s>>>(ids, weights, scores, kept, logits, bias, T, p);
    check_launch("route_kernel");
}

}  // namespace moescope::cuda
