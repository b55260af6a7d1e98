// FP8 e4m3 weights resident on the device (DeepSeek-V3's 128x128 block-scaled format) and the
// 1x128 activation quantization of the cuBLASLt prefill path. The device layout of one FP8
// matrix [rows, cols] is one carve of the weight arena:
//   bytes [0, align_up(rows * cols))         e4m3 values, row-major
//   then  [row_blocks, ld] f32 block scales  row-major, ld = ceil(cols / 128) rounded up to 4
// (cuBLASLt's BLK128x128 scale tensor wants 16-byte aligned leading dimensions; the padding
// columns are zero and never read by our kernels). A stacked gate|up matrix keeps the block grid
// of each part: rows [0, split) use the gate's blocks, rows [split, rows) start a new grid, so
// the checkpoint's scales are used unchanged even when split is not a multiple of 128.
// The grid arithmetic is host+device (unit-tested on the host); the kernels live in fp8.cu,
// their launchers are declared in kernels/gemm.h.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#ifndef __CUDACC__
#include "engine/dtype.h"
#endif

#ifdef __CUDACC__
#define MOESCOPE_HD __host__ __device__ __forceinline__
#else
#define MOESCOPE_HD inline
#endif

namespace moescope::cuda {

inline constexpr int kFp8Block = 128;

MOESCOPE_HD int64_t fp8_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block-scale grid of a (possibly stacked) FP8 matrix.
struct Fp8Grid {
    int64_t rows = 0, cols = 0;
    int64_t split = 0;  // rows of the first part of a stacked gate|up (0: not stacked)

    MOESCOPE_HD int64_t first_rows() const { return split > 0 && split < rows ? split : rows; }
    MOESCOPE_HD int64_t row_blocks() const {
        return fp8_cdiv(first_rows(), kFp8Block) + fp8_cdiv(rows - first_rows(), kFp8Block);
    }
    MOESCOPE_HD int64_t col_blocks() const { return fp8_cdiv(cols, kFp8Block); }
    MOESCOPE_HD int64_t ld() const { return fp8_cdiv(col_blocks(), 4) * 4; }
    // Scale row of matrix row r.
    MOESCOPE_HD int64_t scale_row(int64_t r) const {
        const int64_t f = first_rows();
        return r < f ? r / kFp8Block : fp8_cdiv(f, kFp8Block) + (r - f) / kFp8Block;
    }
    MOESCOPE_HD int64_t scale_count() const { return row_blocks() * ld(); }
    // Offset of the scales from the start of the carve, and the carve's size.
    MOESCOPE_HD int64_t scale_offset() const { return (rows * cols + 255) / 256 * 256; }
    MOESCOPE_HD int64_t bytes() const { return scale_offset() + scale_count() * 4; }
};

#ifndef __CUDACC__
// ---- host side: building the device bytes (C++ only: uses the engine's e4m3 codec) ---------

// Re-quantizes one part ([rows, cols] f32 values that load_weights dequantized as
// e4m3 * scale_inv[r/128][c/128]) back to its e4m3 bytes with the checkpoint's scales:
// fp8 * s rounded to f32, divided by s, is within 2^-23 relative of the e4m3 value, which
// rounds back to it, so this recovers the checkpoint's bytes. Writes q (rows * cols bytes,
// row-major) and the scales into rows [row0, row0 + ceil(rows/128)) of a grid with leading
// dimension ld. Returns false when any value does not round-trip bit for bit (the weights
// were changed after loading, e.g. trained, or the scales do not belong to them).
inline bool requantize_fp8_exact(uint8_t* q, float* grid_scales, int64_t ld, int64_t row0, const float* w,
                                 int64_t rows, int64_t cols, const float* scale_inv) {
    const int64_t cb = fp8_cdiv(cols, kFp8Block);
    for (int64_t r = 0; r < rows; ++r) {
        const float* srow = scale_inv + (r / kFp8Block) * cb;
        for (int64_t c = 0; c < cols; ++c) {
            const float s = srow[c / kFp8Block], v = w[r * cols + c];
            const uint8_t b = s != 0.0f ? f32_to_fp8_e4m3(v / s) : uint8_t(0);
            const float back = fp8_e4m3_to_f32(b) * s;
            if (!(back == v) && !(std::isnan(back) && std::isnan(v))) return false;
            q[r * cols + c] = b;
        }
    }
    for (int64_t br = 0; br < fp8_cdiv(rows, kFp8Block); ++br)
        for (int64_t bc = 0; bc < ld; ++bc) grid_scales[(row0 + br) * ld + bc] = bc < cb ? scale_inv[br * cb + bc] : 0.0f;
    return true;
}

// Quantizes f32 values with our own 128x128 block scales (amax / 448, 1 for an all-zero block),
// as save_checkpoint does: lossy, for weights that did not come from an FP8 checkpoint.
inline void quantize_fp8_amax(uint8_t* q, float* grid_scales, int64_t ld, int64_t row0, const float* w, int64_t rows,
                              int64_t cols) {
    const int64_t rb = fp8_cdiv(rows, kFp8Block), cb = fp8_cdiv(cols, kFp8Block);
    std::vector<float> s(size_t(rb * cb), 0.0f);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            float& a = s[size_t((r / kFp8Block) * cb + c / kFp8Block)];
            a = std::max(a, std::fabs(w[r * cols + c]));
        }
    for (auto& a : s) a = a > 0 ? a / 448.0f : 1.0f;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
            q[r * cols + c] = f32_to_fp8_e4m3(w[r * cols + c] / s[size_t((r / kFp8Block) * cb + c / kFp8Block)]);
    for (int64_t br = 0; br < rb; ++br)
        for (int64_t bc = 0; bc < ld; ++bc) grid_scales[(row0 + br) * ld + bc] = bc < cb ? s[size_t(br * cb + bc)] : 0.0f;
}

// f32 value of element (r, c) of a device-layout matrix, on the host (tests, self-check).
inline float fp8_value(const uint8_t* q, const float* scales, const Fp8Grid& g, int64_t r, int64_t c) {
    return fp8_e4m3_to_f32(q[r * g.cols + c]) * scales[g.scale_row(r) * g.ld() + c / kFp8Block];
}
#endif

}  // namespace moescope::cuda
