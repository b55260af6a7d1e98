// The Experts view on the tiny-v3 fixture (no tokenizer: prompts are token ids): it follows the
// chat live, its table and bars say what engine/expert_analysis.h computes on the store's
// route records, layer / ranking / row choices redraw it, and a click on a token bar selects a
// position where the expert took the token.
#include <QComboBox>
#include <QTableWidget>

#include "engine/expert_analysis.h"
#include "gui_test_util.h"
#include "views/ExpertsView.h"

using namespace moescope;

class TestGuiExperts : public QObject {
    Q_OBJECT
    MainWindow* w = nullptr;
    ExpertsView* view() { return qobject_cast<ExpertsView*>(w->view("experts")); }

    // The engine's answer for the store's records, with the view's options.
    LayerExperts expected(int layer, TokenRank rank) {
        std::vector<const RouteRecord*> recs;
        for (const auto& [p, r] : w->store()->routes()) recs.push_back(&r);
        ExpertOptions o;
        o.layers = {layer};
        o.top = ExpertsView::kTopTokens;
        o.rank = rank;
        o.num_hidden_layers = w->store()->shape().numLayers;
        return analyze_experts(recs, o).layers.at(0);
    }
    static QString pct(double x, int d) { return QString::number(100.0 * x, 'f', d) + "%"; }

private slots:
    void initTestCase() {
        w = fixtureWindow();
        QVERIFY(w);
        w->chat()->setStopAtEos(false);
        QVERIFY(view());
        QVERIFY(w->showView("experts"));
    }
    void cleanupTestCase() { delete w; }

    // Generating with the view on screen updates it without a manual refresh.
    void followsTheChatLive() {
        QVERIFY(view()->isOnScreen());
        QVERIFY(generateOnce(*w, QStringLiteral("5, 17, 42, 5, 17, 42, 5, 17, 9, 9, 9"), 24));
        QTRY_VERIFY(view()->shownLayer() != nullptr);
        QTRY_COMPARE(view()->shownLayer()->positions, int64_t(w->store()->routes().size()));
        QCOMPARE(view()->layer(), w->store()->shape().moeLayers.front());
        QVERIFY(generateOnce(*w, QStringLiteral("42, 42, 17"), 12));
        QTRY_COMPARE(view()->shownLayer()->positions, int64_t(w->store()->routes().size()));
    }

    void tableMatchesEngine_data() {
        QTest::addColumn<int>("rank");
        QTest::newRow("p(e|t)") << int(TokenRank::Consistency);
        QTest::newRow("count") << int(TokenRank::Count);
        QTest::newRow("lift") << int(TokenRank::Lift);
    }
    void tableMatchesEngine() {
        QFETCH(int, rank);
        ExpertsView* v = view();
        v->setRank(TokenRank(rank));
        for (int layer : w->store()->shape().moeLayers) {
            v->setLayer(layer);
            v->refreshNow();
            QCOMPARE(v->layer(), layer);
            const LayerExperts want = expected(layer, TokenRank(rank));
            QTableWidget* t = v->table();
            QCOMPARE(t->rowCount(), 16);
            for (int e = 0; e < 16; ++e) {
                const ExpertStats& ex = want.experts[size_t(e)];
                QCOMPARE(t->item(e, 0)->text(), QString::number(e));
                QCOMPARE(t->item(e, 1)->text(), pct(ex.share, 1));
                QCOMPARE(t->item(e, 2)->text(), ex.n_slots ? QString::number(ex.mean_weight, 'f', 3) : QString("-"));
                QCOMPARE(t->item(e, 3)->text(), QString::number(ex.distinct_tokens));
                // No tokenizer in the fixture: tokens show as #id.
                QStringList toks;
                for (size_t i = 0; i < ex.tokens.size() && i < size_t(ExpertsView::kTableTokens); ++i)
                    toks << QString("#%1 ×%2 (%3)").arg(ex.tokens[i].token).arg(ex.tokens[i].count).arg(pct(ex.tokens[i].p, 0));
                if (ex.n_slots) QCOMPARE(t->item(e, 4)->text(), toks.join("  "));
            }
            QVERIFY2(v->summaryText().contains(QString::number(want.consistency, 'f', 3)), qPrintable(v->summaryText()));
            QVERIFY(v->summaryText().contains(QString("%1 positions").arg(want.positions)));
            // The bars: the selected expert's ranked tokens.
            QStringList bars;
            for (const auto& tk : want.experts[size_t(v->expert())].tokens) bars << QString("#%1").arg(tk.token);
            QCOMPARE(v->tokenBarLabels(), bars);
            QCOMPARE(v->tokenBarCount(), int(bars.size()));
        }
        // Every MoE layer in the overview (the fixture's prompts repeat tokens, so each is scored).
        QCOMPARE(v->overviewPoints(), int(w->store()->shape().moeLayers.size()));
        v->setRank(TokenRank::Consistency);
    }

    // Choosing a row shows that expert's bars; a click on a bar selects a position where the
    // expert took the token.
    void rowAndBarSelection() {
        ExpertsView* v = view();
        const int layer = w->store()->shape().moeLayers.back();
        v->setLayer(layer);
        v->refreshNow();
        const LayerExperts want = expected(layer, v->rank());
        int busiest = 0;
        for (const auto& ex : want.experts)
            if (ex.n_slots > want.experts[size_t(busiest)].n_slots) busiest = ex.expert;
        v->table()->setCurrentCell(busiest, 4);
        QCOMPARE(v->expert(), busiest);
        QCOMPARE(v->tokenBarCount(), int(want.experts[size_t(busiest)].tokens.size()));
        QVERIFY(v->tokenBarCount() > 0);
        QSignalSpy selected(w->store(), &TelemetryStore::selectionChanged);
        const int pos = v->selectTokenBar(0);
        QVERIFY(pos >= 0);
        QCOMPARE(w->store()->selected(), pos);
        QCOMPARE(selected.count(), 1);
        const RouteRecord& r = w->store()->routes().at(pos);
        QCOMPARE(r.token, want.experts[size_t(busiest)].tokens[0].token);
        bool took = false;
        for (size_t li = 0; li < r.layers.size(); ++li)
            if (r.layers[li] == layer)
                for (int i = 0; i < r.k; ++i) took = took || r.ids[li * size_t(r.k) + size_t(i)] == busiest;
        QVERIFY(took);
        // The layer choice is kept across redraws; a selection change recomputes nothing.
        const void* before = v->shownLayer();
        w->store()->select(0);
        v->refreshNow();
        QCOMPARE(static_cast<const void*>(v->shownLayer()), before);
        QCOMPARE(v->layer(), layer);
    }

    // Records streaming in: the shown layer follows at once, the all-layer overview (throttled to
    // one recount per kOverviewIntervalMs) within that interval.
    void overviewCatchesUpWhileStreaming() {
        ExpertsView* v = view();
        QVERIFY(w->showView("experts"));
        v->refreshNow();
        const RouteRecord last = w->store()->routes().rbegin()->second;
        for (int i = 1; i <= 6; ++i) {
            RouteRecord r = last;
            r.position += i;
            r.step += i;
            w->store()->sink()->record(TokenRecord{r.step, r.position, r.token, "", false, false, 1.0f});
            w->store()->sink()->record(r);
            w->store()->flush();
        }
        const int64_t n = int64_t(w->store()->routes().size());
        QTRY_COMPARE(v->shownLayer()->positions, n);
        QTRY_COMPARE_WITH_TIMEOUT(v->overview().layers.front().positions, n, 5 * int(ExpertsView::kOverviewIntervalMs));
    }

    // A cleared store empties the view; the CSV holds the summary and the table.
    void csvAndReset() {
        ExpertsView* v = view();
        v->refreshNow();
        const QStringList lines = v->csv().split('\n');
        QCOMPARE(lines[0], QString("layer,positions,distinct_tokens,scored_tokens,consistency,chance,specialization"));
        const int L = int(w->store()->shape().moeLayers.size());
        QCOMPARE(lines[1 + L], QString());
        QVERIFY(lines[2 + L].startsWith("layer,expert,slots,share,mean_weight,rank,token"));
        int rows = 0;
        for (const auto& ex : v->shownLayer()->experts) rows += std::max<int>(1, int(ex.tokens.size()));
        QCOMPARE(lines.size(), 3 + L + rows + 1);  // the last line ends with a newline
        w->store()->clear();
        QVERIFY(w->store()->routes().empty());
        v->refreshNow();
        QVERIFY(v->shownLayer() == nullptr);
        QCOMPARE(v->table()->rowCount(), 0);
        QCOMPARE(v->tokenBarCount(), 0);
    }
};

QTEST_MAIN(TestGuiExperts)
#include "test_gui_experts.moc"
