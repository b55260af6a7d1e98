// Perplexity over non-overlapping windows, with the MTP module scored on the same windows.
#include "engine/eval.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/errors.h"
#include "engine/model/moe.h"
#include "engine/model/ops.h"
#include "engine/tokenizer/tokenizer.h"

namespace moescope {

std::string read_corpus(const std::string& path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) throw Error(path + ": is a folder, not a text file");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path + ": cannot open the corpus");
    std::stringstream ss;
    ss << in.rdbuf();
    if (in.bad()) throw Error(path + ": cannot read the corpus");
    return ss.str();
}

std::vector<int> corpus_ids(const Tokenizer* tokenizer, std::string_view text, int vocab_size) {
    if (tokenizer) return tokenizer->encode(text, false, true);
    std::vector<int> ids;
    ids.reserve(text.size());
    for (unsigned char ch : text) ids.push_back(int(ch) % vocab_size);
    return ids;
}

std::string token_piece(const Tokenizer* tokenizer, int id) {
    return tokenizer ? tokenizer->decode({id}) : std::string(1, char(id));
}

double PerplexityResult::perplexity() const { return tokens ? std::exp(cross_entropy) : 0.0; }
double PerplexityResult::mtp_perplexity() const { return mtp_tokens ? std::exp(mtp_cross_entropy) : 0.0; }

namespace {

// Sum over rows r of -ln softmax(logits[r])[target[r]]; each term appended to `each` when given.
double nll_sum(const float* logits, const int* target, int rows, int V, std::vector<double>* each = nullptr) {
    double s = 0;
    for (int r = 0; r < rows; ++r) {
        const float* l = logits + size_t(r) * V;
        const double nll = log_sum_exp(l, V) - double(l[target[r]]);
        s += nll;
        if (each) each->push_back(nll);
    }
    return s;
}

}  // namespace

PerplexityRun perplexity_run(const PerplexityResult& r) {
    return PerplexityRun{r.windows, r.tokens, r.cross_entropy, r.mtp_tokens, r.mtp_cross_entropy};
}

PerplexityResult perplexity_result(const PerplexityRun& r) {
    PerplexityResult p;
    p.windows = r.windows;
    p.tokens = r.tokens;
    p.cross_entropy = r.cross_entropy;
    p.mtp_tokens = r.mtp_tokens;
    p.mtp_cross_entropy = r.mtp_cross_entropy;
    return p;
}

PerplexityResult evaluate_perplexity(Backend& backend, const std::vector<int>& ids, const PerplexityOptions& o,
                                     const std::function<bool(int, int)>& on_window) {
    const ModelConfig& cfg = backend.config();
    const int V = cfg.vocab_size;
    if (o.context < 2) throw Error("perplexity: a window needs at least 2 tokens, got a context of " +
                                   std::to_string(o.context));
    if (o.context > cfg.max_position_embeddings)
        throw ContextError("perplexity: windows of " + std::to_string(o.context) + " tokens are past the model's context of " +
                           std::to_string(cfg.max_position_embeddings) + " (max_position_embeddings)");
    for (int id : ids)
        if (id < 0 || id >= V) throw Error("perplexity: token id " + std::to_string(id) + " is outside the vocabulary of " +
                                           std::to_string(V));
    std::vector<std::pair<size_t, int>> windows;  // (start, length)
    for (size_t s = 0; s + 2 <= ids.size(); s += size_t(o.context))
        windows.push_back({s, int(std::min<size_t>(size_t(o.context), ids.size() - s))});
    if (o.max_windows > 0 && windows.size() > size_t(o.max_windows)) windows.resize(size_t(o.max_windows));
    if (windows.empty()) throw Error("perplexity: the text has fewer than 2 tokens");
    const bool mtp = o.mtp && cfg.num_nextn_predict_layers > 0;
    PerplexityResult res;
    double nll = 0, mtp_nll = 0;
    ForwardOptions opt;  // absorbed, every position's logits on the host
    for (size_t w = 0; w < windows.size(); ++w) {
        const auto [start, n] = windows[w];
        const int* tok = ids.data() + start;
        auto cache = backend.new_cache(0, n);
        ForwardResult r;
        backend.forward(tok, n, *cache, opt, r);
        nll += nll_sum(r.logits.data(), tok + 1, n - 1, V, o.keep_losses ? &res.losses : nullptr);
        if (o.keep_losses)
            for (int i = 1; i < n; ++i) res.targets.push_back(int64_t(start) + i);
        res.tokens += n - 1;
        for (const auto& lr : r.routing) {
            auto& load = res.loads[lr.layer];
            load.resize(size_t(lr.r.E), 0);
            for (int e : lr.r.ids) ++load[size_t(e)];
        }
        if (mtp && n >= 3) {
            // Module 1 at position i reads h[i] and token i + 1, and predicts token i + 2.
            auto mc = backend.new_cache(1, n - 1);
            ForwardResult m;
            backend.forward_mtp(1, r.hidden.data(), tok + 1, n - 1, *mc, opt, m);
            mtp_nll += nll_sum(m.logits.data(), tok + 2, n - 2, V);
            res.mtp_tokens += n - 2;
        }
        res.windows = int(w + 1);
        if (on_window && !on_window(int(w + 1), int(windows.size()))) break;
    }
    res.cross_entropy = nll / double(res.tokens);
    res.mtp_cross_entropy = res.mtp_tokens ? mtp_nll / double(res.mtp_tokens) : 0.0;
    return res;
}

std::vector<TokenImpact> token_impact(const std::vector<int>& ids, const PerplexityResult& base,
                                      const PerplexityResult& ablated, int min_count, int top) {
    if (base.targets != ablated.targets || base.losses.size() != base.targets.size() ||
        ablated.losses.size() != ablated.targets.size())
        throw Error("token_impact: the two runs did not score the same predictions (keep_losses, same ids and windows)");
    std::map<int, TokenImpact> by_token;
    for (size_t i = 0; i < base.losses.size(); ++i) {
        const int64_t at = base.targets[i];
        if (at < 0 || size_t(at) >= ids.size()) throw Error("token_impact: a prediction outside the token stream");
        TokenImpact& t = by_token[ids[size_t(at)]];
        ++t.count;
        t.baseline += base.losses[i];
        t.ablated += ablated.losses[i];
    }
    std::vector<TokenImpact> out;
    for (auto& [token, t] : by_token) {
        if (t.count < min_count) continue;
        t.token = token;
        t.added = t.ablated - t.baseline;
        t.baseline /= double(t.count);
        t.ablated /= double(t.count);
        out.push_back(t);
    }
    std::stable_sort(out.begin(), out.end(), [](const TokenImpact& a, const TokenImpact& b) { return a.added > b.added; });
    if (top > 0 && out.size() > size_t(top)) out.resize(size_t(top));
    return out;
}

std::vector<ExpertImportance> expert_importance(Backend& backend, const std::vector<int>& ids,
                                                const PerplexityOptions& o, int layer,
                                                const std::function<bool(int, int, int)>& on_run,
                                                const std::function<bool(int, int)>& on_window) {
    const ModelConfig& c = backend.config();
    check_moe_layer(c, layer);
    const Ablation in_force = current_ablation(backend);
    std::vector<uint8_t> base = in_force.masks[size_t(layer)];
    base.resize(size_t(c.n_routed_experts), 0);
    std::vector<int> todo;
    for (int e = 0; e < c.n_routed_experts; ++e)
        if (!base[size_t(e)]) todo.push_back(e);
    const RouterDims dims(c);
    std::vector<ExpertImportance> out;
    try {
        for (size_t i = 0; i < todo.size(); ++i) {
            if (on_run && !on_run(todo[i], int(i), int(todo.size()))) break;
            Ablation a = in_force;
            a.masks[size_t(layer)] = base;
            a.masks[size_t(layer)][size_t(todo[i])] = 1;
            try {
                check_disabled_experts(dims, a.masks[size_t(layer)], layer, in_force.drop_top[size_t(layer)]);
            } catch (const Error&) {
                continue;  // the router cannot lose this expert (a token would keep fewer than k)
            }
            set_ablation(backend, a);
            out.push_back({todo[i], evaluate_perplexity(backend, ids, o, on_window)});
        }
    } catch (...) {
        set_ablation(backend, in_force);
        throw;
    }
    set_ablation(backend, in_force);
    return out;
}

}  // namespace moescope
