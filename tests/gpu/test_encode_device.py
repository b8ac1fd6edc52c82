"""`w4a8-quantize --encode-device cuda`: the MXFP4 bytes of a GPU encode against the CPU's.

The encoder's only step that may round differently on another device is ``ceil(log2(amax/6))``
(libm vs CUDA ``log2f``). For BF16 and FP16 weights the block maximum takes one of finitely
many values, so every one of them is encoded on both devices and compared; FP32 weights are
compared on random data and the count of differing blocks is asserted to be zero too.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from w4a8_backend.formats import BLOCK_SIZE, quantize_mxfp4
from w4a8_backend.tools.quantize import quantize_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _every_finite_value(dtype: torch.dtype) -> torch.Tensor:
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_block_maximum_encodes_alike(dtype):
    """One block per finite value v: v at a random position, the rest random below |v|."""
    gen = torch.Generator().manual_seed(1)
    peaks = _every_finite_value(dtype)
    blocks = (torch.rand(peaks.numel(), BLOCK_SIZE, generator=gen) * 2 - 1) * peaks.float()[:, None]
    blocks = blocks.to(dtype)
    where = torch.randint(0, BLOCK_SIZE, (peaks.numel(),), generator=gen)
    blocks[torch.arange(peaks.numel()), where] = peaks
    weight = blocks.reshape(-1, 4 * BLOCK_SIZE)
    cpu_packed, cpu_scales = quantize_mxfp4(weight)
    gpu_packed, gpu_scales = quantize_mxfp4(weight.cuda())
    assert torch.equal(gpu_scales.cpu(), cpu_scales), int((gpu_scales.cpu() != cpu_scales).sum())
    assert torch.equal(gpu_packed.cpu(), cpu_packed), int((gpu_packed.cpu() != cpu_packed).sum())


def test_float32_weights_encode_alike():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(4096, 4096, generator=gen) * torch.logspace(-6, 2, 4096)[:, None]
    cpu_packed, cpu_scales = quantize_mxfp4(weight)
    gpu_packed, gpu_scales = quantize_mxfp4(weight.cuda())
    assert int((gpu_scales.cpu() != cpu_scales).sum()) == 0
    assert torch.equal(gpu_packed.cpu(), cpu_packed)


@pytest.mark.parametrize("activations", ["fp8", "int8"])
def test_gpu_encoded_checkpoint_is_byte_identical(tmp_path, activations):
    src = tiny_models.make_tiny_qwen3_moe(tmp_path / "moe")
    on_cpu, on_gpu = tmp_path / "cpu", tmp_path / "gpu"
    quantize_checkpoint(src, on_cpu, activations=activations, progress=False)
    quantize_checkpoint(src, on_gpu, activations=activations, encode_device="cuda",
                        progress=False)
    for cpu_shard in sorted(on_cpu.glob("*.safetensors")):
        assert (on_gpu / cpu_shard.name).read_bytes() == cpu_shard.read_bytes(), cpu_shard.name
    assert load_file(next(on_gpu.glob("*.safetensors")))  # readable
