// TraceReplayTrainer: paces a recorded training run into the store, one step per tick.
#include "TrainerRunner.h"

#include <variant>

using namespace moescope;

TraceReplayTrainer::TraceReplayTrainer(TelemetrySink* sink, QObject* parent) : TrainerRunner(parent), m_sink(sink) {
    m_timer.setInterval(40);
    connect(&m_timer, &QTimer::timeout, this, &TraceReplayTrainer::tick);
}

static int64_t stepOf(const Record& r) {
    return std::visit(
        [](const auto& x) -> int64_t {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, MetaRecord>) return 0;
            else return x.step;
        },
        r);
}

bool TraceReplayTrainer::start(const TrainSettings& s, QString* error) {
    if (s.tracePath.isEmpty()) {
        if (error) *error = tr("the trainer is not available yet: choose a training trace (JSONL) to replay");
        return false;
    }
    std::vector<Record> all;
    try {
        all = read_trace(s.tracePath.toStdString());
    } catch (const std::exception& e) {
        if (error) *error = QString::fromUtf8(e.what());
        setState(State::Failed);
        emit failed(QString::fromUtf8(e.what()));
        return false;
    }
    m_records.clear();
    for (auto& r : all)
        if (std::holds_alternative<TrainRecord>(r) || std::holds_alternative<EvalRecord>(r) ||
            std::holds_alternative<BiasRecord>(r) || std::holds_alternative<LoadRecord>(r) ||
            (std::holds_alternative<TimingRecord>(r) && std::get<TimingRecord>(r).phase == "train"))
            m_records.push_back(std::move(r));
    if (m_records.empty()) {
        const QString msg = tr("%1 holds no training records (train / eval / bias / load)").arg(s.tracePath);
        if (error) *error = msg;
        return false;
    }
    m_next = 0;
    m_lastStep = stepOf(m_records.back());
    setState(State::Running);
    m_timer.start();
    return true;
}

void TraceReplayTrainer::tick() {
    if (m_next >= m_records.size()) {
        m_timer.stop();
        setState(State::Finished);
        emit finished(QString());
        return;
    }
    const int64_t until = stepOf(m_records[m_next]) + m_stepsPerTick - 1;
    while (m_next < m_records.size() && stepOf(m_records[m_next]) <= until) m_sink->record(m_records[m_next++]);
    emit progress(until, m_lastStep);
}

void TraceReplayTrainer::pause() {
    if (state() != State::Running) return;
    m_timer.stop();
    setState(State::Paused);
}

void TraceReplayTrainer::resume() {
    if (state() != State::Paused) return;
    m_timer.start();
    setState(State::Running);
}

void TraceReplayTrainer::stop() {
    m_timer.stop();
    m_next = m_records.size();
    setState(State::Idle);
}

void TraceReplayTrainer::finishNow() {
    while (m_next < m_records.size()) m_sink->record(m_records[m_next++]);
    tick();
}
