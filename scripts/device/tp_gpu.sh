#!/usr/bin/env bash
# Issue 9's tensor-parallel checks on a 2-GPU machine (nvidia-h200-x2), from the repository root
# after the vLLM kit prefix (vllm_gpu.md) and the multicast variables of the device README.
#
#   scripts/device/tp_gpu.sh tiny OUT [--no-serve]
#       tests/gpu/vllm_gpu_smoke.py for the tiny Llama, the tiny Llama with MXFP4 lm_head and
#       embed_tokens (--quantize-vocab) and the tiny Qwen3-MoE at the same time (three
#       processes; each runs FP8 and INT8 activations at TP=1 and TP=2, greedy tokens against the
#       reference, TP=2 against TP=1 along the greedy sequences and teacher-forced on TP=1's),
#       then `vllm serve` + openai on the MoE (not with --no-serve).
#       Results: OUT/{llama,llama_vocab,qwen3_moe,serve}/vllm_gpu_smoke.json and .log.
#       Each process gets a third of the CPU threads (OMP_NUM_THREADS) for its CPU reference.
#   scripts/device/tp_gpu.sh 8b WORK OUT_STEM
#       the Llama-3-8B shape at TP=2: random BF16 checkpoint, W4A8 FP8 export (calibration and
#       encoding on GPU 0), then the BF16 and W4A8 engines at TP=2 (bench_e2e.py sweep).
set -uo pipefail
mode=${1:-}
case "$mode" in
tiny)
  out=$2
  mkdir -p "$out"
  pids=()
  for run in llama qwen3_moe llama_vocab; do
    extra=()
    [ "$run" = llama_vocab ] && extra=(--quantize-vocab lm_head embed_tokens)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 3 ))} \
      python3 tests/gpu/vllm_gpu_smoke.py "$out/$run" --archs "${run%_vocab}" --acts fp8 int8 \
      --tp 1 2 --no-serve "${extra[@]}" > "$out/$run.log" 2>&1 &
    pids+=($!)
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  # After the TP engines: vllm serve asks for 90% of the GPU memory, which they would not leave.
  if [ "${3:-}" != --no-serve ]; then
    python3 tests/gpu/vllm_gpu_smoke.py "$out/serve" --archs qwen3_moe --serve-only \
      > "$out/serve.log" 2>&1 || rc=1
  fi
  for f in "$out"/*.log; do echo "== $f"; grep -E '^\||^TP ' "$f"; done
  exit $rc
  ;;
8b)
  work=$2 stem=$3
  mkdir -p "$work"
  export TQDM_DISABLE=1
  set -e
  [ -f "$work/bf16/config.json" ] ||
    python3 benchmarks/bench_e2e.py make-model --shape llama3-8b --out "$work/bf16" --device cuda
  [ -f "$work/w4a8-fp8/config.json" ] ||
    python3 -m w4a8_backend.tools.quantize "$work/bf16" "$work/w4a8-fp8" --activations fp8 \
      --calibration static --calib-max-length 64 --calib-device cuda --encode-device cuda --no-progress
  python3 benchmarks/bench_e2e.py sweep \
    --runs "bf16-tp2=$work/bf16" "w4a8-fp8-tp2=$work/w4a8-fp8:w4a8_mxfp4" \
    --work "$work/runs" --out-stem "$stem" --timeout 300 -- --tp 2 --batches 1 32 --decode-steps 32
  ;;
*)
  sed -n 2,13p "$0"; exit 2 ;;
esac
