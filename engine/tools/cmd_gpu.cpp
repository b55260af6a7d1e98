// moescope-cli gpu-bench: the CUDA backend's benchmark (prefill / decode tokens/s, decode
// bandwidth against the device's copy bandwidth, telemetry overhead, MTP cost). The CLI does
// not link CUDA: the benchmark lives in libmoescope_cuda.so, reached through the library that
// probe_cuda() loaded (dlopen by soname with RTLD_NOLOAD finds it again).
#include <dlfcn.h>

#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "engine/errors.h"
#include "engine/tools/cli.h"

namespace moescope::cli {
namespace {

using BenchFn = int (*)(const char* request_json, char* out, size_t out_len, char* err, size_t err_len);

int cmd_gpu_bench(const std::vector<std::string>& argv) {
    Args a(argv, {"json"});
    a.check_known({"config", "prompt", "decode", "weights"});
    if (!a.positional().empty()) throw UsageError("gpu-bench takes no positional argument");
    nlohmann::json req;
    req["config"] = a.get_or("config", "synthetic-v2-lite");
    req["prompt"] = a.integer("prompt", 512);
    req["decode"] = a.integer("decode", 128);
    req["weights"] = a.get_or("weights", "bf16");
    if (req["weights"] != "bf16" && req["weights"] != "f32" && req["weights"] != "fp8")
        throw UsageError("--weights bf16|f32|fp8");
    CudaProbe p = probe_cuda();
    if (!p.library_found) throw DeviceError("gpu-bench: " + p.error);
    if (p.device_count <= 0) throw DeviceError("gpu-bench needs a CUDA device: " + p.error);
    void* lib = dlopen("libmoescope_cuda.so", RTLD_NOW | RTLD_NOLOAD);
    auto bench = lib ? reinterpret_cast<BenchFn>(dlsym(lib, "moescope_cuda_bench")) : nullptr;
    if (!bench) throw DeviceError("gpu-bench: libmoescope_cuda.so lacks moescope_cuda_bench");
    std::string out(1 << 20, '\0'), err(4096, '\0');
    if (bench(req.dump().c_str(), out.data(), out.size(), err.data(), err.size()) != 0)
        throw DeviceError("gpu-bench: " + std::string(err.c_str()));
    nlohmann::json r = nlohmann::json::parse(out.c_str());
    if (a.has("json")) {
        std::cout << r.dump(2) << "\n";
        return 0;
    }
    std::cout << "device            " << r.value("device", "") << "\n"
              << "config            " << r.value("config", "") << " (" << r.value("weights", "") << " weights)\n"
              << "copy bandwidth    " << r.value("copy_bandwidth_GBps", 0.0) << " GB/s\n"
              << "prefill           " << r.value("prefill_tokens_per_s", 0.0) << " tokens/s ("
              << r.value("prompt_tokens", 0) << " tokens)\n"
              << "decode            " << r.value("decode_tokens_per_s", 0.0) << " tokens/s ("
              << r.value("decode_path", "") << "), " << r.value("decode_bandwidth_GBps", 0.0) << " GB/s = "
              << 100.0 * r.value("decode_fraction_of_copy_bandwidth", 0.0) << "% of copy bandwidth\n"
              << "decode (launched) " << r.value("decode_tokens_per_s_launches", 0.0) << " tokens/s\n"
              << "programmatic      "
              << (r.value("programmatic_launches", false)
                      ? "on (" + std::to_string(r.value("programmatic_edges", 0)) + " edges); graphs without it " +
                            std::to_string(r.value("decode_tokens_per_s_cuda_graph_without_pdl", 0.0)) + " tokens/s"
                      : std::string("off"))
              << "\n"
              << "telemetry         " << r.value("telemetry_overhead_percent", 0.0) << "% of decode time\n";
    if (r.contains("decode_profile_us")) {
        std::cout << "decode profile    ";
        for (const auto& p : r["decode_profile_us"])
            std::cout << p.value("op", std::string()) << " " << p.value("us", 0.0) << " us; ";
        std::cout << "total " << r.value("decode_profile_total_us", 0.0)
                  << " us (launched op by op behind a busy wait)\n";
    }
    if (r.contains("cuda_graph_error")) std::cout << "cuda graphs       " << r["cuda_graph_error"].get<std::string>() << "\n";
    if (r.contains("mtp"))
        std::cout << "mtp               draft " << r["mtp"].value("draft_ms", 0.0) << " ms, projected speed-up "
                  << r["mtp"].value("projected_speedup", 0.0) << "x at 85% acceptance\n";
    return 0;
}

CliCommand gpu_bench_cmd("gpu-bench",
                         "gpu-bench [--json] [--config synthetic-v2-lite|CONFIG.json] [--prompt N] [--decode N] "
                         "[--weights bf16|f32|fp8]   CUDA backend benchmark",
                         cmd_gpu_bench);

}  // namespace
}  // namespace moescope::cli
