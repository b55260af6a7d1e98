// Expert specialization: which tokens each routed expert takes, from routing telemetry
// (RouteRecord, as Session records it and JSONL traces hold it). The analysis of MoE papers
// (DeepSeekMoE, Mixtral, OpenMoE, OLMoE): per MoE layer and expert the routed slots, their
// share, the mean mixing weight, and the tokens it takes with n(e,t), n(t) and p(e|t); per
// layer one number for how much the token id alone decides the routing. The app's Experts view
// and `moescope-cli experts` both print this function's result.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/telemetry.h"

namespace moescope {

// How an expert's tokens are ordered.
//  Count:       n(e,t), most taken first. Frequent tokens (" the", ",") top every expert.
//  Consistency: p(e|t) = n(e,t) / n(t), OLMoE's "token specialization" (the share of a token's
//               occurrences routed to the expert); ties by n(e,t). Tokens seen fewer than
//               min_count times (where p(e|t) = 1 is chance) rank after the others, by count.
//  Lift:        p(e|t) / p(e), p(e) = n_e / positions: how much more often than the expert's
//               base rate the token goes there; same min_count rule.
enum class TokenRank { Count, Consistency, Lift };
const char* token_rank_name(TokenRank r);        // "count", "p", "lift"
TokenRank token_rank_from_string(const std::string& s);  // ConfigError for anything else

struct ExpertOptions {
    std::vector<int> layers;           // layers to analyze; empty: every MoE layer in the records
    // Layers >= num_hidden_layers are the MTP module's (trace layer L + k - 1): excluded, and
    // listed in ExpertAnalysis::mtp_layers. 0: unknown, every layer is kept.
    int num_hidden_layers = 0;
    TokenRank rank = TokenRank::Consistency;
    int min_count = 2;                 // n(t) below this: not scored, ranked last (see TokenRank)
    int top = 10;                      // tokens kept per expert after ranking (0: all)
    bool token_lists = true;           // false: counts and the layer summary only (all-layer overviews)
    int baseline_shuffles = 4;         // chance level: consistency with token ids shuffled, averaged
    uint64_t seed = 0;                 // of the shuffles (same records, same seed, same numbers)
};

struct ExpertToken {
    int token = 0;
    int64_t count = 0;                 // n(e,t): occurrences of t routed to e
    int64_t occurrences = 0;           // n(t): occurrences of t among the layer's positions
    double p = 0;                      // p(e|t) = count / occurrences
    double lift = 0;                   // p(e|t) / p(e)
};

struct ExpertStats {
    int expert = 0;
    int64_t n_slots = 0;                 // n_e: routings to this expert (positions x top-k slots)
    double share = 0;                  // n_e / the layer's slots (uniform: 1 / E)
    double mean_weight = 0;            // mean gate weight of those slots (0 when never routed)
    int64_t distinct_tokens = 0;       // token ids it took at least once
    std::vector<ExpertToken> tokens;   // ranked by ExpertOptions::rank, at most `top`
};

// Token consistency of a layer: the mean over token ids seen at least min_count times of
// max_e p(e|t), the share of a token's occurrences that go to its most frequent expert. 1 when
// the token id decides the routing; under routing independent of the token it is the chance
// level, which small samples inflate (a token seen twice shares an expert by luck), so the
// same number with token ids shuffled across the layer's positions (keeping n(t) and n_e) is
// reported as `chance`, and specialization = (consistency - chance) / (1 - chance): 0 for
// token-independent routing, 1 for token-determined routing.
struct LayerExperts {
    int layer = 0;
    int E = 0, k = 0;
    int64_t positions = 0;             // route records with this layer
    int64_t n_slots = 0;                 // sum of n_e
    int64_t distinct_tokens = 0;
    int64_t scored_tokens = 0;         // token ids with n(t) >= min_count (the consistency's support)
    double consistency = 0;            // 0 when scored_tokens == 0
    double chance = 0;
    double specialization = 0;
    std::vector<ExpertStats> experts;  // [E], by expert id
};

struct ExpertAnalysis {
    std::vector<LayerExperts> layers;  // ascending layer index
    int64_t positions = 0;             // route records counted
    std::vector<int> mtp_layers;       // layers left out as the MTP module's
    const LayerExperts* layer(int l) const;  // nullptr when not analyzed
};

// Every route record counts once: a caller showing one text passes that text's records (the
// GUI's store keeps the latest record per position). ConfigError when opt.layers names a layer
// no record routes.
ExpertAnalysis analyze_experts(const std::vector<const RouteRecord*>& routes, const ExpertOptions& opt = {});
// The route records of a trace; num_hidden_layers from its meta record when opt leaves it 0.
ExpertAnalysis analyze_experts(const std::vector<Record>& records, ExpertOptions opt = {});

// Token id -> text from the token records (first non-empty text per id).
std::map<int, std::string> token_texts(const std::vector<Record>& records);
// A token's text quoted so whitespace and control bytes show: " the" -> "\" the\"", newline -> "\"\\n\"".
std::string quote_token(const std::string& text);

// {"positions", "mtp_layers", "layers": [{"layer", "E", "k", "positions", "slots", "distinct_tokens",
//  "scored_tokens", "consistency", "chance", "specialization", "experts": [{"expert", "slots", "share",
//  "mean_weight", "distinct_tokens", "tokens": [{"token", "text", "count", "occurrences", "p", "lift"}]}]}]}
nlohmann::json to_json(const ExpertAnalysis& a, const std::map<int, std::string>& texts = {});

}  // namespace moescope
