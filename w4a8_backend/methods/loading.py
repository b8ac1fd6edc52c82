"""Checked weight loading: every checkpoint tensor is validated before vLLM copies it.

vLLM's parameter loaders only ``assert`` shapes. Here each parameter's loader is wrapped so a
wrong dtype or shape becomes a ``ValueError`` naming the checkpoint tensor, and each parameter
records which shards arrived, so a missing tensor is caught after loading instead of leaving
``torch.empty`` garbage in the layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

LOADED_ATTR = "w4a8_loaded_shards"


QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


def checkpoint_tensor_name(
    prefix: str, suffix: str, shard, packed_modules_mapping: dict[str, list[str]]
) -> str:
    """The checkpoint's name of one part of a (possibly fused) vLLM layer, e.g. the ``'q'`` shard
    of ``layers.0.self_attn.qkv_proj`` is ``layers.0.self_attn.q_proj``."""
    parent, _, name = prefix.rpartition(".")
    parts = packed_modules_mapping.get(name)
    if shard is None or not parts:
        return f"{prefix}.{suffix}"
    index = QKV_SHARDS.get(shard, shard) if isinstance(shard, str) else shard
    if not isinstance(index, int) or index >= len(parts):
        return f"{prefix}.{suffix} (shard {shard!r})"
    return f"{parent}.{parts[index]}.{suffix}" if parent else f"{parts[index]}.{suffix}"


def check_checkpoint_tensor(
    tensor: torch.Tensor,
    where: str,
    dtypes: Sequence[torch.dtype],
    trailing_dim: int | None,
    scalar: bool,
    ndims: Sequence[int],
) -> None:
    """Dtype and shape of one checkpoint tensor; a scalar must be finite and positive."""
    if tensor.dtype not in dtypes:
        raise ValueError(
            f"w4a8_mxfp4: checkpoint tensor {where} has dtype {tensor.dtype}; "
            f"expected {' or '.join(str(d) for d in dtypes)}"
        )
    if scalar:
        if tensor.numel() != 1:
            raise ValueError(
                f"w4a8_mxfp4: checkpoint tensor {where} must be a scalar, got shape "
                f"{tuple(tensor.shape)}"
            )
        value = float(tensor.reshape(()).double())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"w4a8_mxfp4: checkpoint tensor {where} is {value}; an activation scale must "
                "be finite and positive"
            )
    elif tensor.ndim not in ndims or (
        trailing_dim is not None and tensor.shape[-1] != trailing_dim
    ):
        raise ValueError(
            f"w4a8_mxfp4: checkpoint tensor {where} has shape {tuple(tensor.shape)}; "
            f"expected {' or '.join(map(str, ndims))} dimensions with a last dimension of "
            f"{trailing_dim}"
        )


def checked_loader(
    inner: Callable,
    tensor_name: Callable[[object], str],
    dtypes: Sequence[torch.dtype],
    trailing_dim: int | None = None,
    scalar: bool = False,
) -> Callable:
    """Wrap a vLLM weight loader.

    ``tensor_name(shard)`` names the checkpoint tensor being loaded. ``trailing_dim``: the
    expected size of the checkpoint tensor's last dimension (the full,
    unsharded input dimension, in packed bytes or scale blocks). ``scalar``: a per-tensor scale
    that must be one finite positive number.
    """

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        where = tensor_name(shard)
        check_checkpoint_tensor(loaded_weight, where, dtypes, trailing_dim, scalar, ndims=(2,))
        try:
            inner(param, loaded_weight, *args, **kwargs)
        except AssertionError as exc:
            raise ValueError(
                f"w4a8_mxfp4: checkpoint tensor {where} of shape {tuple(loaded_weight.shape)} "
                f"does not fit the layer's parameter of shape {tuple(param.shape)} "
                f"(tensor-parallel rank shard); {exc}"
            ) from None
        getattr(param, LOADED_ATTR).add(shard)

    return load


def track_loading(param: torch.nn.Parameter) -> torch.nn.Parameter:
    setattr(param, LOADED_ATTR, set())
    return param


def loaded_shards(param: torch.nn.Parameter) -> set:
    return getattr(param, LOADED_ATTR, set())


def require_loaded(param: torch.nn.Parameter, tensor_name: Callable[[object], str],
                   num_shards: int) -> None:
    """A weight or weight scale must have arrived whole: unsplit, or every shard of it."""
    shards = loaded_shards(param)
    if None in shards:
        return
    qkv = "qkv" if num_shards == 3 else ""
    missing = [
        tensor_name(index) for index in range(num_shards)
        if index not in shards and (not qkv or qkv[index] not in shards)
    ]
    if missing:
        raise ValueError(f"w4a8_mxfp4: checkpoint tensor(s) {missing} are missing")
