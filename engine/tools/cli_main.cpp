// moescope-cli entry point: dispatches to the registered subcommands.
#include "engine/tools/cli.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <exception>
#include <sstream>

#include <unistd.h>

namespace moescope::cli {

std::map<std::string, CommandEntry>& registry() {
    static std::map<std::string, CommandEntry> r;
    return r;
}

bool progress_on_stderr() {
    static const bool tty = isatty(fileno(stderr)) != 0;
    return tty;
}

std::string csv_field(const std::string& s) {
    std::string r = "\"";
    for (char c : s) r += c == '"' ? std::string("\"\"") : std::string(1, c);
    return r + "\"";
}

CliCommand::CliCommand(const char* name, const char* usage, Fn fn) {
    registry()[name] = CommandEntry{name, usage, std::move(fn)};
}

Args::Args(std::vector<std::string> argv, std::vector<std::string> boolean_flags)
    : boolean_(std::move(boolean_flags)) {
    for (size_t i = 0; i < argv.size(); ++i) {
        const std::string& a = argv[i];
        if (a.rfind("--", 0) == 0 && a.size() > 2) {
            std::string key = a.substr(2), value;
            auto eq = key.find('=');
            if (eq != std::string::npos) {
                value = key.substr(eq + 1);
                key = key.substr(0, eq);
            } else if (std::find(boolean_.begin(), boolean_.end(), key) == boolean_.end()) {
                if (i + 1 >= argv.size()) throw UsageError("option --" + key + " needs a value");
                value = argv[++i];
            }
            values_.emplace(key, value);
        } else {
            positional_.push_back(a);
        }
    }
}

bool Args::has(const std::string& flag) const { return values_.count(flag) > 0; }

std::optional<std::string> Args::get(const std::string& flag) const {
    auto [lo, hi] = values_.equal_range(flag);
    if (lo == hi) return std::nullopt;
    return std::prev(hi)->second;
}

std::vector<std::string> Args::get_all(const std::string& flag) const {
    std::vector<std::string> out;
    auto [lo, hi] = values_.equal_range(flag);
    for (auto it = lo; it != hi; ++it) out.push_back(it->second);
    return out;
}

std::string Args::get_or(const std::string& flag, const std::string& fallback) const {
    auto v = get(flag);
    return v ? *v : fallback;
}

double Args::number(const std::string& flag, double fallback) const {
    auto v = get(flag);
    if (!v) return fallback;
    try {
        size_t used = 0;
        double d = std::stod(*v, &used);
        if (used != v->size()) throw std::invalid_argument("");
        return d;
    } catch (const std::exception&) {
        throw UsageError("option --" + flag + " expects a number, got '" + *v + "'");
    }
}

long long Args::integer(const std::string& flag, long long fallback) const {
    auto v = get(flag);
    if (!v) return fallback;
    long long out = 0;
    auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), out);
    if (ec != std::errc() || p != v->data() + v->size())
        throw UsageError("option --" + flag + " expects an integer, got '" + *v + "'");
    return out;
}

std::vector<int> Args::int_list(const std::string& flag) const {
    std::vector<int> out;
    auto v = get(flag);
    if (!v) return out;
    std::stringstream ss(*v);
    std::string item;
    while (std::getline(ss, item, ',')) {
        if (item.empty()) continue;
        int x = 0;
        auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), x);
        if (ec != std::errc() || p != item.data() + item.size())
            throw UsageError("option --" + flag + ": '" + item + "' is not an integer");
        out.push_back(x);
    }
    return out;
}

void Args::check_known(const std::vector<std::string>& known) const {
    for (const auto& [k, v] : values_) {
        if (std::find(known.begin(), known.end(), k) == known.end() &&
            std::find(boolean_.begin(), boolean_.end(), k) == boolean_.end())
            throw UsageError("unknown option --" + k);
    }
}

}  // namespace moescope::cli

static void print_usage() {
    std::fprintf(stderr, "usage: moescope-cli COMMAND [ARGS]\n\ncommands:\n");
    for (const auto& [name, e] : moescope::cli::registry())
        std::fprintf(stderr, "  %s\n", e.usage.c_str());
}

int main(int argc, char** argv) {
    if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ||
        std::string(argv[1]) == "help") {
        print_usage();
        return argc < 2 ? 2 : 0;
    }
    auto& reg = moescope::cli::registry();
    auto it = reg.find(argv[1]);
    if (it == reg.end()) {
        std::fprintf(stderr, "moescope-cli: unknown command '%s'\n", argv[1]);
        print_usage();
        return 2;
    }
    std::vector<std::string> rest(argv + 2, argv + argc);
    try {
        return it->second.fn(rest);
    } catch (const moescope::cli::UsageError& e) {
        std::fprintf(stderr, "moescope-cli %s: %s\nusage: moescope-cli %s\n", argv[1], e.what(),
                     it->second.usage.c_str());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "moescope-cli %s: error: %s\n", argv[1], e.what());
        return 1;
    }
}
