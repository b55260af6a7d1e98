// RoutingView: where tokens go. The selected token's layer x expert heatmap of mixing weights
// (dropped groups of group-limited routing greyed out), the sequence view (positions x experts
// for one layer), the layer's expert load (running total, this message, this step) and the
// expert co-activation matrix. Sized for V3: 58 MoE layers x 256 experts.
#pragma once
#include "views/PlotView.h"

class QComboBox;
class QLabel;
class QCPBars;
class QCPGraph;
class QCPItemStraightLine;

class RoutingView : public PlotView {
    Q_OBJECT
public:
    explicit RoutingView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;
    int layer() const;                       // the layer of the sequence / load / co-activation plots
    void setLayer(int layer);

    // For tests: sizes of what is drawn.
    QSize tokenMapSize() const;              // (experts, layers)
    QSize sequenceMapSize() const;           // (positions, experts)
    int loadBarCount() const;
    QSize coactivationSize() const;
    double tokenMapValue(int expert, int row) const;
    QString tokenMapTitle() const;
    QList<int> disabledMarks() const;        // experts marked as switched off in the load plot

    // Asks to switch experts of the chosen layer off (an ablation): the text of the "Off"
    // field, or a double-clicked load bar toggled in or out of the layer's list.
    void requestDisabled(const QString& text);
    void toggleDisabled(int expert);
    // The "Off" field and "Top off" box set to the ablation in force, focused or not (after a
    // refused request).
    void showAblationInForce();

signals:
    void wantScoresRequested(bool on);       // ask the engine to record full router score vectors
    void disabledExpertsRequested(int layer, const QString& text);  // EngineController::setDisabledExperts
    void dropTopRequested(int r);            // EngineController::setDropTopExperts

protected:
    void refresh() override;

private:
    void rebuildLayerChoices();
    // The "Off" field and "Top off" box from the store; one the user is editing is left alone
    // unless evenFocused.
    void syncAblationControls(bool evenFocused);
    class QCheckBox* m_scores;
    class QLineEdit* m_disable;
    class QSpinBox* m_dropTop;
    QComboBox* m_layer;
    QComboBox* m_scope;
    QLabel* m_info;
    QCustomPlot *m_tokenPlot, *m_seqPlot, *m_loadPlot, *m_coPlot;
    QCPColorMap *m_tokenMap, *m_seqMap, *m_coMap;
    QCPBars* m_loadBars;
    QCPGraph* m_disabledMarks;               // a cross under each switched-off expert
    QCPItemStraightLine* m_seqMarker;
    int m_layerCount = -1;
};
