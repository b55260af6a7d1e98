// libFuzzer target: arbitrary bytes as a .safetensors file. The reader must reject every
// malformed header, offset, dtype or shape with a FormatError before touching tensor data,
// and every tensor it accepts must convert to f32 without reading outside the mapping.
#include <vector>

#include "engine/safetensors.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace moescope;
    static const auto path = fuzz::scratch_path(".safetensors");
    fuzz::write_bytes(path, data, size);
    fuzz::expect_clean([&] {
        SafetensorsFile f(path);
        std::vector<float> out;
        for (const auto& [name, t] : f.tensors()) {
            int64_t n = 1;
            for (int64_t d : t.shape) n *= d;
            if (n > (int64_t(1) << 22)) continue;  // accepted, but too large to convert every run
            out.resize(size_t(n));
            convert_to_f32(t, out.data());
        }
    });
    return 0;
}
