// Hugging Face tokenizer.json (BPE) loading, encoding and decoding, compatible to the token
// with the `tokenizers` library for the features listed in docs/tokenizer.md. Anything a file
// asks for that is not implemented is a FormatError naming the key, never a silent difference.
#pragma once
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/chat_template.h"

namespace moescope {

struct TokenizerImpl;

class Tokenizer {
public:
    // A folder holding tokenizer.json (and optionally tokenizer_config.json), or a tokenizer.json
    // file (its folder's tokenizer_config.json is read when present).
    static Tokenizer load(const std::filesystem::path& path);
    // The same from JSON text; `origin` names the source in error messages.
    static Tokenizer from_json(const std::string& tokenizer_json, const std::string& config_json = "",
                               const std::string& origin = "tokenizer.json");

    // add_special: run the post-processor (BOS/EOS; plus add_bos_token/add_eos_token of
    // tokenizer_config.json). parse_special: match special added tokens in the text; when false
    // they are encoded as plain text (non-special added tokens are always matched, as in HF).
    // Invalid UTF-8 is replaced by U+FFFD first.
    std::vector<int> encode(std::string_view text, bool add_special = false,
                            bool parse_special = true) const;
    std::string decode(const std::vector<int>& ids, bool skip_special = false) const;
    // Raw decoded bytes (may end inside a UTF-8 sequence); what StreamDecoder builds on.
    std::string decode_bytes(const std::vector<int>& ids, bool skip_special = false) const;

    // The normalizer alone (HF's normalizer.normalize_str); the text itself when there is none.
    std::string normalize(std::string_view text) const;

    std::string token_text(int id) const;     // vocab string of the id ("" if none)
    std::string token_display(int id) const;  // decoded bytes of the id; invalid UTF-8 as \xNN
    int vocab_size() const;                   // highest id + 1 (model vocab and added tokens)
    std::optional<int> token_id(std::string_view piece) const;
    std::optional<int> bos_id() const;
    std::optional<int> eos_id() const;
    const ChatTemplate& chat_template() const;
    bool is_special(int id) const;

    // Calls on_word for each pre-tokenized word of text (raw bytes, before the byte-level
    // mapping), skipping added tokens: the units BPE merges within. Used by the trainer.
    void for_each_word(std::string_view text, const std::function<void(std::string_view)>& on_word) const;

    void clear_cache() const;  // forget the per-word merge cache (for cold benchmarks)

private:
    std::shared_ptr<TokenizerImpl> impl_;
};

// Incremental decoding for generation: push one id at a time and get the text that became
// complete; bytes of an unfinished UTF-8 character are held back until it completes.
class StreamDecoder {
public:
    explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false);
    std::string push(int id);
    std::string flush();  // whatever is held back, with U+FFFD for an unfinished character

private:
    const Tokenizer* tokenizer_;
    bool skip_special_;
    std::string pending_;
};

// Encoding throughput in MB/s of text (one core, merge cache cleared first, best of a few
// runs of at least ~0.3 s in total), for `moescope-cli bench`.
double tokenizer_bench_mb_per_s(const Tokenizer& tokenizer, const std::string& text);

}  // namespace moescope
