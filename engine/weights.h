// Checkpoint tensors -> typed per-layer weight structs. One table (tensor_table) names every
// tensor with its expected shape; loading, saving, gradients and optimizer state all walk it.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/config.h"

namespace moescope {

class Checkpoint;

struct Tensor {
    std::vector<int64_t> shape;
    std::vector<float> data;  // f32, row-major as in the checkpoint
    // FP8 checkpoints with 128x128 blocks: the weight_scale_inv the values were dequantized with,
    // [ceil(rows/128), ceil(cols/128)] (1/16384 of the weight), so that a backend can keep the
    // e4m3 bytes (data / scale is exact). Empty otherwise; stale if data is changed afterwards
    // (the CUDA backend checks the round trip).
    std::vector<float> block_scale;
    bool empty() const { return data.empty(); }
    int64_t numel() const { return int64_t(data.size()); }
    float* ptr() { return data.data(); }
    const float* ptr() const { return data.data(); }
};

struct MlpWeights {      // E(x) = down(silu(gate(x)) * up(x))
    Tensor gate_proj;    // [I, D]
    Tensor up_proj;      // [I, D]
    Tensor down_proj;    // [D, I]
};

struct AttentionWeights {
    Tensor q_a_proj;            // [q_lora, D]            (q_lora_rank > 0)
    Tensor q_a_layernorm;       // [q_lora]
    Tensor q_b_proj;            // [H*(d_nope+d_rope), q_lora]
    Tensor q_proj;              // [H*(d_nope+d_rope), D] (q_lora_rank == 0)
    Tensor kv_a_proj_with_mqa;  // [d_c + d_rope, D]
    Tensor kv_a_layernorm;      // [d_c]
    Tensor kv_b_proj;           // [H*(d_nope+d_v), d_c]
    Tensor o_proj;              // [D, H*d_v]
};

struct MoeWeights {
    Tensor gate;                     // [E, D] router
    Tensor e_score_correction_bias;  // [E] (noaux_tc)
    std::vector<MlpWeights> experts; // E routed experts
    MlpWeights shared;               // inter = moe_inter * n_shared (absent when n_shared == 0)
};

struct LayerWeights {
    bool is_moe = false;
    Tensor input_layernorm;          // [D]
    Tensor post_attention_layernorm; // [D]
    AttentionWeights attn;
    MlpWeights mlp;                  // dense layers
    MoeWeights moe;                  // MoE layers
};

struct MtpWeights {
    Tensor enorm, hnorm;             // [D]
    Tensor eh_proj;                  // [D, 2D]: concat(enorm(embed), hnorm(h)), embedding first
    Tensor embed_tokens;             // [V, D] optional: falls back to the main embedding
    Tensor shared_head_norm;         // [D]
    Tensor shared_head_head;         // [V, D] optional: falls back to the main head
    LayerWeights layer;
};

struct Weights {
    Tensor embed_tokens;             // [V, D]
    std::vector<LayerWeights> layers;
    Tensor norm;                     // [D]
    Tensor lm_head;                  // [V, D] (empty when tied)
    std::vector<MtpWeights> mtp;

    const Tensor& head() const { return lm_head.empty() ? embed_tokens : lm_head; }
};

struct NamedTensor {
    std::string name;             // Hugging Face name
    Tensor* tensor;
    std::vector<int64_t> shape;   // expected
    std::string shape_expr;       // "[kv_lora_rank + qk_rope_head_dim, hidden_size]" for errors
    bool optional = false;        // may be absent from a checkpoint (an MTP copy of the embedding)
    bool quantizable = false;     // a linear weight that FP8 checkpoints store block-scaled
};

// Every tensor of the model in checkpoint order. Sizes the vectors of `w` to the config.
std::vector<NamedTensor> tensor_table(Weights& w, const ModelConfig& cfg);

// Weights with every required tensor allocated (zeros), optional ones left empty.
Weights allocate_weights(const ModelConfig& cfg);

// Loads and checks every tensor: shapes against the config, FP8 blocks dequantized exactly
// (e4m3 value times its f32 block scale). Missing and unexpected tensors are listed in the
// error. `skip_mtp` leaves the MTP modules out (for checkpoints that are used without them).
Weights load_weights(const ModelConfig& cfg, const Checkpoint& ck);

// Dequantize one block-scaled FP8 tensor: out[r][c] = fp8(q[r][c]) * scale_inv[r/br][c/bc].
void dequantize_fp8_blocks(const uint8_t* q, const float* scale_inv, int64_t rows, int64_t cols, int br, int bc,
                           float* out);

enum class SaveFormat { F32, BF16, FP8 };

// Writes config.json and the weights (one file, or shards of at most `max_shard_bytes` with
// model.safetensors.index.json) into `dir`, atomically per file. FP8 stores every quantizable
// weight as e4m3 with 128x128 block scales and adds quantization_config to the config.
void save_checkpoint(const std::filesystem::path& dir, const ModelConfig& cfg, Weights& w,
                     SaveFormat format = SaveFormat::F32, int64_t max_shard_bytes = 0);

}  // namespace moescope
