// Training from scratch: the loop (gradient accumulation, global-norm clipping, AdamW with
// warm-up + cosine schedule, balancing mode), validation, telemetry, and checkpoints that
// resume bit-exactly. Trainer::step() runs one optimizer step, so a GUI worker thread can
// drive it, read stats between steps and stop through the cancel flag.
#pragma once
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/config.h"
#include "engine/errors.h"
#include "engine/model/model.h"
#include "engine/telemetry.h"
#include "engine/train/data.h"
#include "engine/train/optimizer.h"
#include "engine/train/train_forward.h"
#include "engine/weights.h"

namespace moescope {

// NaN / inf in the loss or the gradients: the step is not applied; the last checkpoint stays.
struct DivergenceError : Error {
    using Error::Error;
};

struct TrainOptions {
    int64_t steps = 1000;            // optimizer steps in total (the schedule's length)
    int batch = 8;                   // sequences per micro-batch
    int seq_len = 64;                // tokens per sequence (T - 1 next-token targets)
    int grad_accum = 1;              // micro-batches per optimizer step
    double lr = 3e-3, min_lr = 3e-4; // cosine from lr to min_lr after warm-up
    int64_t warmup = 50;
    AdamWOptions adam;
    double clip = 1.0;               // global gradient-norm clip (0: off)
    LossOptions loss;                // mtp_weight, balance mode, alpha
    double gamma = 1e-3;             // aux-free bias step
    double gamma_until = 1.0;        // fraction of the steps after which gamma is 0
    int64_t eval_every = 100;        // validation (and checkpoint) period; 0: only at the end
    int eval_windows = 16;           // validation windows of seq_len tokens
    double val_fraction = 0.05;      // held-out tail of the token stream
    uint64_t seed = 1;               // weights and data order
    // Every product in fixed blocks (FixedOrderProducts, ops.h): the same bits at any thread
    // count, so a run resumes bit-exactly at another --threads. The default: on this machine it
    // is as fast as OpenBLAS's own threads or faster (docs/training.md); false keeps OpenBLAS's.
    bool deterministic = true;
    double init_std = 0.02;
    std::filesystem::path out_dir;   // checkpoints go to out_dir/checkpoint (empty: none)
    std::filesystem::path tokenizer; // a folder with tokenizer.json (+ config), copied into checkpoints
    // Test hook: called with "config", "model", "optimizer", "state" before each file of a save.
    std::function<void(const std::string&)> save_hook;

    nlohmann::json to_json() const;
    static TrainOptions from_json(const nlohmann::json& j);
};

struct StepStats {
    int64_t step = 0;                 // steps done after this one
    double loss = 0, ce = 0, mtp_ce = 0, aux = 0;
    double lr = 0, grad_norm = 0, tokens_per_s = 0, seconds = 0;
    double maxvio_batch = 0;          // mean over the main model's MoE layers
    double gamma = 0;                 // bias step used (aux-free)
    std::vector<int> moe_layers;
    std::vector<std::vector<int64_t>> loads;  // [moe layers][E]
    bool evaluated = false;           // an evaluation ran after this step (see last_eval())
};

struct EvalStats {
    int64_t step = 0;
    double val_loss = 0, perplexity = 0;
    double maxvio_global = 0;               // mean over the main MoE layers of the whole set's MaxVio
    std::vector<double> maxvio_per_layer;   // [main MoE layers]
    int windows = 0;
};

class Trainer {
public:
    // A fresh model (init_weights with options.seed) on the given token stream.
    Trainer(ModelConfig cfg, TrainOptions opt, std::vector<int> tokens, TelemetrySink* sink = nullptr);
    // Continues the run saved in `checkpoint_dir` on the same token stream (checked by
    // fingerprint). `steps` > 0 extends / changes the planned length.
    static std::unique_ptr<Trainer> resume(const std::filesystem::path& checkpoint_dir, std::vector<int> tokens,
                                           TelemetrySink* sink = nullptr, int64_t steps = 0);

    // One optimizer step (+ validation and a checkpoint when due). Throws DivergenceError.
    StepStats step();
    EvalStats evaluate();
    // Steps until done() or cancel(); on_step after each. Saves a final checkpoint.
    void run(const std::function<void(const StepStats&)>& on_step = {});
    void cancel() { cancel_ = true; }
    bool cancelled() const { return cancel_; }
    std::atomic<bool>& cancel_flag() { return cancel_; }

    bool done() const { return step_ >= opt_.steps; }
    int64_t step_count() const { return step_; }
    const TrainOptions& options() const { return opt_; }
    const ModelConfig& config() const { return cfg_; }
    const Weights& weights() const { return w_; }
    const EvalStats& last_eval() const { return last_eval_; }
    // See TrainGraph::set_expert_threads: a speed setting, not part of the run's state.
    void set_expert_threads(int n) { graph_.set_expert_threads(n); }
    const TokenDataset& data() const { return data_; }
    // A copy of the current weights as an inference Model (router bias included).
    std::shared_ptr<Model> model() const;

    // Writes dir (HF layout + optimizer.safetensors + trainer_state.json) via dir.tmp and a
    // rename, so an interrupted save leaves the previous checkpoint in place.
    void save(const std::filesystem::path& dir);
    std::filesystem::path checkpoint_dir() const;  // out_dir/checkpoint

private:
    Trainer(ModelConfig cfg, TrainOptions opt, TokenDataset data, TelemetrySink* sink, Weights w);
    Tensor* router_bias(int layer);
    void emit_step(const StepStats& s);

    ModelConfig cfg_;
    TrainOptions opt_;
    TokenDataset data_;
    TelemetrySink* sink_ = nullptr;
    Weights w_, g_;
    std::unique_ptr<AdamW> adam_;
    TrainGraph graph_;
    std::mt19937_64 rng_;
    int64_t step_ = 0;
    EvalStats last_eval_;
    std::atomic<bool> cancel_{false};
    std::vector<int> batch_;
};

// If a save was interrupted between its two renames, puts the previous checkpoint back and
// removes a stale dir.tmp. Returns whether dir holds a checkpoint afterwards.
bool recover_checkpoint(const std::filesystem::path& dir);

// Training throughput of a fresh model of this config on random tokens (for `bench`).
double bench_train_tokens_per_s(const ModelConfig& cfg, int batch, int seq, int steps);

}  // namespace moescope
