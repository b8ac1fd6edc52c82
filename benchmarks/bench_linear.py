"""Benchmark the SM90 W4A8 MXFP4 linear against cuBLAS BF16, torch._scaled_mm FP8 and Humming.

Every time is measured under CUDA-graph replay (medians of several replays), so host overhead
(Humming's Python path costs 45-90 us) stays out of the numbers, in one of two ways:
- `--timing flush` (default): one call with the L2 flushed before it (a graph of R x [flush,
  call] minus a graph of R x [flush]); the flush zeroes a 256 MB buffer, so the call starts with
  an L2 full of dirty lines that must be written back as its reads evict them;
- `--timing sequence`: distinct layers of the same shape (together >= 3x the L2) back to back,
  no flush; every call finds the other layers' weights in the L2, as the consecutive linears
  of a decode step do.

    python benchmarks/bench_linear.py --out benchmarks/results            # full table + plot
    python benchmarks/bench_linear.py --timing sequence --ms 1,4,16,64,128
    python benchmarks/bench_linear.py --sweep                              # tune our configs

Humming (PyPI humming-kernels 0.1.19) is optional: carried as a wheel, see DESIGN.md §6.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from w4a8_backend.formats import (  # noqa: E402
    ActivationDtype,
    ActivationScheme,
    dequantize_mxfp4,
    quantize_mxfp4,
)
from w4a8_backend.kernels.base import LinearKernelConfig  # noqa: E402

SHAPES_8192 = [(8192, 8192)]
SHAPES_LLAMA8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 4, 16, 64, 128, 512, 4096]
FP8, INT8 = ActivationDtype.FP8_E4M3, ActivationDtype.INT8
S_STATIC, S_TENSOR, S_TOKEN = (
    ActivationScheme.STATIC_PER_TENSOR,
    ActivationScheme.DYNAMIC_PER_TENSOR,
    ActivationScheme.DYNAMIC_PER_TOKEN,
)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class Timer:
    def __init__(self):
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush_buf = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device="cuda")

    def _graph(self, fn, reps):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                self.flush_buf.zero_()
                if fn is not None:
                    fn()
        return g

    @staticmethod
    def _replay_ms(g, n=7):
        # one untimed replay first: without it the first timing of a freshly built MoE layer
        # read up to 14 us high (H100, gpt-oss-20b T=1: 52.5 then 38.2-39.5 us; with it 38.1
        # first; benchmarks/results/timer_first_replay_h100_20261124_0655.jsonl)
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    def time_us(self, fn, reps=None):
        """Median microseconds of one ``fn()`` with a cold L2, under graph replay."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()  # compile / autotune / lazy init outside capture
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        if reps is None:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            one = time.perf_counter() - t0
            reps = int(max(3, min(40, 0.004 / max(one, 1e-6))))
        g1 = self._graph(fn, reps)
        g0 = self._graph(None, reps)
        t1, t0 = self._replay_ms(g1), self._replay_ms(g0)
        del g1, g0
        return max(t1 - t0, 0.0) * 1000.0 / reps

    def time_sequence_us(self, fns, reps=4):
        """Median microseconds per call of ``fns`` run back to back under graph replay, with no
        flush: each call finds the L2 holding the other layers' weights (clean lines), as the
        consecutive linears of a decode step do. ``fns`` must read enough distinct weight bytes
        together (``sequence_layers``) that none of one call's weights survive until its next
        turn."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                for fn in fns:
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                for fn in fns:
                    fn()
        t = self._replay_ms(g)
        del g
        return t * 1000.0 / (reps * len(fns))


def sequence_layers(n: int, k: int) -> int:
    """Distinct layers per timed sequence: their MXFP4 weights together are at least 3x the L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return int(min(24, max(4, -(-3 * l2 // int(n * k * 4.25 / 8)))))


def copy_bandwidth_tbs() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        b.copy_(a)
    ev[1].record()
    torch.cuda.synchronize()
    return 2 * n * 10 / (ev[0].elapsed_time(ev[1]) / 1000) / 1e12


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
BLOCK_SPREAD = 0.35


def make_weight(n, k, seed=0, spread=BLOCK_SPREAD):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    # per-block log-normal magnitudes (std `spread` binades) and a few 4x input channels: at
    # 0.35 rows span ~3 binades of E8M0 exponents, wider than MiniLM's real rows (mean ~1-1.5);
    # 0.15 leaves about as many blocks outside one INT8 window per row as MiniLM (0.018 % vs
    # 0.011 % more than per 256-wide tile), 0.35 ten times as many (0.19 %)
    w *= torch.exp2(torch.randn(n, k // 32, device="cuda", generator=g) * spread).repeat_interleave(
        32, dim=1
    )
    w[:, torch.randint(0, k, (max(1, k // 512),), device="cuda", generator=g)] *= 4.0
    return quantize_mxfp4(w)


class Layer(torch.nn.Module):
    pass


def our_kernel(packed, scale, act, scheme, x_cal):
    from w4a8_backend.kernels.sm90_triton import Sm90TritonLinearKernel

    n, k = packed.shape[0], packed.shape[1] * 2
    kern = Sm90TritonLinearKernel(LinearKernelConfig(act, scheme, n, k, torch.bfloat16))
    layer = Layer()
    layer.weight = torch.nn.Parameter(packed.clone(), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scale.clone(), requires_grad=False)
    qmax = 448.0 if act == FP8 else 127.0
    layer.input_scale = (
        torch.nn.Parameter((x_cal.float().abs().amax() / qmax).reshape(1), requires_grad=False)
        if scheme == S_STATIC
        else None
    )
    kern.process_weights_after_loading(layer)
    return kern, layer


def humming_layers(packed, scale):
    from humming.layer import HummingLayer

    n, k = packed.shape[0], packed.shape[1] * 2
    out = {}
    for name, input_config in (
        ("W4A16", None),
        ("W4A8", {"quant_method": "humming", "dtype": "float8e4m3"}),
    ):
        kw = {} if input_config is None else {"input_config": dict(input_config)}
        layer = HummingLayer(
            shape_n=n, shape_k=k, weight_config={"quant_method": "mxfp4"},
            torch_dtype=torch.bfloat16, **kw,
        ).to("cuda")
        layer.load_from_tensors({"weight": packed, "weight_scale": scale})
        layer.transform()
        out[name] = layer
    return out


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------
OUR_VARIANTS = (
    ("ours FP8 dyn-tensor", FP8, S_TENSOR),
    ("ours FP8 static", FP8, S_STATIC),
    ("ours FP8 per-token", FP8, S_TOKEN),
    ("ours INT8 per-token", INT8, S_TOKEN),
    ("ours INT8 static", INT8, S_STATIC),
)


def bench_shape(timer, n, k, ms, use_humming, log, spread=BLOCK_SPREAD, sequence=False,
                repeat=1):
    """One row per M. ``sequence``: each entry is the time per call of ``sequence_layers(n, k)``
    distinct layers run back to back (``Timer.time_sequence_us``), else one layer with the L2
    flushed before each call (``Timer.time_us``). Each column is timed ``repeat`` times, round
    robin over the columns; the row holds the medians (and with ``repeat`` > 1 every sample)."""
    n_layers = sequence_layers(n, k) if sequence else 1
    x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
    bf16, fp8 = [], []
    ours = {label: [] for label, _, _ in OUR_VARIANTS}
    hum = {}
    for i in range(n_layers):
        packed, scale = make_weight(n, k, seed=n + k + i, spread=spread)
        w_bf16 = dequantize_mxfp4(packed, scale, torch.bfloat16)
        w_scale = (w_bf16.float().abs().amax() / 448.0).reshape(1)
        bf16.append(w_bf16)
        fp8.append(((w_bf16.float() / w_scale).to(torch.float8_e4m3fn), w_scale))
        for label, act, scheme in OUR_VARIANTS:
            ours[label].append(our_kernel(packed, scale, act, scheme, x_cal))
        if use_humming and (hum or i == 0):
            try:
                for name, layer in humming_layers(packed, scale).items():
                    hum.setdefault(name, []).append(layer)
            except Exception:
                log(f"humming setup failed for {(n, k)}:\n{traceback.format_exc()}")
                hum = {}
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        res = {"N": n, "K": k, "M": m, "layers": n_layers,
               "int8_prefill_rows": ours["ours INT8 static"][0][0].prefill_rows}

        columns = {}  # label -> the calls one sample times

        def t(label, fns):
            columns[label] = fns

        t("cuBLAS BF16", [lambda w=w: torch.mm(x, w.t()) for w in bf16])
        xq = (x.float() / (x.float().abs().amax() / 448)).to(torch.float8_e4m3fn)
        one = torch.ones(1, device="cuda")
        t("_scaled_mm FP8", [lambda w=w, s=s: torch._scaled_mm(
            xq, w.t(), scale_a=one, scale_b=s, out_dtype=torch.bfloat16) for w, s in fp8])
        for label, kls in ours.items():
            t(label, [lambda kern=kern, layer=layer: kern.apply(layer, x, None)
                      for kern, layer in kls])
        if hum:
            from humming.forward import may_process_input
            from humming.tune import get_heuristics_config

            for name, layers in hum.items():
                # each variant's own tuning config, bound now: a late-bound ``tc`` gave W4A16
                # the W4A8 config (a wgmma tile its kernel cannot compile; 2026-11-24 runs)
                tc = get_heuristics_config(layers[0].humming_config, shape_m=m)
                if name == "W4A16":
                    t("Humming W4A16", [lambda layer=layer, tc=tc: layer(x, tuning_config=tc)
                                        for layer in layers])
                else:
                    t("Humming W4A8+quant", [lambda layer=layer, tc=tc: layer(
                        x, tuning_config=tc) for layer in layers])
                    x8, _, ts = may_process_input(layers[0].humming_config, x)
                    t("Humming W4A8", [lambda layer=layer, tc=tc: layer(
                        x8, input_scale=ts, tuning_config=tc) for layer in layers])
        # round robin, so that a slow spell of the machine falls on all columns alike
        samples = {label: [] for label in columns}
        for _ in range(repeat):
            for label, fns in columns.items():
                if samples[label] is None:
                    continue
                try:
                    samples[label].append(timer.time_sequence_us(fns) if sequence
                                          else timer.time_us(fns[0]))
                except Exception:
                    log(f"{label} M={m} N={n} K={k} failed:\n{traceback.format_exc()}")
                    samples[label] = None
        for label, vals in samples.items():
            res[label] = statistics.median(vals) if vals else None
        if repeat > 1:
            res["samples_us"] = {label: [round(v, 2) for v in vals]
                                 for label, vals in samples.items() if vals}
        log(json.dumps(res))
        rows.append(res)
    return rows


OURS = ["ours FP8 dyn-tensor", "ours FP8 static", "ours FP8 per-token", "ours INT8 per-token",
        "ours INT8 static"]
BASE = ["cuBLAS BF16", "_scaled_mm FP8", "Humming W4A16", "Humming W4A8", "Humming W4A8+quant"]


def fmt(v, ref):
    if v is None:
        return "n/a"
    return f"{v:.1f} ({ref / v:.2f}x)" if ref else f"{v:.1f}"


TIMING = {
    "flush": "each entry: one call under CUDA-graph replay, L2 flushed (a 256 MB buffer zeroed, "
             "so the call starts with an L2 of dirty lines) before each call",
    "sequence": "each entry: time per call of the `layers` distinct layers of the row (same "
                "shape, different random weights, together >= 3x the L2) run back to back "
                "under CUDA-graph replay, no flush: every call starts with an L2 holding the "
                "other layers' weights, as the consecutive linears of a decode step do",
}


def write_report(rows, out_dir: Path, meta):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_linear" if meta.get("timing", "flush") == "flush" else "bench_linear_sequence"
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = [c for c in BASE + OURS if any(r.get(c) is not None for r in rows)]
    lines = [
        "# W4A8 MXFP4 linear: time (us) and speed-up vs cuBLAS BF16",
        "",
        f"- device: {meta['device']} ({meta['sms']} SMs), torch {meta['torch']}, "
        f"triton {meta['triton']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- measured copy bandwidth: {meta['copy_tbs']:.2f} TB/s (read + write)",
        f"- weights: random, per-block log-normal spread {meta.get('block_spread', BLOCK_SPREAD)}"
        " binade (make_weight); INT8 prefill (M >= 384) GEMM with one reference per row for "
        + (", ".join(f"{n}x{k}" for n, k in sorted({(r['N'], r['K']) for r in rows
                                                    if r.get('int8_prefill_rows')}))
           or "no shape") + ", per-tile references otherwise (chosen at load)",
        f"- {TIMING[meta.get('timing', 'flush')]}"
        + (f"; each entry is the median of {meta['repeat']} samples taken round robin over the "
           "columns (all samples in the json)" if meta.get("repeat", 1) > 1 else "") + "; "
        "`ours` includes activation quantization (dynamic schemes compute the scale per call); "
        "`_scaled_mm FP8` and `Humming W4A8` exclude it, `Humming W4A8+quant` includes "
        "Humming's per-token FP8 quantization.",
        "- `wbw` = MXFP4 weight bytes (4.25 bit/weight) / time of `ours FP8 static`, "
        "as a fraction of the measured copy bandwidth.",
        "",
        "| N | K | M | layers | " + " | ".join(cols) + " | wbw |",
        "|" + "---|" * (len(cols) + 5),
    ]
    for r in rows:
        ref = r.get("cuBLAS BF16")
        best = r.get("ours FP8 static")
        wbw = ""
        if best:
            wbw = f"{r['N'] * r['K'] * 4.25 / 8 / (best * 1e-6) / 1e12 / meta['copy_tbs']:.0%}"
        lines.append(
            f"| {r['N']} | {r['K']} | {r['M']} | {r.get('layers', 1)} | "
            + " | ".join(fmt(r.get(c), ref) for c in cols)
            + f" | {wbw} |"
        )
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shapes = sorted({(r["N"], r["K"]) for r in rows})
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, (n, k) in zip(axes[0], shapes):
            sub = [r for r in rows if (r["N"], r["K"]) == (n, k)]
            for c in cols:
                if c == "cuBLAS BF16":
                    continue
                pts = [(r["M"], r["cuBLAS BF16"] / r[c]) for r in sub if r.get(c) and r.get("cuBLAS BF16")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=c, linestyle="-" if "ours" in c else "--")
            ax.axhline(1.0, color="gray", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_title(f"N={n} K={k}")
            ax.set_xlabel("M")
            ax.set_ylabel("speed-up vs cuBLAS BF16")
        axes[0][0].legend(fontsize=7)
        timing = meta.get("timing", "flush")
        fig.suptitle(f"{meta['device']} {meta['date']} ({timing} timing)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}.png", dpi=110)
    except Exception:
        traceback.print_exc()
    return "\n".join(lines)


SWEEP_MS = (1, 16, 64, 128, 512, 4096)


def _mid_m_configs(m: int, fp8: bool) -> list:
    """Fused configs for 64 <= M < 512 beyond the defaults: narrower tiles, deeper split-K."""
    bm = 64 if m <= 64 else 128
    cfgs = [(64, bm, 256, 1, 4, 3), (64, bm, 256, 2, 4, 3), (64, bm, 256, 4, 4, 3),
            (128, bm, 256, 2, 8, 3), (128, bm, 256, 2, 8, 4), (128, bm, 256, 4, 8, 3),
            (128, 64, 256, 2, 4, 4), (128, 64, 256, 4, 4, 3), (256, 64, 256, 1, 8, 3)]
    if fp8:
        cfgs += [(128, bm, 128, 2, 8, 4), (128, bm, 128, 4, 8, 5), (64, bm, 128, 4, 4, 5)]
    return cfgs


def sweep(timer, log, ms=SWEEP_MS):
    """Time our GEMM configs (not the activation quantization) at N=K=8192."""
    from w4a8_backend.kernels import triton_w4a8 as tk

    n, k = 8192, 8192
    packed, scale = make_weight(n, k)
    x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
    for act in (FP8, INT8):
        i8 = act == INT8
        kern, layer = our_kernel(packed, scale, act, S_TOKEN, x_cal)
        lut, rs = layer.w4a8_lut, layer.w4a8_row_scale
        rows = layer.w4a8_prefill_row_scale  # INT8 per-row reference, when the layer has it
        if i8:
            log(json.dumps({"act": act.name, "tile_table_blocks": kern.num_out_of_range,
                            "rows_table_blocks": len(layer.w4a8_prefill_corr[2])
                            if rows is not None else None}))
        bk = 256
        dbk = 256 if i8 else 128
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            q, xs = tk.quantize_activation_gpu(x, i8, 3, None)
            res = {"act": act.name, "M": m}
            res["quant_us"] = round(timer.time_us(
                lambda: tk.quantize_activation_gpu(x, i8, 3, None)), 2)
            cands = []
            if m <= 64:
                bm = max(16, 1 << (m - 1).bit_length())
                cands.append(("fused-f16", (64, bm, bk, 4, 4, 4)))
                for cfg in ((64, bm, bk, 1, 4, 4), (64, bm, bk, 2, 4, 4), (64, bm, bk, 4, 4, 4),
                            (64, bm, bk, 8, 4, 4), (64, bm, bk, 4, 4, 6), (64, bm, bk, 4, 4, 3),
                            (128, bm, bk, 4, 4, 4), (128, bm, bk, 2, 8, 4)):
                    cands.append(("fused", cfg))
                if not i8:
                    cands.append(("fused", (64, bm, 512, 2, 4, 3)))
                    cands.append(("fused", (64, bm, 128, 4, 4, 6)))
                    cands.append(("fused", (64, bm, 128, 8, 4, 6)))
            if 64 <= m < 512:
                cands += [("fused", cfg) for cfg in _mid_m_configs(m, not i8)]
            if m > 64:
                for cfg in ((128, 128, bk, 1, 8, 3), (128, 64, bk, 1, 4, 4)):
                    cands.append(("fused", cfg))
                for cfg in ((128, 256, dbk, 1, 8, 3), (128, 128, dbk, 1, 8, 4),
                            (128, 128, dbk, 1, 8, 3), (128, 64, dbk, 1, 4, 4)):
                    cands.append(("dense", cfg))
                if i8 and rows is not None:  # INT8 with one reference per row: FP8's loop
                    for cfg in ((128, 256, 128, 1, 8, 3), (128, 128, 128, 1, 8, 4),
                                (128, 128, 128, 1, 8, 3), (128, 256, 256, 1, 8, 3),
                                (128, 128, 256, 1, 8, 3)):
                        cands.append(("dense-rows", cfg))
            for lut_mode in (True, False) if m == 1 else (True,):
                tk.DECODE_LUT = lut_mode
                res[f"materialize_us{'' if lut_mode else '-f16'}"] = round(timer.time_us(
                    lambda: tk.materialize(layer.weight, layer.weight_scale, rs, i8)), 2)
            tk.DECODE_LUT = True
            if i8 and rows is not None and m > 64:
                res["materialize-rows_us"] = round(timer.time_us(
                    lambda: tk.materialize(layer.weight, layer.weight_scale, rs, i8, rows)), 2)
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                res["correction-tile_us"] = round(timer.time_us(lambda: tk.correction(
                    y, q, xs, True, layer.w4a8_corr_rows, layer.w4a8_corr_ptr,
                    layer.w4a8_corr_blocks, layer.w4a8_corr_values)), 2)
                res["correction-rows_us"] = round(timer.time_us(lambda: tk.correction(
                    y, q, xs, True, *layer.w4a8_prefill_corr)), 2)
            for kind, cfg in cands:
                tk.DECODE_LUT = kind != "fused-f16"
                row_ref = rows if kind == "dense-rows" else None
                try:
                    dense = (tk.materialize(layer.weight, layer.weight_scale, rs, i8, row_ref)
                             if kind.startswith("dense") else None)
                    fn = lambda cfg=cfg, dense=dense, row_ref=row_ref: tk.w4a8_gemm(  # noqa: E731
                        q, xs, layer.weight, layer.weight_scale, rs,
                        layer.w4a8_counters, lut, n, i8, True, None, torch.bfloat16,
                        config=cfg, dense=dense, prefill_row_scale=row_ref)
                    res[f"{kind}{cfg}"] = round(timer.time_us(fn), 2)
                except Exception as exc:
                    res[f"{kind}{cfg}"] = f"ERR {type(exc).__name__}: {str(exc)[-300:]}"
            tk.DECODE_LUT = True
            if not i8 and m > 64:
                dense = tk.materialize(layer.weight, layer.weight_scale, rs, False)
                res["scaled_mm_rowwise"] = round(timer.time_us(lambda: tk.scaled_mm_fp8(
                    q, xs, dense, layer.w4a8_row_scale, n, True, torch.bfloat16)), 2)
            log(json.dumps(res))


CUDA_DECODE_CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 4))  # (warps, stages)


def sweep_cuda(timer, log):
    """The CUDA decode kernel's launch configs vs the Triton decode GEMM, M <= 16, all shapes
    (GEMM alone on pre-quantized activations, then the whole op with static scales)."""
    from w4a8_backend.kernels import sm90_triton
    from w4a8_backend.kernels import triton_w4a8 as tk

    for n, k in SHAPES_8192 + SHAPES_LLAMA8B:
        packed, scale = make_weight(n, k, seed=n + k)
        w_bf16 = dequantize_mxfp4(packed, scale, torch.bfloat16)
        x_cal = torch.randn(64, k, device="cuda").to(torch.bfloat16)
        for act in (FP8, INT8):
            i8 = act == INT8
            kern, layer = our_kernel(packed, scale, act, S_STATIC, x_cal)
            for m in (1, 4, 16):
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                q, xs = tk.quantize_activation_gpu(x, i8, 1, layer.input_scale)
                res = {"N": n, "K": k, "M": m, "act": act.name}
                res["cublas_bf16"] = round(timer.time_us(lambda: torch.mm(x, w_bf16.t())), 2)
                res["triton_gemm"] = round(timer.time_us(lambda: tk.w4a8_gemm(
                    q, xs, layer.weight, layer.weight_scale, layer.w4a8_row_scale,
                    layer.w4a8_counters, layer.w4a8_lut, n, i8, False, None, torch.bfloat16)), 2)
                from w4a8_backend.kernels import _cuda_ext

                lib = _cuda_ext.load(90)
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                rule = sm90_triton.cuda_decode_config
                default = rule(layer.weight.shape[0], torch.cuda.get_device_properties(0)
                               .multi_processor_count)
                try:
                    for cfg in CUDA_DECODE_CONFIGS:
                        res[f"cuda_gemm{cfg}"] = round(timer.time_us(
                            lambda cfg=cfg: lib.gemm(
                                q, xs, layer.weight, layer.weight_scale, layer.w4a8_row_scale,
                                None, y, i8, False, *cfg, False)), 2)
                        # the whole op (quantization + GEMM with PDL) with this config
                        sm90_triton.cuda_decode_config = lambda n_pad, sms, cfg=cfg: cfg
                        kern.decode_cuda = True
                        res[f"op_cuda{cfg}"] = round(timer.time_us(
                            lambda: kern.apply(layer, x, None)), 2)
                finally:
                    sm90_triton.cuda_decode_config = rule
                kern.decode_cuda = False
                res["op_triton"] = round(timer.time_us(lambda: kern.apply(layer, x, None)), 2)
                res["default_config"] = list(default)
                log(json.dumps(res))


def make_logger(path):
    """``log(line)``: print, and append to ``path`` too when given."""
    log_f = open(path, "a") if path else None

    def log(s):
        print(s, flush=True)
        if log_f:
            log_f.write(s + "\n")
            log_f.flush()

    return log


def print_tool_header(**extra) -> None:
    """The first line of a benchmarks/tools script's JSON-lines output: device, date, command
    (and ``extra`` fields)."""
    print(json.dumps({
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        **extra,
    }), flush=True)


def round_robin(timer: "Timer", fn, variants: dict, repeat: int) -> tuple[dict, dict, dict]:
    """A same-run A/B for the benchmarks/tools scripts: ``variants`` maps a name to a callable
    that switches its setting on. ``repeat`` rounds, each running every variant once (its
    output kept) and timing ``fn`` under it (``timer.time_us``). Returns (the outputs of each
    variant's last round, the samples in µs per name, their medians)."""
    outs: dict = {}
    samples: dict[str, list[float]] = {}
    for _ in range(repeat):
        for name, switch in variants.items():
            switch()
            outs[name] = fn()
            samples.setdefault(name, []).append(round(timer.time_us(fn), 2))
    return outs, samples, {name: statistics.median(v) for name, v in samples.items()}


def run_metadata() -> dict:
    """Device, versions, date, the exact command and the measured copy bandwidth."""
    import triton

    return {
        "device": torch.cuda.get_device_name(0),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "copy_tbs": copy_bandwidth_tbs(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default="all", choices=["8192", "llama8b", "all"])
    ap.add_argument("--ms", default=None, help="comma-separated M values (default: "
                    f"{','.join(map(str, MS))}; with --sweep {','.join(map(str, SWEEP_MS))})")
    ap.add_argument("--no-humming", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time our kernel configs only")
    ap.add_argument("--sweep-cuda", action="store_true",
                    help="time the CUDA decode kernel's configs against the Triton decode GEMM")
    ap.add_argument("--log", default=None, help="also append log lines to this file")
    ap.add_argument("--repeat", type=int, default=1,
                    help="samples per column, taken round robin; the table shows medians "
                    "(the whole run at 3 takes ~13 min on an H100: use --shapes to split it)")
    ap.add_argument("--timing", default="flush", choices=sorted(TIMING),
                    help="flush: one layer, L2 flushed before each call; sequence: distinct "
                    "layers back to back, no flush (as in a decode step)")
    ap.add_argument("--block-spread", type=float, default=BLOCK_SPREAD,
                    help="std (binades) of the random weights' per-block magnitudes")
    args = ap.parse_args(argv)
    args.ms_given = args.ms is not None
    args.ms = args.ms or ",".join(map(str, MS))
    log = make_logger(args.log)

    torch.backends.cuda.matmul.allow_tf32 = False
    timer = Timer()
    if args.sweep:
        sweep(timer, log, [int(v) for v in args.ms.split(",")] if args.ms_given else SWEEP_MS)
        return
    if args.sweep_cuda:
        sweep_cuda(timer, log)
        return
    meta = run_metadata()
    meta["block_spread"] = args.block_spread
    meta["timing"] = args.timing
    meta["repeat"] = args.repeat
    log(json.dumps(meta))
    use_humming = not args.no_humming
    if use_humming:
        try:
            import humming  # noqa: F401
        except ImportError as exc:
            log(f"humming not importable ({exc}); its columns are left out")
            use_humming = False
    shapes = {"8192": SHAPES_8192, "llama8b": SHAPES_LLAMA8B,
              "all": SHAPES_8192 + SHAPES_LLAMA8B}[args.shapes]
    ms = [int(v) for v in args.ms.split(",")]
    rows = []
    for n, k in shapes:
        rows += bench_shape(timer, n, k, ms, use_humming, log, args.block_spread,
                            sequence=args.timing == "sequence", repeat=args.repeat)
        write_report(rows, Path(args.out), meta)
    print(write_report(rows, Path(args.out), meta))


if __name__ == "__main__":
    main()
