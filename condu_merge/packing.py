"""Bit-packing of boolean masks, 1 bit per element.

Layout (fixed, shared by every backend and file): the row-major flattened mask,
8 elements per ``uint8``, little bit order -- element ``8*b + j`` is bit ``j`` of
byte ``b``. This is exactly ``numpy.packbits(mask.ravel(), bitorder="little")``.
The pad bits of the last byte are zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS_CACHE.get(device)
    if s is None:
        s = torch.arange(8, dtype=torch.uint8, device=device)
        _SHIFTS_CACHE[device] = s
    return s


def packed_nbytes(numel: int) -> int:
    """Bytes needed to pack ``numel`` mask bits: ``ceil(numel / 8)``."""
    return (int(numel) + 7) // 8


# Multiplying 8 bytes of 0/1 (one int64, little-endian) by this gathers byte j into bit 56 + j;
# the cross terms land at distinct bits below 56 or above 63, so no carry reaches the top byte.
_GATHER = 0x0102040810204080
# Replicating a byte 8 times, then keeping bit j of byte j, spreads its bits one per byte.
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64


def pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """Pack each row of a ``bool``/0-1 ``uint8`` tensor ``[t, n]`` into ``uint8 [t, ceil(n/8)]``."""
    t, n = bits.shape
    b = bits.to(torch.uint8)
    pad = (-n) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(t, pad)], dim=1)
    b = b.contiguous()
    if b.numel() == 0:
        return b.new_zeros(t, 0)
    words = b.view(torch.int64)  # [t, ceil(n/8)]: 8 mask bytes per word
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``uint8 [t, B]`` -> ``bool [t, n]`` (``n <= 8B``)."""
    t = packed.shape[0]
    if packed.numel() == 0:
        return torch.zeros(t, n, dtype=torch.bool, device=packed.device)
    words = (packed.to(torch.int64) * _SPREAD) & _SELECT
    return words.view(torch.uint8).view(t, -1)[:, :n] != 0


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape) into a 1-D ``uint8`` tensor of ``ceil(numel/8)`` bytes.

    ``packed[b] = sum_j mask_flat[8b + j] << j``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a torch.bool tensor, got {mask.dtype}")
    return pack_rows(mask.reshape(1, -1))[0]


def unpack_mask(
    packed: torch.Tensor, numel: int | None = None, shape: tuple[int, ...] | torch.Size | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a ``torch.bool`` tensor of ``shape`` (or 1-D of ``numel``).

    Pad bits beyond ``numel`` are ignored.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_mask expects a torch.uint8 tensor, got {packed.dtype}")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        n = 1
        for s in shape:
            n *= s
        if numel is not None and numel != n:
            raise ValueError(f"numel={numel} does not match shape {shape}")
        numel = n
    if numel is None:
        numel = packed.numel() * 8
    if packed.numel() != packed_nbytes(numel):
        raise ValueError(
            f"packed mask has {packed.numel()} bytes, expected {packed_nbytes(numel)} for {numel} elements"
        )
    out = unpack_rows(packed.reshape(1, -1), numel)[0]
    return out.reshape(shape) if shape is not None else out


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed mask (pad bits are zero by construction)."""
    if packed.numel() == 0:
        return 0
    bits = (packed.reshape(-1).unsqueeze(1) >> _shifts(packed.device)) & 1
    return int(bits.sum(dtype=torch.int64))


def pad_bits_clear(packed: torch.Tensor, numel: int) -> bool:
    """Whether the pad bits of a packed mask of ``numel`` elements (bits ``numel % 8 .. 7`` of
    the last byte, little bit order) are zero, as :func:`pack_mask` writes them. A mask read
    from a file with a set pad bit is damaged: :func:`popcount` would count the bit."""
    rem = numel % 8
    if rem == 0 or packed.numel() == 0:
        return True
    return int(packed.reshape(-1)[-1]) >> rem == 0


def stack_rows(rows: Sequence[torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.stack(rows)``, on ``device`` when given (else where the rows are). When every row
    is a CPU tensor of one numpy-supported dtype (packed masks: ``uint8``) and the result stays on
    the CPU, numpy makes the copy in this thread: torch's would wake its OpenMP team, which then
    spins on every core for a while, and the compiled kernel that runs next competes with it for
    the cores (on 2 cores the native ``decouple_many`` ran 1.5x slower; docs/kernels.md)."""
    on_cpu = all(r.device.type == "cpu" for r in rows)
    dev = None if device is None else torch.device(device)
    if (
        rows
        and on_cpu
        and (dev is None or dev.type == "cpu")
        and all(r.dtype == rows[0].dtype and not r.requires_grad for r in rows)
        and rows[0].dtype in (torch.uint8, torch.bool, torch.float32, torch.float64)
    ):
        return torch.from_numpy(np.stack([r.numpy() for r in rows]))
    return torch.stack(list(rows) if dev is None else [r.to(dev) for r in rows])
