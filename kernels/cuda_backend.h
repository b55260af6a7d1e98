// The CUDA backend: moescope::Backend with every weight, the latent caches, routing and the
// activations resident on the device. Weights are uploaded once (BF16 by default; F32 on
// request for bit-level parity tests; FP8 for FP8 checkpoints, see below), activations are f32
// with f32 accumulation. Per forward call only the token ids go up and the ForwardResult
// (hidden, raw_hidden, routing, latent norms, and the logits unless the caller picks tokens on
// the device with pick()) comes down, copied asynchronously into pinned host buffers.
// FP8 checkpoints stay FP8 on the device by default (kernels/fp8.h; docs/gpu.md "FP8 residency"):
// decode reads the e4m3 bytes in our GEMV, prefill uses cuBLASLt's block-scaled FP8 GEMM after a
// self-check at upload, or dequantizes weight blocks to BF16 when that is unavailable.
// The library exports two extern "C" entry points that engine/backend.cpp finds with dlsym.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "kernels/memory_plan.h"
#include "kernels/sampling.h"

namespace moescope::cuda {

struct CudaOptions {
    WeightDtype dtype = WeightDtype::BF16;
    // With dtype BF16: a model loaded from an FP8 checkpoint keeps its quantized linear weights in
    // FP8 (the plan becomes FP8). false: dequantized to BF16 like any other checkpoint.
    bool keep_fp8 = true;
    // MOESCOPE_CUDA_WEIGHTS=f32|bf16|fp8 in the environment overrides these (the dlopen path has
    // no other way to choose): bf16 forces BF16 even for FP8 checkpoints (strict parity), fp8
    // quantizes any checkpoint with our own 128x128 scales (lossy; benchmarks).
    static CudaOptions from_env();
};

// The weight dtype the backend uses for `w` (nullptr: a synthetic model) under `o`.
WeightDtype resolve_dtype(const Weights* w, const CudaOptions& o);
bool is_fp8_checkpoint(const Weights& w);

// What the probe reports (also used by the extern "C" probe).
int probe_devices(std::string& name, std::string& error);

// The plan the backend would use for `model` on this device, and whether it fits.
MemoryPlan plan_for(const ModelConfig& cfg, const Weights* w, const CudaOptions& o, int capacity);

class CudaBackend : public Backend {
public:
    // A real model (weights uploaded from model->weights()).
    CudaBackend(std::shared_ptr<Model> model, int capacity, const CudaOptions& o);
    // A synthetic model of `cfg` with random weights generated on the device (benchmarks).
    CudaBackend(const ModelConfig& cfg, int capacity, const CudaOptions& o, uint64_t seed);
    ~CudaBackend() override;

    std::string name() const override;
    const ModelConfig& config() const override;
    std::unique_ptr<BackendCache> new_cache(int mtp_module, int capacity) override;
    void forward(const int* tokens, int T, BackendCache& cache, const ForwardOptions& opt,
                 ForwardResult& out) override;
    void forward_mtp(int k, const float* h_prev, const int* next_tokens, int T, BackendCache& cache,
                     const ForwardOptions& opt, ForwardResult& out) override;
    std::vector<float> bias(int layer) const override;
    void set_bias(int layer, const std::vector<float>& b) override;
    void reset_bias() override;
    std::vector<uint8_t> disabled_experts(int layer) const override;
    void set_disabled_experts(int layer, const std::vector<uint8_t>& disabled) override;
    int drop_top_experts(int layer) const override;
    void set_drop_top_experts(int layer, int drop_top) override;
    bool can_pick() const override { return true; }
    std::vector<TokenPick> pick(const PickParams& p, const std::vector<float>& u) override;

    // Telemetry kept beside the ForwardResult: tokens per expert of the last forward, per MoE
    // layer in the order of ForwardResult::routing ([moe layers][E]).
    const std::vector<std::vector<int>>& last_loads() const;
    // Telemetry on/off (routing, loads, norms copies): the benchmark measures its cost.
    void set_telemetry(bool on);
    const MemoryPlan& plan() const;
    std::string device_name() const;
    // The weight dtype in use; what the backend changed from its defaults and why: for FP8
    // what prefill uses (the self-check's result, a fallback's reason, weights re-quantized
    // lossily), and CUDA graphs turned off after a replay that differed from its launches.
    WeightDtype weight_dtype() const;
    std::string notice() const override;
    // Small absorbed steps (decode, MTP drafts, verification: up to 4 tokens) replayed from CUDA
    // graphs captured on first use, one per cache, stack and shape, each checked on its first
    // replay against the same kernels launched one by one. On by default; MOESCOPE_CUDA_GRAPH=0
    // in the environment turns them off.
    void set_graphs(bool on);
    bool graphs() const;
    // Programmatic dependent launch inside those graphs (sm_90): a kernel's blocks are scheduled
    // while its predecessor finishes and wait for it in their first statement. On by default on
    // sm_90; MOESCOPE_CUDA_PDL=0 turns it off, and so does an error of the graph API or a replay
    // that differed from its launches (then the graphs are captured again without it; notice()
    // says why). Changing it drops the captured graphs. programmatic_edges(): made so far.
    void set_programmatic_launches(bool on);
    bool programmatic_launches() const;
    int64_t programmatic_edges() const;
    // Prefill of BF16 and FP8 experts: the grouped GEMM (one launch per layer and matrix, offsets
    // read on the device) once its self-check against the grouped GEMV passed on this device;
    // otherwise (or MOESCOPE_CUDA_GROUPED=0, or F32 experts) the per-expert loop, with the reason
    // in notice().
    bool grouped_experts() const;
    // The self-check's worst case when it passed; why the grouped GEMM is off otherwise.
    std::string grouped_report() const;
    // Benchmarks: the per-expert loop (false), or the grouped GEMM again when it passed.
    void set_grouped_experts(bool on);
    // Waits for the device (benchmark timing).
    void synchronize();
    // Where a step's device time goes (gpu-bench): the step launched kernel by kernel behind a
    // busy wait of `busy_iters` iterations (long enough for the host to enqueue all of it, so the
    // events time the device, not the launches), an event after each op, the microseconds between
    // events summed per op over the layers, in order of first appearance. Graphs are off for it.
    std::vector<std::pair<std::string, double>> profile_step(const int* tokens, int T, BackendCache& cache,
                                                             const ForwardOptions& opt, int64_t busy_iters);
    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

}  // namespace moescope::cuda

extern "C" {
int moescope_cuda_probe(char* name, size_t name_len, char* err, size_t err_len);
moescope::Backend* moescope_cuda_create_backend(std::shared_ptr<moescope::Model>* model, int capacity, char* err,
                                                size_t err_len);
// gpu-bench: runs the synthetic benchmark described by `request_json` ({"config": "synthetic-v2-lite" |
// a config.json path, "prompt": N, "decode": N, ...}); writes the JSON report into out.
// Returns 0 on success; otherwise writes err and returns non-zero.
int moescope_cuda_bench(const char* request_json, char* out, size_t out_len, char* err, size_t err_len);
}
