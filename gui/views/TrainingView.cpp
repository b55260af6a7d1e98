// TrainingView: train/eval records as curves, the last bias of every layer as a heatmap.
#include "views/TrainingView.h"

#include <QComboBox>
#include <QDoubleSpinBox>
#include <QFileDialog>
#include <QGridLayout>
#include <QHBoxLayout>
#include <QLabel>
#include <QLineEdit>
#include <QPushButton>
#include <QSpinBox>
#include <QTextStream>

#include <qcustomplot.h>

#include "TelemetryStore.h"
#include "TrainerRunner.h"

using namespace moescope;

TrainingView::TrainingView(TelemetryStore* store, QWidget* parent)
    : PlotView(store, QStringLiteral("training"), tr("Training"), parent) {
    auto* form = new QWidget;
    auto* g = new QGridLayout(form);
    g->setContentsMargins(0, 0, 0, 0);
    m_preset = new QComboBox;
    m_preset->addItem(tr("tiny preset"), QStringLiteral("tiny"));
    m_preset->addItem(tr("small preset"), QStringLiteral("small"));
    m_preset->addItem(tr("config.json..."), QString());
    m_corpus = new QLineEdit;
    m_corpus->setPlaceholderText(tr("corpus text files (; separated)"));
    auto* browse = new QPushButton(tr("..."));
    m_balance = new QComboBox;
    m_balance->addItems({QStringLiteral("aux-free"), QStringLiteral("aux-loss"), QStringLiteral("seq-aux"), QStringLiteral("none")});
    m_gamma = new QDoubleSpinBox;
    m_gamma->setDecimals(4);
    m_gamma->setRange(0, 1);
    m_gamma->setValue(0.001);
    m_steps = new QSpinBox;
    m_steps->setRange(1, 1000000);
    m_steps->setValue(500);
    m_start = new QPushButton(tr("Start"));
    m_pause = new QPushButton(tr("Pause"));
    m_stop = new QPushButton(tr("Stop"));
    m_replay = new QPushButton(tr("Replay trace..."));
    m_open = new QPushButton(tr("Open trained model"));
    m_status = new QLabel(tr("The trainer is not built into this version yet: replay a training trace (JSONL)."));
    m_status->setWordWrap(true);
    g->addWidget(new QLabel(tr("Model:")), 0, 0);
    g->addWidget(m_preset, 0, 1);
    g->addWidget(new QLabel(tr("Corpus:")), 0, 2);
    g->addWidget(m_corpus, 0, 3);
    g->addWidget(browse, 0, 4);
    g->addWidget(new QLabel(tr("Balancing:")), 0, 5);
    g->addWidget(m_balance, 0, 6);
    g->addWidget(new QLabel(tr("gamma")), 0, 7);
    g->addWidget(m_gamma, 0, 8);
    g->addWidget(new QLabel(tr("steps")), 0, 9);
    g->addWidget(m_steps, 0, 10);
    auto* buttons = new QHBoxLayout;
    for (auto* b : {m_start, m_pause, m_stop, m_replay, m_open}) buttons->addWidget(b);
    buttons->addWidget(m_status, 1);
    g->addLayout(buttons, 1, 0, 1, 11);
    g->setColumnStretch(3, 1);
    controls()->addWidget(form, 1);

    auto title = [](QCustomPlot* p, const QString& t) {
        p->plotLayout()->insertRow(0);
        p->plotLayout()->addElement(0, 0, new QCPTextElement(p, t));
    };
    auto line = [](QCustomPlot* p, const QColor& c, const QString& name) {
        auto* gr = p->addGraph();
        gr->setPen(QPen(c, 1.5));
        gr->setName(name);
        return gr;
    };
    m_lossPlot = addPlot(0, 0);
    title(m_lossPlot, tr("loss"));
    m_lossPlot->legend->setVisible(true);
    line(m_lossPlot, QColor(33, 145, 140), tr("train loss"));
    line(m_lossPlot, QColor(200, 60, 60), tr("validation loss"))->setScatterStyle(QCPScatterStyle(QCPScatterStyle::ssDisc, 5));
    line(m_lossPlot, QColor(120, 120, 200), tr("MTP loss"));
    m_vioPlot = addPlot(0, 1);
    title(m_vioPlot, tr("MaxVio"));
    m_vioPlot->legend->setVisible(true);
    line(m_vioPlot, QColor(230, 120, 30), tr("batch"));
    line(m_vioPlot, QColor(120, 60, 160), tr("global (validation)"))->setScatterStyle(QCPScatterStyle(QCPScatterStyle::ssDisc, 5));
    legendBelow(m_lossPlot);
    legendBelow(m_vioPlot);
    m_lrPlot = addPlot(1, 0);
    title(m_lrPlot, tr("learning rate"));
    line(m_lrPlot, QColor(59, 82, 139), tr("lr"));
    m_speedPlot = addPlot(1, 1);
    title(m_speedPlot, tr("tokens/s"));
    line(m_speedPlot, QColor(94, 160, 60), tr("tokens/s"));
    // The loss and MaxVio plots carry their legends: more of the height, the rest may shrink.
    plotGrid()->setRowStretch(0, 3);
    plotGrid()->setRowStretch(1, 2);
    for (auto* p : {m_lrPlot, m_speedPlot}) {
        p->setMinimumHeight(100);
        p->yAxis->ticker()->setTickCount(3);  // a short plot: fewer labels, none overlapping
    }
    m_biasPlot = addPlot(0, 2, 2, 1);
    m_biasMap = addColorMap(m_biasPlot, tr("bias"));
    title(m_biasPlot, tr("bias now (layer x expert)"));  // after the colour scale took column 1 of row 0
    m_biasMap->setGradient(QCPColorGradient(QCPColorGradient::gpPolar));
    m_biasPlot->xAxis->setLabel(tr("expert"));
    m_biasPlot->yAxis->setLabel(tr("layer"));
    for (auto* p : {m_lossPlot, m_vioPlot, m_lrPlot, m_speedPlot}) p->xAxis->setLabel(tr("step"));
    m_lossPlot->yAxis->setLabel(tr("cross-entropy (nats)"));
    m_lrPlot->yAxis->setLabel(tr("learning rate"));
    m_speedPlot->yAxis->setLabel(tr("tokens/s"));
    m_vioPlot->yAxis->setLabel(tr("max load / mean - 1"));
    m_biasPlot->yAxis->setLabel(tr("MoE layer"));
    const QString hints[4] = {tr("no training run yet: Start one above, or replay a trace"), tr("load balance appears as the run trains"),
                              tr("warm-up, then cosine decay"), tr("throughput of each step")};
    QCustomPlot* curvePlots[4] = {m_lossPlot, m_vioPlot, m_lrPlot, m_speedPlot};
    for (int i = 0; i < 4; ++i) {
        m_hint[i] = new QCPItemText(curvePlots[i]);
        m_hint[i]->setPositionAlignment(Qt::AlignCenter);
        m_hint[i]->position->setType(QCPItemPosition::ptAxisRectRatio);
        m_hint[i]->position->setCoords(0.5, 0.5);
        m_hint[i]->setText(hints[i]);
    }

    connect(browse, &QPushButton::clicked, this, [this] {
        QStringList files = QFileDialog::getOpenFileNames(this, tr("Corpus files"), QString(), tr("Text (*.txt *.md *.jsonl);;All files (*)"));
        if (!files.isEmpty()) m_corpus->setText(files.join(QLatin1Char(';')));
    });
    connect(m_preset, &QComboBox::activated, this, [this](int i) {
        if (!m_preset->itemData(i).toString().isEmpty()) return;
        QString f = QFileDialog::getOpenFileName(this, tr("Model config"), QString(), tr("config.json (*.json)"));
        if (!f.isEmpty()) {
            m_configPath = f;
            m_preset->setItemText(i, QFileInfo(f).fileName());
        }
    });
    connect(m_start, &QPushButton::clicked, this, &TrainingView::start);
    connect(m_pause, &QPushButton::clicked, this, [this] {
        if (!m_active) return;
        if (m_active->state() == TrainerRunner::State::Paused) m_active->resume();
        else m_active->pause();
    });
    connect(m_stop, &QPushButton::clicked, this, [this] {
        if (m_active) m_active->stop();
    });
    connect(m_replay, &QPushButton::clicked, this, [this] {
        QString f = QFileDialog::getOpenFileName(this, tr("Training trace"), QString(), tr("Telemetry (*.jsonl)"));
        QString err;
        if (!f.isEmpty() && !replayTrace(f, &err)) m_status->setText(err);
    });
    connect(m_open, &QPushButton::clicked, this, [this] {
        if (!m_trainedDir.isEmpty()) emit openModelRequested(m_trainedDir);
    });
    updateButtons();
    setDark(false);
}

void TrainingView::attach(TrainerRunner* runner) {
    connect(runner, &TrainerRunner::stateChanged, this, &TrainingView::updateButtons);
    connect(runner, &TrainerRunner::progress, this, [this, runner](qint64 step, qint64 total) {
        m_status->setText(tr("%1: step %2 of %3").arg(runner->name()).arg(step).arg(total));
    });
    connect(runner, &TrainerRunner::finished, this, [this, runner](const QString& dir) {
        if (!dir.isEmpty()) m_trainedDir = dir;
        m_status->setText(dir.isEmpty() ? tr("%1 finished").arg(runner->name()) : tr("finished: the model is in %1").arg(dir));
        updateButtons();
    });
    connect(runner, &TrainerRunner::failed, this, [this](const QString& msg) {
        m_status->setText(msg);
        updateButtons();
    });
}

void TrainingView::setRunner(TrainerRunner* runner) {
    m_runner = runner;
    attach(runner);
    m_status->setText(tr("Choose a model preset or config.json, corpus files and a balancing mode, then Start."));
    updateButtons();
}

void TrainingView::setReplayRunner(TrainerRunner* runner) {
    m_replayRunner = runner;
    attach(runner);
    updateButtons();
}

void TrainingView::updateButtons() {
    auto activeState = [](TrainerRunner* r) { return r && (r->state() == TrainerRunner::State::Running || r->state() == TrainerRunner::State::Paused); };
    const bool active = activeState(m_runner) || activeState(m_replayRunner);
    const auto st = m_active ? m_active->state() : TrainerRunner::State::Idle;
    m_start->setEnabled(m_runner && !active);
    m_start->setToolTip(m_runner ? tr("Train from scratch on the corpus") : tr("This build has no trainer: replay a training trace instead"));
    m_pause->setEnabled(active);
    m_pause->setText(st == TrainerRunner::State::Paused ? tr("Resume") : tr("Pause"));
    m_stop->setEnabled(active);
    m_replay->setEnabled(m_replayRunner && !active);
    m_open->setEnabled(!m_trainedDir.isEmpty());
}

void TrainingView::start() {
    if (!m_runner) return;
    TrainSettings s;
    s.preset = m_preset->currentData().toString();
    s.configPath = s.preset.isEmpty() ? m_configPath : QString();
    s.corpus = m_corpus->text().split(QLatin1Char(';'), Qt::SkipEmptyParts);
    s.balance = m_balance->currentText();
    s.gamma = m_gamma->value();
    s.steps = m_steps->value();
    QString err;
    m_active = m_runner;
    if (!m_runner->start(s, &err)) m_status->setText(err);
    updateButtons();
}

bool TrainingView::startTraining(const QString& preset, const QStringList& corpus, int steps, QString* error) {
    const int i = m_preset->findData(preset);
    if (i >= 0) m_preset->setCurrentIndex(i);
    m_corpus->setText(corpus.join(QLatin1Char(';')));
    m_steps->setValue(steps);
    start();
    const bool ok = m_runner && (m_runner->state() == TrainerRunner::State::Running);
    if (!ok && error) *error = m_status->text();
    return ok;
}

bool TrainingView::replayTrace(const QString& path, QString* error) {
    if (!m_replayRunner) return false;
    TrainSettings s;
    s.tracePath = path;
    QString err;
    m_active = m_replayRunner;
    const bool ok = m_replayRunner->start(s, &err);
    if (!ok) m_status->setText(err);
    if (error) *error = err;
    updateButtons();
    return ok;
}

void TrainingView::refresh() {
    QVector<double> x, loss, mtp, lr, tps, vx, val, vio, gv;
    for (const auto& t : m_store->train()) {
        x << double(t.step);
        loss << t.loss;
        mtp << t.mtp_loss;
        lr << t.lr;
        tps << t.tokens_per_s;
        vio << t.maxvio_batch;
    }
    for (const auto& e : m_store->evals()) {
        vx << double(e.step);
        val << e.val_loss;
        gv << e.maxvio_global;
    }
    const bool anyMtp = std::any_of(mtp.begin(), mtp.end(), [](double v) { return v != 0; });
    m_lossPlot->graph(0)->setData(x, loss, true);
    m_lossPlot->graph(1)->setData(vx, val, true);
    m_lossPlot->graph(2)->setData(anyMtp ? x : QVector<double>{}, anyMtp ? mtp : QVector<double>{}, true);
    m_vioPlot->graph(0)->setData(x, vio, true);
    m_vioPlot->graph(1)->setData(vx, gv, true);
    m_lrPlot->graph(0)->setData(x, lr, true);
    m_speedPlot->graph(0)->setData(x, tps, true);
    const bool any = !x.isEmpty() || !vx.isEmpty();
    for (auto* p : {m_lossPlot, m_vioPlot, m_lrPlot, m_speedPlot}) {
        p->legend->setVisible(any && p->graphCount() > 1);
        if (!any) {  // no made-up axes while nothing has been measured
            p->xAxis->setRange(0, m_steps->value());
            p->yAxis->setRange(0, 1);
            continue;
        }
        p->rescaleAxes();
        if (p != m_lossPlot) p->yAxis->setRangeLower(0);
        const QCPRange r = p->yAxis->range();
        p->yAxis->setRange(p == m_lossPlot ? r.lower : 0.0, r.upper + std::max(r.size(), 1e-9) * 0.05);
    }
    for (int i = 0; i < 4; ++i) {
        m_hint[i]->setVisible(!any);
        m_hint[i]->setColor(dark() ? QColor(170, 170, 170) : QColor(110, 110, 110));
    }
    // The latest bias of each layer that has one.
    const auto& bias = m_store->bias();
    const int R = std::max<int>(1, int(bias.size()));
    int E = 1;
    for (const auto& [l, h] : bias) E = std::max(E, int(h.back().bias.size()));
    m_biasMap->data()->setSize(E, R);
    m_biasMap->data()->setRange(QCPRange(0, E - 1), QCPRange(0, R - 1));
    m_biasMap->data()->fill(0);
    double amax = 1e-9;
    std::vector<int> rows;
    int row = 0;
    for (const auto& [l, h] : bias) {
        for (size_t e = 0; e < h.back().bias.size(); ++e) {
            m_biasMap->data()->setCell(int(e), row, h.back().bias[e]);
            amax = std::max(amax, double(std::abs(h.back().bias[e])));
        }
        rows.push_back(l);
        ++row;
    }
    setRowTicks(m_biasPlot->yAxis, rows);
    if (amax <= 1e-9) amax = 1;  // all zero (no bias yet): a neutral map, not a 1e-9 colour scale
    m_biasMap->setDataRange(QCPRange(-amax, amax));
    m_biasPlot->xAxis->setRange(-0.5, E - 0.5);
    m_biasPlot->yAxis->setRange(-0.5, R - 0.5);
    setIntTicks(m_biasPlot->xAxis, E);
}

int TrainingView::lossPoints() const { return m_lossPlot->graph(0)->data()->size(); }
int TrainingView::valPoints() const { return m_lossPlot->graph(1)->data()->size(); }

QString TrainingView::csv() const {
    QString out;
    QTextStream s(&out);
    s << "kind,step,loss,mtp_loss,aux_loss,lr,grad_norm,tokens_per_s,maxvio\n";
    for (const auto& t : m_store->train())
        s << "train," << t.step << ',' << t.loss << ',' << t.mtp_loss << ',' << t.aux_loss << ',' << t.lr << ','
          << t.grad_norm << ',' << t.tokens_per_s << ',' << t.maxvio_batch << '\n';
    for (const auto& e : m_store->evals()) s << "eval," << e.step << ',' << e.val_loss << ",,,,,," << e.maxvio_global << '\n';
    return out;
}
