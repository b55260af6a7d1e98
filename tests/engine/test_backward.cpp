// Each layer's backward on its own against central finite differences of a random linear
// functional of its output (sum(out * R)): linear, RMSNorm, SwiGLU, cross-entropy, embedding,
// MLP, MLA (naive, q-LoRA and q_proj), DeepSeekMoE with its router (sigmoid + normalized
// top-k + routed_scaling_factor, and softmax). Inputs and every parameter are checked.
#include <QtTest>

#include <cmath>
#include <functional>
#include <random>

#include "engine/model/backward.h"
#include "engine/model/ops.h"
#include "engine/train/optimizer.h"
#include "engine/train/train_forward.h"
#include "test_train_util.h"

using namespace moescope;

namespace {

std::vector<float> randv(std::mt19937_64& rng, size_t n, double s = 1.0) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(s * normal01(rng));
    return v;
}

Tensor f32_tensor(std::vector<int64_t> shape, std::vector<float> values) {
    Tensor t;
    t.shape = std::move(shape);
    t.data = std::move(values);
    return t;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += double(a[i]) * b[i];
    return s;
}

// Compares grad[i] with (f(x + eps) - f(x - eps)) / 2 eps on every entry (up to 40 sampled).
QString check(const char* what, const std::function<double()>& f, float* x, const float* grad, size_t n,
              float eps = 1e-2f, double tol = 1e-2) {
    std::mt19937_64 rng(11);
    const size_t m = std::min<size_t>(n, 40);
    for (size_t s = 0; s < m; ++s) {
        const size_t i = n <= 40 ? s : size_t(rng() % n);
        const float o = x[i];
        x[i] = o + eps;
        const double up = f();
        x[i] = o - eps;
        const double dn = f();
        x[i] = o;
        const double fd = (up - dn) / (2.0 * eps);
        const double err = std::fabs(fd - grad[i]) / std::max(1e-2, std::max(std::fabs(fd), std::fabs(double(grad[i]))));
        if (err > tol)
            return QString("%1[%2]: analytic %3, finite difference %4").arg(what).arg(i).arg(grad[i]).arg(fd);
    }
    return {};
}

#define CHECK_GRAD(...)                                      \
    do {                                                     \
        const QString e = check(__VA_ARGS__);                \
        QVERIFY2(e.isEmpty(), qPrintable(e));                \
    } while (0)

}  // namespace

class TestBackward : public QObject {
    Q_OBJECT
private slots:
    void linear();
    void rmsnorm();
    void swiglu();
    void cross_entropy();
    void embedding();
    void mlp();
    void mla_data();
    void mla();
    void moe_data();
    void moe();
};

void TestBackward::linear() {
    std::mt19937_64 rng(1);
    const int T = 3, in = 5, out = 4;
    Tensor W = f32_tensor({out, in}, randv(rng, out * in));
    auto x = randv(rng, T * in), R = randv(rng, T * out);
    std::vector<float> y(T * out), dx(T * in);
    Tensor dW = f32_tensor({out, in}, std::vector<float>(out * in, 0.0f));
    linear_backward(dx.data(), &dW, R.data(), x.data(), W, T);
    auto f = [&] {
        linear_forward(y.data(), x.data(), W, T);
        return dot(y, R);
    };
    CHECK_GRAD("dx", f, x.data(), dx.data(), x.size());
    CHECK_GRAD("dW", f, W.ptr(), dW.ptr(), dW.data.size());
}

void TestBackward::rmsnorm() {
    std::mt19937_64 rng(2);
    const int T = 3, n = 8;
    auto x = randv(rng, T * n), w = randv(rng, n), R = randv(rng, T * n);
    std::vector<float> y(T * n), dx(T * n), dw(n, 0.0f);
    rmsnorm_backward(dx.data(), dw.data(), R.data(), x.data(), w.data(), T, n, 1e-6f);
    auto f = [&] {
        rmsnorm_forward(y.data(), x.data(), w.data(), T, n, 1e-6f);
        return dot(y, R);
    };
    CHECK_GRAD("dx", f, x.data(), dx.data(), x.size());
    CHECK_GRAD("dw", f, w.data(), dw.data(), dw.size());
}

void TestBackward::swiglu() {
    std::mt19937_64 rng(3);
    const int n = 20;
    auto g = randv(rng, n, 2.0), u = randv(rng, n), R = randv(rng, n);
    std::vector<float> y(n), dg(n), du(n);
    swiglu_backward(dg.data(), du.data(), R.data(), g.data(), u.data(), n);
    auto f = [&] {
        swiglu_forward(y.data(), g.data(), u.data(), n);
        return dot(y, R);
    };
    CHECK_GRAD("dg", f, g.data(), dg.data(), n);
    CHECK_GRAD("du", f, u.data(), du.data(), n);
}

void TestBackward::cross_entropy() {
    std::mt19937_64 rng(4);
    const int T = 4, V = 7;
    auto logits = randv(rng, T * V, 2.0);
    std::vector<int> targets = {3, -1, 0, 6};
    auto d = logits;
    const double loss = cross_entropy_forward_backward(d.data(), targets.data(), T, V, 0.25f);
    // Reference: -log softmax in double.
    double ref = 0;
    for (int t = 0; t < T; ++t) {
        if (targets[size_t(t)] < 0) continue;
        double m = -1e30, s = 0;
        for (int v = 0; v < V; ++v) m = std::max(m, double(logits[size_t(t * V + v)]));
        for (int v = 0; v < V; ++v) s += std::exp(double(logits[size_t(t * V + v)]) - m);
        ref += 0.25 * (m + std::log(s) - logits[size_t(t * V + targets[size_t(t)])]);
    }
    QVERIFY(std::fabs(loss - ref) < 1e-6);
    for (int v = 0; v < V; ++v) QCOMPARE(d[size_t(V + v)], 0.0f);  // skipped row
    auto f = [&] {
        auto c = logits;
        return cross_entropy_forward_backward(c.data(), targets.data(), T, V, 0.25f);
    };
    CHECK_GRAD("dlogits", f, logits.data(), d.data(), logits.size());
}

void TestBackward::embedding() {
    Tensor dE = f32_tensor({5, 2}, std::vector<float>(10, 0.0f));
    std::vector<int> tok = {3, 1, 3};
    std::vector<float> dh = {1, 2, 3, 4, 5, 6};
    embedding_backward(dE, dh.data(), tok.data(), 3);
    QCOMPARE(dE.data[6], 6.0f);  // rows 0 and 2 of dh both land on token 3
    QCOMPARE(dE.data[7], 8.0f);
    QCOMPARE(dE.data[2], 3.0f);
    QCOMPARE(dE.data[0], 0.0f);
}

void TestBackward::mlp() {
    std::mt19937_64 rng(5);
    const int T = 3, D = 6, I = 5;
    MlpWeights w{f32_tensor({I, D}, randv(rng, I * D)), f32_tensor({I, D}, randv(rng, I * D)),
                 f32_tensor({D, I}, randv(rng, D * I))};
    MlpWeights dw{f32_tensor({I, D}, std::vector<float>(I * D, 0.0f)), f32_tensor({I, D}, std::vector<float>(I * D, 0.0f)),
                  f32_tensor({D, I}, std::vector<float>(D * I, 0.0f))};
    auto x = randv(rng, T * D), R = randv(rng, T * D);
    std::vector<float> y(T * D), dx(T * D);
    MlpActs acts;
    mlp_forward_train(y.data(), x.data(), T, w, acts);
    std::vector<float> y2(T * D);
    mlp_forward(y2.data(), x.data(), T, w);
    QCOMPARE(y, y2);  // the training forward is the inference forward
    mlp_backward(dx.data(), dw, R.data(), w, acts);
    auto f = [&] {
        mlp_forward(y.data(), x.data(), T, w);
        return dot(y, R);
    };
    CHECK_GRAD("dx", f, x.data(), dx.data(), x.size());
    CHECK_GRAD("dgate", f, w.gate_proj.ptr(), dw.gate_proj.ptr(), dw.gate_proj.data.size());
    CHECK_GRAD("dup", f, w.up_proj.ptr(), dw.up_proj.ptr(), dw.up_proj.data.size());
    CHECK_GRAD("ddown", f, w.down_proj.ptr(), dw.down_proj.ptr(), dw.down_proj.data.size());
}

void TestBackward::mla_data() {
    QTest::addColumn<QString>("flavour");
    QTest::newRow("q-lora-yarn") << "v3";
    QTest::newRow("q-proj") << "v2";
}

void TestBackward::mla() {
    QFETCH(QString, flavour);
    ModelConfig cfg = train_test::tiny_config(flavour.toStdString());
    Weights w = init_weights(cfg, 9, 0.5);
    for (auto& nt : tensor_table(w, cfg))
        if (nt.name.find("layernorm") != std::string::npos)
            for (auto& v : nt.tensor->data) v = 0.5f + float(std::fabs(v - 0.3f));
    Weights g = zeros_like(w, cfg);
    const AttentionWeights& A = w.layers[0].attn;
    AttentionWeights& dA = g.layers[0].attn;
    const MlaDims d(cfg);
    const Rope rope(cfg);
    const int B = 2, T = 5, N = B * T;
    std::mt19937_64 rng(6);
    auto x = randv(rng, size_t(N) * d.D), R = randv(rng, size_t(N) * d.D);
    std::vector<float> y(size_t(N) * d.D), dx(size_t(N) * d.D);
    MlaActs acts;
    mla_forward_train(y.data(), x.data(), B, T, A, d, rope, acts);
    // Same output as the inference path (naive and absorbed), sequence by sequence.
    for (int b = 0; b < B; ++b)
        for (bool absorbed : {false, true}) {
            LatentCache cache;
            std::vector<float> yr(size_t(T) * d.D);
            mla_forward(yr.data(), x.data() + size_t(b) * T * d.D, T, 0, A, d, rope, cache, absorbed);
            for (int i = 0; i < T * d.D; ++i) QVERIFY(std::fabs(yr[size_t(i)] - y[size_t(b) * T * d.D + i]) < 1e-4f);
        }
    mla_backward(dx.data(), dA, R.data(), A, d, rope, acts);
    AttentionWeights& Wm = w.layers[0].attn;
    auto f = [&] {
        MlaActs a2;
        mla_forward_train(y.data(), x.data(), B, T, Wm, d, rope, a2);
        return dot(y, R);
    };
    CHECK_GRAD("dx", f, x.data(), dx.data(), x.size());
    if (d.q_lora > 0) {
        CHECK_GRAD("q_a_proj", f, Wm.q_a_proj.ptr(), dA.q_a_proj.ptr(), dA.q_a_proj.data.size());
        CHECK_GRAD("q_a_layernorm", f, Wm.q_a_layernorm.ptr(), dA.q_a_layernorm.ptr(), dA.q_a_layernorm.data.size());
        CHECK_GRAD("q_b_proj", f, Wm.q_b_proj.ptr(), dA.q_b_proj.ptr(), dA.q_b_proj.data.size());
    } else {
        CHECK_GRAD("q_proj", f, Wm.q_proj.ptr(), dA.q_proj.ptr(), dA.q_proj.data.size());
    }
    CHECK_GRAD("kv_a_proj_with_mqa", f, Wm.kv_a_proj_with_mqa.ptr(), dA.kv_a_proj_with_mqa.ptr(),
               dA.kv_a_proj_with_mqa.data.size());
    CHECK_GRAD("kv_a_layernorm", f, Wm.kv_a_layernorm.ptr(), dA.kv_a_layernorm.ptr(), dA.kv_a_layernorm.data.size());
    CHECK_GRAD("kv_b_proj", f, Wm.kv_b_proj.ptr(), dA.kv_b_proj.ptr(), dA.kv_b_proj.data.size());
    CHECK_GRAD("o_proj", f, Wm.o_proj.ptr(), dA.o_proj.ptr(), dA.o_proj.data.size());
}

void TestBackward::moe_data() {
    QTest::addColumn<QString>("flavour");
    QTest::newRow("sigmoid-noaux_tc-grouped") << "v3";
    QTest::newRow("softmax-greedy") << "v2";
}

void TestBackward::moe() {
    QFETCH(QString, flavour);
    ModelConfig cfg = train_test::tiny_config(flavour.toStdString());
    Weights w = init_weights(cfg, 10, 0.5);
    MoeWeights& M = w.layers[1].moe;
    std::mt19937_64 rng(7);
    if (!M.e_score_correction_bias.empty())
        for (auto& b : M.e_score_correction_bias.data) b = float(0.3 * normal01(rng));
    Weights g = zeros_like(w, cfg);
    MoeWeights& dM = g.layers[1].moe;
    const RouterDims rd(cfg);
    const int T = 6, D = cfg.hidden_size;
    auto x = randv(rng, size_t(T) * D), R = randv(rng, size_t(T) * D);
    std::vector<float> y(size_t(T) * D), dx(size_t(T) * D);
    const float* bias = M.e_score_correction_bias.empty() ? nullptr : M.e_score_correction_bias.ptr();
    MoeActs acts;
    moe_forward_train(y.data(), x.data(), T, M, bias, rd, cfg, acts);
    {  // the inference forward gives the same output
        std::vector<float> logits(size_t(T) * rd.E), yr(size_t(T) * D);
        linear_forward(logits.data(), x.data(), M.gate, T);
        Routing r;
        route(r, logits.data(), T, bias, rd);
        moe_experts_forward(yr.data(), x.data(), T, M, r, cfg);
        for (size_t i = 0; i < yr.size(); ++i) QVERIFY(std::fabs(yr[i] - y[i]) < 1e-5f);
    }
    const std::vector<int> ids = acts.r.ids;
    moe_backward(dx.data(), dM, R.data(), M, acts, rd, cfg);
    bool flipped = false;
    auto f = [&] {
        MoeActs a2;
        moe_forward_train(y.data(), x.data(), T, M, bias, rd, cfg, a2);
        if (a2.r.ids != ids) flipped = true;
        return dot(y, R);
    };
    CHECK_GRAD("dx", f, x.data(), dx.data(), x.size(), 1e-3f, 2e-2);
    CHECK_GRAD("router gate", f, M.gate.ptr(), dM.gate.ptr(), dM.gate.data.size(), 1e-3f, 2e-2);
    CHECK_GRAD("expert 0 gate_proj", f, M.experts[0].gate_proj.ptr(), dM.experts[0].gate_proj.ptr(),
               dM.experts[0].gate_proj.data.size());
    CHECK_GRAD("expert 3 down_proj", f, M.experts[3].down_proj.ptr(), dM.experts[3].down_proj.ptr(),
               dM.experts[3].down_proj.data.size());
    if (!M.shared.gate_proj.empty())
        CHECK_GRAD("shared up_proj", f, M.shared.up_proj.ptr(), dM.shared.up_proj.ptr(), dM.shared.up_proj.data.size());
    QVERIFY2(!flipped, "a perturbation changed the routing: pick another seed");
    if (!dM.e_score_correction_bias.empty())
        for (float b : dM.e_score_correction_bias.data) QCOMPARE(b, 0.0f);  // the bias never gets a gradient
}

QTEST_GUILESS_MAIN(TestBackward)
#include "test_backward.moc"
