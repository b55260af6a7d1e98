// Shared helpers of the model-running subcommands: open a folder with its tokenizer and a
// backend, sampling flags, prompt tokens.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "engine/eval.h"
#include "engine/session.h"
#include "engine/tools/cli.h"

namespace moescope {
class Tokenizer;
}

namespace moescope::cli {

struct LoadedModel {
    std::shared_ptr<Model> model;
    std::shared_ptr<Tokenizer> tokenizer;  // null without tokenizer.json
    std::shared_ptr<Backend> backend;
    std::string notice;                    // which backend and why
};

// `weights`: how the CPU model holds its large weights (--weights f32|bf16|auto).
LoadedModel open_model(const std::string& dir, const std::string& backend, int context,
                       WeightStorage weights = WeightStorage::Auto);
// --weights f32|bf16|auto (default auto); a UsageError for anything else.
WeightStorage weights_from_args(const Args& a);
// The model card with the loaded weights' storage and resident bytes filled in.
SamplingParams sampling_from_args(const Args& a, const ModelConfig& cfg);
std::vector<int> prompt_tokens(const Args& a, const LoadedModel& m);
nlohmann::json meta_settings(const LoadedModel& m, const std::string& dir, const SamplingParams& p);
// A corpus as the loaded model reads it (corpus_ids of engine/eval.h).
std::vector<int> text_tokens(const std::string& text, const LoadedModel& m);
// --disable-experts SPEC (parse_expert_spec) applied to the backend, or through the Session when
// there is one (which records it); layer -> ids, empty without the flag.
std::map<int, std::vector<int>> disable_experts(const Args& a, Backend& backend, Session* session = nullptr);
// Each token's top `r` experts switched off for it in every MoE layer of the main model (the
// layers of a "*" spec; route()'s drop_top), through the Session when there is one (which
// records it).
void drop_top_experts(Backend& backend, int r, Session* session = nullptr);
// --drop-top-experts R applied with drop_top_experts; R (0 without the flag).
int drop_top_experts(const Args& a, Backend& backend, Session* session = nullptr);

}  // namespace moescope::cli
