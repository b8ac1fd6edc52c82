"""benchmarks/tools/profile_step.py's arithmetic: one decode step is the difference of two
profiled runs divided by the step count, and kernels are grouped by name."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tools" / "profile_step.py"


def _tool():
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if saved is not None:  # the tool sets it for its own process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    return module


def test_per_step_subtracts_the_short_run():
    tool = _tool()
    long = {"gemm": (66, 660.0), "prefill_only": (1, 50.0), "new": (32, 64.0)}
    short = {"gemm": (2, 20.0), "prefill_only": (1, 50.0)}
    per_step = tool._per_step(long, short, steps=32)
    assert per_step == {"gemm": (2.0, 20.0), "new": (1.0, 2.0)}  # prefill_only cancels out


def test_kernel_groups():
    tool = _tool()
    assert tool.group_of("void (anonymous namespace)::decode_gemm_kernel<false, 1>") == "w4a8 (ours)"
    assert tool.group_of("_moe_gemm") == "w4a8 (ours)"
    assert tool.group_of("kernel_unified_attention") == "attention"
    assert tool.group_of("nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT") == "gemm (cuBLAS/CUTLASS/Triton)"
    assert tool.group_of("fused_moe_kernel") == "gemm (cuBLAS/CUTLASS/Triton)"
    assert tool.group_of("void (anonymous namespace)::quant_act_kernel<false, bf16>") == "w4a8 (ours)"
    assert tool.group_of("_quant_act") == "w4a8 (ours)"
    # Inductor's fused norms carry neighbouring op names; they are not our kernels.
    fused = "triton_red_fused_fused_add_rms_norm_mxfp4_w4a8_linear_1"
    assert tool.group_of(fused) == "inductor-fused elementwise/norms"
    assert tool.group_of("void vllm::moe::topkGating<8, 128>") == "other"
