// Shared helpers of the engine test suites: array comparison that reports the op, the shape
// and the worst index on failure, and access to the tiny-v3 fixture.
#pragma once
#include <QProcess>
#include <QtTest/QtTest>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moescope::test {

inline std::string shape_string(const std::vector<int64_t>& shape) {
    std::ostringstream o;
    o << "[";
    for (size_t i = 0; i < shape.size(); ++i) o << (i ? ", " : "") << shape[i];
    o << "]";
    return o.str();
}

// The flat index i of an array of `shape` as a multi-index "[a, b, c]".
inline std::string index_string(int64_t i, const std::vector<int64_t>& shape) {
    if (shape.empty()) return shape_string({i});
    std::vector<int64_t> idx(shape.size());
    for (size_t d = shape.size(); d-- > 0;) {
        const int64_t n = shape[d] > 0 ? shape[d] : 1;
        idx[d] = i % n;
        i /= n;
    }
    return shape_string(idx);
}

struct ArrayDiff {
    bool ok = true;
    double max_abs = 0;        // largest |got - want|
    int64_t worst = -1;        // flat index of the largest violation (or of the largest error)
    int64_t violations = 0;    // elements outside the tolerance (NaN mismatches included)
    std::string message;       // what went wrong, for QVERIFY2
};

// Compares got[i] with want[i] for every element of `shape`: |got - want| <= atol + rtol*|want|.
// NaN must appear in the same places in both arrays (an unexpected NaN is a violation).
template <class A, class B>
ArrayDiff compare_arrays(const std::string& op, const A* got, const B* want, const std::vector<int64_t>& shape,
                         double atol, double rtol = 0.0) {
    ArrayDiff d;
    int64_t n = 1;
    for (auto s : shape) n *= s;
    double worst_excess = -1;
    for (int64_t i = 0; i < n; ++i) {
        const double g = double(got[i]), w = double(want[i]);
        double err, excess;
        if (std::isnan(g) || std::isnan(w)) {
            if (std::isnan(g) && std::isnan(w)) continue;
            err = INFINITY;
            excess = INFINITY;
        } else {
            err = std::fabs(g - w);
            if (std::isinf(g) || std::isinf(w)) err = g == w ? 0.0 : INFINITY;
            excess = err - (atol + rtol * std::fabs(w));
        }
        if (err > d.max_abs) d.max_abs = err;
        if (excess > 0) {
            ++d.violations;
            if (excess > worst_excess) {
                worst_excess = excess;
                d.worst = i;
            }
        }
    }
    if (d.violations > 0) {
        d.ok = false;
        std::ostringstream o;
        o.precision(9);
        o << op << ": shape " << shape_string(shape) << ", " << d.violations << " of " << n
          << " elements outside atol " << atol << " + rtol " << rtol << "; worst at " << index_string(d.worst, shape)
          << " (flat " << d.worst << "): got " << double(got[d.worst]) << ", expected " << double(want[d.worst])
          << "; max |diff| " << d.max_abs;
        d.message = o.str();
    }
    return d;
}

template <class A, class B, class AllocA, class AllocB>
ArrayDiff compare_vectors(const std::string& op, const std::vector<A, AllocA>& got, const std::vector<B, AllocB>& want,
                          const std::vector<int64_t>& shape, double atol, double rtol = 0.0) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    if (int64_t(got.size()) < n || int64_t(want.size()) < n) {
        ArrayDiff d;
        d.ok = false;
        d.message = op + ": shape " + shape_string(shape) + " needs " + std::to_string(n) + " elements, got " +
                    std::to_string(got.size()) + " and expected " + std::to_string(want.size());
        return d;
    }
    return compare_arrays(op, got.data(), want.data(), shape, atol, rtol);
}

// The largest |a - b| over n elements (for reporting measured errors).
template <class A, class B>
double max_abs_diff(const A* a, const B* b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
    return m;
}

inline nlohmann::json read_json_file(const std::filesystem::path& p) {
    std::ifstream in(p);
    if (!in) throw std::runtime_error(p.string() + ": cannot open");
    std::stringstream ss;
    ss << in.rdbuf();
    return nlohmann::json::parse(ss.str());
}

// moescope-cli run as a user runs it (a minute at most).
inline QString cli_path() { return QStringLiteral(MOESCOPE_BINARY_DIR "/engine/moescope-cli"); }

struct CliRun {
    int code = -1;
    QByteArray out, err;
};

inline CliRun run_cli(const QStringList& args) {
    QProcess p;
    p.start(cli_path(), args);
    CliRun r;
    if (!p.waitForFinished(60000)) {
        p.kill();
        p.waitForFinished();
        r.err = "timed out";
        return r;
    }
    r.code = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
    r.out = p.readAllStandardOutput();
    r.err = p.readAllStandardError();
    return r;
}

inline std::filesystem::path tiny_dir() { return std::filesystem::path(MOESCOPE_FIXTURES) / "tiny-v3"; }

inline std::vector<int> tiny_tokens() {
    std::ifstream in(tiny_dir() / "prompt_tokens.txt");
    std::vector<int> out;
    std::string item;
    while (std::getline(in, item, ','))
        if (!item.empty() && item.find_first_not_of(" \r\n\t") != std::string::npos) out.push_back(std::stoi(item));
    return out;
}

inline std::vector<float> json_floats(const nlohmann::json& j) {
    std::vector<float> out;
    for (const auto& v : j) out.push_back(v.get<float>());
    return out;
}

inline int argmax(const float* x, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i)
        if (x[i] > x[best]) best = i;
    return best;
}

}  // namespace moescope::test

// QVERIFY2 on an ArrayDiff, printing the op, the shape and the worst index.
#define MOESCOPE_VERIFY_DIFF(expr)                                 \
    do {                                                           \
        const ::moescope::test::ArrayDiff moescope_d_ = (expr);    \
        QVERIFY2(moescope_d_.ok, moescope_d_.message.c_str());     \
    } while (0)

// QVERIFY that `stmt` throws `Type` whose message contains every one of `needles`
// (a std::vector<std::string>, braces allowed); prints the message when it does not.
#define MOESCOPE_VERIFY_THROWS_WITH(stmt, Type, ...)                                                        \
    do {                                                                                                        \
        bool moescope_thrown_ = false;                                                                          \
        std::string moescope_msg_;                                                                              \
        try {                                                                                                   \
            stmt;                                                                                               \
        } catch (const Type& e) {                                                                               \
            moescope_thrown_ = true;                                                                            \
            moescope_msg_ = e.what();                                                                           \
        } catch (const std::exception& e) {                                                                     \
            QFAIL(qPrintable(QStringLiteral("expected " #Type ", got another exception: ") + e.what()));       \
        }                                                                                                       \
        QVERIFY2(moescope_thrown_, "expected " #Type ", nothing was thrown");                                   \
        for (const std::string& moescope_n_ : std::vector<std::string>(__VA_ARGS__))                                                        \
            QVERIFY2(moescope_msg_.find(moescope_n_) != std::string::npos,                                      \
                     qPrintable(QStringLiteral("message '%1' lacks '%2'")                                       \
                                    .arg(QString::fromStdString(moescope_msg_), QString::fromStdString(moescope_n_)))); \
    } while (0)
