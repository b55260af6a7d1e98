// V3 scale: a synthetic telemetry stream shaped like DeepSeek-V3 (58 MoE layers x 256 experts,
// 8 groups keep 4, top-8; d_c 512, d_rope 64, 61 layers) is ingested and every view is redrawn
// within a frame budget. The measured figures are printed (docs/gui.md quotes them).
#include <QElapsedTimer>
#include <QTableWidget>
#include <QTest>

#include <algorithm>
#include <random>

#include "MainWindow.h"
#include "TelemetryStore.h"
#include "engine/config.h"
#include "views/BiasView.h"
#include "views/ExpertsView.h"
#include "views/LatentView.h"
#include "views/MtpView.h"
#include "views/RoutingView.h"

using namespace moescope;

class TestGuiScale : public QObject {
    Q_OBJECT
private slots:
    void v3StreamAtScale() {
        const ModelConfig cfg = ModelConfig::load(MOESCOPE_FIXTURES "/configs/deepseek-v3.json");
        QCOMPARE(cfg.num_moe_layers(), 58);
        QCOMPARE(cfg.n_routed_experts, 256);
        MainWindow w(false);
        w.resize(1600, 1000);
        w.show();
        QVERIFY(QTest::qWaitForWindowExposed(&w));
        TelemetryStore* st = w.store();
        MetaRecord meta{model_card(cfg).to_json(cfg), cfg.to_json(), {{"source", "synthetic V3 stream"}}};
        st->sink()->record(meta);

        const int E = 256, K = 8, G = 8, KG = 4, L = cfg.num_hidden_layers, P = 512;
        std::vector<int> moe;
        for (int l = 0; l < L; ++l)
            if (cfg.is_moe_layer(l)) moe.push_back(l);
        std::mt19937 rng(7);
        std::vector<float> bias(E, 0.f);
        QElapsedTimer ingest;
        ingest.start();
        for (int p = 0; p < P; ++p) {
            RouteRecord r;
            r.step = p, r.position = p, r.token = p % 200, r.k = K, r.n_group = G, r.E = E, r.layers = moe;
            for (size_t li = 0; li < moe.size(); ++li) {
                std::vector<int> groups(G);
                std::iota(groups.begin(), groups.end(), 0);
                std::shuffle(groups.begin(), groups.end(), rng);
                std::vector<uint8_t> kept(G, 0);
                for (int g = 0; g < KG; ++g) kept[size_t(groups[size_t(g)])] = 1;
                std::vector<int> pool;
                for (int g = 0; g < KG; ++g)
                    for (int e = 0; e < E / G; ++e) pool.push_back(groups[size_t(g)] * (E / G) + e);
                std::shuffle(pool.begin(), pool.end(), rng);
                for (int j = 0; j < K; ++j) {
                    r.ids.push_back(pool[size_t(j)]);
                    r.weights.push_back(2.5f / K);
                }
                r.kept_groups.insert(r.kept_groups.end(), kept.begin(), kept.end());
            }
            st->sink()->record(TokenRecord{p, p, p % 200, "", p < 32, false, 3.0f});
            for (size_t li = 0; li < moe.size(); ++li) {
                LoadRecord ld{p, moe[li], std::vector<int64_t>(E, 0)};
                for (int j = 0; j < K; ++j) ld.counts[size_t(r.ids[li * K + size_t(j)])]++;
                st->sink()->record(ld);
                if (li == 0) {
                    for (int e = 0; e < E; ++e) bias[size_t(e)] += 0.001f * (ld.counts[size_t(e)] ? -1.f : 1.f);
                    st->sink()->record(BiasRecord{p, moe[li], bias});
                }
            }
            st->sink()->record(r);
            LatentRecord lat;
            lat.step = p, lat.position = p, lat.layer = 0;
            lat.norms.assign(size_t(L), 1.0f + float(p % 7));
            lat.c.assign(512, 0.1f * float(p % 5));
            lat.k_pe.assign(64, -0.2f);
            lat.cache_bytes = int64_t(p + 1) * 70272;
            st->sink()->record(lat);
            if (p % 2) st->sink()->record(MtpRecord{p, p, {1}, int(p % 3 != 0), 0.66});
        }
        st->flush();
        // MOESCOPE_V3_TRACE=FILE keeps the stream as a trace (docs/screenshots/v3-routing.png).
        if (qEnvironmentVariableIsSet("MOESCOPE_V3_TRACE")) {
            JsonlWriter jw(qEnvironmentVariable("MOESCOPE_V3_TRACE").toStdString());
            for (const auto& r : st->records()) jw.record(r);
        }
        const double ingestMs = double(ingest.nsecsElapsed()) / 1e6;
        QCOMPARE(st->shape().moeLayers.size(), size_t(58));
        st->select(P / 2);

        auto* routing = qobject_cast<RoutingView*>(w.view("routing"));
        QMap<QString, double> median;
        for (const char* name : {"routing", "latent", "mtp", "bias", "experts"}) {
            PlotView* v = w.view(name);
            w.showView(name);
            QTest::qWait(20);
            std::vector<double> ms;
            for (int i = 0; i < 7; ++i) {
                // The experts view caches its analysis until the records change: time the recount.
                if (auto* ev = qobject_cast<ExpertsView*>(v)) ev->invalidateAnalysis();
                v->refreshNow();
                ms.push_back(v->lastRefreshMs());
            }
            std::sort(ms.begin(), ms.end());
            median[name] = ms[ms.size() / 2];
        }
        QCOMPARE(routing->tokenMapSize(), QSize(256, 58));
        QCOMPARE(routing->sequenceMapSize(), QSize(P, 256));
        QCOMPARE(routing->coactivationSize(), QSize(256, 256));
        // Experts: the layer's 256 experts in the table, every one of the 58 layers in the overview
        // (token ids repeat: 200 ids over 512 positions).
        auto* experts = qobject_cast<ExpertsView*>(w.view("experts"));
        QCOMPARE(experts->table()->rowCount(), 256);
        QCOMPARE(experts->overviewPoints(), 58);
        QCOMPARE(experts->shownLayer()->positions, int64_t(P));
        auto* latent = qobject_cast<LatentView*>(w.view("latent"));
        QCOMPARE(latent->latentMapSize(), QSize(P, 512));
        QCOMPARE(latent->normMapSize(), QSize(P, 61));
        qInfo("V3-scale stream: %d positions x 58 layers x 256 experts; ingest %.1f ms (%.3f ms/token)", P, ingestMs, ingestMs / P);
        for (auto it = median.begin(); it != median.end(); ++it)
            qInfo("redraw %-8s median %.1f ms (rebuild from the store + full replot at 1600x1000)", qPrintable(it.key()), it.value());
        // The frame budget (the store signals at most every 40 ms; a view that redraws slower falls
        // behind the stream) is a measurement, reported here and recorded in docs/gui.md, not an
        // assertion: timings on a shared machine under load are no test.
        for (auto it = median.begin(); it != median.end(); ++it)
            if (it.value() >= 40.0)
                qWarning("redraw %s took %.1f ms, over the store's 40 ms interval", qPrintable(it.key()), it.value());
    }
};

QTEST_MAIN(TestGuiScale)
#include "test_gui_scale.moc"
