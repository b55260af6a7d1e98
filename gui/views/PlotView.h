// PlotView: the base of every view: a row of controls, a grid of QCustomPlots fed from the
// TelemetryStore, export (PNG, PDF and a CSV of the data behind the charts) and the light/dark
// theme. Views redraw when the store signals (at most every ~40 ms) and only while visible;
// a hidden view is marked dirty and catches up when shown.
#pragma once
#include <QElapsedTimer>
#include <QImage>
#include <QString>
#include <QWidget>

#include <vector>

class QCustomPlot;
class QCPColorMap;
class QCPColorScale;
class QCPColorGradient;
class QCPPainter;
class QGridLayout;
class QHBoxLayout;
class QLabel;
class TelemetryStore;

class PlotView : public QWidget {
    Q_OBJECT
public:
    PlotView(TelemetryStore* store, const QString& name, const QString& title, QWidget* parent = nullptr);

    QString viewName() const { return m_name; }   // "routing", used by --view and export file names
    QString title() const { return m_title; }
    QList<QCustomPlot*> plots() const { return m_plots; }

    virtual QString csv() const = 0;             // the data behind the charts
    // Writes base.png, base.pdf and base.csv (each through a temporary file and a rename).
    // PNG and PDF show the plot area (the grid under the controls row) at `size` logical
    // pixels, exportSize() when empty, whether or not the view is on screen; see docs/gui.md
    // "Export sizes".
    bool exportTo(const QString& basePath, QString* error = nullptr, QSize size = {});
    // size: logical pixels (PDF points); empty means exportSize(). The PNG has size x dpr device
    // pixels (dpr <= 0: the window's devicePixelRatio, at least 1).
    bool exportPng(const QString& path, QString* error = nullptr, QSize size = {}, qreal dpr = 0);
    bool exportPdf(const QString& path, QString* error = nullptr, QSize size = {});
    bool exportCsv(const QString& path, QString* error = nullptr);

    // Whether any of the view shows: QMainWindow keeps the docks of tabs that are not current
    // "visible" (isVisible() is true) but moves them out of the window, so this asks for a
    // non-empty visible region as well.
    bool isOnScreen() const;
    // Redraws now if data arrived while the view was off screen (its dock raised or shown).
    void catchUp();
    // The size exports are drawn at: the plot area's on-screen size while the view is on screen
    // and at least minOnScreenExportSize(), else defaultExportSize(); never below what the
    // grid's minimum sizes need.
    QSize exportSize() const;
    static QSize defaultExportSize() { return {1200, 800}; }
    static QSize minOnScreenExportSize() { return {600, 400}; }
    // Where each widget of the plot area sits when the area is `size`: the plot grid's own
    // QGridLayout rules (spans, stretch, spacing, minimum sizes) applied to stand-ins, so the
    // real widgets never move.
    QList<QPair<QWidget*, QRect>> exportLayout(const QSize& size) const;
    // The plot area drawn at `size` logical pixels into an image of size x dpr pixels (its
    // devicePixelRatio set to dpr). The widgets on screen keep their size, ranges and ticks.
    QImage renderImage(const QSize& size, qreal dpr = 1.0);

    void setDark(bool dark);
    void refreshNow();                           // rebuild and draw synchronously (tests, screenshots)
    double lastRefreshMs() const { return m_lastMs; }  // rebuild + draw time of the last refreshNow
    bool isDirty() const { return m_dirty; }

    static QCPColorGradient viridis();

signals:
    void refreshed();

protected:
    virtual void refresh() = 0;                  // rebuild plot data from the store
    // refreshNow() calls this first: a view that defers costly work while data streams (the
    // Experts view's all-layer overview) does it in the refresh that follows.
    virtual void flushDeferred() {}
    virtual void themeChanged() {}
    QHBoxLayout* controls() { return m_controls; }
    // A status line at the end of the controls row; it wraps instead of widening the window.
    QLabel* addInfoLabel();
    QCustomPlot* addPlot(int row, int col, int rowSpan = 1, int colSpan = 1);
    // A colour map with a colour scale on the right; the plot's axes are key (x) and value (y).
    QCPColorMap* addColorMap(QCustomPlot* plot, const QString& scaleLabel, QCPColorScale** scale = nullptr);
    QWidget* plotArea() const { return m_area; }
    // Moves the plot's legend out of the axis rect into a row under it, entries side by side:
    // for curves that fill the plot, where any corner of the axis rect would cover data.
    static void legendBelow(QCustomPlot* plot);
    QGridLayout* plotGrid() const { return m_grid; }
    void showEvent(QShowEvent* e) override;
    void onStoreChanged();
    void redraw();
    // Draws one widget of the plot area at `size` with its top-left corner at the painter's
    // origin. Plots draw themselves at that size (ticks chosen for it, then restored); plain-text
    // edits and tables are drawn through an unshown copy laid out at that size; other widgets
    // as they are on screen, scaled. A view with other kinds of widgets overrides this.
    virtual void renderExportWidget(QWidget* w, QCPPainter* painter, const QSize& size);
    bool dark() const { return m_darkTheme; }

    TelemetryStore* m_store;

private:
    void styleAll();
    void paintExport(QCPPainter* painter, const QSize& size);
    QString m_name, m_title;
    QHBoxLayout* m_controls;
    QWidget* m_area;
    QGridLayout* m_grid;
    QList<QCustomPlot*> m_plots;
    bool m_dirty = true;
    bool m_darkTheme = false;
    double m_lastMs = 0;
};

// Helpers shared by the views.
QString csvEscape(const QString& s);
// Sets the colour range to the finite cells' [min, max] (QCPColorMap::rescaleDataRange
// fails when the first cell is NaN, and NaN marks "no data" / "group dropped" here).
void setFiniteDataRange(QCPColorMap* map, bool fromZero = false);
// Integer axis ticks (layer rows labelled with their layer index; expert ids in power-of-two
// steps) spaced by the axis' pixel extent so labels never overlap, up to V3's 256 experts.
// The axis remembers the arguments so that an export at another size spaces them again.
class QCPAxis;
void setRowTicks(QCPAxis* axis, const std::vector<int>& rowLabels);
void setIntTicks(QCPAxis* axis, int n);
