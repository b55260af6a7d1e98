// LatentView: latent records drawn as heatmaps; memory lines from the model card's figures.
#include "views/LatentView.h"

#include <QComboBox>
#include <QHBoxLayout>
#include <QLabel>
#include <QTextStream>

#include <qcustomplot.h>

#include "TelemetryStore.h"

using namespace moescope;

LatentView::LatentView(TelemetryStore* store, QWidget* parent)
    : PlotView(store, QStringLiteral("latent"), tr("Latent cache"), parent) {
    controls()->addWidget(new QLabel(tr("Layer:")));
    m_layer = new QComboBox;
    m_layer->setObjectName(QStringLiteral("latentLayer"));
    m_layer->setToolTip(tr("Layer whose cached c and k_pe the engine records"));
    controls()->addWidget(m_layer);
    m_info = addInfoLabel();

    auto title = [](QCustomPlot* p, const QString& t) {
        p->plotLayout()->insertRow(0);
        p->plotLayout()->addElement(0, 0, new QCPTextElement(p, t));
    };
    m_cPlot = addPlot(0, 0);
    m_cMap = addColorMap(m_cPlot, tr("c"));
    m_cMap->setGradient(QCPColorGradient(QCPColorGradient::gpPolar));
    m_cPlot->xAxis->setLabel(tr("position"));
    m_cPlot->yAxis->setLabel(tr("latent dim"));
    title(m_cPlot, tr("cached latent c"));
    m_kPlot = addPlot(0, 1);
    m_kMap = addColorMap(m_kPlot, tr("k_pe"));
    m_kMap->setGradient(QCPColorGradient(QCPColorGradient::gpPolar));
    m_kPlot->xAxis->setLabel(tr("position"));
    m_kPlot->yAxis->setLabel(tr("rope dim"));
    title(m_kPlot, tr("cached k_pe (after RoPE)"));
    m_normPlot = addPlot(1, 0);
    m_normMap = addColorMap(m_normPlot, tr("|c|"));
    m_normPlot->xAxis->setLabel(tr("position"));
    m_normPlot->yAxis->setLabel(tr("layer"));
    title(m_normPlot, tr("|c| per layer and position"));
    for (auto* p : {m_cPlot, m_kPlot, m_normPlot}) {
        auto* m = new QCPItemStraightLine(p);
        m->setPen(QPen(QColor(255, 255, 255), 1.5, Qt::DashLine));
        m->setVisible(false);
        m_markers << m;
    }
    m_memPlot = addPlot(1, 1);
    m_memPlot->xAxis->setLabel(tr("context length (tokens)"));
    m_memPlot->yAxis->setLabel(tr("cache (MiB, BF16)"));
    m_memPlot->legend->setVisible(true);
    m_memPlot->legend->setFont(QFont(font().family(), 8));
    title(m_memPlot, tr("cache memory vs context"));
    // The legend in a row of its own under the plot, entries side by side: the lines fill the
    // plot from corner to corner, so any inset legend covers one of them.
    legendBelow(m_memPlot);
    const QColor colors[] = {QColor(33, 145, 140), QColor(200, 60, 60), QColor(230, 150, 30)};
    const QString names[] = {tr("MLA latent (c + k_pe)"), tr("MHA"), tr("GQA-8")};
    for (int i = 0; i < 3; ++i) {
        auto* g = m_memPlot->addGraph();
        g->setPen(QPen(colors[i], 2, i == 2 ? Qt::DashLine : Qt::SolidLine));
        g->setName(names[i]);
    }
    m_inUse = new QCPItemStraightLine(m_memPlot);
    m_inUse->setPen(QPen(QColor(120, 120, 120), 1, Qt::DashLine));
    m_inUseText = new QCPItemText(m_memPlot);
    m_inUseText->setPositionAlignment(Qt::AlignLeft | Qt::AlignTop);
    m_inUseText->position->setTypeX(QCPItemPosition::ptPlotCoords);
    m_inUseText->position->setTypeY(QCPItemPosition::ptAxisRectRatio);
    m_inUseText->setPadding(QMargins(4, 4, 0, 0));
    connect(m_layer, &QComboBox::currentIndexChanged, this, [this] {
        emit latentLayerRequested(layer());
        onStoreChanged();
    });
    setDark(false);
}

int LatentView::layer() const { return m_layer->currentIndex() >= 0 ? m_layer->currentData().toInt() : -1; }

void LatentView::setLayer(int layer) {
    int i = m_layer->findData(layer);
    if (i >= 0) m_layer->setCurrentIndex(i);
}

void LatentView::refresh() {
    const ModelShape& sh = m_store->shape();
    const auto& lat = m_store->latents();
    if (sh.numLayers != m_layerCount) {
        m_layerCount = sh.numLayers;
        QSignalBlocker b(m_layer);
        m_layer->clear();
        for (int l = 0; l < sh.numLayers; ++l) m_layer->addItem(tr("layer %1").arg(l), l);
        // Follow whatever layer the records carry (a replayed trace, or the engine's choice).
        for (auto it = lat.rbegin(); it != lat.rend(); ++it)
            if (it->second.layer >= 0) {
                setLayer(it->second.layer);
                break;
            }
    }
    const int lay = layer();
    const int first = lat.empty() ? 0 : lat.begin()->first;
    const int P = lat.empty() ? 1 : lat.rbegin()->first - first + 1;
    int dC = sh.dC, dR = sh.dRope, L = sh.numLayers;
    for (const auto& [p, r] : lat) {
        if (r.layer == lay && !r.c.empty()) dC = int(r.c.size()), dR = int(r.k_pe.size());
        L = std::max(L, int(r.norms.size()));
    }
    dC = std::max(dC, 1), dR = std::max(dR, 1), L = std::max(L, 1);
    m_cMap->data()->setSize(P, dC);
    m_cMap->data()->setRange(QCPRange(first, first + P - 1), QCPRange(0, dC - 1));
    m_cMap->data()->fill(qQNaN());
    m_kMap->data()->setSize(P, dR);
    m_kMap->data()->setRange(QCPRange(first, first + P - 1), QCPRange(0, dR - 1));
    m_kMap->data()->fill(qQNaN());
    m_normMap->data()->setSize(P, L);
    m_normMap->data()->setRange(QCPRange(first, first + P - 1), QCPRange(0, L - 1));
    m_normMap->data()->fill(qQNaN());
    double cmax = 1e-9, kmax = 1e-9;
    int withC = 0;
    for (const auto& [p, r] : lat) {
        const int x = p - first;
        if (r.layer == lay) {
            ++withC;
            for (int d = 0; d < dC && d < int(r.c.size()); ++d) {
                m_cMap->data()->setCell(x, d, r.c[size_t(d)]);
                cmax = std::max(cmax, double(std::abs(r.c[size_t(d)])));
            }
            for (int d = 0; d < dR && d < int(r.k_pe.size()); ++d) {
                m_kMap->data()->setCell(x, d, r.k_pe[size_t(d)]);
                kmax = std::max(kmax, double(std::abs(r.k_pe[size_t(d)])));
            }
        }
        for (int l = 0; l < L && l < int(r.norms.size()); ++l) m_normMap->data()->setCell(x, l, r.norms[size_t(l)]);
    }
    m_cMap->setDataRange(QCPRange(-cmax, cmax));
    m_kMap->setDataRange(QCPRange(-kmax, kmax));
    setFiniteDataRange(m_normMap);
    for (auto* p : {m_cPlot, m_kPlot, m_normPlot}) p->xAxis->setRange(first - 0.5, first + P - 0.5);
    m_cPlot->yAxis->setRange(-0.5, dC - 0.5);
    m_kPlot->yAxis->setRange(-0.5, dR - 0.5);
    m_normPlot->yAxis->setRange(-0.5, L - 0.5);

    const int sel = m_store->selected();
    for (auto* m : m_markers) {
        m->point1->setCoords(sel, 0);
        m->point2->setCoords(sel, 1);
        m->setVisible(sel >= first && sel < first + P && !lat.empty());
    }

    // Memory against context length, from the card's bytes per token (BF16).
    const int maxCtx = std::max(sh.maxPositions, 1024);
    const double mib = 1024.0 * 1024.0;
    QVector<double> x, yl, ym, yg;
    for (int i = 0; i <= 64; ++i) {
        const double n = double(maxCtx) * i / 64.0;
        x << n;
        yl << n * double(sh.latentBytesPerToken) / mib;
        ym << n * double(sh.mhaBytesPerToken) / mib;
        yg << n * double(sh.gqaBytesPerToken) / mib;
    }
    m_memPlot->graph(0)->setData(x, yl, true);
    m_memPlot->graph(1)->setData(x, ym, true);
    // With 8 heads or fewer GQA-8 is MHA: one line, named for both.
    const bool gqaIsMha = sh.gqaBytesPerToken == sh.mhaBytesPerToken;
    m_memPlot->graph(1)->setName(gqaIsMha ? tr("MHA = GQA-8 (%1 heads)").arg(sh.heads) : tr("MHA"));
    m_memPlot->graph(2)->setData(gqaIsMha ? QVector<double>{} : x, gqaIsMha ? QVector<double>{} : yg, true);
    m_memPlot->graph(2)->setVisible(!gqaIsMha);
    if (gqaIsMha) m_memPlot->graph(2)->removeFromLegend();
    else if (!m_memPlot->legend->hasItemWithPlottable(m_memPlot->graph(2))) m_memPlot->graph(2)->addToLegend();
    const int used = lat.empty() ? 0 : lat.rbegin()->first + 1;
    m_memPlot->rescaleAxes();
    m_memPlot->yAxis->setRange(0, m_memPlot->yAxis->range().upper * 1.1);
    m_inUse->point1->setCoords(used, 0);
    m_inUse->point2->setCoords(used, 1);
    m_inUse->setVisible(used > 0);
    m_inUseText->position->setCoords(used, 0.0);
    m_inUseText->setText(tr("in use: %1 tokens").arg(used));
    m_inUseText->setColor(dark() ? QColor(220, 220, 220) : QColor(30, 30, 30));
    m_inUseText->setVisible(used > 0);
    const qint64 inUse = lat.empty() ? 0 : lat.rbegin()->second.cache_bytes;
    m_info->setText(tr("%1 positions, c/k_pe of layer %2 recorded at %3 of them; latent %4 B/token vs MHA %5 B/token (%6x smaller); cache in use %7 KiB")
                        .arg(used)
                        .arg(lay)
                        .arg(withC)
                        .arg(sh.latentBytesPerToken)
                        .arg(sh.mhaBytesPerToken)
                        .arg(sh.latentBytesPerToken ? double(sh.mhaBytesPerToken) / double(sh.latentBytesPerToken) : 0.0, 0, 'f', 1)
                        .arg(double(inUse) / 1024.0, 0, 'f', 1));
}

QSize LatentView::latentMapSize() const { return QSize(m_cMap->data()->keySize(), m_cMap->data()->valueSize()); }
QSize LatentView::kpeMapSize() const { return QSize(m_kMap->data()->keySize(), m_kMap->data()->valueSize()); }
QSize LatentView::normMapSize() const { return QSize(m_normMap->data()->keySize(), m_normMap->data()->valueSize()); }
int LatentView::memoryPoints() const { return m_memPlot->graph(0)->data()->size(); }

QString LatentView::csv() const {
    QString out;
    QTextStream s(&out);
    s << "position,kind,layer,dim,value\n";
    for (const auto& [p, r] : m_store->latents()) {
        for (size_t l = 0; l < r.norms.size(); ++l) s << p << ",norm," << l << ",," << QString::number(double(r.norms[l]), 'g', 9) << '\n';
        for (size_t d = 0; d < r.c.size(); ++d) s << p << ",c," << r.layer << ',' << d << ',' << QString::number(double(r.c[d]), 'g', 9) << '\n';
        for (size_t d = 0; d < r.k_pe.size(); ++d) s << p << ",k_pe," << r.layer << ',' << d << ',' << QString::number(double(r.k_pe[d]), 'g', 9) << '\n';
    }
    return out;
}
