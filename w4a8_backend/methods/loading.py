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


def checked_loader(
    inner: Callable,
    tensor_name: str,
    dtypes: Sequence[torch.dtype],
    trailing_dim: int | None = None,
    scalar: bool = False,
) -> Callable:
    """Wrap a vLLM weight loader.

    ``trailing_dim``: the expected size of the checkpoint tensor's last dimension (the full,
    unsharded input dimension, in packed bytes or scale blocks). ``scalar``: a per-tensor scale
    that must be one finite positive number.
    """

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        where = tensor_name if shard is None else f"{tensor_name} (shard {shard!r})"
        if loaded_weight.dtype not in dtypes:
            raise ValueError(
                f"w4a8_mxfp4: checkpoint tensor {where} has dtype {loaded_weight.dtype}; "
                f"expected {' or '.join(str(d) for d in dtypes)}"
            )
        if scalar:
            if loaded_weight.numel() != 1:
                raise ValueError(
                    f"w4a8_mxfp4: checkpoint tensor {where} must be a scalar, got shape "
                    f"{tuple(loaded_weight.shape)}"
                )
            value = float(loaded_weight.reshape(()).float())
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"w4a8_mxfp4: checkpoint tensor {where} is {value}; an activation scale must "
                    "be finite and positive"
                )
        elif loaded_weight.ndim != 2 or (
            trailing_dim is not None and loaded_weight.shape[-1] != trailing_dim
        ):
            raise ValueError(
                f"w4a8_mxfp4: checkpoint tensor {where} has shape {tuple(loaded_weight.shape)}; "
                f"expected 2 dimensions with a last dimension of {trailing_dim}"
            )
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


def require_loaded(param: torch.nn.Parameter, tensor_name: str, num_shards: int) -> None:
    """A weight or weight scale must have arrived whole: unsplit, or every shard of it."""
    shards = loaded_shards(param)
    if None in shards or len(shards) >= num_shards:
        return
    missing = "all of it" if not shards else f"only shards {sorted(map(str, shards))} arrived"
    raise ValueError(f"w4a8_mxfp4: checkpoint tensor {tensor_name} is missing ({missing})")
