// TelemetryStore: the one data model every view reads. Records arrive from the engine thread
// through sink() (a mutex-protected queue; the engine never waits on the UI) or all at once
// from a replayed trace. The store signals changed() at most every ~40 ms, so the drawing rate
// is independent of the data rate (PlotJuggler's pattern). Views only read; no model math here.
#pragma once
#include <QObject>
#include <QString>
#include <QTimer>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "engine/telemetry.h"

// What views need to size their plots; from the meta record's config and card.
struct ModelShape {
    QString name;
    int numLayers = 0;               // decoder layers L (main model)
    int numExperts = 0;              // E
    int topK = 0;
    int nGroup = 1, topkGroup = 1;
    int dC = 0, dRope = 0;
    int mtpDepth = 0;
    int maxPositions = 0;
    int heads = 0;
    qint64 latentBytesPerToken = 0, mhaBytesPerToken = 0, gqaBytesPerToken = 0;
    std::vector<int> moeLayers;      // decoder layers that route (rows of the routing heatmaps)
    int rowOf(int layer) const;      // index into moeLayers, -1 when not a MoE layer
};

// One finished generation as the chat reports it under the answer.
struct GenerationSummary {
    int promptTokens = 0;
    int tokens = 0;
    double tokensPerS = 0;
    double ttft = 0;                 // seconds
    bool mtp = false;
    qint64 draftTokens = 0, acceptedTokens = 0;
    double acceptance = 0;
    QString stopReason;
    QString backendNotice;           // Backend::notice() after the run (e.g. CUDA graphs turned off)
    QString ablation;                // experts switched off during the run ("layer 1: 3,7"), or empty
};

class TelemetryStore : public QObject {
    Q_OBJECT
public:
    explicit TelemetryStore(QObject* parent = nullptr);
    ~TelemetryStore() override;

    // Thread-safe sink for the engine thread. truncate/reset markers travel in the same queue so
    // they stay ordered with the records around them.
    class Sink : public moescope::TelemetrySink {
    public:
        explicit Sink(TelemetryStore* store) : m_store(store) {}
        void record(const moescope::Record& r) override;
        void record(moescope::Record&& r) override;
        void truncate(int positions);  // the session dropped positions >= n (regenerate, edit)
        void reset();                  // a new model or session: forget everything
    private:
        friend class TelemetryStore;
        struct Item {
            int truncateTo = -1;
            bool reset = false;
            std::optional<moescope::Record> rec;
        };
        void push(Item it);
        TelemetryStore* m_store;
        std::mutex m_mu;
        std::vector<Item> m_queue;
        std::atomic<bool> m_scheduled{false};
    };
    Sink* sink() { return m_sink.get(); }

    // GUI-thread API.
    void clear();
    void ingest(const moescope::Record& r);         // one record, no signal
    void replace(const std::vector<moescope::Record>& records);  // replay: clear + ingest + changed()
    void truncate(int positions);
    void flush();                                   // drain the sink now and signal (tests, screenshots)
    void addGeneration(const GenerationSummary& g);
    void beginMessage();                            // "this message" load counters restart
    void select(int position);
    int selected() const { return m_selected; }

    // Read side (GUI thread).
    const ModelShape& shape() const { return m_shape; }
    const std::optional<moescope::MetaRecord>& meta() const { return m_meta; }
    const std::vector<moescope::Record>& records() const { return m_all; }
    const std::map<int, moescope::TokenRecord>& tokens() const { return m_tokens; }
    const std::map<int, moescope::RouteRecord>& routes() const { return m_routes; }
    const std::map<int, moescope::LatentRecord>& latents() const { return m_latent; }
    enum class LoadScope { Total, Message, Step };
    const std::vector<int64_t>* load(int layer, LoadScope scope) const;
    const std::map<int64_t, double>& maxVioByStep() const { return m_maxVio; }  // of the running load, max over layers
    const std::map<int, std::vector<moescope::BiasRecord>>& bias() const { return m_bias; }
    // The experts switched off now (the last ablation record of each layer; empty: none).
    const std::vector<int>& disabled(int layer) const;
    const std::map<int, std::vector<int>>& disabledByLayer() const { return m_disabled; }
    // How many of each token's top-ranked experts are switched off for it now (0: none).
    int dropTop(int layer) const;
    const std::vector<moescope::MtpRecord>& mtp() const { return m_mtp; }
    const std::vector<moescope::TimingRecord>& timing() const { return m_timing; }
    const std::vector<moescope::TrainRecord>& train() const { return m_train; }
    const std::vector<moescope::EvalRecord>& evals() const { return m_eval; }
    // The held-out evaluations (the Evaluate view's, or a replayed trace's: the CLI writes one
    // per ablation run), oldest first; evaluation(): the latest, nullptr before the first.
    const std::vector<moescope::EvaluationRecord>& evaluations() const { return m_evaluations; }
    const moescope::EvaluationRecord* evaluation() const {
        return m_evaluations.empty() ? nullptr : &m_evaluations.back();
    }
    const std::vector<GenerationSummary>& generations() const { return m_generations; }
    qint64 recordCount() const { return qint64(m_all.size()); }

signals:
    void changed();                // coalesced, at most every ~40 ms while data streams
    void selectionChanged(int position);
    void shapeChanged();           // a new meta record (new model or trace)

private:
    void scheduleDrain();
    void drain();
    void setMeta(const moescope::MetaRecord& m);

    std::unique_ptr<Sink> m_sink;
    QTimer m_timer;
    std::vector<moescope::Record> m_all;
    std::optional<moescope::MetaRecord> m_meta;
    ModelShape m_shape;
    std::map<int, moescope::TokenRecord> m_tokens;
    std::map<int, moescope::RouteRecord> m_routes;
    std::map<int, moescope::LatentRecord> m_latent;
    std::map<int, std::vector<int64_t>> m_loadTotal, m_loadMessage, m_loadStep;
    std::map<int64_t, double> m_maxVio;
    std::map<int, std::vector<moescope::BiasRecord>> m_bias;
    std::map<int, std::vector<int>> m_disabled;   // layers with experts switched off
    std::map<int, int> m_dropTop;                 // layers dropping each token's top experts
    std::vector<moescope::MtpRecord> m_mtp;
    std::vector<moescope::TimingRecord> m_timing;
    std::vector<moescope::TrainRecord> m_train;
    std::vector<moescope::EvalRecord> m_eval;
    std::vector<moescope::EvaluationRecord> m_evaluations;
    std::vector<GenerationSummary> m_generations;
    int64_t m_loadStepId = -1;
    int m_selected = -1;
    bool m_shapeDirty = false;
};
