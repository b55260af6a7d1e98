// MtpView: multi-token prediction as speculative decoding. Rolling acceptance rate, acceptance
// per draft position, the accepted-length histogram and tokens/s with and without MTP.
#pragma once
#include "views/PlotView.h"

class QLabel;
class QCPBars;

class MtpView : public PlotView {
    Q_OBJECT
public:
    explicit MtpView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;
    int ratePoints() const;
    int histogramBins() const;
    int positionBars() const;
    int speedBars() const;

protected:
    void refresh() override;

private:
    QLabel* m_info;
    QCustomPlot *m_ratePlot, *m_posPlot, *m_histPlot, *m_speedPlot;
    QCPBars *m_posBars, *m_histBars, *m_speedBars;
    class QCPItemText* m_speedText[2];       // the value over each speed bar, or why there is none
};
