// Export and replay: every view writes a non-empty PNG, PDF and CSV, the CSVs hold exactly
// the telemetry, a view exports at the same well-defined size and looks the same whether its
// dock is on screen or a hidden tab (and the widgets on screen are left as they were), the
// session's JSONL replays into a window without a model and reproduces the views, and a
// training trace drives the training dashboard.
#include <QApplication>
#include <QDir>
#include <QDockWidget>
#include <QFile>
#include <QImage>
#include <QRegularExpression>
#include <QStandardPaths>
#include <QTemporaryDir>
#include <QTextStream>

#ifdef MOESCOPE_HAVE_TRAINER
#include "EngineTrainer.h"
#endif
#include "TrainerRunner.h"
#include "gui_test_util.h"
#include "views/BiasView.h"
#include "views/EvaluateView.h"
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

#include <qcustomplot.h>

// The tab group each dock sits in at start (MainWindow tabifies them so).
static const QStringList kRightGroup = {"routing", "latent", "mtp", "experts"};
static const QStringList kBottomGroup = {"bias", "training", "card", "evaluate"};

static QDockWidget* dockOf(MainWindow& w, const QString& view) { return w.findChild<QDockWidget*>(view + "Dock"); }

// Puts the view's dock back in its tab group and raises another tab of it: the view is hidden.
static bool hideInTab(MainWindow& w, const QString& view) {
    const QStringList& group = kRightGroup.contains(view) ? kRightGroup : kBottomGroup;
    const QString other = group[(group.indexOf(view) + 1) % group.size()];
    QDockWidget* d = dockOf(w, view);
    if (d->isFloating()) d->setFloating(false);
    w.tabifyDockWidget(dockOf(w, other), d);
    w.showView(other);
    QApplication::processEvents();
    return !w.view(view)->isOnScreen();
}

// The widget the view's grid lays out: the parent of its cells.
static QWidget* plotArea(PlotView* v) { return v->exportLayout(QSize(800, 600)).first().first->parentWidget(); }

// Floats the view's dock and sizes it so that the plot area is exactly `target`.
static bool showFloatingAt(MainWindow& w, const QString& view, const QSize& target) {
    QDockWidget* d = dockOf(w, view);
    QWidget* area = plotArea(w.view(view));
    d->setFloating(true);
    d->show();
    d->raise();
    if (!QTest::qWaitForWindowExposed(d)) return false;
    for (int i = 0; i < 6 && area->size() != target; ++i) {
        d->resize(d->size() + (target - area->size()));
        QApplication::processEvents();
        QTest::qWait(10);
    }
    return w.view(view)->isOnScreen() && area->size() == target;
}

// Everything export might disturb on screen: where each cell sits, and for plots the viewport,
// the axis rects, every axis' range, ticker and the ticks it shows.
static QString screenState(PlotView* v) {
    QString s;
    QTextStream o(&s);
    for (const auto& [widget, rect] : v->exportLayout(QSize(800, 600))) {
        const QRect g = widget->geometry();
        o << widget->metaObject()->className() << " at " << g.x() << ',' << g.y() << ' ' << g.width() << 'x' << g.height();
        if (auto* p = qobject_cast<QCustomPlot*>(widget)) {
            const QRect vp = p->viewport();
            o << " viewport " << vp.width() << 'x' << vp.height();
            for (QCPAxisRect* r : p->axisRects()) {
                o << " axisRect " << r->rect().x() << ',' << r->rect().y() << ' ' << r->rect().width() << 'x' << r->rect().height();
                for (QCPAxis* a : r->axes()) {
                    o << " [" << a->range().lower << ',' << a->range().upper << " ticker " << quintptr(a->ticker().data()) << " ticks";
                    for (double t : a->tickVector()) o << ' ' << t;
                    o << ']';
                }
            }
        }
        o << '\n';
    }
    return s;
}

static bool near(QRgb a, QRgb b, int tol) {
    return std::abs(qRed(a) - qRed(b)) <= tol && std::abs(qGreen(a) - qGreen(b)) <= tol && std::abs(qBlue(a) - qBlue(b)) <= tol;
}

// The share of pixels that are neither the window colour (the gaps) nor white (plot and table
// backgrounds): axes, labels, text, bars, colour maps.
static double inkShare(const QImage& img, const QColor& window) {
    const QImage im = img.convertToFormat(QImage::Format_RGB32);
    qint64 ink = 0;
    for (int y = 0; y < im.height(); ++y) {
        const QRgb* line = reinterpret_cast<const QRgb*>(im.constScanLine(y));
        for (int x = 0; x < im.width(); ++x)
            if (!near(line[x], window.rgb(), 12) && !near(line[x], qRgb(255, 255, 255), 12)) ++ink;
    }
    return double(ink) / double(im.width() * qint64(im.height()));
}

// The share of pixels that differ by more than `tol` in some channel (same size required).
static double differentShare(const QImage& a, const QImage& b, int tol = 40) {
    if (a.size() != b.size()) return 1.0;
    const QImage x = a.convertToFormat(QImage::Format_RGB32), y = b.convertToFormat(QImage::Format_RGB32);
    qint64 diff = 0;
    for (int row = 0; row < x.height(); ++row) {
        const QRgb* l0 = reinterpret_cast<const QRgb*>(x.constScanLine(row));
        const QRgb* l1 = reinterpret_cast<const QRgb*>(y.constScanLine(row));
        for (int col = 0; col < x.width(); ++col)
            if (!near(l0[col], l1[col], tol)) ++diff;
    }
    return double(diff) / double(x.width() * qint64(x.height()));
}

// The first page's /MediaBox of a PDF written by QPdfWriter, in points.
static QSizeF pdfPageSize(const QString& path) {
    QFile f(path);
    if (!f.open(QIODevice::ReadOnly)) return {};
    const auto m = QRegularExpression(QStringLiteral("/MediaBox \\[\\s*0\\s+0\\s+([0-9.]+)\\s+([0-9.]+)\\s*\\]"))
                       .match(QString::fromLatin1(f.readAll()));
    return m.hasMatch() ? QSizeF(m.captured(1).toDouble(), m.captured(2).toDouble()) : QSizeF();
}

static void viewRows() {
    QTest::addColumn<QString>("view");
    for (const QString& v : kRightGroup + kBottomGroup) QTest::newRow(qPrintable(v)) << v;
}

class TestGuiExport : public QObject {
    Q_OBJECT
    MainWindow* w = nullptr;
    QTemporaryDir tmp;

private slots:
    void initTestCase() {
        QStandardPaths::setTestModeEnabled(true);  // trained models go to a test location
        w = fixtureWindow();
        QVERIFY(w);
        w->chat()->setStopAtEos(false);
        QVERIFY(generateOnce(*w, QStringLiteral("3, 1, 4, 1, 5, 9, 2, 6"), 12));
        w->store()->select(10);
        // The Evaluate view with a report (every expert on: no ablation, the cache stays).
        const QString text = tmp.filePath("held-out.txt");
        QFile f(text);
        QVERIFY(f.open(QIODevice::WriteOnly));
        for (int i = 0; i < 200; ++i) f.putChar(char('a' + i * 5 % 26));
        f.close();
        auto* ev = qobject_cast<EvaluateView*>(w->view("evaluate"));
        QVERIFY(ev);
        ev->setTextPath(text);
        QSignalSpy scored(w->engine(), &EngineController::evaluationFinished);
        ev->run();
        QVERIFY(scored.wait(60000) || scored.count() == 1);
    }
    void cleanupTestCase() { delete w; }
    // Every dock back in its tab group, the first tab of each group raised, whatever a test did.
    void cleanup() {
        for (const QStringList& group : {kRightGroup, kBottomGroup}) {
            for (const QString& v : group)
                if (dockOf(*w, v)->isFloating()) dockOf(*w, v)->setFloating(false);
            for (int i = 1; i < group.size(); ++i) w->tabifyDockWidget(dockOf(*w, group[0]), dockOf(*w, group[i]));
            w->showView(group[0]);
        }
        QApplication::processEvents();
    }

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

    // A view in a hidden tab exports at the documented default size with its plots drawn, and
    // the export leaves its widgets as they were.
    void hiddenViewExportsAtDefaultSize_data() { viewRows(); }
    void hiddenViewExportsAtDefaultSize() {
        QFETCH(QString, view);
        PlotView* v = w->view(view);
        QVERIFY(hideInTab(*w, view));
        v->refreshNow();
        const QString before = screenState(v);
        const QSize size = PlotView::defaultExportSize();
        QCOMPARE(v->exportSize(), size);
        const QString base = tmp.filePath("hidden/") + view;
        QDir().mkpath(tmp.filePath("hidden"));
        QString err;
        QVERIFY2(v->exportTo(base, &err), qPrintable(err));
        const qreal dpr = std::max<qreal>(1.0, w->devicePixelRatioF());
        const QImage png(base + ".png");
        QCOMPARE(png.size(), QSize(qRound(size.width() * dpr), qRound(size.height() * dpr)));
        const double ink = inkShare(png, plotArea(v)->palette().color(QPalette::Window));
        QVERIFY2(ink > 0.02, qPrintable(QStringLiteral("%1: only %2% of the PNG is drawn").arg(view).arg(ink * 100)));
        QCOMPARE(pdfPageSize(base + ".pdf"), QSizeF(size));
        QCOMPARE(screenState(v), before);
        QVERIFY(!v->isOnScreen());
    }

    // The same view exported while on screen with its plot area at the default size, and while
    // a hidden tab (after its ticks were chosen for the tab's own, other size): the two images
    // are the same, and the on-screen one is what the window shows.
    void hiddenExportMatchesVisibleExport_data() { viewRows(); }
    void hiddenExportMatchesVisibleExport() {
        QFETCH(QString, view);
        PlotView* v = w->view(view);
        const QSize size = PlotView::defaultExportSize();
        QVERIFY(hideInTab(*w, view));
        v->refreshNow();
        const QString hiddenState = screenState(v);
        const QString hiddenPng = tmp.filePath("match-hidden-") + view + ".png";
        QString err;
        QVERIFY2(v->exportPng(hiddenPng, &err), qPrintable(err));
        QCOMPARE(screenState(v), hiddenState);

        QVERIFY(showFloatingAt(*w, view, size));
        v->refreshNow();
        QApplication::processEvents();
        // The stand-in grid puts every cell where the real layout put it.
        for (const auto& [widget, rect] : v->exportLayout(size)) QCOMPARE(rect, widget->geometry());
        QCOMPARE(v->exportSize(), size);
        const QString shownState = screenState(v);
        const QString shownPng = tmp.filePath("match-shown-") + view + ".png";
        QVERIFY2(v->exportPng(shownPng, &err, QSize(), 1.0), qPrintable(err));
        QCOMPARE(screenState(v), shownState);
        const QImage grabbed = plotArea(v)->grab().toImage();

        const QImage hidden(hiddenPng), shown(shownPng);
        QCOMPARE(shown.size(), size);
        QCOMPARE(hidden.size(), size);
        const double hiddenVsShown = differentShare(hidden, shown);
        QVERIFY2(hiddenVsShown < 0.002, qPrintable(QStringLiteral("%1: %2% of the pixels differ").arg(view).arg(hiddenVsShown * 100)));
        const double shownVsScreen = differentShare(shown, grabbed);
        QVERIFY2(shownVsScreen < 0.01, qPrintable(QStringLiteral("%1: %2% of the pixels differ from the screen").arg(view).arg(shownVsScreen * 100)));
    }

    // A view on screen but small exports at the default size; one on screen and large enough
    // exports at its on-screen size.
    void onScreenSizeRule() {
        PlotView* v = w->view("routing");
        const QSize small(PlotView::minOnScreenExportSize().width() - 20, PlotView::minOnScreenExportSize().height() + 40);
        QVERIFY(showFloatingAt(*w, "routing", small));
        QCOMPARE(v->exportSize(), PlotView::defaultExportSize());
        const QSize large(1000, 700);
        QVERIFY(showFloatingAt(*w, "routing", large));
        QCOMPARE(v->exportSize(), large);
        QString err;
        const QString base = tmp.filePath("large-routing");
        QVERIFY2(v->exportTo(base, &err), qPrintable(err));
        QCOMPARE(QImage(base + ".png").size() / std::max<qreal>(1.0, w->devicePixelRatioF()), large);
        QCOMPARE(pdfPageSize(base + ".pdf"), QSizeF(large));
        // Export all views: every view at the default size, this large on-screen one included.
        const QString dir = tmp.filePath("all");
        QVERIFY2(w->exportAllViews(dir, &err), qPrintable(err));
        QVERIFY(v->isOnScreen());
        const QSize size = PlotView::defaultExportSize();
        for (auto* view : w->views()) {
            const QString b = dir + "/" + view->viewName();
            QCOMPARE(QImage(b + ".png").size() / std::max<qreal>(1.0, w->devicePixelRatioF()), size);
            QCOMPARE(pdfPageSize(b + ".pdf"), QSizeF(size));
        }
    }

    // A view that was never shown (its widgets still hidden, never laid out) draws the same
    // figure as the window's own view of the same store.
    void neverShownViewExports() {
        const QSize size = PlotView::defaultExportSize();
        RoutingView routing(w->store());
        ModelCardView card(w->store());
        for (PlotView* v : {static_cast<PlotView*>(&routing), static_cast<PlotView*>(&card)}) {
            QVERIFY(!v->isOnScreen());
            QCOMPARE(v->exportSize(), size);
            QVERIFY(hideInTab(*w, v->viewName()));
            const QImage mine = v->renderImage(size), windows = w->view(v->viewName())->renderImage(size);
            QCOMPARE(mine.size(), size);
            const double d = differentShare(mine, windows);
            QVERIFY2(d < 0.002, qPrintable(QStringLiteral("%1: %2% of the pixels differ").arg(v->viewName()).arg(d * 100)));
        }
    }

    // At device pixel ratio 2 the image has twice the pixels each way and shows the same figure.
    void devicePixelRatio() {
        PlotView* v = w->view("routing");
        const QSize size(700, 500);
        const QImage one = v->renderImage(size, 1.0), two = v->renderImage(size, 2.0);
        QCOMPARE(one.size(), size);
        QCOMPARE(two.size(), size * 2);
        QCOMPARE(two.devicePixelRatio(), 2.0);
        const QImage down = two.scaled(size, Qt::IgnoreAspectRatio, Qt::SmoothTransformation);
        // Text and hairlines are drawn anew at the finer grid, so edges differ a little (~1.3%);
        // a figure drawn at the wrong scale differs in most pixels.
        const double d = differentShare(one, down, 100);
        QVERIFY2(d < 0.03, qPrintable(QStringLiteral("%1% of the pixels differ").arg(d * 100)));
        QVERIFY(inkShare(two, plotArea(v)->palette().color(QPalette::Window)) > 0.02);
        const QString path = tmp.filePath("dpr2-routing.png");
        QString err;
        QVERIFY2(v->exportPng(path, &err, size, 2.0), qPrintable(err));
        QCOMPARE(QImage(path).size(), size * 2);
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
        // The data behind every view is identical, the evaluation too (its record in the trace).
        QVERIFY(w->store()->evaluation());
        QVERIFY(qobject_cast<EvaluateView*>(w->view("evaluate"))->perplexityBarCount() > 0);
        for (auto* v : w->views()) {
            if (v->viewName() == QLatin1String("mtp") || v->viewName() == QLatin1String("card")) continue;
            QCOMPARE(replay.view(v->viewName())->csv(), v->csv());
        }
        QCOMPARE(qobject_cast<EvaluateView*>(replay.view("evaluate"))->infoText(),
                 qobject_cast<EvaluateView*>(w->view("evaluate"))->infoText());
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
