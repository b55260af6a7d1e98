// The tensor table, checkpoint loading with shape checks and FP8 block dequantization, saving.
#include "engine/weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

const char* storage_name(WeightStorage s) {
    switch (s) {
        case WeightStorage::F32: return "f32";
        case WeightStorage::BF16: return "bf16";
        case WeightStorage::Auto: return "auto";
    }
    return "?";
}

WeightStorage storage_from_string(const std::string& s) {
    if (s == "f32") return WeightStorage::F32;
    if (s == "bf16") return WeightStorage::BF16;
    if (s == "auto") return WeightStorage::Auto;
    throw ConfigError("weight storage '" + s + "': expected f32, bf16 or auto");
}

void Tensor::throw_bf16_read() const {
    throw Error("a BF16-stored weight of shape " + shape_str(shape) +
                " was read as f32 (this code path needs f32 weights: load with WeightStorage::F32)");
}

void Tensor::copy_row(float* out, int64_t r) const {
    const int64_t cols = shape.size() == 2 ? shape[1] : numel();
    if (is_bf16()) {
        const uint16_t* src = bf16.data() + size_t(r * cols);
        for (int64_t i = 0; i < cols; ++i) out[i] = bf16_to_f32(src[i]);
    } else {
        std::copy(data.begin() + r * cols, data.begin() + (r + 1) * cols, out);
    }
}

std::vector<float> Tensor::to_f32() const {
    if (!is_bf16()) return data;
    std::vector<float> v(bf16.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(bf16[i]);
    return v;
}

void Tensor::store_bf16() {
    if (is_bf16() || data.empty()) return;
    bf16.resize(data.size());
    for (size_t i = 0; i < data.size(); ++i) bf16[i] = f32_to_bf16(data[i]);
    std::vector<float>().swap(data);
    std::vector<float>().swap(block_scale);
}

void Tensor::store_f32() {
    if (!is_bf16()) return;
    data = to_f32();
    std::vector<uint16_t>().swap(bf16);
}

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
    for (auto& nt : out) {
        auto ends = [&](const char* suffix) {
            const std::string sfx(suffix);
            return nt.name.size() >= sfx.size() && nt.name.compare(nt.name.size() - sfx.size(), sfx.size(), sfx) == 0;
        };
        nt.bf16_storable = nt.quantizable || ends("embed_tokens.weight") || ends("lm_head.weight") ||
                           ends("shared_head.head.weight");
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

Weights load_weights(const ModelConfig& cfg, const Checkpoint& ck, WeightStorage storage) {
    if (storage == WeightStorage::Auto) storage = resolve_storage(storage, cfg, ck);
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
        const bool keep_bf16 = storage == WeightStorage::BF16 && nt.bf16_storable;
        if (keep_bf16 && t->dtype == DType::BF16) {
            // The checkpoint's bits as they are: no f32 copy of the largest tensors ever exists.
            nt.tensor->bf16.resize(size_t(t->numel()));
            std::memcpy(nt.tensor->bf16.data(), t->data, size_t(t->numel()) * 2);
            continue;
        }
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
        if (keep_bf16) nt.tensor->store_bf16();  // one tensor's f32 copy at a time
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
        if (format == SaveFormat::BF16 && t.is_bf16()) {  // BF16-stored values as they are
            TensorToWrite tw;
            tw.name = nt.name;
            tw.dtype = DType::BF16;
            tw.shape = t.shape;
            tw.bytes.resize(t.bf16.size() * 2);
            std::memcpy(tw.bytes.data(), t.bf16.data(), tw.bytes.size());
            tensors.push_back(std::move(tw));
            continue;
        }
        // Every other case encodes f32 values (BF16-stored ones widened, exactly).
        std::vector<float> wide;
        if (t.is_bf16()) wide = t.to_f32();
        const float* v = t.is_bf16() ? wide.data() : t.data.data();
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
                            amax = std::max(amax, std::fabs(v[size_t(r * cols + cc)]));
                    float s = amax > 0 ? amax / 448.0f : 1.0f;
                    scale[size_t(bi * sc + bj)] = s;
                    for (int64_t r = bi * blk; r < std::min(rows, (bi + 1) * blk); ++r)
                        for (int64_t cc = bj * blk; cc < std::min(cols, (bj + 1) * blk); ++cc)
                            q[size_t(r * cols + cc)] = v[size_t(r * cols + cc)] / s;
                }
            tensors.push_back(make_tensor(nt.name, DType::F8_E4M3, t.shape, q.data()));
            tensors.push_back(make_tensor(scale_name(nt.name), DType::F32, {sr, sc}, scale.data()));
        } else {
            DType dt = format == SaveFormat::F32 ? DType::F32 : DType::BF16;
            if (t.shape.size() == 1) dt = DType::F32;  // norms and biases stay exact
            tensors.push_back(make_tensor(nt.name, dt, t.shape, v));
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

WeightStorage resolve_storage(WeightStorage requested, const ModelConfig& cfg, const Checkpoint& ck) {
    if (requested != WeightStorage::Auto) return requested;
    const ModelCard card = model_card(cfg);
    if (card.total_params + card.mtp_params <= kAutoBf16Params) return WeightStorage::F32;
    // Only when every storable tensor is BF16 in the file: Auto never rounds a value.
    Weights w;
    bool any = false;
    for (const auto& nt : tensor_table(w, cfg)) {
        if (!nt.bf16_storable) continue;
        const TensorInfo* t = ck.find(nt.name);
        if (!t) continue;
        if (t->dtype != DType::BF16) return WeightStorage::F32;
        any = true;
    }
    return any ? WeightStorage::BF16 : WeightStorage::F32;
}

namespace {

WeightMemory summarize(int64_t bf16_params, int64_t f32_params, int64_t storable_f32_params) {
    WeightMemory m;
    m.bf16_params = bf16_params;
    m.f32_params = f32_params;
    m.bytes = 2 * bf16_params + 4 * f32_params;
    m.storage = bf16_params == 0 ? "f32" : storable_f32_params == 0 ? "bf16" : "mixed";
    return m;
}

}  // namespace

WeightMemory weight_memory(const Weights& w, const ModelConfig& cfg) {
    int64_t b = 0, f = 0, sf = 0;
    // tensor_table only hands out pointers into w; nothing is written.
    for (const auto& nt : tensor_table(const_cast<Weights&>(w), cfg)) {
        const Tensor& t = *nt.tensor;
        if (t.is_bf16()) b += t.numel();
        else {
            f += t.numel();
            if (nt.bf16_storable) sf += t.numel();
        }
    }
    return summarize(b, f, sf);
}

WeightMemory planned_weight_memory(const ModelConfig& cfg, const Checkpoint& ck, WeightStorage resolved) {
    if (resolved == WeightStorage::Auto) resolved = resolve_storage(resolved, cfg, ck);
    int64_t b = 0, f = 0;
    Weights w;
    for (const auto& nt : tensor_table(w, cfg)) {
        if (nt.optional && !ck.find(nt.name)) continue;
        int64_t n = 1;
        for (auto d : nt.shape) n *= d;
        (resolved == WeightStorage::BF16 && nt.bf16_storable ? b : f) += n;
    }
    return summarize(b, f, resolved == WeightStorage::BF16 ? 0 : b + f);
}

void convert_storage(Weights& w, const ModelConfig& cfg, WeightStorage s) {
    if (s == WeightStorage::Auto) throw ConfigError("convert_storage: give f32 or bf16, not auto");
    for (auto& nt : tensor_table(w, cfg)) {
        if (!nt.bf16_storable) continue;
        if (s == WeightStorage::BF16) nt.tensor->store_bf16();
        else nt.tensor->store_f32();
    }
}

}  // namespace moescope
