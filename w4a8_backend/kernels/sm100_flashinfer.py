"""Blackwell (SM100/SM103) native W4A8 linear through FlashInfer's MXFP8 x MXFP4 GEMM.

BUILT, NOT RUN ON HARDWARE HERE: no Blackwell GPU was available to this project. Everything that
does not need one (layouts, arguments, dispatch, numerics of the surrounding code) is tested on
CPU in ``tests/test_sm100.py``; see ``docs/sm100.md`` for what is and is not covered.

How a layer runs
----------------
``tcgen05.mma kind::mxf8f6f4`` multiplies E4M3 x E2M1 with one UE8M0 scale per 32 elements of K
on both operands. FlashInfer exposes it for a dense matrix as a one-group
``group_gemm_mxfp8_mxfp4_nt_groupwise`` (CUTLASS, SM100/SM103; older releases export it only under
its first name ``group_gemm_mxfp4_nt_groupwise``, the same function):

- weights: the checkpoint's packed E2M1 ``[N, K/2]`` is used as is (same nibble order, K-major),
  as ``b`` of shape ``[1, N, K/2]``;
- weight scales: the checkpoint's E8M0 ``[N, K/32]`` are interleaved once at load into the 128x4
  layout CUTLASS reads (rows padded to 128, scale columns to 4), with FlashInfer's own
  ``block_scale_interleave`` on the GPU (the torch twin :func:`interleave_scales_128x4` on CPU;
  both produce the same bytes, tested against FlashInfer's pure-torch layout references);
- activations: quantized to FP8 E4M3 exactly as the format defines (static or dynamic, per tensor
  or per token, :func:`w4a8_backend.formats.quantize_activation`); the MX block scales of ``a``
  are all 127 (2**0, "unit"), so the GEMM computes ``sum q * w`` and the per-tensor / per-token
  activation scale is applied afterwards in float32 (the kernel has no alpha argument). A
  constant scale matrix is its own 128x4 interleave, so ``a_scale`` needs no swizzle.
- rows of ``a`` are padded to a multiple of 4 (the kernel's ``m_indptr`` granularity) with
  zeros; ``out[:M]`` is kept. The GEMM writes bfloat16; the scale, the bias and the cast to the
  layer's output dtype follow in float32.

INT8 activations are not served here (FlashInfer has no MXFP4 x INT8 GEMM; see docs/sm100.md):
``can_implement`` says so and the dispatcher moves on to the next backend.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable

import torch

from ..formats import BLOCK_SIZE, ActivationDtype, quantize_activation
from .base import DeviceInfo, LinearKernelConfig, Mxfp4LinearKernel, Verdict

# The first FlashInfer release whose entry points take the arguments passed here (checked by
# reading 0.5.3, 0.6.0, 0.6.10 and 0.7.2.post1: 0.5.x's routed MoE still needs `tile_tokens_dim`).
FLASHINFER_MIN_VERSION = "0.6.0"
# FlashInfer's own `is_sm100a_supported` asks for a CUDA 12.8+ torch build.
MIN_TORCH_CUDA = "12.8"
# B200/GB200 (sm_100) and B300/GB300 (sm_103). SM110/SM12x have different kernels; not enabled.
SM100_CAPABILITIES = (100, 103)

UNIT_E8M0 = 127  # 2**0
SF_ROW_TILE = 128  # 128x4 scale layout: rows padded to 128 ...
SF_COL_TILE = 4  # ... and scale columns to 4
GEMM_K_ALIGN = 128  # group_gemm_mxfp8_mxfp4_nt_groupwise: k % 128 == 0
GEMM_N_ALIGN = 8  # n % 8 == 0
GEMM_M_ALIGN = 4  # every m_indptr entry a multiple of 4
GEMM_OUT_DTYPES = (torch.bfloat16, torch.float16)

INSTALL_HINT = "install the optional extra: pip install 'w4a8-backend[sm100]'"

# (module, candidate names (first found wins), parameters this code passes by name)
DENSE_ENTRY_POINTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "flashinfer.gemm",
        ("group_gemm_mxfp8_mxfp4_nt_groupwise", "group_gemm_mxfp4_nt_groupwise"),
        ("a", "b", "a_scale", "b_scale", "m_indptr", "out_dtype"),
    ),
    ("flashinfer", ("block_scale_interleave",), ("unswizzled_sf",)),
)


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


# --------------------------------------------------------------------------------------------
# FlashInfer availability
# --------------------------------------------------------------------------------------------


def _torch_cuda_version() -> str | None:
    """The CUDA version torch was built with (a seam the tests use to fake a CUDA build)."""
    return torch.version.cuda


def _version_tuple(version: str):
    from packaging.version import Version

    return Version(version)


def resolve_entry_point(module_name: str, names: Iterable[str]):
    """The first of ``names`` present in ``module_name`` (imported), or ``None``."""
    module = importlib.import_module(module_name)
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    return None


def missing_parameters(fn, passed: Iterable[str]) -> list[str]:
    """Names in ``passed`` that ``fn``'s signature does not accept."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [name for name in passed if name not in params]


def probe_flashinfer(
    entry_points: Iterable[tuple[str, tuple[str, ...], tuple[str, ...]]],
) -> Verdict:
    """Is an adequate FlashInfer importable: the package, its version, each entry point and the
    parameters this backend passes to it (read from the installed signatures)?"""
    try:
        flashinfer = importlib.import_module("flashinfer")
    except Exception as exc:  # ImportError, or a broken install raising at import
        return False, f"flashinfer is not importable ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    version = getattr(flashinfer, "__version__", None)
    try:
        too_old = version is None or _version_tuple(str(version)) < _version_tuple(
            FLASHINFER_MIN_VERSION
        )
    except Exception:  # unparsable version string
        too_old = True
    if too_old:
        return False, (
            f"flashinfer {version} is older than {FLASHINFER_MIN_VERSION}, the first release "
            f"whose MXFP4 GEMM/MoE entry points take the arguments this backend passes; "
            f"{INSTALL_HINT}"
        )
    for module_name, names, passed in entry_points:
        try:
            fn = resolve_entry_point(module_name, names)
        except Exception as exc:
            return False, f"flashinfer {version}: cannot import {module_name} ({exc})"
        if fn is None:
            return False, f"flashinfer {version} has no {module_name}.{' / '.join(names)}"
        missing = missing_parameters(fn, passed)
        if missing:
            return False, (
                f"flashinfer {version}: {module_name}.{fn.__name__} does not accept "
                f"{missing} (its signature: {inspect.signature(fn)})"
            )
    return True, None


def check_sm100_device(
    device: DeviceInfo, entry_points: Iterable[tuple[str, tuple[str, ...], tuple[str, ...]]]
) -> Verdict:
    """Shared ``is_supported`` of the dense and MoE SM100 kernels."""
    if device.type != "cuda" or device.capability is None:
        return False, f"needs a Blackwell GPU (sm_100/sm_103); this device is {device.describe()}"
    if device.capability not in SM100_CAPABILITIES:
        return False, (
            f"sm_{device.capability} has no tcgen05 kind::mxf8f6f4 MMA; this backend runs on "
            f"sm_{' / sm_'.join(str(c) for c in SM100_CAPABILITIES)} only"
        )
    cuda = _torch_cuda_version()
    if cuda is None:
        return False, "this torch build has no CUDA (torch.version.cuda is None)"
    try:
        if _version_tuple(cuda) < _version_tuple(MIN_TORCH_CUDA):
            return False, (
                f"torch is built with CUDA {cuda}; FlashInfer's SM100 kernels need "
                f"CUDA >= {MIN_TORCH_CUDA}"
            )
    except Exception:
        return False, f"cannot parse torch.version.cuda={cuda!r}"
    return probe_flashinfer(entry_points)


# --------------------------------------------------------------------------------------------
# Scale layout
# --------------------------------------------------------------------------------------------


def interleave_scales_128x4(scales: torch.Tensor) -> torch.Tensor:
    """Torch twin of FlashInfer's ``block_scale_interleave`` (CUTLASS/TRT-LLM 128x4 layout).

    ``scales`` ``[..., R, C]`` uint8 -> ``[..., round_up(R, 128), round_up(C, 4)]`` whose
    contiguous bytes are FlashInfer's flat buffer: zero padding, then per 128-row x 4-column tile
    (tiles ordered row-tile major, column-tile minor) byte ``(r % 32) * 16 + (r % 128 // 32) * 4
    + c % 4`` (``get_sf_out_offset_128x4`` in FlashInfer's ``quantization_utils.cuh``).
    """
    if scales.dtype != torch.uint8:
        raise ValueError(f"block scales must be uint8 (E8M0 bytes), got {scales.dtype}")
    if scales.dim() < 2:
        raise ValueError(f"block scales must be at least 2-D, got shape {tuple(scales.shape)}")
    *lead, rows, cols = scales.shape
    rows_p, cols_p = round_up(rows, SF_ROW_TILE), round_up(cols, SF_COL_TILE)
    padded = scales.new_zeros((*lead, rows_p, cols_p))
    padded[..., :rows, :cols] = scales
    tiles = padded.reshape(*lead, rows_p // SF_ROW_TILE, 4, 32, cols_p // SF_COL_TILE, 4)
    n = len(lead)
    # (row_tile, r_hi, r_lo, col_tile, c_lo) -> (row_tile, col_tile, r_lo, r_hi, c_lo)
    perm = (*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return tiles.permute(perm).reshape(*lead, rows_p, cols_p).contiguous()


def interleave_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """Interleave E8M0 block scales for FlashInfer once at load.

    On a CUDA tensor this is FlashInfer's own ``block_scale_interleave`` kernel (the helper its
    GEMM and MoE tests prepare scales with); elsewhere the byte-identical torch twin. Returns
    ``[..., round_up(R, 128), round_up(C, 4)]`` uint8.
    """
    if scales.dtype != torch.uint8:
        raise ValueError(f"block scales must be uint8 (E8M0 bytes), got {scales.dtype}")
    *lead, rows, cols = scales.shape
    shape = (*lead, round_up(rows, SF_ROW_TILE), round_up(cols, SF_COL_TILE))
    if scales.is_cuda:
        import flashinfer

        flat = flashinfer.block_scale_interleave(scales.contiguous())
        return flat.reshape(shape)
    return interleave_scales_128x4(scales)


# --------------------------------------------------------------------------------------------
# The GEMM as a custom op (opaque to torch.compile, shape-only fake)
# --------------------------------------------------------------------------------------------


def dense_gemm_entry_point():
    """FlashInfer's MXFP8 x MXFP4 group GEMM, looked up at call time (one name or the other)."""
    fn = resolve_entry_point("flashinfer.gemm", DENSE_ENTRY_POINTS[0][1])
    if fn is None:
        raise RuntimeError(
            "flashinfer.gemm has neither group_gemm_mxfp8_mxfp4_nt_groupwise nor "
            f"group_gemm_mxfp4_nt_groupwise; {INSTALL_HINT}"
        )
    return fn


def dense_gemm_arguments(
    a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor
) -> tuple[tuple, dict, int]:
    """The exact ``(args, kwargs)`` handed to FlashInfer for ``a @ dequant(b).T`` with unit
    activation block scales, and the number of real rows ``M``."""
    m, k = a.shape
    m_pad = round_up(max(m, 1), GEMM_M_ALIGN)
    if m_pad != m:
        a = torch.nn.functional.pad(a.view(torch.uint8), (0, 0, 0, m_pad - m)).view(a.dtype)
    a_scale = torch.full(
        (round_up(m_pad, SF_ROW_TILE), k // BLOCK_SIZE), UNIT_E8M0, dtype=torch.uint8,
        device=a.device,
    )
    m_indptr = torch.arange(2, dtype=torch.int32, device=a.device) * m_pad
    return (a, b, a_scale, b_scale, m_indptr), {"out_dtype": torch.bfloat16}, m


@torch.library.custom_op("w4a8_backend::sm100_mxfp8_mxfp4_gemm", mutates_args=())
def sm100_mxfp8_mxfp4_gemm(a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """``a`` E4M3 ``[M, K]`` x MXFP4 ``b`` ``[1, N, K/2]`` (128x4 scales) -> bfloat16 ``[M, N]``,
    unscaled (unit activation block scales)."""
    args, kwargs, m = dense_gemm_arguments(a, b, b_scale)
    out = dense_gemm_entry_point()(*args, **kwargs)
    return out[:m].contiguous()


@sm100_mxfp8_mxfp4_gemm.register_fake
def _sm100_mxfp8_mxfp4_gemm_fake(a, b, b_scale):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class Sm100FlashInferLinearKernel(Mxfp4LinearKernel):
    name = "sm100_flashinfer"

    @classmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        return check_sm100_device(device, DENSE_ENTRY_POINTS)

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> Verdict:
        if config.act_dtype != ActivationDtype.FP8_E4M3:
            return False, (
                f"{config.act_dtype.name} activations: FlashInfer has no MXFP4 x INT8 GEMM on "
                "SM100 (tcgen05 kind::mxf8f6f4 takes FP8/FP6/FP4 only; see docs/sm100.md)"
            )
        if config.in_features % GEMM_K_ALIGN:
            return False, (
                f"in_features={config.in_features} is not a multiple of {GEMM_K_ALIGN} "
                "(FlashInfer's MXFP8 x MXFP4 GEMM needs k % 128 == 0)"
            )
        if config.out_features % GEMM_N_ALIGN:
            return False, (
                f"out_features={config.out_features} is not a multiple of {GEMM_N_ALIGN} "
                "(FlashInfer's MXFP8 x MXFP4 GEMM needs n % 8 == 0)"
            )
        if config.out_dtype not in GEMM_OUT_DTYPES:
            return False, (
                f"output dtype {config.out_dtype}: the SM100 path produces bfloat16/float16 only"
            )
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        cfg = self.config
        n, k = cfg.out_features, cfg.in_features
        weight, scale = layer.weight.data, layer.weight_scale.data
        if weight.dtype != torch.uint8 or tuple(weight.shape) != (n, k // 2):
            raise ValueError(
                f"sm100_flashinfer: weight must be uint8 [{n}, {k // 2}], got {weight.dtype} "
                f"{tuple(weight.shape)}"
            )
        if scale.dtype != torch.uint8 or tuple(scale.shape) != (n, k // BLOCK_SIZE):
            raise ValueError(
                f"sm100_flashinfer: weight_scale must be uint8 E8M0 [{n}, {k // BLOCK_SIZE}], "
                f"got {scale.dtype} {tuple(scale.shape)}"
            )
        b = weight.contiguous().unsqueeze(0)  # [1, N, K/2], checkpoint layout as is
        b_scale = interleave_block_scales(scale).unsqueeze(0)  # [1, N128, K/32]
        layer.weight = torch.nn.Parameter(b, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(b_scale, requires_grad=False)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.config
        q, scale = quantize_activation(x, cfg.act_dtype, cfg.act_scheme, layer.input_scale)
        acc = torch.ops.w4a8_backend.sm100_mxfp8_mxfp4_gemm(q, layer.weight, layer.weight_scale)
        y = acc.float() * scale  # scale: [1] per tensor or [M, 1] per token
        if bias is not None:
            y = y + bias.float()
        return y.to(cfg.out_dtype).reshape(*x.shape[:-1], cfg.out_features)
