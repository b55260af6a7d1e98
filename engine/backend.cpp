// The CPU backend and backend selection (dlopen of the CUDA library when present).
#include "engine/backend.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "engine/errors.h"
#include "engine/model/moe.h"

namespace moescope {
namespace {

class CpuCache : public BackendCache {
public:
    CpuCache(KvCache c, int capacity) : cache(std::move(c)), cap(capacity) {}
    int length() const override { return cache.length; }
    int capacity() const override { return cap; }
    void truncate(int n) override { cache.truncate(n); }
    void read_latent(int layer, int begin, int end, float* c, float* k_pe) const override {
        const LatentCache& l = cache.layers.at(size_t(layer));
        if (begin < 0 || end > cache.length || begin > end) throw Error("read_latent: positions out of range");
        if (c) std::memcpy(c, l.c.data() + size_t(begin) * cache.d_c, sizeof(float) * size_t(end - begin) * cache.d_c);
        if (k_pe)
            std::memcpy(k_pe, l.k_pe.data() + size_t(begin) * cache.d_rope,
                        sizeof(float) * size_t(end - begin) * cache.d_rope);
    }
    KvCache cache;
    int cap;
};

class CpuBackend : public Backend {
public:
    explicit CpuBackend(std::shared_ptr<Model> m) : model_(std::move(m)) {}
    std::string name() const override { return "cpu"; }
    const ModelConfig& config() const override { return model_->config(); }
    std::unique_ptr<BackendCache> new_cache(int mtp_module, int capacity) override {
        return std::make_unique<CpuCache>(mtp_module == 0 ? model_->new_cache() : model_->new_mtp_cache(), capacity);
    }
    void forward(const int* tokens, int T, BackendCache& cache, const ForwardOptions& opt,
                 ForwardResult& out) override {
        auto& c = static_cast<CpuCache&>(cache);
        check_capacity(c, T);
        model_->forward(tokens, T, c.cache, opt, out);
    }
    void forward_mtp(int k, const float* h_prev, const int* next_tokens, int T, BackendCache& cache,
                     const ForwardOptions& opt, ForwardResult& out) override {
        auto& c = static_cast<CpuCache&>(cache);
        check_capacity(c, T);
        model_->forward_mtp(k, h_prev, next_tokens, T, c.cache, opt, out);
    }
    std::vector<float> bias(int layer) const override { return model_->bias(layer); }
    void set_bias(int layer, const std::vector<float>& b) override { model_->set_bias(layer, b); }
    void reset_bias() override { model_->reset_bias(); }
    std::vector<uint8_t> disabled_experts(int layer) const override { return model_->disabled_experts(layer); }
    void set_disabled_experts(int layer, const std::vector<uint8_t>& d) override {
        model_->set_disabled_experts(layer, d);
    }
    int drop_top_experts(int layer) const override { return model_->drop_top_experts(layer); }
    void set_drop_top_experts(int layer, int drop_top) override {
        model_->set_drop_top_experts(layer, drop_top);
    }

private:
    static void check_capacity(const CpuCache& c, int T) {
        if (c.cache.length + T > c.cap)
            throw ContextError("the context holds " + std::to_string(c.cap) + " tokens; " +
                               std::to_string(c.cache.length) + " are used and " + std::to_string(T) +
                               " more do not fit");
    }
    std::shared_ptr<Model> model_;
};

using CreateFn = Backend* (*)(std::shared_ptr<Model>*, int capacity, char* err, size_t err_len);
using ProbeFn = int (*)(char* name, size_t name_len, char* err, size_t err_len);

// Why the library did not load (dlerror of the most telling attempt: a file that exists but
// cannot be loaded, e.g. for a missing libcublasLt, over a name that is not on the path).
std::string& cuda_library_error() {
    static std::string e;
    return e;
}

void* cuda_library() {
    static void* handle = [] {
        const char* name = MOESCOPE_CUDA_LIBRARY_NAME;
        if (!name[0]) return static_cast<void*>(nullptr);
        void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            if (const char* e = dlerror()) cuda_library_error() = e;
            // Next to the executable's build tree (kernels/) or installed beside it.
            for (const char* p : {"kernels/libmoescope_cuda.so", "../kernels/libmoescope_cuda.so",
                                  "../lib/libmoescope_cuda.so"}) {
                char exe[4096];
                ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
                if (n <= 0) break;
                exe[n] = 0;
                std::string dir(exe);
                dir = dir.substr(0, dir.rfind('/'));
                for (const std::string& candidate : {dir + "/" + p, dir + "/../" + p}) {
                    h = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
                    if (h) break;
                    const char* e = dlerror();
                    if (e && access(candidate.c_str(), F_OK) == 0) cuda_library_error() = e;
                }
                if (h) break;
            }
        }
        return h;
    }();
    return handle;
}

}  // namespace

std::vector<TokenPick> Backend::pick(const PickParams&, const std::vector<float>&) {
    throw Error("backend " + name() + " cannot choose tokens itself: sample the host logits");
}

Ablation current_ablation(const Backend& b) {
    const ModelConfig& c = b.config();
    const int L = c.num_hidden_layers + c.num_nextn_predict_layers;
    Ablation a{std::vector<std::vector<uint8_t>>(size_t(L)), std::vector<int>(size_t(L), 0)};
    for (int l = 0; l < L; ++l)
        if (c.is_moe_stack_layer(l)) {
            a.masks[size_t(l)] = b.disabled_experts(l);
            a.drop_top[size_t(l)] = b.drop_top_experts(l);
        }
    return a;
}

void set_ablation(Backend& b, const Ablation& a) {
    const ModelConfig& c = b.config();
    const int L = c.num_hidden_layers + c.num_nextn_predict_layers;
    const RouterDims dims(c);
    std::vector<std::vector<uint8_t>> masks(static_cast<size_t>(L));
    std::vector<int> drops(static_cast<size_t>(L), 0);
    for (int l = 0; l < L; ++l) {
        if (size_t(l) < a.masks.size()) masks[size_t(l)] = a.masks[size_t(l)];
        if (size_t(l) < a.drop_top.size()) drops[size_t(l)] = a.drop_top[size_t(l)];
        const auto& m = masks[size_t(l)];
        const bool any = drops[size_t(l)] != 0 || std::any_of(m.begin(), m.end(), [](uint8_t x) { return x != 0; });
        if (!c.is_moe_stack_layer(l)) {
            if (any) check_moe_layer(c, l);  // throws: nothing to switch off there
            continue;
        }
        if (masks[size_t(l)].empty()) masks[size_t(l)].assign(size_t(c.n_routed_experts), 0);
        check_disabled_experts(dims, masks[size_t(l)], l, drops[size_t(l)]);
    }
    for (int l = 0; l < L; ++l) {
        if (!c.is_moe_stack_layer(l)) continue;
        b.set_drop_top_experts(l, 0);
        b.set_disabled_experts(l, masks[size_t(l)]);
        b.set_drop_top_experts(l, drops[size_t(l)]);
    }
}

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<Model> model) {
    return std::make_unique<CpuBackend>(std::move(model));
}

CudaProbe probe_cuda() {
    CudaProbe p;
    void* lib = cuda_library();
    if (!lib) {
        p.error = MOESCOPE_CUDA_LIBRARY_NAME[0]
                      ? "the CUDA backend library (libmoescope_cuda.so) could not be loaded: " + cuda_library_error()
                      : "this build has no CUDA backend";
        return p;
    }
    p.library_found = true;
    auto probe = reinterpret_cast<ProbeFn>(dlsym(lib, "moescope_cuda_probe"));
    if (!probe) {
        p.error = "libmoescope_cuda.so lacks moescope_cuda_probe";
        return p;
    }
    char name[256] = {0}, err[512] = {0};
    p.device_count = probe(name, sizeof name, err, sizeof err);
    p.device_name = name;
    p.error = err;
    if (p.device_count <= 0 && p.error.empty()) p.error = "no CUDA device is present";
    return p;
}

BackendSelection select_backend(const std::string& request, std::shared_ptr<Model> model, int capacity) {
    BackendSelection s;
    if (request == "cpu") {
        s.backend = make_cpu_backend(std::move(model));
        s.notice = "running on the CPU (requested)";
        return s;
    }
    if (request != "cuda" && request != "auto")
        throw Error("unknown backend '" + request + "' (expected cpu, cuda or auto)");
    CudaProbe p = probe_cuda();
    std::string why = p.error;
    if (p.device_count > 0) {
        auto create = reinterpret_cast<CreateFn>(dlsym(cuda_library(), "moescope_cuda_create_backend"));
        if (create) {
            char err[1024] = {0};
            Backend* b = create(&model, capacity, err, sizeof err);
            if (b) {
                s.backend.reset(b);
                s.notice = "running on " + b->name();
                if (!b->notice().empty()) s.notice += ": " + b->notice();
                return s;
            }
            why = err;
        } else {
            why = "libmoescope_cuda.so lacks moescope_cuda_create_backend";
        }
    }
    if (request == "cuda") throw DeviceError("the CUDA backend cannot run: " + why);
    s.backend = make_cpu_backend(std::move(model));
    s.notice = "running on the CPU: " + why;
    return s;
}

}  // namespace moescope
