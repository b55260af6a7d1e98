// The tensor table, checkpoint loading with shape checks and FP8 block dequantization, saving.
#include "engine/weights.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <sstream>

#include "engine/errors.h"
#include "engine/safetensors.h"

namespace moescope {
namespace {

struct TableBuilder {
    std::vector<NamedTensor>& out;
    void add(const std::string& name, Tensor& t, std::vector<int64_t> shape, std::string expr,
             bool optional = false, bool quantizable = false) {
        out.push_back(NamedTensor{name, &t, std::move(shape), std::move(expr), optional, quantizable});
    }
    void mlp(const std::string& p, MlpWeights& m, int64_t D, int64_t I, const std::string& iexpr) {
        add(p + "gate_proj.weight", m.gate_proj, {I, D}, "[" + iexpr + ", hidden_size]", false, true);
        add(p + "up_proj.weight", m.up_proj, {I, D}, "[" + iexpr + ", hidden_size]", false, true);
        add(p + "down_proj.weight", m.down_proj, {D, I}, "[hidden_size, " + iexpr + "]", false, true);
    }
    void layer(const std::string& p, LayerWeights& L, const ModelConfig& c, bool moe) {
        const int64_t D = c.hidden_size, H = c.num_attention_heads, dq = c.qk_head_dim();
        L.is_moe = moe;
        add(p + "input_layernorm.weight", L.input_layernorm, {D}, "[hidden_size]");
        auto& a = L.attn;
        const std::string sa = p + "self_attn.";
        if (c.q_lora_rank > 0) {
            add(sa + "q_a_proj.weight", a.q_a_proj, {c.q_lora_rank, D}, "[q_lora_rank, hidden_size]", false, true);
            add(sa + "q_a_layernorm.weight", a.q_a_layernorm, {c.q_lora_rank}, "[q_lora_rank]");
            add(sa + "q_b_proj.weight", a.q_b_proj, {H * dq, c.q_lora_rank},
                "[num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank]", false, true);
        } else {
            add(sa + "q_proj.weight", a.q_proj, {H * dq, D},
                "[num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), hidden_size]", false, true);
        }
        add(sa + "kv_a_proj_with_mqa.weight", a.kv_a_proj_with_mqa, {c.kv_lora_rank + c.qk_rope_head_dim, D},
            "[kv_lora_rank + qk_rope_head_dim, hidden_size]", false, true);
        add(sa + "kv_a_layernorm.weight", a.kv_a_layernorm, {c.kv_lora_rank}, "[kv_lora_rank]");
        add(sa + "kv_b_proj.weight", a.kv_b_proj, {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank},
            "[num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]", false, true);
        add(sa + "o_proj.weight", a.o_proj, {D, H * c.v_head_dim}, "[hidden_size, num_attention_heads * v_head_dim]",
            false, true);
        add(p + "post_attention_layernorm.weight", L.post_attention_layernorm, {D}, "[hidden_size]");
        if (!moe) {
            mlp(p + "mlp.", L.mlp, D, c.intermediate_size, "intermediate_size");
            return;
        }
        auto& m = L.moe;
        add(p + "mlp.gate.weight", m.gate, {c.n_routed_experts, D}, "[n_routed_experts, hidden_size]");
        if (c.has_bias())
            add(p + "mlp.gate.e_score_correction_bias", m.e_score_correction_bias, {c.n_routed_experts},
                "[n_routed_experts]");
        m.experts.resize(size_t(c.n_routed_experts));
        for (int e = 0; e < c.n_routed_experts; ++e)
            mlp(p + "mlp.experts." + std::to_string(e) + ".", m.experts[size_t(e)], D, c.moe_intermediate_size,
                "moe_intermediate_size");
        if (c.n_shared_experts > 0)
            mlp(p + "mlp.shared_experts.", m.shared, D, int64_t(c.moe_intermediate_size) * c.n_shared_experts,
                "moe_intermediate_size * n_shared_experts");
    }
};

std::string shape_str(const std::vector<int64_t>& s) {
    std::string o = "[";
    for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
}

std::string scale_name(const std::string& weight_name) {
    // "...proj.weight" -> "...proj.weight_scale_inv"
    return weight_name + "_scale_inv";
}

}  // namespace

std::vector<NamedTensor> tensor_table(Weights& w, const ModelConfig& c) {
    std::vector<NamedTensor> out;
    TableBuilder b{out};
    const int64_t V = c.vocab_size, D = c.hidden_size;
    b.add("model.embed_tokens.weight", w.embed_tokens, {V, D}, "[vocab_size, hidden_size]");
    w.layers.resize(size_t(c.num_hidden_layers));
    for (int l = 0; l < c.num_hidden_layers; ++l)
        b.layer("model.layers." + std::to_string(l) + ".", w.layers[size_t(l)], c, c.is_moe_layer(l));
    b.add("model.norm.weight", w.norm, {D}, "[hidden_size]");
    if (!c.tie_word_embeddings) b.add("lm_head.weight", w.lm_head, {V, D}, "[vocab_size, hidden_size]", false, false);
    w.mtp.resize(size_t(c.num_nextn_predict_layers));
    for (int k = 0; k < c.num_nextn_predict_layers; ++k) {
        auto& m = w.mtp[size_t(k)];
        const std::string p = "model.layers." + std::to_string(c.num_hidden_layers + k) + ".";
        b.add(p + "embed_tokens.weight", m.embed_tokens, {V, D}, "[vocab_size, hidden_size]", true);
        b.add(p + "enorm.weight", m.enorm, {D}, "[hidden_size]");
        b.add(p + "hnorm.weight", m.hnorm, {D}, "[hidden_size]");
        b.add(p + "eh_proj.weight", m.eh_proj, {D, 2 * D}, "[hidden_size, 2 * hidden_size]", false, true);
        b.layer(p, m.layer, c, c.n_routed_experts > 0);
        b.add(p + "shared_head.norm.weight", m.shared_head_norm, {D}, "[hidden_size]");
        b.add(p + "shared_head.head.weight", m.shared_head_head, {V, D}, "[vocab_size, hidden_size]", true);
    }
    return out;
}

Weights allocate_weights(const ModelConfig& cfg) {
    Weights w;
    for (auto& nt : tensor_table(w, cfg)) {
        if (nt.optional) continue;
        int64_t n = 1;
        for (auto d : nt.shape) n *= d;
        nt.tensor->shape = nt.shape;
        nt.tensor->data.assign(size_t(n), 0.0f);
    }
    return w;
}

void dequantize_fp8_blocks(const uint8_t* q, const float* scale_inv, int64_t rows, int64_t cols, int br, int bc,
                           float* out) {
    const int64_t scols = (cols + bc - 1) / bc;
    float lut[256];
    for (int i = 0; i < 256; ++i) lut[i] = fp8_e4m3_to_f32(uint8_t(i));
    for (int64_t r = 0; r < rows; ++r) {
        const float* srow = scale_inv + (r / br) * scols;
        for (int64_t cidx = 0; cidx < cols; ++cidx) out[r * cols + cidx] = lut[q[r * cols + cidx]] * srow[cidx / bc];
    }
}

Weights load_weights(const ModelConfig& cfg, const Checkpoint& ck) {
    Weights w;
    auto table = tensor_table(w, cfg);
    std::set<std::string> used;
    std::vector<std::string> missing, problems;
    const int br = cfg.quantization ? cfg.quantization->block_rows : 128;
    const int bc = cfg.quantization ? cfg.quantization->block_cols : 128;
    for (auto& nt : table) {
        const TensorInfo* t = ck.find(nt.name);
        if (!t) {
            if (!nt.optional) missing.push_back(nt.name);
            continue;
        }
        used.insert(nt.name);
        if (t->shape != nt.shape) {
            throw ShapeError(t->file + ": tensor '" + nt.name + "' has shape " + shape_str(t->shape) + ", expected " +
                             nt.shape_expr + " = " + shape_str(nt.shape));
        }
        nt.tensor->shape = nt.shape;
        nt.tensor->data.resize(size_t(t->numel()));
        if (t->dtype == DType::F8_E4M3) {
            const std::string sn = scale_name(nt.name);
            const TensorInfo* s = ck.find(sn);
            if (!s) throw FormatError(t->file + ": FP8 tensor '" + nt.name + "' has no block scale '" + sn + "'");
            used.insert(sn);
            if (nt.shape.size() != 2)
                throw ShapeError(t->file + ": FP8 tensor '" + nt.name + "' is not a matrix");
            const int64_t rows = nt.shape[0], cols = nt.shape[1];
            std::vector<int64_t> want{(rows + br - 1) / br, (cols + bc - 1) / bc};
            if (s->shape != want)
                throw ShapeError(s->file + ": scale '" + sn + "' has shape " + shape_str(s->shape) + ", expected " +
                                 shape_str(want) + " for " + std::to_string(br) + "x" + std::to_string(bc) + " blocks");
            std::vector<float> scale(size_t(s->numel()));
            convert_to_f32(*s, scale.data());
            dequantize_fp8_blocks(t->data, scale.data(), rows, cols, br, bc, nt.tensor->ptr());
            if (br == 128 && bc == 128) nt.tensor->block_scale = std::move(scale);
        } else if (t->dtype == DType::F32 || t->dtype == DType::BF16 || t->dtype == DType::F16) {
            convert_to_f32(*t, nt.tensor->ptr());
        } else {
            throw FormatError(t->file + ": tensor '" + nt.name + "' has dtype " + dtype_name(t->dtype) +
                              ", expected a floating-point type");
        }
    }
    std::vector<std::string> unexpected;
    for (const auto& n : ck.names()) {
        if (used.count(n)) continue;
        if (n.size() > 16 && n.compare(n.size() - 16, 16, "rotary_emb.inv_freq") == 0) continue;
        if (n.find("rotary_emb.inv_freq") != std::string::npos) continue;
        // MTP layers beyond the configured depth and their scales are tolerated only if declared.
        unexpected.push_back(n);
    }
    if (!missing.empty() || !unexpected.empty()) {
        std::ostringstream o;
        o << (ck.files().empty() ? std::string("checkpoint") : ck.files().front())
          << ": the tensors do not match the config (" << cfg.source << ")";
        auto list = [&](const char* what, const std::vector<std::string>& v) {
            if (v.empty()) return;
            o << "; " << v.size() << " " << what << ": ";
            for (size_t i = 0; i < v.size() && i < 12; ++i) o << (i ? ", " : "") << v[i];
            if (v.size() > 12) o << ", ...";
        };
        list("missing", missing);
        list("unexpected", unexpected);
        throw ShapeError(o.str());
    }
    return w;
}

void save_checkpoint(const std::filesystem::path& dir, const ModelConfig& cfg_in, Weights& w, SaveFormat format,
                     int64_t max_shard_bytes) {
    namespace fs = std::filesystem;
    fs::create_directories(dir);
    ModelConfig cfg = cfg_in;
    const int blk = 128;
    if (format == SaveFormat::FP8) {
        cfg.quantization = Fp8Quantization{};
    } else {
        cfg.quantization.reset();
    }
    std::vector<TensorToWrite> tensors;
    for (auto& nt : tensor_table(w, cfg)) {
        Tensor& t = *nt.tensor;
        if (t.empty()) continue;
        if (format == SaveFormat::FP8 && nt.quantizable) {
            // Scale each 128x128 block so that its largest magnitude maps to 448.
            const int64_t rows = t.shape[0], cols = t.shape[1];
            const int64_t sr = (rows + blk - 1) / blk, sc = (cols + blk - 1) / blk;
            std::vector<float> scale(size_t(sr * sc)), q(size_t(rows * cols));
            for (int64_t bi = 0; bi < sr; ++bi)
                for (int64_t bj = 0; bj < sc; ++bj) {
                    float amax = 0;
                    for (int64_t r = bi * blk; r < std::min(rows, (bi + 1) * blk); ++r)
                        for (int64_t cc = bj * blk; cc < std::min(cols, (bj + 1) * blk); ++cc)
                            amax = std::max(amax, std::fabs(t.data[size_t(r * cols + cc)]));
                    float s = amax > 0 ? amax / 448.0f : 1.0f;
                    scale[size_t(bi * sc + bj)] = s;
                    for (int64_t r = bi * blk; r < std::min(rows, (bi + 1) * blk); ++r)
                        for (int64_t cc = bj * blk; cc < std::min(cols, (bj + 1) * blk); ++cc)
                            q[size_t(r * cols + cc)] = t.data[size_t(r * cols + cc)] / s;
                }
            tensors.push_back(make_tensor(nt.name, DType::F8_E4M3, t.shape, q.data()));
            tensors.push_back(make_tensor(scale_name(nt.name), DType::F32, {sr, sc}, scale.data()));
        } else {
            DType dt = format == SaveFormat::F32 ? DType::F32 : DType::BF16;
            if (t.shape.size() == 1) dt = DType::F32;  // norms and biases stay exact
            tensors.push_back(make_tensor(nt.name, dt, t.shape, t.ptr()));
        }
    }
    if (max_shard_bytes <= 0) {
        write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
        if (fs::exists(dir / "model.safetensors.index.json")) fs::remove(dir / "model.safetensors.index.json");
    } else {
        std::vector<std::vector<TensorToWrite>> shards(1);
        int64_t cur = 0;
        for (auto& t : tensors) {
            if (cur > 0 && cur + int64_t(t.bytes.size()) > max_shard_bytes) {
                shards.emplace_back();
                cur = 0;
            }
            cur += int64_t(t.bytes.size());
            shards.back().push_back(std::move(t));
        }
        nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
        for (size_t i = 0; i < shards.size(); ++i) {
            char name[64];
            std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
            for (const auto& t : shards[i]) index["weight_map"][t.name] = name;
            write_safetensors(dir / name, shards[i], {{"format", "pt"}});
        }
        write_file_atomic(dir / "model.safetensors.index.json", index.dump(2));
        if (fs::exists(dir / "model.safetensors")) fs::remove(dir / "model.safetensors");
    }
    nlohmann::json cj = cfg.to_json();
    if (format != SaveFormat::FP8) cj.erase("quantization_config");
    cj["torch_dtype"] = format == SaveFormat::F32 ? "float32" : "bfloat16";
    write_file_atomic(dir / "config.json", cj.dump(2));
}

}  // namespace moescope
