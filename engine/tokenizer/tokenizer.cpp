// Hugging Face tokenizer.json loading and the encode/decode pipeline (see tokenizer.h):
// added tokens -> normalizer -> pre-tokenizer -> BPE (merge ranks, per-word cache) ->
// post-processor; decoding through the decoder chain with added tokens inserted verbatim.
#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "engine/errors.h"
#include "engine/tokenizer/normalizer.h"
#include "engine/tokenizer/regex.h"
#include "engine/tokenizer/utf8.h"

namespace moescope {

using json = nlohmann::json;

namespace {

// The GPT-2 pattern ByteLevel uses when use_regex is true.
const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct PreStep {
    enum Kind { Split, ByteLevel, Metaspace } kind = Split;
    std::shared_ptr<Regex> regex;  // Split
    Behavior behavior = Behavior::Isolated;
    bool invert = false;
    bool add_prefix_space = false;  // ByteLevel
    bool use_regex = false;
    std::string replacement;  // Metaspace
    std::string prepend_scheme = "always";
    bool split = true;
};

struct NormStep {
    enum Kind { Unicode, Lowercase, Strip, StripAccents, Bert, Replace, Prepend } kind = Unicode;
    UnicodeForm form = UnicodeForm::NFC;  // Unicode
    bool left = true, right = true;       // Strip
    BertNormalizerOptions bert;           // Bert
    std::string from, to;                 // Replace (String pattern); Prepend uses `to`
};

struct DecStep {
    enum Kind { ByteLevel, Metaspace, ByteFallback, Fuse, Replace } kind = ByteLevel;
    std::string from, to;       // Replace; Metaspace: from = replacement
    bool strip_first = true;    // Metaspace: drop the space prepended to the first token
};

struct AddedToken {
    int id = 0;
    std::string content;
    std::string pattern;  // what is matched: content, or for normalized tokens content normalized
    bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = true;
};

// Tokens whose ids the post-processor puts around the sequence.
struct PostTemplate {
    std::vector<int> before, after;
};

}  // namespace

struct TokenizerImpl {
    std::string origin;
    std::vector<std::string> id_to_token;
    StringMap<int> token_to_id;
    std::unordered_map<uint64_t, std::pair<int, int>> merges;  // (left, right) -> (rank, merged id)
    bool byte_fallback = false, ignore_merges = false, fuse_unk = false;
    std::optional<int> unk_id;
    bool byte_level = false;
    std::array<int, 256> byte_ids{};  // id of each byte's byte-level character, -1 when absent

    std::vector<NormStep> normalizers;
    std::vector<PreStep> pre_steps;
    std::vector<DecStep> decoders;
    bool has_decoder = false;
    PostTemplate post;
    bool config_add_bos = false, config_add_eos = false;

    std::vector<AddedToken> added;
    std::unordered_map<int, size_t> added_by_id;
    std::array<std::vector<size_t>, 256> added_by_first_byte;  // longest first
    std::shared_ptr<Regex> word_char;                       // single_word boundary test

    std::optional<int> bos, eos;
    ChatTemplate chat;

    mutable std::mutex cache_mutex;
    mutable StringMap<std::vector<int>> cache;

    void encode_text(std::string_view text, bool first_segment, bool apply_normalizer,
                     std::vector<int>& out) const;
    void pre_tokenize(std::string_view text, bool first_segment, bool apply_normalizer,
                      const std::function<void(std::string_view)>& on_word) const;
    void encode_word(std::string_view word, std::vector<int>& out) const;
    void merge_word(std::string_view word, std::vector<int>& out) const;
    std::string normalize(std::string_view text) const;
};

namespace {

std::string read_file(const std::filesystem::path& p) {
    std::ifstream f(p, std::ios::binary);
    if (!f) throw FormatError(p.string() + ": cannot open file");
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Field access that reports the file and the JSON path when a value is missing or mistyped.
struct Reader {
    const std::string& origin;

    [[noreturn]] void fail(const std::string& key, const std::string& what) const {
        throw FormatError(origin + ": " + key + ": " + what);
    }
    const json& at(const json& j, const std::string& key, const std::string& path) const {
        if (!j.is_object() || !j.contains(key)) fail(path + "." + key, "missing");
        return j.at(key);
    }
    std::string str(const json& j, const std::string& key, const std::string& path) const {
        const json& v = at(j, key, path);
        if (!v.is_string()) fail(path + "." + key, "expected a string, found " + std::string(v.type_name()));
        return v.get<std::string>();
    }
    // A token id: an integer in [0, 2^24). nlohmann's get<int>() would cast 1e300 (undefined
    // behaviour) or wrap 4294967297 to 1, and the id table is sized by the largest id, so an id
    // of 2e9 would ask for tens of GB; real vocabularies stay far below 2^24 (V3: 129,280).
    static constexpr int64_t kMaxId = int64_t(1) << 24;
    int id(const json& v, const std::string& key) const {
        if (!v.is_number_integer()) fail(key, "expected an integer id, found " + std::string(v.type_name()));
        if (v.is_number_unsigned() ? v.get<uint64_t>() >= uint64_t(kMaxId)
                                   : (v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxId))
            fail(key, "id " + v.dump() + " is out of range (0 to " + std::to_string(kMaxId - 1) + ")");
        return int(v.get<int64_t>());
    }
    bool flag(const json& j, const std::string& key, const std::string& path, bool fallback) const {
        if (!j.is_object() || !j.contains(key) || j.at(key).is_null()) return fallback;
        if (!j.at(key).is_boolean()) fail(path + "." + key, "expected true or false");
        return j.at(key).get<bool>();
    }
};

Behavior parse_behavior(const Reader& r, const std::string& s, const std::string& key) {
    if (s == "Removed") return Behavior::Removed;
    if (s == "Isolated") return Behavior::Isolated;
    if (s == "MergedWithPrevious") return Behavior::MergedWithPrevious;
    if (s == "MergedWithNext") return Behavior::MergedWithNext;
    if (s == "Contiguous") return Behavior::Contiguous;
    r.fail(key, "unknown split behavior '" + s + "'");
}

PreStep split_step(const std::string& pattern, bool literal, Behavior b, bool invert,
                   const std::string& where) {
    PreStep s;
    s.kind = PreStep::Split;
    s.regex = std::make_shared<Regex>(pattern, literal, where);
    s.behavior = b;
    s.invert = invert;
    return s;
}

void parse_pre_tokenizer(const Reader& r, const json& j, const std::string& path,
                         std::vector<PreStep>& out) {
    if (j.is_null()) return;
    const std::string type = r.str(j, "type", path);
    const std::string where = r.origin + ": " + path;
    if (type == "Sequence") {
        const json& list = r.at(j, "pretokenizers", path);
        for (size_t i = 0; i < list.size(); ++i)
            parse_pre_tokenizer(r, list[i], path + ".pretokenizers[" + std::to_string(i) + "]", out);
    } else if (type == "Split") {
        const json& pat = r.at(j, "pattern", path);
        bool literal = pat.contains("String");
        if (!literal && !pat.contains("Regex")) r.fail(path + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
        std::string p = literal ? r.str(pat, "String", path + ".pattern") : r.str(pat, "Regex", path + ".pattern");
        Behavior b = parse_behavior(r, r.str(j, "behavior", path), path + ".behavior");
        out.push_back(split_step(p, literal, b, r.flag(j, "invert", path, false), where + ".pattern"));
    } else if (type == "ByteLevel") {
        PreStep s;
        s.kind = PreStep::ByteLevel;
        s.add_prefix_space = r.flag(j, "add_prefix_space", path, true);
        s.use_regex = r.flag(j, "use_regex", path, true);
        if (s.use_regex) s.regex = std::make_shared<Regex>(kGpt2Pattern, false, where);
        out.push_back(s);
    } else if (type == "Digits") {
        bool individual = r.flag(j, "individual_digits", path, false);
        // HF splits on char::is_numeric (any \p{N}); Contiguous joins runs of digits.
        out.push_back(split_step(individual ? "\\p{N}" : "\\p{N}+", false, Behavior::Isolated, false, where));
    } else if (type == "Whitespace") {
        out.push_back(split_step("\\w+|[^\\w\\s]+", false, Behavior::Removed, true, where));
    } else if (type == "WhitespaceSplit") {
        out.push_back(split_step("\\s+", false, Behavior::Removed, false, where));
    } else if (type == "Metaspace") {
        PreStep s;
        s.kind = PreStep::Metaspace;
        s.replacement = j.contains("replacement") ? r.str(j, "replacement", path) : "▁";
        if (j.contains("prepend_scheme")) {
            s.prepend_scheme = r.str(j, "prepend_scheme", path);
            if (s.prepend_scheme != "always" && s.prepend_scheme != "first" && s.prepend_scheme != "never")
                r.fail(path + ".prepend_scheme", "unknown value '" + s.prepend_scheme + "'");
        } else {
            s.prepend_scheme = r.flag(j, "add_prefix_space", path, true) ? "always" : "never";
        }
        s.split = r.flag(j, "split", path, true);
        s.regex = std::make_shared<Regex>(s.replacement, true, where);
        out.push_back(s);
    } else {
        r.fail(path + ".type", "pre-tokenizer '" + type + "' is not supported");
    }
}

void parse_normalizer(const Reader& r, const json& j, const std::string& path, std::vector<NormStep>& out) {
    if (j.is_null()) return;
    const std::string type = r.str(j, "type", path);
    if (type == "Sequence") {
        const json& list = r.at(j, "normalizers", path);
        for (size_t i = 0; i < list.size(); ++i)
            parse_normalizer(r, list[i], path + ".normalizers[" + std::to_string(i) + "]", out);
    } else if (type == "NFC" || type == "NFKC" || type == "NFD" || type == "NFKD") {
        NormStep s;
        s.form = type == "NFC" ? UnicodeForm::NFC : type == "NFD" ? UnicodeForm::NFD
               : type == "NFKC" ? UnicodeForm::NFKC : UnicodeForm::NFKD;
        out.push_back(s);
    } else if (type == "Lowercase") {
        NormStep s;
        s.kind = NormStep::Lowercase;
        out.push_back(s);
    } else if (type == "StripAccents") {
        NormStep s;
        s.kind = NormStep::StripAccents;
        out.push_back(s);
    } else if (type == "Strip") {
        NormStep s;
        s.kind = NormStep::Strip;
        s.left = r.flag(j, "strip_left", path, true);
        s.right = r.flag(j, "strip_right", path, true);
        out.push_back(s);
    } else if (type == "BertNormalizer") {
        NormStep s;
        s.kind = NormStep::Bert;
        s.bert.clean_text = r.flag(j, "clean_text", path, true);
        s.bert.handle_chinese_chars = r.flag(j, "handle_chinese_chars", path, true);
        s.bert.lowercase = r.flag(j, "lowercase", path, true);
        // null (the usual value) means: strip accents exactly when lowercasing.
        s.bert.strip_accents = r.flag(j, "strip_accents", path, s.bert.lowercase);
        out.push_back(s);
    } else if (type == "Replace") {
        const json& pat = r.at(j, "pattern", path);
        if (!pat.contains("String")) r.fail(path + ".pattern", "only a String pattern is supported");
        NormStep s;
        s.kind = NormStep::Replace;
        s.from = r.str(pat, "String", path + ".pattern");
        s.to = r.str(j, "content", path);
        if (s.from.empty()) r.fail(path + ".pattern.String", "empty pattern");
        out.push_back(s);
    } else if (type == "Prepend") {
        NormStep s;
        s.kind = NormStep::Prepend;
        s.to = r.str(j, "prepend", path);
        out.push_back(s);
    } else {
        r.fail(path + ".type", "normalizer '" + type + "' is not supported");
    }
}

void parse_decoder(const Reader& r, const json& j, const std::string& path, std::vector<DecStep>& out) {
    const std::string type = r.str(j, "type", path);
    DecStep s;
    if (type == "Sequence") {
        const json& list = r.at(j, "decoders", path);
        for (size_t i = 0; i < list.size(); ++i)
            parse_decoder(r, list[i], path + ".decoders[" + std::to_string(i) + "]", out);
        return;
    } else if (type == "ByteLevel") {
        s.kind = DecStep::ByteLevel;
    } else if (type == "ByteFallback") {
        s.kind = DecStep::ByteFallback;
    } else if (type == "Fuse") {
        s.kind = DecStep::Fuse;
    } else if (type == "Metaspace") {
        s.kind = DecStep::Metaspace;
        s.from = j.contains("replacement") ? r.str(j, "replacement", path) : "▁";
        if (j.contains("prepend_scheme")) s.strip_first = r.str(j, "prepend_scheme", path) != "never";
        else s.strip_first = r.flag(j, "add_prefix_space", path, true);
    } else if (type == "Replace") {
        const json& pat = r.at(j, "pattern", path);
        if (!pat.contains("String")) r.fail(path + ".pattern", "only a String pattern is supported");
        s.kind = DecStep::Replace;
        s.from = r.str(pat, "String", path + ".pattern");
        s.to = r.str(j, "content", path);
        if (s.from.empty()) r.fail(path + ".pattern.String", "empty pattern");
    } else {
        r.fail(path + ".type", "decoder '" + type + "' is not supported");
    }
    out.push_back(s);
}

std::vector<int> special_ids(const Reader& r, const json& specials, const std::string& name,
                             const std::string& path) {
    if (!specials.contains(name)) r.fail(path, "special token '" + name + "' is not defined in special_tokens");
    std::vector<int> ids;
    for (const auto& id : r.at(specials.at(name), "ids", path + "." + name)) ids.push_back(r.id(id, path + "." + name + ".ids"));
    return ids;
}

void parse_post_processor(const Reader& r, const TokenizerImpl& t, const json& j,
                          const std::string& path, PostTemplate& out) {
    if (j.is_null()) return;
    const std::string type = r.str(j, "type", path);
    if (type == "Sequence") {
        const json& list = r.at(j, "processors", path);
        for (size_t i = 0; i < list.size(); ++i)
            parse_post_processor(r, t, list[i], path + ".processors[" + std::to_string(i) + "]", out);
    } else if (type == "ByteLevel") {
        // Only adjusts offsets; ids are unchanged.
    } else if (type == "TemplateProcessing") {
        const json& single = r.at(j, "single", path);
        const json& specials = j.contains("special_tokens") ? j.at("special_tokens") : json::object();
        bool seen_sequence = false;
        for (size_t i = 0; i < single.size(); ++i) {
            const std::string item_path = path + ".single[" + std::to_string(i) + "]";
            const json& item = single[i];
            if (item.contains("Sequence")) {
                if (seen_sequence) r.fail(item_path, "more than one sequence in a single template");
                seen_sequence = true;
            } else if (item.contains("SpecialToken")) {
                auto ids = special_ids(r, specials, r.str(item.at("SpecialToken"), "id", item_path + ".SpecialToken"),
                                       path + ".special_tokens");
                auto& dst = seen_sequence ? out.after : out.before;
                dst.insert(dst.end(), ids.begin(), ids.end());
            } else {
                r.fail(item_path, "expected Sequence or SpecialToken");
            }
        }
    } else if (type == "RobertaProcessing" || type == "BertProcessing") {
        const json& cls = r.at(j, "cls", path);
        const json& sep = r.at(j, "sep", path);
        if (!cls.is_array() || cls.size() != 2 || !sep.is_array() || sep.size() != 2)
            r.fail(path, "cls and sep must be [token, id]");
        out.before.push_back(r.id(cls.at(1), path + ".cls"));
        out.after.push_back(r.id(sep.at(1), path + ".sep"));
    } else {
        r.fail(path + ".type", "post-processor '" + type + "' is not supported");
    }
}

std::string token_content(const json& v) {
    // bos_token/eos_token are strings or AddedToken objects {"content": ...}.
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object() && v.contains("content") && v.at("content").is_string()) return v.at("content").get<std::string>();
    return {};
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
    size_t pos = 0;
    while ((pos = s.find(from, pos)) != std::string::npos) {
        s.replace(pos, from.size(), to);
        pos += to.size();
    }
}

bool is_unicode_space(char32_t c) {  // Rust's char::is_whitespace (White_Space property)
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

}  // namespace

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& config_text,
                               const std::string& origin) {
    auto t = std::make_shared<TokenizerImpl>();
    t->origin = origin;
    Reader r{t->origin};
    json j;
    try {
        j = json::parse(text);
    } catch (const json::exception& e) {
        throw FormatError(origin + ": not valid JSON: " + e.what());
    }
    if (!j.is_object()) r.fail("(root)", "expected a JSON object");
    try {
        // --- model ---
        const json& model = r.at(j, "model", "");
        const std::string mtype = model.contains("type") ? r.str(model, "type", "model") : "BPE";
        if (mtype != "BPE") r.fail("model.type", "model type '" + mtype + "' is not supported (only BPE)");
        for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
            if (model.contains(k) && !model.at(k).is_null() && model.at(k) != "")
                r.fail(std::string("model.") + k, "is not supported");
        if (model.contains("dropout") && !model.at("dropout").is_null() && model.at("dropout").get<double>() > 0)
            r.fail("model.dropout", "BPE dropout is not supported");
        t->byte_fallback = r.flag(model, "byte_fallback", "model", false);
        t->ignore_merges = r.flag(model, "ignore_merges", "model", false);
        t->fuse_unk = r.flag(model, "fuse_unk", "model", false);

        const json& vocab = r.at(model, "vocab", "model");
        if (!vocab.is_object()) r.fail("model.vocab", "expected an object {token: id}");
        auto set_token = [&](const std::string& tok, int id, const std::string& key) {
            if (id < 0) r.fail(key, "negative id " + std::to_string(id));
            if (static_cast<size_t>(id) >= t->id_to_token.size()) t->id_to_token.resize(id + 1);
            t->id_to_token[id] = tok;
            t->token_to_id[tok] = id;
        };
        t->token_to_id.reserve(vocab.size() * 2);
        for (const auto& [tok, id] : vocab.items()) {
            set_token(tok, r.id(id, "model.vocab." + tok), "model.vocab." + tok);
        }
        if (model.contains("unk_token") && model.at("unk_token").is_string()) {
            auto it = t->token_to_id.find(model.at("unk_token").get<std::string>());
            if (it == t->token_to_id.end()) r.fail("model.unk_token", "not in model.vocab");
            t->unk_id = it->second;
        }

        const json& merges = r.at(model, "merges", "model");
        t->merges.reserve(merges.size() * 2);
        for (size_t i = 0; i < merges.size(); ++i) {
            const std::string key = "model.merges[" + std::to_string(i) + "]";
            std::string a, b;
            const json& m = merges[i];
            if (m.is_string()) {
                const std::string s = m.get<std::string>();
                size_t sp = s.find(' ');
                if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
                    r.fail(key, "expected \"left right\", found '" + s + "'");
                a = s.substr(0, sp);
                b = s.substr(sp + 1);
            } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
                a = m[0].get<std::string>();
                b = m[1].get<std::string>();
            } else {
                r.fail(key, "expected \"left right\" or [\"left\", \"right\"]");
            }
            auto ia = t->token_to_id.find(a), ib = t->token_to_id.find(b), iab = t->token_to_id.find(a + b);
            if (ia == t->token_to_id.end()) r.fail(key, "'" + a + "' is not in model.vocab");
            if (ib == t->token_to_id.end()) r.fail(key, "'" + b + "' is not in model.vocab");
            if (iab == t->token_to_id.end()) r.fail(key, "merged token '" + a + b + "' is not in model.vocab");
            uint64_t k = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
            t->merges.emplace(k, std::make_pair(int(i), iab->second));  // first (lowest) rank wins
        }

        // --- added tokens ---
        if (j.contains("added_tokens") && !j.at("added_tokens").is_null()) {
            const json& list = j.at("added_tokens");
            for (size_t i = 0; i < list.size(); ++i) {
                const std::string key = "added_tokens[" + std::to_string(i) + "]";
                AddedToken a;
                a.id = r.id(r.at(list[i], "id", key), key + ".id");
                a.content = r.str(list[i], "content", key);
                if (a.content.empty()) r.fail(key + ".content", "empty token");
                a.special = r.flag(list[i], "special", key, false);
                a.lstrip = r.flag(list[i], "lstrip", key, false);
                a.rstrip = r.flag(list[i], "rstrip", key, false);
                a.single_word = r.flag(list[i], "single_word", key, false);
                a.normalized = r.flag(list[i], "normalized", key, !a.special);
                set_token(a.content, a.id, key);
                t->added_by_id[a.id] = t->added.size();
                t->added.push_back(a);
            }
            t->word_char = std::make_shared<Regex>("^[\\p{Alphabetic}\\p{N}]", false, origin);
        }

        // --- pipeline ---
        if (j.contains("normalizer")) parse_normalizer(r, j.at("normalizer"), "normalizer", t->normalizers);
        // HF matches normalized added tokens by their content passed through the normalizer
        // (e.g. lowercased) on the normalized text. A token that normalizes to nothing can
        // never be matched.
        for (size_t i = 0; i < t->added.size(); ++i) {
            AddedToken& a = t->added[i];
            a.pattern = a.normalized ? t->normalize(a.content) : a.content;
            if (!a.pattern.empty()) t->added_by_first_byte[static_cast<unsigned char>(a.pattern[0])].push_back(i);
        }
        for (auto& v : t->added_by_first_byte)
            std::stable_sort(v.begin(), v.end(), [&](size_t x, size_t y) {
                return t->added[x].pattern.size() > t->added[y].pattern.size();
            });
        if (j.contains("pre_tokenizer")) parse_pre_tokenizer(r, j.at("pre_tokenizer"), "pre_tokenizer", t->pre_steps);
        for (size_t i = 0; i < t->pre_steps.size(); ++i) {
            if (t->pre_steps[i].kind != PreStep::ByteLevel) continue;
            // The byte-level mapping is applied inside the BPE step, so nothing may follow it.
            if (i + 1 != t->pre_steps.size())
                r.fail("pre_tokenizer", "a pre-tokenizer after ByteLevel is not supported");
            t->byte_level = true;
        }
        if (j.contains("post_processor"))
            parse_post_processor(r, *t, j.at("post_processor"), "post_processor", t->post);
        if (j.contains("decoder") && !j.at("decoder").is_null()) {
            t->has_decoder = true;
            parse_decoder(r, j.at("decoder"), "decoder", t->decoders);
        }
        for (const char* k : {"truncation", "padding"})
            if (j.contains(k) && !j.at(k).is_null()) r.fail(k, "is not supported (expected null)");
    } catch (const json::exception& e) {
        throw FormatError(origin + ": unexpected JSON structure: " + e.what());
    }

    const ByteLevelTable& bl = byte_level_table();
    for (int b = 0; b < 256; ++b) {
        auto it = t->token_to_id.find(bl.byte_to_utf8[b]);
        t->byte_ids[b] = it == t->token_to_id.end() ? -1 : it->second;
    }

    // --- tokenizer_config.json ---
    std::string bos_text, eos_text, template_text;
    if (!config_text.empty()) {
        const std::string config_origin =
            (std::filesystem::path(origin).parent_path() / "tokenizer_config.json").string();
        json c;
        try {
            c = json::parse(config_text);
        } catch (const json::exception& e) {
            throw FormatError(config_origin + ": not valid JSON: " + e.what());
        }
        Reader cr{config_origin};
        if (c.contains("bos_token")) bos_text = token_content(c.at("bos_token"));
        if (c.contains("eos_token")) eos_text = token_content(c.at("eos_token"));
        t->config_add_bos = cr.flag(c, "add_bos_token", "", false);
        t->config_add_eos = cr.flag(c, "add_eos_token", "", false);
        if (c.contains("chat_template")) {
            const json& ct = c.at("chat_template");
            if (ct.is_string()) {
                template_text = ct.get<std::string>();
            } else if (ct.is_array()) {  // [{"name": "default", "template": ...}, ...]
                for (const auto& e : ct)
                    if (e.value("name", "") == "default") template_text = e.value("template", "");
            }
        }
    }
    auto find_id = [&](const std::string& s) -> std::optional<int> {
        auto it = t->token_to_id.find(s);
        if (it == t->token_to_id.end()) return std::nullopt;
        return it->second;
    };
    auto first_of = [&](std::initializer_list<const char*> names) -> std::string {
        for (const char* n : names)
            if (find_id(n)) return n;
        return {};
    };
    if (bos_text.empty()) bos_text = first_of({"<｜begin▁of▁sentence｜>", "<|bos|>", "<s>", "<|begin_of_text|>"});
    if (eos_text.empty()) eos_text = first_of({"<｜end▁of▁sentence｜>", "<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>"});
    if (!bos_text.empty()) t->bos = find_id(bos_text);
    if (!eos_text.empty()) t->eos = find_id(eos_text);
    t->chat = ChatTemplate(template_text, bos_text, eos_text);

    Tokenizer out;
    out.impl_ = std::move(t);
    return out;
}

Tokenizer Tokenizer::load(const std::filesystem::path& path) {
    std::filesystem::path file = path;
    if (std::filesystem::is_directory(path)) file = path / "tokenizer.json";
    if (!std::filesystem::exists(file))
        throw FormatError(file.string() + ": no tokenizer.json found");
    std::filesystem::path config = file.parent_path() / "tokenizer_config.json";
    std::string config_text = std::filesystem::exists(config) ? read_file(config) : std::string();
    return from_json(read_file(file), config_text, file.string());
}

// ---------------------------------------------------------------------------------------------
// Encoding

std::string TokenizerImpl::normalize(std::string_view text) const {
    std::string s(text);
    for (const auto& n : normalizers) {
        switch (n.kind) {
        case NormStep::Unicode: s = unicode_normalize(s, n.form); break;
        case NormStep::Lowercase: s = unicode_lowercase(s); break;
        case NormStep::Strip: s = unicode_strip(s, n.left, n.right); break;
        case NormStep::StripAccents: s = strip_marks(s); break;
        case NormStep::Bert: s = bert_normalize(s, n.bert); break;
        case NormStep::Replace: replace_all(s, n.from, n.to); break;
        case NormStep::Prepend:
            if (!s.empty()) s = n.to + s;
            break;
        }
    }
    return s;
}

void TokenizerImpl::merge_word(std::string_view word, std::vector<int>& out) const {
    struct Symbol {
        int id, prev, next;
        bool alive;
    };
    std::vector<Symbol> sym;
    sym.reserve(word.size());
    auto push_symbol = [&](int id) {
        int n = static_cast<int>(sym.size());
        sym.push_back({id, n - 1, -1, true});
        if (n > 0) sym[n - 1].next = n;
    };
    // Initial symbols: one per byte (byte-level) or per character, with HF's fallbacks.
    const ByteLevelTable& bl = byte_level_table();
    bool last_was_unk = false;
    auto add_piece = [&](std::string_view piece) {
        auto it = token_to_id.find(piece);
        if (it != token_to_id.end()) {
            push_symbol(it->second);
            last_was_unk = false;
            return;
        }
        if (byte_fallback) {
            std::vector<int> ids;
            for (unsigned char c : piece) {
                char name[8];
                std::snprintf(name, sizeof name, "<0x%02X>", c);
                auto b = token_to_id.find(std::string_view(name));
                if (b == token_to_id.end()) break;
                ids.push_back(b->second);
            }
            if (ids.size() == piece.size()) {
                for (int id : ids) push_symbol(id);
                last_was_unk = false;
                return;
            }
        }
        if (unk_id) {
            if (!(fuse_unk && last_was_unk)) push_symbol(*unk_id);
            last_was_unk = true;
        }
        // Without unk_token HF drops the character; so do we, to stay identical.
    };
    if (byte_level) {
        for (unsigned char c : word) {
            if (byte_ids[c] >= 0) {
                push_symbol(byte_ids[c]);
                last_was_unk = false;
            } else {
                add_piece(bl.byte_to_utf8[c]);
            }
        }
    } else {
        for (size_t i = 0; i < word.size();) {
            size_t start = i;
            utf8_next(word, i);
            add_piece(word.substr(start, i - start));
        }
    }

    // Lowest rank first, leftmost on ties (HF's order); stale entries are skipped on pop.
    struct Cand {
        int rank, pos, new_id;
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::vector<Cand> heap;
    auto pair_key = [](int a, int b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); };
    auto consider = [&](int pos) {
        int nx = sym[pos].next;
        if (nx < 0) return;
        auto it = merges.find(pair_key(sym[pos].id, sym[nx].id));
        if (it == merges.end()) return;
        heap.push_back({it->second.first, pos, it->second.second});
        std::push_heap(heap.begin(), heap.end(), std::greater<>());
    };
    for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) consider(i);
    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<>());
        Cand c = heap.back();
        heap.pop_back();
        Symbol& s = sym[c.pos];
        if (!s.alive || s.next < 0) continue;
        auto it = merges.find(pair_key(s.id, sym[s.next].id));
        if (it == merges.end() || it->second.second != c.new_id) continue;
        Symbol& right = sym[s.next];
        right.alive = false;
        s.id = c.new_id;
        s.next = right.next;
        if (s.next >= 0) sym[s.next].prev = c.pos;
        if (s.prev >= 0) consider(s.prev);
        consider(c.pos);
    }
    for (const auto& s : sym)
        if (s.alive) out.push_back(s.id);
}

void TokenizerImpl::encode_word(std::string_view word, std::vector<int>& out) const {
    if (word.empty()) return;
    if (ignore_merges) {
        std::string mapped;
        if (byte_level) {
            for (unsigned char c : word) mapped += byte_level_table().byte_to_utf8[c];
        } else {
            mapped = word;
        }
        auto it = token_to_id.find(mapped);
        if (it != token_to_id.end()) {
            out.push_back(it->second);
            return;
        }
    }
    {
        std::lock_guard lock(cache_mutex);
        auto it = cache.find(word);
        if (it != cache.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    size_t first = out.size();
    merge_word(word, out);
    if (word.size() <= 256) {
        std::lock_guard lock(cache_mutex);
        if (cache.size() >= (1u << 18)) cache.clear();  // bounded memory on endless distinct words
        cache.emplace(std::string(word), std::vector<int>(out.begin() + first, out.end()));
    }
}

namespace {

// Applies one Split step to a piece: the regex matches and the gaps between them, combined
// according to the behavior exactly as tokenizers' NormalizedString::split does.
void apply_split(const PreStep& step, std::string_view piece, std::vector<std::string_view>& out,
                 std::vector<std::pair<size_t, size_t>>& scratch) {
    scratch.clear();
    step.regex->find_all(piece, scratch);
    struct Part {
        size_t b, e;
        bool match;
    };
    std::vector<Part> parts;
    size_t prev = 0;
    for (auto [b, e] : scratch) {
        if (prev != b) parts.push_back({prev, b, step.invert});
        parts.push_back({b, e, !step.invert});
        prev = e;
    }
    if (prev != piece.size()) parts.push_back({prev, piece.size(), step.invert});

    std::vector<Part> kept;  // `match` now means "remove"
    bool previous_match = false;
    switch (step.behavior) {
    case Behavior::Isolated:
        for (auto p : parts) kept.push_back({p.b, p.e, false});
        break;
    case Behavior::Removed:
        kept = parts;
        break;
    case Behavior::Contiguous:
        for (auto p : parts) {
            if (p.match == previous_match && !kept.empty()) kept.back().e = p.e;
            else kept.push_back({p.b, p.e, false});
            previous_match = p.match;
        }
        break;
    case Behavior::MergedWithPrevious:
        for (auto p : parts) {
            if (p.match && !previous_match && !kept.empty()) kept.back().e = p.e;
            else kept.push_back({p.b, p.e, false});
            previous_match = p.match;
        }
        break;
    case Behavior::MergedWithNext:
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
            if (it->match && !previous_match && !kept.empty()) kept.back().b = it->b;
            else kept.push_back({it->b, it->e, false});
            previous_match = it->match;
        }
        std::reverse(kept.begin(), kept.end());
        break;
    }
    for (auto p : kept)
        if (!p.match && p.e > p.b) out.push_back(piece.substr(p.b, p.e - p.b));
}

}  // namespace

void TokenizerImpl::encode_text(std::string_view text, bool first_segment, bool apply_normalizer,
                                std::vector<int>& out) const {
    pre_tokenize(text, first_segment, apply_normalizer, [&](std::string_view w) { encode_word(w, out); });
}

void TokenizerImpl::pre_tokenize(std::string_view text, bool first_segment, bool apply_normalizer,
                                 const std::function<void(std::string_view)>& on_word) const {
    if (text.empty()) return;
    std::string normalized;
    if (apply_normalizer && !normalizers.empty()) {
        normalized = normalize(text);
        text = normalized;
    }
    std::deque<std::string> owned;  // pieces a step rewrote (prefix space, metaspace)
    std::vector<std::string_view> pieces{text}, next;
    std::vector<std::pair<size_t, size_t>> scratch;
    for (const auto& step : pre_steps) {
        next.clear();
        for (size_t i = 0; i < pieces.size(); ++i) {
            std::string_view p = pieces[i];
            switch (step.kind) {
            case PreStep::Split:
                apply_split(step, p, next, scratch);
                break;
            case PreStep::ByteLevel:
                if (step.add_prefix_space && p[0] != ' ') {
                    owned.push_back(" " + std::string(p));
                    p = owned.back();
                }
                if (step.use_regex) {
                    PreStep isolated = step;
                    isolated.behavior = Behavior::Isolated;
                    isolated.invert = false;
                    apply_split(isolated, p, next, scratch);
                } else {
                    next.push_back(p);
                }
                break;
            case PreStep::Metaspace: {
                std::string s(p);
                replace_all(s, " ", step.replacement);
                bool prepend = step.prepend_scheme == "always" ||
                               (step.prepend_scheme == "first" && first_segment && i == 0 &&
                                p.data() == text.data());
                if (prepend && s.rfind(step.replacement, 0) != 0) s = step.replacement + s;
                owned.push_back(std::move(s));
                if (step.split) {
                    PreStep merged = step;
                    merged.kind = PreStep::Split;
                    merged.behavior = Behavior::MergedWithNext;
                    apply_split(merged, owned.back(), next, scratch);
                } else {
                    next.push_back(owned.back());
                }
                break;
            }
            }
        }
        pieces.swap(next);
    }
    for (std::string_view w : pieces) on_word(w);
}

namespace {

// Leftmost-longest matching of added tokens (the automaton HF builds), with the single_word,
// lstrip and rstrip rules. Calls on_text for gaps and on_token for matches, in order.
template <class OnText, class OnToken>
void split_added(const TokenizerImpl& t, std::string_view s, bool normalized_pass, bool parse_special,
                 OnText on_text, OnToken on_token) {
    size_t start_offset = 0, i = 0;
    auto prev_char_is_word = [&](size_t pos) {
        if (pos == 0) return false;
        size_t k = pos - 1;
        while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
        return t.word_char->matches(s.substr(k, pos - k));
    };
    auto next_char_is_word = [&](size_t pos) { return pos < s.size() && t.word_char->matches(s.substr(pos)); };
    while (i < s.size()) {
        const auto& cands = t.added_by_first_byte[static_cast<unsigned char>(s[i])];
        const AddedToken* hit = nullptr;
        for (size_t c : cands) {
            const AddedToken& a = t.added[c];
            if (a.normalized != normalized_pass) continue;
            if (s.compare(i, a.pattern.size(), a.pattern) == 0) {
                hit = &a;
                break;  // candidates are longest first
            }
        }
        if (!hit) {
            ++i;
            continue;
        }
        size_t b = i, e = i + hit->pattern.size();
        i = e;  // a rejected match is still consumed, as HF's automaton iteration does
        if (hit->special && !parse_special) continue;
        if (hit->single_word && (prev_char_is_word(b) || next_char_is_word(e))) continue;
        if (b < start_offset) continue;
        if (hit->lstrip) {
            size_t nb = b;
            while (nb > start_offset) {
                size_t k = nb - 1;
                while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
                size_t kk = k;
                if (!is_unicode_space(utf8_next(s, kk))) break;
                nb = k;
            }
            b = nb;
        }
        if (hit->rstrip) {
            while (e < s.size()) {
                size_t k = e;
                if (!is_unicode_space(utf8_next(s, k))) break;
                e = k;
            }
            i = e;
        }
        if (start_offset < b) on_text(s.substr(start_offset, b - start_offset));
        on_token(hit->id);
        start_offset = e;
    }
    if (start_offset < s.size()) on_text(s.substr(start_offset));
}

}  // namespace

std::vector<int> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
    const TokenizerImpl& t = *impl_;
    std::string clean;
    if (!utf8_is_valid(text)) {
        clean = utf8_sanitize(text);
        text = clean;
    }
    std::vector<int> ids;
    ids.reserve(text.size() / 3 + 4);
    bool first = true;
    auto encode_segment = [&](std::string_view seg) {
        t.encode_text(seg, first, true, ids);
        first = false;
    };
    auto encode_normalized = [&](std::string_view seg) {
        t.encode_text(seg, first, false, ids);
        first = false;
    };
    auto on_token = [&](int id) {
        ids.push_back(id);
        first = false;
    };
    if (t.added.empty()) {
        encode_segment(text);
    } else {
        // Pass 1: tokens matched on the raw text; pass 2: normalized tokens on each normalized gap.
        split_added(t, text, false, parse_special, [&](std::string_view gap) {
            if (t.normalizers.empty()) {
                split_added(t, gap, true, parse_special, encode_segment, on_token);
            } else {
                std::string norm = t.normalize(gap);
                split_added(t, norm, true, parse_special, encode_normalized, on_token);
            }
        }, on_token);
    }
    if (add_special) {
        ids.insert(ids.begin(), t.post.before.begin(), t.post.before.end());
        ids.insert(ids.end(), t.post.after.begin(), t.post.after.end());
        // tokenizer_config.json's add_bos_token / add_eos_token, as transformers applies them.
        if (t.config_add_bos && t.bos && (ids.empty() || ids.front() != *t.bos)) ids.insert(ids.begin(), *t.bos);
        if (t.config_add_eos && t.eos && (ids.empty() || ids.back() != *t.eos)) ids.push_back(*t.eos);
    }
    return ids;
}

std::string Tokenizer::normalize(std::string_view text) const {
    if (!utf8_is_valid(text)) return impl_->normalize(utf8_sanitize(text));
    return impl_->normalize(text);
}

void Tokenizer::for_each_word(std::string_view text,
                              const std::function<void(std::string_view)>& on_word) const {
    const TokenizerImpl& t = *impl_;
    std::string clean;
    if (!utf8_is_valid(text)) {
        clean = utf8_sanitize(text);
        text = clean;
    }
    bool first = true;
    auto seg = [&](std::string_view s) {
        t.pre_tokenize(s, first, true, on_word);
        first = false;
    };
    auto skip = [&](int) { first = false; };
    split_added(t, text, false, true, [&](std::string_view gap) {
        if (t.normalizers.empty()) {
            split_added(t, gap, true, true, seg, skip);
        } else {
            std::string norm = t.normalize(gap);
            split_added(t, norm, true, true, [&](std::string_view s) {
                t.pre_tokenize(s, first, false, on_word);
                first = false;
            }, skip);
        }
    }, skip);
}

// ---------------------------------------------------------------------------------------------
// Decoding

namespace {

// The decoder chain over model tokens, as tokenizers' decode_chain: each step maps the list of
// token strings to a new list; the result is their concatenation (raw bytes, maybe invalid UTF-8).
std::string run_decoders(const TokenizerImpl& t, std::vector<std::string> tokens) {
    if (!t.has_decoder) {
        std::string out;
        for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
        return out;
    }
    const ByteLevelTable& bl = byte_level_table();
    for (const auto& d : t.decoders) {
        std::vector<std::string> next;
        switch (d.kind) {
        case DecStep::ByteLevel: {
            // A token whose characters are all in the byte table becomes those bytes; any
            // other token (an added token with unusual characters) passes through as is.
            std::string bytes;
            for (const auto& tok : tokens) {
                std::string mapped;
                bool ok = true;
                for (size_t i = 0; i < tok.size() && ok;) {
                    if (utf8_valid_length(tok, i) == 0) { ok = false; break; }
                    char32_t cp = utf8_next(tok, i);
                    if (cp >= bl.char_to_byte.size() || bl.char_to_byte[cp] < 0) ok = false;
                    else mapped += static_cast<char>(bl.char_to_byte[cp]);
                }
                bytes += ok ? mapped : tok;
            }
            next.push_back(std::move(bytes));
            break;
        }
        case DecStep::ByteFallback:
            for (const auto& tok : tokens) {
                unsigned v = 0;
                if (tok.size() == 6 && tok.rfind("<0x", 0) == 0 && tok[5] == '>' &&
                    std::sscanf(tok.c_str() + 3, "%2X", &v) == 1)
                    next.push_back(std::string(1, static_cast<char>(v)));
                else
                    next.push_back(tok);
            }
            break;
        case DecStep::Fuse: {
            std::string all;
            for (const auto& tok : tokens) all += tok;
            next.push_back(std::move(all));
            break;
        }
        case DecStep::Replace:
            for (auto tok : tokens) {
                replace_all(tok, d.from, d.to);
                next.push_back(std::move(tok));
            }
            break;
        case DecStep::Metaspace:
            for (size_t i = 0; i < tokens.size(); ++i) {
                std::string tok = tokens[i];
                replace_all(tok, d.from, " ");
                if (i == 0 && d.strip_first && !tok.empty() && tok[0] == ' ') tok.erase(0, 1);
                next.push_back(std::move(tok));
            }
            break;
        }
        tokens.swap(next);
    }
    std::string out;
    for (const auto& tok : tokens) out += tok;
    return out;
}

}  // namespace

std::string Tokenizer::decode_bytes(const std::vector<int>& ids, bool skip_special) const {
    const TokenizerImpl& t = *impl_;
    std::string out;
    std::vector<std::string> chunk;
    for (int id : ids) {
        auto added = t.added_by_id.find(id);
        if (added != t.added_by_id.end()) {
            // Added tokens go through the decoder chain like the others (tokenizers 0.23: a
            // Replace decoder rewrites them too), normalized ones as their normalized content.
            // skip_special tests the emitted text against the special tokens' contents, so a
            // special token whose normalization changes it is kept (as in HF).
            const AddedToken& a = t.added[added->second];
            const std::string& text = a.normalized ? a.pattern : a.content;
            if (skip_special && a.special && text == a.content) continue;
            if (skip_special && text != a.content) {
                auto same = t.token_to_id.find(text);
                auto other = same == t.token_to_id.end() ? t.added_by_id.end() : t.added_by_id.find(same->second);
                if (other != t.added_by_id.end() && t.added[other->second].special) continue;
            }
            chunk.push_back(text);
        } else if (id >= 0 && static_cast<size_t>(id) < t.id_to_token.size() && !t.id_to_token[id].empty()) {
            chunk.push_back(t.id_to_token[id]);
        }
    }
    out += run_decoders(t, std::move(chunk));
    return out;
}

std::string Tokenizer::decode(const std::vector<int>& ids, bool skip_special) const {
    return utf8_sanitize(decode_bytes(ids, skip_special));
}

std::string Tokenizer::token_text(int id) const {
    const auto& v = impl_->id_to_token;
    return id >= 0 && static_cast<size_t>(id) < v.size() ? v[id] : std::string();
}

std::string Tokenizer::token_display(int id) const {
    const std::string bytes = decode_bytes({id});
    std::string out;
    for (size_t i = 0; i < bytes.size();) {
        int n = utf8_valid_length(bytes, i);
        if (n > 0) {
            out.append(bytes, i, n);
            i += n;
        } else {
            char esc[8];
            std::snprintf(esc, sizeof esc, "\\x%02X", static_cast<unsigned char>(bytes[i]));
            out += esc;
            ++i;
        }
    }
    return out;
}

int Tokenizer::vocab_size() const { return static_cast<int>(impl_->id_to_token.size()); }

std::optional<int> Tokenizer::token_id(std::string_view piece) const {
    auto it = impl_->token_to_id.find(piece);
    if (it == impl_->token_to_id.end()) return std::nullopt;
    return it->second;
}

std::optional<int> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int> Tokenizer::eos_id() const { return impl_->eos; }
const ChatTemplate& Tokenizer::chat_template() const { return impl_->chat; }

bool Tokenizer::is_special(int id) const {
    auto it = impl_->added_by_id.find(id);
    return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

void Tokenizer::clear_cache() const {
    std::lock_guard lock(impl_->cache_mutex);
    impl_->cache.clear();
}

// ---------------------------------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(&tokenizer), skip_special_(skip_special) {}

std::string StreamDecoder::push(int id) {
    pending_ += tokenizer_->decode_bytes({id}, skip_special_);
    size_t hold = utf8_incomplete_tail(pending_);
    std::string ready = utf8_sanitize(std::string_view(pending_).substr(0, pending_.size() - hold));
    pending_.erase(0, pending_.size() - hold);
    return ready;
}

std::string StreamDecoder::flush() {
    std::string ready = utf8_sanitize(pending_);
    pending_.clear();
    return ready;
}

double tokenizer_bench_mb_per_s(const Tokenizer& tokenizer, const std::string& text) {
    using clock = std::chrono::steady_clock;
    if (text.empty()) return 0.0;
    double best = 0.0, total = 0.0;
    for (int run = 0; run < 20 && (run < 2 || total < 0.3); ++run) {
        tokenizer.clear_cache();
        auto t0 = clock::now();
        auto ids = tokenizer.encode(text, false, true);
        double s = std::chrono::duration<double>(clock::now() - t0).count();
        total += s;
        if (!ids.empty() && s > 0) best = std::max(best, text.size() / 1e6 / s);
    }
    return best;
}

}  // namespace moescope
