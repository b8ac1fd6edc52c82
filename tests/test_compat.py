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
