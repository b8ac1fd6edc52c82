"""L2 eviction policies on the copies that Triton pipelines (imports triton: GPU machines only).

A kernel asks for ``tl.load(..., eviction_policy="evict_first")`` on weights that it streams
once. Triton 3.6 keeps that request in its TTGIR (``evictionPolicy = evict_first`` on
``ttg.async_copy_global_to_local``) but drops it when it lowers the pipelined copies to
``cp.async`` (triton-lang/triton PR 11660: ptxas of CUDA 12.8-13.1 can lose the cache-policy
descriptor of such copies). Without it the streamed weight lines evict other lines from the L2
first, dirty ones included; on the CUDA decode kernels the same policy was worth 2-4 % inside a
decode step and 10 % with an L2 of dirty lines (docs/kernels.md, "Weight copies with an L2
evict_first policy").

:func:`install` adds a stage hook to Triton's compiler (``knobs.runtime.
add_stages_inspection_hook``, chained with any hook already there) that restores the request:

1. before the TTGIR is lowered, it finds the kernel's pointer arguments that feed only
   ``evict_first`` async copies (data flow through pointer arithmetic; a loaded value ends a
   path);
2. in the PTX it gives every ``cp.async`` whose source address comes from those arguments an
   ``.L2::cache_hint`` operand, with the ``createpolicy.fractional.L2::evict_first`` policy made
   right before the copy, and the copy's shared-memory address made opaque to ptxas's
   uniform-register split (``hint_copies``: without that, ptxas 12.9 and 13.0 emit the copies
   with descriptors they never write, the defect that made Triton drop the hint);
3. it reads the cubin's SASS (``cuobjdump``) and checks every hinted copy's descriptor
   (``check_hinted_copies``); if one is wrong or the check cannot run, it compiles the
   unmodified PTX instead (logged).

Kernels that ask for nothing, and kernels of other packages (``ours``), are compiled untouched.
The request is part of the kernel's source, so Triton's cache keys the two forms apart.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile

logger = logging.getLogger("vllm.w4a8_mxfp4")

POLICY_REG = "%w4a8_l2p"
ADDR_REG = "%w4a8_smem"
ZERO_REG = "%w4a8_zero"
LANES_REG = "%w4a8_lanes"

KERNELS_DIR = os.path.dirname(os.path.realpath(__file__))

# TTGIR
_FUNC_LOC = re.compile(r'^#loc = loc\("([^"]+)":\d+:\d+\)', re.M)
_FUNC = re.compile(r"tt\.func public @(\w+)\((.*?)\) attributes", re.S)
_ARG = re.compile(r"%(\w+): (\S+)")
_DEF = re.compile(r"^\s*(%[\w:#, %]+?) = (.*)$")
_SSA = re.compile(r"%(\w+)")
_ITER_ARG = re.compile(r"%(\w+) = %(\w+)")
_ASYNC_COPY = re.compile(r"ttg\.async_copy_global_to_local %(\w+)")
# PTX
_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?);\s*$")
_PTX_REG = re.compile(r"%\w+")
_PARAM = re.compile(r"\[(\w+)_param_(\d+)\]")
_PTR_PARAM = re.compile(r"\.param \.u64 \.ptr[^\n]*_param_(\d+)")
# [pred] cp.async.{ca,cg}.shared.global [%r + d], [%rd + d], size[, src-size];
_CP_ASYNC = re.compile(
    r"^(\s*(?:@!?%\w+\s+)?)cp\.async\.(ca|cg)\.shared\.global(\s+)\[\s*(%r\d+)([^\]]*)\],"
    r"\s*\[\s*(%rd\d+)([^\]]*)\],\s*([^,;]+?)(?:,\s*([^,;]+?))?;\s*$")
# SASS
_SASS_INS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][^;]*);")
_SASS_DESC = re.compile(r"desc\[UR(\d+)\]")
_SASS_UR_DEF = re.compile(r"([A-Z][A-Z0-9_.]*)\s+UR(\d+)\b")
_NO_DEST = ("st.", "cp.", "red.", "bar", "bra", "ret", "fence", "prefetch", "wgmma.fence",
            "wgmma.commit", "wgmma.wait", "mbarrier.init", "mbarrier.arrive", "griddepcontrol",
            "membar", "exit", "trap")


def _reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(edges.get(v, ()))
    return seen


def streamed_arguments(ttgir: str) -> list[int]:
    """Indices of the kernel arguments (pointers) that feed ``evict_first`` async copies and no
    other async copy."""
    func = _FUNC.search(ttgir)
    if func is None or "evictionPolicy = evict_first" not in ttgir:
        return []
    args = [(m.group(1), m.group(2)) for m in _ARG.finditer(func.group(2))]
    pointers = {name for name, ty in args if ty.startswith("!tt.ptr")}
    edges: dict[str, set[str]] = {}
    for line in ttgir[func.end():].splitlines():
        m = _DEF.match(line)
        if m is None:
            continue
        results = [r.split(":")[0].split("#")[0] for r in _SSA.findall(m.group(1))]
        rhs = m.group(2)
        op = rhs.split(" ", 1)[0]
        if "load" in op or "atomic" in op:
            continue  # a loaded value is data, not an address
        if op == "scf.for":  # loop-carried values start from their initial ones
            for block_arg, init in _ITER_ARG.findall(rhs.split("iter_args", 1)[-1]):
                edges.setdefault(block_arg, set()).add(init)
        operands = set(_SSA.findall(rhs.split(" : ", 1)[0]))
        for r in results:
            edges.setdefault(r, set()).update(operands)
    streamed, kept = set(), set()
    for line in ttgir.splitlines():
        m = _ASYNC_COPY.search(line)
        if m:
            roots = _reach(edges, m.group(1)) & pointers
            (streamed if "evictionPolicy = evict_first" in line else kept).update(roots)
    names = [name for name, _ in args]
    return sorted(names.index(n) for n in streamed - kept)


def hint_copies(ptx: str, params: list[int]) -> tuple[str, int]:
    """``ptx`` with an L2 evict_first policy on every ``cp.async`` whose source address comes
    from the kernel parameters ``params`` (indices) and no other pointer parameter; and how many
    copies got it.

    Each hinted copy's shared-memory address goes through ``xor`` with a per-thread zero
    (``lanemask_lt & lanemask_gt``). Without it ptxas (12.9 and 13.0) splits the address into a
    register plus a uniform register and encodes the copy with a uniform base and descriptor
    that it never writes (the SASS of ``_moe_gemm``: ``LDGSTS [R2+UR0], desc[UR1]``, the policy
    built in UR4:UR5 and then overwritten); with a plain register address it emits the form the
    CUDA decode kernels get (``LDGSTS [R47], desc[UR4]``)."""
    lines = ptx.splitlines()
    edges: dict[str, set[str]] = {}
    roots: dict[str, set[int]] = {}
    pointer_params: set[int] = set()
    for line in lines:
        p = _PTR_PARAM.search(line)
        if p:
            pointer_params.add(int(p.group(1)))
        m = _INSTR.match(line)
        if m is None:
            continue
        op, operands = m.group(1), m.group(2)
        if op.startswith(_NO_DEST) or not operands:
            continue
        dest, _, src = operands.partition(",")
        dests = _PTX_REG.findall(dest)
        if op.startswith("ld.param"):
            param = _PARAM.search(src)
            for d in dests:
                roots.setdefault(d, set()).add(int(param.group(2)) if param else -1)
        elif op.startswith("ld.") or op.startswith("atom."):
            continue  # a loaded value is data, not an address
        else:
            regs = set(_PTX_REG.findall(src))
            for d in dests:
                edges.setdefault(d, set()).update(regs)
    wanted = set(params)
    out, hinted, body = [], 0, False
    for line in lines:
        m = _CP_ASYNC.match(line)
        if m:
            pred, kind, sp, dst, disp_dst, src, disp_src, size, src_size = m.groups()
            found = set()
            for reg in _reach(edges, src):
                found |= roots.get(reg, set())
            found &= pointer_params
            if found and found <= wanted:
                out.append(f"\txor.b32 {ADDR_REG}, {dst}, {ZERO_REG};")
                out.append(f"\tcreatepolicy.fractional.L2::evict_first.b64 {POLICY_REG}, 1.0;")
                out.append(f"{pred}cp.async.{kind}.shared.global.L2::cache_hint{sp}"
                           f"[ {ADDR_REG}{disp_dst}], [ {src}{disp_src}], {size}, "
                           f"{src_size or size}, {POLICY_REG};")
                hinted += 1
                continue
        out.append(line)
        if not body and line.strip() == "{":  # the kernel body: its registers, the zero
            out += [f"\t.reg .b64 \t{POLICY_REG};", f"\t.reg .b32 \t{ADDR_REG}, {ZERO_REG}, "
                    f"{LANES_REG}<2>;", f"\tmov.u32 \t{LANES_REG}0, %lanemask_lt;",
                    f"\tmov.u32 \t{LANES_REG}1, %lanemask_gt;",
                    f"\tand.b32 \t{ZERO_REG}, {LANES_REG}0, {LANES_REG}1;"]
            body = True
    return "\n".join(out) + "\n", hinted


def check_hinted_copies(sass: str) -> tuple[int, str | None]:
    """(how many copies of a ``cuobjdump -sass`` listing carry an L2 policy, why they cannot be
    trusted or None). A copy's descriptor pair (``LDGSTS ... desc[URn]``) must hold what it was
    last given in listing order: the default memory descriptor (``ULDC.64 URn, c[0x0][0x208]``)
    or a policy, whose low word ptxas zeroes (``UMOV URn, URZ``) after building the high word in
    URn+1."""
    hinted = 0
    for func in sass.split("Function : ")[1:]:
        name = func.partition("\n")[0].strip()
        last: dict[int, str] = {}
        for line in func.splitlines():
            ins = _SASS_INS.search(line)
            if ins is None:
                continue
            text = ins.group(1).strip()
            copy = _SASS_DESC.search(text) if text.startswith("LDGSTS") else None
            if copy:
                n = int(copy.group(1))
                low, high = last.get(n, ""), last.get(n + 1, "")
                if low == f"UMOV UR{n}, URZ" and high:
                    hinted += 1
                elif not (low.startswith("ULDC.64") and "c[0x0][0x208]" in low):
                    return hinted, (f"{name}: {text} reads desc[UR{n}] last written by "
                                    f"{low or 'nothing'!r}")
                continue
            w = _SASS_UR_DEF.match(text)
            if w:
                n = int(w.group(2))
                last[n] = text
                if ".64" in w.group(1):
                    last[n + 1] = text
    return hinted, None


def _sass_problem(cubin: bytes) -> str | None:
    """Why the hinted copies of ``cubin`` cannot be trusted, or None."""
    try:
        from triton import knobs
        cuobjdump = knobs.nvidia.cuobjdump.path
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot check
        return f"no cuobjdump to check the hinted copies ({exc})"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cuobjdump -sass failed: {proc.stderr[-300:]}"
    hinted, problem = check_hinted_copies(proc.stdout)
    if problem is None and hinted == 0:
        problem = "ptxas left no copy with the policy"
    return problem


def ours(ttgir: str) -> bool:
    """Whether the kernel of ``ttgir`` is defined in this package (its location; Triton names
    the function's source file unless line info is off, and then nothing is hinted). Other
    libraries' kernels in the same process are left as Triton compiles them."""
    m = _FUNC_LOC.search(ttgir)
    return m is not None and os.path.dirname(os.path.realpath(m.group(1))) == KERNELS_DIR


def _hook(backend, stages, options, language, capability) -> None:
    if capability < 80 or not {"llir", "ptx", "cubin"} <= stages.keys():
        return
    make_llir, make_ptx, make_cubin = stages["llir"], stages["ptx"], stages["cubin"]
    state: dict = {}  # one compilation: these closures are made per compile

    def llir(src, metadata):
        ttgir = str(src)
        state["params"] = streamed_arguments(ttgir) if ours(ttgir) else []
        return make_llir(src, metadata)

    def ptx(src, metadata):
        plain = make_ptx(src, metadata)
        if not state.get("params"):
            return plain
        hinted, count = hint_copies(plain, state["params"])
        if count == 0:
            return plain
        state["plain"] = plain
        return hinted

    def cubin(src, metadata):
        binary = make_cubin(src, metadata)
        if "plain" not in state:
            return binary
        problem = _sass_problem(binary)
        if problem is None:
            return binary
        logger.warning("%s: compiled without the L2 evict_first hint (%s)",
                       metadata.get("name"), problem)
        return make_cubin(state["plain"], metadata)

    stages["llir"], stages["ptx"], stages["cubin"] = llir, ptx, cubin


def install() -> bool:
    """Add the hook to Triton's compiler once (chained with an existing one); False when this
    Triton has no stage hook or ``W4A8_SM90_L2_HINT=0``."""
    if os.environ.get("W4A8_SM90_L2_HINT", "1") == "0":
        return False
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = knobs.runtime
    if not hasattr(runtime, "add_stages_inspection_hook"):
        return False
    previous = runtime.add_stages_inspection_hook
    if getattr(previous, "_w4a8_l2", False):
        return True

    def hook(backend, stages, options, language, capability):
        if previous is not None:
            previous(backend, stages, options, language, capability)
        _hook(backend, stages, options, language, capability)

    hook._w4a8_l2 = True
    runtime.add_stages_inspection_hook = hook
    return True
