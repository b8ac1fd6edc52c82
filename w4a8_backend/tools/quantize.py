"""``w4a8-quantize``: export a BF16/FP16/FP32 Hugging Face model to W4A8 MXFP4 (FP8 or INT8 activations).

The output is a ModelOpt 0.47 style checkpoint (``hf_quant_config.json`` plus
``config.json["quantization_config"]``, per-linear ``weight`` / ``weight_scale`` / optional
``input_scale``, optional ``k_scale`` / ``v_scale``). Weights are encoded with
:func:`w4a8_backend.formats.quantize_mxfp4`, which reproduces ModelOpt's bytes exactly.

Usage::

    w4a8-quantize SRC_DIR OUT_DIR --activations fp8|int8 [--calibration static|dynamic]
                  [--calib-file F] [--exclude PATTERN ...] [--shard-size 5GB] [--kv-cache-fp8]
                  [--quantize-vocab lm_head embed_tokens]

or from Python: :func:`quantize_checkpoint`.

Memory
------
Weights are streamed: every output tensor's name, dtype and shape is planned from the source
headers first, each shard's safetensors header is written up front, then each tensor is read in
row chunks of about 256K elements (the source file is opened per chunk, so no memory map
lingers), encoded and appended to the shard as it comes; only a tensor's E8M0 scales (1/16 of
its bf16 size) wait until its packed data is written. Peak memory is therefore bounded by a
small fraction of the largest tensor plus a constant working set, whatever the model size and
shard size (``benchmarks/bench_export_memory.py`` measures it; with ``--encode-device cuda``
the chunks are 16M elements, 32 MB of bf16, on both sides). This bound holds for
``--calibration dynamic`` (the default) without ``--kv-cache-fp8``.
Static calibration (and FP8 KV-cache scales) must run the model: the BF16 model is loaded once
with transformers on the CPU, run over the calibration text, and freed before the weights are
streamed, so the peak is then about the model size.

Floor 1: only ``w4a8_backend.formats`` plus torch, safetensors, transformers and tqdm; no vLLM.
"""

from __future__ import annotations

import argparse
import bisect
import fnmatch
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from w4a8_backend import __version__
from w4a8_backend.formats import (
    BLOCK_SIZE,
    FP8_E4M3_MAX,
    INT8_MAX,
    VOCAB_LAYERS,
    VOCAB_LAYERS_KEY,
    quantize_mxfp4,
)

TOOL_NAME = "w4a8-quantize"
DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_CALIB_MAX_LENGTH = 512
BUILTIN_CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"

QUANT_ALGOS = {"fp8": "W4A8_MXFP4_FP8", "int8": "W4A8_MXFP4_INT8"}
QMAX = {"fp8": FP8_E4M3_MAX, "int8": INT8_MAX}
KV_QMAX = FP8_E4M3_MAX

# Files in SRC that hold weights in other formats: never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {"config.json", "hf_quant_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"}

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4,
                "I64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_WEIGHT_DTYPES = ("BF16", "F16", "F32")


class QuantizeError(Exception):
    """A user-facing error: printed as one line by the CLI, which then exits non-zero."""


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchSpec:
    """How one model family names its linears on disk and in transformers' memory layout."""

    linear_leaves: frozenset
    # Per-expert leaves on disk -> role of the fused in-memory projection they belong to.
    expert_leaves: dict = field(default_factory=dict)
    # Module name of the MoE block on disk (hub layout) and in memory (transformers >= 5).
    disk_moe_block: str = "mlp"
    memory_moe_block: str = "mlp"
    # Leaf of the MoE router under the MoE block (kept in high precision, like ModelOpt).
    router: str | None = None
    # Name of the list that holds the numbered blocks: ``model.layers.N`` (decoders) or
    # ``encoder.layer.N`` (BERT).
    layer_container: str = "layers"
    # Linears outside the numbered blocks that ModelOpt quantizes too (BERT's ``pooler.dense``).
    extra_linears: frozenset = frozenset()
    # Source tensors that ModelOpt's export leaves out (buffers transformers >= 5 does not save).
    dropped: frozenset = frozenset()
    # The ``transformers`` auto class that loads the checkpoint for calibration.
    auto_class: str = "AutoModelForCausalLM"
    # ``config.json`` architectures this spec is verified for (None: any).
    architectures: frozenset | None = None
    # Whether vLLM keeps a KV cache for the model (encoder-only models have none).
    has_kv_cache: bool = True
    # Whether the model has an lm_head (tied word embeddings then add "lm_head" to the excludes).
    has_lm_head: bool = True

    @property
    def layer_re(self) -> re.Pattern:
        return re.compile(rf"^(?P<layer>.*\.{re.escape(self.layer_container)}\.\d+)\.(?P<rest>.+)$")


_DENSE_LEAVES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"})
_QWEN_EXPERTS = {"gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(_DENSE_LEAVES),
    "mistral": ArchSpec(_DENSE_LEAVES),
    "qwen2": ArchSpec(_DENSE_LEAVES),
    "qwen3": ArchSpec(_DENSE_LEAVES),
    "qwen3_moe": ArchSpec(_DENSE_LEAVES, _QWEN_EXPERTS, router="gate"),
    "mixtral": ArchSpec(
        _DENSE_LEAVES,
        {"w1": "gate_up", "w3": "gate_up", "w2": "down"},
        disk_moe_block="block_sparse_moe",
        router="gate",
    ),
    # BERT encoders (sentence-embedding backbones such as all-MiniLM-L6-v2). ModelOpt 0.47's
    # W4A8_MXFP4_FP8 preset quantizes every linear of the encoder layers and pooler.dense, and
    # leaves the embeddings (exclude_modules ["embeddings*"]); checked on the real MiniLM weights.
    "bert": ArchSpec(
        frozenset({"query", "key", "value", "dense"}),
        layer_container="layer",
        extra_linears=frozenset({"pooler.dense"}),
        dropped=frozenset({"embeddings.position_ids"}),
        auto_class="AutoModel",
        architectures=frozenset({"BertModel"}),
        has_kv_cache=False,
        has_lm_head=False,
    ),
}

FUSED_SPLIT_LEAVES = ("gate_proj", "up_proj", "down_proj")

_EXPERT_RE = re.compile(r"^(?P<experts>.*\.experts)\.(?P<idx>\d+)\.(?P<leaf>\w+)$")
_FUSED_RE = re.compile(r"^(?P<experts>.*\.experts)\.(?P<leaf>gate_up_proj|down_proj)$")


# ---------------------------------------------------------------------------------------------
# Planning: every output tensor is known (name, dtype, shape) before anything is computed
# ---------------------------------------------------------------------------------------------

@dataclass
class OutSpec:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_ITEMSIZE[self.dtype]


# Rows are read and encoded in chunks of about this many elements, so the working set of a job
# does not grow with the tensor (row-wise encoding gives the same bytes as one call). An
# accelerator gets larger chunks: per-chunk launch and transfer overheads dominate otherwise.
CHUNK_ELEMENTS = 1 << 18
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Job:
    """One unit of streaming work: read a source tensor (or one expert of it), emit ``outputs``.

    ``pieces(reader, scales, device)`` yields ``(output_index, tensor)`` in file order: all pieces of
    output 0 (row chunks, concatenated in the file), then output 1, and so on.
    """

    outputs: list
    pieces: Callable  # (reader, scales) -> Iterator[tuple[int, torch.Tensor]]
    src_bytes: int = 0
    quantized: int = 0  # number of linears quantized by this job

    @property
    def out_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass
class Plan:
    jobs: list
    quantized_modules: list  # disk module names of quantized linears
    excluded_modules: list  # disk module names kept in high precision
    # disk module name of a quantized linear -> calibration key (memory module name, role)
    input_keys: dict
    attention_modules: list  # disk names of attention modules (for k/v scales)
    src_bytes: int


class _SourceReader:
    """Reads row chunks of SRC tensors through ``safe_open``.

    The file is opened (memory-mapped) anew for every chunk and closed right after, so the pages
    a chunk touched leave this process's resident set with it: reading a tensor never keeps more
    than one chunk of it mapped.
    """

    def __init__(self, weight_map: dict[str, Path]):
        self.weight_map = weight_map

    def rows(self, name: str, index: int | None, start: int, stop: int, step_elements: int):
        """Yield ``tensor[index][start:stop]`` (or ``tensor[start:stop]``) in row chunks."""
        from safetensors import safe_open

        path = str(self.weight_map[name])
        with safe_open(path, framework="pt") as f:
            shape = f.get_slice(name).get_shape()
            if len(shape) == 0:
                yield f.get_tensor(name)
                return
        row_elems = math.prod(shape[2:] if index is not None else shape[1:]) or 1
        step = max(1, step_elements // row_elems)
        for r in range(start, stop, step):
            r1 = min(stop, r + step)
            with safe_open(path, framework="pt") as f:
                sl = f.get_slice(name)
                chunk = (sl[index, r:r1] if index is not None else sl[r:r1]).clone()
            yield chunk


def _read_source_layout(src: Path) -> tuple[dict, dict]:
    """``(weight_map name -> file, meta name -> (dtype str, shape))`` from the safetensors headers."""
    from safetensors import safe_open

    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise QuantizeError(f"{index_path} is not a valid safetensors index: {exc}") from None
        files = {name: src / fname for name, fname in weight_map.items()}
    else:
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            others = sorted(p.name for p in src.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
            hint = f" (found {', '.join(others)}; convert it to safetensors first)" if others else ""
            raise QuantizeError(f"no safetensors weights in {src}{hint}")
        files = {}
        for shard in shards:
            for name in _safetensors_keys(shard):
                files[name] = shard
    meta: dict[str, tuple[str, tuple]] = {}
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise QuantizeError(f"safetensors shard {path} listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    meta[name] = (sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as exc:  # safetensors raises its own error types
            raise QuantizeError(f"cannot read {path} as safetensors: {exc}") from None
    missing = [n for n in files if n not in meta]
    if missing:
        raise QuantizeError(f"tensor {missing[0]} listed in the index is not in {files[missing[0]]}")
    return {n: files[n] for n in meta}, meta


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:
        raise QuantizeError(f"cannot read {path} as safetensors: {exc}") from None


def _check_linear(name: str, dtype: str, shape: Sequence[int]) -> None:
    if dtype not in _FLOAT_WEIGHT_DTYPES:
        raise QuantizeError(
            f"{name} has dtype {dtype}; w4a8-quantize reads BF16/F16/F32 weights "
            "(is the model already quantized?)"
        )
    if shape[-1] % BLOCK_SIZE:
        raise QuantizeError(
            f"{name}: in_features {shape[-1]} is not a multiple of {BLOCK_SIZE} (MXFP4 block "
            "size); keep it in high precision with --exclude"
        )


def _matches(module: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def _memory_name(spec: ArchSpec, disk_module: str) -> str:
    if spec.disk_moe_block != spec.memory_moe_block:
        return disk_module.replace(f".{spec.disk_moe_block}.", f".{spec.memory_moe_block}.")
    return disk_module


def _encode_chunk(chunk: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_mxfp4` on ``device``; the bytes come back to the CPU."""
    if device.type == "cpu":
        return quantize_mxfp4(chunk)
    packed, scale = quantize_mxfp4(chunk.to(device))
    return packed.cpu(), scale.cpu()


def _quantize_job(src_name: str, module: str, dtype: str, shape: tuple, with_input_scale: bool,
                  input_key, index: int | None = None, rows: tuple | None = None) -> Job:
    """Job emitting ``module.weight`` / ``.weight_scale`` (/ ``.input_scale``) from one 2-D weight.

    ``index`` selects one expert of a 3-D tensor; ``rows`` a row range of it (used to split a
    fused gate/up tensor). The weight is read and encoded in row chunks; its packed bytes go to
    the file as they come, the E8M0 scales (1/16 of the bf16 size) are kept until the end.
    """
    out_rows, k = shape
    outputs = [OutSpec(f"{module}.weight", "U8", (out_rows, k // 2)),
               OutSpec(f"{module}.weight_scale", "U8", (out_rows, k // BLOCK_SIZE))]
    if with_input_scale:
        outputs.append(OutSpec(f"{module}.input_scale", "F32", ()))
    start, stop = rows if rows is not None else (0, out_rows)

    def pieces(reader: _SourceReader, scales: dict, device: torch.device):
        # One allocation for all scales (many small pieces interleaved with the encoder's large
        # temporaries would fragment the heap and keep it from shrinking).
        block_scales = torch.empty((out_rows, k // BLOCK_SIZE), dtype=torch.uint8)
        row = 0
        step = CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
        for chunk in reader.rows(src_name, index, start, stop, step):
            try:
                packed, scale = _encode_chunk(chunk, device)
            except ValueError as exc:
                where = f"{src_name}" + (f" (expert {index})" if index is not None else "")
                raise QuantizeError(f"{where}, rows {start + row}..{start + row + chunk.shape[0] - 1}: "
                                    f"{exc}") from None
            block_scales[row:row + scale.shape[0]] = scale
            row += scale.shape[0]
            del scale
            yield 0, packed
        yield 1, block_scales
        if with_input_scale:
            yield 2, scales[input_key].reshape(())

    src_bytes = out_rows * k * _ST_ITEMSIZE[dtype]
    return Job(outputs, pieces, src_bytes=src_bytes, quantized=1)


def _copy_job(name: str, dtype: str, shape: tuple) -> Job:
    spec = OutSpec(name, dtype, shape)

    def pieces(reader: _SourceReader, scales: dict, device: torch.device):
        for chunk in reader.rows(name, None, 0, shape[0] if shape else 1, CHUNK_ELEMENTS):
            yield 0, chunk

    return Job([spec], pieces, src_bytes=spec.nbytes)


def _scalar_job(name: str, key) -> Job:
    def pieces(reader: _SourceReader, scales: dict, device: torch.device):
        yield 0, scales[key].reshape(())

    return Job([OutSpec(name, "F32", ())], pieces)


def _vocab_layer(module: str, spec: ArchSpec) -> str | None:
    """Which of VOCAB_LAYERS a module outside the numbered blocks is, if any."""
    if module == "lm_head" and spec.has_lm_head:
        return "lm_head"
    if module.rsplit(".", 1)[-1] == "embed_tokens":
        return "embed_tokens"
    return None


def build_plan(meta: dict, spec: ArchSpec, excludes: Sequence[str], static_inputs: bool,
               kv_cache_fp8: bool, tie_word_embeddings: bool,
               quantize_vocab: Sequence[str] = ()) -> Plan:
    jobs: list[Job] = []
    quantized: list[str] = []
    excluded: list[str] = []
    input_keys: dict = {}
    attention: list[str] = []
    vocab_found: list[str] = []
    src_bytes = 0
    layer_re = spec.layer_re

    for name in sorted(meta):
        dtype, shape = meta[name]
        src_bytes += math.prod(shape) * _ST_ITEMSIZE.get(dtype, 1)
        if name in spec.dropped:
            continue
        layer = layer_re.match(name)
        fused = _FUSED_RE.match(name) if layer else None
        if fused and len(shape) == 3:
            experts = fused["experts"]
            n_exp = shape[0]
            mem_key = _memory_name(spec, experts)
            role = "gate_up" if fused["leaf"] == "gate_up_proj" else "down"
            # ModelOpt names split experts after transformers' in-memory modules, whatever the
            # architecture's hub names are (checked for Qwen3-MoE and Mixtral stored fused).
            gate_leaf, up_leaf, down_leaf = FUSED_SPLIT_LEAVES
            if role == "gate_up" and shape[1] % 2:
                raise QuantizeError(f"{name}: fused gate/up tensor has an odd row count {shape[1]}")
            for e in range(n_exp):
                if role == "gate_up":
                    half = shape[1] // 2
                    parts = [(gate_leaf, (0, half)), (up_leaf, (half, shape[1]))]
                else:
                    parts = [(down_leaf, None)]
                for leaf, rows in parts:
                    module = f"{experts}.{e}.{leaf}"
                    out_shape = (rows[1] - rows[0] if rows else shape[1], shape[2])
                    if _matches(module, excludes):
                        raise QuantizeError(
                            f"--exclude matches {module}, part of the fused tensor {name}; "
                            "excluding single experts of a fused tensor is not supported"
                        )
                    _check_linear(name, dtype, shape)
                    input_keys[module] = (mem_key, role)
                    quantized.append(module)
                    jobs.append(_quantize_job(name, module, dtype, out_shape, static_inputs,
                                              (mem_key, role), index=e, rows=rows))
            continue

        if not (name.endswith(".weight") and len(shape) == 2):
            jobs.append(_copy_job(name, dtype, shape))
            continue

        module = name[: -len(".weight")]
        vocab = _vocab_layer(module, spec) if layer is None else None
        if vocab in quantize_vocab:
            # Opt-in (--quantize-vocab): the head is a linear like any other (its input gets a
            # scale), the embedding has no input activation.
            _check_linear(name, dtype, shape)
            quantized.append(module)
            vocab_found.append(vocab)
            with_scale = static_inputs and vocab == "lm_head"
            if with_scale:
                input_keys[module] = (module, "linear")
            jobs.append(_quantize_job(name, module, dtype, shape, with_scale, (module, "linear")))
            continue
        if layer is None and module not in spec.extra_linears:
            # lm_head, embeddings and anything else outside the decoder layers stay as they are.
            excluded.append(module)
            jobs.append(_copy_job(name, dtype, shape))
            continue
        leaf = module.rsplit(".", 1)[-1]
        expert = _EXPERT_RE.match(module)
        is_router = spec.router is not None and any(
            module.endswith(f".{block}.{spec.router}")
            for block in (spec.disk_moe_block, spec.memory_moe_block))
        if is_router or _matches(module, excludes):
            excluded.append(module)
            jobs.append(_copy_job(name, dtype, shape))
            continue
        if expert and expert["leaf"] in spec.expert_leaves:
            key = (_memory_name(spec, expert["experts"]), spec.expert_leaves[expert["leaf"]])
        elif not expert and leaf in spec.linear_leaves:
            key = (_memory_name(spec, module), "linear")
        else:
            raise QuantizeError(
                f"{name}: 2-D weight of an unknown module kind for this architecture "
                "(not a known linear); keep it in high precision with --exclude"
            )
        _check_linear(name, dtype, shape)
        input_keys[module] = key
        quantized.append(module)
        jobs.append(_quantize_job(name, module, dtype, shape, static_inputs, key))
        if leaf == "k_proj" and module.endswith(".self_attn.k_proj"):
            attention.append(module[: -len(".k_proj")])

    if kv_cache_fp8:
        if not attention:
            raise QuantizeError("--kv-cache-fp8: no self_attn.k_proj layers found")
        for attn in attention:
            mem = _memory_name(spec, attn)
            jobs.append(_scalar_job(f"{attn}.k_proj.k_scale", (mem, "k")))
            jobs.append(_scalar_job(f"{attn}.v_proj.v_scale", (mem, "v")))

    missing = sorted(set(quantize_vocab) - set(vocab_found))
    if missing:
        raise QuantizeError(f"--quantize-vocab {' '.join(missing)}: the checkpoint has no such "
                            "2-D weight outside the decoder layers")
    if tie_word_embeddings and "lm_head" not in excluded:
        excluded.append("lm_head")
    if not quantized:
        raise QuantizeError("no linear layer to quantize (everything is excluded?)")
    return Plan(jobs, quantized, excluded, input_keys, attention, src_bytes)


def summarize_excludes(excluded: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """Shortest prefix patterns (cut at dots) that cover ``excluded`` and no quantized module.

    Same output convention as ModelOpt's ``exclude_modules``: a candidate is ``prefix*``,
    ``prefix.*`` or the exact name; a pattern is rejected if it could match a quantized name.
    """
    quantized = list(quantized)
    blocked: set[str] = set()
    for q in quantized:
        blocked.add(q)
        blocked.update(q[:i] + "*" for i in range(len(q) + 1))
    chosen: set[str] = set()
    for name in excluded:
        candidates: list[list[str]] = []
        for i, ch in enumerate(name):
            if ch == ".":
                candidates.append([name[:i] + "*"])
                candidates.append([name[:i], name[:i] + ".*"])
        candidates.append([name])
        for cand in candidates:
            if any(c in blocked for c in cand):
                continue
            if all(c in chosen for c in cand):
                break
            if len(cand) == 2:
                chosen.add(cand[1])  # "prefix.*" stands for the pair
            else:
                chosen.update(cand)
            break
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Calibration (static input scales and FP8 KV-cache scales)
# ---------------------------------------------------------------------------------------------

def load_calibration_texts(path: str | os.PathLike | None = None) -> list[str]:
    """Calibration samples: the paragraphs (blank-line separated) of ``path`` or the built-in text."""
    p = Path(path) if path is not None else BUILTIN_CALIBRATION
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"cannot read calibration file {p}: {exc}") from None
    samples = [s.strip() for s in re.split(r"\n\s*\n", text) if s.strip()]
    if not samples:
        raise QuantizeError(f"calibration file {p} has no text")
    return samples


def _force_eager_experts(config) -> None:
    """Run fused experts through their per-expert ``F.linear`` loop (as ModelOpt calibrates)."""
    seen = set()
    stack = [config]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        if hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
        for sub in ("text_config", "vision_config", "audio_config", "speech_config"):
            stack.append(getattr(cfg, sub, None))


def _usable_device(device: str, option: str) -> torch.device:
    try:
        torch_device = torch.device(device)
        torch.empty(0, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise QuantizeError(f"{option} {device!r} is not usable here: {exc}") from None
    return torch_device


def calibrate(src: Path, texts: Sequence[str], max_length: int, device: str = "cpu",
              auto_class: str = "AutoModelForCausalLM") -> dict:
    """Run the model on ``texts``; return amax per calibration key.

    Keys: ``(module, "linear")`` for each ``nn.Linear`` input, ``(experts, "gate_up")`` and
    ``(experts, "down")`` for fused expert modules (max over all experts, as ModelOpt shares one
    input quantizer per expert module), ``(attention, "k")`` / ``(attention, "v")`` for the key and
    value states handed to the attention function (after RoPE and any k-norm). Names are
    transformers' in-memory module names.
    """
    import transformers
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as exc:
        raise QuantizeError(f"static calibration needs the tokenizer in {src}: {exc}") from None
    torch_device = _usable_device(device, "--calib-device")
    model = getattr(transformers, auto_class).from_pretrained(src, dtype="auto").to(torch_device)
    model.eval()
    _force_eager_experts(model.config)

    amax: dict = {}

    def record(key, x: torch.Tensor) -> None:
        value = x.detach().abs().amax().float()
        prev = amax.get(key)
        amax[key] = value if prev is None else torch.maximum(prev, value)

    # Weight address ranges -> key, so that one F.linear wrapper sees every projection.
    ranges: list[tuple[int, int, tuple]] = []
    attention_names: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            ranges.append((w.data_ptr(), w.data_ptr() + w.numel() * w.element_size(),
                           (name, "linear")))
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.Tensor) and gate_up.ndim == 3 and isinstance(
                down, torch.Tensor) and down.ndim == 3:
            for role, p in (("gate_up", gate_up), ("down", down)):
                ranges.append((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(),
                               (name, role)))
        if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            attention_names[id(module)] = name
    ranges.sort()
    starts = [r[0] for r in ranges]

    original_linear = torch.nn.functional.linear

    def linear(input, weight, bias=None):  # noqa: A002 - F.linear's signature
        i = bisect.bisect_right(starts, weight.data_ptr()) - 1
        if i >= 0 and weight.data_ptr() < ranges[i][1]:
            record(ranges[i][2], input)
        return original_linear(input, weight, bias)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base_impl = model.config._attn_implementation or "eager"

    def attention(module, query, key, value, *args, **kwargs):
        name = attention_names.get(id(module))
        if name is not None:
            record((name, "k"), key)
            record((name, "v"), value)
        if base_impl == "eager":
            base = sys.modules[type(module).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[base_impl]
        return base(module, query, key, value, *args, **kwargs)

    calib_impl = "w4a8_calibration"
    transformers.AttentionInterface.register(calib_impl, attention)
    configs = [c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None]
    saved = [(c, c._attn_implementation) for c in configs]
    torch.nn.functional.linear = linear
    try:
        for c in configs:
            c._attn_implementation = calib_impl
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                if ids["input_ids"].numel() == 0:
                    continue
                model(input_ids=ids["input_ids"].to(torch_device))
    finally:
        torch.nn.functional.linear = original_linear
        for c, impl in saved:
            c._attn_implementation = impl
    del model
    return {key: value.cpu() for key, value in amax.items()}


def _scales_from_amax(plan: Plan, amax: dict, activations: str, static_inputs: bool,
                      kv_cache_fp8: bool, spec: ArchSpec) -> dict:
    scales: dict = {}
    needed = []
    if static_inputs:
        needed += [(key, QMAX[activations]) for key in set(plan.input_keys.values())]
    if kv_cache_fp8:
        for attn in plan.attention_modules:
            mem = _memory_name(spec, attn)
            needed += [((mem, "k"), KV_QMAX), ((mem, "v"), KV_QMAX)]
    for key, qmax in needed:
        value = amax.get(key)
        if value is None:
            raise QuantizeError(f"calibration never reached {key[0]} ({key[1]}): cannot set its scale")
        if not value.item() > 0 or not math.isfinite(value.item()):
            raise QuantizeError(f"calibration saw amax {value.item()} at {key[0]} ({key[1]})")
        scales[key] = (value.float() / qmax).reshape(())
    return scales


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000000"`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
    if not m:
        raise QuantizeError(f"invalid --shard-size {text!r} (examples: 5GB, 500MB, 2GiB)")
    unit = (m[2] or "B").rstrip("B") or ""
    factor = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m[1]) * factor)
    if size <= 0:
        raise QuantizeError(f"--shard-size must be positive, got {text!r}")
    return size


def _assign_shards(jobs: list[Job], shard_size: int) -> list[list[Job]]:
    shards: list[list[Job]] = [[]]
    current = 0
    for job in jobs:
        if shards[-1] and current + job.out_bytes > shard_size:
            shards.append([])
            current = 0
        shards[-1].append(job)
        current += job.out_bytes
    return shards


def _header_bytes(outputs: list[OutSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for o in outputs:
        header[o.name] = {"dtype": o.dtype, "shape": list(o.shape),
                          "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _piece_bytes(t: torch.Tensor, spec: OutSpec) -> memoryview:
    expected = _ST_DTYPES[spec.dtype]
    if t.dtype != expected or tuple(t.shape[1:]) != tuple(spec.shape[1:]):
        raise RuntimeError(
            f"internal error: piece of {spec.name} is {t.dtype} {tuple(t.shape)}, planned "
            f"{expected} {tuple(spec.shape)}"
        )
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _write_shards(shards: list[list[Job]], out: Path, reader: _SourceReader, scales: dict,
                  device: torch.device, progress) -> tuple[dict, int]:
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, jobs in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        outputs = [o for job in jobs for o in job.outputs]
        with open(out / fname, "wb") as f:
            f.write(_header_bytes(outputs))
            for job in jobs:
                written = [0] * len(job.outputs)
                current = 0
                for idx, piece in job.pieces(reader, scales, device):
                    if idx < current or any(written[j] != job.outputs[j].nbytes
                                            for j in range(current, idx)):
                        raise RuntimeError(f"internal error: {job.outputs[idx].name} out of order")
                    current = idx
                    data = _piece_bytes(piece, job.outputs[idx])
                    f.write(data)
                    written[idx] += data.nbytes
                for spec, nbytes in zip(job.outputs, written, strict=True):
                    if nbytes != spec.nbytes:
                        raise RuntimeError(f"internal error: wrote {nbytes} bytes of {spec.name}, "
                                           f"planned {spec.nbytes}")
                    weight_map[spec.name] = fname
                    total += nbytes
                progress.update(job.src_bytes or job.out_bytes)
    return weight_map, total


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if p.name in _NOT_COPIED or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.startswith("."):
            continue
        if p.is_file():
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
        elif p.is_dir():
            shutil.copytree(p, out / p.name)
            copied.append(p.name + "/")
    return copied


def _quant_configs(quant_algo: str, excludes: list[str], kv_cache_fp8: bool,
                   vocab_layers: Sequence[str] = ()) -> tuple[dict, dict]:
    producer = {"name": TOOL_NAME, "version": __version__}
    hf_quant = {
        "producer": producer,
        "quantization": {
            "quant_algo": quant_algo,
            "kv_cache_quant_algo": "FP8" if kv_cache_fp8 else None,
            "group_size": BLOCK_SIZE,
            "exclude_modules": excludes,
        },
    }
    flat: dict = {"ignore": excludes, "quant_algo": quant_algo}
    if vocab_layers:
        hf_quant["quantization"][VOCAB_LAYERS_KEY] = sorted(vocab_layers)
        flat[VOCAB_LAYERS_KEY] = sorted(vocab_layers)
    if kv_cache_fp8:
        flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    flat["producer"] = producer
    flat["quant_method"] = "modelopt"
    return hf_quant, flat


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"output directory {out} already exists and is not empty")
    if not out.parent.is_dir():
        raise QuantizeError(f"parent directory of {out} does not exist")


def _load_config(src: Path) -> dict:
    if not src.exists():
        raise QuantizeError(f"source directory {src} does not exist")
    if not src.is_dir():
        raise QuantizeError(f"source {src} is not a directory")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise QuantizeError(f"{src} has no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise QuantizeError(f"{cfg_path} is not valid JSON: {exc}") from None


def quantize_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    activations: str = "fp8",
    calibration: str = "dynamic",
    calib_file: str | os.PathLike | None = None,
    exclude: Sequence[str] = (),
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    kv_cache_fp8: bool = False,
    calib_max_length: int = DEFAULT_CALIB_MAX_LENGTH,
    calib_device: str = "cpu",
    encode_device: str = "cpu",
    progress: bool = True,
    quantize_vocab: Sequence[str] = (),
) -> dict:
    """Export ``src_dir`` (HF safetensors model) to W4A8 MXFP4 in ``out_dir``; return a summary.

    ``activations``: ``"fp8"`` (``W4A8_MXFP4_FP8``, ModelOpt's format) or ``"int8"``
    (``W4A8_MXFP4_INT8``, this project's format). ``calibration="static"`` writes per-tensor
    ``input_scale`` = amax / 448 (FP8) or amax / 127 (INT8) measured on the calibration text;
    ``"dynamic"`` writes none (the engine computes scales at run time). ``kv_cache_fp8`` adds
    ``k_scale`` / ``v_scale`` = amax / 448 (this runs the calibration text through the model even
    in dynamic mode). ``calib_device`` runs that calibration forward on another torch device
    (e.g. ``"cuda"`` for large models). ``encode_device`` runs the MXFP4 encoding there (much
    faster for large models); the bytes equal the CPU's for BF16 and FP16 weights (every possible block maximum is compared in ``tests/gpu/test_encode_device.py``).
    Raises :class:`QuantizeError` on bad input; nothing is left in ``out_dir`` then.
    """
    from tqdm.auto import tqdm

    src, out = Path(src_dir), Path(out_dir)
    if activations not in QUANT_ALGOS:
        raise QuantizeError(f"--activations must be one of {sorted(QUANT_ALGOS)}, got {activations!r}")
    if calibration not in ("static", "dynamic"):
        raise QuantizeError(f"--calibration must be 'static' or 'dynamic', got {calibration!r}")
    config = _load_config(src)
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise QuantizeError(f"{src} is already quantized (quant_method {method!r})")
    model_type = config.get("model_type")
    arch = (config.get("architectures") or ["?"])[0]
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise QuantizeError(
            f"unsupported architecture {arch} (model_type {model_type!r}); supported model "
            f"types: {', '.join(sorted(ARCHITECTURES))}"
        )
    if spec.architectures is not None and arch not in spec.architectures:
        raise QuantizeError(
            f"unsupported architecture {arch} (model_type {model_type!r}): for this model type "
            f"only {', '.join(sorted(spec.architectures))} is supported"
        )
    if kv_cache_fp8 and not spec.has_kv_cache:
        raise QuantizeError(
            f"--kv-cache-fp8: {arch} is an encoder-only model; vLLM keeps no KV cache for it"
        )
    weight_files, meta = _read_source_layout(src)
    size = parse_size(shard_size)
    device = _usable_device(encode_device, "--encode-device")
    _check_output(out)
    static_inputs = calibration == "static"
    tie = (spec.has_lm_head and bool(config.get("tie_word_embeddings", False))
           and "lm_head.weight" not in meta)
    unknown = sorted(set(quantize_vocab) - set(VOCAB_LAYERS))
    if unknown:
        raise QuantizeError(f"--quantize-vocab takes {' / '.join(VOCAB_LAYERS)}, got {unknown}")
    if quantize_vocab and (not spec.has_lm_head or config.get("tie_word_embeddings", False)):
        raise QuantizeError(
            f"--quantize-vocab: {arch} " + ("has no output head" if not spec.has_lm_head else
                                            "ties its output head to its input embedding")
            + "; quantized vocabulary layers are supported for untied decoder models only")
    plan = build_plan(meta, spec, list(exclude), static_inputs, kv_cache_fp8, tie,
                      quantize_vocab)
    excludes = summarize_excludes(plan.excluded_modules, plan.quantized_modules)
    texts = None
    if static_inputs or kv_cache_fp8:
        texts = load_calibration_texts(calib_file)
    elif calib_file is not None:
        raise QuantizeError("--calib-file needs --calibration static (or --kv-cache-fp8)")

    scales: dict = {}
    if texts is not None:
        amax = calibrate(src, texts, calib_max_length, calib_device, auto_class=spec.auto_class)
        scales = _scales_from_amax(plan, amax, activations, static_inputs, kv_cache_fp8, spec)

    quant_algo = QUANT_ALGOS[activations]
    shards = _assign_shards(plan.jobs, size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        reader = _SourceReader(weight_files)
        total_src = sum(j.src_bytes or j.out_bytes for j in plan.jobs)
        with tqdm(total=total_src, unit="B", unit_scale=True, desc=TOOL_NAME,
                  disable=not progress, file=sys.stderr) as bar:
            weight_map, total_out = _write_shards(shards, tmp, reader, scales, device, bar)
        index = {"metadata": {"total_size": total_out},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_quant, flat = _quant_configs(quant_algo, excludes, kv_cache_fp8, quantize_vocab)
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
        config["quantization_config"] = flat
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = _copy_side_files(src, tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    return {
        "out_dir": str(out),
        "quant_algo": quant_algo,
        "architecture": arch,
        "calibration": calibration,
        "kv_cache_fp8": kv_cache_fp8,
        "quantized_vocab_layers": sorted(quantize_vocab),
        "layers_quantized": len(plan.quantized_modules),
        "layers_excluded": len(plan.excluded_modules),
        "exclude_modules": excludes,
        "input_scales": sum(1 for o in (o for j in plan.jobs for o in j.outputs)
                            if o.name.endswith(".input_scale")),
        "kv_scales": 2 * len(plan.attention_modules) if kv_cache_fp8 else 0,
        "tensors_written": len(weight_map),
        "shards": len(shards),
        "bytes_before": plan.src_bytes,
        "bytes_after": total_out,
        "files_copied": copied,
    }


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def format_summary(s: dict) -> str:
    ratio = s["bytes_before"] / s["bytes_after"] if s["bytes_after"] else float("nan")
    lines = [
        f"{TOOL_NAME}: wrote {s['out_dir']} ({s['quant_algo']}, {s['architecture']})",
        f"  layers quantized: {s['layers_quantized']}   excluded (kept high precision): "
        f"{s['layers_excluded']}  -> exclude_modules {s['exclude_modules']}",
        f"  vocabulary layers as MXFP4: {s['quantized_vocab_layers'] or 'none'}",
        f"  calibration: {s['calibration']}   input_scale tensors: {s['input_scales']}   "
        f"FP8 KV-cache scales: {s['kv_scales']}",
        f"  tensors: {s['tensors_written']} in {s['shards']} shard(s)   bytes: "
        f"{_human(s['bytes_before'])} -> {_human(s['bytes_after'])} ({ratio:.2f}x smaller)",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=TOOL_NAME,
        description="Export a BF16/FP16/FP32 Hugging Face model (local safetensors) to W4A8 MXFP4 "
        "with FP8 or INT8 activations, in ModelOpt's checkpoint layout.",
    )
    p.add_argument("src_dir", metavar="SRC_DIR", help="local Hugging Face model directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--activations", required=True, choices=sorted(QUANT_ALGOS),
                   help="fp8: W4A8_MXFP4_FP8 (ModelOpt); int8: W4A8_MXFP4_INT8 (this project)")
    p.add_argument("--calibration", choices=("static", "dynamic"), default="dynamic",
                   help="static: run the model on calibration text and write input_scale; "
                   "dynamic (default): no input_scale, streaming with bounded memory")
    p.add_argument("--calib-file", metavar="F", default=None,
                   help="calibration text (paragraphs separated by blank lines); default: the "
                   "built-in text")
    p.add_argument("--calib-max-length", type=int, default=DEFAULT_CALIB_MAX_LENGTH,
                   help="tokens per calibration paragraph (default %(default)s)")
    p.add_argument("--calib-device", metavar="DEV", default="cpu",
                   help="torch device for the calibration forward (default cpu; e.g. cuda for "
                   "large models)")
    p.add_argument("--encode-device", metavar="DEV", default="cpu",
                   help="torch device for the MXFP4 encoding (default cpu; e.g. cuda for large "
                   "models: the same bytes for BF16/FP16 weights)")
    p.add_argument("--exclude", metavar="PATTERN", nargs="+", action="extend", default=[],
                   help="keep modules matching these shell patterns in high precision, e.g. "
                   "'model.layers.0.*' '*.down_proj' (lm_head, embeddings and MoE routers are, "
                   "unless --quantize-vocab; routers always)")
    p.add_argument("--quantize-vocab", nargs="+", choices=VOCAB_LAYERS, default=[],
                   metavar="LAYER",
                   help="also store these vocabulary layers as MXFP4: lm_head (served by the W4A8 "
                   "kernels; with --calibration static it gets an input_scale) and/or "
                   "embed_tokens (exact row decode). This project's extension of the ModelOpt "
                   "layout (quantized_vocab_layers in the config); untied models only")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                   help="maximum shard size (default %(default)s)")
    p.add_argument("--kv-cache-fp8", action="store_true",
                   help="also write FP8 KV-cache scales (k_scale, v_scale); runs calibration")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = quantize_checkpoint(
            args.src_dir, args.out_dir,
            activations=args.activations,
            calibration=args.calibration,
            calib_file=args.calib_file,
            exclude=args.exclude,
            shard_size=args.shard_size,
            kv_cache_fp8=args.kv_cache_fp8,
            calib_max_length=args.calib_max_length,
            calib_device=args.calib_device,
            encode_device=args.encode_device,
            progress=not args.no_progress,
            quantize_vocab=args.quantize_vocab,
        )
    except QuantizeError as exc:
        print(f"{TOOL_NAME}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{TOOL_NAME}: interrupted; nothing written", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
