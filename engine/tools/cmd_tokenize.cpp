// moescope-cli tokenize / train-tokenizer: encode text with a model's tokenizer, train a
// byte-level BPE tokenizer from text files.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/errors.h"
#include "engine/tokenizer/bpe_trainer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tools/cli.h"

namespace moescope::cli {
namespace {

std::string read_text_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(path + ": cannot open file");
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

int tokenize_command(const std::vector<std::string>& argv) {
    Args args(argv, {"json", "add-special", "chat", "no-generation-prompt"});
    args.check_known({"text", "file", "messages"});
    if (args.positional().size() != 1) throw UsageError("expected one PATH");
    const int sources = int(args.has("text")) + int(args.has("file")) + int(args.has("messages"));
    if (sources != 1) throw UsageError("give exactly one of --text, --file or --messages");
    if (args.has("messages") && args.has("chat"))
        throw UsageError("--messages is already a chat; --chat wraps --text/--file as one user message");
    if (args.has("no-generation-prompt") && !args.has("messages"))
        throw UsageError("--no-generation-prompt applies to --messages");
    std::vector<ChatMessage> messages;
    if (auto path = args.get("messages")) messages = read_chat_messages(*path);  // before loading the tokenizer
    std::string text = args.has("text") ? *args.get("text") : args.has("file") ? read_text_file(*args.get("file")) : "";

    Tokenizer tok = Tokenizer::load(args.positional()[0]);
    bool add_special = args.has("add-special");
    const bool chat_mode = args.has("chat") || args.has("messages");
    if (chat_mode) {
        const ChatTemplate& chat = tok.chat_template();
        if (!chat.warning().empty()) std::fprintf(stderr, "warning: %s\n", chat.warning().c_str());
        if (args.has("chat")) messages = {{"user", text}};
        for (const auto& w : chat.ignored_parts(messages)) std::fprintf(stderr, "warning: %s\n", w.c_str());
        text = chat.apply_chat_template(messages, !args.has("no-generation-prompt"));
    }
    std::vector<int> ids = tok.encode(text, add_special, true);

    if (args.has("json")) {
        nlohmann::json out = {{"ids", ids}, {"pieces", nlohmann::json::array()}};
        for (int id : ids) out["pieces"].push_back(tok.token_text(id));
        if (args.has("messages")) out["text"] = text;  // the rendered chat, to compare with transformers
        // Pieces of byte-level vocabularies are valid UTF-8; replace anything else.
        std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    } else {
        if (args.has("messages"))
            std::printf("text: %s\n", nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
        std::printf("%zu tokens\n", ids.size());
        for (int id : ids)
            std::printf("%8d  %-24s  %s\n", id, tok.token_text(id).c_str(),
                        nlohmann::json(tok.token_display(id)).dump().c_str());
    }
    return 0;
}

int train_command(const std::vector<std::string>& argv) {
    Args args(argv, {});
    args.check_known({"corpus", "vocab", "out", "special", "min-frequency"});
    std::vector<std::string> corpus = args.get_all("corpus");
    for (const auto& p : args.positional()) corpus.push_back(p);  // --corpus a b c
    if (corpus.empty()) throw UsageError("--corpus FILE... is required");
    if (!args.has("vocab")) throw UsageError("--vocab N is required");
    if (!args.has("out")) throw UsageError("--out DIR is required");
    BpeTrainerOptions opt;
    opt.vocab_size = static_cast<int>(args.integer("vocab", 0));
    opt.min_frequency = static_cast<int>(args.integer("min-frequency", opt.min_frequency));
    for (const auto& s : args.get_all("special"))
        if (std::find(opt.special_tokens.begin(), opt.special_tokens.end(), s) == opt.special_tokens.end())
            opt.special_tokens.push_back(s);
    std::vector<std::filesystem::path> files(corpus.begin(), corpus.end());
    BpeTrainStats stats = train_bpe(files, opt, *args.get("out"));
    std::printf("trained %d tokens (%d merges) from %.1f MB, %zu distinct words in %.2f s -> %s\n",
                stats.vocab_size, stats.merges, stats.corpus_bytes / 1e6, stats.distinct_words,
                stats.seconds, args.get("out")->c_str());
    return 0;
}

CliCommand tokenize_cmd("tokenize",
                        "tokenize PATH (--text T | --file F | --messages CHAT.json) [--json] [--add-special] "
                        "[--chat] [--no-generation-prompt]",
                        tokenize_command);
CliCommand train_cmd("train-tokenizer",
                     "train-tokenizer --corpus FILE... --vocab N --out DIR [--special TOKEN...] "
                     "[--min-frequency N]",
                     train_command);

}  // namespace
}  // namespace moescope::cli
