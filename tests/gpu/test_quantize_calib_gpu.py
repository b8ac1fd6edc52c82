"""`w4a8-quantize --calib-device cuda`: the same checkpoint as a CPU calibration, up to the
rounding of the calibration forward (GPU matmuls sum in another order)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from w4a8_backend.tools.quantize import quantize_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("activations", ["fp8", "int8"])
def test_cuda_calibration_matches_cpu(tmp_path, activations):
    src = tiny_models.make_tiny_llama(tmp_path / "llama")
    on_cpu, on_gpu = tmp_path / "cpu", tmp_path / "gpu"
    quantize_checkpoint(src, on_cpu, activations=activations, calibration="static",
                        kv_cache_fp8=True, progress=False)
    quantize_checkpoint(src, on_gpu, activations=activations, calibration="static",
                        kv_cache_fp8=True, calib_device="cuda", progress=False)
    a, b = _tensors(on_cpu), _tensors(on_gpu)
    assert a.keys() == b.keys()
    scale_names = [n for n in a if n.endswith(("input_scale", "k_scale", "v_scale"))]
    assert scale_names
    for name in a:
        if name in scale_names:
            torch.testing.assert_close(b[name], a[name], rtol=2e-2, atol=0, msg=name)
        else:  # weights are encoded on the CPU in both runs: identical bytes
            assert torch.equal(a[name], b[name]), name
    assert json.loads((on_cpu / "config.json").read_text()) == json.loads(
        (on_gpu / "config.json").read_text())
