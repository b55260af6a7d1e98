// ModelConfig: a DeepSeek-V3 / -V2 config.json, validated, plus the model-card arithmetic
// (parameters total / activated / MTP, latent-cache bytes per token).
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moescope {

struct RopeScaling {        // rope_scaling of type "yarn" (the only scaling DeepSeek ships)
    std::string type;       // "yarn"
    double factor = 1.0;    // s
    int original_max_position_embeddings = 4096;  // L0
    double beta_fast = 32.0, beta_slow = 1.0;
    double mscale = 1.0, mscale_all_dim = 0.0;
};

struct Fp8Quantization {    // quantization_config of the FP8 release
    std::string quant_method = "fp8", fmt = "e4m3";
    int block_rows = 128, block_cols = 128;  // weight_block_size
};

struct ModelConfig {
    std::string source;     // file it came from, for error messages
    std::vector<std::string> architectures;
    std::string model_type;           // "deepseek_v3" or "deepseek_v2"
    int vocab_size = 0;               // V
    int hidden_size = 0;              // D
    int intermediate_size = 0;        // dense MLP width
    int moe_intermediate_size = 0;    // width of one routed / shared expert
    int num_hidden_layers = 0;        // L (main model)
    int num_nextn_predict_layers = 0; // MTP depth
    int num_attention_heads = 0;      // H
    int num_key_value_heads = 0;      // informational (MLA shares the latent)
    int n_shared_experts = 0;
    int n_routed_experts = 0;         // E (0: a dense model)
    double routed_scaling_factor = 1.0;
    int kv_lora_rank = 0;             // d_c
    int q_lora_rank = 0;              // 0 when null: q_proj instead of q_a/q_b
    int qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
    std::string topk_method = "greedy";  // greedy | group_limited_greedy | noaux_tc
    int n_group = 1, topk_group = 1;
    int num_experts_per_tok = 0;      // k
    int moe_layer_freq = 1, first_k_dense_replace = 0;
    bool norm_topk_prob = false;
    std::string scoring_func = "softmax";  // sigmoid (V3) | softmax (V2)
    std::string hidden_act = "silu";
    int max_position_embeddings = 0;
    double rope_theta = 10000.0;
    std::optional<RopeScaling> rope_scaling;
    double rms_norm_eps = 1e-6;
    bool tie_word_embeddings = false;
    bool attention_bias = false;
    std::optional<int> bos_token_id, eos_token_id;
    std::optional<Fp8Quantization> quantization;
    nlohmann::json raw;               // the whole file, kept for re-saving unknown fields

    int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
    bool is_moe_layer(int l) const {
        return n_routed_experts > 0 && l >= first_k_dense_replace && l % moe_layer_freq == 0;
    }
    // Layer l of the whole stack routes to experts: decoder layers 0..L-1, then MTP module k as
    // layer L + k - 1 (it routes like the layers it copies).
    bool is_moe_stack_layer(int l) const {
        return l >= 0 && l < num_hidden_layers + num_nextn_predict_layers &&
               (l >= num_hidden_layers ? n_routed_experts > 0 : is_moe_layer(l));
    }
    bool has_bias() const { return topk_method == "noaux_tc"; }
    int num_moe_layers() const;
    double softmax_scale() const;     // (d_nope + d_rope)^-0.5, times YaRN's m^2

    static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
    static ModelConfig load(const std::filesystem::path& path);  // a folder or a config.json
    nlohmann::json to_json() const;  // raw with every known field overwritten
    void validate() const;           // throws ConfigError naming the field
};

struct ModelCard {
    int64_t total_params = 0;        // main model (embedding, layers, norm, head)
    int64_t active_params = 0;       // per token: all but the unchosen routed experts
    int64_t mtp_params = 0;          // all MTP modules, their own embedding/head copies included
    int64_t embedding_params = 0;    // embed_tokens + lm_head (one if tied)
    int64_t attention_params = 0, dense_mlp_params = 0, routed_expert_params = 0,
            shared_expert_params = 0, router_params = 0, norm_params = 0;
    int64_t latent_cache_bytes_per_token = 0;  // (d_c + d_rope) * 2 bytes * L, BF16
    int64_t mha_cache_bytes_per_token = 0;     // K (H*(d_nope+d_rope)) + V (H*d_v), BF16
    int64_t gqa8_cache_bytes_per_token = 0;    // the same with 8 KV heads
    int num_moe_layers = 0, num_dense_layers = 0;
    // Filled only where weights are known (a loaded model, or a checkpoint being inspected):
    // "f32" / "bf16" / "mixed" (weight_memory in weights.h) and the bytes the weights occupy.
    std::string weight_storage;
    int64_t weight_bytes = 0;
    nlohmann::json to_json(const ModelConfig& cfg) const;
    std::string to_text(const ModelConfig& cfg) const;
};

ModelCard model_card(const ModelConfig& cfg);
std::string human_count(int64_t n);  // 671026419200 -> "671.0B"

}  // namespace moescope
