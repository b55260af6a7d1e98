// libFuzzer target, two modes chosen by the first byte:
//  even: the rest is text for the embedded default model's tokenizer; encoding must not crash,
//        every id must be in the vocabulary, and valid UTF-8 must decode back to itself.
//  odd:  the rest is a tokenizer.json; loading either fails with a typed error or gives a
//        tokenizer that encodes and decodes a fixed sentence without crashing.
#include <string>
#include <string_view>

#include "engine/tokenizer/tokenizer.h"
#include "fuzz_util.h"

namespace {

bool valid_utf8(std::string_view s) {
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        int n = 0;
        uint32_t cp = c;
        if (c < 0x80) {
            ++i;
            continue;
        }
        if ((c & 0xE0) == 0xC0) n = 1, cp = c & 0x1F;
        else if ((c & 0xF0) == 0xE0) n = 2, cp = c & 0x0F;
        else if ((c & 0xF8) == 0xF0) n = 3, cp = c & 0x07;
        else return false;
        if (i + size_t(n) >= s.size()) return false;
        for (int k = 1; k <= n; ++k) {
            const unsigned char d = static_cast<unsigned char>(s[i + size_t(k)]);
            if ((d & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (d & 0x3F);
        }
        static const uint32_t min_cp[4] = {0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += size_t(n) + 1;
    }
    return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace moescope;
    if (size == 0) return 0;
    const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
    if (data[0] % 2 == 0) {
        static const Tokenizer tok = Tokenizer::load(MOESCOPE_SOURCE_DIR "/resources/models/default");
        fuzz::expect_clean([&] {
            const std::vector<int> ids = tok.encode(rest, false, false);
            for (int id : ids)
                if (id < 0 || id >= tok.vocab_size()) std::abort();
            if (valid_utf8(rest) && tok.decode(ids) != rest) {
                std::fprintf(stderr, "round trip changed valid UTF-8 text\n");
                std::abort();
            }
        });
    } else {
        fuzz::expect_clean([&] {
            Tokenizer t = Tokenizer::from_json(std::string(rest));
            (void)t.decode(t.encode("Hello, world! 12345 \xE4\xBD\xA0\xE5\xA5\xBD <|end|>"));
        });
    }
    return 0;
}
