// The Evaluate view scores a text with every expert on and with the ablation in force, the same
// numbers as evaluate_perplexity on a backend of its own, and leaves the ablation in force.
// Switching experts off from the Routing view, as a user does it: the "Off" field of a layer,
// a load bar toggled, a refused mask, and all on again. The engine must stop routing to them
// (the whole conversation is recomputed), the view must mark them, and the answer's summary
// must say which experts were off.
#include <QLineEdit>
#include <QComboBox>
#include <QPushButton>
#include <QTemporaryDir>
#include <QSpinBox>
#include <QTableWidget>
#include <QTextBrowser>

#include "engine/backend.h"
#include "engine/eval.h"
#include "engine/loader.h"
#include "engine/model/moe.h"
#include "gui_test_util.h"
#include "views/EvaluateView.h"
#include "views/ExpertsView.h"
#include "views/RoutingView.h"

using namespace moescope;

namespace {

// Types `text` into the routing view's "Off" field and presses Return.
void typeOff(RoutingView* rv, const QString& text) {
    auto* edit = rv->findChild<QLineEdit*>(QStringLiteral("routingDisable"));
    QVERIFY(edit);
    edit->setFocus();
    edit->selectAll();
    QTest::keyClick(edit, Qt::Key_Backspace);
    QTest::keyClicks(edit, text);
    QTest::keyClick(edit, Qt::Key_Return);
}

// Every routing of `layer` the store holds, as expert ids.
std::vector<int> routedIn(const TelemetryStore& st, int layer) {
    std::vector<int> out;
    for (const auto& [pos, r] : st.routes())
        for (size_t li = 0; li < r.layers.size(); ++li)
            if (r.layers[li] == layer)
                out.insert(out.end(), r.ids.begin() + std::ptrdiff_t(li * size_t(r.k)),
                           r.ids.begin() + std::ptrdiff_t((li + 1) * size_t(r.k)));
    return out;
}

bool contains(const std::vector<int>& v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// Position -> the ids `layer` routed that position to.
std::map<int, std::vector<int>> routesByPosition(const TelemetryStore& st, int layer) {
    std::map<int, std::vector<int>> out;
    for (const auto& [pos, r] : st.routes())
        for (size_t li = 0; li < r.layers.size(); ++li)
            if (r.layers[li] == layer)
                out[pos] = std::vector<int>(r.ids.begin() + std::ptrdiff_t(li * size_t(r.k)),
                                            r.ids.begin() + std::ptrdiff_t((li + 1) * size_t(r.k)));
    return out;
}

}  // namespace

class TestGuiAblation : public QObject {
    Q_OBJECT

private slots:
    void switchExpertsOffAndOn() {
        std::unique_ptr<MainWindow> win(fixtureWindow());
        QVERIFY(win);
        MainWindow& w = *win;
        w.chat()->setStopAtEos(false);
        auto* rv = qobject_cast<RoutingView*>(w.view(QStringLiteral("routing")));
        QVERIFY(rv);
        GenerationSummary base;
        QVERIFY(generateOnce(w, QStringLiteral("1,2,3,4,5,6,7,8"), 16, &base));
        QVERIFY(base.ablation.isEmpty());
        rv->setLayer(1);
        const std::vector<int> before = routedIn(*w.store(), 1);
        QVERIFY(contains(before, 0) || contains(before, 5));  // the baseline uses them

        typeOff(rv, QStringLiteral("0, 5"));
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->disabled(1) == std::vector<int>{0, 5}), 10000);
        rv->refreshNow();
        QCOMPARE(rv->disabledMarks(), (QList<int>{0, 5}));
        QVERIFY(w.store()->routes().empty());  // the cache was dropped: it held the old experts' latents

        // Continue: the conversation is recomputed without experts 0 and 5 of layer 1.
        GenerationSummary abl;
        QVERIFY(generateOnce(w, QStringLiteral("9,10"), 16, &abl));
        QCOMPARE(abl.ablation, QStringLiteral("layer 1: 0,5"));
        const std::vector<int> after = routedIn(*w.store(), 1);
        QVERIFY(after.size() >= before.size());  // every position again, and more
        QVERIFY(!contains(after, 0) && !contains(after, 5));
        auto* transcript = w.chat()->findChild<QTextBrowser*>();
        QVERIFY(transcript);
        QTRY_VERIFY(transcript->toPlainText().contains(QStringLiteral("experts off: layer 1: 0,5")));

        // The Experts view marks them too.
        auto* ev = qobject_cast<ExpertsView*>(w.view(QStringLiteral("experts")));
        QVERIFY(ev);
        ev->setLayer(1);
        ev->refreshNow();
        QCOMPARE(ev->table()->item(0, 0)->text(), QStringLiteral("0 (off)"));
        QCOMPARE(ev->table()->item(5, 0)->text(), QStringLiteral("5 (off)"));
        QCOMPARE(ev->table()->item(1, 0)->text(), QStringLiteral("1"));
        QVERIFY(ev->table()->item(0, 4)->text().contains(QStringLiteral("switched off")));

        // A double-clicked load bar toggles one expert: 5 on again.
        rv->toggleDisabled(5);
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->disabled(1) == std::vector<int>{0}), 10000);

        // A mask that leaves a token too few experts is refused, and nothing changes.
        QSignalSpy failed(w.engine(), &EngineController::ablationFailed);
        typeOff(rv, QStringLiteral("0-13"));
        QVERIFY(failed.wait(10000) || failed.count() == 1);
        QVERIFY2(failed.first().first().toString().contains(QStringLiteral("layer 1")),
                 qPrintable(failed.first().first().toString()));
        w.store()->flush();
        QCOMPARE(w.store()->disabled(1), std::vector<int>{0});

        // Several layers at once, then an empty field: layer 1's experts on again.
        typeOff(rv, QStringLiteral("2:3;3:4-6"));
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->disabled(3) == std::vector<int>{4, 5, 6}), 10000);
        QCOMPARE(w.store()->disabled(2), std::vector<int>{3});
        typeOff(rv, QString());
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->disabled(1).empty()), 10000);
        QCOMPARE(w.store()->disabled(2), std::vector<int>{3});
        w.engine()->clearDisabledExperts();
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->disabledByLayer().empty()), 10000);
        GenerationSummary again;
        QVERIFY(generateOnce(w, QStringLiteral("11"), 4, &again));
        QVERIFY(again.ablation.isEmpty());
    }

    void evaluateViewScoresWithAndWithoutTheAblation() {
        std::unique_ptr<MainWindow> win(fixtureWindow());
        QVERIFY(win);
        MainWindow& w = *win;
        auto* ev = qobject_cast<EvaluateView*>(w.view(QStringLiteral("evaluate")));
        QVERIFY(ev);
        QTemporaryDir dir;
        const QString text = dir.filePath(QStringLiteral("held-out.txt"));
        std::string bytes;
        for (int i = 0; i < 300; ++i) bytes += char('a' + (i * 7 + i / 13) % 26);
        {
            QFile f(text);
            QVERIFY(f.open(QIODevice::WriteOnly));
            f.write(bytes.data(), qint64(bytes.size()));
        }
        w.engine()->setDisabledExperts(1, QStringLiteral("0,5"));
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->disabled(1) == std::vector<int>{0, 5}), 10000);
        w.showView(QStringLiteral("evaluate"));
        ev->setTextPath(text);
        ev->setWindows(0);
        QSignalSpy done(w.engine(), &EngineController::evaluationFinished);
        QTest::mouseClick(ev->findChild<QPushButton*>(QStringLiteral("evalRun")), Qt::LeftButton);
        QVERIFY(done.wait(60000) || done.count() == 1);
        QVERIFY(ev->hasReport());
        const EvaluationReport& r = ev->report();
        QVERIFY(r.ablated);
        QCOMPARE(r.ablation, QStringLiteral("layer 1: 0,5"));
        // The same numbers from a backend of our own (the fixture has no tokenizer: bytes).
        auto model = load_model(fixtureModel().toStdString());
        auto be = make_cpu_backend(model);
        std::vector<int> ids;
        for (unsigned char c : bytes) ids.push_back(int(c) % model->config().vocab_size);
        PerplexityOptions o;
        o.context = r.context;
        o.keep_losses = true;
        const PerplexityResult base = evaluate_perplexity(*be, ids, o);
        be->set_disabled_experts(1, expert_mask({0, 5}, model->config().n_routed_experts, 1));
        const PerplexityResult abl = evaluate_perplexity(*be, ids, o);
        QCOMPARE(r.textTokens, int(ids.size()));
        QCOMPARE(r.baseline.tokens, base.tokens);
        QCOMPARE(r.baseline.cross_entropy, base.cross_entropy);
        QCOMPARE(r.baseline.mtp_cross_entropy, base.mtp_cross_entropy);
        QCOMPARE(r.withAblation.cross_entropy, abl.cross_entropy);
        QVERIFY(abl.cross_entropy != base.cross_entropy);
        const auto hurt = token_impact(ids, base, abl, 3, 12);
        QCOMPARE(int(r.hurt.size()), int(hurt.size()));
        for (size_t i = 0; i < hurt.size(); ++i) QCOMPARE(r.hurt[i].token, hurt[i].token);
        // Drawn: two bars per run, one labelled bar per hurt token, the numbers in the info line.
        QCOMPARE(ev->perplexityBarCount(), 4);
        QCOMPARE(ev->tokenBarLabels().size(), qsizetype(hurt.size()));
        QVERIFY2(ev->infoText().contains(QString::number(std::exp(base.cross_entropy), 'f', 2)), qPrintable(ev->infoText()));
        QVERIFY(ev->csv().startsWith(QStringLiteral("row,token,text,count,all_experts,experts_off\ncross_entropy,")));
        QCOMPARE(ev->sweepPoints(), 0);
        // The sweep: each token's top R = 0..k experts dropped, experts 0 and 5 of layer 1 off in
        // every run; R = 0 is the run above, R = 2 equals our own backend's.
        ev->setSweep(EvalSweep::TopR);
        QSignalSpy swept(w.engine(), &EngineController::evaluationFinished);
        ev->run();
        QVERIFY(swept.wait(60000) || swept.count() == 1);
        const int k = model->config().num_experts_per_tok;
        QCOMPARE(int(ev->report().sweep.size()), k + 1);
        QCOMPARE(ev->sweepPoints(), k + 1);
        QCOMPARE(ev->report().sweep[0].cross_entropy, abl.cross_entropy);
        for (int l = 0; l < model->config().num_hidden_layers; ++l)
            if (model->config().is_moe_layer(l)) be->set_drop_top_experts(l, 2);
        QCOMPARE(ev->report().sweep[2].cross_entropy, evaluate_perplexity(*be, ids, o).cross_entropy);
        QVERIFY(ev->report().sweep[2].cross_entropy != ev->report().sweep[0].cross_entropy);  // random weights: any change
        QVERIFY(ev->csv().contains(QStringLiteral("\nsweep_cross_entropy,2,top 2 dropped,")));
        // Per layer: each token's top expert dropped in one MoE layer alone.
        ev->setSweep(EvalSweep::PerLayer);
        QSignalSpy layered(w.engine(), &EngineController::evaluationFinished);
        ev->run();
        QVERIFY(layered.wait(60000) || layered.count() == 1);
        QCOMPARE(ev->report().sweepLayers, (std::vector<int>{1, 2, 3}));
        QCOMPARE(ev->sweepPoints(), 3);
        for (int i = 0; i < 3; ++i) {
            for (int l = 1; l <= 3; ++l) be->set_drop_top_experts(l, l == i + 1 ? 1 : 0);
            QCOMPARE(ev->report().sweep[size_t(i)].cross_entropy, evaluate_perplexity(*be, ids, o).cross_entropy);
        }
        QVERIFY(ev->csv().contains(QStringLiteral("\nsweep_cross_entropy,1,layer 2: top 1 dropped,")));
        // The report is in the telemetry as it is drawn (ablation, hurt tokens, per-layer sweep),
        // and a view given the record back draws and exports the same.
        w.store()->flush();
        QVERIFY(w.store()->evaluation());
        const EvaluationRecord& rec = *w.store()->evaluation();
        EvaluationRecord want = evaluationRecord(ev->report());
        want.step = rec.step;
        QVERIFY(rec == want);
        QVERIFY(rec.ablated && !rec.hurt.empty() && rec.sweep_layers == (std::vector<int>{1, 2, 3}));
        EvaluateView again(w.store());
        again.setReport(evaluationReport(rec));
        QCOMPARE(again.csv(), ev->csv());
        QCOMPARE(again.tokenBarLabels(), ev->tokenBarLabels());
        // Each expert of layer 2 off alone, on top of layer 1's experts 0 and 5: one run per expert,
        // each equal to our backend with those masks; in the record, the CSV and the layer choice.
        ev->setSweep(EvalSweep::PerExpert);
        auto* layerBox = ev->findChild<QComboBox*>(QStringLiteral("evalExpertLayer"));
        QVERIFY(layerBox && layerBox->isVisibleTo(ev) && layerBox->count() == 3);  // MoE layers 1-3
        ev->setExpertLayer(2);
        QCOMPARE(ev->expertLayer(), 2);
        QSignalSpy perExpert(w.engine(), &EngineController::evaluationFinished);
        ev->run();
        QVERIFY(perExpert.wait(60000) || perExpert.count() == 1);
        const int E = model->config().n_routed_experts;
        QCOMPARE(ev->report().sweepExpertLayer, 2);
        QCOMPARE(int(ev->report().sweepExperts.size()), E);
        QCOMPARE(ev->sweepPoints(), E);
        for (int l = 1; l <= 3; ++l) be->set_drop_top_experts(l, 0);
        for (int e : {0, 7, E - 1}) {
            QCOMPARE(ev->report().sweepExperts[size_t(e)], e);
            be->set_disabled_experts(2, expert_mask({e}, E, 2));
            QCOMPARE(ev->report().sweep[size_t(e)].cross_entropy, evaluate_perplexity(*be, ids, o).cross_entropy);
        }
        be->set_disabled_experts(2, expert_mask({}, E, 2));
        QVERIFY(ev->csv().contains(QStringLiteral("\nsweep_cross_entropy,7,layer 2: expert 7 off,")));
        {
            const auto& sw = ev->report().sweep;
            const auto most = std::max_element(sw.begin(), sw.end(), [](const auto& x, const auto& y) {
                return x.cross_entropy < y.cross_entropy;
            });
            QVERIFY2(ev->infoText().contains(QStringLiteral("expert %1 of layer 2 costs the most").arg(most - sw.begin())),
                     qPrintable(ev->infoText()));
        }
        w.store()->flush();
        QCOMPARE(w.store()->evaluation()->sweep_experts, ev->report().sweepExperts);
        again.setReport(evaluationReport(*w.store()->evaluation()));
        QCOMPARE(again.csv(), ev->csv());
        QCOMPARE(w.store()->disabled(1), (std::vector<int>{0, 5}));  // the ablation in force, untouched
        QVERIFY(w.store()->disabled(2).empty());
        ev->setSweep(EvalSweep::None);
        QVERIFY(!layerBox->isVisibleTo(ev));
        // The four evaluations in the history box, the newest chosen; an older one chosen draws
        // its record (the first: the ablation alone, no sweep), and back.
        auto* history = ev->findChild<QComboBox*>(QStringLiteral("evalHistory"));
        QVERIFY(history);
        QTRY_COMPARE_WITH_TIMEOUT((w.store()->flush(), history->count()), 4, 10000);
        QVERIFY(history->isVisibleTo(ev));
        QCOMPARE(history->currentIndex(), 3);
        const QStringList labels = ev->historyLabels();
        QVERIFY2(labels[0].startsWith(QStringLiteral("#1")) && labels[0].contains(QStringLiteral("layer 1: 0,5 off")) &&
                     labels[0].contains(QString::number(std::exp(base.cross_entropy), 'f', 2)),
                 qPrintable(labels[0]));
        QVERIFY2(labels[1].contains(QStringLiteral("top 0..%1 off").arg(k)), qPrintable(labels[1]));
        QVERIFY2(labels[2].contains(QStringLiteral("top expert off by layer")), qPrintable(labels[2]));
        QVERIFY2(labels[3].contains(QStringLiteral("each expert of layer 2 off")), qPrintable(labels[3]));
        const QString perExpertCsv = ev->csv();
        history->setCurrentIndex(0);
        QVERIFY(ev->report().sweep.empty() && ev->report().ablated);
        QCOMPARE(ev->report().withAblation.cross_entropy, abl.cross_entropy);
        QCOMPARE(ev->sweepPoints(), 0);
        QCOMPARE(ev->textPath(), text);
        history->setCurrentIndex(3);
        QCOMPARE(ev->csv(), perExpertCsv);
        // Saved and replayed: the same four, the newest shown.
        const QString saved = dir.filePath(QStringLiteral("session.jsonl"));
        QString err;
        QVERIFY2(w.saveTelemetry(saved, &err), qPrintable(err));
        QVERIFY2(w.openTrace(saved, &err), qPrintable(err));
        QTRY_COMPARE_WITH_TIMEOUT(ev->historyLabels(), labels, 10000);
        QCOMPARE(ev->csv(), perExpertCsv);
        // Cancelled (Stop) before its first window ends: reported, Run again, nothing changed.
        QSignalSpy stopped(w.engine(), &EngineController::evaluationFailed);
        ev->run();
        QVERIFY(ev->running());
        w.engine()->cancel();
        QVERIFY(stopped.wait(10000) || stopped.count() == 1);
        QVERIFY2(ev->infoText().contains(QStringLiteral("cancelled")), qPrintable(ev->infoText()));
        QVERIFY(!ev->running());
        QCOMPARE(ev->report().baseline.cross_entropy, base.cross_entropy);  // the last report stays
        // The ablation is still in force: the next answer never routes layer 1 to 0 or 5.
        w.chat()->setStopAtEos(false);
        QVERIFY(generateOnce(w, QStringLiteral("1,2,3,4"), 8, nullptr));
        const std::vector<int> routed = routedIn(*w.store(), 1);
        QVERIFY(!routed.empty() && !contains(routed, 0) && !contains(routed, 5));
        // A missing file: refused with its name, the report kept.
        ev->setTextPath(dir.filePath(QStringLiteral("missing.txt")));
        QSignalSpy failed(w.engine(), &EngineController::evaluationFailed);
        ev->run();
        QVERIFY(failed.count() == 1 || failed.wait(10000));
        QVERIFY2(ev->infoText().contains(QStringLiteral("missing.txt")), qPrintable(ev->infoText()));
        QVERIFY(ev->hasReport());
    }

    // The "Top off" box: each token's top-ranked expert switched off for it in every MoE layer.
    // Layer 1 is the first MoE layer, so its input is the baseline's and no prompt position may
    // take the expert it ranked first there; a refused value leaves the box at the one in force.
    void dropTopExpertsFromTheSpinBox() {
        std::unique_ptr<MainWindow> win(fixtureWindow());
        QVERIFY(win);
        MainWindow& w = *win;
        w.chat()->setStopAtEos(false);
        auto* rv = qobject_cast<RoutingView*>(w.view(QStringLiteral("routing")));
        QVERIFY(rv);
        const QString prompt = QStringLiteral("1,2,3,4,5,6,7,8");
        QVERIFY(generateOnce(w, prompt, 4, nullptr));
        const auto base = routesByPosition(*w.store(), 1);
        rv->refreshNow();
        auto* box = rv->findChild<QSpinBox*>(QStringLiteral("routingDropTop"));
        QVERIFY(box);
        QCOMPARE(box->value(), 0);
        QCOMPARE(box->maximum(), w.store()->shape().topK);
        box->setFocus();
        QTest::keyClick(box, Qt::Key_Up);
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->dropTop(1) == 1), 10000);
        QCOMPARE(w.store()->dropTop(3), 1);  // every MoE layer
        QVERIFY(w.store()->routes().empty());
        GenerationSummary abl;  // the conversation so far is recomputed, then the new message
        QVERIFY(generateOnce(w, QStringLiteral("9,10"), 4, &abl));
        QVERIFY2(abl.ablation.contains(QStringLiteral("each token's top 1")), qPrintable(abl.ablation));
        const auto dropped = routesByPosition(*w.store(), 1);
        int compared = 0;
        for (const auto& [pos, ids] : dropped)
            if (auto it = base.find(pos); it != base.end() && pos < 8) {
                QVERIFY2(!contains(ids, it->second[0]), qPrintable(QString("position %1 kept its top expert").arg(pos)));
                ++compared;
            }
        QCOMPARE(compared, 8);
        auto* ev = qobject_cast<ExpertsView*>(w.view(QStringLiteral("experts")));
        ev->setLayer(1);
        ev->refreshNow();
        QVERIFY2(ev->summaryText().contains(QStringLiteral("each token's top expert is off")), qPrintable(ev->summaryText()));
        // Layer 1 down to two experts per group: dropping 3 could leave a token too few; refused.
        QSignalSpy failed(w.engine(), &EngineController::ablationFailed);
        rv->setLayer(1);
        typeOff(rv, QStringLiteral("0,1,4,5,8,9,12,13"));
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->disabled(1).size() == 8), 10000);
        box->setFocus();
        box->setValue(3);
        QVERIFY(failed.wait(10000) || failed.count() == 1);
        QVERIFY2(failed.first().first().toString().contains(QStringLiteral("each token's top 3")),
                 qPrintable(failed.first().first().toString()));
        QTRY_COMPARE(box->value(), 1);
        w.store()->flush();
        QCOMPARE(w.store()->dropTop(1), 1);
        // All on again: no mask, nothing dropped.
        w.engine()->clearDisabledExperts();
        QTRY_VERIFY_WITH_TIMEOUT((w.store()->flush(), w.store()->dropTop(1) == 0 && w.store()->disabledByLayer().empty()),
                                 10000);
    }
};

QTEST_MAIN(TestGuiAblation)
#include "test_gui_ablation.moc"
