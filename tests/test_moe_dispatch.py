"""MoE backend choice under faked capabilities: SM100 (FlashInfer, exact per-tensor FP8 mode)
only for static FP8 layers without expert parallelism; everything else falls through with a
reason, ending at the fallback on CPU."""

from __future__ import annotations

import pytest
import torch

from w4a8_backend.formats import ActivationDtype, ActivationScheme
from w4a8_backend.kernels import DeviceInfo
from w4a8_backend.kernels import sm100_flashinfer as sm100
from w4a8_backend.kernels.dispatch import FORCE_ENV, choose_moe_kernel, evaluate_backends
from w4a8_backend.kernels.dispatch import MOE_BACKENDS
from w4a8_backend.kernels.moe_base import MoEKernelConfig

STATIC = ActivationScheme.STATIC_PER_TENSOR
DYNAMIC = ActivationScheme.DYNAMIC_PER_TENSOR
B200 = DeviceInfo("cuda", 100, "NVIDIA B200 (faked)")


def _config(act=ActivationDtype.FP8_E4M3, scheme=STATIC, local=128, global_=128):
    return MoEKernelConfig(act, scheme, scheme, local, 2048, 768, 8, "silu", torch.bfloat16,
                           num_global_experts=global_)


@pytest.fixture(autouse=True)
def _cuda_torch(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setattr(sm100, "_torch_cuda_version", lambda: "12.9")


def _verdicts(config, device):
    return {name: reason for name, cls, reason in evaluate_backends(config, device, MOE_BACKENDS)}


def test_sm100_chosen_for_static_fp8():
    assert choose_moe_kernel(_config(), B200).name == "sm100_flashinfer"


@pytest.mark.parametrize("config,reason", [
    (_config(scheme=DYNAMIC), "no exact per-tensor dynamic FP8 mode"),
    (_config(act=ActivationDtype.INT8), "no MXFP4 x INT8 MoE"),
    (_config(local=64), "expert parallelism is not wired"),
])
def test_sm100_passed_over_with_reason(config, reason):
    assert reason in _verdicts(config, B200)["sm100_flashinfer"]


def test_cpu_takes_the_fallback_with_reasons():
    cpu = DeviceInfo("cpu", None, "cpu")
    verdicts = _verdicts(_config(), cpu)
    assert "needs a Blackwell GPU" in verdicts["sm100_flashinfer"]
    assert verdicts["sm90_triton"]  # a reason, whatever it is on this machine
    assert choose_moe_kernel(_config(), cpu).name == "fallback"


@pytest.mark.parametrize("tokens,top_k,experts,cuda,hidden,inter", [
    (1, 8, 128, True, 2048, 768),    # Qwen3-30B-A3B, one token
    (4, 8, 128, True, 2048, 768),    # 32 pairs over 128 experts
    (8, 8, 128, True, 2048, 768),    # 64 pairs: half the experts, measured faster than Triton
    (9, 8, 128, False, 2048, 768),   # more than MAX_TOKENS
    (1, 4, 32, True, 2880, 2880),    # gpt-oss-20b, one token
    (4, 4, 32, True, 2880, 2880),    # 16 pairs over 32 experts
    (6, 4, 32, False, 2880, 2880),   # 24 pairs: many share one, Triton was faster (FP8)
    (1, 2, 4, True, 2048, 768),      # one token: distinct experts, nothing read twice
    (2, 2, 4, False, 2048, 768),     # 4 pairs over 4 experts: above half of them
    (1, 17, 256, False, 2048, 768),  # more experts per token than GEMM2's table holds
    (0, 8, 128, False, 2048, 768),
    (1, 8, 128, False, 20480, 768),  # GEMM1 stages at most 16384 activations
    (1, 8, 128, True, 16384, 768),
    (1, 8, 128, True, 2048, 2048),   # GEMM2 stages top_k x 2048 = 16384 values
    (1, 8, 128, False, 2048, 2080),  # top_k x 2304 (whole 256-wide steps): too many
    (1, 2, 8, False, 4096, 14336),   # Mixtral-like: 2 x 14336 staged rows
])
def test_small_calls_take_the_cuda_moe_path(tokens, top_k, experts, cuda, hidden, inter):
    """Inside the sm90 MoE op: which calls the CUDA decode kernels take (the rest: Triton)."""
    from w4a8_backend.kernels import _sm90_moe_cuda as mc

    assert mc.usable(tokens, top_k, experts, hidden, inter) is cuda


def test_gemm2_staging_and_fused_intermediate_quantization_rules():
    """GEMM2 stages h, and quantizes a dynamic one itself, only up to GEMM2_STAGE_MAX values
    per CTA (Qwen3-30B-A3B's 8 x 768, not gpt-oss-20b's 4 x 2880), a dynamic one at one token
    only (above: the launch from GEMM1's amaxes, GEMM2 unstaged); a static one it stages above
    one token."""
    from w4a8_backend.kernels import _sm90_moe_cuda as mc

    assert mc.fuse_h_quantization(1, 8, 768) and not mc.fuse_h_quantization(1, 4, 2880)
    assert not mc.fuse_h_quantization(2, 8, 768)  # measured slower or equal above one token
    assert mc.stage_gemm2(1, 8, 768, static_h=False) and mc.stage_gemm2(2, 8, 768, True)
    assert not mc.stage_gemm2(1, 8, 768, static_h=True)
    assert not mc.stage_gemm2(2, 8, 768, static_h=False)
    assert not any(mc.stage_gemm2(t, 4, 2880, s) for t in (1, 4) for s in (True, False))


@pytest.mark.parametrize("tokens,top_k,inter,static_h,plan,steps", [
    (1, 8, 768, True, (False, False, 16, 2), 0),     # Qwen3-30B-A3B static, one token
    (1, 8, 768, False, (True, True, 16, 2), 24),     # dynamic: fused, 8 rows x 3 steps staged
    (2, 8, 768, True, (False, True, 12, 2), 24),     # static above one token: staged
    (2, 8, 768, False, (False, False, 12, 2), 0),    # dynamic above one token: the launch
    (1, 4, 2880, False, (False, False, 12, 2), 0),   # gpt-oss-20b: neither
])
@pytest.mark.parametrize("corrections", [False, True])
def test_gemm2_plan(tokens, top_k, inter, static_h, plan, steps, corrections, monkeypatch):
    """The plan moe_forward and the benchmark share: the rules above, and the occupancy query
    asked with the shared memory the staged rows (and out-of-range blocks) take."""
    from w4a8_backend.kernels import _sm90_moe_cuda as mc

    asked = []

    class Lib:
        def moe_blocks_per_sm(self, act_int8, gated, warps, stages, staged_steps, corr):
            asked.append((gated, staged_steps, corr))
            return {16: 1, 12: 2}.get(warps, 3)

    monkeypatch.setattr(mc, "_num_sms", lambda index: 132)
    hidden = 2048 if inter == 768 else 2880
    assert mc.gemm2_plan(Lib(), 0, tokens, top_k, hidden, inter, True, static_h,
                         corrections) == plan
    assert asked and all(a == (False, steps, corrections) for a in asked)


@pytest.mark.parametrize("hidden,tokens,per_sm,warps", [
    (2048, 1, {16: 1, 12: 2}, 16),   # Qwen3-30B-A3B, one token: 128 CTAs, one per SM
    (2880, 1, {16: 1, 12: 2}, 12),   # gpt-oss-20b: 180 CTAs fit in one wave only at 2 per SM
    (2048, 2, {16: 1, 12: 2}, 12),   # 256 CTAs
    (2048, 4, {16: 1, 12: 2}, 8),    # 512 CTAs: more than one wave either way
    (2880, 1, {16: 1, 12: 1}, 8),    # a GPU where 12 warps fit only once per SM
])
def test_gemm2_warps_fill_one_wave(hidden, tokens, per_sm, warps):
    """GEMM2 takes the most warps per CTA whose CTAs all fit on the SMs at once (132 SMs)."""
    from w4a8_backend.kernels import _sm90_moe_cuda as mc

    assert mc.gemm2_config(hidden, tokens, 132, per_sm.__getitem__) == (warps, 2)


def test_cuda_moe_limits_mirror_the_source():
    """usable()'s limits are the CUDA source's: GEMM2's table of the token's experts, the most
    activations a CTA stages in shared memory and the staged step (a drift would send calls
    the library refuses, or keep shapes it takes on Triton)."""
    import re
    from pathlib import Path

    from w4a8_backend.kernels import _sm90_moe_cuda as mc

    source = (Path(__file__).resolve().parents[1] / "csrc" / "w4a8_decode_gemm.cu").read_text()

    def constant(name):
        found = re.findall(rf"constexpr int {name} = (\d+);", source)
        assert len(found) == 1, f"{name}: expected one definition, found {found}"
        return int(found[0])

    assert mc.MAX_TOP_K == constant("kMoeMaxGroups")
    assert mc.MAX_STAGED == constant("kMoeMaxStagedK")
    assert mc.STEP_K == constant("kStepK")
