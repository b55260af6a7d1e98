// Shared helpers of the training test suites: tiny DeepSeek-V3-shaped configs small enough
// for finite differences and a few training steps in well under a second.
#pragma once
#include <nlohmann/json.hpp>

#include "engine/config.h"

namespace train_test {

// V3 flavour: q-LoRA, sigmoid router with noaux_tc group-limited routing, shared expert, YaRN,
// one MTP module. v2: q_proj, softmax router, greedy top-k, tied embeddings, no shared expert.
inline moescope::ModelConfig tiny_config(const std::string& flavour = "v3", int vocab = 24) {
    nlohmann::json j = {
        {"architectures", {"DeepseekV3ForCausalLM"}},
        {"model_type", "deepseek_v3"},
        {"vocab_size", vocab},
        {"hidden_size", 16},
        {"intermediate_size", 12},
        {"moe_intermediate_size", 8},
        {"num_hidden_layers", 2},
        {"num_nextn_predict_layers", 1},
        {"num_attention_heads", 2},
        {"num_key_value_heads", 2},
        {"n_shared_experts", 1},
        {"n_routed_experts", 4},
        {"routed_scaling_factor", 2.5},
        {"kv_lora_rank", 6},
        {"q_lora_rank", 8},
        {"qk_nope_head_dim", 4},
        {"qk_rope_head_dim", 4},
        {"v_head_dim", 4},
        {"topk_method", "noaux_tc"},
        {"n_group", 2},
        {"topk_group", 1},
        {"num_experts_per_tok", 2},
        {"moe_layer_freq", 1},
        {"first_k_dense_replace", 1},
        {"norm_topk_prob", true},
        {"scoring_func", "sigmoid"},
        {"hidden_act", "silu"},
        {"max_position_embeddings", 64},
        {"rope_theta", 10000},
        {"rope_scaling",
         {{"type", "yarn"}, {"factor", 2.0}, {"original_max_position_embeddings", 16}, {"beta_fast", 32},
          {"beta_slow", 1}, {"mscale", 1.0}, {"mscale_all_dim", 1.0}}},
        {"rms_norm_eps", 1e-6},
        {"tie_word_embeddings", false},
        {"bos_token_id", 0},
        {"eos_token_id", 1},
    };
    if (flavour == "v2") {
        j["q_lora_rank"] = nullptr;
        j["scoring_func"] = "softmax";
        j["topk_method"] = "greedy";
        j["n_group"] = 1;
        j["topk_group"] = 1;
        j["norm_topk_prob"] = false;
        j["routed_scaling_factor"] = 1.0;
        j["n_shared_experts"] = 0;
        j["tie_word_embeddings"] = true;
        j.erase("rope_scaling");
    }
    return moescope::ModelConfig::from_json(j, "tiny-" + flavour);
}

}  // namespace train_test
