"""Choose a linear kernel backend per layer: SM100 native, then SM90/SM80 kernels, then fallback.

The first backend whose ``is_supported`` and ``can_implement`` both say yes wins. The choice and
the reasons the better backends were passed over are logged once per layer shape.
``W4A8_MXFP4_KERNEL=<name>`` forces a backend (an error if it cannot run the layer).
"""

from __future__ import annotations

import importlib
import logging
import os

from .base import DeviceInfo, LinearKernelConfig, Mxfp4LinearKernel

# A child of "vllm" so that messages reach vLLM's log handlers without importing vLLM here.
logger = logging.getLogger("vllm.w4a8_mxfp4")

FORCE_ENV = "W4A8_MXFP4_KERNEL"

# Best first. Modules are imported lazily so that a backend's optional dependencies (triton,
# flashinfer) are only touched on machines that might use them.
LINEAR_BACKENDS: tuple[tuple[str, str, str], ...] = (
    ("sm100_flashinfer", "w4a8_backend.kernels.sm100_flashinfer", "Sm100FlashInferLinearKernel"),
    ("sm90_triton", "w4a8_backend.kernels.sm90_triton", "Sm90TritonLinearKernel"),
    ("fallback", "w4a8_backend.kernels.fallback", "DequantFallbackLinearKernel"),
)

_logged: set[tuple[str, LinearKernelConfig, DeviceInfo]] = set()


def backend_names() -> list[str]:
    return [name for name, _, _ in LINEAR_BACKENDS]


def _load(module: str, attr: str) -> type[Mxfp4LinearKernel]:
    return getattr(importlib.import_module(module), attr)


def evaluate_backends(
    config: LinearKernelConfig, device: DeviceInfo
) -> list[tuple[str, type[Mxfp4LinearKernel] | None, str | None]]:
    """Every backend in order with ``(name, class or None, reason it cannot run or None)``."""
    verdicts = []
    for name, module, attr in LINEAR_BACKENDS:
        try:
            cls = _load(module, attr)
        except ImportError as exc:
            verdicts.append((name, None, f"not importable: {exc}"))
            continue
        ok, reason = cls.is_supported(device)
        if ok:
            ok, reason = cls.can_implement(config)
        verdicts.append((name, cls if ok else None, None if ok else reason))
    return verdicts


def choose_linear_kernel(
    config: LinearKernelConfig, device: DeviceInfo, forced: str | None = None
) -> type[Mxfp4LinearKernel]:
    forced = forced if forced is not None else os.environ.get(FORCE_ENV) or None
    if forced is not None and forced not in backend_names():
        raise ValueError(
            f"{FORCE_ENV}={forced!r} names no kernel backend; expected one of {backend_names()}"
        )
    verdicts = evaluate_backends(config, device)
    for name, cls, reason in verdicts:
        if forced is not None and name != forced:
            continue
        if cls is None:
            if forced is not None:
                raise ValueError(
                    f"{FORCE_ENV}={forced!r} cannot run {config.describe()} on "
                    f"{device.describe()}: {reason}"
                )
            continue
        key = (name, config, device)
        if key not in _logged:
            _logged.add(key)
            passed_over = "; ".join(
                f"{n}: {r}" for n, c, r in verdicts[: verdicts.index((name, cls, reason))]
            )
            logger.info(
                "w4a8_mxfp4: %s on %s uses kernel %s%s",
                config.describe(),
                device.describe(),
                name,
                f" (passed over: {passed_over})" if passed_over else "",
            )
        return cls
    raise AssertionError("the fallback backend accepts every layer")
