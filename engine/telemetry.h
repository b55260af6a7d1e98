// Telemetry: plain records of what the engine did (routing, load, bias, latent cache, MTP,
// timings, training), a sink interface, a JSONL writer, a trace reader for replay, and the
// serving-engine-shaped exports (routed experts [tokens, moe_layers, k], load [steps, layers,
// experts] as CSV and NumPy .npy). Every record serializes to one JSON line with "type".
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

namespace moescope {

struct MetaRecord {           // first line of a trace
    nlohmann::json card;      // ModelCard::to_json
    nlohmann::json config;    // config.json as loaded
    nlohmann::json settings;  // sampling / training settings, backend, source
};

struct TokenRecord {          // one token of the text (prompt or generated)
    int64_t step = 0;         // decode step that produced it (0 for the prompt)
    int position = 0;
    int id = 0;
    std::string text;         // its decoded text ("" when no tokenizer)
    bool prompt = false;
    bool drafted = false;     // produced by an accepted MTP draft
    float surprisal = 0;      // -log2 p(token) under the main model (0 for prompt[0])
};

struct RouteRecord {          // routing of one token in every MoE layer
    int64_t step = 0;
    int position = 0;
    int token = 0;
    int k = 0;
    std::vector<int> layers;            // MoE layer indices (MTP module: L + k - 1)
    std::vector<int> ids;               // [layers, k]
    std::vector<float> weights;         // [layers, k]
    std::vector<uint8_t> kept_groups;   // [layers, n_group] (empty when not grouped)
    int n_group = 0;
    std::vector<float> scores;          // [layers, E] on request, else empty
    std::vector<float> bias;            // [layers, E] the bias used, with the scores
    int E = 0;
};

struct LoadRecord {           // tokens per expert in one layer for one step
    int64_t step = 0;
    int layer = 0;
    std::vector<int64_t> counts;  // [E]
};

struct BiasRecord {           // a layer's router bias whenever it changes
    int64_t step = 0;
    int layer = 0;
    std::vector<float> bias;  // [E]
};

struct LatentRecord {         // the latent cache at one position
    int64_t step = 0;
    int position = 0;
    std::vector<float> norms;      // [layers] |c| per layer
    int layer = -1;                // the layer whose c / k_pe are included (-1: none)
    std::vector<float> c;          // [d_c]
    std::vector<float> k_pe;       // [d_rope]
    int64_t cache_bytes = 0;       // latent cache in use (BF16-equivalent bytes)
    int64_t mha_bytes = 0;         // what plain MHA would hold for the same positions
};

struct MtpRecord {            // one speculative step
    int64_t step = 0;
    int position = 0;              // position of the first drafted token
    std::vector<int> draft;        // drafted ids (depth order)
    int accepted = 0;              // how many were accepted
    double acceptance_rate = 0;    // running
};

struct TimingRecord {
    int64_t step = 0;
    std::string phase;             // prefill | decode | draft | verify | train
    double seconds = 0;
    int tokens = 0;
    double tokens_per_s = 0;
};

struct TrainRecord {
    int64_t step = 0;
    double loss = 0, mtp_loss = 0, aux_loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, maxvio_batch = 0;
};

struct EvalRecord {
    int64_t step = 0;
    double val_loss = 0, maxvio_global = 0;
};

struct AblationRecord {        // a layer's ablation from this step on
    int64_t step = 0;
    int layer = 0;
    std::vector<int> disabled;     // expert ids switched off, ascending (empty: all enabled again)
    int drop_top = 0;              // each token's highest-ranked experts switched off for it
};

// One scoring of a held-out text (the app's Evaluate view, `perplexity --telemetry`). Cross-
// entropies in nats: mean -ln p of the next token, and of the token after it (MTP module 1).
struct PerplexityRun {
    int windows = 0;
    int64_t tokens = 0;
    double cross_entropy = 0;
    int64_t mtp_tokens = 0;        // 0: the MTP module was not scored
    double mtp_cross_entropy = 0;
    bool operator==(const PerplexityRun&) const = default;
};

struct HurtToken {                 // a token whose loss an ablation raised (eval.h TokenImpact)
    int token = 0;
    std::string text;
    int64_t count = 0;
    double baseline = 0, ablated = 0, added = 0;
    bool operator==(const HurtToken&) const = default;
};

struct EvaluationRecord {          // a held-out evaluation, every run of it
    int64_t step = 0;
    std::string corpus;            // the text file
    int context = 0;               // window length
    int64_t text_tokens = 0;       // tokens in the file
    PerplexityRun baseline;        // every expert on
    bool ablated = false;          // an ablation was in force: `with_ablation` is its run
    PerplexityRun with_ablation;
    std::string ablation;          // what was off, in words
    std::vector<HurtToken> hurt;   // the tokens the ablation hurt most
    std::vector<PerplexityRun> sweep;   // each token's top R experts dropped, R = 0, 1, ... or per layer:
    std::vector<int> sweep_layers;      // the MoE layer of each run of a per-layer sweep (empty: over R)
    std::vector<int> sweep_experts;     // or per expert: the expert of `sweep_expert_layer` each run switched off
    int sweep_expert_layer = -1;
    bool operator==(const EvaluationRecord&) const = default;
};

using Record = std::variant<MetaRecord, TokenRecord, RouteRecord, LoadRecord, BiasRecord, LatentRecord, MtpRecord,
                            TimingRecord, TrainRecord, EvalRecord, AblationRecord, EvaluationRecord>;

nlohmann::json to_json(const Record& r);
Record record_from_json(const nlohmann::json& j);  // FormatError on a malformed record
const char* record_type(const Record& r);

class TelemetrySink {
public:
    virtual ~TelemetrySink() = default;
    virtual void record(const Record& r) = 0;
    // Records the engine builds are temporaries: sinks that keep them take them without a copy.
    virtual void record(Record&& r) { record(static_cast<const Record&>(r)); }
};

// Appends one JSON object per line; thread-safe.
class JsonlWriter : public TelemetrySink {
public:
    explicit JsonlWriter(const std::filesystem::path& path);
    using TelemetrySink::record;
    void record(const Record& r) override;
    void flush();

private:
    std::mutex mu_;
    std::ofstream out_;
    std::string path_;
};

// Keeps every record in memory (tests, the GUI's store, exports).
class MemorySink : public TelemetrySink {
public:
    void record(const Record& r) override;
    void record(Record&& r) override;
    std::vector<Record> take();
    std::vector<Record> snapshot() const;

private:
    mutable std::mutex mu_;
    std::vector<Record> records_;
};

// Forwards to several sinks.
class TeeSink : public TelemetrySink {
public:
    using TelemetrySink::record;
    void add(TelemetrySink* s) { sinks_.push_back(s); }
    void record(const Record& r) override {
        for (auto* s : sinks_) s->record(r);
    }

private:
    std::vector<TelemetrySink*> sinks_;
};

// Reads a JSONL trace (for replay). Throws FormatError naming the file and line.
std::vector<Record> read_trace(const std::filesystem::path& path);

// MaxVio = max_e n_e / mean(n) - 1 (0 for an empty step).
double max_violation(const std::vector<int64_t>& counts);

// Serving-engine-shaped exports.
// Routed experts of the given route records: an int32 array [tokens, moe_layers, k].
void export_routed_experts_npy(const std::filesystem::path& path, const std::vector<RouteRecord>& routes);
void export_routed_experts_csv(const std::filesystem::path& path, const std::vector<RouteRecord>& routes);
// Load records grouped by step: an int64 array [steps, layers, experts] (layers in order of appearance).
void export_load_npy(const std::filesystem::path& path, const std::vector<LoadRecord>& loads);
void export_load_csv(const std::filesystem::path& path, const std::vector<LoadRecord>& loads);

// Minimal .npy writer (version 1.0, little-endian, C order). dtype "<i4", "<i8" or "<f4".
void write_npy(const std::filesystem::path& path, const std::string& dtype, const std::vector<int64_t>& shape,
               const void* data, size_t bytes);

}  // namespace moescope
