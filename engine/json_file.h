// Reads a JSON file, throwing the caller's error type with the file name on failure.
#pragma once
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace moescope {

template <class ErrorT>
nlohmann::json read_json_file(const std::filesystem::path& file) {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw ErrorT(file.string() + ": cannot open");
    std::stringstream ss;
    ss << in.rdbuf();
    try {
        return nlohmann::json::parse(ss.str());
    } catch (const nlohmann::json::exception& e) {  // syntax, or a number out of range
        throw ErrorT(file.string() + ": invalid JSON: " + e.what());
    }
}

}  // namespace moescope
