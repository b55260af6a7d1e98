// Device memory plan of the CUDA backend: the list of tensors it uploads and the bytes of its
// three arenas (weights, latent caches, activations). Host-only and header-only, so the plan
// (and the refusal of a model that does not fit) is unit-tested without a GPU and computed
// BEFORE any cudaMalloc: a model that does not fit fails with a DeviceError that names the sizes.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/errors.h"
#include "kernels/fp8.h"

namespace moescope::cuda {

// FP8: the linear weights that FP8 checkpoints quantize (kv_b included) are e4m3 with 128x128
// block scales (kernels/fp8.h); the other big matrices (embeddings, heads) are BF16; norms and
// the router f32.
enum class WeightDtype { BF16, F32, FP8 };

inline const char* weight_dtype_name(WeightDtype d) {
    return d == WeightDtype::BF16 ? "bf16" : d == WeightDtype::F32 ? "f32" : "fp8";
}

// What a device tensor is; (role, layer, expert) finds its host tensor in Weights.
enum class Role {
    Embed, FinalNorm, Head,
    InNorm, PostNorm, QA, QANorm, QB, QProj, KVA, KVANorm, KVB, OProj,
    MlpGateUp, MlpDown,            // dense layers: gate and up stacked [2I, D]
    Router, ExpGateUp, ExpDown,    // MoE layers (router kept in f32: routing decisions are exact)
    SharedGateUp, SharedDown,
    MtpENorm, MtpHNorm, MtpEh, MtpEmbed, MtpHeadNorm, MtpHead,
};

struct TensorSpec {
    Role role;
    int layer = -1;     // decoder layer (MTP module k: num_hidden_layers + k - 1); -1 for model-wide
    int expert = -1;    // routed expert index
    int64_t rows = 0, cols = 0;
    bool big = false;   // a matrix stored in the weight dtype; otherwise f32 (norms, router)
    bool fp8 = false;   // a linear weight FP8 checkpoints quantize: e4m3 + block scales in an FP8 plan
    int64_t split = 0;  // stacked gate|up: rows of the gate (each part keeps its own block grid)
    Fp8Grid grid() const { return Fp8Grid{rows, cols, split}; }
    bool stored_fp8(WeightDtype d) const { return fp8 && d == WeightDtype::FP8; }
    int64_t bytes(WeightDtype d) const {
        if (stored_fp8(d)) return grid().bytes();
        return rows * cols * (big && d != WeightDtype::F32 ? 2 : 4);
    }
};

inline constexpr int64_t kAlign = 256;  // every carved buffer starts on a 256-byte boundary
inline int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Which optional tensors the checkpoint has (a synthetic benchmark model has none of them).
struct ModelPresence {
    bool lm_head = true;      // false when tied to the embedding
    bool mtp_embed = false;   // MTP module's own copy of embed_tokens
    bool mtp_head = false;    // MTP module's own shared_head.head
};

inline void layer_specs(std::vector<TensorSpec>& s, const ModelConfig& c, int l, bool moe) {
    const int64_t D = c.hidden_size, H = c.num_attention_heads, dq = c.qk_head_dim();
    s.push_back({Role::InNorm, l, -1, 1, D, false});
    s.push_back({Role::PostNorm, l, -1, 1, D, false});
    if (c.q_lora_rank > 0) {
        s.push_back({Role::QA, l, -1, c.q_lora_rank, D, true, true});
        s.push_back({Role::QANorm, l, -1, 1, c.q_lora_rank, false});
        s.push_back({Role::QB, l, -1, H * dq, c.q_lora_rank, true, true});
    } else {
        s.push_back({Role::QProj, l, -1, H * dq, D, true, true});
    }
    s.push_back({Role::KVA, l, -1, c.kv_lora_rank + c.qk_rope_head_dim, D, true, true});
    s.push_back({Role::KVANorm, l, -1, 1, c.kv_lora_rank, false});
    s.push_back({Role::KVB, l, -1, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, true, true});
    s.push_back({Role::OProj, l, -1, D, H * c.v_head_dim, true, true});
    if (!moe) {
        s.push_back({Role::MlpGateUp, l, -1, 2 * int64_t(c.intermediate_size), D, true, true, c.intermediate_size});
        s.push_back({Role::MlpDown, l, -1, D, c.intermediate_size, true, true});
        return;
    }
    const int64_t I = c.moe_intermediate_size;
    s.push_back({Role::Router, l, -1, c.n_routed_experts, D, false});
    for (int e = 0; e < c.n_routed_experts; ++e) {
        s.push_back({Role::ExpGateUp, l, e, 2 * I, D, true, true, I});
        s.push_back({Role::ExpDown, l, e, D, I, true, true});
    }
    if (c.n_shared_experts > 0) {
        s.push_back({Role::SharedGateUp, l, -1, 2 * I * c.n_shared_experts, D, true, true, I * c.n_shared_experts});
        s.push_back({Role::SharedDown, l, -1, D, I * c.n_shared_experts, true, true});
    }
}

// Whether layer l of the device stacks is MoE (MTP module k: l = num_hidden_layers + k - 1).
// The same rule as tensor_table (engine/weights.cpp) and the model card: a main layer by
// first_k_dense_replace / moe_layer_freq, an MTP module's layer whenever the model has routed
// experts. Anything else uploads tensors the checkpoint does not have (a ShapeError at upload)
// and asks the CPU model for a router bias it does not keep.
inline bool stack_layer_is_moe(const ModelConfig& c, int l) {
    return c.is_moe_stack_layer(l);
}

// Every tensor the backend keeps on the device, in upload order.
inline std::vector<TensorSpec> device_tensors(const ModelConfig& c, const ModelPresence& p) {
    std::vector<TensorSpec> s;
    const int64_t D = c.hidden_size, V = c.vocab_size;
    s.push_back({Role::Embed, -1, -1, V, D, true});
    for (int l = 0; l < c.num_hidden_layers; ++l) layer_specs(s, c, l, c.is_moe_layer(l));
    s.push_back({Role::FinalNorm, -1, -1, 1, D, false});
    if (p.lm_head) s.push_back({Role::Head, -1, -1, V, D, true});
    for (int k = 1; k <= c.num_nextn_predict_layers; ++k) {
        const int l = c.num_hidden_layers + k - 1;
        s.push_back({Role::MtpENorm, l, -1, 1, D, false});
        s.push_back({Role::MtpHNorm, l, -1, 1, D, false});
        s.push_back({Role::MtpEh, l, -1, D, 2 * D, true, true});
        if (p.mtp_embed) s.push_back({Role::MtpEmbed, l, -1, V, D, true});
        s.push_back({Role::MtpHeadNorm, l, -1, 1, D, false});
        if (p.mtp_head) s.push_back({Role::MtpHead, l, -1, V, D, true});
        layer_specs(s, c, l, stack_layer_is_moe(c, l));
    }
    return s;
}

// The grouped expert GEMM of prefill (kernels/gemm.h) takes the rows of each expert in tiles of
// kGroupedRows; a layer of R routed rows over E experts needs at most
// sum_e ceil(cnt_e / 64) <= R / 64 + min(R, E) tiles (at most one partial tile per expert).
inline constexpr int kGroupedRows = 64;
inline int grouped_max_tiles(int64_t R, int64_t E) {
    return int(R / kGroupedRows + std::min(R, E));
}

// Sizes of the activation arena for chunks of at most `chunk` tokens over `capacity` positions.
struct ActivationDims {
    int chunk = 0;             // Tc: tokens per forward chunk (longer prompts run in chunks)
    int capacity = 0;          // S: positions a cache holds
    int naive_positions = 0;   // S the naive (decompressing) path has scratch for; beyond: absorbed
    int max_splits = 64;       // sequence splits of the absorbed decode attention
};

inline ActivationDims activation_dims(const ModelConfig& c, int capacity) {
    ActivationDims a;
    a.capacity = std::max(1, capacity);
    a.chunk = std::min(a.capacity, 256);
    a.naive_positions = std::min(a.capacity, 2048);
    (void)c;
    return a;
}

// The attention partial buffer holds H * max(max_splits, chunk) rows of (d_c + 2) floats.
inline int64_t attention_partial_rows(const ModelConfig& c, const ActivationDims& a) {
    return int64_t(c.num_attention_heads) * std::max(a.max_splits, a.chunk);
}

inline int64_t activation_bytes(const ModelConfig& c, const ActivationDims& a) {
    const int64_t T = a.chunk, D = c.hidden_size, H = c.num_attention_heads, dq = c.qk_head_dim(),
                  dc = c.kv_lora_rank, dr = c.qk_rope_head_dim, dv = c.v_head_dim, dn = c.qk_nope_head_dim,
                  V = c.vocab_size, E = std::max(1, c.n_routed_experts), k = std::max(1, c.num_experts_per_tok),
                  G = std::max(1, c.n_group), I = c.moe_intermediate_size,
                  Is = int64_t(c.moe_intermediate_size) * std::max(1, c.n_shared_experts),
                  Id = c.intermediate_size, Sn = a.naive_positions;
    int64_t f = 0;  // f32 elements
    auto add = [&](int64_t n) { f += align_up(n * 4) / 4; };
    add(T);                                         // token ids
    for (int i = 0; i < 5; ++i) add(T * D);        // h, xn, y, hidden, raw (f32)
    add(T * 2 * D);                                 // MTP concat
    add(T * H * dq);                                // q
    add(T * std::max<int64_t>(1, c.q_lora_rank));   // q_a
    add(T * (dc + dr));                             // kv_a output
    add(T * H * dc);                                // q_lat
    add(T * H * dc);                                // o_lat
    add(attention_partial_rows(c, a) * (dc + 2));   // split partials
    add(T * H * dv);                                // o
    add(Sn * H * (dn + dv));                        // naive: kv_b(c) of the cached positions
    add(H * T * Sn);                                // naive: scores
    add(2 + 2 + 2 * int64_t(grouped_max_tiles(Sn, 1)));  // naive: FP8 kv_b(c) as one group (pointer, offsets, tiles)
    add(T * E);                                     // router logits
    add(T * E);                                     // router scores
    add(T * k * 2);                                 // ids, weights
    add(T * G);                                     // kept groups (bytes, padded as floats)
    add(E);                                         // counts
    add(E + 1);                                     // offsets
    add(2 * int64_t(grouped_max_tiles(T * k, E)));  // grouped expert GEMM tile map (int2)
    for (int i = 0; i < 3; ++i) add(T * k);         // perm, row_of_slot, row_expert
    add(T * k * D);                                 // gathered expert inputs
    add(T * k * 2 * I);                             // expert gate|up
    add(T * k * I);                                 // expert SwiGLU output
    add(T * k * D);                                 // expert outputs
    add(T * D);                                     // shared expert output
    add(T * 2 * std::max(Is, Id));                  // shared / dense gate|up
    add(T * std::max(Is, Id));                      // shared / dense SwiGLU output
    add(T * V);                                     // logits
    for (int i = 0; i < 3; ++i) add(T);            // sampling: uniforms, ids, log-probabilities
    add(1);                                         // the decode position read by a CUDA graph
    // BF16 copies of GEMM inputs for cuBLAS (half-size elements).
    const int64_t cast = std::max({T * 2 * D, T * std::max<int64_t>(1, c.q_lora_rank), T * H * dv, T * k * I,
                                   T * k * D, T * std::max(Is, Id), Sn * dc, T * D});
    f += align_up(cast * 2) / 4;
    return f * 4;
}

// The telemetry block of one chunk of n rows through a stack of `layers` layers, `moe_layers`
// of them MoE: routing ids [moe][n][k] (int), mixing weights [moe][n][k] (f32), kept groups
// [moe][n][G] (bytes), per-expert counts [moe][E] (int), latent norms [layers][n] (f32), and
// the router scores [moe][n][E] (f32) only when asked. Each section starts on a 256-byte
// boundary. The backend writes and copies exactly this; the plan sizes the block with it.
struct TeleLayout {
    int64_t ids, weights, kept, counts, norms, scores, end;  // byte offsets; scores -1 when absent
};

inline TeleLayout telemetry_layout(const ModelConfig& c, int n, int moe_layers, int layers, bool want_scores) {
    const int64_t k = std::max(1, c.num_experts_per_tok), E = std::max(1, c.n_routed_experts),
                  G = std::max(1, c.n_group), nm = moe_layers;
    TeleLayout t{};
    int64_t at = 0;
    auto take = [&](int64_t bytes) {
        const int64_t p = at;
        at += align_up(bytes);
        return p;
    };
    t.ids = take(nm * n * k * 4);
    t.weights = take(nm * n * k * 4);
    t.kept = take(nm * n * G);
    t.counts = take(nm * E * 4);
    t.norms = take(int64_t(layers) * n * 4);
    t.scores = want_scores ? take(nm * n * E * 4) : -1;
    t.end = at;
    return t;
}

// The telemetry block the backend allocates: the larger of the main stack's and an MTP
// module's at a full chunk, with scores (the layout only grows with n and want_scores).
inline int64_t telemetry_bytes(const ModelConfig& c, const ActivationDims& a) {
    const int L = c.num_hidden_layers;
    int moe = 0;
    for (int l = 0; l < L; ++l) moe += stack_layer_is_moe(c, l);
    int64_t b = telemetry_layout(c, a.chunk, moe, L, true).end;
    if (c.num_nextn_predict_layers > 0)
        b = std::max(b, telemetry_layout(c, a.chunk, stack_layer_is_moe(c, L) ? 1 : 0, 1, true).end);
    return b;
}

inline constexpr int64_t kCublasWorkspace = 32ll << 20;
inline constexpr int64_t kFp8DequantBytes = 64ll << 20;  // bf16 weight rows of the FP8 prefill fallback

// Scratch of the FP8 prefill paths for GEMMs of at most `chunk` rows: quantized activations
// and their scales, an f32 output block (awkward row counts, split gate|up), the fallback's
// dequantized weight rows. Zero unless the plan is FP8.
struct Fp8ScratchSizes {
    int rows_pad = 0;     // chunk rounded up to 4 (cuBLASLt's scale tensor)
    int max_k = 0;        // widest FP8 input (columns)
    int max_out = 0;      // most FP8 output rows
    int64_t bytes = 0;
};

inline Fp8ScratchSizes fp8_scratch_sizes(const ModelConfig& c, const ActivationDims& a, WeightDtype d) {
    Fp8ScratchSizes z;
    if (d != WeightDtype::FP8) return z;
    for (const TensorSpec& t : device_tensors(c, ModelPresence{}))
        if (t.fp8) {
            z.max_k = std::max(z.max_k, int(t.cols));
            z.max_out = std::max(z.max_out, int(t.rows));
        }
    z.rows_pad = (a.chunk + 3) / 4 * 4;
    z.bytes = align_up(int64_t(z.rows_pad) * z.max_k) + align_up(fp8_cdiv(z.max_k, kFp8Block) * z.rows_pad * 4) +
              align_up(int64_t(z.rows_pad) * z.max_out * 4) + align_up(kFp8DequantBytes);
    return z;
}
inline constexpr int64_t kReserve = 512ll << 20;  // CUDA context, cuBLAS handles, fragmentation

struct MemoryPlan {
    int64_t weights = 0;      // arena 1: every device tensor
    int64_t cache = 0;        // arena 2: the main cache + one per MTP module, f32 latents
    int64_t activations = 0;  // arena 3: one forward chunk's buffers + telemetry + workspace
    int64_t reserve = kReserve;
    int64_t cache_per_position = 0;
    ActivationDims dims;
    int64_t total() const { return weights + cache + activations + reserve; }
};

// f32 latent cache of one stack of `layers` layers for `capacity` positions.
inline int64_t cache_bytes(const ModelConfig& c, int layers, int capacity) {
    return int64_t(layers) * align_up(int64_t(capacity) * c.kv_lora_rank * 4) +
           int64_t(layers) * align_up(int64_t(capacity) * c.qk_rope_head_dim * 4);
}

inline MemoryPlan plan_memory(const ModelConfig& c, const ModelPresence& p, WeightDtype dtype, int capacity) {
    MemoryPlan m;
    for (const TensorSpec& t : device_tensors(c, p)) m.weights += align_up(t.bytes(dtype));
    // Per MoE layer: two device tables of expert pointers, the router bias and the ablation (the
    // expert mask and drop_top); the rope frequencies.
    const int64_t E = c.n_routed_experts;
    for (int l = 0; l < c.num_hidden_layers + c.num_nextn_predict_layers; ++l)
        if (stack_layer_is_moe(c, l))
            m.weights += 2 * align_up(E * 8) + align_up(E * 4) + align_up(E + 1);
    m.weights += align_up(int64_t(c.qk_rope_head_dim / 2) * 4);
    m.cache_per_position = int64_t(c.num_hidden_layers + c.num_nextn_predict_layers) *
                           (c.kv_lora_rank + c.qk_rope_head_dim) * 4;
    m.cache = cache_bytes(c, c.num_hidden_layers, capacity) +
              int64_t(c.num_nextn_predict_layers) * cache_bytes(c, 1, capacity);
    m.dims = activation_dims(c, capacity);
    m.activations = activation_bytes(c, m.dims) + telemetry_bytes(c, m.dims) + kCublasWorkspace +
                    fp8_scratch_sizes(c, m.dims, dtype).bytes;
    return m;
}

inline std::string gib(int64_t b) {
    char s[32];
    std::snprintf(s, sizeof s, "%.2f GiB", double(b) / double(1ll << 30));
    return s;
}

// Throws DeviceError when the plan does not fit in `free_bytes` of the device.
inline void check_fits(const MemoryPlan& m, int64_t free_bytes, int64_t total_bytes, const std::string& device,
                       WeightDtype dtype, int capacity) {
    if (m.total() <= free_bytes) return;
    throw DeviceError("the model does not fit on " + device + ": it needs " + gib(m.total()) + " (weights " +
                      gib(m.weights) + " in " + weight_dtype_name(dtype) + ", latent cache " + gib(m.cache) +
                      " for " + std::to_string(capacity) + " positions, activations " + gib(m.activations) +
                      ", reserve " + gib(m.reserve) + ") but only " + gib(free_bytes) + " of " + gib(total_bytes) +
                      " are free");
}

}  // namespace moescope::cuda
