// A compiled PCRE2 pattern (UTF + UCP, JIT when available) for the tokenizer's Split steps.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moescope {

class Regex {
public:
    // `where` names the file and key for the error message when the pattern does not compile.
    Regex(const std::string& pattern, bool literal, const std::string& where);
    ~Regex();
    Regex(const Regex&) = delete;
    Regex& operator=(const Regex&) = delete;

    // All non-overlapping matches [begin, end) in a valid UTF-8 string, left to right. An empty
    // match is reported and the search resumes one character later, as Oniguruma's find_iter.
    void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;
    // Whether the pattern matches somewhere in text (used for single-character class tests).
    bool matches(std::string_view text) const;

private:
    void* code_ = nullptr;  // pcre2_code_8*
};

}  // namespace moescope
