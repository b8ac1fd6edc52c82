"""The L2 evict_first policy on the Triton GEMMs' weight copies (kernels/_triton_l2.py),
compiled for sm_90a on this machine (no GPU needed; triton's NVIDIA backend ships ptxas and
cuobjdump):

- with ``W_EVICT="evict_first"`` the weight-nibble copies of the dense GEMM and of both MoE
  GEMMs (FP8, INT8, INT8 split) carry the policy in the PTX and still carry it in the cubin
  that the hook hands to Triton (no fallback), the activation and block-code copies do not;
  without it the kernels are untouched; another package's kernel asking for the same is left
  as Triton compiles it;
- the SASS check sees ptxas's defect: the same hinted PTX without the shared-memory address
  trick compiles to copies whose descriptor nothing valid wrote (the reason Triton drops the
  policy), and the check reports it;
- the check itself on listings: a policy descriptor overwritten before the copy is caught.

The GPU side (same bytes with and without the policy, timing) is in tests/gpu and
benchmarks/tools/triton_l2_ab.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_triton_interpreted import REPO, TRITON_PATH_ENV, _triton_dir

SCRIPT = r"""
import json, re, subprocess, sys, tempfile
sys.path.insert(0, "benchmarks/tools")
import ptxas_report as pr
import triton
from triton import knobs
from triton.backends.nvidia.compiler import get_ptxas
from w4a8_backend.kernels import _triton_l2 as l2

compiled = {}
orig = triton.compile
def capture(src, *a, **k):
    compiled["last"] = orig(src, *a, **k)
    return compiled["last"]
pr.triton.compile = capture

def sass(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin); f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout

cases = {
    "dense fp8 m16": lambda e: pr.dense_gemm(False, pr.tk.pick_config(16, 8192, 8192, False, 132),
                                             evict=e),
    "dense int8 m32": lambda e: pr.dense_gemm(True, pr.tk.pick_config(32, 8192, 8192, True, 132),
                                              evict=e),
    "moe gemm1 fp8": lambda e: pr.moe_gemm(False, True, evict=e),
    "moe gemm2 int8": lambda e: pr.moe_gemm(True, False, evict=e),
    "moe gemm1 int8 split": lambda e: pr.moe_gemm(True, True, split=True, evict=e),
}
out = {"installed": pr.tk.WEIGHT_EVICT_FIRST}
for name, build in cases.items():
    plain = build("")
    plain_ptx = compiled["last"].asm["ptx"]
    hinted = build("evict_first")
    k = compiled["last"]
    ptx = k.asm["ptx"]
    copies = len(re.findall(r"cp\.async\.c[ag]\.shared", ptx))
    in_binary, problem = l2.check_hinted_copies(sass(k.asm["cubin"]))
    # the defect: the same copies with their shared address straight from Triton's register
    raw = re.sub(r"\txor\.b32 %w4a8_smem, (%r\d+), %w4a8_zero;\n(\t[^\n]*\n[^\n]*?)"
                 r"\[ %w4a8_smem", r"\2[ \1", ptx)
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.ptx", "w").write(raw)
        subprocess.run([get_ptxas(90).path, "-arch=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                       capture_output=True, check=True)
        _, raw_problem = l2.check_hinted_copies(sass(open(f"{d}/k.cubin", "rb").read()))
    out[name] = dict(plain_hinted=plain.l2_hinted, plain_has_hint="cache_hint" in plain_ptx,
                     hinted=hinted.l2_hinted, copies=copies, in_binary=in_binary,
                     problem=problem, raw_rewritten=raw != ptx, raw_problem=raw_problem)
# a kernel of another package that asks for the same policy is compiled as Triton compiles it
with tempfile.TemporaryDirectory() as d:
    open(f"{d}/foreign_kernel.py", "w").write(FOREIGN)
    sys.path.insert(0, d)
    import foreign_kernel
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    def build_foreign(warps):
        sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"}
        aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 3)}
        return triton.compile(ASTSource(foreign_kernel.gemm, sig, {}, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_stages=3, num_warps=warps))
    fk = build_foreign(4)
    l2.KERNELS_DIR = d  # the positive control: the same kernel, as if it were this package's
    mine = build_foreign(8)  # (other options: not Triton's cached binary)
    out["foreign"] = dict(asks="evictionPolicy = evict_first" in fk.asm["ttgir"],
                          async_copies=fk.asm["ttgir"].count("async_copy_global_to_local"),
                          hinted=l2.POLICY_REG in fk.asm["ptx"],
                          hinted_as_ours=l2.POLICY_REG in mine.asm["ptx"])
print(json.dumps(out))
"""
FOREIGN = """
import triton
import triton.language as tl


@triton.jit
def gemm(a_ptr, b_ptr, c_ptr, K):
    offs = tl.arange(0, 64)
    acc = tl.zeros([64, 64], dtype=tl.float32)
    for k0 in range(0, K, 64):
        a = tl.load(a_ptr + offs[:, None] * K + (k0 + offs)[None, :], eviction_policy="evict_first")
        b = tl.load(b_ptr + (k0 + offs)[:, None] * 64 + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs[:, None] * 64 + offs[None, :], acc)
"""


pytestmark = pytest.mark.skipif(
    _triton_dir() is None,
    reason=f"triton is neither importable nor in ${TRITON_PATH_ENV} (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    path = os.pathsep.join(p for p in (str(REPO), _triton_dir(), os.environ.get("PYTHONPATH"))
                           if p)
    script = f"FOREIGN = {FOREIGN!r}\n{SCRIPT}"
    # a fresh Triton cache: the hook runs only when Triton compiles
    cache = tmp_path_factory.mktemp("triton_cache")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=path, TRITON_CACHE_DIR=str(cache)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = ["dense fp8 m16", "dense int8 m32", "moe gemm1 fp8", "moe gemm2 int8",
         "moe gemm1 int8 split"]


def test_hook_installs(compiled):
    assert compiled["installed"] is True


def test_other_packages_kernels_untouched(compiled):
    """A kernel outside this package that asks for the same policy on pipelined copies keeps
    Triton's own lowering (the hook is process-wide; vLLM's kernels compile through it too)."""
    r = compiled["foreign"]
    assert r["asks"] and r["async_copies"] > 0, r
    assert r["hinted_as_ours"], r  # it qualifies...
    assert not r["hinted"], r  # ...but is not this package's


@pytest.mark.parametrize("case", CASES)
def test_weight_copies_carry_the_policy_into_the_binary(compiled, case):
    r = compiled[case]
    assert r["plain_hinted"] == 0 and not r["plain_has_hint"], r
    # the weight nibbles are hinted; the activation and block-code copies are not
    assert 0 < r["hinted"] < r["copies"], r
    assert r["problem"] is None, r
    assert r["in_binary"] >= r["hinted"], r  # each PTX copy is one or more SASS copies


@pytest.mark.parametrize("case", CASES)
def test_check_sees_ptxas_losing_the_descriptor(compiled, case):
    """If this fails because ptxas got fixed, the shared-address trick in ``hint_copies`` may go
    (and Triton may keep the policy itself: triton-lang/triton PR 11848)."""
    r = compiled[case]
    assert r["raw_rewritten"], r
    assert r["raw_problem"] is not None, r


def _listing(*lines: str) -> str:
    body = "\n".join(f"        /*{16 * i:04x}*/                   {s} ;" for i, s in enumerate(lines))
    return "\t\tFunction : k\n" + body + "\n"


def test_check_on_listings():
    from w4a8_backend.kernels._triton_l2 import check_hinted_copies

    policy = ("UMOV UR4, 0xf0", "USHF.R.U32 UR4, UR4, 0x4, URZ", "UMOV UR5, 0x120",
              "USHF.L.U32 UR5, UR5, 0x14, URZ", "UMOV UR4, URZ")
    default = ("ULDC.64 UR16, c[0x0][0x208]",)
    good = _listing(*default, *policy, "LDGSTS.E.BYPASS.128 [R47], desc[UR4][R30.64]",
                    "LDGSTS.E.BYPASS.128 [R4+0xc000], desc[UR16][R24.64], P1")
    assert check_hinted_copies(good) == (1, None)
    clobbered = _listing(*default, *policy, "UMOV UR4, UR7",
                         "LDGSTS.E [R97+0x10000], desc[UR4][R34.64]")
    n, problem = check_hinted_copies(clobbered)
    assert n == 0 and "desc[UR4]" in problem and "UMOV UR4, UR7" in problem
    unset = _listing(*default, *policy, "LDGSTS.E.BYPASS.128 [R2+UR0], desc[UR1][R26.64]")
    n, problem = check_hinted_copies(unset)
    assert n == 0 and "desc[UR1]" in problem and "nothing" in problem
