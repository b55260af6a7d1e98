// The CPU reference model against the tiny-v3 fixture (an independent float64 implementation,
// tests/fixtures/tiny-v3/README.md): main logits, argmax, routing, the MLA latent, MTP logits
// and routing, the MTP draft; on both MLA paths. Then the model against itself: absorbed MLA
// equals naive MLA, token-by-token through the cache equals one full-sequence pass, and a
// prefill in two chunks equals one.
#include <QtTest/QtTest>

#include <algorithm>
#include <map>

#include "engine/backend.h"
#include "engine/errors.h"
#include "engine/loader.h"
#include "test_util.h"

using namespace moescope;
using nlohmann::json;

class TestFixtureTinyV3 : public QObject {
    Q_OBJECT

    std::shared_ptr<Model> model_;
    json expected_;
    std::vector<int> tokens_;
    int V_ = 0, D_ = 0, T_ = 0;

    // Main model over the whole prompt in one call.
    ForwardResult run_main(bool absorbed, KvCache* cache_out = nullptr) const {
        KvCache cache = model_->new_cache();
        ForwardOptions opt;
        opt.absorbed = absorbed;
        ForwardResult r;
        model_->forward(tokens_.data(), T_, cache, opt, r);
        if (cache_out) *cache_out = std::move(cache);
        return r;
    }

    // MTP module 1 over MTP positions 0..T-2: h_i and the embedding of token i + 1.
    ForwardResult run_mtp(const ForwardResult& main, bool absorbed, KvCache* cache_out = nullptr) const {
        KvCache mc = model_->new_mtp_cache();
        ForwardOptions opt;
        opt.absorbed = absorbed;
        ForwardResult r;
        model_->forward_mtp(1, main.hidden.data(), tokens_.data() + 1, T_ - 1, mc, opt, r);
        if (cache_out) *cache_out = std::move(mc);
        return r;
    }

    static void addPaths() {
        QTest::addColumn<bool>("absorbed");
        QTest::newRow("absorbed MLA") << true;
        QTest::newRow("naive MLA") << false;
    }

    // Checks one token's routing against the fixture: ids as a set, each weight matched to its id.
    static QString routing_mismatch(const Routing& r, int t, const json& ids, const json* weights) {
        std::map<int, float> got;
        for (int i = 0; i < r.k; ++i) got[r.ids[size_t(t * r.k + i)]] = r.weights[size_t(t * r.k + i)];
        if (int(got.size()) != r.k) return QString("duplicate expert id at position %1").arg(t);
        if (int(ids.size()) != r.k) return QString("fixture has %1 ids, engine k = %2").arg(ids.size()).arg(r.k);
        for (size_t i = 0; i < ids.size(); ++i) {
            const int id = ids[i].get<int>();
            auto it = got.find(id);
            if (it == got.end()) {
                QStringList g;
                for (auto& [e, wt] : got) g << QString::number(e);
                return QString("position %1: expected expert %2 among the chosen, got {%3}, expected %4")
                    .arg(t).arg(id).arg(g.join(", "), QString::fromStdString(ids.dump()));
            }
            if (weights) {
                const double want = (*weights)[i].get<double>();
                if (std::fabs(double(it->second) - want) > 1e-5)
                    return QString("position %1 expert %2: weight %3, expected %4 (|diff| %5 > 1e-5)")
                        .arg(t).arg(id).arg(double(it->second), 0, 'g', 9).arg(want, 0, 'g', 9)
                        .arg(std::fabs(double(it->second) - want));
            }
        }
        return {};
    }

private slots:
    void initTestCase() {
        model_ = load_model(test::tiny_dir());
        expected_ = test::read_json_file(test::tiny_dir() / "expected.json");
        tokens_ = test::tiny_tokens();
        T_ = int(tokens_.size());
        V_ = model_->config().vocab_size;
        D_ = model_->config().hidden_size;
        QCOMPARE(T_, 24);
        QCOMPARE(expected_["prompt_tokens"].get<std::vector<int>>(), tokens_);
    }

    // ---- against the fixture ------------------------------------------------------------
    void mainLogits_data() { addPaths(); }
    void mainLogits() {
        QFETCH(bool, absorbed);
        ForwardResult r = run_main(absorbed);
        QCOMPARE(int(r.logits.size()), T_ * V_);
        const auto& ml = expected_["main_logits"];
        const auto positions = ml["positions"].get<std::vector<int>>();
        QCOMPARE(positions, (std::vector<int>{21, 22, 23}));
        for (size_t i = 0; i < positions.size(); ++i) {
            const int p = positions[i];
            std::vector<float> want = test::json_floats(ml["logits"][i]);
            QCOMPARE(int(want.size()), V_);
            MOESCOPE_VERIFY_DIFF(test::compare_arrays("main logits at position " + std::to_string(p),
                                                      r.logits.data() + size_t(p) * V_, want.data(), {V_}, 1e-4));
            qInfo("position %d: max |logit - reference| = %.3g", p,
                  test::max_abs_diff(r.logits.data() + size_t(p) * V_, want.data(), V_));
        }
        const auto argmax = expected_["main_argmax_all_positions"].get<std::vector<int>>();
        QCOMPARE(int(argmax.size()), T_);
        for (int t = 0; t < T_; ++t) {
            const int got = test::argmax(r.logits.data() + size_t(t) * V_, V_);
            QVERIFY2(got == argmax[size_t(t)],
                     qPrintable(QString("argmax at position %1: %2, expected %3").arg(t).arg(got).arg(argmax[size_t(t)])));
        }
    }

    void routing_data() { addPaths(); }
    void routing() {
        QFETCH(bool, absorbed);
        ForwardResult r = run_main(absorbed);
        const auto& layers = expected_["routing"]["layers"];
        QCOMPARE(int(r.routing.size()), 3);
        for (const auto& lr : r.routing) {
            const std::string key = std::to_string(lr.layer);
            QVERIFY2(layers.contains(key), qPrintable(QString("engine routed layer %1, fixture has no such MoE layer").arg(lr.layer)));
            QCOMPARE(lr.r.T, T_);
            QCOMPARE(lr.r.k, 4);
            const auto& ids = layers[key]["topk_ids"];
            const auto& wts = layers[key]["topk_weights"];
            for (int t = 0; t < T_; ++t) {
                const QString m = routing_mismatch(lr.r, t, ids[size_t(t)], &wts[size_t(t)]);
                QVERIFY2(m.isEmpty(), qPrintable(QString("layer %1: %2").arg(lr.layer).arg(m)));
            }
        }
    }

    // The latent of layer 0 at the last position, read back through the backend's cache.
    void mlaLatent_data() { addPaths(); }
    void mlaLatent() {
        QFETCH(bool, absorbed);
        auto backend = make_cpu_backend(model_);
        auto cache = backend->new_cache(0, 64);
        ForwardOptions opt;
        opt.absorbed = absorbed;
        ForwardResult r;
        backend->forward(tokens_.data(), T_, *cache, opt, r);
        QCOMPARE(cache->length(), T_);
        const auto& ex = expected_["mla_latent"];
        QCOMPARE(ex["layer"].get<int>(), 0);
        const int pos = ex["position"].get<int>();
        const int dc = model_->config().kv_lora_rank, dr = model_->config().qk_rope_head_dim;
        std::vector<float> c(static_cast<size_t>(dc)), kpe(static_cast<size_t>(dr));
        cache->read_latent(0, pos, pos + 1, c.data(), kpe.data());
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("layer 0 c_kv at position " + std::to_string(pos), c,
                                                   test::json_floats(ex["c_kv"]), {dc}, 1e-5));
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("layer 0 k_pe at position " + std::to_string(pos), kpe,
                                                   test::json_floats(ex["k_pe"]), {dr}, 1e-5));
    }

    void mtp_data() { addPaths(); }
    void mtp() {
        QFETCH(bool, absorbed);
        ForwardResult main = run_main(absorbed);
        ForwardResult m = run_mtp(main, absorbed);
        const auto& ex = expected_["mtp"];
        const int pos = ex["position"].get<int>();
        QCOMPARE(pos, T_ - 2);
        QCOMPARE(ex["embedding_token"].get<int>(), tokens_[size_t(pos + 1)]);
        QCOMPARE(m.T, T_ - 1);
        MOESCOPE_VERIFY_DIFF(test::compare_arrays("MTP logits at position " + std::to_string(pos),
                                                  m.logits.data() + size_t(pos) * V_,
                                                  test::json_floats(ex["logits"]).data(), {V_}, 1e-4));
        QCOMPARE(int(m.routing.size()), 1);
        QCOMPARE(m.routing[0].layer, ex["layer"].get<int>());
        const auto& ids = ex["routing_topk_ids_positions_0_to_22"];
        QCOMPARE(int(ids.size()), T_ - 1);
        for (int t = 0; t < T_ - 1; ++t) {
            const QString e = routing_mismatch(m.routing[0].r, t, ids[size_t(t)], nullptr);
            QVERIFY2(e.isEmpty(), qPrintable("MTP layer: " + e));
        }
    }

    // The serving case: the greedy token is appended to the main model, and the MTP module
    // drafts at position 23 from h_23 and the embedding of that token.
    void mtpDraft_data() { addPaths(); }
    void mtpDraft() {
        QFETCH(bool, absorbed);
        KvCache cache, mcache;
        ForwardResult main = run_main(absorbed, &cache);
        ForwardResult m = run_mtp(main, absorbed, &mcache);
        const auto& ex = expected_["mtp_draft"];
        const int next = ex["next_token"].get<int>();
        QCOMPARE(test::argmax(main.logits.data() + size_t(T_ - 1) * V_, V_), next);
        ForwardOptions opt;
        opt.absorbed = absorbed;
        ForwardResult step;
        model_->forward(&next, 1, cache, opt, step);
        QCOMPARE(cache.length, T_ + 1);
        ForwardResult draft;
        model_->forward_mtp(1, main.hidden.data() + size_t(T_ - 1) * D_, &next, 1, mcache, opt, draft);
        QCOMPARE(draft.start, ex["position"].get<int>());
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("MTP draft logits at position 23", draft.logits,
                                                   test::json_floats(ex["logits"]), {V_}, 1e-4));
    }

    // ---- the model against itself ---------------------------------------------------------
    // Both MLA paths compute the same attention; only the summation order differs.
    void absorbedEqualsNaive() {
        ForwardResult a = run_main(true), n = run_main(false);
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("main logits absorbed vs naive", a.logits, n.logits, {T_, V_}, 1e-5, 1e-5));
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("final hidden absorbed vs naive", a.hidden, n.hidden, {T_, D_}, 1e-5, 1e-5));
        ForwardResult ma = run_mtp(a, true), mn = run_mtp(n, false);
        MOESCOPE_VERIFY_DIFF(test::compare_vectors("MTP logits absorbed vs naive", ma.logits, mn.logits, {T_ - 1, V_}, 1e-5, 1e-5));
        for (size_t l = 0; l < a.routing.size(); ++l)
            QVERIFY2(a.routing[l].r.ids == n.routing[l].r.ids, qPrintable(QString("layer %1 routing differs").arg(a.routing[l].layer)));
    }

    // Decoding one token at a time through the cache gives the full pass's numbers at every
    // position: the main model and the MTP module (which reads the main model's h_i).
    void tokenByTokenEqualsFull_data() { addPaths(); }
    void tokenByTokenEqualsFull() {
        QFETCH(bool, absorbed);
        KvCache fullCache;
        ForwardResult full = run_main(absorbed, &fullCache);
        ForwardResult fullMtp = run_mtp(full, absorbed);
        KvCache cache = model_->new_cache(), mcache = model_->new_mtp_cache();
        ForwardOptions opt;
        opt.absorbed = absorbed;
        for (int t = 0; t < T_; ++t) {
            ForwardResult step;
            model_->forward(&tokens_[size_t(t)], 1, cache, opt, step);
            QCOMPARE(step.start, t);
            QCOMPARE(int(step.logits.size()), V_);
            MOESCOPE_VERIFY_DIFF(test::compare_arrays("token-by-token main logits at position " + std::to_string(t),
                                                      step.logits.data(), full.logits.data() + size_t(t) * V_, {V_},
                                                      1e-5, 1e-5));
            for (size_t l = 0; l < step.routing.size(); ++l) {
                const auto& fr = full.routing[l].r;
                std::vector<int> want(fr.ids.begin() + t * fr.k, fr.ids.begin() + (t + 1) * fr.k);
                QVERIFY2(step.routing[l].r.ids == want,
                         qPrintable(QString("layer %1 position %2: routing differs from the full pass").arg(step.routing[l].layer).arg(t)));
            }
            if (t >= 1) {  // MTP position t - 1 reads h_{t-1} (full pass) and token t
                ForwardResult ms;
                model_->forward_mtp(1, full.hidden.data() + size_t(t - 1) * D_, &tokens_[size_t(t)], 1, mcache, opt, ms);
                MOESCOPE_VERIFY_DIFF(test::compare_arrays("token-by-token MTP logits at position " + std::to_string(t - 1),
                                                          ms.logits.data(), fullMtp.logits.data() + size_t(t - 1) * V_,
                                                          {V_}, 1e-5, 1e-5));
            }
        }
        QCOMPARE(cache.length, T_);
        QCOMPARE(mcache.length, T_ - 1);
        // The caches hold the same latents.
        for (int l = 0; l < model_->config().num_hidden_layers; ++l)
            MOESCOPE_VERIFY_DIFF(test::compare_vectors("cached c of layer " + std::to_string(l), cache.layers[size_t(l)].c,
                                                       fullCache.layers[size_t(l)].c, {T_, fullCache.d_c}, 1e-5, 1e-5));
    }

    // A prefill split into two chunks (positions 0..9, then 10..23) equals one call.
    void prefillInChunks_data() { addPaths(); }
    void prefillInChunks() {
        QFETCH(bool, absorbed);
        ForwardResult full = run_main(absorbed);
        KvCache cache = model_->new_cache();
        ForwardOptions opt;
        opt.absorbed = absorbed;
        const int split = 10;
        ForwardResult a, b;
        model_->forward(tokens_.data(), split, cache, opt, a);
        model_->forward(tokens_.data() + split, T_ - split, cache, opt, b);
        QCOMPARE(b.start, split);
        MOESCOPE_VERIFY_DIFF(test::compare_arrays("first chunk logits", a.logits.data(), full.logits.data(), {split, V_},
                                                  1e-5, 1e-5));
        MOESCOPE_VERIFY_DIFF(test::compare_arrays("second chunk logits", b.logits.data(),
                                                  full.logits.data() + size_t(split) * V_, {T_ - split, V_}, 1e-5, 1e-5));
        // all_logits = false gives only the last row, equal to the full pass's (a one-row
        // product may take another BLAS kernel, hence the same 1e-5 as above).
        KvCache c2 = model_->new_cache();
        ForwardOptions last = opt;
        last.all_logits = false;
        ForwardResult l;
        model_->forward(tokens_.data(), T_, c2, last, l);
        QCOMPARE(int(l.logits.size()), V_);
        MOESCOPE_VERIFY_DIFF(test::compare_arrays("all_logits=false last row", l.logits.data(),
                                                  full.logits.data() + size_t(T_ - 1) * V_, {V_}, 1e-5, 1e-5));
    }

    // The MTP module in two chunks (over MTP positions 0..11, then 12..22) equals one call.
    void mtpInChunks() {
        ForwardResult full = run_main(true);
        ForwardResult fullMtp = run_mtp(full, true);
        KvCache mc = model_->new_mtp_cache();
        ForwardOptions opt;
        ForwardResult a, b;
        const int split = 12, n = T_ - 1;
        model_->forward_mtp(1, full.hidden.data(), tokens_.data() + 1, split, mc, opt, a);
        model_->forward_mtp(1, full.hidden.data() + size_t(split) * D_, tokens_.data() + 1 + split, n - split, mc, opt, b);
        MOESCOPE_VERIFY_DIFF(test::compare_arrays("MTP chunk 1", a.logits.data(), fullMtp.logits.data(), {split, V_}, 1e-5, 1e-5));
        MOESCOPE_VERIFY_DIFF(test::compare_arrays("MTP chunk 2", b.logits.data(), fullMtp.logits.data() + size_t(split) * V_,
                                                  {n - split, V_}, 1e-5, 1e-5));
    }

    // Past the context or outside the vocabulary: typed errors, no crash.
    void errors() {
        KvCache cache = model_->new_cache();
        ForwardOptions opt;
        ForwardResult r;
        const int bad = V_;
        QVERIFY_THROWS_EXCEPTION(Error, model_->forward(&bad, 1, cache, opt, r));
        std::vector<int> many(size_t(model_->config().max_position_embeddings + 1), 3);
        QVERIFY_THROWS_EXCEPTION(ContextError, model_->forward(many.data(), int(many.size()), cache, opt, r));
        auto backend = make_cpu_backend(model_);
        auto bc = backend->new_cache(0, 8);
        QVERIFY_THROWS_EXCEPTION(ContextError, backend->forward(tokens_.data(), 9, *bc, opt, r));
    }
};

QTEST_GUILESS_MAIN(TestFixtureTinyV3)
#include "test_fixture_tiny_v3.moc"
