"""The ctypes declarations of the CUDA decode library (``_cuda_ext.C_FUNCTIONS``) against the
C source's ``extern "C"`` functions: the same functions, and per parameter the same kind
(pointer, int pointer or int), so that a parameter added on one side only fails here and not
as a wrong argument on the GPU. Reads the source only: no CUDA needed."""

from __future__ import annotations

import re

from w4a8_backend.kernels import _cuda_ext

_DEF = re.compile(r"^(int|const char\*)\s+(w4a8_\w+)\(([^)]*)\)\s*\{", re.M)


def _kind(param: str) -> str:
    param = " ".join(param.split())
    if re.match(r"^(const )?(void|uint8_t|float|int32_t)\s*\*", param):
        return "p"
    if re.match(r"^int\s*\*", param):
        return "pi"
    if re.match(r"^(int|bool)\s+\w+$", param):
        return "i"
    raise AssertionError(f"parameter kind not known to this test: {param!r}")


def _source() -> str:
    return (_cuda_ext.source_dir() / _cuda_ext.SOURCE_NAME).read_text()


def c_functions(src: str) -> dict[str, tuple[tuple[str, ...], str]]:
    body = src[src.index('extern "C" {'):]
    out = {}
    for ret, name, params in _DEF.findall(body):
        kinds = tuple(_kind(p) for p in params.split(",") if p.strip())
        out[name] = (kinds, "s" if ret == "const char*" else "i")
    return out


def test_every_exported_function_is_declared_alike():
    declared = _cuda_ext.C_FUNCTIONS
    in_source = c_functions(_source())
    assert set(in_source) == set(declared), (
        f"only in the source: {sorted(set(in_source) - set(declared))}; "
        f"only in _cuda_ext.C_FUNCTIONS: {sorted(set(declared) - set(in_source))}")
    for name, sig in in_source.items():
        assert declared[name] == sig, f"{name}: source {sig}, ctypes {declared[name]}"


def test_a_parameter_added_in_the_source_only_is_caught():
    """The same comparison on a source whose occupancy query gained a parameter that the
    ctypes table lacks: it must differ (the drift this test exists for)."""
    src = _source()
    old = "int staged_steps,\n                           int corr, int* blocks)"
    assert old in src
    changed = c_functions(src.replace(old, old.replace("int corr,", "int corr, int extra,")))
    assert changed["w4a8_moe_blocks_per_sm"] != _cuda_ext.C_FUNCTIONS["w4a8_moe_blocks_per_sm"]
    assert len(changed["w4a8_moe_blocks_per_sm"][0]) == 8
