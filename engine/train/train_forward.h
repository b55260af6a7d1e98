// The training forward and backward of the whole model: the same math as Model::forward
// (engine/model/model.cpp) over the same primitives (ops.h, rope.h, route() of moe.h), but
// keeping the activations the backward passes of engine/model/backward.h need, for B
// sequences of T tokens at positions 0..T-1 (naive MLA). The loss is
//   L = CE_main + (mtp_weight / D) * sum_k CE_k + balance loss,
// CE_main the mean next-token CE over positions 0..T-2 of every sequence, CE_k the mean CE of
// MTP module k over the positions where its target t_{i+k+1} exists.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "engine/config.h"
#include "engine/model/backward.h"
#include "engine/model/mla.h"
#include "engine/model/moe.h"
#include "engine/model/ops.h"
#include "engine/model/rope.h"
#include "engine/weights.h"

namespace moescope {

enum class BalanceMode {
    AuxFree,  // bias_e += gamma * sign(mean_load - load_e) after each step (DeepSeek-V3)
    AuxLoss,  // alpha * E * sum_e f_e * P_e over the batch
    SeqAux,   // the same per sequence, averaged over the batch's sequences (V3's complementary loss)
    None,
};
const char* balance_mode_name(BalanceMode m);
BalanceMode parse_balance_mode(const std::string& s);  // ConfigError on an unknown name

struct LayerActs {
    bool is_moe = false;
    std::vector<float> h_in;   // [N, D] residual stream entering the layer
    std::vector<float> h_mid;  // [N, D] after the attention residual
    MlaActs attn;              // attn.x = RMSNorm_in(h_in)
    MlpActs mlp;               // dense layers, mlp.x = RMSNorm_post(h_mid)
    MoeActs moe;               // MoE layers,   moe.x = RMSNorm_post(h_mid)
};

// Forwards that keep activations. out[T, D] (= written).
void mlp_forward_train(float* out, const float* x, int T, const MlpWeights& w, MlpActs& acts);
void mla_forward_train(float* out, const float* x, int B, int T, const AttentionWeights& w, const MlaDims& d,
                       const Rope& rope, MlaActs& acts);
// bias may be null (no noaux_tc bias). The experts (shared ones included) run as
// parallel_tasks on expert_threads threads (ops.h), each with single-threaded sgemm, as in
// moe_backward. The bits do not depend on expert_threads: each expert's activations are its
// own, and the routed experts' rows are added to the shared experts' output afterwards, in
// expert order.
void moe_forward_train(float* out, const float* x, int T, const MoeWeights& w, const float* bias,
                       const RouterDims& rd, const ModelConfig& cfg, MoeActs& acts, int expert_threads = 1);

// The balance loss alpha * E * sum_e f_e * P_e of the tokens [t0, t1) of one MoE layer:
// f_e = share of the (token, slot) assignments that went to e, P_e = mean normalized score
// (sigmoid scores divided by their sum over experts; softmax scores as they are). f is a count:
// only P carries gradient, added (times grad_scale) to dscores[T, E]. Returns the loss.
double balance_loss(float* dscores, const Routing& r, int t0, int t1, double alpha, bool sigmoid_scores,
                    float grad_scale);

struct LossOptions {
    double mtp_weight = 0.3;               // lambda; the MTP term is lambda / D * sum_k CE_k
    BalanceMode balance = BalanceMode::AuxFree;
    double alpha = 1e-3;                   // balance-loss coefficient (AuxLoss, SeqAux)
    bool keep_routing_ids = false;         // LossResult::routing_ids (gradient checks)
};

struct LossResult {
    double loss = 0;                       // the total training loss
    double ce = 0;                         // main next-token CE
    double mtp_ce = 0;                     // mean over modules of CE_k (0 without MTP)
    double aux = 0;                        // balance loss (summed over MoE layers)
    std::vector<double> mtp_ce_k;          // [D]
    std::vector<int> moe_layers;           // decoder layer index of each MoE layer (MTP k: L + k - 1)
    std::vector<std::vector<int64_t>> loads;  // [moe layers][E] tokens routed per expert
    std::vector<int> routing_ids;          // every chosen expert id, in order (when asked)
    int64_t tokens = 0;                    // B * T
};

// Model-level training math. Not thread-safe (holds the activations of the last call).
class TrainGraph {
public:
    explicit TrainGraph(const ModelConfig& cfg);
    const ModelConfig& config() const { return cfg_; }

    // How many threads run the experts of a MoE layer at once (moe_forward_train,
    // moe_backward): 0 (the default) follows num_threads(), n >= 1 fixes it (1: one after the
    // other). Changes speed only, never a bit of the results.
    void set_expert_threads(int n) { expert_threads_ = std::max(0, n); }
    int expert_threads() const { return expert_threads_ > 0 ? expert_threads_ : num_threads(); }
    // Every product of run() in fixed blocks (FixedOrderProducts): results independent of the
    // thread count, at some speed (products narrower than a block lose OpenBLAS's threads).
    void set_fixed_order(bool on) { fixed_order_ = on; }

    // tokens[B, T]. When `grads` is given, adds grad_scale * dLoss/dParam to it (same layout
    // as `w`, see zeros_like). The routers use the e_score_correction_bias tensors of `w`.
    LossResult run(const Weights& w, const int* tokens, int B, int T, const LossOptions& opt, Weights* grads,
                   float grad_scale = 1.0f);

    // Main-model logits [B*T, V] of the last run (before the backward overwrote them: only
    // valid after a run without grads).
    const std::vector<float>& last_logits() const { return logits_; }

private:
    void layer_forward(float* h, int B, int T, const LayerWeights& L, LayerActs& a) const;
    void layer_backward(float* dh, LayerWeights& dL, const LayerWeights& L, const LayerActs& a) const;

    ModelConfig cfg_;
    Rope rope_;
    MlaDims mla_;
    RouterDims router_;
    std::vector<LayerActs> acts_;      // main layers
    std::vector<LayerActs> mtp_acts_;  // one per MTP module
    std::vector<float> logits_;
    int expert_threads_ = 0;
    bool fixed_order_ = false;
};

// Zero tensors shaped like every non-empty tensor of w (optional MTP copies included).
Weights zeros_like(Weights& w, const ModelConfig& cfg);

}  // namespace moescope
