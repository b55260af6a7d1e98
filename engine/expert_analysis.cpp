// Expert specialization from routing telemetry. Counting is grouped by token: the positions of
// one token id are visited together with an E-sized scratch of counts, so n(e,t) for every pair
// costs O(positions x k) per layer with no hashing (V3 scale: 58 layers x 256 experts stays
// within a frame).
#include "engine/expert_analysis.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <set>
#include <unordered_map>

#include "engine/errors.h"

namespace moescope {

const char* token_rank_name(TokenRank r) {
    switch (r) {
    case TokenRank::Count: return "count";
    case TokenRank::Consistency: return "p";
    case TokenRank::Lift: return "lift";
    }
    return "?";
}

TokenRank token_rank_from_string(const std::string& s) {
    if (s == "count") return TokenRank::Count;
    if (s == "p" || s == "consistency") return TokenRank::Consistency;
    if (s == "lift") return TokenRank::Lift;
    throw ConfigError("token ranking: expected count, p or lift; got '" + s + "'");
}

const LayerExperts* ExpertAnalysis::layer(int l) const {
    for (const auto& x : layers)
        if (x.layer == l) return &x;
    return nullptr;
}

namespace {

// One layer's routing, positions in record order, copied contiguous so that visiting positions
// grouped by token stays in cache (a V3 record holds 58 layers' ids).
struct LayerSlots {
    int layer = 0, E = 0, k = 0;
    std::vector<int> token;              // [N] dense token index
    std::vector<int> ids;                // [N, k] expert ids
    std::vector<int64_t> n_e;            // [E] routings per expert
    std::vector<double> wsum;            // [E] their summed gate weights
    int N() const { return int(token.size()); }
};

// Positions grouped by dense token: order[start[t] .. start[t+1]) are the positions of token t.
struct Groups {
    std::vector<int> start, order;
};

Groups group_by_token(const std::vector<int>& token, int D) {
    Groups g;
    g.start.assign(size_t(D) + 1, 0);
    for (int t : token) g.start[size_t(t) + 1]++;
    for (int d = 0; d < D; ++d) g.start[size_t(d) + 1] += g.start[size_t(d)];
    g.order.resize(token.size());
    std::vector<int> fill(g.start.begin(), g.start.end() - 1);
    for (size_t i = 0; i < token.size(); ++i) g.order[size_t(fill[size_t(token[i])]++)] = int(i);
    return g;
}

// Mean over tokens with n(t) >= min_count of max_e n(e,t) / n(t); `scored` gets their number.
// `visit(e, t, n)` sees every non-zero n(e,t).
template <class Visit>
double consistency_of(const LayerSlots& s, const Groups& g, int min_count, int64_t* scored, std::vector<int>& scratch,
                      std::vector<int>& touched, Visit&& visit) {
    scratch.assign(size_t(s.E), 0);
    double sum = 0;
    int64_t n_scored = 0;
    const int D = int(g.start.size()) - 1;
    const int k = s.k;
    for (int t = 0; t < D; ++t) {
        const int n = g.start[size_t(t) + 1] - g.start[size_t(t)];
        if (n == 0) continue;
        touched.clear();
        for (int j = g.start[size_t(t)]; j < g.start[size_t(t) + 1]; ++j) {
            const int* ids = s.ids.data() + size_t(g.order[size_t(j)]) * size_t(k);
            for (int i = 0; i < k; ++i) {
                // Top-k ids are distinct per position, so n(e,t) <= n(t).
                if (scratch[size_t(ids[i])]++ == 0) touched.push_back(ids[i]);
            }
        }
        int best = 0;
        for (int e : touched) {
            best = std::max(best, scratch[size_t(e)]);
            visit(e, t, scratch[size_t(e)]);
            scratch[size_t(e)] = 0;
        }
        if (n >= min_count) {
            sum += double(best) / double(n);
            ++n_scored;
        }
    }
    if (scored) *scored = n_scored;
    return n_scored ? sum / double(n_scored) : 0.0;
}

bool ranks_before(const ExpertToken& a, const ExpertToken& b, TokenRank rank, int min_count) {
    if (rank != TokenRank::Count) {
        const bool ea = a.occurrences >= min_count, eb = b.occurrences >= min_count;
        if (ea != eb) return ea;
        if (ea) {
            const double ka = rank == TokenRank::Lift ? a.lift : a.p, kb = rank == TokenRank::Lift ? b.lift : b.p;
            if (ka != kb) return ka > kb;
        }
        if (a.count != b.count) return a.count > b.count;
    } else {
        if (a.count != b.count) return a.count > b.count;
        if (a.p != b.p) return a.p > b.p;
    }
    return a.token < b.token;
}

LayerExperts analyze_layer(const LayerSlots& s, const std::vector<int>& dense_to_token, const ExpertOptions& opt) {
    LayerExperts out;
    out.layer = s.layer;
    out.E = s.E;
    out.k = s.k;
    const int N = s.N();
    out.positions = N;
    out.n_slots = int64_t(N) * s.k;
    out.experts.resize(size_t(s.E));
    for (int e = 0; e < s.E; ++e) {
        auto& ex = out.experts[size_t(e)];
        ex.expert = e;
        ex.n_slots = e < int(s.n_e.size()) ? s.n_e[size_t(e)] : 0;
        ex.share = out.n_slots ? double(ex.n_slots) / double(out.n_slots) : 0.0;
        ex.mean_weight = ex.n_slots ? s.wsum[size_t(e)] / double(ex.n_slots) : 0.0;
    }

    const int D = int(dense_to_token.size());
    Groups g = group_by_token(s.token, D);
    std::vector<int> scratch, touched;
    for (int t = 0; t < D; ++t) out.distinct_tokens += g.start[size_t(t) + 1] > g.start[size_t(t)];
    out.consistency = consistency_of(s, g, opt.min_count, &out.scored_tokens, scratch, touched, [&](int e, int t, int n) {
        auto& ex = out.experts[size_t(e)];
        ex.distinct_tokens++;
        if (!opt.token_lists) return;
        ExpertToken tk;
        tk.token = dense_to_token[size_t(t)];
        tk.count = n;
        tk.occurrences = g.start[size_t(t) + 1] - g.start[size_t(t)];
        tk.p = double(n) / double(tk.occurrences);
        // p(e) = n_e / N: the chance that a position routes to e at all.
        tk.lift = ex.n_slots ? tk.p * double(N) / double(ex.n_slots) : 0.0;
        ex.tokens.push_back(tk);
    });
    if (opt.token_lists)
        for (auto& ex : out.experts) {
            auto before = [&](const ExpertToken& a, const ExpertToken& b) { return ranks_before(a, b, opt.rank, opt.min_count); };
            const size_t keep = opt.top > 0 ? std::min(ex.tokens.size(), size_t(opt.top)) : ex.tokens.size();
            std::partial_sort(ex.tokens.begin(), ex.tokens.begin() + long(keep), ex.tokens.end(), before);
            ex.tokens.resize(keep);
        }

    // Chance level: the token labels shuffled across positions. Shuffling labels keeps every
    // n(t), so it is the same groups' sizes filled with a random permutation of the positions.
    if (opt.baseline_shuffles > 0 && out.scored_tokens > 0) {
        std::mt19937_64 rng(opt.seed * 0x9E3779B97F4A7C15ull + uint64_t(s.layer) + 1);
        double sum = 0;
        for (int r = 0; r < opt.baseline_shuffles; ++r) {
            for (int i = N - 1; i > 0; --i) {  // Fisher-Yates, one draw per position
                const int j = int(rng() % uint64_t(i + 1));
                std::swap(g.order[size_t(i)], g.order[size_t(j)]);
            }
            sum += consistency_of(s, g, opt.min_count, nullptr, scratch, touched, [](int, int, int) {});
        }
        out.chance = sum / opt.baseline_shuffles;
    }
    out.specialization = out.scored_tokens && out.chance < 1.0 ? (out.consistency - out.chance) / (1.0 - out.chance) : 0.0;
    return out;
}

}  // namespace

ExpertAnalysis analyze_experts(const std::vector<const RouteRecord*>& routes, const ExpertOptions& opt) {
    ExpertAnalysis a;
    // The layers' slots, found through a table indexed by layer id; one dense token index for all.
    std::vector<LayerSlots> slots;
    std::vector<int> slot_of;  // layer id -> index into slots, -1 when not seen
    std::unordered_map<int, int> dense;
    std::vector<int> dense_to_token;
    std::vector<int> mtp;
    std::set<int> routed;  // every main-model layer the records route, for the error message
    auto wanted = [&](int l) { return opt.layers.empty() || std::find(opt.layers.begin(), opt.layers.end(), l) != opt.layers.end(); };
    for (const RouteRecord* r : routes) {
        if (!r) continue;
        const size_t L = r->layers.size();
        if (r->k <= 0 || r->ids.size() != L * size_t(r->k))
            throw FormatError("route record at position " + std::to_string(r->position) + ": expected ids [layers " +
                              std::to_string(L) + ", k " + std::to_string(r->k) + "], found " + std::to_string(r->ids.size()) +
                              " ids");
        const bool has_w = r->weights.size() == r->ids.size();
        bool counted = false;
        int d = -1;
        for (size_t li = 0; li < L; ++li) {
            const int l = r->layers[li];
            if (l < 0) throw FormatError("route record at position " + std::to_string(r->position) + ": layer " + std::to_string(l));
            if (opt.num_hidden_layers > 0 && l >= opt.num_hidden_layers) {
                if (std::find(mtp.begin(), mtp.end(), l) == mtp.end()) mtp.push_back(l);
                continue;
            }
            if (size_t(l) >= slot_of.size()) slot_of.resize(size_t(l) + 1, -2);
            if (slot_of[size_t(l)] == -2) {  // first sight of this layer
                routed.insert(l);
                slot_of[size_t(l)] = wanted(l) ? int(slots.size()) : -1;
                if (slot_of[size_t(l)] >= 0) {
                    slots.emplace_back();
                    slots.back().layer = l;
                    slots.back().k = r->k;
                }
            }
            if (slot_of[size_t(l)] < 0) continue;
            LayerSlots& s = slots[size_t(slot_of[size_t(l)])];
            if (s.k != r->k)
                throw FormatError("route records of layer " + std::to_string(l) + ": k changes from " + std::to_string(s.k) +
                                  " to " + std::to_string(r->k) + " at position " + std::to_string(r->position));
            const int* ids = r->ids.data() + li * size_t(r->k);
            const float* w = has_w ? r->weights.data() + li * size_t(r->k) : nullptr;
            for (int i = 0; i < r->k; ++i) {
                const int e = ids[i];
                if (e < 0 || (r->E > 0 && e >= r->E))
                    throw FormatError("route record at position " + std::to_string(r->position) + ", layer " +
                                      std::to_string(l) + ": expert id " + std::to_string(e) + " outside [0, " +
                                      std::to_string(r->E) + ")");
                // Traces without "E": the largest id seen decides.
                const int E = std::max({s.E, r->E, e + 1});
                if (E > s.E) {
                    s.E = E;
                    s.n_e.resize(size_t(E), 0);
                    s.wsum.resize(size_t(E), 0.0);
                }
                s.n_e[size_t(e)]++;
                if (w) s.wsum[size_t(e)] += double(w[i]);
            }
            if (d < 0) {
                auto [it, fresh] = dense.try_emplace(r->token, int(dense_to_token.size()));
                if (fresh) dense_to_token.push_back(r->token);
                d = it->second;
            }
            s.token.push_back(d);
            s.ids.insert(s.ids.end(), ids, ids + r->k);
            counted = true;
        }
        a.positions += counted;
    }
    for (int l : opt.layers)
        if (!(size_t(l) < slot_of.size() && slot_of[size_t(l)] >= 0)) {
            std::string have;
            for (int x : routed) have += (have.empty() ? "" : ", ") + std::to_string(x);
            throw ConfigError("layer " + std::to_string(l) + " has no routing in the records" +
                              (std::find(mtp.begin(), mtp.end(), l) != mtp.end() ? " (it is an MTP module's layer, left out)" : "") +
                              (have.empty() ? std::string() : " (routed layers: " + have + ")"));
        }
    std::sort(mtp.begin(), mtp.end());
    a.mtp_layers = mtp;
    std::sort(slots.begin(), slots.end(), [](const LayerSlots& x, const LayerSlots& y) { return x.layer < y.layer; });
    for (const auto& s : slots) a.layers.push_back(analyze_layer(s, dense_to_token, opt));
    return a;
}

ExpertAnalysis analyze_experts(const std::vector<Record>& records, ExpertOptions opt) {
    std::vector<const RouteRecord*> routes;
    for (const auto& r : records) {
        if (auto* x = std::get_if<RouteRecord>(&r)) routes.push_back(x);
        if (auto* m = std::get_if<MetaRecord>(&r); m && opt.num_hidden_layers == 0 && m->config.is_object())
            opt.num_hidden_layers = m->config.value("num_hidden_layers", 0);
    }
    return analyze_experts(routes, opt);
}

std::map<int, std::string> token_texts(const std::vector<Record>& records) {
    std::map<int, std::string> out;
    for (const auto& r : records)
        if (auto* t = std::get_if<TokenRecord>(&r); t && !t->text.empty()) out.try_emplace(t->id, t->text);
    return out;
}

std::string quote_token(const std::string& text) {
    std::string o = "\"";
    for (unsigned char c : text) {
        switch (c) {
        case '"': o += "\\\""; break;
        case '\\': o += "\\\\"; break;
        case '\n': o += "\\n"; break;
        case '\t': o += "\\t"; break;
        case '\r': o += "\\r"; break;
        default:
            if (c < 0x20 || c == 0x7f) {
                char buf[8];
                std::snprintf(buf, sizeof buf, "\\x%02x", c);
                o += buf;
            } else {
                o += char(c);
            }
        }
    }
    return o + "\"";
}

nlohmann::json to_json(const ExpertAnalysis& a, const std::map<int, std::string>& texts) {
    nlohmann::json layers = nlohmann::json::array();
    for (const auto& l : a.layers) {
        nlohmann::json ex = nlohmann::json::array();
        for (const auto& e : l.experts) {
            nlohmann::json toks = nlohmann::json::array();
            for (const auto& t : e.tokens) {
                auto it = texts.find(t.token);
                toks.push_back({{"token", t.token},
                                {"text", it == texts.end() ? nlohmann::json(nullptr) : nlohmann::json(it->second)},
                                {"count", t.count},
                                {"occurrences", t.occurrences},
                                {"p", t.p},
                                {"lift", t.lift}});
            }
            ex.push_back({{"expert", e.expert},
                          {"slots", e.n_slots},
                          {"share", e.share},
                          {"mean_weight", e.mean_weight},
                          {"distinct_tokens", e.distinct_tokens},
                          {"tokens", toks}});
        }
        layers.push_back({{"layer", l.layer},
                          {"E", l.E},
                          {"k", l.k},
                          {"positions", l.positions},
                          {"slots", l.n_slots},
                          {"distinct_tokens", l.distinct_tokens},
                          {"scored_tokens", l.scored_tokens},
                          {"consistency", l.consistency},
                          {"chance", l.chance},
                          {"specialization", l.specialization},
                          {"experts", ex}});
    }
    return {{"positions", a.positions}, {"mtp_layers", a.mtp_layers}, {"layers", layers}};
}

}  // namespace moescope
