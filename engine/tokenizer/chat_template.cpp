// Chat formatting (see chat_template.h).
#include "engine/tokenizer/chat_template.h"

#include "engine/errors.h"

namespace moescope {

std::string moescope_chat_template_jinja() {
    // Same output as ChatTemplate's Moescope format, for tools that run Jinja (transformers).
    return std::string("{#- ") + kMoescopeChatMarker + " -#}"
           "{{- bos_token -}}"
           "{%- for message in messages -%}"
           "{%- if message['role'] == 'system' -%}{{ '<|system|>' + message['content'] }}"
           "{%- elif message['role'] == 'user' -%}{{ '<|user|>' + message['content'] }}"
           "{%- elif message['role'] == 'assistant' -%}"
           "{{ '<|assistant|>' + message['content'] + eos_token }}"
           "{%- endif -%}"
           "{%- endfor -%}"
           "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}";
}

ChatTemplate::ChatTemplate(const std::string& text, std::string bos, std::string eos)
    : bos_(std::move(bos)), eos_(std::move(eos)) {
    if (text.find(kMoescopeChatMarker) != std::string::npos) {
        format_ = Format::Moescope;
        warning_.clear();
    } else if (text.find("<｜User｜>") != std::string::npos &&
               text.find("<｜Assistant｜>") != std::string::npos) {
        format_ = Format::DeepSeekV3;
        warning_.clear();
    } else if (!text.empty()) {
        format_ = Format::Plain;
        warning_ = "chat_template in tokenizer_config.json is not a format moescope knows "
                   "(DeepSeek-V3 or moescope); using the plain \"User: ...\\nAssistant: \" format";
    }
}

static void check_role(const ChatMessage& m, const char* format) {
    if (m.role != "system" && m.role != "user" && m.role != "assistant")
        throw Error(std::string("chat template (") + format + "): role '" + m.role +
                    "' is not supported; expected system, user or assistant");
}

std::string ChatTemplate::apply_chat_template(const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt) const {
    std::string out;
    switch (format_) {
    case Format::DeepSeekV3: {
        // DeepSeek-V3's template gathers every system message (joined by a blank line) right
        // after BOS, then renders the turns in order.
        std::string system;
        bool first_system = true;
        for (const auto& m : messages) {
            check_role(m, "DeepSeek-V3");
            if (m.role != "system") continue;
            if (!first_system) system += "\n\n";
            system += m.content;
            first_system = false;
        }
        out = bos_ + system;
        for (const auto& m : messages) {
            if (m.role == "user") out += "<｜User｜>" + m.content;
            else if (m.role == "assistant") out += "<｜Assistant｜>" + m.content + "<｜end▁of▁sentence｜>";
        }
        if (add_generation_prompt) out += "<｜Assistant｜>";
        break;
    }
    case Format::Moescope:
        out = bos_;
        for (const auto& m : messages) {
            check_role(m, "moescope");
            if (m.role == "system") out += "<|system|>" + m.content;
            else if (m.role == "user") out += "<|user|>" + m.content;
            else out += "<|assistant|>" + m.content + eos_;
        }
        if (add_generation_prompt) out += "<|assistant|>";
        break;
    case Format::Plain:
        for (const auto& m : messages) {
            check_role(m, "plain");
            if (m.role == "system") out += "System: " + m.content + "\n";
            else if (m.role == "user") out += "User: " + m.content + "\n";
            else out += "Assistant: " + m.content + "\n";
        }
        if (add_generation_prompt) out += "Assistant: ";
        break;
    }
    return out;
}

}  // namespace moescope
