// EngineTrainer: the training dashboard's runner on the engine's Trainer (engine/train/), on its
// own thread: one optimizer step at a time, pausable between steps, stopped through the
// trainer's cancel flag; telemetry goes into the same store the views read; when done, the
// weights are saved as a model folder the chat can open. Built only when engine/train exists
// (gui/CMakeLists.txt then defines MOESCOPE_HAVE_TRAINER).
#pragma once
#include <QThread>

#include <atomic>
#include <condition_variable>
#include <mutex>

#include "TrainerRunner.h"

class EngineTrainer : public TrainerRunner {
    Q_OBJECT
public:
    explicit EngineTrainer(moescope::TelemetrySink* sink, QObject* parent = nullptr);
    ~EngineTrainer() override;
    QString name() const override { return tr("trainer"); }
    bool start(const TrainSettings& s, QString* error) override;
    void pause() override;
    void resume() override;
    void stop() override;
    bool wait(int ms);                       // for tests: until the worker thread ends
    static QString presetConfigPath(const QString& preset);  // "tiny" / "small" -> a config.json

private:
    void run(TrainSettings s);
    moescope::TelemetrySink* m_sink;
    QThread* m_thread = nullptr;
    std::mutex m_mu;
    std::condition_variable m_cv;
    bool m_paused = false;
    std::atomic<bool> m_stop{false};
    std::atomic<bool>* m_cancel = nullptr;   // the running Trainer's flag (guarded by m_mu)
};
