// Shared by the libFuzzer targets: inputs that must reach a file go through a per-process file
// in /dev/shm (or /tmp), and only the engine's typed errors count as a clean rejection: any other
// exception escaping (a JSON library error, std::out_of_range, bad_alloc) is a finding, since
// bad input must end in an error that names the file and the problem.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "engine/errors.h"

namespace moescope::fuzz {

inline std::filesystem::path scratch_path(const char* suffix) {
    const char* dir = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    return std::filesystem::path(dir) / ("moescope-fuzz-" + std::to_string(getpid()) + suffix);
}

inline void write_bytes(const std::filesystem::path& p, const uint8_t* data, size_t size) {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(data), std::streamsize(size));
}

// Runs fn; a moescope::Error is the expected rejection, anything else aborts with its message.
template <class F>
void expect_clean(F&& fn) {
    try {
        fn();
    } catch (const moescope::Error&) {
    } catch (const std::exception& e) {
        std::fprintf(stderr, "untyped exception escaped: %s\n", e.what());
        std::abort();
    }
}

}  // namespace moescope::fuzz
