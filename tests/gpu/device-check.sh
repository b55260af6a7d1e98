#!/usr/bin/env bash
# device-check.sh: everything the GPU machine should run, in one call, in under 10 minutes.
# Time caps: build 200 s, checks 150 s (21 groups, 40 s each at most), bench 80 s, FP8 bench
# 60 s, default-model bench 40 s, peer 100 s, then compute-sanitizer memcheck group by group
# until 560 s; every cap
# shrinks so that the table prints by 575 s (run it with timeout_s=590). The build takes about
# a minute on the machine's 16 cores, so most runs end well before the caps.
# Configures without Qt, builds the CUDA backend, the CLI and moescope-gpu-checks for sm_90,
# runs the parity checks, gpu-bench and the PyTorch/transformers peer, and prints a short
# table last. The full log goes to $OUT/device-check.log when $OUT is set.
# The machine has no Debian -dev packages: run scripts/fetch-device-deps here first and carry
# .device-deps. Usage (from the repository root): bash tests/gpu/device-check.sh
#   run(command="bash tests/gpu/device-check.sh", carry=[".device-deps"], timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
BUILD=${MOESCOPE_DEVICE_BUILD:-$ROOT/build-device}
OUTDIR=${OUT:-$BUILD/out}
# $OUT brings back at most 8 files: the long logs stay in $LOGS (their failing parts are
# printed into device-check.log).
LOGS=$BUILD/logs
mkdir -p "$OUTDIR" "$LOGS"
LOG=$OUTDIR/device-check.log
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
# A step's time cap, shortened so that the summary still prints before 575 s (run's limit 590).
cap() { local left=$(( 575 - $(elapsed) )); [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
step() { echo; echo "=== [$(elapsed) s] $*"; }

declare -A RESULT
RESULT[build]="not run"; RESULT[checks]="not run"; RESULT[bench]="not run"; RESULT[bench-fp8]="not run"
RESULT[peer]="not run"; RESULT[bench-mtp]="not run"; RESULT[profile]="not run"

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
export PATH=/usr/local/cuda/bin:$PATH
nvcc --version | tail -1

step "prerequisites"
# The engine's Debian build dependencies travel in .device-deps (scripts/fetch-device-deps);
# they are unpacked under /tmp, never into /, and only our binaries see their libraries.
CMAKE_DEPS=()
DEPS_LIB=""
if [ -f .device-deps/moescope-deps.tar.gz ]; then
  DEPS=/tmp/moescope-deps
  rm -rf "$DEPS" && mkdir -p "$DEPS" && tar -xzf .device-deps/moescope-deps.tar.gz -C "$DEPS"
  A=x86_64-linux-gnu
  export PKG_CONFIG_SYSROOT_DIR=$DEPS
  export PKG_CONFIG_LIBDIR=$DEPS/usr/lib/$A/pkgconfig:$DEPS/usr/lib/$A/openblas-pthread/pkgconfig:$DEPS/usr/share/pkgconfig
  DEPS_LIB=$DEPS/usr/lib/$A:$DEPS/usr/lib/$A/openblas-pthread
  CMAKE_DEPS=(-DPKG_CONFIG_EXECUTABLE=$ROOT/tests/gpu/deps-pkgconf -DCMAKE_PREFIX_PATH=$DEPS/usr)
  export MOESCOPE_DEPS_LIB=$DEPS_LIB MOESCOPE_DEPS_PKGCONF=$DEPS/usr/bin/pkgconf
  echo "using the carried dependencies in $DEPS"
fi
# Our binaries (and the peer, which runs the CLI) find the carried libraries first.
with_deps() {
  if [ -n "$DEPS_LIB" ]; then LD_LIBRARY_PATH="$DEPS_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$@"; else "$@"; fi
}
missing=()
for tool in cmake ninja nvcc python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#CMAKE_DEPS[@]} -eq 0 ]; then
  command -v pkg-config >/dev/null || missing+=("pkg-config")
  pkg-config --exists openblas 2>/dev/null || missing+=("openblas (pkg-config)")
  pkg-config --exists libpcre2-8 2>/dev/null || missing+=("libpcre2-8 (pkg-config)")
  pkg-config --exists icu-uc 2>/dev/null || missing+=("icu-uc (pkg-config)")
  [ -f /usr/include/nlohmann/json.hpp ] || missing+=("nlohmann-json")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing: ${missing[*]} (run scripts/fetch-device-deps here and carry .device-deps)"
fi

step "configure (no Qt)"
if cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOESCOPE_GUI=OFF -DMOESCOPE_TESTS=ON \
     -DMOESCOPE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "${CMAKE_DEPS[@]}" > "$LOGS/configure.log" 2>&1; then
  tail -3 "$LOGS/configure.log"
  step "build -j16"
  with_deps timeout 200 cmake --build "$BUILD" -j16 --target moescope_cuda moescope-cli moescope-gpu-checks \
       > "$LOGS/build.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then
    RESULT[build]="ok ($(elapsed) s)"
  elif [ $rc = 124 ]; then
    RESULT[build]="FAILED"
    echo "the build ran past its 200 s cap; rerun to continue it (the build folder is kept): $(tail -1 "$LOGS/build.log")"
  else
    RESULT[build]="FAILED"
    grep -E "error|FAILED" "$LOGS/build.log" | head -40
  fi
else
  RESULT[build]="configure FAILED"
  tail -40 "$LOGS/configure.log"
fi

if [ "${RESULT[build]}" != "FAILED" ] && [ -x "$BUILD/tests/gpu/moescope-gpu-checks" ]; then
  step "moescope-gpu-checks"
  MOESCOPE_GPU_CHECK_TIMEOUT=40 with_deps timeout "$(cap 150)" "$BUILD/tests/gpu/moescope-gpu-checks" > "$OUTDIR/gpu-checks.log" 2>&1
  rc=$?
  grep -E "^(FAIL|SKIP)" "$OUTDIR/gpu-checks.log" | head -60
  # Counted from the lines: the summary line is missing when the time cap stops the run.
  RESULT[checks]="$(grep -c '^PASS' "$OUTDIR/gpu-checks.log") passed, $(grep -c '^FAIL' "$OUTDIR/gpu-checks.log") failed (rc $rc)"
  echo "${RESULT[checks]}"

  step "gpu-bench"
  if with_deps timeout "$(cap 80)" "$BUILD/engine/moescope-cli" gpu-bench --json > "$OUTDIR/gpu-bench.json" 2> "$LOGS/gpu-bench.err"; then
    cat "$OUTDIR/gpu-bench.json"
    RESULT[bench]=$(python3 - "$OUTDIR/gpu-bench.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m = r.get("mtp", {})
loop = r.get("prefill_tokens_per_s_per_expert_loop")
experts = "%s%s" % (r.get("prefill_experts", "?"), "; per-expert loop %.0f" % loop if loop else "")
pdl = "PDL on, %d edges; graphs without PDL %.1f" % (r.get("programmatic_edges", 0), r.get("decode_tokens_per_s_cuda_graph_without_pdl", 0)) \
    if r.get("programmatic_launches") else "PDL off%s" % (": " + r["programmatic_launches_error"] if "programmatic_launches_error" in r else "")
print("prefill %.0f tok/s (%s), decode %.1f tok/s (%s, %s; launched %.1f), %.0f GB/s = %.0f%% of copy bw %.0f GB/s, telemetry %+.1f%%, MTP x%.2f (projected)" % (
    r["prefill_tokens_per_s"], experts, r["decode_tokens_per_s"], r.get("decode_path", "?"), pdl, r.get("decode_tokens_per_s_launches", 0),
    r["decode_bandwidth_GBps"], 100 * r["decode_fraction_of_copy_bandwidth"], r["copy_bandwidth_GBps"],
    r["telemetry_overhead_percent"], m.get("projected_speedup", 0)))
EOF
)
    RESULT[profile]=$(python3 - "$OUTDIR/gpu-bench.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
p = sorted(r.get("decode_profile_us", []), key=lambda x: -x["us"])
print("decode step, us per op: %s (total %.0f us, launched behind a busy wait)" % (
    ", ".join("%s %.0f" % (x["op"], x["us"]) for x in p[:7]), r.get("decode_profile_total_us", 0)))
EOF
)
  else
    RESULT[bench]="FAILED: $(tail -2 "$LOGS/gpu-bench.err")"
    cat "$LOGS/gpu-bench.err"
  fi

  step "gpu-bench, FP8-resident weights"
  if with_deps timeout "$(cap 60)" "$BUILD/engine/moescope-cli" gpu-bench --json --weights fp8 --decode 64 \
       > "$OUTDIR/gpu-bench-fp8.json" 2> "$LOGS/gpu-bench-fp8.err"; then
    cat "$OUTDIR/gpu-bench-fp8.json"
    RESULT[bench-fp8]=$(python3 - "$OUTDIR/gpu-bench-fp8.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("prefill %.0f tok/s, decode %.1f tok/s (%s; launched %.1f), %.0f GB/s = %.0f%% of copy bw; %s" % (
    r["prefill_tokens_per_s"], r["decode_tokens_per_s"], r.get("decode_path", "?"), r.get("decode_tokens_per_s_launches", 0),
    r["decode_bandwidth_GBps"], 100 * r["decode_fraction_of_copy_bandwidth"], r.get("fp8", "")))
EOF
)
  else
    RESULT[bench-fp8]="FAILED: $(tail -2 "$LOGS/gpu-bench-fp8.err")"
    cat "$LOGS/gpu-bench-fp8.err"
  fi

  # gpu-bench's random weights accept no draft, so its MTP speed-up is a projection; the
  # embedded default model (trained with an MTP module) gives a measured one, small as it is.
  step "bench: the default model on the device (measured MTP speed-up)"
  if with_deps timeout "$(cap 40)" "$BUILD/engine/moescope-cli" bench resources/models/default --backend cuda --json \
       --no-train --contexts 16,512 --tokens 128 --repeats 2 > "$OUTDIR/bench-default-cuda.json" 2> "$LOGS/bench-default.err"; then
    RESULT[bench-mtp]=$(python3 - "$OUTDIR/bench-default-cuda.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("; ".join("ctx %d: decode %.0f tok/s, with MTP %.0f (acceptance %.2f, x%.2f measured, x%.2f predicted)" % (
    x["context"], x["decode_tokens_per_s"], x["decode_tokens_per_s_mtp"], x["mtp_acceptance_rate"], x["mtp_speedup"],
    x["mtp_speedup_predicted"]) for x in r["runs"]) + " [%s]" % r.get("backend", "?"))
EOF
)
  else
    RESULT[bench-mtp]="FAILED: $(tail -2 "$LOGS/bench-default.err")"
    cat "$LOGS/bench-default.err"
  fi

  step "PyTorch / transformers peer"
  if with_deps timeout "$(cap 100)" python3 tests/gpu/hf_peer.py --model tests/fixtures/tiny-v3 --cli "$BUILD/engine/moescope-cli" \
       --speed > "$OUTDIR/hf-peer.log" 2>&1; then
    peer_ok=1
  else
    peer_ok=0
  fi
  tail -5 "$OUTDIR/hf-peer.log"
  RESULT[peer]=$(tail -1 "$OUTDIR/hf-peer.log" | python3 -c '
import json, sys
try:
    r = json.loads(sys.stdin.read())
except Exception:
    print("no report (see hf-peer.log)"); sys.exit()
s = "max|hf-ours| %.2g, max|hf-expected| %.2g, %s" % (r["hf_vs_ours_max_abs"], r["hf_vs_expected_max_abs"], "ok" if r["ok"] else "MISMATCH")
if "hf_decode_tokens_per_s" in r:
    s += "; HF V2-Lite-size prefill %.0f tok/s, decode %.1f tok/s" % (r["hf_prefill_tokens_per_s"], r["hf_decode_tokens_per_s"])
print(s)')
  [ $peer_ok = 1 ] || RESULT[peer]="${RESULT[peer]} (rc != 0)"
fi

# compute-sanitizer's memcheck over the check groups, one process each, for what time is left
# (it finds out-of-bounds and misaligned accesses that parity alone can miss; it slows kernels
# 10-100x, so the small kernel groups come first). Needs a runtime that supports it.
RESULT[memcheck]="not run"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ] && [ -x "$BUILD/tests/gpu/moescope-gpu-checks" ] && [ "${RESULT[build]}" != "FAILED" ] \
   && ! grep -q "^SKIP" "$OUTDIR/gpu-checks.log" 2>/dev/null; then
  step "compute-sanitizer memcheck"
  clean=0; dirty=""; skipped=0; tool_error=""
  for g in $(with_deps "$BUILD/tests/gpu/moescope-gpu-checks" --list); do
    left=$(( 560 - $(elapsed) ))
    if [ $left -lt 30 ]; then skipped=$((skipped + 1)); continue; fi
    with_deps timeout $(( left - 15 )) "$SANITIZER" --tool memcheck --error-exitcode 99 \
      "$BUILD/tests/gpu/moescope-gpu-checks" --group "$g" > "$LOGS/memcheck-$g.log" 2>&1
    rc=$?
    errors=$(grep -o "ERROR SUMMARY: [0-9]* error" "$LOGS/memcheck-$g.log" | grep -o "[0-9]*" | tail -1)
    if [ -z "$errors" ] && [ $clean = 0 ] && [ -z "$dirty" ]; then  # the tool itself cannot run here
      tool_error="compute-sanitizer did not run: $(tail -1 "$LOGS/memcheck-$g.log")"
      tail -5 "$LOGS/memcheck-$g.log"
      break
    fi
    if [ "$rc" = 0 ] && [ "${errors:-0}" = 0 ]; then
      clean=$((clean + 1))
    else
      dirty="$dirty $g(${errors:-rc $rc})"
      grep -m 12 -E "^========= (Invalid|Misaligned|Program hit|  +at |Address)" "$LOGS/memcheck-$g.log" \
        || tail -5 "$LOGS/memcheck-$g.log"
    fi
  done
  RESULT[memcheck]="$clean groups clean"
  [ -n "$dirty" ] && RESULT[memcheck]+="; errors in:$dirty"
  [ "$skipped" -gt 0 ] && RESULT[memcheck]+="; $skipped groups not reached (time)"
  [ -n "$tool_error" ] && RESULT[memcheck]="$tool_error"
  echo "${RESULT[memcheck]}"
fi

step "summary"
printf '%-14s %s\n' "build" "${RESULT[build]}" "gpu-checks" "${RESULT[checks]}" "gpu-bench" "${RESULT[bench]}" \
  "profile" "${RESULT[profile]}" "gpu-bench fp8" "${RESULT[bench-fp8]}" "default model" "${RESULT[bench-mtp]}" "hf peer" "${RESULT[peer]}" \
  "memcheck" "${RESULT[memcheck]}" \
  "total" "$(elapsed) s"
# Let tee write the whole log before the machine collects $OUT.
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
