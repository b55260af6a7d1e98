// Byte-level BPE training (see bpe_trainer.h). Words are counted once; each merge then only
// revisits the words that contain the merged pair (an index pair -> words), and the best pair
// comes from a max-heap with lazy invalidation, so a merge costs O(affected words), not a rescan.
#include "engine/tokenizer/bpe_trainer.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "engine/errors.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"

namespace moescope {

using ojson = nlohmann::ordered_json;

namespace {

// DeepSeek-V3's pre-tokenizer: numbers in groups of up to three, CJK runs, then its word regex.
ojson deepseek_pre_tokenizer() {
    auto split = [](const std::string& re) {
        return ojson{{"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", "Isolated"}, {"invert", false}};
    };
    return ojson{
        {"type", "Sequence"},
        {"pretokenizers",
         {split("\\p{N}{1,3}"),
          split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
          split("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
                " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
          ojson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
}

ojson added_token_json(int id, const std::string& content) {
    return ojson{{"id", id},          {"content", content}, {"single_word", false}, {"lstrip", false},
                 {"rstrip", false},   {"normalized", false}, {"special", true}};
}

struct PairOrder {  // max-heap: higher count first, then the smaller (left, right) ids
    bool operator()(const std::tuple<int64_t, int, int>& x, const std::tuple<int64_t, int, int>& y) const {
        if (std::get<0>(x) != std::get<0>(y)) return std::get<0>(x) < std::get<0>(y);
        if (std::get<1>(x) != std::get<1>(y)) return std::get<1>(x) > std::get<1>(y);
        return std::get<2>(x) > std::get<2>(y);
    }
};

uint64_t key(int a, int b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

}  // namespace

TrainedTokenizer train_bpe_json(const std::vector<std::string>& documents, const BpeTrainerOptions& opt) {
    auto t0 = std::chrono::steady_clock::now();
    const int n_special = static_cast<int>(opt.special_tokens.size());
    if (opt.vocab_size < n_special + 256)
        throw ConfigError("train-tokenizer: vocab_size " + std::to_string(opt.vocab_size) +
                          " is below special tokens + 256 bytes = " + std::to_string(n_special + 256));
    for (size_t i = 0; i < opt.special_tokens.size(); ++i)
        if (opt.special_tokens[i].empty() ||
            std::find(opt.special_tokens.begin(), opt.special_tokens.begin() + i, opt.special_tokens[i]) !=
                opt.special_tokens.begin() + i)
            throw ConfigError("train-tokenizer: special token '" + opt.special_tokens[i] + "' is empty or repeated");

    // The skeleton tokenizer: pre-tokenizer and special tokens, so training sees exactly the
    // words that encoding will see.
    ojson skeleton = {{"added_tokens", ojson::array()},
                      {"pre_tokenizer", deepseek_pre_tokenizer()},
                      {"model", {{"type", "BPE"}, {"vocab", ojson::object()}, {"merges", ojson::array()}}}};
    for (int i = 0; i < n_special; ++i) skeleton["added_tokens"].push_back(added_token_json(i, opt.special_tokens[i]));
    Tokenizer pre = Tokenizer::from_json(skeleton.dump(), "", "train-tokenizer skeleton");

    // 1. Count words.
    std::unordered_map<std::string, int64_t> counts;
    size_t corpus_bytes = 0;
    for (const auto& doc : documents) {
        corpus_bytes += doc.size();
        pre.for_each_word(doc, [&](std::string_view w) { ++counts[std::string(w)]; });
    }
    std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
    counts.clear();
    std::sort(sorted.begin(), sorted.end());  // fixed word order: a reproducible run

    // 2. Symbols: special tokens, then the 256 byte-level characters in byte order.
    const ByteLevelTable& bl = byte_level_table();
    std::vector<std::string> tokens(opt.special_tokens.begin(), opt.special_tokens.end());
    std::unordered_map<std::string, int> token_ids;
    for (int i = 0; i < n_special; ++i) token_ids[tokens[i]] = i;
    for (int b = 0; b < 256; ++b) {
        token_ids.emplace(bl.byte_to_utf8[b], static_cast<int>(tokens.size()));
        tokens.push_back(bl.byte_to_utf8[b]);
    }
    struct Word {
        std::vector<int> syms;
        int64_t count;
    };
    std::vector<Word> words;
    words.reserve(sorted.size());
    for (auto& [w, c] : sorted) {
        Word word{{}, c};
        for (unsigned char ch : w) word.syms.push_back(n_special + ch);
        words.push_back(std::move(word));
    }

    std::unordered_map<uint64_t, int64_t> pair_count;
    std::unordered_map<uint64_t, std::vector<int>> where;
    for (int wi = 0; wi < static_cast<int>(words.size()); ++wi) {
        const Word& w = words[wi];
        for (size_t i = 0; i + 1 < w.syms.size(); ++i) {
            uint64_t k = key(w.syms[i], w.syms[i + 1]);
            pair_count[k] += w.count;
            auto& v = where[k];
            if (v.empty() || v.back() != wi) v.push_back(wi);
        }
    }
    std::priority_queue<std::tuple<int64_t, int, int>, std::vector<std::tuple<int64_t, int, int>>, PairOrder> heap;
    for (const auto& [k, c] : pair_count) heap.emplace(c, int(k >> 32), int(uint32_t(k)));

    // 3. Merge.
    std::vector<std::pair<int, int>> merges;
    std::vector<int> stamp(words.size(), -1);
    std::vector<uint64_t> grown;
    const int min_freq = std::max(1, opt.min_frequency);
    while (static_cast<int>(tokens.size()) < opt.vocab_size && !heap.empty()) {
        auto [count, a, b] = heap.top();
        heap.pop();
        const uint64_t k = key(a, b);
        auto pc = pair_count.find(k);
        int64_t current = pc == pair_count.end() ? 0 : pc->second;
        if (current != count) {  // stale entry: requeue with the true count
            if (current > 0) heap.emplace(current, a, b);
            continue;
        }
        if (count < min_freq) break;

        const std::string merged = tokens[a] + tokens[b];
        int new_id;
        if (auto it = token_ids.find(merged); it != token_ids.end()) {
            new_id = it->second;  // same string reached by another split: no new token
        } else {
            new_id = static_cast<int>(tokens.size());
            tokens.push_back(merged);
            token_ids.emplace(merged, new_id);
        }
        const int merge_index = static_cast<int>(merges.size());
        merges.emplace_back(a, b);

        grown.clear();
        std::vector<int> affected = std::move(where[k]);
        where.erase(k);
        for (int wi : affected) {
            if (stamp[wi] == merge_index) continue;
            stamp[wi] = merge_index;
            Word& w = words[wi];
            auto& s = w.syms;
            bool has = false;
            for (size_t i = 0; i + 1 < s.size() && !has; ++i) has = s[i] == a && s[i + 1] == b;
            if (!has) continue;
            for (size_t i = 0; i + 1 < s.size(); ++i) pair_count[key(s[i], s[i + 1])] -= w.count;
            std::vector<int> out;
            out.reserve(s.size());
            for (size_t i = 0; i < s.size(); ++i) {
                if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
                    out.push_back(new_id);
                    ++i;
                } else {
                    out.push_back(s[i]);
                }
            }
            s.swap(out);
            for (size_t i = 0; i + 1 < s.size(); ++i) {
                uint64_t nk = key(s[i], s[i + 1]);
                pair_count[nk] += w.count;
                if (s[i] == new_id || s[i + 1] == new_id) {
                    auto& v = where[nk];
                    if (v.empty() || v.back() != wi) v.push_back(wi);
                    grown.push_back(nk);
                }
            }
        }
        pair_count.erase(k);
        // Only pairs with the new token can have grown; every other count only fell, which the
        // stale check above catches.
        std::sort(grown.begin(), grown.end());
        grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
        for (uint64_t g : grown) {
            int64_t c = pair_count[g];
            if (c > 0) heap.emplace(c, int(g >> 32), int(uint32_t(g)));
        }
    }

    // 4. Files.
    ojson vocab = ojson::object();
    for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
    ojson merges_json = ojson::array();
    for (auto [a, b] : merges) merges_json.push_back({tokens[a], tokens[b]});
    auto has_special = [&](const char* s) {
        return std::find(opt.special_tokens.begin(), opt.special_tokens.end(), s) != opt.special_tokens.end();
    };
    ojson post = nullptr;
    if (has_special("<|bos|>")) {
        post = {{"type", "TemplateProcessing"},
                {"single", {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}},
                            {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                {"pair", {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}},
                          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                          {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
                {"special_tokens", {{"<|bos|>", {{"id", "<|bos|>"}, {"ids", {token_ids["<|bos|>"]}},
                                                 {"tokens", {"<|bos|>"}}}}}}};
    }
    ojson tj = {{"version", "1.0"},
                {"truncation", nullptr},
                {"padding", nullptr},
                {"added_tokens", skeleton["added_tokens"]},
                {"normalizer", nullptr},
                {"pre_tokenizer", deepseek_pre_tokenizer()},
                {"post_processor", post},
                {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
                {"model",
                 {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                  {"ignore_merges", false}, {"vocab", vocab}, {"merges", merges_json}}}};

    // The post-processor already adds BOS, so add_bos_token stays false (no double BOS in
    // transformers' Llama-style tokenizers).
    ojson cfg = {{"tokenizer_class", "PreTrainedTokenizerFast"}, {"add_bos_token", false}, {"add_eos_token", false},
                 {"clean_up_tokenization_spaces", false}, {"model_max_length", 131072}};
    if (has_special("<|bos|>")) cfg["bos_token"] = "<|bos|>";
    if (has_special("<|eos|>")) cfg["eos_token"] = "<|eos|>";
    if (has_special("<|pad|>")) cfg["pad_token"] = "<|pad|>";
    if (has_special("<|bos|>") && has_special("<|eos|>") && has_special("<|user|>") &&
        has_special("<|assistant|>") && has_special("<|system|>"))
        cfg["chat_template"] = moescope_chat_template_jinja();

    TrainedTokenizer out;
    out.tokenizer_json = tj.dump(1);
    out.tokenizer_config_json = cfg.dump(2);
    out.stats.vocab_size = static_cast<int>(tokens.size());
    out.stats.merges = static_cast<int>(merges.size());
    out.stats.corpus_bytes = corpus_bytes;
    out.stats.distinct_words = words.size();
    out.stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return out;
}

static void write_atomically(const std::filesystem::path& path, const std::string& text) {
    std::filesystem::path tmp = path;
    tmp += ".tmp";
    {
        std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
        if (!f) throw Error(tmp.string() + ": cannot create file");
        f << text;
        f.flush();
        if (!f) throw Error(tmp.string() + ": write failed");
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) throw Error(path.string() + ": cannot rename from " + tmp.string() + ": " + ec.message());
}

BpeTrainStats train_bpe(const std::vector<std::filesystem::path>& corpus, const BpeTrainerOptions& opt,
                        const std::filesystem::path& out_dir) {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::string> docs;
    for (const auto& p : corpus) {
        std::ifstream f(p, std::ios::binary);
        if (!f) throw Error(p.string() + ": cannot open corpus file");
        std::ostringstream ss;
        ss << f.rdbuf();
        docs.push_back(ss.str());
    }
    TrainedTokenizer t = train_bpe_json(docs, opt);
    std::filesystem::create_directories(out_dir);
    write_atomically(out_dir / "tokenizer.json", t.tokenizer_json);
    write_atomically(out_dir / "tokenizer_config.json", t.tokenizer_config_json);
    t.stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return t.stats;
}

}  // namespace moescope
