// Held-out evaluation of a model on a token stream: next-token cross-entropy (perplexity), the
// MTP module's cross-entropy on the token after next, and the routing counts behind them. What
// `moescope-cli perplexity` reports, with and without experts disabled (an ablation).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "engine/backend.h"
#include "engine/telemetry.h"

namespace moescope {

class Tokenizer;

// A text file's contents, the corpus to score; an Error naming the file when it is a folder or
// cannot be read.
std::string read_corpus(const std::string& path);
// A text as the model reads a corpus: the tokenizer, special tokens written in the text
// (<|bos|>, ...) read as those tokens, as training reads its corpus; without a tokenizer (null),
// bytes modulo the vocabulary.
std::vector<int> corpus_ids(const Tokenizer* tokenizer, std::string_view text, int vocab_size);
// One token's text: the tokenizer's decoding of it alone; without a tokenizer, its byte.
std::string token_piece(const Tokenizer* tokenizer, int id);

struct PerplexityOptions {
    int context = 512;       // window length (positions); windows do not overlap
    int max_windows = 0;     // 0: every full window (a shorter tail is evaluated too when it has >= 2 tokens)
    bool mtp = true;         // also score MTP module 1 (when the model has one)
    bool keep_losses = false;  // PerplexityResult::losses / targets
};

struct PerplexityResult {
    int windows = 0;
    int64_t tokens = 0;                // predictions scored: every position but the first of a window
    double cross_entropy = 0;          // mean -ln p(next token), nats
    int64_t mtp_tokens = 0;            // MTP module 1: position i predicts token i + 2
    double mtp_cross_entropy = 0;      // nats; 0 when not scored
    std::map<int, std::vector<int64_t>> loads;  // MoE layer -> [E] tokens routed (main model)
    // With keep_losses, per scored prediction in stream order: -ln p(next token) and the index
    // in `ids` of the token it predicted.
    std::vector<double> losses;
    std::vector<int64_t> targets;
    double perplexity() const;
    double mtp_perplexity() const;
};

// How an ablation changed the loss on one predicted token.
struct TokenImpact {
    int token = 0;
    int64_t count = 0;                 // predictions of this token
    double baseline = 0, ablated = 0;  // mean -ln p over them
    double added = 0;                  // sum of (ablated - baseline): its part of the rise in total loss
};

// The predicted tokens whose loss an ablation raised most, by total added loss (ties: lower id
// first), among tokens predicted at least min_count times; at most `top` (0: all). `base` and
// `ablated` come from keep_losses runs over the same `ids` and options.
std::vector<TokenImpact> token_impact(const std::vector<int>& ids, const PerplexityResult& base,
                                      const PerplexityResult& ablated, int min_count, int top);

// A result's numbers as the telemetry's evaluation record keeps them (no loads, no losses), and back.
PerplexityRun perplexity_run(const PerplexityResult& r);
PerplexityResult perplexity_result(const PerplexityRun& r);

// Runs `ids` through `backend` window by window (a fresh cache each). `on_window(done, total)`
// reports progress and may return false to stop early (the result covers the windows done).
PerplexityResult evaluate_perplexity(Backend& backend, const std::vector<int>& ids, const PerplexityOptions& o,
                                     const std::function<bool(int, int)>& on_window = {});

// Expert importance: the text scored once per routed expert of MoE `layer` with that expert
// switched off alone, on top of the ablation in force (put back afterwards, also on error).
// Experts already off, and those whose removal the router refuses (a token could be left fewer
// than k experts), are skipped. `on_run(done, total)` is called before each run and may return
// false to stop (the points so far are returned); `on_window` reports each run's windows.
struct ExpertImportance {
    int expert = 0;
    PerplexityResult result;
};
std::vector<ExpertImportance> expert_importance(Backend& backend, const std::vector<int>& ids,
                                                const PerplexityOptions& o, int layer,
                                                const std::function<bool(int expert, int done, int total)>& on_run = {},
                                                const std::function<bool(int, int)>& on_window = {});

}  // namespace moescope
