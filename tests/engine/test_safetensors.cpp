// The safetensors reader on corrupted files (table-driven: every one gives a FormatError naming
// the file, and the tensor where there is one, never a crash; run under ASan by
// scripts/test-asan), sharded folders, the writer's round trip, and the weight-level checks
// of load_weights (wrong shapes, missing and unexpected tensors).
#include <QtTest/QtTest>

#include <cstring>
#include <fstream>
#include <optional>

#include "engine/config.h"
#include "engine/errors.h"
#include "engine/safetensors.h"
#include "engine/weights.h"
#include "test_util.h"

using namespace moescope;
using nlohmann::json;
namespace fs = std::filesystem;

using Files = QMap<QString, QByteArray>;

namespace {

// 8-byte little-endian header length, the header, the data. `len` overrides the length field.
QByteArray st_bytes(const std::string& header, const QByteArray& data, std::optional<uint64_t> len = {}) {
    QByteArray out;
    const uint64_t n = len ? *len : header.size();
    for (int i = 0; i < 8; ++i) out.append(char((n >> (8 * i)) & 0xff));
    out.append(header.data(), qsizetype(header.size()));
    out.append(data);
    return out;
}

QByteArray data_bytes(int n) {
    QByteArray d(n, '\0');
    for (int i = 0; i < n; ++i) d[i] = char(i * 7 + 1);
    return d;
}

// A valid two-tensor file: a F32 [2, 3] at [0, 24), b BF16 [4] at [24, 32).
const char* kValidHeader =
    R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}})";

QByteArray valid_file() { return st_bytes(kValidHeader, data_bytes(32)); }

void write_bytes(const fs::path& p, const QByteArray& b) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(b.constData(), b.size());
}

std::string read_text(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

ModelConfig tiny_config() { return ModelConfig::load(test::tiny_dir()); }

// Every tensor of the tiny-v3 table, filled with a ramp (F32).
std::vector<TensorToWrite> tiny_tensors(const ModelConfig& cfg) {
    Weights w;
    std::vector<TensorToWrite> out;
    for (auto& nt : tensor_table(w, cfg)) {
        int64_t n = 1;
        for (auto d : nt.shape) n *= d;
        std::vector<float> v(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) v[size_t(i)] = float(i % 13) * 0.01f;
        out.push_back(make_tensor(nt.name, DType::F32, nt.shape, v.data()));
    }
    return out;
}

}  // namespace

class TestSafetensors : public QObject {
    Q_OBJECT
private slots:
    void validFileOpens() {
        QTemporaryDir dir;
        const fs::path p = fs::path(dir.path().toStdString()) / "ok.safetensors";
        write_bytes(p, valid_file());
        Checkpoint ck = Checkpoint::open(p);
        QCOMPARE(ck.names(), (std::vector<std::string>{"a", "b"}));
        QCOMPARE(ck.at("a").shape, (std::vector<int64_t>{2, 3}));
        QCOMPARE(ck.at("b").dtype, DType::BF16);
        QCOMPARE(ck.at("b").nbytes, uint64_t(8));
        std::vector<float> a = ck.read_f32("a");
        QByteArray d = data_bytes(32);
        std::vector<float> want(6);
        std::memcpy(want.data(), d.constData(), 24);
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("read_f32(a)", a, want, {2, 3}, 0.0));
        MOESCOPE_VERIFY_THROWS_WITH(ck.at("zz"), FormatError, {"'zz'"});
        // An empty header is a valid file with no tensors.
        write_bytes(p, st_bytes("{}", {}));
        QVERIFY(Checkpoint::open(p).names().empty());
        // A tensor with no elements reads as an empty vector (found by scripts/fuzz: converting
        // it passed a null pointer to memcpy, undefined behaviour that UBSan reports).
        write_bytes(p, st_bytes(R"({"e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}})", {}));
        QVERIFY(Checkpoint::open(p).read_f32("e").empty());
    }

    // ---- corrupted single files ---------------------------------------------------------
    void corruptFile_data() {
        QTest::addColumn<QByteArray>("bytes");
        QTest::addColumn<QStringList>("needles");  // besides the file name
        const QByteArray d32 = data_bytes(32);
        QTest::newRow("truncated data") << valid_file().left(8 + int(strlen(kValidHeader)) + 20)
                                        << QStringList{"'a'", "truncated"};
        QTest::newRow("truncated in the second tensor") << valid_file().left(8 + int(strlen(kValidHeader)) + 28)
                                                        << QStringList{"'b'", "past the end"};
        QTest::newRow("empty file") << QByteArray() << QStringList{"too short"};
        QTest::newRow("shorter than 8 bytes") << QByteArray("\x05\0\0\0\0", 5) << QStringList{"5 bytes", "too short"};
        QTest::newRow("header length past the end") << st_bytes(kValidHeader, d32, 100000)
                                                    << QStringList{"header length 100000", "past the end"};
        QTest::newRow("header length one past the end")
            << st_bytes(kValidHeader, {}, uint64_t(strlen(kValidHeader)) + 1) << QStringList{"past the end"};
        QTest::newRow("header length huge (2^63)") << st_bytes(kValidHeader, d32, uint64_t(1) << 63)
                                                   << QStringList{"header length"};
        QTest::newRow("header length all ones") << st_bytes(kValidHeader, d32, ~uint64_t(1))
                                                << QStringList{"header length"};
        QTest::newRow("offsets out of range")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1000, 1024]}})", d32)
            << QStringList{"'a'", "past the end"};
        QTest::newRow("offsets far out of range (no wrap-around)")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [18446744073709551608, 18446744073709551615]}})", d32)
            << QStringList{"'a'"};
        QTest::newRow("reversed offsets")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}})", d32)
            << QStringList{"'a'", "reversed"};
        QTest::newRow("overlapping tensors")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}})", d32)
            << QStringList{"'a'", "'b'", "overlap"};
        QTest::newRow("identical ranges")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", d32)
            << QStringList{"'a'", "'b'", "overlap"};
        // An empty tensor sorted between two overlapping ones must not hide the overlap.
        QTest::newRow("overlap behind an empty tensor")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                            "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                            "c": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}})", d32)
            << QStringList{"'a'", "'c'", "overlap"};
        QTest::newRow("dtype/shape byte count mismatch")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", d32)
            << QStringList{"'a'", "20 bytes", "needs 24"};
        QTest::newRow("bytes for BF16 read as F32")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}})", d32)
            << QStringList{"'a'", "needs 16"};
        QTest::newRow("unknown dtype")
            << st_bytes(R"({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}})", d32)
            << QStringList{"'a'", "'F7'"};
        QTest::newRow("negative shape")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]}})", d32)
            << QStringList{"'a'", "negative"};
        QTest::newRow("non-integer shape")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [2.5, 3], "data_offsets": [0, 24]}})", d32)
            << QStringList{"'a'", "non-integer"};
        QTest::newRow("string in shape")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": ["2", 3], "data_offsets": [0, 24]}})", d32)
            << QStringList{"'a'", "non-integer"};
        QTest::newRow("shape overflows")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 24]}})", d32)
            << QStringList{"'a'", "overflows"};
        QTest::newRow("shape not a list")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": 6, "data_offsets": [0, 24]}})", d32)
            << QStringList{"'a'", "shape"};
        QTest::newRow("missing dtype") << st_bytes(R"({"a": {"shape": [6], "data_offsets": [0, 24]}})", d32)
                                       << QStringList{"'a'", "dtype"};
        QTest::newRow("missing data_offsets") << st_bytes(R"({"a": {"dtype": "F32", "shape": [6]}})", d32)
                                              << QStringList{"'a'", "data_offsets"};
        QTest::newRow("three data_offsets")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24, 32]}})", d32)
            << QStringList{"'a'", "data_offsets"};
        QTest::newRow("negative offsets")
            << st_bytes(R"({"a": {"dtype": "F32", "shape": [6], "data_offsets": [-24, 0]}})", d32)
            << QStringList{"'a'", "data_offsets"};
        QTest::newRow("entry not an object") << st_bytes(R"({"a": 5})", d32) << QStringList{"'a'", "not an object"};
        QTest::newRow("bad JSON") << st_bytes(R"({"a": {"dtype": "F32", )", d32) << QStringList{"JSON"};
        QTest::newRow("binary garbage header") << st_bytes(std::string("\xff\xfe\x00\x01", 4), d32)
                                               << QStringList{"JSON"};
        QTest::newRow("header not an object") << st_bytes("[1, 2, 3]", d32) << QStringList{"not a JSON object"};
        // Found by scripts/fuzz: a JSON number too large for a double escaped as json::out_of_range.
        QTest::newRow("number overflowing a double") << st_bytes(R"({"a": {"dtype": "F32", "shape": [999999990000020037642052068e6638], "data_offsets": [0, 24]}})", d32)
                                                     << QStringList{"JSON", "overflow"};
        QTest::newRow("__metadata__ not an object") << st_bytes(R"({"__metadata__": [1]})", d32)
                                                    << QStringList{"__metadata__"};
    }
    void corruptFile() {
        QFETCH(QByteArray, bytes);
        QFETCH(QStringList, needles);
        QTemporaryDir dir;
        const fs::path p = fs::path(dir.path().toStdString()) / "corrupt.safetensors";
        write_bytes(p, bytes);
        std::vector<std::string> want = {p.string()};
        for (const auto& n : needles) want.push_back(n.toStdString());
        MOESCOPE_VERIFY_THROWS_WITH(Checkpoint::open(p), FormatError, want);
        // The folder holding it fails the same way.
        MOESCOPE_VERIFY_THROWS_WITH(Checkpoint::open(p.parent_path()), FormatError, want);
    }

    // ---- corrupted folders (shards and index) ----------------------------------------------
    void corruptFolder_data() {
        QTest::addColumn<Files>("files");
        QTest::addColumn<QStringList>("needles");
        const QByteArray a = st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", data_bytes(8));
        const QByteArray b = st_bytes(R"({"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", data_bytes(8));
        const QByteArray ab = st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                           "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                                       data_bytes(16));
        QTest::newRow("index names a missing shard")
            << Files{{"model-00001-of-00002.safetensors", a},
                     {"model.safetensors.index.json",
                      R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})"}}
            << QStringList{"model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist"};
        QTest::newRow("shard path with ..")
            << Files{{"model-00001-of-00001.safetensors", a},
                     {"model.safetensors.index.json", R"({"weight_map": {"a": "../model-00001-of-00001.safetensors"}})"}}
            << QStringList{"model.safetensors.index.json", "../model-00001-of-00001.safetensors", "leaves the model folder"};
        QTest::newRow("absolute shard path")
            << Files{{"model.safetensors.index.json", R"({"weight_map": {"a": "/etc/passwd"}})"}}
            << QStringList{"model.safetensors.index.json", "/etc/passwd"};
        QTest::newRow("duplicate tensor across shards")
            << Files{{"model-00001-of-00002.safetensors", ab},
                     {"model-00002-of-00002.safetensors", b},
                     {"model.safetensors.index.json",
                      R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})"}}
            << QStringList{"'b'", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
        QTest::newRow("duplicate tensor across unindexed files")
            << Files{{"x1.safetensors", ab}, {"x2.safetensors", a}}
            << QStringList{"'a'", "x1.safetensors", "x2.safetensors"};
        QTest::newRow("index is not JSON")
            << Files{{"model-00001-of-00001.safetensors", a}, {"model.safetensors.index.json", "{\"weight_map\": "}}
            << QStringList{"model.safetensors.index.json", "JSON"};
        QTest::newRow("index without weight_map")
            << Files{{"model-00001-of-00001.safetensors", a}, {"model.safetensors.index.json", R"({"metadata": {}})"}}
            << QStringList{"model.safetensors.index.json", "weight_map"};
        QTest::newRow("weight_map value not a string")
            << Files{{"model-00001-of-00001.safetensors", a}, {"model.safetensors.index.json", R"({"weight_map": {"a": 1}})"}}
            << QStringList{"model.safetensors.index.json", "'a'"};
        QTest::newRow("a corrupt shard is named")
            << Files{{"model-00001-of-00002.safetensors", a},
                     {"model-00002-of-00002.safetensors", b.left(b.size() - 3)},
                     {"model.safetensors.index.json",
                      R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})"}}
            << QStringList{"model-00002-of-00002.safetensors", "'b'"};
        QTest::newRow("index puts a tensor in the wrong shard")
            << Files{{"model-00001-of-00002.safetensors", a},
                     {"model-00002-of-00002.safetensors", b},
                     {"model.safetensors.index.json",
                      R"({"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}})"}}
            << QStringList{"model.safetensors.index.json", "'a'", "is stored in 'model-00001-of-00002.safetensors'"};
        QTest::newRow("index lists a tensor no shard holds")
            << Files{{"model-00001-of-00001.safetensors", a},
                     {"model.safetensors.index.json",
                      R"({"weight_map": {"a": "model-00001-of-00001.safetensors", "c": "model-00001-of-00001.safetensors"}})"}}
            << QStringList{"model.safetensors.index.json", "'c'", "no shard holds it"};
        QTest::newRow("folder without safetensors") << Files{{"config.json", "{}"}}
                                                    << QStringList{"no .safetensors"};
    }
    void corruptFolder() {
        QFETCH(Files, files);
        QFETCH(QStringList, needles);
        QTemporaryDir tmp;
        const fs::path dir = fs::path(tmp.path().toStdString()) / "model";
        fs::create_directories(dir);
        for (auto it = files.cbegin(); it != files.cend(); ++it) write_bytes(dir / it.key().toStdString(), it.value());
        std::vector<std::string> want;
        for (const auto& n : needles) want.push_back(n.toStdString());
        MOESCOPE_VERIFY_THROWS_WITH(Checkpoint::open(dir), FormatError, want);
    }

    void missingPath() {
        MOESCOPE_VERIFY_THROWS_WITH(Checkpoint::open("/nonexistent/moescope-model"), FormatError,
                                    {"/nonexistent/moescope-model"});
    }

    // ---- the writer ---------------------------------------------------------------------
    // write_safetensors -> open -> read_f32 gives back the encoded values of every dtype; the
    // data section is 8-byte aligned; no temporary file is left behind.
    void writeRoundTrip() {
        QTemporaryDir tmp;
        const fs::path p = fs::path(tmp.path().toStdString()) / "rt.safetensors";
        const std::vector<float> v = {1.0f, -2.5f, 0.1f, 3.0e-5f, 448.0f, -0.0f};
        std::vector<TensorToWrite> ts = {make_tensor("f32", DType::F32, {2, 3}, v.data()),
                                         make_tensor("bf16", DType::BF16, {6}, v.data()),
                                         make_tensor("f16", DType::F16, {3, 2}, v.data()),
                                         make_tensor("fp8", DType::F8_E4M3, {6}, v.data())};
        write_safetensors(p, ts, {{"format", "pt"}});
        QVERIFY(!fs::exists(fs::path(p.string() + ".tmp")));
        const std::string raw = read_text(p);
        uint64_t n = 0;
        for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(raw[size_t(i)])) << (8 * i);
        QCOMPARE((8 + n) % 8, uint64_t(0));
        SafetensorsFile f(p);
        QCOMPARE(f.metadata().at("format"), std::string("pt"));
        Checkpoint ck = Checkpoint::open(p);
        std::vector<float> want_bf16, want_f16, want_fp8;
        for (float x : v) {
            want_bf16.push_back(bf16_to_f32(f32_to_bf16(x)));
            want_f16.push_back(f16_to_f32(f32_to_f16(x)));
            want_fp8.push_back(fp8_e4m3_to_f32(f32_to_fp8_e4m3(x)));
        }
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("f32", ck.read_f32("f32"), v, {6}, 0.0));
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("bf16", ck.read_f32("bf16"), want_bf16, {6}, 0.0));
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("f16", ck.read_f32("f16"), want_f16, {6}, 0.0));
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("fp8", ck.read_f32("fp8"), want_fp8, {6}, 0.0));
        QCOMPARE(ck.at("f16").shape, (std::vector<int64_t>{3, 2}));
        // Overwriting keeps the file valid (the rename replaces it whole).
        write_safetensors(p, {ts[0]});
        QCOMPARE(Checkpoint::open(p).names(), (std::vector<std::string>{"f32"}));
    }

    // ---- weight-level checks of load_weights ----------------------------------------------
    void wrongShape() {
        const ModelConfig cfg = tiny_config();
        auto ts = tiny_tensors(cfg);
        const std::string name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";
        bool replaced = false;
        for (auto& t : ts)
            if (t.name == name) {
                std::vector<float> v(40 * 64, 0.5f);
                t = make_tensor(name, DType::F32, {40, 64}, v.data());
                replaced = true;
            }
        QVERIFY(replaced);
        QTemporaryDir tmp;
        const fs::path file = fs::path(tmp.path().toStdString()) / "model.safetensors";
        write_safetensors(file, ts);
        Checkpoint ck = Checkpoint::open(file.parent_path());
        const std::string want = file.string() + ": tensor '" + name +
                                 "' has shape [40, 64], expected [kv_lora_rank + qk_rope_head_dim, hidden_size] = [48, 64]";
        try {
            load_weights(cfg, ck);
            QFAIL("no ShapeError");
        } catch (const ShapeError& e) {
            QCOMPARE(std::string(e.what()), want);
        }
    }

    void missingAndUnexpected() {
        const ModelConfig cfg = tiny_config();
        auto ts = tiny_tensors(cfg);
        const std::string gone1 = "model.layers.2.mlp.experts.5.up_proj.weight";
        const std::string gone2 = "model.norm.weight";
        std::erase_if(ts, [&](const TensorToWrite& t) { return t.name == gone1 || t.name == gone2; });
        std::vector<float> v(4, 1.0f);
        ts.push_back(make_tensor("model.layers.0.mlp.experts.0.up_proj.weight", DType::F32, {2, 2}, v.data()));
        ts.push_back(make_tensor("model.layers.9.input_layernorm.weight", DType::F32, {4}, v.data()));
        // Tolerated: the rotary tables some exports carry.
        ts.push_back(make_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", DType::F32, {4}, v.data()));
        QTemporaryDir tmp;
        const fs::path file = fs::path(tmp.path().toStdString()) / "model.safetensors";
        write_safetensors(file, ts);
        Checkpoint ck = Checkpoint::open(file);
        std::string msg;
        try {
            load_weights(cfg, ck);
        } catch (const ShapeError& e) {
            msg = e.what();
        }
        QVERIFY2(!msg.empty(), "no ShapeError for missing and unexpected tensors");
        for (const std::string& n : {std::string("model.safetensors"), std::string("2 missing"), gone1, gone2,
                                     std::string("2 unexpected"), std::string("model.layers.0.mlp.experts.0.up_proj.weight"),
                                     std::string("model.layers.9.input_layernorm.weight")})
            QVERIFY2(msg.find(n) != std::string::npos, qPrintable(QString::fromStdString("'" + msg + "' lacks '" + n + "'")));
        QVERIFY2(msg.find("inv_freq") == std::string::npos, msg.c_str());
    }

    void integerWeight() {
        const ModelConfig cfg = tiny_config();
        auto ts = tiny_tensors(cfg);
        for (auto& t : ts)
            if (t.name == "model.norm.weight") t.dtype = DType::I32;  // same byte count as F32
        QTemporaryDir tmp;
        const fs::path file = fs::path(tmp.path().toStdString()) / "model.safetensors";
        write_safetensors(file, ts);
        MOESCOPE_VERIFY_THROWS_WITH(load_weights(cfg, Checkpoint::open(file)), FormatError,
                                    {"model.safetensors", "'model.norm.weight'", "I32"});
    }

    // The full valid table loads, with the values written.
    void tinyTableLoads() {
        const ModelConfig cfg = tiny_config();
        auto ts = tiny_tensors(cfg);
        QTemporaryDir tmp;
        const fs::path file = fs::path(tmp.path().toStdString()) / "model.safetensors";
        write_safetensors(file, ts);
        Weights w = load_weights(cfg, Checkpoint::open(file));
        const Tensor& t = w.layers[1].moe.experts[3].down_proj;
        QCOMPARE(t.shape, (std::vector<int64_t>{64, 16}));
        QCOMPARE(t.data[14], float(14 % 13) * 0.01f);
    }
};

QTEST_GUILESS_MAIN(TestSafetensors)
#include "test_safetensors.moc"
