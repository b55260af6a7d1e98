// UTF-8 helpers of the tokenizer (see utf8.h).
#include "engine/tokenizer/utf8.h"

namespace moescope {

int utf8_valid_length(std::string_view s, size_t i) {
    const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned char c = b(i);
    const size_t left = s.size() - i;
    if (c < 0x80) return 1;
    const auto cont = [&](size_t k) { return k < s.size() && (b(k) & 0xC0) == 0x80; };
    if (c >= 0xC2 && c <= 0xDF) return left >= 2 && cont(i + 1) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (left < 3 || !cont(i + 1) || !cont(i + 2)) return 0;
        // E0 needs A0..BF (no overlongs), ED needs 80..9F (no surrogates).
        if (c == 0xE0 && b(i + 1) < 0xA0) return 0;
        if (c == 0xED && b(i + 1) > 0x9F) return 0;
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (left < 4 || !cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
        if (c == 0xF0 && b(i + 1) < 0x90) return 0;
        if (c == 0xF4 && b(i + 1) > 0x8F) return 0;
        return 4;
    }
    return 0;
}

// Length of the longest prefix at s[i] that could begin a valid sequence (Unicode's "maximal
// subpart"), at least 1: the unit that one U+FFFD replaces.
static size_t maximal_subpart(std::string_view s, size_t i) {
    const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned char c = b(i);
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 1;
    size_t k = 1;
    for (; k <= need && i + k < s.size(); ++k) {
        const unsigned char x = b(i + k);
        if (k == 1 ? (x < lo || x > hi) : (x & 0xC0) != 0x80) break;
    }
    return k;
}

std::string utf8_sanitize(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        int n = utf8_valid_length(s, i);
        if (n > 0) {
            out.append(s.data() + i, n);
            i += n;
        } else {
            out += "\xEF\xBF\xBD";
            i += maximal_subpart(s, i);
        }
    }
    return out;
}

bool utf8_is_valid(std::string_view s) {
    for (size_t i = 0; i < s.size();) {
        if (static_cast<unsigned char>(s[i]) < 0x80) { ++i; continue; }
        int n = utf8_valid_length(s, i);
        if (n == 0) return false;
        i += n;
    }
    return true;
}

size_t utf8_incomplete_tail(std::string_view s) {
    for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
        size_t i = s.size() - back;
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
        if (c < 0xC2 || c > 0xF4) return 0;
        // The tail is incomplete when its maximal subpart runs to the end but is too short.
        size_t need = c <= 0xDF ? 2 : c <= 0xEF ? 3 : 4;
        return back < need && maximal_subpart(s, i) == back ? back : 0;
    }
    return 0;
}

char32_t utf8_next(std::string_view s, size_t& i) {
    const auto b = [&](size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[k])); };
    char32_t c = b(i);
    if (c < 0x80) { i += 1; return c; }
    if (c < 0xE0) { char32_t r = ((c & 0x1F) << 6) | (b(i + 1) & 0x3F); i += 2; return r; }
    if (c < 0xF0) {
        char32_t r = ((c & 0x0F) << 12) | ((b(i + 1) & 0x3F) << 6) | (b(i + 2) & 0x3F);
        i += 3;
        return r;
    }
    char32_t r = ((c & 0x07) << 18) | ((b(i + 1) & 0x3F) << 12) | ((b(i + 2) & 0x3F) << 6) |
                 (b(i + 3) & 0x3F);
    i += 4;
    return r;
}

void utf8_append(std::string& out, char32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

ByteLevelTable::ByteLevelTable() {
    char_to_byte.fill(-1);
    int next = 0;
    for (int b = 0; b < 256; ++b) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + next++);
        utf8_append(byte_to_utf8[b], cp);
        char_to_byte[cp] = b;
    }
}

const ByteLevelTable& byte_level_table() {
    static const ByteLevelTable table;
    return table;
}

}  // namespace moescope
