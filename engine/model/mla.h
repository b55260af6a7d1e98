// Multi-head latent attention (deepseek-v3.md section 2.1): the latent cache and the
// naive (decompressing) and absorbed (attention in latent space) forward paths.
#pragma once
#include <new>
#include <vector>

#include "engine/config.h"
#include "engine/model/rope.h"
#include "engine/weights.h"

namespace moescope {

// What MLA caches for one layer: only the normalized latent c and the rope'd k_pe.
// Storage on 64-byte boundaries: the attention kernels stream these rows with vector loads,
// and whether malloc happened to return a 16-, 32- or 64-byte aligned block moved the decode
// attention by ~10% from one allocation to the next (docs/performance.md).
template <class T>
struct CacheLineAllocator {
    using value_type = T;
    static constexpr std::align_val_t kAlign{64};
    CacheLineAllocator() = default;
    template <class U>
    CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
    void deallocate(T* p, size_t) noexcept { ::operator delete(p, kAlign); }
    template <class U>
    bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
};
using AlignedFloats = std::vector<float, CacheLineAllocator<float>>;

struct LatentCache {
    AlignedFloats c;     // [positions, d_c]
    AlignedFloats k_pe;  // [positions, d_rope]
};

struct MlaDims {
    int D, H, d_nope, d_rope, d_v, d_c, q_lora;
    float scale, eps;
    explicit MlaDims(const ModelConfig& c);
};

// Attention for T new tokens at positions start..start+T-1. Appends their c / k_pe to
// `cache` (which holds exactly `start` positions on entry), attends causally over the
// whole cache and writes out[T, D]. `absorbed` selects the latent-space path.
void mla_forward(float* out, const float* x, int T, int start, const AttentionWeights& w, const MlaDims& d,
                 const Rope& rope, LatentCache& cache, bool absorbed);

}  // namespace moescope
