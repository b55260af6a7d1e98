// EvaluateView: held-out perplexity of the loaded model on a text file, with every expert on and
// with the ablation set in the Routing view ("Off", "Top off"): the cost of the ablation for the
// next token and for the MTP module's token after next, and the tokens it hurt most. The numbers
// are engine/eval.h's, the same as `moescope-cli perplexity`; the engine computes them
// (EngineController::evaluate) and the view draws the report.
#pragma once
#include "EngineController.h"
#include "views/PlotView.h"

class QComboBox;
class QLineEdit;
class QPushButton;
class QSpinBox;
class QCPBars;
class QCPGraph;
class QCPItemStraightLine;
class QCPItemText;

class EvaluateView : public PlotView {
    Q_OBJECT
public:
    explicit EvaluateView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;

    void setTextPath(const QString& path);
    QString textPath() const;
    int windows() const;
    void setWindows(int n);
    void setSweep(EvalSweep sweep);          // also "Top off" over R, or in each layer alone, or experts one by one
    void setExpertLayer(int layer);          // PerExpert: the MoE layer whose experts go off one at a time
    int expertLayer() const;
    void run();                              // asks for an evaluation (evaluationRequested)
    bool running() const { return m_running; }

    // From the engine.
    void setReport(const EvaluationReport& report);
    void setProgress(int done, int total, const QString& what);
    void setFailure(const QString& message);
    void clear();                            // a new model: the old report no longer applies
    void setBusy(bool busy);                 // Run waits while the engine works

    // What is drawn, for tests.
    bool hasReport() const { return m_has; }
    const EvaluationReport& report() const { return m_report; }
    int perplexityBarCount() const;          // baseline + ablated bars (0, 2 or 4)
    QStringList tokenBarLabels() const;      // the hurt tokens, most hurt first
    int sweepPoints() const;                 // points of the next-token curve of the sweep
    QString infoText() const;
    // The store's evaluations (this session's, or a replayed trace's), one entry each, newest
    // chosen when one arrives; choosing another shows it. Shown when there are two or more.
    QStringList historyLabels() const;
    void showHistory(int index);

signals:
    void evaluationRequested(const QString& path, int maxWindows, EvalSweep sweep, int expertLayer);
    void cancelRequested();                  // Stop while scoring (EngineController::cancel)

protected:
    void refresh() override;

private:
    QLineEdit* m_path;
    QSpinBox* m_windows;
    QPushButton* m_run;
    QComboBox* m_sweep;
    QComboBox* m_expertLayer;                // the MoE layers, shown for the per-expert sweep
    QComboBox* m_history;                    // the store's evaluations (historyLabels)
    int m_wantedLayer = -1;                  // setExpertLayer before the layers are known
    QLabel* m_info;
    QCustomPlot *m_pplPlot, *m_tokenPlot, *m_sweepPlot;
    QCPBars *m_baseBars, *m_ablBars, *m_tokenBars;
    QCPGraph *m_sweepMain, *m_sweepMtp;
    QCPItemText* m_sweepHint;
    QCPItemStraightLine* m_sweepBase;        // the sweep's baseline: every expert on
    EvaluationReport m_report;
    bool m_has = false;
    bool m_running = false;                  // Run reads "Stop" meanwhile
    void setRunning(bool on);
    void rebuildExpertLayers();
    void syncHistory();
};

