// Tokenizer unit tests on hand-written tokenizer.json fixtures (expected ids worked out by hand
// from each fixture's vocab and merges), split behaviors, round trips, streaming, chat formats
// and malformed files.
#include <QtTest>
#include <random>

#include "engine/errors.h"
#include "engine/tokenizer/bpe_trainer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"

using namespace moescope;
using Ids = std::vector<int>;
using Words = std::vector<std::string>;
Q_DECLARE_METATYPE(Ids)
Q_DECLARE_METATYPE(Words)

namespace {

std::string fixture(const char* name) { return std::string(MOESCOPE_FIXTURES "/tokenizers/") + name; }

// A tokenizer.json with only the given pre-tokenizer and an empty model: for_each_word then
// shows exactly how the pre-tokenizer splits.
Tokenizer pre_only(const std::string& pre_tokenizer_json) {
    return Tokenizer::from_json(R"({"pre_tokenizer": )" + pre_tokenizer_json +
                                R"(, "model": {"type": "BPE", "vocab": {}, "merges": []}})");
}

Words words_of(const Tokenizer& t, const std::string& text) {
    Words w;
    t.for_each_word(text, [&](std::string_view s) { w.emplace_back(s); });
    return w;
}

// A small byte-level tokenizer trained on mixed-script text, for property tests that need
// real merges without the npm download.
const Tokenizer& trained() {
    static const Tokenizer tok = [] {
        std::string text;
        for (int i = 0; i < 200; ++i)
            text += "The quick brown fox jumps over the lazy dog " + std::to_string(i * 37) +
                    " 你好世界 こんにちは 😀👍 def f(x): return x**2\n";
        BpeTrainerOptions opt;
        opt.vocab_size = 400;
        TrainedTokenizer t = train_bpe_json({text}, opt);
        return Tokenizer::from_json(t.tokenizer_json, t.tokenizer_config_json);
    }();
    return tok;
}

std::string random_utf8(std::mt19937& rng, int len) {
    static const std::vector<std::pair<char32_t, char32_t>> ranges = {
        {0x00, 0x7f}, {0x20, 0x7e}, {0x20, 0x20}, {0x0a, 0x0d}, {0x80, 0x7ff}, {0x300, 0x36f},
        {0x800, 0xd7ff}, {0xe000, 0xfffd}, {0x4e00, 0x9fff}, {0x10000, 0x10ffff}, {0x1f300, 0x1faff}};
    std::string s;
    for (int i = 0; i < len; ++i) {
        auto [lo, hi] = ranges[rng() % ranges.size()];
        utf8_append(s, lo + rng() % (hi - lo + 1));
    }
    return s;
}

}  // namespace

class TestTokenizer : public QObject {
    Q_OBJECT
private slots:
    void char_bpe_data() {
        QTest::addColumn<QString>("text");
        QTest::addColumn<bool>("add_special");
        QTest::addColumn<bool>("parse_special");
        QTest::addColumn<Ids>("expected");
        // merges: (a,b)=0 (ab,c)=1 (c,d)=2 (b,c)=3; lowest rank first.
        QTest::newRow("rank order") << "abcd" << false << true << Ids{7, 4};
        QTest::newRow("later pair first") << "bcd" << false << true << Ids{2, 8};
        QTest::newRow("split on space") << "ab ab" << false << true << Ids{6, 5, 6};
        QTest::newRow("unk, not fused") << "abxx" << false << true << Ids{6, 0, 0};
        QTest::newRow("template bos/eos") << "ab" << true << true << Ids{10, 6, 11};
        QTest::newRow("lstrip rstrip") << "a <sep> b" << false << true << Ids{1, 12, 2};
        QTest::newRow("special as text") << "a<s>" << false << false << Ids{1, 0, 0, 0};
        QTest::newRow("special parsed") << "a<s>" << false << true << Ids{1, 10};
        QTest::newRow("single_word") << "[X] a[X]" << false << true << Ids{13, 5, 1, 0, 0, 0};
        QTest::newRow("empty") << "" << false << true << Ids{};
        QTest::newRow("empty with specials") << "" << true << true << Ids{10, 11};
    }
    void char_bpe() {
        QFETCH(QString, text);
        QFETCH(bool, add_special);
        QFETCH(bool, parse_special);
        QFETCH(Ids, expected);
        Tokenizer tok = Tokenizer::load(fixture("char_bpe"));
        QCOMPARE(tok.encode(text.toStdString(), add_special, parse_special), expected);
    }

    void char_bpe_metadata() {
        Tokenizer tok = Tokenizer::load(fixture("char_bpe/tokenizer.json"));
        QCOMPARE(tok.vocab_size(), 14);
        QCOMPARE(tok.bos_id(), std::optional<int>(10));
        QCOMPARE(tok.eos_id(), std::optional<int>(11));  // eos_token given as an object
        QVERIFY(tok.is_special(12));
        QVERIFY(!tok.is_special(13));
        QVERIFY(!tok.is_special(6));
        QCOMPARE(tok.token_text(7), std::string("abc"));
        QCOMPARE(tok.token_text(99), std::string());
        QCOMPARE(tok.token_id("cd"), std::optional<int>(8));
        QCOMPARE(tok.token_id("zz"), std::nullopt);
        QCOMPARE(tok.decode({10, 7, 4, 12, 2, 11}), std::string("<s>abcd<sep>b</s>"));
        QCOMPARE(tok.decode({10, 7, 4, 12, 2, 11}, true), std::string("abcdb"));
        // The NFC normalizer composes e + U+0301 into one character (one <unk>, fuse_unk off).
        QCOMPARE(tok.encode("e\u0301"), Ids{0});
        QCOMPARE(tok.encode("\u00e9a"), (Ids{0, 1}));
    }

    void byte_level_data() {
        QTest::addColumn<QString>("text");
        QTest::addColumn<Ids>("expected");
        QTest::addColumn<QString>("decoded");
        // ids are byte values; merges (Ġ,t)=256 (h,e)=257 (Ġt,he)=258 (i,n)=259; prefix space added.
        // Decoding keeps the prefix spaces the pre-tokenizer added (also after added tokens).
        QTest::newRow("merges") << "the in" << Ids{258, 32, 259} << " the in";
        QTest::newRow("two bytes") << "é" << Ids{32, 195, 169} << " é";
        QTest::newRow("special between") << "x<|eot|>the" << Ids{32, 120, 260, 258} << " x<|eot|> the";
        QTest::newRow("gpt2 regex") << "he's 42!" << Ids{32, 257, 39, 115, 32, 52, 50, 33} << " he's 42!";
    }
    void byte_level() {
        QFETCH(QString, text);
        QFETCH(Ids, expected);
        QFETCH(QString, decoded);
        Tokenizer tok = Tokenizer::load(fixture("byte_level"));
        QCOMPARE(tok.encode(text.toStdString()), expected);
        QCOMPARE(QString::fromStdString(tok.decode(expected)), decoded);
    }

    void token_display() {
        Tokenizer tok = Tokenizer::load(fixture("byte_level"));
        QCOMPARE(tok.token_display(258), std::string(" the"));
        QCOMPARE(tok.token_display(195), std::string("\\xC3"));
        QCOMPARE(tok.token_text(258), std::string("Ġthe"));
        QCOMPARE(tok.decode({195}), std::string("\xEF\xBF\xBD"));
    }

    void split_behaviors_data() {
        QTest::addColumn<QString>("pre");
        QTest::addColumn<QString>("text");
        QTest::addColumn<Words>("expected");
        auto split = [](const char* pattern_kind, const char* pattern, const char* behavior, bool invert) {
            return QString(R"({"type": "Split", "pattern": {"%1": "%2"}, "behavior": "%3", "invert": %4})")
                .arg(pattern_kind, pattern, behavior, invert ? "true" : "false");
        };
        const QString t = "a-b--c-";
        QTest::newRow("Removed") << split("Regex", "-", "Removed", false) << t << Words{"a", "b", "c"};
        QTest::newRow("Isolated") << split("String", "-", "Isolated", false) << t
                                  << Words{"a", "-", "b", "-", "-", "c", "-"};
        QTest::newRow("MergedWithPrevious") << split("Regex", "-", "MergedWithPrevious", false) << t
                                            << Words{"a-", "b-", "-", "c-"};
        QTest::newRow("MergedWithNext") << split("Regex", "-", "MergedWithNext", false) << t
                                        << Words{"a", "-b", "-", "-c", "-"};
        QTest::newRow("Contiguous") << split("Regex", "-", "Contiguous", false) << t
                                    << Words{"a", "-", "b", "--", "c", "-"};
        QTest::newRow("invert Removed") << split("Regex", "-", "Removed", true) << t
                                        << Words{"-", "-", "-", "-"};
        QTest::newRow("invert MergedWithPrevious") << split("Regex", "-", "MergedWithPrevious", true) << t
                                                   << Words{"a", "-b", "-", "-c", "-"};
        QTest::newRow("unicode regex") << split("Regex", "\\\\p{L}+", "Isolated", false) << "日本語 and ü"
                                       << Words{"日本語", " ", "and", " ", "ü"};
        QTest::newRow("Digits individual") << R"({"type": "Digits", "individual_digits": true})" << "ab123c"
                                           << Words{"ab", "1", "2", "3", "c"};
        QTest::newRow("Digits grouped") << R"({"type": "Digits", "individual_digits": false})" << "ab123c"
                                        << Words{"ab", "123", "c"};
        QTest::newRow("ByteLevel prefix, no regex")
            << R"({"type": "ByteLevel", "add_prefix_space": true, "use_regex": false})" << "hi there"
            << Words{" hi there"};
        QTest::newRow("ByteLevel gpt2 regex")
            << R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})" << "it's  3 ok"
            << Words{"it", "'s", " ", " 3", " ok"};
        QTest::newRow("Sequence")
            << QString(R"({"type": "Sequence", "pretokenizers": [%1, {"type": "Digits", "individual_digits": false}]})")
                   .arg(split("Regex", " ", "Removed", false))
            << "x12 y3" << Words{"x", "12", "y", "3"};
        QTest::newRow("Metaspace") << R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true})"
                                   << "hi there" << Words{"▁hi", "▁there"};
    }
    void split_behaviors() {
        QFETCH(QString, pre);
        QFETCH(QString, text);
        QFETCH(Words, expected);
        QCOMPARE(words_of(pre_only(pre.toStdString()), text.toStdString()), expected);
    }

    void round_trip_random_utf8() {
        const Tokenizer& tok = trained();
        std::mt19937 rng(7);
        for (int n = 0; n < 300; ++n) {
            std::string s = random_utf8(rng, 1 + int(rng() % 80));
            QCOMPARE(tok.decode(tok.encode(s)), s);
        }
    }

    void round_trip_adversarial_data() {
        QTest::addColumn<QByteArray>("text");
        QTest::newRow("combining") << QByteArray("e\xCC\x81\xCC\x82\xCC\x83 a\xCC\x80 \xCC\x81 alone");
        QTest::newRow("emoji zwj") << QByteArray("\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9 \xF0\x9F\x87\xAF\xF0\x9F\x87\xB5");
        QTest::newRow("cjk") << QByteArray("漢字かなカナ한글");
        QTest::newRow("controls") << QByteArray("\x01\x02\t\x0b\x0c\r\n\x1f\x7f", 9);
        QTest::newRow("nul") << QByteArray("a\0b", 3);
        QTest::newRow("long word") << QByteArray(20000, 'x');
        QTest::newRow("long spaces") << QByteArray(5000, ' ');
        QTest::newRow("special text") << QByteArray("a<|bos|>b<|eos|><|user|>");
        QTest::newRow("max code point") << QByteArray("\xF4\x8F\xBF\xBF\xEF\xBF\xBF");
    }
    void round_trip_adversarial() {
        QFETCH(QByteArray, text);
        const std::string s = text.toStdString();
        QCOMPARE(trained().decode(trained().encode(s)), s);
        QCOMPARE(trained().decode(trained().encode(s, false, false)), s);
    }

    void round_trip_one_megabyte() {
        std::mt19937 rng(11);
        std::string s;
        while (s.size() < (1u << 20)) {
            s += random_utf8(rng, 40);
            s += " the quick brown fox 12345 ";
        }
        QElapsedTimer timer;
        timer.start();
        std::vector<int> ids = trained().encode(s);
        QVERIFY(trained().decode(ids) == s);
        qInfo("1 MB round trip in %lld ms (speed is measured by moescope-cli bench, not asserted)",
              static_cast<long long>(timer.elapsed()));
    }

    void invalid_utf8_is_replaced_data() {
        QTest::addColumn<QByteArray>("text");
        QTest::addColumn<QByteArray>("expected");
        QTest::newRow("lone continuation") << QByteArray("a\x80z") << QByteArray("a\xEF\xBF\xBDz");
        QTest::newRow("truncated 3-byte") << QByteArray("\xE4\xBD") << QByteArray("\xEF\xBF\xBD");
        QTest::newRow("overlong") << QByteArray("\xC0\xAF") << QByteArray("\xEF\xBF\xBD\xEF\xBF\xBD");
        QTest::newRow("surrogate") << QByteArray("\xED\xA0\x80") << QByteArray("\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
        QTest::newRow("too large") << QByteArray("\xF5\x80") << QByteArray("\xEF\xBF\xBD\xEF\xBF\xBD");
        QTest::newRow("ff") << QByteArray("x\xFF") << QByteArray("x\xEF\xBF\xBD");
    }
    void invalid_utf8_is_replaced() {
        QFETCH(QByteArray, text);
        QFETCH(QByteArray, expected);
        QCOMPARE(QByteArray::fromStdString(utf8_sanitize(text.toStdString())), expected);
        QCOMPARE(QByteArray::fromStdString(trained().decode(trained().encode(text.toStdString()))), expected);
    }

    void stream_decoder() {
        Tokenizer tok = Tokenizer::load(fixture("byte_level"));
        const std::string text = "héllo 😀 世界 the end";
        std::vector<int> ids = tok.encode(text);
        StreamDecoder stream(tok);
        std::string got;
        for (int id : ids) {
            std::string piece = stream.push(id);
            QVERIFY(utf8_is_valid(piece));
            got += piece;
        }
        got += stream.flush();
        QCOMPARE(got, " " + text);
        // The four bytes of 😀 come one per token: nothing until the last one.
        StreamDecoder s2(tok);
        QCOMPARE(s2.push(0xF0), std::string());
        QCOMPARE(s2.push(0x9F), std::string());
        QCOMPARE(s2.push(0x98), std::string());
        QCOMPARE(s2.push(0x80), std::string("😀"));
        // An invalid byte is not held back; an unfinished character at the end becomes U+FFFD.
        QCOMPARE(s2.push(0xFF), std::string("\xEF\xBF\xBD"));
        QCOMPARE(s2.push(0xE4), std::string());
        QCOMPARE(s2.flush(), std::string("\xEF\xBF\xBD"));
    }

    void chat_templates() {
        Tokenizer char_tok = Tokenizer::load(fixture("char_bpe"));
        const ChatTemplate& unknown = char_tok.chat_template();
        QCOMPARE(unknown.format(), ChatTemplate::Format::Plain);
        QVERIFY(!unknown.warning().empty());
        QCOMPARE(unknown.apply_chat_template({{"system", "S"}, {"user", "hi"}, {"assistant", "yo"}, {"user", "q"}}, true),
                 std::string("System: S\nUser: hi\nAssistant: yo\nUser: q\nAssistant: "));
        QVERIFY(!Tokenizer::load(fixture("byte_level")).chat_template().warning().empty());  // no config

        const ChatTemplate& ours = trained().chat_template();
        QCOMPARE(ours.format(), ChatTemplate::Format::Moescope);
        QVERIFY(ours.warning().empty());
        std::string s = ours.apply_chat_template({{"system", "S"}, {"user", "hi"}, {"assistant", "yo"}}, false);
        QCOMPARE(s, std::string("<|bos|><|system|>S<|user|>hi<|assistant|>yo<|eos|>"));
        std::vector<int> ids = trained().encode(s);
        QCOMPARE(ids.front(), *trained().bos_id());
        QCOMPARE(ids.back(), *trained().eos_id());
        QCOMPARE(ids[1], *trained().token_id("<|system|>"));

        ChatTemplate deepseek("...{{'<｜User｜>' + message['content']}}...{{'<｜Assistant｜>'}}", "<B>", "<E>");
        QCOMPARE(deepseek.format(), ChatTemplate::Format::DeepSeekV3);
        QCOMPARE(deepseek.apply_chat_template({{"user", "a"}, {"assistant", "b"}, {"system", "s1"}, {"system", "s2"}}, false),
                 std::string("<B>s1\n\ns2<｜User｜>a<｜Assistant｜>b<｜end▁of▁sentence｜>"));
        QVERIFY(!deepseek.warning().empty());  // not DeepSeek-V3's exact template
        QCOMPARE(deepseek.apply_chat_template({{"tool", "x"}}, true),
                 std::string("<B><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>x<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"));
        QVERIFY_THROWS_EXCEPTION(Error, deepseek.apply_chat_template({{"developer", "x"}}, false));
        QVERIFY_THROWS_EXCEPTION(Error, ours.apply_chat_template({{"tool", "x"}}, false));
    }

    void malformed_files_data() {
        QTest::addColumn<QString>("file");
        QTest::addColumn<QString>("key");
        QTest::newRow("bad json") << "bad_json.json" << "not valid JSON";
        QTest::newRow("merge part missing") << "merge_part_missing.json" << "model.merges[1]: 'c' is not in model.vocab";
        QTest::newRow("merge result missing") << "merge_result_missing.json" << "model.merges[0]: merged token 'ab'";
        QTest::newRow("unknown model") << "unknown_model_type.json" << "model.type";
        QTest::newRow("unknown pre-tokenizer") << "unknown_pre_tokenizer.json" << "pre_tokenizer.pretokenizers[0].type";
        QTest::newRow("unknown normalizer") << "unknown_normalizer.json" << "normalizer.type";
        QTest::newRow("bad regex") << "bad_regex.json" << "pre_tokenizer.pattern";
        QTest::newRow("bad behavior") << "bad_behavior.json" << "pre_tokenizer.behavior";
        QTest::newRow("no merges") << "no_merges.json" << "model.merges: missing";
        QTest::newRow("no file") << "does_not_exist.json" << "no tokenizer.json";
        // Ids that were cast unchecked (a float 1e300 into an int is undefined; 4294967297
        // wrapped to 1) or that would size the id table at gigabytes.
        QTest::newRow("float added id") << "float_added_id.json" << "added_tokens[0].id: expected an integer id";
        QTest::newRow("huge vocab id") << "huge_vocab_id.json" << "model.vocab.b: id 4294967297 is out of range";
        QTest::newRow("large vocab id") << "large_vocab_id.json" << "model.vocab.b: id 2000000000 is out of range";
    }
    void malformed_files() {
        QFETCH(QString, file);
        QFETCH(QString, key);
        const std::string path = fixture("malformed/") + file.toStdString();
        try {
            Tokenizer::load(path);
            QFAIL("expected FormatError");
        } catch (const FormatError& e) {
            const QString msg = QString::fromUtf8(e.what());
            QVERIFY2(msg.contains(file), qPrintable(msg));
            QVERIFY2(msg.contains(key), qPrintable(msg));
        }
    }
};

QTEST_GUILESS_MAIN(TestTokenizer)
#include "test_tokenizer.moc"
