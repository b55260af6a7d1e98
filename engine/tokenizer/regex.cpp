// PCRE2 wrapper of the tokenizer (see regex.h).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "engine/tokenizer/regex.h"

#include <pcre2.h>

#include "engine/errors.h"

namespace moescope {

Regex::Regex(const std::string& pattern, bool literal, const std::string& where) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    // PCRE2_LITERAL refuses PCRE2_UCP (character classes mean nothing in a literal).
    uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     options, &err, &offset, nullptr);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        throw FormatError(where + ": regex '" + pattern + "' does not compile at offset " +
                          std::to_string(offset) + ": " + reinterpret_cast<char*>(msg));
    }
    // JIT is an optimisation only: without it pcre2_match interprets the same pattern.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    code_ = code;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

namespace {
// One match-data block per thread and pattern size keeps find_all allocation-free and
// lets several threads encode with the same Tokenizer.
struct MatchData {
    pcre2_match_data* md = pcre2_match_data_create(32, nullptr);
    ~MatchData() { pcre2_match_data_free(md); }
};
pcre2_match_data* thread_match_data() {
    thread_local MatchData data;
    return data.md;
}
}  // namespace

void Regex::find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
    auto* code = static_cast<pcre2_code*>(code_);
    pcre2_match_data* md = thread_match_data();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t pos = 0;
    while (pos <= text.size()) {
        // Callers pass sanitized UTF-8, so PCRE2's own validity scan would only cost time.
        int rc = pcre2_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            throw Error(std::string("tokenizer regex match failed: ") + reinterpret_cast<char*>(msg));
        }
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        size_t b = ov[0], e = ov[1];
        out.emplace_back(b, e);
        if (e > b) {
            pos = e;
        } else {
            if (e >= text.size()) break;
            pos = e + 1;
            while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) ++pos;
        }
    }
}

bool Regex::matches(std::string_view text) const {
    int rc = pcre2_match(static_cast<pcre2_code*>(code_), reinterpret_cast<PCRE2_SPTR>(text.data()),
                         text.size(), 0, PCRE2_NO_UTF_CHECK, thread_match_data(), nullptr);
    return rc >= 0;
}

}  // namespace moescope
