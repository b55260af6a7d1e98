// EvaluateView: draws an EvaluationReport; the view itself only formats.
#include "views/EvaluateView.h"

#include <QComboBox>
#include <QFileDialog>
#include <QFileInfo>
#include <QHBoxLayout>
#include <QLabel>
#include <QLineEdit>
#include <QPushButton>
#include <QSignalBlocker>
#include <QSpinBox>
#include <QTextStream>
#include <QToolButton>

#include <cmath>

#include <qcustomplot.h>

#include "engine/expert_analysis.h"

using namespace moescope;

EvaluateView::EvaluateView(TelemetryStore* store, QWidget* parent)
    : PlotView(store, QStringLiteral("evaluate"), tr("Evaluate"), parent) {
    controls()->addWidget(new QLabel(tr("Text:")));
    m_path = new QLineEdit;
    m_path->setObjectName(QStringLiteral("evalText"));
    m_path->setPlaceholderText(tr("a text file the model did not train on"));
    m_path->setMinimumWidth(120);
    m_path->setToolTip(tr("Held-out text to score: the model's cross-entropy on each next token, in windows of up to "
                          "512 tokens, with every expert on and with the experts switched off in the Routing view"));
    controls()->addWidget(m_path, 2);
    auto* browse = new QToolButton;
    browse->setText(tr("..."));
    browse->setToolTip(tr("Choose the text file"));
    controls()->addWidget(browse);
    controls()->addWidget(new QLabel(tr("Windows:")));
    m_windows = new QSpinBox;
    m_windows->setObjectName(QStringLiteral("evalWindows"));
    m_windows->setRange(0, 100000);
    m_windows->setValue(8);
    m_windows->setSpecialValueText(tr("all"));
    m_windows->setToolTip(tr("How many windows of the text to score (0: all of it)"));
    controls()->addWidget(m_windows);
    m_sweep = new QComboBox;
    m_sweep->setObjectName(QStringLiteral("evalSweep"));
    m_sweep->addItem(tr("no sweep"), int(EvalSweep::None));
    m_sweep->addItem(tr("Top off 0..k"), int(EvalSweep::TopR));
    m_sweep->addItem(tr("Top off by layer"), int(EvalSweep::PerLayer));
    m_sweep->addItem(tr("Each expert off"), int(EvalSweep::PerExpert));
    m_sweep->setToolTip(tr("Also score the text with each token's top 0, 1, ..., k experts dropped in every MoE layer "
                           "(DeepSeekMoE's redundancy test), with its top expert dropped in one MoE layer at a time "
                           "(which layer's routing matters most), or with each routed expert of one layer switched off "
                           "alone (which experts matter); the experts switched off in the Routing view stay off in "
                           "every run"));
    controls()->addWidget(m_sweep);
    m_expertLayer = new QComboBox;
    m_expertLayer->setObjectName(QStringLiteral("evalExpertLayer"));
    m_expertLayer->setToolTip(tr("The MoE layer whose routed experts are switched off one at a time"));
    m_expertLayer->setVisible(false);
    controls()->addWidget(m_expertLayer);
    connect(m_sweep, &QComboBox::currentIndexChanged, this, [this] {
        m_expertLayer->setVisible(EvalSweep(m_sweep->currentData().toInt()) == EvalSweep::PerExpert);
    });
    m_history = new QComboBox;
    m_history->setObjectName(QStringLiteral("evalHistory"));
    m_history->setToolTip(tr("The evaluations of this session, or of the replayed trace (the command line writes one "
                             "per ablation run): choose one to show it"));
    m_history->setSizeAdjustPolicy(QComboBox::AdjustToMinimumContentsLengthWithIcon);
    m_history->setMinimumContentsLength(16);
    m_history->setVisible(false);
    connect(m_history, &QComboBox::currentIndexChanged, this, &EvaluateView::showHistory);
    m_run = new QPushButton(tr("Run"));
    m_run->setObjectName(QStringLiteral("evalRun"));
    m_run->setToolTip(tr("Score the text now (the conversation is kept)"));
    controls()->addWidget(m_run);
    controls()->addWidget(m_history, 1);
    m_info = addInfoLabel();

    m_pplPlot = addPlot(0, 0);
    m_baseBars = new QCPBars(m_pplPlot->xAxis, m_pplPlot->yAxis);
    m_ablBars = new QCPBars(m_pplPlot->xAxis, m_pplPlot->yAxis);
    m_baseBars->setName(tr("all experts"));
    m_ablBars->setName(tr("experts off"));
    m_baseBars->setBrush(QColor(33, 145, 140));
    m_ablBars->setBrush(QColor(200, 60, 60));
    for (QCPBars* b : {m_baseBars, m_ablBars}) {
        b->setPen(Qt::NoPen);
        b->setWidth(0.35);
    }
    QSharedPointer<QCPAxisTickerText> what(new QCPAxisTickerText);
    what->addTick(0, tr("next token"));
    what->addTick(1, tr("MTP: token after next"));
    m_pplPlot->xAxis->setTicker(what);
    m_pplPlot->xAxis->setRange(-0.6, 1.6);
    m_pplPlot->yAxis->setLabel(tr("perplexity"));
    m_pplPlot->plotLayout()->insertRow(0);
    m_pplPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_pplPlot, tr("held-out perplexity")));
    m_pplPlot->legend->setVisible(true);
    legendBelow(m_pplPlot);

    m_sweepPlot = addPlot(1, 0);
    m_sweepMain = m_sweepPlot->addGraph();
    m_sweepMain->setName(tr("next token"));
    m_sweepMain->setPen(QPen(QColor(200, 60, 60), 2));
    m_sweepMain->setScatterStyle(QCPScatterStyle(QCPScatterStyle::ssDisc, 6));
    m_sweepMtp = m_sweepPlot->addGraph();
    m_sweepMtp->setName(tr("MTP: token after next"));
    m_sweepMtp->setPen(QPen(QColor(230, 150, 30), 2, Qt::DashLine));
    m_sweepMtp->setScatterStyle(QCPScatterStyle(QCPScatterStyle::ssDisc, 6));
    {
        QSharedPointer<QCPAxisTickerFixed> whole(new QCPAxisTickerFixed);  // R is a whole number
        whole->setTickStep(1);
        whole->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
        m_sweepPlot->xAxis->setTicker(whole);
    }
    m_sweepPlot->xAxis->setLabel(tr("each token's top R experts dropped"));
    m_sweepPlot->yAxis->setLabel(tr("perplexity"));
    m_sweepPlot->plotLayout()->insertRow(0);
    m_sweepPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_sweepPlot, tr("sweep of \"Top off\"")));
    m_sweepBase = new QCPItemStraightLine(m_sweepPlot);
    m_sweepBase->setPen(QPen(QColor(33, 145, 140), 1.5, Qt::DotLine));
    m_sweepBase->setVisible(false);
    m_sweepHint = new QCPItemText(m_sweepPlot);
    m_sweepHint->setPositionAlignment(Qt::AlignCenter);
    m_sweepHint->position->setType(QCPItemPosition::ptAxisRectRatio);
    m_sweepHint->position->setCoords(0.5, 0.5);
    m_sweepHint->setText(tr("choose a sweep and Run: perplexity with each token's top 0..k\n"
                            "experts dropped, or its top expert in one layer at a time"));
    m_sweepHint->setTextAlignment(Qt::AlignCenter);
    m_sweepPlot->legend->setVisible(true);
    legendBelow(m_sweepPlot);  // a short plot: any inset legend covered a curve

    m_tokenPlot = addPlot(0, 1, 2, 1);
    m_tokenBars = new QCPBars(m_tokenPlot->yAxis, m_tokenPlot->xAxis);  // horizontal: tokens down the y axis
    m_tokenBars->setWidth(0.7);
    m_tokenBars->setPen(Qt::NoPen);
    m_tokenBars->setBrush(QColor(200, 60, 60));
    m_tokenPlot->yAxis->setRangeReversed(true);
    m_tokenPlot->yAxis->setTicker(QSharedPointer<QCPAxisTickerText>(new QCPAxisTickerText));
    m_tokenPlot->yAxis->setTickLabelFont(QFont(QStringLiteral("DejaVu Sans Mono"), 8));
    m_tokenPlot->xAxis->setLabel(tr("loss added (nats, summed over the token's predictions)"));
    m_tokenPlot->setToolTip(tr("The tokens whose loss the ablation raised most (predicted 3 times or more), by the loss "
                               "they added in total; the label gives the count and the mean -ln p before and after"));
    m_tokenPlot->plotLayout()->insertRow(0);
    m_tokenPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_tokenPlot, tr("tokens the ablation hurt most")));
    plotGrid()->setColumnStretch(0, 2);
    plotGrid()->setColumnStretch(1, 3);
    plotGrid()->setRowStretch(0, 1);
    plotGrid()->setRowStretch(1, 1);

    connect(m_run, &QPushButton::clicked, this, [this] {
        if (m_running) emit cancelRequested();
        else run();
    });
    connect(m_path, &QLineEdit::returnPressed, this, &EvaluateView::run);
    connect(browse, &QToolButton::clicked, this, [this] {
        const QString f = QFileDialog::getOpenFileName(this, tr("Text to score"), m_path->text());
        if (!f.isEmpty()) m_path->setText(f);
    });
    setDark(false);
}

void EvaluateView::setTextPath(const QString& path) { m_path->setText(path); }
QString EvaluateView::textPath() const { return m_path->text(); }
int EvaluateView::windows() const { return m_windows->value(); }
void EvaluateView::setWindows(int n) { m_windows->setValue(n); }
void EvaluateView::setSweep(EvalSweep sweep) { m_sweep->setCurrentIndex(m_sweep->findData(int(sweep))); }

void EvaluateView::setExpertLayer(int layer) {
    m_wantedLayer = layer;  // kept until the model's MoE layers are known
    rebuildExpertLayers();
    const int i = m_expertLayer->findData(layer);
    if (i >= 0) m_expertLayer->setCurrentIndex(i);
}

int EvaluateView::expertLayer() const {
    return m_expertLayer->count() ? m_expertLayer->currentData().toInt() : m_wantedLayer;
}

void EvaluateView::rebuildExpertLayers() {
    const std::vector<int>& layers = m_store->shape().moeLayers;
    bool same = int(layers.size()) == m_expertLayer->count();
    for (int i = 0; same && i < m_expertLayer->count(); ++i) same = m_expertLayer->itemData(i).toInt() == layers[size_t(i)];
    if (same) return;
    const int keep = m_expertLayer->count() ? expertLayer() : m_wantedLayer;
    QSignalBlocker b(m_expertLayer);
    m_expertLayer->clear();
    for (int l : layers) m_expertLayer->addItem(tr("layer %1").arg(l), l);
    const int i = m_expertLayer->findData(keep);
    m_expertLayer->setCurrentIndex(i >= 0 ? i : 0);
}
int EvaluateView::sweepPoints() const { return m_sweepMain->data()->size(); }

void EvaluateView::run() {
    if (m_path->text().trimmed().isEmpty()) {
        m_info->setText(tr("choose a text file to score first"));
        return;
    }
    m_info->setText(tr("scoring %1 ...").arg(m_path->text().trimmed()));
    setRunning(true);
    rebuildExpertLayers();
    emit evaluationRequested(m_path->text().trimmed(), m_windows->value(), EvalSweep(m_sweep->currentData().toInt()),
                             expertLayer());
}

void EvaluateView::setRunning(bool on) {
    m_running = on;
    m_run->setText(on ? tr("Stop") : tr("Run"));
    m_run->setEnabled(true);
}

void EvaluateView::setReport(const EvaluationReport& report) {
    setRunning(false);
    m_report = report;
    m_has = true;
    refreshNow();
}

void EvaluateView::setProgress(int done, int total, const QString& what) {
    m_info->setText(tr("scoring, %1: window %2 of %3").arg(what).arg(done).arg(total));
}

void EvaluateView::setFailure(const QString& message) {
    setRunning(false);
    m_info->setText(tr("not scored: %1").arg(message));
}

void EvaluateView::setBusy(bool busy) { m_run->setEnabled(!busy || m_running); }

void EvaluateView::clear() {
    m_has = false;
    m_report = EvaluationReport{};
    refreshNow();
}

QString EvaluateView::infoText() const { return m_info->text(); }
int EvaluateView::perplexityBarCount() const { return m_baseBars->data()->size() + m_ablBars->data()->size(); }

QStringList EvaluateView::tokenBarLabels() const {
    QStringList out;
    auto* t = static_cast<QCPAxisTickerText*>(m_tokenPlot->yAxis->ticker().data());
    for (auto it = t->ticks().constBegin(); it != t->ticks().constEnd(); ++it) out << it.value();
    return out;
}

namespace {

// An evaluation in a few words: "#n, step s: what was off: perplexity a -> b, the sweep".
QString evaluationLabel(const EvaluationRecord& e, int n) {
    QString s = e.step > 0 ? EvaluateView::tr("#%1, step %2: ").arg(n).arg(e.step) : QStringLiteral("#%1: ").arg(n);
    const double base = std::exp(e.baseline.cross_entropy);
    if (e.ablated)
        s += EvaluateView::tr("%1 off: perplexity %2 \u2192 %3")
                 .arg(QString::fromStdString(e.ablation))
                 .arg(base, 0, 'f', 2)
                 .arg(std::exp(e.with_ablation.cross_entropy), 0, 'f', 2);
    else
        s += EvaluateView::tr("every expert on: perplexity %1").arg(base, 0, 'f', 2);
    if (!e.sweep_experts.empty())
        s += EvaluateView::tr(", each expert of layer %1 off").arg(e.sweep_expert_layer);
    else if (!e.sweep_layers.empty())
        s += EvaluateView::tr(", top expert off by layer");
    else if (!e.sweep.empty())
        s += EvaluateView::tr(", top 0..%1 off").arg(e.sweep.size() - 1);
    return s;
}

}  // namespace

QStringList EvaluateView::historyLabels() const {
    QStringList out;
    for (int i = 0; i < m_history->count(); ++i) out << m_history->itemText(i);
    return out;
}

void EvaluateView::showHistory(int index) {
    const auto& evals = m_store->evaluations();
    if (index < 0 || index >= int(evals.size())) return;
    if (m_history->currentIndex() != index) {
        const QSignalBlocker block(m_history);
        m_history->setCurrentIndex(index);
    }
    setTextPath(QString::fromStdString(evals[size_t(index)].corpus));
    setReport(evaluationReport(evals[size_t(index)]));
}

// One entry per evaluation of the store; a new list (an evaluation finished, another trace
// replayed, even one with as many evaluations) is rebuilt with its newest chosen, as the view
// shows it.
void EvaluateView::syncHistory() {
    const auto& evals = m_store->evaluations();
    QStringList labels;
    for (size_t i = 0; i < evals.size(); ++i) labels << evaluationLabel(evals[i], int(i) + 1);
    if (labels != historyLabels()) {
        const QSignalBlocker block(m_history);
        m_history->clear();
        m_history->addItems(labels);
        m_history->setCurrentIndex(m_history->count() - 1);
    }
    m_history->setVisible(evals.size() > 1);
}

void EvaluateView::refresh() {
    rebuildExpertLayers();
    syncHistory();
    m_baseBars->data()->clear();
    m_ablBars->data()->clear();
    m_tokenBars->data()->clear();
    m_sweepMain->data()->clear();
    m_sweepMtp->data()->clear();
    auto* ticks = static_cast<QCPAxisTickerText*>(m_tokenPlot->yAxis->ticker().data());
    ticks->clear();
    if (!m_has) {
        if (m_info->text().isEmpty())
            m_info->setText(tr("score a held-out text with every expert on and with the ablation set in the Routing view"));
        m_pplPlot->yAxis->setRange(0, 1);
        m_tokenPlot->xAxis->setRange(0, 1);
        m_tokenPlot->yAxis->setRange(-0.5, 0.5);
        m_sweepPlot->xAxis->setRange(0, 1);
        m_sweepPlot->yAxis->setRange(0, 1);
        m_sweepHint->setVisible(true);
        m_sweepBase->setVisible(false);
        return;
    }
    const EvaluationReport& r = m_report;
    const PerplexityResult& b = r.baseline;
    const bool mtp = b.mtp_tokens > 0;
    // Side by side: all experts left of each category, the ablation right of it.
    const double off = r.ablated ? 0.19 : 0.0;
    m_baseBars->addData(0 - off, b.perplexity());
    if (mtp) m_baseBars->addData(1 - off, b.mtp_perplexity());
    double top = std::max(b.perplexity(), b.mtp_perplexity());
    if (r.ablated) {
        const PerplexityResult& a = r.withAblation;
        m_ablBars->addData(0 + off, a.perplexity());
        if (mtp) m_ablBars->addData(1 + off, a.mtp_perplexity());
        top = std::max({top, a.perplexity(), a.mtp_perplexity()});
    }
    m_ablBars->setVisible(r.ablated);
    if (!r.ablated) m_ablBars->removeFromLegend();
    else if (!m_pplPlot->legend->hasItemWithPlottable(m_ablBars)) m_ablBars->addToLegend();
    m_pplPlot->yAxis->setRange(0, top * 1.15);

    QString text = tr("%1: %2 tokens, %3 predictions in %4 of up to %5 tokens; perplexity %6")
                       .arg(QFileInfo(r.path).fileName())
                       .arg(r.textTokens)
                       .arg(b.tokens)
                       .arg(b.windows == 1 ? tr("1 window") : tr("%1 windows").arg(b.windows))
                       .arg(r.context)
                       .arg(b.perplexity(), 0, 'f', 2);
    if (r.ablated) {
        const PerplexityResult& a = r.withAblation;
        text += tr(", with experts off (%1) %2 (%3%4%)")
                    .arg(r.ablation)
                    .arg(a.perplexity(), 0, 'f', 2)
                    .arg(a.perplexity() >= b.perplexity() ? QStringLiteral("+") : QString())
                    .arg(100.0 * (a.perplexity() / b.perplexity() - 1.0), 0, 'f', 1);
    } else {
        text += tr("; switch experts off in the Routing view and run again to see what they carried");
    }
    if (!r.sweepExperts.empty()) {  // the per-expert sweep's answer: the expert the text needs most
        size_t top = 0;
        for (size_t i = 1; i < r.sweep.size(); ++i)
            if (r.sweep[i].cross_entropy > r.sweep[top].cross_entropy) top = i;
        text += tr("; alone, expert %1 of layer %2 costs the most when off (%3%4%)")
                    .arg(r.sweepExperts[top])
                    .arg(r.sweepExpertLayer)
                    .arg(r.sweep[top].perplexity() >= b.perplexity() ? QStringLiteral("+") : QString())
                    .arg(100.0 * (r.sweep[top].perplexity() / b.perplexity() - 1.0), 0, 'f', 1);
    }
    m_info->setText(text);

    for (size_t i = 0; i < r.hurt.size(); ++i) {
        const TokenImpact& t = r.hurt[i];
        const auto it = r.texts.find(t.token);
        const QString tok = it == r.texts.end() ? QStringLiteral("#%1").arg(t.token)
                                                : QString::fromStdString(quote_token(it->second.toStdString()));
        m_tokenBars->addData(double(i), t.added);
        ticks->addTick(double(i), QStringLiteral("%1 ×%2  %3→%4")
                                      .arg(tok)
                                      .arg(t.count)
                                      .arg(t.baseline, 0, 'f', 1)
                                      .arg(t.ablated, 0, 'f', 1));
    }
    double lo = 0, hi = 0;
    for (const TokenImpact& t : r.hurt) {
        lo = std::min(lo, t.added);
        hi = std::max(hi, t.added);
    }
    m_tokenPlot->xAxis->setRange(lo, hi > lo ? hi * 1.05 : lo + 1);
    m_tokenPlot->yAxis->setRange(-0.6, std::max<double>(1, double(r.hurt.size())) - 0.4);

    // Over R: x is R; per layer: the layer; per expert: the expert. The baseline (every expert on)
    // is the dotted level every point is measured against.
    const bool perLayer = !r.sweepLayers.empty(), perExpert = !r.sweepExperts.empty();
    const std::vector<int>& xs = perExpert ? r.sweepExperts : r.sweepLayers;  // x of each run; over R: its index
    double sweepTop = 0, sweepLow = b.perplexity();
    for (size_t i = 0; i < r.sweep.size(); ++i) {
        const double x = perLayer || perExpert ? double(xs[i]) : double(i);
        m_sweepMain->addData(x, r.sweep[i].perplexity());
        sweepTop = std::max(sweepTop, r.sweep[i].perplexity());
        sweepLow = std::min(sweepLow, r.sweep[i].perplexity());
        if (r.sweep[i].mtp_tokens) {
            m_sweepMtp->addData(x, r.sweep[i].mtp_perplexity());
            sweepTop = std::max(sweepTop, r.sweep[i].mtp_perplexity());
            sweepLow = std::min(sweepLow, r.sweep[i].mtp_perplexity());
        }
    }
    m_sweepHint->setVisible(r.sweep.empty());
    m_sweepBase->setVisible(!r.sweep.empty());
    m_sweepBase->point1->setCoords(0, b.perplexity());
    m_sweepBase->point2->setCoords(1, b.perplexity());
    if (auto* t = qobject_cast<QCPTextElement*>(m_sweepPlot->plotLayout()->element(0, 0)))
        t->setText(perExpert ? tr("each expert off alone (dotted: every expert on)")
                             : tr("sweep of \"Top off\" (dotted: every expert on)"));
    m_sweepPlot->xAxis->setLabel(perExpert  ? tr("expert of layer %1 switched off alone").arg(r.sweepExpertLayer)
                                 : perLayer ? tr("MoE layer where each token's top expert is dropped")
                                            : tr("each token's top R experts dropped"));
    const double x0 = perLayer || perExpert ? double(xs.front()) : 0.0;
    const double x1 = perLayer || perExpert ? double(xs.back()) : double(r.sweep.size()) - 1;
    m_sweepPlot->xAxis->setRange(x0 - 0.3, std::max(x0 + 1, x1) + 0.3);
    // Dropping top experts moves perplexity by tens of percent: from 0. One expert off moves it
    // by a few: around the points, or every curve would look flat.
    if (perExpert) m_sweepPlot->yAxis->setRange(sweepLow * 0.97, std::max(sweepTop * 1.03, sweepLow * 0.97 + 1e-6));
    else m_sweepPlot->yAxis->setRange(0, sweepTop > 0 ? sweepTop * 1.15 : 1);
}

QString EvaluateView::csv() const {
    // The two runs, then the tokens the ablation hurt most.
    QString out;
    QTextStream s(&out);
    // Cross-entropies in nats: the two runs' means, then each hurt token's mean over its predictions.
    s << "row,token,text,count,all_experts,experts_off\n";
    if (!m_has) return out;
    const EvaluationReport& r = m_report;
    auto num = [](double x) { return QString::number(x, 'g', 9); };
    const PerplexityResult& b = r.baseline;
    const PerplexityResult& a = r.withAblation;
    s << "cross_entropy,,next token," << b.tokens << ',' << num(b.cross_entropy) << ','
      << (r.ablated ? num(a.cross_entropy) : QString()) << '\n';
    if (b.mtp_tokens)
        s << "mtp_cross_entropy,,token after next," << b.mtp_tokens << ',' << num(b.mtp_cross_entropy) << ','
          << (r.ablated ? num(a.mtp_cross_entropy) : QString()) << '\n';
    for (size_t i = 0; i < r.sweep.size(); ++i)  // the sweep: experts_off holds the run with R dropped
        s << "sweep_cross_entropy," << i << ','
          << (!r.sweepExperts.empty()
                  ? QStringLiteral("layer %1: expert %2 off").arg(r.sweepExpertLayer).arg(r.sweepExperts[i])
              : r.sweepLayers.empty() ? QStringLiteral("top %1 dropped").arg(i)
                                      : QStringLiteral("layer %1: top 1 dropped").arg(r.sweepLayers[i]))
          << ',' << r.sweep[i].tokens << ',' << num(b.cross_entropy) << ',' << num(r.sweep[i].cross_entropy) << '\n';
    for (const TokenImpact& t : r.hurt) {
        const auto it = r.texts.find(t.token);
        s << "token," << t.token << ',' << csvEscape(it == r.texts.end() ? QString() : it->second) << ',' << t.count << ','
          << num(t.baseline) << ',' << num(t.ablated) << '\n';
    }
    return out;
}
