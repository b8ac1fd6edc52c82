"""Load-time repacking of the SM90 kernels loses nothing (runs on CPU: pure torch)."""

from __future__ import annotations

import pytest
import torch

from w4a8_backend.formats import dequantize_mxfp4, quantize_mxfp4
from w4a8_backend.kernels._sm90_repack import (
    FP8_CODE_BIAS,
    INT8_CODE_BIAS,
    dequantize_repacked,
    int8_prefill_rows,
    repack_mxfp4,
    validate_checkpoint_tensors,
)


def _weights(n, k, spread, seed):
    g = torch.Generator().manual_seed(seed)
    blk = torch.randint(-spread, spread + 1, (n, k // 32), generator=g).float()
    w = torch.randn(n, k, generator=g) * torch.exp2(blk).repeat_interleave(32, 1)
    return quantize_mxfp4(w)


def _same(a, b):
    return torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))


@pytest.mark.parametrize("act_int8", [False, True], ids=["fp8", "int8"])
@pytest.mark.parametrize("n,k,spread", [(96, 160, 2), (128, 256, 12), (1056, 224, 30), (40, 4096, 1)])
def test_repack_is_exact(act_int8, n, k, spread):
    packed, scale = _weights(n, k, spread, n + k)
    scale[0, 0] = 0xFF
    scale[1, 0] = 0
    rp = repack_mxfp4(packed, scale, act_int8)
    assert _same(dequantize_repacked(rp), dequantize_mxfp4(packed, scale))
    assert rp.nan_blocks == 1 and rp.num_out_of_range >= 1  # the NaN block is never in range
    codes = rp.codes.to(torch.int32)
    nz = codes[codes > 0]
    lo, hi = (INT8_CODE_BIAS, INT8_CODE_BIAS + 3) if act_int8 else (FP8_CODE_BIAS - 5, FP8_CODE_BIAS + 6)
    assert int(nz.min()) >= lo and int(nz.max()) <= hi


@pytest.mark.parametrize("n,k,spread", [(96, 160, 2), (128, 2048, 1), (1056, 224, 30), (40, 4096, 6)])
def test_int8_prefill_rows_are_exact(n, k, spread):
    """The INT8 prefill path's per-row materialization (derived from the per-tile codes, as the
    kernel does) plus its side table gives back every weight; its table holds exactly the
    blocks outside the row window or outside the tile window."""
    packed, scale = _weights(n, k, spread, 3 * n + k)
    scale[0, 0] = 0xFF
    scale[1, 0] = 0
    rp = repack_mxfp4(packed, scale, act_int8=True)
    pf = int8_prefill_rows(packed, scale, rp)
    assert _same(dequantize_repacked(rp, prefill=pf), dequantize_mxfp4(packed, scale))
    listed = set()
    for i, row in enumerate(pf.corr_rows.tolist()):
        for j in range(int(pf.corr_ptr[i]), int(pf.corr_ptr[i + 1])):
            listed.add((row, int(pf.corr_blocks[j])))
    tile_listed = set()
    for i, row in enumerate(rp.corr_rows.tolist()):
        for j in range(int(rp.corr_ptr[i]), int(rp.corr_ptr[i + 1])):
            tile_listed.add((row, int(rp.corr_blocks[j])))
    assert tile_listed <= listed  # the main table's blocks are repeated
    s = scale.to(torch.int32)
    top = (pf.row_scale[:n].log2() + 131).to(torch.int32)
    for row, blk in listed - tile_listed:
        assert not 0 <= int(s[row, blk]) - int(top[row]) + 3 <= 3, (row, blk)
    if spread <= 1:  # blocks of a narrow row fit one 4-binade window, but for a few
        assert pf.num_out_of_range <= 0.01 * rp.num_blocks


def test_int8_prefill_rows_on_real_weights():
    """The trained all-MiniLM-L6-v2's encoder linears, quantized as the exporter does: one
    4-binade window per row adds well under the INT8 prefill path's limit of blocks to its side
    table (so real layers take the per-row GEMM), and the result stays exact."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from w4a8_backend.kernels.sm90_triton import DEFAULT_INT8_PREFILL_ROWS_MAX

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from embedding import minilm_dir

    tensors = load_file(str(minilm_dir() / "model.safetensors"))
    blocks = extra = 0
    for name, w in sorted(tensors.items()):
        if w.dim() != 2 or "embeddings" in name:
            continue
        packed, scale = quantize_mxfp4(w.float())
        rp = repack_mxfp4(packed, scale, act_int8=True)
        pf = int8_prefill_rows(packed, scale, rp)
        blocks += rp.num_blocks
        extra += pf.num_out_of_range - rp.num_out_of_range
        if name.endswith("layer.0.attention.self.query.weight"):
            assert _same(dequantize_repacked(rp, prefill=pf), dequantize_mxfp4(packed, scale))
    assert blocks > 300_000
    assert 0 < extra / blocks < DEFAULT_INT8_PREFILL_ROWS_MAX / 2, extra / blocks


def test_int8_prefill_rows_need_an_int8_repacking():
    packed, scale = _weights(8, 64, 1, 1)
    with pytest.raises(ValueError, match="act_int8"):
        int8_prefill_rows(packed, scale, repack_mxfp4(packed, scale, act_int8=False))


def test_narrow_spread_has_no_out_of_range_blocks():
    packed, scale = _weights(64, 2048, 1, 3)
    assert repack_mxfp4(packed, scale, False).num_out_of_range == 0
    packed, scale = _weights(64, 2048, 0, 3)
    rp = repack_mxfp4(packed, scale, True)
    assert rp.num_out_of_range <= 0.001 * rp.num_blocks


def test_fp8_window_keeps_the_majority():
    """One huge block must not push the rest of its row out of range."""
    packed, scale = _weights(4, 1024, 1, 4)
    scale[2, 5] = min(int(scale[2].max()) + 40, 254)
    rp = repack_mxfp4(packed, scale, False)
    assert rp.num_out_of_range == 1 and rp.corr_rows.tolist() == [2]


@pytest.mark.parametrize("act_int8", [False, True], ids=["fp8", "int8"])
def test_row_offsets_list_each_rows_side_table_blocks(act_int8):
    """The MoE CUDA kernels' per-row CSR (every row, empty ones included) points at exactly the
    blocks the side table lists for that row, and the dense values there equal the weights."""
    from w4a8_backend.kernels._sm90_repack import row_offsets

    packed, scale = _weights(96, 512, 14, 9)
    rp = repack_mxfp4(packed, scale, act_int8)
    assert rp.num_out_of_range > 0
    rows = rp.packed.shape[0]
    off = row_offsets(rp.corr_rows, rp.corr_ptr, rows)
    assert off.dtype == torch.int32 and off.shape == (rows + 1,)
    assert int(off[-1]) == rp.num_out_of_range
    listed = dict(zip(rp.corr_rows.tolist(), zip(rp.corr_ptr[:-1].tolist(),
                                                 rp.corr_ptr[1:].tolist())))
    dense = dequantize_mxfp4(packed, scale).reshape(96, 16, 32)
    for r in range(rows):
        a, b = int(off[r]), int(off[r + 1])
        assert (a, b) == listed.get(r, (a, a)), r
        for j in range(a, b):
            assert _same(rp.corr_values[j], dense[r, int(rp.corr_blocks[j])])
    empty = row_offsets(rp.corr_rows[:0], rp.corr_ptr[:1], 8)
    assert empty.tolist() == [0] * 9


def test_bad_tensors_are_named():
    with pytest.raises(ValueError, match="layer.weight"):
        validate_checkpoint_tensors(torch.zeros(4, 16), torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="layer.weight_scale"):
        validate_checkpoint_tensors(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))


# ---- CPU interpreter of the kernels' prmt-based decode (the inline PTX in triton_w4a8) ----
M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 default mode: bytes of {b, a}, selectors in the low 16 bits of c (bit 3 of
    a selector: replicate the selected byte's sign bit)."""
    src = (a & M32) | ((b & M32) << 32)
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def _lop3(a, b, c, lut):
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


_PTX_OPS = {
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "shr.u32": lambda a, b: (a & M32) >> b,
    "shl.b32": lambda a, b: (a << b) & M32,
    "prmt.b32": _prmt,
    "lop3.b32": _lop3,
}


def run_ptx(asm: str, args: list[int]) -> int:
    """Execute one of triton_w4a8's inline-PTX decode strings: ``$1..`` are ``args``, the
    result is ``$0``. Knows exactly the instructions the strings use (others fail)."""
    regs = {f"${i + 1}": a & M32 for i, a in enumerate(args)}
    for stmt in asm.strip().strip("{}").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        vals = [int(t, 0) if t[0].isdigit() else regs[t] for t in srcs]
        regs[dst] = _PTX_OPS[op](*vals) & M32
    return regs["$0"]


def _ptx_decode(w: int, tab: list[int], high: bool, act_int8: bool) -> int:
    from w4a8_backend.kernels import _decode_ptx

    asm = getattr(_decode_ptx, f"{'INT8' if act_int8 else 'FP8'}_{'HI' if high else 'LO'}")
    tables = [v for t in tab[: 4 if act_int8 else 2] for v in [t] * 4]  # pack=4: 4 regs each
    return run_ptx(asm, [w] + tables)


def test_word_layout_pins_the_bits():
    """The repacked word's bit positions, written out by hand (what the decode assumes)."""
    from w4a8_backend.formats.mxfp4 import pack_e2m1
    from w4a8_backend.kernels._sm90_repack import _repack_nibbles, unpack_repacked_codes

    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 1] = 0xF  # low element 1 of word 0: magnitude 7 at bits 4-6, sign at bit 15
    codes[0, 32 + 2] = 0x9  # high element 2 of word 0: magnitude 1 at bit 24, sign at bit 19
    codes[0, 4 * 3 + 0] = 0x3  # low element 0 of word 3: magnitude 3 at bits 0-1, no sign
    packed = _repack_nibbles(pack_e2m1(codes), 1, 64)
    words = packed.view(torch.int32)[0].tolist()
    assert [w & M32 for w in words] == [0x70 | 1 << 15 | 1 << 24 | 1 << 19, 0, 0, 3, 0, 0, 0, 0]
    assert torch.equal(unpack_repacked_codes(packed), codes)


@pytest.mark.parametrize("act_int8", [False, True], ids=["fp8", "int8"])
def test_prmt_decode_ptx_matches_dequantize(act_int8):
    """The kernels' decode strings, executed instruction by instruction on words of the
    repacked layout, give the exact E4M3 / int8 value of every element for every live code."""
    from w4a8_backend.formats import e2m1_to_float
    from w4a8_backend.kernels._sm90_repack import decode_lut, unpack_repacked_codes

    tab = decode_lut(act_int8).tolist()
    bias = INT8_CODE_BIAS if act_int8 else FP8_CODE_BIAS
    ds = range(0, 4) if act_int8 else range(-5, 7)
    g = torch.Generator().manual_seed(1)
    for d in ds:
        for _ in range(8):
            word = torch.randint(0, 256, (1, 4), generator=g, dtype=torch.int64).to(torch.uint8)
            w = int.from_bytes(bytes(word[0].tolist()), "little")
            # the layout's own reading of this word: a 64-group whose word 0 it is
            group = torch.zeros(1, 32, dtype=torch.uint8)
            group[0, :4] = word[0]
            codes = unpack_repacked_codes(group)[0]
            for high in (False, True):
                out = _ptx_decode(w, tab[d + bias], high, act_int8)
                for i in range(4):
                    code = codes[32 * high + i]
                    want = float(e2m1_to_float(code.reshape(1))) * (2.0 ** (d + (1 if act_int8 else 0)))
                    byte = (out >> (8 * i)) & 0xFF
                    if act_int8:
                        got = float(byte - 256 if byte > 127 else byte)
                    else:
                        got = float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())
                    assert got == want, (d, hex(w), high, i, got, want)
    # code 0: the main pass must contribute exact zeros
    assert all(_ptx_decode(M32, tab[0], h, act_int8) in (0, 0x80808080) for h in (0, 1))


@pytest.mark.parametrize("act_int8", [False, True], ids=["fp8", "int8"])
def test_kernel_table_arithmetic_matches_table(act_int8):
    """The kernels build each block's prmt tables from its code byte by integer arithmetic
    (triton_w4a8._lut_half); they must equal the exact tables of decode_lut for every code."""
    from w4a8_backend.kernels._sm90_repack import decode_lut

    tab = decode_lut(act_int8)
    m32 = 0xFFFFFFFF
    for c in range(32):
        if act_int8:
            live = c != 0 and 0 <= c - INT8_CODE_BIAS <= 3
            d = c - INT8_CODE_BIAS
            pos_lo = (0x03020100 << d) & m32 if live else 0
            pos_hi = (0x0C080604 << d) & m32 if live else 0
            want = [pos_lo, pos_hi, (0x01010000 - pos_lo) & m32 if live else 0,
                    (0x01010100 - pos_hi) & m32 if live else 0]
        else:
            live = c != 0 and -5 <= c - FP8_CODE_BIAS <= 6
            e = (c - 15) * 8
            want = [(e * 0x01010100 + 0x0C080000) & m32 if live else 0,
                    (e * 0x01010101 + 0x1C181410) & m32 if live else 0]
        got = [v & m32 for v in tab[c].tolist()]
        if live:
            assert got == want, (c, [hex(v) for v in got], [hex(v) for v in want])
        else:
            assert got == [0] * len(want)


def test_fp8_repacking_can_share_the_int8_nibbles():
    """The word-layout nibbles do not depend on the mode: an INT8 layer's FP8 repacking (the
    split path) reuses them instead of building a second copy, and is otherwise the same."""
    packed, scale = _weights(96, 512, 4, 9)
    i8 = repack_mxfp4(packed, scale, act_int8=True)
    fp = repack_mxfp4(packed, scale, act_int8=False)
    shared = repack_mxfp4(packed, scale, act_int8=False, packed=i8.packed)
    assert torch.equal(fp.packed, i8.packed) and shared.packed is i8.packed
    for name, t in fp.tensors().items():
        assert torch.equal(getattr(shared, name), t), name
