"""What ptxas makes of the SM90 Triton kernels, without a GPU.

Compiles the dense GEMM (`triton_w4a8._w4a8_gemm`) at the tile configs `pick_config` chooses (at
N = K = 8192 and the K = 4096 Llama-3-8B shapes), the prefill GEMM at both of its tiles, and
the MoE GEMMs (`_sm90_moe_triton._moe_gemm`) at their decode tiles for `sm_90a`
(`triton.compile` with a `GPUTarget`; needs only triton with its NVIDIA backend, which ships
ptxas), then runs ptxas on the PTX and reports per kernel: registers, spills, shared memory,
`wgmma` instructions and `wgmma.wait_group` counts, and ptxas's notes on `wgmma`:

- C7514 / C7515: every `wgmma` of the kernel is serialized (non-`wgmma` instructions read or
  define accumulator registers while a `wgmma` group is in flight);
- C7517 / C7519: a wait / arrive injected by ptxas (informational).

Found this way on 2026-11-24: the dense FP8 tiles were serialized by the K loop's zero-trip
path (docs/kernels.md, "The K loop's zero-trip path serialized the FP8 wgmmas"); the MoE GEMMs'
FP8 prefill tiles are serialized too, GEMM2 by the same path and GEMM1 by its promotion
(docs/moe_kernels.md, eighth session).

    python benchmarks/tools/ptxas_report.py [--json out.jsonl]

On a CPU machine, put triton on the path first, e.g. ``PYTHONPATH=.venv/triton-interpreter``
(scripts/setup.sh installs it there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from w4a8_backend.kernels import _sm90_moe_triton as mk  # noqa: E402
from w4a8_backend.kernels import triton_w4a8 as tk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
# integer arguments the host code always passes as multiples of 16 (Triton specializes them so)
ALIGNED_INTS = {"K", "N", "KP", "KP2", "KP32", "NP", "NPT", "WR", "UP_OFF", "stride_ym",
                "stride_out"}
SERIALIZED = ("C7514", "C7515")


@dataclasses.dataclass
class Report:
    kernel: str
    config: dict
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    wgmma: int
    waits: list[int]
    notes: list[str]
    l2_hinted: int  # cp.async copies with an L2 cache policy (W_EVICT, kernels/_triton_l2.py)

    @property
    def serialized(self) -> bool:
        return any(n in SERIALIZED for n in self.notes)


def _ptxas_info(ptx: str) -> tuple[int, int, int, list[str]]:
    """(registers, spill store bytes, spill load bytes, sorted distinct C75xx notes)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o",
                              os.devnull], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (int(regs[1]) if regs else 0, int(spills[1]) if spills else 0,
            int(spills[2]) if spills else 0, sorted(set(re.findall(r"\((C75\d\d)\)", out))))


def _compile(fn, types: dict, const: dict, warps: int, stages: int, name: str) -> Report:
    names = fn.arg_names
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n.endswith("_ptr") or n in ALIGNED_INTS}
    kernel = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=TARGET,
                            options=dict(num_warps=warps, num_stages=stages))
    ptx = kernel.asm["ptx"]
    regs, st, ld, notes = _ptxas_info(ptx)
    waits = [int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)]
    config = {k: v for k, v in const.items() if k in ("ACT_INT8", "BN", "BM", "BK", "SPLIT_K",
                                                      "W_DENSE", "GATED", "FP8_PROMOTE",
                                                      "W_EVICT")}
    config.update(warps=warps, stages=stages)
    return Report(name, config, regs, st, ld, kernel.metadata.shared,
                  len(re.findall(r"wgmma\.mma_async", ptx)), waits, notes,
                  len(re.findall(r"cp\.async\.c[ag]\.shared\.global\.L2::cache_hint", ptx)))


def dense_gemm(act_int8: bool, config: tuple, dense: bool = False,
               split: bool = False, evict: str = "") -> Report:
    """`_w4a8_gemm` at ``config`` = (BN, BM, BK, split_k, warps, stages), per-tensor scale, with
    the PDL wait where sm_90 launches it so (``w4a8_gemm``'s rule). ``split``: the INT8 split
    path (E4M3 planes on the FP8 repacking). ``evict``: the weight loads' L2 policy
    (``W_EVICT``)."""
    mma_int8 = act_int8 and not split
    pdl = (not dense and not mma_int8 and config[1] >= tk.PDL_MIN_BM
           and config[0] >= tk.PDL_MIN_BN)  # gemm_launch_pdl on sm_90
    bn, bm, bk, split_k, warps, stages = config
    act = "*i8" if mma_int8 else "*fp8e4nv"
    types = {"x_ptr": act, "xs_ptr": "*fp32", "w_ptr": act if dense else "*u8", "c_ptr": "*u8",
             "rs_ptr": "*u8" if mma_int8 else "*fp32", "y_ptr": "*bf16", "bias_ptr": "*bf16",
             "ws_ptr": "*fp32", "cnt_ptr": "*i32", "lut_ptr": "*i32"}
    const = dict(ACT_INT8=mma_int8, PER_TOKEN=False, HAS_BIAS=False, W_DENSE=dense,
                 ROW_REF=False, SPLIT_K=split_k, DECODE_LUT=True, BN=bn, BM=bm, BK=bk,
                 PDL=pdl, RELEASE=False, X_SPLIT=split, W_EVICT=evict)
    return _compile(tk._w4a8_gemm, types, const, warps, stages,
                    "dense materialized" if dense else
                    "dense fused, int8 split" if split else "dense fused")


def prefill_gemm(act_int8: bool, config: tuple | None = None) -> Report:
    """`_prefill_gemm` (the sm_90 TMA prefill GEMM) at ``config`` (default `PREFILL_CONFIG`),
    per-tensor scale."""
    bm, bn, bk, group_m, warps, stages = config or tk.PREFILL_CONFIG
    dt = "i8" if act_int8 else "fp8e4nv"
    types = {"x_desc": f"tensordesc<{dt}[{bm}, {bk}]>", "w_desc": f"tensordesc<{dt}[{bn}, {bk}]>",
             "xs_ptr": "*fp32", "rs_ptr": "*fp32", "y_ptr": "*bf16", "bias_ptr": "*bf16"}
    const = dict(ACT_INT8=act_int8, PER_TOKEN=False, HAS_BIAS=False, BM=bm, BN=bn, BK=bk,
                 GROUP_M=group_m)
    return _compile(tk._prefill_gemm, types, const, warps, stages, "dense prefill TMA")


def moe_gemm(act_int8: bool, gated: bool, bn: int = 64, bm: int = 16, warps: int = 4,
             stages: int | None = None, split: bool = False, evict: str = "") -> Report:
    """`_moe_gemm` at a decode tile: GEMM1 (``gated``, static intermediate scale) or GEMM2.
    ``split``: the INT8 split path. ``evict``: the weight loads' L2 policy (``W_EVICT``)."""
    mma_int8 = act_int8 and not split
    act = "*i8" if mma_int8 else "*fp8e4nv"
    stages = stages or mk.pick_config(16, 128, 128, mma_int8)[3]
    types = {"a_ptr": act, "as_ptr": "*fp32", "w_ptr": "*u8", "c_ptr": "*u8",
             "rs_ptr": "*u8" if mma_int8 else "*fp32", "crp_ptr": "*i32", "cblk_ptr": "*i32",
             "cval_ptr": "*fp32", "out_ptr": act if gated else "*fp32", "amax_ptr": "*i32",
             "tab_ptr": "*i32", "cnt_ptr": "*i32", "off_ptr": "*i32", "ids_ptr": "*i64",
             "map_ptr": "*i32", "qs_ptr": "*fp32"}
    const = dict(ACT_INT8=mma_int8, PER_ROW=False, A_BY_TOKEN=gated, GATED=gated, CORR=False,
                 AMAX=False, W_BF16=False, DECODE_LUT=True,
                 FP8_PROMOTE=0 if mma_int8 else mk.fp8_promote(bm, gated),
                 OUT_QUANT=gated, ROUTE_INLINE=False, HAS_MAP=False, PP2=128, EP2=128, BN=bn,
                 BM=bm, BK=256, PDL=mk.PDL, X_SPLIT=split,  # (sm_90 launches it with PDL)
                 W_EVICT=evict)
    return _compile(mk._moe_gemm, types, const, warps, stages,
                    ("moe gemm1" if gated else "moe gemm2") + (", int8 split" if split else ""))


def default_reports() -> list[Report]:
    reports = []
    for act_int8 in (False, True):
        seen = set()
        # N = K = 8192, and K = 4096 (the Llama-3-8B projections), where the mid-M tiles differ
        for n, k in ((8192, 8192), (4096, 4096), (6144, 4096)):
            for m in (1, 16, 32, 64, 128, 256):
                cfg = tk.pick_config(m, n, k, act_int8, H100_SMS)
                if cfg not in seen:
                    seen.add(cfg)
                    reports.append(dense_gemm(act_int8, cfg))
        reports.append(dense_gemm(act_int8, tk.pick_config(4096, 8192, 8192, act_int8,
                                                           H100_SMS, dense=True), dense=True))
        reports.append(prefill_gemm(act_int8))
        if not act_int8:
            reports.append(prefill_gemm(act_int8, tk.PREFILL_CONFIG_NARROW))
        for gated in (True, False):
            reports.append(moe_gemm(act_int8, gated))
            # the prefill tile (4096 tokens of Qwen3-30B-A3B: 128 experts, top 8)
            bn, bm, warps, stages = mk.pick_config(4096, 4096 * 8, 128, act_int8,
                                                   gemm2=not gated)
            reports.append(moe_gemm(act_int8, gated, bn, bm, warps, stages))
    return reports


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="also write one JSON line per kernel here")
    args = ap.parse_args(argv)
    reports = default_reports()
    print(f"{'kernel':<20} {'config':<62} regs spill smem   wgmma waits notes")
    for r in reports:
        cfg = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r.config.items())
        print(f"{r.kernel:<20} {cfg:<62} {r.registers:>4} {r.spill_stores:>5} "
              f"{r.shared_bytes:>6} {r.wgmma:>5} {len(r.waits):>5} "
              f"{','.join(r.notes) or '-'}{'  SERIALIZED' if r.serialized else ''}")
    if args.json:
        with open(args.json, "w") as f:
            for r in reports:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")


if __name__ == "__main__":
    main()
