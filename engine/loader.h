// Opens a model folder: config.json + safetensors -> a ready CPU Model.
#pragma once
#include <filesystem>
#include <functional>
#include <memory>

#include "engine/model/model.h"

namespace moescope {

struct LoadOptions {
    // How the large linear weights are held (see WeightStorage in weights.h). Auto: BF16 for
    // a BF16 checkpoint of more than kAutoBf16Params parameters, else f32. Inference only:
    // training and gradients load their own f32 weights.
    WeightStorage weights = WeightStorage::Auto;
};

// progress(fraction, what) is called while loading (may be empty).
std::shared_ptr<Model> load_model(const std::filesystem::path& dir,
                                  const std::function<void(double, const std::string&)>& progress = {},
                                  const LoadOptions& options = {});
inline std::shared_ptr<Model> load_model(const std::filesystem::path& dir, const LoadOptions& options) {
    return load_model(dir, {}, options);
}

// The model card of a loaded model: model_card(config) plus how its weights are held in
// memory (f32 / bf16) and their resident bytes.
ModelCard loaded_model_card(const Model& m);

}  // namespace moescope
