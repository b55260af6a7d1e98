// The expert-parallel training path (TrainGraph::set_expert_threads over parallel_tasks of
// ops.h) reproduces the serial expert loop bit for bit: a few optimizer steps of small MoE
// configs with the routed experts run one after the other (BLAS on 1 and on several threads)
// and concurrently on 1, 2 and 4 threads, every loss, gradient norm and parameter (router bias
// included) compared exactly. Also parallel_tasks itself: every task once, BLAS threads restored.
#include <QtTest>

#include <atomic>
#include <cstring>
#include <random>

#include "engine/model/ops.h"
#include "engine/train/trainer.h"
#include "test_train_util.h"

using namespace moescope;

namespace {

// Random tokens with some repetition, so routing is uneven and changes between steps.
std::vector<int> tokens_for(int vocab, size_t n = 4000) {
    std::mt19937_64 rng(11);
    std::vector<int> t;
    while (t.size() < n) {
        const int base = int(rng() % uint64_t(vocab));
        const int len = 1 + int(rng() % 6);
        for (int i = 0; i < len; ++i) t.push_back((base + i * 7) % vocab);
    }
    return t;
}

struct Run {
    std::vector<uint64_t> stats;            // bit patterns of loss, ce, mtp_ce, aux, grad_norm per step
    std::vector<std::vector<float>> params;  // every tensor after the last step
    std::vector<std::string> names;
};

uint64_t bits(double d) {
    uint64_t u;
    std::memcpy(&u, &d, sizeof u);
    return u;
}

Run train(const ModelConfig& cfg, const std::vector<int>& tokens, int blas_threads, int expert_threads) {
    set_num_threads(blas_threads);
    TrainOptions o;
    o.steps = 4;
    o.batch = 4;
    o.seq_len = 24;
    o.grad_accum = 2;
    o.lr = 1e-2;
    o.min_lr = 1e-3;
    o.warmup = 1;
    o.eval_every = 0;
    o.val_fraction = 0.1;
    o.seed = 7;
    o.gamma = 1e-2;
    o.loss.balance = BalanceMode::AuxFree;
    if (!cfg.has_bias()) o.loss.balance = BalanceMode::SeqAux;  // the aux-loss gradient into the router too
    Trainer t(cfg, o, tokens);
    t.set_expert_threads(expert_threads);
    Run r;
    while (!t.done()) {
        const StepStats s = t.step();
        for (double v : {s.loss, s.ce, s.mtp_ce, s.aux, s.grad_norm}) r.stats.push_back(bits(v));
    }
    Weights w = t.weights();
    for (auto& nt : tensor_table(w, cfg)) {
        if (nt.tensor->empty()) continue;
        r.names.push_back(nt.name);
        r.params.push_back(nt.tensor->data);
    }
    return r;
}

// Index of the first float whose bits differ, or -1.
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return 0;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return int64_t(i);
    return -1;
}

}  // namespace

class TestTrainParallel : public QObject {
    Q_OBJECT
private slots:
    void initTestCase() { threads_ = num_threads(); }
    void cleanupTestCase() { set_num_threads(threads_); }
    void parallel_tasks_runs_each_once();
    void experts_parallel_bit_identical_data();
    void experts_parallel_bit_identical();

private:
    int threads_ = 1;
};

void TestTrainParallel::parallel_tasks_runs_each_once() {
    set_num_threads(2);
    const int blas = num_threads();
    for (int threads : {1, 2, 4}) {
        std::vector<std::atomic<int>> hits(37);
        std::atomic<int> blas_inside{0};  // tasks that saw BLAS on more than one thread
        parallel_tasks(37, threads, [&](int i) {
            if (num_threads() != 1) blas_inside.fetch_add(1);
            hits[size_t(i)].fetch_add(1);
        });
        for (size_t i = 0; i < hits.size(); ++i) QCOMPARE(hits[i].load(), 1);
        QCOMPARE(blas_inside.load(), 0);
        QCOMPARE(num_threads(), blas);  // and restored after it
    }
    // A nested call runs inline on the calling task's thread, each index once.
    std::vector<std::atomic<int>> inner(8 * 5);
    parallel_tasks(8, 2, [&](int i) { parallel_tasks(5, 2, [&](int j) { inner[size_t(i * 5 + j)].fetch_add(1); }); });
    for (auto& h : inner) QCOMPARE(h.load(), 1);
}

void TestTrainParallel::experts_parallel_bit_identical_data() {
    QTest::addColumn<QString>("flavour");
    QTest::addColumn<int>("experts");
    QTest::addColumn<int>("top_k");
    QTest::newRow("v3 4 experts top-2") << "v3" << 4 << 2;
    QTest::newRow("v3 16 experts top-3") << "v3" << 16 << 3;
    QTest::newRow("v2 8 experts top-2") << "v2" << 8 << 2;
}

void TestTrainParallel::experts_parallel_bit_identical() {
    QFETCH(QString, flavour);
    QFETCH(int, experts);
    QFETCH(int, top_k);
    ModelConfig cfg = train_test::tiny_config(flavour.toStdString(), 96);
    cfg.n_routed_experts = experts;
    cfg.num_experts_per_tok = top_k;
    const std::vector<int> tokens = tokens_for(cfg.vocab_size);
    // The reference: today's serial loop with single-threaded BLAS.
    const Run ref = train(cfg, tokens, 1, 0);
    QVERIFY(!ref.params.empty());
    struct Case {
        int blas, experts;
        const char* what;
    };
    for (const Case c : {Case{2, 0, "serial, BLAS on 2 threads"}, Case{1, 1, "parallel path on 1 thread"},
                         Case{2, 2, "parallel on 2 threads"}, Case{4, 4, "parallel on 4 threads"},
                         Case{2, 4, "parallel on 4 threads, BLAS 2 outside"}}) {
        const Run r = train(cfg, tokens, c.blas, c.experts);
        QVERIFY2(r.stats == ref.stats, qPrintable(QString("%1: losses / gradient norms differ").arg(c.what)));
        QCOMPARE(r.params.size(), ref.params.size());
        for (size_t i = 0; i < r.params.size(); ++i) {
            const int64_t at = first_difference(r.params[i], ref.params[i]);
            if (at >= 0)
                QFAIL(qPrintable(QString("%1: %2 differs first at element %3 (%4 vs %5)")
                                     .arg(c.what, QString::fromStdString(r.names[i]))
                                     .arg(at)
                                     .arg(double(r.params[i][size_t(at)]), 0, 'g', 9)
                                     .arg(double(ref.params[i][size_t(at)]), 0, 'g', 9)));
        }
    }
}

QTEST_GUILESS_MAIN(TestTrainParallel)
#include "test_train_parallel.moc"
