"""compat.py's view of vLLM, checked statically against a vLLM source tree: the installed one
here (CI), and an empty tree to prove the check can fail. The same script was run against the
unpacked vLLM 0.26.0 and 0.33.0 wheels (README)."""

import subprocess
import sys
from pathlib import Path

import vllm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_vllm_api.py"


def _run(tree):
    return subprocess.run([sys.executable, str(SCRIPT), str(tree)], capture_output=True,
                          text=True)


def test_installed_vllm_has_everything_compat_imports():
    result = _run(Path(vllm.__file__).parents[1])
    assert result.returncode == 0, result.stdout
    assert "needs found" in result.stdout


def test_check_reports_missing_names(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 1
    assert "vllm.model_executor.layers.fused_moe.RoutedExperts or " in result.stdout


def test_compile_cache_factor_changes_vllms_cache_key(monkeypatch):
    """The plugin's settings reach VllmConfig.compute_hash (the compile cache key): FP8 and INT8
    activations, or another W4A8_MXFP4_* / W4A8_SM90_* setting, give different keys; the same
    settings the same."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from w4a8_backend import QUANTIZATION_NAME
    from w4a8_backend.config.compat import add_compile_cache_factor
    from w4a8_backend.config.config import compile_cache_factors
    from w4a8_backend.formats import ActivationDtype

    def key(act, **env):
        for name in ("W4A8_MXFP4_KERNEL", "W4A8_MXFP4_DYNAMIC_SCHEME", "W4A8_SM90_DECODE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = VllmConfig()
        with set_current_vllm_config(config):
            assert add_compile_cache_factor(QUANTIZATION_NAME, compile_cache_factors(act))
        return config.compute_hash()

    fp8, int8 = key(ActivationDtype.FP8_E4M3), key(ActivationDtype.INT8)
    assert fp8 != int8
    assert key(ActivationDtype.FP8_E4M3) == fp8
    assert key(ActivationDtype.FP8_E4M3, W4A8_MXFP4_KERNEL="fallback") != fp8
    assert key(ActivationDtype.INT8, W4A8_MXFP4_DYNAMIC_SCHEME="per_token") != int8
    assert key(ActivationDtype.INT8, W4A8_SM90_DECODE="triton") != int8


def test_compile_cache_factor_without_a_current_config():
    from w4a8_backend.config.compat import add_compile_cache_factor

    assert add_compile_cache_factor("w4a8_mxfp4", {"x": 1}) is False
