// Unicode normalizers of tokenizer.json on ICU (see normalizer.h).
// tokenizers' Rust crates carry older Unicode tables than ICU 72 (Unicode 15.0), and where the
// versions differ, so would the tokens. So the ICU data is cut back to what each crate knows,
// measured per code point against tokenizers 0.23.2 (tests/engine/test_tokenizer_parity.cpp):
//   unicode-normalization-alignments (NFC/NFD/NFKC/NFKD, is_combining_mark): Unicode 9.0;
//   unicode_categories (BertNormalizer's is_other = Cc|Cf|Co, is_mark_nonspacing = Mn): 8.0;
//   Rust std (char::to_lowercase, char::is_whitespace): 17.0, newer than ICU 72.
#include "engine/tokenizer/normalizer.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/uniset.h>
#include <unicode/ustring.h>
#include <unicode/utf16.h>

#include <memory>

#include "engine/errors.h"
#include "engine/tokenizer/utf8.h"

namespace moescope {

namespace {

bool is_ascii(std::string_view s) {
    for (char c : s)
        if (static_cast<unsigned char>(c) >= 0x80) return false;
    return true;
}

bool in_category(char32_t c, uint32_t mask) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & mask) != 0; }

// Whether c was assigned in Unicode major.minor or earlier.
bool assigned_by(char32_t c, int major, int minor) {
    UVersionInfo v;
    u_charAge(static_cast<UChar32>(c), v);
    return v[0] < major || (v[0] == major && v[1] <= minor);
}

// unicode-normalization-alignments' is_combining_mark (StripAccents): category M in Unicode
// 9.0. Since then 1CF2/1CF3 became letters and 111C9 a mark.
bool hf_is_combining_mark(char32_t c) {
    if (c < 0x300) return false;
    if (c == 0x1CF2 || c == 0x1CF3) return true;
    if (c == 0x111C9) return false;
    return assigned_by(c, 9, 0) && in_category(c, U_GC_M_MASK);
}

// unicode_categories' tables (BertNormalizer) are Unicode 8.0; these characters have changed
// general category since: 1734 Mn -> Mc, 1885/1886 Lo -> Mn, A9BD Mc -> Mn, 111C9 Po -> Mn.
bool hf_is_mark_nonspacing(char32_t c) {
    if (c < 0x300) return false;
    if (c == 0x1734) return true;
    if (c == 0x1885 || c == 0x1886 || c == 0xA9BD || c == 0x111C9) return false;
    return assigned_by(c, 8, 0) && in_category(c, U_GC_MN_MASK);
}
bool hf_is_other(char32_t c) {  // Cc | Cf | Co (the name says "other", Cn and Cs are not in it)
    return assigned_by(c, 8, 0) && in_category(c, U_GC_CC_MASK | U_GC_CF_MASK | U_GC_CO_MASK);
}

// The four forms restricted to the characters of Unicode 9.0: newer characters are left as
// they are and, having no combining class for the crate, end every composition or reordering.
struct Normalizers {
    icu::UnicodeSet known;
    std::unique_ptr<icu::FilteredNormalizer2> form[4];
    UErrorCode err = U_ZERO_ERROR;
    Normalizers() : known(icu::UnicodeString("[:age=9.0:]"), err) {
        known.freeze();
        const icu::Normalizer2* base[4] = {icu::Normalizer2::getNFCInstance(err), icu::Normalizer2::getNFDInstance(err),
                                           icu::Normalizer2::getNFKCInstance(err), icu::Normalizer2::getNFKDInstance(err)};
        if (U_FAILURE(err)) return;
        for (int i = 0; i < 4; ++i) form[i] = std::make_unique<icu::FilteredNormalizer2>(*base[i], known);
    }
};

bool is_white_space(char32_t c) { return u_isUWhiteSpace(static_cast<UChar32>(c)); }

// Keeps the characters for which keep(c) holds.
template <class Keep>
std::string filter_chars(std::string_view s, Keep keep) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        const size_t start = i;
        const char32_t c = utf8_next(s, i);
        if (keep(c)) out.append(s.substr(start, i - start));
    }
    return out;
}

// Lowercase mappings of uppercase letters added in Unicode 16.0 and 17.0, which Rust's
// char::to_lowercase (tokenizers 0.23) knows and ICU before 76 does not. Used only where ICU
// leaves the character unchanged, so a newer ICU's own data wins.
char32_t newer_lowercase(char32_t c) {
    if (c >= 0x10D50 && c <= 0x10D65) return c + 0x20;  // Garay
    if (c >= 0x16EA0 && c <= 0x16EB8) return c + 0x1B;  // Kirat Rai
    switch (c) {
    case 0x1C89: return 0x1C8A;
    case 0xA7CB: return 0x0264;
    case 0xA7CC: return 0xA7CD;
    case 0xA7CE: return 0xA7CF;
    case 0xA7D2: return 0xA7D3;
    case 0xA7D4: return 0xA7D5;
    case 0xA7DA: return 0xA7DB;
    case 0xA7DC: return 0x019B;
    default: return c;
    }
}

}  // namespace

std::string unicode_normalize(std::string_view s, UnicodeForm form) {
    if (is_ascii(s)) return std::string(s);  // every form is the identity on ASCII
    static const Normalizers normalizers;
    UErrorCode err = normalizers.err;
    std::string out;
    out.reserve(s.size() + s.size() / 4);
    if (U_SUCCESS(err)) {
        icu::StringByteSink<std::string> sink(&out);
        normalizers.form[static_cast<int>(form)]->normalizeUTF8(
            0, icu::StringPiece(s.data(), static_cast<int32_t>(s.size())), sink, nullptr, err);
    }
    if (U_FAILURE(err))
        throw FormatError(std::string("Unicode normalization failed in ICU: ") + u_errorName(err));
    return out;
}

std::string unicode_lowercase(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        const auto b = static_cast<unsigned char>(s[i]);
        if (b < 0x80) {
            out.push_back(b >= 'A' && b <= 'Z' ? char(b + 32) : char(b));
            ++i;
            continue;
        }
        const char32_t c = utf8_next(s, i);
        // One character at a time with the root locale: ICU's full mapping (SpecialCasing
        // included) without the context of the neighbours, which is what char::to_lowercase
        // is; whole-string lowering would apply Final_Sigma.
        UChar src[2], dst[8];
        int32_t len = 0;
        U16_APPEND_UNSAFE(src, len, static_cast<UChar32>(c));
        UErrorCode err = U_ZERO_ERROR;
        const int32_t n = u_strToLower(dst, 8, src, len, "", &err);
        if (U_FAILURE(err)) throw FormatError(std::string("lowercasing failed in ICU: ") + u_errorName(err));
        if (n == len && u_strncmp(src, dst, len) == 0) {
            utf8_append(out, newer_lowercase(c));
            continue;
        }
        for (int32_t k = 0; k < n;) {
            UChar32 cp;
            U16_NEXT(dst, k, n, cp);
            utf8_append(out, static_cast<char32_t>(cp));
        }
    }
    return out;
}

std::string unicode_strip(std::string_view s, bool left, bool right) {
    size_t b = 0, e = s.size();
    if (left)
        while (b < e) {
            size_t k = b;
            if (!is_white_space(utf8_next(s, k))) break;
            b = k;
        }
    if (right)
        while (e > b) {
            size_t k = e - 1;
            while (k > b && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
            size_t kk = k;
            if (!is_white_space(utf8_next(s, kk))) break;
            e = k;
        }
    return std::string(s.substr(b, e - b));
}

std::string strip_marks(std::string_view s) {
    if (is_ascii(s)) return std::string(s);
    return filter_chars(s, [](char32_t c) { return !hf_is_combining_mark(c); });
}

std::string bert_normalize(std::string_view s, const BertNormalizerOptions& o) {
    std::string text(s);
    if (o.clean_text) {
        std::string out;
        out.reserve(text.size());
        for (size_t i = 0; i < text.size();) {
            const size_t start = i;
            const char32_t c = utf8_next(text, i);
            const bool tab_or_newline = c == '\t' || c == '\n' || c == '\r';
            const bool control = !tab_or_newline && hf_is_other(c);
            if (c == 0 || c == 0xFFFD || control) continue;
            if (tab_or_newline || is_white_space(c))
                out.push_back(' ');
            else
                out.append(text, start, i - start);
        }
        text.swap(out);
    }
    if (o.handle_chinese_chars) {
        auto chinese = [](char32_t c) {
            return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
                   (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
                   (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
                   (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
        };
        std::string out;
        out.reserve(text.size());
        for (size_t i = 0; i < text.size();) {
            const size_t start = i;
            const char32_t c = utf8_next(text, i);
            const bool cjk = chinese(c);
            if (cjk) out.push_back(' ');
            out.append(text, start, i - start);
            if (cjk) out.push_back(' ');
        }
        text.swap(out);
    }
    if (o.strip_accents) {
        text = unicode_normalize(text, UnicodeForm::NFD);
        if (!is_ascii(text)) text = filter_chars(text, [](char32_t c) { return !hf_is_mark_nonspacing(c); });
    }
    if (o.lowercase) text = unicode_lowercase(text);
    return text;
}

}  // namespace moescope
