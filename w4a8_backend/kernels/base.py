"""The contract every linear kernel backend implements.

A backend is a class with two class-level questions, ``is_supported(device)`` and
``can_implement(config)``, each answering ``(ok, reason)``; the dispatcher asks them in order and
instantiates the first backend that says yes, once per layer at weight-processing time.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..formats import ActivationDtype, ActivationScheme


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What a backend needs to know about the device: its type and CUDA capability (e.g. 90)."""

    type: str
    capability: int | None = None
    name: str = ""

    @classmethod
    def of(cls, device: torch.device | str) -> DeviceInfo:
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return cls("cuda", major * 10 + minor, torch.cuda.get_device_name(device))
        return cls(device.type, None, device.type)

    def describe(self) -> str:
        cap = f" sm_{self.capability}" if self.capability is not None else ""
        return f"{self.name or self.type}{cap}"


@dataclasses.dataclass(frozen=True)
class LinearKernelConfig:
    """One linear layer (per tensor-parallel partition) as a kernel sees it."""

    act_dtype: ActivationDtype
    act_scheme: ActivationScheme
    out_features: int  # N of this partition
    in_features: int  # K of this partition, a multiple of 32
    out_dtype: torch.dtype

    def describe(self) -> str:
        return (
            f"N={self.out_features} K={self.in_features} act={self.act_dtype.name} "
            f"scheme={self.act_scheme.name} out={self.out_dtype}"
        )


Verdict = tuple[bool, str | None]


class Mxfp4LinearKernel(ABC):
    """A W4A8 MXFP4 linear backend.

    On entry to :meth:`process_weights_after_loading` the layer holds the checkpoint tensors,
    already validated: ``weight`` uint8 ``[N, K/2]``, ``weight_scale`` uint8 E8M0 ``[N, K/32]``
    and ``input_scale`` (float32 ``[1]``, static scheme) or ``None``. The kernel may repack them
    into whatever it needs; :meth:`apply` must then be free of host syncs and allocations that
    depend on data, so that it runs under ``torch.compile`` and CUDA graphs.
    """

    name: ClassVar[str]

    def __init__(self, config: LinearKernelConfig):
        self.config = config

    @classmethod
    @abstractmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        """Can this backend run on ``device`` at all (capability, installed packages)?"""

    @classmethod
    @abstractmethod
    def can_implement(cls, config: LinearKernelConfig) -> Verdict:
        """Can this backend run this layer (shapes, dtypes, activation scheme)?"""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack the layer's tensors once, after the checkpoint is loaded."""

    @abstractmethod
    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``y[..., N] = W4A8(x[..., K]) (+ bias)`` in ``config.out_dtype``."""
