// Shared by every kernel header: error checking that throws DeviceError, and WRef, the
// description of one device weight matrix (BF16, F32 or FP8 e4m3 with block scales, row-major
// [rows, cols]).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "engine/errors.h"
#include "kernels/fp8.h"

namespace moescope::cuda {

inline void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
        throw DeviceError(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

// After every launch: a launch error (bad configuration) surfaces here, next to its kernel.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

struct WRef {
    const void* ptr = nullptr;  // [rows, cols] row-major
    bool bf16 = false;          // element type: __nv_bfloat16 or float (ignored when fp8())
    int64_t rows = 0, cols = 0;
    // FP8: ptr holds e4m3 bytes and `scale` the block scales (layout in kernels/fp8.h); only
    // kernels/gemm.h and the FP8 kernels read such a matrix.
    const float* scale = nullptr;
    int64_t split = 0;          // stacked gate|up: rows of the gate (its own block grid)
    bool empty() const { return ptr == nullptr; }
    bool fp8() const { return scale != nullptr; }
    Fp8Grid grid() const { return Fp8Grid{rows, cols, split}; }
};

// The WRef of an FP8 carve (values, then the scales at Fp8Grid::scale_offset()).
inline WRef fp8_ref(const void* carve, int64_t rows, int64_t cols, int64_t split = 0) {
    const Fp8Grid g{rows, cols, split};
    return WRef{carve, false, rows, cols,
                reinterpret_cast<const float*>(static_cast<const char*>(carve) + g.scale_offset()), split};
}

}  // namespace moescope::cuda

#define CUDA_CHECK(x) ::moescope::cuda::check((x), #x)
