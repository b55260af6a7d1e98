// Backward of the dense MLP / experts and of the DeepSeekMoE mixture with its router.
#include <algorithm>
#include <cstring>

#include "engine/model/backward.h"
#include "engine/model/ops.h"

namespace moescope {

void mlp_backward(float* dx, MlpWeights& dw, const float* dout, const MlpWeights& w, const MlpActs& a,
                  bool accumulate_dx) {
    const int T = a.T, I = int(w.gate_proj.shape[0]);
    if (T == 0) return;
    std::vector<float> da(size_t(T) * I), dg(size_t(T) * I), du(size_t(T) * I);  // [T, I]
    linear_backward(da.data(), &dw.down_proj, dout, a.a.data(), w.down_proj, T);
    swiglu_backward(dg.data(), du.data(), da.data(), a.g.data(), a.u.data(), int64_t(T) * I);
    linear_backward(dx, &dw.gate_proj, dg.data(), a.x.data(), w.gate_proj, T, accumulate_dx);
    linear_backward(dx, &dw.up_proj, du.data(), a.x.data(), w.up_proj, T, true);
}

void router_backward(float* dlogits, const float* dweights, const float* dscores_extra, const float* s,
                     const int* ids, const RouterDims& rd) {
    const int E = rd.E, k = rd.k;
    const float rsf = rd.routed_scaling_factor;
    std::vector<float> ds(static_cast<size_t>(E), 0.0f);  // [E] d loss / d score
    if (dscores_extra) std::copy(dscores_extra, dscores_extra + E, ds.begin());
    if (rd.norm_topk_prob && k > 1) {
        // w_i = rsf * s_i / S,  S = sum of the chosen scores
        double S = 0, dot = 0;
        for (int i = 0; i < k; ++i) {
            S += s[ids[i]];
            dot += double(dweights[i]) * s[ids[i]];
        }
        S += 1e-20;
        for (int i = 0; i < k; ++i) ds[size_t(ids[i])] += float(rsf * (dweights[i] / S - dot / (S * S)));
    } else {
        for (int i = 0; i < k; ++i) ds[size_t(ids[i])] += rsf * dweights[i];
    }
    if (rd.sigmoid) {
        for (int e = 0; e < E; ++e) dlogits[e] = ds[size_t(e)] * s[e] * (1.0f - s[e]);
    } else {
        double dot = 0;
        for (int e = 0; e < E; ++e) dot += double(s[e]) * ds[size_t(e)];
        for (int e = 0; e < E; ++e) dlogits[e] = float(s[e] * (ds[size_t(e)] - dot));
    }
}

std::vector<int> busiest_first(const std::vector<std::vector<int>>& rows, bool shared) {
    std::vector<int> order;  // the shared expert (-1) sees every token: the longest task
    if (shared) order.push_back(-1);
    for (int e = 0; e < int(rows.size()); ++e) order.push_back(e);
    std::stable_sort(order.begin() + (shared ? 1 : 0), order.end(),
                     [&](int p, int q) { return rows[size_t(p)].size() > rows[size_t(q)].size(); });
    return order;
}

void moe_backward(float* dx, MoeWeights& dw, const float* dout, const MoeWeights& w, const MoeActs& a,
                  const RouterDims& rd, const ModelConfig& cfg, bool accumulate_dx, int expert_threads) {
    const int T = a.T, D = cfg.hidden_size, E = rd.E, k = rd.k;
    if (!accumulate_dx) std::fill(dx, dx + size_t(T) * D, 0.0f);
    const bool shared = !w.shared.gate_proj.empty();
    std::vector<float> dweights(size_t(T) * k, 0.0f);  // [T, k]
    // Per expert [n_e, D]: d loss / d its input rows. The calling thread's buffers, kept between
    // calls; the tasks reach them through this reference (a thread_local named inside a task
    // would be the worker's own).
    thread_local std::vector<std::vector<float>> dxin_kept;
    std::vector<std::vector<float>>& dxin = dxin_kept;
    dxin.resize(size_t(E));
    // Expert e writes only its own gradients, its dxin and the dweights of its own slots; the
    // shared expert (e = -1) adds into dx, which the routed experts' dxin rows follow.
    auto expert = [&](int e) {
        if (e < 0) {
            mlp_backward(dx, dw.shared, dout, w.shared, a.shared, true);
            return;
        }
        const auto& rows = a.rows[size_t(e)];
        if (rows.empty()) return;
        const int n = int(rows.size());
        const float* y = a.y[size_t(e)].data();  // [n, D]
        thread_local std::vector<float> dy;      // [n, D]
        dy.resize(size_t(n) * D);
        dxin[size_t(e)].resize(size_t(n) * D);
        for (int i = 0; i < n; ++i) {
            const int slot = rows[size_t(i)], t = slot / k;
            const float wt = a.r.weights[size_t(slot)];
            const float* g = dout + size_t(t) * D;
            const float* yi = y + size_t(i) * D;
            double dot = 0;
            for (int j = 0; j < D; ++j) {
                dy[size_t(i) * D + j] = wt * g[j];
                dot += double(g[j]) * yi[j];
            }
            dweights[size_t(slot)] = float(dot);
        }
        mlp_backward(dxin[size_t(e)].data(), dw.experts[size_t(e)], dy.data(), w.experts[size_t(e)],
                     a.experts[size_t(e)]);
    };
    const std::vector<int> order = busiest_first(a.rows, shared);
    parallel_tasks(int(order.size()), std::max(1, expert_threads), [&](int i) { expert(order[size_t(i)]); });
    // A token's rows are summed into dx in expert order, whatever ran them.
    for (int e = 0; e < E; ++e) {
        const auto& rows = a.rows[size_t(e)];
        for (size_t i = 0; i < rows.size(); ++i) {
            float* o = dx + size_t(rows[i] / k) * D;
            const float* gi = dxin[size_t(e)].data() + i * D;
            for (int j = 0; j < D; ++j) o[j] += gi[j];
        }
    }
    std::vector<float> dlogits(size_t(T) * E);  // [T, E]
    for (int t = 0; t < T; ++t)
        router_backward(dlogits.data() + size_t(t) * E, dweights.data() + size_t(t) * k,
                        a.dscores_extra.empty() ? nullptr : a.dscores_extra.data() + size_t(t) * E,
                        a.r.scores.data() + size_t(t) * E, a.r.ids.data() + size_t(t) * k, rd);
    linear_backward(dx, &dw.gate, dlogits.data(), a.x.data(), w.gate, T, true);
}

}  // namespace moescope
