// MtpView: counts over MTP records; speeds from the generations the chat reported.
#include "views/MtpView.h"

#include <QHBoxLayout>
#include <QLabel>
#include <QTextStream>

#include <deque>

#include <qcustomplot.h>

#include "TelemetryStore.h"

using namespace moescope;

static QCPBars* makeBars(QCustomPlot* p, const QColor& c) {
    auto* b = new QCPBars(p->xAxis, p->yAxis);
    b->setWidth(0.7);
    b->setPen(Qt::NoPen);
    b->setBrush(c);
    return b;
}

MtpView::MtpView(TelemetryStore* store, QWidget* parent) : PlotView(store, QStringLiteral("mtp"), tr("MTP"), parent) {
    m_info = addInfoLabel();
    auto title = [](QCustomPlot* p, const QString& t) {
        p->plotLayout()->insertRow(0);
        p->plotLayout()->addElement(0, 0, new QCPTextElement(p, t));
    };
    m_ratePlot = addPlot(0, 0);
    m_ratePlot->xAxis->setLabel(tr("speculative step"));
    m_ratePlot->yAxis->setLabel(tr("acceptance"));
    m_ratePlot->legend->setVisible(true);
    // Acceptance rates sit high: the legend goes bottom right, clear of the lines.
    m_ratePlot->axisRect()->insetLayout()->setInsetAlignment(0, Qt::AlignBottom | Qt::AlignRight);
    title(m_ratePlot, tr("acceptance rate"));
    auto* g0 = m_ratePlot->addGraph();
    g0->setPen(QPen(QColor(33, 145, 140), 2));
    g0->setName(tr("running"));
    auto* g1 = m_ratePlot->addGraph();
    g1->setPen(QPen(QColor(230, 120, 30), 1.2));
    g1->setName(tr("last 32 steps"));
    m_posPlot = addPlot(0, 1);
    m_posPlot->xAxis->setLabel(tr("draft position"));
    m_posPlot->yAxis->setLabel(tr("acceptance"));
    title(m_posPlot, tr("acceptance per draft position"));
    m_posBars = makeBars(m_posPlot, QColor(59, 82, 139));
    m_histPlot = addPlot(1, 0);
    m_histPlot->xAxis->setLabel(tr("drafted tokens accepted"));
    m_histPlot->yAxis->setLabel(tr("steps"));
    title(m_histPlot, tr("accepted-length histogram"));
    m_histBars = makeBars(m_histPlot, QColor(94, 201, 98));
    for (auto* a : {m_posPlot->xAxis, m_histPlot->xAxis}) {
        QSharedPointer<QCPAxisTickerFixed> fx(new QCPAxisTickerFixed);
        fx->setTickStep(1);
        fx->setScaleStrategy(QCPAxisTickerFixed::ssMultiples);
        a->setTicker(fx);
    }
    m_speedPlot = addPlot(1, 1);
    m_speedPlot->yAxis->setLabel(tr("decode tokens/s (mean)"));
    title(m_speedPlot, tr("speed with and without MTP"));
    m_speedBars = makeBars(m_speedPlot, QColor(200, 90, 60));
    QSharedPointer<QCPAxisTickerText> t(new QCPAxisTickerText);
    t->addTick(0, tr("MTP off"));
    t->addTick(1, tr("MTP on"));
    m_speedPlot->xAxis->setTicker(t);
    m_speedPlot->xAxis->setRange(-0.6, 1.6);
    for (int i = 0; i < 2; ++i) {
        m_speedText[i] = new QCPItemText(m_speedPlot);
        m_speedText[i]->setPositionAlignment(Qt::AlignHCenter | Qt::AlignBottom);
        m_speedText[i]->position->setType(QCPItemPosition::ptPlotCoords);
        m_speedText[i]->setPadding(QMargins(0, 0, 0, 3));
    }
    setDark(false);
}

void MtpView::refresh() {
    const auto& recs = m_store->mtp();
    QVector<double> x, run, roll;
    int depth = std::max(m_store->shape().mtpDepth, 1);
    for (const auto& r : recs) depth = std::max(depth, int(r.draft.size()));
    std::vector<double> drafted(size_t(depth), 0), accepted(size_t(depth), 0), hist(size_t(depth) + 1, 0);
    int64_t drTot = 0, acTot = 0;
    std::deque<std::pair<int, int>> window;
    int wD = 0, wA = 0;
    for (size_t i = 0; i < recs.size(); ++i) {
        const auto& r = recs[i];
        const int n = int(r.draft.size()), a = std::clamp(r.accepted, 0, n);
        for (int d = 0; d < n; ++d) drafted[size_t(d)] += 1;
        for (int d = 0; d < a; ++d) accepted[size_t(d)] += 1;
        hist[size_t(a)] += 1;
        drTot += n;
        acTot += a;
        window.push_back({n, a});
        wD += n, wA += a;
        if (window.size() > 32) {
            wD -= window.front().first, wA -= window.front().second;
            window.pop_front();
        }
        x << double(i);
        run << (drTot ? double(acTot) / double(drTot) : 0.0);
        roll << (wD ? double(wA) / double(wD) : 0.0);
    }
    m_ratePlot->graph(0)->setData(x, run, true);
    m_ratePlot->graph(1)->setData(x, roll, true);
    m_ratePlot->xAxis->setRange(0, std::max<double>(1, x.size()));
    m_ratePlot->yAxis->setRange(0, 1.05);
    QVector<double> px, py, hx, hy;
    for (int d = 0; d < depth; ++d) {
        px << d + 1;
        py << (drafted[size_t(d)] > 0 ? accepted[size_t(d)] / drafted[size_t(d)] : 0.0);
    }
    for (int a = 0; a <= depth; ++a) {
        hx << a;
        hy << hist[size_t(a)];
    }
    m_posBars->setData(px, py, true);
    m_posPlot->xAxis->setRange(0.3, depth + 0.7);
    m_posPlot->yAxis->setRange(0, 1.05);
    m_histBars->setData(hx, hy, true);
    m_histPlot->xAxis->setRange(-0.6, depth + 0.6);
    m_histPlot->yAxis->rescale();
    m_histPlot->yAxis->setRangeLower(0);
    if (m_histPlot->yAxis->range().upper < 1) m_histPlot->yAxis->setRangeUpper(1);

    double sum[2] = {0, 0};
    int cnt[2] = {0, 0};
    for (const auto& g : m_store->generations()) {
        if (g.tokens <= 0 || g.tokensPerS <= 0) continue;
        sum[g.mtp ? 1 : 0] += g.tokensPerS;
        cnt[g.mtp ? 1 : 0] += 1;
    }
    QVector<double> sx{0, 1}, sy{cnt[0] ? sum[0] / cnt[0] : 0.0, cnt[1] ? sum[1] / cnt[1] : 0.0};
    m_speedBars->setData(sx, sy, true);
    const double top = std::max(1.0, std::max(sy[0], sy[1]) * 1.2);
    m_speedPlot->yAxis->setRange(0, top);
    for (int i = 0; i < 2; ++i) {
        m_speedText[i]->position->setCoords(i, sy[i] > 0 ? sy[i] : 0.0);
        m_speedText[i]->setText(cnt[i] ? tr("%1 tok/s").arg(sy[i], 0, 'f', 0) : tr("no answer yet"));
        m_speedText[i]->setTextAlignment(Qt::AlignHCenter);
        m_speedText[i]->setColor(dark() ? QColor(220, 220, 220) : QColor(30, 30, 30));
    }
    m_info->setText(recs.empty() ? tr("no speculative steps yet (MTP needs a checkpoint with MTP modules and MTP on)")
                                 : tr("%1 speculative steps, %2 of %3 drafted tokens accepted (%4%), mean accepted length %5")
                                       .arg(recs.size())
                                       .arg(acTot)
                                       .arg(drTot)
                                       .arg(drTot ? 100.0 * double(acTot) / double(drTot) : 0.0, 0, 'f', 1)
                                       .arg(1.0 + (recs.empty() ? 0.0 : double(acTot) / double(recs.size())), 0, 'f', 2));
}

int MtpView::ratePoints() const { return m_ratePlot->graph(0)->data()->size(); }
int MtpView::histogramBins() const { return m_histBars->data()->size(); }
int MtpView::positionBars() const { return m_posBars->data()->size(); }
int MtpView::speedBars() const { return m_speedBars->data()->size(); }

QString MtpView::csv() const {
    QString out;
    QTextStream s(&out);
    s << "step,position,drafted,accepted,acceptance_rate\n";
    for (const auto& r : m_store->mtp())
        s << r.step << ',' << r.position << ',' << r.draft.size() << ',' << r.accepted << ','
          << QString::number(r.acceptance_rate, 'g', 9) << '\n';
    return out;
}
