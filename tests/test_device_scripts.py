"""The device scripts (scripts/device/*.sh, tests/gpu/vllm_gpu_smoke.py), checked on the CPU
where that is possible: shell syntax and the smoke check's parsing and TP-agreement rule."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke():
    path = ROOT / "tests" / "gpu" / "vllm_gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("vllm_gpu_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    return smoke


@pytest.mark.parametrize("script", sorted((ROOT / "scripts" / "device").glob("*.sh")),
                         ids=lambda p: p.name)
def test_shell_syntax_and_usage(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "scripts/device/" in usage.stdout, usage


def test_smoke_kernel_names_survive_long_moe_log_lines():
    """vllm_gpu_smoke parses the dispatcher's log; a long MoE line must keep its kernel name."""
    smoke = _smoke()
    moe = ("(EngineCore pid=7) INFO w4a8_mxfp4: MoE W4A8_MXFP4_FP8 static_per_tensor experts=128 "
           "top_k=8 hidden=2048 intermediate=768 out=torch.bfloat16 activation=silu on "
           "cuda sm_90 (NVIDIA H200) uses kernel sm90_triton (passed over: sm100_flashinfer: "
           "needs sm_100)")
    dense = "INFO w4a8_mxfp4: linear FP8 4096x4096 on cuda sm_90 uses kernel sm90_triton"
    lines = smoke.kernel_log_lines("\n".join([moe, dense, "unrelated line"]))
    assert len(lines) == 2 and len(moe.split("w4a8_mxfp4: ", 1)[1]) > 160
    assert smoke._kinds(lines) == {"sm90_triton"}


def _run(tp, tokens, gaps):
    return {"tp": tp, "tokens": tokens, "reference_gaps": gaps}


def test_tp_agreement_rule():
    smoke = _smoke()
    agree, tie = smoke.tp_agreement_of, smoke.TIE_NATS
    one = _run(1, [[5, 6, 7], [1, 2]], [[0, 0, 0], [0, 0]])
    same = agree([one, _run(2, [[5, 6, 7], [1, 2]], [[0, 0, 0], [0, 0]])], 2)
    assert same == {"same_tokens": True, "steps_before_divergence": 5, "divergences": [],
                    "ok": True}
    # Parting at a step where both tokens are near-ties of the reference: accepted, reported.
    near = agree([_run(1, [[5, 6, 7], [1, 2]], [[0, tie / 2, 0], [0, 0]]),
                  _run(2, [[5, 9, 8], [1, 2]], [[0, tie / 3, 0.5], [0, 0]])], 2)
    assert near["ok"] and not near["same_tokens"] and near["steps_before_divergence"] == 3
    assert near["divergences"] == [{"tp": 2, "prompt": 0, "step": 1, "tokens": (6, 9),
                                    "reference_gaps": (tie / 2, tie / 3), "near_tie": True}]
    # Parting where one engine's token is clearly not the reference's choice: fails.
    far = agree([one, _run(2, [[5, 6, 7], [3, 2]], [[0, 0, 0], [2 * tie, 0]])], 2)
    assert not far["ok"] and far["divergences"][0]["prompt"] == 1
    # The runs' own tolerance (the bf16 floor) replaces TIE_NATS when it is larger.
    loose = [dict(r, tolerance_nats=4 * tie) for r in
             (one, _run(2, [[5, 6, 7], [3, 2]], [[0, 0, 0], [2 * tie, 0]]))]
    assert agree(loose, 2)["ok"]
    # A TP size whose engine did not run: fails.
    assert not agree([one], 2)["ok"]
    # Shorter output without a divergent token (an early end): fails.
    assert not agree([one, _run(2, [[5, 6], [1, 2]], [[0, 0], [0, 0]])], 2)["ok"]


def _scored(tp, positions):
    """A run's teacher-forced scores: per position (forced logprob, [(token, logprob), ...])."""
    return {"tp": tp, "scored": [[{"forced": f, "top": [list(t) for t in top]}
                                  for f, top in seq] for seq in positions]}


def test_teacher_forced_tp_rule():
    smoke = _smoke()
    agree, tie = smoke.forced_agreement_of, smoke.TIE_NATS
    one = _scored(1, [[(-1.0, [(5, -1.0), (6, -2.0)]), (-0.5, [(7, -0.5), (8, -3.0)])]])
    close = _scored(2, [[(-1.0 - tie / 2, [(5, -1.0 - tie / 2), (6, -2.0)]),
                         (-0.5, [(7, -0.5), (8, -3.0)])]])
    got = agree([one, close], 2)
    assert got["ok"] and got["positions"] == 2 and got["argmax_equal"] == 2
    assert got["max_abs_logprob_diff"] == round(tie / 2, 4) and got["argmax_differences"] == []
    # Argmax flipped where the first run had it within the tolerance: accepted, reported.
    tied = _scored(1, [[(-1.0, [(5, -1.0), (6, -1.0 - tie / 4)])]])
    flip = _scored(2, [[(-1.0 - tie / 8, [(6, -1.0 - tie / 16), (5, -1.0 - tie / 8)])]])
    got = agree([tied, flip], 2)
    assert got["ok"] and got["argmax_differences"][0]["near_tie"]
    assert got["argmax_differences"][0]["argmax"] == (5, 6)
    # ... or where the second run has the first's argmax that close (the first's list lacks
    # the second's argmax): accepted.
    other_side = _scored(2, [[(-1.0, [(9, -1.0 + tie / 4), (5, -1.0)])]])
    assert agree([tied, other_side], 2)["ok"]
    # Argmax flipped to a token ranked far lower on both sides, or unknown on both: fails.
    far = _scored(2, [[(-1.0, [(9, -0.5), (5, -1.0)])]])
    assert not agree([tied, far], 2)["ok"]
    unknown = _scored(2, [[(-1.0, [(9, -0.9), (8, -1.0)])]])
    assert agree([tied, unknown], 2)["argmax_differences"][0]["gaps"] == (None, None)
    assert not agree([tied, unknown], 2)["ok"]
    # Same argmax but the forced token's logprob moved by more than the tolerance: fails.
    moved = _scored(2, [[(-1.0 - 2 * tie, [(5, -1.0 - 2 * tie), (6, -2.0)]),
                         (-0.5, [(7, -0.5), (8, -3.0)])]])
    assert not agree([one, moved], 2)["ok"]
    # ... unless the runs' own tolerance (the bf16 floor) is larger.
    assert agree([dict(one, tolerance_nats=4 * tie), dict(moved, tolerance_nats=4 * tie)], 2)["ok"]
    # A missing run, or a run with fewer scored positions: fails.
    assert not agree([one], 2)["ok"]
    short = _scored(2, [[(-1.0, [(5, -1.0), (6, -2.0)])]])
    assert not agree([one, short], 2)["ok"]


def test_bf16_floor_of_a_tiny_model(tmp_path):
    """The smoke check's tolerance: an exact bf16 computation mostly picks the fp32 reference's
    top-1, and where it does not, the gap is measured (never negative)."""
    import tiny_models
    from reference_model import bf16_greedy_gaps
    from w4a8_backend.formats import ActivationDtype
    from w4a8_backend.tools.quantize import quantize_checkpoint

    ckpt = tmp_path / "fp8"
    quantize_checkpoint(tiny_models.make_tiny_llama(tmp_path / "llama"), ckpt,
                        activations="fp8", calibration="static", progress=False)
    ids = [[1, 40, 41, 42], [1, 50, 7], [1, 9, 9, 9, 9]]
    gaps = bf16_greedy_gaps(ckpt, ActivationDtype.FP8_E4M3, ids, steps=8)
    assert len(gaps) == 24 and min(gaps) >= 0
    assert sum(g == 0 for g in gaps) >= 18, gaps
    assert _smoke().bf16_floor(ckpt, "fp8", steps=4) >= 0
