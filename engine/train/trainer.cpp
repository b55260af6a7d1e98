// The training loop, validation, telemetry and resumable checkpoints.
#include "engine/train/trainer.h"

#include <chrono>
#include <cmath>
#include <fstream>
#include <sstream>

#include "engine/safetensors.h"

namespace moescope {
namespace fs = std::filesystem;

nlohmann::json TrainOptions::to_json() const {
    return {{"steps", steps},
            {"batch", batch},
            {"seq_len", seq_len},
            {"grad_accum", grad_accum},
            {"lr", lr},
            {"min_lr", min_lr},
            {"warmup", warmup},
            {"beta1", adam.beta1},
            {"beta2", adam.beta2},
            {"adam_eps", adam.eps},
            {"weight_decay", adam.weight_decay},
            {"clip", clip},
            {"mtp_weight", loss.mtp_weight},
            {"balance", balance_mode_name(loss.balance)},
            {"alpha", loss.alpha},
            {"gamma", gamma},
            {"gamma_until", gamma_until},
            {"eval_every", eval_every},
            {"eval_windows", eval_windows},
            {"val_fraction", val_fraction},
            {"seed", seed},
            {"deterministic", deterministic},
            {"init_std", init_std},
            {"out_dir", out_dir.string()},
            {"tokenizer", tokenizer.string()}};
}

TrainOptions TrainOptions::from_json(const nlohmann::json& j) {
    TrainOptions o;
    try {
        o.steps = j.at("steps");
        o.batch = j.at("batch");
        o.seq_len = j.at("seq_len");
        o.grad_accum = j.at("grad_accum");
        o.lr = j.at("lr");
        o.min_lr = j.at("min_lr");
        o.warmup = j.at("warmup");
        o.adam.beta1 = j.at("beta1");
        o.adam.beta2 = j.at("beta2");
        o.adam.eps = j.at("adam_eps");
        o.adam.weight_decay = j.at("weight_decay");
        o.clip = j.at("clip");
        o.loss.mtp_weight = j.at("mtp_weight");
        o.loss.balance = parse_balance_mode(j.at("balance"));
        o.loss.alpha = j.at("alpha");
        o.gamma = j.at("gamma");
        o.gamma_until = j.at("gamma_until");
        o.eval_every = j.at("eval_every");
        o.eval_windows = j.at("eval_windows");
        o.val_fraction = j.at("val_fraction");
        o.seed = j.at("seed");
        o.deterministic = j.value("deterministic", false);  // checkpoints from before it existed ran without
        o.init_std = j.at("init_std");
        o.out_dir = j.at("out_dir").get<std::string>();
        o.tokenizer = j.at("tokenizer").get<std::string>();
    } catch (const nlohmann::json::exception& e) {
        throw FormatError(std::string("trainer_state.json: options: ") + e.what());
    }
    return o;
}

Trainer::Trainer(ModelConfig cfg, TrainOptions opt, std::vector<int> tokens, TelemetrySink* sink)
    : Trainer(cfg, opt, TokenDataset(std::move(tokens), opt.val_fraction, opt.seq_len), sink,
              init_weights(cfg, opt.seed, opt.init_std)) {}

Trainer::Trainer(ModelConfig cfg, TrainOptions opt, TokenDataset data, TelemetrySink* sink, Weights w)
    : cfg_(std::move(cfg)), opt_(std::move(opt)), data_(std::move(data)), sink_(sink), w_(std::move(w)),
      graph_(cfg_), rng_(opt_.seed ^ 0x9E3779B97F4A7C15ull) {
    graph_.set_fixed_order(opt_.deterministic);
    if (opt_.batch < 1 || opt_.seq_len < 2 || opt_.grad_accum < 1 || opt_.steps < 1)
        throw ConfigError("training options: batch, grad_accum and steps must be >= 1 and seq_len >= 2");
    if (opt_.loss.balance == BalanceMode::AuxFree && cfg_.n_routed_experts > 0 && !cfg_.has_bias())
        throw ConfigError(cfg_.source + ": --balance aux-free needs topk_method \"noaux_tc\" (the router bias); found \"" +
                          cfg_.topk_method + "\"");
    for (int n : data_.tokens())
        if (n < 0 || n >= cfg_.vocab_size)
            throw ConfigError("corpus token id " + std::to_string(n) + " does not fit vocab_size " +
                              std::to_string(cfg_.vocab_size) + " of " + cfg_.source);
    g_ = zeros_like(w_, cfg_);
    adam_ = std::make_unique<AdamW>(w_, cfg_, opt_.adam);
}

Tensor* Trainer::router_bias(int layer) {
    const int L = cfg_.num_hidden_layers;
    LayerWeights& lw = layer < L ? w_.layers[size_t(layer)] : w_.mtp[size_t(layer - L)].layer;
    return lw.moe.e_score_correction_bias.empty() ? nullptr : &lw.moe.e_score_correction_bias;
}

StepStats Trainer::step() {
    const auto t0 = std::chrono::steady_clock::now();
    StepStats s;
    zero_grads(g_, cfg_);
    const float scale = 1.0f / float(opt_.grad_accum);
    for (int a = 0; a < opt_.grad_accum; ++a) {
        data_.sample_batch(batch_, opt_.batch, opt_.seq_len, rng_);
        LossResult r = graph_.run(w_, batch_.data(), opt_.batch, opt_.seq_len, opt_.loss, &g_, scale);
        s.loss += r.loss * scale;
        s.ce += r.ce * scale;
        s.mtp_ce += r.mtp_ce * scale;
        s.aux += r.aux * scale;
        if (a == 0) {
            s.moe_layers = r.moe_layers;
            s.loads = r.loads;
        } else {
            for (size_t l = 0; l < s.loads.size(); ++l)
                for (size_t e = 0; e < s.loads[l].size(); ++e) s.loads[l][e] += r.loads[l][e];
        }
    }
    s.grad_norm = grad_global_norm(g_, cfg_);
    if (!std::isfinite(s.loss) || !std::isfinite(s.grad_norm))
        throw DivergenceError("training diverged at step " + std::to_string(step_ + 1) + ": loss " +
                              std::to_string(s.loss) + ", gradient norm " + std::to_string(s.grad_norm) +
                              "; the step was not applied" +
                              (opt_.out_dir.empty() ? std::string()
                                                    : "; the last good checkpoint is " + checkpoint_dir().string()) +
                              " (try a lower --lr)");
    if (opt_.clip > 0 && s.grad_norm > opt_.clip) scale_grads(g_, cfg_, float(opt_.clip / s.grad_norm));
    s.lr = lr_schedule(step_, opt_.warmup, opt_.steps, opt_.lr, opt_.min_lr);
    adam_->update(w_, g_, s.lr, step_ + 1);
    if (opt_.loss.balance == BalanceMode::AuxFree) {
        s.gamma = double(step_) < opt_.gamma_until * double(opt_.steps) ? opt_.gamma : 0.0;
        for (size_t l = 0; l < s.moe_layers.size(); ++l)
            if (Tensor* b = router_bias(s.moe_layers[l])) update_router_bias(b->ptr(), s.loads[l], s.gamma);
    }
    ++step_;
    s.step = step_;
    int main_layers = 0;
    for (size_t l = 0; l < s.moe_layers.size(); ++l)
        if (s.moe_layers[l] < cfg_.num_hidden_layers) {
            s.maxvio_batch += max_vio(s.loads[l]);
            ++main_layers;
        }
    if (main_layers) s.maxvio_batch /= main_layers;
    s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    s.tokens_per_s = double(opt_.batch) * opt_.seq_len * opt_.grad_accum / std::max(1e-9, s.seconds);
    emit_step(s);
    const bool due = (opt_.eval_every > 0 && step_ % opt_.eval_every == 0) || step_ == opt_.steps;
    if (due) {
        evaluate();
        s.evaluated = true;
        if (!opt_.out_dir.empty()) save(checkpoint_dir());
    }
    return s;
}

void Trainer::emit_step(const StepStats& s) {
    if (!sink_) return;
    TrainRecord tr;
    tr.step = s.step;
    tr.loss = s.loss;
    tr.mtp_loss = s.mtp_ce;
    tr.aux_loss = s.aux;
    tr.lr = s.lr;
    tr.grad_norm = s.grad_norm;
    tr.tokens_per_s = s.tokens_per_s;
    tr.maxvio_batch = s.maxvio_batch;
    sink_->record(tr);
    for (size_t l = 0; l < s.moe_layers.size(); ++l) {
        LoadRecord lr;
        lr.step = s.step;
        lr.layer = s.moe_layers[l];
        lr.counts = s.loads[l];
        sink_->record(lr);
        if (opt_.loss.balance == BalanceMode::AuxFree)
            if (Tensor* b = router_bias(s.moe_layers[l])) {
                BiasRecord br;
                br.step = s.step;
                br.layer = s.moe_layers[l];
                br.bias = b->data;
                sink_->record(br);
            }
    }
}

EvalStats Trainer::evaluate() {
    EvalStats ev;
    ev.step = step_;
    std::vector<int> win;
    const int T = opt_.seq_len;
    ev.windows = data_.validation_windows(win, T, opt_.eval_windows);
    LossOptions lo = opt_.loss;
    lo.mtp_weight = 0;  // validation loss is the main model's next-token CE
    lo.balance = BalanceMode::None;
    std::vector<std::vector<int64_t>> loads;
    std::vector<int> layers;
    double ce = 0;
    const int chunk = std::max(1, opt_.batch);
    for (int i = 0; i < ev.windows; i += chunk) {
        const int B = std::min(chunk, ev.windows - i);
        LossResult r = graph_.run(w_, win.data() + size_t(i) * T, B, T, lo, nullptr);
        ce += r.ce * B;
        if (loads.empty()) {
            loads = r.loads;
            layers = r.moe_layers;
        } else {
            for (size_t l = 0; l < loads.size(); ++l)
                for (size_t e = 0; e < loads[l].size(); ++e) loads[l][e] += r.loads[l][e];
        }
    }
    ev.val_loss = ev.windows ? ce / ev.windows : 0;
    ev.perplexity = std::exp(ev.val_loss);
    for (size_t l = 0; l < loads.size(); ++l)
        if (layers[l] < cfg_.num_hidden_layers) ev.maxvio_per_layer.push_back(max_vio(loads[l]));
    for (double v : ev.maxvio_per_layer) ev.maxvio_global += v / double(ev.maxvio_per_layer.size());
    last_eval_ = ev;
    if (sink_) {
        EvalRecord er;
        er.step = ev.step;
        er.val_loss = ev.val_loss;
        er.maxvio_global = ev.maxvio_global;
        sink_->record(er);
    }
    return ev;
}

void Trainer::run(const std::function<void(const StepStats&)>& on_step) {
    bool saved = true;
    while (!done() && !cancel_) {
        StepStats s = step();
        saved = s.evaluated;
        if (on_step) on_step(s);
    }
    if (!saved && !opt_.out_dir.empty()) save(checkpoint_dir());
}

std::shared_ptr<Model> Trainer::model() const { return std::make_shared<Model>(cfg_, w_); }

fs::path Trainer::checkpoint_dir() const { return opt_.out_dir / "checkpoint"; }

namespace {

fs::path with_suffix(const fs::path& dir, const char* suffix) {
    fs::path d = dir;
    if (!d.has_filename()) d = d.parent_path();
    return d.parent_path() / (d.filename().string() + suffix);
}

}  // namespace

bool recover_checkpoint(const fs::path& dir) {
    const fs::path tmp = with_suffix(dir, ".tmp"), old = with_suffix(dir, ".old");
    if (!fs::exists(dir) && fs::exists(old)) fs::rename(old, dir);
    fs::remove_all(tmp);
    return fs::exists(dir / "trainer_state.json");
}

void Trainer::save(const fs::path& dir) {
    const fs::path tmp = with_suffix(dir, ".tmp"), old = with_suffix(dir, ".old");
    recover_checkpoint(dir);
    fs::create_directories(tmp);
    auto hook = [&](const char* what) {
        if (opt_.save_hook) opt_.save_hook(what);
    };
    hook("model");
    save_checkpoint(tmp, cfg_, w_, SaveFormat::F32);
    if (!opt_.tokenizer.empty()) {
        const fs::path src = fs::is_directory(opt_.tokenizer) ? opt_.tokenizer : opt_.tokenizer.parent_path();
        for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
            if (fs::exists(src / f)) fs::copy_file(src / f, tmp / f, fs::copy_options::overwrite_existing);
    }
    hook("optimizer");
    std::vector<TensorToWrite> opt_tensors;
    auto tm = tensor_table(adam_->m(), cfg_), tv = tensor_table(adam_->v(), cfg_);
    for (size_t i = 0; i < tm.size(); ++i) {
        if (tm[i].tensor->empty()) continue;
        opt_tensors.push_back(make_tensor("exp_avg." + tm[i].name, DType::F32, tm[i].tensor->shape, tm[i].tensor->ptr()));
        opt_tensors.push_back(
            make_tensor("exp_avg_sq." + tv[i].name, DType::F32, tv[i].tensor->shape, tv[i].tensor->ptr()));
    }
    write_safetensors(tmp / "optimizer.safetensors", opt_tensors, {{"step", std::to_string(step_)}});
    hook("state");
    std::ostringstream rng;
    rng << rng_;
    nlohmann::json st = {{"format", "moescope-trainer-state/1"},
                         {"step", step_},
                         {"rng", rng.str()},
                         {"data_fingerprint", std::to_string(data_.fingerprint())},
                         {"data_tokens", data_.size()},
                         {"options", opt_.to_json()},
                         {"last_eval",
                          {{"step", last_eval_.step},
                           {"val_loss", last_eval_.val_loss},
                           {"maxvio_global", last_eval_.maxvio_global}}}};
    write_file_atomic(tmp / "trainer_state.json", st.dump(2));
    hook("swap");
    if (fs::exists(dir)) {
        fs::remove_all(old);
        fs::rename(dir, old);
    }
    fs::rename(tmp, dir);
    fs::remove_all(old);
}

std::unique_ptr<Trainer> Trainer::resume(const fs::path& dir, std::vector<int> tokens, TelemetrySink* sink,
                                         int64_t steps) {
    if (!recover_checkpoint(dir)) throw FormatError(dir.string() + ": no trainer_state.json (not a training checkpoint)");
    std::ifstream in(dir / "trainer_state.json");
    std::stringstream ss;
    ss << in.rdbuf();
    nlohmann::json st;
    try {
        st = nlohmann::json::parse(ss.str());
    } catch (const nlohmann::json::exception& e) {
        throw FormatError((dir / "trainer_state.json").string() + ": " + e.what());
    }
    TrainOptions opt = TrainOptions::from_json(st.at("options"));
    if (steps > 0) opt.steps = steps;
    ModelConfig cfg = ModelConfig::load(dir);
    Checkpoint ck = Checkpoint::open(dir);
    Weights w = load_weights(cfg, ck);
    TokenDataset data(std::move(tokens), opt.val_fraction, opt.seq_len);
    if (std::to_string(data.fingerprint()) != st.at("data_fingerprint").get<std::string>())
        throw ConfigError(dir.string() + ": the corpus differs from the one this run was trained on (" +
                          std::to_string(data.size()) + " tokens now, " +
                          std::to_string(st.at("data_tokens").get<int64_t>()) + " then); resume needs the same "
                          "--corpus files and tokenizer");
    std::unique_ptr<Trainer> t(new Trainer(cfg, opt, std::move(data), sink, std::move(w)));
    Checkpoint oc = Checkpoint::open(dir / "optimizer.safetensors");
    auto tm = tensor_table(t->adam_->m(), cfg), tv = tensor_table(t->adam_->v(), cfg);
    for (size_t i = 0; i < tm.size(); ++i) {
        if (tm[i].tensor->empty()) continue;
        tm[i].tensor->data = oc.read_f32("exp_avg." + tm[i].name);
        tv[i].tensor->data = oc.read_f32("exp_avg_sq." + tv[i].name);
        if (tm[i].tensor->data.size() != size_t(tm[i].tensor->numel()) || tv[i].tensor->data.size() != tm[i].tensor->data.size())
            throw ShapeError((dir / "optimizer.safetensors").string() + ": moments of '" + tm[i].name +
                             "' do not match the weights");
    }
    t->step_ = st.at("step").get<int64_t>();
    std::istringstream rs(st.at("rng").get<std::string>());
    rs >> t->rng_;
    t->last_eval_.step = st["last_eval"].value("step", int64_t(0));
    t->last_eval_.val_loss = st["last_eval"].value("val_loss", 0.0);
    t->last_eval_.maxvio_global = st["last_eval"].value("maxvio_global", 0.0);
    return t;
}

double bench_train_tokens_per_s(const ModelConfig& cfg, int batch, int seq, int steps) {
    std::mt19937_64 rng(1);
    std::vector<int> tokens(size_t(batch) * seq * 8 + size_t(seq) * 4);
    for (auto& t : tokens) t = int(rng() % uint64_t(cfg.vocab_size));
    TrainOptions opt;
    opt.batch = batch;
    opt.seq_len = seq;
    opt.steps = steps + 1;
    opt.eval_every = 0;
    opt.val_fraction = 0;
    if (!cfg.has_bias()) opt.loss.balance = BalanceMode::None;
    Trainer t(cfg, opt, std::move(tokens));
    t.step();  // warm-up: allocations, BLAS threads
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) {
        // The last step would evaluate; an empty validation split makes that free.
        t.step();
    }
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return double(batch) * seq * steps / std::max(1e-9, sec);
}

}  // namespace moescope
