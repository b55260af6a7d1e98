// Generation: prefill, decode, sampling, MTP speculative decoding and telemetry.
//
// State between calls: the main cache holds the context tokens_ (positions 0..n-1); the
// logits at n-1 (next_logits_) give the distribution of the next token. hist_[0] keeps the
// main model's final-normed hidden state of every position (what MTP module 1 reads), and
// hist_[k] the raw output of MTP module k at every position its cache holds, so the modules
// can catch up over positions they have not seen (after a prefill, or a rejected draft).
#include "engine/session.h"

#include "engine/model/ops.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>

#include "engine/errors.h"
#include "engine/tokenizer/tokenizer.h"

namespace moescope {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Logits -> the sampling distribution (penalties, temperature, top-k, top-p, min-p).
// Greedy (temperature 0) gives a one-hot distribution on the penalized argmax.
void sampling_distribution(std::vector<float>& probs, const float* logits, int V, const SamplingParams& p,
                           const std::vector<int>& history) {
    std::vector<float> l(logits, logits + V);
    if (p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0) {
        std::vector<int> count(static_cast<size_t>(V), 0);
        for (int t : history)
            if (t >= 0 && t < V) count[size_t(t)]++;
        for (int v = 0; v < V; ++v) {
            if (!count[size_t(v)]) continue;
            float& x = l[size_t(v)];
            if (p.repetition_penalty != 1.0) x = x > 0 ? float(x / p.repetition_penalty) : float(x * p.repetition_penalty);
            x -= float(p.frequency_penalty * count[size_t(v)] + p.presence_penalty);
        }
    }
    probs.assign(size_t(V), 0.0f);
    if (p.temperature <= 0.0) {
        int best = int(std::max_element(l.begin(), l.end()) - l.begin());
        probs[size_t(best)] = 1.0f;
        return;
    }
    float mx = *std::max_element(l.begin(), l.end());
    double sum = 0;
    for (int v = 0; v < V; ++v) {
        double e = std::exp((double(l[size_t(v)]) - mx) / p.temperature);
        probs[size_t(v)] = float(e);
        sum += e;
    }
    for (auto& x : probs) x = float(x / sum);
    // The filters are thresholds on the probability, so ties at a boundary are kept whole
    // (as the device sampler does): top-k keeps what reaches the k-th largest; top-p then the
    // smallest set of the most likely tokens holding top_p of the top-k mass (the order in
    // which Hugging Face and vLLM apply them); min-p what reaches min_p times the largest.
    if (p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0) {
        std::vector<float> sorted(probs);
        std::sort(sorted.begin(), sorted.end(), std::greater<float>());
        float floor = 0.0f;
        size_t n = size_t(V);
        if (p.top_k > 0 && p.top_k < V) {
            floor = sorted[size_t(p.top_k - 1)];
            while (n > 0 && sorted[n - 1] < floor) --n;
        }
        if (p.top_p < 1.0) {
            double mass = 0, c = 0;
            for (size_t i = 0; i < n; ++i) mass += sorted[i];
            for (size_t i = 0; i < n; ++i) {
                c += sorted[i];
                if (c >= p.top_p * mass) {
                    floor = sorted[i];
                    break;
                }
            }
        }
        if (p.min_p > 0.0) floor = std::max(floor, float(p.min_p) * sorted[0]);
        double s = 0;
        for (auto& x : probs) {
            if (x < floor) x = 0.0f;
            s += x;
        }
        for (auto& x : probs) x = float(x / s);
    }
}

int draw(const std::vector<float>& probs, std::mt19937_64& rng) {
    double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng), c = 0;
    int last = 0;
    for (size_t v = 0; v < probs.size(); ++v) {
        if (probs[v] <= 0) continue;
        c += probs[v];
        last = int(v);
        if (u < c) return int(v);
    }
    return last;
}

float surprisal_bits(const float* logits, int V, int id) {
    return float(-(double(logits[id]) - log_sum_exp(logits, V)) / std::log(2.0));
}

}  // namespace

int sample_token(const float* logits, int V, const SamplingParams& p, const std::vector<int>& history,
                 std::mt19937_64& rng, std::vector<float>* probs_out) {
    std::vector<float> probs;
    sampling_distribution(probs, logits, V, p, history);
    int id = p.temperature <= 0.0 ? int(std::max_element(probs.begin(), probs.end()) - probs.begin()) : draw(probs, rng);
    if (probs_out) probs_out->swap(probs);
    return id;
}

struct Session::Impl {
    std::unique_ptr<BackendCache> main;
    std::vector<std::unique_ptr<BackendCache>> mtp;  // [depth]
    std::vector<std::vector<float>> hist;            // [1 + depth][positions * D]
    std::vector<float> next_logits;                  // [V] distribution after the last position
    bool next_logits_stale = false;                  // left on the device by pick(): recompute
};

Session::Session(std::shared_ptr<Backend> backend, std::shared_ptr<const Tokenizer> tokenizer, int context_cap)
    : impl_(std::make_unique<Impl>()), backend_(std::move(backend)), tokenizer_(std::move(tokenizer)) {
    const ModelConfig& c = backend_->config();
    cap_ = context_cap > 0 ? std::min(context_cap, c.max_position_embeddings) : c.max_position_embeddings;
    reset();
}

Session::~Session() = default;

int Session::length() const { return impl_->main->length(); }

void Session::reset() {
    const ModelConfig& c = backend_->config();
    impl_->main = backend_->new_cache(0, cap_);
    impl_->mtp.clear();
    for (int k = 1; k <= c.num_nextn_predict_layers; ++k) impl_->mtp.push_back(backend_->new_cache(k, cap_));
    impl_->hist.assign(size_t(1 + c.num_nextn_predict_layers), {});
    impl_->next_logits.clear();
    impl_->next_logits_stale = false;
    tokens_.clear();
}

void Session::reset_bias() {
    backend_->reset_bias();
    const ModelConfig& c = backend_->config();
    if (!sink_) return;
    for (int l = 0; l < c.num_hidden_layers; ++l)
        if (c.is_moe_layer(l)) sink_->record(BiasRecord{step_, l, backend_->bias(l)});
}

void Session::set_disabled_experts(int layer, const std::vector<int>& experts) {
    backend_->set_disabled_experts(layer, expert_mask(experts, backend_->config().n_routed_experts, layer));
    record_ablation(layer);
}

void Session::set_drop_top_experts(int layer, int drop_top) {
    backend_->set_drop_top_experts(layer, drop_top);
    record_ablation(layer);
}

void Session::set_ablation(const Ablation& a) {
    const Ablation before = current_ablation(*backend_);
    moescope::set_ablation(*backend_, a);
    const Ablation after = current_ablation(*backend_);
    for (size_t l = 0; l < after.masks.size(); ++l)
        if (after.masks[l] != before.masks[l] || after.drop_top[l] != before.drop_top[l]) record_ablation(int(l));
}

void Session::record_ablation(int layer) {
    if (!sink_) return;
    const std::vector<uint8_t> mask = backend_->disabled_experts(layer);
    std::vector<int> ids;
    for (size_t e = 0; e < mask.size(); ++e)
        if (mask[e]) ids.push_back(int(e));
    sink_->record(AblationRecord{step_, layer, std::move(ids), backend_->drop_top_experts(layer)});
}

void Session::cancel() { cancel_.store(true); }

void Session::truncate(int n) {
    if (n >= int(tokens_.size())) return;
    n = std::max(0, n);
    const int D = backend_->config().hidden_size;
    if (n == 0) {
        reset();
        return;
    }
    impl_->main->truncate(n);
    impl_->hist[0].resize(size_t(n) * D);
    for (size_t k = 0; k < impl_->mtp.size(); ++k) {
        // Module k+1 at position i read token i+k+1: keep only positions whose token stays.
        int keep = std::max(0, std::min(impl_->mtp[k]->length(), n - int(k) - 1));
        impl_->mtp[k]->truncate(keep);
        impl_->hist[k + 1].resize(size_t(keep) * D);
    }
    tokens_.resize(size_t(n));
    refresh_next_logits();
}

// Recomputes the logits after the last position (forgets it and runs it again, quietly: its
// telemetry was recorded already).
void Session::refresh_next_logits() {
    const int n = int(tokens_.size()), D = backend_->config().hidden_size;
    const int last = tokens_.back();
    impl_->main->truncate(n - 1);
    impl_->hist[0].resize(size_t(n - 1) * D);
    tokens_.pop_back();
    TelemetrySink* sink = sink_;
    OnlineBalancing bal = balancing_;
    sink_ = nullptr;
    balancing_.enabled = false;
    try {
        append_impl({last}, false);
    } catch (...) {
        sink_ = sink;
        balancing_ = bal;
        throw;
    }
    sink_ = sink;
    balancing_ = bal;
}

// Runs the main model over `toks` at the end of the cache, records telemetry for the first
// `keep` positions (all when -1), applies online balancing, and returns the result.
static void record_forward(TelemetrySink* sink, Backend& be, const ForwardResult& r, const std::vector<int>& toks,
                           int keep, int64_t step, int latent_layer, BackendCache& cache) {
    if (!sink) return;
    const ModelConfig& c = be.config();
    const int L = c.num_hidden_layers;
    const int n = keep < 0 ? r.T : keep;
    const int64_t per_pos = int64_t(c.kv_lora_rank + c.qk_rope_head_dim) * 2 * L;
    const int64_t mha_per_pos = int64_t(c.num_attention_heads) * (c.qk_head_dim() + c.v_head_dim) * 2 * L;
    // Main-model MoE layers only (MTP routing is reported by its own forward).
    std::vector<const LayerRouting*> moe;
    for (const auto& lr : r.routing)
        if (lr.layer < L) moe.push_back(&lr);
    for (int t = 0; t < n; ++t) {
        if (!moe.empty()) {
            RouteRecord rr;
            rr.step = step;
            rr.position = r.start + t;
            rr.token = toks[size_t(t)];
            rr.k = moe[0]->r.k;
            rr.n_group = moe[0]->r.n_group;
            rr.E = moe[0]->r.E;
            for (const auto* lr : moe) {
                rr.layers.push_back(lr->layer);
                rr.ids.insert(rr.ids.end(), lr->r.ids.begin() + t * rr.k, lr->r.ids.begin() + (t + 1) * rr.k);
                rr.weights.insert(rr.weights.end(), lr->r.weights.begin() + t * rr.k,
                                  lr->r.weights.begin() + (t + 1) * rr.k);
                if (rr.n_group > 1)
                    rr.kept_groups.insert(rr.kept_groups.end(), lr->r.kept_groups.begin() + t * rr.n_group,
                                          lr->r.kept_groups.begin() + (t + 1) * rr.n_group);
                if (!lr->r.scores.empty()) {
                    rr.scores.insert(rr.scores.end(), lr->r.scores.begin() + size_t(t) * rr.E,
                                     lr->r.scores.begin() + size_t(t + 1) * rr.E);
                    std::vector<float> b = be.bias(lr->layer);
                    rr.bias.insert(rr.bias.end(), b.begin(), b.end());
                }
            }
            sink->record(std::move(rr));
        }
        LatentRecord lat;
        lat.step = step;
        lat.position = r.start + t;
        for (int l = 0; l < L; ++l) lat.norms.push_back(r.latent_norms[size_t(l) * r.T + t]);
        if (latent_layer >= 0 && latent_layer < L) {
            lat.layer = latent_layer;
            lat.c.resize(size_t(c.kv_lora_rank));
            lat.k_pe.resize(size_t(c.qk_rope_head_dim));
            cache.read_latent(latent_layer, r.start + t, r.start + t + 1, lat.c.data(), lat.k_pe.data());
        }
        lat.cache_bytes = per_pos * (r.start + t + 1);
        lat.mha_bytes = mha_per_pos * (r.start + t + 1);
        sink->record(std::move(lat));
    }
    for (const auto* lr : moe) {
        LoadRecord ld{step, lr->layer, std::vector<int64_t>(size_t(lr->r.E), 0)};
        for (int t = 0; t < n; ++t)
            for (int i = 0; i < lr->r.k; ++i) ld.counts[size_t(lr->r.ids[size_t(t * lr->r.k + i)])]++;
        sink->record(std::move(ld));
    }
}

// bias_e += gamma * sign(mean_load - load_e) for every main MoE layer (section 2.4).
static void balance_step(Backend& be, const ForwardResult& r, int keep, double gamma, int64_t step,
                         TelemetrySink* sink) {
    const ModelConfig& c = be.config();
    const int n = keep < 0 ? r.T : keep;
    for (const auto& lr : r.routing) {
        if (lr.layer >= c.num_hidden_layers) continue;
        std::vector<double> load(size_t(lr.r.E), 0.0);
        for (int t = 0; t < n; ++t)
            for (int i = 0; i < lr.r.k; ++i) load[size_t(lr.r.ids[size_t(t * lr.r.k + i)])] += 1;
        double mean = double(n) * lr.r.k / lr.r.E;
        std::vector<float> b = be.bias(lr.layer);
        for (int e = 0; e < lr.r.E; ++e) {
            double d = mean - load[size_t(e)];
            b[size_t(e)] += float(gamma * (d > 0 ? 1 : d < 0 ? -1 : 0));
        }
        be.set_bias(lr.layer, b);
        if (sink) sink->record(BiasRecord{step, lr.layer, b});
    }
}

void Session::append(const std::vector<int>& toks) { append_impl(toks, true); }

void Session::append_impl(const std::vector<int>& toks, bool prompt) {
    if (toks.empty()) return;
    const ModelConfig& c = backend_->config();
    if (int(tokens_.size() + toks.size()) > cap_)
        throw ContextError("the prompt needs " + std::to_string(tokens_.size() + toks.size()) +
                           " positions but the context holds " + std::to_string(cap_) + " tokens");
    for (int t : toks)
        if (t < 0 || t >= c.vocab_size)
            throw Error("token id " + std::to_string(t) + " is outside the vocabulary [0, " + std::to_string(c.vocab_size) +
                        ")");
    auto t0 = Clock::now();
    ForwardOptions opt;
    opt.absorbed = toks.size() == 1;  // prefill decompresses; single tokens attend in latent space
    opt.all_logits = false;
    opt.want_scores = want_scores_;
    ForwardResult r;
    backend_->forward(toks.data(), int(toks.size()), *impl_->main, opt, r);
    impl_->hist[0].insert(impl_->hist[0].end(), r.hidden.begin(), r.hidden.end());
    impl_->next_logits = r.logits;
    impl_->next_logits_stale = false;
    if (sink_) {
        for (size_t i = 0; i < toks.size() && prompt; ++i) {
            TokenRecord tr;
            tr.step = step_;
            tr.position = r.start + int(i);
            tr.id = toks[i];
            tr.prompt = true;
            if (tokenizer_) tr.text = tokenizer_->decode({toks[i]});
            sink_->record(tr);
        }
        record_forward(sink_, *backend_, r, toks, -1, step_, latent_layer_, *impl_->main);
        double s = seconds_since(t0);
        sink_->record(TimingRecord{step_, "prefill", s, int(toks.size()), s > 0 ? toks.size() / s : 0.0});
    }
    if (balancing_.enabled) balance_step(*backend_, r, -1, balancing_.gamma, step_, sink_);
    tokens_.insert(tokens_.end(), toks.begin(), toks.end());
    ++step_;
}

GenerationResult Session::generate(const std::vector<int>& prompt, const SamplingParams& params,
                                   const std::function<bool(const TokenEvent&)>& on_token) {
    auto t0 = Clock::now();
    append(prompt);
    double prefill = seconds_since(t0);
    GenerationResult res = generate(params, on_token);
    res.stats.prompt_tokens = int(prompt.size());
    res.stats.prefill_seconds = prefill;
    res.stats.time_to_first_token += prefill;
    return res;
}

GenerationResult Session::generate(const SamplingParams& params,
                                   const std::function<bool(const TokenEvent&)>& on_token) {
    const ModelConfig& c = backend_->config();
    const int V = c.vocab_size, D = c.hidden_size;
    if (impl_->next_logits.empty()) throw Error("generate: the context is empty; append a prompt first");
    cancel_.store(false);
    const size_t ctx0 = tokens_.size();
    GenerationResult res;
    GenerationStats& st = res.stats;
    const int depth = params.mtp ? (params.mtp_depth > 0 ? std::min(params.mtp_depth, c.num_nextn_predict_layers)
                                                         : c.num_nextn_predict_layers)
                                 : 0;
    st.mtp.drafted_at.assign(size_t(depth), 0);
    st.mtp.accepted_at.assign(size_t(depth), 0);
    std::mt19937_64 rng(params.seed);
    // The backend chooses the tokens itself (the logits stay on its device) when the
    // distribution is one it knows and no step needs the full distributions on the host: greedy
    // verification compares ids, but sampled drafts need p/q ratios and residuals.
    const bool plain = params.repetition_penalty == 1.0 && params.frequency_penalty == 0.0 &&
                       params.presence_penalty == 0.0 && params.min_p <= 0.0;
    const bool on_device = backend_->can_pick() && plain && (params.temperature <= 0.0 || depth == 0);
    const PickParams pick{float(params.temperature), params.top_k, float(params.top_p)};
    std::unique_ptr<StreamDecoder> stream;
    if (tokenizer_) stream = std::make_unique<StreamDecoder>(*tokenizer_);
    auto t_start = Clock::now();
    bool first = true;
    bool stop = false;

    // Emits one token: streaming callback, telemetry, stop conditions.
    auto emit = [&](int id, int position, bool drafted, float surprisal) {
        if (stop) return;
        TokenEvent ev;
        ev.id = id;
        ev.position = position;
        ev.drafted = drafted;
        ev.surprisal = surprisal;
        if (stream) ev.text = stream->push(id);
        ev.special = tokenizer_ && tokenizer_->is_special(id);
        res.tokens.push_back(id);
        if (!ev.special) res.text += ev.text;
        if (first) {
            st.time_to_first_token = seconds_since(t_start);
            first = false;
        }
        if (sink_) sink_->record(TokenRecord{step_, ev.position, id, ev.text, false, drafted, surprisal});
        if (on_token && !on_token(ev)) {
            st.stop_reason = "cancelled";
            stop = true;
        }
        if (std::find(params.stop_tokens.begin(), params.stop_tokens.end(), id) != params.stop_tokens.end()) {
            st.stop_reason = "stop_token";
            stop = true;
        }
        for (const auto& s : params.stop_strings) {
            auto at = s.empty() ? std::string::npos : res.text.find(s);
            if (at != std::string::npos) {
                res.text.resize(at);
                st.stop_reason = "stop_string";
                stop = true;
            }
        }
        if (int(res.tokens.size()) >= params.max_tokens && !stop) {
            st.stop_reason = "max_tokens";
            stop = true;
        }
    };

    // The first token comes from the logits after the prompt.
    std::vector<int> history = tokens_;
    std::vector<float> probs;
    int pending = sample_token(impl_->next_logits.data(), V, params, history, rng, &probs);
    emit(pending, int(tokens_.size()), false, surprisal_bits(impl_->next_logits.data(), V, pending));
    if (params.max_tokens <= 0) stop = true;

    while (!stop) {
        if (cancel_.load()) {
            st.stop_reason = "cancelled";
            break;
        }
        const int n = impl_->main->length();
        if (n + 1 > cap_) {  // the pending token no longer fits
            st.stop_reason = "context";
            break;
        }
        const int d_now = (n + 1 + depth <= cap_) ? depth : 0;  // near the end: no room for drafts
        auto t_step = Clock::now();
        // 1. Draft with the MTP modules (catching up over positions they have not seen).
        std::vector<int> drafts;
        std::vector<std::vector<float>> q(static_cast<size_t>(d_now));
        std::vector<int> seq = tokens_;
        seq.push_back(pending);
        for (int k = 1; k <= d_now; ++k) {
            BackendCache& mc = *impl_->mtp[size_t(k - 1)];
            const int m = mc.length();
            const int T = n - m;
            if (T <= 0) break;
            const float* h_in = impl_->hist[size_t(k - 1)].data() + size_t(m) * D;
            std::vector<int> next(seq.begin() + m + k, seq.begin() + n + k);
            ForwardOptions opt;
            // After accepted drafts the module is 1 + accepted positions behind: attend in latent
            // space (the naive path would decompress the module's whole cache every step).
            opt.absorbed = T <= kSmallT;
            opt.all_logits = false;
            opt.host_logits = !on_device;
            ForwardResult mr;
            backend_->forward_mtp(k, h_in, next.data(), T, mc, opt, mr);
            impl_->hist[size_t(k)].insert(impl_->hist[size_t(k)].end(), mr.raw_hidden.begin(), mr.raw_hidden.end());
            const int dtok = on_device ? backend_->pick(pick, {})[0].id  // greedy: drafts need no q
                                       : sample_token(mr.logits.data(), V, params, seq, rng, &q[size_t(k - 1)]);
            drafts.push_back(dtok);
            seq.push_back(dtok);
        }
        // 2. Verify: the pending token and the drafts in one main forward.
        std::vector<int> batch{pending};
        batch.insert(batch.end(), drafts.begin(), drafts.end());
        ForwardOptions opt;
        opt.absorbed = true;
        opt.all_logits = true;
        opt.want_scores = want_scores_;
        opt.host_logits = !on_device;
        ForwardResult r;
        backend_->forward(batch.data(), int(batch.size()), *impl_->main, opt, r);
        // 3. Accept or reject each draft (greedy: exact match; sampling: min(1, p/q)).
        int accepted = 0;
        int bonus = -1;
        std::vector<TokenPick> picks;  // on the device: one choice per verified row
        if (on_device) {
            std::vector<float> u;
            if (params.temperature > 0.0) u.push_back(float(std::uniform_real_distribution<double>(0.0, 1.0)(rng)));
            picks = backend_->pick(pick, u);
            while (accepted < int(drafts.size()) && picks[size_t(accepted)].id == drafts[size_t(accepted)]) ++accepted;
            bonus = picks[size_t(accepted)].id;
        }
        std::vector<int> hist_v = tokens_;
        hist_v.push_back(pending);
        for (size_t j = 0; j < drafts.size() && !on_device; ++j) {
            const float* lj = r.logits.data() + j * size_t(V);
            std::vector<float> p;
            sampling_distribution(p, lj, V, params, hist_v);
            const int d = drafts[j];
            bool ok;
            if (params.temperature <= 0.0) {
                ok = int(std::max_element(p.begin(), p.end()) - p.begin()) == d;
            } else {
                double qd = q[j][size_t(d)], pd = p[size_t(d)];
                double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
                ok = qd > 0 && u < std::min(1.0, pd / qd);
            }
            if (!ok) {
                if (params.temperature <= 0.0) {
                    bonus = int(std::max_element(p.begin(), p.end()) - p.begin());
                } else {
                    // Resample from the residual max(0, p - q), renormalized.
                    std::vector<float> resid(static_cast<size_t>(V));
                    double s = 0;
                    for (int v = 0; v < V; ++v) {
                        resid[size_t(v)] = std::max(0.0f, p[size_t(v)] - q[j][size_t(v)]);
                        s += resid[size_t(v)];
                    }
                    if (s <= 0) resid = p;
                    else for (auto& x : resid) x = float(x / s);
                    bonus = draw(resid, rng);
                }
                break;
            }
            ++accepted;
            hist_v.push_back(d);
        }
        if (bonus < 0) bonus = sample_token(r.logits.data() + size_t(accepted) * V, V, params, hist_v, rng, nullptr);
        // 4. Keep what was accepted: main cache and hidden history to n + 1 + accepted.
        const int keep = 1 + accepted;
        impl_->main->truncate(n + keep);
        impl_->hist[0].insert(impl_->hist[0].end(), r.hidden.begin(), r.hidden.begin() + size_t(keep) * D);
        for (size_t k = 0; k < impl_->mtp.size(); ++k) {
            int kk = std::max(0, std::min(impl_->mtp[k]->length(), n + keep - int(k) - 1));
            impl_->mtp[k]->truncate(kk);
            impl_->hist[k + 1].resize(size_t(kk) * D);
        }
        record_forward(sink_, *backend_, r, batch, keep, step_, latent_layer_, *impl_->main);
        if (balancing_.enabled) balance_step(*backend_, r, keep, balancing_.gamma, step_, sink_);
        tokens_.push_back(pending);
        for (int j = 0; j < accepted; ++j) tokens_.push_back(drafts[size_t(j)]);
        if (!drafts.empty()) {
            st.mtp.drafts++;
            st.mtp.draft_tokens += int64_t(drafts.size());
            st.mtp.accepted_tokens += accepted;
            for (size_t j = 0; j < drafts.size(); ++j) {
                st.mtp.drafted_at[j]++;
                if (int(j) < accepted) st.mtp.accepted_at[j]++;
            }
            if (sink_)
                sink_->record(MtpRecord{step_, n + 1, drafts, accepted, st.mtp.acceptance_rate()});
        }
        double s = seconds_since(t_step);
        if (sink_) sink_->record(TimingRecord{step_, "decode", s, keep, s > 0 ? keep / s : 0.0});
        ++step_;
        // 5. Emit the accepted drafts and the bonus token.
        auto surprisal = [&](int row, int id) {
            return on_device ? float(-picks[size_t(row)].logprob / std::log(2.0))
                             : surprisal_bits(r.logits.data() + size_t(row) * V, V, id);
        };
        for (int j = 0; j < accepted && !stop; ++j) emit(drafts[size_t(j)], n + 1 + j, true, surprisal(j, drafts[size_t(j)]));
        if (on_device) {
            impl_->next_logits_stale = true;
        } else {
            impl_->next_logits.assign(r.logits.begin() + size_t(accepted) * V, r.logits.begin() + size_t(accepted + 1) * V);
        }
        if (stop) break;
        pending = bonus;
        emit(pending, int(tokens_.size()), false, surprisal(accepted, pending));
    }
    // Leave the context as prompt + every emitted token: drop drafts verified beyond a stop,
    // and feed the last emitted token, which is not in the cache yet.
    const size_t want = ctx0 + res.tokens.size();
    if (tokens_.size() > want) truncate(int(want));
    if (tokens_.size() < want && int(want) <= cap_) {
        std::vector<int> rest(res.tokens.end() - long(want - tokens_.size()), res.tokens.end());
        append_impl(rest, false);
    }
    if (impl_->next_logits_stale) refresh_next_logits();
    st.generated_tokens = int(res.tokens.size());
    st.decode_seconds = seconds_since(t_start);
    if (stream) res.text += stream->flush();
    if (st.stop_reason.empty()) st.stop_reason = "max_tokens";
    return res;
}

}  // namespace moescope
