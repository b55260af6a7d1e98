// safetensors: a validating mmap reader (single files and shards with
// model.safetensors.index.json) and an atomic writer.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <ostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/dtype.h"

namespace moescope {

struct TensorInfo {
    std::string name;
    DType dtype = DType::Unknown;
    std::vector<int64_t> shape;
    const uint8_t* data = nullptr;   // into the mapping
    uint64_t nbytes = 0;
    std::string file;                // for error messages
    int64_t numel() const;
};

// One mapped .safetensors file. Every header length, offset, dtype size and shape product is
// checked against the file before any tensor is touched; problems throw FormatError naming
// the file and the tensor.
class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::filesystem::path& path);
    ~SafetensorsFile();
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;

    const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    void* map_ = nullptr;
    size_t size_ = 0;
    std::map<std::string, TensorInfo> tensors_;
    std::map<std::string, std::string> metadata_;
};

// All tensors of a model folder (model.safetensors, or the shards an index names, or every
// *.safetensors file in it) or of one file.
class Checkpoint {
public:
    static Checkpoint open(const std::filesystem::path& path);
    const TensorInfo* find(const std::string& name) const;
    const TensorInfo& at(const std::string& name) const;  // FormatError if missing
    std::vector<std::string> names() const;
    std::vector<std::string> files() const;
    // The tensor converted to f32 (F32, F16, BF16, F8_E4M3 raw values, I32, I64).
    std::vector<float> read_f32(const std::string& name) const;

private:
    std::vector<std::shared_ptr<SafetensorsFile>> files_;
    std::map<std::string, const TensorInfo*> index_;
};

void convert_to_f32(const TensorInfo& t, float* out);

struct TensorToWrite {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;  // little-endian raw data
};

// Encodes f32 values into `dtype` (F32, F16, BF16, F8_E4M3 raw).
TensorToWrite make_tensor(const std::string& name, DType dtype, std::vector<int64_t> shape,
                          const float* values);

// Writes a .safetensors file via a temporary file and rename, so a crash never leaves a
// half-written file under `path`.
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `text` to `path` via a temporary file and rename.
void write_file_atomic(const std::filesystem::path& path, const std::string& text);
// The same, with the content produced by `write` into the temporary file's stream.
void write_file_atomic(const std::filesystem::path& path, const std::function<void(std::ostream&)>& write);

}  // namespace moescope
