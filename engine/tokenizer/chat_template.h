// Chat formatting from tokenizer_config.json's chat_template: DeepSeek-V3's format and
// moescope's own format are recognized from the template text and rendered natively (no
// Jinja engine); anything else falls back to a plain "User:/Assistant:" format with a warning.
// DeepSeek-V3's format covers every branch of its Jinja template (system prompts, tool calls,
// tool outputs) and renders the same string as transformers, quirks included.
#pragma once
#include <optional>
#include <string>
#include <vector>

namespace moescope {

// One call in an assistant message, as in OpenAI's and transformers' message format
// {"type": "function", "function": {"name": ..., "arguments": "<JSON text>"}}.
struct ToolCall {
    std::string type = "function";
    std::string name;
    std::string arguments;  // the arguments as JSON text, rendered verbatim
};

struct ChatMessage {
    std::string role;                    // "system", "user", "assistant" or "tool"
    std::optional<std::string> content;  // nullopt: JSON null (an assistant message that only calls tools)
    std::vector<ToolCall> tool_calls;    // assistant messages only

    ChatMessage() = default;
    // {"user", "hi"} and {"assistant", std::nullopt, {calls}} read like the JSON they stand for.
    ChatMessage(std::string role_, std::optional<std::string> content_, std::vector<ToolCall> tool_calls_ = {})
        : role(std::move(role_)), content(std::move(content_)), tool_calls(std::move(tool_calls_)) {}
};

class ChatTemplate {
public:
    enum class Format { DeepSeekV3, Moescope, Plain };

    ChatTemplate() = default;
    // template_text: the chat_template string ("" when absent); bos/eos: the config's tokens.
    ChatTemplate(const std::string& template_text, std::string bos_token, std::string eos_token);

    // Throws Error naming the message index for what the template cannot render (a role it
    // does not know, a null content where the template concatenates it).
    std::string apply_chat_template(const std::vector<ChatMessage>& messages,
                                    bool add_generation_prompt) const;
    // What apply_chat_template leaves out of these messages without an error, one line each
    // (DeepSeek-V3's template drops the tool_calls of an assistant message that has content),
    // for tools to print as warnings.
    std::vector<std::string> ignored_parts(const std::vector<ChatMessage>& messages) const;
    Format format() const { return format_; }
    // Non-empty when the template was not recognized and the plain format is used, or when a
    // DeepSeek-style template is not DeepSeek-V3's exact text (rendered with V3's rules).
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
// DeepSeek-V3's chat_template (tokenizer_config.json of deepseek-ai/DeepSeek-V3), the text
// ChatTemplate's DeepSeekV3 format implements.
const std::string& deepseek_v3_chat_template_jinja();

// Chat messages in OpenAI's / transformers' JSON format: an array of
// {"role": ..., "content": ..., "tool_calls": [{"type": "function", "function": {"name": ...,
// "arguments": "..."}}]}. source names the file in errors, which also give the message index.
// Throws FormatError for malformed JSON or messages.
std::vector<ChatMessage> parse_chat_messages(const std::string& json_text, const std::string& source);
std::vector<ChatMessage> read_chat_messages(const std::string& path);

}  // namespace moescope
