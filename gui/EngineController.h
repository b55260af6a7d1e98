// EngineController: the engine (model, backend, tokenizer, Session) on its own worker QThread.
// The GUI thread only posts jobs and receives queued signals; it never waits on the engine.
// Errors are caught at the thread boundary and reported as signals with the engine's message.
#pragma once
#include <QObject>
#include <QString>
#include <QThread>
#include <QVector>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <nlohmann/json.hpp>

#include "TelemetryStore.h"
#include "engine/eval.h"
#include "engine/session.h"

namespace moescope {
class Tokenizer;
class Model;
}

struct ModelInfo {
    QString dir;
    QString backendName;
    QString backendNotice;           // why this backend (e.g. no CUDA device)
    bool hasTokenizer = false;
    QString tokenizerNotice;         // no tokenizer.json, or a template warning
    int contextCap = 0;
    int vocabSize = 0;
    int eosId = -1;
    int mtpDepth = 0;
    nlohmann::json config, card;
};

struct GeneratedToken {
    int id = 0;
    int position = 0;
    QString text;
    bool drafted = false;
    bool special = false;            // <|eos|> and other special tokens: not part of the answer text
    float surprisal = 0;
};

// Held-out perplexity of the loaded model on a text file, with every expert on and with the
// ablation in force (when there is one): what `moescope-cli perplexity` prints.
struct EvaluationReport {
    QString path;                    // the text file
    int context = 0;                 // window length
    int textTokens = 0;              // tokens in the file
    moescope::PerplexityResult baseline;
    bool ablated = false;            // an ablation was in force: `withAblation` holds its run
    moescope::PerplexityResult withAblation;
    QString ablation;                // what was off (the answer summaries' wording)
    std::vector<moescope::TokenImpact> hurt;  // the tokens the ablation hurt most
    std::map<int, QString> texts;    // token id -> text, for `hurt`
    // With a sweep, the experts switched off stay off in every run. Over R: each token's top R
    // experts dropped in every MoE layer of the main model, R = 0, 1, ... as far as the experts
    // switched off allow (sweep[i] is R = i). Per layer: each token's top expert dropped in one
    // MoE layer alone, sweepLayers[i] being that layer.
    std::vector<moescope::PerplexityResult> sweep;
    std::vector<int> sweepLayers;
    // Or per expert: each routed expert of MoE layer sweepExpertLayer switched off alone (on top
    // of the ablation in force), sweepExperts[i] being the expert of sweep[i].
    std::vector<int> sweepExperts;
    int sweepExpertLayer = -1;
};

// The report as a telemetry record (saved with the session's telemetry, replayed into the
// Evaluate view), and back: every number the view draws and exports, bit for bit.
moescope::EvaluationRecord evaluationRecord(const EvaluationReport& r);
EvaluationReport evaluationReport(const moescope::EvaluationRecord& r);

enum class EvalSweep { None, TopR, PerLayer, PerExpert };

class EngineController : public QObject {
    Q_OBJECT
public:
    explicit EngineController(TelemetryStore* store, QObject* parent = nullptr);
    ~EngineController() override;

    // All asynchronous; results come back as signals.
    void loadModel(const QString& dir, const QString& backendRequest = QStringLiteral("auto"));
    // Generates after `context` (the whole token context wanted: previous turns + new prompt).
    // The session keeps the common prefix of its cache and re-prefills the rest.
    void generate(const std::vector<int>& context, const moescope::SamplingParams& params);
    void cancel();                   // thread-safe, immediate: stops within one step
    void setLatentLayer(int layer);
    void setOnlineBalancing(bool enabled, double gamma);
    void resetBias();
    void setWantScores(bool on);     // full router score vectors in the route records
    // An ablation: switches experts off. `text` is a list of experts of `layer` ("3,7", "0-3";
    // empty: enable that layer's again) or a whole spec with layers ("1:3;2:0-3", "*:5"). The
    // cached context was computed with the old experts, so it is dropped: the next message
    // recomputes it. Refused masks come back as ablationFailed.
    void setDisabledExperts(int layer, const QString& text);
    // The other ablation (DeepSeekMoE's top-expert test): each token's `r` highest-ranked
    // experts switched off for it in every MoE layer of the main model (0: none); the cache is
    // dropped as above.
    void setDropTopExperts(int r);
    void clearDisabledExperts();     // every expert of every layer on again (no top dropped)
    // Scores the text file `path` in windows of up to 512 tokens (at most maxWindows, 0: all),
    // with every expert on, then with the ablation in force; the conversation is kept. Progress,
    // then evaluationFinished or evaluationFailed (a missing file, a text under 2 tokens, cancel()).
    // sweep: also "Top off" at R = 0..k (DeepSeekMoE's figure) or at 1 in each MoE layer alone
    // (EvaluationReport::sweep).
    // PerExpert: `expertLayer` is the MoE layer whose experts are switched off one at a time.
    void evaluate(const QString& path, int maxWindows, EvalSweep sweep = EvalSweep::None, int showTokens = 12,
                  int expertLayer = -1);

    bool isLoaded() const { return m_loaded; }
    bool isBusy() const { return m_busy; }
    const ModelInfo& info() const { return m_info; }
    // The loaded tokenizer (null without tokenizer.json). Encode on the GUI thread only while idle.
    std::shared_ptr<const moescope::Tokenizer> tokenizer() const { return m_tokenizerGui; }
    const std::vector<int>& contextTokens() const { return m_context; }

signals:
    void loadStarted(const QString& dir);
    void loadProgress(double fraction, const QString& what);
    void modelLoaded(const ModelInfo& info);
    void loadFailed(const QString& dir, const QString& message);
    void generationStarted(int promptTokens);
    void tokenGenerated(const GeneratedToken& token);
    void generationFinished(const GenerationSummary& summary);
    void generationFailed(const QString& message);
    void busyChanged(bool busy);
    void ablationFailed(const QString& message);
    void evaluationProgress(int done, int total, const QString& what);
    void evaluationFinished(const EvaluationReport& report);
    void evaluationFailed(const QString& message);

private:
    template <class F> void post(F&& f);      // run on the worker thread
    template <class F> void reply(F&& f);     // run on the GUI thread
    void applyAblation(const std::map<int, std::vector<int>>& layers, int drop_top);  // worker thread
    QString ablationSummary() const;                                     // worker thread

    TelemetryStore* m_store;
    QThread m_thread;
    QObject* m_worker;                          // lives on m_thread; jobs run in its context

    // Worker-thread state.
    std::shared_ptr<moescope::Model> m_model;
    std::shared_ptr<moescope::Backend> m_backend;
    std::shared_ptr<const moescope::Tokenizer> m_tokenizer;
    std::unique_ptr<moescope::Session> m_session;
    int m_latentLayer = 0;  // the latent view starts on layer 0
    bool m_wantScores = false;

    // Shared between threads.
    std::mutex m_sessionMu;                     // guards m_session for cancel()
    std::atomic<int64_t> m_jobId{0}, m_cancelUpTo{-1};

    // GUI-thread state.
    ModelInfo m_info;
    std::shared_ptr<const moescope::Tokenizer> m_tokenizerGui;
    std::vector<int> m_context;
    bool m_loaded = false;
    bool m_busy = false;
};

Q_DECLARE_METATYPE(ModelInfo)
Q_DECLARE_METATYPE(GeneratedToken)
Q_DECLARE_METATYPE(GenerationSummary)
Q_DECLARE_METATYPE(EvaluationReport)
