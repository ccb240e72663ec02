"""The GPTQ word layout: integer codes packed into int32 words, least significant bits first.

A ``b``-bit code width puts ``p = 32 // b`` codes in each int32 word. GPTQ packs ``qweight`` along its rows
(the *input* dimension: ``[I/p, O]``) and ``qzeros`` along its columns (the *output* dimension:
``[I/g, O/p]``). Words are read and written as two's complement int32, so a word whose top code is large
is negative. :data:`SUPPORTED_BITS` is the one list of code widths qes packs, loads and runs.

The canonical view of a layer's codes is ``Q[out, in]`` (:func:`unpack_codes` / :func:`pack_codes`).
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_BITS",
    "check_bits",
    "pack_along_cols",
    "pack_along_rows",
    "pack_codes",
    "unpack_along_cols",
    "unpack_along_rows",
    "unpack_codes",
]

#: code widths that fill an int32 word exactly: the only ones qes packs, loads and runs
SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    """Codes per int32 word for ``bits``; raises for a width not in :data:`SUPPORTED_BITS`."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported code width {bits} bits; GPTQ int32 packing here supports {SUPPORTED_BITS}")
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    per_word = 32 // bits
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)[:per_word]


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 words ``[R, C]`` along dim 0 into int32 codes ``[R * 32 / bits, C]``, low bits first."""
    per_word = 32 // bits
    shifts = _shifts(bits, words.device).view(1, per_word, 1)
    codes = torch.bitwise_and(torch.bitwise_right_shift(words.unsqueeze(1), shifts), (1 << bits) - 1)
    return codes.reshape(words.shape[0] * per_word, words.shape[1])


def pack_along_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[R, C]`` along dim 0 into int32 words ``[R / p, C]``, least significant bits first."""
    per_word = check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-d tensor of codes, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if rows % per_word:
        raise ValueError(f"{rows} codes per column is not a multiple of {per_word} ({bits}-bit codes per int32)")
    wide = codes.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) > (1 << bits) - 1):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    shifts = _shifts(bits, codes.device).to(torch.int64).view(1, per_word, 1)
    words = torch.bitwise_left_shift(wide.view(rows // per_word, per_word, cols), shifts).sum(dim=1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_along_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 words ``[R, C]`` along dim 1 into int32 codes ``[R, C * 32 / bits]`` (GPTQ's ``qzeros``)."""
    return unpack_along_rows(words.t().contiguous(), bits).t()


def pack_along_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[R, C]`` along dim 1 into int32 words ``[R, C / p]``; the inverse of unpack_along_cols."""
    return pack_along_rows(codes.t(), bits).t()


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed GPTQ ``qweight`` int32 ``[in/p, out]`` -> codes ``Q[out, in]`` as uint8 (values ``0..2^bits-1``)."""
    check_bits(bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"expected a 2-d int32 tensor of packed codes, got {qweight.dtype} {tuple(qweight.shape)}")
    return unpack_along_rows(qweight, bits).t().contiguous().to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``Q[out, in]`` -> packed GPTQ ``qweight`` int32 ``[in/p, out]``; the exact inverse of unpack_codes."""
    if codes.dim() != 2:
        raise ValueError(f"expected codes Q[out, in], got shape {tuple(codes.shape)}")
    return pack_along_rows(codes.t(), bits).contiguous()
