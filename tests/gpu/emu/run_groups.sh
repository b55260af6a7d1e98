#!/usr/bin/env bash
# Runs check groups of moescope-gpu-emu-checks, each in its own process under a time limit,
# and prints one line per run with its time. A run fails on a "FAIL!  :" line, an
# "EMU ERROR" line, a non-zero exit (a crash or a deadlock included), a timeout, or no PASS
# line at all (a group that checked nothing). Exit status: the number of failed runs (capped).
# Usage: run_groups.sh BINARY GROUP[:ORDER[,ORDER...]]...
#   ORDER: forward (default), reverse or random (EMU_SEED, default 1); every run has EMU_ASYNC=1,
#   so that a host read before a stream synchronization sees stale data, as on a device.
# Environment: EMU_GROUP_TIMEOUT (seconds per run, default 300), EMU_LOG_DIR (keep the logs).
set -uo pipefail
bin=$1
shift
timeout_s=${EMU_GROUP_TIMEOUT:-300}
logs=${EMU_LOG_DIR:-$(mktemp -d)}
mkdir -p "$logs"
failed=0 runs=0 start=$(date +%s)
for spec in "$@"; do
  group=${spec%%:*}
  orders=forward
  [[ $spec == *:* ]] && orders=${spec#*:}
  for order in ${orders//,/ }; do
    log=$logs/$group.$order.log
    t0=${EPOCHREALTIME/./}
    EMU_ASYNC=1 EMU_ORDER=$order EMU_SEED=${EMU_SEED:-1} timeout -k 5 "$timeout_s" "$bin" --group "$group" >"$log" 2>&1
    rc=$?
    t1=${EPOCHREALTIME/./}
    ms=$(( (t1 - t0) / 1000 ))
    pass=$(grep -c '^PASS   :' "$log")
    fail=$(grep -c '^FAIL!  :' "$log")
    emu_errors=$(grep -c '^EMU ERROR' "$log")
    verdict=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then verdict="TIMEOUT after ${timeout_s} s"
    elif [[ $fail -gt 0 || $emu_errors -gt 0 ]]; then verdict=FAILED
    elif [[ $rc -ne 0 ]]; then verdict="FAILED (exit $rc)"
    elif [[ $pass -eq 0 ]]; then verdict="FAILED (no check ran)"
    fi
    printf '%-20s %-7s %4d.%d s  %3d passed %2d failed %2d emu errors  %s\n' \
      "$group" "$order" $((ms / 1000)) $((ms % 1000 / 100)) "$pass" "$fail" "$emu_errors" "$verdict"
    runs=$((runs + 1))
    if [[ $verdict != ok ]]; then
      failed=$((failed + 1))
      grep -E '^(FAIL!  :|EMU ERROR)' "$log" | head -20 | sed 's/^/    /'
      echo "    --- last lines of $log:"
      tail -n 15 "$log" | sed 's/^/    /'
    fi
  done
done
echo "$runs runs, $failed failed, $(( $(date +%s) - start )) s (logs: $logs)"
[[ -n ${EMU_LOG_DIR:-} ]] || rm -rf "$logs"
exit $(( failed > 100 ? 100 : failed ))
