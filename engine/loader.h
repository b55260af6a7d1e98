// Opens a model folder: config.json + safetensors -> a ready CPU Model.
#pragma once
#include <filesystem>
#include <functional>
#include <memory>

#include "engine/model/model.h"

namespace moescope {

// progress(fraction, what) is called while loading (may be empty).
std::shared_ptr<Model> load_model(const std::filesystem::path& dir,
                                  const std::function<void(double, const std::string&)>& progress = {});

}  // namespace moescope
