#!/usr/bin/env bash
# The kernels' GPU checks in one device call each, from the repository root on the lent GPU
# machine (after `source scripts/gpu_kit_env.sh` for the bench mode's vLLM baseline):
#
#   scripts/device/kernel_check.sh tests OUT [GROUPS]
#       builds the CUDA decode library once, then runs every test under tests/gpu marked `gpu`
#       (the CPU-only ones there run in CI, with test dependencies the device lacks) except the
#       vLLM smoke runs, split round-robin by test id into GROUPS parallel pytest processes
#       (default 6; one GPU, so they share it), one log each; a summary line per group, and
#       exit 1 if any test failed or none passed.
#   scripts/device/kernel_check.sh bench OUT
#       bench_linear.py (all shapes, Humming if importable) and bench_moe.py at 1-64 tokens, with
#       their reports under OUT.
#
# Either way OUT ends up as one OUT.tgz as well (the device tool returns a limited number of
# files). Wall time on an H100: tests 4 min (measured 2026-11-23, 358 tests in 6 groups,
# library build included), bench ~7 min (each under the 10-minute limit of one call). The bench mode takes Humming from PYTHONPATH when it is there (carry
# its wheel and install it with `pip install --no-deps --target`, see the device README).
set -uo pipefail
mode=${1:-}
out=${2:-}
if [ -z "$mode" ] || [ -z "$out" ]; then
  awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"
  exit 2
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
rc=0
case "$mode" in
tests)
  groups=${3:-6}
  python3 -c "import torch; from w4a8_backend.kernels import _cuda_ext; \
major, minor = torch.cuda.get_device_capability(); _cuda_ext.load(10 * major + minor)" \
    > "$out/build.log" 2>&1 || echo "[kernel_check] CUDA library not built (see build.log)"
  python3 -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/gpu \
    --ignore=tests/gpu/vllm_gpu_smoke.py 2> "$out/collect.err" | grep '::' > "$out/test_ids.txt"
  total=$(wc -l < "$out/test_ids.txt")
  echo "[kernel_check] $total tests in $groups groups"
  [ "$total" -gt 0 ] || { echo "[kernel_check] no tests collected"; rc=1; }
  pids=()
  for g in $(seq 0 $((groups - 1))); do
    awk -v g="$g" -v n="$groups" '(NR - 1) % n == g' "$out/test_ids.txt" > "$out/ids_$g.txt"
    [ -s "$out/ids_$g.txt" ] || continue
    xargs -a "$out/ids_$g.txt" -d '\n' python3 -m pytest -q -p no:cacheprovider -rfE \
      > "$out/pytest_$g.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for log in "$out"/pytest_*.log; do echo "$(basename "$log"): $(tail -n 1 "$log")"; done
  # all skipped (no GPU, or the CUDA library missing) must not pass for a check
  grep -q ' passed' "$out"/pytest_*.log || { echo "[kernel_check] no test passed"; rc=1; }
  grep -h '^FAILED\|^ERROR' "$out"/pytest_*.log | head -40
  ;;
bench)
  python3 benchmarks/bench_linear.py --out "$out" --log "$out/bench_linear.log" > /dev/null \
    2> "$out/bench_linear.err" || rc=1
  python3 benchmarks/bench_moe.py --tokens 1,4,16,64 --out "$out" --log "$out/bench_moe.log" \
    > /dev/null 2> "$out/bench_moe.err" || rc=1
  tail -n 3 "$out"/*.err
  ;;
*)
  awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"
  exit 2
  ;;
esac
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"
echo "[kernel_check] $mode: exit $rc; results in $out.tgz"
exit $rc
