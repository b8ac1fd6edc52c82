"""Load-time repacking of MXFP4 weights for the SM90/SM89/SM80 W4A8 kernels (pure torch).

Everything here runs once per layer in ``process_weights_after_loading`` (on the weight's device,
CPU included, so it is unit-testable without a GPU). The GEMM kernels in ``triton_w4a8`` consume
the result. See docs/kernels.md for the full description; in short:

Word layout
    K is padded to a multiple of ``K_ALIGN`` (512) and N to a multiple of ``N_ALIGN`` (128), with
    zero codes. Each group of 64 consecutive K elements is 8 little-endian 32-bit words; word
    ``i`` holds the "low" elements ``4i + j`` and the "high" elements ``32 + 4i + j`` (j = 0..3),
    so the low elements of a 32-byte run are one whole MX block and the high ones the next: a
    kernel splits a K tile into a low and a high half, each made of whole MX blocks. Within the
    word the bits sit where the decode wants them (``WORD_BITS``): the 3 magnitude bits of low
    element j at bit ``4j`` and of high element j at ``16 + 4j`` (the four 3-bit selectors of one
    ``prmt`` each, after ``& 0x77777777`` and, for the high half, ``>> 16``), the sign of low
    element j at bit ``8j + 7`` and of high element j at ``8j + 3`` (each byte's top bit, as the
    output byte wants it, directly or after ``<< 4``). About 1 instruction per weight to decode,
    instead of ~1.75 with one element per nibble in memory order.

Exponent folding (FP8 activations, E4M3 tensor cores)
    Each row n gets a reference exponent ``r[n]``; block b's E8M0 exponent ``e = s - 127`` becomes
    the offset ``d = e - r[n]``. For ``d`` in [-5, 6] every E2M1 value times ``2**d`` is exactly
    a normal E4M3 number (0.5 * 2**-5 = 2**-6 is E4M3's smallest normal, 6 * 2**6 = 384 <= 448)
    whose bits follow from the code by integer arithmetic, so the kernel builds exact E4M3
    weights in registers and the epilogue multiplies by ``2**r[n]``. (E4M3 subnormals would
    stretch this to [-8, 6]; the kernel does not use them, to keep the decode table arithmetic.)
    ``r[n]`` is the 12-binade window holding the most blocks of the row (ties: the highest).

Exponent folding (INT8 activations, INT8 tensor cores)
    ``2 * E2M1`` is an integer in [-12, 12], so ``(2 * v) << d`` is an exact int8 for ``d`` in
    [0, 3] (|12 << 3| = 96 <= 127). Four binades are too few for a whole row, so the reference is
    per (row, 256-wide K tile): ``t[n, i]``; the kernel accumulates each tile's exact int32 dot,
    converts it to float32 (exact: |sum| < 2**24) and adds it times ``2**(t[n, i] - 1)``.

Per-block code byte (both modes)
    ``code = d + 21`` (FP8) or ``d + 22`` (INT8): the exponent field of the float16 multiplier
    ``2**(d + 6)`` / ``2**(d + 7)`` that the kernel applies to ``E2M1 * 2**-6`` (the E4M3 reading
    of the nibble). ``code = 0`` (multiplier 0) marks a block the main kernel must skip.

INT8 prefill: one reference per row
    The materialized prefill weight (``triton_w4a8.materialize``) can instead use one 4-binade
    window per row, ``top[n]``, so that the dense INT8 GEMM accumulates in int32 over the whole
    K and rescales once in the epilogue (|sum| <= K * 127 * 96 < 2**31 for K < 176k). Blocks
    outside the row's window go to a second side table (``Int8PrefillRows``), which also
    repeats the main table's blocks. The block's per-row code is derived in the kernel from the
    per-tile one: ``code_row = code + tile_exp[i, n] - row_exp[n]`` (both biased exponents).

Out-of-range blocks (nothing is silently clamped)
    A block whose offset falls outside the exact range, whose E8M0 byte is 0xFF (NaN), or whose
    reference would leave float32's normal range, gets ``code = 0`` in the main pass and is listed
    in a row-compressed side table with its exact float32 values; the GEMMs add
    ``x[:, block] @ values`` to the output rows (in their epilogues, or a correction kernel
    after the dense Triton GEMM). The count is logged at load.
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats.mxfp4 import (
    BLOCK_SIZE,
    E8M0_BIAS,
    E8M0_NAN,
    e2m1_to_float,
    e8m0_to_float,
    unpack_e2m1,
)

K_ALIGN = 512  # keeps every row stride the kernels use (KP/2, KP/32) a multiple of 16 bytes
N_ALIGN = 128
INT8_TILE = 256  # K width of one INT8 reference exponent (8 MX blocks)
FP8_D_MIN, FP8_D_MAX = -5, 6
INT8_D_MIN, INT8_D_MAX = 0, 3
FP8_CODE_BIAS = 21  # float16 exponent field of 2**(d+6): d + 6 + 15
INT8_CODE_BIAS = 22  # float16 exponent field of 2**(d+7): d + 7 + 15


@dataclasses.dataclass
class RepackedMxfp4:
    """What the kernels read. Shapes use the padded sizes NP, KP."""

    act_int8: bool
    n: int
    k: int
    packed: torch.Tensor  # uint8 [NP, KP/2], word layout above
    codes: torch.Tensor  # uint8 [NP, KP/32]
    row_scale: torch.Tensor  # FP8: float32 [NP] = 2**r ; INT8: uint8 [KP/256, NP] biased exponent
    corr_rows: torch.Tensor  # int32 [R]: rows with out-of-range blocks
    corr_ptr: torch.Tensor  # int32 [R + 1]: CSR offsets into corr_blocks
    corr_blocks: torch.Tensor  # int32 [B]: block index (K offset / 32)
    corr_values: torch.Tensor  # float32 [B, 32]: exact weight values of those blocks
    num_blocks: int  # N * K / 32 (unpadded)
    nan_blocks: int

    @property
    def num_out_of_range(self) -> int:
        return int(self.corr_blocks.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "packed": self.packed,
            "codes": self.codes,
            "row_scale": self.row_scale,
            "corr_rows": self.corr_rows,
            "corr_ptr": self.corr_ptr,
            "corr_blocks": self.corr_blocks,
            "corr_values": self.corr_values,
        }


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def validate_checkpoint_tensors(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[int, int]:
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise ValueError(
            f"layer.weight must be packed MXFP4 uint8 [N, K/2], got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )
    n, k = weight.shape[0], weight.shape[1] * 2
    if k % BLOCK_SIZE:
        raise ValueError(f"layer.weight: K={k} is not a multiple of {BLOCK_SIZE}")
    if weight_scale.dtype != torch.uint8 or tuple(weight_scale.shape) != (n, k // BLOCK_SIZE):
        raise ValueError(
            f"layer.weight_scale must be E8M0 uint8 {(n, k // BLOCK_SIZE)} for weight "
            f"{tuple(weight.shape)}, got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    return n, k


# (magnitude shift, sign bit) of element j of a word's low [0] and high [1] half
WORD_BITS = (tuple((4 * j, 8 * j + 7) for j in range(4)),
             tuple((16 + 4 * j, 8 * j + 3) for j in range(4)))


def _repack_nibbles(weight: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    n, k = weight.shape[0], weight.shape[1] * 2
    codes = unpack_e2m1(weight)  # [N, K] uint8
    codes = torch.nn.functional.pad(codes, (0, k_pad - k, 0, n_pad - n))
    groups = codes.reshape(n_pad, k_pad // 64, 2, 8, 4)  # [row, group, half, word, j]
    # byte by byte in uint8: no wider temporaries of the whole weight (large MoE layers)
    out = torch.zeros(n_pad, k_pad // 64, 8, 4, dtype=torch.uint8, device=weight.device)
    for half, bits in enumerate(WORD_BITS):
        for j, (mag_at, sign_at) in enumerate(bits):
            c = groups[:, :, half, :, j]
            out[..., mag_at // 8] |= (c & 7) << (mag_at % 8)
            out[..., sign_at // 8] |= (c >> 3) << (sign_at % 8)
    return out.reshape(n_pad, k_pad // 2)


def unpack_repacked_codes(packed: torch.Tensor) -> torch.Tensor:
    """The E2M1 codes ``[NP, KP]`` (uint8, sign at bit 3) of a repacked ``packed [NP, KP/2]``."""
    n_pad, k_pad = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(n_pad, k_pad // 64, 8, 4)
    halves = [torch.stack([((b[..., mag_at // 8] >> (mag_at % 8)) & 7)
                           | (((b[..., sign_at // 8] >> (sign_at % 8)) & 1) << 3)
                           for mag_at, sign_at in bits], dim=-1) for bits in WORD_BITS]
    return torch.stack(halves, dim=2).reshape(n_pad, k_pad)


def _best_window(exps: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """Per row of ``exps`` (int, [R, B]): the top ``t`` maximizing #{valid e in [t-width+1, t]}.

    Candidates are the row's own valid exponents; ties go to the largest. Rows with no valid
    entry get 0. Works on [R, B] with B small or large (histogram over the 256 E8M0 codes).
    """
    r, b = exps.shape
    hist = torch.zeros(r, 256 + width, dtype=torch.int32, device=exps.device)
    idx = torch.where(valid, exps, torch.full_like(exps, 255)).long() + width  # invalid -> unused bin
    hist.scatter_add_(1, idx, valid.to(torch.int32))
    csum = hist.cumsum(1)
    # count for top t (E8M0 code) = csum[t + width] - csum[t]
    tops = torch.arange(256, device=exps.device)
    counts = csum[:, tops + width] - csum[:, tops]
    present = hist[:, width : width + 256] > 0
    score = torch.where(present, counts * 512 + tops, torch.full_like(counts, -1))
    best = score.argmax(1)
    return torch.where(score.amax(1) >= 0, best, torch.zeros_like(best)).to(torch.int32)


def repack_mxfp4(
    weight: torch.Tensor, weight_scale: torch.Tensor, act_int8: bool,
    packed: torch.Tensor | None = None,
) -> RepackedMxfp4:
    """Repack checkpoint MXFP4 tensors for the W4A8 kernels (see the module docstring).
    ``packed``: the word-layout nibbles of the same weight from a repacking in the other mode
    (they do not depend on it), shared instead of built again."""
    n, k = validate_checkpoint_tensors(weight, weight_scale)
    dev = weight.device
    n_pad, k_pad = _round_up(n, N_ALIGN), _round_up(k, K_ALIGN)
    kb, kb_pad = k // BLOCK_SIZE, k_pad // BLOCK_SIZE
    s = weight_scale.to(torch.int32)
    is_nan = s == E8M0_NAN
    finite = ~is_nan

    if act_int8:
        # Per (row, 8-block tile) window of 4 binades.
        s_t = torch.nn.functional.pad(s, (0, kb_pad - kb), value=0)
        f_t = torch.nn.functional.pad(finite, (0, kb_pad - kb), value=False)
        bpt = INT8_TILE // BLOCK_SIZE  # blocks per tile
        tiles = kb_pad // bpt
        s4 = s_t.reshape(n, tiles, bpt)
        f4 = f_t.reshape(n, tiles, bpt)
        # candidate tops: each block's exponent; count blocks within [top-3, top]
        diff = s4[:, :, None, :] - s4[:, :, :, None]  # [n, t, cand, blk] = s_blk - s_cand
        inwin = (diff <= 0) & (diff >= -(INT8_D_MAX - INT8_D_MIN)) & f4[:, :, None, :]
        counts = inwin.sum(-1)  # [n, t, cand]
        score = torch.where(f4, counts * 512 + s4, torch.full_like(counts, -1))
        best = score.argmax(-1, keepdim=True)
        top = torch.gather(s4, -1, best).squeeze(-1)
        top = torch.where(score.amax(-1) >= 0, top, torch.full_like(top, 5))
        # The tile scale 2**(top - 3 - 127 - 1) must be a normal float32: top in [5, 257].
        top = top.clamp(min=5)
        d = s4 - top[:, :, None] + INT8_D_MAX  # [n, t, 4]
        in_range = f4 & (d >= INT8_D_MIN) & (d <= INT8_D_MAX)
        code = torch.where(in_range, d + INT8_CODE_BIAS, torch.zeros_like(d)).reshape(n, kb_pad)
        # biased float32 exponent of 2**(top - 131)
        tile_exp = (top - 131 + 127).to(torch.uint8)
        # tile-major, so that a K step reads one contiguous run of BN exponents
        row_scale = torch.zeros(tiles, n_pad, dtype=torch.uint8, device=dev)
        row_scale[:, :n] = tile_exp.t()
        in_range = in_range.reshape(n, kb_pad)[:, :kb]
        code = code[:, :kb]
    else:
        top = _best_window(s, finite, FP8_D_MAX - FP8_D_MIN + 1)
        # 2**r with r = top - 127 - 6 must be a normal float32: top >= 7.
        top = top.clamp(min=7)
        d = s - top[:, None] + FP8_D_MAX
        in_range = finite & (d >= FP8_D_MIN) & (d <= FP8_D_MAX)
        code = torch.where(in_range, d + FP8_CODE_BIAS, torch.zeros_like(d))
        r = (top - E8M0_BIAS - FP8_D_MAX).to(torch.float32)
        row_scale = torch.zeros(n_pad, dtype=torch.float32, device=dev)
        row_scale[:n] = torch.exp2(r)

    codes = torch.zeros(n_pad, kb_pad, dtype=torch.uint8, device=dev)
    codes[:n, :kb] = code.to(torch.uint8)

    corr_rows, corr_ptr, corr_blocks, corr_values = _side_table(~in_range, weight, weight_scale)
    return RepackedMxfp4(
        act_int8=act_int8,
        n=n,
        k=k,
        packed=_repack_nibbles(weight, n_pad, k_pad) if packed is None else packed,
        codes=codes,
        row_scale=row_scale,
        corr_rows=corr_rows,
        corr_ptr=corr_ptr,
        corr_blocks=corr_blocks,
        corr_values=corr_values,
        num_blocks=n * kb,
        nan_blocks=int(is_nan.sum()),
    )


def _side_table(out: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor):
    """CSR by row of the blocks marked in ``out`` [N, K/32]: (rows, ptr, blocks, exact float32
    values [B, 32])."""
    dev = weight.device
    rows_hit = out.any(1)
    rows = rows_hit.nonzero().flatten().to(torch.int32)
    ptr = torch.zeros(rows.numel() + 1, dtype=torch.int32, device=dev)
    ptr[1:] = out.sum(1)[rows_hit].to(torch.int32).cumsum(0)
    rr, bb = out.nonzero(as_tuple=True)  # row-major order: matches the CSR offsets
    if rr.numel():
        cols = bb.unsqueeze(1) * 16 + torch.arange(16, device=dev)
        vals = e2m1_to_float(unpack_e2m1(weight[rr.unsqueeze(1), cols]))  # [B, 32]
        values = (vals * e8m0_to_float(weight_scale[rr, bb])[:, None]).contiguous()
    else:
        values = torch.zeros(0, BLOCK_SIZE, dtype=torch.float32, device=dev)
    return rows, ptr, bb.to(torch.int32).contiguous(), values


def row_offsets(corr_rows: torch.Tensor, corr_ptr: torch.Tensor, rows: int) -> torch.Tensor:
    """The side table (listed rows + CSR over them) as a CSR over every row, the form the CUDA
    kernels' epilogues read: ``int32 [rows + 1]``; row r's out-of-range blocks are
    ``[out[r], out[r + 1])``."""
    counts = torch.zeros(rows, dtype=torch.int32, device=corr_rows.device)
    if corr_rows.numel():
        counts[corr_rows.long()] = (corr_ptr[1:] - corr_ptr[:-1]).to(torch.int32)
    out = torch.zeros(rows + 1, dtype=torch.int32, device=corr_rows.device)
    out[1:] = counts.cumsum(0)
    return out


@dataclasses.dataclass
class Int8PrefillRows:
    """The INT8 prefill path's per-row reference (module docstring) and its side table."""

    row_scale: torch.Tensor  # float32 [NP]: 2**(top[n] - 131), a normal power of two
    corr_rows: torch.Tensor
    corr_ptr: torch.Tensor
    corr_blocks: torch.Tensor
    corr_values: torch.Tensor

    @property
    def num_out_of_range(self) -> int:
        return int(self.corr_blocks.numel())


def int8_prefill_rows(
    weight: torch.Tensor, weight_scale: torch.Tensor, rp: RepackedMxfp4
) -> Int8PrefillRows:
    """Per-row 4-binade windows for the materialized INT8 prefill weight of ``rp`` (an INT8
    repacking of the same tensors). A block is kept there only if it is in range for both its
    tile (``rp.codes``) and its row; all others are listed in the returned side table."""
    if not rp.act_int8:
        raise ValueError("int8_prefill_rows needs an INT8 repacking (act_int8=True)")
    n, kb = rp.n, rp.k // BLOCK_SIZE
    s = weight_scale.to(torch.int32)
    finite = s != E8M0_NAN
    top = _best_window(s, finite, INT8_D_MAX - INT8_D_MIN + 1).clamp(min=5)
    d = s - top[:, None] + INT8_D_MAX
    in_row = finite & (d >= INT8_D_MIN) & (d <= INT8_D_MAX)
    kept = in_row & (rp.codes[:n, :kb] != 0)
    row_scale = torch.zeros(rp.packed.shape[0], dtype=torch.float32, device=weight.device)
    row_scale[:n] = torch.exp2((top - 131).to(torch.float32))
    return Int8PrefillRows(row_scale, *_side_table(~kept, weight, weight_scale))


def dequantize_repacked(rp: RepackedMxfp4, prefill: Int8PrefillRows | None = None) -> torch.Tensor:
    """Decode the repacked form back to float32 ``[N, K]`` exactly as the kernels see it
    (main pass + correction; with ``prefill``, the INT8 prefill path's per-row materialization
    and its table). Used by CPU tests to prove the repacking loses nothing."""
    n_pad, k_pad = rp.packed.shape[0], rp.packed.shape[1] * 2
    v = e2m1_to_float(unpack_repacked_codes(rp.packed)).reshape(n_pad, k_pad // 32, 32)
    c = rp.codes.to(torch.int32)
    table = rp
    if prefill is not None:
        # the kernel's arithmetic: code_row = code + tile_exp - row_exp, kept if in [0, 3] + bias
        row_exp = (prefill.row_scale.view(torch.int32) >> 23).reshape(n_pad, 1)
        tile_exp = rp.row_scale.t().to(torch.int32).repeat_interleave(INT8_TILE // 32, dim=1)
        c_row = c + tile_exp - row_exp
        live = (c != 0) & (c_row >= INT8_CODE_BIAS) & (c_row <= INT8_CODE_BIAS + INT8_D_MAX)
        c = torch.where(live, c_row, torch.zeros_like(c))
        w = v * (torch.exp2((c - INT8_CODE_BIAS).float()) * 2.0)[:, :, None]
        w = w * prefill.row_scale[:, None, None]
        table = prefill
    elif rp.act_int8:
        d = c - INT8_CODE_BIAS
        tile_e = rp.row_scale.t().to(torch.int32) - 127  # 2**(top-131)
        mult = torch.exp2(d.float()) * 2.0  # (2v << d) = v * 2**(d+1)
        w = v * mult[:, :, None]
        w = w.reshape(n_pad, k_pad // INT8_TILE, INT8_TILE) * torch.exp2(tile_e.float())[:, :, None]
        w = w.reshape(n_pad, k_pad // 32, 32)
    else:
        d = c - FP8_CODE_BIAS
        w = v * torch.exp2(d.float())[:, :, None] * rp.row_scale[:, None, None]
    w = torch.where((c == 0)[:, :, None], torch.zeros_like(w), w).reshape(n_pad, k_pad)
    w = w[: rp.n, : rp.k].clone()
    for i, row in enumerate(table.corr_rows.tolist()):
        for j in range(int(table.corr_ptr[i]), int(table.corr_ptr[i + 1])):
            blk = int(table.corr_blocks[j])
            w[row, blk * 32 : (blk + 1) * 32] += table.corr_values[j]
    return w


def decode_lut(act_int8: bool) -> torch.Tensor:
    """Per code byte, the byte tables the fast decode looks up with ``prmt`` (int32 words,
    little-endian bytes): FP8 -> 2 words = E4M3 bits of ``E2M1[idx] * 2**d`` for idx 0..7;
    INT8 -> 4 words = int8 ``(2 * E2M1[idx]) << d`` for idx 0..7, then their negatives.
    Code 0 (a block the main pass skips) and unused codes map to all-zero tables."""
    from ..formats.mxfp4 import E2M1_VALUES

    rows = []
    for code in range(32):
        if act_int8:
            d = code - INT8_CODE_BIAS
            if code and INT8_D_MIN <= d <= INT8_D_MAX:
                pos = [int(2 * v) << d for v in E2M1_VALUES]
            else:
                pos = [0] * 8
            rows.append(pos + [(-p) & 0xFF for p in pos])
        else:
            d = code - FP8_CODE_BIAS
            if code and FP8_D_MIN <= d <= FP8_D_MAX:
                vals = torch.tensor([v * 2.0**d for v in E2M1_VALUES], dtype=torch.float32)
                e4m3 = vals.to(torch.float8_e4m3fn)
                if not torch.equal(e4m3.float(), vals):
                    raise AssertionError(f"E2M1 * 2**{d} is not exact in E4M3")
                rows.append(e4m3.view(torch.uint8).tolist())
            else:
                rows.append([0] * 8)
    table = torch.tensor(rows, dtype=torch.uint8)
    return table.view(torch.int32).contiguous()  # [32, 2] or [32, 4]
