// libFuzzer target: arbitrary bytes as a telemetry trace (JSONL), as `moescope-cli trace` and
// the app's replay read user files. Reading either fails with a FormatError naming the line or
// gives records whose exports (routed experts and loads, NumPy and CSV) are written without a
// crash: ragged routes (records of different k or layer counts) must be refused, not indexed.
#include <variant>
#include <vector>

#include "engine/telemetry.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace moescope;
    static const auto path = fuzz::scratch_path("-trace.jsonl");
    static const auto out = fuzz::scratch_path("-export");
    fuzz::write_bytes(path, data, size);
    fuzz::expect_clean([&] {
        std::vector<RouteRecord> routes;
        std::vector<LoadRecord> loads;
        for (auto& r : read_trace(path)) {
            if (auto* rr = std::get_if<RouteRecord>(&r)) routes.push_back(*rr);
            if (auto* lr = std::get_if<LoadRecord>(&r)) {
                (void)max_violation(lr->counts);
                loads.push_back(*lr);
            }
        }
        fuzz::expect_clean([&] { export_routed_experts_npy(out, routes); });
        fuzz::expect_clean([&] { export_routed_experts_csv(out, routes); });
        fuzz::expect_clean([&] { export_load_npy(out, loads); });
        fuzz::expect_clean([&] { export_load_csv(out, loads); });
    });
    return 0;
}
