// Session: generation over one backend. Prefill a prompt, decode step by step over the
// latent cache (absorbed MLA), sample, draft with the MTP module and verify (speculative
// decoding), stream tokens and telemetry. Several sessions may share one loaded model.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/telemetry.h"

namespace moescope {

class Tokenizer;

struct SamplingParams {
    double temperature = 0.7;        // 0: greedy
    int top_k = 0;                   // 0: off
    double top_p = 1.0;              // 1: off
    double min_p = 0.0;              // 0: off
    double repetition_penalty = 1.0; // 1: off (CTRL-style, on logits of seen tokens)
    double frequency_penalty = 0.0;
    double presence_penalty = 0.0;
    uint64_t seed = 0;               // same seed, same output
    int max_tokens = 256;
    std::vector<int> stop_tokens;    // generation ends after emitting one of these
    std::vector<std::string> stop_strings;  // needs a tokenizer; the stop string is trimmed
    bool mtp = true;                 // speculative decoding with the MTP modules
    int mtp_depth = 0;               // 0: every module the checkpoint has
};

struct MtpStats {                    // as serving engines count them
    int64_t drafts = 0;              // speculative steps that drafted
    int64_t draft_tokens = 0;        // tokens drafted
    int64_t accepted_tokens = 0;     // drafted tokens accepted
    std::vector<int64_t> drafted_at, accepted_at;  // per draft position
    double acceptance_rate() const { return draft_tokens ? double(accepted_tokens) / double(draft_tokens) : 0.0; }
    double mean_acceptance_length() const { return drafts ? 1.0 + double(accepted_tokens) / double(drafts) : 1.0; }
};

struct GenerationStats {
    int prompt_tokens = 0;
    int generated_tokens = 0;
    double prefill_seconds = 0, decode_seconds = 0, time_to_first_token = 0;
    double tokens_per_s() const { return decode_seconds > 0 ? generated_tokens / decode_seconds : 0.0; }
    double prefill_tokens_per_s() const { return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0.0; }
    std::string stop_reason;         // "max_tokens", "stop_token", "stop_string", "cancelled", "context"
    MtpStats mtp;
};

struct TokenEvent {
    int id = 0;
    int position = 0;
    std::string text;                // decoded text piece ("" without a tokenizer)
    bool drafted = false;            // came from an accepted MTP draft
    bool special = false;            // a special token (<|eos|>, ...): not part of res.text
    float surprisal = 0;             // -log2 p under the main model's (unfiltered) distribution
};

struct GenerationResult {
    std::vector<int> tokens;         // generated ids
    std::string text;
    GenerationStats stats;
};

struct OnlineBalancing {            // aux-loss-free bias updates during generation
    bool enabled = false;
    double gamma = 0.001;
};

class Session {
public:
    // context_cap: 0 = the model's max_position_embeddings.
    Session(std::shared_ptr<Backend> backend, std::shared_ptr<const Tokenizer> tokenizer = nullptr,
            int context_cap = 0);
    ~Session();

    void set_sink(TelemetrySink* sink) { sink_ = sink; }
    void set_latent_layer(int layer) { latent_layer_ = layer; }  // c / k_pe of this layer in telemetry
    void set_want_scores(bool on) { want_scores_ = on; }
    void set_online_balancing(const OnlineBalancing& b) { balancing_ = b; }
    const OnlineBalancing& online_balancing() const { return balancing_; }

    int length() const;                       // positions in the cache
    int context_cap() const { return cap_; }
    const std::vector<int>& tokens() const { return tokens_; }

    // Appends tokens to the context (prefill). Throws ContextError past the cap.
    void append(const std::vector<int>& tokens);
    // Generates after the current context; on_token returns false to stop.
    GenerationResult generate(const SamplingParams& params,
                              const std::function<bool(const TokenEvent&)>& on_token = {});
    // Convenience: append(prompt) then generate.
    GenerationResult generate(const std::vector<int>& prompt, const SamplingParams& params,
                              const std::function<bool(const TokenEvent&)>& on_token = {});
    void cancel();                            // thread-safe; stops within one step
    void truncate(int n);                     // keep the first n tokens (regenerate, edit)
    void reset();
    void reset_bias();                        // back to the checkpoint's router bias
    // Switches experts of an MoE layer off (an ablation) from the next position on: ids in
    // [0, E), empty to enable them all again; records an AblationRecord. Throws for an id out
    // of range or a mask the router cannot honour (check_disabled_experts).
    void set_disabled_experts(int layer, const std::vector<int>& experts);
    // Switches each token's drop_top highest-ranked experts of an MoE layer off for it (0: none)
    // from the next position on; records an AblationRecord. Throws like the mask's setter.
    void set_drop_top_experts(int layer, int drop_top);
    // Every layer's ablation at once (engine/backend.h set_ablation: all or nothing); records an
    // AblationRecord for each layer whose state changed.
    void set_ablation(const Ablation& a);

    Backend& backend() { return *backend_; }
    int64_t step() const { return step_; }

private:
    void append_impl(const std::vector<int>& tokens, bool prompt);
    void refresh_next_logits();
    void record_ablation(int layer);  // the layer's mask and drop_top, as the backend holds them
    struct Impl;
    std::unique_ptr<Impl> impl_;
    std::shared_ptr<Backend> backend_;
    std::shared_ptr<const Tokenizer> tokenizer_;
    TelemetrySink* sink_ = nullptr;
    int cap_ = 0;
    int latent_layer_ = -1;
    bool want_scores_ = false;
    OnlineBalancing balancing_;
    std::vector<int> tokens_;
    int64_t step_ = 0;
    std::atomic<bool> cancel_{false};
};

// Samples one id from logits[V] with the given params (penalties use `history`).
// Returns the id; writes the filtered distribution into `probs` when non-null.
int sample_token(const float* logits, int V, const SamplingParams& p, const std::vector<int>& history,
                 std::mt19937_64& rng, std::vector<float>* probs = nullptr);

}  // namespace moescope
