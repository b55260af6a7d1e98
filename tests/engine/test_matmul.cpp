// The small-T row kernel of ops.cpp (matmul_nt for T <= kSmallT, matmul_nt_rows, dot) and the
// engine thread pool: products against a double-precision reference, and the invariances the
// session relies on (MTP verification of several positions gives the bits of one-token
// decoding): a row's result is the same whatever T, the thread count and the blocking.
#include <QtTest>

#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "engine/model/ops.h"

using namespace moescope;

namespace {

std::vector<float> randv(std::mt19937_64& rng, size_t n) {
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

}  // namespace

class TestMatmul : public QObject {
    Q_OBJECT
private slots:
    void cleanup() {
        set_num_threads(0);
        use_portable_row_kernel(false);
    }
    void matchesReference_data();
    void matchesReference();
    void rowsIndependentOfTAndThreads_data();
    void rowsIndependentOfTAndThreads();
    void dotIsTheRowKernel();
    void parallelRangeCoversEachIndexOnce();
    void poolUnderConcurrentCallers();
    void softmaxFastMatchesSoftmax();
    void matvecTransposed();
    void logSumExp();
};

void TestMatmul::matchesReference_data() {
    QTest::addColumn<int>("T");
    QTest::addColumn<int>("out");
    QTest::addColumn<int>("in");
    QTest::addColumn<bool>("accumulate");
    QTest::addColumn<bool>("portable");
    for (bool portable : {false, true})
        for (int T : {1, 2, 3, 4, 5, 8, 9, 20})
            for (auto [out, in] : {std::pair{7, 1}, std::pair{33, 37}, std::pair{2048, 192}})
                for (bool acc : {false, true})
                    QTest::addRow("%sT%d_%dx%d%s", portable ? "portable_" : "", T, out, in, acc ? "_acc" : "")
                        << T << out << in << acc << portable;
}

// y = x W^T (+ y) within float rounding of the double-precision product.
void TestMatmul::matchesReference() {
    QFETCH(int, T);
    QFETCH(int, out);
    QFETCH(int, in);
    QFETCH(bool, accumulate);
    QFETCH(bool, portable);
    use_portable_row_kernel(portable);
    std::mt19937_64 rng(uint64_t(T * 1000003 + out * 31 + in));
    auto x = randv(rng, size_t(T) * in), W = randv(rng, size_t(out) * in), y0 = randv(rng, size_t(T) * out);
    auto y = y0;
    matmul_nt(y.data(), x.data(), W.data(), T, out, in, accumulate);
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < out; ++o) {
            double s = accumulate ? y0[size_t(t) * out + o] : 0.0, mag = std::fabs(s);
            for (int i = 0; i < in; ++i) {
                s += double(x[size_t(t) * in + i]) * W[size_t(o) * in + i];
                mag += std::fabs(double(x[size_t(t) * in + i]) * W[size_t(o) * in + i]);
            }
            const double got = y[size_t(t) * out + o];
            QVERIFY2(std::fabs(got - s) <= 1e-5 * (mag + 1.0),
                     qPrintable(QString("y[%1, %2] = %3, reference %4").arg(t).arg(o).arg(got).arg(s)));
        }
}

void TestMatmul::rowsIndependentOfTAndThreads_data() {
    QTest::addColumn<int>("out");
    QTest::addColumn<int>("in");
    QTest::addColumn<bool>("portable");
    // Below and above the pool's work threshold; 'in' with and without a 16-lane tail.
    for (bool portable : {false, true}) {
        const char* k = portable ? "portable " : "";
        QTest::addRow("%ssmall 33x37", k) << 33 << 37 << portable;
        QTest::addRow("%so_proj 192x128", k) << 192 << 128 << portable;
        QTest::addRow("%shead 2048x192", k) << 2048 << 192 << portable;
        QTest::addRow("%swide 515x1030", k) << 515 << 1030 << portable;
    }
}

// Each row of a T-row product has the bits of the same row computed alone, on 1 or 3 threads,
// through matmul_nt (T <= kSmallT) and matmul_nt_rows (any T).
void TestMatmul::rowsIndependentOfTAndThreads() {
    QFETCH(int, out);
    QFETCH(int, in);
    QFETCH(bool, portable);
    use_portable_row_kernel(portable);
    std::mt19937_64 rng(7);
    const int Tmax = 12;
    auto x = randv(rng, size_t(Tmax) * in), W = randv(rng, size_t(out) * in), bias = randv(rng, size_t(Tmax) * out);
    set_num_threads(1);
    std::vector<float> single(size_t(Tmax) * out), single_acc = bias;
    for (int t = 0; t < Tmax; ++t) {
        matmul_nt(single.data() + size_t(t) * out, x.data() + size_t(t) * in, W.data(), 1, out, in);
        matmul_nt(single_acc.data() + size_t(t) * out, x.data() + size_t(t) * in, W.data(), 1, out, in, true);
    }
    for (int threads : {1, 2, 3}) {
        set_num_threads(threads);
        for (int T = 1; T <= Tmax; ++T) {
            std::vector<float> y(size_t(T) * out), ya(bias.begin(), bias.begin() + long(T) * out);
            if (T <= kSmallT) {
                matmul_nt(y.data(), x.data(), W.data(), T, out, in);
                QVERIFY2(same_bits(y.data(), single.data(), y.size()),
                         qPrintable(QString("matmul_nt T=%1 threads=%2 differs from T=1").arg(T).arg(threads)));
                matmul_nt(ya.data(), x.data(), W.data(), T, out, in, true);
                QVERIFY2(same_bits(ya.data(), single_acc.data(), ya.size()),
                         qPrintable(QString("accumulating T=%1 threads=%2 differs").arg(T).arg(threads)));
            }
            std::fill(y.begin(), y.end(), 0.0f);
            matmul_nt_rows(y.data(), x.data(), W.data(), T, out, in);
            QVERIFY2(same_bits(y.data(), single.data(), y.size()),
                     qPrintable(QString("matmul_nt_rows T=%1 threads=%2 differs from T=1").arg(T).arg(threads)));
        }
    }
}

void TestMatmul::dotIsTheRowKernel() {
    std::mt19937_64 rng(3);
    for (int n : {1, 15, 16, 17, 64, 100, 512}) {
        auto a = randv(rng, size_t(n)), b = randv(rng, size_t(n));
        float y = 0;
        matmul_nt_rows(&y, a.data(), b.data(), 1, 1, n);
        const float d = dot(a.data(), b.data(), n);
        QVERIFY2(same_bits(&d, &y, 1), qPrintable(QString("n=%1: dot %2, row kernel %3").arg(n).arg(d).arg(y)));
        double s = 0;
        for (int i = 0; i < n; ++i) s += double(a[size_t(i)]) * b[size_t(i)];
        QVERIFY(std::fabs(d - s) < 1e-4 * n);
    }
}

void TestMatmul::parallelRangeCoversEachIndexOnce() {
    for (int threads : {1, 2, 5}) {
        set_num_threads(threads);
        for (int n : {0, 1, 3, 1000}) {
            std::vector<int> hits(size_t(n), 0);
            for (int rep = 0; rep < 50; ++rep)
                parallel_range(n, int64_t(1) << 30, [&](int b, int e) {
                    for (int i = b; i < e; ++i) hits[size_t(i)]++;
                });
            for (int i = 0; i < n; ++i) QCOMPARE(hits[size_t(i)], 50);
        }
    }
}

// Many short jobs from two threads at once (one runs on the pool, the other inline while the
// pool is busy): every index is still visited exactly once per job.
void TestMatmul::poolUnderConcurrentCallers() {
    set_num_threads(3);
    std::atomic<int> bad{0};
    auto caller = [&](int seed) {
        std::vector<int> hits;
        for (int rep = 0; rep < 3000; ++rep) {
            const int n = 1 + (rep * 7 + seed) % 37;
            hits.assign(size_t(n), 0);
            parallel_range(n, int64_t(1) << 30, [&](int b, int e) {
                for (int i = b; i < e; ++i) hits[size_t(i)]++;
            });
            for (int h : hits)
                if (h != 1) bad++;
        }
    };
    std::thread other(caller, 1);
    caller(2);
    other.join();
    QCOMPARE(bad.load(), 0);
}

// The decode attention's softmax (vectorized exp) against softmax_inplace, on both kernels.
void TestMatmul::softmaxFastMatchesSoftmax() {
    std::mt19937_64 rng(5);
    for (bool portable : {false, true}) {
        use_portable_row_kernel(portable);
        for (int n : {1, 7, 16, 33, 512}) {
            for (float scale : {0.1f, 5.0f, 60.0f}) {
                auto x = randv(rng, size_t(n));
                for (auto& v : x) v *= scale;
                auto ref = x;
                softmax_inplace(ref.data(), n);
                softmax_fast(x.data(), n);
                double sum = 0;
                for (int i = 0; i < n; ++i) {
                    sum += x[size_t(i)];
                    QVERIFY2(std::fabs(x[size_t(i)] - ref[size_t(i)]) <= 2e-6f * ref[size_t(i)] + 1e-30f,
                             qPrintable(QString("%1 n=%2 scale=%3: p[%4] = %5, softmax_inplace %6")
                                            .arg(row_kernel_name()).arg(n).arg(scale).arg(i)
                                            .arg(double(x[size_t(i)]), 0, 'g', 9).arg(double(ref[size_t(i)]), 0, 'g', 9)));
                }
                QVERIFY(std::fabs(sum - 1.0) < 1e-5);
            }
        }
    }
}

// matvec_t against a double-precision weighted sum of strided rows, both kernels.
void TestMatmul::matvecTransposed() {
    std::mt19937_64 rng(6);
    for (bool portable : {false, true}) {
        use_portable_row_kernel(portable);
        for (int n : {1, 8, 13, 64, 77})
            for (int rows : {1, 5, 300})
                for (bool acc : {false, true}) {
                    const int64_t ld = n + 3;
                    auto X = randv(rng, size_t(rows) * size_t(ld)), p = randv(rng, size_t(rows)), y = randv(rng, size_t(n));
                    auto y0 = y;
                    matvec_t(y.data(), p.data(), X.data(), rows, n, ld, acc);
                    for (int i = 0; i < n; ++i) {
                        double s = acc ? y0[size_t(i)] : 0.0, mag = std::fabs(s);
                        for (int j = 0; j < rows; ++j) {
                            s += double(p[size_t(j)]) * X[size_t(j * ld + i)];
                            mag += std::fabs(double(p[size_t(j)]) * X[size_t(j * ld + i)]);
                        }
                        QVERIFY2(std::fabs(y[size_t(i)] - s) <= 1e-5 * (mag + 1),
                                 qPrintable(QString("%1 n=%2 rows=%3: y[%4] = %5, reference %6")
                                                .arg(row_kernel_name()).arg(n).arg(rows).arg(i).arg(y[size_t(i)]).arg(s)));
                    }
                }
    }
}

void TestMatmul::logSumExp() {
    std::mt19937_64 rng(8);
    for (bool portable : {false, true}) {
        use_portable_row_kernel(portable);
        for (int n : {1, 5, 16, 2048})
            for (float scale : {0.5f, 20.0f}) {
                auto x = randv(rng, size_t(n));
                for (auto& v : x) v *= scale;
                double m = *std::max_element(x.begin(), x.end()), s = 0;
                for (float v : x) s += std::exp(double(v) - m);
                const double ref = m + std::log(s), got = log_sum_exp(x.data(), n);
                QVERIFY2(std::fabs(got - ref) < 1e-6 * (1 + std::fabs(ref)),
                         qPrintable(QString("%1 n=%2: %3 vs %4").arg(row_kernel_name()).arg(n).arg(got, 0, 'g', 12).arg(ref, 0, 'g', 12)));
            }
    }
}

QTEST_GUILESS_MAIN(TestMatmul)
#include "test_matmul.moc"
