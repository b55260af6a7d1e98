// The SIMT emulator behind moescope-gpu-emu-checks: runs the real kernels/*.cu (turned into C++
// by cu_to_cpp.py) on the CPU, without a CUDA device or nvcc, so that every session and CI can
// execute the kernels. Blocks run one at a time; each CUDA thread of a block is a ucontext fiber.
// __syncthreads and the warp intrinsics are barriers that resolve with CUDA's lane/mask rules,
// so a missing barrier, a mask naming an exited lane or divergent __syncthreads shows as an
// "EMU ERROR" line rather than silently working. Within each phase between barriers the fibers
// run in a selectable order (EMU_ORDER=forward|reverse|random, EMU_SEED for random), and so do
// the blocks of a launch: a race between threads, or a block writing into another's part,
// gives order-dependent results, which the checks then catch.
// Limits: one "device", blocks never overlap in time (only order-dependence between them
// shows), no timing, no tensor-core rounding (WMMA is summed in f32), and the host compiler's
// FMA contraction differs from nvcc's. docs/gpu.md, "Kernels on the CPU", has the rest.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
    unsigned x, y, z;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
inline int2 make_int2(int a, int b) { return {a, b}; }

namespace emu {

// Where a fiber stopped: still runnable, at __syncthreads, at a warp intrinsic, or returned.
enum class State { run, block_barrier, warp_op, done };
enum WarpOpKind { shfl = 0, shfl_xor = 1, shfl_down = 2, shfl_up = 3, ballot = 4, syncwarp = 5 };

struct Fiber {
    ucontext_t ctx;    // the fiber's registers where there is no emu_switch_stack (not x86-64)
    void* sp = nullptr;  // x86-64: its saved stack pointer
    char* stack = nullptr;
    uint3 tid;
    State state = State::run;
    int line = 0;  // source line of the barrier it waits at (for the messages)
    int kind = 0, arg = 0, width = 32;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
};

// The current fiber and block; kernels read them through threadIdx / blockIdx / ...
extern Fiber* current;
extern uint3 block_idx;
extern dim3 block_dim, grid_dim;
extern long errors, warnings;

// An emulator finding. Errors make the run fail: at exit the process prints a FAIL line that
// gpu_checks' harness counts, and exits non-zero.
void report(bool error, const std::string& message);

// A <<<grid, block, smem, stream>>> launch (cu_to_cpp.py writes these calls).
void launch_on(void* stream, const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
               const std::function<void()>& body);
// Runs the blocks now (the stream layer in emu_runtime.cpp decides when).
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);
void* dynamic_smem();
// Every __shared__ declaration registers itself: poisoned once per block (an uninitialised read
// yields NaN / all-ones, as garbage would), and the per-launch total is checked against 48 KiB.
void note_static_smem(void* p, size_t bytes);
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) by name.
void set_max_dynamic_smem(const char* name, int bytes);

void yield_to_scheduler();
uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width, int line);

template <class T>
uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8);
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
}  // namespace emu

#define threadIdx (::emu::current->tid)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define warpSize 32

// The line argument names the barrier in messages ("waits at __syncthreads line 57").
inline void __syncthreads(int line = __builtin_LINE()) {
    emu::current->state = emu::State::block_barrier;
    emu::current->line = line;
    emu::yield_to_scheduler();
}
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    emu::warp_op(emu::syncwarp, mask, 0, 0, 32, line);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, int line = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::shfl, mask, emu::to_bits(v), src, width, line));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::shfl_xor, mask, emu::to_bits(v), lane_mask, width, line));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::shfl_down, mask, emu::to_bits(v), int(delta), width, line));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::shfl_up, mask, emu::to_bits(v), int(delta), width, line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
    return unsigned(emu::warp_op(emu::ballot, mask, pred ? 1 : 0, 0, 32, line));
}
inline unsigned __float_as_uint(float f) { return emu::from_bits<unsigned>(emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return emu::from_bits<float>(u); }
inline int __float_as_int(float f) { return emu::from_bits<int>(emu::to_bits(f)); }
template <class A, class B>
inline auto min(A a, B b) {
    return a < b ? a : b;
}
template <class A, class B>
inline auto max(A a, B b) {
    return a > b ? a : b;
}
// Fibers of one block never run at the same time, so a plain read-modify-write is atomic.
template <class T>
T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
using std::isinf;
using std::isnan;
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

// The runtime's error type, needed by every header above the runtime.
typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
namespace emu {
extern int last_error;
}
inline cudaError_t cudaGetLastError() {
    const int e = emu::last_error;
    emu::last_error = 0;
    return e;
}
inline const char* cudaGetErrorName(cudaError_t) { return "emu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu"; }
