// libFuzzer target: arbitrary bytes as an ablation spec (--disable-experts, the Routing view's
// "Off" field). Parsing fails with an Error naming the part, or yields layers and expert ids in
// range whose masks check_disabled_experts accepts or refuses with an Error; never a crash, an
// untyped exception or an id outside the model. Both DeepSeek-V3 (256 experts in 8 groups) and
// V2-Lite (64, greedy) shapes.
#include <string>

#include "engine/config.h"
#include "engine/model/moe.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace moescope;
    static const ModelConfig configs[] = {
        ModelConfig::load(MOESCOPE_SOURCE_DIR "/tests/fixtures/configs/deepseek-v3.json"),
        ModelConfig::load(MOESCOPE_SOURCE_DIR "/tests/fixtures/configs/deepseek-v2-lite.json")};
    const std::string spec(reinterpret_cast<const char*>(data), size);
    for (const ModelConfig& c : configs)
        fuzz::expect_clean([&] {
            const RouterDims dims(c);
            for (const auto& [layer, ids] : parse_expert_spec(spec, c)) {
                if (layer < 0 || layer >= c.num_hidden_layers + c.num_nextn_predict_layers) std::abort();
                std::vector<uint8_t> mask(size_t(c.n_routed_experts), 0);
                for (int e : ids) {
                    if (e < 0 || e >= c.n_routed_experts) std::abort();
                    mask[size_t(e)] = 1;
                }
                check_disabled_experts(dims, mask, layer);
            }
        });
    return 0;
}
