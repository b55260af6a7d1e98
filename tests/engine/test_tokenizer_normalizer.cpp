// Unicode normalizers of tokenizer.json (engine/tokenizer/normalizer.h) on hand-checked strings,
// and the normalizers fixture encoded end to end. No npm needed: the Hugging Face comparison
// over whole code point ranges is in test_tokenizer_parity.cpp.
#include <QtTest>

#include "engine/errors.h"
#include "engine/tokenizer/normalizer.h"
#include "engine/tokenizer/tokenizer.h"

using namespace moescope;
using Ids = std::vector<int>;

namespace {

std::string fixture(const std::string& name) { return std::string(MOESCOPE_FIXTURES "/tokenizers/") + name; }

std::string run_normalizer(const QString& normalizer, const std::string& s) {
    if (normalizer == "NFC") return unicode_normalize(s, UnicodeForm::NFC);
    if (normalizer == "NFD") return unicode_normalize(s, UnicodeForm::NFD);
    if (normalizer == "NFKC") return unicode_normalize(s, UnicodeForm::NFKC);
    if (normalizer == "NFKD") return unicode_normalize(s, UnicodeForm::NFKD);
    if (normalizer == "Lowercase") return unicode_lowercase(s);
    if (normalizer == "StripAccents") return strip_marks(s);
    if (normalizer == "Strip") return unicode_strip(s, true, true);
    if (normalizer == "StripLeft") return unicode_strip(s, true, false);
    if (normalizer == "Bert") return bert_normalize(s, BertNormalizerOptions{});
    if (normalizer == "BertCased") return bert_normalize(s, BertNormalizerOptions{true, true, false, false});
    throw std::runtime_error("unknown normalizer in test table");
}

}  // namespace

class TestTokenizerNormalizer : public QObject {
    Q_OBJECT

private slots:
    void strings_data() {
        QTest::addColumn<QString>("normalizer");
        QTest::addColumn<QByteArray>("input");     // UTF-8
        QTest::addColumn<QByteArray>("expected");  // UTF-8
        auto row = [](const char* name, const char* n, const char* in, const char* out) {
            QTest::newRow(name) << QString(n) << QByteArray(in) << QByteArray(out);
        };
        row("NFD é", "NFD", "\u00e9", "e\u0301");
        row("NFC e+acute", "NFC", "e\u0301", "\u00e9");
        row("NFC reorders marks", "NFC", "a\u0301\u0323", "\u1ea1\u0301");       // dot below (220) first
        row("NFD reorders marks", "NFD", "q\u0307\u0323", "q\u0323\u0307");
        row("NFC Angstrom sign", "NFC", "\u212b", "\u00c5");                      // singleton
        row("NFC keeps ligature", "NFC", "\ufb01", "\ufb01");
        row("NFKC ligature", "NFKC", "\ufb01", "fi");
        row("NFKC full-width A", "NFKC", "\uff21", "A");
        row("NFKC half-width kana", "NFKC", "\uff76\uff9e", "\u30ac");            // ｶﾞ -> ガ
        row("NFKC superscript", "NFKC", "x\u00b2", "x2");
        row("NFKD fraction", "NFKD", "\u00bd", "1\u20442");
        row("NFD Hangul", "NFD", "\ud55c", "\u1112\u1161\u11ab");
        row("NFC Hangul jamo", "NFC", "\u1112\u1161\u11ab", "\ud55c");
        row("ASCII unchanged", "NFKD", "plain ASCII text", "plain ASCII text");
        row("Lowercase ASCII", "Lowercase", "Hello WORLD", "hello world");
        row("Lowercase dotted I", "Lowercase", "\u0130", "i\u0307");              // full mapping
        row("Lowercase dotless i", "Lowercase", "I\u0131", "i\u0131");
        row("Lowercase final sigma", "Lowercase", "\u039f\u0394\u03a5\u03a3\u03a3\u0395\u03a5\u03a3",
            "\u03bf\u03b4\u03c5\u03c3\u03c3\u03b5\u03c5\u03c3");                   // no ς: per character
        row("Lowercase sharp s", "Lowercase", "STRA\u00dfE \u1e9e", "stra\u00dfe \u00df");
        row("Lowercase full-width", "Lowercase", "\uff21\uff22", "\uff41\uff42");
        row("Lowercase Cyrillic", "Lowercase", "\u041f\u0440\u0418\u0432\u0435\u0442", "\u043f\u0440\u0438\u0432\u0435\u0442");
        row("Lowercase Garay (Unicode 16)", "Lowercase", "\U00010d50", "\U00010d70");
        row("StripAccents marks", "StripAccents", "e\u0301\u0304o\u20dd", "eo");
        row("StripAccents keeps composed", "StripAccents", "\u00e9", "\u00e9");  // needs NFD first
        row("StripAccents Thai", "StripAccents", "\u0e19\u0e49\u0e33", "\u0e19\u0e33");
        row("StripAccents new mark kept", "StripAccents", "a\u1df9", "a\u1df9");  // Unicode 10: unknown to HF
        row("Strip", "Strip", " \t\u3000 a b \u00a0\n", "a b");
        row("Strip left only", "StripLeft", "\u2003 a ", "a ");
        row("Strip all space", "Strip", " \u2028 ", "");
        row("Bert", "Bert", "H\u00e9llo\t\u4e2d\u6587!\u0001\ufffd\u200b",
            "hello  \u4e2d  \u6587 !");
        row("Bert cased keeps accents", "BertCased", "Caf\u00e9\r\nX", "Caf\u00e9  X");
    }
    void strings() {
        QFETCH(QString, normalizer);
        QFETCH(QByteArray, input);
        QFETCH(QByteArray, expected);
        const std::string got = run_normalizer(normalizer, input.toStdString());
        QCOMPARE(QString::fromStdString(got), QString::fromUtf8(expected));
    }

    void bert_nul_and_controls() {
        const std::string in = std::string("a\0b\x7f\x0b", 5) + "c\u0085";  // NUL, DEL, VT, NEL: Cc
        QCOMPARE(bert_normalize(in, BertNormalizerOptions{true, false, false, false}), std::string("abc"));
    }

    void fixture_encodes_data() {
        // normalizers/tokenizer.json: byte-level BPE (ids are bytes; merges Ġt=256 he=257 Ġthe=258
        // in=259) behind NFKD, StripAccents, Lowercase, Strip; added tokens <|eot|> (raw, 260),
        // [MASK] (normalized, matched as "[mask]", 261), Ｄéjà (normalized, matched as "deja", 262).
        QTest::addColumn<QString>("text");
        QTest::addColumn<Ids>("expected");
        QTest::newRow("accents and ligature") << QString::fromUtf8("  \uff23af\u00e9 \ufb01 ") << Ids{32, 99, 97, 102, 101, 32, 102, 105};
        QTest::newRow("THE") << "THE In" << Ids{258, 32, 259};
        QTest::newRow("mask any case") << "[Mask]x" << Ids{261, 32, 120};
        QTest::newRow("full-width mask") << QString::fromUtf8("\uff3b\uff2d\uff21\uff33\uff2b\uff3d") << Ids{261};
        QTest::newRow("deja vu") << QString::fromUtf8("D\u00e9j\u00e0 DEJA") << Ids{262, 32, 262};
        QTest::newRow("eot raw only") << "<|eot|><|EOT|>" << Ids{260, 32, 60, 124, 101, 111, 116, 124, 62};
    }
    void fixture_encodes() {
        QFETCH(QString, text);
        QFETCH(Ids, expected);
        Tokenizer tok = Tokenizer::load(fixture("normalizers/tokenizer.json"));
        QCOMPARE(tok.encode(text.toStdString()), expected);
        QCOMPARE(tok.normalize(text.toStdString()),
                 unicode_strip(unicode_lowercase(strip_marks(unicode_normalize(text.toStdString(), UnicodeForm::NFKD))), true, true));
    }

    void added_tokens_decode_through_decoder() {
        // Expectations from tokenizers 0.23.2: added tokens pass through the Replace decoder too;
        // normalized ones come out normalized (lowercased), and skip_special does not drop the
        // special Q▁É because its emitted text "q▁é" is no special token's content.
        Tokenizer tok = Tokenizer::load(fixture("added_decode/tokenizer.json"));
        const Ids ids{0, 3, 0, 4, 0, 5, 0, 6, 2};
        QCOMPARE(QString::fromStdString(tok.decode(ids)), QString::fromUtf8("aS \u00c9aN \u00c9am \u00e9aq \u00e9 "));
        QCOMPARE(QString::fromStdString(tok.decode(ids, true)), QString::fromUtf8("aaN \u00c9am \u00e9aq \u00e9 "));
        QCOMPARE(tok.encode("aM\u2581\u00c9b"), (Ids{0, 5, 1}));
        QCOMPARE(tok.encode("am\u2581\u00e9b"), (Ids{0, 5, 1}));
        QCOMPARE(tok.encode("S\u2581\u00c9a"), (Ids{3, 0}));
    }
};

QTEST_GUILESS_MAIN(TestTokenizerNormalizer)
#include "test_tokenizer_normalizer.moc"
