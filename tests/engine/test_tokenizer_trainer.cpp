// BPE trainer tests: determinism, the files it writes reload with the same results, special
// tokens, and the speed bound (4k vocab from 10 MB well under a minute).
#include <QTemporaryDir>
#include <QtTest>
#include <fstream>
#include <random>

#include "engine/errors.h"
#include "engine/tokenizer/bpe_trainer.h"
#include "engine/tokenizer/tokenizer.h"

using namespace moescope;

namespace {

// Seeded pseudo-English: words built from syllables with a Zipf-like frequency, so the corpus
// has tens of thousands of distinct words like real text, plus numbers, punctuation and CJK.
std::string synthetic_corpus(size_t bytes, unsigned seed) {
    std::mt19937 rng(seed);
    const char* syll[] = {"the", "an", "re", "in", "er", "on", "at", "en", "es", "or", "ti", "is", "ar", "st",
                          "al", "ing", "ed", "ou", "com", "pro", "con", "ver", "ly", "tion", "ment", "ex"};
    std::vector<std::string> lexicon;
    for (int i = 0; i < 40000; ++i) {
        std::string w;
        int n = 1 + int(rng() % 4);
        for (int k = 0; k < n; ++k) w += syll[rng() % std::size(syll)];
        if (rng() % 10 == 0) w[0] = char(std::toupper(w[0]));
        lexicon.push_back(w);
    }
    std::string out;
    out.reserve(bytes + 64);
    while (out.size() < bytes) {
        double u = std::uniform_real_distribution<double>(0, 1)(rng);
        out += lexicon[size_t(std::pow(u, 3.0) * lexicon.size())];  // skewed toward the head
        unsigned r = rng() % 40;
        out += r == 0 ? ". " : r == 1 ? ", " : r == 2 ? "\n" : r == 3 ? " 2024 " : r == 4 ? " 你好 " : " ";
    }
    return out;
}

}  // namespace

class TestTokenizerTrainer : public QObject {
    Q_OBJECT
private slots:
    void deterministic_and_reloadable() {
        std::string corpus = synthetic_corpus(300000, 1);
        BpeTrainerOptions opt;
        opt.vocab_size = 800;
        opt.special_tokens.push_back("<|tool|>");
        TrainedTokenizer a = train_bpe_json({corpus}, opt);
        TrainedTokenizer b = train_bpe_json({corpus}, opt);
        QCOMPARE(a.tokenizer_json, b.tokenizer_json);  // bit-identical files
        QCOMPARE(a.stats.vocab_size, 800);

        QTemporaryDir dir;
        const std::string corpus_path = dir.filePath("corpus.txt").toStdString();
        std::ofstream(corpus_path) << corpus;
        BpeTrainStats stats = train_bpe({corpus_path}, opt, dir.filePath("out").toStdString());
        QCOMPARE(stats.vocab_size, 800);
        QVERIFY(!QFile::exists(dir.filePath("out/tokenizer.json.tmp")));
        std::ifstream f(dir.filePath("out/tokenizer.json").toStdString());
        std::string written((std::istreambuf_iterator<char>(f)), {});
        QCOMPARE(written, a.tokenizer_json);

        Tokenizer tok = Tokenizer::load(dir.filePath("out").toStdString());
        QCOMPARE(tok.vocab_size(), 800);
        for (size_t i = 0; i < opt.special_tokens.size(); ++i) {
            QCOMPARE(tok.token_id(opt.special_tokens[i]), std::optional<int>(int(i)));
            QVERIFY(tok.is_special(int(i)));
        }
        QCOMPARE(tok.bos_id(), std::optional<int>(0));
        QCOMPARE(tok.eos_id(), std::optional<int>(1));
        // Training helps: frequent words take far fewer tokens than bytes.
        std::string sample = corpus.substr(0, 20000);
        std::vector<int> ids = tok.encode(sample);
        QVERIFY2(ids.size() * 2 < sample.size(), qPrintable(QString("%1 tokens for %2 bytes").arg(ids.size()).arg(sample.size())));
        QCOMPARE(tok.decode(ids), sample);
        // Special tokens in the corpus are not learned as text, and encode as one id.
        QCOMPARE(tok.encode("<|tool|>"), std::vector<int>{6});
        QCOMPARE(tok.encode("x", true).front(), 0);  // the post-processor adds <|bos|>
    }

    void different_options_differ() {
        std::string corpus = synthetic_corpus(100000, 2);
        BpeTrainerOptions small;
        small.vocab_size = 400;
        BpeTrainerOptions large;
        large.vocab_size = 600;
        auto a = train_bpe_json({corpus}, small), b = train_bpe_json({corpus}, large);
        QCOMPARE(a.stats.vocab_size, 400);
        QCOMPARE(b.stats.vocab_size, 600);
        // The first merges of the larger run are exactly those of the smaller one.
        Tokenizer ta = Tokenizer::from_json(a.tokenizer_json), tb = Tokenizer::from_json(b.tokenizer_json);
        for (int id = 0; id < 400; ++id) QCOMPARE(ta.token_text(id), tb.token_text(id));
    }

    void rejects_bad_options() {
        BpeTrainerOptions opt;
        opt.vocab_size = 100;
        QVERIFY_THROWS_EXCEPTION(ConfigError, train_bpe_json({"abc"}, opt));
        opt.vocab_size = 1000;
        opt.special_tokens = {"<a>", "<a>"};
        QVERIFY_THROWS_EXCEPTION(ConfigError, train_bpe_json({"abc"}, opt));
    }

    void ten_megabytes_4k_vocab() {
        std::string corpus = synthetic_corpus(10'000'000, 3);
        BpeTrainerOptions opt;
        opt.vocab_size = 4096;
        QElapsedTimer timer;
        timer.start();
        TrainedTokenizer t = train_bpe_json({corpus}, opt);
        const double s = timer.elapsed() / 1000.0;
        qInfo("trained %d tokens on %.1f MB (%zu distinct words) in %.2f s", t.stats.vocab_size,
              t.stats.corpus_bytes / 1e6, t.stats.distinct_words, s);
        QCOMPARE(t.stats.vocab_size, 4096);  // the time is reported above, not asserted (docs/tokenizer.md)
    }
};

QTEST_GUILESS_MAIN(TestTokenizerTrainer)
#include "test_tokenizer_trainer.moc"
