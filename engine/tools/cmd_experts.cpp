// moescope-cli experts: expert specialization (which tokens each routed expert takes) from a
// telemetry trace, or from a model folder run over a text in context-sized chunks.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "engine/errors.h"
#include "engine/expert_analysis.h"
#include "engine/loader.h"
#include "engine/safetensors.h"
#include "engine/session.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tools/cli.h"
#include "engine/tools/cli_model.h"

namespace moescope::cli {
namespace {

namespace fs = std::filesystem;

// Runs the text through the model chunk by chunk (each chunk a fresh context, as `balance`
// does) and returns the telemetry, a meta record first.
std::vector<Record> run_model(const Args& a, const std::string& dir, std::map<int, std::string>& texts) {
    const bool has_corpus = a.has("corpus"), has_text = a.has("text");
    if (has_corpus == has_text) throw UsageError("a model folder needs --corpus FILE or --text T (one of them)");
    std::string text;
    std::string what;
    if (has_corpus) {
        what = *a.get("corpus");
        text = read_corpus(what);
    } else {
        text = *a.get("text");
        what = "--text";
    }
    LoadedModel m = open_model(dir, a.get_or("backend", "auto"), 0, weights_from_args(a));
    const ModelConfig& cfg = m.backend->config();
    if (cfg.n_routed_experts == 0) throw ConfigError(dir + ": the model has no routed experts");
    std::vector<int> ids = text_tokens(text, m);
    if (!m.tokenizer)  // bytes as ids: their texts are the bytes
        for (int i = 0; i < 256 && i < cfg.vocab_size; ++i) texts[i] = std::string(1, char(i));
    if (const long long limit = a.integer("limit", 0); limit > 0 && ids.size() > size_t(limit)) ids.resize(size_t(limit));
    if (ids.empty()) throw Error(what + ": no tokens to run");
    const int chunk = int(std::clamp<long long>(a.integer("chunk", std::min(cfg.max_position_embeddings, 1024)), 1,
                                                cfg.max_position_embeddings));
    if (!a.has("json"))
        std::fprintf(stderr, "[%s] %zu tokens of %s in chunks of %d\n", m.notice.c_str(), ids.size(), what.c_str(), chunk);
    MemorySink mem;
    TeeSink tee;
    tee.add(&mem);
    std::unique_ptr<JsonlWriter> trace;
    MetaRecord meta{loaded_model_card(*m.model).to_json(cfg), cfg.to_json(),
                    {{"model", dir}, {"mode", "experts"}, {"source", what}, {"backend", m.backend->name()}}};
    mem.record(meta);
    if (auto path = a.get("telemetry")) {
        trace = std::make_unique<JsonlWriter>(*path);
        trace->record(meta);
        tee.add(trace.get());
    }
    Session s(m.backend, m.tokenizer, chunk);
    s.set_sink(&tee);
    disable_experts(a, *m.backend, &s);  // recorded once: s.reset() keeps the backend's ablation
    drop_top_experts(a, *m.backend, &s);
    for (size_t off = 0; off < ids.size(); off += size_t(chunk)) {
        s.reset();
        s.append(std::vector<int>(ids.begin() + long(off), ids.begin() + long(std::min(ids.size(), off + size_t(chunk)))));
        if (!a.has("json") && progress_on_stderr())
            std::fprintf(stderr, "\r%zu / %zu tokens", std::min(ids.size(), off + size_t(chunk)), ids.size());
    }
    if (!a.has("json") && progress_on_stderr()) std::fprintf(stderr, "\n");
    if (trace) trace->flush();
    return mem.take();
}

std::string token_label(int id, const std::map<int, std::string>& texts) {
    auto it = texts.find(id);
    if (it != texts.end()) return quote_token(it->second);
    std::string s = "#";  // (not "#" + to_string: GCC 12 warns falsely about that)
    return s += std::to_string(id);
}

void write_csv(const fs::path& path, const ExpertAnalysis& an, const std::map<int, std::string>& texts) {
    write_file_atomic(path, [&](std::ostream& o) {
        o << "layer,expert,slots,share,mean_weight,rank,token,text,count,occurrences,p,lift\n";
        char buf[256];
        for (const auto& l : an.layers)
            for (const auto& e : l.experts) {
                std::snprintf(buf, sizeof buf, "%d,%d,%lld,%.9g,%.9g,", l.layer, e.expert, static_cast<long long>(e.n_slots),
                              e.share, e.mean_weight);
                if (e.tokens.empty()) o << buf << ",,,,,,\n";
                for (size_t r = 0; r < e.tokens.size(); ++r) {
                    const auto& t = e.tokens[r];
                    auto it = texts.find(t.token);
                    o << buf << r + 1 << ',' << t.token << ',' << (it == texts.end() ? std::string() : csv_field(it->second)) << ',';
                    std::snprintf(buf + 200, 56, "%lld,%lld,%.9g,%.9g", static_cast<long long>(t.count),
                                  static_cast<long long>(t.occurrences), t.p, t.lift);
                    o << (buf + 200) << '\n';
                }
            }
    });
}

// Each layer's ablation at the end of the records (its last ablation record).
std::map<int, AblationRecord> ablations(const std::vector<Record>& recs) {
    std::map<int, AblationRecord> off;
    for (const auto& r : recs)
        if (const auto* x = std::get_if<AblationRecord>(&r)) off[x->layer] = *x;
    return off;
}

void print_human(const ExpertAnalysis& an, const std::map<int, std::string>& texts, const ExpertOptions& opt,
                 const std::string& source, const std::map<int, AblationRecord>& off) {
    std::printf("%s: %lld positions with routing", source.c_str(), static_cast<long long>(an.positions));
    if (!an.mtp_layers.empty()) {
        std::printf(" (MTP layer%s", an.mtp_layers.size() > 1 ? "s" : "");
        for (int l : an.mtp_layers) std::printf(" %d", l);
        std::printf(" left out)");
    }
    std::printf("\ntokens ranked by %s%s\n",
                opt.rank == TokenRank::Count ? "n(e,t)" : opt.rank == TokenRank::Lift ? "lift p(e|t)/p(e)" : "p(e|t)",
                opt.rank == TokenRank::Count ? "" : (", tokens seen >= " + std::to_string(opt.min_count) + " times first").c_str());
    for (const auto& l : an.layers) {
        std::printf("\nlayer %d: %d experts, top-%d, %lld positions, %lld distinct tokens (%lld seen >= %d times)\n", l.layer,
                    l.E, l.k, static_cast<long long>(l.positions), static_cast<long long>(l.distinct_tokens),
                    static_cast<long long>(l.scored_tokens), opt.min_count);
        if (l.scored_tokens)
            std::printf("  token consistency %.3f, chance %.3f: specialization %.3f\n", l.consistency, l.chance,
                        l.specialization);
        else
            std::printf("  token consistency: n/a (no token seen %d times)\n", opt.min_count);
        const auto lo = off.find(l.layer);
        if (lo != off.end() && lo->second.drop_top > 0)
            std::printf("  each token's top %d expert%s dropped (routed to its next best)\n", lo->second.drop_top,
                        lo->second.drop_top == 1 ? "" : "s");
        std::printf("  %6s %6s %6s  %s\n", "expert", "share", "weight", "top tokens: token ×n(e,t) (p(e|t))");
        for (const auto& e : l.experts) {
            const bool is_off = lo != off.end() && std::find(lo->second.disabled.begin(), lo->second.disabled.end(),
                                                             e.expert) != lo->second.disabled.end();
            std::printf("  %6d %5.1f%% %6.3f ", e.expert, 100.0 * e.share, e.mean_weight);
            for (const auto& t : e.tokens)
                std::printf(" %s ×%lld (%.0f%%)", token_label(t.token, texts).c_str(), static_cast<long long>(t.count),
                            100.0 * t.p);
            if (is_off) std::printf(" (switched off)");
            else if (e.n_slots == 0) std::printf(" (never routed)");
            std::printf("\n");
        }
    }
}

int cmd_experts(const std::vector<std::string>& argv) {
    Args a(argv, {"json"});
    a.check_known({"corpus", "text", "layer", "top", "rank", "min-count", "csv", "backend", "weights", "chunk", "limit",
                   "telemetry", "disable-experts", "drop-top-experts"});
    if (a.positional().size() != 1) throw UsageError("expected one SOURCE (a model folder or a TRACE.jsonl)");
    const std::string src = a.positional()[0];
    ExpertOptions opt;
    opt.layers = a.int_list("layer");
    opt.top = int(a.integer("top", 8));
    opt.min_count = int(a.integer("min-count", 2));
    if (opt.top < 0) throw UsageError("--top must be >= 0 (0: every token)");
    if (opt.min_count < 1) throw UsageError("--min-count must be >= 1");
    try {
        opt.rank = token_rank_from_string(a.get_or("rank", "p"));
    } catch (const ConfigError& e) {
        throw UsageError(std::string("--rank: ") + e.what());
    }
    std::error_code ec;
    if (!fs::exists(src, ec)) throw Error(src + ": no such file or folder");
    std::vector<Record> recs;
    std::map<int, std::string> texts;
    if (fs::is_directory(src)) {
        recs = run_model(a, src, texts);
    } else {
        if (a.has("corpus") || a.has("text")) throw UsageError("--corpus / --text need a model folder, not a trace");
        recs = read_trace(src);
    }
    for (const auto& [id, t] : token_texts(recs)) texts[id] = t;
    bool any_route = false;
    for (const auto& r : recs) any_route = any_route || std::holds_alternative<RouteRecord>(r);
    if (!any_route) throw FormatError(src + ": no \"route\" records (the trace holds no routing to analyze)");
    ExpertAnalysis an;
    try {
        an = analyze_experts(recs, opt);
    } catch (const ConfigError& e) {
        throw ConfigError(src + ": --layer: " + e.what());
    }
    if (an.layers.empty()) throw FormatError(src + ": the route records hold no main-model MoE layer");
    if (auto f = a.get("csv")) write_csv(*f, an, texts);
    const auto off = ablations(recs);
    if (a.has("json")) {
        nlohmann::json j = to_json(an, texts);
        j["source"] = src;
        j["rank"] = token_rank_name(opt.rank);
        j["min_count"] = opt.min_count;
        for (auto& l : j["layers"])  // the ablation at the end of the records
            if (auto it = off.find(l["layer"].get<int>()); it != off.end()) {
                if (!it->second.disabled.empty()) l["disabled"] = it->second.disabled;
                if (it->second.drop_top > 0) l["drop_top"] = it->second.drop_top;
            }
        std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    } else {
        print_human(an, texts, opt, src, off);
    }
    return 0;
}

CliCommand experts_cmd("experts",
                       "experts SOURCE (MODEL_DIR --corpus FILE | MODEL_DIR --text T | TRACE.jsonl) [--layer L[,L...]] "
                       "[--top N] [--rank p|count|lift] [--min-count N] [--csv FILE] [--json] [--chunk TOKENS] "
                       "[--limit TOKENS] [--telemetry OUT.jsonl] [--backend cpu|cuda|auto] [--weights f32|bf16|auto] "
                       "[--disable-experts L:E,E-E;...] [--drop-top-experts R]   "
                       "which tokens each routed expert takes (expert specialization)",
                       cmd_experts);

}  // namespace
}  // namespace moescope::cli
