// Expert ablation and held-out perplexity: route() with experts disabled against a brute-force
// router written from the definition, the mask's validity rule against exhaustive enumeration,
// the spec parser, a Session that records the ablation and never routes to a disabled expert,
// evaluate_perplexity against a slower token-by-token decode, and moescope-cli perplexity.
#include <QtTest/QtTest>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>

#include "engine/backend.h"
#include "engine/errors.h"
#include "engine/eval.h"
#include "engine/loader.h"
#include "engine/model/moe.h"
#include "engine/session.h"
#include "engine/telemetry.h"
#include "test_util.h"

using namespace moescope;

namespace {

// The router's selection from its definition (deepseek-v3.md 2.3) with disabled experts removed
// from the choice: every candidate sorted, no incremental top-n. `s` are route()'s scores (the
// scoring is not what is checked here), every sum in the router's float arithmetic.
std::vector<int> brute_route(const float* s, const float* bias, const uint8_t* off, const RouterDims& d) {
    const int E = d.E;
    std::vector<float> choose(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) choose[size_t(e)] = s[e] + (d.use_bias ? bias[e] : 0.0f);
    auto ranked = [](std::vector<int> c, auto key) {
        std::stable_sort(c.begin(), c.end(), [&](int a, int b) { return key(a) > key(b); });
        return c;
    };
    std::vector<int> candidates;
    for (int e = 0; e < E; ++e)
        if (!off[e]) candidates.push_back(e);
    if (d.method != RouterDims::Method::Greedy) {
        const int G = d.n_group, gs = E / G;
        std::vector<float> gscore(static_cast<size_t>(G), -INFINITY);
        for (int g = 0; g < G; ++g) {
            std::vector<float> v;
            for (int e = g * gs; e < (g + 1) * gs; ++e)
                if (!off[e]) v.push_back(choose[size_t(e)]);
            std::sort(v.rbegin(), v.rend());
            const size_t need = d.method == RouterDims::Method::NoAuxTc ? 2 : 1;
            if (v.size() >= need) gscore[size_t(g)] = need == 2 ? v[0] + v[1] : v[0];
        }
        std::vector<int> groups(static_cast<size_t>(G));
        std::iota(groups.begin(), groups.end(), 0);
        groups = ranked(groups, [&](int g) { return gscore[size_t(g)]; });
        groups.resize(size_t(d.topk_group));
        std::erase_if(candidates, [&](int e) { return std::find(groups.begin(), groups.end(), e / gs) == groups.end(); });
    }
    candidates = ranked(candidates, [&](int e) { return choose[size_t(e)]; });
    candidates.resize(std::min(candidates.size(), size_t(d.k)));
    return candidates;
}

ModelConfig config_with(const std::string& method, int E, int k, int groups, int topk_group, bool sigmoid) {
    ModelConfig c = ModelConfig::load(test::tiny_dir());
    c.topk_method = method;
    c.n_routed_experts = E;
    c.num_experts_per_tok = k;
    c.n_group = groups;
    c.topk_group = topk_group;
    c.scoring_func = sigmoid ? "sigmoid" : "softmax";
    return c;
}

// The router of the current data row (routeSkipsDisabledExperts_data's columns).
RouterDims fetched_router() {
    QFETCH(QString, method);
    QFETCH(int, E);
    QFETCH(int, k);
    QFETCH(int, groups);
    QFETCH(int, topkGroup);
    QFETCH(bool, sigmoid);
    return RouterDims(config_with(method.toStdString(), E, k, groups, topkGroup, sigmoid));
}

}  // namespace

class TestAblation : public QObject {
    Q_OBJECT

private slots:
    void routeSkipsDisabledExperts_data() {
        QTest::addColumn<QString>("method");
        QTest::addColumn<int>("E");
        QTest::addColumn<int>("k");
        QTest::addColumn<int>("groups");
        QTest::addColumn<int>("topkGroup");
        QTest::addColumn<bool>("sigmoid");
        QTest::newRow("noaux_tc 16/4 groups") << "noaux_tc" << 16 << 4 << 4 << 2 << true;
        QTest::newRow("noaux_tc V3 256/8 groups") << "noaux_tc" << 256 << 8 << 8 << 4 << true;
        QTest::newRow("group_limited_greedy 64/8 groups") << "group_limited_greedy" << 64 << 6 << 8 << 3 << false;
        QTest::newRow("greedy softmax 64") << "greedy" << 64 << 6 << 1 << 1 << false;
    }
    void routeSkipsDisabledExperts() {
        const RouterDims d = fetched_router();
        const int E = d.E, k = d.k;
        std::mt19937 rng(7);
        std::uniform_real_distribution<float> U(-3, 3);
        int masks = 0;
        for (int trial = 0; trial < 300; ++trial) {
            std::vector<uint8_t> off(static_cast<size_t>(E));
            const unsigned every = 2 + trial % 4;  // a half to a fifth of the experts off
            for (auto& o : off) o = uint8_t(rng() % every == 0);
            try {
                check_disabled_experts(d, off, 1);
            } catch (const Error&) {
                continue;
            }
            ++masks;
            const int T = 5;
            std::vector<float> logits(size_t(T) * E), bias(static_cast<size_t>(E));
            for (auto& v : logits) v = U(rng);
            for (auto& v : bias) v = U(rng) / 10;
            Routing r;
            route(r, logits.data(), T, bias.data(), d, off.data());
            for (int t = 0; t < T; ++t) {
                const std::vector<int> want = brute_route(r.scores.data() + size_t(t) * E, bias.data(), off.data(), d);
                const std::vector<int> got(r.ids.begin() + t * k, r.ids.begin() + (t + 1) * k);
                QCOMPARE(got, want);
                float sum = 0;
                for (int i = 0; i < k; ++i) sum += r.scores[size_t(t) * E + size_t(got[size_t(i)])];
                for (int i = 0; i < k; ++i) {
                    const float s = r.scores[size_t(t) * E + size_t(got[size_t(i)])];
                    const float w = (d.norm_topk_prob && k > 1 ? s / (sum + 1e-20f) : s) * d.routed_scaling_factor;
                    QCOMPARE(r.weights[size_t(t) * k + size_t(i)], w);
                }
            }
        }
        QVERIFY2(masks >= 50, qPrintable(QString("only %1 of 300 random masks were valid").arg(masks)));
        // No expert disabled: the same bits as no mask at all.
        std::vector<float> logits(size_t(9) * E), bias(static_cast<size_t>(E));
        for (auto& v : logits) v = U(rng);
        for (auto& v : bias) v = U(rng) / 10;
        std::vector<uint8_t> none(static_cast<size_t>(E), 0);
        Routing a, b;
        route(a, logits.data(), 9, bias.data(), d, none.data());
        route(b, logits.data(), 9, bias.data(), d);
        QCOMPARE(a.ids, b.ids);
        QCOMPARE(a.weights, b.weights);
        QCOMPARE(a.kept_groups, b.kept_groups);
    }

    // The validity rule against enumeration: a mask is valid exactly when every way the router
    // can keep topk_group groups (any groups whose score is finite, else by index) leaves k
    // enabled experts. 16 experts in 4 groups, every mask with 0-3 experts off per group.
    void maskRuleMatchesEnumeration() {
        for (int k : {2, 4, 5}) {
            for (const char* method : {"noaux_tc", "group_limited_greedy"}) {
                const RouterDims d(config_with(method, 16, k, 4, 2, true));
                const int scored = std::string(method) == "noaux_tc" ? 2 : 1;
                for (int code = 0; code < 1 << 16; code += 37) {
                    std::vector<uint8_t> off(16);
                    for (int e = 0; e < 16; ++e) off[size_t(e)] = uint8_t((code >> e) & 1);
                    std::vector<int> enabled(4);
                    for (int e = 0; e < 16; ++e) enabled[size_t(e / 4)] += !off[size_t(e)];
                    std::vector<int> finite;
                    for (int g = 0; g < 4; ++g)
                        if (enabled[size_t(g)] >= scored) finite.push_back(g);
                    bool valid = finite.size() >= 2;
                    for (size_t i = 0; valid && i < finite.size(); ++i)
                        for (size_t j = i + 1; j < finite.size(); ++j)
                            if (enabled[size_t(finite[i])] + enabled[size_t(finite[j])] < k) valid = false;
                    bool accepted = true;
                    try {
                        check_disabled_experts(d, off, 3);
                    } catch (const Error& e) {
                        accepted = false;
                        QVERIFY2(std::string(e.what()).find("layer 3") != std::string::npos, e.what());
                    }
                    QVERIFY2(accepted == valid, qPrintable(QString("%1 k=%2 mask %3: accepted %4, enumeration says %5")
                                                               .arg(method).arg(k).arg(code).arg(accepted).arg(valid)));
                }
            }
        }
        const RouterDims d(config_with("greedy", 8, 3, 1, 1, false));
        QVERIFY_THROWS_EXCEPTION(Error, check_disabled_experts(d, {1, 1, 1, 1, 1, 1, 0, 0}, 0));
        check_disabled_experts(d, {1, 1, 1, 1, 1, 0, 0, 0}, 0);
        QVERIFY_THROWS_EXCEPTION(ShapeError, check_disabled_experts(d, {1, 0}, 0));
    }

    // Each token's top experts dropped (DeepSeekMoE's other redundancy test): route() against
    // the brute-force router run twice, the second time with the first run's top r off too.
    void routeDropsTopExperts_data() { routeSkipsDisabledExperts_data(); }
    void routeDropsTopExperts() {
        const RouterDims d = fetched_router();
        const int E = d.E, k = d.k;
        std::mt19937 rng(11);
        std::uniform_real_distribution<float> U(-3, 3);
        int runs = 0;
        for (int trial = 0; trial < 120; ++trial) {
            std::vector<uint8_t> off(static_cast<size_t>(E), 0);
            if (trial % 2)  // half with some experts off as well
                for (auto& o : off) o = uint8_t(rng() % 5 == 0);
            const int drop = 1 + trial % k;
            try {
                check_disabled_experts(d, off, 1, drop);
            } catch (const Error&) {
                continue;
            }
            ++runs;
            const int T = 4;
            std::vector<float> logits(size_t(T) * E), bias(static_cast<size_t>(E));
            for (auto& v : logits) v = U(rng);
            if (trial % 3 == 0)  // ties: the lower index decides, in both passes
                for (auto& v : logits) v = std::round(v);
            for (auto& v : bias) v = U(rng) / 10;
            Routing r;
            route(r, logits.data(), T, bias.data(), d, off.data(), drop);
            for (int t = 0; t < T; ++t) {
                const float* s = r.scores.data() + size_t(t) * E;
                const std::vector<int> first = brute_route(s, bias.data(), off.data(), d);
                std::vector<uint8_t> off2 = off;
                for (int i = 0; i < drop; ++i) off2[size_t(first[size_t(i)])] = 1;
                const std::vector<int> want = brute_route(s, bias.data(), off2.data(), d);
                const std::vector<int> got(r.ids.begin() + t * k, r.ids.begin() + (t + 1) * k);
                QCOMPARE(got, want);
                for (int i = 0; i < drop; ++i)  // the dropped experts are gone, whatever their rank
                    QVERIFY(std::find(got.begin(), got.end(), first[size_t(i)]) == got.end());
                float sum = 0;
                for (int i = 0; i < k; ++i) sum += s[got[size_t(i)]];
                for (int i = 0; i < k; ++i) {
                    const float w = (d.norm_topk_prob && k > 1 ? s[got[size_t(i)]] / (sum + 1e-20f) : s[got[size_t(i)]]) *
                                    d.routed_scaling_factor;
                    QCOMPARE(r.weights[size_t(t) * k + size_t(i)], w);
                }
            }
        }
        QVERIFY2(runs >= 40, qPrintable(QString("only %1 of 120 draws were valid").arg(runs)));
    }

    // The rule with drop_top against enumeration: valid exactly when no way of switching off up
    // to r more enabled experts (a token's top r may sit anywhere) leaves a mask the router cannot
    // honour (the enumeration of maskRuleMatchesEnumeration, on the per-group enabled counts).
    void dropRuleMatchesEnumeration() {
        for (int k : {2, 4, 5}) {
            for (const char* method : {"noaux_tc", "group_limited_greedy"}) {
                const RouterDims d(config_with(method, 16, k, 4, 2, true));
                const int scored = std::string(method) == "noaux_tc" ? 2 : 1;
                auto valid_counts = [&](const std::array<int, 4>& n) {
                    std::vector<int> finite;
                    for (int g = 0; g < 4; ++g)
                        if (n[size_t(g)] >= scored) finite.push_back(n[size_t(g)]);
                    bool ok = finite.size() >= 2;
                    for (size_t i = 0; ok && i < finite.size(); ++i)
                        for (size_t j = i + 1; j < finite.size(); ++j)
                            if (finite[i] + finite[j] < k) ok = false;
                    return ok;
                };
                for (int code = 0; code < 1 << 16; code += 97) {
                    std::vector<uint8_t> off(16);
                    std::array<int, 4> n{};
                    for (int e = 0; e < 16; ++e) {
                        off[size_t(e)] = uint8_t((code >> e) & 1);
                        n[size_t(e / 4)] += !off[size_t(e)];
                    }
                    for (int r = 0; r <= k; ++r) {
                        bool valid = true;  // every x (x_g <= n_g, sum <= r) leaves a valid mask
                        for (int x = 0; x < 5 * 5 * 5 * 5 && valid; ++x) {
                            std::array<int, 4> m = n;
                            int used = 0;
                            for (int g = 0, c = x; g < 4; ++g, c /= 5) {
                                m[size_t(g)] -= c % 5;
                                used += c % 5;
                            }
                            if (used > r || *std::min_element(m.begin(), m.end()) < 0) continue;
                            valid = valid_counts(m);
                        }
                        bool accepted = true;
                        try {
                            check_disabled_experts(d, off, 2, r);
                        } catch (const Error& e) {
                            accepted = false;
                            QVERIFY2(std::string(e.what()).find("layer 2") != std::string::npos, e.what());
                        }
                        QVERIFY2(accepted == valid,
                                 qPrintable(QString("%1 k=%2 mask %3 drop %4: accepted %5, enumeration says %6")
                                                .arg(method).arg(k).arg(code).arg(r).arg(accepted).arg(valid)));
                    }
                }
            }
        }
        const RouterDims d(config_with("greedy", 8, 3, 1, 1, false));
        check_disabled_experts(d, {1, 1, 0, 0, 0, 0, 0, 0}, 0, 3);  // 6 enabled, 3 dropped, 3 taken
        QVERIFY_THROWS_EXCEPTION(Error, check_disabled_experts(d, {1, 1, 1, 0, 0, 0, 0, 0}, 0, 3));
        QVERIFY_THROWS_EXCEPTION(Error, check_disabled_experts(d, std::vector<uint8_t>(8, 0), 0, 4));   // > k
        QVERIFY_THROWS_EXCEPTION(Error, check_disabled_experts(d, std::vector<uint8_t>(8, 0), 0, -1));
    }

    void parseSpec_data() {
        QTest::addColumn<QString>("spec");
        QTest::addColumn<QString>("want");   // "layer:ids;..." or "error:<substring>"
        QTest::newRow("one") << "1:3" << "1:3";
        QTest::newRow("list and range") << "2:7,0-2,2" << "2:0,1,2,7";
        QTest::newRow("two layers") << "3:1;1:15" << "1:15;3:1";
        QTest::newRow("every MoE layer") << "*:4-5" << "1:4,5;2:4,5;3:4,5";
        QTest::newRow("MTP module layer") << "4:0" << "4:0";
        QTest::newRow("trailing ;") << "1:2;" << "1:2";
        QTest::newRow("dense layer") << "0:1" << "error:layer 0 is not an MoE layer";
        QTest::newRow("past the layers") << "9:1" << "error:layer 9 is not an MoE layer";
        QTest::newRow("expert out of range") << "1:16" << "error:expert 16 does not exist";
        QTest::newRow("empty range") << "1:5-2" << "error:the range 5-2 is empty";
        QTest::newRow("no colon") << "1,2" << "error:has no ':'";
        QTest::newRow("not a number") << "1:a" << "error:is not LAYER:EXPERTS";
        QTest::newRow("negative") << "1:-1" << "error:is not LAYER:EXPERTS";
        QTest::newRow("huge") << "1:99999999999" << "error:is not LAYER:EXPERTS";
    }
    void parseSpec() {
        QFETCH(QString, spec);
        QFETCH(QString, want);
        const ModelConfig c = ModelConfig::load(test::tiny_dir());
        try {
            const auto got = parse_expert_spec(spec.toStdString(), c);
            QStringList parts;
            for (const auto& [l, ids] : got) {
                QStringList e;
                for (int x : ids) e << QString::number(x);
                parts << QString("%1:%2").arg(l).arg(e.join(','));
            }
            QCOMPARE(parts.join(';'), want);
        } catch (const Error& e) {
            QVERIFY2(want.startsWith("error:"), e.what());
            QVERIFY2(QString(e.what()).contains(want.mid(6)), e.what());
        }
    }

    // A Session with experts disabled: the ablation is recorded, no token is routed to them
    // (prompt, decoding and MTP drafts), and enabling them again restores the original routing.
    void sessionNeverRoutesToDisabled() {
        auto model = load_model(test::tiny_dir());
        auto backend = std::shared_ptr<Backend>(make_cpu_backend(model));
        const std::vector<int> prompt = test::tiny_tokens();
        SamplingParams p;
        p.temperature = 0;
        p.max_tokens = 24;
        p.stop_tokens = {};
        auto run = [&](const std::vector<int>& off, MemorySink& sink) {
            Session s(backend, nullptr, 128);
            s.set_sink(&sink);
            for (int l = 1; l < 4; ++l) s.set_disabled_experts(l, off);
            return s.generate(prompt, p);
        };
        MemorySink base_sink, off_sink, again_sink;
        const GenerationResult base = run({}, base_sink);
        const std::vector<int> off = {0, 5, 10, 15};
        const GenerationResult abl = run(off, off_sink);
        int routes = 0, ablations = 0;
        for (const Record& r : off_sink.snapshot()) {
            if (const auto* a = std::get_if<AblationRecord>(&r)) {
                QCOMPARE(a->disabled, off);
                ++ablations;
            }
            if (const auto* rr = std::get_if<RouteRecord>(&r)) {
                ++routes;
                for (size_t i = 0; i < rr->ids.size(); ++i)
                    if (rr->layers[i / size_t(rr->k)] < 4)
                        QVERIFY2(std::find(off.begin(), off.end(), rr->ids[i]) == off.end(),
                                 qPrintable(QString("position %1 routed to disabled expert %2").arg(rr->position).arg(rr->ids[i])));
            }
        }
        QCOMPARE(ablations, 3);
        QVERIFY(routes >= int(prompt.size()));
        // The baseline does route to those experts (otherwise the check above proves nothing).
        int hits = 0;
        for (const Record& r : base_sink.snapshot())
            if (const auto* rr = std::get_if<RouteRecord>(&r))
                for (int id : rr->ids) hits += std::find(off.begin(), off.end(), id) != off.end();
        QVERIFY(hits > 0);
        // Enabled again (an empty list): bit-identical to the baseline.
        const GenerationResult again = run({}, again_sink);
        QCOMPARE(again.tokens, base.tokens);
        for (int l = 1; l < 4; ++l) QVERIFY(backend->disabled_experts(l).empty());
        Q_UNUSED(abl);
        Session s(backend, nullptr, 64);
        QVERIFY_THROWS_EXCEPTION(Error, s.set_disabled_experts(0, {1}));   // dense layer
        QVERIFY_THROWS_EXCEPTION(Error, s.set_disabled_experts(1, {16}));  // no such expert
        QVERIFY_THROWS_EXCEPTION(Error, s.set_disabled_experts(1, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}));
        QVERIFY(backend->disabled_experts(1).empty());  // a refused mask changes nothing
        // What the getter returns can be set back: a mask, and the empty "none off".
        backend->set_disabled_experts(1, expert_mask({3}, backend->config().n_routed_experts, 1));
        const std::vector<uint8_t> one_off = backend->disabled_experts(1);
        backend->set_disabled_experts(1, one_off);
        QCOMPARE(backend->disabled_experts(1), one_off);
        backend->set_disabled_experts(1, {});
        QVERIFY(backend->disabled_experts(1).empty());
        Session plain(backend, nullptr, 128);  // sets no mask: the backend's empty one is in force
        QCOMPARE(plain.generate(prompt, p).tokens, base.tokens);
    }

    // A Session with each token's top expert dropped in every MoE layer: recorded, and in the
    // first MoE layer (whose input the ablation cannot change) no prompt position takes the
    // expert it ranked first without it; switched back, the routing is the baseline's.
    void sessionDropsTopExperts() {
        auto model = load_model(test::tiny_dir());
        auto backend = std::shared_ptr<Backend>(make_cpu_backend(model));
        const std::vector<int> prompt = test::tiny_tokens();
        const ModelConfig& c = model->config();
        const int first_moe = c.first_k_dense_replace;
        auto run = [&](int drop, MemorySink& sink) {
            Session s(backend, nullptr, 128);
            s.set_sink(&sink);
            for (int l = 0; l < c.num_hidden_layers; ++l)
                if (c.is_moe_layer(l)) s.set_drop_top_experts(l, drop);
            s.append(prompt);
            std::map<int, std::vector<int>> ids;  // position -> the first MoE layer's ids
            for (const Record& r : sink.snapshot())
                if (const auto* rr = std::get_if<RouteRecord>(&r))
                    for (size_t i = 0; i < rr->layers.size(); ++i)
                        if (rr->layers[i] == first_moe)
                            ids[rr->position] = std::vector<int>(rr->ids.begin() + long(i) * rr->k,
                                                                 rr->ids.begin() + long(i + 1) * rr->k);
            return ids;
        };
        MemorySink base_sink, drop_sink, again_sink;
        const auto base = run(0, base_sink);
        const auto dropped = run(1, drop_sink);
        QCOMPARE(int(base.size()), int(prompt.size()));
        QCOMPARE(dropped.size(), base.size());
        for (const auto& [pos, ids] : dropped) {
            const int top = base.at(pos)[0];
            QVERIFY2(std::find(ids.begin(), ids.end(), top) == ids.end(),
                     qPrintable(QString("position %1 still routed to its top expert %2").arg(pos).arg(top)));
        }
        int records = 0;
        for (const Record& r : drop_sink.snapshot())
            if (const auto* a = std::get_if<AblationRecord>(&r)) {
                QCOMPARE(a->drop_top, 1);
                QVERIFY(a->disabled.empty());
                ++records;
            }
        QCOMPARE(records, c.num_moe_layers());
        QCOMPARE(run(0, again_sink), base);
        Session s(backend, nullptr, 64);
        QVERIFY_THROWS_EXCEPTION(Error, s.set_drop_top_experts(first_moe, c.num_experts_per_tok + 1));
        QVERIFY_THROWS_EXCEPTION(Error, s.set_drop_top_experts(0, 1));  // a dense layer
        QCOMPARE(backend->drop_top_experts(first_moe), 0);               // a refusal changes nothing
    }

    // set_ablation is all or nothing, in an order no setter refuses, and a Session records only
    // the layers it changed.
    void setAblationAllOrNothing() {
        auto model = load_model(test::tiny_dir());
        auto backend = std::shared_ptr<Backend>(make_cpu_backend(model));
        const int E = model->config().n_routed_experts;
        Ablation a = current_ablation(*backend);
        QCOMPARE(a.masks.size(), size_t(5));  // 4 layers + the MTP module
        a.masks[1] = expert_mask({0, 1, 4, 5, 8, 9, 12, 13}, E, 1);  // 2 left per group
        a.drop_top[1] = 2;                                           // fine with that mask
        a.masks[2] = expert_mask({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, E, 2);  // 3 left: refused
        QVERIFY_THROWS_EXCEPTION(Error, set_ablation(*backend, a));
        QVERIFY(backend->disabled_experts(1).empty());  // nothing changed
        QCOMPARE(backend->drop_top_experts(1), 0);
        a.masks[2].clear();
        MemorySink sink;
        Session s(backend, nullptr, 64);
        s.set_sink(&sink);
        s.set_ablation(a);
        QCOMPARE(backend->drop_top_experts(1), 2);
        QCOMPARE(backend->disabled_experts(1), a.masks[1]);
        int records = 0;
        for (const Record& r : sink.snapshot())
            if (const auto* x = std::get_if<AblationRecord>(&r)) {
                QCOMPARE(x->layer, 1);
                QCOMPARE(x->drop_top, 2);
                ++records;
            }
        QCOMPARE(records, 1);
        Ablation dense = current_ablation(*backend);
        dense.drop_top[0] = 1;  // layer 0 is dense
        QVERIFY_THROWS_EXCEPTION(Error, set_ablation(*backend, dense));
        set_ablation(*backend, Ablation{});  // all on again
        QVERIFY(backend->disabled_experts(1).empty());
    }

    void ablationRecordRoundTrips() {
        const Record r = AblationRecord{12, 3, {1, 4, 9}, 2};
        const nlohmann::json j = to_json(r);
        QCOMPARE(QString::fromStdString(j["type"].get<std::string>()), QString("ablation"));
        const auto back = std::get<AblationRecord>(record_from_json(j));
        QCOMPARE(back.step, int64_t(12));
        QCOMPARE(back.layer, 3);
        QCOMPARE(back.disabled, (std::vector<int>{1, 4, 9}));
        QCOMPARE(back.drop_top, 2);
        // A trace written before drop_top existed reads as 0.
        QCOMPARE(std::get<AblationRecord>(record_from_json(
                     nlohmann::json{{"type", "ablation"}, {"step", 1}, {"layer", 1}, {"disabled", {2}}})).drop_top, 0);
        QCOMPARE(QString(record_type(r)), QString("ablation"));
    }

    // An evaluation's record carries every run bit for bit (doubles as JSON numbers), through a
    // JSONL file as the app saves and replays it; the optional parts are left out when absent.
    void evaluationRecordRoundTrips() {
        EvaluationRecord e;
        e.step = 7;
        e.corpus = "held out.txt";
        e.context = 512;
        e.text_tokens = 12345;
        e.baseline = {3, 1533, 3.7123456789012345, 1530, 4.1000000000000001};
        e.ablated = true;
        e.with_ablation = {3, 1533, 4.2 + 1e-15, 1530, 4.6};
        e.ablation = "layer 1: 0-7";
        e.hurt = {{42, " the", 17, 1.5, 2.25, 12.75}, {7, "\"\n", 3, 0.1, 0.3, 0.6}};
        e.sweep = {{3, 1533, 3.71, 0, 0}, {3, 1533, 4.1, 0, 0}};
        e.sweep_layers = {1, 3};
        const auto path = std::filesystem::temp_directory_path() / "moescope-evaluation-record.jsonl";
        {
            JsonlWriter w(path);
            w.record(Record(e));
            w.flush();
        }
        const std::vector<Record> back = read_trace(path);
        std::filesystem::remove(path);
        QCOMPARE(int(back.size()), 1);
        QVERIFY(std::get<EvaluationRecord>(back[0]) == e);
        QCOMPARE(QString(record_type(back[0])), QString("evaluation"));
        // No ablation, no sweep: those keys are absent and read back empty.
        EvaluationRecord plain;
        plain.corpus = "a.txt";
        plain.baseline = {1, 10, 2.0, 0, 0};
        const nlohmann::json j = to_json(Record(plain));
        QVERIFY(!j.contains("with_ablation") && !j.contains("sweep") && !j["baseline"].contains("mtp_tokens"));
        QVERIFY(std::get<EvaluationRecord>(record_from_json(j)) == plain);
        // A per-expert sweep keeps its experts and layer.
        EvaluationRecord pe = plain;
        pe.sweep = e.sweep;
        pe.sweep_experts = {4, 9};
        pe.sweep_expert_layer = 2;
        QVERIFY(std::get<EvaluationRecord>(record_from_json(to_json(Record(pe)))) == pe);
        nlohmann::json badx = to_json(Record(pe));
        badx["sweep_experts"] = {4};
        QVERIFY_THROWS_EXCEPTION(FormatError, record_from_json(badx));
        // A per-layer sweep whose layers do not match its runs is refused.
        nlohmann::json bad = to_json(Record(e));
        bad["sweep_layers"] = {1};
        QVERIFY_THROWS_EXCEPTION(FormatError, record_from_json(bad));
    }

    // Expert importance against its definition: each expert of a layer switched off alone on top
    // of the ablation in force (already-off experts skipped), scored like evaluate_perplexity,
    // and the ablation in force put back; stopping early returns the runs so far.
    void expertImportanceMatchesOneByOne() {
        auto model = load_model(test::tiny_dir());
        auto backend = make_cpu_backend(model);
        const int E = model->config().n_routed_experts;
        std::vector<int> ids;
        std::mt19937 rng(11);
        for (int i = 0; i < 150; ++i) ids.push_back(int(rng() % unsigned(model->config().vocab_size)));
        PerplexityOptions o;
        o.context = 48;
        backend->set_disabled_experts(1, expert_mask({3}, E, 1));
        backend->set_disabled_experts(2, expert_mask({6}, E, 2));
        backend->set_drop_top_experts(3, 1);
        const Ablation before = current_ablation(*backend);
        std::vector<int> order;
        const auto points = expert_importance(*backend, ids, o, 2, [&](int e, int done, int total) {
            order.push_back(e);
            return done < total;
        });
        QCOMPARE(int(points.size()), E - 1);  // expert 6 is off already
        QCOMPARE(int(order.size()), E - 1);
        QVERIFY(current_ablation(*backend).masks == before.masks && current_ablation(*backend).drop_top == before.drop_top);
        auto ref = make_cpu_backend(load_model(test::tiny_dir()));  // a model of its own: masks live in the Model
        ref->set_disabled_experts(1, expert_mask({3}, E, 1));
        ref->set_drop_top_experts(3, 1);
        for (const ExpertImportance& p : points) {
            QVERIFY(p.expert != 6);
            ref->set_disabled_experts(2, expert_mask({6, p.expert}, E, 2));
            const PerplexityResult r = evaluate_perplexity(*ref, ids, o);
            QCOMPARE(p.result.cross_entropy, r.cross_entropy);
            QCOMPARE(p.result.mtp_cross_entropy, r.mtp_cross_entropy);
        }
        QVERIFY(points[0].result.cross_entropy != points[1].result.cross_entropy);
        // Stopped after three runs; a dense layer is refused by name.
        const auto three = expert_importance(*backend, ids, o, 1, [](int, int done, int) { return done < 3; });
        QCOMPARE(int(three.size()), 3);
        QVERIFY(current_ablation(*backend).masks == before.masks);
        QVERIFY_THROWS_EXCEPTION(Error, expert_importance(*backend, ids, o, 0));
    }

    // Perplexity over windows against a slower path: every window decoded token by token
    // through the Model's cache, -ln p from a double-precision softmax; MTP module 1 from one
    // forward_mtp call over the decoded hidden states.
    void perplexityMatchesTokenByToken() {
        auto model = load_model(test::tiny_dir());
        auto backend = make_cpu_backend(model);
        const ModelConfig& c = model->config();
        const int V = c.vocab_size;
        std::vector<int> ids;
        std::mt19937 rng(3);
        for (int i = 0; i < 2 * 40 + 7; ++i) ids.push_back(int(rng() % unsigned(V)));
        PerplexityOptions o;
        o.context = 40;
        o.keep_losses = true;
        const PerplexityResult got = evaluate_perplexity(*backend, ids, o);
        QCOMPARE(got.losses.size(), size_t(got.tokens));
        QCOMPARE(got.targets.size(), size_t(got.tokens));
        std::vector<double> slow;  // -ln p of each prediction, token by token
        QCOMPARE(got.windows, 3);  // two full windows and a tail of 7
        QCOMPARE(got.tokens, int64_t(39 + 39 + 6));
        QCOMPARE(got.mtp_tokens, int64_t(38 + 38 + 5));
        auto nll = [&](const float* l, int target) {
            double m = *std::max_element(l, l + V), z = 0;
            for (int v = 0; v < V; ++v) z += std::exp(double(l[v]) - m);
            return std::log(z) + m - double(l[target]);
        };
        double sum = 0, mtp_sum = 0;
        std::vector<std::vector<int64_t>> load(4, std::vector<int64_t>(16, 0));
        for (size_t start = 0; start < ids.size(); start += 40) {
            const int n = int(std::min<size_t>(40, ids.size() - start));
            KvCache cache = model->new_cache();
            std::vector<float> hidden;
            for (int t = 0; t < n; ++t) {
                ForwardResult r;
                model->forward(&ids[start + size_t(t)], 1, cache, ForwardOptions{}, r);
                hidden.insert(hidden.end(), r.hidden.begin(), r.hidden.end());
                if (t + 1 < n) {
                    sum += nll(r.logits.data(), ids[start + size_t(t) + 1]);
                    slow.push_back(nll(r.logits.data(), ids[start + size_t(t) + 1]));
                }
                for (const auto& lr : r.routing)
                    for (int e : lr.r.ids) ++load[size_t(lr.layer)][size_t(e)];
            }
            KvCache mc = model->new_mtp_cache();
            ForwardResult m;
            model->forward_mtp(1, hidden.data(), &ids[start + 1], n - 1, mc, ForwardOptions{}, m);
            for (int i = 0; i + 2 < n; ++i) mtp_sum += nll(m.logits.data() + size_t(i) * V, ids[start + size_t(i) + 2]);
        }
        QVERIFY2(std::abs(got.cross_entropy - sum / 84) < 1e-5,
                 qPrintable(QString("%1 vs %2").arg(got.cross_entropy).arg(sum / 84)));
        QVERIFY2(std::abs(got.mtp_cross_entropy - mtp_sum / 81) < 1e-5,
                 qPrintable(QString("%1 vs %2").arg(got.mtp_cross_entropy).arg(mtp_sum / 81)));
        QCOMPARE(got.perplexity(), std::exp(got.cross_entropy));
        for (size_t i = 0; i < slow.size(); ++i) {  // each prediction's loss, and the token it scored
            QVERIFY2(std::abs(got.losses[i] - slow[i]) < 1e-4, qPrintable(QString("prediction %1: %2 vs %3")
                                                                            .arg(i).arg(got.losses[i]).arg(slow[i])));
            QCOMPARE(got.targets[i], int64_t(i / 39 * 40 + i % 39 + 1));
        }
        for (int l = 1; l < 4; ++l) QCOMPARE(got.loads.at(l), load[size_t(l)]);
        // max_windows, and the refusals.
        o.max_windows = 1;
        QCOMPARE(evaluate_perplexity(*backend, ids, o).tokens, int64_t(39));
        o.context = c.max_position_embeddings + 1;
        QVERIFY_THROWS_EXCEPTION(ContextError, evaluate_perplexity(*backend, ids, o));
        o.context = 40;
        QVERIFY_THROWS_EXCEPTION(Error, evaluate_perplexity(*backend, {1}, o));
        QVERIFY_THROWS_EXCEPTION(Error, evaluate_perplexity(*backend, {1, V}, o));
    }

    // token_impact against a recount from its definition: tokens by total added loss, the
    // minimum count, the cut to `top`, ties to the lower id, and mismatched runs refused.
    void tokenImpactRanksByAddedLoss() {
        const std::vector<int> ids = {9, 5, 7, 5, 9, 5, 7, 2, 5, 9};
        PerplexityResult base, abl;
        for (int64_t i = 1; i < int64_t(ids.size()); ++i) {
            base.targets.push_back(i);
            abl.targets.push_back(i);
            base.losses.push_back(1.0 + 0.25 * double(i));  // binary fractions: every sum exact, ties real
            // token 5 gains 0.5 each (x4), 7 gains 1.5 each (x2), 9 loses 0.25 each (x2), 2 gains 3 (x1)
            const int t = ids[size_t(i)];
            abl.losses.push_back(base.losses.back() + (t == 5 ? 0.5 : t == 7 ? 1.5 : t == 9 ? -0.25 : 3.0));
        }
        auto all = token_impact(ids, base, abl, 1, 0);
        QCOMPARE(int(all.size()), 4);
        QCOMPARE(all[0].token, 2);   // 3.0
        QCOMPARE(all[1].token, 7);   // 3.0 too: a tie keeps the lower id first
        QCOMPARE(all[2].token, 5);   // 2.0
        QCOMPARE(all[3].token, 9);   // -0.5
        QCOMPARE(all[2].count, int64_t(4));
        QVERIFY(std::abs(all[2].added - 2.0) < 1e-12);
        const double mean5 = (1.25 + 1.75 + 2.25 + 3.0) / 4;  // token 5 at positions 1, 3, 5, 8
        QVERIFY(std::abs(all[2].baseline - mean5) < 1e-12);
        QVERIFY(std::abs(all[2].ablated - (mean5 + 0.5)) < 1e-12);
        auto common = token_impact(ids, base, abl, 2, 2);  // token 2 is predicted once
        QCOMPARE(int(common.size()), 2);
        QCOMPARE(common[0].token, 7);
        QCOMPARE(common[1].token, 5);
        abl.targets.pop_back();
        abl.losses.pop_back();
        QVERIFY_THROWS_EXCEPTION(Error, token_impact(ids, base, abl, 1, 0));
    }

    // The commands as a user runs them: perplexity baseline and ablation (JSON and text), experts with
    // the same ablation, a bad spec, a missing corpus.
    void cliPerplexityAndExperts() {
        if (!QFileInfo::exists(test::cli_path())) QFAIL(qPrintable("moescope-cli not built at " + test::cli_path()));
        QTemporaryDir dir;
        const QString corpus = dir.filePath("corpus.txt");
        {
            QFile f(corpus);
            QVERIFY(f.open(QIODevice::WriteOnly));
            for (int i = 0; i < 40; ++i) f.write("the quick brown fox jumps over the lazy dog. ");
        }
        const QString model = QString::fromStdString(test::tiny_dir().string());
        // The corpus as the CLI reads it for tiny-v3 (no tokenizer: a token per byte), with the
        // options it scores with.
        auto byte_ids = [&](const Model& m) {
            QFile cf(corpus);
            std::vector<int> ids;
            if (cf.open(QIODevice::ReadOnly))
                for (char ch : cf.readAll()) ids.push_back(int(static_cast<unsigned char>(ch)) % m.config().vocab_size);
            return ids;
        };
        PerplexityOptions po;
        po.context = 64;
        const test::CliRun r = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64",
                                              "--disable-experts", "1:0-3;2:5", "--backend", "cpu", "--json"});
        QVERIFY2(r.code == 0, r.err.constData());
        const auto j = nlohmann::json::parse(r.out.toStdString());
        QVERIFY(j["tokens"].get<int64_t>() > 100);
        QCOMPARE(j["perplexity"].get<double>(), std::exp(j["cross_entropy"].get<double>()));
        QCOMPARE(j["ablations"].size(), size_t(1));
        const auto& ab = j["ablations"][0];
        QCOMPARE(ab["drop_top"].get<int>(), 0);
        QCOMPARE(ab["disabled"].size(), size_t(2));
        QCOMPARE(ab["disabled"][0]["experts"].get<std::vector<int>>(), (std::vector<int>{0, 1, 2, 3}));
        const double share = ab["disabled"][0]["baseline_share"].get<double>();
        QVERIFY(share > 0 && share < 1);
        QCOMPARE(ab["delta_cross_entropy"].get<double>(),
                 ab["cross_entropy"].get<double>() - j["cross_entropy"].get<double>());
        QVERIFY(ab["cross_entropy"].get<double>() != j["cross_entropy"].get<double>());
        const test::CliRun t = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend", "cpu"});
        QVERIFY2(t.code == 0, t.err.constData());
        QVERIFY2(t.out.contains("perplexity") && t.out.contains("MTP module"), t.out.constData());
        // A sweep over each token's top experts dropped, with fixed experts off in every run.
        const test::CliRun sw = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                               "cpu", "--disable-experts", "1:0", "--drop-top-experts", "1,2", "--json"});
        QVERIFY2(sw.code == 0, sw.err.constData());
        const auto sj = nlohmann::json::parse(sw.out.toStdString());
        QCOMPARE(sj["cross_entropy"].get<double>(), j["cross_entropy"].get<double>());  // the same baseline
        QCOMPARE(sj["ablations"].size(), size_t(2));
        for (int i = 0; i < 2; ++i) {
            const auto& run = sj["ablations"][size_t(i)];
            QCOMPARE(run["drop_top"].get<int>(), i + 1);
            QCOMPARE(run["disabled"][0]["experts"].get<std::vector<int>>(), std::vector<int>{0});
            QVERIFY(run["cross_entropy"].get<double>() != sj["cross_entropy"].get<double>());
        }
        // Each run's most affected tokens, checked against the per-prediction CSV.
        const QString csv = dir.filePath("losses.csv");
        const test::CliRun swt = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                                "cpu", "--drop-top-experts", "1", "--losses-csv", csv, "--json",
                                                "--min-count", "2", "--show-tokens", "5"});
        QVERIFY2(swt.code == 0, swt.err.constData());
        const auto tj = nlohmann::json::parse(swt.out.toStdString());
        QFile cf(csv);
        QVERIFY(cf.open(QIODevice::ReadOnly));
        const QList<QByteArray> lines = cf.readAll().split('\n');
        QCOMPARE(lines[0], QByteArray("index,token,text,baseline,\"top 1 dropped\""));
        std::map<int, std::pair<int, double>> added;  // token -> (count, sum of ablated - baseline)
        int rows = 0;
        for (qsizetype i = 1; i < lines.size(); ++i) {
            const QList<QByteArray> f = lines[i].split(',');
            if (f.size() < 5) continue;
            ++rows;
            auto& [n, sum] = added[f[1].toInt()];
            ++n;
            sum += f.last().toDouble() - f[f.size() - 2].toDouble();
        }
        QCOMPARE(rows, tj["tokens"].get<int>());
        const auto& hurt = tj["ablations"][0]["most_affected"];
        QVERIFY(hurt.size() >= 1 && hurt.size() <= 5);
        for (size_t i = 0; i < hurt.size(); ++i) {
            const auto& [n, sum] = added.at(hurt[i]["token"].get<int>());
            QCOMPARE(hurt[i]["count"].get<int>(), n);
            QVERIFY(n >= 2);
            QVERIFY2(std::abs(hurt[i]["added_nll"].get<double>() - sum) < 1e-4 * n,
                     qPrintable(QString("%1 vs %2").arg(hurt[i]["added_nll"].get<double>()).arg(sum)));
            if (i) QVERIFY(hurt[i]["added_nll"].get<double>() <= hurt[i - 1]["added_nll"].get<double>());
        }
        double best = -1e300;  // the first is the largest of all tokens predicted twice or more
        for (const auto& [t, ns] : added)
            if (ns.first >= 2) best = std::max(best, ns.second);
        QVERIFY(std::abs(hurt[0]["added_nll"].get<double>() - best) < 1e-4 * 64);
        const test::CliRun txt = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                                "cpu", "--drop-top-experts", "1"});
        QVERIFY2(txt.code == 0, txt.err.constData());
        QVERIFY2(txt.out.contains("top 1 dropped") && txt.out.contains("tokens it hurt most"), txt.out.constData());
        const test::CliRun quiet = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                                  "cpu", "--drop-top-experts", "1", "--show-tokens", "0"});
        QVERIFY2(quiet.code == 0 && !quiet.out.contains("tokens it hurt most"), quiet.out.constData());
        // --per-layer: one run per MoE layer, each equal to a backend dropping there alone.
        const test::CliRun pl = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                               "cpu", "--drop-top-experts", "1", "--per-layer", "--json"});
        QVERIFY2(pl.code == 0, pl.err.constData());
        const auto pj = nlohmann::json::parse(pl.out.toStdString());
        QCOMPARE(pj["ablations"].size(), size_t(3));  // MoE layers 1-3 of tiny-v3
        {
            auto m = load_model(test::tiny_dir());
            auto be = make_cpu_backend(m);
            const std::vector<int> ids = byte_ids(*m);
            for (int i = 0; i < 3; ++i) {
                const auto& run = pj["ablations"][size_t(i)];
                QCOMPARE(run["layer"].get<int>(), i + 1);
                for (int l = 1; l <= 3; ++l) be->set_drop_top_experts(l, l == i + 1 ? 1 : 0);
                QCOMPARE(run["cross_entropy"].get<double>(), evaluate_perplexity(*be, ids, po).cross_entropy);
            }
        }
        const test::CliRun many = test::run_cli({"perplexity", model, "--corpus", corpus, "--drop-top-experts", "5"});
        QVERIFY(many.code != 0);
        QVERIFY2(many.err.contains("cannot drop 5 of each token's top experts"), many.err.constData());
        const test::CliRun bad = test::run_cli({"perplexity", model, "--corpus", corpus, "--disable-experts", "0:1"});
        QVERIFY(bad.code != 0);
        QVERIFY2(bad.err.contains("layer 0 is not an MoE layer"), bad.err.constData());
        // `experts` with the same ablation: the switched-off experts take nothing and are named.
        const test::CliRun ex = test::run_cli({"experts", model, "--corpus", corpus, "--disable-experts", "1:0-3",
                                               "--backend", "cpu", "--json"});
        QVERIFY2(ex.code == 0, ex.err.constData());
        const auto ej = nlohmann::json::parse(ex.out.toStdString());
        bool seen = false;
        for (const auto& l : ej["layers"]) {
            if (l["layer"].get<int>() != 1) {
                QVERIFY(!l.contains("disabled"));
                continue;
            }
            seen = true;
            QCOMPARE(l["disabled"].get<std::vector<int>>(), (std::vector<int>{0, 1, 2, 3}));
            for (int e = 0; e < 4; ++e) QCOMPARE(l["experts"][size_t(e)]["slots"].get<int64_t>(), int64_t(0));
            QVERIFY(l["experts"][4]["slots"].get<int64_t>() + l["experts"][9]["slots"].get<int64_t>() > 0);
        }
        QVERIFY(seen);
        const test::CliRun ext = test::run_cli({"experts", model, "--corpus", corpus, "--disable-experts", "1:0-3",
                                                "--backend", "cpu", "--layer", "1"});
        QVERIFY2(ext.code == 0, ext.err.constData());
        QCOMPARE(ext.out.count("(switched off)"), qsizetype(4));
        const test::CliRun missing = test::run_cli({"perplexity", model, "--corpus", dir.filePath("none.txt")});
        QVERIFY(missing.code != 0);
        QVERIFY2(missing.err.contains("none.txt: cannot open the corpus"), missing.err.constData());
        // A generation's trace records both ablations, and `trace` reports them.
        const QString trace = dir.filePath("ablated.jsonl");
        const test::CliRun gen = test::run_cli({"generate", model, "--prompt-tokens", "1,2,3", "--max-tokens", "4",
                                                "--backend", "cpu", "--disable-experts", "1:3", "--drop-top-experts", "1",
                                                "--telemetry", trace, "--quiet"});
        QVERIFY2(gen.code == 0, gen.err.constData());
        const test::CliRun tr = test::run_cli({"trace", trace, "--json"});
        QVERIFY2(tr.code == 0, tr.err.constData());
        const auto trj = nlohmann::json::parse(tr.out.toStdString());
        const auto& abls = trj["ablations"];
        QCOMPARE(abls.size(), size_t(4));  // layer 1's mask, then drop_top in layers 1-3
        QCOMPARE(abls[0]["disabled"].get<std::vector<int>>(), std::vector<int>{3});
        QCOMPARE(abls[1]["layer"].get<int>(), 1);
        QCOMPARE(abls[1]["drop_top"].get<int>(), 1);
        QCOMPARE(abls[1]["disabled"].get<std::vector<int>>(), std::vector<int>{3});
        QCOMPARE(abls[3]["layer"].get<int>(), 3);
        const test::CliRun trt = test::run_cli({"trace", trace});
        QVERIFY2(trt.out.contains("layer 1: experts 3; each token's top 1 dropped"), trt.out.constData());
        // perplexity --telemetry: the meta record, then one evaluation per run with the numbers of
        // the JSON output, the tokens it hurt among them; `trace` summarizes them.
        const QString evtrace = dir.filePath("evaluation.jsonl");
        const test::CliRun pe = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                               "cpu", "--disable-experts", "1:0", "--drop-top-experts", "0,1", "--json",
                                               "--telemetry", evtrace});
        QVERIFY2(pe.code == 0, pe.err.constData());
        const auto pej = nlohmann::json::parse(pe.out.toStdString());
        const std::vector<Record> evrecs = read_trace(evtrace.toStdString());
        QCOMPARE(int(evrecs.size()), 3);
        QVERIFY(std::holds_alternative<MetaRecord>(evrecs[0]));
        for (int i = 0; i < 2; ++i) {
            const auto& e = std::get<EvaluationRecord>(evrecs[size_t(i) + 1]);
            const auto& run = pej["ablations"][size_t(i)];
            QCOMPARE(e.baseline.cross_entropy, pej["cross_entropy"].get<double>());
            QCOMPARE(e.context, 64);
            QVERIFY(e.ablated);
            QCOMPARE(e.with_ablation.cross_entropy, run["cross_entropy"].get<double>());
            QCOMPARE(e.with_ablation.tokens, run["tokens"].get<int64_t>());
            QCOMPARE(QString::fromStdString(e.ablation),
                     i == 0 ? QStringLiteral("layer 1: experts 0") : QStringLiteral("layer 1: experts 0; each token's top 1"));
            QCOMPARE(e.hurt.size(), run["most_affected"].size());
            for (size_t h = 0; h < e.hurt.size(); ++h) {
                QCOMPARE(e.hurt[h].token, run["most_affected"][h]["token"].get<int>());
                QCOMPARE(e.hurt[h].added, run["most_affected"][h]["added_nll"].get<double>());
            }
        }
        const test::CliRun pet = test::run_cli({"trace", evtrace});
        QVERIFY2(pet.code == 0 && pet.out.count("evaluation at step 0 of ") == 2 &&
                     pet.out.contains("off (layer 1: experts 0; each token's top 1): "),
                 pet.out.constData());
        // --per-expert: each expert of layer 2 off alone, with layer 1's expert 0 off in every run;
        // the same numbers as expert_importance on a backend of our own, in the JSON and the trace.
        const QString petrace = dir.filePath("per-expert.jsonl");
        const test::CliRun px = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                               "cpu", "--disable-experts", "1:0", "--per-expert", "2", "--json",
                                               "--telemetry", petrace});
        QVERIFY2(px.code == 0, px.err.constData());
        const auto pxj = nlohmann::json::parse(px.out.toStdString());
        {
            auto m = load_model(test::tiny_dir());
            auto be = make_cpu_backend(m);
            const std::vector<int> ids = byte_ids(*m);
            QCOMPARE(pxj["cross_entropy"].get<double>(), evaluate_perplexity(*be, ids, po).cross_entropy);
            be->set_disabled_experts(1, expert_mask({0}, m->config().n_routed_experts, 1));
            const auto points = expert_importance(*be, ids, po, 2);
            QCOMPARE(pxj["experts"].size(), points.size());
            const auto perec = std::get<EvaluationRecord>(read_trace(petrace.toStdString()).at(1));
            QCOMPARE(perec.sweep_expert_layer, 2);
            for (size_t i = 0; i < points.size(); ++i) {
                QCOMPARE(pxj["experts"][i]["expert"].get<int>(), points[i].expert);
                QCOMPARE(pxj["experts"][i]["cross_entropy"].get<double>(), points[i].result.cross_entropy);
                QCOMPARE(perec.sweep_experts[i], points[i].expert);
                QCOMPARE(perec.sweep[i].cross_entropy, points[i].result.cross_entropy);
            }
        }
        const test::CliRun pxt = test::run_cli({"perplexity", model, "--corpus", corpus, "--context", "64", "--backend",
                                                "cpu", "--per-expert", "1"});
        QVERIFY2(pxt.code == 0 && pxt.out.contains("each routed expert of layer 1 switched off alone"), pxt.out.constData());
        const test::CliRun pxd = test::run_cli({"perplexity", model, "--corpus", corpus, "--per-expert", "0"});
        QVERIFY2(pxd.code != 0 && pxd.err.contains("layer 0 is not an MoE layer"), pxd.err.constData());
        const test::CliRun pxm = test::run_cli({"perplexity", model, "--corpus", corpus, "--per-expert", "1",
                                                "--drop-top-experts", "1"});
        QVERIFY2(pxm.code != 0 && pxm.err.contains("--per-expert goes alone"), pxm.err.constData());
        const test::CliRun folder = test::run_cli({"perplexity", model, "--corpus", dir.path()});
        QVERIFY(folder.code != 0);
        QVERIFY2(folder.err.contains("is a folder, not a text file"), folder.err.constData());
    }
};

QTEST_GUILESS_MAIN(TestAblation)
#include "test_ablation.moc"
