// BiasView: the aux-loss-free router bias over steps for one layer (lines for chosen experts,
// a heatmap experts x steps for all) and MaxVio over steps; live during online balancing
// (controls here) and during training.
#pragma once
#include "views/PlotView.h"

class QCheckBox;
class QComboBox;
class QDoubleSpinBox;
class QLabel;
class QLineEdit;
class QCPBars;
class QCPItemText;

class BiasView : public PlotView {
    Q_OBJECT
public:
    explicit BiasView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;
    int layer() const;
    void setLayer(int layer);
    // (updates, experts) of the drift heatmap; (experts, MoE layers) of the bias-now map while
    // the chosen layer has no bias update yet.
    QSize heatmapSize() const;
    bool showsDrift() const { return m_drift; }
    double heatmapValue(int x, int y) const;
    QPair<double, double> heatmapColourRange() const;
    int nowBarCount() const;                 // bars of the loaded bias (no drift yet)
    int lineCount() const;
    int maxVioPoints() const;
    void setOnlineBalancing(bool enabled, double gamma);  // as if the user set the controls

signals:
    void onlineBalancingRequested(bool enabled, double gamma);
    void resetBiasRequested();

protected:
    void refresh() override;

private:
    QComboBox* m_layer;
    QLineEdit* m_experts;
    QCheckBox* m_online;
    QCheckBox* m_relative;                   // drift minus the layer's mean drift
    QDoubleSpinBox* m_gamma;
    QCustomPlot *m_linePlot, *m_heatPlot, *m_vioPlot;
    QCPColorMap* m_heat;
    QCPBars* m_nowBars;                      // the bias per expert while there is no drift to draw
    QCPItemText *m_heatHint, *m_vioHint;
    int m_layerCount = -1;
    bool m_drift = false;
};
