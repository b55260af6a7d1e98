// UTF-8 helpers of the tokenizer: validation with replacement, incomplete-tail detection for
// streaming, and GPT-2's byte <-> printable-character table used by byte-level BPE.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace moescope {

// Length of the valid UTF-8 sequence starting at s[i], or 0 when the bytes there are not a
// complete, well-formed sequence (overlong, surrogate, > U+10FFFF, truncated).
int utf8_valid_length(std::string_view s, size_t i);

// s with every maximal invalid subsequence replaced by U+FFFD, the way Rust's
// String::from_utf8_lossy (and so Hugging Face tokenizers) does it.
std::string utf8_sanitize(std::string_view s);
bool utf8_is_valid(std::string_view s);

// Number of trailing bytes of s that form a proper prefix of a valid UTF-8 sequence and so
// may still complete when more bytes arrive (0..3).
size_t utf8_incomplete_tail(std::string_view s);

// Decodes the code point at s[i] of a valid UTF-8 string; advances i.
char32_t utf8_next(std::string_view s, size_t& i);
void utf8_append(std::string& out, char32_t cp);

// GPT-2's reversible byte -> character table: printable bytes map to themselves, the rest to
// U+0100.. so that every byte string becomes a printable, whitespace-free string.
struct ByteLevelTable {
    std::array<std::string, 256> byte_to_utf8;  // UTF-8 encoding of the character of each byte
    std::array<int, 0x144> char_to_byte;        // code point -> byte, -1 where none
    ByteLevelTable();
};
const ByteLevelTable& byte_level_table();

}  // namespace moescope
