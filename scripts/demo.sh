#!/usr/bin/env bash
# The main job on a CPU machine: set up, build a tiny Llama, quantize it to W4A8 MXFP4 (FP8
# activations, static calibration) with w4a8-quantize, serve it with
# `vllm serve ... --quantization w4a8_mxfp4`, and query it with the openai client.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DEMO=${W4A8_DEMO_DIR:-.scratch/demo}
PORT=${W4A8_DEMO_PORT:-8000}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
mkdir -p "$DEMO"
[ -f "$DEMO/tiny-llama/config.json" ] || .venv/bin/python scripts/make_tiny_model.py "$DEMO/tiny-llama"
rm -rf "$DEMO/tiny-llama-w4a8"
.venv/bin/w4a8-quantize "$DEMO/tiny-llama" "$DEMO/tiny-llama-w4a8" --activations fp8 --calibration static
.venv/bin/vllm serve "$DEMO/tiny-llama-w4a8" --quantization w4a8_mxfp4 --host 127.0.0.1 --port "$PORT" \
  --max-model-len 512 > "$DEMO/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
echo "[demo] vllm serve started (pid $server, log $DEMO/serve.log); waiting for it to become healthy"
.venv/bin/python scripts/demo_client.py --base-url "http://127.0.0.1:$PORT/v1" --wait 600 \
  || { tail -40 "$DEMO/serve.log"; exit 1; }
grep -m1 "uses kernel" "$DEMO/serve.log" || true
