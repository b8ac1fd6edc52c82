"""Same-run A/B of two builds of the CUDA decode library: the checkout's ``csrc/`` against a
baseline source directory (``--baseline-src``: a ``csrc/`` of another version, e.g. from
``git show REV:csrc/w4a8_decode_gemm.cu``), both with the same C interface.

The dense decode op (quantization + CUDA GEMM, static scales) on each library, round robin,
`--repeat` samples each, under `bench_linear.Timer` in both modes: one layer with the L2 flushed
before each call (`flush`) and distinct layers back to back (`sequence`, a decode step). Each
line also says whether the two libraries' outputs are bit-identical.

    python benchmarks/tools/cuda_lib_ab.py --baseline-src OLD_CSRC [--repeat 3] > out.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import (  # noqa: E402
    FP8,
    INT8,
    S_STATIC,
    Timer,
    make_weight,
    our_kernel,
    print_tool_header,
    sequence_layers,
)

from w4a8_backend.kernels import _cuda_ext, sm90_triton  # noqa: E402

SHAPES = ((8192, 8192), (28672, 4096), (4096, 14336), (6144, 4096), (4096, 4096))


def load_libs(baseline_src: Path) -> dict:
    """{"checkout": lib, "baseline": lib} for the current GPU."""
    cap = sm90_triton._capability(0)
    libs = {"checkout": _cuda_ext.load(cap)}
    saved = _cuda_ext.source_dir
    try:
        _cuda_ext.source_dir = lambda: baseline_src
        libs["baseline"] = _cuda_ext.DecodeGemmLib(_cuda_ext.build(cap), cap)
    finally:
        _cuda_ext.source_dir = saved
    return libs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline-src", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ms", default="1,4,8,16")
    args = ap.parse_args()
    print_tool_header(baseline_src=str(args.baseline_src))
    timer = Timer()
    cap = sm90_triton._capability(0)
    libs = load_libs(args.baseline_src)
    try:
        for n, k in SHAPES:
            n_layers = sequence_layers(n, k)
            x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
            for act in (FP8, INT8):
                layers = []
                for i in range(n_layers):
                    packed, scale = make_weight(n, k, seed=n + k + i)
                    layers.append(our_kernel(packed, scale, act, S_STATIC, x_cal))
                kern0, layer0 = layers[0]
                for m in (int(v) for v in args.ms.split(",")):
                    if m > sm90_triton.cuda_decode_max_m(act == INT8):
                        continue
                    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                    samples: dict[str, list[float]] = {}
                    outs = {}
                    for _ in range(args.repeat):
                        for name, lib in libs.items():
                            _cuda_ext._LOADED[cap] = lib
                            outs[name] = kern0.apply(layer0, x, None)
                            samples.setdefault(f"flush {name}", []).append(round(
                                timer.time_us(lambda: kern0.apply(layer0, x, None)), 2))
                            samples.setdefault(f"sequence {name}", []).append(round(
                                timer.time_sequence_us([
                                    lambda kern=kern, layer=layer: kern.apply(layer, x, None)
                                    for kern, layer in layers]), 2))
                    res = {"N": n, "K": k, "M": m, "act": act.name, "layers": n_layers,
                           "bit_identical": torch.equal(outs["checkout"], outs["baseline"])}
                    res.update({key: statistics.median(v) for key, v in samples.items()})
                    res["samples"] = samples
                    print(json.dumps(res), flush=True)
    finally:
        _cuda_ext._LOADED[cap] = libs["checkout"]


if __name__ == "__main__":
    main()
