// libFuzzer target: arbitrary bytes as a chat messages file (OpenAI's / transformers' JSON,
// what `--messages` reads), rendered through each chat format the engine knows (DeepSeek-V3's
// template, moescope's, the plain fallback) with and without the generation prompt. Parsing
// fails with a FormatError naming the message, or the messages render or are refused with a
// typed error; nothing else may escape, and nothing may crash.
#include <string>

#include "engine/tokenizer/chat_template.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace moescope;
    static const ChatTemplate formats[] = {
        ChatTemplate(deepseek_v3_chat_template_jinja(), "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        ChatTemplate(moescope_chat_template_jinja(), "<|bos|>", "<|eos|>"),
        ChatTemplate("", "", ""),
    };
    const std::string text(reinterpret_cast<const char*>(data), size);
    fuzz::expect_clean([&] {
        const std::vector<ChatMessage> messages = parse_chat_messages(text, "fuzz-chat.json");
        for (const ChatTemplate& t : formats)
            for (bool prompt : {false, true}) fuzz::expect_clean([&] {
                    (void)t.apply_chat_template(messages, prompt);
                    (void)t.ignored_parts(messages);
                });
    });
    return 0;
}
