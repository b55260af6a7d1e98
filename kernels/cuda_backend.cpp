// The CUDA backend: three arenas (weights, caches, activations), the layer loop of
// engine/model/model.cpp expressed in device kernels, and the extern "C" entry points.
#include "kernels/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <iterator>

#include "engine/dtype.h"
#include "engine/errors.h"
#include "engine/model/moe.h"
#include "engine/model/rope.h"
#include "kernels/common.h"
#include "kernels/dispatch.h"
#include "kernels/embedding.h"
#include "kernels/gemm.h"
#include "kernels/mla.h"
#include "kernels/norm.h"
#include "kernels/router.h"

namespace moescope::cuda {

CudaOptions CudaOptions::from_env() {
    CudaOptions o;
    if (const char* e = std::getenv("MOESCOPE_CUDA_WEIGHTS")) {
        const std::string v = e;
        if (v == "f32") o.dtype = WeightDtype::F32;
        else if (v == "bf16") o.keep_fp8 = false;  // strict: FP8 checkpoints dequantized to BF16 too
        else if (v == "fp8") o.dtype = WeightDtype::FP8;
        else throw ConfigError("MOESCOPE_CUDA_WEIGHTS='" + v + "': expected f32, bf16 or fp8");
    }
    return o;
}

int probe_devices(std::string& name, std::string& error) {
    int n = 0;  // left unwritten when the driver is missing
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        error = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
        if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice)
            error += e == cudaErrorNoDevice ? " (no CUDA device on this machine)" : " (no NVIDIA driver on this machine)";
        cudaGetLastError();
        return 0;
    }
    if (n > 0) {
        cudaDeviceProp p{};
        if (cudaGetDeviceProperties(&p, 0) == cudaSuccess) name = p.name;
    } else {
        error = "no CUDA device is present";
    }
    return n;
}

namespace {

ModelPresence presence_of(const ModelConfig& cfg, const Weights* w) {
    ModelPresence p;
    if (!w) return p;  // synthetic: lm_head present, no MTP copies
    p.lm_head = !w->lm_head.empty();
    p.mtp_embed = !w->mtp.empty() && !w->mtp[0].embed_tokens.empty();
    p.mtp_head = !w->mtp.empty() && !w->mtp[0].shared_head_head.empty();
    (void)cfg;
    return p;
}

// One cudaMalloc carved into 256-byte aligned buffers (llm.c's one allocation per lifetime).
class DeviceArena {
public:
    DeviceArena() = default;
    DeviceArena(int64_t bytes, const char* what) : size_(bytes) {
        if (bytes <= 0) return;
        const cudaError_t e = cudaMalloc(&base_, size_t(bytes));
        if (e != cudaSuccess) {
            // cudaMalloc's error is also the runtime's "last error": left there, the next
            // check_launch (cudaGetLastError) would blame an unrelated kernel for it.
            cudaGetLastError();
            base_ = nullptr;
            throw DeviceError(std::string(what) + " of " + gib(bytes) + ": " + cudaGetErrorName(e) + " (" +
                              cudaGetErrorString(e) + ")");
        }
    }
    ~DeviceArena() {
        if (base_) cudaFree(base_);
    }
    DeviceArena(const DeviceArena&) = delete;
    DeviceArena& operator=(const DeviceArena&) = delete;
    DeviceArena(DeviceArena&& o) noexcept { *this = std::move(o); }
    DeviceArena& operator=(DeviceArena&& o) noexcept {
        std::swap(base_, o.base_);
        std::swap(size_, o.size_);
        std::swap(used_, o.used_);
        return *this;
    }
    template <class T>
    T* carve(int64_t count) {
        const int64_t bytes = align_up(std::max<int64_t>(1, count) * int64_t(sizeof(T)));
        if (used_ + bytes > size_)
            throw DeviceError("device arena overflow: " + std::to_string(used_ + bytes) + " bytes needed, " +
                              std::to_string(size_) + " planned");
        T* p = reinterpret_cast<T*>(static_cast<char*>(base_) + used_);
        used_ += bytes;
        return p;
    }
    int64_t used() const { return used_; }

private:
    void* base_ = nullptr;
    int64_t size_ = 0, used_ = 0;
};

// Bytes of a DeviceArena that carves buffers of these sizes (in bytes), each aligned.
int64_t arena_bytes(std::initializer_list<int64_t> sizes) {
    int64_t b = 0;
    for (int64_t n : sizes) b += align_up(std::max<int64_t>(1, n));
    return b;
}

// n values uniform in [-1, 1) from a 64-bit LCG: the seeded inputs of the load-time self-checks.
std::vector<float> lcg_uniform(size_t n, uint64_t seed) {
    std::vector<float> v(n);
    for (auto& x : v) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x = float(seed >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
    }
    return v;
}

// How far a self-check's result is from its reference: the relative L2 error of the whole
// output, and the worst element against the reference's rms; a non-finite result is infinitely
// far.
struct OutputError {
    double rel = 0, worst_over_rms = 0;
};
OutputError output_error(const std::vector<float>& got, const std::vector<float>& ref) {
    double num = 0, den = 0, worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double d = std::isfinite(got[i]) ? std::fabs(double(got[i]) - ref[i]) : INFINITY;
        num += d * d;
        den += double(ref[i]) * ref[i];
        worst = std::max(worst, d);
    }
    const double rms = std::sqrt(den / double(std::max<size_t>(1, got.size())));
    return {den > 0 ? std::sqrt(num / den) : (num > 0 ? INFINITY : 0.0),
            rms > 0 ? worst / rms : (worst > 0 ? INFINITY : 0.0)};
}

void ensure_free(int64_t need, const std::string& what) {
    size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    if (need + (64ll << 20) > int64_t(free_b))
        throw DeviceError(what + " needs " + gib(need) + " of device memory but only " + gib(int64_t(free_b)) +
                          " of " + gib(int64_t(total_b)) + " are free");
}

class CudaCache : public BackendCache {
public:
    CudaCache(const ModelConfig& cfg, int layers, int capacity)
        : cap_(capacity), d_c_(cfg.kv_lora_rank), d_rope_(cfg.qk_rope_head_dim) {
        const int64_t bytes = cache_bytes(cfg, layers, capacity);
        ensure_free(bytes, "a latent cache of " + std::to_string(capacity) + " positions");
        arena_ = DeviceArena(bytes, "cudaMalloc (latent cache)");
        for (int l = 0; l < layers; ++l) c_.push_back(arena_.carve<float>(int64_t(capacity) * d_c_));
        for (int l = 0; l < layers; ++l) kpe_.push_back(arena_.carve<float>(int64_t(capacity) * d_rope_));
    }
    int length() const override { return length_; }
    int capacity() const override { return cap_; }
    void truncate(int n) override { length_ = std::clamp(n, 0, length_); }
    void read_latent(int layer, int begin, int end, float* c, float* k_pe) const override {
        if (layer < 0 || layer >= int(c_.size())) throw Error("read_latent: layer out of range");
        if (begin < 0 || end > length_ || begin > end) throw Error("read_latent: positions out of range");
        if (c)
            check(cudaMemcpy(c, c_[size_t(layer)] + int64_t(begin) * d_c_, sizeof(float) * size_t(end - begin) * d_c_,
                             cudaMemcpyDeviceToHost),
                  "read_latent (c)");
        if (k_pe)
            check(cudaMemcpy(k_pe, kpe_[size_t(layer)] + int64_t(begin) * d_rope_,
                             sizeof(float) * size_t(end - begin) * d_rope_, cudaMemcpyDeviceToHost),
                  "read_latent (k_pe)");
    }
    int length_ = 0;
    int cap_;
    int d_c_, d_rope_;
    DeviceArena arena_;
    std::vector<float*> c_, kpe_;  // per layer [capacity, d_c], [capacity, d_rope]
};

struct DLayer {
    bool moe = false;
    const float *in_norm = nullptr, *post_norm = nullptr, *q_a_norm = nullptr, *kv_a_norm = nullptr;
    WRef q_a, q_b, q_proj, kv_a, kv_b, o_proj;
    WRef mlp_gu, mlp_down;            // dense: [2I, D], [D, I]
    WRef router;                      // [E, D] f32
    WRef shared_gu, shared_down;
    std::vector<const void*> exp_gu, exp_down;   // host copies of the expert pointers
    const void** exp_gu_dev = nullptr;           // device [E]
    const void** exp_down_dev = nullptr;
    float* bias = nullptr;            // device [E] (the router bias in use)
    uint8_t* disabled = nullptr;      // device [E + 1]: the ablation's mask (1: switched off), then
                                      // drop_top; always there, so captured graphs see a change
};

struct DMtp {
    const float *enorm = nullptr, *hnorm = nullptr, *head_norm = nullptr;
    WRef eh, embed, head;
};

// A pinned host buffer.
struct Pinned {
    void* p = nullptr;
    size_t bytes = 0;
    void reserve(size_t n) {
        if (n <= bytes) return;
        if (p) cudaFreeHost(p);
        p = nullptr;
        bytes = 0;  // a failed allocation must not leave a size that a later reserve trusts
        const cudaError_t e = cudaMallocHost(&p, n);
        if (e != cudaSuccess) {
            cudaGetLastError();
            p = nullptr;
            check(e, "cudaMallocHost");
        }
        bytes = n;
    }
    ~Pinned() {
        if (p) cudaFreeHost(p);
    }
};

}  // namespace

bool is_fp8_checkpoint(const Weights& w) {
    return !w.layers.empty() && !w.layers[0].attn.kv_a_proj_with_mqa.block_scale.empty();
}

WeightDtype resolve_dtype(const Weights* w, const CudaOptions& o) {
    if (o.dtype == WeightDtype::BF16 && o.keep_fp8 && w && is_fp8_checkpoint(*w)) return WeightDtype::FP8;
    return o.dtype;
}

MemoryPlan plan_for(const ModelConfig& cfg, const Weights* w, const CudaOptions& o, int capacity) {
    return plan_memory(cfg, presence_of(cfg, w), resolve_dtype(w, o), capacity);
}

struct CudaBackend::Impl {
    std::shared_ptr<Model> model;  // null for a synthetic model
    ModelConfig cfg;
    CudaOptions opt;
    MemoryPlan plan;
    std::string device;
    cudaStream_t stream = nullptr;
    DeviceArena weights_arena, act_arena;
    std::unique_ptr<Gemm> gemm;
    Rope rope;
    RouterParams router{};
    MlaShape mla{};
    float* inv_freq = nullptr;  // device [d_rope / 2]
    WRef embed, head;
    const float* final_norm = nullptr;
    std::vector<DLayer> layers;  // main layers then one per MTP module
    std::vector<DMtp> mtp;
    bool telemetry = true;
    std::vector<std::vector<int>> last_loads;
    std::vector<std::vector<float>> bias_host;  // [layers + mtp][E] (empty for dense layers)
    std::vector<std::vector<uint8_t>> disabled_host;  // [layers + mtp][E or 0] (Model's contract)
    std::vector<int> drop_top_host;                   // [layers + mtp]

    // Activations for one chunk of Tc tokens: shape comments in rows of the chunk.
    int Tc = 0;
    int* ids = nullptr;            // [Tc]
    float *h, *xn, *y, *hidden, *cat;  // [Tc, D] (cat: [Tc, 2D])
    float *q, *qa, *kv;            // [Tc, H*dq], [Tc, q_lora], [Tc, d_c + d_rope]
    float *q_lat, *o_lat, *partial, *attn_out;  // [Tc, H, d_c] x2, [rows, d_c + 2], [Tc, H*d_v]
    float *kvb_full, *scores;      // naive: [Sn, H*(dn+dv)], [H, Tc, Sn]
    OneGroupScratch naive_kvb;     // naive: an FP8 kv_b(c) through the grouped GEMM
    float *logits_r, *scores_scratch;  // router logits / scores [Tc, E]
    int *counts, *offsets, *perm, *row_of_slot, *row_expert;  // [E], [E+1], [Tc*k] x3
    int2* tile_map = nullptr;      // [grouped_max_tiles(Tc*k, E)] tiles of the grouped expert GEMM
    float *xin, *gu, *act, *ye, *sh_out, *sh_gu, *sh_act;  // experts and shared / dense MLP
    float* logits;                 // [Tc, V]
    float* sample_u = nullptr;     // [Tc]
    int* sample_ids = nullptr;     // [Tc]
    float* sample_logprob = nullptr;  // [Tc]
    int last_rows = 0;             // rows of `logits` the last forward produced
    bool last_rows_complete = false;  // and they are every row it returned (one chunk)
    int* d_start = nullptr;        // [1] decode position for graph replays
    const int* dyn_start = nullptr;  // set while enqueuing a graph body: kernels read the position here
    Pinned pin_start;
    // CUDA graphs replay the absorbed steps of at most kGraphRows tokens (decode, MTP drafts,
    // verification), one graph per cache, stack and shape. A new graph's first replay is checked
    // against the same kernels launched one by one; a difference turns graphs off (graph_notice).
    static constexpr int kGraphRows = 4;
    bool use_graphs = true;
    std::string graph_notice;
    // Programmatic dependent launch in those graphs (sm_90; make_programmatic): on unless the
    // device is older, MOESCOPE_CUDA_PDL=0, or the graph API refused it (pdl_notice).
    bool pdl_capable = false;  // sm_90 or newer
    bool use_pdl = false;
    int64_t pdl_edges = 0;  // programmatic edges made so far
    std::string pdl_notice;
    // The decode profile (profile_step): with `profile` set, mark(op) records an event after each
    // op of a launched step, named after the op; null otherwise (a test of one pointer).
    std::vector<std::pair<const char*, cudaEvent_t>>* profile = nullptr;
    int64_t profile_busy = 0;  // iterations of the busy wait before each profiled chunk
    void mark(const char* op) {
        if (!profile) return;
        cudaEvent_t e = nullptr;
        check(cudaEventCreate(&e), "cudaEventCreate (profile)");
        profile->push_back({op, e});
        check(cudaEventRecord(e, stream), "cudaEventRecord (profile)");
    }
    struct GraphEntry {
        const float *c0, *kpe0;    // the cache's first buffers: same pointers = same layout
        int layers, cap, first, n, head_rows;
        bool telemetry, want_scores, host_logits;
        cudaGraphExec_t exec;
        bool verified;
    };
    std::vector<GraphEntry> graphs;
    void* cast = nullptr;          // bf16 staging for cuBLAS
    char* tele = nullptr;          // telemetry block of a chunk (layout in TeleLayout)
    int64_t tele_bytes = 0;
    Pinned pin_tele, pin_out, pin_ids, pin_offsets;

    ~Impl() {
        for (auto& g : graphs) cudaGraphExecDestroy(g.exec);
        if (stream) {
            cudaStreamSynchronize(stream);
            gemm.reset();
            cudaStreamDestroy(stream);
        }
    }

    int n_moe(int first, int count) const {
        int n = 0;
        for (int l = first; l < first + count; ++l) n += layers[size_t(l)].moe;
        return n;
    }

    // The host's mask and drop_top of an MoE layer into its device ablation buffer,
    // stream-ordered and waited for (the next forward sees them; graphs read the buffer).
    void upload_ablation(int layer) {
        const int E = cfg.n_routed_experts;
        std::vector<uint8_t> dev = disabled_host[size_t(layer)];
        dev.resize(size_t(E), 0);
        dev.push_back(uint8_t(drop_top_host[size_t(layer)]));
        check(cudaMemcpyAsync(layers[size_t(layer)].disabled, dev.data(), dev.size(), cudaMemcpyHostToDevice, stream),
              "upload expert mask");
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (expert mask)");
    }

    void init_common(const ModelConfig& c, int capacity) {
        cfg = c;
        rope = Rope(cfg);
        RouterDims rd(cfg);
        router = RouterParams{rd.E, rd.k, rd.n_group, rd.topk_group, rd.sigmoid, rd.use_bias, rd.norm_topk_prob,
                              rd.method == RouterDims::Method::Greedy         ? 0
                              : rd.method == RouterDims::Method::GroupLimited ? 1
                                                                              : 2,
                              rd.routed_scaling_factor};
        mla = MlaShape{cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                       cfg.kv_lora_rank, float(cfg.softmax_scale())};
        std::string err;
        if (probe_devices(device, err) <= 0) throw DeviceError("no CUDA device: " + err);
        check(cudaSetDevice(0), "cudaSetDevice");
        size_t free_b = 0, total_b = 0;
        check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
        // Refuse BEFORE allocating anything: the caches of the plan are allocated later, by new_cache.
        check_fits(plan, int64_t(free_b), int64_t(total_b), device, opt.dtype, capacity);
        check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        weights_arena = DeviceArena(plan.weights, "cudaMalloc (weights)");
    }

    // Carves every device tensor of the plan; `fill` writes each one.
    void build_weights(const std::function<void(const TensorSpec&, void*)>& fill) {
        const ModelPresence pres = model ? presence_of(cfg, &model->weights()) : ModelPresence{};
        const int L = cfg.num_hidden_layers, Lt = L + cfg.num_nextn_predict_layers;
        layers.assign(size_t(Lt), DLayer{});
        mtp.assign(size_t(cfg.num_nextn_predict_layers), DMtp{});
        const bool bf16 = opt.dtype != WeightDtype::F32;  // FP8 plans keep their other matrices in BF16
        for (const TensorSpec& t : device_tensors(cfg, pres)) {
            void* p = weights_arena.carve<char>(t.bytes(opt.dtype));
            fill(t, p);
            const WRef r = t.stored_fp8(opt.dtype) ? fp8_ref(p, t.rows, t.cols, t.split)
                                                   : WRef{p, t.big && bf16, t.rows, t.cols};
            const float* f = static_cast<const float*>(p);
            DLayer* Lw = t.layer >= 0 ? &layers[size_t(t.layer)] : nullptr;
            DMtp* M = t.layer >= L ? &mtp[size_t(t.layer - L)] : nullptr;
            switch (t.role) {
                case Role::Embed: embed = r; break;
                case Role::FinalNorm: final_norm = f; break;
                case Role::Head: head = r; break;
                case Role::InNorm: Lw->in_norm = f; break;
                case Role::PostNorm: Lw->post_norm = f; break;
                case Role::QA: Lw->q_a = r; break;
                case Role::QANorm: Lw->q_a_norm = f; break;
                case Role::QB: Lw->q_b = r; break;
                case Role::QProj: Lw->q_proj = r; break;
                case Role::KVA: Lw->kv_a = r; break;
                case Role::KVANorm: Lw->kv_a_norm = f; break;
                case Role::KVB: Lw->kv_b = r; break;
                case Role::OProj: Lw->o_proj = r; break;
                case Role::MlpGateUp: Lw->mlp_gu = r; break;
                case Role::MlpDown: Lw->mlp_down = r; break;
                case Role::Router: Lw->router = r; Lw->moe = true; break;
                case Role::ExpGateUp: Lw->exp_gu.push_back(p); break;
                case Role::ExpDown: Lw->exp_down.push_back(p); break;
                case Role::SharedGateUp: Lw->shared_gu = r; break;
                case Role::SharedDown: Lw->shared_down = r; break;
                case Role::MtpENorm: M->enorm = f; break;
                case Role::MtpHNorm: M->hnorm = f; break;
                case Role::MtpEh: M->eh = r; break;
                case Role::MtpEmbed: M->embed = r; break;
                case Role::MtpHeadNorm: M->head_norm = f; break;
                case Role::MtpHead: M->head = r; break;
            }
        }
        if (head.empty()) head = embed;  // tied
        for (auto& m : mtp) {
            if (m.embed.empty()) m.embed = embed;
            if (m.head.empty()) m.head = head;
        }
        // Expert pointer tables, router biases, the rope frequencies: small, in the same arena.
        bias_host.assign(size_t(Lt), {});
        disabled_host.assign(size_t(Lt), {});
        drop_top_host.assign(size_t(Lt), 0);
        for (int l = 0; l < Lt; ++l) {
            DLayer& d = layers[size_t(l)];
            if (!d.moe) continue;
            const int E = cfg.n_routed_experts;
            d.exp_gu_dev = weights_arena.carve<const void*>(E);
            d.exp_down_dev = weights_arena.carve<const void*>(E);
            check(cudaMemcpy(d.exp_gu_dev, d.exp_gu.data(), sizeof(void*) * size_t(E), cudaMemcpyHostToDevice),
                  "upload expert table");
            check(cudaMemcpy(d.exp_down_dev, d.exp_down.data(), sizeof(void*) * size_t(E), cudaMemcpyHostToDevice),
                  "upload expert table");
            d.bias = weights_arena.carve<float>(E);
            bias_host[size_t(l)] = model ? model->bias(l) : std::vector<float>(size_t(E), 0.0f);
            check(cudaMemcpy(d.bias, bias_host[size_t(l)].data(), sizeof(float) * size_t(E), cudaMemcpyHostToDevice),
                  "upload router bias");
            d.disabled = weights_arena.carve<uint8_t>(E + 1);
            if (model) {
                disabled_host[size_t(l)] = model->disabled_experts(l);
                drop_top_host[size_t(l)] = model->drop_top_experts(l);
            }
            upload_ablation(l);
        }
        inv_freq = weights_arena.carve<float>(int64_t(rope.inv_freq.size()));
        check(cudaMemcpy(inv_freq, rope.inv_freq.data(), sizeof(float) * rope.inv_freq.size(), cudaMemcpyHostToDevice),
              "upload inv_freq");
    }

    void build_activations() {
        const ActivationDims& a = plan.dims;
        act_arena = DeviceArena(plan.activations, "cudaMalloc (activations)");
        const int64_t T = a.chunk, D = cfg.hidden_size, H = cfg.num_attention_heads, dq = cfg.qk_head_dim(),
                      dc = cfg.kv_lora_rank, dr = cfg.qk_rope_head_dim, dv = cfg.v_head_dim,
                      dn = cfg.qk_nope_head_dim, V = cfg.vocab_size, E = std::max(1, cfg.n_routed_experts),
                      k = std::max(1, cfg.num_experts_per_tok), I = cfg.moe_intermediate_size,
                      Is = int64_t(cfg.moe_intermediate_size) * std::max(1, cfg.n_shared_experts),
                      Id = cfg.intermediate_size, Sn = a.naive_positions;
        Tc = a.chunk;
        ids = act_arena.carve<int>(T);
        h = act_arena.carve<float>(T * D);
        xn = act_arena.carve<float>(T * D);
        y = act_arena.carve<float>(T * D);
        hidden = act_arena.carve<float>(T * D);
        cat = act_arena.carve<float>(T * 2 * D);
        q = act_arena.carve<float>(T * H * dq);
        qa = act_arena.carve<float>(T * std::max<int64_t>(1, cfg.q_lora_rank));
        kv = act_arena.carve<float>(T * (dc + dr));
        q_lat = act_arena.carve<float>(T * H * dc);
        o_lat = act_arena.carve<float>(T * H * dc);
        partial = act_arena.carve<float>(attention_partial_rows(cfg, a) * (dc + 2));
        attn_out = act_arena.carve<float>(T * H * dv);
        kvb_full = act_arena.carve<float>(Sn * H * (dn + dv));
        scores = act_arena.carve<float>(H * T * Sn);
        naive_kvb.table = act_arena.carve<const void*>(1);
        naive_kvb.offsets = act_arena.carve<int>(2);
        naive_kvb.max_tiles = grouped_max_tiles(Sn, 1);
        naive_kvb.map = act_arena.carve<int2>(naive_kvb.max_tiles);
        logits_r = act_arena.carve<float>(T * E);
        scores_scratch = act_arena.carve<float>(T * E);
        counts = act_arena.carve<int>(E);
        offsets = act_arena.carve<int>(E + 1);
        tile_map = act_arena.carve<int2>(grouped_max_tiles(T * k, E));
        perm = act_arena.carve<int>(T * k);
        row_of_slot = act_arena.carve<int>(T * k);
        row_expert = act_arena.carve<int>(T * k);
        xin = act_arena.carve<float>(T * k * D);
        gu = act_arena.carve<float>(T * k * 2 * I);
        act = act_arena.carve<float>(T * k * I);
        ye = act_arena.carve<float>(T * k * D);
        sh_out = act_arena.carve<float>(T * D);
        sh_gu = act_arena.carve<float>(T * 2 * std::max(Is, Id));
        sh_act = act_arena.carve<float>(T * std::max(Is, Id));
        logits = act_arena.carve<float>(T * V);
        sample_u = act_arena.carve<float>(T);
        sample_ids = act_arena.carve<int>(T);
        sample_logprob = act_arena.carve<float>(T);
        d_start = act_arena.carve<int>(1);
        pin_start.reserve(sizeof(int));
        if (const char* g = std::getenv("MOESCOPE_CUDA_GRAPH")) use_graphs = std::string(g) != "0";
        cudaDeviceProp prop{};
        pdl_capable = cudaGetDeviceProperties(&prop, 0) == cudaSuccess && prop.major >= 9;
        use_pdl = pdl_capable;
        if (const char* e = std::getenv("MOESCOPE_CUDA_PDL")) use_pdl = use_pdl && std::string(e) != "0";
        const int64_t cast_elems = std::max({T * 2 * D, T * std::max<int64_t>(1, cfg.q_lora_rank), T * H * dv,
                                             T * k * I, T * k * D, T * std::max(Is, Id), Sn * dc, T * D});
        cast = act_arena.carve<uint16_t>(cast_elems);
        tele_bytes = telemetry_bytes(cfg, a);
        tele = act_arena.carve<char>(tele_bytes);
        void* ws = act_arena.carve<char>(kCublasWorkspace);
        gemm = std::make_unique<Gemm>(stream, ws, size_t(kCublasWorkspace), cast, cast_elems);
        if (opt.dtype == WeightDtype::FP8) {
            const Fp8ScratchSizes z = fp8_scratch_sizes(cfg, a, opt.dtype);
            Fp8Scratch f;
            f.rows = z.rows_pad;
            f.max_k = z.max_k;
            f.max_out = z.max_out;
            f.act_q = act_arena.carve<uint8_t>(int64_t(z.rows_pad) * z.max_k);
            f.act_scale = act_arena.carve<float>(fp8_cdiv(z.max_k, kFp8Block) * z.rows_pad);
            f.out = act_arena.carve<float>(int64_t(z.rows_pad) * z.max_out);
            f.dequant = act_arena.carve<char>(kFp8DequantBytes);
            f.dequant_elems = kFp8DequantBytes / 2;
            gemm->set_fp8_scratch(f);
        }
        pin_out.reserve(sizeof(float) * size_t(T) * size_t(2 * D + V));
        pin_tele.reserve(size_t(tele_bytes));
        pin_ids.reserve(sizeof(int) * size_t(T));
        pin_offsets.reserve(sizeof(int) * size_t(E + 1));
    }

    // One decoder layer (deepseek-v3.md 2): h[n, D] in place at positions start.., cache layer l.
    void layer_forward(const DLayer& L, int n, int start, float* cache_c, float* cache_kpe, const ForwardOptions& o,
                       const TeleLayout& tl, int moe_slot, int norm_slot) {
        const int D = cfg.hidden_size, H = mla.H, dq = mla.d_nope + mla.d_rope, S = start + n;
        const float eps = float(cfg.rms_norm_eps);
        cudaStream_t s = stream;
        // h = x + Attn(RMSNorm_in(x))
        rmsnorm(xn, h, L.in_norm, n, D, eps, s);
        mark("rmsnorm");
        if (cfg.q_lora_rank > 0) {
            gemm->linear(qa, xn, L.q_a, n);
            rmsnorm(qa, qa, L.q_a_norm, n, cfg.q_lora_rank, 1e-6f, s);
            gemm->linear(q, qa, L.q_b, n);
        } else {
            gemm->linear(q, xn, L.q_proj, n);
        }
        mark("q projection");
        gemm->linear(kv, xn, L.kv_a, n);
        mark("kv_a projection");
        // Telemetry: the norms of the new cached latents, written by the append.
        float* norms = telemetry ? reinterpret_cast<float*>(tele + tl.norms) + int64_t(norm_slot) * n : nullptr;
        latent_append(cache_c, cache_kpe, kv, L.kv_a_norm, n, start, mla, inv_freq, rope.mscale, s, dyn_start, norms,
                      q);
        mark("latent append + rope");
        if (!dyn_start && !o.absorbed && S <= plan.dims.naive_positions) {
            const int dkvb = mla.d_nope + mla.d_v;
            // [S, H*(dn+dv)]. An FP8 kv_b goes through the grouped GEMM (verified on this device
            // by its self-check), which keeps the CPU's weights and f32-accurate latents: every key
            // and value of the prompt comes from this product, and cuBLASLt's e4m3 latents or the
            // fallback's bf16 weights would round them all.
            if (L.kv_b.fp8() && grouped_ok) {
                gemm_fp8_exact(kvb_full, cache_c, L.kv_b, S, naive_kvb, s);
            } else {
                const int step = L.kv_b.fp8() ? plan.dims.chunk : S;  // the FP8 activation scratch's rows
                for (int r0 = 0; r0 < S; r0 += step)
                    gemm->linear(kvb_full + int64_t(r0) * H * dkvb, cache_c + int64_t(r0) * mla.d_c, L.kv_b,
                                 std::min(step, S - r0));
            }
            // scores_h[n, S] = q_nope_h k_nope_h^T + q_pe_h k_pe^T
            gemm->batched_rowmajor(scores, q, kvb_full, n, S, mla.d_nope, H * dq, H * dkvb, S, dq, dkvb,
                                   int64_t(n) * S, H, true, 1.0f, 0.0f);
            gemm->batched_rowmajor(scores, q + mla.d_nope, cache_kpe, n, S, mla.d_rope, H * dq, mla.d_rope, S, dq, 0,
                                   int64_t(n) * S, H, true, 1.0f, 1.0f);
            causal_softmax(scores, H, n, S, start, mla.scale, s);
            // o_h[n, d_v] = P_h[n, S] V_h[S, d_v]
            gemm->batched_rowmajor(attn_out, scores, kvb_full + mla.d_nope, n, mla.d_v, S, S, H * dkvb, H * mla.d_v,
                                   int64_t(n) * S, dkvb, mla.d_v, H, false, 1.0f, 0.0f);
            mark("attention (naive)");
        } else {
            absorb_query(q_lat, q, L.kv_b, n, mla, s);
            mark("absorb query");
            // A graph replays one launch for every length, so its split count cannot follow the
            // sequence: it takes the most that n rows may use (empty splits are skipped). Like
            // attention_splits, n * splits <= max_splits: the partial buffer holds
            // H * max(max_splits, chunk) rows, so max_splits per row (n = 4 at a capacity below
            // 256) would write past it into the buffers carved after it, d_start included.
            const int splits = dyn_start ? std::max(1, plan.dims.max_splits / n)
                                         : attention_splits(n, S, plan.dims.max_splits);
            if (int64_t(n) * splits * H > attention_partial_rows(cfg, plan.dims))
                throw DeviceError("attention: " + std::to_string(n) + " rows x " + std::to_string(splits) +
                                  " splits exceed the partial buffer of " +
                                  std::to_string(attention_partial_rows(cfg, plan.dims)) + " rows");
            attention_absorbed(o_lat, partial, q_lat, q, cache_c, cache_kpe, n, start, splits, mla, s, dyn_start);
            mark("attention");
            project_values(attn_out, o_lat, L.kv_b, n, mla, s);
            mark("project values");
        }
        gemm->linear(h, attn_out, L.o_proj, n, /*accumulate=*/true);
        mark("o_proj");
        // out = h + FFN(RMSNorm_post(h))
        rmsnorm(xn, h, L.post_norm, n, D, eps, s);
        mark("rmsnorm");
        if (!L.moe) {
            gemm->linear_swiglu(sh_act, xn, L.mlp_gu, n, sh_gu);
            gemm->linear(h, sh_act, L.mlp_down, n, true);
            mark("dense MLP");
            return;
        }
        moe_forward(L, n, tl, moe_slot);
    }

    void moe_forward(const DLayer& L, int n, const TeleLayout& tl, int slot) {
        const int D = cfg.hidden_size, E = router.E, k = router.k, I = cfg.moe_intermediate_size, R = n * k;
        const int G = router.method != 0 ? router.n_group : 1;
        cudaStream_t s = stream;
        gemm->linear(logits_r, xn, L.router, n);
        mark("router logits");
        int* ids_d = reinterpret_cast<int*>(tele + tl.ids) + int64_t(slot) * n * k;
        float* w_d = reinterpret_cast<float*>(tele + tl.weights) + int64_t(slot) * n * k;
        uint8_t* kept_d = reinterpret_cast<uint8_t*>(tele + tl.kept) + int64_t(slot) * n * G;
        float* sc_d = tl.scores >= 0 ? reinterpret_cast<float*>(tele + tl.scores) + int64_t(slot) * n * E
                                     : scores_scratch;
        int* counts_d = reinterpret_cast<int*>(tele + tl.counts) + int64_t(slot) * E;
        const DispatchOut d{counts_d, offsets, perm, row_of_slot, row_expert};
        if (R <= 64 && route_dispatch_fits(n, router)) {  // decode: one launch
            route_and_dispatch(ids_d, w_d, sc_d, kept_d, logits_r, L.bias, L.disabled, L.disabled + E, n, router, d, s);
        } else {
            route(ids_d, w_d, sc_d, kept_d, logits_r, L.bias, L.disabled, L.disabled + E, n, router, s);
            dispatch(d, ids_d, n, k, E, s);
        }
        mark("route + dispatch");
        const bool bf16 = opt.dtype == WeightDtype::BF16, fp8 = opt.dtype == WeightDtype::FP8;
        if (R <= 64) {
            // Decode: every row names its expert; no host round trip (capturable in a graph). The
            // gate|up GEMV reads each row's token from xn through the permutation and ends in
            // the SwiGLU, so neither a gather nor a SwiGLU launch.
            const GemvRows gate_up{perm, k, true};
            if (fp8) grouped_gemv_fp8(act, xn, L.exp_gu_dev, row_expert, R, 2 * I, D, I, s, gate_up);
            else grouped_gemv(act, xn, L.exp_gu_dev, bf16, row_expert, R, 2 * I, D, s, gate_up);
            mark("experts gate|up");
            if (fp8) grouped_gemv_fp8(ye, act, L.exp_down_dev, row_expert, R, D, I, 0, s);
            else grouped_gemv(ye, act, L.exp_down_dev, bf16, row_expert, R, D, I, s);
            mark("experts down");
        } else if (grouped) {
            // Prefill, BF16 / FP8 experts: two grouped GEMMs over the device offsets, no host wait.
            gather_rows(xin, xn, perm, R, k, D, s);
            const int tiles = grouped_max_tiles(R, E);
            expert_tiles(tile_map, offsets, E, tiles, s);
            grouped_gemm(gu, xin, L.exp_gu_dev, tiles, 2 * I, D, I);
            swiglu(act, gu, R, I, s);
            grouped_gemm(ye, act, L.exp_down_dev, tiles, D, I, 0);
        } else {
            // Prefill: one cuBLAS GEMM per expert that received tokens.
            gather_rows(xin, xn, perm, R, k, D, s);
            int* off = static_cast<int*>(pin_offsets.p);
            check(cudaMemcpyAsync(off, offsets, sizeof(int) * size_t(E + 1), cudaMemcpyDeviceToHost, s),
                  "copy expert offsets");
            check(cudaStreamSynchronize(s), "cudaStreamSynchronize (expert offsets)");
            expert_gemms(gu, xin, L.exp_gu, off, 2 * I, D, I);
            swiglu(act, gu, R, I, s);
            expert_gemms(ye, act, L.exp_down, off, D, I, 0);
        }
        const float* shared = nullptr;
        if (!L.shared_gu.empty()) {
            gemm->linear_swiglu(sh_act, xn, L.shared_gu, n, sh_gu);
            gemm->linear(sh_out, sh_act, L.shared_down, n);
            shared = sh_out;
            mark("shared experts");
        }
        combine(h, shared, ye, ids_d, w_d, row_of_slot, n, k, D, s);
        mark("combine");
    }

    // The grouped expert GEMM over the offsets and tile map in place (split: FP8 gate rows).
    void grouped_gemm(float* y, const float* x, const void* const* ws, int tiles, int out, int in, int64_t split) {
        if (opt.dtype == WeightDtype::FP8) grouped_gemm_fp8(y, x, ws, offsets, tile_map, tiles, out, in, split, stream);
        else grouped_gemm_bf16(y, x, ws, offsets, tile_map, tiles, out, in, stream);
    }

    // y = each expert's rows x its [out, in] matrix, one product per expert with rows (off: host
    // offsets; split: the gate rows of a stacked FP8 gate|up).
    void expert_gemms(float* y, const float* x, const std::vector<const void*>& ws, const int* off, int out, int in,
                      int64_t split) {
        const bool bf16 = opt.dtype == WeightDtype::BF16, fp8 = opt.dtype == WeightDtype::FP8;
        for (size_t e = 0; e < ws.size(); ++e) {
            const int cnt = off[e + 1] - off[e];
            if (cnt == 0) continue;
            const WRef W = fp8 ? fp8_ref(ws[e], out, in, split) : WRef{ws[e], bf16, out, in};
            gemm->linear(y + int64_t(off[e]) * out, x + int64_t(off[e]) * in, W, cnt);
        }
    }

    // The graph of one absorbed step of `n` tokens through the stack starting at layer `first`
    // over `cache`, captured on first use (the position is read from d_start).
    GraphEntry& step_graph(CudaCache& cache, int first, int n, int head_rows, const ForwardOptions& o,
                           bool host_logits, const std::function<void()>& enqueue) {
        for (auto& g : graphs)
            if (g.c0 == cache.c_[0] && g.kpe0 == cache.kpe_[0] && g.layers == int(cache.c_.size()) &&
                g.cap == cache.cap_ && g.first == first && g.n == n && g.head_rows == head_rows &&
                g.telemetry == telemetry && g.want_scores == o.want_scores && g.host_logits == host_logits)
                return g;
        if (graphs.size() >= 16) {  // a bounded set: drop the oldest
            cudaGraphExecDestroy(graphs.front().exec);
            graphs.erase(graphs.begin());
        }
        cudaGraphExec_t exec = nullptr;
        for (;;) {
            cudaGraph_t graph = nullptr;
            check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
            dyn_start = d_start;
            try {
                enqueue();
            } catch (...) {
                dyn_start = nullptr;
                cudaStreamEndCapture(stream, &graph);
                if (graph) cudaGraphDestroy(graph);
                cudaGetLastError();
                throw;
            }
            dyn_start = nullptr;
            check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
            const int64_t edges_before = pdl_edges;
            try {
                if (use_pdl) make_programmatic(graph);
            } catch (...) {
                cudaGraphDestroy(graph);
                throw;
            }
            const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
            cudaGraphDestroy(graph);
            if (e != cudaSuccess && pdl_edges > edges_before) {  // refused with programmatic edges: capture again
                cudaGetLastError();
                use_pdl = false;
                pdl_edges = edges_before;
                pdl_notice = std::string("programmatic launches off: cudaGraphInstantiate: ") + cudaGetErrorString(e);
                continue;
            }
            check(e, "cudaGraphInstantiate");
            break;
        }
        graphs.push_back({cache.c_[0], cache.kpe_[0], int(cache.c_.size()), cache.cap_, first, n, head_rows, telemetry,
                          o.want_scores, host_logits, exec, false});
        return graphs.back();
    }

    // Programmatic dependent launch: in a captured step every edge from a kernel into one of
    // our kernels (the kernels of kernels/*.cu, all in namespace moescope) becomes a programmatic
    // edge from the launch-completion port of its source, so the next kernel's blocks are
    // scheduled as soon as every block of the previous one has started, instead of after it has
    // ended and the launch gap. Each of our kernels waits for its predecessor's completion in
    // its first statement (pdl_wait, kernels/device_util.cuh), so the order of reads and writes
    // is the stream's. A step is hundreds of short kernels (~460 for V2-Lite), most of them
    // shorter than the gap. An error turns it off for later graphs (pdl_notice); an edge that
    // was removed and cannot be put back throws (the graph would be unordered).
    void make_programmatic(cudaGraph_t graph) {
        auto api = [&](cudaError_t e, const char* what) {
            if (e == cudaSuccess) return true;
            use_pdl = false;
            pdl_notice = std::string("programmatic launches off: ") + what + ": " + cudaGetErrorString(e);
            cudaGetLastError();
            return false;
        };
        // The kernel's name, or "" for another node (a copy) or a kernel the API cannot name.
        auto kernel_name = [](cudaGraphNode_t node) -> std::string {
            cudaGraphNodeType type;
            cudaKernelNodeParams kp{};
            const char* name = nullptr;
            if (cudaGraphNodeGetType(node, &type) != cudaSuccess || type != cudaGraphNodeTypeKernel ||
                cudaGraphKernelNodeGetParams(node, &kp) != cudaSuccess || !kp.func ||
                cudaFuncGetName(&name, kp.func) != cudaSuccess || !name) {
                cudaGetLastError();
                return {};
            }
            return name;
        };
        size_t n = 0;
        if (!api(cudaGraphGetNodes(graph, nullptr, &n), "cudaGraphGetNodes")) return;
        std::vector<cudaGraphNode_t> nodes(n);
        if (!api(cudaGraphGetNodes(graph, nodes.data(), &n), "cudaGraphGetNodes")) return;
        for (cudaGraphNode_t to : nodes) {
            if (kernel_name(to).find("moescope") == std::string::npos) continue;
            size_t nd = 0;
            if (!api(cudaGraphNodeGetDependencies(to, nullptr, nullptr, &nd), "cudaGraphNodeGetDependencies")) return;
            std::vector<cudaGraphNode_t> deps(nd);
            std::vector<cudaGraphEdgeData> edges(nd);
            if (!api(cudaGraphNodeGetDependencies(to, deps.data(), edges.data(), &nd), "cudaGraphNodeGetDependencies"))
                return;
            for (size_t i = 0; i < nd; ++i) {
                if (edges[i].type != cudaGraphDependencyTypeDefault || kernel_name(deps[i]).empty()) continue;
                if (!api(cudaGraphRemoveDependencies(graph, &deps[i], &to, &edges[i], 1), "cudaGraphRemoveDependencies"))
                    return;
                cudaGraphEdgeData pe{};
                pe.from_port = cudaGraphKernelNodePortLaunchCompletion;
                pe.type = cudaGraphDependencyTypeProgrammatic;
                if (!api(cudaGraphAddDependencies(graph, &deps[i], &to, &pe, 1), "cudaGraphAddDependencies")) {
                    check(cudaGraphAddDependencies(graph, &deps[i], &to, &edges[i], 1),
                          "cudaGraphAddDependencies (restoring an edge)");
                    return;
                }
                ++pdl_edges;
            }
        }
    }

    // After the first replay of `g`: the same step launched kernel by kernel (the same kernels,
    // the position read from the device in both, so the results must agree to the bit, up to
    // float atomics we do not use). The launched run comes second, so the cache rows it writes
    // are right whatever the graph did. On a difference graphs are off for this backend.
    void verify_graph(GraphEntry& g, int n, int head_rows, const float* po, const std::function<void()>& enqueue) {
        const int D = cfg.hidden_size, V = cfg.vocab_size;
        auto results = [&] {
            check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (graph check)");
            const size_t nh = size_t(2 * n) * size_t(D), nl = size_t(head_rows) * size_t(V);
            std::vector<float> r(nh + nl);
            std::memcpy(r.data(), po, sizeof(float) * nh);
            check(cudaMemcpy(r.data() + nh, logits, sizeof(float) * nl,
                             cudaMemcpyDeviceToHost),
                  "copy logits (graph check)");
            return r;
        };
        const std::vector<float> replayed = results();
        dyn_start = d_start;
        try {
            enqueue();
        } catch (...) {
            dyn_start = nullptr;
            throw;
        }
        dyn_start = nullptr;
        const std::vector<float> launched = results();
        size_t worst = 0;
        double worst_err = 0;
        for (size_t i = 0; i < launched.size(); ++i) {
            const double err = std::fabs(double(replayed[i]) - double(launched[i]));
            if (!(err <= 1e-6 + 1e-5 * std::fabs(double(launched[i])))) {
                worst = i;
                worst_err = std::isnan(err) ? INFINITY : err;
                break;
            }
        }
        if (worst_err == 0) {
            g.verified = true;
            return;
        }
        const std::string diff = std::string("the replay of a ") + std::to_string(n) +
                                 "-token step differed from its launches (" +
                                 (worst < size_t(2 * n) * D ? "hidden" : "logits") + " element " +
                                 std::to_string(worst) + ", |diff| " + std::to_string(worst_err) + ")";
        if (use_pdl) {  // first without the programmatic edges: graphs captured again
            use_pdl = false;
            pdl_notice = "programmatic launches off: " + diff;
            drop_graphs();
            return;
        }
        use_graphs = false;
        graph_notice = "CUDA graphs off: " + diff + "; steps run kernel by kernel";
    }

    void drop_graphs() {
        for (auto& gr : graphs) cudaGraphExecDestroy(gr.exec);
        graphs.clear();
    }

    // upload(c0, n): host -> device inputs of a chunk (may wait); body(n): the device-only start
    // of the stack (embedding, MTP concat) that a CUDA graph can capture.
    void run_stack(int T, int start, CudaCache& cache, int first, int count, const ForwardOptions& o,
                   const std::function<void(int, int)>& upload, const std::function<void(int)>& body,
                   const float* out_norm, const WRef& out_head, ForwardResult& out) {
        const int D = cfg.hidden_size, V = cfg.vocab_size, k = router.k, E = router.E;
        const int G = router.method != 0 ? router.n_group : 1;
        const int nm = n_moe(first, count);
        std::vector<std::vector<float>> norms(static_cast<size_t>(count));
        out.routing.clear();
        for (int l = first; l < first + count; ++l) {
            if (!layers[size_t(l)].moe) continue;
            LayerRouting lr;
            lr.layer = l;
            lr.r.T = T;
            lr.r.k = k;
            lr.r.E = E;
            lr.r.n_group = G;
            out.routing.push_back(std::move(lr));
        }
        last_loads.assign(size_t(nm), std::vector<int>(size_t(E), 0));
        const int rows_out = o.all_logits ? T : 1;
        // Logits stay on the device for pick() when the caller asks; pick() needs all of them
        // in the [Tc, V] buffer, i.e. one chunk.
        const bool host_logits = o.host_logits || rows_out > Tc;
        if (host_logits) out.logits.assign(size_t(rows_out) * V, 0.0f);
        else out.logits.clear();
        out.hidden.resize(size_t(T) * D);
        out.raw_hidden.resize(size_t(T) * D);
        for (int c0 = 0; c0 < T; c0 += Tc) {
            const int n = std::min(Tc, T - c0), pos = start + c0;
            const TeleLayout tl = telemetry_layout(cfg, n, nm, count, o.want_scores);
            // The kernels write the block and the copy fills pin_tele: both are tele_bytes long.
            if (tl.end > tele_bytes)
                throw DeviceError("telemetry: a chunk of " + std::to_string(n) + " rows needs " +
                                  std::to_string(tl.end) + " bytes, the block has " + std::to_string(tele_bytes));
            const bool last_chunk = c0 + n == T;
            const int head_rows = o.all_logits ? n : (last_chunk ? 1 : 0);
            float* po = static_cast<float*>(pin_out.p);
            upload(c0, n);  // may wait for the device: the profile's busy wait comes after it
            if (profile) {
                busy_wait(profile_busy, xn, stream);  // xn is rewritten before it is read
                mark("start");
            }
            auto enqueue = [&] {
                body(n);
                mark("embedding");
                int mslot = 0;
                for (int l = first; l < first + count; ++l) {
                    const int cl = l - first;
                    layer_forward(layers[size_t(l)], n, pos, cache.c_[size_t(cl)], cache.kpe_[size_t(cl)], o, tl,
                                  mslot, cl);
                    mslot += layers[size_t(l)].moe;
                }
                rmsnorm(hidden, h, out_norm, n, D, float(cfg.rms_norm_eps), stream);
                if (head_rows) gemm->linear(logits, hidden + int64_t(n - head_rows) * D, out_head, head_rows);
                mark("final norm + LM head");
                // Results into pinned memory (async), one wait per chunk.
                check(cudaMemcpyAsync(po, h, sizeof(float) * size_t(n) * D, cudaMemcpyDeviceToHost, stream),
                      "copy raw");
                check(cudaMemcpyAsync(po + size_t(n) * D, hidden, sizeof(float) * size_t(n) * D,
                                      cudaMemcpyDeviceToHost, stream),
                      "copy hidden");
                if (head_rows && host_logits)
                    check(cudaMemcpyAsync(po + size_t(2 * n) * D, logits, sizeof(float) * size_t(head_rows) * V,
                                          cudaMemcpyDeviceToHost, stream),
                          "copy logits");
                if (telemetry)
                    check(cudaMemcpyAsync(pin_tele.p, tele, size_t(tl.end), cudaMemcpyDeviceToHost, stream),
                          "copy telemetry");
            };
            // A small absorbed step (decode, an MTP draft, a verification) may replay a graph.
            if (use_graphs && o.absorbed && T <= kGraphRows && T <= Tc) {
                *static_cast<int*>(pin_start.p) = pos;
                check(cudaMemcpyAsync(d_start, pin_start.p, sizeof(int), cudaMemcpyHostToDevice, stream),
                      "upload position");
                GraphEntry& g = step_graph(cache, first, n, head_rows, o, host_logits, enqueue);
                check(cudaGraphLaunch(g.exec, stream), "cudaGraphLaunch");
                if (!g.verified) verify_graph(g, n, head_rows, po, enqueue);
            } else {
                enqueue();
            }
            if (head_rows) last_rows = head_rows;
            last_rows_complete = head_rows == rows_out;
            check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (forward)");
            std::memcpy(out.raw_hidden.data() + size_t(c0) * D, po, sizeof(float) * size_t(n) * D);
            std::memcpy(out.hidden.data() + size_t(c0) * D, po + size_t(n) * D, sizeof(float) * size_t(n) * D);
            if (head_rows && host_logits) {
                float* dst = out.logits.data() + (o.all_logits ? size_t(c0) * V : 0);
                std::memcpy(dst, po + size_t(2 * n) * D, sizeof(float) * size_t(head_rows) * V);
            }
            const char* pt = static_cast<const char*>(pin_tele.p);
            for (int m = 0; m < (telemetry ? nm : 0); ++m) {
                Routing& r = out.routing[size_t(m)].r;
                const int* pid = reinterpret_cast<const int*>(pt + tl.ids) + int64_t(m) * n * k;
                const float* pw = reinterpret_cast<const float*>(pt + tl.weights) + int64_t(m) * n * k;
                const uint8_t* pk = reinterpret_cast<const uint8_t*>(pt + tl.kept) + int64_t(m) * n * G;
                const int* pc = reinterpret_cast<const int*>(pt + tl.counts) + int64_t(m) * E;
                r.ids.insert(r.ids.end(), pid, pid + size_t(n) * k);
                r.weights.insert(r.weights.end(), pw, pw + size_t(n) * k);
                r.kept_groups.insert(r.kept_groups.end(), pk, pk + size_t(n) * G);
                if (tl.scores >= 0) {
                    const float* ps = reinterpret_cast<const float*>(pt + tl.scores) + int64_t(m) * n * E;
                    r.scores.insert(r.scores.end(), ps, ps + size_t(n) * E);
                }
                for (int e = 0; e < E; ++e) last_loads[size_t(m)][size_t(e)] += pc[e];
            }
            if (telemetry)
                for (int cl = 0; cl < count; ++cl) {
                    const float* pn = reinterpret_cast<const float*>(pt + tl.norms) + int64_t(cl) * n;
                    norms[size_t(cl)].insert(norms[size_t(cl)].end(), pn, pn + n);
                }
        }
        out.latent_norms.clear();
        for (auto& v : norms) out.latent_norms.insert(out.latent_norms.end(), v.begin(), v.end());
        // Without telemetry nothing was copied: no routing at all, rather than layers that claim
        // T rows and hold none.
        if (!telemetry) out.routing.clear();
        cache.length_ = start + T;
    }

    // ---- Grouped expert GEMM (prefill) --------------------------------------------------------
    // Prefill of BF16 and FP8 experts through the grouped GEMM, on once grouped_self_check has
    // compared it with the grouped GEMV on this device; grouped_notice says why when it is off.
    bool grouped = false, grouped_ok = false;  // in use; passed the self-check
    std::string grouped_notice;
    std::string grouped_check;  // the self-check's worst case and errors

    // The grouped GEMM against the grouped GEMV (the decode path: f32 activations, each row
    // multiplied with its expert's weights as the CPU holds them), on the first MoE layer's real
    // weights, with seeded rows spread over the experts in awkward counts (0, 1, 3, 63, 64, 65,
    // 130 ...: partial, full and several tiles) and NaN in every output before the call (a row
    // left unwritten shows). The GEMM carries the activations as bf16 hi + lo and FP8 block
    // scales in f32, so both are f32-accurate: ~1e-6 apart. More than 1e-4 (relative, whole
    // output) or 1e-3 (any element, against the output's rms) means a wrong tile or scale.
    void grouped_self_check() {
        grouped = grouped_ok = false;
        if (opt.dtype == WeightDtype::F32) return;  // f32 experts: SGEMM per expert, the CPU's numbers
        const DLayer* L = nullptr;
        for (const DLayer& l : layers)
            if (l.moe && !l.exp_gu.empty()) {
                L = &l;
                break;
            }
        const int E = router.E, D = cfg.hidden_size, I = cfg.moe_intermediate_size, Rmax = Tc * router.k;
        if (!L || Rmax <= 64) return;  // every MoE product takes the grouped GEMV
        static constexpr int kCounts[] = {0, 1, 3, 63, 64, 65, 130, 17, 2, 0, 127, 5};
        std::vector<int> off(size_t(E) + 1, 0);
        for (int e = 0; e < E; ++e) {
            const int want = kCounts[e % int(std::size(kCounts))];
            off[size_t(e) + 1] = off[size_t(e)] + std::min(want, Rmax - off[size_t(e)]);
        }
        const int R = off[size_t(E)];
        const std::vector<float> x = lcg_uniform(size_t(R) * std::max(D, I), 0x2545f4914f6cdd1dull);
        const bool fp8 = opt.dtype == WeightDtype::FP8;
        const std::string loop =
            fp8 ? "prefill experts: one FP8 GEMM per expert" : "prefill experts: one cuBLAS GEMM per expert";
        if (const char* e = std::getenv("MOESCOPE_CUDA_GROUPED"); e && std::string(e) == "0") {
            grouped_notice = loop + " (MOESCOPE_CUDA_GROUPED=0)";
            return;
        }
        std::vector<int> row_e(static_cast<size_t>(R));  // each row's expert, for the grouped GEMV
        for (int e = 0; e < E; ++e)
            for (int r = off[size_t(e)]; r < off[size_t(e) + 1]; ++r) row_e[size_t(r)] = e;
        double worst_rel = -1;
        try {
            const int64_t in_max = std::max(D, I), out_max = std::max(2 * I, D);
            DeviceArena scratch(arena_bytes({int64_t(R) * 4, R * in_max * 4, R * out_max * 4, R * out_max * 4}),
                                "cudaMalloc (grouped GEMM self-check)");
            int* dex = scratch.carve<int>(R);
            float *dx = scratch.carve<float>(R * in_max), *da = scratch.carve<float>(R * out_max),
                  *db = scratch.carve<float>(R * out_max);
            check(cudaMemcpyAsync(dex, row_e.data(), sizeof(int) * row_e.size(), cudaMemcpyHostToDevice, stream),
                  "upload self-check experts");
            check(cudaMemcpyAsync(offsets, off.data(), sizeof(int) * off.size(), cudaMemcpyHostToDevice, stream),
                  "upload self-check offsets");
            const int tiles = grouped_max_tiles(R, E);
            expert_tiles(tile_map, offsets, E, tiles, stream);
            struct Case {
                const char* what;
                const void* const* dev;
                int out, in;
                int64_t split;
            };
            for (const Case& c :
                 {Case{"gate|up", L->exp_gu_dev, 2 * I, D, I}, Case{"down", L->exp_down_dev, D, I, 0}}) {
                check(cudaMemcpyAsync(dx, x.data(), sizeof(float) * size_t(R) * c.in, cudaMemcpyHostToDevice, stream),
                      "upload self-check rows");
                check(cudaMemsetAsync(da, 0xff, sizeof(float) * size_t(R) * c.out, stream), "poison self-check");
                grouped_gemm(da, dx, c.dev, tiles, c.out, c.in, c.split);
                if (fp8) grouped_gemv_fp8(db, dx, c.dev, dex, R, c.out, c.in, c.split, stream);
                else grouped_gemv(db, dx, c.dev, true, dex, R, c.out, c.in, stream);
                std::vector<float> a(size_t(R) * c.out), b(a.size());
                check(cudaMemcpyAsync(a.data(), da, a.size() * 4, cudaMemcpyDeviceToHost, stream), "self-check result");
                check(cudaMemcpyAsync(b.data(), db, b.size() * 4, cudaMemcpyDeviceToHost, stream),
                      "self-check reference");
                check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (grouped GEMM self-check)");
                const OutputError err = output_error(a, b);
                const std::string shape = std::string(c.what) + " [" + std::to_string(c.out) + " x " +
                                          std::to_string(c.in) + "], " + std::to_string(R) + " rows over " +
                                          std::to_string(E) + " experts";
                char b64[96];
                std::snprintf(b64, sizeof b64, "relative error %.3g, worst element %.3g of the rms", err.rel,
                              err.worst_over_rms);
                if (!(err.rel <= 1e-4) || !(err.worst_over_rms <= 1e-3)) {
                    grouped_notice = loop + " (the grouped GEMM's self-check failed on " + shape + ": " + b64 +
                                     "; more than 1e-4 / 1e-3)";
                    return;
                }
                if (err.rel >= worst_rel) {
                    worst_rel = err.rel;
                    grouped_check = shape + ": " + b64;
                }
            }
        } catch (const std::exception& e) {
            grouped_notice = loop + " (the grouped GEMM failed its self-check: " + e.what() + ")";
            recover_or_throw("the grouped expert GEMM's self-check", e);
            return;
        }
        grouped = grouped_ok = true;
        grouped_check = "self-check on " + grouped_check;
        // FP8: the experts leave the prefill path the FP8 notice describes; say where they go.
        if (fp8)
            grouped_notice = "prefill experts: grouped GEMM (e4m3 weights, f32 block scales; " + grouped_check + ")";
    }

    // After a self-check threw: a launch or allocation error is cleared and the fallback is
    // used; a fault (illegal address, ...) poisons the context for good, so the backend must
    // not pretend to work: it fails here with the real cause.
    void recover_or_throw(const char* what, const std::exception& e) {
        cudaGetLastError();
        const cudaError_t sticky = cudaDeviceSynchronize();
        if (sticky != cudaSuccess)
            throw DeviceError(std::string(what) + " left the device unusable (" + cudaGetErrorName(sticky) +
                              "): " + e.what());
    }

    // ---- FP8 residency ----------------------------------------------------------------------
    int fp8_lossy = 0;         // matrices quantized with new scales (no exact FP8 form)
    std::string fp8_prefill;   // what prefill uses, and why

    // One FP8 device tensor from its host parts (gate and up for a stacked matrix): the
    // checkpoint's e4m3 bytes recovered exactly with its scale_inv, else new amax scales.
    void upload_fp8(const TensorSpec& t, const std::vector<const Tensor*>& parts, std::vector<uint8_t>& staging,
                    void* dst) {
        const Fp8Grid g = t.grid();
        staging.assign(size_t(g.bytes()), 0);
        uint8_t* q = staging.data();
        auto* sc = reinterpret_cast<float*>(q + g.scale_offset());
        int64_t row = 0, brow = 0;
        std::vector<float> wide;  // a BF16-stored part widened (it has no block scales)
        for (const Tensor* p : parts) {
            const int64_t pr = p->shape.at(0), pc = p->shape.at(1);
            const bool scaled = int64_t(p->block_scale.size()) == fp8_cdiv(pr, kFp8Block) * fp8_cdiv(pc, kFp8Block);
            if (p->is_bf16()) wide = p->to_f32();
            const float* v = p->is_bf16() ? wide.data() : p->ptr();
            if (!scaled || !requantize_fp8_exact(q + row * pc, sc, g.ld(), brow, v, pr, pc, p->block_scale.data())) {
                quantize_fp8_amax(q + row * pc, sc, g.ld(), brow, v, pr, pc);
                ++fp8_lossy;
            }
            row += pr;
            brow += fp8_cdiv(pr, kFp8Block);
        }
        check(cudaMemcpy(dst, staging.data(), staging.size(), cudaMemcpyHostToDevice), "upload FP8 weights");
    }

    // cuBLASLt's block-scaled FP8 GEMM cannot be tried without a device, so it is verified here
    // once: on real weights (the first layer's kv_a, and a stacked gate|up whose halves keep
    // their own block grids) with seeded activations whose 128-column blocks differ in
    // magnitude by up to 2^6 (a misread scale layout shows), at a row count that cuBLASLt takes
    // directly and one that needs padding, against the fallback (weights dequantized to BF16).
    // The only expected difference is the e4m3 rounding of the activations: ~2.5% relative
    // (3 mantissa bits); more than 6% (or a refusal) turns the cuBLASLt path off.
    void fp8_self_check() {
        const std::string lt = "cuBLASLt block-scaled FP8 GEMM";
        const std::string fb = "prefill: weight blocks dequantized to BF16 + cuBLAS BF16 GEMM";
        gemm->set_fp8_lt(false);
        cudaDeviceProp p{};
        check(cudaGetDeviceProperties(&p, 0), "cudaGetDeviceProperties");
        if (p.major < 9) {
            fp8_prefill = fb + " (" + lt + " needs sm_90; this device is sm_" + std::to_string(p.major * 10 + p.minor) + ")";
            return;
        }
        if (const char* e = std::getenv("MOESCOPE_CUDA_FP8_PREFILL"); e && std::string(e) == "bf16") {
            fp8_prefill = fb + " (MOESCOPE_CUDA_FP8_PREFILL=bf16)";
            return;
        }
        if (Tc <= kGemvMaxRows) {
            fp8_prefill = "prefill: FP8 GEMV (chunks of " + std::to_string(Tc) + " rows)";
            return;
        }
        const DLayer& L0 = layers[0];
        std::vector<std::pair<std::string, WRef>> ws{{"kv_a_proj", L0.kv_a}};
        if (!L0.mlp_gu.empty()) ws.push_back({"gate|up", L0.mlp_gu});
        else if (!L0.shared_gu.empty()) ws.push_back({"shared gate|up", L0.shared_gu});
        else if (!L0.exp_gu.empty())
            ws.push_back({"expert gate|up", fp8_ref(L0.exp_gu[0], 2 * cfg.moe_intermediate_size, cfg.hidden_size,
                                                   cfg.moe_intermediate_size)});
        double worst = 0;
        std::string detail;
        try {
            for (const auto& [what, W] : ws)
                for (int T : {std::min(Tc, 64), std::min(Tc, 37)}) {
                    const double rel = fp8_compare(W, T);
                    const std::string shape = what + " [" + std::to_string(W.rows) + " x " + std::to_string(W.cols) +
                                              "], " + std::to_string(T) + " rows";
                    if (!(rel <= 0.06)) {
                        char b[64];
                        std::snprintf(b, sizeof b, "%.3g", rel);
                        fp8_prefill = fb + " (" + lt + " self-check failed on " + shape + ": relative error " + b +
                                      " against the dequantized weights, more than 0.06)";
                        return;
                    }
                    if (rel >= worst) {
                        worst = rel;
                        detail = shape;
                    }
                }
        } catch (const std::exception& e) {
            fp8_prefill = fb + " (" + lt + " unavailable: " + e.what() + ")";
            recover_or_throw("the cuBLASLt FP8 self-check", e);
            return;
        }
        char b[64];
        std::snprintf(b, sizeof b, "%.3g", worst);
        fp8_prefill = "prefill: " + lt + " with 1x128 activation scales (self-check passed: relative error " + b +
                      " on " + detail + ", e4m3 activation rounding)";
        gemm->set_fp8_lt(true);
    }

    // Relative L2 difference of the cuBLASLt path against the fallback on W with T seeded rows;
    // throws (with cuBLASLt's reason) when cuBLASLt refuses.
    double fp8_compare(const WRef& W, int T) {
        const int K = int(W.cols), out = int(W.rows);
        std::vector<float> x = lcg_uniform(size_t(T) * K, 0x9e3779b97f4a7c15ull ^ uint64_t(K * 131 + T));
        for (int t = 0; t < T; ++t)
            for (int c = 0; c < K; ++c) x[size_t(t) * K + c] *= std::ldexp(1.0f, (c / kFp8Block + t) % 7 - 3);
        DeviceArena scratch(arena_bytes({int64_t(x.size()) * 4, int64_t(T) * out * 4, int64_t(T) * out * 4}),
                            "cudaMalloc (FP8 self-check)");
        float *dx = scratch.carve<float>(int64_t(x.size())), *da = scratch.carve<float>(int64_t(T) * out),
              *db = scratch.carve<float>(int64_t(T) * out);
        check(cudaMemcpyAsync(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice, stream), "upload self-check rows");
        std::string why;
        if (!gemm->linear_fp8(da, dx, W, T, false, K, Fp8Prefill::Lt, &why)) throw DeviceError(why);
        gemm->linear_fp8(db, dx, W, T, false, K, Fp8Prefill::Fallback);
        std::vector<float> a(size_t(T) * out), b(a.size());
        check(cudaMemcpyAsync(a.data(), da, a.size() * 4, cudaMemcpyDeviceToHost, stream), "self-check result");
        check(cudaMemcpyAsync(b.data(), db, b.size() * 4, cudaMemcpyDeviceToHost, stream), "self-check reference");
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (FP8 self-check)");
        return output_error(a, b).rel;
    }

    void upload_ids(const int* tokens, int n) {
        int* pi = static_cast<int*>(pin_ids.p);
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize (ids)");  // pin_ids is reused
        std::memcpy(pi, tokens, sizeof(int) * size_t(n));
        check(cudaMemcpyAsync(ids, pi, sizeof(int) * size_t(n), cudaMemcpyHostToDevice, stream), "upload ids");
    }
};

namespace {

void check_tokens(const int* tokens, int T, int V, const char* what) {
    for (int t = 0; t < T; ++t)
        if (tokens[t] < 0 || tokens[t] >= V)
            throw Error(std::string(what) + "token id " + std::to_string(tokens[t]) +
                        " is outside the vocabulary [0, " + std::to_string(V) + ")");
}

// A non-sticky error that an earlier runtime call left behind (a refused cudaMalloc, ours or
// the application's, already reported through its own return value) would otherwise surface
// at our first check_launch (cudaGetLastError) and fail this call with someone else's error.
// Sticky errors (a device fault) come back from every later call anyway.
void clear_stale_error() { cudaGetLastError(); }

// The cache of a forward call: this backend's, with the stack's number of layers (an MTP
// module's one-layer cache in the main model would index layers it does not have).
CudaCache& cache_of(BackendCache& cache, int layers, const char* call) {
    auto* c = dynamic_cast<CudaCache*>(&cache);
    if (!c) throw Error(std::string(call) + ": the cache was not made by the CUDA backend's new_cache");
    if (int(c->c_.size()) != layers)
        throw Error(std::string(call) + ": the cache holds " + std::to_string(c->c_.size()) + " layers, this stack has " +
                    std::to_string(layers) + " (new_cache(0) for the main model, new_cache(k) for MTP module k)");
    return *c;
}

void check_room(const CudaCache& c, int T, const ModelConfig& cfg) {
    if (T <= 0) throw Error("forward: no tokens");
    if (c.length_ + T > c.cap_)
        throw ContextError("the context holds " + std::to_string(c.cap_) + " tokens; " + std::to_string(c.length_) +
                           " are used and " + std::to_string(T) + " more do not fit");
    if (c.length_ + T > cfg.max_position_embeddings)
        throw ContextError("the sequence would reach position " + std::to_string(c.length_ + T) +
                           ", past the model's context of " + std::to_string(cfg.max_position_embeddings) +
                           " tokens (max_position_embeddings)");
}

// Host tensor of a spec, as f32 rows (gate and up stacked for the *GateUp roles).
void host_rows(const Weights& w, const ModelConfig& cfg, const TensorSpec& t, std::vector<const Tensor*>& parts) {
    const int L = cfg.num_hidden_layers;
    parts.clear();
    const LayerWeights* lw = nullptr;
    const MtpWeights* m = nullptr;
    if (t.layer >= 0) {
        if (t.layer < L) lw = &w.layers[size_t(t.layer)];
        else {
            m = &w.mtp[size_t(t.layer - L)];
            lw = &m->layer;
        }
    }
    switch (t.role) {
        case Role::Embed: parts = {&w.embed_tokens}; break;
        case Role::FinalNorm: parts = {&w.norm}; break;
        case Role::Head: parts = {&w.lm_head}; break;
        case Role::InNorm: parts = {&lw->input_layernorm}; break;
        case Role::PostNorm: parts = {&lw->post_attention_layernorm}; break;
        case Role::QA: parts = {&lw->attn.q_a_proj}; break;
        case Role::QANorm: parts = {&lw->attn.q_a_layernorm}; break;
        case Role::QB: parts = {&lw->attn.q_b_proj}; break;
        case Role::QProj: parts = {&lw->attn.q_proj}; break;
        case Role::KVA: parts = {&lw->attn.kv_a_proj_with_mqa}; break;
        case Role::KVANorm: parts = {&lw->attn.kv_a_layernorm}; break;
        case Role::KVB: parts = {&lw->attn.kv_b_proj}; break;
        case Role::OProj: parts = {&lw->attn.o_proj}; break;
        case Role::MlpGateUp: parts = {&lw->mlp.gate_proj, &lw->mlp.up_proj}; break;
        case Role::MlpDown: parts = {&lw->mlp.down_proj}; break;
        case Role::Router: parts = {&lw->moe.gate}; break;
        case Role::ExpGateUp:
            parts = {&lw->moe.experts[size_t(t.expert)].gate_proj, &lw->moe.experts[size_t(t.expert)].up_proj};
            break;
        case Role::ExpDown: parts = {&lw->moe.experts[size_t(t.expert)].down_proj}; break;
        case Role::SharedGateUp: parts = {&lw->moe.shared.gate_proj, &lw->moe.shared.up_proj}; break;
        case Role::SharedDown: parts = {&lw->moe.shared.down_proj}; break;
        case Role::MtpENorm: parts = {&m->enorm}; break;
        case Role::MtpHNorm: parts = {&m->hnorm}; break;
        case Role::MtpEh: parts = {&m->eh_proj}; break;
        case Role::MtpEmbed: parts = {&m->embed_tokens}; break;
        case Role::MtpHeadNorm: parts = {&m->shared_head_norm}; break;
        case Role::MtpHead: parts = {&m->shared_head_head}; break;
    }
    int64_t n = 0;
    for (const Tensor* p : parts) n += p->numel();
    if (n != t.rows * t.cols)
        throw ShapeError("CUDA upload: a tensor of layer " + std::to_string(t.layer) + " has " + std::to_string(n) +
                         " values, the device plan expects [" + std::to_string(t.rows) + ", " +
                         std::to_string(t.cols) + "]");
}

}  // namespace

CudaBackend::CudaBackend(std::shared_ptr<Model> model, int capacity, const CudaOptions& o)
    : impl_(std::make_unique<Impl>()) {
    Impl& I = *impl_;
    I.model = std::move(model);
    I.opt = o;
    I.opt.dtype = resolve_dtype(&I.model->weights(), o);
    const ModelConfig& cfg = I.model->config();
    I.plan = plan_for(cfg, &I.model->weights(), I.opt, capacity);
    I.init_common(cfg, capacity);
    const Weights& w = I.model->weights();
    std::vector<const Tensor*> parts;
    std::vector<uint16_t> staging;
    std::vector<uint8_t> fp8_staging;
    I.build_weights([&](const TensorSpec& t, void* dst) {
        host_rows(w, cfg, t, parts);
        if (t.stored_fp8(I.opt.dtype)) {
            I.upload_fp8(t, parts, fp8_staging, dst);
            return;
        }
        char* d = static_cast<char*>(dst);
        for (const Tensor* p : parts) {
            const size_t n = size_t(p->numel());
            if (t.big && I.opt.dtype != WeightDtype::F32) {
                // A BF16-stored host tensor (WeightStorage::BF16) goes up as it is.
                const uint16_t* src = p->is_bf16() ? p->bf16.data() : nullptr;
                if (!src) {
                    staging.resize(n);
                    for (size_t i = 0; i < n; ++i) staging[i] = f32_to_bf16(p->data[i]);
                    src = staging.data();
                }
                check(cudaMemcpy(d, src, n * 2, cudaMemcpyHostToDevice), "upload weights");
                d += n * 2;
            } else if (p->is_bf16()) {
                const std::vector<float> wide = p->to_f32();
                check(cudaMemcpy(d, wide.data(), n * 4, cudaMemcpyHostToDevice), "upload weights");
                d += n * 4;
            } else {
                check(cudaMemcpy(d, p->ptr(), n * 4, cudaMemcpyHostToDevice), "upload weights");
                d += n * 4;
            }
        }
    });
    I.build_activations();
    // Pageable uploads may still be in flight on the legacy stream when cudaMemcpy returns.
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (upload)");
    if (I.opt.dtype == WeightDtype::FP8) I.fp8_self_check();
    I.grouped_self_check();
}

CudaBackend::CudaBackend(const ModelConfig& cfg, int capacity, const CudaOptions& o, uint64_t seed)
    : impl_(std::make_unique<Impl>()) {
    Impl& I = *impl_;
    I.opt = o;
    I.plan = plan_for(cfg, nullptr, o, capacity);
    I.init_common(cfg, capacity);
    uint64_t n = 0;
    I.build_weights([&](const TensorSpec& t, void* dst) {
        const bool bf16 = t.big && o.dtype != WeightDtype::F32;
        const float bound = 1.0f / std::sqrt(float(t.cols));
        if (t.rows == 1) fill_constant(static_cast<float*>(dst), t.cols, 1.0f, I.stream);  // norm weights
        else if (t.stored_fp8(o.dtype)) fill_fp8_random(dst, t.grid(), bound, seed + 977 * (++n), I.stream);
        else fill_uniform(dst, bf16, t.rows * t.cols, bound, seed + 977 * (++n), I.stream);
    });
    I.build_activations();
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (random weights)");
    if (I.opt.dtype == WeightDtype::FP8) I.fp8_self_check();
    I.grouped_self_check();
}

CudaBackend::~CudaBackend() = default;

std::string CudaBackend::name() const {
    // FP8: the prefill path in the name too, so that the CLI's "backend" field says it.
    const Impl& I = *impl_;
    if (I.opt.dtype != WeightDtype::FP8) return "cuda (" + I.device + ")";
    return "cuda (" + I.device + ", fp8, prefill " + (I.gemm && I.gemm->fp8_lt() ? "cuBLASLt" : "bf16 fallback") + ")";
}
WeightDtype CudaBackend::weight_dtype() const { return impl_->opt.dtype; }
std::string CudaBackend::notice() const {
    const Impl& I = *impl_;
    std::string n;
    auto add = [&](const std::string& part) {
        if (!part.empty()) n += (n.empty() ? "" : "; ") + part;
    };
    add(I.graph_notice);
    add(I.pdl_notice);
    if (I.opt.dtype != WeightDtype::FP8) {
        add(I.grouped_notice);
        return n;
    }
    add("FP8 e4m3 weights with 128x128 block scales (decode: FP8 GEMV); " + I.fp8_prefill);
    add(I.grouped_notice);
    if (I.fp8_lossy > 0)
        n += "; " + std::to_string(I.fp8_lossy) +
             " weight matrices had no exact FP8 form (not from an FP8 checkpoint, or changed since loading) and "
             "were quantized with new 128x128 scales";
    if (I.gemm && I.gemm->fp8_lt_refusals() > 0)
        n += "; " + std::to_string(I.gemm->fp8_lt_refusals()) +
             " prefill products fell back to BF16 (last: " + I.gemm->fp8_lt_last_refusal() + ")";
    return n;
}
const ModelConfig& CudaBackend::config() const { return impl_->cfg; }
const std::vector<std::vector<int>>& CudaBackend::last_loads() const { return impl_->last_loads; }
void CudaBackend::set_telemetry(bool on) { impl_->telemetry = on; }
const MemoryPlan& CudaBackend::plan() const { return impl_->plan; }
std::string CudaBackend::device_name() const { return impl_->device; }
void CudaBackend::set_graphs(bool on) {
    impl_->use_graphs = on;
    if (on) impl_->graph_notice.clear();
}
bool CudaBackend::graphs() const { return impl_->use_graphs; }
void CudaBackend::set_programmatic_launches(bool on) {
    Impl& I = *impl_;
    if (I.use_pdl != (on && I.pdl_capable)) I.drop_graphs();
    I.use_pdl = on && I.pdl_capable;
    if (on) I.pdl_notice.clear();
}
bool CudaBackend::programmatic_launches() const { return impl_->use_pdl; }
int64_t CudaBackend::programmatic_edges() const { return impl_->pdl_edges; }
bool CudaBackend::grouped_experts() const { return impl_->grouped; }
std::string CudaBackend::grouped_report() const {
    const Impl& I = *impl_;
    return I.grouped_ok ? I.grouped_check : I.grouped_notice;
}
void CudaBackend::set_grouped_experts(bool on) { impl_->grouped = on && impl_->grouped_ok; }
void CudaBackend::synchronize() { check(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize"); }

std::vector<TokenPick> CudaBackend::pick(const PickParams& p, const std::vector<float>& u) {
    Impl& I = *impl_;
    const int R = I.last_rows;
    if (R <= 0) throw Error("pick: no forward has produced logits yet");
    if (!I.last_rows_complete)
        throw Error("pick: the last forward returned more logits rows than one chunk of " + std::to_string(I.Tc) +
                    " keeps on the device");
    if (p.temperature > 0 && int(u.size()) < R)
        throw Error("pick: " + std::to_string(R) + " uniforms needed, " + std::to_string(u.size()) + " given");
    clear_stale_error();
    if (p.temperature > 0)
        check(cudaMemcpyAsync(I.sample_u, u.data(), sizeof(float) * size_t(R), cudaMemcpyHostToDevice, I.stream),
              "upload uniforms");
    const int V = I.cfg.vocab_size;
    sample(I.sample_ids, I.logits, I.sample_u, R, V, SampleParams{p.temperature, p.top_k, p.top_p}, I.stream);
    token_logprob(I.sample_logprob, I.logits, I.sample_ids, R, V, I.stream);
    std::vector<int> ids(static_cast<size_t>(R));
    std::vector<float> lp(static_cast<size_t>(R));
    check(cudaMemcpyAsync(ids.data(), I.sample_ids, sizeof(int) * size_t(R), cudaMemcpyDeviceToHost, I.stream),
          "copy picked ids");
    check(cudaMemcpyAsync(lp.data(), I.sample_logprob, sizeof(float) * size_t(R), cudaMemcpyDeviceToHost, I.stream),
          "copy log-probabilities");
    check(cudaStreamSynchronize(I.stream), "cudaStreamSynchronize (pick)");
    std::vector<TokenPick> out(static_cast<size_t>(R));
    for (int r = 0; r < R; ++r) out[size_t(r)] = {ids[size_t(r)], lp[size_t(r)]};
    return out;
}

std::unique_ptr<BackendCache> CudaBackend::new_cache(int mtp_module, int capacity) {
    const ModelConfig& c = impl_->cfg;
    if (mtp_module < 0 || mtp_module > c.num_nextn_predict_layers)
        throw Error("new_cache: MTP module " + std::to_string(mtp_module) + " does not exist");
    if (capacity <= 0) capacity = impl_->plan.dims.capacity;
    return std::make_unique<CudaCache>(c, mtp_module == 0 ? c.num_hidden_layers : 1, capacity);
}

void CudaBackend::forward(const int* tokens, int T, BackendCache& cache, const ForwardOptions& opt,
                          ForwardResult& out) {
    Impl& I = *impl_;
    CudaCache& c = cache_of(cache, I.cfg.num_hidden_layers, "forward");
    check_room(c, T, I.cfg);
    clear_stale_error();
    check_tokens(tokens, T, I.cfg.vocab_size, "");
    out = ForwardResult{};
    out.T = T;
    out.start = c.length_;
    I.run_stack(T, c.length_, c, 0, I.cfg.num_hidden_layers, opt,
                [&](int c0, int n) { I.upload_ids(tokens + c0, n); },
                [&](int n) { embed(I.h, I.embed, I.ids, n, I.stream); }, I.final_norm, I.head, out);
}

std::vector<std::pair<std::string, double>> CudaBackend::profile_step(const int* tokens, int T, BackendCache& cache,
                                                                     const ForwardOptions& opt, int64_t busy_iters) {
    Impl& I = *impl_;
    std::vector<std::pair<const char*, cudaEvent_t>> marks;
    const bool graphs = I.use_graphs;
    struct Restore {  // graphs, the profile pointer and the events, on every path
        Impl& I;
        bool graphs;
        std::vector<std::pair<const char*, cudaEvent_t>>& marks;
        ~Restore() {
            I.use_graphs = graphs;
            I.profile = nullptr;
            for (auto& m : marks) cudaEventDestroy(m.second);
        }
    } restore{I, graphs, marks};
    I.use_graphs = false;  // launched: an event after each op
    I.profile = &marks;
    I.profile_busy = busy_iters;
    ForwardResult out;
    forward(tokens, T, cache, opt, out);  // synchronizes at its end
    I.profile = nullptr;
    std::vector<std::pair<std::string, double>> us;
    for (size_t i = 1; i < marks.size(); ++i) {
        if (std::string(marks[i].first) == "start") continue;  // a chunk's busy wait
        float ms = 0;
        check(cudaEventElapsedTime(&ms, marks[i - 1].second, marks[i].second), "cudaEventElapsedTime (profile)");
        auto it = std::find_if(us.begin(), us.end(), [&](const auto& p) { return p.first == marks[i].first; });
        if (it == us.end()) us.push_back({marks[i].first, 1e3 * ms});
        else it->second += 1e3 * ms;
    }
    return us;
}

void CudaBackend::forward_mtp(int k, const float* h_prev, const int* next_tokens, int T, BackendCache& cache,
                              const ForwardOptions& opt, ForwardResult& out) {
    Impl& I = *impl_;
    const ModelConfig& cfg = I.cfg;
    if (k < 1 || k > cfg.num_nextn_predict_layers)
        throw Error("MTP module " + std::to_string(k) + " does not exist (the model has " +
                    std::to_string(cfg.num_nextn_predict_layers) + ")");
    CudaCache& c = cache_of(cache, 1, "forward_mtp");
    check_room(c, T, cfg);
    check_tokens(next_tokens, T, cfg.vocab_size, "MTP: ");
    clear_stale_error();
    const DMtp& m = I.mtp[size_t(k - 1)];
    const int D = cfg.hidden_size;
    const float eps = float(cfg.rms_norm_eps);
    out = ForwardResult{};
    out.T = T;
    out.start = c.length_;
    I.run_stack(T, c.length_, c, cfg.num_hidden_layers + k - 1, 1, opt,
                [&](int c0, int n) {
                    I.upload_ids(next_tokens + c0, n);
                    // h_prev rows go up through the pinned output buffer (free between chunks).
                    float* ph = static_cast<float*>(I.pin_out.p);
                    std::memcpy(ph, h_prev + size_t(c0) * D, sizeof(float) * size_t(n) * D);
                    check(cudaMemcpyAsync(I.y, ph, sizeof(float) * size_t(n) * D, cudaMemcpyHostToDevice, I.stream),
                          "upload h_prev");
                    check(cudaStreamSynchronize(I.stream), "cudaStreamSynchronize (h_prev)");
                },
                [&](int n) {
                    // concat(enorm(embed[t_{i+k}]), hnorm(h_i)): the embedding half first.
                    embed(I.xn, m.embed, I.ids, n, I.stream);
                    rmsnorm(I.cat, I.xn, m.enorm, n, D, eps, I.stream, 2 * D, D);
                    rmsnorm(I.cat + D, I.y, m.hnorm, n, D, eps, I.stream, 2 * D, D);
                    I.gemm->linear(I.h, I.cat, m.eh, n);
                },
                m.head_norm, m.head, out);
}

std::vector<float> CudaBackend::bias(int layer) const { return impl_->bias_host.at(size_t(layer)); }

void CudaBackend::set_bias(int layer, const std::vector<float>& b) {
    Impl& I = *impl_;
    DLayer& d = I.layers.at(size_t(layer));
    if (!d.moe) throw Error("set_bias: layer " + std::to_string(layer) + " is not an MoE layer");
    if (int(b.size()) != I.cfg.n_routed_experts)
        throw ShapeError("set_bias: layer " + std::to_string(layer) + " expects " +
                         std::to_string(I.cfg.n_routed_experts) + " values, got " + std::to_string(b.size()));
    // Stream-ordered, then waited for: the next forward sees the new bias, `b` may go away.
    check(cudaMemcpyAsync(d.bias, b.data(), sizeof(float) * b.size(), cudaMemcpyHostToDevice, I.stream),
          "upload router bias");
    check(cudaStreamSynchronize(I.stream), "cudaStreamSynchronize (bias)");
    I.bias_host[size_t(layer)] = b;
}

std::vector<uint8_t> CudaBackend::disabled_experts(int layer) const {
    return impl_->disabled_host.at(size_t(layer));
}

void CudaBackend::set_disabled_experts(int layer, const std::vector<uint8_t>& disabled) {
    Impl& I = *impl_;
    check_moe_layer(I.cfg, layer);
    std::vector<uint8_t> off = disabled;
    if (off.empty()) off.assign(size_t(I.cfg.n_routed_experts), 0);  // none off (Model's contract)
    check_disabled_experts(RouterDims(I.cfg), off, layer, I.drop_top_host[size_t(layer)]);
    if (std::count(off.begin(), off.end(), uint8_t(0)) == std::ptrdiff_t(off.size())) off.clear();
    I.disabled_host[size_t(layer)] = std::move(off);
    I.upload_ablation(layer);
}

int CudaBackend::drop_top_experts(int layer) const { return impl_->drop_top_host.at(size_t(layer)); }

void CudaBackend::set_drop_top_experts(int layer, int drop_top) {
    Impl& I = *impl_;
    check_moe_layer(I.cfg, layer);
    std::vector<uint8_t> mask = I.disabled_host[size_t(layer)];
    mask.resize(size_t(I.cfg.n_routed_experts), 0);
    check_disabled_experts(RouterDims(I.cfg), mask, layer, drop_top);
    I.drop_top_host[size_t(layer)] = drop_top;
    I.upload_ablation(layer);
}

void CudaBackend::reset_bias() {
    Impl& I = *impl_;
    const int L = I.cfg.num_hidden_layers;
    for (int l = 0; l < int(I.layers.size()); ++l) {
        if (!I.layers[size_t(l)].moe) continue;
        std::vector<float> b(size_t(I.cfg.n_routed_experts), 0.0f);
        if (I.model) {
            const Weights& w = I.model->weights();
            const LayerWeights& lw = l < L ? w.layers[size_t(l)] : w.mtp[size_t(l - L)].layer;
            if (!lw.moe.e_score_correction_bias.empty()) b = lw.moe.e_score_correction_bias.data;
        }
        set_bias(l, b);
    }
}

}  // namespace moescope::cuda

namespace {
void write_str(char* dst, size_t len, const std::string& s) {
    if (!dst || len == 0) return;
    std::snprintf(dst, len, "%s", s.c_str());
}
}  // namespace

extern "C" int moescope_cuda_probe(char* name, size_t name_len, char* err, size_t err_len) {
    try {
        std::string n, e;
        int count = moescope::cuda::probe_devices(n, e);
        write_str(name, name_len, n);
        write_str(err, err_len, e);
        return count;
    } catch (const std::exception& ex) {
        write_str(err, err_len, ex.what());
        return 0;
    } catch (...) {  // nothing may unwind through a C entry point
        write_str(err, err_len, "moescope_cuda_probe: unknown exception");
        return 0;
    }
}

extern "C" moescope::Backend* moescope_cuda_create_backend(std::shared_ptr<moescope::Model>* model, int capacity,
                                                           char* err, size_t err_len) {
    try {
        if (!model || !*model) throw moescope::Error("no model given");
        if (capacity <= 0) capacity = std::min(4096, (*model)->config().max_position_embeddings);
        return new moescope::cuda::CudaBackend(*model, capacity, moescope::cuda::CudaOptions::from_env());
    } catch (const std::exception& ex) {
        write_str(err, err_len, ex.what());
        return nullptr;
    } catch (...) {
        write_str(err, err_len, "moescope_cuda_create_backend: unknown exception");
        return nullptr;
    }
}
