"""Benchmark the SM90 W4A8 MXFP4 MoE (grouped expert GEMMs) against BF16 fused-MoE baselines.

Layer shapes: Qwen3-30B-A3B (H=2048, I=768, E=128, top-8) and gpt-oss-20b (H=2880, I=2880,
E=32, top-4), random MXFP4 weights (per-block log-normal scale spread, a few 4x input channels,
as benchmarks/bench_linear.py), uniform random top-k routing. Every time is one whole MoE layer
call (activation quantization, routing, both GEMMs, reduction) under CUDA-graph replay with the
L2 cache flushed before each call (bench_linear.Timer).

Baselines, in the same run:
- ``vLLM BF16 fused_experts``: vLLM 0.26's Triton fused MoE (bf16 weights and activations),
  when vLLM is importable (on the GPU machine: carry .kit, ``source .kit/activate.sh``).
- ``Triton BF16 grouped``: this project's grouped kernels with dense bf16 weights (same routing,
  tiles and reduction as ours; only the weight format differs).
- ``Humming W4A8 MoE`` / ``Humming W4A16 MoE``: humming-kernels' indexed MXFP4 GEMMs composed
  into a layer (benchmarks/humming_moe.py: vLLM's alignment, GEMM1, Humming's fused
  SiLU-and-mul + quantization, GEMM2, a torch top-k sum), when both humming and vLLM import.
  W4A8 quantizes activations per token (FP8), as ``ours FP8 dyn-tensor`` does per tensor.
Every output is compared with the BF16 baseline's; a column whose relative difference exceeds
MAX_REL_DIFF is dropped from the row (logged), so a wrong layer cannot post a time.

    python benchmarks/bench_moe.py --out benchmarks/results          # table, json, png
    python benchmarks/bench_moe.py --sweep                            # Triton tile configs
    python benchmarks/bench_moe.py --cuda-sweep                       # CUDA decode path
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_linear import Timer, make_logger, make_weight, run_metadata  # noqa: E402
from humming_moe import VARIANTS as HUMMING_VARIANTS  # noqa: E402

from w4a8_backend.formats import ActivationDtype, ActivationScheme, dequantize_mxfp4  # noqa: E402
from w4a8_backend.kernels import _sm90_moe_cuda as mc  # noqa: E402
from w4a8_backend.kernels.moe_base import MoEKernelConfig  # noqa: E402

MODELS = {
    "qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, top_k=8),
    "gpt-oss-20b": dict(hidden=2880, inter=2880, experts=32, top_k=4),
}
TOKENS = [1, 16, 64, 512, 4096]
FP8, INT8 = ActivationDtype.FP8_E4M3, ActivationDtype.INT8
S, D, P = (ActivationScheme.STATIC_PER_TENSOR, ActivationScheme.DYNAMIC_PER_TENSOR,
           ActivationScheme.DYNAMIC_PER_TOKEN)
OURS = {
    "ours FP8 dyn-tensor": (FP8, D),  # ModelOpt's shipped preset (dynamic FP8)
    "ours FP8 static": (FP8, S),
    "ours INT8 per-token": (INT8, P),
    "ours INT8 static": (INT8, S),
}
# The same layers on the Triton grouped kernels, at the token counts where the default is the
# CUDA decode path (_sm90_moe_cuda.MAX_TOKENS).
TRITON_PATH = {
    "ours FP8 dyn-tensor, Triton kernels": "ours FP8 dyn-tensor",
    "ours FP8 static, Triton kernels": "ours FP8 static",
    "ours INT8 per-token, Triton kernels": "ours INT8 per-token",
}
VLLM = "vLLM BF16 fused_experts"
TRITON_BF16 = "Triton BF16 grouped"
# ours are ~0.02-0.07 from the BF16 layer (activation quantization); a wrong layout is ~1
MAX_REL_DIFF = 0.15


class Layer(torch.nn.Module):
    pass


def make_moe_weights(m, seed):
    e, h, i = m["experts"], m["hidden"], m["inter"]
    p13, s13 = make_weight(e * 2 * i, h, seed)
    p2, s2 = make_weight(e * h, i, seed + 1)
    return (p13.view(e, 2 * i, h // 2), s13.view(e, 2 * i, h // 32),
            p2.view(e, h, i // 2), s2.view(e, h, i // 32))


def our_layer(weights, m, act, scheme, x_cal, routing_cal, scheme2=None):
    """Our MoE kernel and layer; ``scheme2``: the intermediate's scheme when it is not the
    input's. Static scales are calibrated as the amaxes of a dynamic run's inputs."""
    from w4a8_backend.kernels.sm90_triton_moe import Sm90TritonMoEKernel

    scheme2 = scheme if scheme2 is None else scheme2
    e, h, i, k = m["experts"], m["hidden"], m["inter"], m["top_k"]
    kern = Sm90TritonMoEKernel(MoEKernelConfig(act, scheme, scheme2, e, h, i, k, "silu",
                                               torch.bfloat16))
    layer = Layer()
    for name, t in zip(("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"),
                       weights):
        layer.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))
    layer.w13_input_scale = layer.w2_input_scale = None
    qmax = 448.0 if act == FP8 else 127.0
    if scheme == S:
        layer.w13_input_scale = (x_cal.float().abs().amax() / qmax).reshape(1)
    if scheme2 == S:
        layer.w2_input_scale = torch.tensor([1.0], device="cuda")  # replaced below
    kern.process_weights_after_loading(layer)
    if scheme2 == S:
        from w4a8_backend.kernels import _sm90_moe_triton as mk

        seen = {}
        orig = mk.quantize_h

        def spy(hbuf, *args, **kwargs):
            seen["amax"] = float(hbuf[hbuf == hbuf].abs().max())
            return orig(hbuf, *args, **kwargs)

        mk.quantize_h = spy
        mk.FUSE_DECODE = False  # the fused path applies the static scale inside GEMM1
        try:
            kern.apply(layer, x_cal, *routing_cal, None, False)
        finally:
            mk.quantize_h = orig
            mk.FUSE_DECODE = True
        layer.w2_input_scale = torch.tensor([seen["amax"] / qmax], device="cuda")
    return kern, layer


def bf16_stacks(w13_bf16, w2_bf16, m):
    """Dense bf16 rows laid out like our repacked stacks (rows per expert padded to 128)."""
    e, h, i = m["experts"], m["hidden"], m["inter"]
    ip, hp = -(-i // 128) * 128, -(-h // 128) * 128
    g = torch.zeros(e, 2, ip, h, dtype=torch.bfloat16, device="cuda")
    g[:, :, :i] = w13_bf16.view(e, 2, i, h)
    d = torch.zeros(e, hp, i, dtype=torch.bfloat16, device="cuda")
    d[:, :h] = w2_bf16
    return g.reshape(-1, h), d.reshape(-1, i), ip, hp


def triton_bf16_moe(x, tw, ti, w13s, w2s, m, ip, hp, config=None):
    from w4a8_backend.kernels import _sm90_moe_triton as mk

    return mk.moe_forward(x, tw, ti, None, (w13s,), (w2s,), None, None, m["experts"],
                          m["hidden"], m["inter"], ip, hp, False, 0, 0, torch.bfloat16, False,
                          bf16_weights=True, config1=config, config2=config)


def vllm_fused_experts():
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    return fused_experts


def routing(t, m, seed):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    scores = torch.randn(t, m["experts"], device="cuda", generator=g)
    vals, ids = scores.topk(m["top_k"], dim=-1)
    return torch.softmax(vals, dim=-1).float(), ids.to(torch.int32)


def bytes_touched(ids, m):
    """(MXFP4 bytes, BF16 bytes) of the experts this routing touches (weights only)."""
    e_used = int(torch.unique(ids).numel())
    params = e_used * 3 * m["hidden"] * m["inter"]
    return params * 4.25 / 8, params * 2


def humming_moes(weights, log, name):
    """Label -> HummingMoE for each variant that builds (benchmarks/humming_moe.py)."""
    from humming_moe import HummingMoE

    out = {}
    for label, input_config in HUMMING_VARIANTS.items():
        t0 = time.time()
        try:
            out[label] = HummingMoE(*weights, input_config)
            log(f"# {name} {label}: load {time.time() - t0:.1f}s")
        except Exception:
            log(f"# {name} {label} setup failed:\n{traceback.format_exc()}")
    return out


def bench_model(timer, name, m, tokens, fused_experts, log, repeat=1, use_humming=False):
    weights = make_moe_weights(m, seed=len(name))
    w13_bf16 = dequantize_mxfp4(weights[0], weights[1], torch.bfloat16)
    w2_bf16 = dequantize_mxfp4(weights[2], weights[3], torch.bfloat16)
    w13s, w2s, ip, hp = bf16_stacks(w13_bf16, w2_bf16, m)
    x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
    r_cal = routing(64, m, 1)
    ours = {}
    for label, (act, scheme) in OURS.items():
        t0 = time.time()
        ours[label] = our_layer(weights, m, act, scheme, x_cal, r_cal)
        k = ours[label][0]
        log(f"# {name} {label}: load {time.time() - t0:.1f}s, out-of-range blocks "
            f"{k.num_out_of_range}")
    hum = humming_moes(weights, log, name) if use_humming else {}
    rows = []
    for t in tokens:
        x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
        tw, ti = routing(t, m, 100 + t)
        fp4_b, bf16_b = bytes_touched(ti, m)
        res = {"model": name, "T": t, "fp4_MB": round(fp4_b / 1e6, 2),
               "bf16_MB": round(bf16_b / 1e6, 2)}

        outs, fns = {}, {}

        def tm(label, fn):
            try:
                outs[label] = fn()
                fns[label] = fn
            except Exception:
                log(f"{label} {name} T={t} failed:\n{traceback.format_exc()}")
                res[label] = None

        if fused_experts is not None:
            tm(VLLM, lambda: fused_experts(x, w13_bf16, w2_bf16, tw, ti))
        tm(TRITON_BF16, lambda: triton_bf16_moe(x, tw, ti, w13s, w2s, m, ip, hp))
        for label, (kern, layer) in ours.items():
            tm(label, lambda kern=kern, layer=layer: kern.apply(layer, x, tw, ti, None, False))
        for label, variant in TRITON_PATH.items():
            if mc.usable(t, m["top_k"], m["experts"], m["hidden"], m["inter"]):
                tm(label, lambda k_l=ours[variant]: triton_path(*k_l, x, tw, ti))
        for label, layer in hum.items():
            tm(label, lambda layer=layer: layer(x, tw, ti))
        if outs:
            # every output against the BF16 baseline's (quantization error only); a column
            # far off it is a wrong layer and gets no time
            ref = outs.get(VLLM, outs.get(TRITON_BF16, next(iter(outs.values())))).float()
            res["rel_diff_vs_bf16"] = {
                k: round(((v.float() - ref).norm() / ref.norm()).item(), 4)
                for k, v in outs.items()}
            for label, diff in res["rel_diff_vs_bf16"].items():
                if not diff <= MAX_REL_DIFF:
                    log(f"{label} {name} T={t}: output {diff} from the BF16 baseline's "
                        f"(> {MAX_REL_DIFF}); not timed")
                    fns.pop(label, None)
                    res[label] = None
        # every column timed `repeat` times, round robin, so that a slow spell of the machine
        # falls on all columns alike; the table shows medians, the json every sample
        samples = {label: [] for label in fns}
        for _ in range(repeat):
            for label, fn in fns.items():
                if samples[label] is None:
                    continue
                try:
                    samples[label].append(round(timer.time_us(fn), 2))
                except Exception:
                    log(f"{label} {name} T={t} timing failed:\n{traceback.format_exc()}")
                    samples[label] = None
        for label, vals in samples.items():
            res[label] = round(statistics.median(vals), 2) if vals else None
        res["samples_us"] = samples
        log(json.dumps(res))
        rows.append(res)
    return rows


def triton_path(kern, layer, x, tw, ti):
    """One call on the Triton kernels (the flag is read at graph capture)."""
    cuda = kern.decode_cuda
    kern.decode_cuda = False
    try:
        return kern.apply(layer, x, tw, ti, None, False)
    finally:
        kern.decode_cuda = cuda


def fmt(v, ref):
    if v is None:
        return "n/a"
    return f"{v:.1f} ({ref / v:.2f}x)" if ref else f"{v:.1f}"


def write_report(rows, out_dir: Path, meta):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "moe_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = VLLM if any(r.get(VLLM) for r in rows) else TRITON_BF16
    cols = [c for c in [VLLM, TRITON_BF16, *HUMMING_VARIANTS, *OURS, *TRITON_PATH]
            if any(r.get(c) is not None for r in rows)]
    lines = [
        "# W4A8 MXFP4 MoE layer: time (us) and speed-up vs " + base,
        "",
        f"- device: {meta['device']} ({meta['sms']} SMs), torch {meta['torch']}, "
        f"triton {meta['triton']}, vLLM {meta.get('vllm', 'not importable')}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- measured copy bandwidth: {meta['copy_tbs']:.2f} TB/s (read + write)",
        "- each entry: one whole MoE layer call (activation quantization, routing, gate-up GEMM "
        "+ SiLU, down GEMM, top-k reduction) under CUDA-graph replay, L2 flushed before each "
        "call; uniform random top-k routing; speed-up in parentheses vs " + base + ". "
        f"Each entry is the median of {meta.get('repeat', 1)} samples taken round robin over "
        "the columns (all samples in moe_bench.json).",
        f"- `ours`: the CUDA decode kernels up to {mc.MAX_TOKENS} tokens (above one token: while "
        f"the routed pairs are at most {mc.MAX_PAIR_FRACTION} x the experts), the Triton grouped "
        "kernels otherwise; `Triton kernels`: the same layers forced onto Triton where the "
        "default is CUDA.",
        "- `Humming W4A8 MoE` / `Humming W4A16 MoE`: humming-kernels' indexed MXFP4 GEMMs "
        "composed into a layer (benchmarks/humming_moe.py: vLLM's alignment, gate-up GEMM, "
        "Humming's SiLU-and-mul fused with its per-token FP8 quantization (W4A8) or alone "
        "(W4A16), down GEMM, torch top-k sum); Humming's heuristic tuning configs.",
        "- `floor` = MXFP4 weight bytes of the experts the routing touches / copy bandwidth "
        "(BF16 floor in brackets).",
        "",
        "| model | T | " + " | ".join(cols) + " | floor us |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for r in rows:
        ref = r.get(base)
        floor = r["fp4_MB"] * 1e6 / (meta["copy_tbs"] * 1e12) * 1e6
        floor_bf = r["bf16_MB"] * 1e6 / (meta["copy_tbs"] * 1e12) * 1e6
        lines.append(f"| {r['model']} | {r['T']} | " + " | ".join(fmt(r.get(c), ref) for c in cols)
                     + f" | {floor:.1f} [{floor_bf:.1f}] |")
    (out_dir / "moe_bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models = list(dict.fromkeys(r["model"] for r in rows))
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, name in zip(axes[0], models):
            sub = [r for r in rows if r["model"] == name]
            for c in cols:
                if c == base:
                    continue
                pts = [(r["T"], r[base] / r[c]) for r in sub if r.get(c) and r.get(base)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=c,
                            linestyle="-" if "ours" in c else "--")
            ax.axhline(1.0, color="gray", lw=0.5)
            ax.axhline(2.5, color="red", lw=0.5, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_title(name)
            ax.set_xlabel("tokens")
            ax.set_ylabel(f"speed-up vs {base}")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{meta['device']} {meta['date']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "moe_bench.png", dpi=110)
    except Exception:
        traceback.print_exc()
    return "\n".join(lines)


def sweep(timer, log, tokens=(1, 16, 64, 512, 4096)):
    """Tile configs (BN, BM, warps, stages) of both GEMMs, FP8 dyn-tensor and INT8 (only the
    configs that tests/gpu/test_sm90_moe.py::test_config_variants checks)."""
    from w4a8_backend.kernels import _sm90_moe_triton as mk

    orig = mk.pick_config
    for name, m in MODELS.items():
        weights = make_moe_weights(m, seed=len(name))
        x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
        for label in ("ours FP8 dyn-tensor", "ours INT8 per-token"):
            kern, layer = our_layer(weights, m, *OURS[label], x_cal, routing(64, m, 1))
            for t in tokens:
                x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                tw, ti = routing(t, m, 100 + t)
                res = {"model": name, "variant": label, "T": t,
                       "default": orig(t, t * m["top_k"], m["experts"],
                                       OURS[label][0] == INT8)}
                cfgs = (((64, 16, 4, 3), (64, 16, 4, 4), (128, 16, 4, 3), (64, 32, 4, 3))
                        if t <= 64 else ((64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)))
                for cfg in cfgs:
                    mk.pick_config = lambda *a, cfg=cfg, **kw: cfg
                    try:
                        res[str(cfg)] = round(timer.time_us(
                            lambda: kern.apply(layer, x, tw, ti, None, False)), 2)
                    except Exception as exc:
                        res[str(cfg)] = f"ERR {type(exc).__name__}: {str(exc)[-200:]}"
                    finally:
                        mk.pick_config = orig
                log(json.dumps(res))


def cuda_parts(timer, kern, layer, x, tw, ti):
    """Each launch of the CUDA decode path alone (quantize x, GEMM1, GEMM2), in us, at the
    default plan. With a dynamic intermediate scale GEMM1 writes float32 h and its amaxes; fused
    into GEMM2 (``fuse_h_quantization``), GEMM2 quantizes h itself; otherwise the quantization
    launch between them is not timed."""
    from w4a8_backend.kernels import _cuda_ext
    from w4a8_backend.kernels.sm90_triton import cuda_quantize
    from w4a8_backend.kernels.sm90_triton_moe import _cuda_weights

    cfg = kern.config
    lib = _cuda_ext.load(90)
    act_int8 = cfg.act_dtype == INT8
    e, h, i, ip, hp = kern.dims
    t, top_k = ti.shape
    s1 = layer.w13_input_scale.float().reshape(1) if cfg.w13_scheme == S else None
    w13, w2 = _cuda_weights(kern._weights(layer, "w13")), _cuda_weights(kern._weights(layer, "w2"))
    q1, xs1 = cuda_quantize(lib, x, act_int8, int(cfg.w13_scheme), s1)
    out = torch.empty((t, h), dtype=torch.bfloat16, device="cuda")
    plan2 = mc.gemm2_plan(lib, 0, t, top_k, h, i, act_int8, cfg.w2_scheme == S,
                          w2.corr_blocks.numel() > 0)
    fused = plan2.fused_h
    common = dict(num_experts=e, act_int8=act_int8, pdl=True)
    q_dtype = torch.int8 if act_int8 else torch.float8_e4m3fn
    static = cfg.w2_scheme == S
    h_scale = layer.w2_input_scale.float().reshape(1) if static else None
    h_out = torch.empty((t * top_k, i), dtype=q_dtype if static else torch.float32,
                        device="cuda")
    # GEMM1's amaxes: for GEMM2 when fused, else for the quantization launch (not timed here)
    amax = (torch.empty((t * top_k, -(-i // 8)), dtype=torch.float32, device="cuda")
            if not static else None)
    g1 = lambda: lib.moe_gemm(q1, xs1, w13, ti, None, None, h_scale, h_out, gated=True,  # noqa
                              k=h, rows_per_expert=2 * ip, up_offset=ip, n_out=i,
                              a_per_row=cfg.w13_scheme == P, warps=mc.GEMM1_CONFIG[0],
                              stages=mc.GEMM1_CONFIG[1], amax=amax, **common)
    g1()  # GEMM2 reads a real h
    a2, s2 = h_out, h_scale
    if not static and not fused:  # bytes from the quantization launch of h (not timed here)
        a2 = torch.zeros((t * top_k, i), dtype=q_dtype, device="cuda")
        s2 = torch.ones(t * top_k if cfg.w2_scheme == P else 1, device="cuda")
    g2 = lambda: lib.moe_gemm(a2, s2, w2, ti, None, tw, None, out, gated=False,  # noqa
                              k=i, rows_per_expert=hp, up_offset=0, n_out=h,
                              a_per_row=cfg.w2_scheme == P, warps=plan2.warps,
                              stages=plan2.stages, stage_a=plan2.staged,
                              amax=amax if fused else None, **common)
    return {"quant_x": round(timer.time_us(
                lambda: cuda_quantize(lib, x, act_int8, int(cfg.w13_scheme), s1)), 2),
            "gemm1": round(timer.time_us(g1), 2), "gemm2": round(timer.time_us(g2), 2),
            "gemm2_config": [plan2.warps, plan2.stages]}


def cuda_sweep(timer, log, tokens=(1, 2, 4, 8)):
    """The CUDA decode path against the Triton kernels on the same layer: GEMM2's configs, each
    launch alone, and the weight bytes the layer reads (the data for MAX_TOKENS and
    gemm2_config)."""
    # GEMM1's configs with GEMM2's default rule, then GEMM2's with GEMM1's default
    # (instantiated configs only; (4, 3), (4, 4), (8, 3), (16, 3) were measured slower on an
    # H100, benchmarks/results/moe_cuda_sweep_configs_h100_20261123.jsonl, and removed)
    combos = [(c1, None) for c1 in ((4, 2), (8, 2))]
    combos += [(mc.GEMM1_CONFIG, c2) for c2 in ((8, 2), (16, 2))]
    saved = mc.MAX_TOKENS, mc.GEMM1_CONFIG, mc.GEMM2_CONFIG, mc.MAX_PAIR_FRACTION
    mc.MAX_TOKENS, mc.MAX_PAIR_FRACTION = max(tokens), float("inf")
    try:
        for name, m in MODELS.items():
            weights = make_moe_weights(m, seed=len(name))
            x_cal = torch.randn(64, m["hidden"], device="cuda").to(torch.bfloat16)
            for label in ("ours FP8 static", "ours INT8 per-token"):
                kern, layer = our_layer(weights, m, *OURS[label], x_cal, routing(64, m, 1))
                for t in tokens:
                    x = torch.randn(t, m["hidden"], device="cuda").to(torch.bfloat16)
                    tw, ti = routing(t, m, 100 + t)
                    fp4_b, _ = bytes_touched(ti, m)
                    res = {"model": name, "variant": label, "T": t,
                           "weights_MB": round(fp4_b / 1e6, 2),
                           "triton": round(timer.time_us(
                               lambda: triton_path(kern, layer, x, tw, ti)), 2)}
                    ref = triton_path(kern, layer, x, tw, ti).float()
                    res["cuda default"] = round(timer.time_us(
                        lambda: kern.apply(layer, x, tw, ti, None, False)), 2)
                    res.update(cuda_parts(timer, kern, layer, x, tw, ti))
                    for c1, c2 in combos:
                        mc.GEMM1_CONFIG, mc.GEMM2_CONFIG = c1, c2
                        key = f"{c1} {c2 or 'rule'}"
                        try:
                            y = kern.apply(layer, x, tw, ti, None, False).float()
                            res[key] = round(timer.time_us(
                                lambda: kern.apply(layer, x, tw, ti, None, False)), 2)
                            res["diff " + key] = round(
                                ((y - ref).norm() / ref.norm()).item(), 5)
                        except Exception as exc:
                            res[key] = f"ERR {type(exc).__name__}: {exc}"
                        finally:
                            mc.GEMM1_CONFIG, mc.GEMM2_CONFIG = saved[1:3]
                    log(json.dumps(res))
    finally:
        mc.MAX_TOKENS, mc.GEMM1_CONFIG, mc.GEMM2_CONFIG, mc.MAX_PAIR_FRACTION = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default=None,
                    help=f"comma-separated token counts (default {','.join(map(str, TOKENS))}; "
                    "with --cuda-sweep 1,2,4,8)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-humming", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time Triton tile configs only")
    ap.add_argument("--cuda-sweep", action="store_true",
                    help="time the CUDA decode path's launch configs against Triton only")
    ap.add_argument("--log", default=None, help="also append log lines to this file")
    ap.add_argument("--repeat", type=int, default=3,
                    help="samples per column, taken round robin; the table shows medians")
    args = ap.parse_args(argv)
    log = make_logger(args.log)

    torch.backends.cuda.matmul.allow_tf32 = False
    timer = Timer()
    if args.sweep:
        sweep(timer, log)
        return
    if args.cuda_sweep:
        cuda_sweep(timer, log, *([tuple(int(v) for v in args.tokens.split(","))]
                                 if args.tokens else []))
        return
    args.tokens = args.tokens or ",".join(map(str, TOKENS))
    meta = run_metadata()
    meta["repeat"] = args.repeat
    fused_experts = None
    if not args.no_vllm:
        try:
            t0 = time.time()
            fused_experts = vllm_fused_experts()
            import vllm

            meta["vllm"] = vllm.__version__
            log(f"# vLLM {vllm.__version__} imported in {time.time() - t0:.1f}s")
        except Exception as exc:
            log(f"# vLLM fused_experts not importable ({type(exc).__name__}: {exc}); "
                "baseline is the Triton BF16 grouped kernel only")
    use_humming = not args.no_humming
    if use_humming:
        try:
            import humming  # noqa: F401
            from vllm.model_executor.layers.fused_moe.moe_align_block_size import (  # noqa: F401
                moe_align_block_size,
            )

            meta["humming"] = getattr(humming, "__version__", "?")
        except Exception as exc:
            log(f"# Humming MoE baseline left out: needs humming and vLLM's moe_align_block_size "
                f"({type(exc).__name__}: {exc})")
            use_humming = False
    log(json.dumps(meta))
    tokens = [int(v) for v in args.tokens.split(",")]
    rows = []
    for name in args.models.split(","):
        rows += bench_model(timer, name, MODELS[name], tokens, fused_experts, log, args.repeat,
                            use_humming)
        write_report(rows, Path(args.out), meta)
    print(write_report(rows, Path(args.out), meta))


if __name__ == "__main__":
    main()
