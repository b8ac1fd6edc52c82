"""Choose a kernel backend per layer: SM100 native, then SM90/SM80 kernels, then fallback.

The first backend whose ``is_supported`` and ``can_implement`` both say yes wins. The choice and
the reasons the better backends were passed over are logged once per layer shape.
``W4A8_MXFP4_KERNEL=<name>`` forces a backend (an error if it cannot run the layer).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from .base import DeviceInfo, LinearKernelConfig, Mxfp4LinearKernel
from .moe_base import MoEKernelConfig, Mxfp4MoEKernel

# A child of "vllm" so that messages reach vLLM's log handlers without importing vLLM here.
logger = logging.getLogger("vllm.w4a8_mxfp4")

FORCE_ENV = "W4A8_MXFP4_KERNEL"

Backends = tuple[tuple[str, str, str], ...]

# Best first. Modules are imported lazily so that a backend's optional dependencies (triton,
# flashinfer) are only touched on machines that might use them.
LINEAR_BACKENDS: Backends = (
    ("sm100_flashinfer", "w4a8_backend.kernels.sm100_flashinfer", "Sm100FlashInferLinearKernel"),
    ("sm90_triton", "w4a8_backend.kernels.sm90_triton", "Sm90TritonLinearKernel"),
    ("fallback", "w4a8_backend.kernels.fallback", "DequantFallbackLinearKernel"),
)
MOE_BACKENDS: Backends = (
    ("sm100_flashinfer", "w4a8_backend.kernels.sm100_flashinfer_moe", "Sm100FlashInferMoEBackend"),
    ("sm90_triton", "w4a8_backend.kernels.sm90_triton_moe", "Sm90TritonMoEKernel"),
    ("fallback", "w4a8_backend.kernels.moe_fallback", "DequantFallbackMoEKernel"),
)

_logged: set[tuple[str, Any, DeviceInfo]] = set()


def backend_names(backends: Backends = LINEAR_BACKENDS) -> list[str]:
    return [name for name, _, _ in backends]


def evaluate_backends(
    config: Any, device: DeviceInfo, backends: Backends = LINEAR_BACKENDS
) -> list[tuple[str, type | None, str | None]]:
    """Every backend in order with ``(name, class or None, reason it cannot run or None)``."""
    verdicts = []
    for name, module, attr in backends:
        try:
            cls = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            verdicts.append((name, None, f"not importable: {exc}"))
            continue
        ok, reason = cls.is_supported(device)
        if ok:
            ok, reason = cls.can_implement(config)
        verdicts.append((name, cls if ok else None, None if ok else reason))
    return verdicts


def _choose(config: Any, device: DeviceInfo, backends: Backends, forced: str | None) -> type:
    forced = forced if forced is not None else os.environ.get(FORCE_ENV) or None
    names = backend_names(backends)
    if forced is not None and forced not in names:
        raise ValueError(f"{FORCE_ENV}={forced!r} names no kernel backend; expected one of {names}")
    verdicts = evaluate_backends(config, device, backends)
    for index, (name, cls, reason) in enumerate(verdicts):
        if forced is not None and name != forced:
            continue
        if cls is None:
            if forced is not None or name == names[-1]:
                who = f"{FORCE_ENV}={forced!r}" if forced else f"even the {name} backend"
                raise ValueError(
                    f"w4a8_mxfp4: {who} cannot run {config.describe()} on "
                    f"{device.describe()}: {reason}"
                )
            continue
        key = (name, config, device)
        if key not in _logged:
            _logged.add(key)
            passed_over = "; ".join(f"{n}: {r}" for n, _, r in verdicts[:index])
            logger.info(
                "w4a8_mxfp4: %s on %s uses kernel %s%s",
                config.describe(),
                device.describe(),
                name,
                f" (passed over: {passed_over})" if passed_over else "",
            )
        return cls
    raise AssertionError("unreachable: the last backend either returns or raises")


def choose_linear_kernel(
    config: LinearKernelConfig, device: DeviceInfo, forced: str | None = None
) -> type[Mxfp4LinearKernel]:
    return _choose(config, device, LINEAR_BACKENDS, forced)


def choose_moe_kernel(
    config: MoEKernelConfig, device: DeviceInfo, forced: str | None = None
) -> type[Mxfp4MoEKernel]:
    return _choose(config, device, MOE_BACKENDS, forced)
