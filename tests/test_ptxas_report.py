"""The SM90 Triton kernels compiled for sm_90a on this machine (no GPU needed:
benchmarks/tools/ptxas_report.py): the dense GEMM's FP8 tiles, the MoE GEMMs' FP8 prefill tiles
and the TMA prefill GEMM must not have their `wgmma`s serialized by ptxas (C7514/C7515; the K
loop's zero-trip path once did that and cost 7 % at M = 128 on an H100, docs/kernels.md, and
5-9 % on the MoE prefill, docs/moe_kernels.md), the TMA prefill GEMM's FP8 `wgmma`s must stay
asynchronous (a `wait_group 1` in its loop), and the detector must see a known serialized
kernel (the MoE GEMM1's per-instruction FP8 promotion at decode tiles, C7514), so that a clean
report means something.

Needs triton with its NVIDIA backend (it ships ptxas), importable here or in
``W4A8_TRITON_INTERPRETER_PATH`` (as for test_triton_interpreted.py); run in a subprocess so
that vLLM's CPU build never sees that triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_triton_interpreted import REPO, TRITON_PATH_ENV, _triton_dir

pytestmark = pytest.mark.skipif(
    _triton_dir() is None,
    reason=f"triton is neither importable nor in ${TRITON_PATH_ENV} (scripts/setup.sh installs it)")

SCRIPT = """
import dataclasses, json, sys
sys.path.insert(0, "benchmarks/tools")
import ptxas_report as pr
from w4a8_backend.kernels import triton_w4a8 as tk
out = []
for m in (16, 64, 128):
    out.append(pr.dense_gemm(False, tk.pick_config(m, 8192, 8192, False, pr.H100_SMS)))
# the mid-M tiles of the K = 4096 shapes: 64 x 64 and 128 x 64 at 4 warps
out.append(pr.dense_gemm(False, tk.pick_config(64, 4096, 4096, False, pr.H100_SMS)))
out.append(pr.dense_gemm(False, tk.pick_config(128, 6144, 4096, False, pr.H100_SMS)))
out.append(pr.prefill_gemm(False, tk.PREFILL_CONFIG_NARROW))
for gated in (True, False):  # the MoE prefill tiles (4096 tokens of Qwen3-30B-A3B)
    bn, bm, warps, stages = pr.mk.pick_config(4096, 4096 * 8, 128, False, gemm2=not gated)
    out.append(pr.moe_gemm(False, gated, bn, bm, warps, stages))
out.append(pr.prefill_gemm(False))
out.append(pr.moe_gemm(False, gated=True))
print(json.dumps([dict(dataclasses.asdict(r), serialized=r.serialized) for r in out]))
"""


def test_fp8_dense_tiles_not_serialized_and_detector_sees_moe_promotion():
    path = os.pathsep.join(p for p in (str(REPO), _triton_dir(), os.environ.get("PYTHONPATH"))
                           if p)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *clean, moe1 = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in clean:
        assert r["registers"] > 0 and r["wgmma"] > 0, r
        assert not r["serialized"], f"ptxas serializes the FP8 tile's wgmmas: {r}"
    for prefill in (clean[-1], clean[-4]):  # the wide and the narrow tile
        assert 1 in prefill["waits"], f"the TMA prefill GEMM waits for every wgmma: {prefill}"
    assert moe1["serialized"] and "C7514" in moe1["notes"], moe1


EDGE_KERNELS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from w4a8_backend.kernels import triton_w4a8 as tk

def build(fn, types, const, warps=4):
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps))

for x_split in (False, True):  # M = 1 arrives as a constant
    build(tk._correction, {"x_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "y_ptr": "*bf16",
                           "rows_ptr": "*i32", "ptr_ptr": "*i32", "blk_ptr": "*i32",
                           "val_ptr": "*fp32"},
          dict(PER_TOKEN=True, BM=16, PDL=True, X_SPLIT=x_split, M=1))
w = {"w_ptr": "*u8", "c_ptr": "*u8", "rs_ptr": "*u8", "prs_ptr": "*fp32", "out_ptr": "*i8",
     "dense_ptr": "*i8", "x_ptr": "*bf16", "q_ptr": "*i8", "s_in_ptr": "*fp32",
     "s_out_ptr": "*fp32"}
for row_ref in (False, True):  # the weight decode without the GEMMs' L2 policy argument
    bn, bk = tk.MATERIALIZE_TILE[0], tk.INT8_TILE if row_ref else tk.MATERIALIZE_TILE[1]
    build(tk._materialize, w, dict(ACT_INT8=True, ROW_REF=row_ref, BN=bn, BK=bk,
                                   DECODE_LUT=True))
    build(tk._prefill_prepare, w, dict(ACT_INT8=True, MODE=3, ONE_PASS=True, BLOCK=1024,
                                       PART_P2=16, ROW_REF=row_ref, BN=bn, BK=bk,
                                       DECODE_LUT=True))
print("compiled")
"""


def test_edge_kernels_compile():
    """Kernels that the tile tests above do not compile: the out-of-range correction of the
    INT8 split path at M = 1 (Triton passes an integer argument equal to 1 as a constant; it
    once failed on ``M.to``, the Triton path without the CUDA library, e.g. no nvcc: found by a
    GPU test on 2026-11-25) and the prefill weight materialization (it once passed the weight
    decode a plain ``""`` default for the L2 policy, which Triton cannot take: the whole GPU
    prefill suite failed on 2026-11-25)."""
    path = os.pathsep.join(p for p in (str(REPO), _triton_dir(), os.environ.get("PYTHONPATH"))
                           if p)
    proc = subprocess.run([sys.executable, "-c", EDGE_KERNELS], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout + proc.stderr
