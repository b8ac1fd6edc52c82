"""Just-in-time build and ctypes binding of ``csrc/w4a8_decode_gemm.cu`` (the CUDA decode GEMMs:
dense, and the MoE expert GEMMs for a few tokens).

The package never needs this to import: the first GPU layer that wants the kernel calls
:func:`load`, which compiles the source with ``nvcc`` for the current GPU (about 30 s, logged),
caches the shared library under ``$W4A8_MXFP4_CACHE_DIR`` (default
``~/.cache/w4a8_backend``) keyed by the source hash and architecture, and loads it with ctypes.
No torch headers are involved, so the build does not depend on torch's C++ ABI. Processes that
start together (tensor-parallel workers) share one build through a file lock.

When anything is missing (no source next to the package, no nvcc, a failed build) :func:`load`
raises :class:`CudaExtUnavailable` with the reason; the caller then keeps the Triton kernel and
logs why.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger("vllm.w4a8_mxfp4")  # reaches vLLM's handlers (see dispatch.py)

SOURCE_NAME = "w4a8_decode_gemm.cu"
HEADER_NAMES = ("quant_modes.h",)
CACHE_ENV = "W4A8_MXFP4_CACHE_DIR"
NVCC_ENV = "W4A8_MXFP4_NVCC"
# Supported by the source: FP8 needs sm_89+, INT8 sm_80+; sm_90 gets the 90a target (PDL).
SUPPORTED_CAPABILITIES = (80, 86, 87, 89, 90)
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


class CudaExtUnavailable(RuntimeError):
    """The CUDA decode kernel cannot be built or loaded here (the message says why)."""


def source_dir() -> Path:
    """Where the CUDA source is: ``w4a8_backend/_csrc`` in an installed wheel (setup.py copies
    ``csrc/`` there), else ``csrc/`` of the source tree this package lives in."""
    packaged = Path(__file__).resolve().parents[1] / "_csrc"
    if (packaged / SOURCE_NAME).is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "csrc"


def _find_nvcc() -> str:
    cands = [os.environ.get(NVCC_ENV)]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        cands.append(str(Path(cuda_home) / "bin" / "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise CudaExtUnavailable(
        f"nvcc not found (set {NVCC_ENV} or CUDA_HOME, or put nvcc on PATH)"
    )


def _gencode(capability: int) -> list[str]:
    if capability == 90:
        return ["-gencode", "arch=compute_90a,code=sm_90a"]
    return ["-gencode", f"arch=compute_{capability},code=sm_{capability}"]


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "w4a8_backend"


# ptxas of nvcc 13.0 (sm_90a) lost the L2 cache policy of the weight copies (cp.async with
# .L2::cache_hint) in some kernel instantiations, leaving those copies (LDGSTS) reading a
# descriptor register that nothing writes: an illegal-instruction trap at run time (seen on an
# H100 on 2026-11-24; the same bug as IST-DASLab/marlin issue 44). Every build is checked for
# it, and rebuilt with plain copies (W4A8_NO_L2_HINT) when it has it or cannot be checked.
_SASS_DEF = re.compile(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s+UR(\d+)\b")
_SASS_COPY_DESC = re.compile(r"LDGSTS[^;]*desc\[UR(\d+)\]")


def unset_copy_descriptors(sass: str) -> list[str]:
    """The functions of a ``cuobjdump -sass`` listing with a cp.async copy (``LDGSTS``) whose
    descriptor register (``desc[URn]``) no instruction of the function writes."""
    bad = []
    for func in sass.split("Function : ")[1:]:
        name, _, body = func.partition("\n")
        written, used = set(), set()
        for m in _SASS_DEF.finditer(body):
            n = int(m.group(2))
            written.add(n)
            if ".64" in m.group(1):
                written.add(n + 1)
        used.update(int(n) for n in _SASS_COPY_DESC.findall(body))
        if used - written:
            bad.append(name.strip())
    return bad


def _l2_hint_problem(nvcc: str, lib: Path) -> str | None:
    """Why the built library's hinted copies cannot be trusted, or None."""
    cuobjdump = Path(nvcc).parent / "cuobjdump"
    if not (cuobjdump.is_file() and os.access(cuobjdump, os.X_OK)):
        return f"cuobjdump not found next to {nvcc}, so the L2-hinted copies cannot be checked"
    proc = subprocess.run([str(cuobjdump), "-sass", str(lib)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cuobjdump -sass failed: {proc.stderr[-500:]}"
    bad = unset_copy_descriptors(proc.stdout)
    if bad:
        return (f"ptxas left {len(bad)} kernel(s) with L2-hinted copies reading an unset "
                f"descriptor (e.g. {bad[0][:100]})")
    return None


def build(capability: int) -> Path:
    """Compile the library for ``sm_<capability>`` unless it is cached; return its path."""
    if capability not in SUPPORTED_CAPABILITIES:
        raise CudaExtUnavailable(
            f"the CUDA decode kernel is built for sm_{SUPPORTED_CAPABILITIES}, "
            f"not sm_{capability}"
        )
    src = source_dir()
    files = [src / SOURCE_NAME] + [src / h for h in HEADER_NAMES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CudaExtUnavailable(
            f"CUDA source not found ({', '.join(missing)}): this install carries neither "
            "w4a8_backend/_csrc nor a source checkout's csrc/; reinstall from a wheel built by "
            "this version's setup.py or with pip install -e ."
        )
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo",
             *_gencode(capability)]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    digest.update(" ".join(flags).encode())
    out_dir = _cache_dir()
    lib = out_dir / f"w4a8_decode_gemm-{digest.hexdigest()[:16]}-sm{capability}.so"
    if lib.is_file():
        return lib
    nvcc = _find_nvcc()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
        if lib.is_file():
            return lib
        logger.info(
            "w4a8_mxfp4: building the CUDA decode kernel for sm_%d with %s (about 30 s, once; "
            "cached in %s)", capability, nvcc, out_dir,
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tmp_lib = Path(tmp) / lib.name
            for extra in ([], ["-DW4A8_NO_L2_HINT"]):
                cmd = [nvcc, *flags, *extra, "-o", str(tmp_lib), str(src / SOURCE_NAME)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise CudaExtUnavailable(
                        f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
                    )
                problem = None if extra else _l2_hint_problem(nvcc, tmp_lib)
                if problem is None:
                    break
                logger.warning("w4a8_mxfp4: %s; rebuilding the CUDA decode kernel with plain "
                               "weight copies (W4A8_NO_L2_HINT)", problem)
            os.replace(tmp_lib, lib)
        logger.info("w4a8_mxfp4: CUDA decode kernel built in %.0f s", time.perf_counter() - t0)
    return lib


class MoeWeights(NamedTuple):
    """One stacked, repacked expert matrix as the MoE decode GEMM reads it."""

    packed: torch.Tensor  # uint8 [rows, KP/2]
    codes: torch.Tensor  # uint8 [rows, KP/32]
    row_scale: torch.Tensor  # FP8: float32 [rows]; INT8: uint8 [KP/256, rows]
    corr_row_ptr: torch.Tensor  # int32 [rows + 1]: each row's out-of-range blocks
    corr_blocks: torch.Tensor  # int32 [B]
    corr_values: torch.Tensor  # float32 [B, 32]


# The library's C functions (extern "C" in the source): name -> (parameter kinds, return
# kind); "p" a pointer, "i" an int, "pi" an int pointer, "s" a C string. tests/test_cuda_abi.py
# checks this against the source, so that the two cannot drift apart unnoticed.
C_FUNCTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "w4a8_error_string": (("i",), "s"),
    "w4a8_decode_gemm": (("p",) * 10 + ("i",) * 12 + ("p",), "i"),
    "w4a8_quant_act": (("p", "i", "p", "p", "p", "i", "i", "i", "i", "i", "p"), "i"),
    "w4a8_quant_act_grid": (("p", "i", "p", "p", "p", "i", "i", "i", "i", "i", "i", "p"), "i"),
    "w4a8_quant_from_amax": (("p",) * 4 + ("i",) * 6 + ("p",), "i"),
    "w4a8_moe_decode_gemm": (("p",) * 14 + ("i",) * 21 + ("p",), "i"),
    "w4a8_moe_blocks_per_sm": (("i",) * 6 + ("pi",), "i"),
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "pi": ctypes.POINTER(ctypes.c_int),
           "s": ctypes.c_char_p}


class DecodeGemmLib:
    """The loaded library: launches on the current torch CUDA stream, raises on launch errors."""

    def __init__(self, path: Path, capability: int):
        self.path = path
        self.capability = capability
        self._lib = ctypes.CDLL(str(path))
        for name, (params, ret) in C_FUNCTIONS.items():
            fn = getattr(self._lib, name)
            fn.argtypes = [_CTYPES[k] for k in params]
            fn.restype = _CTYPES[ret]

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            name = self._lib.w4a8_error_string(code).decode()
            raise RuntimeError(
                f"w4a8_mxfp4 CUDA decode kernel: {what} failed: cudaError {code} ({name})"
            )

    def quant_act(self, x2: torch.Tensor, q: torch.Tensor, s_in: torch.Tensor | None,
                  s_out: torch.Tensor, act_int8: bool, mode: int) -> None:
        """Quantize ``x2`` into ``q``; ``s_in``: the static scale (None otherwise). A dynamic
        per-tensor amax is taken by one CTA (small inputs; see :meth:`quant_act_grid`)."""
        m, k = x2.shape
        stream = torch.cuda.current_stream(x2.device).cuda_stream
        self._check(self._lib.w4a8_quant_act(
            x2.data_ptr(), x2.stride(0), q.data_ptr(),
            s_in.data_ptr() if s_in is not None else None, s_out.data_ptr(), m, k,
            int(act_int8), mode, _DTYPE_CODE[x2.dtype], stream), "activation quantization")

    def quant_act_grid(self, x2: torch.Tensor, q: torch.Tensor, partials: torch.Tensor,
                       s_out: torch.Tensor, act_int8: bool, release_late: bool) -> None:
        """Dynamic per-tensor quantization of ``x2`` into ``q`` on ``partials.numel()`` CTAs (a
        cooperative launch: at most one per SM); ``partials``: float32 scratch. ``release_late``:
        a following PDL launch is released once the amax is known, not at the start."""
        m, k = x2.shape
        stream = torch.cuda.current_stream(x2.device).cuda_stream
        self._check(self._lib.w4a8_quant_act_grid(
            x2.data_ptr(), x2.stride(0), q.data_ptr(), partials.data_ptr(), s_out.data_ptr(),
            m, k, int(act_int8), _DTYPE_CODE[x2.dtype], partials.numel(),
            int(release_late), stream),
            "activation quantization (grid amax)")

    def quant_from_amax(self, h: torch.Tensor, q: torch.Tensor, amax: torch.Tensor,
                        s_out: torch.Tensor, act_int8: bool, per_row: bool, pdl: bool) -> None:
        """Quantize the MoE's float32 ``h`` [rows, K] (contiguous) into ``q`` with the scales
        that GEMM1's per-CTA ``amax`` [rows, cols] gives: per row into ``s_out`` [rows], or per
        tensor into ``s_out`` [1]. ``pdl``: launched after GEMM1 with PDL (SM90)."""
        rows, k = h.shape
        stream = torch.cuda.current_stream(h.device).cuda_stream
        self._check(self._lib.w4a8_quant_from_amax(
            h.data_ptr(), q.data_ptr(), amax.data_ptr(), s_out.data_ptr(), rows, k,
            amax.shape[1], int(act_int8), int(per_row), int(pdl), stream),
            "intermediate quantization (from GEMM1's amaxes)")

    def gemm(self, q: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, codes: torch.Tensor,
             row_scale: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, act_int8: bool,
             per_token: bool, warps: int, stages: int, pdl: bool,
             corr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """The decode GEMM; ``corr`` = (row_ptr [N_pad + 1], blocks, values): out-of-range blocks
        added in its epilogue."""
        m, k = q.shape
        n = y.shape[1]
        n_pad, kp = packed.shape[0], packed.shape[1] * 2
        stream = torch.cuda.current_stream(q.device).cuda_stream
        self._check(self._lib.w4a8_decode_gemm(
            q.data_ptr(), xs.data_ptr(), packed.data_ptr(), codes.data_ptr(),
            row_scale.data_ptr(), *((t.data_ptr() for t in corr) if corr else (None,) * 3),
            bias.data_ptr() if bias is not None else None, y.data_ptr(),
            m, n, k, kp, n_pad, y.stride(0), int(act_int8), int(per_token),
            _DTYPE_CODE[y.dtype], warps, stages, int(pdl), stream), "GEMM launch")

    @functools.lru_cache(maxsize=None)  # noqa: B019 (one library object per process)
    def moe_blocks_per_sm(self, act_int8: bool, gated: bool, warps: int, stages: int,
                          staged_steps: int, corrections: bool) -> int:
        """CTAs of one MoE decode GEMM launch config that fit on an SM at once, staging
        ``staged_steps`` 256-wide K steps of activations (GEMM2: top_k x steps of h), with the
        staging area of out-of-range blocks if the weight has ``corrections``."""
        blocks = ctypes.c_int(0)
        self._check(self._lib.w4a8_moe_blocks_per_sm(int(act_int8), int(gated), warps, stages,
                                                     staged_steps, int(corrections),
                                                     ctypes.byref(blocks)),
                    "MoE GEMM occupancy query")
        return blocks.value

    def moe_gemm(self, a: torch.Tensor, a_scale: torch.Tensor | None, weights: MoeWeights,
                 topk_ids: torch.Tensor, expert_map: torch.Tensor | None,
                 topk_w: torch.Tensor | None, h_scale: torch.Tensor | None, out: torch.Tensor,
                 *, gated: bool, num_experts: int, k: int, rows_per_expert: int,
                 up_offset: int, n_out: int, act_int8: bool, a_per_row: bool,
                 warps: int, stages: int, pdl: bool, stage_a: bool = False,
                 amax: torch.Tensor | None = None) -> None:
        """One MoE decode GEMM (``moe_decode_kernel`` in the source): ``gated`` = GEMM1 over
        the routed pairs into ``out`` = h, else GEMM2 over the tokens into ``out`` = y.
        ``stage_a``: GEMM2 stages its token's rows of h in shared memory (GEMM1 always does).

        Dynamic intermediate scales: GEMM1 (``h_scale`` None) writes float32 h and each CTA's
        amax of ``|h|`` into ``amax`` (float32 ``[pairs, ceil(n_out / 8)]``); GEMM2 given that
        float32 h as ``a`` (``a_scale`` None, ``stage_a``) and the same ``amax`` quantizes h
        itself while staging it, per pair row (``a_per_row``) or per tensor."""
        a_float = a.dtype == torch.float32
        if a_float and (gated or not stage_a or amax is None or a_scale is not None):
            raise ValueError("w4a8_mxfp4 MoE GEMM: float32 activations are GEMM2's float h, "
                             "which needs stage_a, GEMM1's amax and no a_scale")
        tokens, top_k = topk_ids.shape
        stream = torch.cuda.current_stream(a.device).cuda_stream
        ptr = (lambda t: t.data_ptr() if t is not None else None)
        corr = weights.corr_row_ptr if weights.corr_blocks.numel() else None
        self._check(self._lib.w4a8_moe_decode_gemm(
            a.data_ptr(), ptr(a_scale), weights.packed.data_ptr(),
            weights.codes.data_ptr(), weights.row_scale.data_ptr(), ptr(corr),
            ptr(weights.corr_blocks) if corr is not None else None,
            ptr(weights.corr_values) if corr is not None else None,
            topk_ids.data_ptr(), ptr(expert_map), ptr(topk_w), ptr(h_scale), out.data_ptr(),
            ptr(amax), int(topk_ids.dtype == torch.int64), tokens, top_k, num_experts, k,
            weights.packed.shape[1] * 2, weights.packed.shape[0], rows_per_expert, up_offset,
            n_out, a.stride(0), out.stride(0), int(a_per_row), _DTYPE_CODE.get(out.dtype, 2),
            int(act_int8), int(gated), int(stage_a), int(a_float), warps, stages, int(pdl),
            stream),
            "MoE GEMM launch")


_LOADED: dict[int, DecodeGemmLib | CudaExtUnavailable] = {}


def is_loaded(capability: int) -> bool:
    """True once :func:`load` has succeeded for ``capability`` in this process (no build)."""
    return isinstance(_LOADED.get(capability), DecodeGemmLib)


def load(capability: int) -> DecodeGemmLib:
    """Build (or find cached) and load the library once per process; raises
    :class:`CudaExtUnavailable` (also on later calls, without retrying the build)."""
    if capability not in _LOADED:
        try:
            path = build(capability)
            try:
                _LOADED[capability] = DecodeGemmLib(path, capability)
            except OSError as exc:
                raise CudaExtUnavailable(f"cannot load {path}: {exc}") from exc
        except CudaExtUnavailable as exc:
            _LOADED[capability] = exc
    got = _LOADED[capability]
    if isinstance(got, CudaExtUnavailable):
        raise got
    return got
