// The Unicode normalizers of Hugging Face tokenizer.json (NFC/NFD/NFKC/NFKD, Lowercase, Strip,
// StripAccents, BertNormalizer) on ICU's tables, character for character as `tokenizers` does
// them. Only the normalized text is produced: encoding never needs HF's alignments.
// Inputs are valid UTF-8 (the tokenizer replaces invalid bytes first).
#pragma once
#include <string>
#include <string_view>

namespace moescope {

enum class UnicodeForm { NFC, NFD, NFKC, NFKD };

std::string unicode_normalize(std::string_view s, UnicodeForm form);

// Each character replaced by its full Unicode lowercase mapping, independently of its
// neighbours, as Rust's char::to_lowercase: 'İ' -> "i\u0307", final 'Σ' -> 'σ' (never 'ς').
std::string unicode_lowercase(std::string_view s);

// Leading/trailing White_Space characters removed (Rust's char::is_whitespace).
std::string unicode_strip(std::string_view s, bool left, bool right);

// Every mark (general category Mn, Mc, Me) removed: HF's StripAccents.
std::string strip_marks(std::string_view s);

struct BertNormalizerOptions {
    bool clean_text = true;            // drop NUL, U+FFFD and Cc/Cf/Co (except \t\n\r); whitespace -> ' '
    bool handle_chinese_chars = true;  // spaces around CJK ideographs
    bool strip_accents = true;         // NFD, then drop Mn (tokenizer.json null = the lowercase flag)
    bool lowercase = true;
};
std::string bert_normalize(std::string_view s, const BertNormalizerOptions& options);

}  // namespace moescope
