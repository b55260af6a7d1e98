// RoutingView: draws the routing records of the store; the only arithmetic is counting.
#include "views/RoutingView.h"

#include <QCheckBox>
#include <QComboBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QLineEdit>
#include <QSpinBox>
#include <QTextStream>

#include <algorithm>
#include <cmath>

#include <qcustomplot.h>

#include "TelemetryStore.h"

using namespace moescope;

RoutingView::RoutingView(TelemetryStore* store, QWidget* parent)
    : PlotView(store, QStringLiteral("routing"), tr("Routing"), parent) {
    controls()->addWidget(new QLabel(tr("Layer:")));
    m_layer = new QComboBox;
    m_layer->setObjectName(QStringLiteral("routingLayer"));
    m_layer->setToolTip(tr("Layer of the sequence, load and co-activation plots"));
    controls()->addWidget(m_layer);
    controls()->addWidget(new QLabel(tr("Load:")));
    m_scope = new QComboBox;
    m_scope->addItems({tr("total"), tr("message"), tr("step")});
    m_scope->setToolTip(tr("Expert load counted over the whole session (total), the last message, or the last "
                           "decode step"));
    controls()->addWidget(m_scope);
    m_scores = new QCheckBox(tr("All scores"));
    m_scores->setObjectName(QStringLiteral("routingScores"));
    m_scores->setToolTip(tr("Record and show every expert's router score (sigmoid / softmax) for the selected token, "
                            "not only the top-k mixing weights (applies to tokens generated from now on)"));
    controls()->addWidget(m_scores);
    controls()->addWidget(new QLabel(tr("Off:")));
    m_disable = new QLineEdit;
    m_disable->setObjectName(QStringLiteral("routingDisable"));
    m_disable->setPlaceholderText(tr("e.g. 3,7"));
    m_disable->setMaximumWidth(110);
    m_disable->setClearButtonEnabled(true);
    m_disable->setToolTip(tr("Switch experts of this layer off (an ablation): the router skips them, as if they "
                             "were removed, and each token takes its best remaining experts. A list (3,7), ranges "
                             "(0-3), or layers too (1:3;2:0-3, *:5 for every layer); empty to switch them on again. "
                             "Double-click a bar of the load plot to toggle one expert. The conversation is "
                             "recomputed with the new experts at the next message."));
    controls()->addWidget(m_disable);
    controls()->addWidget(new QLabel(tr("Top off:")));
    m_dropTop = new QSpinBox;
    m_dropTop->setObjectName(QStringLiteral("routingDropTop"));
    m_dropTop->setRange(0, 0);
    m_dropTop->setKeyboardTracking(false);  // typed values apply on Enter, not per digit
    m_dropTop->setToolTip(tr("Switch each token's highest-ranked experts off for that token, in every MoE layer of "
                             "the main model (DeepSeekMoE's test of expert redundancy): the router ranks the experts as usual, "
                             "drops the first N, and routes the token to the best of the rest. 0: off. The "
                             "conversation is recomputed at the next message."));
    controls()->addWidget(m_dropTop);
    m_info = addInfoLabel();
    m_info->setMinimumWidth(40);  // a crowded row: the view still fits PlotView::minOnScreenExportSize()

    m_tokenPlot = addPlot(0, 0);
    m_tokenMap = addColorMap(m_tokenPlot, tr("weight"));
    m_tokenPlot->xAxis->setLabel(tr("expert"));
    m_tokenPlot->yAxis->setLabel(tr("MoE layer"));
    m_tokenPlot->plotLayout()->insertRow(0);
    m_tokenPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_tokenPlot, tr("selected token: none yet")));

    m_seqPlot = addPlot(0, 1);
    m_seqMap = addColorMap(m_seqPlot, tr("weight"));
    m_seqPlot->xAxis->setLabel(tr("position"));
    {
        QSharedPointer<QCPAxisTickerFixed> positions(new QCPAxisTickerFixed);  // whole positions only
        positions->setTickStep(1);
        positions->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
        m_seqPlot->xAxis->setTicker(positions);
    }
    m_seqPlot->yAxis->setLabel(tr("expert"));
    m_seqMarker = new QCPItemStraightLine(m_seqPlot);
    m_seqMarker->setPen(QPen(QColor(255, 80, 80), 1.5));
    m_seqMarker->setVisible(false);
    m_seqPlot->plotLayout()->insertRow(0);
    m_seqPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_seqPlot, tr("sequence: positions x experts")));

    m_loadPlot = addPlot(1, 0);
    m_loadBars = new QCPBars(m_loadPlot->xAxis, m_loadPlot->yAxis);
    m_loadBars->setWidthType(QCPBars::wtPlotCoords);
    m_loadBars->setWidth(0.8);
    m_loadBars->setPen(Qt::NoPen);
    m_loadBars->setBrush(QColor(33, 145, 140));
    m_disabledMarks = new QCPGraph(m_loadPlot->xAxis, m_loadPlot->yAxis);
    m_disabledMarks->setLineStyle(QCPGraph::lsNone);
    m_disabledMarks->setScatterStyle(QCPScatterStyle(QCPScatterStyle::ssCross, QPen(QColor(220, 40, 40), 2.5), Qt::NoBrush, 11));
    m_disabledMarks->setName(tr("switched off"));
    m_loadPlot->xAxis->setLabel(tr("expert (double-click: switch off / on)"));
    m_loadPlot->yAxis->setLabel(tr("tokens"));
    m_loadPlot->plotLayout()->insertRow(0);
    m_loadPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_loadPlot, tr("expert load")));

    m_coPlot = addPlot(1, 1);
    m_coMap = addColorMap(m_coPlot, tr("tokens"));
    m_coPlot->xAxis->setLabel(tr("expert"));
    m_coPlot->yAxis->setLabel(tr("expert"));
    m_coPlot->plotLayout()->insertRow(0);
    m_coPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_coPlot, tr("co-activation (tokens routed to both)")));

    connect(m_layer, &QComboBox::currentIndexChanged, this, &RoutingView::onStoreChanged);
    connect(m_scope, &QComboBox::currentIndexChanged, this, &RoutingView::onStoreChanged);
    connect(m_disable, &QLineEdit::returnPressed, this, [this] { requestDisabled(m_disable->text()); });
    connect(m_dropTop, &QSpinBox::valueChanged, this, &RoutingView::dropTopRequested);
    connect(m_loadPlot, &QCustomPlot::plottableDoubleClick, this,
            [this](QCPAbstractPlottable* p, int index, QMouseEvent*) {
                if (p == m_loadBars && index >= 0 && index < m_loadBars->data()->size())
                    toggleDisabled(int(std::lround((m_loadBars->data()->constBegin() + index)->key)));
            });
    connect(m_scores, &QCheckBox::toggled, this, [this](bool on) {
        emit wantScoresRequested(on);
        onStoreChanged();
    });
    setDark(false);
}

int RoutingView::layer() const {
    return m_layer->currentIndex() >= 0 ? m_layer->currentData().toInt() : -1;
}

void RoutingView::setLayer(int layer) {
    int i = m_layer->findData(layer);
    if (i >= 0) m_layer->setCurrentIndex(i);
}

void RoutingView::requestDisabled(const QString& text) {
    if (layer() >= 0) emit disabledExpertsRequested(layer(), text);
}

void RoutingView::toggleDisabled(int expert) {
    QList<int> ids;
    bool present = false;
    for (int e : m_store->disabled(layer())) {
        if (e == expert) present = true;
        else ids << e;
    }
    if (!present) ids << expert;
    std::sort(ids.begin(), ids.end());
    QStringList parts;
    for (int e : ids) parts << QString::number(e);
    requestDisabled(parts.join(QLatin1Char(',')));
}

void RoutingView::showAblationInForce() { syncAblationControls(true); }

void RoutingView::syncAblationControls(bool evenFocused) {
    const ModelShape& sh = m_store->shape();
    if (sh.moeLayers.empty()) return;
    if (evenFocused || !m_dropTop->hasFocus() || m_dropTop->maximum() != sh.topK) {
        QSignalBlocker block(m_dropTop);
        m_dropTop->setRange(0, sh.topK);
        m_dropTop->setValue(m_store->dropTop(sh.moeLayers.front()));  // the same in every MoE layer
    }
    if (evenFocused || !m_disable->hasFocus()) {
        QStringList off;
        for (int e : m_store->disabled(layer())) off << QString::number(e);
        m_disable->setText(off.join(QLatin1Char(',')));
    }
}

QList<int> RoutingView::disabledMarks() const {
    QList<int> out;
    for (auto it = m_disabledMarks->data()->constBegin(); it != m_disabledMarks->data()->constEnd(); ++it)
        out << int(std::lround(it->key));
    return out;
}

void RoutingView::rebuildLayerChoices() {
    const auto& layers = m_store->shape().moeLayers;
    if (int(layers.size()) == m_layerCount) return;
    m_layerCount = int(layers.size());
    QSignalBlocker b(m_layer);
    m_layer->clear();
    for (int l : layers) m_layer->addItem(tr("layer %1").arg(l), l);
}

void RoutingView::refresh() {
    rebuildLayerChoices();
    const ModelShape& sh = m_store->shape();
    const int E = sh.numExperts;
    const int R = int(sh.moeLayers.size());
    const int lay = layer();
    const auto& routes = m_store->routes();
    if (E <= 0 || R <= 0) {
        m_info->setText(tr("no routing yet"));
        return;
    }
    const int drop = m_store->dropTop(sh.moeLayers.front());  // the same in every MoE layer
    syncAblationControls(false);

    // Selected token: layer x expert weights; experts of dropped groups are NaN (grey).
    const int sel = m_store->selected();
    auto it = sel >= 0 ? routes.find(sel) : routes.end();
    if (it == routes.end() && !routes.empty()) it = std::prev(routes.end());
    m_tokenMap->data()->setSize(E, R);
    m_tokenMap->data()->setRange(QCPRange(0, E - 1), QCPRange(0, R - 1));
    m_tokenMap->data()->fill(it == routes.end() ? qQNaN() : 0.0);  // no token yet: grey, not a map of zeros
    bool showScores = false;
    if (it != routes.end()) {
        const RouteRecord& r = it->second;
        const int G = r.n_group > 0 ? r.n_group : 1;
        showScores = m_scores->isChecked() && r.E == E && r.scores.size() == r.layers.size() * size_t(E);
        for (size_t li = 0; li < r.layers.size(); ++li) {
            const int row = sh.rowOf(r.layers[li]);
            if (row < 0) continue;
            if (!r.kept_groups.empty() && G > 1) {
                const int per = E / G;
                for (int g = 0; g < G; ++g)
                    if (!r.kept_groups[li * size_t(G) + size_t(g)])
                        for (int e = g * per; e < (g + 1) * per; ++e) m_tokenMap->data()->setCell(e, row, qQNaN());
            }
            if (showScores) {
                for (int e = 0; e < E; ++e)
                    if (!std::isnan(m_tokenMap->data()->cell(e, row))) m_tokenMap->data()->setCell(e, row, r.scores[li * size_t(E) + size_t(e)]);
                continue;
            }
            for (int j = 0; j < r.k; ++j) {
                const int e = r.ids[li * size_t(r.k) + size_t(j)];
                if (e >= 0 && e < E) m_tokenMap->data()->setCell(e, row, r.weights[li * size_t(r.k) + size_t(j)]);
            }
        }
        const auto tk = m_store->tokens().find(r.position);
        QString text = tk != m_store->tokens().end() ? QString::fromStdString(tk->second.text) : QString();
        m_info->setText(tr("token at position %1: id %2 %3").arg(r.position).arg(r.token).arg(text.isEmpty() ? QString() : QStringLiteral("'%1'").arg(text)));
    }
    if (it == routes.end()) m_info->setText(tr("no routing yet: send a message"));
    setFiniteDataRange(m_tokenMap, true);
    if (auto* t = qobject_cast<QCPTextElement*>(m_tokenPlot->plotLayout()->element(0, 0)))
        t->setText(it == routes.end() ? tr("selected token: none yet")
                   : showScores       ? tr("selected token: every router score (grey: group dropped)")
                                      : tr("selected token (grey: group dropped)"));
    m_tokenMap->colorScale()->axis()->setLabel(showScores ? tr("score") : tr("weight"));
    m_tokenPlot->xAxis->setRange(-0.5, E - 0.5);
    m_tokenPlot->yAxis->setRange(-0.5, R - 0.5);
    setIntTicks(m_tokenPlot->xAxis, E);
    setRowTicks(m_tokenPlot->yAxis, sh.moeLayers);

    // Sequence: positions x experts for the chosen layer.
    const int first = routes.empty() ? 0 : routes.begin()->first;
    const int last = routes.empty() ? 0 : routes.rbegin()->first;
    const int P = routes.empty() ? 1 : last - first + 1;
    m_seqMap->data()->setSize(P, E);
    m_seqMap->data()->setRange(QCPRange(first, first + P - 1), QCPRange(0, E - 1));
    m_seqMap->data()->fill(0);
    std::vector<int64_t> co(size_t(E) * size_t(E), 0);
    for (const auto& [pos, r] : routes) {
        for (size_t li = 0; li < r.layers.size(); ++li) {
            if (r.layers[li] != lay) continue;
            const int* ids = r.ids.data() + li * size_t(r.k);
            for (int j = 0; j < r.k; ++j) {
                if (ids[j] < 0 || ids[j] >= E) continue;
                m_seqMap->data()->setCell(pos - first, ids[j], r.weights[li * size_t(r.k) + size_t(j)]);
                for (int j2 = 0; j2 < r.k; ++j2)
                    if (ids[j2] >= 0 && ids[j2] < E) ++co[size_t(ids[j]) * size_t(E) + size_t(ids[j2])];
            }
        }
    }
    setFiniteDataRange(m_seqMap, true);
    m_seqPlot->xAxis->setRange(first - 0.5, first + P - 0.5);
    m_seqPlot->yAxis->setRange(-0.5, E - 0.5);
    setIntTicks(m_seqPlot->yAxis, E);
    if (it != routes.end()) {
        m_seqMarker->point1->setCoords(it->first, 0);
        m_seqMarker->point2->setCoords(it->first, 1);
        m_seqMarker->setVisible(true);
    } else {
        m_seqMarker->setVisible(false);
    }

    // Co-activation.
    m_coMap->data()->setSize(E, E);
    m_coMap->data()->setRange(QCPRange(0, E - 1), QCPRange(0, E - 1));
    for (int a = 0; a < E; ++a)
        for (int b = 0; b < E; ++b)  // the diagonal (an expert with itself) would drown the pairs: grey
            m_coMap->data()->setCell(a, b, a == b ? qQNaN() : double(co[size_t(a) * size_t(E) + size_t(b)]));
    setFiniteDataRange(m_coMap, true);
    m_coPlot->xAxis->setRange(-0.5, E - 0.5);
    m_coPlot->yAxis->setRange(-0.5, E - 0.5);
    setIntTicks(m_coPlot->xAxis, E);
    setIntTicks(m_coPlot->yAxis, E);

    // Load of the chosen layer.
    const auto scope = m_scope->currentIndex() == 0   ? TelemetryStore::LoadScope::Total
                       : m_scope->currentIndex() == 1 ? TelemetryStore::LoadScope::Message
                                                      : TelemetryStore::LoadScope::Step;
    QVector<double> keys, vals;
    const std::vector<int>& off = m_store->disabled(lay);
    QStringList offText;
    for (int e : off) offText << QString::number(e);
    auto* title = qobject_cast<QCPTextElement*>(m_loadPlot->plotLayout()->element(0, 0));
    QString titleText = tr("expert load, layer %1").arg(lay);
    if (const auto* counts = m_store->load(lay, scope)) {
        for (size_t e = 0; e < counts->size(); ++e) {
            keys << double(e);
            vals << double((*counts)[e]);
        }
        titleText += tr(" (MaxVio %1)").arg(max_violation(*counts), 0, 'f', 2);
    }
    if (!off.empty()) titleText += tr(", experts %1 off").arg(offText.join(QLatin1Char(',')));
    if (title) title->setText(titleText);
    m_loadBars->setData(keys, vals, true);
    QVector<double> offKeys, offVals;
    for (int e : off) {
        offKeys << double(e);
        offVals << 0.0;
    }
    m_disabledMarks->setData(offKeys, offVals, true);
    if (!off.empty() && routes.empty())
        m_info->setText(tr("experts %1 of layer %2 are off: the next message recomputes the conversation without them")
                            .arg(offText.join(QLatin1Char(',')))
                            .arg(lay));
    else if (drop > 0 && routes.empty())
        m_info->setText((drop == 1 ? tr("each token's top expert is off") : tr("each token's top %1 experts are off").arg(drop)) +
                        tr(": the next message recomputes the conversation without them"));
    m_loadPlot->xAxis->setRange(-0.5, E - 0.5);
    setIntTicks(m_loadPlot->xAxis, E);
    m_loadPlot->yAxis->rescale();
    m_loadPlot->yAxis->setRangeLower(0);
    if (m_loadPlot->yAxis->range().upper < 1) m_loadPlot->yAxis->setRangeUpper(1);
}

QSize RoutingView::tokenMapSize() const { return QSize(m_tokenMap->data()->keySize(), m_tokenMap->data()->valueSize()); }
QSize RoutingView::sequenceMapSize() const { return QSize(m_seqMap->data()->keySize(), m_seqMap->data()->valueSize()); }
int RoutingView::loadBarCount() const { return m_loadBars->data()->size(); }
QSize RoutingView::coactivationSize() const { return QSize(m_coMap->data()->keySize(), m_coMap->data()->valueSize()); }
double RoutingView::tokenMapValue(int expert, int row) const { return m_tokenMap->data()->cell(expert, row); }

QString RoutingView::tokenMapTitle() const {
    const auto* t = qobject_cast<QCPTextElement*>(m_tokenPlot->plotLayout()->element(0, 0));
    return t ? t->text() : QString();
}

QString RoutingView::csv() const {
    // Every routing decision the store holds, one row per (position, layer, rank), and the load.
    QString out;
    QTextStream s(&out);
    s << "position,token,layer,rank,expert,weight\n";
    for (const auto& [pos, r] : m_store->routes())
        for (size_t li = 0; li < r.layers.size(); ++li)
            for (int j = 0; j < r.k; ++j)
                s << pos << ',' << r.token << ',' << r.layers[li] << ',' << j << ','
                  << r.ids[li * size_t(r.k) + size_t(j)] << ','
                  << QString::number(double(r.weights[li * size_t(r.k) + size_t(j)]), 'g', 9) << '\n';
    return out;
}
