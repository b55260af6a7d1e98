// PlotView: shared plot plumbing, theme and export.
#include "views/PlotView.h"

#include <QGridLayout>

#include <cmath>
#include <QFileDialog>
#include <QHBoxLayout>
#include <QLabel>
#include <QMessageBox>
#include <QToolButton>
#include <QPainter>
#include <QPdfWriter>
#include <QSaveFile>
#include <QVBoxLayout>

#include <qcustomplot.h>

#include "TelemetryStore.h"

PlotView::PlotView(TelemetryStore* store, const QString& name, const QString& title, QWidget* parent)
    : QWidget(parent), m_store(store), m_name(name), m_title(title) {
    setObjectName(name + QStringLiteral("View"));
    auto* v = new QVBoxLayout(this);
    v->setContentsMargins(4, 4, 4, 4);
    auto* row = new QHBoxLayout;
    m_controls = new QHBoxLayout;
    row->addLayout(m_controls, 1);
    auto* exportButton = new QToolButton;
    exportButton->setObjectName(QStringLiteral("exportButton"));
    exportButton->setIcon(QIcon(QStringLiteral(":/icons/export.svg")));
    exportButton->setToolTip(tr("Export this view: PNG, PDF and the CSV of its data"));
    exportButton->setAutoRaise(true);
    row->addWidget(exportButton);
    v->addLayout(row);
    connect(exportButton, &QToolButton::clicked, this, [this] {
        const QString f = QFileDialog::getSaveFileName(this, tr("Export %1 (PNG, PDF, CSV)").arg(m_title), m_name + QStringLiteral(".png"),
                                                       tr("PNG + PDF + CSV (*.png)"));
        if (f.isEmpty()) return;
        QString base = f;
        if (base.endsWith(QStringLiteral(".png"), Qt::CaseInsensitive)) base.chop(4);
        QString err;
        if (!exportTo(base, &err)) QMessageBox::warning(this, tr("Export failed"), err);
    });
    m_area = new QWidget(this);
    m_grid = new QGridLayout(m_area);
    m_grid->setContentsMargins(0, 0, 0, 0);
    m_grid->setSpacing(4);
    v->addWidget(m_area, 1);
    connect(store, &TelemetryStore::changed, this, &PlotView::onStoreChanged);
    connect(store, &TelemetryStore::selectionChanged, this, &PlotView::onStoreChanged);
    connect(store, &TelemetryStore::shapeChanged, this, &PlotView::onStoreChanged);
}

QCPColorGradient PlotView::viridis() {
    QCPColorGradient g;
    g.clearColorStops();
    g.setColorStopAt(0.00, QColor(68, 1, 84));
    g.setColorStopAt(0.25, QColor(59, 82, 139));
    g.setColorStopAt(0.50, QColor(33, 145, 140));
    g.setColorStopAt(0.75, QColor(94, 201, 98));
    g.setColorStopAt(1.00, QColor(253, 231, 37));
    g.setNanHandling(QCPColorGradient::nhNanColor);
    g.setNanColor(QColor(205, 205, 205));
    return g;
}

QLabel* PlotView::addInfoLabel() {
    auto* l = new QLabel;
    l->setWordWrap(true);
    l->setMinimumWidth(60);
    l->setSizePolicy(QSizePolicy::Ignored, QSizePolicy::Preferred);
    l->setTextInteractionFlags(Qt::TextSelectableByMouse);
    m_controls->addWidget(l, 1);
    return l;
}

QCustomPlot* PlotView::addPlot(int row, int col, int rowSpan, int colSpan) {
    auto* p = new QCustomPlot(m_area);
    p->setMinimumSize(200, 150);
    p->setNoAntialiasingOnDrag(true);
    p->setPlottingHint(QCP::phCacheLabels, true);
    m_grid->addWidget(p, row, col, rowSpan, colSpan);
    m_plots << p;
    return p;
}

QCPColorMap* PlotView::addColorMap(QCustomPlot* plot, const QString& scaleLabel, QCPColorScale** scaleOut) {
    auto* map = new QCPColorMap(plot->xAxis, plot->yAxis);
    auto* scale = new QCPColorScale(plot);
    plot->plotLayout()->addElement(0, 1, scale);
    scale->setType(QCPAxis::atRight);
    scale->setBarWidth(10);
    scale->axis()->setLabel(scaleLabel);
    map->setColorScale(scale);
    map->setGradient(viridis());
    map->setInterpolate(false);
    auto* group = new QCPMarginGroup(plot);
    plot->axisRect()->setMarginGroup(QCP::msBottom | QCP::msTop, group);
    scale->setMarginGroup(QCP::msBottom | QCP::msTop, group);
    if (scaleOut) *scaleOut = scale;
    return map;
}

void PlotView::legendBelow(QCustomPlot* plot) {
    QCPLegend* legend = plot->legend;
    plot->axisRect()->insetLayout()->take(legend);
    QCPLayoutGrid* grid = plot->plotLayout();
    const int row = grid->rowCount();
    grid->addElement(row, 0, legend);
    grid->setRowStretchFactor(row, 0.001);
    legend->setFillOrder(QCPLegend::foColumnsFirst);
    legend->setBorderPen(Qt::NoPen);
    legend->setFont(QFont(plot->font().family(), 8));
    legend->setMargins(QMargins(2, 0, 2, 0));
    legend->setRowSpacing(0);
}

void PlotView::onStoreChanged() {
    if (!isVisible()) {
        m_dirty = true;
        return;
    }
    m_dirty = false;
    refresh();
    for (auto* p : m_plots) p->replot(QCustomPlot::rpQueuedReplot);
    emit refreshed();
}

void PlotView::showEvent(QShowEvent* e) {
    QWidget::showEvent(e);
    if (m_dirty) onStoreChanged();
}

void PlotView::refreshNow() {
    QElapsedTimer t;
    t.start();
    m_dirty = false;
    refresh();
    for (auto* p : m_plots) p->replot(QCustomPlot::rpImmediateRefresh);
    m_lastMs = double(t.nsecsElapsed()) / 1e6;
    emit refreshed();
}

static void styleAxis(QCPAxis* a, const QColor& fg, const QColor& grid) {
    a->setBasePen(QPen(fg));
    a->setTickPen(QPen(fg));
    a->setSubTickPen(QPen(fg));
    a->setTickLabelColor(fg);
    a->setLabelColor(fg);
    a->grid()->setPen(QPen(grid, 0, Qt::DotLine));
    a->grid()->setZeroLinePen(Qt::NoPen);  // a solid line through the first bar otherwise
}

void PlotView::styleAll() {
    const QColor bg = m_darkTheme ? QColor(37, 37, 40) : QColor(255, 255, 255);
    const QColor fg = m_darkTheme ? QColor(220, 220, 220) : QColor(30, 30, 30);
    const QColor grid = m_darkTheme ? QColor(80, 80, 85) : QColor(200, 200, 200);
    for (auto* p : m_plots) {
        p->setBackground(QBrush(bg));
        for (auto* a : p->axisRect()->axes()) styleAxis(a, fg, grid);
        if (p->legend) {
            p->legend->setBrush(QBrush(bg));
            p->legend->setTextColor(fg);
            p->legend->setBorderPen(QPen(grid));
        }
        for (int i = 0; i < p->plotLayout()->elementCount(); ++i) {
            if (auto* t = qobject_cast<QCPTextElement*>(p->plotLayout()->elementAt(i))) t->setTextColor(fg);
            if (auto* s = qobject_cast<QCPColorScale*>(p->plotLayout()->elementAt(i))) styleAxis(s->axis(), fg, grid);
        }
        // "No data" / "group dropped" cells: light grey on white, dark grey on the dark background.
        for (int i = 0; i < p->plottableCount(); ++i)
            if (auto* m = qobject_cast<QCPColorMap*>(p->plottable(i))) {
                QCPColorGradient g = m->gradient();
                g.setNanHandling(QCPColorGradient::nhNanColor);
                g.setNanColor(m_darkTheme ? QColor(85, 85, 92) : QColor(205, 205, 205));
                m->setGradient(g);
            }
    }
}

void PlotView::setDark(bool dark) {
    m_darkTheme = dark;
    styleAll();
    themeChanged();
    for (auto* p : m_plots) p->replot(QCustomPlot::rpQueuedReplot);
}

static bool saveBytes(const QString& path, const QByteArray& bytes, QString* error) {
    QSaveFile f(path);
    if (!f.open(QIODevice::WriteOnly) || f.write(bytes) != bytes.size() || !f.commit()) {
        if (error) *error = QStringLiteral("%1: %2").arg(path, f.errorString());
        return false;
    }
    return true;
}

bool PlotView::exportPng(const QString& path, QString* error) {
    for (auto* p : m_plots) p->replot(QCustomPlot::rpImmediateRefresh);
    QPixmap pm = m_area->grab();
    QByteArray bytes;
    QBuffer buf(&bytes);
    buf.open(QIODevice::WriteOnly);
    if (pm.isNull() || !pm.save(&buf, "PNG")) {
        if (error) *error = QStringLiteral("%1: the view could not be rendered").arg(path);
        return false;
    }
    return saveBytes(path, bytes, error);
}

bool PlotView::exportPdf(const QString& path, QString* error) {
    QByteArray bytes;
    {
        QBuffer buf(&bytes);
        buf.open(QIODevice::WriteOnly);
        QPdfWriter pdf(&buf);
        pdf.setTitle(m_title);
        pdf.setCreator(QStringLiteral("moescope"));
        const QSize sz = m_area->size().expandedTo(QSize(400, 300));
        pdf.setResolution(72);
        pdf.setPageSize(QPageSize(QSizeF(sz), QPageSize::Point));
        pdf.setPageMargins(QMarginsF(0, 0, 0, 0));
        QCPPainter painter(&pdf);
        painter.setMode(QCPPainter::pmVectorized);
        painter.setMode(QCPPainter::pmNoCaching);
        const double s = std::min(pdf.width() / double(sz.width()), pdf.height() / double(sz.height()));
        painter.scale(s, s);
        if (m_plots.isEmpty()) {
            m_area->render(&painter);  // tables and text
        } else {
            // Each plot draws itself as vectors, where it sits in the view.
            for (auto* p : m_plots) {
                const QPoint at = p->mapTo(m_area, QPoint(0, 0));
                const QSize psz = p->size().expandedTo(QSize(200, 150));
                painter.save();
                painter.translate(at);
                p->toPainter(&painter, psz.width(), psz.height());
                painter.restore();
            }
        }
        painter.end();
    }
    if (bytes.isEmpty()) {
        if (error) *error = QStringLiteral("%1: the PDF could not be rendered").arg(path);
        return false;
    }
    return saveBytes(path, bytes, error);
}

bool PlotView::exportCsv(const QString& path, QString* error) {
    return saveBytes(path, csv().toUtf8(), error);
}

bool PlotView::exportTo(const QString& basePath, QString* error) {
    return exportPng(basePath + QStringLiteral(".png"), error) && exportPdf(basePath + QStringLiteral(".pdf"), error) &&
           exportCsv(basePath + QStringLiteral(".csv"), error);
}

QString csvEscape(const QString& s) {
    if (!s.contains(QLatin1Char(',')) && !s.contains(QLatin1Char('"')) && !s.contains(QLatin1Char('\n'))) return s;
    QString e = s;
    e.replace(QLatin1Char('"'), QStringLiteral("\"\""));
    return QLatin1Char('"') + e + QLatin1Char('"');
}

void setFiniteDataRange(QCPColorMap* map, bool fromZero) {
    QCPColorMapData* d = map->data();
    double lo = fromZero ? 0.0 : qInf(), hi = -qInf();
    for (int x = 0; x < d->keySize(); ++x)
        for (int y = 0; y < d->valueSize(); ++y) {
            const double v = d->cell(x, y);
            if (!std::isfinite(v)) continue;
            lo = std::min(lo, v);
            hi = std::max(hi, v);
        }
    if (!(hi >= lo)) lo = 0, hi = 1;
    if (hi - lo < 1e-12) {  // all cells equal (no data yet: all zero): a plain scale around the value
        const double pad = std::max(std::abs(hi) * 0.5, 0.5);
        if (!fromZero || lo > 0) lo -= pad;
        hi += pad;
        if (fromZero) lo = std::max(lo, 0.0);
    }
    map->setDataRange(QCPRange(lo, hi));
}

// Row labels (layer indices) spaced so they never overlap: about one per 16 pixels of height.
void setRowTicks(QCPAxis* axis, const std::vector<int>& rowLabels) {
    QSharedPointer<QCPAxisTickerText> t(new QCPAxisTickerText);
    const int n = int(rowLabels.size());
    const int room = std::max(2, axis->axisRect()->height() / 16);
    int step = 1;
    while ((n + step - 1) / step > room) step *= 2;
    for (int i = 0; i < n; i += step) t->addTick(i, QString::number(rowLabels[size_t(i)]));
    axis->setTicker(t);
}

// Expert ids: power-of-two steps (expert counts are powers of two), at most ~10 labels.
void setIntTicks(QCPAxis* axis, int n) {
    QSharedPointer<QCPAxisTickerFixed> t(new QCPAxisTickerFixed);
    const int extent = axis->orientation() == Qt::Horizontal ? axis->axisRect()->width() : axis->axisRect()->height();
    const int room = std::max(2, std::min(10, extent / 28));
    int step = 1;
    while ((n + step - 1) / step > room) step *= 2;
    t->setTickStep(step);
    t->setScaleStrategy(QCPAxisTickerFixed::ssNone);
    axis->setTicker(t);
}
