// Backward passes of the CPU reference, llm.c style: each *_backward mirrors a forward
// concept of ops.h / mla.h / moe.h with d-names. Parameter gradients are accumulated (+=),
// activation gradients are written (=) unless `accumulate_dx` says to add. The activations a
// backward needs are kept by the training forward (engine/train/train_forward.h) in the *Acts
// structs declared here, so forward and backward agree on one layout.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "engine/config.h"
#include "engine/model/mla.h"
#include "engine/model/moe.h"
#include "engine/model/rope.h"
#include "engine/weights.h"

namespace moescope {

// Runs fn(0..n-1) on up to `threads` threads (the calling one included). For loops whose
// iterations write disjoint outputs (attention of different sequences / heads), so results do
// not depend on the thread count. fn must not throw.
template <class F>
void parallel_for(int n, int threads, F&& fn) {
    const int nt = std::min(n, std::max(1, threads));
    if (nt <= 1) {
        for (int i = 0; i < n; ++i) fn(i);
        return;
    }
    std::atomic<int> next{0};
    auto work = [&] {
        for (int i; (i = next.fetch_add(1)) < n;) fn(i);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < nt; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
}

// ---- elementary ops (ops_backward.cpp) ----

// y[T, out] = x[T, in] W^T:  dx (=|+=) dy W,  dW += dy^T x.  dx or dW may be null.
void matmul_nt_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int out,
                        int in, bool accumulate_dx = false);
void linear_backward(float* dx, Tensor* dW, const float* dy, const float* x, const Tensor& W, int T,
                     bool accumulate_dx = false);

// out = x * r * w with r = 1/sqrt(mean(x^2) + eps):
//   dw_i += dy_i x_i r,   dx_i = r (dy_i w_i) - r^3 / n * x_i * sum_j dy_j w_j x_j.
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w, int T, int n,
                      float eps, bool accumulate_dx = false);

// out = silu(g) * u:  dg = dout * u * silu'(g),  du = dout * silu(g).
void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u, int64_t n);

// Cross-entropy of logits[T, V] against targets (a target < 0 is skipped), each row weighted
// by `weight`. Returns sum of weight * CE; overwrites `logits` with d(loss)/d(logits).
double cross_entropy_forward_backward(float* logits, const int* targets, int T, int V, float weight);

// h[t] = E[tokens[t]]:  dE[tokens[t]] += dh[t].
void embedding_backward(Tensor& dE, const float* dh, const int* tokens, int T);

// ---- dense MLP / expert (moe_backward.cpp) ----

struct MlpActs {
    int T = 0;
    std::vector<float> x;  // [T, D] input
    std::vector<float> g;  // [T, I] gate_proj(x), before silu
    std::vector<float> u;  // [T, I] up_proj(x)
    std::vector<float> a;  // [T, I] silu(g) * u, the input of down_proj
};

// dx (=|+=) d(down(silu(gate x) * up x))/dx;  weight gradients into dw (+=).
void mlp_backward(float* dx, MlpWeights& dw, const float* dout, const MlpWeights& w, const MlpActs& acts,
                  bool accumulate_dx = false);

// ---- DeepSeekMoE ----

struct MoeActs {
    int T = 0;
    std::vector<float> x;                  // [T, D] input (post-attention-normed hidden)
    Routing r;                             // ids, mixing weights, scores [T, E] (kept)
    std::vector<std::vector<int>> rows;   // per expert: the (t * k + i) rows routed to it
    std::vector<MlpActs> experts;          // per expert, over its rows
    std::vector<std::vector<float>> y;     // per expert [n_e, D]: E_e(x) of its rows
    MlpActs shared;                        // shared experts (T rows; unused when absent)
    std::vector<float> dscores_extra;      // [T, E] gradient of extra losses w.r.t. scores (aux losses), or empty
};

// The task order of the expert-parallel path: the shared experts (-1) when present, then the
// routed experts, most rows first (they bound the wall time).
std::vector<int> busiest_first(const std::vector<std::vector<int>>& rows, bool shared);

// The mixing weights w_i = rsf * s_i / sum_chosen(s) (or rsf * s_i) carry the gradient into the
// router: ds from dw through the normalization, then through sigmoid / softmax into the gate.
// The bias only chose the experts: it gets no gradient.
//
// The experts (shared ones included) run as parallel_tasks on expert_threads threads (ops.h),
// so each one's products are single-threaded sgemm calls whatever the thread count: threaded
// OpenBLAS cuts long sums (dW over T rows) into other blocks and rounds differently. The bits
// do not depend on expert_threads: each expert's gradients are its own, and the routed
// experts' dx rows are added after the shared experts' part, in expert order.
void moe_backward(float* dx, MoeWeights& dw, const float* dout, const MoeWeights& w, const MoeActs& acts,
                  const RouterDims& rd, const ModelConfig& cfg, bool accumulate_dx = false, int expert_threads = 1);

// Mixing-weight gradient into router-logit gradient for one token: dweights[k] -> dlogits[E]
// (adds dscores[E] of extra losses first when given).
void router_backward(float* dlogits, const float* dweights, const float* dscores_extra, const float* scores,
                     const int* ids, const RouterDims& rd);

// ---- MLA (naive path; training runs whole sequences from position 0) ----

struct MlaActs {
    int B = 0, T = 0;           // B sequences of T tokens, token t at position t
    std::vector<float> x;       // [B*T, D] input (input-normed hidden)
    std::vector<float> qa;      // [B*T, q_lora] q_a_proj(x) before q_a_layernorm
    std::vector<float> qa_n;    // [B*T, q_lora] after it
    std::vector<float> q;       // [B*T, H, d_nope + d_rope] after rope
    std::vector<float> kva;     // [B*T, d_c + d_rope] kv_a_proj_with_mqa(x)
    std::vector<float> c;       // [B*T, d_c] kv_a_layernorm(latent)
    std::vector<float> kpe;     // [B*T, d_rope] rope'd k_pe
    std::vector<float> kv;      // [B*T, H, d_nope + d_v] kv_b_proj(c)
    std::vector<float> p;       // [B, H, T, T] attention probabilities (causal)
    std::vector<float> o;       // [B*T, H, d_v] per-head outputs before o_proj
};

void mla_backward(float* dx, AttentionWeights& dw, const float* dout, const AttentionWeights& w, const MlaDims& d,
                  const Rope& rope, const MlaActs& acts, bool accumulate_dx = false);

}  // namespace moescope
