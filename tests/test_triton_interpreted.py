"""The SM90 backend's Triton kernels on the CPU, through Triton's interpreter
(``TRITON_INTERPRET=1``, each case in a subprocess: the mode is read when the kernels are
defined), against the exact references:

- the dense W4A8 GEMM on every path (fused, fused with split-K, materialized per-tile, INT8
  materialized with one reference per row; FP8 and INT8 per row also through the sm_90
  prefill GEMM with TMA descriptors) plus the correction kernel with planted
  out-of-range blocks, FP8 and INT8, using the float16-arithmetic decode (``DECODE_LUT =
  False``: the default ``prmt`` decode is inline PTX, which the interpreter cannot run);
- the MoE path's routing table, GEMMs and top-k sum with float16 expert weights (the
  benchmark's BF16 baseline mode of ``moe_forward``, which always takes the routing table) and
  top-k ids where a token names one expert several times; and the whole INT8 MoE layer with
  planted out-of-range blocks (``libdevice.rint``, which the interpreter lacks, replaced by the
  exact add-and-subtract of 1.5 * 2**23 in the subprocess).

Needs ``triton``, not a GPU: importable here, or in ``W4A8_TRITON_INTERPRETER_PATH`` (where
``scripts/setup.sh`` puts it on CPU machines, outside the venv's import path, because vLLM's
CPU build must not see it). On a GPU the same kernels also run in tests/gpu/ (with the PTX
decode).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TRITON_PATH_ENV = "W4A8_TRITON_INTERPRETER_PATH"


def _triton_dir() -> str | None:
    """"" when triton is importable here, else the directory that holds it, else None."""
    if importlib.util.find_spec("triton") is not None:
        return ""
    d = os.environ.get(TRITON_PATH_ENV)
    return d if d and (Path(d) / "triton" / "__init__.py").is_file() else None


pytestmark = pytest.mark.skipif(
    _triton_dir() is None,
    reason=f"triton is neither importable nor in ${TRITON_PATH_ENV} (scripts/setup.sh installs it)")

MOE_SCRIPT = textwrap.dedent("""
    import torch
    from w4a8_backend.kernels import _sm90_moe_triton as mk

    torch.manual_seed(0)
    mk.POISON_OUTPUTS = True
    e, h, i, k, ip, hp = 4, 64, 32, 3, 128, 128
    g = torch.zeros(e, 2, ip, h)
    g[:, :, :i] = torch.randn(e, 2, i, h) * 0.1
    d = torch.zeros(e, hp, i)
    d[:, :h] = torch.randn(e, h, i) * 0.1
    w13, w2 = g.reshape(-1, h).half(), d.reshape(-1, i).half()
    for t in (1, 5, 40):
        x = torch.randn(t, h).half()
        ids = torch.randint(0, e, (t, k), dtype=torch.int64)
        ids[0] = ids[0, 0]  # more pairs on one expert than there are tokens
        tw = torch.softmax(torch.rand(t, k), -1)
        y = mk.moe_forward(x, tw, ids, None, (w13,), (w2,), None, None, e, h, i, ip, hp, False,
                           0, 0, torch.float32, False, bf16_weights=True)
        ref = torch.zeros(t, h, dtype=torch.float64)
        for tt in range(t):
            for kk in range(k):
                ex = int(ids[tt, kk])
                gu = x[tt].double() @ w13.double().view(e, 2 * ip, h)[ex].t()
                hh = (torch.nn.functional.silu(gu[:ip]) * gu[ip:])[:i].half().double()
                ref[tt] += float(tw[tt, kk]) * (hh @ w2.double().view(e, hp, i)[ex].t())[:h]
        assert torch.isfinite(y).all(), f"T={t}: unwritten outputs"
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-4, f"T={t}: rel err {err:.2e}"
    print("ok")
""")


DENSE_SCRIPT = textwrap.dedent("""
    import torch
    import triton
    import triton.language as tl  # noqa: F401  (the interpreter wants it visible in jit functions)
    from triton.language.extra import libdevice


    @triton.jit
    def _rint(x):  # libdevice.rint has no interpreter version: round half to even for |x| < 2**22
        return (x + 12582912.0) - 12582912.0


    libdevice.rint = _rint
    from w4a8_backend.formats import (ActivationDtype, ActivationScheme, quantize_activation,
                                      quantize_mxfp4, reference_linear)
    from w4a8_backend.kernels import triton_w4a8 as tk
    from w4a8_backend.kernels._sm90_repack import decode_lut, int8_prefill_rows, repack_mxfp4

    torch.manual_seed(0)
    tk.DECODE_LUT = False
    tk.POISON_OUTPUTS = True
    n, k, m = 256, 512, 40
    blk = torch.exp2(torch.randn(n, k // 32) * 1.2)
    w = torch.randn(n, k) * 0.02 * blk.repeat_interleave(32, 1)
    packed, scale = quantize_mxfp4(w)
    scale[::17, 3] = (scale[::17, 3].int() + 20).clamp(max=254).to(torch.uint8)  # FP8 too
    x = torch.randn(m, k).half()
    for act in (ActivationDtype.INT8, ActivationDtype.FP8_E4M3):
        i8 = act == ActivationDtype.INT8
        rp = repack_mxfp4(packed, scale, i8)
        q, xs = quantize_activation(x, act, ActivationScheme.DYNAMIC_PER_TOKEN)
        xs = xs.reshape(-1).contiguous()
        ref = reference_linear(x, packed, scale, act, ActivationScheme.DYNAMIC_PER_TOKEN)
        counters = torch.zeros(64, dtype=torch.int32)
        paths = [("fused", (64, 64, 256, 1, 4, 2), None, None),
                 ("fused split-K", (64, 64, 256, 2, 4, 2), None, None),
                 ("dense", None, tk.materialize(rp.packed, rp.codes, rp.row_scale, i8), None)]
        if i8:
            pf = int8_prefill_rows(packed, scale, rp)
            assert pf.num_out_of_range > rp.num_out_of_range > 0
            paths.append(("dense, one reference per row", None,
                          tk.materialize(rp.packed, rp.codes, rp.row_scale, True, pf.row_scale),
                          pf))
        # FP8 and INT8 per row also through the sm_90 prefill GEMM (TMA descriptors, persistent)
        paths += [(name + ", TMA", "tma", dense, pf) for name, _, dense, pf in paths[2:]
                  if pf is not None or not i8]
        for name, cfg, dense, pf in paths:
            tma = cfg == "tma"
            if tma:
                cfg = None
            cfg = cfg or tk.pick_config(m, rp.packed.shape[0], k, i8, 132, True, pf is not None)
            y = tk.w4a8_gemm(q, xs, rp.packed, rp.codes, rp.row_scale, counters,
                             decode_lut(i8), n, i8, True, None, torch.float32, config=cfg,
                             dense=dense, prefill_row_scale=None if pf is None else pf.row_scale,
                             tma=tma)
            table = rp if pf is None else pf
            # worst relative error of one output feature (the planted blocks dominate theirs)
            per_n = lambda y: ((y - ref).norm(dim=0) / ref.norm(dim=0)).max().item()  # noqa
            missing = per_n(y)
            tk.correction(y, q, xs, True, table.corr_rows, table.corr_ptr, table.corr_blocks,
                          table.corr_values)
            err = per_n(y)
            assert err < 1e-5 < missing, (act.name, name, err, missing)
    # INT8 split path: int8 activations as two exact E4M3 planes on the FP8 repacking of the
    # same weight (its planted blocks outside the row windows added back by the correction)
    q, xs = quantize_activation(x, ActivationDtype.INT8, ActivationScheme.DYNAMIC_PER_TOKEN)
    xs = xs.reshape(-1).contiguous()
    ref = reference_linear(x, packed, scale, ActivationDtype.INT8,
                           ActivationScheme.DYNAMIC_PER_TOKEN)
    planes = tk.split_int8(q)
    assert torch.equal(planes.float().sum(0), q.float())
    for scheme in ActivationScheme:  # the quantization kernel writes the same planes
        s_in = (x.float().abs().amax() / 100.0).reshape(1)
        q_s, xs_s = quantize_activation(x, ActivationDtype.INT8, scheme,
                                        s_in if scheme == ActivationScheme.STATIC_PER_TENSOR
                                        else None)
        got, xs_got = tk.quantize_activation_gpu(x, True, int(scheme), s_in if scheme ==
                                                 ActivationScheme.STATIC_PER_TENSOR else None,
                                                 split=True)
        assert torch.equal(got.view(torch.uint8), tk.split_int8(q_s).view(torch.uint8)), scheme
    rp = repack_mxfp4(packed, scale, False)
    assert rp.num_out_of_range > 0
    for cfg in ((64, 64, 256, 1, 4, 2), (64, 64, 256, 2, 4, 2), None):
        y = tk.w4a8_gemm(planes, xs, rp.packed, rp.codes, rp.row_scale,
                         torch.zeros(64, dtype=torch.int32), decode_lut(False), n, False, True,
                         None, torch.float32, config=cfg, x_split=True)
        missing = ((y - ref).norm(dim=0) / ref.norm(dim=0)).max().item()
        tk.correction(y, planes, xs, True, rp.corr_rows, rp.corr_ptr, rp.corr_blocks,
                      rp.corr_values)
        err = ((y - ref).norm(dim=0) / ref.norm(dim=0)).max().item()
        assert err < 1e-5 < missing, ("int8 split", cfg, err, missing)
    # the prefill path's quantization and materialization in one launch write the same bytes as
    # the two launches (several programs per row: a smaller chunk)
    tk.QUANT_CHUNK = 128
    for act in (ActivationDtype.INT8, ActivationDtype.FP8_E4M3):
        i8 = act == ActivationDtype.INT8
        rp = repack_mxfp4(packed, scale, i8)
        refs = (None, int8_prefill_rows(packed, scale, rp).row_scale) if i8 else (None,)
        for prs in refs:
            for scheme in ActivationScheme:
                s_in = ((x.float().abs().amax() / 100.0).reshape(1)
                        if scheme == ActivationScheme.STATIC_PER_TENSOR else None)
                q0, xs0 = tk.quantize_activation_gpu(x, i8, int(scheme), s_in)
                d0 = tk.materialize(rp.packed, rp.codes, rp.row_scale, i8, prs)
                q1, xs1, d1 = tk.prepare_prefill(x, i8, int(scheme), s_in, rp.packed, rp.codes,
                                                 rp.row_scale, prs)
                what = (act.name, scheme.name, prs is not None)
                assert torch.equal(q1.view(torch.uint8), q0.view(torch.uint8)), what
                assert torch.equal(xs1, xs0), what
                assert torch.equal(d1.view(torch.uint8), d0.view(torch.uint8)), what
                if i8:  # (the interpreter's float8 rounding is not the GPU's: INT8 only)
                    q_ref, _ = quantize_activation(x, act, scheme, s_in)
                    assert torch.equal(q1, q_ref), what
    print("ok")
""")


# INT8 only: the interpreter's float32 -> float8e4nv conversion does not round like the GPU's
# (31.6 becomes 16.0), so the FP8 activation quantization inside the MoE path cannot run here.
MOE_QUANTIZED_SCRIPT = """import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter wants it visible in jit functions)
from triton.language.extra import libdevice


@triton.jit
def _rint(x):  # libdevice.rint has no interpreter version: round half to even for |x| < 2**22
    return (x + 12582912.0) - 12582912.0


libdevice.rint = _rint
from w4a8_backend.formats import (ActivationDtype, ActivationScheme, dequantize_mxfp4,
                                  quantize_activation, quantize_mxfp4)
from w4a8_backend.kernels import _sm90_moe_triton as mk
from w4a8_backend.kernels import triton_w4a8 as tk
from w4a8_backend.kernels._sm90_repack import repack_mxfp4, row_offsets
from w4a8_backend.kernels.sm90_triton_moe import stack_expert_rows

torch.manual_seed(1)
tk.DECODE_LUT = False
mk.POISON_OUTPUTS = True
e, h, i, k, ip, hp = 4, 256, 160, 3, 256, 256


def mx(w, planted):
    n, kk = w.shape[-2], w.shape[-1]
    spread = 0.6 if planted else 0.0  # without: every block within the exact INT8 windows
    blk = torch.exp2(torch.randn(*w.shape[:-1], kk // 32) * spread).repeat_interleave(32, -1)
    p, s = quantize_mxfp4((w * blk).reshape(-1, kk))
    if planted:
        s[::13, 2] = (s[::13, 2].int() + 20).clamp(max=254).to(torch.uint8)  # out of range
    return p.view(*w.shape[:-1], kk // 2), s.view(*w.shape[:-1], kk // 32)


silu = torch.nn.functional.silu
act, i8 = ActivationDtype.INT8, True
# planted out-of-range blocks: added back in both GEMMs' epilogues; a per-tensor intermediate
# takes the routing table, small per-token calls find their pairs inside the GEMMs (inline)
for planted in (True, False):
    p13, s13 = mx(torch.randn(e, 2 * i, h) * 0.05, planted)
    p2, s2 = mx(torch.randn(e, h, i) * 0.05, planted)
    w13 = dequantize_mxfp4(p13.reshape(-1, h // 2), s13.reshape(-1, h // 32)).view(e, 2 * i, h)
    w2 = dequantize_mxfp4(p2.reshape(-1, i // 2), s2.reshape(-1, i // 32)).view(e, h, i)
    rp13 = repack_mxfp4(*stack_expert_rows(p13.view(e, 2, i, h // 2), s13.view(e, 2, i, h // 32),
                                           ip), i8)
    rp2 = repack_mxfp4(*stack_expert_rows(p2.view(e, 1, h, i // 2), s2.view(e, 1, h, i // 32),
                                          hp), i8)
    assert bool(rp13.num_out_of_range and rp2.num_out_of_range) == planted
    ws = [tuple(getattr(rp, f) for f in ("packed", "codes", "row_scale", "corr_rows", "corr_ptr",
                                         "corr_blocks", "corr_values"))
          + (row_offsets(rp.corr_rows, rp.corr_ptr, rp.packed.shape[0]),) for rp in (rp13, rp2)]
    schemes = (ActivationScheme.DYNAMIC_PER_TENSOR, ActivationScheme.DYNAMIC_PER_TOKEN)
    for sch in schemes if planted else schemes[1:]:
        for t in (1, 5, 40):
            x = torch.randn(t, h).half()
            ids = torch.randint(0, e, (t, k), dtype=torch.int64)
            ids[0] = ids[0, 0]  # one token names an expert k times
            tw = torch.softmax(torch.rand(t, k), -1)
            y = mk.moe_forward(x, tw, ids, None, *ws, None, None, e, h, i, ip, hp, i8, int(sch),
                               int(sch), torch.float32, False)
            q1, sc1 = quantize_activation(x, act, sch)
            xq = q1.float() * sc1
            flat, tok = ids.reshape(-1), torch.arange(t).repeat_interleave(k)
            gu = torch.stack([xq[tok[j]] @ w13[flat[j]].t() for j in range(t * k)])
            hh = silu(gu[:, :i]) * gu[:, i:]
            q2, sc2 = quantize_activation(hh, act, sch)
            hq = q2.float() * sc2
            ref = torch.zeros(t, h)
            for j in range(t * k):
                ref[tok[j]] += tw.reshape(-1)[j] * (hq[j] @ w2[flat[j]].t())
            assert torch.isfinite(y).all(), (act.name, sch.name, t, "unwritten outputs")
            err = ((y - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (act.name, sch.name, t, err)
    # the INT8 split path (docs/int8_kernel.md): the same int8 activations as two exact E4M3
    # planes on the FP8 repacking of the same experts, carried after the INT8 stacks (static,
    # dynamic per tensor and per token); a wrong FP8 row scale must show
    wss = []
    for w, (pk, sc) in zip(ws, (stack_expert_rows(p13.view(e, 2, i, h // 2),
                                                  s13.view(e, 2, i, h // 32), ip),
                                stack_expert_rows(p2.view(e, 1, h, i // 2),
                                                  s2.view(e, 1, h, i // 32), hp))):
        fp = repack_mxfp4(pk, sc, False)
        wss.append(w + (fp.codes, fp.row_scale,
                        row_offsets(fp.corr_rows, fp.corr_ptr, fp.packed.shape[0]),
                        fp.corr_blocks, fp.corr_values))
    for sch in ActivationScheme:
        for t in (1, 5, 40):
            x = torch.randn(t, h).half()
            ids = torch.randint(0, e, (t, k), dtype=torch.int64)
            tw = torch.softmax(torch.rand(t, k), -1)
            static = sch == ActivationScheme.STATIC_PER_TENSOR
            flat, tok = ids.reshape(-1), torch.arange(t).repeat_interleave(k)
            s_x = (x.float().abs().amax() / 100.0).reshape(1) if static else None
            q1, sc1 = quantize_activation(x, act, sch, s_x)
            xq = q1.float() * sc1
            gu = torch.stack([xq[tok[j]] @ w13[flat[j]].t() for j in range(t * k)])
            hh = silu(gu[:, :i]) * gu[:, i:]
            s_h = (hh.abs().amax() / 100.0).reshape(1) if static else None
            q2, sc2 = quantize_activation(hh, act, sch, s_h)
            hq = q2.float() * sc2
            ref = torch.zeros(t, h)
            for j in range(t * k):
                ref[tok[j]] += tw.reshape(-1)[j] * (hq[j] @ w2[flat[j]].t())
            y = mk.moe_forward(x, tw, ids, None, *wss, s_x, s_h, e, h, i, ip, hp, True, int(sch),
                               int(sch), torch.float32, False)
            assert torch.isfinite(y).all(), ("split", sch.name, t, "unwritten outputs")
            err = ((y - ref).norm() / ref.norm()).item()
            assert err < 1e-2, ("split", sch.name, t, err)
            if t == 5 and not planted:  # (planted blocks would dominate the error)
                bad = wss[1][:9] + (wss[1][9] * 2.0,) + wss[1][10:]
                y = mk.moe_forward(x, tw, ids, None, wss[0], bad, s_x, s_h, e, h, i, ip, hp,
                                   True, int(sch), int(sch), torch.float32, False)
                assert ((y - ref).norm() / ref.norm()).item() > 0.1, "split tensors unused"
    # a NaN in one token's input (per-token x scale: it stays in that token's pairs) makes the
    # intermediate's per-tensor amax NaN, so the reference's whole output is NaN
    for t in (5, 40):
        x = torch.randn(t, h).half()
        x[1, 7] = float("nan")
        ids = torch.randint(0, e, (t, k), dtype=torch.int64)
        tw = torch.softmax(torch.rand(t, k), -1)
        y = mk.moe_forward(x, tw, ids, None, *ws, None, None, e, h, i, ip, hp, i8,
                           int(ActivationScheme.DYNAMIC_PER_TOKEN),
                           int(ActivationScheme.DYNAMIC_PER_TENSOR), torch.float32, False)
        assert torch.isnan(y).all(), ("NaN intermediate amax", planted, t, y.isnan().sum())
print("ok")
"""


def _run_interpreted(script: str) -> None:
    path = os.pathsep.join(p for p in (str(REPO), _triton_dir(), os.environ.get("PYTHONPATH"))
                           if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_dense_gemm_every_path_with_corrections():
    _run_interpreted(DENSE_SCRIPT)


PDL_RULE_SCRIPT = """
import torch
from w4a8_backend.kernels import triton_w4a8 as tk

# under the interpreter (and on the CPU) nothing is launched with PDL
assert not tk.pdl_enabled(torch.device("cpu"))
assert not tk.gemm_launch_pdl(torch.device("cpu"), False, 128, 128, False)
assert not tk.correction_pdl(torch.device("cpu"), 16)
# where PDL is available: FP8 tiles of >= PDL_MIN_BN x PDL_MIN_BM on the packed weight only
tk.pdl_enabled = lambda device: True
dev = torch.device("cuda")
assert tk.gemm_launch_pdl(dev, False, 128, 64, False)
assert tk.gemm_launch_pdl(dev, False, 128, 128, False)
assert not tk.gemm_launch_pdl(dev, False, 128, 32, False)  # measured 25.9 -> 34.6 us with PDL
assert not tk.gemm_launch_pdl(dev, False, 64, 16, False)
assert not tk.gemm_launch_pdl(dev, False, 64, 64, False)  # measured 31.9 -> 39.5 us with PDL
assert not tk.gemm_launch_pdl(dev, True, 128, 128, False)  # INT8
assert not tk.gemm_launch_pdl(dev, False, 128, 128, True)  # materialized (prefill) weight
# the correction after the fused GEMM: after tiles of <= 64 tokens (INT8 A/B on an H100:
# 0.94-1.03x at 17-64 tokens, 1.00-1.06x at 128-256)
assert tk.correction_pdl(dev, 16) and tk.correction_pdl(dev, 64)
assert not tk.correction_pdl(dev, 128)
tk.CORRECTION_PDL = False
assert not tk.correction_pdl(dev, 16)
print("ok")
"""


def test_gemm_pdl_rule():
    """Which fused-GEMM and correction launches take programmatic dependent launch (measured
    on an H100: docs/kernels.md); under the interpreter none."""
    _run_interpreted(PDL_RULE_SCRIPT)


TILE_RULES_SCRIPT = """
from w4a8_backend.kernels import triton_w4a8 as tk

SMS = 132  # an H100
# K < MID_LONG_K above 32 tokens: (M, N, K, act_int8) -> (BN, BM, split), the fastest or within
# noise of it in mid_m_shapes_h100_20261125_0617.jsonl and mid_m_rule_h100_20261125_*.jsonl
CASES = [
    (64, 4096, 4096, False, (64, 64, 2)),      # 128-row tiles would need split 4
    (64, 6144, 4096, False, (128, 64, 2)),
    (64, 28672, 4096, False, (128, 64, 1)),    # 224 tiles fill the GPU: no split-K
    (128, 6144, 4096, False, (128, 64, 1)),    # the previous rule: (128, 128) split 4, 2 waves
    (128, 4096, 4096, False, (128, 64, 2)),
    (128, 28672, 4096, False, (128, 128, 1)),
    (256, 6144, 4096, False, (128, 128, 1)),
    (256, 4096, 4096, False, (128, 64, 1)),
    (64, 4096, 4096, True, (64, 64, 2)),
    (64, 6144, 4096, True, (64, 64, 1)),
    (128, 6144, 4096, True, (128, 128, 2)),
    (256, 28672, 4096, True, (128, 128, 1)),
]
for m, n, k, i8, expected in CASES:
    bn, bm, bk, split, warps, stages = tk.pick_config(m, n, k, i8, SMS)
    assert (bn, bm, split) == expected, (m, n, k, i8, (bn, bm, split))
for m in range(33, 384, 7):
    for n in (4096, 6144, 28672):
        for i8 in (False, True):
            bn, bm, bk, split, warps, stages = tk.pick_config(m, n, 4096, i8, SMS)
            ctas = (n // bn) * -(-m // bm) * split
            assert ctas <= SMS or split == 1, (m, n, i8, ctas)  # one wave
            assert split == 1 or ctas * 2 > SMS, (m, n, i8, ctas)  # split-K only to fill it
# long K keeps the decode tiles' rule (8192^2 M = 64: (128, 64) split 2; 4096 x 14336: split 4)
assert tk.pick_config(64, 8192, 8192, False, SMS)[:4] == (128, 64, 256, 2)
assert tk.pick_config(128, 4096, 14336, False, SMS)[:4] == (128, 128, 256, 4)
# the prefill GEMM: the narrow tile where the wide one leaves the grid half empty
for m, n, bn in ((512, 4096, 128), (512, 6144, 256), (512, 8192, 256), (512, 28672, 256),
                 (4096, 8192, 256), (384, 4096, 128)):
    assert tk.prefill_config(m, n, False, SMS)[1] == bn, (m, n)
    assert tk.prefill_config(m, n, True, SMS) == tk.PREFILL_CONFIG  # INT8 per row: not measured
# the INT8 split path (int8_fp8_split_h100_20261125_1043.jsonl): FP8's tiles up to 64 tokens,
# one wave for 8-warp tiles (6144 x 4096 M = 17: split 4 was 1.02x INT8's time, split 2 0.86x)
assert tk.split_config(17, 6144, 4096, SMS)[:4] == (128, 32, 256, 2)
assert tk.split_config(17, 8192, 8192, SMS) == tk.pick_config(17, 8192, 8192, False, SMS)
assert tk.split_config(128, 4096, 4096, SMS)[:2] == (128, 64)
for m, n, k in ((128, 8192, 8192), (128, 28672, 4096), (256, 6144, 4096)):
    assert tk.split_config(m, n, k, SMS) is None, (m, n, k)  # 128-token tiles: INT8
for m in range(17, 384, 5):
    for n, k in ((4096, 4096), (6144, 4096), (28672, 4096), (8192, 8192), (4096, 14336)):
        cfg = tk.split_config(m, n, k, SMS)
        if cfg is not None:
            bn, bm, bk, split, warps, stages = cfg
            assert bm <= tk.INT8_SPLIT_MAX_BM and bk == 256, (m, n, k, cfg)
            assert warps == 4 or split == 1 or (n // bn) * -(-m // bm) * split <= SMS, cfg
print("ok")
"""


def test_gemm_tile_rules():
    """Which tiles the dense GEMMs take above 32 tokens (measured on an H100: docs/kernels.md):
    one wave of CTAs that fills the SMs, split-K only to fill it; the prefill GEMM's narrow
    tile for grids the wide one leaves half empty; the INT8 split path's tiles."""
    _run_interpreted(TILE_RULES_SCRIPT)


def test_moe_routing_table_holds_repeated_experts():
    _run_interpreted(MOE_SCRIPT)


def test_moe_int8_layer_with_corrections_and_repeated_experts():
    """The quantized INT8 MoE path (routing, GEMM1 with the corrections and SiLU-and-mul in
    its epilogue, the intermediate's quantization, GEMM2 with its corrections, the top-k sum)
    with planted out-of-range blocks in both matrices, per-tensor and per-token scales, against
    the exact per-pair reference; and a NaN input under a per-tensor intermediate scale, which
    must make the whole output NaN as in the reference (the intermediate's amax used to drop
    NaN)."""
    _run_interpreted(MOE_QUANTIZED_SCRIPT)
