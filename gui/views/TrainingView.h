// TrainingView: the training dashboard. Choose a preset or a config.json, a corpus and a
// balancing mode; start / pause / stop; watch loss and validation loss, MaxVio, learning rate,
// tokens/s and the bias drift live; open the trained model in the chat when done.
#pragma once
#include "views/PlotView.h"

class QComboBox;
class QDoubleSpinBox;
class QLabel;
class QLineEdit;
class QPushButton;
class QSpinBox;
class TrainerRunner;

class TrainingView : public PlotView {
    Q_OBJECT
public:
    explicit TrainingView(TelemetryStore* store, QWidget* parent = nullptr);
    QString csv() const override;
    void setRunner(TrainerRunner* runner);        // what Start runs (the engine's trainer)
    void setReplayRunner(TrainerRunner* runner);  // what "Replay trace" runs
    TrainerRunner* runner() const { return m_runner; }
    TrainerRunner* activeRunner() const { return m_active; }
    bool startTraining(const QString& preset, const QStringList& corpus, int steps, QString* error = nullptr);
    bool replayTrace(const QString& path, QString* error = nullptr);  // start the runner on a trace
    int lossPoints() const;
    int valPoints() const;

signals:
    void openModelRequested(const QString& dir);

protected:
    void refresh() override;

private:
    void start();
    void updateButtons();
    void attach(TrainerRunner* runner);
    TrainerRunner* m_runner = nullptr;
    TrainerRunner* m_replayRunner = nullptr;
    TrainerRunner* m_active = nullptr;
    QComboBox *m_preset, *m_balance;
    QLineEdit* m_corpus;
    QDoubleSpinBox* m_gamma;
    QSpinBox* m_steps;
    QPushButton *m_start, *m_pause, *m_stop, *m_replay, *m_open;
    QLabel* m_status;
    QString m_configPath, m_trainedDir;
    QCustomPlot *m_lossPlot, *m_vioPlot, *m_lrPlot, *m_speedPlot, *m_biasPlot;
    QCPColorMap* m_biasMap;
    class QCPItemText* m_hint[4];            // over each curve plot while no run has reported
};
