// config.json -> ModelConfig, validation, and the model card arithmetic.
#include "engine/config.h"

#include <cmath>
#include <limits>
#include <fstream>
#include <sstream>

#include "engine/errors.h"
#include "engine/json_file.h"

namespace moescope {
namespace {

using nlohmann::json;

class FieldReader {
public:
    // prefix names the enclosing object ("rope_scaling.") so nested fields are reported in full.
    FieldReader(const json& j, const std::string& source, std::string prefix = "")
        : j_(j), source_(source), prefix_(std::move(prefix)) {}

    [[noreturn]] void fail(const std::string& field, const std::string& what) const {
        throw ConfigError(source_ + ": field '" + prefix_ + field + "' " + what);
    }
    bool present(const char* f) const { return j_.contains(f) && !j_[f].is_null(); }

    int integer(const char* f) const {
        if (!present(f)) fail(f, "is missing");
        const json& v = j_[f];
        // Whole numbers written as integers or as floats (1e3), within int's range: a larger
        // value would wrap (or, from a double, be undefined) instead of being refused.
        double d = 0;
        if (v.is_number_unsigned()) d = double(v.get<uint64_t>());
        else if (v.is_number_integer()) d = double(v.get<int64_t>());
        else if (v.is_number_float()) d = v.get<double>();
        else fail(f, "must be an integer, found " + v.dump());
        if (std::floor(d) != d) fail(f, "must be an integer, found " + v.dump());
        if (d < double(std::numeric_limits<int>::min()) || d > double(std::numeric_limits<int>::max()))
            fail(f, "is out of range, found " + v.dump());
        return static_cast<int>(d);
    }
    int integer(const char* f, int fallback) const { return present(f) ? integer(f) : fallback; }
    double number(const char* f) const {
        if (!present(f)) fail(f, "is missing");
        if (!j_[f].is_number()) fail(f, "must be a number, found " + j_[f].dump());
        return j_[f].get<double>();
    }
    double number(const char* f, double fallback) const { return present(f) ? number(f) : fallback; }
    bool boolean(const char* f, bool fallback) const {
        if (!present(f)) return fallback;
        if (!j_[f].is_boolean()) fail(f, "must be true or false, found " + j_[f].dump());
        return j_[f].get<bool>();
    }
    std::string string(const char* f, const std::string& fallback) const {
        if (!present(f)) return fallback;
        if (!j_[f].is_string()) fail(f, "must be a string, found " + j_[f].dump());
        return j_[f].get<std::string>();
    }

private:
    const json& j_;
    const std::string& source_;
    std::string prefix_;
};

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& source) {
    if (!j.is_object()) throw ConfigError(source + ": not a JSON object");
    ModelConfig c;
    c.source = source;
    c.raw = j;
    FieldReader r(j, source);
    if (r.present("architectures")) {
        if (!j["architectures"].is_array()) r.fail("architectures", "must be a list of strings");
        for (const auto& a : j["architectures"]) {
            if (!a.is_string()) r.fail("architectures", "must be a list of strings");
            c.architectures.push_back(a.get<std::string>());
        }
    }
    c.model_type = r.string("model_type", "");
    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("hidden_size");
    c.intermediate_size = r.integer("intermediate_size");
    c.num_hidden_layers = r.integer("num_hidden_layers");
    c.num_attention_heads = r.integer("num_attention_heads");
    c.num_key_value_heads = r.integer("num_key_value_heads", c.num_attention_heads);
    c.kv_lora_rank = r.integer("kv_lora_rank");
    c.q_lora_rank = r.integer("q_lora_rank", 0);  // null: no q compression (V2-Lite)
    c.qk_nope_head_dim = r.integer("qk_nope_head_dim");
    c.qk_rope_head_dim = r.integer("qk_rope_head_dim");
    c.v_head_dim = r.integer("v_head_dim");
    c.max_position_embeddings = r.integer("max_position_embeddings");
    c.num_nextn_predict_layers = r.integer("num_nextn_predict_layers", 0);
    c.n_routed_experts = r.integer("n_routed_experts", 0);  // null: a dense model
    if (c.n_routed_experts > 0) {
        c.moe_intermediate_size = r.integer("moe_intermediate_size");
        c.num_experts_per_tok = r.integer("num_experts_per_tok");
        c.n_shared_experts = r.integer("n_shared_experts", 0);
        c.routed_scaling_factor = r.number("routed_scaling_factor", 1.0);
        c.topk_method = r.string("topk_method", "greedy");
        c.n_group = r.integer("n_group", 1);
        c.topk_group = r.integer("topk_group", 1);
        c.moe_layer_freq = r.integer("moe_layer_freq", 1);
        c.first_k_dense_replace = r.integer("first_k_dense_replace", 0);
        c.norm_topk_prob = r.boolean("norm_topk_prob", false);
        c.scoring_func = r.string("scoring_func", "softmax");
    }
    c.hidden_act = r.string("hidden_act", "silu");
    c.rope_theta = r.number("rope_theta", 10000.0);
    c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
    c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
    c.attention_bias = r.boolean("attention_bias", false);
    if (r.present("bos_token_id")) c.bos_token_id = r.integer("bos_token_id");
    if (r.present("eos_token_id") && j["eos_token_id"].is_number()) c.eos_token_id = r.integer("eos_token_id");

    if (r.present("rope_scaling")) {
        const json& rs = j["rope_scaling"];
        if (!rs.is_object()) r.fail("rope_scaling", "must be an object or null");
        FieldReader s(rs, source, "rope_scaling.");
        RopeScaling y;
        y.type = s.string("type", s.string("rope_type", ""));
        if (y.type != "yarn")
            r.fail("rope_scaling.type", "'" + y.type + "' is not supported (DeepSeek models use \"yarn\")");
        y.factor = s.number("factor");
        y.original_max_position_embeddings = s.integer("original_max_position_embeddings");
        y.beta_fast = s.number("beta_fast", 32.0);
        y.beta_slow = s.number("beta_slow", 1.0);
        y.mscale = s.number("mscale", 1.0);
        y.mscale_all_dim = s.number("mscale_all_dim", 0.0);
        c.rope_scaling = y;
    }
    if (r.present("quantization_config")) {
        const json& q = j["quantization_config"];
        if (!q.is_object()) r.fail("quantization_config", "must be an object");
        FieldReader s(q, source, "quantization_config.");
        Fp8Quantization f;
        f.quant_method = s.string("quant_method", "");
        f.fmt = s.string("fmt", "e4m3");
        if (f.quant_method != "fp8")
            r.fail("quantization_config.quant_method", "'" + f.quant_method + "' is not supported (only \"fp8\")");
        if (f.fmt != "e4m3") r.fail("quantization_config.fmt", "'" + f.fmt + "' is not supported (only \"e4m3\")");
        if (q.contains("weight_block_size")) {
            const json& b = q["weight_block_size"];
            if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer())
                r.fail("quantization_config.weight_block_size", "must be [rows, cols]");
            f.block_rows = b[0].get<int>();
            f.block_cols = b[1].get<int>();
        }
        c.quantization = f;
    }
    c.validate();
    return c;
}

ModelConfig ModelConfig::load(const std::filesystem::path& path) {
    std::filesystem::path file = path;
    if (std::filesystem::is_directory(path)) file = path / "config.json";
    json j = read_json_file<ConfigError>(file);
    return from_json(j, file.string());
}

void ModelConfig::validate() const {
    auto fail = [&](const std::string& field, const std::string& what) {
        throw ConfigError(source + ": field '" + field + "' " + what);
    };
    static const char* known_arch[] = {"DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"};
    for (const auto& a : architectures) {
        bool ok = false;
        for (auto k : known_arch) ok |= a == k;
        if (!ok)
            fail("architectures", "names '" + a +
                 "', which moescope does not run (it runs DeepseekV3ForCausalLM and DeepseekV2ForCausalLM)");
    }
    if (!model_type.empty() && model_type != "deepseek_v3" && model_type != "deepseek_v2")
        fail("model_type", "is '" + model_type + "'; moescope runs deepseek_v3 and deepseek_v2 models");
    auto positive = [&](const char* f, int v) {
        if (v <= 0) fail(f, "must be positive, found " + std::to_string(v));
    };
    positive("vocab_size", vocab_size);
    positive("hidden_size", hidden_size);
    positive("intermediate_size", intermediate_size);
    positive("num_hidden_layers", num_hidden_layers);
    positive("num_attention_heads", num_attention_heads);
    positive("kv_lora_rank", kv_lora_rank);
    positive("qk_rope_head_dim", qk_rope_head_dim);
    positive("v_head_dim", v_head_dim);
    positive("max_position_embeddings", max_position_embeddings);
    if (qk_nope_head_dim < 0) fail("qk_nope_head_dim", "must not be negative");
    if (q_lora_rank < 0) fail("q_lora_rank", "must be positive or null");
    if (num_nextn_predict_layers < 0) fail("num_nextn_predict_layers", "must not be negative");
    if (qk_rope_head_dim % 2) fail("qk_rope_head_dim", "must be even (rope rotates pairs)");
    if (hidden_act != "silu") fail("hidden_act", "is '" + hidden_act + "'; only \"silu\" is supported");
    if (!(rms_norm_eps > 0)) fail("rms_norm_eps", "must be positive");
    if (!(rope_theta > 0)) fail("rope_theta", "must be positive");
    if (n_routed_experts < 0) fail("n_routed_experts", "must not be negative");
    if (n_routed_experts > 0) {
        positive("moe_intermediate_size", moe_intermediate_size);
        positive("num_experts_per_tok", num_experts_per_tok);
        positive("n_group", n_group);
        positive("topk_group", topk_group);
        positive("moe_layer_freq", moe_layer_freq);
        if (n_shared_experts < 0) fail("n_shared_experts", "must not be negative");
        if (first_k_dense_replace < 0) fail("first_k_dense_replace", "must not be negative");
        if (num_experts_per_tok > n_routed_experts)
            fail("num_experts_per_tok", "(" + std::to_string(num_experts_per_tok) +
                 ") exceeds n_routed_experts (" + std::to_string(n_routed_experts) + ")");
        if (scoring_func != "sigmoid" && scoring_func != "softmax")
            fail("scoring_func", "is '" + scoring_func + "'; expected \"sigmoid\" or \"softmax\"");
        if (topk_method != "greedy" && topk_method != "group_limited_greedy" && topk_method != "noaux_tc")
            fail("topk_method", "is '" + topk_method +
                 "'; expected \"greedy\", \"group_limited_greedy\" or \"noaux_tc\"");
        if (topk_method != "greedy") {
            if (n_routed_experts % n_group)
                fail("n_group", "(" + std::to_string(n_group) + ") does not divide n_routed_experts (" +
                     std::to_string(n_routed_experts) + ")");
            if (topk_group > n_group)
                fail("topk_group", "(" + std::to_string(topk_group) + ") exceeds n_group (" +
                     std::to_string(n_group) + ")");
            int group_size = n_routed_experts / n_group;
            if (num_experts_per_tok > topk_group * group_size)
                fail("num_experts_per_tok", "(" + std::to_string(num_experts_per_tok) +
                     ") exceeds the experts in the kept groups (topk_group * group size = " +
                     std::to_string(topk_group * group_size) + ")");
            if (topk_method == "noaux_tc" && group_size < 2)
                fail("n_group", "leaves groups of one expert; noaux_tc scores a group by its two best");
        }
        if (!(routed_scaling_factor > 0)) fail("routed_scaling_factor", "must be positive");
    }
    if (rope_scaling) {
        if (!(rope_scaling->factor >= 1.0)) fail("rope_scaling.factor", "must be at least 1");
        if (rope_scaling->original_max_position_embeddings <= 0)
            fail("rope_scaling.original_max_position_embeddings", "must be positive");
        if (!(rope_scaling->beta_fast > 0) || !(rope_scaling->beta_slow > 0))
            fail("rope_scaling.beta_fast", "beta_fast and beta_slow must be positive");
    }
    if (quantization && (quantization->block_rows <= 0 || quantization->block_cols <= 0))
        fail("quantization_config.weight_block_size", "must be positive");
}

int ModelConfig::num_moe_layers() const {
    int n = 0;
    for (int l = 0; l < num_hidden_layers; ++l) n += is_moe_layer(l);
    return n;
}

static double yarn_mscale(double s, double m) { return s <= 1.0 ? 1.0 : 0.1 * m * std::log(s) + 1.0; }

double ModelConfig::softmax_scale() const {
    double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
    if (rope_scaling && rope_scaling->mscale_all_dim != 0.0) {
        double m = yarn_mscale(rope_scaling->factor, rope_scaling->mscale_all_dim);
        scale *= m * m;
    }
    return scale;
}

json ModelConfig::to_json() const {
    json j = raw.is_object() ? raw : json::object();
    j["architectures"] = architectures.empty() ? std::vector<std::string>{"DeepseekV3ForCausalLM"} : architectures;
    j["model_type"] = model_type.empty() ? "deepseek_v3" : model_type;
    j["vocab_size"] = vocab_size;
    j["hidden_size"] = hidden_size;
    j["intermediate_size"] = intermediate_size;
    j["moe_intermediate_size"] = moe_intermediate_size;
    j["num_hidden_layers"] = num_hidden_layers;
    j["num_nextn_predict_layers"] = num_nextn_predict_layers;
    j["num_attention_heads"] = num_attention_heads;
    j["num_key_value_heads"] = num_key_value_heads;
    j["n_shared_experts"] = n_shared_experts;
    j["n_routed_experts"] = n_routed_experts > 0 ? json(n_routed_experts) : json(nullptr);
    j["routed_scaling_factor"] = routed_scaling_factor;
    j["kv_lora_rank"] = kv_lora_rank;
    j["q_lora_rank"] = q_lora_rank > 0 ? json(q_lora_rank) : json(nullptr);
    j["qk_nope_head_dim"] = qk_nope_head_dim;
    j["qk_rope_head_dim"] = qk_rope_head_dim;
    j["v_head_dim"] = v_head_dim;
    j["topk_method"] = topk_method;
    j["n_group"] = n_group;
    j["topk_group"] = topk_group;
    j["num_experts_per_tok"] = num_experts_per_tok;
    j["moe_layer_freq"] = moe_layer_freq;
    j["first_k_dense_replace"] = first_k_dense_replace;
    j["norm_topk_prob"] = norm_topk_prob;
    j["scoring_func"] = scoring_func;
    j["hidden_act"] = hidden_act;
    j["max_position_embeddings"] = max_position_embeddings;
    j["rope_theta"] = rope_theta;
    if (rope_scaling) {
        j["rope_scaling"] = {{"type", rope_scaling->type},
                             {"factor", rope_scaling->factor},
                             {"original_max_position_embeddings", rope_scaling->original_max_position_embeddings},
                             {"beta_fast", rope_scaling->beta_fast},
                             {"beta_slow", rope_scaling->beta_slow},
                             {"mscale", rope_scaling->mscale},
                             {"mscale_all_dim", rope_scaling->mscale_all_dim}};
    } else {
        j["rope_scaling"] = nullptr;
    }
    j["rms_norm_eps"] = rms_norm_eps;
    j["tie_word_embeddings"] = tie_word_embeddings;
    j["attention_bias"] = attention_bias;
    if (bos_token_id) j["bos_token_id"] = *bos_token_id;
    if (eos_token_id) j["eos_token_id"] = *eos_token_id;
    if (quantization) {
        j["quantization_config"] = {{"quant_method", quantization->quant_method},
                                    {"fmt", quantization->fmt},
                                    {"weight_block_size", {quantization->block_rows, quantization->block_cols}}};
    } else {
        j.erase("quantization_config");
    }
    return j;
}

// ---- model card ---------------------------------------------------------------------

namespace {

struct LayerCount {
    int64_t attention = 0, norms = 0, dense = 0, router = 0, routed = 0, shared = 0, active_routed = 0;
    int64_t total() const { return attention + norms + dense + router + routed + shared; }
    int64_t active() const { return attention + norms + dense + router + shared + active_routed; }
};

LayerCount count_layer(const ModelConfig& c, bool moe) {
    const int64_t D = c.hidden_size, H = c.num_attention_heads, dq = c.qk_head_dim();
    LayerCount n;
    if (c.q_lora_rank > 0)
        n.attention += D * c.q_lora_rank + c.q_lora_rank + int64_t(c.q_lora_rank) * H * dq;
    else
        n.attention += D * H * dq;
    n.attention += D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank;
    n.attention += int64_t(c.kv_lora_rank) * H * (c.qk_nope_head_dim + c.v_head_dim);
    n.attention += H * c.v_head_dim * D;
    n.norms = 2 * D;
    if (moe) {
        const int64_t expert = 3 * D * c.moe_intermediate_size;
        n.router = int64_t(c.n_routed_experts) * D + (c.has_bias() ? c.n_routed_experts : 0);
        n.routed = expert * c.n_routed_experts;
        n.active_routed = expert * c.num_experts_per_tok;
        n.shared = expert * c.n_shared_experts;
    } else {
        n.dense = 3 * D * c.intermediate_size;
    }
    return n;
}

}  // namespace

ModelCard model_card(const ModelConfig& c) {
    ModelCard m;
    const int64_t V = c.vocab_size, D = c.hidden_size;
    m.embedding_params = V * D * (c.tie_word_embeddings ? 1 : 2);
    m.total_params = m.active_params = m.embedding_params + D;  // + final norm
    m.norm_params = D;
    for (int l = 0; l < c.num_hidden_layers; ++l) {
        bool moe = c.is_moe_layer(l);
        LayerCount n = count_layer(c, moe);
        m.total_params += n.total();
        m.active_params += n.active();
        m.attention_params += n.attention;
        m.dense_mlp_params += n.dense;
        m.routed_expert_params += n.routed;
        m.shared_expert_params += n.shared;
        m.router_params += n.router;
        m.norm_params += n.norms;
        (moe ? m.num_moe_layers : m.num_dense_layers)++;
    }
    // An MTP module: enorm, hnorm, eh_proj, one MoE decoder layer, shared_head.norm, and its
    // own copies of embed_tokens and shared_head.head (as the released weights store them).
    bool mtp_moe = c.n_routed_experts > 0;
    int64_t per_mtp = 2 * D + 2 * D * D + count_layer(c, mtp_moe).total() + D + 2 * V * D;
    m.mtp_params = per_mtp * c.num_nextn_predict_layers;
    const int64_t bf16 = 2;
    m.latent_cache_bytes_per_token = int64_t(c.kv_lora_rank + c.qk_rope_head_dim) * bf16 * c.num_hidden_layers;
    const int64_t H = c.num_attention_heads;
    m.mha_cache_bytes_per_token = (H * c.qk_head_dim() + H * c.v_head_dim) * bf16 * c.num_hidden_layers;
    const int64_t g = std::min<int64_t>(8, H);
    m.gqa8_cache_bytes_per_token = (g * c.qk_head_dim() + g * c.v_head_dim) * bf16 * c.num_hidden_layers;
    return m;
}

std::string human_count(int64_t n) {
    char buf[32];
    double v = static_cast<double>(n);
    if (v >= 1e12) std::snprintf(buf, sizeof buf, "%.2fT", v / 1e12);
    else if (v >= 1e9) std::snprintf(buf, sizeof buf, "%.1fB", v / 1e9);
    else if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.1fM", v / 1e6);
    else if (v >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", v / 1e3);
    else std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
    return buf;
}

json ModelCard::to_json(const ModelConfig& c) const {
    json j{{"model_type", c.model_type},
                {"total_params", total_params},
                {"active_params", active_params},
                {"mtp_params", mtp_params},
                {"embedding_params", embedding_params},
                {"embedding_share", total_params ? double(embedding_params) / double(total_params) : 0.0},
                {"attention_params", attention_params},
                {"dense_mlp_params", dense_mlp_params},
                {"routed_expert_params", routed_expert_params},
                {"shared_expert_params", shared_expert_params},
                {"router_params", router_params},
                {"norm_params", norm_params},
                {"latent_cache_bytes_per_token", latent_cache_bytes_per_token},
                {"mha_cache_bytes_per_token", mha_cache_bytes_per_token},
                {"gqa8_cache_bytes_per_token", gqa8_cache_bytes_per_token},
                {"num_layers", c.num_hidden_layers},
                {"num_moe_layers", num_moe_layers},
                {"num_dense_layers", num_dense_layers},
                {"num_mtp_modules", c.num_nextn_predict_layers},
                {"n_routed_experts", c.n_routed_experts},
                {"n_shared_experts", c.n_shared_experts},
                {"num_experts_per_tok", c.num_experts_per_tok},
                {"max_position_embeddings", c.max_position_embeddings}};
    if (!weight_storage.empty()) {
        j["weight_storage"] = weight_storage;
        j["weight_bytes"] = weight_bytes;
    }
    return j;
}

std::string ModelCard::to_text(const ModelConfig& c) const {
    std::ostringstream o;
    auto pct = [&](int64_t part) {
        char b[16];
        std::snprintf(b, sizeof b, "%.1f%%", total_params ? 100.0 * double(part) / double(total_params) : 0.0);
        return std::string(b);
    };
    o << "model           " << (c.model_type.empty() ? "deepseek" : c.model_type) << " ("
      << (c.architectures.empty() ? "?" : c.architectures[0]) << ")\n";
    o << "parameters      " << human_count(total_params) << " total (" << total_params << "), "
      << human_count(active_params) << " activated per token (" << active_params << ")\n";
    o << "MTP modules     " << c.num_nextn_predict_layers << " (" << human_count(mtp_params) << " parameters)\n";
    o << "embedding+head  " << human_count(embedding_params) << " (" << pct(embedding_params) << " of total)\n";
    o << "layers          " << c.num_hidden_layers << " (" << num_dense_layers << " dense, " << num_moe_layers
      << " MoE)\n";
    if (c.n_routed_experts > 0)
        o << "experts         " << c.n_routed_experts << " routed + " << c.n_shared_experts << " shared, top-"
          << c.num_experts_per_tok << " of " << c.n_group << " groups (top-" << c.topk_group << " groups), "
          << c.scoring_func << ", " << c.topk_method << "\n";
    o << "attention       MLA, " << c.num_attention_heads << " heads, kv_lora " << c.kv_lora_rank << ", q_lora "
      << (c.q_lora_rank ? std::to_string(c.q_lora_rank) : std::string("none")) << ", rope " << c.qk_rope_head_dim
      << (c.rope_scaling ? ", YaRN x" + std::to_string(int(c.rope_scaling->factor)) : std::string()) << "\n";
    o << "latent cache    " << latent_cache_bytes_per_token << " bytes/token in BF16 (plain MHA: "
      << mha_cache_bytes_per_token << ", " << (latent_cache_bytes_per_token
                                                   ? mha_cache_bytes_per_token / latent_cache_bytes_per_token
                                                   : 0)
      << "x more)\n";
    o << "context         " << c.max_position_embeddings << " tokens\n";
    if (!weight_storage.empty()) {
        char b[64];
        if (weight_bytes >= 1000000000) std::snprintf(b, sizeof b, "%.2f GB", double(weight_bytes) / 1e9);
        else std::snprintf(b, sizeof b, "%.1f MB", double(weight_bytes) / 1e6);
        o << "weights         " << weight_storage << ", " << b << " resident (" << weight_bytes << " bytes)\n";
    }
    return o.str();
}

}  // namespace moescope
