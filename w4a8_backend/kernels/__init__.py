"""Floor 2: kernel backends for W4A8 MXFP4 GEMMs and the dispatcher that picks one per layer."""

from .base import DeviceInfo, LinearKernelConfig, Mxfp4LinearKernel
from .dispatch import choose_linear_kernel, evaluate_backends

__all__ = [
    "DeviceInfo",
    "LinearKernelConfig",
    "Mxfp4LinearKernel",
    "choose_linear_kernel",
    "evaluate_backends",
]
