"""Reading a checkpoint's quantization config (pure Python, no vLLM imports).

ModelOpt writes the same facts in two layouts (DESIGN.md §2):
- ``config.json["quantization_config"]``: flat, ``{"quant_method": "modelopt", "quant_algo": ...,
  "ignore": [...], "kv_cache_scheme": {...}}``;
- ``hf_quant_config.json``: nested, ``{"producer": ..., "quantization": {"quant_algo": ...,
  "kv_cache_quant_algo": ..., "group_size": 32, "exclude_modules": [...]}}``.
vLLM hands either dict to ``from_config``; both parse to one :class:`CheckpointQuantSpec`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..formats import (
    BLOCK_SIZE,
    VOCAB_LAYERS,
    VOCAB_LAYERS_KEY,
    ActivationDtype,
    ActivationScheme,
    QuantAlgo,
)

ACTIVATIONS_ENV = "W4A8_MXFP4_ACTIVATIONS"  # fp8 | int8: override the checkpoint's activations
DYNAMIC_SCHEME_ENV = "W4A8_MXFP4_DYNAMIC_SCHEME"  # per_tensor | per_token


@dataclasses.dataclass(frozen=True)
class CheckpointQuantSpec:
    quant_algo: QuantAlgo
    exclude_modules: tuple[str, ...] = ()
    kv_cache_quant_algo: str | None = None  # None or "FP8"
    group_size: int = BLOCK_SIZE
    vocab_layers: frozenset = frozenset()  # subset of VOCAB_LAYERS

    @property
    def checkpoint_activation(self) -> ActivationDtype:
        return (
            ActivationDtype.INT8
            if self.quant_algo == QuantAlgo.W4A8_MXFP4_INT8
            else ActivationDtype.FP8_E4M3
        )


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"w4a8_mxfp4 quantization config: {message}")


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    _expect(
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(v, str) for v in value),
        f"{key!r} must be a list of module-name patterns, got {value!r}",
    )
    return tuple(value)


def extract_quant_algo(hf_quant_cfg: Any) -> str | None:
    """The upper-cased ``quant_algo`` of a ModelOpt-style config, or None if it has none."""
    if not isinstance(hf_quant_cfg, Mapping):
        return None
    section = hf_quant_cfg.get("quantization", hf_quant_cfg)
    if not isinstance(section, Mapping):
        return None
    algo = section.get("quant_algo")
    return algo.upper() if isinstance(algo, str) else None


def parse_quant_config(config: Any) -> CheckpointQuantSpec:
    """Parse either ModelOpt layout; every problem is a ``ValueError`` naming the key."""
    _expect(isinstance(config, Mapping), f"expected a JSON object, got {type(config).__name__}")
    if "quantization" in config:
        section = config["quantization"]
        _expect(isinstance(section, Mapping), f"'quantization' must be an object, got {section!r}")
    else:
        section = config
    algo = section.get("quant_algo")
    _expect(
        isinstance(algo, str),
        f"'quant_algo' must be one of {[m.name for m in QuantAlgo]}, got {algo!r}",
    )
    quant_algo = QuantAlgo.from_string(algo)

    group_size = section.get("group_size", BLOCK_SIZE)
    _expect(
        group_size == BLOCK_SIZE and not isinstance(group_size, bool),
        f"'group_size' must be {BLOCK_SIZE} for MXFP4, got {group_size!r}",
    )

    excludes = _string_list(section.get("exclude_modules"), "exclude_modules")
    excludes += _string_list(section.get("ignore"), "ignore")

    kv_algo = section.get("kv_cache_quant_algo")
    scheme = section.get("kv_cache_scheme")
    if kv_algo is None and scheme is not None:
        _expect(isinstance(scheme, Mapping), f"'kv_cache_scheme' must be an object, got {scheme!r}")
        _expect(
            scheme.get("type") == "float" and scheme.get("num_bits") == 8,
            f"'kv_cache_scheme' must describe 8-bit float (FP8) scales, got {dict(scheme)!r}",
        )
        kv_algo = "FP8"
    _expect(
        kv_algo is None or (isinstance(kv_algo, str) and kv_algo.upper() == "FP8"),
        f"'kv_cache_quant_algo' must be null or 'FP8', got {kv_algo!r}",
    )
    vocab = _string_list(section.get(VOCAB_LAYERS_KEY), VOCAB_LAYERS_KEY)
    _expect(
        set(vocab) <= set(VOCAB_LAYERS),
        f"{VOCAB_LAYERS_KEY!r} may name {list(VOCAB_LAYERS)}, got {list(vocab)!r}",
    )
    return CheckpointQuantSpec(
        quant_algo=quant_algo,
        exclude_modules=tuple(dict.fromkeys(excludes)),
        kv_cache_quant_algo=kv_algo.upper() if kv_algo else None,
        group_size=BLOCK_SIZE,
        vocab_layers=frozenset(vocab),
    )


def activation_choice(
    spec: CheckpointQuantSpec, environ: Mapping[str, str] | None = None
) -> tuple[ActivationDtype, ActivationScheme | None]:
    """Activation dtype to serve with, and the dynamic scheme forced by the user (or None).

    ``W4A8_MXFP4_ACTIVATIONS=int8`` serves an FP8 checkpoint with INT8 activations (the MXFP4
    weights are the same); its calibrated FP8 ``input_scale`` (amax/448) becomes the INT8 scale
    amax/127. ``W4A8_MXFP4_DYNAMIC_SCHEME`` picks per-tensor or per-token dynamic scales for
    layers without an ``input_scale``.
    """
    environ = os.environ if environ is None else environ
    act = spec.checkpoint_activation
    if environ.get(ACTIVATIONS_ENV):
        act = ActivationDtype.from_string(environ[ACTIVATIONS_ENV])
    scheme = None
    if environ.get(DYNAMIC_SCHEME_ENV):
        scheme = ActivationScheme.from_string(environ[DYNAMIC_SCHEME_ENV])
        if scheme == ActivationScheme.STATIC_PER_TENSOR:
            raise ValueError(
                f"{DYNAMIC_SCHEME_ENV} must be 'per_tensor' or 'per_token' (static scales come "
                "from the checkpoint's input_scale tensors)"
            )
    return act, scheme


def module_matches(prefix: str, patterns: Sequence[str]) -> bool:
    """ModelOpt exclude semantics: exact name, wildcard (fnmatch), or a parent module's name."""
    for pattern in patterns:
        if prefix == pattern or fnmatch.fnmatchcase(prefix, pattern):
            return True
        if prefix.startswith(pattern + "."):
            return True
        # ModelOpt writes "a.b*" meaning the module a.b and everything under it.
        if pattern.endswith("*") and not pattern.endswith(".*"):
            stem = pattern[:-1]
            if prefix == stem or fnmatch.fnmatchcase(prefix, stem + ".*"):
                return True
    return False


def is_excluded(
    prefix: str, patterns: Sequence[str], packed_modules_mapping: Mapping[str, Sequence[str]]
) -> bool:
    """Whether the layer at ``prefix`` stays unquantized.

    A fused layer (``qkv_proj`` made of ``q_proj/k_proj/v_proj``) is excluded when all of its
    checkpoint parts are; a partial exclusion cannot be served and is an error.
    """
    if not patterns:
        return False
    parent, _, name = prefix.rpartition(".")
    parts = packed_modules_mapping.get(name)
    if not parts:
        return module_matches(prefix, patterns)
    part_prefixes = [f"{parent}.{p}" if parent else p for p in parts]
    excluded = [module_matches(p, patterns) or module_matches(prefix, patterns) for p in part_prefixes]
    if all(excluded):
        return True
    if any(excluded):
        raise ValueError(
            f"w4a8_mxfp4: the fused layer {prefix!r} is made of {part_prefixes}, but the "
            f"checkpoint's exclude list {list(patterns)} excludes only "
            f"{[p for p, e in zip(part_prefixes, excluded) if e]}; all parts of a fused layer must "
            "be quantized alike"
        )
    return False
