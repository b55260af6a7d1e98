// The DeepSeek-V3 model on the CPU: the reference every other path is tested against.
// h_0 = embed[t]; h_{l+1} = Layer_l(h_l); logits = lm_head(RMSNorm_final(h_L)); MTP modules.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/config.h"
#include "engine/model/mla.h"
#include "engine/model/moe.h"
#include "engine/model/rope.h"
#include "engine/weights.h"

namespace moescope {

// The latent cache of a stack of layers (the main model, or one MTP module).
struct KvCache {
    std::vector<LatentCache> layers;
    int length = 0;  // positions held
    int d_c = 0, d_rope = 0;
    void truncate(int n);
    int64_t bytes_f32() const;
};

struct ForwardOptions {
    bool absorbed = true;       // MLA path: latent-space attention (false: decompress)
    bool all_logits = true;     // logits for every new position (false: only the last)
    bool want_scores = false;   // keep the full router score vectors
    bool host_logits = true;    // false: a backend that can pick() may leave out.logits empty
};

// One MoE layer's routing for the positions of a forward call.
struct LayerRouting {
    int layer = 0;              // decoder layer index (MTP module k: num_hidden_layers + k - 1)
    Routing r;
};

struct ForwardResult {
    int T = 0;                          // new positions
    int start = 0;                      // position of the first
    std::vector<float> logits;          // [T or 1, V]
    std::vector<float> hidden;          // [T, D] after the final norm (what MTP reads)
    std::vector<float> raw_hidden;      // [T, D] before it (MTP module output for chaining)
    std::vector<LayerRouting> routing;  // one per MoE layer
    std::vector<float> latent_norms;    // [layers, T] |c| of the new positions
};

class Model {
public:
    Model(ModelConfig cfg, Weights w);

    const ModelConfig& config() const { return cfg_; }
    const Weights& weights() const { return w_; }
    Weights& mutable_weights() { return w_; }

    KvCache new_cache() const;       // for the main model
    KvCache new_mtp_cache() const;   // for one MTP module

    // Runs T new tokens at positions cache.length.. through the main model.
    void forward(const int* tokens, int T, KvCache& cache, const ForwardOptions& opt, ForwardResult& out) const;

    // MTP module k (1-based) at T positions starting at mtp_cache.length: position i combines
    // h_prev[i] (main model: the final-normed hidden; deeper modules: the previous module's
    // output) with the embedding of next_tokens[i] (token i + k) and predicts token i + k + 1.
    void forward_mtp(int k, const float* h_prev, const int* next_tokens, int T, KvCache& mtp_cache,
                     const ForwardOptions& opt, ForwardResult& out) const;

    // The router bias in use (online balancing changes it; reset restores the checkpoint's).
    const std::vector<float>& bias(int layer) const { return bias_[size_t(layer)]; }
    void set_bias(int layer, const std::vector<float>& b) { bias_[size_t(layer)] = b; }
    void reset_bias();

    // Experts switched off for an ablation ([E], 1 = disabled; empty: none), per MoE layer
    // (MTP module k: num_hidden_layers + k - 1). Like the bias, a change applies to the
    // positions computed after it. set_ takes an empty mask as none off (what the getter
    // returns then), and throws (check_disabled_experts) for a mask that would leave a token
    // fewer than k experts, or for a layer that does not route.
    const std::vector<uint8_t>& disabled_experts(int layer) const { return disabled_[size_t(layer)]; }
    void set_disabled_experts(int layer, std::vector<uint8_t> disabled);
    // How many of each token's highest-ranked experts are switched off for it (route()'s
    // drop_top, 0-k) in an MoE layer; set_ checks it with the layer's mask like set_disabled_.
    int drop_top_experts(int layer) const { return drop_top_[size_t(layer)]; }
    void set_drop_top_experts(int layer, int drop_top);

private:
    void layer_forward(float* h, int T, int start, const LayerWeights& L, int layer_index, LatentCache& cache,
                       const ForwardOptions& opt, ForwardResult& out) const;
    void head_forward(const float* hn, int T, const Tensor& head, const ForwardOptions& opt, ForwardResult& out) const;

    ModelConfig cfg_;
    Weights w_;
    Rope rope_;
    MlaDims mla_;
    RouterDims router_;
    std::vector<std::vector<float>> bias_;  // [layers + mtp][E]
    std::vector<std::vector<uint8_t>> disabled_;  // [layers + mtp][E or 0]
    std::vector<int> drop_top_;                   // [layers + mtp]
};

}  // namespace moescope
