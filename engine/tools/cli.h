// moescope-cli: the subcommand registry. Each cmd_*.cpp registers its subcommands with a
// static CliCommand object, so adding a command touches no other file.
#pragma once
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace moescope::cli {

// Parsed command line: positional arguments and --flag [value] options.
class Args {
public:
    Args(std::vector<std::string> argv, std::vector<std::string> boolean_flags);
    const std::vector<std::string>& positional() const { return positional_; }
    bool has(const std::string& flag) const;                      // "--json" -> has("json")
    std::optional<std::string> get(const std::string& flag) const; // last value given
    std::vector<std::string> get_all(const std::string& flag) const;
    std::string get_or(const std::string& flag, const std::string& fallback) const;
    double number(const std::string& flag, double fallback) const; // throws on a non-number
    long long integer(const std::string& flag, long long fallback) const;
    std::vector<int> int_list(const std::string& flag) const;      // "1,2,3"
    // Throws UsageError listing any flag not in `known` (boolean flags are always known).
    void check_known(const std::vector<std::string>& known) const;

private:
    std::vector<std::string> positional_;
    std::multimap<std::string, std::string> values_;
    std::vector<std::string> boolean_;
};

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct CliCommand {
    using Fn = std::function<int(const std::vector<std::string>& argv)>;
    CliCommand(const char* name, const char* usage, Fn fn);
};

struct CommandEntry {
    std::string name, usage;
    CliCommand::Fn fn;
};
std::map<std::string, CommandEntry>& registry();

// Whether stderr is a terminal: "\r" progress lines only there (a log gets the summaries).
bool progress_on_stderr();

// A CSV field: in double quotes, quotes doubled (RFC 4180), so commas and newlines are safe.
std::string csv_field(const std::string& s);

}  // namespace moescope::cli
