// The model's forward pass, reading like deepseek-v3.md sections 2-4.
#include "engine/model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/errors.h"
#include "engine/model/ops.h"

namespace moescope {

void KvCache::truncate(int n) {
    if (n >= length) return;
    length = std::max(0, n);
    for (auto& l : layers) {
        l.c.resize(size_t(length) * size_t(d_c));
        l.k_pe.resize(size_t(length) * size_t(d_rope));
    }
}

int64_t KvCache::bytes_f32() const {
    int64_t b = 0;
    for (const auto& l : layers) b += int64_t(l.c.size() + l.k_pe.size()) * 4;
    return b;
}

Model::Model(ModelConfig cfg, Weights w)
    : cfg_(std::move(cfg)), w_(std::move(w)), rope_(cfg_), mla_(cfg_), router_(cfg_) {
    reset_bias();
    disabled_.assign(size_t(cfg_.num_hidden_layers + cfg_.num_nextn_predict_layers), {});
    drop_top_.assign(disabled_.size(), 0);
}

void Model::set_disabled_experts(int layer, std::vector<uint8_t> disabled) {
    check_moe_layer(cfg_, layer);
    if (disabled.empty()) disabled.assign(size_t(router_.E), 0);  // none off, as disabled_experts() says it
    check_disabled_experts(router_, disabled, layer, drop_top_[size_t(layer)]);
    if (std::count(disabled.begin(), disabled.end(), uint8_t(0)) == std::ptrdiff_t(disabled.size())) disabled.clear();
    disabled_[size_t(layer)] = std::move(disabled);
}

void Model::set_drop_top_experts(int layer, int drop_top) {
    check_moe_layer(cfg_, layer);
    std::vector<uint8_t> mask = disabled_[size_t(layer)];
    mask.resize(size_t(router_.E), 0);
    check_disabled_experts(router_, mask, layer, drop_top);
    drop_top_[size_t(layer)] = drop_top;
}

void Model::reset_bias() {
    const int n = cfg_.num_hidden_layers + cfg_.num_nextn_predict_layers;
    bias_.assign(size_t(n), {});
    for (int l = 0; l < n; ++l) {
        const LayerWeights& L = l < cfg_.num_hidden_layers ? w_.layers[size_t(l)]
                                                           : w_.mtp[size_t(l - cfg_.num_hidden_layers)].layer;
        if (L.is_moe) {
            bias_[size_t(l)] = L.moe.e_score_correction_bias.empty()
                                   ? std::vector<float>(size_t(cfg_.n_routed_experts), 0.0f)
                                   : L.moe.e_score_correction_bias.data;
        }
    }
}

KvCache Model::new_cache() const {
    KvCache c;
    c.d_c = cfg_.kv_lora_rank;
    c.d_rope = cfg_.qk_rope_head_dim;
    c.layers.resize(size_t(cfg_.num_hidden_layers));
    return c;
}

KvCache Model::new_mtp_cache() const {
    KvCache c;
    c.d_c = cfg_.kv_lora_rank;
    c.d_rope = cfg_.qk_rope_head_dim;
    c.layers.resize(1);
    return c;
}

void Model::layer_forward(float* h, int T, int start, const LayerWeights& L, int layer_index, LatentCache& cache,
                          const ForwardOptions& opt, ForwardResult& out) const {
    const int D = cfg_.hidden_size;
    const float eps = float(cfg_.rms_norm_eps);
    std::vector<float> xn(size_t(T) * D), y(size_t(T) * D);
    // h = x + Attn(RMSNorm_in(x))
    rmsnorm_forward(xn.data(), h, L.input_layernorm.ptr(), T, D, eps);
    mla_forward(y.data(), xn.data(), T, start, L.attn, mla_, rope_, cache, opt.absorbed);
    for (size_t i = 0; i < y.size(); ++i) h[i] += y[i];
    // out = h + FFN(RMSNorm_post(h))
    rmsnorm_forward(xn.data(), h, L.post_attention_layernorm.ptr(), T, D, eps);
    if (L.is_moe) {
        std::vector<float> logits(size_t(T) * cfg_.n_routed_experts);
        linear_forward(logits.data(), xn.data(), L.moe.gate, T);
        LayerRouting lr;
        lr.layer = layer_index;
        const auto& off = disabled_[size_t(layer_index)];
        route(lr.r, logits.data(), T, bias_[size_t(layer_index)].data(), router_, off.empty() ? nullptr : off.data(),
              drop_top_[size_t(layer_index)]);
        moe_experts_forward(y.data(), xn.data(), T, L.moe, lr.r, cfg_);
        if (!opt.want_scores) lr.r.scores.clear();
        out.routing.push_back(std::move(lr));
    } else {
        mlp_forward(y.data(), xn.data(), T, L.mlp);
    }
    for (size_t i = 0; i < y.size(); ++i) h[i] += y[i];
    // Telemetry: the norm of each new cached latent.
    for (int t = 0; t < T; ++t) {
        const float* c = cache.c.data() + size_t(start + t) * cfg_.kv_lora_rank;
        double s = 0;
        for (int i = 0; i < cfg_.kv_lora_rank; ++i) s += double(c[i]) * c[i];
        out.latent_norms.push_back(float(std::sqrt(s)));
    }
}

void Model::head_forward(const float* hn, int T, const Tensor& head, const ForwardOptions& opt,
                         ForwardResult& out) const {
    const int V = cfg_.vocab_size, D = cfg_.hidden_size;
    const int rows = opt.all_logits ? T : 1;
    out.logits.resize(size_t(rows) * V);
    linear_forward(out.logits.data(), hn + size_t(T - rows) * D, head, rows);
}

void Model::forward(const int* tokens, int T, KvCache& cache, const ForwardOptions& opt, ForwardResult& out) const {
    const int D = cfg_.hidden_size, V = cfg_.vocab_size, start = cache.length;
    if (T <= 0) throw Error("forward: no tokens");
    if (start + T > cfg_.max_position_embeddings)
        throw ContextError("the sequence would reach position " + std::to_string(start + T) +
                           ", past the model's context of " + std::to_string(cfg_.max_position_embeddings) +
                           " tokens (max_position_embeddings)");
    out = ForwardResult{};
    out.T = T;
    out.start = start;
    std::vector<float> h(size_t(T) * D);
    for (int t = 0; t < T; ++t) {
        if (tokens[t] < 0 || tokens[t] >= V)
            throw Error("token id " + std::to_string(tokens[t]) + " is outside the vocabulary [0, " +
                        std::to_string(V) + ")");
        w_.embed_tokens.copy_row(h.data() + size_t(t) * D, tokens[t]);  // f32 or BF16-stored
    }
    for (int l = 0; l < cfg_.num_hidden_layers; ++l)
        layer_forward(h.data(), T, start, w_.layers[size_t(l)], l, cache.layers[size_t(l)], opt, out);
    cache.length = start + T;
    out.raw_hidden = h;
    out.hidden.resize(h.size());
    rmsnorm_forward(out.hidden.data(), h.data(), w_.norm.ptr(), T, D, float(cfg_.rms_norm_eps));
    head_forward(out.hidden.data(), T, w_.head(), opt, out);
}

void Model::forward_mtp(int k, const float* h_prev, const int* next_tokens, int T, KvCache& cache,
                        const ForwardOptions& opt, ForwardResult& out) const {
    if (k < 1 || k > cfg_.num_nextn_predict_layers)
        throw Error("MTP module " + std::to_string(k) + " does not exist (the model has " +
                    std::to_string(cfg_.num_nextn_predict_layers) + ")");
    const MtpWeights& m = w_.mtp[size_t(k - 1)];
    const int D = cfg_.hidden_size, V = cfg_.vocab_size, start = cache.length;
    const float eps = float(cfg_.rms_norm_eps);
    if (start + T > cfg_.max_position_embeddings)
        throw ContextError("MTP: position " + std::to_string(start + T) + " is past the context");
    out = ForwardResult{};
    out.T = T;
    out.start = start;
    const Tensor& embed = m.embed_tokens.empty() ? w_.embed_tokens : m.embed_tokens;
    std::vector<float> cat(size_t(T) * 2 * D), h(size_t(T) * D), e(static_cast<size_t>(D));  // [T, 2D], [T, D], [D]
    for (int t = 0; t < T; ++t) {
        if (next_tokens[t] < 0 || next_tokens[t] >= V) throw Error("MTP: token id outside the vocabulary");
        float* row = cat.data() + size_t(t) * 2 * D;
        // concat(enorm(embed[t_{i+k}]), hnorm(h_i)): the embedding half first.
        embed.copy_row(e.data(), next_tokens[t]);
        rmsnorm_forward(row, e.data(), m.enorm.ptr(), 1, D, eps);
        rmsnorm_forward(row + D, h_prev + size_t(t) * D, m.hnorm.ptr(), 1, D, eps);
    }
    linear_forward(h.data(), cat.data(), m.eh_proj, T);
    layer_forward(h.data(), T, start, m.layer, cfg_.num_hidden_layers + k - 1, cache.layers[0], opt, out);
    cache.length = start + T;
    out.raw_hidden = h;
    out.hidden.resize(h.size());
    rmsnorm_forward(out.hidden.data(), h.data(), m.shared_head_norm.ptr(), T, D, eps);
    head_forward(out.hidden.data(), T, m.shared_head_head.empty() ? w_.head() : m.shared_head_head, opt, out);
}

}  // namespace moescope
