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
    from w4a8_backend.kernels._sm90_moe_cuda import row_offsets

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


# ---- CPU emulation of the kernels' prmt-based decode (the inline PTX in triton_w4a8) ----
def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 default mode: bytes of {b, a}, selectors in the low 16 bits of c."""
    src = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
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


def _sel(w, high):
    x = ((w >> 4) if high else w) & 0x07070707
    y = x | (x >> 4)
    return _prmt(y, 0, 0x0020)


def _decode_word(w, tab, high, act_int8):
    s = _sel(w, high)
    u = lambda v: v & 0xFFFFFFFF  # noqa: E731
    if act_int8:
        p = _prmt(u(tab[0]), u(tab[1]), s)
        n = _prmt(u(tab[2]), u(tab[3]), s)
        m = _prmt(w if high else (w << 4) & 0xFFFFFFFF, 0, 0xBA98)
        return _lop3(p, n, m, 0xD8)
    t = _prmt(u(tab[0]), u(tab[1]), s)
    return _lop3(t, w if high else (w << 4) & 0xFFFFFFFF, 0x80808080, 0xF8)


@pytest.mark.parametrize("act_int8", [False, True], ids=["fp8", "int8"])
def test_prmt_decode_emulation_matches_dequantize(act_int8):
    from w4a8_backend.formats import e2m1_to_float
    from w4a8_backend.kernels._sm90_repack import decode_lut

    tab = decode_lut(act_int8).tolist()
    bias = INT8_CODE_BIAS if act_int8 else FP8_CODE_BIAS
    ds = range(0, 4) if act_int8 else range(-5, 7)
    g = torch.Generator().manual_seed(1)
    for d in ds:
        for _ in range(8):
            w = int(torch.randint(0, 2**32, (1,), generator=g, dtype=torch.int64))
            for high in (False, True):
                out = _decode_word(w, tab[d + bias], high, act_int8)
                for i in range(4):
                    code = (w >> (8 * i + (4 if high else 0))) & 0xF
                    want = float(e2m1_to_float(torch.tensor([code]))) * (2.0 ** (d + (1 if act_int8 else 0)))
                    byte = (out >> (8 * i)) & 0xFF
                    if act_int8:
                        got = float(byte - 256 if byte > 127 else byte)
                    else:
                        got = float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())
                    assert got == want, (d, hex(w), high, i, got, want)
    # code 0: the main pass must contribute exact zeros
    assert all(_decode_word(0xFFFFFFFF, tab[0], h, act_int8) in (0, 0x80808080) for h in (0, 1))


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
