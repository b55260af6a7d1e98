// Model folder loading.
#include "engine/loader.h"

#include "engine/errors.h"
#include "engine/safetensors.h"

namespace moescope {

std::shared_ptr<Model> load_model(const std::filesystem::path& dir,
                                  const std::function<void(double, const std::string&)>& progress,
                                  const LoadOptions& options) {
    if (!std::filesystem::is_directory(dir)) throw FormatError(dir.string() + ": not a model folder");
    if (progress) progress(0.0, "reading config.json");
    ModelConfig cfg = ModelConfig::load(dir);
    if (progress) progress(0.05, "mapping safetensors");
    Checkpoint ck = Checkpoint::open(dir);
    const WeightStorage storage = resolve_storage(options.weights, cfg, ck);
    if (progress) progress(0.1, std::string("loading weights (") + storage_name(storage) + ")");
    Weights w = load_weights(cfg, ck, storage);
    if (progress) progress(1.0, "ready");
    return std::make_shared<Model>(std::move(cfg), std::move(w));
}

ModelCard loaded_model_card(const Model& m) {
    ModelCard card = model_card(m.config());
    const WeightMemory wm = weight_memory(m.weights(), m.config());
    card.weight_storage = wm.storage;
    card.weight_bytes = wm.bytes;
    return card;
}

}  // namespace moescope
