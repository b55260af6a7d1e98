// PlotView: shared plot plumbing, theme and export.
#include "views/PlotView.h"

#include <QBuffer>
#include <QFileDialog>
#include <QGridLayout>
#include <QHBoxLayout>
#include <QHeaderView>
#include <QLabel>
#include <QMessageBox>
#include <QToolButton>
#include <QPainter>
#include <QPdfWriter>
#include <QPlainTextEdit>
#include <QSaveFile>
#include <QTableWidget>
#include <QVBoxLayout>

#include <cmath>
#include <memory>

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
    l->setTextFormat(Qt::PlainText);  // token texts are shown as they are ("<", "&" included)
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
    // A grid caps a column at the smallest maximum width of its elements, and an empty legend
    // (no curves yet) is as wide at most as its margins: alone under the plot it squeezed the
    // plot to a sliver. Beside an empty element, whose maximum is unbounded, it cannot.
    auto* strip = new QCPLayoutGrid;
    grid->addElement(row, 0, strip);
    grid->setRowStretchFactor(row, 0.001);
    strip->addElement(0, 0, legend);
    strip->addElement(0, 1, new QCPLayoutElement(plot));
    strip->setColumnStretchFactor(1, 0.001);
    strip->setColumnSpacing(0);
    legend->setFillOrder(QCPLegend::foColumnsFirst);
    legend->setBorderPen(Qt::NoPen);
    legend->setFont(QFont(plot->font().family(), 8));
    legend->setMargins(QMargins(2, 0, 2, 0));
    legend->setRowSpacing(0);
}

// Only a view on screen redraws as data arrives; one that is hidden, or in a tab behind another
// (QMainWindow keeps those "visible", moved out of the window), marks itself dirty and catches
// up when it is shown or its tab raised (catchUp, from the dock's visibilityChanged).
void PlotView::onStoreChanged() {
    if (!isOnScreen()) {
        m_dirty = true;
        return;
    }
    redraw();
}

void PlotView::redraw() {
    m_dirty = false;
    refresh();
    for (auto* p : m_plots) p->replot(QCustomPlot::rpQueuedReplot);
    emit refreshed();
}

void PlotView::catchUp() {
    if (m_dirty) redraw();
}

void PlotView::showEvent(QShowEvent* e) {
    QWidget::showEvent(e);
    catchUp();
}

void PlotView::refreshNow() {
    QElapsedTimer t;
    t.start();
    m_dirty = false;
    flushDeferred();
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

namespace {

// Stands in for one item of the plot grid in a scratch copy of the grid: the item's size
// constraints, a geometry of its own. The sizes come from the widget itself when its layout
// item reports "empty" (the widgets of a view whose window was never shown are still hidden).
class StandInItem : public QLayoutItem {
public:
    explicit StandInItem(QLayoutItem* real) {
        QWidget* w = real->widget();
        if (!real->isEmpty() || !w) {
            m_min = real->minimumSize();
            m_hint = real->sizeHint();
            m_max = real->maximumSize();
            m_dirs = real->expandingDirections();
            return;
        }
        const QSizePolicy sp = w->sizePolicy();
        const QSize hint = w->sizeHint(), minHint = w->minimumSizeHint();
        auto smartMin = [](int set, int hintV, int minHintV, QSizePolicy::Policy pol) {
            if (set > 0) return set;
            if (pol == QSizePolicy::Ignored) return 0;
            return (pol & QSizePolicy::ShrinkFlag) ? std::max(0, minHintV) : std::max(0, hintV);
        };
        m_min = QSize(smartMin(w->minimumWidth(), hint.width(), minHint.width(), sp.horizontalPolicy()),
                      smartMin(w->minimumHeight(), hint.height(), minHint.height(), sp.verticalPolicy()));
        m_max = w->maximumSize();
        m_hint = hint.expandedTo(m_min).boundedTo(m_max);
        m_dirs = sp.expandingDirections();
    }
    QSize sizeHint() const override { return m_hint; }
    QSize minimumSize() const override { return m_min; }
    QSize maximumSize() const override { return m_max; }
    Qt::Orientations expandingDirections() const override { return m_dirs; }
    bool isEmpty() const override { return false; }
    void setGeometry(const QRect& r) override { m_rect = r; }
    QRect geometry() const override { return m_rect; }

private:
    QSize m_min, m_hint, m_max;
    Qt::Orientations m_dirs;
    QRect m_rect;
};

// A scratch grid with the plot grid's rules and a stand-in per item; `widgets` gets the widget
// of each stand-in, in the grid's item order.
std::unique_ptr<QGridLayout> scratchGrid(QGridLayout* real, QList<QWidget*>* widgets) {
    auto g = std::make_unique<QGridLayout>();
    g->setContentsMargins(real->contentsMargins());
    g->setHorizontalSpacing(std::max(0, real->horizontalSpacing()));
    g->setVerticalSpacing(std::max(0, real->verticalSpacing()));
    for (int r = 0; r < real->rowCount(); ++r) {
        g->setRowStretch(r, real->rowStretch(r));
        g->setRowMinimumHeight(r, real->rowMinimumHeight(r));
    }
    for (int c = 0; c < real->columnCount(); ++c) {
        g->setColumnStretch(c, real->columnStretch(c));
        g->setColumnMinimumWidth(c, real->columnMinimumWidth(c));
    }
    for (int i = 0; i < real->count(); ++i) {
        QLayoutItem* item = real->itemAt(i);
        if (!item->widget()) continue;  // only widgets are drawn
        int row, col, rowSpan, colSpan;
        real->getItemPosition(i, &row, &col, &rowSpan, &colSpan);
        g->addItem(new StandInItem(item), row, col, rowSpan, colSpan, item->alignment());
        *widgets << item->widget();
    }
    return g;
}

// QCustomPlot::updateLayout (protected): margins from the tick labels, then the axis rects.
void layOutPlot(QCustomPlot* p) {
    p->plotLayout()->update(QCPLayoutElement::upPreparation);
    p->plotLayout()->update(QCPLayoutElement::upMargins);
    p->plotLayout()->update(QCPLayoutElement::upLayout);
}

const char* const kTickerProp = "moescopeSizedTicker";  // the ticker setRowTicks / setIntTicks made
const char* const kRowTicksProp = "moescopeRowTicks";
const char* const kIntTicksProp = "moescopeIntTicks";

// Spaces again the ticks that setRowTicks / setIntTicks chose for the axis rect's size, unless
// the view has set another ticker on the axis since.
void respaceTicks(QCustomPlot* p) {
    for (QCPAxisRect* rect : p->axisRects())
        for (QCPAxis* a : rect->axes()) {
            if (a->property(kTickerProp).value<quintptr>() != quintptr(a->ticker().data())) continue;
            const QVariant rows = a->property(kRowTicksProp), n = a->property(kIntTicksProp);
            if (rows.isValid()) {
                const QList<int> l = rows.value<QList<int>>();
                setRowTicks(a, std::vector<int>(l.begin(), l.end()));
            } else if (n.isValid()) {
                setIntTicks(a, n.toInt());
            }
        }
}

void renderPlotAt(QCustomPlot* p, QCPPainter* painter, const QSize& size) {
    // toPainter lays the plot out at `size` for the drawing; the ticks spaced by pixel extent
    // must see that size too. Everything it changes is put back: viewport, layout, tickers.
    struct AxisState {
        QCPAxis* axis;
        QSharedPointer<QCPAxisTicker> ticker;
        QVariant made, rows, n;
    };
    const QRect oldViewport = p->viewport();
    std::vector<AxisState> axes;
    for (QCPAxisRect* rect : p->axisRects())
        for (QCPAxis* a : rect->axes())
            axes.push_back({a, a->ticker(), a->property(kTickerProp), a->property(kRowTicksProp), a->property(kIntTicksProp)});
    p->setViewport(QRect(QPoint(0, 0), size));
    layOutPlot(p);
    respaceTicks(p);
    painter->save();
    painter->setClipRect(QRect(QPoint(0, 0), size));  // nothing spills into the neighbouring cells
    p->toPainter(painter, size.width(), size.height());
    painter->restore();
    for (const AxisState& s : axes) {
        s.axis->setTicker(s.ticker);
        s.axis->setProperty(kTickerProp, s.made);
        s.axis->setProperty(kRowTicksProp, s.rows);
        s.axis->setProperty(kIntTicksProp, s.n);
    }
    p->setViewport(oldViewport);
    layOutPlot(p);
}

// Renders an unshown copy of a widget, resized to `size`, at the painter's origin.
void renderCopy(QWidget* copy, QPainter* painter, const QSize& size) {
    copy->setAttribute(Qt::WA_DontShowOnScreen);
    copy->resize(size);
    copy->render(painter, QPoint(0, 0), QRegion(), QWidget::DrawWindowBackground | QWidget::DrawChildren);
}

void copyFrame(const QAbstractScrollArea* from, QAbstractScrollArea* to) {
    to->setFont(from->font());
    to->setPalette(from->palette());
    to->setFrameShape(from->frameShape());
    to->setFrameShadow(from->frameShadow());
    // A figure shows what fits; the CSV holds the rest.
    to->setVerticalScrollBarPolicy(Qt::ScrollBarAlwaysOff);
    to->setHorizontalScrollBarPolicy(Qt::ScrollBarAlwaysOff);
}

}  // namespace

QList<QPair<QWidget*, QRect>> PlotView::exportLayout(const QSize& size) const {
    QList<QWidget*> widgets;
    auto g = scratchGrid(m_grid, &widgets);
    g->setGeometry(QRect(QPoint(0, 0), size));
    QList<QPair<QWidget*, QRect>> out;
    for (int i = 0; i < g->count(); ++i) out << qMakePair(widgets[i], g->itemAt(i)->geometry());
    return out;
}

bool PlotView::isOnScreen() const { return isVisible() && !m_area->visibleRegion().isEmpty(); }

QSize PlotView::exportSize() const {
    QList<QWidget*> widgets;
    const QSize minimum = scratchGrid(m_grid, &widgets)->minimumSize();
    const QSize min = minOnScreenExportSize();
    const QSize onScreen = m_area->size();
    const bool useScreen = isOnScreen() && onScreen.width() >= min.width() && onScreen.height() >= min.height();
    return (useScreen ? onScreen : defaultExportSize()).expandedTo(minimum);
}

void PlotView::renderExportWidget(QWidget* w, QCPPainter* painter, const QSize& size) {
    if (auto* p = qobject_cast<QCustomPlot*>(w)) {
        renderPlotAt(p, painter, size);
    } else if (auto* t = qobject_cast<QPlainTextEdit*>(w)) {
        QPlainTextEdit copy;
        copyFrame(t, &copy);
        copy.setLineWrapMode(t->lineWrapMode());
        copy.setWordWrapMode(t->wordWrapMode());
        copy.document()->setDocumentMargin(t->document()->documentMargin());
        copy.setPlainText(t->toPlainText());
        renderCopy(&copy, painter, size);
    } else if (auto* t = qobject_cast<QTableWidget*>(w)) {
        QTableWidget copy(t->rowCount(), t->columnCount());
        copyFrame(t, &copy);
        copy.setShowGrid(t->showGrid());
        copy.setAlternatingRowColors(t->alternatingRowColors());
        copy.setWordWrap(t->wordWrap());
        for (QHeaderView* h : {copy.horizontalHeader(), copy.verticalHeader()}) {
            const QHeaderView* from = h->orientation() == Qt::Horizontal ? t->horizontalHeader() : t->verticalHeader();
            h->setHidden(from->isHidden());
            h->setDefaultSectionSize(from->defaultSectionSize());
            h->setStretchLastSection(from->stretchLastSection());
            for (int i = 0; i < from->count(); ++i) {
                h->setSectionResizeMode(i, from->sectionResizeMode(i));
                if (from->sectionResizeMode(i) == QHeaderView::Interactive || from->sectionResizeMode(i) == QHeaderView::Fixed)
                    h->resizeSection(i, from->sectionSize(i));
            }
        }
        for (int c = 0; c < t->columnCount(); ++c)
            if (auto* h = t->horizontalHeaderItem(c)) copy.setHorizontalHeaderItem(c, h->clone());
        for (int r = 0; r < t->rowCount(); ++r) {
            if (auto* h = t->verticalHeaderItem(r)) copy.setVerticalHeaderItem(r, h->clone());
            for (int c = 0; c < t->columnCount(); ++c)
                if (auto* it = t->item(r, c)) copy.setItem(r, c, it->clone());
        }
        renderCopy(&copy, painter, size);
    } else {
        // A kind of widget this does not know how to lay out anew: as it is, scaled to fit.
        const QSize at = w->size().expandedTo(QSize(1, 1));
        painter->save();
        painter->scale(size.width() / double(at.width()), size.height() / double(at.height()));
        w->render(painter, QPoint(0, 0), QRegion(), QWidget::DrawWindowBackground | QWidget::DrawChildren);
        painter->restore();
    }
}

void PlotView::paintExport(QCPPainter* painter, const QSize& size) {
    // The gaps between the cells in the window's colour, as on screen.
    painter->fillRect(QRect(QPoint(0, 0), size), m_area->palette().color(QPalette::Window));
    for (const auto& [w, rect] : exportLayout(size)) {
        if (rect.isEmpty()) continue;
        painter->save();
        painter->translate(rect.topLeft());
        renderExportWidget(w, painter, rect.size());
        painter->restore();
    }
}

QImage PlotView::renderImage(const QSize& size, qreal dpr) {
    if (m_dirty) refreshNow();  // a hidden view catches up first
    dpr = dpr > 0 ? dpr : 1.0;
    QImage img(qRound(size.width() * dpr), qRound(size.height() * dpr), QImage::Format_RGB32);
    if (img.isNull()) return img;
    img.setDevicePixelRatio(dpr);
    img.fill(Qt::white);
    QCPPainter painter(&img);
    painter.setRenderHint(QPainter::TextAntialiasing);
    paintExport(&painter, size);
    painter.end();
    return img;
}

bool PlotView::exportPng(const QString& path, QString* error, QSize size, qreal dpr) {
    if (size.isEmpty()) size = exportSize();
    if (dpr <= 0) dpr = std::max<qreal>(1.0, window()->devicePixelRatioF());
    QImage img = renderImage(size, dpr);
    // 96 logical pixels per inch, so a viewer or a word processor shows it at its logical size.
    const int dpm = qRound(96.0 * dpr / 0.0254);
    img.setDotsPerMeterX(dpm);
    img.setDotsPerMeterY(dpm);
    QByteArray bytes;
    QBuffer buf(&bytes);
    buf.open(QIODevice::WriteOnly);
    if (img.isNull() || !img.save(&buf, "PNG")) {
        if (error) *error = QStringLiteral("%1: the view could not be rendered").arg(path);
        return false;
    }
    return saveBytes(path, bytes, error);
}

bool PlotView::exportPdf(const QString& path, QString* error, QSize size) {
    if (size.isEmpty()) size = exportSize();
    if (m_dirty) refreshNow();
    QByteArray bytes;
    {
        QBuffer buf(&bytes);
        buf.open(QIODevice::WriteOnly);
        QPdfWriter pdf(&buf);
        pdf.setTitle(m_title);
        pdf.setCreator(QStringLiteral("moescope"));
        // One logical pixel is one point: the page is the export size, the plots are vectors.
        pdf.setResolution(72);
        pdf.setPageSize(QPageSize(QSizeF(size), QPageSize::Point, QString(), QPageSize::ExactMatch));
        pdf.setPageMargins(QMarginsF(0, 0, 0, 0));
        QCPPainter painter(&pdf);
        painter.setMode(QCPPainter::pmVectorized);
        painter.setMode(QCPPainter::pmNoCaching);
        const double s = std::min(pdf.width() / double(size.width()), pdf.height() / double(size.height()));
        painter.scale(s, s);
        paintExport(&painter, size);
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

bool PlotView::exportTo(const QString& basePath, QString* error, QSize size) {
    if (size.isEmpty()) size = exportSize();  // once, so PNG and PDF agree
    return exportPng(basePath + QStringLiteral(".png"), error, size) && exportPdf(basePath + QStringLiteral(".pdf"), error, size) &&
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
    axis->setProperty(kTickerProp, QVariant::fromValue(quintptr(t.data())));
    axis->setProperty(kRowTicksProp, QVariant::fromValue(QList<int>(rowLabels.begin(), rowLabels.end())));
    axis->setProperty(kIntTicksProp, QVariant());
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
    axis->setProperty(kTickerProp, QVariant::fromValue(quintptr(t.data())));
    axis->setProperty(kIntTicksProp, n);
    axis->setProperty(kRowTicksProp, QVariant());
    const int extent = axis->orientation() == Qt::Horizontal ? axis->axisRect()->width() : axis->axisRect()->height();
    const int room = std::max(2, std::min(10, extent / 28));
    int step = 1;
    while ((n + step - 1) / step > room) step *= 2;
    t->setTickStep(step);
    t->setScaleStrategy(QCPAxisTickerFixed::ssNone);
    axis->setTicker(t);
}
