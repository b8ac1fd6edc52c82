"""The contract every MoE (grouped expert GEMM) backend implements, parallel to ``base.py``.

Activation semantics every backend reproduces (the reference in ``tests/reference_model.py``
implements them independently):
- GEMM1 input (the layer's hidden states ``x``): static scale, or a dynamic scale over all tokens
  of the call (per tensor) or per token; all experts see the same quantized ``x``.
- GEMM2 input (``silu(gate) * up`` of every routed (token, expert) pair): static scale, or a
  dynamic scale over all routed pairs of the call (per tensor) or per pair (per token).
- Output: the router-weighted sum over each token's experts local to this rank.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..formats import ActivationDtype, ActivationScheme
from .base import DeviceInfo, Verdict


@dataclasses.dataclass(frozen=True)
class MoEKernelConfig:
    act_dtype: ActivationDtype
    w13_scheme: ActivationScheme
    w2_scheme: ActivationScheme
    num_local_experts: int
    hidden_size: int
    intermediate_size: int  # per tensor-parallel partition
    top_k: int
    activation: str  # vLLM's MoE activation name, e.g. "silu"
    out_dtype: torch.dtype
    num_global_experts: int | None = None  # None: no expert parallelism (all experts local)

    @property
    def total_experts(self) -> int:
        return self.num_local_experts if self.num_global_experts is None else self.num_global_experts

    def describe(self) -> str:
        return (
            f"MoE E={self.num_local_experts}/{self.total_experts} H={self.hidden_size} I={self.intermediate_size} "
            f"top_k={self.top_k} act={self.act_dtype.name} w13={self.w13_scheme.name} "
            f"w2={self.w2_scheme.name} activation={self.activation} out={self.out_dtype}"
        )


class Mxfp4MoEKernel(ABC):
    """A W4A8 MXFP4 MoE backend.

    On entry to :meth:`process_weights_after_loading` the layer holds validated checkpoint
    tensors for its local experts: ``w13_weight`` uint8 ``[E, 2I, H/2]`` (rows ``[gate; up]``),
    ``w13_weight_scale`` uint8 ``[E, 2I, H/32]``, ``w2_weight`` uint8 ``[E, H, I/2]``,
    ``w2_weight_scale`` uint8 ``[E, H, I/32]``, and ``w13_input_scale`` / ``w2_input_scale``
    (float32 ``[1]``, static schemes) or ``None``.
    """

    name: ClassVar[str]

    def __init__(self, config: MoEKernelConfig):
        self.config = config

    @classmethod
    @abstractmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict: ...

    @classmethod
    @abstractmethod
    def can_implement(cls, config: MoEKernelConfig) -> Verdict: ...

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...

    @abstractmethod
    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
    ) -> torch.Tensor:
        """``[T, H]`` routed-expert output of this rank (before any TP/EP reduction).

        ``topk_ids`` are global expert ids; ``expert_map`` maps them to local ids (-1: not on
        this rank) under expert parallelism.
        """
