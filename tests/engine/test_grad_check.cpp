// Finite-difference check of every parameter tensor's gradient of the full training loss
// (main CE + MTP CE + balance loss) on tiny configs, entries whose perturbation flips a routing
// decision skipped. The engine is f32, so: large-ish init (big gradients), central differences
// with eps = 3e-3 and a relative tolerance of 3% (5e-3 absolute floor: f32 rounding of the loss).
#include <QtTest>

#include <cmath>
#include <random>

#include "engine/train/optimizer.h"
#include "engine/train/train_forward.h"
#include "test_train_util.h"

using namespace moescope;

class TestGradCheck : public QObject {
    Q_OBJECT
private slots:
    void every_tensor_data();
    void every_tensor();
};

void TestGradCheck::every_tensor_data() {
    QTest::addColumn<QString>("flavour");
    QTest::addColumn<QString>("balance");
    QTest::newRow("v3-auxfree") << "v3" << "aux-free";
    QTest::newRow("v3-auxloss") << "v3" << "aux-loss";
    QTest::newRow("v3-seqaux") << "v3" << "seq-aux";
    QTest::newRow("v2-auxloss") << "v2" << "aux-loss";
}

void TestGradCheck::every_tensor() {
    QFETCH(QString, flavour);
    QFETCH(QString, balance);
    ModelConfig cfg = train_test::tiny_config(flavour.toStdString());
    Weights w = init_weights(cfg, 7, 0.4);
    // A non-zero router bias, so that the selection differs from the plain top-k of the scores.
    std::mt19937_64 rng(3);
    for (auto& nt : tensor_table(w, cfg))
        if (nt.name.find("e_score_correction_bias") != std::string::npos)
            for (auto& x : nt.tensor->data) x = float(0.2 * normal01(rng));
    const int B = 2, T = 7;
    std::vector<int> tokens(size_t(B) * T);
    for (auto& t : tokens) t = int(rng() % uint64_t(cfg.vocab_size));
    LossOptions opt;
    opt.mtp_weight = 0.5;
    opt.balance = parse_balance_mode(balance.toStdString());
    opt.alpha = 0.05;  // large, so the balance-loss gradient is visible in the check
    opt.keep_routing_ids = true;
    TrainGraph graph(cfg);
    Weights g = zeros_like(w, cfg);
    const LossResult base = graph.run(w, tokens.data(), B, T, opt, &g);
    QVERIFY(std::isfinite(base.loss));
    auto tw = tensor_table(w, cfg), tg = tensor_table(g, cfg);
    const float eps = qEnvironmentVariableIsSet("GRADCHECK_EPS") ? qEnvironmentVariable("GRADCHECK_EPS").toFloat() : 3e-3f;
    int checked = 0, skipped = 0;
    std::string failures;
    for (size_t i = 0; i < tw.size(); ++i) {
        Tensor& p = *tw[i].tensor;
        if (p.empty()) continue;
        const bool is_bias = tw[i].name.find("e_score_correction_bias") != std::string::npos;
        const int samples = std::min<int64_t>(p.numel(), 10);
        double worst = 0;
        std::string worst_msg;
        for (int s = 0; s < samples; ++s) {
            const int64_t j = int64_t(rng() % uint64_t(p.numel()));
            const float orig = p.data[size_t(j)];
            p.data[size_t(j)] = orig + eps;
            LossResult up = graph.run(w, tokens.data(), B, T, opt, nullptr);
            p.data[size_t(j)] = orig - eps;
            LossResult dn = graph.run(w, tokens.data(), B, T, opt, nullptr);
            p.data[size_t(j)] = orig;
            if (up.routing_ids != base.routing_ids || dn.routing_ids != base.routing_ids) {
                ++skipped;
                continue;
            }
            const double fd = (up.loss - dn.loss) / (2.0 * eps);
            const double an = tg[i].tensor->data[size_t(j)];
            if (is_bias) {
                // The bias only selects experts: with the selection fixed the loss is flat in it.
                QCOMPARE(an, 0.0);
                QVERIFY2(std::fabs(fd) < 1e-4, tw[i].name.c_str());
                continue;
            }
            const double err = std::fabs(fd - an) / std::max(5e-3, std::max(std::fabs(fd), std::fabs(an)));
            if (err > worst) {
                worst = err;
                worst_msg = tw[i].name + "[" + std::to_string(j) + "]: analytic " + std::to_string(an) +
                            ", finite difference " + std::to_string(fd);
            }
            ++checked;
        }
        if (worst >= 3e-2) failures += worst_msg + "\n";
        if (qEnvironmentVariableIsSet("GRADCHECK_VERBOSE")) qInfo("%s %.4g %s", tw[i].name.c_str(), worst, worst_msg.c_str());
    }
    QVERIFY2(failures.empty(), failures.c_str());
    qInfo("checked %d entries, skipped %d (routing flips)", checked, skipped);
    QVERIFY(checked > 100);
}

QTEST_GUILESS_MAIN(TestGradCheck)
#include "test_grad_check.moc"
