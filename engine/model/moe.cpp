// Router and expert mixture.
#include "engine/model/moe.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "engine/model/ops.h"

namespace moescope {

RouterDims::RouterDims(const ModelConfig& c)
    : E(c.n_routed_experts), k(c.num_experts_per_tok), n_group(c.n_group), topk_group(c.topk_group),
      sigmoid(c.scoring_func == "sigmoid"), use_bias(c.has_bias()), norm_topk_prob(c.norm_topk_prob),
      method(c.topk_method == "noaux_tc"               ? Method::NoAuxTc
             : c.topk_method == "group_limited_greedy" ? Method::GroupLimited
                                                       : Method::Greedy),
      routed_scaling_factor(float(c.routed_scaling_factor)) {}

namespace {

// Indices of the n largest values, larger first; ties toward the lower index.
void top_n(std::vector<int>& idx, const float* v, int size, int n) {
    idx.resize(size_t(size));
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int a, int b) {
        return v[a] > v[b] || (v[a] == v[b] && a < b);
    });
    idx.resize(size_t(n));
}

}  // namespace

void route(Routing& r, const float* logits, int T, const float* bias, const RouterDims& d) {
    const int E = d.E, k = d.k;
    const bool grouped = d.method != RouterDims::Method::Greedy;
    const int G = grouped ? d.n_group : 1, gs = E / G;
    r.T = T;
    r.k = k;
    r.E = E;
    r.n_group = G;
    r.ids.resize(size_t(T) * k);
    r.weights.resize(size_t(T) * k);
    r.scores.resize(size_t(T) * E);
    r.kept_groups.assign(size_t(T) * G, grouped ? 0 : 1);
    std::vector<float> choose(static_cast<size_t>(E)), gscore(static_cast<size_t>(G));
    std::vector<int> top, gtop;
    for (int t = 0; t < T; ++t) {
        float* s = r.scores.data() + size_t(t) * E;
        const float* lg = logits + size_t(t) * E;
        if (d.sigmoid) {
            for (int e = 0; e < E; ++e) s[e] = sigmoid(lg[e]);
        } else {
            std::copy(lg, lg + E, s);
            softmax_inplace(s, E);
        }
        for (int e = 0; e < E; ++e) choose[size_t(e)] = s[e] + (d.use_bias && bias ? bias[e] : 0.0f);
        uint8_t* kept = r.kept_groups.data() + size_t(t) * G;
        if (grouped) {
            for (int g = 0; g < G; ++g) {
                const float* cg = choose.data() + size_t(g) * gs;
                if (d.method == RouterDims::Method::NoAuxTc) {
                    float a = -std::numeric_limits<float>::infinity(), b = a;  // two largest
                    for (int i = 0; i < gs; ++i) {
                        if (cg[i] > a) { b = a; a = cg[i]; }
                        else if (cg[i] > b) b = cg[i];
                    }
                    gscore[size_t(g)] = a + b;
                } else {
                    gscore[size_t(g)] = *std::max_element(cg, cg + gs);
                }
            }
            top_n(gtop, gscore.data(), G, d.topk_group);
            for (int g : gtop) kept[g] = 1;
            // Experts of dropped groups can never be chosen (-inf, as DeepSeek's code masks them).
            for (int g = 0; g < G; ++g)
                if (!kept[g])
                    std::fill(choose.begin() + g * gs, choose.begin() + (g + 1) * gs,
                              -std::numeric_limits<float>::infinity());
        }
        top_n(top, choose.data(), E, k);
        int* ids = r.ids.data() + size_t(t) * k;
        float* w = r.weights.data() + size_t(t) * k;
        float sum = 0;
        for (int i = 0; i < k; ++i) {
            ids[i] = top[size_t(i)];
            w[i] = s[top[size_t(i)]];
            sum += w[i];
        }
        if (d.norm_topk_prob && k > 1) {
            for (int i = 0; i < k; ++i) w[i] /= (sum + 1e-20f);
        }
        for (int i = 0; i < k; ++i) w[i] *= d.routed_scaling_factor;
    }
}

void mlp_forward(float* out, const float* x, int T, const MlpWeights& w, bool accumulate) {
    const int I = int(w.gate_proj.shape[0]);
    std::vector<float> g(size_t(T) * I), u(size_t(T) * I);
    linear_forward(g.data(), x, w.gate_proj, T);
    linear_forward(u.data(), x, w.up_proj, T);
    swiglu_forward(g.data(), g.data(), u.data(), int64_t(T) * I);
    linear_forward(out, g.data(), w.down_proj, T, accumulate);
}

void moe_experts_forward(float* out, const float* x, int T, const MoeWeights& w, const Routing& r,
                         const ModelConfig& cfg) {
    const int D = cfg.hidden_size, E = cfg.n_routed_experts, k = r.k;
    // Group the (token, slot) pairs by expert so each expert runs one matrix product.
    std::vector<std::vector<int>> rows(static_cast<size_t>(E));
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < k; ++i) rows[size_t(r.ids[size_t(t) * k + i])].push_back(t * k + i);
    if (!w.shared.gate_proj.empty()) mlp_forward(out, x, T, w.shared);
    else std::fill(out, out + size_t(T) * D, 0.0f);
    std::vector<float> xin, y;
    for (int e = 0; e < E; ++e) {
        const auto& rs = rows[size_t(e)];
        if (rs.empty()) continue;
        const int n = int(rs.size());
        xin.resize(size_t(n) * D);
        y.resize(size_t(n) * D);
        for (int i = 0; i < n; ++i) std::copy(x + size_t(rs[size_t(i)] / k) * D, x + size_t(rs[size_t(i)] / k + 1) * D,
                                              xin.begin() + size_t(i) * D);
        mlp_forward(y.data(), xin.data(), n, w.experts[size_t(e)]);
        for (int i = 0; i < n; ++i) {
            const int slot = rs[size_t(i)];
            const float wt = r.weights[size_t(slot)];
            float* o = out + size_t(slot / k) * D;
            const float* yi = y.data() + size_t(i) * D;
            for (int j = 0; j < D; ++j) o[j] += wt * yi[j];
        }
    }
}

}  // namespace moescope
