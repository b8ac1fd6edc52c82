"""The SM90 kernels' weight decode as inline PTX (plain strings: no triton needed to read or
test them; ``triton_w4a8`` wraps them for ``tl.inline_asm_elementwise``, and
``csrc/w4a8_decode_gemm.cu`` runs the same instructions).

Each string decodes one 32-bit word of the repacked weight (``_sm90_repack.WORD_BITS``) into
its 4 low-half or 4 high-half weights: E4M3 bytes, or int8 bytes ``(2 * E2M1) << d``. Per
block, an 8-entry byte table (E4M3 bits of ``E2M1 * 2**d``, or the int8 values and their
negatives) built from the block's code byte is looked up with one ``prmt`` per 4 weights:

- the low half's four 3-bit selectors are bits 0-15 of the word and the high half's bits 16-31,
  each with a sign bit as its fourth bit, which ``prmt`` would read as its sign-replicate flag:
  ``& 0x7777`` (after ``>> 16`` for the high half) makes the selector;
- the low half's signs are each byte's top bit, the high half's each byte's bit 3 (``<< 4``
  moves them up): E4M3 ORs them in (``lop3`` 0xF8: a | b & c); int8 selects between the
  positive and negative tables (``lop3`` 0xD8: c ? b : a) with a byte mask from ``prmt``'s
  sign-replicate mode (selectors 0x8-0xB).

Operands as ``tl.inline_asm_elementwise(..., pack=4)`` numbers them: ``$0`` the output, ``$1``
the word (four packed bytes in memory order), then four registers per table argument (the
same value, one block's table): ``$2`` / ``$6`` the positive table's entries 0-3 / 4-7, ``$10``
/ ``$14`` the negative one's (int8).
"""

_SEL_LO = "and.b32 s, $1, 0x7777; "
_SEL_HI = "shr.u32 s, $1, 16; and.b32 s, s, 0x7777; shl.b32 x, $1, 4; "

FP8_LO = ("{ .reg .b32 s, t; " + _SEL_LO +
          "prmt.b32 t, $2, $6, s; lop3.b32 $0, t, $1, 0x80808080, 0xF8; }")
FP8_HI = ("{ .reg .b32 s, t, x; " + _SEL_HI +
          "prmt.b32 t, $2, $6, s; lop3.b32 $0, t, x, 0x80808080, 0xF8; }")
INT8_LO = ("{ .reg .b32 s, p, n, m; " + _SEL_LO +
           "prmt.b32 p, $2, $6, s; prmt.b32 n, $10, $14, s; "
           "prmt.b32 m, $1, 0, 0xBA98; lop3.b32 $0, p, n, m, 0xD8; }")
INT8_HI = ("{ .reg .b32 s, p, n, m, x; " + _SEL_HI +
           "prmt.b32 p, $2, $6, s; prmt.b32 n, $10, $14, s; "
           "prmt.b32 m, x, 0, 0xBA98; lop3.b32 $0, p, n, m, 0xD8; }")
