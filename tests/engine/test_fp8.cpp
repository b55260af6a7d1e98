// Scalar formats of checkpoints: FP8 e4m3fn, BF16 and F16 decoding against hand-computed
// values, encoding (round to nearest even, saturation, round trips of every code), and the
// block-scaled FP8 dequantization that load_weights applies to a checkpoint.
#include <QtTest/QtTest>

#include <cmath>
#include <random>
#include <set>

#include "engine/config.h"
#include "engine/dtype.h"
#include "engine/errors.h"
#include "engine/safetensors.h"
#include "engine/weights.h"
#include "test_util.h"

using namespace moescope;

namespace {

// e4m3fn decoded from the definition, independently of the engine: bias 7, 3 mantissa bits,
// exponent 0 subnormal (m/8 * 2^-6), S.1111.111 NaN, no infinities.
double fp8_by_hand(uint8_t v) {
    const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    if (e == 15 && m == 7) return NAN;
    double mag = e == 0 ? (m / 8.0) * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
    return s ? -mag : mag;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

}  // namespace

class TestFp8 : public QObject {
    Q_OBJECT
private slots:
    // ---- FP8 e4m3fn -----------------------------------------------------------------
    void fp8Decode_data() {
        QTest::addColumn<int>("code");
        QTest::addColumn<double>("value");
        QTest::addColumn<bool>("isNan");
        const double sub = std::ldexp(1.0, -9);  // the smallest subnormal
        QTest::newRow("zero") << 0x00 << 0.0 << false;
        QTest::newRow("negative zero") << 0x80 << -0.0 << false;
        QTest::newRow("smallest subnormal 0x01 = 2^-9") << 0x01 << sub << false;
        QTest::newRow("subnormal 0x03") << 0x03 << 3 * sub << false;
        QTest::newRow("largest subnormal 0x07") << 0x07 << 7 * sub << false;
        QTest::newRow("negative subnormal 0x87") << 0x87 << -7 * sub << false;
        QTest::newRow("smallest normal 0x08 = 2^-6") << 0x08 << 0.015625 << false;
        QTest::newRow("0.5") << 0x30 << 0.5 << false;
        QTest::newRow("1.0") << 0x38 << 1.0 << false;
        QTest::newRow("1.125") << 0x39 << 1.125 << false;
        QTest::newRow("1.875") << 0x3f << 1.875 << false;
        QTest::newRow("2.0") << 0x40 << 2.0 << false;
        QTest::newRow("-1.0") << 0xb8 << -1.0 << false;
        QTest::newRow("-3.5") << 0xc6 << -3.5 << false;
        QTest::newRow("240 (exp 14, mant 7)") << 0x77 << 240.0 << false;
        QTest::newRow("256") << 0x78 << 256.0 << false;
        QTest::newRow("416") << 0x7d << 416.0 << false;
        QTest::newRow("max 448 = 0x7e") << 0x7e << 448.0 << false;
        QTest::newRow("-448 = 0xfe") << 0xfe << -448.0 << false;
        QTest::newRow("NaN 0x7f") << 0x7f << 0.0 << true;
        QTest::newRow("NaN 0xff") << 0xff << 0.0 << true;
    }
    void fp8Decode() {
        QFETCH(int, code);
        QFETCH(double, value);
        QFETCH(bool, isNan);
        const float got = fp8_e4m3_to_f32(uint8_t(code));
        if (isNan) {
            QVERIFY2(std::isnan(got), qPrintable(QString("0x%1 decodes to %2").arg(code, 2, 16).arg(got)));
            return;
        }
        QVERIFY2(same_bits(got, float(value)),
                 qPrintable(QString("0x%1 decodes to %2, expected %3").arg(code, 2, 16).arg(got).arg(value)));
        QCOMPARE(std::signbit(got), std::signbit(value));
    }

    // The engine's decoder agrees with the definition on all 256 codes.
    void fp8DecodeAllCodes() {
        std::vector<float> got(256), want(256);
        for (int c = 0; c < 256; ++c) {
            got[size_t(c)] = fp8_e4m3_to_f32(uint8_t(c));
            want[size_t(c)] = float(fp8_by_hand(uint8_t(c)));
        }
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("fp8_e4m3_to_f32", got, want, {256}, 0.0));
    }

    // encode(decode(c)) == c for every one of the 254 finite codes (+0 and -0 included).
    void fp8RoundTripEveryFiniteCode() {
        int finite = 0;
        for (int c = 0; c < 256; ++c) {
            const float v = fp8_e4m3_to_f32(uint8_t(c));
            if (std::isnan(v)) continue;
            ++finite;
            const int back = f32_to_fp8_e4m3(v);
            QVERIFY2(back == c, qPrintable(QString("0x%1 -> %2 -> 0x%3").arg(c, 2, 16).arg(v).arg(back, 2, 16)));
        }
        QCOMPARE(finite, 254);
    }

    void fp8Encode_data() {
        QTest::addColumn<double>("input");
        QTest::addColumn<int>("code");
        const double sub = std::ldexp(1.0, -9);
        // Midpoints go to the even mantissa.
        QTest::newRow("1.0625: midpoint 1|1.125 -> 1.0 (even)") << 1.0625 << 0x38;
        QTest::newRow("1.1875: midpoint 1.125|1.25 -> 1.25 (even)") << 1.1875 << 0x3a;
        QTest::newRow("just above 1.0625 -> 1.125") << double(std::nextafter(float(1.0625), 2.0f)) << 0x39;
        QTest::newRow("just below 1.1875 -> 1.125") << double(std::nextafter(float(1.1875), 0.0f)) << 0x39;
        QTest::newRow("-1.0625 -> -1.0") << -1.0625 << 0xb8;
        QTest::newRow("248: midpoint 240|256 -> 256 (even)") << 248.0 << 0x78;
        QTest::newRow("432: midpoint 416|448 -> 448 (even)") << 432.0 << 0x7e;
        QTest::newRow("424 -> 416") << 424.0 << 0x7d;
        // Subnormals: multiples of 2^-9, ties to even.
        QTest::newRow("0.5 * 2^-9 -> 0 (even)") << 0.5 * sub << 0x00;
        QTest::newRow("just above 0.5 * 2^-9 -> 2^-9") << double(std::nextafter(float(0.5 * sub), 1.0f)) << 0x01;
        QTest::newRow("1.5 * 2^-9 -> 2 * 2^-9 (even)") << 1.5 * sub << 0x02;
        QTest::newRow("2.5 * 2^-9 -> 2 * 2^-9 (even)") << 2.5 * sub << 0x02;
        QTest::newRow("7.5 * 2^-9 -> smallest normal") << 7.5 * sub << 0x08;
        QTest::newRow("2^-11 -> 0") << std::ldexp(1.0, -11) << 0x00;
        QTest::newRow("-2^-11 -> -0") << -std::ldexp(1.0, -11) << 0x80;
        QTest::newRow("-0.0") << -0.0 << 0x80;
        // Saturation (the e4m3fn "satfinite" conversion DeepSeek's kernels use).
        QTest::newRow("448") << 448.0 << 0x7e;
        QTest::newRow("449 saturates") << 449.0 << 0x7e;
        QTest::newRow("464 saturates") << 464.0 << 0x7e;
        QTest::newRow("1e6 saturates") << 1e6 << 0x7e;
        QTest::newRow("-500 saturates") << -500.0 << 0xfe;
        QTest::newRow("+inf saturates") << double(INFINITY) << 0x7e;
        QTest::newRow("-inf saturates") << double(-INFINITY) << 0xfe;
    }
    void fp8Encode() {
        QFETCH(double, input);
        QFETCH(int, code);
        const int got = f32_to_fp8_e4m3(float(input));
        QVERIFY2(got == code, qPrintable(QString("%1 -> 0x%2, expected 0x%3").arg(input, 0, 'g', 17).arg(got, 2, 16)
                                             .arg(code, 2, 16)));
    }

    void fp8EncodeNan() {
        QVERIFY(std::isnan(fp8_e4m3_to_f32(f32_to_fp8_e4m3(NAN))));
        QVERIFY(std::isnan(fp8_e4m3_to_f32(f32_to_fp8_e4m3(-NAN))));
    }

    // Every float between two neighbouring codes goes to the nearer one (checked on a grid of
    // 64 points per interval over the whole positive range).
    void fp8EncodeNearest() {
        for (int c = 0; c < 0x7e; ++c) {
            const double lo = fp8_by_hand(uint8_t(c)), hi = fp8_by_hand(uint8_t(c + 1));
            for (int i = 1; i < 64; ++i) {
                if (i == 32) continue;  // the midpoint: tie, covered above
                const float x = float(lo + (hi - lo) * i / 64.0);
                const int want = i < 32 ? c : c + 1;
                const int got = f32_to_fp8_e4m3(x);
                QVERIFY2(got == want, qPrintable(QString("%1 -> 0x%2, expected 0x%3").arg(double(x), 0, 'g', 9)
                                                     .arg(got, 2, 16).arg(want, 2, 16)));
            }
        }
    }

    // ---- BF16 -----------------------------------------------------------------------
    void bf16Decode_data() {
        QTest::addColumn<int>("code");
        QTest::addColumn<double>("value");
        QTest::newRow("1.0") << 0x3f80 << 1.0;
        QTest::newRow("1 + 2^-7") << 0x3f81 << 1.0 + std::ldexp(1.0, -7);
        QTest::newRow("-2.0") << 0xc000 << -2.0;
        QTest::newRow("-0") << 0x8000 << -0.0;
        QTest::newRow("+inf") << 0x7f80 << double(INFINITY);
        QTest::newRow("-inf") << 0xff80 << double(-INFINITY);
        QTest::newRow("smallest subnormal 2^-133") << 0x0001 << std::ldexp(1.0, -133);
        QTest::newRow("3.140625") << 0x4049 << 3.140625;
    }
    void bf16Decode() {
        QFETCH(int, code);
        QFETCH(double, value);
        const float got = bf16_to_f32(uint16_t(code));
        QVERIFY2(same_bits(got, float(value)), qPrintable(QString("0x%1 -> %2").arg(code, 4, 16).arg(got)));
    }
    void bf16Encode_data() {
        QTest::addColumn<double>("input");
        QTest::addColumn<int>("code");
        QTest::newRow("1.0") << 1.0 << 0x3f80;
        QTest::newRow("1 + 2^-8: midpoint -> 1.0 (even)") << 1.0 + std::ldexp(1.0, -8) << 0x3f80;
        QTest::newRow("1 + 3*2^-8: midpoint -> 1 + 2^-6 (even)") << 1.0 + 3 * std::ldexp(1.0, -8) << 0x3f82;
        QTest::newRow("just above 1 + 2^-8") << 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -20) << 0x3f81;
        QTest::newRow("pi -> 3.140625") << M_PI << 0x4049;
        QTest::newRow("-0") << -0.0 << 0x8000;
        QTest::newRow("FLT_MAX rounds to inf") << double(std::numeric_limits<float>::max()) << 0x7f80;
        QTest::newRow("+inf") << double(INFINITY) << 0x7f80;
        QTest::newRow("-inf") << double(-INFINITY) << 0xff80;
    }
    void bf16Encode() {
        QFETCH(double, input);
        QFETCH(int, code);
        const int got = f32_to_bf16(float(input));
        QVERIFY2(got == code, qPrintable(QString("%1 -> 0x%2, expected 0x%3").arg(input, 0, 'g', 17).arg(got, 4, 16)
                                             .arg(code, 4, 16)));
    }
    void bf16NanAndRoundTrip() {
        const uint16_t n = f32_to_bf16(NAN);
        QVERIFY(std::isnan(bf16_to_f32(n)));
        QVERIFY(n & 0x0040);  // quiet
        // A signalling NaN whose payload lives only in the low 16 bits must not become inf.
        uint32_t snan_bits = 0x7f800001u;
        float snan;
        std::memcpy(&snan, &snan_bits, 4);
        QVERIFY(std::isnan(bf16_to_f32(f32_to_bf16(snan))));
        for (int c = 0; c < 65536; ++c) {
            const float v = bf16_to_f32(uint16_t(c));
            if (std::isnan(v)) continue;
            const int back = f32_to_bf16(v);
            QVERIFY2(back == c, qPrintable(QString("0x%1 -> 0x%2").arg(c, 4, 16).arg(back, 4, 16)));
        }
    }

    // ---- F16 ------------------------------------------------------------------------
    void f16Decode_data() {
        QTest::addColumn<int>("code");
        QTest::addColumn<double>("value");
        QTest::newRow("1.0") << 0x3c00 << 1.0;
        QTest::newRow("-2.0") << 0xc000 << -2.0;
        QTest::newRow("-0") << 0x8000 << -0.0;
        QTest::newRow("1/3 rounded") << 0x3555 << 0.333251953125;
        QTest::newRow("max 65504") << 0x7bff << 65504.0;
        QTest::newRow("smallest subnormal 2^-24") << 0x0001 << std::ldexp(1.0, -24);
        QTest::newRow("largest subnormal") << 0x03ff << 1023 * std::ldexp(1.0, -24);
        QTest::newRow("negative subnormal") << 0x8200 << -512 * std::ldexp(1.0, -24);
        QTest::newRow("smallest normal 2^-14") << 0x0400 << std::ldexp(1.0, -14);
        QTest::newRow("+inf") << 0x7c00 << double(INFINITY);
        QTest::newRow("-inf") << 0xfc00 << double(-INFINITY);
    }
    void f16Decode() {
        QFETCH(int, code);
        QFETCH(double, value);
        const float got = f16_to_f32(uint16_t(code));
        QVERIFY2(same_bits(got, float(value)), qPrintable(QString("0x%1 -> %2").arg(code, 4, 16).arg(got)));
    }
    void f16Encode_data() {
        QTest::addColumn<double>("input");
        QTest::addColumn<int>("code");
        const double u = std::ldexp(1.0, -24);
        QTest::newRow("1.0") << 1.0 << 0x3c00;
        QTest::newRow("1 + 2^-11: midpoint -> 1.0 (even)") << 1.0 + std::ldexp(1.0, -11) << 0x3c00;
        QTest::newRow("1 + 3*2^-11: midpoint -> even") << 1.0 + 3 * std::ldexp(1.0, -11) << 0x3c02;
        QTest::newRow("65504") << 65504.0 << 0x7bff;
        QTest::newRow("65519 -> 65504") << 65519.0 << 0x7bff;
        QTest::newRow("65520: midpoint -> inf (even)") << 65520.0 << 0x7c00;
        QTest::newRow("1e6 -> inf") << 1e6 << 0x7c00;
        QTest::newRow("-1e6 -> -inf") << -1e6 << 0xfc00;
        QTest::newRow("2^-24") << u << 0x0001;
        QTest::newRow("2^-25: midpoint 0|2^-24 -> 0 (even)") << 0.5 * u << 0x0000;
        QTest::newRow("3*2^-25: midpoint -> 2*2^-24 (even)") << 1.5 * u << 0x0002;
        QTest::newRow("just above 2^-25") << double(std::nextafter(float(0.5 * u), 1.0f)) << 0x0001;
        QTest::newRow("midpoint largest subnormal|2^-14 -> 2^-14") << 1023.5 * u << 0x0400;
        QTest::newRow("-0") << -0.0 << 0x8000;
        QTest::newRow("+inf") << double(INFINITY) << 0x7c00;
    }
    void f16Encode() {
        QFETCH(double, input);
        QFETCH(int, code);
        const int got = f32_to_f16(float(input));
        QVERIFY2(got == code, qPrintable(QString("%1 -> 0x%2, expected 0x%3").arg(input, 0, 'g', 17).arg(got, 4, 16)
                                             .arg(code, 4, 16)));
    }
    void f16NanAndRoundTrip() {
        QVERIFY(std::isnan(f16_to_f32(f32_to_f16(NAN))));
        QVERIFY(std::isnan(f16_to_f32(0x7e00)));
        QVERIFY(std::isnan(f16_to_f32(0xfc01)));
        for (int c = 0; c < 65536; ++c) {
            const float v = f16_to_f32(uint16_t(c));
            if (std::isnan(v)) continue;
            const int back = f32_to_f16(v);
            QVERIFY2(back == c, qPrintable(QString("0x%1 -> 0x%2").arg(c, 4, 16).arg(back, 4, 16)));
        }
    }

    // ---- block-scaled FP8 weights through load_weights ------------------------------
    // q_a_proj [130, 200] and q_b_proj [4, 130]: neither dimension a multiple of 128, so the
    // last row and column blocks are partial. The loader's result must equal the
    // hand-dequantized weight bit for bit (one f32 product per element, as in DeepSeek's
    // weight_dequant).
    void fp8BlockDequantization() {
        nlohmann::json j = {{"architectures", {"DeepseekV3ForCausalLM"}},
                            {"model_type", "deepseek_v3"},
                            {"vocab_size", 8},
                            {"hidden_size", 200},
                            {"intermediate_size", 8},
                            {"num_hidden_layers", 1},
                            {"num_attention_heads", 1},
                            {"kv_lora_rank", 4},
                            {"q_lora_rank", 130},
                            {"qk_nope_head_dim", 2},
                            {"qk_rope_head_dim", 2},
                            {"v_head_dim", 2},
                            {"max_position_embeddings", 16},
                            {"quantization_config",
                             {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {128, 128}}}}};
        ModelConfig cfg = ModelConfig::from_json(j, "fp8-test/config.json");
        Weights w;
        std::mt19937 rng(7);
        std::uniform_real_distribution<float> uni(-1.0f, 1.0f), pos(0.001f, 0.1f);
        std::uniform_int_distribution<int> byte(0, 255);
        struct Quantized {
            std::vector<uint8_t> q;
            std::vector<float> scale;
            int64_t rows, cols;
        };
        std::map<std::string, Quantized> fp8;
        std::vector<TensorToWrite> out;
        for (auto& nt : tensor_table(w, cfg)) {
            int64_t n = 1;
            for (auto d : nt.shape) n *= d;
            const bool quant = nt.name.find("q_a_proj") != std::string::npos ||
                               nt.name.find("q_b_proj") != std::string::npos;
            if (!quant) {
                std::vector<float> v(static_cast<size_t>(n));
                for (auto& x : v) x = uni(rng);
                out.push_back(make_tensor(nt.name, DType::F32, nt.shape, v.data()));
                continue;
            }
            Quantized qz;
            qz.rows = nt.shape[0];
            qz.cols = nt.shape[1];
            qz.q.resize(size_t(n));
            for (auto& b : qz.q) {
                do b = uint8_t(byte(rng));
                while ((b & 0x7f) == 0x7f);  // no NaN codes
            }
            const int64_t sr = (qz.rows + 127) / 128, sc = (qz.cols + 127) / 128;
            qz.scale.resize(size_t(sr * sc));
            for (auto& s : qz.scale) s = pos(rng);
            TensorToWrite t;
            t.name = nt.name;
            t.dtype = DType::F8_E4M3;
            t.shape = nt.shape;
            t.bytes = qz.q;
            out.push_back(std::move(t));
            out.push_back(make_tensor(nt.name + "_scale_inv", DType::F32, {sr, sc}, qz.scale.data()));
            fp8[nt.name] = std::move(qz);
        }
        QCOMPARE(int(fp8.size()), 2);
        QTemporaryDir dir;
        QVERIFY(dir.isValid());
        const std::filesystem::path file = std::filesystem::path(dir.path().toStdString()) / "model.safetensors";
        write_safetensors(file, out);
        Checkpoint ck = Checkpoint::open(file);
        Weights loaded = load_weights(cfg, ck);
        const std::vector<std::pair<std::string, const Tensor*>> got = {
            {"model.layers.0.self_attn.q_a_proj.weight", &loaded.layers[0].attn.q_a_proj},
            {"model.layers.0.self_attn.q_b_proj.weight", &loaded.layers[0].attn.q_b_proj}};
        for (const auto& [name, tensor] : got) {
            const Quantized& qz = fp8.at(name);
            QCOMPARE(tensor->shape, (std::vector<int64_t>{qz.rows, qz.cols}));
            const int64_t sc = (qz.cols + 127) / 128;
            std::vector<float> want(size_t(qz.rows * qz.cols));
            for (int64_t r = 0; r < qz.rows; ++r)
                for (int64_t c = 0; c < qz.cols; ++c)
                    want[size_t(r * qz.cols + c)] =
                        float(fp8_by_hand(qz.q[size_t(r * qz.cols + c)])) * qz.scale[size_t((r / 128) * sc + c / 128)];
            MOESCOPE_VERIFY_DIFF(test::compare_vectors("load_weights fp8 " + name, tensor->data, want,
                                                       {qz.rows, qz.cols}, 0.0));
        }
        // The four blocks of q_a_proj have distinct scales, so a loader picking the wrong block
        // for the partial ones cannot match by accident.
        const auto& qa = fp8.at("model.layers.0.self_attn.q_a_proj.weight");
        QCOMPARE(std::set<float>(qa.scale.begin(), qa.scale.end()).size(), size_t(4));
    }

    // A block scale of the wrong shape, or none at all, is reported with the tensor's name.
    void fp8BadScale_data() {
        QTest::addColumn<int>("scaleRows");  // 0: no scale tensor
        QTest::addColumn<QString>("errorType");
        QTest::newRow("scale missing") << 0 << "FormatError";
        QTest::newRow("scale [1, 2] for [130, 200]") << 1 << "ShapeError";
        QTest::newRow("scale [3, 2] for [130, 200]") << 3 << "ShapeError";
    }
    void fp8BadScale() {
        QFETCH(int, scaleRows);
        QFETCH(QString, errorType);
        nlohmann::json j = {{"vocab_size", 8},          {"hidden_size", 200},      {"intermediate_size", 8},
                            {"num_hidden_layers", 1},   {"num_attention_heads", 1}, {"kv_lora_rank", 4},
                            {"q_lora_rank", 130},       {"qk_nope_head_dim", 2},   {"qk_rope_head_dim", 2},
                            {"v_head_dim", 2},          {"max_position_embeddings", 16}};
        ModelConfig cfg = ModelConfig::from_json(j, "fp8-test/config.json");
        Weights w;
        std::vector<TensorToWrite> out;
        const std::string qa = "model.layers.0.self_attn.q_a_proj.weight";
        for (auto& nt : tensor_table(w, cfg)) {
            int64_t n = 1;
            for (auto d : nt.shape) n *= d;
            std::vector<float> v(size_t(n), 0.25f);
            out.push_back(make_tensor(nt.name, nt.name == qa ? DType::F8_E4M3 : DType::F32, nt.shape, v.data()));
        }
        if (scaleRows > 0) {
            std::vector<float> s(size_t(scaleRows * 2), 1.0f);
            out.push_back(make_tensor(qa + "_scale_inv", DType::F32, {scaleRows, 2}, s.data()));
        }
        QTemporaryDir dir;
        const std::filesystem::path file = std::filesystem::path(dir.path().toStdString()) / "model.safetensors";
        write_safetensors(file, out);
        Checkpoint ck = Checkpoint::open(file);
        const std::vector<std::string> needles = {"model.safetensors", qa};
        if (errorType == "FormatError")
            MOESCOPE_VERIFY_THROWS_WITH(load_weights(cfg, ck), FormatError, needles);
        else
            MOESCOPE_VERIFY_THROWS_WITH(load_weights(cfg, ck), ShapeError, needles);
    }
};

QTEST_GUILESS_MAIN(TestFp8)
#include "test_fp8.moc"
