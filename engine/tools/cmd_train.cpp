// moescope-cli train / grad: training from scratch with a progress bar and JSONL telemetry,
// and the gradient of the training loss of one sequence (for checks against other frameworks).
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "engine/config.h"
#include "engine/model/ops.h"
#include "engine/safetensors.h"
#include "engine/telemetry.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tools/cli.h"
#include "engine/train/trainer.h"

namespace moescope::cli {
namespace {

std::string hms(double s) {
    if (!std::isfinite(s) || s < 0) return "--:--";
    const long t = long(s + 0.5);
    char buf[32];
    if (t >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else std::snprintf(buf, sizeof buf, "%02ld:%02ld", t / 60, t % 60);
    return buf;
}

int cmd_train(const std::vector<std::string>& argv) {
    Args a(argv, {"resume", "json", "quiet", "deterministic", "no-deterministic"});
    a.check_known({"config", "corpus", "steps", "out", "tokenizer", "vocab", "balance", "gamma", "gamma-until",
                   "alpha", "mtp-weight", "lr", "min-lr", "warmup", "batch", "seq-len", "grad-accum", "eval-every",
                   "eval-windows", "val-fraction", "seed", "telemetry", "threads", "weight-decay", "clip",
                   "init-std"});
    std::vector<std::filesystem::path> corpus;
    for (const auto& c : a.get_all("corpus")) corpus.emplace_back(c);
    for (const auto& p : a.positional()) corpus.emplace_back(p);
    if (corpus.empty()) throw UsageError("--corpus FILE... is required");
    const auto out = a.get("out");
    if (!out) throw UsageError("--out DIR is required");
    if (a.has("threads")) set_num_threads(int(a.integer("threads", 0)));
    std::unique_ptr<Tokenizer> tok;
    if (auto tp = a.get("tokenizer")) tok = std::make_unique<Tokenizer>(Tokenizer::load(*tp));
    if (tok && a.has("vocab")) throw UsageError("give --tokenizer or --vocab, not both");
    std::vector<int> tokens = tokenize_corpus(corpus, tok.get());
    std::unique_ptr<JsonlWriter> telemetry;
    if (auto tp = a.get("telemetry")) telemetry = std::make_unique<JsonlWriter>(*tp);
    std::unique_ptr<Trainer> trainer;
    const std::filesystem::path out_dir = *out;
    if (a.has("resume")) {
        trainer = Trainer::resume(out_dir / "checkpoint", std::move(tokens), telemetry.get(), a.integer("steps", 0));
        std::fprintf(stderr, "resuming %s at step %lld\n", (out_dir / "checkpoint").c_str(),
                     (long long)trainer->step_count());
    } else {
        const auto cp = a.get("config");
        if (!cp) throw UsageError("--config CONFIG.json is required (or --resume)");
        ModelConfig cfg = ModelConfig::load(*cp);
        if (tok) {
            cfg.vocab_size = tok->vocab_size();
            if (tok->bos_id()) cfg.bos_token_id = *tok->bos_id();
            if (tok->eos_id()) cfg.eos_token_id = *tok->eos_id();
        } else {
            cfg.vocab_size = int(a.integer("vocab", 256));
            if (cfg.vocab_size < 256) throw UsageError("--vocab must be at least 256 for byte-level training");
        }
        cfg.validate();
        TrainOptions o;
        o.steps = a.integer("steps", 1000);
        o.batch = int(a.integer("batch", o.batch));
        o.seq_len = int(a.integer("seq-len", o.seq_len));
        o.grad_accum = int(a.integer("grad-accum", o.grad_accum));
        o.lr = a.number("lr", o.lr);
        o.min_lr = a.number("min-lr", o.lr * 0.1);
        o.warmup = a.integer("warmup", std::min<int64_t>(o.warmup, o.steps / 10));
        o.adam.weight_decay = a.number("weight-decay", o.adam.weight_decay);
        o.clip = a.number("clip", o.clip);
        o.loss.balance = parse_balance_mode(a.get_or("balance", cfg.has_bias() ? "aux-free" : "aux-loss"));
        o.loss.alpha = a.number("alpha", o.loss.balance == BalanceMode::SeqAux ? 1e-4 : 1e-3);
        o.loss.mtp_weight = a.number("mtp-weight", o.loss.mtp_weight);
        o.gamma = a.number("gamma", o.gamma);
        o.gamma_until = a.number("gamma-until", o.gamma_until);
        o.eval_every = a.integer("eval-every", o.eval_every);
        o.eval_windows = int(a.integer("eval-windows", o.eval_windows));
        o.val_fraction = a.number("val-fraction", o.val_fraction);
        o.seed = uint64_t(a.integer("seed", 1));
        if (a.has("deterministic") && a.has("no-deterministic"))
            throw UsageError("give --deterministic (the default) or --no-deterministic, not both");
        o.deterministic = !a.has("no-deterministic");
        o.init_std = a.number("init-std", o.init_std);
        o.out_dir = out_dir;
        if (auto tp = a.get("tokenizer")) o.tokenizer = *tp;
        trainer = std::make_unique<Trainer>(cfg, o, std::move(tokens), telemetry.get());
        if (telemetry) {
            MetaRecord m;
            m.card = model_card(cfg).to_json(cfg);
            m.config = cfg.to_json();
            m.settings = o.to_json();
            m.settings["mode"] = "train";
            telemetry->record(m);
        }
    }
    const auto& o = trainer->options();
    const ModelCard card = model_card(trainer->config());
    std::fprintf(stderr, "training %s parameters (+%s MTP) on %lld tokens (%lld held out), %lld steps of %d x %d x %d, balance %s\n",
                 human_count(card.total_params).c_str(), human_count(card.mtp_params).c_str(),
                 (long long)trainer->data().size(), (long long)(trainer->data().size() - trainer->data().train_size()),
                 (long long)o.steps, o.batch, o.seq_len, o.grad_accum, balance_mode_name(o.loss.balance));
    const bool quiet = a.has("quiet");
    double tok_rate = 0;
    const int64_t first = trainer->step_count();
    const auto t_start = std::chrono::steady_clock::now();
    trainer->run([&](const StepStats& s) {
        tok_rate = tok_rate == 0 ? s.tokens_per_s : 0.9 * tok_rate + 0.1 * s.tokens_per_s;
        const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        const double eta = elapsed / double(s.step - first) * double(o.steps - s.step);
        if (!quiet) {
            const int width = 24, fill = int(width * double(s.step) / double(o.steps));
            std::string bar(size_t(fill), '#');
            bar.resize(size_t(width), '.');
            std::fprintf(stderr, "\r[%s] step %lld/%lld loss %.4f mtp %.4f aux %.2e maxvio %.2f %.0f tok/s ETA %s   ",
                         bar.c_str(), (long long)s.step, (long long)o.steps, s.loss, s.mtp_ce, s.aux, s.maxvio_batch,
                         tok_rate, hms(eta).c_str());
        }
        if (s.evaluated) {
            const EvalStats& e = trainer->last_eval();
            std::fprintf(stderr, "%sstep %lld: val_loss %.4f ppl %.2f maxvio_global %.3f\n", quiet ? "" : "\n",
                         (long long)e.step, e.val_loss, e.perplexity, e.maxvio_global);
        }
        if (telemetry && s.step % 10 == 0) telemetry->flush();
    });
    if (telemetry) telemetry->flush();
    const EvalStats& e = trainer->last_eval();
    nlohmann::json summary = {{"steps", trainer->step_count()},
                              {"val_loss", e.val_loss},
                              {"perplexity", e.perplexity},
                              {"maxvio_global", e.maxvio_global},
                              {"checkpoint", trainer->checkpoint_dir().string()}};
    if (a.has("json")) std::cout << summary.dump(2) << "\n";
    else std::fprintf(stderr, "saved %s\n", trainer->checkpoint_dir().c_str());
    return 0;
}

int cmd_grad(const std::vector<std::string>& argv) {
    Args a(argv, {"json"});
    a.check_known({"tokens", "out", "mtp-weight"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR");
    std::vector<int> tokens = a.int_list("tokens");
    if (tokens.size() < 2) throw UsageError("--tokens needs at least two ids (one next-token target)");
    const auto out = a.get("out");
    if (!out) throw UsageError("--out GRADS.safetensors is required");
    const std::filesystem::path dir = a.positional()[0];
    ModelConfig cfg = ModelConfig::load(dir);
    Checkpoint ck = Checkpoint::open(dir);
    Weights w = load_weights(cfg, ck);
    Weights g = zeros_like(w, cfg);
    LossOptions lo;
    lo.mtp_weight = a.number("mtp-weight", 0.0);
    lo.balance = BalanceMode::None;
    TrainGraph graph(cfg);
    LossResult r = graph.run(w, tokens.data(), 1, int(tokens.size()), lo, &g);
    std::vector<TensorToWrite> ts;
    for (auto& nt : tensor_table(g, cfg))
        if (!nt.tensor->empty()) ts.push_back(make_tensor(nt.name, DType::F32, nt.tensor->shape, nt.tensor->ptr()));
    write_safetensors(*out, ts, {{"loss", std::to_string(r.loss)}, {"mtp_weight", std::to_string(lo.mtp_weight)}});
    nlohmann::json j = {{"loss", r.loss}, {"ce", r.ce}, {"mtp_ce", r.mtp_ce}, {"tensors", ts.size()}, {"out", *out}};
    if (a.has("json")) std::cout << j.dump(2) << "\n";
    else std::printf("loss %.6f (ce %.6f, mtp ce %.6f): %zu gradient tensors written to %s\n", r.loss, r.ce, r.mtp_ce,
                     ts.size(), out->c_str());
    return 0;
}

int cmd_train_export(const std::vector<std::string>& argv) {
    Args a(argv, {});
    a.check_known({"dtype"});
    if (a.positional().size() != 2) throw UsageError("expected CHECKPOINT_DIR OUT_DIR");
    const std::filesystem::path src = a.positional()[0], dst = a.positional()[1];
    const std::string dtype = a.get_or("dtype", "bf16");
    if (dtype != "bf16" && dtype != "f32") throw UsageError("--dtype is bf16 or f32, got '" + dtype + "'");
    ModelConfig cfg = ModelConfig::load(src);
    Checkpoint ck = Checkpoint::open(src);
    Weights w = load_weights(cfg, ck);
    if (dtype == "bf16") cfg.raw["torch_dtype"] = "bfloat16";
    save_checkpoint(dst, cfg, w, dtype == "bf16" ? SaveFormat::BF16 : SaveFormat::F32);
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
        if (std::filesystem::exists(src / f))
            std::filesystem::copy_file(src / f, dst / f, std::filesystem::copy_options::overwrite_existing);
    std::fprintf(stderr, "exported %s to %s (%s, without optimizer state)\n", src.c_str(), dst.c_str(), dtype.c_str());
    return 0;
}

CliCommand train_cmd("train",
                     "train --config CONFIG.json --corpus FILE... --steps N --out DIR [--tokenizer PATH | --vocab N]\n"
                     "      [--balance aux-free|aux-loss|seq-aux|none] [--gamma G] [--gamma-until FRAC] [--alpha A]\n"
                     "      [--mtp-weight L] [--lr LR] [--min-lr LR] [--warmup N] [--batch B] [--seq-len T]\n"
                     "      [--grad-accum K] [--eval-every N] [--eval-windows N] [--seed S] [--resume]\n"
                     "      [--telemetry OUT.jsonl] [--threads N] [--no-deterministic] [--json]\n"
                     "  trains from scratch; checkpoints (HF layout + optimizer state) in DIR/checkpoint",
                     cmd_train);
CliCommand grad_cmd("grad",
                    "grad MODEL_DIR --tokens 1,2,3 --out GRADS.safetensors [--mtp-weight L] [--json]\n"
                    "  gradient of mean next-token CE (+ L * mean MTP CE) w.r.t. every parameter, f32",
                    cmd_grad);
CliCommand train_export_cmd("train-export",
                            "train-export CHECKPOINT_DIR OUT_DIR [--dtype bf16|f32]   the model of a training "
                            "checkpoint (config, weights, tokenizer) without the optimizer state",
                            cmd_train_export);

}  // namespace
}  // namespace moescope::cli
