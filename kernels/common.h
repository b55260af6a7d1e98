// Shared by every kernel header: error checking that throws DeviceError, and WRef, the
// description of one device weight matrix (BF16 or F32, row-major [rows, cols]).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "engine/errors.h"

namespace moescope::cuda {

inline void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
        throw DeviceError(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

// After every launch: a launch error (bad configuration) surfaces here, next to its kernel.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

struct WRef {
    const void* ptr = nullptr;  // [rows, cols] row-major
    bool bf16 = false;          // element type: __nv_bfloat16 or float
    int64_t rows = 0, cols = 0;
    bool empty() const { return ptr == nullptr; }
};

}  // namespace moescope::cuda

#define CUDA_CHECK(x) ::moescope::cuda::check((x), #x)
