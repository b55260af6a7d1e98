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
template <class A, class B> void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const A& a, const B& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) { float s = c.v[m * 16 + n]; for (int k = 0; k < 16; ++k) s += a.v[m * 16 + k] * b.v[k * 16 + n]; out[m * 16 + n] = s; }
    std::memcpy(d.v, out, sizeof out);
    __syncwarp();
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
    __syncwarp();
    for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.v[r * 16 + c];
    __syncwarp();
}
template <class F> void fill_fragment(F& f, float x) { for (auto& e : f.v) e = x; }
}}
