// libFuzzer target: arbitrary bytes as config.json. Parsing either fails with a ConfigError or
// FormatError naming the field, or yields a config whose model card (parameter counts, cache
// bytes: products of the dimensions) computes without overflow (UBSan) or a crash.
#include <nlohmann/json.hpp>

#include "engine/config.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace moescope;
    static const auto path = fuzz::scratch_path("-config.json");
    fuzz::write_bytes(path, data, size);
    fuzz::expect_clean([&] {
        ModelConfig cfg = ModelConfig::load(path);
        ModelCard card = model_card(cfg);
        (void)card.to_json(cfg).dump();
        (void)card.to_text(cfg);
    });
    return 0;
}
