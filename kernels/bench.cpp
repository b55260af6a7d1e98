// gpu-bench: a DeepSeek-V2-Lite-sized model with random BF16 weights generated on the device
// (no host upload), timed for prefill and decode at batch 1, against the device's measured
// copy bandwidth (the decode roofline), plus telemetry overhead and the MTP module's cost.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "engine/errors.h"
#include "kernels/common.h"
#include "kernels/cuda_backend.h"

namespace moescope::cuda {
namespace {

using nlohmann::json;

// tests/fixtures/configs/deepseek-v2-lite.json, plus one MTP module (V2-Lite ships none) so
// the cost of a draft step can be measured on the same shapes.
ModelConfig synthetic_v2_lite() {
    json j = {
        {"architectures", {"DeepseekV2ForCausalLM"}}, {"model_type", "deepseek_v2"},
        {"vocab_size", 102400}, {"hidden_size", 2048}, {"intermediate_size", 10944},
        {"moe_intermediate_size", 1408}, {"num_hidden_layers", 27}, {"num_nextn_predict_layers", 1},
        {"num_attention_heads", 16}, {"num_key_value_heads", 16}, {"n_shared_experts", 2},
        {"n_routed_experts", 64}, {"routed_scaling_factor", 1.0}, {"kv_lora_rank", 512},
        {"q_lora_rank", nullptr}, {"qk_nope_head_dim", 128}, {"qk_rope_head_dim", 64}, {"v_head_dim", 128},
        {"topk_method", "greedy"}, {"n_group", 1}, {"topk_group", 1}, {"num_experts_per_tok", 6},
        {"moe_layer_freq", 1}, {"first_k_dense_replace", 1}, {"norm_topk_prob", false},
        {"scoring_func", "softmax"}, {"hidden_act", "silu"}, {"max_position_embeddings", 163840},
        {"rope_theta", 10000},
        {"rope_scaling",
         {{"type", "yarn"}, {"factor", 40}, {"original_max_position_embeddings", 4096}, {"beta_fast", 32},
          {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707}}},
        {"rms_norm_eps", 1e-6}, {"tie_word_embeddings", false}};
    return ModelConfig::from_json(j, "synthetic-v2-lite");
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Device-to-device copy bandwidth (bytes read + written per second) over buffers of `bytes`
// (1 GiB by default: far past the L2).
double copy_bandwidth(size_t bytes) {
    // Freed on every path: a failed second allocation or copy must not keep 1 GiB from the
    // backend that is created next.
    struct Buffers {
        void *a = nullptr, *b = nullptr;
        cudaEvent_t e0 = nullptr, e1 = nullptr;
        ~Buffers() {
            if (e0) cudaEventDestroy(e0);
            if (e1) cudaEventDestroy(e1);
            cudaFree(a);
            cudaFree(b);
        }
    } m;
    check(cudaMalloc(&m.a, bytes), "cudaMalloc (bandwidth)");
    check(cudaMalloc(&m.b, bytes), "cudaMalloc (bandwidth)");
    check(cudaEventCreate(&m.e0), "cudaEventCreate");
    check(cudaEventCreate(&m.e1), "cudaEventCreate");
    check(cudaMemcpy(m.b, m.a, bytes, cudaMemcpyDeviceToDevice), "warm-up copy");
    const int iters = 20;
    check(cudaEventRecord(m.e0), "cudaEventRecord");
    for (int i = 0; i < iters; ++i)
        check(cudaMemcpyAsync(m.b, m.a, bytes, cudaMemcpyDeviceToDevice), "bandwidth copy");
    check(cudaEventRecord(m.e1), "cudaEventRecord");
    check(cudaEventSynchronize(m.e1), "bandwidth copies");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, m.e0, m.e1), "cudaEventElapsedTime");
    return 2.0 * double(bytes) * iters / (double(ms) / 1e3);
}

// Bytes a batch-1 decode step reads: every weight but the unchosen experts and all embedding
// rows but one, plus the latent cache of every layer at `positions`.
int64_t decode_bytes(const ModelConfig& c, WeightDtype d, int positions) {
    int64_t b = 0;
    const int64_t k = c.num_experts_per_tok, E = std::max(1, c.n_routed_experts);
    for (const TensorSpec& t : device_tensors(c, ModelPresence{})) {
        if (t.layer >= c.num_hidden_layers) continue;  // the MTP module is not part of a main step
        if (t.role == Role::ExpGateUp || t.role == Role::ExpDown) b += t.bytes(d) * k / E;
        else if (t.role == Role::Embed) b += t.cols * (d == WeightDtype::F32 ? 4 : 2);  // FP8 plans: BF16
        else b += t.bytes(d);
    }
    b += int64_t(c.num_hidden_layers) * positions * (c.kv_lora_rank + c.qk_rope_head_dim) * 4;
    return b;
}

int argmax(const float* v, int n) {
    return int(std::max_element(v, v + n) - v);
}

json run_bench(const json& req) {
    std::string name, err;
    if (probe_devices(name, err) <= 0) throw DeviceError("gpu-bench needs a CUDA device: " + err);
    const std::string which = req.value("config", std::string("synthetic-v2-lite"));
    ModelConfig cfg = which == "synthetic-v2-lite" ? synthetic_v2_lite() : ModelConfig::load(which);
    const int prompt = req.value("prompt", 512), decode = req.value("decode", 128);
    CudaOptions opt;
    const std::string wname = req.value("weights", std::string("bf16"));
    if (wname != "bf16" && wname != "f32" && wname != "fp8")
        throw ConfigError("gpu-bench: --weights '" + wname + "': expected bf16, f32 or fp8");
    opt.dtype = wname == "f32" ? WeightDtype::F32 : wname == "fp8" ? WeightDtype::FP8 : WeightDtype::BF16;
    // decode steps are averaged (0 gives NaN rates, which the JSON report turns into null) and
    // the MTP part feeds prompt - 1 tokens; a context past the model's would only fail after
    // the weights were generated.
    if (prompt < 2 || decode < 1)
        throw ConfigError("gpu-bench: --prompt must be at least 2 and --decode at least 1 (got " +
                          std::to_string(prompt) + ", " + std::to_string(decode) + ")");
    const int capacity = prompt + 2 * decode + 16;  // the longest of the runs below
    if (capacity > cfg.max_position_embeddings)
        throw ConfigError("gpu-bench: --prompt " + std::to_string(prompt) + " and --decode " + std::to_string(decode) +
                          " need " + std::to_string(capacity) + " positions, past the model's context of " +
                          std::to_string(cfg.max_position_embeddings) + " (max_position_embeddings)");

    json out;
    out["device"] = name;
    out["config"] = which;
    out["weights"] = weight_dtype_name(opt.dtype);
    out["prompt_tokens"] = prompt;
    out["decode_tokens"] = decode;
    const int copy_mib = req.value("copy_mib", 1024);  // smaller only for the emulated check
    if (copy_mib < 1) throw ConfigError("gpu-bench: copy_mib must be at least 1");
    const double bw = copy_bandwidth(size_t(copy_mib) << 20);
    out["copy_bandwidth_GBps"] = bw / 1e9;

    double t0 = now_s();
    CudaBackend be(cfg, capacity, opt, 1234);
    if (opt.dtype == WeightDtype::FP8) out["fp8"] = be.notice();
    out["init_seconds"] = now_s() - t0;
    out["plan_GiB"] = {{"weights", double(be.plan().weights) / double(1ll << 30)},
                       {"cache", double(be.plan().cache) / double(1ll << 30)},
                       {"activations", double(be.plan().activations) / double(1ll << 30)}};
    std::mt19937 rng(7);
    std::vector<int> tokens(static_cast<size_t>(prompt));
    for (int& t : tokens) t = int(rng() % uint32_t(cfg.vocab_size));
    ForwardOptions fo;
    fo.all_logits = false;
    ForwardResult r;
    {  // warm-up: cuBLAS heuristics, first-launch costs
        auto c = be.new_cache(0, capacity);
        be.forward(tokens.data(), std::min(prompt, 64), *c, fo, r);
        int tk = argmax(r.logits.data(), cfg.vocab_size);
        for (int i = 0; i < 4; ++i) be.forward(&tk, 1, *c, fo, r);
    }
    // Prefill, each path once untimed at the full length first (heuristics, lazy module loads):
    // the per-expert loop for comparison, then the path in use, whose cache decoding continues.
    auto prefill = [&](BackendCache& c) {
        c.truncate(0);
        be.synchronize();
        const double s = now_s();
        be.forward(tokens.data(), prompt, c, fo, r);
        return now_s() - s;
    };
    auto cache = be.new_cache(0, capacity);
    const bool grouped = be.grouped_experts();
    if (grouped) {
        be.set_grouped_experts(false);
        prefill(*cache);
        out["prefill_tokens_per_s_per_expert_loop"] = prompt / prefill(*cache);
        be.set_grouped_experts(true);
    }
    prefill(*cache);
    const double t_prefill = prefill(*cache);
    out["prefill_tokens_per_s"] = prompt / t_prefill;
    out["prefill_seconds"] = t_prefill;
    out["prefill_experts"] = grouped ? "grouped GEMM" : "one GEMM per expert";
    out["prefill_experts_check"] = be.grouped_report();  // the self-check's result, or why it is off

    // Decoding as the Session does it: the logits stay on the device and pick() returns the id.
    const int first_token = argmax(r.logits.data(), cfg.vocab_size);
    ForwardOptions fd = fo;
    fd.host_logits = false;
    auto decode_loop = [&](BackendCache& c, int steps, bool telemetry) {
        be.set_telemetry(telemetry);
        int tk = first_token;
        const double s = now_s();
        for (int i = 0; i < steps; ++i) {
            be.forward(&tk, 1, c, fd, r);
            tk = be.pick(PickParams{}, {})[0].id;
        }
        return (now_s() - s) / steps;
    };
    // Kernels launched one by one, and replayed from CUDA graphs (the default, when the first
    // replay agrees with the launches); each with telemetry on and off. Two untimed steps first
    // capture and check the graph.
    auto measure = [&](bool graphs, bool telemetry) {
        be.set_graphs(graphs);
        cache->truncate(prompt);
        decode_loop(*cache, 2, telemetry);
        cache->truncate(prompt);
        return decode_loop(*cache, decode, telemetry);
    };
    const double launch_on = measure(false, true), launch_off = measure(false, false);
    double graph_on = 0, graph_off = 0, graph_no_pdl = 0;
    bool graphs_ok = false;
    const bool pdl = be.programmatic_launches();
    try {
        if (pdl) {  // the graphs without programmatic launches, for comparison
            be.set_programmatic_launches(false);
            graph_no_pdl = measure(true, true);
            be.set_programmatic_launches(true);
        }
        graph_on = measure(true, true);
        graph_off = measure(true, false);
        graphs_ok = be.graphs();
        if (!graphs_ok) out["cuda_graph_error"] = be.notice();
    } catch (const std::exception& e) {
        out["cuda_graph_error"] = e.what();
    }
    out["programmatic_launches"] = graphs_ok && be.programmatic_launches();
    out["programmatic_edges"] = be.programmatic_edges();
    if (pdl && !be.programmatic_launches()) out["programmatic_launches_error"] = be.notice();
    be.set_graphs(graphs_ok);
    be.set_telemetry(true);
    cache->truncate(prompt);
    const double step_on = graphs_ok ? graph_on : launch_on, step_off = graphs_ok ? graph_off : launch_off;
    out["decode_path"] = graphs_ok ? "cuda graphs" : "kernel launches";
    out["decode_tokens_per_s"] = 1.0 / step_on;
    out["decode_ms_per_token"] = step_on * 1e3;
    out["decode_tokens_per_s_launches"] = 1.0 / launch_on;
    out["decode_tokens_per_s_cuda_graph"] = graphs_ok ? 1.0 / graph_on : 0.0;
    out["decode_tokens_per_s_cuda_graph_without_pdl"] = graphs_ok && pdl ? 1.0 / graph_no_pdl : 0.0;
    out["telemetry_overhead_percent"] = 100.0 * (step_on - step_off) / step_off;
    out["decode_ms_per_token_without_telemetry"] = step_off * 1e3;
    {  // Where a decode step's device time goes: per op, summed over the layers, mean of 3 steps.
        const int64_t busy = req.value("profile_busy_iters", int64_t(10000000));  // ~20 ms on an H100
        std::vector<std::pair<std::string, double>> sum;
        const int reps = 3;
        for (int i = 0; i < reps; ++i) {
            cache->truncate(prompt);
            for (const auto& [op, us] : be.profile_step(&first_token, 1, *cache, fd, busy)) {
                auto it = std::find_if(sum.begin(), sum.end(), [&](const auto& p) { return p.first == op; });
                if (it == sum.end()) sum.push_back({op, us});
                else it->second += us;
            }
        }
        cache->truncate(prompt);
        json prof = json::array();
        double total = 0;
        for (const auto& [op, us] : sum) {
            prof.push_back({{"op", op}, {"us", us / reps}});
            total += us / reps;
        }
        out["decode_profile_us"] = prof;  // the step launched op by op behind a busy wait (no graph)
        out["decode_profile_total_us"] = total;
    }
    const int64_t bytes = decode_bytes(cfg, opt.dtype, prompt + decode / 2);
    out["decode_bytes_per_token"] = bytes;
    out["decode_bandwidth_GBps"] = double(bytes) / step_on / 1e9;
    out["decode_fraction_of_copy_bandwidth"] = double(bytes) / step_on / bw;

    if (cfg.num_nextn_predict_layers > 0) {
        // Draft cost: one MTP step; verify cost: a 2-token main step. Projected speed-up of
        // speculative decoding at DeepSeek's reported 85% acceptance of the drafted token
        // (random weights accept nothing, so acceptance cannot be measured here).
        cache->truncate(0);
        ForwardResult pr, mr;
        be.forward(tokens.data(), prompt, *cache, fo, pr);
        auto mc = be.new_cache(1, capacity);
        be.forward_mtp(1, pr.hidden.data(), tokens.data() + 1, prompt - 1, *mc, fo, mr);
        const int D = cfg.hidden_size;
        std::vector<float> h_last(pr.hidden.end() - D, pr.hidden.end());
        int tk = argmax(pr.logits.data(), cfg.vocab_size);
        const int steps = std::max(1, decode / 2);
        auto draft = [&] {
            be.forward_mtp(1, h_last.data(), &tk, 1, *mc, fd, mr);
            h_last.assign(mr.hidden.begin(), mr.hidden.end());
            be.pick(PickParams{}, {});
        };
        draft();  // untimed: graph capture and check
        double s = now_s();
        for (int i = 0; i < steps; ++i) draft();
        const double t_draft = (now_s() - s) / steps;
        int two[2] = {tk, tk};
        ForwardOptions fv = fd;
        fv.all_logits = true;
        auto verify = [&] {
            be.forward(two, 2, *cache, fv, pr);
            be.pick(PickParams{}, {});
        };
        verify();
        s = now_s();
        for (int i = 0; i < steps; ++i) verify();
        const double t_verify = (now_s() - s) / steps;
        const double a = 0.85;
        out["mtp"] = {{"draft_ms", t_draft * 1e3},
                      {"verify_2_tokens_ms", t_verify * 1e3},
                      {"assumed_acceptance", a},
                      {"projected_speedup", (1.0 + a) * step_on / (t_verify + t_draft)}};
    }
    return out;
}

}  // namespace
}  // namespace moescope::cuda

extern "C" int moescope_cuda_bench(const char* request_json, char* out, size_t out_len, char* err, size_t err_len) {
    try {
        nlohmann::json req = request_json && *request_json ? nlohmann::json::parse(request_json) : nlohmann::json::object();
        std::string s = moescope::cuda::run_bench(req).dump(2);
        if (s.size() + 1 > out_len) throw moescope::Error("gpu-bench: the report does not fit the output buffer");
        std::snprintf(out, out_len, "%s", s.c_str());
        return 0;
    } catch (const std::exception& e) {
        if (err && err_len) std::snprintf(err, err_len, "%s", e.what());
        return 1;
    } catch (...) {  // nothing may unwind through a C entry point
        if (err && err_len) std::snprintf(err, err_len, "%s", "gpu-bench: unknown exception");
        return 1;
    }
}
