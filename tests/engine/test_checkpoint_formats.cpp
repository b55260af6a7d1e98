// save_checkpoint round trips: tiny-v3 saved as F32, BF16, block-scaled FP8 and F32 in
// several shards, reloaded, and compared with the F32 original and with a twin whose weights
// were rounded through the same format in memory. Then moescope-cli forward / inspect run as
// a user runs them, checked against expected.json and the model card.
#include <QtTest/QtTest>

#include <QProcess>

#include "engine/errors.h"
#include "engine/loader.h"
#include "engine/safetensors.h"
#include "engine/weights.h"
#include "test_util.h"

using namespace moescope;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

enum Format { kF32 = 0, kBF16 = 1, kFP8 = 2, kF32Sharded = 3 };

// The weights as save_checkpoint + load_weights should give them back, computed in memory:
// BF16 rounds every matrix (vectors stay F32); FP8 stores each quantizable matrix as e4m3
// with one f32 scale per 128x128 block (the block's largest magnitude maps to 448, as in
// DeepSeek's release) and the other matrices (embedding, head, router) as BF16.
Weights rounded_twin(const ModelConfig& cfg, const Weights& original, Format f) {
    Weights w = original;
    if (f == kF32 || f == kF32Sharded) return w;
    for (auto& nt : tensor_table(w, cfg)) {
        Tensor& t = *nt.tensor;
        if (t.empty() || t.shape.size() != 2) continue;
        if (f == kFP8 && nt.quantizable) {
            const int64_t rows = t.shape[0], cols = t.shape[1], B = 128;
            for (int64_t r0 = 0; r0 < rows; r0 += B)
                for (int64_t c0 = 0; c0 < cols; c0 += B) {
                    float amax = 0;
                    for (int64_t r = r0; r < std::min(rows, r0 + B); ++r)
                        for (int64_t c = c0; c < std::min(cols, c0 + B); ++c)
                            amax = std::max(amax, std::fabs(t.data[size_t(r * cols + c)]));
                    const float s = amax > 0 ? amax / 448.0f : 1.0f;
                    for (int64_t r = r0; r < std::min(rows, r0 + B); ++r)
                        for (int64_t c = c0; c < std::min(cols, c0 + B); ++c) {
                            float& x = t.data[size_t(r * cols + c)];
                            x = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x / s)) * s;
                        }
                }
        } else {
            for (float& x : t.data) x = bf16_to_f32(f32_to_bf16(x));
        }
    }
    return w;
}

struct Outputs {
    std::vector<float> logits;      // [T, V]
    std::vector<float> mtp_logits;  // [T - 1, V]
};

Outputs run(const Model& m, const std::vector<int>& tokens) {
    KvCache c = m.new_cache(), mc = m.new_mtp_cache();
    ForwardOptions opt;
    ForwardResult r, mr;
    m.forward(tokens.data(), int(tokens.size()), c, opt, r);
    m.forward_mtp(1, r.hidden.data(), tokens.data() + 1, int(tokens.size()) - 1, mc, opt, mr);
    return {r.logits, mr.logits};
}

// Relative RMS difference ||a - b|| / ||b||.
double rel_rms(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < b.size(); ++i) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
}

}  // namespace

class TestCheckpointFormats : public QObject {
    Q_OBJECT

    ModelConfig cfg_;
    Weights original_;
    std::vector<int> tokens_;
    Outputs reference_;
    json expected_;
    int V_ = 0;

private slots:
    void initTestCase() {
        cfg_ = ModelConfig::load(test::tiny_dir());
        original_ = load_weights(cfg_, Checkpoint::open(test::tiny_dir()));
        tokens_ = test::tiny_tokens();
        reference_ = run(Model(cfg_, original_), tokens_);
        expected_ = test::read_json_file(test::tiny_dir() / "expected.json");
        V_ = cfg_.vocab_size;
    }

    void roundTrip_data() {
        QTest::addColumn<int>("format");
        // `bound`: the relative RMS difference of all logits from the F32 original that a
        // BF16 / FP8 checkpoint may show. The exact checks are elsewhere (reloaded weights ==
        // the in-memory rounded twin bit for bit, and each weight within half an ulp of the
        // format); this one is a sanity bound, because the tiny random model is chaotic: its
        // weights are large (|w| up to ~1 at hidden size 64), it amplifies a weight
        // perturbation ~30x, and perturbations flip expert choices (measured: BF16 rounding
        // flips 3 of 72 routing decisions, FP8 19). Measured for this fixture: rounding to
        // BF16 moves the logits by 0.061 relative RMS, FP8 by 0.30; random relative noise of
        // the same size (uniform +-2^-8, +-2^-4 per weight, six seeds) moves them by
        // 0.009-0.15 and 0.35-0.46. The bounds are twice the worst of those noise runs: a
        // rounding that behaves like noise of the format's precision passes, while a wrong
        // block scale, a byte-swapped BF16 or an off-by-one block (errors of order 1 and
        // beyond) fails.
        QTest::addColumn<double>("bound");
        QTest::addColumn<qint64>("shardBytes");
        QTest::newRow("F32") << int(kF32) << 0.0 << qint64(0);
        QTest::newRow("BF16") << int(kBF16) << 0.30 << qint64(0);
        QTest::newRow("FP8 block-scaled") << int(kFP8) << 0.92 << qint64(0);
        QTest::newRow("F32 in shards of 300 KB") << int(kF32Sharded) << 0.0 << qint64(300000);
    }
    void roundTrip() {
        QFETCH(int, format);
        QFETCH(double, bound);
        QFETCH(qint64, shardBytes);
        const Format f = Format(format);
        QTemporaryDir tmp;
        const fs::path dir = fs::path(tmp.path().toStdString()) / "saved";
        Weights w = original_;
        const SaveFormat sf = f == kBF16 ? SaveFormat::BF16 : f == kFP8 ? SaveFormat::FP8 : SaveFormat::F32;
        save_checkpoint(dir, cfg_, w, sf, shardBytes);

        // The files are what the format promises.
        const json cj = test::read_json_file(dir / "config.json");
        QCOMPARE(cj.contains("quantization_config"), f == kFP8);
        Checkpoint ck = Checkpoint::open(dir);
        if (f == kF32Sharded) {
            QVERIFY(fs::exists(dir / "model.safetensors.index.json"));
            QVERIFY(!fs::exists(dir / "model.safetensors"));
            QVERIFY2(ck.files().size() >= 5, qPrintable(QString("%1 shards").arg(ck.files().size())));
            // Each shard's data stays within the limit (a shard holds at least one tensor).
            for (const auto& file : ck.files()) {
                SafetensorsFile sfile(file);
                uint64_t data = 0;
                for (const auto& [n, t] : sfile.tensors()) data += t.nbytes;
                QVERIFY2(int64_t(data) <= shardBytes || sfile.tensors().size() == 1,
                         qPrintable(QString("%1 holds %2 bytes").arg(QString::fromStdString(file)).arg(data)));
            }
        } else {
            QCOMPARE(ck.files().size(), size_t(1));
        }
        const auto& kv = ck.at("model.layers.1.self_attn.kv_a_proj_with_mqa.weight");
        const DType want_dtype = f == kBF16 ? DType::BF16 : f == kFP8 ? DType::F8_E4M3 : DType::F32;
        QCOMPARE(dtype_name(kv.dtype), dtype_name(want_dtype));
        QCOMPARE(ck.at("model.norm.weight").dtype, DType::F32);
        if (f == kFP8) {
            QVERIFY(ck.find("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"));
            QCOMPARE(ck.at("model.embed_tokens.weight").dtype, DType::BF16);
        }
        for (const auto& e : fs::directory_iterator(dir))
            QVERIFY2(e.path().extension() != ".tmp", qPrintable(QString::fromStdString(e.path().string())));

        // Reloaded weights equal the in-memory twin exactly, tensor by tensor.
        std::shared_ptr<Model> loaded = load_model(dir);
        Weights twin = rounded_twin(cfg_, original_, f);
        Weights lw = loaded->weights();
        auto lt = tensor_table(lw, cfg_);
        auto tt = tensor_table(twin, cfg_);
        auto ot = tensor_table(original_, cfg_);
        QCOMPARE(lt.size(), tt.size());
        for (size_t i = 0; i < lt.size(); ++i) {
            QCOMPARE(lt[i].tensor->shape, tt[i].tensor->shape);
            MOESCOPE_VERIFY_DIFF(test::compare_vectors(lt[i].name, lt[i].tensor->data, tt[i].tensor->data,
                                                       tt[i].tensor->shape, 0.0));
            // And the twin is within the format's precision of the original, element-wise:
            // BF16 half an ulp (8 significant bits: 2^-8 relative); FP8 half the e4m3 spacing at
            // the top of the block's range (16 of 448 after scaling: amax/28).
            if (f == kBF16 && lt[i].tensor->shape.size() == 2)
                MOESCOPE_VERIFY_DIFF(test::compare_vectors("bf16 rounding of " + lt[i].name, tt[i].tensor->data,
                                                           ot[i].tensor->data, tt[i].tensor->shape, 0.0,
                                                           std::ldexp(1.0, -8)));
            if (f == kFP8 && ot[i].quantizable) {
                float amax = 0;
                for (float x : ot[i].tensor->data) amax = std::max(amax, std::fabs(x));
                MOESCOPE_VERIFY_DIFF(test::compare_vectors("fp8 rounding of " + lt[i].name, tt[i].tensor->data,
                                                           ot[i].tensor->data, tt[i].tensor->shape, amax / 28.0));
            }
        }

        // Logits: equal to the twin's (same weights, same code), and near the original's.
        const Outputs got = run(*loaded, tokens_);
        const Outputs twin_out = run(Model(cfg_, twin), tokens_);
        const int T = int(tokens_.size());
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("logits vs rounded twin", got.logits, twin_out.logits, {T, V_}, 1e-6));
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("MTP logits vs rounded twin", got.mtp_logits, twin_out.mtp_logits,
                                                   {T - 1, V_}, 1e-6));
        if (bound == 0.0) {
            MOESCOPE_VERIFY_DIFF(test::compare_vectors("logits vs F32 original", got.logits, reference_.logits, {T, V_}, 0.0));
            MOESCOPE_VERIFY_DIFF(test::compare_vectors("MTP logits vs F32 original", got.mtp_logits, reference_.mtp_logits,
                                                       {T - 1, V_}, 0.0));
        } else {
            const double e = rel_rms(got.logits, reference_.logits), em = rel_rms(got.mtp_logits, reference_.mtp_logits);
            qInfo("relative RMS logit difference from F32: main %.3g, MTP %.3g (bound %.3g); max |diff| %.3g",
                  e, em, bound, test::max_abs_diff(got.logits.data(), reference_.logits.data(), int64_t(got.logits.size())));
            QVERIFY2(e <= bound, qPrintable(QString("main logits: relative RMS %1 > bound %2").arg(e).arg(bound)));
            QVERIFY2(em <= bound, qPrintable(QString("MTP logits: relative RMS %1 > bound %2").arg(em).arg(bound)));
        }
    }

    // Saving FP8 twice (FP8 -> load -> FP8) is stable: the second save reproduces the first
    // bit for bit, since every block's max is exactly representable after the first pass.
    void fp8Idempotent() {
        QTemporaryDir tmp;
        const fs::path a = fs::path(tmp.path().toStdString()) / "a", b = fs::path(tmp.path().toStdString()) / "b";
        Weights w = original_;
        save_checkpoint(a, cfg_, w, SaveFormat::FP8);
        auto m = load_model(a);
        Weights w2 = m->weights();
        save_checkpoint(b, m->config(), w2, SaveFormat::FP8);
        Weights back = load_model(b)->weights();
        auto t1 = tensor_table(w2, cfg_), t2 = tensor_table(back, cfg_);
        for (size_t i = 0; i < t1.size(); ++i)
            MOESCOPE_VERIFY_DIFF(test::compare_vectors("fp8 resave " + t1[i].name, t2[i].tensor->data, t1[i].tensor->data,
                                                       t1[i].tensor->shape, 0.0));
    }

    // ---- the CLI ---------------------------------------------------------------------
    void cliForward_data() {
        QTest::addColumn<bool>("naive");
        QTest::newRow("absorbed") << false;
        QTest::newRow("naive") << true;
    }
    void cliForward() {
        QFETCH(bool, naive);
        if (!QFileInfo::exists(test::cli_path())) QFAIL(qPrintable("moescope-cli not built at " + test::cli_path()));
        QStringList tok;
        for (int t : tokens_) tok << QString::number(t);
        QStringList args{"forward", QString::fromStdString(test::tiny_dir().string()), "--tokens", tok.join(","), "--json"};
        if (naive) args << "--naive";
        const test::CliRun r = test::run_cli(args);
        QVERIFY2(r.code == 0, qPrintable(QString("exit %1: %2").arg(r.code).arg(QString::fromUtf8(r.err))));
        json j;
        try {
            j = json::parse(r.out.toStdString());
        } catch (const std::exception& e) {
            QFAIL(qPrintable(QString("stdout is not JSON: ") + e.what()));
        }
        const int T = int(tokens_.size());
        // Shape: logits [T][V], routing [{layer, experts [T][k], weights [T][k]}], mtp_logits [depth][T-1][V].
        QVERIFY(j["logits"].is_array());
        QCOMPARE(int(j["logits"].size()), T);
        for (const auto& row : j["logits"]) QCOMPARE(int(row.size()), V_);
        QCOMPARE(int(j["routing"].size()), 3);
        for (const auto& lr : j["routing"]) {
            QVERIFY(lr.contains("layer") && lr.contains("experts") && lr.contains("weights"));
            QCOMPARE(int(lr["experts"].size()), T);
            QCOMPARE(int(lr["weights"].size()), T);
            QCOMPARE(int(lr["experts"][0].size()), 4);
        }
        QCOMPARE(int(j["mtp_logits"].size()), 1);
        QCOMPARE(int(j["mtp_logits"][0].size()), T - 1);
        QCOMPARE(int(j["mtp_logits"][0][0].size()), V_);

        // Values: the fixture's.
        const auto& ml = expected_["main_logits"];
        for (size_t i = 0; i < ml["positions"].size(); ++i) {
            const int p = ml["positions"][i].get<int>();
            MOESCOPE_VERIFY_DIFF(test::compare_vectors("cli logits at " + std::to_string(p), test::json_floats(j["logits"][size_t(p)]),
                                                       test::json_floats(ml["logits"][i]), {V_}, 1e-4));
        }
        const auto argmax = expected_["main_argmax_all_positions"].get<std::vector<int>>();
        for (int t = 0; t < T; ++t) {
            const auto row = test::json_floats(j["logits"][size_t(t)]);
            QCOMPARE(test::argmax(row.data(), V_), argmax[size_t(t)]);
        }
        for (const auto& lr : j["routing"]) {
            const auto& ex = expected_["routing"]["layers"][std::to_string(lr["layer"].get<int>())];
            for (int t = 0; t < T; ++t) {
                std::map<int, double> got;
                for (size_t i = 0; i < 4; ++i) got[lr["experts"][size_t(t)][i].get<int>()] = lr["weights"][size_t(t)][i].get<double>();
                for (size_t i = 0; i < 4; ++i) {
                    const int id = ex["topk_ids"][size_t(t)][i].get<int>();
                    QVERIFY2(got.count(id), qPrintable(QString("layer %1 position %2 lacks expert %3").arg(lr["layer"].get<int>()).arg(t).arg(id)));
                    QVERIFY(std::fabs(got[id] - ex["topk_weights"][size_t(t)][i].get<double>()) <= 1e-5);
                }
            }
        }
        const int mp = expected_["mtp"]["position"].get<int>();
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("cli MTP logits at " + std::to_string(mp),
                                                   test::json_floats(j["mtp_logits"][0][size_t(mp)]),
                                                   test::json_floats(expected_["mtp"]["logits"]), {V_}, 1e-4));
    }

    void cliInspect() {
        const QString cfg = QStringLiteral(MOESCOPE_FIXTURES "/configs/deepseek-v3.json");
        const test::CliRun r = test::run_cli({"inspect", cfg, "--json"});
        QVERIFY2(r.code == 0, r.err.constData());
        const json j = json::parse(r.out.toStdString());
        QCOMPARE(j["total_params"].get<int64_t>(), int64_t(671026419200));
        QVERIFY(j["active_params"].get<int64_t>() > int64_t(37e9) && j["active_params"].get<int64_t>() < int64_t(38e9));
        QVERIFY(j["mtp_params"].get<int64_t>() > int64_t(13e9) && j["mtp_params"].get<int64_t>() < int64_t(14.5e9));
        QCOMPARE(j["latent_cache_bytes_per_token"].get<int64_t>(), int64_t(70272));
        // The text card says the same.
        const test::CliRun t = test::run_cli({"inspect", cfg});
        QCOMPARE(t.code, 0);
        QVERIFY2(t.out.contains("671.0B") && t.out.contains("70272"), t.out.constData());
    }

    // Bad input: a non-zero exit and a message on stderr naming the problem; nothing on stdout.
    void cliErrors_data() {
        QTest::addColumn<QStringList>("args");
        QTest::addColumn<QString>("needle");
        QTest::newRow("missing model folder") << QStringList{"forward", "/nonexistent/moescope-model", "--tokens", "1,2"}
                                              << "/nonexistent/moescope-model";
        QTest::newRow("inspect of a missing file") << QStringList{"inspect", "/nonexistent/config.json"} << "/nonexistent/config.json";
        QTest::newRow("token outside the vocabulary")
            << QStringList{"forward", QString::fromStdString(test::tiny_dir().string()), "--tokens", "1,512"} << "512";
        QTest::newRow("no tokens") << QStringList{"forward", QString::fromStdString(test::tiny_dir().string())} << "--tokens";
        QTest::newRow("unknown flag") << QStringList{"inspect", QString::fromStdString(test::tiny_dir().string()), "--bogus"}
                                      << "bogus";
        QTest::newRow("unknown command") << QStringList{"frobnicate"} << "frobnicate";
    }
    void cliErrors() {
        QFETCH(QStringList, args);
        QFETCH(QString, needle);
        const test::CliRun r = test::run_cli(args);
        QVERIFY2(r.code != 0 && r.code != -1, qPrintable(QString("exit code %1").arg(r.code)));
        QVERIFY2(QString::fromUtf8(r.err).contains(needle),
                 qPrintable(QString("stderr '%1' lacks '%2'").arg(QString::fromUtf8(r.err), needle)));
    }

    // A model folder whose safetensors file is truncated: the CLI names the file.
    void cliCorruptCheckpoint() {
        QTemporaryDir tmp;
        const fs::path dir = fs::path(tmp.path().toStdString()) / "broken";
        fs::create_directories(dir);
        fs::copy_file(test::tiny_dir() / "config.json", dir / "config.json");
        fs::copy_file(test::tiny_dir() / "model.safetensors", dir / "model.safetensors");
        fs::resize_file(dir / "model.safetensors", fs::file_size(dir / "model.safetensors") - 100);
        const test::CliRun r = test::run_cli({"forward", QString::fromStdString(dir.string()), "--tokens", "1,2,3", "--json"});
        QVERIFY(r.code != 0 && r.code != -1);
        QVERIFY2(r.err.contains("model.safetensors"), r.err.constData());
        QVERIFY(r.out.trimmed().isEmpty());
    }
};

QTEST_GUILESS_MAIN(TestCheckpointFormats)
#include "test_checkpoint_formats.moc"
