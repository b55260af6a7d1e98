// The emulator's WMMA (16x16x16, bf16 in, f32 accumulate): every lane holds the whole fragment
// and computes it redundantly; the sums are plain f32 in k order, not the tensor cores' order.
#pragma once
#include "cuda_bf16.h"
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { float v[256]; static constexpr int num_elements = 256; };
template <class T, class L> void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
    __syncwarp();
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = __bfloat162float(std::is_same_v<L, row_major> ? p[r * ld + c] : p[c * ld + r]);
}
template <class T, class L> void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
    __syncwarp();
    for (int k = 0; k < 16; ++k) for (int n = 0; n < 16; ++n) f.v[k * 16 + n] = __bfloat162float(std::is_same_v<L, row_major> ? p[k * ld + n] : p[n * ld + k]);
}
// Each product is summed once per warp: the lanes hold identical fragments (each loaded the
// whole tile from the same pointer, which WMMA requires anyway), so lane 0 sums and the others
// copy. Summing in all 32 lanes made the grouped GEMM's check several times slower.
template <class A, class B> void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const A& a, const B& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    static const float* result[32];  // per warp of the block: lane 0's d
    const unsigned lin = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned lane = lin & 31, warp = lin >> 5;
    __syncwarp();
    if (lane == 0) {
        float out[256];  // d may be c
        for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) { float s = c.v[m * 16 + n]; for (int k = 0; k < 16; ++k) s += a.v[m * 16 + k] * b.v[k * 16 + n]; out[m * 16 + n] = s; }
        std::memcpy(d.v, out, sizeof out);
        result[warp] = d.v;
    }
    __syncwarp();
    if (lane != 0) std::memcpy(d.v, result[warp], sizeof d.v);
    __syncwarp();  // lane 0's d stays as it is until every lane has its copy
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
    __syncwarp();
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.v[r * 16 + c];
    __syncwarp();
}
template <class F> void fill_fragment(F& f, float x) { for (auto& e : f.v) e = x; }
}}
