// Router and expert mixture.
#include "engine/model/moe.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "engine/errors.h"
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

void route(Routing& r, const float* logits, int T, const float* bias, const RouterDims& d,
           const uint8_t* disabled, int drop_top) {
    const int E = d.E, k = d.k;
    const bool grouped = d.method != RouterDims::Method::Greedy;
    const int G = grouped ? d.n_group : 1, gs = E / G;
    constexpr float kOff = -std::numeric_limits<float>::infinity();
    r.T = T;
    r.k = k;
    r.E = E;
    r.n_group = G;
    r.ids.resize(size_t(T) * k);
    r.weights.resize(size_t(T) * k);
    r.scores.resize(size_t(T) * E);
    r.kept_groups.assign(size_t(T) * G, grouped ? 0 : 1);
    std::vector<float> choose(static_cast<size_t>(E)), masked, gscore(static_cast<size_t>(G));
    std::vector<int> top, gtop;
    // The top-k of `c` into `top`, keeping the topk_group best groups (kept[g] = 1) and masking
    // the experts of the others in `c` with -inf, as DeepSeek's code does.
    auto select = [&](std::vector<float>& c, uint8_t* kept) {
        if (grouped) {
            for (int g = 0; g < G; ++g) {
                const float* cg = c.data() + size_t(g) * gs;
                if (d.method == RouterDims::Method::NoAuxTc) {
                    float a = kOff, b = a;  // two largest
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
            std::fill(kept, kept + G, uint8_t(0));
            for (int g : gtop) kept[g] = 1;
            for (int g = 0; g < G; ++g)
                if (!kept[g]) std::fill(c.begin() + g * gs, c.begin() + (g + 1) * gs, kOff);
        }
        top_n(top, c.data(), E, k);
    };
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
        if (disabled)
            for (int e = 0; e < E; ++e)
                if (disabled[e]) choose[size_t(e)] = kOff;
        uint8_t* kept = r.kept_groups.data() + size_t(t) * G;
        if (drop_top > 0) {  // route once; the first drop_top picks are off for this token
            masked = choose;
            select(masked, kept);
            for (int i = 0; i < drop_top; ++i) choose[size_t(top[size_t(i)])] = kOff;
        }
        select(choose, kept);
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

void check_moe_layer(const ModelConfig& c, int layer) {
    if (!c.is_moe_stack_layer(layer))
        throw Error("layer " + std::to_string(layer) + " is not an MoE layer: it has no experts to disable");
}

std::vector<uint8_t> expert_mask(const std::vector<int>& experts, int E, int layer) {
    std::vector<uint8_t> mask(size_t(E), 0);
    for (int e : experts) {
        if (e < 0 || e >= E)
            throw Error("layer " + std::to_string(layer) + ": expert " + std::to_string(e) +
                        " does not exist (the model has " + std::to_string(E) + " routed experts, 0-" +
                        std::to_string(E - 1) + ")");
        mask[size_t(e)] = 1;
    }
    return mask;
}

void check_disabled_experts(const RouterDims& d, const std::vector<uint8_t>& disabled, int layer, int drop_top) {
    const std::string where = "layer " + std::to_string(layer) + ": ";
    if (disabled.size() != size_t(d.E))
        throw ShapeError(where + "an expert mask needs " + std::to_string(d.E) + " entries, got " +
                         std::to_string(disabled.size()));
    if (drop_top < 0 || drop_top > d.k)
        throw Error(where + "cannot drop " + std::to_string(drop_top) + " of each token's top experts: it takes " +
                    std::to_string(d.k) + ", so 0-" + std::to_string(d.k) + " can be dropped");
    const int r = drop_top;
    const std::string dropping = r > 0 ? " and each token's top " + std::to_string(r) + " dropped" : "";
    const int enabled = int(std::count(disabled.begin(), disabled.end(), uint8_t(0)));
    if (enabled - r < d.k)
        throw Error(where + "disabling " + std::to_string(d.E - enabled) + " of " + std::to_string(d.E) + " experts" +
                    dropping + " leaves " + std::to_string(std::max(0, enabled - r)) +
                    ", but every token takes " + std::to_string(d.k));
    if (d.method == RouterDims::Method::Greedy) return;
    // Groups scoring -inf (fewer enabled experts than the group score sums) lose to every other
    // group; among the rest the router may keep any topk_group, the poorest included. A token's
    // r dropped experts may sit anywhere: they can take groups below the scored count (cost
    // n - scored + 1 each) or thin the kept ones down to the scored count.
    const int G = d.n_group, gs = d.E / G, K = d.topk_group;
    const int scored = d.method == RouterDims::Method::NoAuxTc ? std::min(2, gs) : 1;
    std::vector<int> viable;
    for (int g = 0; g < G; ++g) {
        const int n = int(std::count(disabled.begin() + g * gs, disabled.begin() + (g + 1) * gs, uint8_t(0)));
        if (n >= scored) viable.push_back(n);
    }
    std::sort(viable.begin(), viable.end());
    int kill_cost = 0;  // to leave fewer than K viable groups: take the cheapest |viable| - K + 1
    for (size_t i = 0; i + size_t(K) <= viable.size(); ++i) kill_cost += viable[i] - scored + 1;
    int poorest = -1;
    if (viable.size() >= size_t(K) && kill_cost > r) {
        const int sum = std::accumulate(viable.begin(), viable.begin() + K, 0);
        poorest = std::max(sum - r, K * scored);
    }
    if (poorest < d.k)
        throw Error(where + "with these experts disabled" + dropping + ", " + std::to_string(K) + " of the " +
                    std::to_string(G) + " expert groups the router keeps can hold " +
                    (poorest < 0 ? std::string("disabled experts only") : "only " + std::to_string(poorest) +
                                                                              " enabled experts") +
                    ", but every token takes " + std::to_string(d.k) + " (each group needs " +
                    std::to_string(scored) + " enabled to be kept)");
}

std::map<int, std::vector<int>> parse_expert_spec(const std::string& spec, const ModelConfig& c) {
    const int E = c.n_routed_experts, layers = c.num_hidden_layers + c.num_nextn_predict_layers;
    auto number = [&](const std::string& s, const std::string& part) {
        if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos)
            throw Error("expert spec \"" + spec + "\": \"" + part + "\" is not LAYER:EXPERTS (e.g. 3:0,5-7)");
        return std::stoi(s);
    };
    std::map<int, std::vector<int>> out;
    size_t begin = 0;
    while (begin <= spec.size()) {
        const size_t end = std::min(spec.find(';', begin), spec.size());
        const std::string part = spec.substr(begin, end - begin);
        begin = end + 1;
        if (part.empty()) continue;
        const size_t colon = part.find(':');
        if (colon == std::string::npos)
            throw Error("expert spec \"" + spec + "\": \"" + part + "\" has no ':' (LAYER:EXPERTS, e.g. 3:0,5-7)");
        std::vector<int> ids;
        for (size_t b = colon + 1; b <= part.size();) {
            const size_t e = std::min(part.find(',', b), part.size());
            const std::string item = part.substr(b, e - b);
            b = e + 1;
            const size_t dash = item.find('-');
            const int lo = number(item.substr(0, dash), part);
            const int hi = dash == std::string::npos ? lo : number(item.substr(dash + 1), part);
            if (lo > hi) throw Error("expert spec \"" + spec + "\": the range " + item + " is empty");
            if (hi >= E)
                throw Error("expert spec \"" + spec + "\": expert " + std::to_string(hi) + " does not exist (the model has " +
                            std::to_string(E) + " routed experts, 0-" + std::to_string(E - 1) + ")");
            for (int x = lo; x <= hi; ++x) ids.push_back(x);
        }
        const std::string lname = part.substr(0, colon);
        std::vector<int> targets;
        if (lname == "*") {
            for (int l = 0; l < c.num_hidden_layers; ++l)
                if (c.is_moe_layer(l)) targets.push_back(l);
        } else {
            const int l = number(lname, part);
            if (!c.is_moe_stack_layer(l))
                throw Error("expert spec \"" + spec + "\": layer " + lname + " is not an MoE layer" +
                            (E > 0 ? " (MoE layers: " + std::to_string(c.first_k_dense_replace) + "-" +
                                         std::to_string(layers - 1) + ")"
                                   : " (the model has no routed experts)"));
            targets.push_back(l);
        }
        for (int l : targets) out[l].insert(out[l].end(), ids.begin(), ids.end());
    }
    for (auto& [l, ids] : out) {
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    }
    return out;
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
    // The shared expert and every chosen expert as tasks with their own input rows.
    struct Task {
        const MlpWeights* w;
        int e;  // -1: shared
        int n, I;
        std::vector<float> xin, gate, up, y;  // [n, D], [n, I], [n, I], [n, D]
    };
    std::vector<Task> tasks;
    if (!w.shared.gate_proj.empty()) tasks.push_back({&w.shared, -1, T, int(w.shared.gate_proj.shape[0]), {}, {}, {}, {}});
    for (int e = 0; e < E; ++e)
        if (!rows[size_t(e)].empty())
            tasks.push_back({&w.experts[size_t(e)], e, int(rows[size_t(e)].size()),
                             int(w.experts[size_t(e)].gate_proj.shape[0]), {}, {}, {}, {}});
    int64_t work = 0;
    for (auto& tk : tasks) {
        if (tk.e < 0) tk.xin.assign(x, x + size_t(T) * D);
        else {
            tk.xin.resize(size_t(tk.n) * D);
            const auto& rs = rows[size_t(tk.e)];
            for (int i = 0; i < tk.n; ++i)
                std::copy(x + size_t(rs[size_t(i)] / k) * D, x + size_t(rs[size_t(i)] / k + 1) * D,
                          tk.xin.begin() + size_t(i) * D);
        }
        tk.y.resize(size_t(tk.n) * D);
        work += int64_t(3) * tk.n * tk.I * D;
    }
    if (T <= kSmallT) {
        // Decoding: every expert is a few products too small to share out alone. Split the
        // output rows of all the gate/up products, then of all the down products, evenly over
        // the pool. The row kernel is what mlp_forward uses at this size, so results are the same.
        auto split = [&](bool gate_up, const auto& body) {
            int total = 0;
            for (auto& tk : tasks) total += gate_up ? 2 * tk.I : D;
            parallel_range(total, work, [&](int b, int e) {
                int base = 0;
                for (auto& tk : tasks) {
                    const int len = gate_up ? 2 * tk.I : D;
                    const int lo = std::max(b, base), hi = std::min(e, base + len);
                    if (lo < hi) body(tk, lo - base, hi - base);
                    base += len;
                }
            });
        };
        for (auto& tk : tasks) {
            tk.gate.resize(size_t(tk.n) * tk.I);
            tk.up.resize(size_t(tk.n) * tk.I);
        }
        // Rows [0, I) are the gate product's, [I, 2I) the up product's.
        split(true, [&](Task& tk, int o0, int o1) {
            if (o0 < tk.I)
                linear_rows_range(tk.gate.data(), tk.xin.data(), tk.w->gate_proj, tk.n, o0, std::min(o1, tk.I));
            if (o1 > tk.I)
                linear_rows_range(tk.up.data(), tk.xin.data(), tk.w->up_proj, tk.n, std::max(o0, tk.I) - tk.I, o1 - tk.I);
        });
        for (auto& tk : tasks) swiglu_forward(tk.gate.data(), tk.gate.data(), tk.up.data(), int64_t(tk.n) * tk.I);
        split(false, [&](Task& tk, int o0, int o1) {
            linear_rows_range(tk.y.data(), tk.gate.data(), tk.w->down_proj, tk.n, o0, o1);
        });
    } else {
        // Prefill: experts with many rows through sgemm (OpenBLAS's threads), big ones with
        // few rows on the pool; the few rows of a small one inline, staying off the pool while
        // OpenBLAS's threads still poll for work on the other cores after the products around it.
        for (auto& tk : tasks) {
            if (tk.n > kSmallT || int64_t(3) * tk.n * tk.I * D >= (int64_t(1) << 20)) {
                mlp_forward(tk.y.data(), tk.xin.data(), tk.n, *tk.w);
                continue;
            }
            tk.gate.resize(size_t(tk.n) * tk.I);
            tk.up.resize(size_t(tk.n) * tk.I);
            linear_rows_range(tk.gate.data(), tk.xin.data(), tk.w->gate_proj, tk.n, 0, tk.I);
            linear_rows_range(tk.up.data(), tk.xin.data(), tk.w->up_proj, tk.n, 0, tk.I);
            swiglu_forward(tk.gate.data(), tk.gate.data(), tk.up.data(), int64_t(tk.n) * tk.I);
            linear_rows_range(tk.y.data(), tk.gate.data(), tk.w->down_proj, tk.n, 0, D);
        }
    }
    // Combine in a fixed order: the shared expert, then the routed ones by expert id.
    size_t ti = 0;
    if (!w.shared.gate_proj.empty()) std::copy(tasks[0].y.begin(), tasks[0].y.end(), out), ti = 1;
    else std::fill(out, out + size_t(T) * D, 0.0f);
    for (; ti < tasks.size(); ++ti) {
        const Task& tk = tasks[ti];
        const auto& rs = rows[size_t(tk.e)];
        for (int i = 0; i < tk.n; ++i) {
            const int slot = rs[size_t(i)];
            const float wt = r.weights[size_t(slot)];
            float* o = out + size_t(slot / k) * D;
            const float* yi = tk.y.data() + size_t(i) * D;
            for (int j = 0; j < D; ++j) o[j] += wt * yi[j];
        }
    }
}

}  // namespace moescope
