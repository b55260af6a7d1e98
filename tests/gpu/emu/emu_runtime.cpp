// The emulator's CUDA runtime and cuBLAS (declared in include/cuda_runtime.h, cublas_v2.h):
// flat host memory, streams, events and graphs, enough for kernels/cuda_backend.cpp and
// tests/gpu/gpu_checks.cpp. It checks what a device would reject or what only goes wrong
// on a device: copies whose device side is not inside a cudaMalloc block, work that is illegal
// during stream capture, pageable copies in a graph, and writes past a cudaMalloc block (a
// guard page right after it, canary bytes in the 256-byte rounding, checked at cudaFree).
// EMU_ASYNC=1 defers the non-blocking streams' work until a synchronization, so a host read
// before a sync sees stale data as on a device. cuBLAS sums in double (no tensor-core
// rounding); cuBLASLt refuses everything (include/cublasLt.h), so its callers' fallbacks run.
#include <map>
#include <memory>

#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_runtime.h"

namespace emu {
int last_error = 0;
}
// A captured graph: its operations in stream order, each depending on the one before (one
// stream). For the node API: each operation's kernel name (empty: a copy or a library call)
// and the type of its incoming edge (cudaGraphDependencyType; kNoEdge once removed).
struct EmuGraph {
    static constexpr unsigned char kNoEdge = 255;
    std::vector<std::function<void()>> ops;
    std::vector<std::string> kernels;
    std::vector<unsigned char> edge;
    std::vector<EmuGraphNode> nodes;  // handles, made by cudaGraphGetNodes
};
struct EmuEvent {
    int unused;
};

namespace {

// Where launches and copies go while a stream is being captured (null: not capturing).
std::vector<std::function<void()>>* capture = nullptr;
EmuGraph* building = nullptr;
// EMU_ASYNC: the non-blocking streams' queue. The legacy stream (nullptr) runs at once and
// does not wait for the queue, as a non-blocking stream does not synchronize with it.
const bool async_streams = std::getenv("EMU_ASYNC") && std::string(std::getenv("EMU_ASYNC")) != "0";
std::vector<std::function<void()>> queue;

void flush() {
    auto q = std::move(queue);
    queue.clear();
    for (auto& f : q) f();
}
void submit(void* stream, std::function<void()> f, const char* kernel = nullptr) {
    if (capture) {
        building->kernels.push_back(kernel ? std::string("moescope::cuda::") + kernel : std::string());
        building->edge.push_back(0);
        return capture->push_back(std::move(f));
    }
    if (async_streams && stream) return queue.push_back(std::move(f));
    f();
}

struct DeviceBlock {
    size_t bytes;
    char* map;
    size_t map_bytes;
};
constexpr size_t kPage = 4096;
constexpr unsigned char kCanary = 0xa5;
std::map<uintptr_t, DeviceBlock> device_blocks;
std::map<uintptr_t, size_t> pinned_blocks;

template <class M>
bool in_range(const M& m, const void* p, size_t n) {
    const auto a = uintptr_t(p);
    auto it = m.upper_bound(a);
    if (it == m.begin()) return false;
    --it;
    size_t len;
    if constexpr (std::is_same_v<typename M::mapped_type, DeviceBlock>) len = it->second.bytes;
    else len = it->second;
    return a + n <= it->first + len;
}
void no_capture(const char* what) {
    if (capture) emu::report(true, std::string(what) + " during stream capture (illegal: invalidates the capture)");
}

}  // namespace

namespace emu {
void launch_on(void* stream, const char* name, dim3 g, dim3 b, size_t smem, const std::function<void()>& body) {
    if (!capture && !(async_streams && stream)) return launch(name, g, b, smem, body);
    std::function<void()> copy = body;
    submit(stream, [=] {
        auto* c = capture;  // a graph replay runs the launch, it does not record it again
        capture = nullptr;
        launch(name, g, b, smem, copy);
        capture = c;
    }, name);
}
}  // namespace emu

// Device memory: 256-aligned (as cudaMalloc), ending at a guard page, 0xcd in fresh memory.
cudaError_t cudaMalloc(void** p, size_t n) {
    no_capture("cudaMalloc");
    if (n > (1ull << 40)) {
        *p = nullptr;
        emu::last_error = cudaErrorMemoryAllocation;
        return cudaErrorMemoryAllocation;
    }
    const size_t body = (std::max<size_t>(n, 1) + 255) / 256 * 256, pages = (body + kPage - 1) / kPage;
    const size_t map_bytes = (pages + 1) * kPage;
    char* map = static_cast<char*>(mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map == MAP_FAILED) {
        *p = nullptr;
        emu::last_error = cudaErrorMemoryAllocation;
        return cudaErrorMemoryAllocation;
    }
    mprotect(map + pages * kPage, kPage, PROT_NONE);
    char* q = map + pages * kPage - body;
    std::memset(q, 0xcd, n);
    std::memset(q + n, kCanary, body - n);
    device_blocks[uintptr_t(q)] = {n, map, map_bytes};
    *p = q;
    return 0;
}
cudaError_t cudaFree(void* p) {
    no_capture("cudaFree");
    flush();
    if (!p) return 0;
    auto it = device_blocks.find(uintptr_t(p));
    if (it == device_blocks.end()) {
        emu::report(true, "cudaFree of a pointer not from cudaMalloc");
        return 0;
    }
    const DeviceBlock b = it->second;
    const char* q = static_cast<const char*>(p);
    const size_t body = (std::max<size_t>(b.bytes, 1) + 255) / 256 * 256;
    for (size_t i = b.bytes; i < body; ++i)
        if (static_cast<unsigned char>(q[i]) != kCanary) {
            emu::report(true, "a write past the end of a cudaMalloc block of " + std::to_string(b.bytes) +
                                  " bytes (at byte " + std::to_string(i) + ")");
            break;
        }
    device_blocks.erase(it);
    munmap(b.map, b.map_bytes);
    return 0;
}
cudaError_t cudaMallocHost(void** p, size_t n) {
    no_capture("cudaMallocHost");
    *p = std::aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    pinned_blocks[uintptr_t(*p)] = n;
    return 0;
}
cudaError_t cudaFreeHost(void* p) { flush(); pinned_blocks.erase(uintptr_t(p)); std::free(p); return 0; }
static void check_copy(const void* d, const void* s, size_t n, cudaMemcpyKind k, bool async) {
    const bool sd = in_range(device_blocks, s, n), dd = in_range(device_blocks, d, n);
    if ((k == cudaMemcpyHostToDevice || k == cudaMemcpyDeviceToDevice) && !dd) emu::report(true, "cudaMemcpy: destination not in a device allocation");
    if ((k == cudaMemcpyDeviceToHost || k == cudaMemcpyDeviceToDevice) && !sd) emu::report(true, "cudaMemcpy: source not in a device allocation");
    if (k == cudaMemcpyHostToDevice && sd) emu::report(true, "cudaMemcpy H2D: source is device memory");
    if (k == cudaMemcpyDeviceToHost && dd) emu::report(true, "cudaMemcpy D2H: destination is device memory");
    if (async && capture) {
        if (k == cudaMemcpyHostToDevice && !in_range(pinned_blocks, s, n)) emu::report(true, "pageable H2D cudaMemcpyAsync during capture");
        if (k == cudaMemcpyDeviceToHost && !in_range(pinned_blocks, d, n)) emu::report(true, "pageable D2H cudaMemcpyAsync during capture");
    }
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) {
    no_capture("cudaMemcpy");
    check_copy(d, s, n, k, false);
    std::memcpy(d, s, n);
    return 0;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
    check_copy(d, s, n, k, true);
    if (!capture && k == cudaMemcpyHostToDevice && !in_range(pinned_blocks, s, n)) {  // pageable: staged now
        auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(s), static_cast<const char*>(s) + n);
        submit(st, [=] { std::memcpy(d, staged->data(), n); });
        return 0;
    }
    if (!capture && k == cudaMemcpyDeviceToHost && !in_range(pinned_blocks, d, n)) {  // pageable: returns when done
        if (st) flush();
        std::memcpy(d, s, n);
        return 0;
    }
    submit(st, [=] { std::memcpy(d, s, n); });
    return 0;
}
cudaError_t cudaMemset(void* d, int v, size_t n) { no_capture("cudaMemset"); std::memset(d, v, n); return 0; }
cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t st) {
    if (!in_range(device_blocks, d, n)) emu::report(true, "cudaMemsetAsync outside a device allocation");
    submit(st, [=] { std::memset(d, v, n); });
    return 0;
}
static int streams_made = 0;
cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = reinterpret_cast<cudaStream_t>(uintptr_t(0x1000 + ++streams_made)); return 0; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t) { return 0; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) { no_capture("cudaStreamSynchronize"); if (s) flush(); return 0; }
cudaError_t cudaDeviceSynchronize() { no_capture("cudaDeviceSynchronize"); flush(); return 0; }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return 0; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) { std::memset(p, 0, sizeof *p); std::strcpy(p->name, "EMU H200"); p->major = 9; p->minor = 0; p->multiProcessorCount = 132; p->totalGlobalMem = 140ull << 30; return 0; }
cudaError_t cudaSetDevice(int) { return 0; }
cudaError_t cudaMemGetInfo(size_t* f, size_t* t) { *f = 139ull << 30; *t = 140ull << 30; return 0; }
cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
    if (capture) return cudaErrorIllegalState;
    building = new EmuGraph;
    capture = &building->ops;
    return 0;
}
cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* g) { *g = building; building = nullptr; capture = nullptr; return 0; }
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
    // The operations run in order (the emulator has one device queue): an operation whose edge
    // was removed and not added back would run unordered on a device.
    for (size_t i = 1; i < g->edge.size(); ++i)
        if (g->edge[i] == EmuGraph::kNoEdge) {
            emu::report(true, "cudaGraphInstantiate: operation " + std::to_string(i) + " lost its dependency");
            return cudaErrorInvalidValue;
        }
    // EMU_REFUSE_PROGRAMMATIC=1: a driver that refuses programmatic edges (the backend's fallback).
    if (std::getenv("EMU_REFUSE_PROGRAMMATIC") &&
        std::count(g->edge.begin(), g->edge.end(), cudaGraphDependencyTypeProgrammatic) > 0)
        return emu::last_error = cudaErrorNotSupported;
    *e = new EmuGraph(*g);
    return 0;
}
// The node API on a captured graph (a chain): node i depends on node i - 1.
cudaError_t cudaGraphGetNodes(cudaGraph_t g, cudaGraphNode_t* nodes, size_t* n) {
    if (g->nodes.size() != g->ops.size()) {
        g->nodes.clear();
        for (size_t i = 0; i < g->ops.size(); ++i) g->nodes.push_back({g, i});
    }
    if (nodes)
        for (size_t i = 0; i < std::min(*n, g->nodes.size()); ++i) nodes[i] = &g->nodes[i];
    *n = g->nodes.size();
    return 0;
}
cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, cudaGraphNodeType* t) {
    *t = node->g->kernels[node->i].empty() ? cudaGraphNodeTypeMemcpy : cudaGraphNodeTypeKernel;
    return 0;
}
cudaError_t cudaGraphKernelNodeGetParams(cudaGraphNode_t node, cudaKernelNodeParams* p) {
    if (node->g->kernels[node->i].empty()) return cudaErrorInvalidValue;
    *p = cudaKernelNodeParams{};
    p->func = const_cast<char*>(node->g->kernels[node->i].c_str());  // cudaFuncGetName reads it back
    return 0;
}
cudaError_t cudaFuncGetName(const char** name, const void* func) {
    *name = static_cast<const char*>(func);
    return 0;
}
cudaError_t cudaGraphNodeGetDependencies(cudaGraphNode_t node, cudaGraphNode_t* deps, cudaGraphEdgeData* edges,
                                         size_t* n) {
    const bool has = node->i > 0 && node->g->edge[node->i] != EmuGraph::kNoEdge;
    if (deps && has && *n >= 1) {
        deps[0] = &node->g->nodes[node->i - 1];
        if (edges) {
            edges[0] = cudaGraphEdgeData{};
            edges[0].type = node->g->edge[node->i];
        }
    }
    *n = has ? 1 : 0;
    return 0;
}
namespace {
// The edges of a chain only: from must be the node before `to`.
bool chain_edge(cudaGraph_t g, cudaGraphNode_t from, cudaGraphNode_t to) {
    return from->g == g && to->g == g && to->i > 0 && from->i + 1 == to->i;
}
}  // namespace
cudaError_t cudaGraphRemoveDependencies(cudaGraph_t g, const cudaGraphNode_t* from, const cudaGraphNode_t* to,
                                        const cudaGraphEdgeData* edges, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!chain_edge(g, from[i], to[i]) || g->edge[to[i]->i] != (edges ? edges[i].type : 0))
            return cudaErrorInvalidValue;
        g->edge[to[i]->i] = EmuGraph::kNoEdge;
    }
    return 0;
}
// As on a device: a programmatic edge joins two kernel nodes and leaves from the programmatic
// or the launch-completion port.
cudaError_t cudaGraphAddDependencies(cudaGraph_t g, const cudaGraphNode_t* from, const cudaGraphNode_t* to,
                                     const cudaGraphEdgeData* edges, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!chain_edge(g, from[i], to[i]) || g->edge[to[i]->i] != EmuGraph::kNoEdge) return cudaErrorInvalidValue;
        const unsigned char type = edges ? edges[i].type : 0;
        if (type == cudaGraphDependencyTypeProgrammatic &&
            (g->kernels[from[i]->i].empty() || g->kernels[to[i]->i].empty() ||
             (edges[i].from_port != cudaGraphKernelNodePortProgrammatic &&
              edges[i].from_port != cudaGraphKernelNodePortLaunchCompletion)))
            return cudaErrorInvalidValue;
        g->edge[to[i]->i] = type;
    }
    return 0;
}
// EMU_PDL_NO_WAIT=1: the last kernel behind a programmatic edge leaves its output as it was, as
// one that read its inputs before its predecessor wrote them (no pdl_wait) could on a device; the
// backend must notice the replay differ from its launches and capture its graphs again without
// programmatic edges. (Running such kernels before their predecessors would be closer, but reads
// indices nobody wrote yet: the emulator would fault where a device reports an illegal address.)
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t st) {
    no_capture("cudaGraphLaunch");
    size_t lost = e->ops.size();
    if (std::getenv("EMU_PDL_NO_WAIT"))
        for (size_t i = 0; i < e->ops.size(); ++i)
            if (e->edge[i] == cudaGraphDependencyTypeProgrammatic) lost = i;
    for (size_t i = 0; i < e->ops.size(); ++i)
        if (i != lost) submit(st, e->ops[i]);
    return 0;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) { delete e; return 0; }
cudaError_t cudaGraphDestroy(cudaGraph_t g) { delete g; return 0; }
cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new EmuEvent{0}; return 0; }
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return 0; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { flush(); return 0; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 1; return 0; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return 0; }
// ---- cuBLAS (column-major), f32 accumulation in double --------------------------------------
struct EmuCublas { void* ws = nullptr; cudaStream_t s = nullptr; };
const char* cublasGetStatusString(cublasStatus_t s) { return s ? "EMU_NOT_SUPPORTED" : "SUCCESS"; }
cublasStatus_t cublasCreate(cublasHandle_t* h) { no_capture("cublasCreate"); *h = new EmuCublas; return 0; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return 0; }
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) { h->s = s; return 0; }
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return 0; }
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* w, size_t) { h->ws = w; return 0; }
template <class TA, class TB>
static void gemm_cm(bool ta, bool tb, int m, int n, int k, float alpha, const TA* A, int lda, const TB* B, int ldb, float beta, float* C, int ldc,
                    float (*fa)(TA), float (*fb)(TB)) {
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            double s = 0;
            for (int p = 0; p < k; ++p) {
                const float a = fa(ta ? A[size_t(i) * lda + p] : A[size_t(p) * lda + i]);
                const float b = fb(tb ? B[size_t(p) * ldb + j] : B[size_t(j) * ldb + p]);
                s += double(a) * b;
            }
            float& c = C[size_t(j) * ldc + i];
            c = float(alpha * s + (beta != 0 ? double(beta) * c : 0.0));
        }
}
static float idf(float x) { return x; }
static float bff(__nv_bfloat16 x) { return __bfloat162float(x); }
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float* alpha,
                           const float* A, int lda, const float* B, int ldb, const float* beta, float* C, int ldc) {
    no_capture("cublasSgemm");
    if (!in_range(device_blocks, C, 4)) emu::report(true, "cublasSgemm: C not device memory");
    const float al = *alpha, be = *beta;
    submit(h->s, [=] { gemm_cm<float, float>(ta == CUBLAS_OP_T, tb == CUBLAS_OP_T, m, n, k, al, A, lda, B, ldb, be, C, ldc, idf, idf); });
    return 0;
}
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType_t at, int lda, const void* B, cudaDataType_t bt, int ldb, const void* beta,
                            void* C, cudaDataType_t ct, int ldc, cublasComputeType_t, cublasGemmAlgo_t) {
    no_capture("cublasGemmEx");
    if (at != CUDA_R_16BF || bt != CUDA_R_16BF || ct != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    submit(h->s, [=] { gemm_cm<__nv_bfloat16, __nv_bfloat16>(ta == CUBLAS_OP_T, tb == CUBLAS_OP_T, m, n, k, al,
                                          static_cast<const __nv_bfloat16*>(A), lda, static_cast<const __nv_bfloat16*>(B), ldb,
                                          be, static_cast<float*>(C), ldc, bff, bff); });
    return 0;
}
cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda, long long sa, const float* B, int ldb,
                                         long long sb, const float* beta, float* C, int ldc, long long sc, int batch) {
    no_capture("cublasSgemmStridedBatched");
    const float al = *alpha, be = *beta;
    submit(h->s, [=] { for (int b = 0; b < batch; ++b)
        gemm_cm<float, float>(ta == CUBLAS_OP_T, tb == CUBLAS_OP_T, m, n, k, al, A + b * sa, lda, B + b * sb, ldb, be, C + b * sc, ldc, idf, idf); });
    return 0;
}
