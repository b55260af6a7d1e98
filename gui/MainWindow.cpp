// MainWindow: docks, menus, shortcuts, settings, drag-and-drop, themes.
#include "MainWindow.h"

#include <QAction>
#include <QApplication>
#include <QCloseEvent>
#include <QCoreApplication>
#include <QDir>
#include <QDockWidget>
#include <QDragEnterEvent>
#include <QFileDialog>
#include <QFileInfo>
#include <QJsonDocument>
#include <QJsonObject>
#include <QLabel>
#include <QMenuBar>
#include <QMessageBox>
#include <QMimeData>
#include <QProgressBar>
#include <QSettings>
#include <QStatusBar>
#include <QStyle>
#include <QStyleFactory>
#include <QVBoxLayout>

#include "ChatWidget.h"
#include "EngineController.h"
#include "TelemetryStore.h"
#ifdef MOESCOPE_HAVE_TRAINER
#include "EngineTrainer.h"
#endif
#include "TrainerRunner.h"
#include "views/BiasView.h"
#include "views/LatentView.h"
#include "views/ModelCardView.h"
#include "views/MtpView.h"
#include "views/EvaluateView.h"
#include "views/ExpertsView.h"
#include "views/RoutingView.h"
#include "views/TrainingView.h"

using namespace moescope;

// The .qrc is compiled into the static moescope_gui library: register it explicitly.
static void initResources() { Q_INIT_RESOURCE(resources); }

MainWindow::MainWindow(bool persistent, QWidget* parent) : QMainWindow(parent), m_persistent(persistent) {
    initResources();
    setWindowTitle(QStringLiteral("moescope"));
    setWindowIcon(QIcon(QStringLiteral(":/icons/moescope.svg")));
    setAcceptDrops(true);
    setDockNestingEnabled(true);
    m_store = new TelemetryStore(this);
    m_engine = new EngineController(m_store, this);
    m_trainer = new TraceReplayTrainer(m_store->sink(), this);

    auto* central = new QWidget;
    auto* cv = new QVBoxLayout(central);
    cv->setContentsMargins(0, 0, 0, 0);
    cv->setSpacing(0);
    m_banner = new QLabel;
    m_banner->setObjectName(QStringLiteral("banner"));
    m_banner->setWordWrap(true);
    m_banner->setVisible(false);
    m_banner->setTextInteractionFlags(Qt::TextSelectableByMouse);
    cv->addWidget(m_banner);
    m_chat = new ChatWidget(m_engine, m_store, central);
    cv->addWidget(m_chat, 1);
    setCentralWidget(central);

    auto* routing = new RoutingView(m_store);
    auto* bias = new BiasView(m_store);
    auto* latent = new LatentView(m_store);
    auto* mtp = new MtpView(m_store);
    auto* experts = new ExpertsView(m_store);
    auto* training = new TrainingView(m_store);
    auto* card = new ModelCardView(m_store);
    auto* evaluate = new EvaluateView(m_store);
    training->setReplayRunner(m_trainer);
#ifdef MOESCOPE_HAVE_TRAINER
    m_engineTrainer = new EngineTrainer(m_store->sink(), this);
    training->setRunner(m_engineTrainer);
#endif
    QDockWidget* dRouting = addView(routing, Qt::RightDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_1));
    QDockWidget* dLatent = addView(latent, Qt::RightDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_2));
    QDockWidget* dMtp = addView(mtp, Qt::RightDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_3));
    QDockWidget* dExperts = addView(experts, Qt::RightDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_7));
    QDockWidget* dBias = addView(bias, Qt::BottomDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_4));
    QDockWidget* dTrain = addView(training, Qt::BottomDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_5));
    QDockWidget* dCard = addView(card, Qt::BottomDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_6));
    QDockWidget* dEval = addView(evaluate, Qt::BottomDockWidgetArea, QKeySequence(Qt::ALT | Qt::Key_8));
    tabifyDockWidget(dRouting, dLatent);
    tabifyDockWidget(dRouting, dMtp);
    tabifyDockWidget(dRouting, dExperts);
    tabifyDockWidget(dBias, dTrain);
    tabifyDockWidget(dBias, dCard);
    tabifyDockWidget(dBias, dEval);
    dRouting->raise();
    dBias->raise();

    connect(bias, &BiasView::onlineBalancingRequested, m_engine, &EngineController::setOnlineBalancing);
    connect(bias, &BiasView::resetBiasRequested, m_engine, &EngineController::resetBias);
    connect(routing, &RoutingView::wantScoresRequested, m_engine, &EngineController::setWantScores);
    connect(routing, &RoutingView::disabledExpertsRequested, m_engine, &EngineController::setDisabledExperts);
    connect(routing, &RoutingView::dropTopRequested, m_engine, &EngineController::setDropTopExperts);
    connect(m_engine, &EngineController::ablationFailed, this,
            [this, routing](const QString& msg) {
                statusBar()->showMessage(tr("Experts not switched off: %1").arg(msg), 15000);
                routing->showAblationInForce();  // its controls back from the refused request
            });
    connect(latent, &LatentView::latentLayerRequested, m_engine, &EngineController::setLatentLayer);
    connect(evaluate, &EvaluateView::evaluationRequested, m_engine,
            [this](const QString& path, int windows, EvalSweep sweep, int layer) {
                m_engine->evaluate(path, windows, sweep, 12, layer);
            });
    connect(evaluate, &EvaluateView::cancelRequested, m_engine, &EngineController::cancel);
    connect(m_engine, &EngineController::evaluationProgress, evaluate, &EvaluateView::setProgress);
    connect(m_engine, &EngineController::evaluationFinished, evaluate, &EvaluateView::setReport);
    connect(m_engine, &EngineController::evaluationFailed, evaluate, &EvaluateView::setFailure);
    connect(m_engine, &EngineController::modelLoaded, evaluate, &EvaluateView::clear);
    connect(m_engine, &EngineController::busyChanged, evaluate, &EvaluateView::setBusy);
    connect(training, &TrainingView::openModelRequested, this, &MainWindow::openModel);

    m_backend = new QLabel(tr("no model"));
    m_backend->setObjectName(QStringLiteral("backendLabel"));
    m_modelLabel = new QLabel;
    m_progress = new QProgressBar;
    m_progress->setRange(0, 1000);
    m_progress->setMaximumWidth(240);
    m_progress->setVisible(false);
    statusBar()->addWidget(m_modelLabel, 1);
    statusBar()->addPermanentWidget(m_progress);
    statusBar()->addPermanentWidget(m_backend);

    connect(m_engine, &EngineController::loadStarted, this, [this](const QString& dir) {
        m_loadingDir = dir;
        m_progress->setValue(0);
        m_progress->setVisible(true);
        m_modelLabel->setText(tr("loading %1 ...").arg(QDir::toNativeSeparators(dir)));
    });
    connect(m_engine, &EngineController::loadProgress, this, [this](double f, const QString& what) {
        m_progress->setValue(int(f * 1000));
        m_progress->setFormat(what.isEmpty() ? QStringLiteral("%p%") : what);
    });
    connect(m_engine, &EngineController::modelLoaded, this, &MainWindow::onModelLoaded);
    // A backend may change its path while it runs (a GPU self-check): the status bar says so.
    connect(m_engine, &EngineController::generationFinished, this, [this](const GenerationSummary& s) {
        if (s.backendNotice.isEmpty() || m_backend->toolTip().contains(s.backendNotice)) return;
        m_backend->setToolTip(m_backend->toolTip() + QStringLiteral("\n") + s.backendNotice);
        statusBar()->showMessage(tr("Backend: %1").arg(s.backendNotice), 15000);
    });
    connect(m_engine, &EngineController::loadFailed, this, [this](const QString& dir, const QString& msg) {
        m_progress->setVisible(false);
        const QString prev = m_engine->isLoaded() ? tr(" The previous model (%1) is still loaded.").arg(m_engine->info().dir) : QString();
        setBanner(tr("Could not open %1: %2.%3").arg(QDir::toNativeSeparators(dir), msg, prev), true);
        m_modelLabel->setText(m_engine->isLoaded() ? QDir::toNativeSeparators(m_engine->info().dir) : tr("no model"));
    });
    connect(m_chat, &ChatWidget::statusMessage, this, [this](const QString& s) { statusBar()->showMessage(s, 8000); });

    buildMenus();
    resize(1500, 950);
    if (m_persistent) loadSettings();
}

MainWindow::~MainWindow() {
    // The engine and trainer threads write into the store's sink: stop them before the store goes.
    delete m_engine;
    m_engine = nullptr;
    delete m_engineTrainer;
    m_engineTrainer = nullptr;
    delete m_trainer;
    m_trainer = nullptr;
}

QDockWidget* MainWindow::addView(PlotView* v, Qt::DockWidgetArea area, const QKeySequence& key) {
    auto* d = new QDockWidget(v->title(), this);
    d->setObjectName(v->viewName() + QStringLiteral("Dock"));  // saveState needs names
    d->setWidget(v);
    addDockWidget(area, d);
    m_views << v;
    m_docks[v->viewName()] = d;
    // A tab raised or a dock shown: the view catches up with the data it skipped while hidden.
    connect(d, &QDockWidget::visibilityChanged, v, [v](bool visible) {
        if (visible) v->catchUp();
    });
    QAction* a = d->toggleViewAction();
    a->setShortcut(key);
    return d;
}

void MainWindow::buildMenus() {
    QMenu* file = menuBar()->addMenu(tr("&File"));
    QAction* a = file->addAction(QIcon(QStringLiteral(":/icons/open.svg")), tr("&Open model folder..."), this, [this] {
        const QString d = QFileDialog::getExistingDirectory(this, tr("Model folder (config.json + *.safetensors)"));
        if (!d.isEmpty()) openModel(d);
    });
    a->setShortcut(QKeySequence::Open);
    m_recentMenu = file->addMenu(tr("Recent models"));
    file->addAction(tr("Open &default model"), this, &MainWindow::openDefaultModel);
    file->addSeparator();
    a = file->addAction(QIcon(QStringLiteral(":/icons/trace.svg")), tr("Open &trace (replay)..."), this, [this] {
        const QString f = QFileDialog::getOpenFileName(this, tr("Telemetry trace"), QString(), tr("JSONL (*.jsonl)"));
        QString err;
        if (!f.isEmpty() && !openTrace(f, &err)) setBanner(err, true);
    });
    a->setShortcut(QKeySequence(Qt::CTRL | Qt::Key_T));
    a = file->addAction(tr("&Save telemetry (JSONL)..."), this, [this] {
        const QString f = QFileDialog::getSaveFileName(this, tr("Save telemetry"), QStringLiteral("moescope-trace.jsonl"), tr("JSONL (*.jsonl)"));
        QString err;
        if (!f.isEmpty() && !saveTelemetry(f, &err)) setBanner(err, true);
    });
    a->setShortcut(QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_S));
    a = file->addAction(QIcon(QStringLiteral(":/icons/export.svg")), tr("&Export all views (PNG, PDF, CSV)..."), this, [this] {
        const QString d = QFileDialog::getExistingDirectory(this, tr("Export into folder"));
        QString err;
        if (!d.isEmpty() && !exportAllViews(d, &err)) setBanner(err, true);
        else if (!d.isEmpty()) statusBar()->showMessage(tr("exported every view into %1").arg(d), 8000);
    });
    a->setShortcut(QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_E));
    file->addSeparator();
    file->addAction(tr("New conversation"), QKeySequence::New, m_chat, &ChatWidget::newConversation);
    file->addAction(tr("Open conversation..."), this, [this] {
        const QString f = QFileDialog::getOpenFileName(this, tr("Conversation"), QString(), tr("JSON (*.json)"));
        QString err;
        if (!f.isEmpty() && !m_chat->openConversation(f, &err)) setBanner(err, true);
    });
    file->addAction(tr("Save conversation..."), QKeySequence::Save, this, [this] {
        const QString f = QFileDialog::getSaveFileName(this, tr("Conversation"), QStringLiteral("conversation.json"), tr("JSON (*.json)"));
        QString err;
        if (!f.isEmpty() && !m_chat->saveConversation(f, &err)) setBanner(err, true);
    });
    file->addSeparator();
    file->addAction(tr("&Quit"), QKeySequence::Quit, this, &QWidget::close);

    m_viewMenu = menuBar()->addMenu(tr("&View"));
    for (auto* v : m_views) m_viewMenu->addAction(m_docks[v->viewName()]->toggleViewAction());
    m_viewMenu->addSeparator();
    QAction* dark = m_viewMenu->addAction(tr("&Dark palette"));
    dark->setObjectName(QStringLiteral("darkAction"));
    dark->setCheckable(true);
    dark->setShortcut(QKeySequence(Qt::CTRL | Qt::SHIFT | Qt::Key_D));
    connect(dark, &QAction::toggled, this, &MainWindow::setDark);
    QMenu* engine = menuBar()->addMenu(tr("&Engine"));
    QMenu* backend = engine->addMenu(tr("&Backend"));
    m_backendGroup = new QActionGroup(this);
    for (const auto& [name, label] : {std::pair{QStringLiteral("auto"), tr("&Auto (GPU when available)")},
                                      std::pair{QStringLiteral("cpu"), tr("&CPU")},
                                      std::pair{QStringLiteral("cuda"), tr("C&UDA GPU")}}) {
        QAction* b = backend->addAction(label);
        b->setObjectName(QStringLiteral("backend_") + name);
        b->setCheckable(true);
        b->setChecked(name == m_backendRequest);
        m_backendGroup->addAction(b);
        connect(b, &QAction::triggered, this, [this, name] { setBackendRequest(name); });
    }
    QMenu* help = menuBar()->addMenu(tr("&Help"));
    help->addAction(tr("&About moescope"), this, [this] {
        QMessageBox::about(this, tr("About moescope"),
                           tr("<b>moescope</b> %1<br/>A desktop explorer for DeepSeek-V3-family Mixture-of-Experts models: "
                              "routing, bias drift, the MLA latent cache and multi-token prediction, live.")
                               .arg(QStringLiteral(MOESCOPE_VERSION_STRING)));
    });
}

QString MainWindow::defaultModelDir(QString* notice) {
    const QString app = QCoreApplication::applicationDirPath();
    const QStringList candidates = {app + QStringLiteral("/models/default"), app + QStringLiteral("/../share/moescope/models/default"),
                                    QStringLiteral(MOESCOPE_GUI_SOURCE_DIR "/resources/models/default")};
    for (const QString& c : candidates)
        if (QFileInfo::exists(c + QStringLiteral("/config.json"))) {
            if (notice) notice->clear();
            return QDir::cleanPath(c);
        }
    if (notice)
        *notice = tr("The embedded default model (resources/models/default) is not there yet: opened the tiny-v3 test "
                     "fixture instead (random weights: its text means nothing, its telemetry is real).");
    return QStringLiteral(MOESCOPE_GUI_SOURCE_DIR "/tests/fixtures/tiny-v3");
}

void MainWindow::openDefaultModel() {
    const QString dir = defaultModelDir(&m_defaultNotice);
    openModel(dir);
}

void MainWindow::openModel(const QString& dir) {
    if (m_engine->isBusy()) {
        statusBar()->showMessage(tr("busy: stop the generation first"), 5000);
        return;
    }
    m_engine->loadModel(QDir::cleanPath(dir), m_backendRequest);
}

void MainWindow::setBackendRequest(const QString& request) {
    if (request != QStringLiteral("auto") && request != QStringLiteral("cpu") && request != QStringLiteral("cuda")) return;
    const bool changed = request != m_backendRequest;
    m_backendRequest = request;
    if (m_backendGroup)
        for (QAction* a : m_backendGroup->actions()) a->setChecked(a->objectName() == QStringLiteral("backend_") + request);
    if (changed && !m_modelDir.isEmpty()) openModel(m_modelDir);
}

void MainWindow::onModelLoaded(const ModelInfo& info) {
    m_progress->setVisible(false);
    m_modelLabel->setText(QDir::toNativeSeparators(info.dir));
    m_modelDir = info.dir;
    m_backend->setText(tr("backend: %1").arg(info.backendName));
    m_backend->setToolTip(info.backendNotice);
    QStringList notes;
    if (!m_defaultNotice.isEmpty() && info.dir == defaultModelDir()) notes << m_defaultNotice;
    if (!info.backendNotice.isEmpty()) notes << tr("Backend: %1").arg(info.backendNotice);
    if (!info.tokenizerNotice.isEmpty()) notes << info.tokenizerNotice;
    setBanner(notes.join(QStringLiteral("<br/>")), false);
    m_backend->setText(info.backendNotice.isEmpty() ? tr("backend: %1").arg(info.backendName)
                                                    : tr("backend: %1 (%2)").arg(info.backendName, info.backendNotice));
    addRecent(info.dir);
    m_chat->newConversation();
}

void MainWindow::setBanner(const QString& text, bool error) {
    m_banner->setVisible(!text.isEmpty());
    m_banner->setText(text);
    m_bannerError = error;
    if (m_dark)
        m_banner->setStyleSheet(error ? QStringLiteral("QLabel{background:#5c2328;color:#f5d0d4;padding:6px;border-bottom:1px solid #7a3038}")
                                      : QStringLiteral("QLabel{background:#4a4020;color:#f0e2b0;padding:6px;border-bottom:1px solid #6a5a28}"));
    else
        m_banner->setStyleSheet(error ? QStringLiteral("QLabel{background:#f8d7da;color:#58151c;padding:6px;border-bottom:1px solid #e0a0a8}")
                                      : QStringLiteral("QLabel{background:#fff3cd;color:#4d3b00;padding:6px;border-bottom:1px solid #e6d08a}"));
}

QString MainWindow::bannerText() const { return m_banner->isVisible() ? m_banner->text() : QString(); }
QString MainWindow::backendText() const { return m_backend->text(); }

bool MainWindow::openTrace(const QString& path, QString* error) {
    std::vector<Record> recs;
    try {
        recs = read_trace(path.toStdString());
    } catch (const std::exception& e) {
        if (error) *error = QString::fromUtf8(e.what());
        return false;
    }
    m_store->replace(recs);
    if (auto* evaluate = qobject_cast<EvaluateView*>(view(QStringLiteral("evaluate")))) {
        if (const EvaluationRecord* e = m_store->evaluation()) {
            evaluate->setReport(evaluationReport(*e));
            evaluate->setTextPath(QString::fromStdString(e->corpus));  // Run scores it again once a model is open
        } else {
            evaluate->clear();
        }
    }
    m_modelLabel->setText(tr("replaying %1 (%2 records)").arg(QDir::toNativeSeparators(path)).arg(recs.size()));
    return true;
}

bool MainWindow::saveTelemetry(const QString& path, QString* error) {
    m_store->flush();
    try {
        const QString tmp = path + QStringLiteral(".tmp");
        {
            JsonlWriter w(tmp.toStdString());
            for (const auto& r : m_store->records()) w.record(r);
            w.flush();
        }
        QFile::remove(path);
        if (!QFile::rename(tmp, path)) throw std::runtime_error("could not rename " + tmp.toStdString());
    } catch (const std::exception& e) {
        if (error) *error = QStringLiteral("%1: %2").arg(path, QString::fromUtf8(e.what()));
        return false;
    }
    return true;
}

bool MainWindow::exportAllViews(const QString& dir, QString* error) {
    QDir().mkpath(dir);
    // One size for every view, whatever the window's layout: a set of figures that match (same
    // type size when placed at the same width) and the same files from run to run.
    for (auto* v : m_views) {
        v->refreshNow();
        if (!v->exportTo(QDir(dir).filePath(v->viewName()), error, PlotView::defaultExportSize())) return false;
    }
    return true;
}

bool MainWindow::showView(const QString& name) {
    auto it = m_docks.find(name);
    if (it == m_docks.end()) return false;
    (*it)->show();
    (*it)->raise();
    return true;
}

PlotView* MainWindow::view(const QString& name) const {
    for (auto* v : m_views)
        if (v->viewName() == name) return v;
    return nullptr;
}

void MainWindow::setDark(bool dark) {
    m_dark = dark;
    QPalette p;
    if (dark) {
        p.setColor(QPalette::Window, QColor(45, 45, 48));
        p.setColor(QPalette::WindowText, QColor(220, 220, 220));
        p.setColor(QPalette::Base, QColor(30, 30, 32));
        p.setColor(QPalette::AlternateBase, QColor(45, 45, 48));
        p.setColor(QPalette::Text, QColor(220, 220, 220));
        p.setColor(QPalette::Button, QColor(55, 55, 58));
        p.setColor(QPalette::ButtonText, QColor(220, 220, 220));
        p.setColor(QPalette::Highlight, QColor(42, 130, 218));
        p.setColor(QPalette::HighlightedText, Qt::white);
        p.setColor(QPalette::ToolTipBase, QColor(55, 55, 58));
        p.setColor(QPalette::ToolTipText, QColor(220, 220, 220));
        p.setColor(QPalette::PlaceholderText, QColor(140, 140, 140));
        p.setColor(QPalette::Disabled, QPalette::Text, QColor(120, 120, 120));
        p.setColor(QPalette::Disabled, QPalette::ButtonText, QColor(120, 120, 120));
    } else {
        p = QApplication::style()->standardPalette();
    }
    QApplication::setPalette(p);
    for (auto* v : m_views) v->setDark(dark);
    setBanner(m_banner->isHidden() ? QString() : m_banner->text(), m_bannerError);
    if (auto* a = findChild<QAction*>(QStringLiteral("darkAction"))) {
        QSignalBlocker b(a);
        a->setChecked(dark);
    }
    m_chat->setColouring(ChatWidget::Colouring(m_chat->settingsJson().value("colouring").toInt()));
}

void MainWindow::addRecent(const QString& dir) {
    m_recent.removeAll(dir);
    m_recent.prepend(dir);
    while (m_recent.size() > 8) m_recent.removeLast();
    rebuildRecent();
}

void MainWindow::rebuildRecent() {
    m_recentMenu->clear();
    for (const QString& d : m_recent) m_recentMenu->addAction(QDir::toNativeSeparators(d), this, [this, d] { openModel(d); });
    m_recentMenu->setEnabled(!m_recent.isEmpty());
}

void MainWindow::saveSettings() {
    QSettings s;
    s.setValue("window/geometry", saveGeometry());
    s.setValue("window/state", saveState());
    s.setValue("recent", m_recent);
    s.setValue("dark", m_dark);
    s.setValue("backend", m_backendRequest);
    s.setValue("chat/settings", QJsonDocument(m_chat->settingsJson()).toJson(QJsonDocument::Compact));
}

void MainWindow::loadSettings() {
    QSettings s;
    restoreGeometry(s.value("window/geometry").toByteArray());
    m_restoredState = restoreState(s.value("window/state").toByteArray());
    m_recent = s.value("recent").toStringList();
    rebuildRecent();
    if (s.value("dark", false).toBool()) setDark(true);
    setBackendRequest(s.value("backend", QStringLiteral("auto")).toString());
    const QByteArray chat = s.value("chat/settings").toByteArray();
    if (!chat.isEmpty()) m_chat->applySettingsJson(QJsonDocument::fromJson(chat).object());
}

void MainWindow::showEvent(QShowEvent* e) {
    QMainWindow::showEvent(e);
    if (m_layoutDone) return;
    m_layoutDone = true;
    if (m_restoredState) return;  // the user's own layout
    // The views get most of the window: the right column a little over half of its width, the
    // bottom row about 40% of its height.
    resizeDocks({m_docks.value(QStringLiteral("routing"))}, {int(width() * 0.56)}, Qt::Horizontal);
    resizeDocks({m_docks.value(QStringLiteral("bias"))}, {int(height() * 0.42)}, Qt::Vertical);
}

void MainWindow::closeEvent(QCloseEvent* e) {
    m_engine->cancel();
    if (m_persistent) saveSettings();
    e->accept();
}

void MainWindow::dragEnterEvent(QDragEnterEvent* e) {
    if (e->mimeData()->hasUrls()) e->acceptProposedAction();
}

void MainWindow::dropEvent(QDropEvent* e) {
    for (const QUrl& u : e->mimeData()->urls()) {
        const QFileInfo fi(u.toLocalFile());
        if (fi.isDir()) {
            openModel(fi.absoluteFilePath());
        } else if (fi.suffix() == QLatin1String("jsonl")) {
            QString err;
            if (!openTrace(fi.absoluteFilePath(), &err)) setBanner(err, true);
        } else if (fi.fileName() == QLatin1String("config.json")) {
            openModel(fi.absolutePath());
        }
        break;
    }
}
