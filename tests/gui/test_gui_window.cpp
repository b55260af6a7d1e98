// The main window's wiring around the views: dropping a model folder (or its config.json, or a
// trace) on the window opens it; QSettings persist the sampling settings, the theme and the
// recent models into a second window; the bias view shows the loaded router bias until it
// drifts (with a sane colour scale when all values are equal); special tokens of the default
// model (the end token) are shown but kept out of the answer text the next turn is built from.
#include <QDropEvent>
#include <QJsonObject>
#include <QMimeData>
#include <QSettings>
#include <QStandardPaths>
#include <QTemporaryDir>
#include <QTextBrowser>

#include "engine/tokenizer/tokenizer.h"
#include "engine/backend.h"
#include "gui_test_util.h"
#include "views/BiasView.h"

#include <qcustomplot.h>

using namespace moescope;

static QString defaultModel() { return QStringLiteral(MOESCOPE_SOURCE_DIR "/resources/models/default"); }

// Delivers a drag-enter and a drop of `urls` at the window's centre, as a file manager would.
static bool dropUrls(MainWindow& w, const QList<QUrl>& urls) {
    QMimeData mime;
    mime.setUrls(urls);
    const QPointF at(w.width() / 2.0, w.height() / 2.0);
    QDragEnterEvent enter(at.toPoint(), Qt::CopyAction, &mime, Qt::LeftButton, Qt::NoModifier);
    enter.setAccepted(false);
    QApplication::sendEvent(&w, &enter);
    if (!enter.isAccepted()) return false;
    QDropEvent drop(at, Qt::CopyAction, &mime, Qt::LeftButton, Qt::NoModifier);
    QApplication::sendEvent(&w, &drop);
    return true;
}

class TestGuiWindow : public QObject {
    Q_OBJECT

private slots:
    void initTestCase() {
        QStandardPaths::setTestModeEnabled(true);  // QSettings go to a test location
        QCoreApplication::setOrganizationName(QStringLiteral("moescope-test"));
        QCoreApplication::setApplicationName(QStringLiteral("test_gui_window"));
        QSettings().clear();
    }
    void cleanupTestCase() { QSettings().clear(); }

    void dropModelFolderOpensIt() {
        MainWindow w(false);
        w.show();
        QVERIFY(QTest::qWaitForWindowExposed(&w));
        QVERIFY(!w.engine()->isLoaded());
        QSignalSpy loaded(w.engine(), &EngineController::modelLoaded);
        QVERIFY(dropUrls(w, {QUrl::fromLocalFile(fixtureModel())}));
        QVERIFY(loaded.wait(60000) || loaded.count() == 1);
        QCOMPARE(w.engine()->info().dir, QDir::cleanPath(fixtureModel()));
        QCOMPARE(w.engine()->info().config.value("n_routed_experts", 0), 16);
        // The model generates after a drop like after File > Open.
        w.chat()->setStopAtEos(false);
        GenerationSummary sum;
        QVERIFY(generateOnce(w, QStringLiteral("5, 17, 42"), 4, &sum));
        QCOMPARE(sum.tokens, 4);

        // Dropping a config.json opens its folder.
        if (QFileInfo::exists(defaultModel() + "/config.json")) {
            QSignalSpy again(w.engine(), &EngineController::modelLoaded);
            QVERIFY(dropUrls(w, {QUrl::fromLocalFile(defaultModel() + "/config.json")}));
            QVERIFY(again.wait(60000) || again.count() == 1);
            QCOMPARE(w.engine()->info().dir, QDir::cleanPath(defaultModel()));
            QVERIFY(w.engine()->info().hasTokenizer);
        }

        // Dropping a saved trace replays it (here: the session so far).
        QTemporaryDir tmp;
        const QString trace = tmp.filePath("session.jsonl");
        QString err;
        QVERIFY2(w.saveTelemetry(trace, &err), qPrintable(err));
        const qint64 before = w.store()->recordCount();
        QVERIFY(before > 0);
        QVERIFY(dropUrls(w, {QUrl::fromLocalFile(trace)}));
        QCOMPARE(w.store()->recordCount(), before);
        QVERIFY(w.store()->meta().has_value());

        // Anything else is ignored: a drag without URLs is refused.
        QMimeData text;
        text.setText(QStringLiteral("not a model"));
        QDragEnterEvent enter(QPoint(10, 10), Qt::CopyAction, &text, Qt::LeftButton, Qt::NoModifier);
        enter.setAccepted(false);
        QApplication::sendEvent(&w, &enter);
        QVERIFY(!enter.isAccepted());
    }

    void settingsPersist() {
        QSettings().clear();
        SamplingParams want;
        {
            MainWindow w(true);
            w.show();
            QVERIFY(QTest::qWaitForWindowExposed(&w));
            QVERIFY(loadFixture(w));
            SamplingParams p = w.chat()->sampling();
            p.temperature = 0.35;
            p.top_k = 40;
            p.top_p = 0.9;
            p.min_p = 0.05;
            p.repetition_penalty = 1.15;
            p.frequency_penalty = 0.2;
            p.presence_penalty = -0.3;
            p.seed = 1234;
            p.max_tokens = 77;
            p.mtp = false;
            w.chat()->setSampling(p);
            w.chat()->setStopAtEos(false);
            w.setDark(true);
            w.setBackendRequest(QStringLiteral("cpu"));
            want = w.chat()->sampling();
            QVERIFY(w.close());  // closeEvent writes the settings
        }
        QSettings s;
        QVERIFY(s.contains("chat/settings"));
        QCOMPARE(s.value("dark").toBool(), true);
        QCOMPARE(s.value("backend").toString(), QStringLiteral("cpu"));

        MainWindow w2(true);
        QVERIFY(w2.isDark());
        QCOMPARE(w2.backendRequest(), QStringLiteral("cpu"));
        const SamplingParams got = w2.chat()->sampling();
        QCOMPARE(got.temperature, want.temperature);
        QCOMPARE(got.top_k, 40);
        QCOMPARE(got.top_p, want.top_p);
        QCOMPARE(got.min_p, want.min_p);
        QCOMPARE(got.repetition_penalty, want.repetition_penalty);
        QCOMPARE(got.frequency_penalty, want.frequency_penalty);
        QCOMPARE(got.presence_penalty, want.presence_penalty);
        QCOMPARE(got.seed, uint64_t(1234));
        QCOMPARE(got.max_tokens, 77);
        QCOMPARE(got.mtp, false);
        QCOMPARE(w2.chat()->settingsJson().value("stop_at_eos").toBool(true), false);
        QCOMPARE(w2.recentModels().value(0), QDir::cleanPath(fixtureModel()));
        // A window that does not persist (tests, screenshots) reads nothing.
        MainWindow w3(false);
        QVERIFY(!w3.isDark());
        QVERIFY(w3.recentModels().isEmpty());
        w2.setDark(false);  // the palette is application-wide
    }

    // Engine > Backend reloads the model: without a GPU, CUDA is refused with the engine's reason
    // and the model keeps running on the CPU; switching back to CPU reloads it there.
    void backendSwitch() {
        if (moescope::probe_cuda().device_count > 0) QSKIP("a CUDA device is present: the refusal path cannot be shown");
        MainWindow w(false);
        w.show();
        QVERIFY(QTest::qWaitForWindowExposed(&w));
        QVERIFY(loadFixture(w));
        QVERIFY(w.backendText().contains(QStringLiteral("cpu")));
        QSignalSpy failed(w.engine(), &EngineController::loadFailed);
        w.findChild<QAction*>(QStringLiteral("backend_cuda"))->trigger();
        QVERIFY(failed.wait(60000) || failed.count() == 1);
        QVERIFY2(failed.first().at(1).toString().contains(QStringLiteral("CUDA backend cannot run")),
                 qPrintable(failed.first().at(1).toString()));
        QVERIFY(w.bannerText().contains(QStringLiteral("CUDA")));
        QCOMPARE(w.backendRequest(), QStringLiteral("cuda"));
        QVERIFY(generateOnce(w, QStringLiteral("1, 2, 3"), 4));  // the previous model still answers
        QSignalSpy loaded(w.engine(), &EngineController::modelLoaded);
        w.findChild<QAction*>(QStringLiteral("backend_cpu"))->trigger();
        QVERIFY(loaded.wait(60000) || loaded.count() == 1);
        QVERIFY(w.backendText().contains(QStringLiteral("CPU (requested)")));
    }

    void biasViewShowsLoadedBias() {
        MainWindow w(false);
        w.resize(1400, 900);
        w.show();
        QVERIFY(QTest::qWaitForWindowExposed(&w));
        const QString dir = QFileInfo::exists(defaultModel() + "/config.json") ? defaultModel() : fixtureModel();
        QSignalSpy loaded(w.engine(), &EngineController::modelLoaded);
        w.openModel(dir);
        QVERIFY(loaded.wait(60000) || loaded.count() == 1);
        w.store()->flush();
        auto* bv = qobject_cast<BiasView*>(w.view("bias"));
        QVERIFY(bv);
        w.showView("bias");
        bv->refreshNow();
        const auto& moe = w.store()->shape().moeLayers;
        const int E = w.store()->shape().numExperts;
        QVERIFY(!moe.empty());
        // No update yet: bars of the chosen layer's bias, a map MoE layer x expert of every layer's.
        QVERIFY(!bv->showsDrift());
        QCOMPARE(bv->nowBarCount(), E);
        QCOMPARE(bv->heatmapSize(), QSize(E, int(moe.size())));
        double amax = 0;
        for (size_t r = 0; r < moe.size(); ++r) {
            const auto& rec = w.store()->bias().at(moe[r]);
            QCOMPARE(int(rec.size()), 1);  // recorded at load
            for (int e = 0; e < E; ++e) {
                QCOMPARE(bv->heatmapValue(e, int(r)), double(rec.back().bias[size_t(e)]));
                amax = std::max(amax, std::abs(double(rec.back().bias[size_t(e)])));
            }
        }
        const auto range = bv->heatmapColourRange();
        QCOMPARE(range.first, -range.second);
        QCOMPARE(range.second, amax > 0 ? amax : 1.0);  // all zero: a neutral scale, not 1e-9
        // Nothing routed yet: every plot still spans its widget (an empty legend under the
        // MaxVio plot once squeezed it to a sliver).
        for (QCustomPlot* p : bv->plots())
            QVERIFY2(p->axisRect()->width() > p->width() / 2,
                     qPrintable(QStringLiteral("plot %1 px wide, its axes %2 px")
                                    .arg(p->width())
                                    .arg(p->axisRect()->width())));

        // Online balancing during a generation: the view switches to the drift over updates.
        w.chat()->setStopAtEos(false);
        bv->setOnlineBalancing(true, 0.01);
        QVERIFY(generateOnce(w, dir == fixtureModel() ? QStringLiteral("5, 17, 42") : QStringLiteral("computers"), 12));
        bv->refreshNow();
        QVERIFY(bv->showsDrift());
        const int updates = int(w.store()->bias().at(bv->layer()).size());
        QVERIFY(updates > 1);
        QCOMPARE(bv->heatmapSize(), QSize(updates, E));
        QVERIFY(bv->lineCount() > 0);
        QCOMPARE(bv->nowBarCount(), 0);
        // "Relative": each column (update) of the map sums to zero over the experts.
        for (int s = 0; s < updates; ++s) {
            double sum = 0;
            for (int e = 0; e < E; ++e) sum += bv->heatmapValue(s, e);
            QVERIFY2(std::abs(sum) < 1e-6, qPrintable(QString::number(sum)));
        }
        bv->setOnlineBalancing(false, 0.01);
    }

    void specialTokensStayOutOfTheAnswer() {
        if (!QFileInfo::exists(defaultModel() + "/tokenizer.json")) QSKIP("no default model in resources/models/default");
        MainWindow w(false);
        w.show();
        QVERIFY(QTest::qWaitForWindowExposed(&w));
        QSignalSpy loaded(w.engine(), &EngineController::modelLoaded);
        w.openModel(defaultModel());
        QVERIFY(loaded.wait(60000) || loaded.count() == 1);
        GenerationSummary sum;
        QVERIFY(generateOnce(w, QStringLiteral("computers"), 120, &sum));
        QCOMPARE(sum.stopReason, QStringLiteral("stop_token"));  // greedy: the answer ends with <|eos|>
        const ChatEntry& a = w.chat()->entries().back();
        QVERIFY(!a.tokens.empty());
        QVERIFY(a.tokens.back().special);
        QCOMPARE(a.tokens.back().id, w.engine()->info().eosId);
        for (size_t i = 0; i + 1 < a.tokens.size(); ++i) QVERIFY(!a.tokens[i].special);
        QVERIFY(!a.text.contains(QStringLiteral("<|eos|>")));
        // Shown (a link like every token), but not as answer text.
        const QString shown = w.chat()->browser()->toPlainText();
        QVERIFY(shown.contains(QStringLiteral("<|eos|>")));
        const QString html = w.chat()->browser()->toHtml();
        QVERIFY(html.contains(QStringLiteral("t:%1").arg(a.tokens.back().position)));

        // The next turn's context is the chat template of the conversation: the answer is closed
        // by the template's own end token, not by a second one carried in the answer's text.
        QVERIFY(generateOnce(w, QStringLiteral("linux"), 8));
        auto tok = w.engine()->tokenizer();
        const QString ctx = QString::fromStdString(tok->decode(w.engine()->contextTokens()));
        QVERIFY2(ctx.contains(QStringLiteral("<|eos|><|user|>linux<|assistant|>")), qPrintable(ctx));
        QVERIFY2(!ctx.contains(QStringLiteral("<|eos|><|eos|>")), qPrintable(ctx));
    }
};

QTEST_MAIN(TestGuiWindow)
#include "test_gui_window.moc"
