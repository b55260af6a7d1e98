// LatentView: MLA's latent cache. The cached c (and k_pe) of a chosen layer as position x
// dimension heatmaps, |c| per layer and position, and cache memory against context length for
// MLA vs. the MHA and GQA-8 equivalents of the loaded model (the model card's bytes per token).
#pragma once
#include "views/PlotView.h"

class QComboBox;
class QLabel;

class LatentView : public PlotView {
    Q_OBJECT
public:
    explicit LatentView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;
    int layer() const;
    void setLayer(int layer);
    QSize latentMapSize() const;             // (positions, d_c)
    QSize kpeMapSize() const;                // (positions, d_rope)
    QSize normMapSize() const;               // (positions, layers)
    int memoryPoints() const;

signals:
    void latentLayerRequested(int layer);    // ask the engine to record c / k_pe of this layer

protected:
    void refresh() override;

private:
    QComboBox* m_layer;
    QLabel* m_info;
    QCustomPlot *m_cPlot, *m_kPlot, *m_normPlot, *m_memPlot;
    QCPColorMap *m_cMap, *m_kMap, *m_normMap;
    QList<class QCPItemStraightLine*> m_markers;  // the selected position in each heatmap
    class QCPItemStraightLine* m_inUse;           // the context in use on the memory plot
    class QCPItemText* m_inUseText;
    int m_layerCount = -1;
};
