// Expert specialization (engine/expert_analysis.h): against a brute-force recount on seeded
// random routing, hand-built cases with known answers (token-determined vs token-independent
// routing, rankings, MTP layers), and a real generation of the tiny-v3 fixture through Session
// (cross-checked against the load records the session computes on its own, and a trace round trip).
#include <QProcess>
#include <QtTest>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "engine/errors.h"
#include "engine/expert_analysis.h"
#include "engine/loader.h"
#include "engine/session.h"

using namespace moescope;

namespace {

// Random top-k routing: distinct expert ids per position, token ids from a Zipf-ish vocabulary.
std::vector<RouteRecord> random_routes(uint32_t seed, int N, int E, int k, const std::vector<int>& layers, int V) {
    std::mt19937 g(seed);
    std::vector<RouteRecord> out;
    std::vector<int> pool(static_cast<size_t>(E));
    for (int p = 0; p < N; ++p) {
        RouteRecord r;
        r.position = p;
        r.step = p;
        // Zipf-like: small ids far more frequent, so the ranking's min_count rule matters.
        r.token = int(std::floor(std::pow(double(g() % 10000) / 10000.0, 3.0) * V));
        r.k = k;
        r.E = E;
        r.layers = layers;
        for (size_t l = 0; l < layers.size(); ++l) {
            std::iota(pool.begin(), pool.end(), 0);
            for (int i = 0; i < k; ++i) {
                std::swap(pool[size_t(i)], pool[size_t(i) + g() % uint32_t(E - i)]);
                r.ids.push_back(pool[size_t(i)]);
                r.weights.push_back(float(g() % 1000) / 1000.0f);
            }
        }
        out.push_back(std::move(r));
    }
    return out;
}

std::vector<const RouteRecord*> ptrs(const std::vector<RouteRecord>& v) {
    std::vector<const RouteRecord*> p;
    for (const auto& r : v) p.push_back(&r);
    return p;
}

// A one-layer record with the given experts.
RouteRecord rec(int position, int token, std::vector<int> ids, int E, int layer = 3, std::vector<float> w = {}) {
    RouteRecord r;
    r.position = position;
    r.token = token;
    r.k = int(ids.size());
    r.E = E;
    r.layers = {layer};
    r.ids = std::move(ids);
    r.weights = w.empty() ? std::vector<float>(r.ids.size(), 0.5f) : std::move(w);
    return r;
}

// The straightforward recount: maps keyed by (layer, expert, token).
struct Brute {
    std::map<int, int64_t> positions;                         // layer -> N
    std::map<std::pair<int, int>, int64_t> ne;                // (layer, e)
    std::map<std::pair<int, int>, double> wsum;
    std::map<std::pair<int, int>, int64_t> occ;               // (layer, t)
    std::map<std::tuple<int, int, int>, int64_t> n;           // (layer, e, t)
};

Brute recount(const std::vector<RouteRecord>& rs) {
    Brute b;
    for (const auto& r : rs)
        for (size_t li = 0; li < r.layers.size(); ++li) {
            const int l = r.layers[li];
            b.positions[l]++;
            b.occ[{l, r.token}]++;
            for (int i = 0; i < r.k; ++i) {
                const int e = r.ids[li * size_t(r.k) + size_t(i)];
                b.ne[{l, e}]++;
                b.wsum[{l, e}] += r.weights[li * size_t(r.k) + size_t(i)];
                b.n[{l, e, r.token}]++;
            }
        }
    return b;
}

double brute_consistency(const Brute& b, int layer, int min_count, int64_t* scored) {
    std::map<int, int64_t> best;
    for (const auto& [key, c] : b.n)
        if (std::get<0>(key) == layer) best[std::get<2>(key)] = std::max(best[std::get<2>(key)], c);
    double sum = 0;
    *scored = 0;
    for (const auto& [t, m] : best) {
        const int64_t o = b.occ.at({layer, t});
        if (o < min_count) continue;
        sum += double(m) / double(o);
        ++*scored;
    }
    return *scored ? sum / double(*scored) : 0.0;
}

}  // namespace

class TestExpertAnalysis : public QObject {
    Q_OBJECT
private slots:
    void bruteForce_data() {
        QTest::addColumn<uint>("seed");
        QTest::addColumn<int>("N");
        QTest::addColumn<int>("E");
        QTest::addColumn<int>("k");
        QTest::addColumn<int>("V");
        QTest::addColumn<int>("rank");
        QTest::addColumn<int>("minCount");
        QTest::newRow("small top-1 count") << 1u << 40 << 4 << 1 << 12 << int(TokenRank::Count) << 2;
        QTest::newRow("tiny-v3 shape p") << 2u << 300 << 16 << 4 << 60 << int(TokenRank::Consistency) << 2;
        QTest::newRow("default-model shape lift") << 3u << 500 << 16 << 2 << 200 << int(TokenRank::Lift) << 3;
        QTest::newRow("V3 shape p") << 4u << 700 << 256 << 8 << 300 << int(TokenRank::Consistency) << 1;
        QTest::newRow("one position") << 5u << 1 << 8 << 2 << 5 << int(TokenRank::Consistency) << 2;
    }
    void bruteForce() {
        QFETCH(uint, seed);
        QFETCH(int, N);
        QFETCH(int, E);
        QFETCH(int, k);
        QFETCH(int, V);
        QFETCH(int, rank);
        QFETCH(int, minCount);
        const std::vector<int> layers = {1, 2, 5};
        auto rs = random_routes(seed, N, E, k, layers, V);
        ExpertOptions opt;
        opt.rank = TokenRank(rank);
        opt.min_count = minCount;
        opt.top = 0;
        ExpertAnalysis a = analyze_experts(ptrs(rs), opt);
        const Brute b = recount(rs);
        QCOMPARE(a.positions, int64_t(N));
        QCOMPARE(int(a.layers.size()), 3);
        for (const auto& L : a.layers) {
            QCOMPARE(L.E, E);
            QCOMPARE(L.k, k);
            QCOMPARE(L.positions, b.positions.at(L.layer));
            QCOMPARE(L.n_slots, int64_t(N) * k);
            double shares = 0;
            for (const auto& ex : L.experts) {
                const auto it = b.ne.find({L.layer, ex.expert});
                const int64_t s = it == b.ne.end() ? 0 : it->second;
                QCOMPARE(ex.n_slots, s);
                shares += ex.share;
                QVERIFY(std::abs(ex.share - double(s) / double(N * k)) < 1e-12);
                if (s) QVERIFY(std::abs(ex.mean_weight - b.wsum.at({L.layer, ex.expert}) / double(s)) < 1e-9);
                int64_t distinct = 0;
                for (const auto& [key, c] : b.n) distinct += std::get<0>(key) == L.layer && std::get<1>(key) == ex.expert;
                QCOMPARE(ex.distinct_tokens, distinct);
                QCOMPARE(int64_t(ex.tokens.size()), distinct);  // top = 0: every token
                for (size_t i = 0; i < ex.tokens.size(); ++i) {
                    const auto& t = ex.tokens[i];
                    QCOMPARE(t.count, b.n.at({L.layer, ex.expert, t.token}));
                    QCOMPARE(t.occurrences, b.occ.at({L.layer, t.token}));
                    QVERIFY(std::abs(t.p - double(t.count) / double(t.occurrences)) < 1e-12);
                    QVERIFY(std::abs(t.lift - t.p / (double(s) / double(N))) < 1e-9);
                    if (i == 0) continue;
                    // The order the ranking promises, checked pairwise.
                    const auto& u = ex.tokens[i - 1];
                    if (opt.rank == TokenRank::Count) {
                        QVERIFY(u.count > t.count || (u.count == t.count && (u.p > t.p || (u.p == t.p && u.token < t.token))));
                    } else {
                        const bool eu = u.occurrences >= minCount, et = t.occurrences >= minCount;
                        QVERIFY(eu || !et);
                        const double ku = opt.rank == TokenRank::Lift ? u.lift : u.p, kt = opt.rank == TokenRank::Lift ? t.lift : t.p;
                        if (eu && et) QVERIFY(ku > kt || (ku == kt && (u.count > t.count || (u.count == t.count && u.token < t.token))));
                        if (!eu && !et) QVERIFY(u.count > t.count || (u.count == t.count && u.token < t.token));
                    }
                }
            }
            QVERIFY(std::abs(shares - 1.0) < 1e-9);
            int64_t scored = 0;
            const double c = brute_consistency(b, L.layer, minCount, &scored);
            QCOMPARE(L.scored_tokens, scored);
            QVERIFY2(std::abs(L.consistency - c) < 1e-12, qPrintable(QString("layer %1: %2 vs %3").arg(L.layer).arg(L.consistency).arg(c)));
            std::set<int> toks;
            for (const auto& r : rs) toks.insert(r.token);
            QCOMPARE(L.distinct_tokens, int64_t(toks.size()));
        }
        // top = N keeps the first N of the full ranking; token_lists off keeps the counts.
        opt.top = 3;
        ExpertAnalysis a3 = analyze_experts(ptrs(rs), opt);
        opt.token_lists = false;
        ExpertAnalysis a0 = analyze_experts(ptrs(rs), opt);
        for (size_t l = 0; l < a.layers.size(); ++l)
            for (int e = 0; e < E; ++e) {
                const auto& full = a.layers[l].experts[size_t(e)].tokens;
                const auto& top = a3.layers[l].experts[size_t(e)].tokens;
                QCOMPARE(top.size(), std::min<size_t>(3, full.size()));
                for (size_t i = 0; i < top.size(); ++i) QCOMPARE(top[i].token, full[i].token);
                QVERIFY(a0.layers[l].experts[size_t(e)].tokens.empty());
                QCOMPARE(a0.layers[l].experts[size_t(e)].n_slots, a.layers[l].experts[size_t(e)].n_slots);
            }
        QCOMPARE(a0.layers[0].consistency, a.layers[0].consistency);
        QCOMPARE(a0.layers[0].chance, a.layers[0].chance);
    }

    // Worked by hand: layer 3, E 4, top-2.
    //   pos token experts weights
    //   0   10    0 1     .6 .4
    //   1   10    0 2     .7 .3
    //   2   20    1 3     .5 .5
    //   3   10    0 1     .8 .2
    //   4   30    2 3     .9 .1
    // slots: e0 3, e1 3, e2 2, e3 2 of 10; mean weight e0 (.6+.7+.8)/3 = .7, e1 (.4+.5+.2)/3,
    // e2 (.3+.9)/2, e3 (.5+.1)/2. n(10) = 3: e0 3 (p 1), e1 2, e2 1. Scored (n >= 2): token 10
    // only, max p = 1 -> consistency 1. Lift of (e0, 10): p 1 / (3/5) = 5/3.
    void handBuilt() {
        std::vector<RouteRecord> rs = {rec(0, 10, {0, 1}, 4, 3, {.6f, .4f}), rec(1, 10, {0, 2}, 4, 3, {.7f, .3f}),
                                       rec(2, 20, {1, 3}, 4, 3, {.5f, .5f}), rec(3, 10, {0, 1}, 4, 3, {.8f, .2f}),
                                       rec(4, 30, {2, 3}, 4, 3, {.9f, .1f})};
        ExpertOptions opt;
        opt.top = 0;
        ExpertAnalysis a = analyze_experts(ptrs(rs), opt);
        QCOMPARE(int(a.layers.size()), 1);
        const LayerExperts& L = *a.layer(3);
        QVERIFY(a.layer(2) == nullptr);
        QCOMPARE(L.positions, int64_t(5));
        QCOMPARE(L.n_slots, int64_t(10));
        QCOMPARE(L.distinct_tokens, int64_t(3));
        QCOMPARE(L.scored_tokens, int64_t(1));
        QCOMPARE(L.consistency, 1.0);
        const int64_t want[4] = {3, 3, 2, 2};
        const double mw[4] = {0.7, 1.1 / 3, 0.6, 0.3};
        for (int e = 0; e < 4; ++e) {
            QCOMPARE(L.experts[size_t(e)].n_slots, want[e]);
            QVERIFY(std::abs(L.experts[size_t(e)].share - want[e] / 10.0) < 1e-12);
            QVERIFY2(std::abs(L.experts[size_t(e)].mean_weight - mw[e]) < 1e-6, qPrintable(QString::number(e)));
        }
        const auto& e0 = L.experts[0].tokens;
        QCOMPARE(e0.size(), size_t(1));
        QCOMPARE(e0[0].token, 10);
        QCOMPARE(e0[0].count, int64_t(3));
        QCOMPARE(e0[0].occurrences, int64_t(3));
        QCOMPARE(e0[0].p, 1.0);
        QVERIFY(std::abs(e0[0].lift - 5.0 / 3.0) < 1e-12);
        // e1 took 10 twice (p 2/3, scored) and 20 once (p 1 but n(t) = 1 < min_count): 10 first.
        const auto& e1 = L.experts[1].tokens;
        QCOMPARE(e1.size(), size_t(2));
        QCOMPARE(e1[0].token, 10);
        QVERIFY(std::abs(e1[0].p - 2.0 / 3.0) < 1e-12);
        QCOMPARE(e1[1].token, 20);
        // With min_count 1 the singleton's p = 1 ranks first.
        opt.min_count = 1;
        ExpertAnalysis b = analyze_experts(ptrs(rs), opt);
        QCOMPARE(b.layer(3)->experts[1].tokens[0].token, 20);
        QCOMPARE(b.layer(3)->scored_tokens, int64_t(3));
        QCOMPARE(b.layer(3)->consistency, 1.0);  // every token's best expert takes all its occurrences
    }

    // A frequent token everywhere and a rare token always on expert 2: counts put the frequent one
    // first on expert 2, p(e|t) and lift the faithful one.
    void rankingKeepsFrequentTokensInTheirPlace() {
        std::vector<RouteRecord> rs;
        int p = 0;
        for (int i = 0; i < 40; ++i) rs.push_back(rec(p++, 1, {i % 4}, 4));   // token 1: evenly everywhere
        for (int i = 0; i < 4; ++i) rs.push_back(rec(p++, 7, {2}, 4));        // token 7: always expert 2
        ExpertOptions opt;
        opt.rank = TokenRank::Count;
        QCOMPARE(analyze_experts(ptrs(rs), opt).layer(3)->experts[2].tokens[0].token, 1);
        opt.rank = TokenRank::Consistency;
        auto a = analyze_experts(ptrs(rs), opt);
        QCOMPARE(a.layer(3)->experts[2].tokens[0].token, 7);
        QCOMPARE(a.layer(3)->experts[2].tokens[0].p, 1.0);
        QCOMPARE(a.layer(3)->experts[2].tokens[1].p, 0.25);
        opt.rank = TokenRank::Lift;
        a = analyze_experts(ptrs(rs), opt);
        QCOMPARE(a.layer(3)->experts[2].tokens[0].token, 7);
        // p(e=2) = 14 / 44; lift of 7 = 1 / (14/44).
        QVERIFY(std::abs(a.layer(3)->experts[2].tokens[0].lift - 44.0 / 14.0) < 1e-12);
        // Consistency: token 1 best share 10/40, token 7 1 -> mean 0.625.
        QVERIFY(std::abs(a.layer(3)->consistency - 0.625) < 1e-12);
    }

    // The summary on routing whose answer is known.
    void specialization_data() {
        QTest::addColumn<bool>("determined");
        QTest::addColumn<int>("E");
        QTest::addColumn<int>("k");
        QTest::newRow("determined top-1") << true << 8 << 1;
        QTest::newRow("determined top-8 of 256") << true << 256 << 8;
        QTest::newRow("independent top-1") << false << 8 << 1;
        QTest::newRow("independent top-2 of 16") << false << 16 << 2;
        QTest::newRow("independent top-8 of 256") << false << 256 << 8;
    }
    void specialization() {
        QFETCH(bool, determined);
        QFETCH(int, E);
        QFETCH(int, k);
        // 50 tokens seen 40 times each, in random order.
        std::mt19937 g(11);
        std::vector<int> tokens;
        for (int t = 0; t < 50; ++t)
            for (int i = 0; i < 40; ++i) tokens.push_back(100 + t);
        std::shuffle(tokens.begin(), tokens.end(), g);
        std::vector<RouteRecord> rs;
        for (size_t p = 0; p < tokens.size(); ++p) {
            std::vector<int> ids;
            if (determined) {
                for (int i = 0; i < k; ++i) ids.push_back((tokens[p] * 7 + i * 3) % E);  // distinct: 3 is odd, E a power of two
            } else {
                std::vector<int> pool(static_cast<size_t>(E));
                std::iota(pool.begin(), pool.end(), 0);
                std::shuffle(pool.begin(), pool.end(), g);
                ids.assign(pool.begin(), pool.begin() + k);
            }
            rs.push_back(rec(int(p), tokens[p], ids, E));
        }
        ExpertAnalysis a = analyze_experts(ptrs(rs), {});
        const LayerExperts& L = *a.layer(3);
        QCOMPARE(L.scored_tokens, int64_t(50));
        qInfo("consistency %.3f chance %.3f specialization %.3f", L.consistency, L.chance, L.specialization);
        if (determined) {
            QCOMPARE(L.consistency, 1.0);
            QVERIFY(L.chance < 0.6);
            QCOMPARE(L.specialization, 1.0);
        } else {
            QVERIFY(L.consistency < 0.6);
            QVERIFY2(std::abs(L.specialization) < 0.05, qPrintable(QString::number(L.specialization)));
            // In the large-sample limit the chance level is near k / E; 40 samples lift it a bit.
            QVERIFY(L.chance >= double(k) / E);
        }
        // Deterministic: same records, same seed, same numbers.
        QCOMPARE(analyze_experts(ptrs(rs), {}).layer(3)->chance, L.chance);
    }

    void mtpLayersAndErrors() {
        // Layers 1, 2 main, 4 the MTP module's (num_hidden_layers 4).
        auto rs = random_routes(9, 30, 8, 2, {1, 2, 4}, 10);
        ExpertOptions opt;
        opt.num_hidden_layers = 4;
        ExpertAnalysis a = analyze_experts(ptrs(rs), opt);
        QCOMPARE(int(a.layers.size()), 2);
        QCOMPARE(a.mtp_layers, std::vector<int>{4});
        opt.layers = {2};
        a = analyze_experts(ptrs(rs), opt);
        QCOMPARE(int(a.layers.size()), 1);
        QCOMPARE(a.layers[0].layer, 2);
        opt.layers = {4};
        try {
            analyze_experts(ptrs(rs), opt);
            QFAIL("an MTP layer was analyzed");
        } catch (const ConfigError& e) {
            QVERIFY2(QString(e.what()).contains("MTP"), e.what());
        }
        opt.layers = {3};
        try {
            analyze_experts(ptrs(rs), opt);
            QFAIL("a layer without routing was analyzed");
        } catch (const ConfigError& e) {
            QVERIFY2(QString(e.what()).contains("layer 3") && QString(e.what()).contains("1, 2"), e.what());
        }
        // Trace meta gives num_hidden_layers.
        std::vector<Record> recs;
        recs.push_back(MetaRecord{{}, {{"num_hidden_layers", 4}}, {}});
        for (const auto& r : rs) recs.push_back(r);
        QCOMPARE(analyze_experts(recs, ExpertOptions{}).mtp_layers, std::vector<int>{4});
        // Malformed records name the position.
        RouteRecord bad = rec(17, 1, {0, 9}, 4);
        QVERIFY_THROWS_EXCEPTION(FormatError, analyze_experts(std::vector<const RouteRecord*>{&bad}, {}));
        bad = rec(17, 1, {0, 1}, 4);
        bad.ids.pop_back();
        QVERIFY_THROWS_EXCEPTION(FormatError, analyze_experts(std::vector<const RouteRecord*>{&bad}, {}));
        QVERIFY_THROWS_EXCEPTION(ConfigError, token_rank_from_string("often"));
        QCOMPARE(token_rank_from_string(token_rank_name(TokenRank::Lift)), TokenRank::Lift);
        // No records: no layers, no error.
        QVERIFY(analyze_experts(std::vector<const RouteRecord*>{}, {}).layers.empty());
    }

    void quoting_data() {
        QTest::addColumn<QByteArray>("text");
        QTest::addColumn<QByteArray>("quoted");
        QTest::newRow("word") << QByteArray("cat") << QByteArray("\"cat\"");
        QTest::newRow("leading space") << QByteArray(" the") << QByteArray("\" the\"");
        QTest::newRow("newline") << QByteArray("\n") << QByteArray("\"\\n\"");
        QTest::newRow("tab quote backslash") << QByteArray("\t\"\\") << QByteArray("\"\\t\\\"\\\\\"");
        QTest::newRow("control") << QByteArray("\x01") << QByteArray("\"\\x01\"");
        QTest::newRow("utf-8 kept") << QByteArray("\xc3\xa9t\xc3\xa9") << QByteArray("\"\xc3\xa9t\xc3\xa9\"");
        QTest::newRow("empty") << QByteArray("") << QByteArray("\"\"");
    }
    void quoting() {
        QFETCH(QByteArray, text);
        QFETCH(QByteArray, quoted);
        QCOMPARE(QByteArray::fromStdString(quote_token(text.toStdString())), quoted);
    }

    // A real generation: the analysis agrees with a recount of the records, with the load records
    // the session computes itself, and survives a JSONL round trip.
    void tinyV3Session() {
        auto model = load_model(MOESCOPE_FIXTURES "/tiny-v3");
        const ModelConfig& cfg = model->config();
        Session s(make_cpu_backend(model));
        MemorySink sink;
        s.set_sink(&sink);
        std::vector<int> prompt;
        for (int i = 0; i < 24; ++i) prompt.push_back((i * 37) % 13 + 5);  // repeats, so tokens are scored
        SamplingParams p;
        p.temperature = 0;
        p.max_tokens = 24;
        s.generate(prompt, p);
        std::vector<Record> recs = sink.take();
        std::vector<RouteRecord> routes;
        std::map<int, std::vector<int64_t>> load;
        for (const auto& r : recs) {
            if (auto* x = std::get_if<RouteRecord>(&r)) routes.push_back(*x);
            if (auto* x = std::get_if<LoadRecord>(&r)) {
                auto& v = load[x->layer];
                v.resize(x->counts.size());
                for (size_t e = 0; e < v.size(); ++e) v[e] += x->counts[e];
            }
        }
        QVERIFY(routes.size() >= prompt.size());
        ExpertOptions opt;
        opt.num_hidden_layers = cfg.num_hidden_layers;
        opt.top = 0;
        ExpertAnalysis a = analyze_experts(recs, opt);
        QCOMPARE(a.positions, int64_t(routes.size()));
        QCOMPARE(int(a.layers.size()), cfg.num_moe_layers());
        const Brute b = recount(routes);
        for (const auto& L : a.layers) {
            QVERIFY(cfg.is_moe_layer(L.layer));
            QCOMPARE(L.E, cfg.n_routed_experts);
            QCOMPARE(L.k, cfg.num_experts_per_tok);
            for (const auto& ex : L.experts) {
                QCOMPARE(ex.n_slots, load.at(L.layer)[size_t(ex.expert)]);
                for (const auto& t : ex.tokens) QCOMPARE(t.count, b.n.at({L.layer, ex.expert, t.token}));
                if (ex.n_slots) QVERIFY(ex.mean_weight > 0);
            }
            int64_t scored = 0;
            QVERIFY(std::abs(L.consistency - brute_consistency(b, L.layer, opt.min_count, &scored)) < 1e-12);
            QCOMPARE(L.scored_tokens, scored);
            QVERIFY(scored > 0);
            QVERIFY(L.consistency > 0 && L.consistency <= 1.0);
        }
        // Trace round trip: the same analysis from the JSONL file.
        const auto path = std::filesystem::temp_directory_path() / "moescope-test-experts.jsonl";
        {
            JsonlWriter w(path);
            w.record(MetaRecord{{}, cfg.to_json(), {}});
            for (const auto& r : recs) w.record(r);
        }
        ExpertOptions all;
        all.top = 0;
        ExpertAnalysis c = analyze_experts(read_trace(path), all);
        std::filesystem::remove(path);
        QCOMPARE(to_json(c).dump(), to_json(a).dump());
    }
    // `moescope-cli experts` on the fixture: --json equals the engine function on the trace it
    // wrote; errors name the file or the field and exit non-zero.
    void cli() {
        const QString exe = QStringLiteral(MOESCOPE_BINARY_DIR "/engine/moescope-cli");
        if (!QFile::exists(exe)) QSKIP("moescope-cli is not built");
        const auto dir = std::filesystem::temp_directory_path() / "moescope-test-experts-cli";
        std::filesystem::create_directories(dir);
        const QString trace = QString::fromStdString((dir / "t.jsonl").string());
        const QString csv = QString::fromStdString((dir / "t.csv").string());
        auto run = [&](const QStringList& args, QByteArray* out, QByteArray* err) {
            QProcess p;
            p.start(exe, QStringList{"experts"} + args);
            if (!p.waitForFinished(60000)) return -1;
            *out = p.readAllStandardOutput();
            *err = p.readAllStandardError();
            return p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
        };
        QByteArray out, err;
        QCOMPARE(run({MOESCOPE_FIXTURES "/tiny-v3", "--text", "the cat and the hat and the bat", "--chunk", "12", "--top",
                      "3", "--json", "--telemetry", trace, "--csv", csv},
                     &out, &err),
                 0);
        const auto j = nlohmann::json::parse(out.toStdString());
        ExpertOptions opt;
        opt.top = 3;
        const std::vector<Record> recs = read_trace(trace.toStdString());
        std::map<int, std::string> bytes;  // without tokenizer.json the ids are the text's bytes
        for (int i = 0; i < 256; ++i) bytes[i] = std::string(1, char(i));
        nlohmann::json want = to_json(analyze_experts(recs, opt), bytes);
        QCOMPARE(j["positions"].get<int>(), 31);  // 31 bytes, no tokenizer in the fixture
        QCOMPARE(j["layers"].dump(), want["layers"].dump());
        QCOMPARE(j["rank"].get<std::string>(), std::string("p"));
        // The CSV: a header and one row per (expert, ranked token) or per expert without tokens.
        QFile f(csv);
        QVERIFY(f.open(QIODevice::ReadOnly));
        const QList<QByteArray> lines = f.readAll().split('\n');
        QVERIFY(lines[0].startsWith("layer,expert,slots,share,mean_weight,rank,token,text,count"));
        int rows = 0;
        for (const auto& l : want["layers"])
            for (const auto& e : l["experts"]) rows += std::max<int>(1, int(e["tokens"].size()));
        QCOMPARE(int(lines.size()) - 2, rows);  // header + rows + the empty piece after the last newline
        // The human table names each layer; ids without a text in the trace show as #id.
        QCOMPARE(run({trace, "--layer", "2", "--top", "2"}, &out, &err), 0);
        QVERIFY2(out.contains("layer 2: 16 experts, top-4") && out.contains(" ×") && out.contains("#"), out.constData());
        QVERIFY(!out.contains("layer 1:"));
        // Errors.
        QVERIFY(run({trace, "--layer", "9"}, &out, &err) != 0);
        QVERIFY2(err.contains("layer 9") && err.contains("t.jsonl"), err.constData());
        QVERIFY(run({QString::fromStdString((dir / "missing.jsonl").string())}, &out, &err) != 0);
        QVERIFY2(err.contains("missing.jsonl"), err.constData());
        {
            JsonlWriter w(dir / "noroute.jsonl");
            w.record(TokenRecord{0, 0, 5, "x", true, false, 0.f});
        }
        QVERIFY(run({QString::fromStdString((dir / "noroute.jsonl").string())}, &out, &err) != 0);
        QVERIFY2(err.contains("noroute.jsonl") && err.contains("route"), err.constData());
        QVERIFY(run({MOESCOPE_FIXTURES "/tiny-v3"}, &out, &err) != 0);
        QVERIFY2(err.contains("--corpus") && err.contains("--text"), err.constData());
        std::filesystem::remove_all(dir);
    }
};

QTEST_GUILESS_MAIN(TestExpertAnalysis)
#include "test_expert_analysis.moc"
