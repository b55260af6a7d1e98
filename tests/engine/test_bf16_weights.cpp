// BF16-stored inference weights (WeightStorage::BF16): the BF16 row kernels against a scalar
// emulation of the f32 row kernel and against the f32 kernels on the widened weights (bit for
// bit), the panel-widening sgemm of prefill (within sgemm's rounding), and tiny-v3 saved as
// BF16 and loaded both ways: the same logits (bit-identical when decoding), the same greedy
// generation, half the resident bytes, the storage choice of Auto, saving back.
#include <QtTest>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "engine/errors.h"
#include "engine/loader.h"
#include "engine/model/ops.h"
#include "engine/safetensors.h"
#include "engine/session.h"
#include "test_util.h"

using namespace moescope;
namespace fs = std::filesystem;

namespace {

constexpr uint16_t kBf16Nan = 0x7fc0;
constexpr int kPad = 32;  // poisoned values after every array, to catch over-reads

// n BF16 values of N(0, 1) followed by kPad NaNs.
std::vector<uint16_t> rand_bf16(std::mt19937_64& rng, size_t n) {
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<uint16_t> v(n + kPad, kBf16Nan);
    for (size_t i = 0; i < n; ++i) v[i] = f32_to_bf16(d(rng));
    return v;
}

std::vector<float> rand_f32(std::mt19937_64& rng, size_t n) {
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> v(n + kPad, NAN);
    for (size_t i = 0; i < n; ++i) v[i] = d(rng);
    return v;
}

std::vector<float> widened(const std::vector<uint16_t>& b) {
    std::vector<float> v(b.size());
    for (size_t i = 0; i < b.size(); ++i) v[i] = bf16_to_f32(b[i]);
    return v;
}

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

// The AVX2 row kernel's arithmetic written out in scalars: 16 lanes of fused multiply-adds
// over i = l, l+16, ..., the pairwise lane reduction, then the tail in order.
float row_kernel_scalar(const float* x, const uint16_t* w, int in) {
    float lane[16] = {};
    const int n16 = in / 16 * 16;
    for (int i = 0; i < n16; i += 16)
        for (int l = 0; l < 16; ++l) lane[l] = std::fmaf(bf16_to_f32(w[i + l]), x[i + l], lane[l]);
    for (int l = 0; l < 8; ++l) lane[l] += lane[l + 8];
    for (int l = 0; l < 4; ++l) lane[l] += lane[l + 4];
    for (int l = 0; l < 2; ++l) lane[l] += lane[l + 2];
    float s = lane[0] + lane[1];
    for (int i = n16; i < in; ++i) s = std::fmaf(bf16_to_f32(w[i]), x[i], s);
    return s;
}

struct TinyPair {
    fs::path dir;                       // tiny-v3 saved as BF16
    std::shared_ptr<Model> f32, bf16;   // the same checkpoint loaded both ways
};

const TinyPair& tiny_pair() {
    static TinyPair p = [] {
        TinyPair t;
        t.dir = fs::path(MOESCOPE_BINARY_DIR) / "test_bf16_weights_tiny";
        fs::remove_all(t.dir);
        auto base = load_model(MOESCOPE_FIXTURES "/tiny-v3", LoadOptions{WeightStorage::F32});
        Weights w = base->weights();
        save_checkpoint(t.dir, base->config(), w, SaveFormat::BF16);
        t.f32 = load_model(t.dir, LoadOptions{WeightStorage::F32});
        t.bf16 = load_model(t.dir, LoadOptions{WeightStorage::BF16});
        return t;
    }();
    return p;
}

std::vector<int> prompt_tokens() {
    return {104, 266, 434, 309, 419, 241, 106, 104, 257, 270, 151, 97, 255, 144, 133, 385, 95, 282, 0, 442, 459, 412, 353, 127};
}

}  // namespace

class TestBf16Weights : public QObject {
    Q_OBJECT
private slots:
    void cleanup() {
        set_num_threads(0);
        use_portable_row_kernel(false);
    }
    void rowKernelMatchesF32AndScalar_data();
    void rowKernelMatchesF32AndScalar();
    void matvecTransposedMatchesF32_data();
    void matvecTransposedMatchesF32();
    void prefillPanelsWithinSgemmRounding_data();
    void prefillPanelsWithinSgemmRounding();
    void loadKeepsBf16BitsAndStorageSplit();
    void decodeLogitsBitIdentical_data();
    void decodeLogitsBitIdentical();
    void prefillLogitsWithinTolerance();
    void greedyGenerationIdentical();
    void residentBytesHalved();
    void autoChoosesByCheckpoint();
    void savesBackExactly();
    void f32ReadOfBf16TensorThrows();
};

void TestBf16Weights::rowKernelMatchesF32AndScalar_data() {
    QTest::addColumn<int>("T");
    QTest::addColumn<int>("out");
    QTest::addColumn<int>("in");
    QTest::addColumn<bool>("accumulate");
    QTest::addColumn<bool>("portable");
    for (bool portable : {false, true})
        for (int T : {1, 2, 3, 4, 5, 8})
            for (auto [out, in] : {std::pair{1, 1}, std::pair{3, 3}, std::pair{63, 63}, std::pair{5, 17},
                                   std::pair{7, 100}, std::pair{33, 130}, std::pair{600, 64}})
                for (bool acc : {false, true})
                    QTest::addRow("%sT%d_%dx%d%s", portable ? "portable_" : "", T, out, in, acc ? "_acc" : "")
                        << T << out << in << acc << portable;
}

void TestBf16Weights::rowKernelMatchesF32AndScalar() {
    QFETCH(int, T);
    QFETCH(int, out);
    QFETCH(int, in);
    QFETCH(bool, accumulate);
    QFETCH(bool, portable);
    use_portable_row_kernel(portable);
    std::mt19937_64 rng(uint64_t(T * 1000003 + out * 101 + in));
    const std::vector<uint16_t> W = rand_bf16(rng, size_t(out) * in);  // [out, in] + NaN padding
    const std::vector<float> Wf = widened(W);
    const std::vector<float> x = rand_f32(rng, size_t(T) * in);         // [T, in] + NaN padding
    const std::vector<float> y0 = rand_f32(rng, size_t(T) * out);       // what accumulate adds to
    std::vector<float> y16(y0), y32(y0);                                // [T, out]
    matmul_nt_bf16(y16.data(), x.data(), W.data(), T, out, in, accumulate);
    matmul_nt(y32.data(), x.data(), Wf.data(), T, out, in, accumulate);
    QVERIFY2(same_bits(y16.data(), y32.data(), size_t(T) * out), "BF16 row kernel differs from the f32 one");
    // The padding after y is untouched.
    QVERIFY(std::isnan(y16[size_t(T) * out]) && std::isnan(y16[size_t(T) * out + kPad - 1]));
    // The threaded split of output rows gives the same bits as one thread.
    set_num_threads(1);
    std::vector<float> y1(y0);
    matmul_nt_rows_bf16(y1.data(), x.data(), W.data(), T, out, in, accumulate);
    QVERIFY(same_bits(y1.data(), y16.data(), size_t(T) * out));
    if (!portable && std::string(row_kernel_name()) == "avx2-fma") {
        std::vector<float> ref(size_t(T) * out);
        for (int t = 0; t < T; ++t)
            for (int o = 0; o < out; ++o) {
                const float s = row_kernel_scalar(x.data() + size_t(t) * in, W.data() + size_t(o) * in, in);
                ref[size_t(t) * out + o] = accumulate ? y0[size_t(t) * out + o] + s : s;
            }
        auto d = test::compare_arrays("matmul_nt_bf16 vs scalar emulation", y16.data(), ref.data(),
                                      {int64_t(T), int64_t(out)}, 0.0);
        QVERIFY2(d.ok, d.message.c_str());
    }
    // And a double-precision reference (catches a kernel and an emulation wrong alike).
    std::vector<double> dref(size_t(T) * out);
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < out; ++o) {
            double s = accumulate ? y0[size_t(t) * out + o] : 0.0;
            for (int i = 0; i < in; ++i) s += double(Wf[size_t(o) * in + i]) * x[size_t(t) * in + i];
            dref[size_t(t) * out + o] = s;
        }
    const double scale = std::sqrt(double(in)) * 1e-6 * 8;
    auto d = test::compare_arrays("matmul_nt_bf16 vs double", y16.data(), dref.data(), {int64_t(T), int64_t(out)},
                                  scale, 1e-6);
    QVERIFY2(d.ok, d.message.c_str());
}

void TestBf16Weights::matvecTransposedMatchesF32_data() {
    QTest::addColumn<int>("rows");
    QTest::addColumn<int>("n");
    QTest::addColumn<bool>("accumulate");
    QTest::addColumn<bool>("portable");
    for (bool portable : {false, true})
        for (int rows : {1, 3, 17})
            for (int n : {1, 3, 8, 63, 64, 100, 130})
                for (bool acc : {false, true})
                    QTest::addRow("%srows%d_n%d%s", portable ? "portable_" : "", rows, n, acc ? "_acc" : "")
                        << rows << n << acc << portable;
}

void TestBf16Weights::matvecTransposedMatchesF32() {
    QFETCH(int, rows);
    QFETCH(int, n);
    QFETCH(bool, accumulate);
    QFETCH(bool, portable);
    use_portable_row_kernel(portable);
    std::mt19937_64 rng(uint64_t(rows * 7919 + n));
    const int64_t ld = n + 5;  // a slice of a wider matrix, as MLA's W_UK of one head
    const std::vector<uint16_t> X = rand_bf16(rng, size_t(rows) * size_t(ld));
    const std::vector<float> Xf = widened(X);
    const std::vector<float> p = rand_f32(rng, size_t(rows));
    const std::vector<float> y0 = rand_f32(rng, size_t(n));
    std::vector<float> y16(y0), y32(y0);
    matvec_t_bf16(y16.data(), p.data(), X.data(), rows, n, ld, accumulate);
    matvec_t(y32.data(), p.data(), Xf.data(), rows, n, ld, accumulate);
    QVERIFY2(same_bits(y16.data(), y32.data(), size_t(n)), "BF16 matvec_t differs from the f32 one");
    std::vector<double> ref(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
        double s = accumulate ? y0[size_t(i)] : 0.0;
        for (int j = 0; j < rows; ++j) s += double(p[size_t(j)]) * Xf[size_t(j * ld + i)];
        ref[size_t(i)] = s;
    }
    auto d = test::compare_arrays("matvec_t_bf16 vs double", y16.data(), ref.data(), {int64_t(n)}, 1e-5, 1e-6);
    QVERIFY2(d.ok, d.message.c_str());
}

void TestBf16Weights::prefillPanelsWithinSgemmRounding_data() {
    QTest::addColumn<int>("T");
    QTest::addColumn<int>("out");
    QTest::addColumn<int>("in");
    QTest::addColumn<bool>("accumulate");
    // 3000 x 700 is three panels (1497, 1497, 6 rows); 40 x 33 one panel of every row.
    for (int T : {9, 20, 64})
        for (auto [out, in] : {std::pair{3000, 700}, std::pair{40, 33}})
            for (bool acc : {false, true})
                QTest::addRow("T%d_%dx%d%s", T, out, in, acc ? "_acc" : "") << T << out << in << acc;
}

void TestBf16Weights::prefillPanelsWithinSgemmRounding() {
    QFETCH(int, T);
    QFETCH(int, out);
    QFETCH(int, in);
    QFETCH(bool, accumulate);
    std::mt19937_64 rng(uint64_t(T + out + in));
    const std::vector<uint16_t> W = rand_bf16(rng, size_t(out) * in);
    const std::vector<float> Wf = widened(W);
    const std::vector<float> x = rand_f32(rng, size_t(T) * in);
    const std::vector<float> y0 = rand_f32(rng, size_t(T) * out);
    std::vector<float> y16(y0), y32(y0);
    matmul_nt_bf16(y16.data(), x.data(), W.data(), T, out, in, accumulate);
    matmul_nt(y32.data(), x.data(), Wf.data(), T, out, in, accumulate);
    QVERIFY(std::isnan(y16[size_t(T) * out]));
    // Both are f32 sums of the same f32 products over `in` terms: |error| <= in * eps * sum|x w|
    // for either, and ~sqrt(in) * eps * |x||w| in practice; the bound below is 4 sqrt(in) ulps
    // of a unit-variance sum of `in` products.
    const double tol = 4.0 * std::sqrt(double(in)) * std::sqrt(double(in)) * 6e-8;
    auto d = test::compare_arrays("matmul_nt_bf16 (panels) vs matmul_nt", y16.data(), y32.data(),
                                  {int64_t(T), int64_t(out)}, tol, 1e-6);
    QVERIFY2(d.ok, d.message.c_str());
    qDebug("T=%d %dx%d: max |panels - f32 sgemm| = %g (%s)", T, out, in, d.max_abs,
           same_bits(y16.data(), y32.data(), size_t(T) * out) ? "bit-identical" : "within rounding");
}

void TestBf16Weights::loadKeepsBf16BitsAndStorageSplit() {
    const TinyPair& p = tiny_pair();
    const ModelConfig& cfg = p.bf16->config();
    Checkpoint ck = Checkpoint::open(p.dir);
    Weights& wb = const_cast<Weights&>(p.bf16->weights());
    Weights& wf = const_cast<Weights&>(p.f32->weights());
    auto tb = tensor_table(wb, cfg), tf = tensor_table(wf, cfg);
    QCOMPARE(tb.size(), tf.size());
    int storable = 0;
    for (size_t i = 0; i < tb.size(); ++i) {
        const Tensor& b = *tb[i].tensor;
        const Tensor& f = *tf[i].tensor;
        if (b.empty()) {
            QVERIFY(f.empty());
            continue;
        }
        QVERIFY2(b.is_bf16() == tb[i].bf16_storable, tb[i].name.c_str());
        QVERIFY(!f.is_bf16());
        QCOMPARE(b.numel(), f.numel());
        if (!b.is_bf16()) {
            QVERIFY2(b.data == f.data, tb[i].name.c_str());
            continue;
        }
        ++storable;
        // The file's bits, and the f32 load holds exactly their widening.
        const TensorInfo* t = ck.find(tb[i].name);
        QVERIFY(t && t->dtype == DType::BF16);
        QVERIFY2(std::memcmp(b.bf16.data(), t->data, size_t(b.numel()) * 2) == 0, tb[i].name.c_str());
        QVERIFY2(b.to_f32() == f.data, tb[i].name.c_str());
        std::vector<float> row(size_t(b.shape[1]));
        b.copy_row(row.data(), b.shape[0] - 1);
        QVERIFY(std::equal(row.begin(), row.end(), f.data.end() - b.shape[1]));
    }
    // Every layer's attention, MLP/experts, embedding and head, the MTP module's too.
    QVERIFY(storable > 4 * 5);
    QVERIFY(wb.layers[1].moe.gate.data.size() > 0 && !wb.layers[1].moe.gate.is_bf16());  // router stays f32
    QVERIFY(wb.embed_tokens.is_bf16() && wb.lm_head.is_bf16() && wb.layers[0].attn.kv_b_proj.is_bf16());
}

void TestBf16Weights::decodeLogitsBitIdentical_data() {
    QTest::addColumn<bool>("absorbed");
    QTest::addColumn<int>("step");
    for (bool absorbed : {true, false})
        for (int step : {1, 3}) QTest::addRow("%s_step%d", absorbed ? "absorbed" : "naive", step) << absorbed << step;
}

void TestBf16Weights::decodeLogitsBitIdentical() {
    // Positions fed `step` at a time (1: decoding; 3: MTP verification), all T <= kSmallT, so
    // every product is the row kernel: the logits, hidden states, routing and the MTP module's
    // logits must agree bit for bit.
    QFETCH(bool, absorbed);
    QFETCH(int, step);
    const TinyPair& p = tiny_pair();
    const std::vector<int> toks = prompt_tokens();
    KvCache cf = p.f32->new_cache(), cb = p.bf16->new_cache();
    KvCache mf = p.f32->new_mtp_cache(), mb = p.bf16->new_mtp_cache();
    ForwardOptions opt;
    opt.absorbed = absorbed;
    opt.all_logits = true;
    const int V = p.f32->config().vocab_size;
    for (int s = 0; s + step <= int(toks.size()); s += step) {
        ForwardResult rf, rb;
        p.f32->forward(toks.data() + s, step, cf, opt, rf);
        p.bf16->forward(toks.data() + s, step, cb, opt, rb);
        QVERIFY2(rf.logits.size() == size_t(step) * V && rf.logits == rb.logits,
                 qPrintable(QString("logits differ at position %1").arg(s)));
        QVERIFY(rf.hidden == rb.hidden);
        QCOMPARE(rf.routing.size(), rb.routing.size());
        for (size_t l = 0; l < rf.routing.size(); ++l) QVERIFY(rf.routing[l].r.ids == rb.routing[l].r.ids);
        if (s + 1 < int(toks.size()) && p.f32->config().num_nextn_predict_layers > 0) {
            // MTP module 1 at positions s.. needs the tokens one further on.
            const int n = std::min(step, int(toks.size()) - 1 - s);
            ForwardResult mrf, mrb;
            p.f32->forward_mtp(1, rf.hidden.data(), toks.data() + s + 1, n, mf, opt, mrf);
            p.bf16->forward_mtp(1, rb.hidden.data(), toks.data() + s + 1, n, mb, opt, mrb);
            QVERIFY2(mrf.logits == mrb.logits, qPrintable(QString("MTP logits differ at position %1").arg(s)));
        }
    }
}

void TestBf16Weights::prefillLogitsWithinTolerance() {
    // 24 positions at once: every product goes through sgemm (f32) or the widened panels (BF16).
    const TinyPair& p = tiny_pair();
    const std::vector<int> toks = prompt_tokens();
    const int T = int(toks.size()), V = p.f32->config().vocab_size;
    for (bool absorbed : {true, false}) {
        KvCache cf = p.f32->new_cache(), cb = p.bf16->new_cache();
        ForwardOptions opt;
        opt.absorbed = absorbed;
        opt.all_logits = true;
        ForwardResult rf, rb;
        p.f32->forward(toks.data(), T, cf, opt, rf);
        p.bf16->forward(toks.data(), T, cb, opt, rb);
        // The logits are O(1-10); f32 sums in a different grouping at most move them by a few
        // ulps of the largest intermediate, amplified through 4 layers.
        auto d = test::compare_arrays("prefill logits, BF16 storage vs f32", rb.logits.data(), rf.logits.data(),
                                      {int64_t(T), int64_t(V)}, 1e-4, 1e-4);
        QVERIFY2(d.ok, d.message.c_str());
        qDebug("prefill (%s): max |bf16 - f32| = %g (%s)", absorbed ? "absorbed" : "naive", d.max_abs,
               rf.logits == rb.logits ? "bit-identical" : "within tolerance");
    }
}

void TestBf16Weights::greedyGenerationIdentical() {
    const TinyPair& p = tiny_pair();
    for (bool mtp : {false, true}) {
        SamplingParams sp;
        sp.temperature = 0;
        sp.max_tokens = 40;
        sp.mtp = mtp;
        Session sf(make_cpu_backend(p.f32)), sb(make_cpu_backend(p.bf16));
        GenerationResult gf = sf.generate(prompt_tokens(), sp);
        GenerationResult gb = sb.generate(prompt_tokens(), sp);
        QCOMPARE(gf.tokens.size(), size_t(40));
        QCOMPARE(gb.tokens, gf.tokens);
    }
}

void TestBf16Weights::residentBytesHalved() {
    const TinyPair& p = tiny_pair();
    const ModelConfig& cfg = p.f32->config();
    const WeightMemory mf = weight_memory(p.f32->weights(), cfg), mb = weight_memory(p.bf16->weights(), cfg);
    QCOMPARE(mf.storage, std::string("f32"));
    QCOMPARE(mb.storage, std::string("bf16"));
    QCOMPARE(mf.bf16_params, int64_t(0));
    QCOMPARE(mb.bf16_params + mb.f32_params, mf.f32_params);
    QCOMPARE(mf.bytes, 4 * mf.f32_params);
    QCOMPARE(mb.bytes, 2 * mb.bf16_params + 4 * mb.f32_params);
    // Norms and routers are a small share even of this tiny model: ~half the bytes.
    const double ratio = double(mb.bytes) / double(mf.bytes);
    qDebug("tiny-v3: f32 %lld bytes, bf16 %lld bytes (%.3f)", static_cast<long long>(mf.bytes),
           static_cast<long long>(mb.bytes), ratio);
    QVERIFY(ratio > 0.5 && ratio < 0.52);
    // The card of an unloaded checkpoint (inspect) predicts the same.
    Checkpoint ck = Checkpoint::open(p.dir);
    const WeightMemory pf = planned_weight_memory(cfg, ck, WeightStorage::F32);
    const WeightMemory pb = planned_weight_memory(cfg, ck, WeightStorage::BF16);
    QCOMPARE(pf.bytes, mf.bytes);
    QCOMPARE(pb.bytes, mb.bytes);
    QCOMPARE(pb.storage, std::string("bf16"));
    // convert_storage gets there from the f32 load, and back.
    Weights w = p.f32->weights();
    convert_storage(w, cfg, WeightStorage::BF16);
    QCOMPARE(weight_memory(w, cfg).bytes, mb.bytes);
    QVERIFY(w.layers[0].attn.o_proj.bf16 == p.bf16->weights().layers[0].attn.o_proj.bf16);
    convert_storage(w, cfg, WeightStorage::F32);
    QVERIFY(w.layers[0].attn.o_proj.data == p.f32->weights().layers[0].attn.o_proj.data);
}

void TestBf16Weights::autoChoosesByCheckpoint() {
    // tiny-v3 (BF16 file, ~2M parameters) stays f32 under Auto: small models keep their numbers.
    const TinyPair& p = tiny_pair();
    const ModelConfig& tcfg = p.f32->config();
    QCOMPARE(resolve_storage(WeightStorage::Auto, tcfg, Checkpoint::open(p.dir)), WeightStorage::F32);
    QCOMPARE(resolve_storage(WeightStorage::BF16, tcfg, Checkpoint::open(p.dir)), WeightStorage::BF16);
    auto tiny_auto = load_model(p.dir);
    QCOMPARE(weight_memory(tiny_auto->weights(), tcfg).storage, std::string("f32"));
    // DeepSeek-V2-Lite's config (15.7B parameters): Auto reads only the storable tensors' dtypes
    // in the headers, so a file holding one such tensor decides it.
    const ModelConfig big = ModelConfig::load(MOESCOPE_FIXTURES "/configs/deepseek-v2-lite.json");
    const fs::path dir = fs::path(MOESCOPE_BINARY_DIR) / "test_bf16_weights_auto";
    for (auto [dt, want] : {std::pair{DType::BF16, WeightStorage::BF16}, std::pair{DType::F32, WeightStorage::F32},
                            std::pair{DType::F8_E4M3, WeightStorage::F32}}) {
        fs::remove_all(dir);
        fs::create_directories(dir);
        std::vector<float> v(16, 0.5f);
        write_safetensors(dir / "model.safetensors",
                          {make_tensor("model.layers.0.self_attn.o_proj.weight", dt, {4, 4}, v.data()),
                           make_tensor("model.norm.weight", DType::F32, {16}, v.data())},
                          {});
        QCOMPARE(resolve_storage(WeightStorage::Auto, big, Checkpoint::open(dir)), want);
    }
    fs::remove_all(dir);
    QCOMPARE(storage_from_string("bf16"), WeightStorage::BF16);
    QVERIFY_THROWS_EXCEPTION(ConfigError, storage_from_string("fp16"));
}

void TestBf16Weights::savesBackExactly() {
    // BF16 storage saved as BF16 writes the same bits; as F32 and FP8 the widened values.
    const TinyPair& p = tiny_pair();
    const ModelConfig& cfg = p.bf16->config();
    const fs::path dir = fs::path(MOESCOPE_BINARY_DIR) / "test_bf16_weights_save";
    Weights w = p.bf16->weights();
    for (SaveFormat f : {SaveFormat::BF16, SaveFormat::F32, SaveFormat::FP8}) {
        fs::remove_all(dir);
        save_checkpoint(dir, cfg, w, f);
        auto back = load_model(dir, LoadOptions{WeightStorage::F32});
        if (f == SaveFormat::FP8) {
            // FP8 rounds (3 mantissa bits): the decoded logits stay close to the BF16 model's.
            QCOMPARE(weight_memory(back->weights(), cfg).storage, std::string("f32"));
            continue;
        }
        Weights& wb = const_cast<Weights&>(back->weights());
        Weights& wf = const_cast<Weights&>(p.f32->weights());
        auto tb = tensor_table(wb, cfg), tf = tensor_table(wf, cfg);
        for (size_t i = 0; i < tb.size(); ++i) QVERIFY2(tb[i].tensor->data == tf[i].tensor->data, tb[i].name.c_str());
    }
    fs::remove_all(dir);
}

void TestBf16Weights::f32ReadOfBf16TensorThrows() {
    const Tensor& t = tiny_pair().bf16->weights().layers[0].attn.o_proj;
    QVERIFY(t.is_bf16());
    QVERIFY_THROWS_EXCEPTION(Error, t.ptr());
}

QTEST_GUILESS_MAIN(TestBf16Weights)
#include "test_bf16_weights.moc"
