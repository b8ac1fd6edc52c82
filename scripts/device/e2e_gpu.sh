#!/usr/bin/env bash
# Issue 9's end-to-end benchmark of one model shape on one GPU, start to finish, one step at a time:
#   1. a random BF16 checkpoint (benchmarks/bench_e2e.py make-model, drawn on the GPU);
#   2. w4a8-quantize to W4A8 MXFP4 x FP8 and x INT8 (VARIANTS, default "fp8 int8"; fp8-vocab
#      and int8-vocab add --quantize-vocab lm_head embed_tokens), static scales, calibration and encoding on
#      the GPU (--calib-device cuda --encode-device cuda; a CPU encode of an 8B model on the
#      device's shared cores was what stalled the 2026-11-22 run);
#   3. bench_e2e.py sweep: BF16, FP8 and INT8 engines one after another, then the report
#      (markdown + JSON + PNG at OUT_STEM.*).
#
#   [VARIANTS="fp8 fp8-vocab"] scripts/device/e2e_gpu.sh SHAPE WORK OUT_STEM [make-model args,
#   e.g. --layers 16]
#
# Run from the repository root after the vLLM kit prefix (vllm_gpu.md). WORK needs
# about 3x the BF16 checkpoint's size. Every step prints its wall time.
set -euo pipefail
export TQDM_DISABLE=1
[ $# -ge 3 ] || { sed -n 2,16p "$0"; exit 2; }
shape=$1 work=$2 stem=$3
shift 3
mkdir -p "$work"
step() {
  local t0=$SECONDS
  echo "[e2e_gpu] $(date -u +%H:%M:%S) $*" >&2
  "$@"
  echo "[e2e_gpu] done in $((SECONDS - t0)) s" >&2
}
[ -f "$work/bf16/config.json" ] ||
  step python3 benchmarks/bench_e2e.py make-model --shape "$shape" --out "$work/bf16" --device cuda "$@"
runs=("bf16=$work/bf16")
for variant in ${VARIANTS:-fp8 int8}; do
  vocab=()
  [ "${variant%-vocab}" = "$variant" ] || vocab=(--quantize-vocab lm_head embed_tokens)
  [ -f "$work/w4a8-$variant/config.json" ] ||
    step python3 -m w4a8_backend.tools.quantize "$work/bf16" "$work/w4a8-$variant" \
      --activations "${variant%-vocab}" "${vocab[@]}" --calibration static --calib-max-length 64 \
      --calib-device cuda --encode-device cuda --no-progress
  runs+=("w4a8-$variant=$work/w4a8-$variant:w4a8_mxfp4")
done
du -sh "$work"/bf16 "$work"/w4a8-* >&2
step python3 benchmarks/bench_e2e.py sweep \
  --runs "${runs[@]}" \
  --work "$work/runs" --out-stem "$stem" --timeout 300 -- --batches 1 8 32 128 --decode-steps 64
