// BiasView: bias records of one layer as lines and a heatmap; MaxVio from load/train/eval records.
#include "views/BiasView.h"

#include <QCheckBox>
#include <QComboBox>
#include <QDoubleSpinBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QLineEdit>
#include <QPushButton>
#include <QTextStream>

#include <qcustomplot.h>

#include "TelemetryStore.h"

using namespace moescope;

BiasView::BiasView(TelemetryStore* store, QWidget* parent)
    : PlotView(store, QStringLiteral("bias"), tr("Bias drift"), parent) {
    controls()->addWidget(new QLabel(tr("Layer:")));
    m_layer = new QComboBox;
    controls()->addWidget(m_layer);
    controls()->addWidget(new QLabel(tr("Experts:")));
    m_experts = new QLineEdit;
    m_experts->setPlaceholderText(tr("e.g. 0,3,7 (empty: the 6 that drift most)"));
    m_experts->setMaximumWidth(220);
    controls()->addWidget(m_experts);
    m_relative = new QCheckBox(tr("Relative"));
    m_relative->setObjectName(QStringLiteral("biasRelative"));
    m_relative->setChecked(true);
    m_relative->setToolTip(tr("Drift minus the layer's mean drift: top-k selection ignores a shift common to all experts, "
                              "and sign updates on a few tokens per step raise most experts together"));
    controls()->addWidget(m_relative);
    m_online = new QCheckBox(tr("Online balancing"));
    m_online->setObjectName(QStringLiteral("onlineBalancing"));
    m_online->setToolTip(tr("Aux-loss-free bias updates during generation: b_e += gamma * sign(mean load - load_e)"));
    controls()->addWidget(m_online);
    controls()->addWidget(new QLabel(tr("gamma")));
    m_gamma = new QDoubleSpinBox;
    m_gamma->setDecimals(4);
    m_gamma->setRange(0.0001, 1.0);
    m_gamma->setSingleStep(0.001);
    m_gamma->setValue(0.001);
    controls()->addWidget(m_gamma);
    auto* reset = new QPushButton(tr("Reset bias"));
    controls()->addWidget(reset);
    controls()->addStretch(1);

    auto title = [](QCustomPlot* p, const QString& t) {
        p->plotLayout()->insertRow(0);
        p->plotLayout()->addElement(0, 0, new QCPTextElement(p, t));
    };
    m_linePlot = addPlot(0, 0);
    m_linePlot->xAxis->setLabel(tr("bias update (step)"));
    m_linePlot->yAxis->setLabel(tr("router bias"));
    title(m_linePlot, QString());
    // The legend sits right of the plot, never over the lines.
    m_linePlot->legend->setVisible(true);
    m_linePlot->legend->setFont(QFont(font().family(), 8));
    m_linePlot->axisRect()->insetLayout()->take(m_linePlot->legend);
    {
        // In a column of its own, on top of a spacer: a grid row is never taller than its
        // elements' maximum heights, and a legend's is the height of its entries.
        auto* side = new QCPLayoutGrid;
        m_linePlot->plotLayout()->addElement(1, 1, side);
        side->addElement(0, 0, m_linePlot->legend);
        side->addElement(1, 0, new QCPLayoutElement(m_linePlot));
        side->setRowStretchFactor(0, 0.001);
        side->setMargins(QMargins(0, 0, 0, 0));
    }
    m_linePlot->plotLayout()->setColumnStretchFactor(1, 0.001);
    m_nowBars = new QCPBars(m_linePlot->xAxis, m_linePlot->yAxis);
    m_nowBars->setWidth(0.8);
    m_nowBars->setPen(Qt::NoPen);
    m_nowBars->setBrush(QColor(59, 82, 139));
    m_nowBars->removeFromLegend();
    m_heatPlot = addPlot(0, 1);
    m_heat = addColorMap(m_heatPlot, tr("bias - first"));
    m_heat->setGradient(QCPColorGradient(QCPColorGradient::gpPolar));
    title(m_heatPlot, QString());  // after the colour scale took column 1 of row 0
    m_heatHint = new QCPItemText(m_heatPlot);
    m_heatHint->setPositionAlignment(Qt::AlignCenter);
    m_heatHint->position->setType(QCPItemPosition::ptAxisRectRatio);
    m_heatHint->position->setCoords(0.5, 0.5);
    m_heatHint->setVisible(false);
    m_vioPlot = addPlot(1, 0, 1, 2);
    m_vioPlot->xAxis->setLabel(tr("step"));
    m_vioPlot->yAxis->setLabel(tr("MaxVio"));
    {
        QSharedPointer<QCPAxisTickerFixed> steps(new QCPAxisTickerFixed);  // steps are whole numbers
        steps->setTickStep(1);
        steps->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
        m_vioPlot->xAxis->setTicker(steps);
    }
    m_vioPlot->legend->setVisible(true);
    legendBelow(m_vioPlot);  // MaxVio curves run anywhere: an inset legend covered them
    for (int i = 0; i < 3; ++i) {
        auto* g = m_vioPlot->addGraph();
        g->setPen(QPen(i == 0 ? QColor(33, 145, 140) : i == 1 ? QColor(230, 120, 30) : QColor(120, 60, 160), 1.5));
        g->setName(i == 0 ? tr("generation (running load, max over layers)") : i == 1 ? tr("training batch") : tr("validation (global)"));
    }
    m_vioHint = new QCPItemText(m_vioPlot);
    m_vioHint->setPositionAlignment(Qt::AlignCenter);
    m_vioHint->position->setType(QCPItemPosition::ptAxisRectRatio);
    m_vioHint->position->setCoords(0.5, 0.5);
    m_vioHint->setText(tr("MaxVio (max load / mean load - 1) appears once tokens are routed or a run trains"));
    // A plot's grid rows share the height: give the two top plots more of it.
    plotGrid()->setRowStretch(0, 3);
    plotGrid()->setRowStretch(1, 2);

    auto emitBalancing = [this] { emit onlineBalancingRequested(m_online->isChecked(), m_gamma->value()); };
    connect(m_online, &QCheckBox::toggled, this, emitBalancing);
    connect(m_gamma, &QDoubleSpinBox::valueChanged, this, [this, emitBalancing] {
        if (m_online->isChecked()) emitBalancing();
    });
    connect(reset, &QPushButton::clicked, this, &BiasView::resetBiasRequested);
    connect(m_layer, &QComboBox::currentIndexChanged, this, &BiasView::onStoreChanged);
    connect(m_experts, &QLineEdit::editingFinished, this, &BiasView::onStoreChanged);
    connect(m_relative, &QCheckBox::toggled, this, &BiasView::onStoreChanged);
    setDark(false);
}

int BiasView::layer() const { return m_layer->currentIndex() >= 0 ? m_layer->currentData().toInt() : -1; }

void BiasView::setLayer(int layer) {
    int i = m_layer->findData(layer);
    if (i >= 0) m_layer->setCurrentIndex(i);
}

void BiasView::refresh() {
    // Layers: the model's MoE layers, plus any layer that has bias records (a training trace).
    std::vector<int> layers = m_store->shape().moeLayers;
    for (const auto& [l, v] : m_store->bias())
        if (std::find(layers.begin(), layers.end(), l) == layers.end()) layers.push_back(l);
    std::sort(layers.begin(), layers.end());
    if (int(layers.size()) != m_layerCount) {
        m_layerCount = int(layers.size());
        const int keep = layer();
        QSignalBlocker b(m_layer);
        m_layer->clear();
        for (int l : layers) m_layer->addItem(tr("layer %1").arg(l), l);
        setLayer(keep);
    }
    const int lay = layer();
    m_linePlot->clearGraphs();
    auto bit = m_store->bias().find(lay);
    const std::vector<BiasRecord> empty;
    const auto& hist = bit == m_store->bias().end() ? empty : bit->second;
    const int S = int(hist.size());
    const int E = S ? int(hist.front().bias.size()) : std::max(m_store->shape().numExperts, 0);
    m_drift = S > 1;
    const QColor fg = dark() ? QColor(220, 220, 220) : QColor(30, 30, 30);
    m_heatHint->setColor(fg);
    m_vioHint->setColor(fg);
    auto* lineTitle = qobject_cast<QCPTextElement*>(m_linePlot->plotLayout()->element(0, 0));
    auto* heatTitle = qobject_cast<QCPTextElement*>(m_heatPlot->plotLayout()->element(0, 0));

    if (!m_drift) {
        // No update yet: the bias itself (the checkpoint's trained e_score_correction_bias,
        // recorded at load) per expert of the chosen layer, and for every MoE layer.
        m_linePlot->legend->setVisible(false);
        QVector<double> keys, vals;
        double lo = 0, hi = 0;
        if (S == 1)
            for (int e = 0; e < E; ++e) {
                keys << double(e);
                vals << double(hist.front().bias[size_t(e)]);
                lo = std::min(lo, vals.back()), hi = std::max(hi, vals.back());
            }
        m_nowBars->setData(keys, vals, true);
        m_nowBars->setVisible(true);
        m_linePlot->xAxis->setLabel(tr("expert"));
        m_linePlot->yAxis->setLabel(tr("router bias"));
        m_linePlot->xAxis->setRange(-0.5, std::max(E, 1) - 0.5);
        setIntTicks(m_linePlot->xAxis, std::max(E, 1));
        const double pad = std::max(hi - lo, 1e-3) * 0.08;
        m_linePlot->yAxis->setRange(lo - pad, hi + pad);
        if (lineTitle)
            lineTitle->setText(S == 0 ? tr("layer %1: no router bias recorded (not a MoE layer?)").arg(lay)
                                      : tr("layer %1: router bias per expert, as loaded (no updates yet)\n"
                                           "Drift over updates appears here with online balancing (above) or training")
                                            .arg(lay));

        // Heatmap: MoE layer x expert of the latest bias of every layer.
        std::vector<int> rows;
        for (const auto& [l, v] : m_store->bias())
            if (!v.empty() && int(v.back().bias.size()) == E) rows.push_back(l);
        const int R = int(rows.size());
        m_heat->data()->setSize(std::max(E, 1), std::max(R, 1));
        m_heat->data()->setRange(QCPRange(0, std::max(E - 1, 0)), QCPRange(0, std::max(R - 1, 0)));
        m_heat->data()->fill(0);
        double amax = 0;
        for (int r = 0; r < R; ++r) {
            const auto& b = m_store->bias().at(rows[size_t(r)]).back().bias;
            for (int e = 0; e < E; ++e) {
                m_heat->data()->setCell(e, r, double(b[size_t(e)]));
                amax = std::max(amax, std::abs(double(b[size_t(e)])));
            }
        }
        if (amax <= 0) amax = 1;  // all zero (an untrained bias): a neutral map, not a 1e-9 scale
        m_heat->setDataRange(QCPRange(-amax, amax));
        m_heat->colorScale()->axis()->setLabel(tr("bias"));
        m_heatPlot->xAxis->setLabel(tr("expert"));
        m_heatPlot->yAxis->setLabel(tr("MoE layer"));
        m_heatPlot->xAxis->setRange(-0.5, std::max(E, 1) - 0.5);
        m_heatPlot->yAxis->setRange(-0.5, std::max(R, 1) - 0.5);
        setIntTicks(m_heatPlot->xAxis, std::max(E, 1));
        setRowTicks(m_heatPlot->yAxis, rows.empty() ? std::vector<int>{lay} : rows);
        if (heatTitle) heatTitle->setText(tr("router bias now: MoE layer x expert"));
        m_heatHint->setVisible(R == 0);
        m_heatHint->setText(tr("no router bias recorded"));
    } else {
        m_nowBars->setVisible(false);
        m_nowBars->data()->clear();
        m_linePlot->legend->setVisible(true);
        m_linePlot->xAxis->setLabel(tr("bias update (step)"));
        m_linePlot->yAxis->setLabel(m_relative->isChecked() ? tr("bias - layer mean") : tr("router bias"));
        m_linePlot->xAxis->setTicker(QSharedPointer<QCPAxisTicker>(new QCPAxisTicker));

        // Heatmap experts x updates: the drift from the first record, which small updates (gamma)
        // would otherwise hide under the checkpoint's own spread of biases.
        m_heat->data()->setSize(S, std::max(E, 1));
        m_heat->data()->setRange(QCPRange(0, S - 1), QCPRange(0, std::max(E - 1, 0)));
        m_heat->data()->fill(0);
        double amax = 0;
        const bool rel = m_relative->isChecked();
        auto drift = [&](int s, int e) { return double(hist[size_t(s)].bias[size_t(e)]) - double(hist.front().bias[size_t(e)]); };
        auto meanDrift = [&](int s) {
            double m = 0;
            for (int e = 0; e < E; ++e) m += drift(s, e);
            return E ? m / E : 0.0;
        };
        for (int s = 0; s < S; ++s) {
            if (int(hist[size_t(s)].bias.size()) != E) continue;
            const double m = rel ? meanDrift(s) : 0.0;
            for (int e = 0; e < E; ++e) {
                const double b = drift(s, e) - m;
                m_heat->data()->setCell(s, e, b);
                amax = std::max(amax, std::abs(b));
            }
        }
        // Symmetric, 0 in the middle; updates that changed nothing give a neutral map, not a 1e-9 scale.
        if (amax <= 0) amax = 1e-3;
        m_heat->setDataRange(QCPRange(-amax, amax));
        m_heat->colorScale()->axis()->setLabel(rel ? tr("drift - mean drift") : tr("bias - first"));
        m_heatPlot->xAxis->setLabel(tr("bias update"));
        m_heatPlot->yAxis->setLabel(tr("expert"));
        m_heatPlot->xAxis->setRange(-0.5, S - 0.5);
        m_heatPlot->yAxis->setRange(-0.5, std::max(E, 1) - 0.5);
        m_heatPlot->xAxis->setTicker(QSharedPointer<QCPAxisTicker>(new QCPAxisTicker));
        setIntTicks(m_heatPlot->yAxis, std::max(E, 1));
        if (heatTitle)
            heatTitle->setText(rel ? tr("layer %1: each expert's drift relative to the layer mean").arg(lay)
                                   : tr("layer %1: drift of every expert's bias since the first record").arg(lay));
        m_heatHint->setVisible(false);

        // Lines: chosen experts, or the ones whose bias moved most.
        std::vector<int> chosen;
        for (const QString& part : m_experts->text().split(QLatin1Char(','), Qt::SkipEmptyParts)) {
            bool ok = false;
            int e = part.trimmed().toInt(&ok);
            if (ok && e >= 0 && e < E) chosen.push_back(e);
        }
        if (chosen.empty()) {
            const double m = rel ? meanDrift(S - 1) : 0.0;
            std::vector<std::pair<double, int>> moved;
            for (int e = 0; e < E; ++e) moved.push_back({-std::abs(drift(S - 1, e) - m), e});
            std::sort(moved.begin(), moved.end());
            for (int i = 0; i < std::min(6, E); ++i) chosen.push_back(moved[size_t(i)].second);
        }
        for (size_t c = 0; c < chosen.size(); ++c) {
            auto* g = m_linePlot->addGraph();
            g->setPen(QPen(QColor::fromHsv(int(c * 360 / std::max<size_t>(chosen.size(), 1)), 200, 210), 1.5));
            g->setName(tr("expert %1").arg(chosen[c]));
            QVector<double> x, y;
            for (const auto& r : hist) {
                if (int(r.bias.size()) != E) continue;
                double m = 0;
                if (rel) {
                    for (float b : r.bias) m += double(b);
                    m /= E;
                }
                x << double(r.step);
                y << double(r.bias[size_t(chosen[c])]) - m;
            }
            g->setData(x, y, true);
        }
        m_linePlot->rescaleAxes(true);  // the lines only: the hidden bars hold no range
        const QCPRange yr = m_linePlot->yAxis->range();
        const double pad = std::max(yr.size(), 1e-4) * 0.06;
        m_linePlot->yAxis->setRange(yr.lower - pad, yr.upper + pad);
        if (lineTitle)
            lineTitle->setText(tr("layer %1: bias of %2 experts over %3 updates").arg(lay).arg(chosen.size()).arg(S));
    }

    // MaxVio: generation steps (from load records), training batches, validation.
    QVector<double> x0, y0, x1, y1, x2, y2;
    for (const auto& [s, v] : m_store->maxVioByStep()) {
        x0 << double(s);
        y0 << v;
    }
    for (const auto& t : m_store->train()) {
        x1 << double(t.step);
        y1 << t.maxvio_batch;
    }
    for (const auto& e : m_store->evals()) {
        x2 << double(e.step);
        y2 << e.maxvio_global;
    }
    // Training traces carry their own MaxVio; then the per-step load curve would duplicate it.
    if (!x1.isEmpty()) x0.clear(), y0.clear();
    m_vioPlot->graph(0)->setData(x0, y0, true);
    m_vioPlot->graph(1)->setData(x1, y1, true);
    m_vioPlot->graph(2)->setData(x2, y2, true);
    // Only the curves that have data go into the legend.
    for (int i = 0; i < 3; ++i) {
        auto* g = m_vioPlot->graph(i);
        if (g->data()->isEmpty()) g->removeFromLegend();
        else if (!m_vioPlot->legend->hasItemWithPlottable(g)) g->addToLegend();
    }
    const bool anyVio = !x0.isEmpty() || !x1.isEmpty() || !x2.isEmpty();
    m_vioPlot->legend->setVisible(anyVio);
    m_vioHint->setVisible(!anyVio);
    if (anyVio) {
        m_vioPlot->rescaleAxes();
        m_vioPlot->yAxis->setRange(0, std::max(m_vioPlot->yAxis->range().upper * 1.1, 0.05));
    } else {
        m_vioPlot->xAxis->setRange(0, 1);
        m_vioPlot->yAxis->setRange(0, 1);
    }
}

void BiasView::setOnlineBalancing(bool enabled, double gamma) {
    {
        QSignalBlocker b(m_gamma);
        m_gamma->setValue(gamma);
    }
    if (m_online->isChecked() == enabled) emit onlineBalancingRequested(enabled, m_gamma->value());
    else m_online->setChecked(enabled);
}

QSize BiasView::heatmapSize() const { return QSize(m_heat->data()->keySize(), m_heat->data()->valueSize()); }
double BiasView::heatmapValue(int x, int y) const { return m_heat->data()->cell(x, y); }
QPair<double, double> BiasView::heatmapColourRange() const { return {m_heat->dataRange().lower, m_heat->dataRange().upper}; }
int BiasView::nowBarCount() const { return m_nowBars->visible() ? m_nowBars->data()->size() : 0; }
int BiasView::lineCount() const { return m_linePlot->graphCount(); }
int BiasView::maxVioPoints() const {
    int n = 0;
    for (int i = 0; i < m_vioPlot->graphCount(); ++i) n += m_vioPlot->graph(i)->data()->size();
    return n;
}

QString BiasView::csv() const {
    QString out;
    QTextStream s(&out);
    s << "kind,step,layer,expert,value\n";
    for (const auto& [l, hist] : m_store->bias())
        for (const auto& r : hist)
            for (size_t e = 0; e < r.bias.size(); ++e)
                s << "bias," << r.step << ',' << l << ',' << e << ',' << QString::number(double(r.bias[e]), 'g', 9) << '\n';
    for (const auto& [st, v] : m_store->maxVioByStep()) s << "maxvio_step," << st << ",,," << QString::number(v, 'g', 9) << '\n';
    for (const auto& t : m_store->train()) s << "maxvio_batch," << t.step << ",,," << QString::number(t.maxvio_batch, 'g', 9) << '\n';
    for (const auto& e : m_store->evals()) s << "maxvio_global," << e.step << ",,," << QString::number(e.maxvio_global, 'g', 9) << '\n';
    return out;
}
