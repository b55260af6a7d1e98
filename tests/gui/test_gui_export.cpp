// Export and replay: every view writes a non-empty PNG, PDF and CSV, the CSVs hold exactly
// the telemetry, the session's JSONL replays into a window without a model and reproduces the
// views, and a training trace drives the training dashboard.
#include <QFile>
#include <QImage>
#include <QStandardPaths>
#include <QTemporaryDir>
#include <QTextStream>

#ifdef MOESCOPE_HAVE_TRAINER
#include "EngineTrainer.h"
#endif
#include "TrainerRunner.h"
#include "gui_test_util.h"
#include "views/BiasView.h"
#include "views/LatentView.h"
#include "views/ModelCardView.h"
#include "views/MtpView.h"
#include "views/RoutingView.h"
#include "views/TrainingView.h"

using namespace moescope;

static QStringList readLines(const QString& path) {
    QFile f(path);
    if (!f.open(QIODevice::ReadOnly)) return {};
    return QString::fromUtf8(f.readAll()).split(QLatin1Char('\n'), Qt::SkipEmptyParts);
}

class TestGuiExport : public QObject {
    Q_OBJECT
    MainWindow* w = nullptr;
    QTemporaryDir tmp;

private slots:
    void initTestCase() {
        QStandardPaths::setTestModeEnabled(true);  // trained models go to a test location
        w = new MainWindow(false);
        w->resize(1400, 900);
        w->show();
        QVERIFY(QTest::qWaitForWindowExposed(w));
        QVERIFY(loadFixture(*w));
        w->chat()->setStopAtEos(false);
        QVERIFY(generateOnce(*w, QStringLiteral("3, 1, 4, 1, 5, 9, 2, 6"), 12));
        w->store()->select(10);
    }
    void cleanupTestCase() { delete w; }

    void exportWritesEveryView() {
        const QString dir = tmp.filePath("export");
        QString err;
        QVERIFY2(w->exportAllViews(dir, &err), qPrintable(err));
        for (auto* v : w->views()) {
            const QString base = dir + "/" + v->viewName();
            QImage png(base + ".png");
            QVERIFY2(!png.isNull() && png.width() > 50 && png.height() > 50, qPrintable(base));
            QFile pdf(base + ".pdf");
            QVERIFY(pdf.open(QIODevice::ReadOnly));
            QVERIFY2(pdf.size() > 500 && pdf.read(5) == "%PDF-", qPrintable(base));
            QVERIFY2(QFileInfo(base + ".csv").size() > 10, qPrintable(base));
        }
    }

    void routingCsvMatchesTelemetry() {
        const QStringList lines = readLines(tmp.filePath("export/routing.csv"));
        QVERIFY(!lines.isEmpty());
        QCOMPARE(lines.first(), QStringLiteral("position,token,layer,rank,expert,weight"));
        int row = 1;
        for (const auto& [pos, r] : w->store()->routes())
            for (size_t li = 0; li < r.layers.size(); ++li)
                for (int j = 0; j < r.k; ++j) {
                    QVERIFY(row < lines.size());
                    const QStringList c = lines[row++].split(QLatin1Char(','));
                    QCOMPARE(c.size(), 6);
                    QCOMPARE(c[0].toInt(), pos);
                    QCOMPARE(c[1].toInt(), r.token);
                    QCOMPARE(c[2].toInt(), r.layers[li]);
                    QCOMPARE(c[4].toInt(), r.ids[li * size_t(r.k) + size_t(j)]);
                    QCOMPARE(c[5].toFloat(), r.weights[li * size_t(r.k) + size_t(j)]);
                }
        QCOMPARE(row, lines.size());
        // MTP: one row per speculative step.
        QCOMPARE(readLines(tmp.filePath("export/mtp.csv")).size(), 1 + int(w->store()->mtp().size()));
        // Latent: norms for every layer at every position, plus c and k_pe of the recorded layer.
        int expect = 1;
        for (const auto& [p, r] : w->store()->latents()) expect += int(r.norms.size() + r.c.size() + r.k_pe.size());
        QCOMPARE(readLines(tmp.filePath("export/latent.csv")).size(), expect);
    }

    void replayReproducesViews() {
        const QString trace = tmp.filePath("session.jsonl");
        QString err;
        QVERIFY2(w->saveTelemetry(trace, &err), qPrintable(err));
        QCOMPARE(readLines(trace).size(), int(w->store()->recordCount()));

        MainWindow replay(false);
        replay.resize(1400, 900);
        replay.show();
        QVERIFY(QTest::qWaitForWindowExposed(&replay));
        QVERIFY2(replay.openTrace(trace, &err), qPrintable(err));
        QVERIFY(!replay.engine()->isLoaded());
        replay.store()->select(10);
        for (auto* v : w->views()) v->refreshNow();
        for (auto* v : replay.views()) v->refreshNow();
        auto* r0 = qobject_cast<RoutingView*>(w->view("routing"));
        auto* r1 = qobject_cast<RoutingView*>(replay.view("routing"));
        QCOMPARE(r1->tokenMapSize(), r0->tokenMapSize());
        QCOMPARE(r1->sequenceMapSize(), r0->sequenceMapSize());
        for (int row = 0; row < r0->tokenMapSize().height(); ++row)
            for (int e = 0; e < r0->tokenMapSize().width(); ++e) QCOMPARE(r1->tokenMapValue(e, row), r0->tokenMapValue(e, row));
        auto* l0 = qobject_cast<LatentView*>(w->view("latent"));
        auto* l1 = qobject_cast<LatentView*>(replay.view("latent"));
        QCOMPARE(l1->latentMapSize(), l0->latentMapSize());
        QCOMPARE(l1->normMapSize(), l0->normMapSize());
        auto* m0 = qobject_cast<MtpView*>(w->view("mtp"));
        auto* m1 = qobject_cast<MtpView*>(replay.view("mtp"));
        QCOMPARE(m1->ratePoints(), m0->ratePoints());
        QCOMPARE(qobject_cast<ModelCardView*>(replay.view("card"))->layerRows(), 5);  // 4 layers + MTP
        // The data behind every view is identical.
        for (auto* v : w->views()) {
            if (v->viewName() == QLatin1String("mtp") || v->viewName() == QLatin1String("card")) continue;
            QCOMPARE(replay.view(v->viewName())->csv(), v->csv());
        }
        QCOMPARE(replay.view("mtp")->csv(), w->view("mtp")->csv());
    }

    void trainingTraceDrivesDashboard() {
        const QString trace = tmp.filePath("train.jsonl");
        {
            JsonlWriter jw(trace.toStdString());
            for (int s = 0; s < 40; ++s) {
                TrainRecord t;
                t.step = s;
                t.loss = 6.0 * std::exp(-s / 20.0);
                t.lr = 1e-3 * std::min(1.0, (s + 1) / 10.0);
                t.tokens_per_s = 5000 + s;
                t.maxvio_batch = 1.0 / (1 + s);
                jw.record(t);
                for (int l = 1; l <= 3; ++l) {
                    BiasRecord b{s, l, std::vector<float>(16)};
                    for (int e = 0; e < 16; ++e) b.bias[size_t(e)] = 0.001f * float(s) * float((e % 2) ? 1 : -1);
                    jw.record(b);
                }
                if (s % 10 == 9) jw.record(EvalRecord{s, 5.5 * std::exp(-s / 25.0), 0.3});
            }
        }
        auto* tv = qobject_cast<TrainingView*>(w->view("training"));
        QString err;
        QVERIFY2(tv->replayTrace(trace, &err), qPrintable(err));
        QCOMPARE(w->trainer()->state(), TrainerRunner::State::Running);
        w->trainer()->pause();
        QCOMPARE(w->trainer()->state(), TrainerRunner::State::Paused);
        w->trainer()->resume();
        w->trainer()->finishNow();
        QCOMPARE(w->trainer()->state(), TrainerRunner::State::Finished);
        w->store()->flush();
        tv->refreshNow();
        QCOMPARE(tv->lossPoints(), 40);
        QCOMPARE(tv->valPoints(), 4);
        auto* bv = qobject_cast<BiasView*>(w->view("bias"));
        bv->setLayer(2);
        bv->refreshNow();
        QCOMPARE(bv->heatmapSize(), QSize(1 + 40, 16));  // the checkpoint bias recorded at load, then the trace
        QCOMPARE(bv->lineCount(), 6);
        QVERIFY(bv->maxVioPoints() >= 44);
    }

    void trainerTrainsAndOpensModel() {
#ifndef MOESCOPE_HAVE_TRAINER
        QSKIP("built without engine/train");
#else
        const QString corpus = tmp.filePath("corpus.txt");
        {
            QFile f(corpus);
            QVERIFY(f.open(QIODevice::WriteOnly));
            for (int i = 0; i < 200; ++i) f.write(QStringLiteral("the router sends token %1 to expert %2. ").arg(i).arg(i % 16).toUtf8());
        }
        auto* tv = qobject_cast<TrainingView*>(w->view("training"));
        QVERIFY(w->engineTrainer());
        const size_t before = w->store()->train().size();
        QSignalSpy done(w->engineTrainer(), &TrainerRunner::finished);
        QString err;
        QVERIFY2(tv->startTraining("tiny", {corpus}, 6, &err), qPrintable(err));
        w->engineTrainer()->pause();
        QCOMPARE(w->engineTrainer()->state(), TrainerRunner::State::Paused);
        w->engineTrainer()->resume();
        QVERIFY(done.wait(120000));
        const QString modelDir = done.first().first().toString();
        QVERIFY2(QFileInfo::exists(modelDir + "/config.json"), qPrintable(modelDir));
        w->store()->flush();
        QCOMPARE(int(w->store()->train().size() - before), 6);
        tv->refreshNow();
        QVERIFY(tv->lossPoints() >= 6);
        // The trained model opens in the chat and generates.
        QSignalSpy loaded(w->engine(), &EngineController::modelLoaded);
        w->openModel(modelDir);
        QVERIFY(loaded.wait(60000));
        GenerationSummary s;
        QVERIFY(generateOnce(*w, QStringLiteral("116, 104, 101"), 4, &s));
        QCOMPARE(s.tokens, 4);
#endif
    }
};

QTEST_MAIN(TestGuiExport)
#include "test_gui_export.moc"
