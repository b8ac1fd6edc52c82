"""The Triton MoE path's routing table, GEMMs and top-k sum on the CPU, through Triton's
interpreter (``TRITON_INTERPRET=1``): float16 expert weights (the benchmark's BF16 baseline
mode of ``_sm90_moe_triton.moe_forward``, which always takes the routing table), top-k ids with
a token naming one expert several times, against a float64 reference.

Needs only ``triton`` importable, not a GPU; skipped where it is not (the CPU CI installs no
triton). The MXFP4 decode uses inline PTX, which the interpreter cannot run: the quantized
paths are covered by tests/gpu/test_sm90_moe.py on a GPU.
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

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not importable here (the interpreter runs it)")

SCRIPT = textwrap.dedent("""
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
                           0, 0, torch.float32, False, True, bf16_weights=True)
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


def test_routing_table_holds_repeated_experts():
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
