// safetensors reader and writer. The format: 8-byte little-endian header length N, N bytes of
// JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the
// data; offsets are relative to the end of the header.
#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "engine/errors.h"
#include "engine/json_file.h"

namespace moescope {

using nlohmann::json;

int64_t TensorInfo::numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path.string()) {
    auto fail = [&](const std::string& what) { throw FormatError(path_ + ": " + what); };
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("cannot open");
    struct stat st{};
    if (::fstat(fd, &st) != 0) {
        ::close(fd);
        fail("cannot stat");
    }
    size_ = size_t(st.st_size);
    if (size_ < 8) {
        ::close(fd);
        fail("file is " + std::to_string(size_) + " bytes, too short for a safetensors header");
    }
    map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        fail("cannot mmap");
    }
    try {
        const auto* base = static_cast<const uint8_t*>(map_);
        uint64_t n = 0;
        for (int i = 0; i < 8; ++i) n |= uint64_t(base[i]) << (8 * i);
        if (n > size_ - 8)
            fail("header length " + std::to_string(n) + " runs past the end of the file (" +
                 std::to_string(size_) + " bytes)");
        if (n > (uint64_t(100) << 20)) fail("header length " + std::to_string(n) + " exceeds 100 MB");
        json header;
        try {
            header = json::parse(base + 8, base + 8 + n);
        } catch (const json::exception& e) {
            fail(std::string("header is not valid JSON: ") + e.what());
        }
        if (!header.is_object()) fail("header is not a JSON object");
        const uint8_t* data = base + 8 + n;
        const uint64_t data_size = size_ - 8 - n;
        std::vector<std::pair<uint64_t, uint64_t>> ranges;
        std::vector<std::string> range_names;
        for (auto it = header.begin(); it != header.end(); ++it) {
            const std::string& name = it.key();
            if (name == "__metadata__") {
                if (!it.value().is_object()) fail("__metadata__ is not an object");
                for (auto m = it.value().begin(); m != it.value().end(); ++m)
                    if (m.value().is_string()) metadata_[m.key()] = m.value().get<std::string>();
                continue;
            }
            auto tfail = [&](const std::string& what) { fail("tensor '" + name + "': " + what); };
            const json& e = it.value();
            if (!e.is_object()) tfail("entry is not an object");
            if (!e.contains("dtype") || !e["dtype"].is_string()) tfail("missing dtype");
            if (!e.contains("shape") || !e["shape"].is_array()) tfail("missing shape");
            if (!e.contains("data_offsets") || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2)
                tfail("missing data_offsets [begin, end]");
            TensorInfo t;
            t.name = name;
            t.file = path_;
            t.dtype = dtype_from_string(e["dtype"].get<std::string>());
            if (t.dtype == DType::Unknown) tfail("unsupported dtype '" + e["dtype"].get<std::string>() + "'");
            uint64_t numel = 1;
            for (const auto& d : e["shape"]) {
                if (!d.is_number_unsigned()) tfail("shape " + e["shape"].dump() + " has a non-integer or negative dimension");
                uint64_t v = d.get<uint64_t>();
                if (v != 0 && numel > (uint64_t(1) << 62) / v) tfail("shape " + e["shape"].dump() + " overflows");
                numel *= v;
                t.shape.push_back(int64_t(v));
            }
            const json& off = e["data_offsets"];
            if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) tfail("data_offsets are not integers");
            uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
            if (b > en) tfail("data_offsets [" + std::to_string(b) + ", " + std::to_string(en) + "] are reversed");
            if (en > data_size)
                tfail("data_offsets end " + std::to_string(en) + " is past the end of the data (" +
                      std::to_string(data_size) + " bytes; the file may be truncated)");
            uint64_t want = numel * uint64_t(dtype_size(t.dtype));
            if (en - b != want)
                tfail("holds " + std::to_string(en - b) + " bytes but dtype " + dtype_name(t.dtype) + " x shape " +
                      e["shape"].dump() + " needs " + std::to_string(want));
            t.data = data + b;
            t.nbytes = en - b;
            ranges.push_back({b, en});
            range_names.push_back(name);
            tensors_.emplace(name, std::move(t));
        }
        std::vector<size_t> order(ranges.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
        // Compare each non-empty range with the one reaching furthest so far, not only with
        // its sorted neighbour: an empty tensor between two overlapping ones must not hide them.
        size_t reach = order.size();  // index into ranges of the furthest-reaching non-empty range
        for (size_t i : order) {
            const auto& cur = ranges[i];
            if (cur.second == cur.first) continue;
            if (reach != order.size() && cur.first < ranges[reach].second)
                fail("tensors '" + range_names[reach] + "' and '" + range_names[i] + "' overlap in the data section");
            if (reach == order.size() || cur.second > ranges[reach].second) reach = i;
        }
    } catch (...) {
        ::munmap(map_, size_);
        map_ = nullptr;
        throw;
    }
}

SafetensorsFile::~SafetensorsFile() {
    if (map_) ::munmap(map_, size_);
}

Checkpoint Checkpoint::open(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    Checkpoint ck;
    std::vector<fs::path> files;
    std::map<std::string, std::string> weight_map;  // from the index, when there is one
    fs::path index_path;
    if (fs::is_regular_file(path)) {
        files.push_back(path);
    } else if (fs::is_directory(path)) {
        fs::path index = path / "model.safetensors.index.json";
        if (fs::exists(index)) {
            json j = read_json_file<FormatError>(index);
            if (!j.contains("weight_map") || !j["weight_map"].is_object())
                throw FormatError(index.string() + ": missing 'weight_map'");
            std::set<std::string> shard_names;
            for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
                if (!it.value().is_string()) throw FormatError(index.string() + ": weight_map['" + it.key() + "'] is not a file name");
                std::string f = it.value().get<std::string>();
                if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
                    throw FormatError(index.string() + ": shard name '" + f + "' leaves the model folder");
                shard_names.insert(f);
                weight_map[it.key()] = f;
            }
            index_path = index;
            for (const auto& f : shard_names) {
                if (!fs::exists(path / f))
                    throw FormatError(index.string() + ": shard '" + f + "' does not exist");
                files.push_back(path / f);
            }
        } else if (fs::exists(path / "model.safetensors")) {
            files.push_back(path / "model.safetensors");
        } else {
            for (const auto& e : fs::directory_iterator(path))
                if (e.path().extension() == ".safetensors") files.push_back(e.path());
            std::sort(files.begin(), files.end());
        }
        if (files.empty()) throw FormatError(path.string() + ": no .safetensors files in the folder");
    } else {
        throw FormatError(path.string() + ": no such file or folder");
    }
    for (const auto& f : files) {
        auto sf = std::make_shared<SafetensorsFile>(f);
        for (const auto& [name, info] : sf->tensors()) {
            if (ck.index_.count(name))
                throw FormatError(f.string() + ": tensor '" + name + "' also appears in " + ck.index_[name]->file);
            ck.index_[name] = &info;
        }
        ck.files_.push_back(std::move(sf));
    }
    // The index must describe the shards as they are: every tensor where it says.
    for (const auto& [name, shard] : weight_map) {
        auto it = ck.index_.find(name);
        if (it == ck.index_.end())
            throw FormatError(index_path.string() + ": tensor '" + name + "' is listed in shard '" + shard +
                              "' but no shard holds it");
        if (fs::path(it->second->file).filename() != shard)
            throw FormatError(index_path.string() + ": tensor '" + name + "' is listed in shard '" + shard +
                              "' but is stored in '" + fs::path(it->second->file).filename().string() + "'");
    }
    return ck;
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : it->second;
}

const TensorInfo& Checkpoint::at(const std::string& name) const {
    const TensorInfo* t = find(name);
    if (!t) throw FormatError("checkpoint has no tensor '" + name + "'");
    return *t;
}

std::vector<std::string> Checkpoint::names() const {
    std::vector<std::string> out;
    for (const auto& [n, t] : index_) out.push_back(n);
    return out;
}

std::vector<std::string> Checkpoint::files() const {
    std::vector<std::string> out;
    for (const auto& f : files_) out.push_back(f->path());
    return out;
}

void convert_to_f32(const TensorInfo& t, float* out) {
    const int64_t n = t.numel();
    if (n == 0) return;  // an empty tensor may have no data pointer at all
    const uint8_t* p = t.data;
    switch (t.dtype) {
        case DType::F32: std::memcpy(out, p, size_t(n) * 4); break;
        case DType::BF16:
            for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(uint16_t(p[2 * i] | (p[2 * i + 1] << 8)));
            break;
        case DType::F16:
            for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(uint16_t(p[2 * i] | (p[2 * i + 1] << 8)));
            break;
        case DType::F8_E4M3:
            for (int64_t i = 0; i < n; ++i) out[i] = fp8_e4m3_to_f32(p[i]);
            break;
        case DType::I32:
            for (int64_t i = 0; i < n; ++i) {
                int32_t v;
                std::memcpy(&v, p + 4 * i, 4);
                out[i] = float(v);
            }
            break;
        case DType::I64:
            for (int64_t i = 0; i < n; ++i) {
                int64_t v;
                std::memcpy(&v, p + 8 * i, 8);
                out[i] = float(v);
            }
            break;
        case DType::U8:
            for (int64_t i = 0; i < n; ++i) out[i] = float(p[i]);
            break;
        default: throw FormatError(t.file + ": tensor '" + t.name + "' has an unsupported dtype");
    }
}

std::vector<float> Checkpoint::read_f32(const std::string& name) const {
    const TensorInfo& t = at(name);
    std::vector<float> out(size_t(t.numel()));
    convert_to_f32(t, out.data());
    return out;
}

TensorToWrite make_tensor(const std::string& name, DType dtype, std::vector<int64_t> shape, const float* v) {
    TensorToWrite t;
    t.name = name;
    t.dtype = dtype;
    t.shape = std::move(shape);
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    t.bytes.resize(size_t(n) * size_t(dtype_size(dtype)));
    uint8_t* o = t.bytes.data();
    for (int64_t i = 0; i < n; ++i) {
        switch (dtype) {
            case DType::F32: std::memcpy(o + 4 * i, &v[i], 4); break;
            case DType::BF16: {
                uint16_t h = f32_to_bf16(v[i]);
                o[2 * i] = uint8_t(h);
                o[2 * i + 1] = uint8_t(h >> 8);
                break;
            }
            case DType::F16: {
                uint16_t h = f32_to_f16(v[i]);
                o[2 * i] = uint8_t(h);
                o[2 * i + 1] = uint8_t(h >> 8);
                break;
            }
            case DType::F8_E4M3: o[i] = f32_to_fp8_e4m3(v[i]); break;
            default: throw FormatError("make_tensor: cannot encode '" + name + "' as " + dtype_name(dtype));
        }
    }
    return t;
}

void write_file_atomic(const std::filesystem::path& path, const std::function<void(std::ostream&)>& write) {
    std::filesystem::path tmp = path;
    tmp += ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out) throw FormatError(tmp.string() + ": cannot create");
        write(out);
        out.flush();
        if (!out) throw FormatError(tmp.string() + ": write failed (disk full?)");
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) throw FormatError(path.string() + ": cannot rename the temporary file: " + ec.message());
}

void write_file_atomic(const std::filesystem::path& path, const std::string& text) {
    write_file_atomic(path, [&](std::ostream& out) { out.write(text.data(), std::streamsize(text.size())); });
}

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    json header = json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    uint64_t offset = 0;
    for (const auto& t : tensors) {
        header[t.name] = {{"dtype", dtype_name(t.dtype)},
                          {"shape", t.shape},
                          {"data_offsets", {offset, offset + t.bytes.size()}}};
        offset += t.bytes.size();
    }
    std::string h = header.dump();
    while ((h.size() + 8) % 8) h.push_back(' ');  // align the data section to 8 bytes
    write_file_atomic(path, [&](std::ostream& out) {
        uint64_t n = h.size();
        char len[8];
        for (int i = 0; i < 8; ++i) len[i] = char((n >> (8 * i)) & 0xff);
        out.write(len, 8);
        out.write(h.data(), std::streamsize(h.size()));
        for (const auto& t : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), std::streamsize(t.bytes.size()));
    });
}

}  // namespace moescope
