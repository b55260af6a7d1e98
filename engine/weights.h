// Checkpoint tensors -> typed per-layer weight structs. One table (tensor_table) names every
// tensor with its expected shape; loading, saving, gradients and optimizer state all walk it.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/dtype.h"

namespace moescope {

class Checkpoint;

// How the large linear weights are held in memory for inference. F32 widens everything on
// load (what training and gradients need: they change the weights); BF16 keeps the matrices
// that tensor_table marks bf16_storable as 16-bit (half the memory, half the bytes a decode
// step reads); Auto picks BF16 for large BF16 checkpoints (see resolve_storage).
enum class WeightStorage { F32, BF16, Auto };
const char* storage_name(WeightStorage s);                  // "f32", "bf16", "auto"
WeightStorage storage_from_string(const std::string& s);    // throws ConfigError otherwise

struct Tensor {
    std::vector<int64_t> shape;
    // Exactly one of data / bf16 holds the values (both empty: an absent optional tensor).
    std::vector<float> data;      // f32, row-major as in the checkpoint
    std::vector<uint16_t> bf16;   // BF16 bit patterns, row-major (WeightStorage::BF16 matrices)
    // FP8 checkpoints with 128x128 blocks: the weight_scale_inv the values were dequantized with,
    // [ceil(rows/128), ceil(cols/128)] (1/16384 of the weight), so that a backend can keep the
    // e4m3 bytes (data / scale is exact). Empty otherwise; stale if data is changed afterwards
    // (the CUDA backend checks the round trip).
    std::vector<float> block_scale;
    bool empty() const { return data.empty() && bf16.empty(); }
    bool is_bf16() const { return !bf16.empty(); }
    int64_t numel() const { return int64_t(is_bf16() ? bf16.size() : data.size()); }
    int64_t bytes() const { return int64_t(data.size()) * 4 + int64_t(bf16.size()) * 2; }  // resident
    // The f32 values; throws Error for a BF16-stored tensor (a reader that forgot the BF16 case
    // fails loudly instead of reading an empty vector).
    float* ptr() {
        if (is_bf16()) throw_bf16_read();
        return data.data();
    }
    const float* ptr() const {
        if (is_bf16()) throw_bf16_read();
        return data.data();
    }
    float value(int64_t i) const { return is_bf16() ? bf16_to_f32(bf16[size_t(i)]) : data[size_t(i)]; }
    // out[cols] = row r of a matrix as f32 (an embedding lookup), whatever the storage.
    void copy_row(float* out, int64_t r) const;
    std::vector<float> to_f32() const;  // every value widened (exact)
    // Rounds f32 values to BF16 (nearest even) and drops `data` and block_scale; a BF16 tensor
    // is left as it is. Values that are already BF16-representable are kept bit-exactly.
    void store_bf16();
    void store_f32();                   // widens BF16 back to f32 (exact)

private:
    [[noreturn]] void throw_bf16_read() const;
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
    // May be held as BF16 for inference: the quantizable matrices plus the embeddings and output
    // heads. Norms, biases and the router (its logits pick experts) stay f32.
    bool bf16_storable = false;
};

// Every tensor of the model in checkpoint order. Sizes the vectors of `w` to the config.
std::vector<NamedTensor> tensor_table(Weights& w, const ModelConfig& cfg);

// Weights with every required tensor allocated (zeros), optional ones left empty.
Weights allocate_weights(const ModelConfig& cfg);

// Loads and checks every tensor: shapes against the config, FP8 blocks dequantized exactly
// (e4m3 value times its f32 block scale). Missing and unexpected tensors are listed in the
// error. `storage` F32 widens every tensor; BF16 keeps the bf16_storable ones as BF16: bit-exact
// from a BF16 checkpoint, rounded to nearest even from F32/F16/FP8 values (FP8 then loses its
// block_scale: the values are no longer e4m3 times the scale). Auto is resolved with
// resolve_storage first.
Weights load_weights(const ModelConfig& cfg, const Checkpoint& ck, WeightStorage storage = WeightStorage::F32);

// Auto -> BF16 when the checkpoint's bf16_storable weights are BF16 and the model has more than
// kAutoBf16Params parameters, else F32: small models keep their exact f32 numbers, and FP8
// checkpoints stay f32 (dequantized exactly; a BF16 rounding of e4m3 x scale would lose the
// exact FP8 form the CUDA backend recovers, and FP8 models do not fit a CPU in BF16 anyway).
// F32 and BF16 are returned as they are.
constexpr int64_t kAutoBf16Params = 100'000'000;
WeightStorage resolve_storage(WeightStorage requested, const ModelConfig& cfg, const Checkpoint& ck);

// What the weights occupy: "f32", "bf16" (every bf16_storable tensor is BF16; the rest f32)
// or "mixed", the bytes resident, and parameter counts by storage.
struct WeightMemory {
    std::string storage;
    int64_t bytes = 0, bf16_params = 0, f32_params = 0;
};
WeightMemory weight_memory(const Weights& w, const ModelConfig& cfg);
// The same for a checkpoint that is not loaded (inspect): bytes the weights would take.
WeightMemory planned_weight_memory(const ModelConfig& cfg, const Checkpoint& ck, WeightStorage resolved);

// Converts every bf16_storable tensor of loaded weights to `s` (F32 or BF16; see
// Tensor::store_bf16): a random-weight benchmark model in BF16, or BF16 weights back to f32.
void convert_storage(Weights& w, const ModelConfig& cfg, WeightStorage s);

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
