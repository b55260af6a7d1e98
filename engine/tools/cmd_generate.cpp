// moescope-cli generate / balance: text generation with MTP speculative decoding and
// telemetry, and the online aux-loss-free balancing demonstration over a corpus.
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "engine/errors.h"
#include "engine/loader.h"
#include "engine/session.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tools/cli.h"
#include "engine/tools/cli_model.h"

namespace moescope::cli {

LoadedModel open_model(const std::string& dir, const std::string& backend, int context, WeightStorage weights) {
    LoadedModel m;
    m.model = load_model(dir, LoadOptions{weights});
    namespace fs = std::filesystem;
    if (fs::exists(fs::path(dir) / "tokenizer.json"))
        m.tokenizer = std::make_shared<Tokenizer>(Tokenizer::load(dir));
    BackendSelection sel = select_backend(backend, m.model, context > 0 ? context : m.model->config().max_position_embeddings);
    m.backend = std::shared_ptr<Backend>(std::move(sel.backend));
    m.notice = sel.notice;
    return m;
}

WeightStorage weights_from_args(const Args& a) {
    const std::string v = a.get_or("weights", "auto");
    if (v != "f32" && v != "bf16" && v != "auto") throw UsageError("--weights f32|bf16|auto; got '" + v + "'");
    return storage_from_string(v);
}

SamplingParams sampling_from_args(const Args& a, const ModelConfig& cfg) {
    SamplingParams p;
    p.temperature = a.number("temperature", 0.7);
    p.top_k = int(a.integer("top-k", 0));
    p.top_p = a.number("top-p", 1.0);
    p.min_p = a.number("min-p", 0.0);
    p.repetition_penalty = a.number("repetition-penalty", 1.0);
    p.frequency_penalty = a.number("frequency-penalty", 0.0);
    p.presence_penalty = a.number("presence-penalty", 0.0);
    p.seed = uint64_t(a.integer("seed", 0));
    p.max_tokens = int(a.integer("max-tokens", 128));
    p.mtp = !a.has("no-mtp");
    p.mtp_depth = int(a.integer("mtp-depth", 0));
    for (const auto& s : a.get_all("stop")) p.stop_strings.push_back(s);
    if (!a.has("no-eos") && cfg.eos_token_id) p.stop_tokens.push_back(*cfg.eos_token_id);
    if (p.temperature < 0) throw UsageError("--temperature must be >= 0");
    if (p.top_p <= 0 || p.top_p > 1) throw UsageError("--top-p must be in (0, 1]");
    return p;
}

std::vector<int> prompt_tokens(const Args& a, const LoadedModel& m) {
    const int sources = int(a.has("prompt")) + int(a.has("prompt-tokens")) + int(a.has("messages"));
    if (sources > 1) throw UsageError("give one of --prompt, --prompt-tokens or --messages");
    if (auto ids = a.int_list("prompt-tokens"); !ids.empty()) return ids;
    if (auto path = a.get("messages")) {
        if (a.has("system") || a.has("chat"))
            throw UsageError("--messages holds the whole chat; put the system prompt in it instead of --system/--chat");
        if (!m.tokenizer) throw UsageError("this model folder has no tokenizer.json, so it has no chat template for --messages");
        std::vector<ChatMessage> msgs = read_chat_messages(*path);
        const ChatTemplate& ct = m.tokenizer->chat_template();
        if (!ct.warning().empty()) std::fprintf(stderr, "warning: %s\n", ct.warning().c_str());
        for (const auto& w : ct.ignored_parts(msgs)) std::fprintf(stderr, "warning: %s: %s\n", path->c_str(), w.c_str());
        // After tool outputs DeepSeek-V3's template closes them and adds no <｜Assistant｜>:
        // the model answers from there, as in training.
        return m.tokenizer->encode(ct.apply_chat_template(msgs, true), false, true);
    }
    auto text = a.get("prompt");
    if (!text) throw UsageError("give --prompt TEXT, --prompt-tokens 1,2,3 or --messages CHAT.json");
    if (!m.tokenizer)
        throw UsageError("this model folder has no tokenizer.json: use --prompt-tokens 1,2,3");
    if (a.has("chat")) {
        std::vector<ChatMessage> msgs;
        if (auto sys = a.get("system")) msgs.push_back({"system", *sys});
        msgs.push_back({"user", *text});
        const ChatTemplate& ct = m.tokenizer->chat_template();
        std::string rendered = ct.apply_chat_template(msgs, true);
        if (!ct.warning().empty()) std::fprintf(stderr, "warning: %s\n", ct.warning().c_str());
        return m.tokenizer->encode(rendered, false, true);
    }
    return m.tokenizer->encode(*text, true, true);
}

nlohmann::json meta_settings(const LoadedModel& m, const std::string& dir, const SamplingParams& p) {
    return {{"model", dir},
            {"backend", m.backend->name()},
            {"notice", m.notice},
            {"temperature", p.temperature},
            {"top_k", p.top_k},
            {"top_p", p.top_p},
            {"min_p", p.min_p},
            {"seed", p.seed},
            {"max_tokens", p.max_tokens},
            {"mtp", p.mtp}};
}

std::vector<int> text_tokens(const std::string& text, const LoadedModel& m) {
    return corpus_ids(m.tokenizer.get(), text, m.backend->config().vocab_size);
}

std::map<int, std::vector<int>> disable_experts(const Args& a, Backend& backend, Session* session) {
    auto spec = a.get("disable-experts");
    if (!spec) return {};
    auto off = parse_expert_spec(*spec, backend.config());
    for (const auto& [layer, ids] : off) {
        if (session) session->set_disabled_experts(layer, ids);
        else backend.set_disabled_experts(layer, expert_mask(ids, backend.config().n_routed_experts, layer));
    }
    return off;
}

void drop_top_experts(Backend& backend, int r, Session* session) {
    const ModelConfig& c = backend.config();
    for (int l = 0; l < c.num_hidden_layers; ++l) {
        if (!c.is_moe_layer(l)) continue;
        if (session) session->set_drop_top_experts(l, r);
        else backend.set_drop_top_experts(l, r);
    }
}

int drop_top_experts(const Args& a, Backend& backend, Session* session) {
    if (!a.get("drop-top-experts")) return 0;
    const long long v = a.integer("drop-top-experts", 0);
    const ModelConfig& c = backend.config();
    if (c.n_routed_experts == 0) throw UsageError("--drop-top-experts: the model has no routed experts");
    if (v < 0 || v > c.num_experts_per_tok)
        throw UsageError("--drop-top-experts: each token takes " + std::to_string(c.num_experts_per_tok) +
                         " experts, so 0-" + std::to_string(c.num_experts_per_tok) + " can be dropped; got " +
                         std::to_string(v));
    drop_top_experts(backend, int(v), session);
    return int(v);
}

namespace {

int cmd_generate(const std::vector<std::string>& argv) {
    Args a(argv, {"json", "chat", "mtp", "no-mtp", "no-eos", "quiet"});
    a.check_known({"prompt", "prompt-tokens", "messages", "system", "max-tokens", "temperature", "top-k", "top-p", "min-p",
                   "repetition-penalty", "frequency-penalty", "presence-penalty", "seed", "telemetry", "backend",
                   "context", "stop", "mtp-depth", "latent-layer", "weights", "disable-experts", "drop-top-experts"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR");
    const std::string dir = a.positional()[0];
    LoadedModel m = open_model(dir, a.get_or("backend", "auto"), int(a.integer("context", 0)), weights_from_args(a));
    const ModelConfig& cfg = m.backend->config();
    const ModelCard card = loaded_model_card(*m.model);
    SamplingParams p = sampling_from_args(a, cfg);
    std::vector<int> prompt = prompt_tokens(a, m);
    if (!a.has("json")) std::fprintf(stderr, "[%s]\n", m.notice.c_str());
    std::unique_ptr<JsonlWriter> trace;
    Session s(m.backend, m.tokenizer, int(a.integer("context", 0)));
    if (auto path = a.get("telemetry")) {
        trace = std::make_unique<JsonlWriter>(*path);
        trace->record(MetaRecord{card.to_json(cfg), cfg.to_json(), meta_settings(m, dir, p)});
        s.set_sink(trace.get());
        s.set_latent_layer(int(a.integer("latent-layer", 0)));
    }
    const auto off = disable_experts(a, *m.backend, &s);
    if (!off.empty() && !a.has("json")) std::fprintf(stderr, "[experts disabled: %s]\n", a.get("disable-experts")->c_str());
    if (const int r = drop_top_experts(a, *m.backend, &s); r > 0 && !a.has("json"))
        std::fprintf(stderr, "[each token's top %d expert%s dropped in every MoE layer of the main model]\n", r,
                     r == 1 ? "" : "s");
    const bool stream_out = !a.has("json") && !a.has("quiet");
    bool echoed = false;  // the prompt is echoed once it is known to fit
    GenerationResult r = s.generate(prompt, p, [&](const TokenEvent& ev) {
        if (stream_out && !echoed && m.tokenizer && !a.has("chat") && !a.has("messages")) std::cout << m.tokenizer->decode(prompt, true);
        echoed = true;
        if (stream_out) {
            if (m.tokenizer) {
                if (!ev.special) std::cout << ev.text;
            }
            else std::cout << ev.id << ' ';
            std::cout.flush();
        }
        return true;
    });
    if (trace) trace->flush();
    const auto& st = r.stats;
    if (a.has("json")) {
        nlohmann::json j;
        j["tokens"] = r.tokens;
        j["text"] = r.text;
        j["prompt_tokens"] = prompt;
        j["stats"] = {{"tokens_per_s", st.tokens_per_s()},
                      {"prefill_tokens_per_s", st.prefill_tokens_per_s()},
                      {"time_to_first_token_s", st.time_to_first_token},
                      {"generated_tokens", st.generated_tokens},
                      {"stop_reason", st.stop_reason},
                      {"backend", m.backend->name()},
                      {"backend_notice", m.backend->notice()},
                      {"weight_storage", card.weight_storage},
                      {"weight_bytes", card.weight_bytes},
                      {"mtp",
                       {{"drafts", st.mtp.drafts},
                        {"draft_tokens", st.mtp.draft_tokens},
                        {"accepted_tokens", st.mtp.accepted_tokens},
                        {"acceptance_rate", st.mtp.acceptance_rate()},
                        {"mean_acceptance_length", st.mtp.mean_acceptance_length()}}}};
        std::cout << j.dump() << "\n";
    } else {
        std::cout << std::endl;  // the text ends before the statistics on stderr begin
        std::fprintf(stderr,
                     "-- %d tokens, %.1f tokens/s (prefill %d tokens at %.1f tokens/s), first token after %.3f s, "
                     "stop: %s; MTP %s: %lld drafts, acceptance rate %.1f%%, mean acceptance length %.2f\n",
                     st.generated_tokens, st.tokens_per_s(), st.prompt_tokens, st.prefill_tokens_per_s(),
                     st.time_to_first_token, st.stop_reason.c_str(), p.mtp && cfg.num_nextn_predict_layers ? "on" : "off",
                     static_cast<long long>(st.mtp.drafts), 100.0 * st.mtp.acceptance_rate(),
                     st.mtp.mean_acceptance_length());
        const std::string bn = m.backend->notice();
        if (!bn.empty() && m.notice.find(bn) == std::string::npos) std::fprintf(stderr, "[backend: %s]\n", bn.c_str());
        std::fprintf(stderr, "[weights: %s, %.1f MB resident]\n", card.weight_storage.c_str(),
                     double(card.weight_bytes) / 1e6);
    }
    return 0;
}

int cmd_balance(const std::vector<std::string>& argv) {
    Args a(argv, {"json"});
    a.check_known({"corpus", "gamma", "steps", "telemetry", "backend", "chunk", "reset-bias", "weights"});
    if (a.positional().size() != 1) throw UsageError("expected one MODEL_DIR");
    const std::string dir = a.positional()[0];
    auto corpus = a.get("corpus");
    if (!corpus) throw UsageError("--corpus FILE is required");
    const std::string text = read_corpus(*corpus);
    LoadedModel m = open_model(dir, a.get_or("backend", "auto"), 0, weights_from_args(a));
    const ModelConfig& cfg = m.backend->config();
    if (cfg.n_routed_experts == 0) throw Error(dir + ": the model has no MoE layers to balance");
    const std::vector<int> ids = text_tokens(text, m);
    const int chunk = int(std::min<long long>(a.integer("chunk", 64), cfg.max_position_embeddings));
    const int steps = int(a.integer("steps", 100));
    const double gamma = a.number("gamma", 0.001);
    if (ids.size() < size_t(chunk)) throw Error(*corpus + ": the corpus is shorter than one chunk");
    std::unique_ptr<JsonlWriter> trace;
    MemorySink mem;
    TeeSink tee;
    tee.add(&mem);
    Session s(m.backend, m.tokenizer, chunk);
    if (auto path = a.get("telemetry")) {
        trace = std::make_unique<JsonlWriter>(*path);
        trace->record(MetaRecord{loaded_model_card(*m.model).to_json(cfg), cfg.to_json(),
                                 {{"model", dir}, {"mode", "balance"}, {"gamma", gamma}, {"corpus", *corpus}}});
        tee.add(trace.get());
    }
    s.set_sink(&tee);
    s.set_online_balancing({true, gamma});
    std::vector<double> maxvio;
    for (int step = 0; step < steps; ++step) {
        size_t off = (size_t(step) * size_t(chunk)) % (ids.size() - size_t(chunk) + 1);
        s.reset();
        s.append(std::vector<int>(ids.begin() + long(off), ids.begin() + long(off) + chunk));
        double worst = 0, mean = 0;
        int n = 0;
        for (const auto& r : mem.take())
            if (auto* l = std::get_if<LoadRecord>(&r)) {
                double v = max_violation(l->counts);
                worst = std::max(worst, v);
                mean += v;
                ++n;
            }
        maxvio.push_back(n ? mean / n : 0.0);
        if (!a.has("json") && progress_on_stderr())
            std::fprintf(stderr, "\rstep %d/%d  MaxVio mean over layers %.3f  worst layer %.3f", step + 1, steps,
                         maxvio.back(), worst);
    }
    if (trace) trace->flush();
    if (a.has("json")) {
        std::cout << nlohmann::json{{"steps", steps}, {"gamma", gamma}, {"maxvio", maxvio}}.dump() << "\n";
    } else {
        if (progress_on_stderr()) std::fprintf(stderr, "\n");
        std::printf("MaxVio (mean over MoE layers): first step %.3f, last step %.3f\n", maxvio.front(), maxvio.back());
    }
    return 0;
}

CliCommand generate_cmd(
    "generate",
    "generate MODEL_DIR (--prompt T [--chat] [--system S] | --messages CHAT.json | --prompt-tokens 1,2,3) [--max-tokens N --temperature T "
    "--top-k K --top-p P --min-p P --repetition-penalty R --frequency-penalty F --presence-penalty P --seed S "
    "--mtp|--no-mtp --stop STR --telemetry OUT.jsonl --latent-layer L --backend cpu|cuda|auto --context N --weights f32|bf16|auto "
    "--disable-experts L:E,E-E;... --drop-top-experts R --json]",
    cmd_generate);
CliCommand balance_cmd("balance",
                       "balance MODEL_DIR --corpus FILE [--gamma G --steps N --chunk TOKENS --telemetry OUT.jsonl "
                       "--weights f32|bf16|auto --json]   online aux-loss-free balancing",
                       cmd_balance);

}  // namespace
}  // namespace moescope::cli
