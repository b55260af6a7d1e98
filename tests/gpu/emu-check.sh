#!/usr/bin/env bash
# emu-check.sh: every check group of tests/gpu/gpu_checks.cpp on the CPU through the SIMT
# emulator (tests/gpu/emu), the slow whole-model groups included, one line per group with
# its time. CTest runs only the fast groups (tests/gpu/emu/CMakeLists.txt); run this after
# changing kernels/ or kernels/cuda_backend.cpp. About 3.5 minutes on 2 cores (220 s, all 21 groups).
# Usage: bash tests/gpu/emu-check.sh [BUILD_DIR] [GROUP...]
#   BUILD_DIR defaults to build/ (configured here if needed); no GROUP: all that can run.
#   EMU_ORDER_ALL=forward,reverse runs each group in each order (default: random, EMU_SEED).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-$root/build}"
[[ $# -gt 0 ]] && shift
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$build" -j "$(nproc)" --target moescope-gpu-emu-checks
bin="$build/tests/gpu/emu/moescope-gpu-emu-checks"
groups=("$@")
if [[ ${#groups[@]} -eq 0 ]]; then
  # Not here: fp8-gemm-cublaslt (the emulator's cuBLASLt refuses every FP8 layout, so the group
  # would only see the refusal) and selection-and-refusal (select_backend dlopens
  # libmoescope_cuda.so, the real library, which needs a device).
  mapfile -t groups < <("$bin" --list | grep -vx -e fp8-gemm-cublaslt -e selection-and-refusal)
fi
order="${EMU_ORDER_ALL:-random}"
export EMU_GROUP_TIMEOUT="${EMU_GROUP_TIMEOUT:-1800}"
exec bash "$root/tests/gpu/emu/run_groups.sh" "$bin" "${groups[@]/%/:$order}"
