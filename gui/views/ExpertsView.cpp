// ExpertsView: draws engine/expert_analysis.h's result over the store's route records; the view
// itself only formats and looks up positions.
#include "views/ExpertsView.h"

#include <QComboBox>
#include <QGridLayout>
#include <QHBoxLayout>
#include <QHeaderView>
#include <QLabel>
#include <QTableWidget>
#include <QTextStream>

#include <algorithm>

#include <qcustomplot.h>

#include "TelemetryStore.h"

using namespace moescope;

namespace {

QString pct(double x, int decimals = 1) { return QString::number(100.0 * x, 'f', decimals) + QLatin1Char('%'); }

}  // namespace

ExpertsView::ExpertsView(TelemetryStore* store, QWidget* parent)
    : PlotView(store, QStringLiteral("experts"), tr("Experts"), parent) {
    controls()->addWidget(new QLabel(tr("Layer:")));
    m_layer = new QComboBox;
    m_layer->setObjectName(QStringLiteral("expertsLayer"));
    m_layer->setToolTip(tr("MoE layer whose experts the table and the bars show"));
    controls()->addWidget(m_layer);
    controls()->addWidget(new QLabel(tr("Rank tokens by:")));
    m_rank = new QComboBox;
    m_rank->setObjectName(QStringLiteral("expertsRank"));
    m_rank->addItem(tr("p(e|t)"), int(TokenRank::Consistency));
    m_rank->addItem(tr("count"), int(TokenRank::Count));
    m_rank->addItem(tr("lift"), int(TokenRank::Lift));
    m_rank->setToolTip(tr("p(e|t): the share of the token's occurrences routed to the expert (tokens seen once rank last); "
                          "count: n(e,t), where frequent tokens top every expert; lift: p(e|t) / p(e), against the "
                          "expert's base rate"));
    controls()->addWidget(m_rank);
    m_info = addInfoLabel();

    m_table = new QTableWidget(0, 5);
    m_table->setObjectName(QStringLiteral("expertsTable"));
    m_table->setHorizontalHeaderLabels({tr("expert"), tr("share"), tr("weight"), tr("tokens"), tr("top tokens: token ×n (p(e|t))")});
    m_table->horizontalHeader()->setSectionResizeMode(QHeaderView::ResizeToContents);
    m_table->horizontalHeader()->setSectionResizeMode(4, QHeaderView::Stretch);
    m_table->verticalHeader()->setVisible(false);
    m_table->verticalHeader()->setDefaultSectionSize(fontMetrics().height() + 4);
    m_table->setEditTriggers(QAbstractItemView::NoEditTriggers);
    // The chosen expert's row is marked in its items (bold, tinted), not by the selection, so
    // that exports (drawn from a copy of the items) show it as the screen does.
    m_table->setSelectionMode(QAbstractItemView::NoSelection);
    m_table->setFocusPolicy(Qt::NoFocus);
    m_table->setWordWrap(false);
    m_table->setAlternatingRowColors(true);
    m_table->setMinimumSize(300, 150);
    m_table->setToolTip(tr("share: the expert's part of the layer's routings (uniform: 1/E); weight: its mean mixing "
                           "weight; tokens: distinct token ids it took. Click a row for its bars."));
    plotGrid()->addWidget(m_table, 0, 0, 2, 1);

    m_barPlot = addPlot(0, 1);
    m_tokenBars = new QCPBars(m_barPlot->yAxis, m_barPlot->xAxis);  // horizontal: tokens down the y axis
    m_tokenBars->setWidth(0.7);
    m_tokenBars->setPen(Qt::NoPen);
    m_tokenBars->setBrush(QColor(59, 82, 139));
    // Tokens seen fewer than min_count times (p(e|t) = 1 by chance) in grey.
    m_rareBars = new QCPBars(m_barPlot->yAxis, m_barPlot->xAxis);
    m_rareBars->setWidth(0.7);
    m_rareBars->setPen(Qt::NoPen);
    m_rareBars->setBrush(QColor(150, 150, 150));
    m_barPlot->setToolTip(tr("Blue: tokens seen twice or more; grey: seen once, where p(e|t) = 1 says little. "
                             "Click a bar to select the last position where this expert took the token."));
    m_barPlot->yAxis->setRangeReversed(true);
    m_barPlot->yAxis->setTicker(QSharedPointer<QCPAxisTickerText>(new QCPAxisTickerText));
    m_barPlot->yAxis->setTickLabelFont(QFont(QStringLiteral("DejaVu Sans Mono"), 8));
    m_barPlot->plotLayout()->insertRow(0);
    m_barPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_barPlot, tr("selected expert's top tokens")));

    m_layerPlot = addPlot(1, 1);
    m_specBars = new QCPBars(m_layerPlot->xAxis, m_layerPlot->yAxis);
    m_specBars->setWidth(0.6);
    m_specBars->setPen(Qt::NoPen);
    m_specBars->setBrush(QColor(94, 201, 98, 170));
    m_specBars->setName(tr("specialization"));
    m_consistency = m_layerPlot->addGraph();
    m_consistency->setPen(QPen(QColor(59, 82, 139), 2));
    m_consistency->setScatterStyle(QCPScatterStyle(QCPScatterStyle::ssDisc, 5));
    m_consistency->setName(tr("consistency"));
    m_chance = m_layerPlot->addGraph();
    m_chance->setPen(QPen(QColor(230, 120, 30), 1.5, Qt::DashLine));
    m_chance->setName(tr("chance"));
    m_layerPlot->xAxis->setLabel(tr("MoE layer"));
    m_layerPlot->yAxis->setLabel(tr("mean top p(e|t)"));
    m_layerPlot->setToolTip(tr("token consistency: the mean over token ids seen twice or more of the share of their "
                               "occurrences routed to their most frequent expert; chance: the same with the token ids "
                               "shuffled across positions; specialization = (consistency - chance) / (1 - chance)"));
    m_layerPlot->plotLayout()->insertRow(0);
    m_layerPlot->plotLayout()->addElement(0, 0, new QCPTextElement(m_layerPlot, tr("token id decides the expert? per layer")));
    m_layerPlot->legend->setVisible(true);
    legendBelow(m_layerPlot);

    plotGrid()->setColumnStretch(0, 5);
    plotGrid()->setColumnStretch(1, 4);
    plotGrid()->setRowStretch(0, 3);
    plotGrid()->setRowStretch(1, 2);

    m_overviewTimer.setSingleShot(true);
    connect(&m_overviewTimer, &QTimer::timeout, this, &ExpertsView::onStoreChanged);
    connect(m_layer, &QComboBox::currentIndexChanged, this, &ExpertsView::onStoreChanged);
    connect(m_rank, &QComboBox::currentIndexChanged, this, &ExpertsView::onStoreChanged);
    connect(m_table, &QTableWidget::currentCellChanged, this, [this](int row, int, int, int) {
        if (row >= 0 && row != m_expert) setExpert(row);
    });
    connect(m_table, &QTableWidget::cellClicked, this, [this](int row, int) {
        if (row >= 0 && row != m_expert) setExpert(row);
    });
    connect(m_barPlot, &QCustomPlot::plottableClick, this, [this](QCPAbstractPlottable* p, int index, QMouseEvent*) {
        if (p == m_tokenBars || p == m_rareBars) selectTokenBar(int(p->interface1D()->dataMainKey(index)));
    });
    setDark(false);
}

int ExpertsView::layer() const { return m_layer->currentIndex() >= 0 ? m_layer->currentData().toInt() : -1; }

void ExpertsView::setLayer(int layer) {
    const int i = m_layer->findData(layer);
    if (i >= 0) m_layer->setCurrentIndex(i);
}

TokenRank ExpertsView::rank() const { return TokenRank(m_rank->currentData().toInt()); }

void ExpertsView::setRank(TokenRank r) {
    const int i = m_rank->findData(int(r));
    if (i >= 0) m_rank->setCurrentIndex(i);
}

void ExpertsView::setExpert(int expert) {
    m_expert = std::max(0, expert);
    const LayerExperts* L = shownLayer();
    markExpertRow();
    fillBars(L);
    m_barPlot->replot(QCustomPlot::rpQueuedReplot);
}

const LayerExperts* ExpertsView::shownLayer() const { return m_detail.layers.empty() ? nullptr : &m_detail.layers[0]; }

void ExpertsView::rebuildLayerChoices() {
    const auto& layers = m_store->shape().moeLayers;
    if (int(layers.size()) == m_layerCount) return;
    m_layerCount = int(layers.size());
    QSignalBlocker b(m_layer);
    const int keep = layer();
    m_layer->clear();
    for (int l : layers) m_layer->addItem(tr("layer %1").arg(l), l);
    const int i = m_layer->findData(keep);
    m_layer->setCurrentIndex(i >= 0 ? i : 0);
}

QString ExpertsView::tokenText(int id) const {
    auto it = m_texts.find(id);
    return it == m_texts.end() ? QStringLiteral("#%1").arg(id) : QString::fromStdString(quote_token(it->second));
}

void ExpertsView::refresh() {
    rebuildLayerChoices();
    const auto& routes = m_store->routes();
    const qint64 records = m_store->recordCount() * 1000003 + qint64(routes.size()) * 7 +
                           (routes.empty() ? 0 : routes.rbegin()->first);
    const int lay = layer();
    const bool detailFresh = records == m_analyzedRecords && lay == m_analyzedLayer && int(rank()) == m_analyzedRank;
    // The all-layer overview costs ~58x the shown layer at V3 scale: while records stream it is
    // recomputed at most every kOverviewIntervalMs, the shown layer on every redraw.
    bool overviewDue = records != m_overviewRecords;
    if (overviewDue && m_overviewRecords != -1 && m_overviewClock.isValid() &&
        m_overviewClock.elapsed() < kOverviewIntervalMs) {
        overviewDue = false;
        if (!m_overviewTimer.isActive()) m_overviewTimer.start(int(kOverviewIntervalMs - m_overviewClock.elapsed()) + 1);
    }
    if (detailFresh && !overviewDue) return;

    std::vector<const RouteRecord*> recs;
    recs.reserve(routes.size());
    for (const auto& [pos, r] : routes) recs.push_back(&r);
    ExpertOptions opt;
    opt.num_hidden_layers = m_store->shape().numLayers;
    try {
        if (overviewDue) {
            ExpertOptions over = opt;
            over.token_lists = false;
            m_overviewRecords = records;
            m_overviewClock.start();
            m_overview = analyze_experts(recs, over);
        }
        if (!detailFresh) {
            m_analyzedRecords = records;
            m_analyzedLayer = lay;
            m_analyzedRank = int(rank());
            m_texts.clear();
            for (const auto& [pos, t] : m_store->tokens())
                if (!t.text.empty()) m_texts.try_emplace(t.id, t.text);
            m_detail = {};
            bool routed = false;
            for (const auto& [pos, r] : routes) {  // the layer choice may precede its first record
                routed = std::find(r.layers.begin(), r.layers.end(), lay) != r.layers.end();
                break;
            }
            if (lay >= 0 && routed) {
                ExpertOptions one = opt;
                one.layers = {lay};
                one.top = kTopTokens;
                one.rank = rank();
                m_detail = analyze_experts(recs, one);
            }
        }
    } catch (const std::exception& e) {
        m_overview = {};
        m_detail = {};
        m_info->setText(tr("the route records could not be analyzed: %1").arg(QString::fromUtf8(e.what())));
        return;
    }

    // Every layer: consistency, chance, specialization.
    QVector<double> x, cons, chance, spec;
    QSharedPointer<QCPAxisTickerText> ticks(new QCPAxisTickerText);
    const int n = int(m_overview.layers.size());
    const int every = std::max(1, n / 16);  // V3's 58 layers: a label every 4th
    double lo = 0;
    for (int i = 0; i < n; ++i) {
        const auto& L = m_overview.layers[size_t(i)];
        if (!L.scored_tokens) continue;
        x << i;
        cons << L.consistency;
        chance << L.chance;
        spec << L.specialization;
        lo = std::min(lo, L.specialization);
    }
    for (int i = 0; i < n; i += every) ticks->addTick(i, QString::number(m_overview.layers[size_t(i)].layer));
    m_layerPlot->xAxis->setTicker(ticks);
    m_consistency->setData(x, cons, true);
    m_chance->setData(x, chance, true);
    m_specBars->setData(x, spec, true);
    m_specBars->setWidth(n > 24 ? 0.8 : 0.6);
    m_layerPlot->xAxis->setRange(-0.7, std::max(0, n - 1) + 0.7);
    m_layerPlot->yAxis->setRange(std::min(0.0, lo - 0.05), 1.05);

    const LayerExperts* L = shownLayer();
    if (!L) {
        m_table->setRowCount(0);
        fillBars(nullptr);
        if (routes.empty()) m_info->setText(tr("no routing yet: chat, or open a trace"));
        return;
    }
    if (m_expert >= L->E) m_expert = 0;
    fillTable(*L);
    markExpertRow();
    fillBars(L);
    m_info->setText(summaryText());
}

QString ExpertsView::summaryText() const {
    const LayerExperts* L = shownLayer();
    if (!L) return QString();
    QString s = tr("layer %1: %2 positions, %3 token ids (%4 seen twice or more)")
                    .arg(L->layer)
                    .arg(L->positions)
                    .arg(L->distinct_tokens)
                    .arg(L->scored_tokens);
    if (L->scored_tokens)
        s += tr("; token consistency %1, chance %2: specialization %3")
                 .arg(L->consistency, 0, 'f', 3)
                 .arg(L->chance, 0, 'f', 3)
                 .arg(L->specialization, 0, 'f', 3);
    else
        s += tr("; no token seen twice yet, so no consistency");
    if (const int drop = m_store->dropTop(L->layer); drop > 0)
        s += drop == 1 ? tr("; each token's top expert is off (it takes its next best)")
                       : tr("; each token's top %1 experts are off (it takes its next best)").arg(drop);
    return s;
}

void ExpertsView::fillTable(const LayerExperts& L) {
    m_table->setRowCount(L.E);
    const double uniform = L.E ? 1.0 / L.E : 0.0;
    auto set = [this](int r, int c, const QString& text, Qt::Alignment align) {
        QTableWidgetItem* it = m_table->item(r, c);
        if (!it) {
            it = new QTableWidgetItem;
            m_table->setItem(r, c, it);
        }
        it->setText(text);
        it->setTextAlignment(align | Qt::AlignVCenter);
        return it;
    };
    const QColor hot = dark() ? QColor(120, 70, 40) : QColor(255, 214, 170);
    const QColor cold = dark() ? QColor(40, 70, 110) : QColor(190, 215, 245);
    const std::vector<int>& off = m_store->disabled(L.layer);
    for (int e = 0; e < L.E; ++e) {
        const ExpertStats& ex = L.experts[size_t(e)];
        const bool switchedOff = std::find(off.begin(), off.end(), e) != off.end();
        set(e, 0, switchedOff ? tr("%1 (off)").arg(e) : QString::number(e), Qt::AlignRight);
        QTableWidgetItem* share = set(e, 1, pct(ex.share), Qt::AlignRight);
        // Over- and under-loaded experts (more than 1.5x / less than half the uniform share) tinted.
        share->setBackground(ex.share > 1.5 * uniform ? QBrush(hot) : ex.share < 0.5 * uniform ? QBrush(cold) : QBrush());
        set(e, 2, ex.n_slots ? QString::number(ex.mean_weight, 'f', 3) : QStringLiteral("-"), Qt::AlignRight);
        set(e, 3, QString::number(ex.distinct_tokens), Qt::AlignRight);
        QStringList toks;
        for (size_t i = 0; i < ex.tokens.size() && i < size_t(kTableTokens); ++i) {
            const auto& t = ex.tokens[i];
            toks << QStringLiteral("%1 ×%2 (%3)").arg(tokenText(t.token)).arg(t.count).arg(pct(t.p, 0));
        }
        QTableWidgetItem* top = set(e, 4,
                                    ex.n_slots      ? toks.join(QStringLiteral("  "))
                                    : switchedOff   ? tr("(switched off: see Routing, Off)")
                                                    : tr("(never routed)"),
                                    Qt::AlignLeft);
        top->setToolTip(top->text());
    }
}

void ExpertsView::themeChanged() {
    const LayerExperts* L = shownLayer();
    if (!L) return;
    fillTable(*L);
    m_markedRow = -1;
    markExpertRow();
    fillBars(L);
}

void ExpertsView::markExpertRow() {
    const QColor mark = dark() ? QColor(50, 80, 120) : QColor(205, 225, 250);
    for (int r = 0; r < m_table->rowCount(); ++r) {
        const bool on = r == m_expert;
        if (!on && r != m_markedRow) continue;
        for (int c = 0; c < m_table->columnCount(); ++c) {
            QTableWidgetItem* it = m_table->item(r, c);
            if (!it) continue;
            QFont f = it->font();
            f.setBold(on);
            it->setFont(f);
            if (c != 1) it->setBackground(on ? QBrush(mark) : QBrush());  // the share cell keeps its load tint
        }
    }
    m_markedRow = m_expert;
}

void ExpertsView::fillBars(const LayerExperts* L) {
    m_barPlot->clearItems();
    m_barTokens.clear();
    QSharedPointer<QCPAxisTickerText> ticks(new QCPAxisTickerText);
    QVector<double> keys, values, rareKeys, rareValues;
    const TokenRank r = rank();
    const int minCount = ExpertOptions().min_count;
    double top = 0;
    if (L && m_expert < L->E) {
        const ExpertStats& ex = L->experts[size_t(m_expert)];
        for (size_t i = 0; i < ex.tokens.size(); ++i) {
            const auto& t = ex.tokens[i];
            const double v = r == TokenRank::Count ? double(t.count) : r == TokenRank::Lift ? t.lift : t.p;
            (t.occurrences >= minCount ? keys : rareKeys) << double(i);
            (t.occurrences >= minCount ? values : rareValues) << v;
            top = std::max(top, v);
            ticks->addTick(double(i), tokenText(t.token));
            m_barTokens.push_back(t.token);
            auto* label = new QCPItemText(m_barPlot);
            label->position->setType(QCPItemPosition::ptPlotCoords);
            label->position->setAxes(m_barPlot->xAxis, m_barPlot->yAxis);
            label->position->setCoords(v, double(i));
            label->setPositionAlignment(Qt::AlignLeft | Qt::AlignVCenter);
            label->setPadding(QMargins(4, 0, 0, 0));
            label->setText(QStringLiteral("×%1 of %2").arg(t.count).arg(t.occurrences));
            label->setFont(QFont(font().family(), 8));
            label->setColor(dark() ? QColor(220, 220, 220) : QColor(40, 40, 40));
            label->setClipToAxisRect(false);
        }
        if (auto* title = qobject_cast<QCPTextElement*>(m_barPlot->plotLayout()->element(0, 0)))
            title->setText(
                tr("expert %1 of layer %2: top tokens").arg(m_expert).arg(L->layer));
    }
    else if (auto* title = qobject_cast<QCPTextElement*>(m_barPlot->plotLayout()->element(0, 0)))
        title->setText(tr("selected expert's top tokens"));
    m_tokenBars->setData(keys, values, true);
    m_rareBars->setData(rareKeys, rareValues, true);
    m_barPlot->yAxis->setTicker(ticks);
    m_barPlot->yAxis->setRange(-0.6, std::max(int(m_barTokens.size()), 4) - 0.4);
    // Room on the right for the "×n of m" labels.
    const double upper = r == TokenRank::Consistency ? 1.0 : std::max(top, 1.0);
    m_barPlot->xAxis->setRange(0, upper * 1.35);
    m_barPlot->xAxis->setLabel(r == TokenRank::Count ? tr("n(e,t)") : r == TokenRank::Lift ? tr("p(e|t) / p(e)") : tr("p(e|t)"));
}

int ExpertsView::selectTokenBar(int index) {
    const LayerExperts* L = shownLayer();
    if (!L || index < 0 || index >= int(m_barTokens.size())) return -1;
    const int token = m_barTokens[size_t(index)];
    const auto& routes = m_store->routes();
    // The latest position where this expert took the token.
    for (auto it = routes.rbegin(); it != routes.rend(); ++it) {
        const RouteRecord& r = it->second;
        if (r.token != token) continue;
        for (size_t li = 0; li < r.layers.size(); ++li) {
            if (r.layers[li] != L->layer) continue;
            for (int i = 0; i < r.k; ++i)
                if (r.ids[li * size_t(r.k) + size_t(i)] == m_expert) {
                    m_store->select(it->first);
                    return it->first;
                }
        }
    }
    return -1;
}

int ExpertsView::tokenBarCount() const { return m_tokenBars->data()->size() + m_rareBars->data()->size(); }

QStringList ExpertsView::tokenBarLabels() const {
    QStringList out;
    for (int t : m_barTokens) out << tokenText(t);
    return out;
}

int ExpertsView::overviewPoints() const { return m_consistency->data()->size(); }

QString ExpertsView::csv() const {
    QString out;
    QTextStream s(&out);
    s << "layer,positions,distinct_tokens,scored_tokens,consistency,chance,specialization\n";
    for (const auto& L : m_overview.layers)
        s << L.layer << ',' << L.positions << ',' << L.distinct_tokens << ',' << L.scored_tokens << ','
          << QString::number(L.consistency, 'g', 9) << ',' << QString::number(L.chance, 'g', 9) << ','
          << QString::number(L.specialization, 'g', 9) << '\n';
    s << '\n' << "layer,expert,slots,share,mean_weight,rank,token,text,count,occurrences,p,lift\n";
    if (const LayerExperts* L = shownLayer())
        for (const auto& ex : L->experts) {
            const QString head = QStringLiteral("%1,%2,%3,%4,%5,")
                                     .arg(L->layer)
                                     .arg(ex.expert)
                                     .arg(ex.n_slots)
                                     .arg(QString::number(ex.share, 'g', 9), QString::number(ex.mean_weight, 'g', 9));
            if (ex.tokens.empty()) s << head << ",,,,,,\n";
            for (size_t i = 0; i < ex.tokens.size(); ++i) {
                const auto& t = ex.tokens[i];
                auto it = m_texts.find(t.token);
                s << head << i + 1 << ',' << t.token << ','
                  << (it == m_texts.end() ? QString() : csvEscape(QString::fromStdString(it->second))) << ',' << t.count << ','
                  << t.occurrences << ',' << QString::number(t.p, 'g', 9) << ',' << QString::number(t.lift, 'g', 9) << '\n';
            }
        }
    return out;
}
