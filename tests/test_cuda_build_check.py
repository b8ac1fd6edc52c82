"""The CUDA library build's check for ptxas's lost L2 cache policy (``_cuda_ext``), on CPU.

The listings are cut from ``cuobjdump -sass`` of this project's own kernels built with nvcc 13.0
for sm_90a: one INT8 decode GEMM whose weight copies read ``desc[UR1]``, which nothing in the
function writes (it trapped with an illegal instruction on an H100), and the FP8 one whose copies
read ``desc[UR4]`` after the instructions that build it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from w4a8_backend.kernels import _cuda_ext

_GOOD = """
		Function : decode_gemm_kernel_fp8
        /*00e0*/                   UMOV UR4, 0xf0 ;
        /*0100*/                   USHF.R.U32 UR4, UR4, 0x4, URZ ;
        /*0110*/                   UMOV UR5, 0x120 ;
        /*0130*/                   USHF.L.U32 UR5, UR5, 0x14, URZ ;
        /*00f0*/                   ULDC.64 UR8, c[0x0][0x208] ;
        /*03a0*/                   LDGSTS.E.BYPASS.128 [R19], desc[UR4][R4.64] ;
        /*0530*/                   LDGSTS.E.64 [R17+0x900], desc[UR8][R4.64] ;
        /*0540*/              @!P0 LDGSTS.E.BYPASS.128 [R15+0x980], desc[UR9][R6.64] ;
"""
_BAD = """
		Function : decode_gemm_kernel_int8
        /*0020*/                   ULDC.64 UR18, c[0x0][0x268] ;
        /*0430*/                   UMOV UR4, UR7 ;
        /*0440*/                   LDGSTS.E.BYPASS.128 [R3+UR0], desc[UR1][R4.64] ;
        /*0480*/                   LDGSTS.E.BYPASS.128 [R3+UR0+0x240], desc[UR1][R6.64] ;
"""
_SM80 = """
		Function : decode_gemm_kernel_sm80
        /*0100*/                   LDGSTS.E.BYPASS.128 [R3], [R4.64] ;
"""


def test_unset_copy_descriptor_is_found():
    assert _cuda_ext.unset_copy_descriptors(_GOOD + _BAD + _SM80) == ["decode_gemm_kernel_int8"]
    assert _cuda_ext.unset_copy_descriptors(_GOOD + _SM80) == []
    # a 64-bit load writes the pair: desc[UR9] above is ULDC.64 UR8's high half
    assert _cuda_ext.unset_copy_descriptors(_GOOD.replace("ULDC.64 UR8", "ULDC UR8")) == [
        "decode_gemm_kernel_fp8"]


def _fake_toolkit(tmp_path: Path, listing: str | None) -> str:
    """An nvcc path whose directory has a cuobjdump printing ``listing`` (None: no cuobjdump)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    if listing is not None:
        (tmp_path / "listing.txt").write_text(listing)
        tool = bin_dir / "cuobjdump"
        tool.write_text(f"#!/bin/sh\ncat {tmp_path / 'listing.txt'}\n")
        tool.chmod(0o755)
    return str(nvcc)


@pytest.mark.parametrize("listing,problem", [
    (_GOOD, None),
    (_GOOD + _BAD, "unset descriptor"),
    (None, "cuobjdump not found"),
], ids=["clean", "lost-policy", "no-cuobjdump"])
def test_l2_hint_problem(tmp_path, listing, problem):
    nvcc = _fake_toolkit(tmp_path, listing)
    got = _cuda_ext._l2_hint_problem(nvcc, tmp_path / "lib.so")
    if problem is None:
        assert got is None
    else:
        assert problem in got


@pytest.mark.parametrize("listing,expect_plain", [(_GOOD, False), (_GOOD + _BAD, True)],
                         ids=["clean", "lost-policy"])
def test_build_rebuilds_with_plain_copies(tmp_path, monkeypatch, listing, expect_plain):
    """A build whose hinted copies fail the check is rebuilt with -DW4A8_NO_L2_HINT."""
    nvcc = _fake_toolkit(tmp_path, listing)
    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if cmd[0] == nvcc:  # "compile": record the flags, write the output file
            calls.append(cmd)
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"lib")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, **kwargs)

    monkeypatch.setenv(_cuda_ext.NVCC_ENV, nvcc)
    monkeypatch.setenv(_cuda_ext.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(_cuda_ext.subprocess, "run", fake_run)
    lib = _cuda_ext.build(90)
    assert lib.is_file()
    assert ["-DW4A8_NO_L2_HINT" in c for c in calls] == ([False, True] if expect_plain
                                                        else [False])
