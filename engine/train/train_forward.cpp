// Training forward/backward of the DeepSeek-V3 model (see train_forward.h).
#include "engine/train/train_forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "engine/errors.h"
#include "engine/model/ops.h"

namespace moescope {

const char* balance_mode_name(BalanceMode m) {
    switch (m) {
        case BalanceMode::AuxFree: return "aux-free";
        case BalanceMode::AuxLoss: return "aux-loss";
        case BalanceMode::SeqAux: return "seq-aux";
        case BalanceMode::None: return "none";
    }
    return "?";
}

BalanceMode parse_balance_mode(const std::string& s) {
    if (s == "aux-free") return BalanceMode::AuxFree;
    if (s == "aux-loss") return BalanceMode::AuxLoss;
    if (s == "seq-aux") return BalanceMode::SeqAux;
    if (s == "none") return BalanceMode::None;
    throw ConfigError("balance mode: expected aux-free, aux-loss, seq-aux or none; got '" + s + "'");
}

void mlp_forward_train(float* out, const float* x, int T, const MlpWeights& w, MlpActs& a) {
    const int I = int(w.gate_proj.shape[0]), D = int(w.gate_proj.shape[1]);
    a.T = T;
    a.x.assign(x, x + size_t(T) * D);
    a.g.resize(size_t(T) * I);
    a.u.resize(size_t(T) * I);
    a.a.resize(size_t(T) * I);
    linear_forward(a.g.data(), x, w.gate_proj, T);
    linear_forward(a.u.data(), x, w.up_proj, T);
    swiglu_forward(a.a.data(), a.g.data(), a.u.data(), int64_t(T) * I);
    linear_forward(out, a.a.data(), w.down_proj, T);
}

void mla_forward_train(float* out, const float* x, int B, int T, const AttentionWeights& w, const MlaDims& d,
                       const Rope& rope, MlaActs& a) {
    const int N = B * T, H = d.H, dq = d.d_nope + d.d_rope, dkvb = d.d_nope + d.d_v, dkv = d.d_c + d.d_rope;
    a.B = B;
    a.T = T;
    a.x.assign(x, x + size_t(N) * d.D);
    a.q.resize(size_t(N) * H * dq);
    if (d.q_lora > 0) {
        a.qa.resize(size_t(N) * d.q_lora);
        a.qa_n.resize(size_t(N) * d.q_lora);
        linear_forward(a.qa.data(), x, w.q_a_proj, N);
        rmsnorm_forward(a.qa_n.data(), a.qa.data(), w.q_a_layernorm.ptr(), N, d.q_lora, 1e-6f);
        linear_forward(a.q.data(), a.qa_n.data(), w.q_b_proj, N);
    } else {
        linear_forward(a.q.data(), x, w.q_proj, N);
    }
    a.kva.resize(size_t(N) * dkv);
    a.c.resize(size_t(N) * d.d_c);
    a.kpe.resize(size_t(N) * d.d_rope);
    linear_forward(a.kva.data(), x, w.kv_a_proj_with_mqa, N);
    for (int n = 0; n < N; ++n) {
        const int pos = n % T;
        rope.apply(a.q.data() + size_t(n) * H * dq + d.d_nope, H, dq, pos);
        const float* row = a.kva.data() + size_t(n) * dkv;
        rmsnorm_forward(a.c.data() + size_t(n) * d.d_c, row, w.kv_a_layernorm.ptr(), 1, d.d_c, 1e-6f);
        float* kp = a.kpe.data() + size_t(n) * d.d_rope;
        std::memcpy(kp, row + d.d_c, sizeof(float) * size_t(d.d_rope));
        rope.apply(kp, 1, d.d_rope, pos);
    }
    a.kv.resize(size_t(N) * H * dkvb);
    linear_forward(a.kv.data(), a.c.data(), w.kv_b_proj, N);
    a.p.assign(size_t(B) * H * T * T, 0.0f);
    a.o.resize(size_t(N) * H * d.d_v);
    parallel_for(B * H, int64_t(B) * H * T * T * dq > (1 << 17) ? num_threads() : 1, [&](int bh) {  // each (sequence, head) writes its own P and o
        const int b = bh / H, h = bh % H;
        {
            float* P = a.p.data() + (size_t(b) * H + h) * T * T;  // [T, T]
            for (int i = 0; i < T; ++i) {
                const size_t ni = size_t(b) * T + i;
                const float* qh = a.q.data() + (ni * H + h) * dq;
                float* pi = P + size_t(i) * T;
                for (int j = 0; j <= i; ++j) {
                    const size_t nj = size_t(b) * T + j;
                    const float* kh = a.kv.data() + (nj * H + h) * dkvb;
                    const float* kp = a.kpe.data() + nj * d.d_rope;
                    float s = 0;
                    for (int c = 0; c < d.d_nope; ++c) s += qh[c] * kh[c];
                    for (int c = 0; c < d.d_rope; ++c) s += qh[d.d_nope + c] * kp[c];
                    pi[j] = s * d.scale;
                }
                softmax_inplace(pi, i + 1);
                float* oh = a.o.data() + (ni * H + h) * d.d_v;
                std::fill(oh, oh + d.d_v, 0.0f);
                for (int j = 0; j <= i; ++j) {
                    const float* vh = a.kv.data() + ((size_t(b) * T + j) * H + h) * dkvb + d.d_nope;
                    for (int c = 0; c < d.d_v; ++c) oh[c] += pi[j] * vh[c];
                }
            }
        }
    });
    linear_forward(out, a.o.data(), w.o_proj, N);
}

void moe_forward_train(float* out, const float* x, int T, const MoeWeights& w, const float* bias,
                       const RouterDims& rd, const ModelConfig& cfg, MoeActs& a, int expert_threads) {
    const int D = cfg.hidden_size, E = rd.E, k = rd.k;
    a.T = T;
    a.x.assign(x, x + size_t(T) * D);
    std::vector<float> logits(size_t(T) * E);  // [T, E]
    linear_forward(logits.data(), x, w.gate, T);
    route(a.r, logits.data(), T, bias, rd);
    a.rows.assign(size_t(E), {});
    for (int s = 0; s < T * k; ++s) a.rows[size_t(a.r.ids[size_t(s)])].push_back(s);
    const bool shared = !w.shared.gate_proj.empty();
    if (!shared) std::fill(out, out + size_t(T) * D, 0.0f);
    a.experts.resize(size_t(E));
    a.y.resize(size_t(E));
    // Expert e writes only its own activations a.experts[e] and outputs a.y[e]; the shared
    // expert (e = -1) writes out, which the routed experts' rows are added to afterwards.
    auto expert = [&](int e) {
        if (e < 0) {
            mlp_forward_train(out, x, T, w.shared, a.shared);
            return;
        }
        const auto& rows = a.rows[size_t(e)];
        const int n = int(rows.size());
        a.y[size_t(e)].resize(size_t(n) * D);
        a.experts[size_t(e)].T = 0;
        if (n == 0) return;
        thread_local std::vector<float> xin;  // [n, D] the expert's rows of x
        xin.resize(size_t(n) * D);
        for (int i = 0; i < n; ++i)
            std::copy(x + size_t(rows[size_t(i)] / k) * D, x + size_t(rows[size_t(i)] / k + 1) * D,
                      xin.begin() + size_t(i) * D);
        mlp_forward_train(a.y[size_t(e)].data(), xin.data(), n, w.experts[size_t(e)], a.experts[size_t(e)]);
    };
    const std::vector<int> order = busiest_first(a.rows, shared);
    parallel_tasks(int(order.size()), std::max(1, expert_threads), [&](int i) { expert(order[size_t(i)]); });
    // A token's outputs are summed in expert order, whatever ran the experts.
    for (int e = 0; e < E; ++e) {
        const auto& rows = a.rows[size_t(e)];
        for (size_t i = 0; i < rows.size(); ++i) {
            const int slot = rows[i];
            const float wt = a.r.weights[size_t(slot)];
            float* o = out + size_t(slot / k) * D;
            const float* yi = a.y[size_t(e)].data() + i * D;
            for (int j = 0; j < D; ++j) o[j] += wt * yi[j];
        }
    }
    a.dscores_extra.clear();
}

double balance_loss(float* dscores, const Routing& r, int t0, int t1, double alpha, bool sigmoid_scores,
                    float grad_scale) {
    const int E = r.E, k = r.k, n = t1 - t0;
    if (n <= 0) return 0;
    std::vector<double> f(static_cast<size_t>(E), 0.0), P(static_cast<size_t>(E), 0.0);
    for (int t = t0; t < t1; ++t)
        for (int i = 0; i < k; ++i) f[size_t(r.ids[size_t(t) * k + i])] += 1.0 / (double(k) * n);
    std::vector<double> sum(static_cast<size_t>(n), 1.0);  // per token: normalizer of the scores
    for (int t = t0; t < t1; ++t) {
        const float* s = r.scores.data() + size_t(t) * E;
        double z = 1.0;
        if (sigmoid_scores) {
            z = 0;
            for (int e = 0; e < E; ++e) z += s[e];
        }
        sum[size_t(t - t0)] = z;
        for (int e = 0; e < E; ++e) P[size_t(e)] += s[e] / z / n;
    }
    double loss = 0;
    for (int e = 0; e < E; ++e) loss += alpha * E * f[size_t(e)] * P[size_t(e)];
    if (!dscores) return loss;
    // dL/ds'_e = alpha E f_e / n for every token; s' = s / z for sigmoid scores.
    for (int t = t0; t < t1; ++t) {
        const float* s = r.scores.data() + size_t(t) * E;
        float* ds = dscores + size_t(t) * E;
        const double z = sum[size_t(t - t0)];
        double dot = 0;  // sum_e g_e s'_e
        if (sigmoid_scores)
            for (int e = 0; e < E; ++e) dot += alpha * E * f[size_t(e)] / n * (s[e] / z);
        for (int e = 0; e < E; ++e) {
            const double g = alpha * E * f[size_t(e)] / n;
            ds[e] += float(grad_scale * (sigmoid_scores ? (g - dot) / z : g));
        }
    }
    return loss;
}

Weights zeros_like(Weights& w, const ModelConfig& cfg) {
    Weights g;
    auto src = tensor_table(w, cfg);
    auto dst = tensor_table(g, cfg);
    for (size_t i = 0; i < src.size(); ++i) {
        if (src[i].tensor->empty()) continue;
        dst[i].tensor->shape = src[i].tensor->shape;
        dst[i].tensor->data.assign(src[i].tensor->data.size(), 0.0f);
    }
    return g;
}

TrainGraph::TrainGraph(const ModelConfig& cfg) : cfg_(cfg), rope_(cfg), mla_(cfg), router_(cfg) {}

void TrainGraph::layer_forward(float* h, int B, int T, const LayerWeights& L, LayerActs& a) const {
    const int N = B * T, D = cfg_.hidden_size;
    const float eps = float(cfg_.rms_norm_eps);
    a.is_moe = L.is_moe;
    a.h_in.assign(h, h + size_t(N) * D);
    std::vector<float> xn(size_t(N) * D), y(size_t(N) * D);  // [N, D]
    rmsnorm_forward(xn.data(), h, L.input_layernorm.ptr(), N, D, eps);
    mla_forward_train(y.data(), xn.data(), B, T, L.attn, mla_, rope_, a.attn);
    for (size_t i = 0; i < y.size(); ++i) h[i] += y[i];
    a.h_mid.assign(h, h + size_t(N) * D);
    rmsnorm_forward(xn.data(), h, L.post_attention_layernorm.ptr(), N, D, eps);
    if (L.is_moe) {
        const float* bias = L.moe.e_score_correction_bias.empty() ? nullptr : L.moe.e_score_correction_bias.ptr();
        moe_forward_train(y.data(), xn.data(), N, L.moe, bias, router_, cfg_, a.moe, expert_threads());
    } else {
        mlp_forward_train(y.data(), xn.data(), N, L.mlp, a.mlp);
    }
    for (size_t i = 0; i < y.size(); ++i) h[i] += y[i];
}

void TrainGraph::layer_backward(float* dh, LayerWeights& dL, const LayerWeights& L, const LayerActs& a) const {
    const int N = int(a.h_in.size()) / cfg_.hidden_size, D = cfg_.hidden_size;
    const float eps = float(cfg_.rms_norm_eps);
    std::vector<float> dxn(size_t(N) * D);  // [N, D]
    if (a.is_moe) moe_backward(dxn.data(), dL.moe, dh, L.moe, a.moe, router_, cfg_, false, expert_threads());
    else mlp_backward(dxn.data(), dL.mlp, dh, L.mlp, a.mlp);
    rmsnorm_backward(dh, dL.post_attention_layernorm.ptr(), dxn.data(), a.h_mid.data(),
                     L.post_attention_layernorm.ptr(), N, D, eps, true);
    mla_backward(dxn.data(), dL.attn, dh, L.attn, mla_, rope_, a.attn);
    rmsnorm_backward(dh, dL.input_layernorm.ptr(), dxn.data(), a.h_in.data(), L.input_layernorm.ptr(), N, D, eps,
                     true);
}

namespace {

struct MtpState {
    int Tk = 0;
    std::vector<int> next;       // [B*Tk] token i+k of each position
    std::vector<float> hprev;    // [B*Tk, D] input of hnorm
    std::vector<float> cat;      // [B*Tk, 2D] concat(enorm(emb), hnorm(hprev))
    std::vector<float> raw;      // [B*Tk, D] module output before shared_head.norm
    std::vector<float> hn;       // [B*Tk, D] after it
    std::vector<float> dlogits;  // [B*Tk, V]
};

Tensor& head_grad(Weights& g) { return g.lm_head.empty() ? g.embed_tokens : g.lm_head; }

}  // namespace

LossResult TrainGraph::run(const Weights& w, const int* tokens, int B, int T, const LossOptions& opt, Weights* grads,
                           float grad_scale) {
    std::optional<FixedOrderProducts> fixed_order;  // the same bits at any --threads (default)
    if (fixed_order_) fixed_order.emplace();
    const int N = B * T, D = cfg_.hidden_size, V = cfg_.vocab_size, L = cfg_.num_hidden_layers;
    const int Dm = cfg_.num_nextn_predict_layers;
    const float eps = float(cfg_.rms_norm_eps);
    if (T < 2) throw Error("training needs sequences of at least 2 tokens, got " + std::to_string(T));
    if (T > cfg_.max_position_embeddings)
        throw ContextError("training sequences of " + std::to_string(T) + " tokens exceed max_position_embeddings " +
                           std::to_string(cfg_.max_position_embeddings));
    for (int n = 0; n < N; ++n)
        if (tokens[n] < 0 || tokens[n] >= V)
            throw Error("token id " + std::to_string(tokens[n]) + " is outside the vocabulary [0, " +
                        std::to_string(V) + ")");
    LossResult res;
    res.tokens = N;
    // ---- main model ----
    std::vector<float> h(size_t(N) * D);  // [N, D]
    for (int n = 0; n < N; ++n)
        std::memcpy(h.data() + size_t(n) * D, w.embed_tokens.ptr() + size_t(tokens[n]) * D, sizeof(float) * D);
    acts_.resize(size_t(L));
    for (int l = 0; l < L; ++l) layer_forward(h.data(), B, T, w.layers[size_t(l)], acts_[size_t(l)]);
    std::vector<float> hn(size_t(N) * D);  // [N, D] final-normed: what the head and MTP read
    rmsnorm_forward(hn.data(), h.data(), w.norm.ptr(), N, D, eps);
    logits_.resize(size_t(N) * V);
    linear_forward(logits_.data(), hn.data(), w.head(), N);
    std::vector<int> targets(static_cast<size_t>(N));
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) targets[size_t(b) * T + t] = t + 1 < T ? tokens[size_t(b) * T + t + 1] : -1;
    std::vector<float> dlogits = logits_;  // [N, V] becomes d loss / d logits
    const float wce = 1.0f / float(B * (T - 1));
    res.ce = cross_entropy_forward_backward(dlogits.data(), targets.data(), N, V, wce * grad_scale) / grad_scale;
    // ---- MTP modules ----
    std::vector<MtpState> mtp(static_cast<size_t>(Dm));
    mtp_acts_.resize(size_t(Dm));
    res.mtp_ce_k.assign(size_t(Dm), 0.0);
    int used_mtp = 0;
    for (int k = 1; k <= Dm && opt.mtp_weight > 0; ++k) {
        const int Tk = T - k;
        if (Tk < 2) break;  // no position has both its input token and its target
        used_mtp = k;
        MtpState& st = mtp[size_t(k - 1)];
        const MtpWeights& m = w.mtp[size_t(k - 1)];
        const Tensor& embed = m.embed_tokens.empty() ? w.embed_tokens : m.embed_tokens;
        const int Nk = B * Tk;
        st.Tk = Tk;
        st.next.resize(size_t(Nk));
        st.hprev.resize(size_t(Nk) * D);
        st.cat.resize(size_t(Nk) * 2 * D);
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < Tk; ++i) {
                const size_t n = size_t(b) * Tk + i;
                st.next[n] = tokens[size_t(b) * T + i + k];
                const float* src = k == 1 ? hn.data() + (size_t(b) * T + i) * D
                                          : mtp[size_t(k - 2)].raw.data() + (size_t(b) * (T - k + 1) + i) * D;
                std::memcpy(st.hprev.data() + n * D, src, sizeof(float) * D);
                float* row = st.cat.data() + n * 2 * D;
                rmsnorm_forward(row, embed.ptr() + size_t(st.next[n]) * D, m.enorm.ptr(), 1, D, eps);
                rmsnorm_forward(row + D, src, m.hnorm.ptr(), 1, D, eps);
            }
        st.raw.resize(size_t(Nk) * D);
        linear_forward(st.raw.data(), st.cat.data(), m.eh_proj, Nk);
        layer_forward(st.raw.data(), B, Tk, m.layer, mtp_acts_[size_t(k - 1)]);
        st.hn.resize(size_t(Nk) * D);
        rmsnorm_forward(st.hn.data(), st.raw.data(), m.shared_head_norm.ptr(), Nk, D, eps);
        st.dlogits.resize(size_t(Nk) * V);
        linear_forward(st.dlogits.data(), st.hn.data(), m.shared_head_head.empty() ? w.head() : m.shared_head_head,
                       Nk);
        std::vector<int> tk(static_cast<size_t>(Nk));
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < Tk; ++i) tk[size_t(b) * Tk + i] = i + 1 < Tk ? tokens[size_t(b) * T + i + k + 1] : -1;
        const float wk = float(opt.mtp_weight / Dm) / float(B * (Tk - 1));
        const double ce = cross_entropy_forward_backward(st.dlogits.data(), tk.data(), Nk, V, wk * grad_scale) /
                          grad_scale;
        res.mtp_ce_k[size_t(k - 1)] = ce / (opt.mtp_weight / Dm);
    }
    for (int k = 0; k < used_mtp; ++k) res.mtp_ce += res.mtp_ce_k[size_t(k)] / Dm;
    // ---- routing: loads and balance losses ----
    auto each_moe = [&](auto&& fn) {
        for (int l = 0; l < L; ++l)
            if (acts_[size_t(l)].is_moe) fn(l, T, acts_[size_t(l)].moe);
        for (int k = 1; k <= used_mtp; ++k)
            if (mtp_acts_[size_t(k - 1)].is_moe) fn(L + k - 1, T - k, mtp_acts_[size_t(k - 1)].moe);
    };
    each_moe([&](int layer, int Tl, MoeActs& a) {
        res.moe_layers.push_back(layer);
        std::vector<int64_t> load(size_t(cfg_.n_routed_experts), 0);
        for (int id : a.r.ids) ++load[size_t(id)];
        res.loads.push_back(std::move(load));
        if (opt.keep_routing_ids) res.routing_ids.insert(res.routing_ids.end(), a.r.ids.begin(), a.r.ids.end());
        if (opt.balance == BalanceMode::AuxLoss || opt.balance == BalanceMode::SeqAux) {
            if (grads) a.dscores_extra.assign(size_t(a.T) * cfg_.n_routed_experts, 0.0f);
            float* ds = grads ? a.dscores_extra.data() : nullptr;
            if (opt.balance == BalanceMode::AuxLoss) {
                res.aux += balance_loss(ds, a.r, 0, a.T, opt.alpha, router_.sigmoid, grad_scale);
            } else {
                for (int b = 0; b < B; ++b)
                    res.aux += balance_loss(ds, a.r, b * Tl, (b + 1) * Tl, opt.alpha / B, router_.sigmoid, grad_scale);
            }
        }
    });
    res.loss = res.ce + opt.mtp_weight * res.mtp_ce + res.aux;
    if (!grads) return res;
    // ---- backward: MTP modules (deepest first), then the main model ----
    Weights& g = *grads;
    std::vector<float> dhn(size_t(N) * D);  // [N, D] gradient of the final-normed hidden
    linear_backward(dhn.data(), &head_grad(g), dlogits.data(), hn.data(), w.head(), N);
    std::vector<float> dnext;  // gradient flowing into module k's raw output from module k+1
    for (int k = used_mtp; k >= 1; --k) {
        MtpState& st = mtp[size_t(k - 1)];
        const MtpWeights& m = w.mtp[size_t(k - 1)];
        MtpWeights& gm = g.mtp[size_t(k - 1)];
        const int Nk = B * st.Tk;
        const Tensor& head = m.shared_head_head.empty() ? w.head() : m.shared_head_head;
        Tensor& dhead = gm.shared_head_head.empty() ? head_grad(g) : gm.shared_head_head;
        std::vector<float> dkn(size_t(Nk) * D), dh(size_t(Nk) * D);  // [Nk, D]
        linear_backward(dkn.data(), &dhead, st.dlogits.data(), st.hn.data(), head, Nk);
        if (!dnext.empty()) dh = dnext;
        else std::fill(dh.begin(), dh.end(), 0.0f);
        rmsnorm_backward(dh.data(), gm.shared_head_norm.ptr(), dkn.data(), st.raw.data(), m.shared_head_norm.ptr(),
                         Nk, D, eps, true);
        layer_backward(dh.data(), gm.layer, m.layer, mtp_acts_[size_t(k - 1)]);
        std::vector<float> dcat(size_t(Nk) * 2 * D);  // [Nk, 2D]
        linear_backward(dcat.data(), &gm.eh_proj, dh.data(), st.cat.data(), m.eh_proj, Nk);
        const Tensor& embed = m.embed_tokens.empty() ? w.embed_tokens : m.embed_tokens;
        Tensor& dembed = gm.embed_tokens.empty() ? g.embed_tokens : gm.embed_tokens;
        std::vector<float> de(static_cast<size_t>(D));
        std::vector<float> dprev(size_t(Nk) * D);  // [Nk, D]
        for (int n = 0; n < Nk; ++n) {
            const float* dr = dcat.data() + size_t(n) * 2 * D;
            rmsnorm_backward(de.data(), gm.enorm.ptr(), dr, embed.ptr() + size_t(st.next[size_t(n)]) * D,
                             m.enorm.ptr(), 1, D, eps);
            embedding_backward(dembed, de.data(), &st.next[size_t(n)], 1);
            rmsnorm_backward(dprev.data() + size_t(n) * D, gm.hnorm.ptr(), dr + D, st.hprev.data() + size_t(n) * D,
                             m.hnorm.ptr(), 1, D, eps);
        }
        if (k == 1) {
            for (int b = 0; b < B; ++b)
                for (int i = 0; i < st.Tk; ++i) {
                    float* dst = dhn.data() + (size_t(b) * T + i) * D;
                    const float* src = dprev.data() + (size_t(b) * st.Tk + i) * D;
                    for (int j = 0; j < D; ++j) dst[j] += src[j];
                }
            dnext.clear();
        } else {
            // module k-1 has T-k+1 positions per sequence; its last one fed no module-k position
            const int Tp = T - k + 1;
            dnext.assign(size_t(B) * Tp * D, 0.0f);
            for (int b = 0; b < B; ++b)
                for (int i = 0; i < st.Tk; ++i)
                    std::memcpy(dnext.data() + (size_t(b) * Tp + i) * D, dprev.data() + (size_t(b) * st.Tk + i) * D,
                                sizeof(float) * D);
        }
    }
    std::vector<float> dh(size_t(N) * D);  // [N, D]
    rmsnorm_backward(dh.data(), g.norm.ptr(), dhn.data(), h.data(), w.norm.ptr(), N, D, eps);
    for (int l = L - 1; l >= 0; --l) layer_backward(dh.data(), g.layers[size_t(l)], w.layers[size_t(l)], acts_[size_t(l)]);
    embedding_backward(g.embed_tokens, dh.data(), tokens, N);
    return res;
}

}  // namespace moescope
