// TrainerRunner: what the training dashboard drives (start / pause / resume / stop), behind a
// small interface so the engine's trainer (engine/train/, in progress) plugs in later.
// TraceReplayTrainer is the implementation available now: it replays a training trace (train,
// eval, bias and load records from a JSONL file) into the telemetry store at a steady pace.
#pragma once
#include <QObject>
#include <QString>
#include <QStringList>
#include <QTimer>

#include <vector>

#include "engine/telemetry.h"

struct TrainSettings {
    QString preset;          // "tiny", "small" or "" when configPath is used
    QString configPath;      // a config.json
    QStringList corpus;      // text files
    QString balance = QStringLiteral("aux-free");  // aux-free | aux-loss | none
    double gamma = 0.001;
    int steps = 200;
    QString outDir;          // where the trained model goes
    QString tracePath;       // replay: the JSONL trace to play
};

class TrainerRunner : public QObject {
    Q_OBJECT
public:
    enum class State { Idle, Running, Paused, Finished, Failed };
    using QObject::QObject;
    virtual QString name() const = 0;
    virtual bool start(const TrainSettings& s, QString* error) = 0;
    virtual void pause() = 0;
    virtual void resume() = 0;
    virtual void stop() = 0;
    State state() const { return m_state; }

signals:
    void stateChanged(TrainerRunner::State state);
    void progress(qint64 step, qint64 totalSteps);
    void finished(const QString& modelDir);  // empty when there is no model to open (a replay)
    void failed(const QString& message);

protected:
    void setState(State s) {
        m_state = s;
        emit stateChanged(s);
    }

private:
    State m_state = State::Idle;
};

class TraceReplayTrainer : public TrainerRunner {
    Q_OBJECT
public:
    explicit TraceReplayTrainer(moescope::TelemetrySink* sink, QObject* parent = nullptr);
    QString name() const override { return tr("trace replay"); }
    bool start(const TrainSettings& s, QString* error) override;
    void pause() override;
    void resume() override;
    void stop() override;
    void setStepsPerTick(int n) { m_stepsPerTick = std::max(1, n); }
    void finishNow();                       // play the rest at once (tests, screenshots)

private:
    void tick();
    moescope::TelemetrySink* m_sink;
    std::vector<moescope::Record> m_records;  // training-related records, in trace order
    size_t m_next = 0;
    int m_stepsPerTick = 1;
    qint64 m_lastStep = 0;
    QTimer m_timer;
};
