// Chat formatting from tokenizer_config.json's chat_template: DeepSeek-V3's format and
// moescope's own format are recognized from the template text and rendered natively (no
// Jinja engine); anything else falls back to a plain "User:/Assistant:" format with a warning.
#pragma once
#include <string>
#include <vector>

namespace moescope {

struct ChatMessage {
    std::string role;  // "system", "user" or "assistant"
    std::string content;
};

class ChatTemplate {
public:
    enum class Format { DeepSeekV3, Moescope, Plain };

    ChatTemplate() = default;
    // template_text: the chat_template string ("" when absent); bos/eos: the config's tokens.
    ChatTemplate(const std::string& template_text, std::string bos_token, std::string eos_token);

    std::string apply_chat_template(const std::vector<ChatMessage>& messages,
                                    bool add_generation_prompt) const;
    Format format() const { return format_; }
    // Non-empty when the template was not recognized and the plain format is used.
    const std::string& warning() const { return warning_; }

private:
    Format format_ = Format::Plain;
    std::string bos_, eos_;
    std::string warning_ = "no chat_template in tokenizer_config.json; using the plain "
                           "\"User: ...\\nAssistant: \" format";
};

// The marker moescope writes into the chat_template of the tokenizers it trains.
inline constexpr const char* kMoescopeChatMarker = "moescope chat format v1";
// The Jinja template of moescope's own format, as written into tokenizer_config.json.
std::string moescope_chat_template_jinja();

}  // namespace moescope
