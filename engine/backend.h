// Backend: where the model runs. The CPU backend wraps the reference Model; the CUDA backend
// (kernels/, a shared library loaded with dlopen only when a device is present) keeps
// weights, the latent cache and routing on the GPU. Both compute the same numbers.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/model/model.h"

namespace moescope {

// A latent cache owned by a backend (host memory for the CPU, device memory for CUDA).
class BackendCache {
public:
    virtual ~BackendCache() = default;
    virtual int length() const = 0;          // positions held
    virtual int capacity() const = 0;        // positions it can hold
    virtual void truncate(int n) = 0;        // keep the first n positions
    // Copies the cached latent c [n, d_c] and k_pe [n, d_rope] of positions [begin, end) of
    // layer `layer` (0 for an MTP module's cache) into host buffers.
    virtual void read_latent(int layer, int begin, int end, float* c, float* k_pe) const = 0;
};

// Choosing tokens on the backend itself, from the logits of its last forward / forward_mtp
// call, so that a device backend can leave them on the device (ForwardOptions::host_logits
// false) and only ids cross to the host. The distribution is sample_token's without penalties
// or min-p: greedy (argmax, ties to the lower id), or softmax(logits / temperature) filtered by
// top-k, then top-p (thresholds, ties kept whole), drawn by walking the kept tokens in id order.
struct PickParams {
    float temperature = 0.0f;  // <= 0: greedy
    int top_k = 0;             // 0: off
    float top_p = 1.0f;        // >= 1: off
};
struct TokenPick {
    int id = 0;
    float logprob = 0.0f;      // ln p(id) under the row's unfiltered softmax (for surprisal)
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;    // "cpu", "cuda (NVIDIA H200)"
    virtual const ModelConfig& config() const = 0;
    // mtp_module 0: the main model's cache; k >= 1: MTP module k's. capacity in positions.
    virtual std::unique_ptr<BackendCache> new_cache(int mtp_module, int capacity) = 0;
    // Same contracts as Model::forward / Model::forward_mtp.
    virtual void forward(const int* tokens, int T, BackendCache& cache, const ForwardOptions& opt,
                         ForwardResult& out) = 0;
    virtual void forward_mtp(int k, const float* h_prev, const int* next_tokens, int T, BackendCache& cache,
                             const ForwardOptions& opt, ForwardResult& out) = 0;
    // Router bias of decoder layer l (MTP module k: num_hidden_layers + k - 1).
    virtual std::vector<float> bias(int layer) const = 0;
    virtual void set_bias(int layer, const std::vector<float>& b) = 0;
    virtual void reset_bias() = 0;
    // Experts switched off for an ablation (Model::set_disabled_experts' contract).
    virtual std::vector<uint8_t> disabled_experts(int layer) const = 0;
    virtual void set_disabled_experts(int layer, const std::vector<uint8_t>& disabled) = 0;
    // Each token's highest-ranked experts switched off for it (Model::set_drop_top_experts).
    virtual int drop_top_experts(int layer) const = 0;
    virtual void set_drop_top_experts(int layer, int drop_top) = 0;
    // What the backend changed from its defaults and why (e.g. a GPU path it turned off after a
    // self-check); empty when nothing. May change as the backend runs.
    virtual std::string notice() const { return ""; }
    // Whether pick() works; when it does not, the caller samples the host logits.
    virtual bool can_pick() const { return false; }
    // One token from every logits row of the last forward / forward_mtp call. u: one uniform in
    // [0, 1) per row (ignored when greedy).
    virtual std::vector<TokenPick> pick(const PickParams& p, const std::vector<float>& u);
};

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<Model> model);

// Every layer's ablation as a backend holds it, indexed by stack layer (decoder layers, then MTP
// modules): the expert mask ([E], empty: none switched off) and drop_top (0 for dense layers).
struct Ablation {
    std::vector<std::vector<uint8_t>> masks;
    std::vector<int> drop_top;
};
Ablation current_ablation(const Backend& b);
// Puts `a` on the backend, all or nothing: every layer's new state is checked first
// (check_moe_layer for a layer given experts to switch off, check_disabled_experts), then each
// MoE layer's drop_top is set to 0 before its mask and to its value after, so that no step in
// between is refused.
void set_ablation(Backend& b, const Ablation& a);

struct BackendSelection {
    std::unique_ptr<Backend> backend;
    std::string notice;  // why this backend (e.g. "no CUDA device: running on the CPU")
};

// request: "cpu", "cuda" or "auto". "cuda" throws DeviceError when it cannot run; "auto"
// falls back to the CPU and says why in `notice`.
BackendSelection select_backend(const std::string& request, std::shared_ptr<Model> model, int capacity);

// What the CUDA library reports about the machine, without creating a backend.
struct CudaProbe {
    bool library_found = false;  // libmoescope_cuda.so could be loaded
    int device_count = 0;
    std::string device_name;
    std::string error;           // why no device can be used
};
CudaProbe probe_cuda();

}  // namespace moescope
