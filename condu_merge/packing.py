"""Bit-packing of boolean masks, 1 bit per element.

Layout (fixed, shared by every backend and file): the row-major flattened mask,
8 elements per ``uint8``, little bit order -- element ``8*b + j`` is bit ``j`` of
byte ``b``. This is exactly ``numpy.packbits(mask.ravel(), bitorder="little")``.
The pad bits of the last byte are zero.
"""

from __future__ import annotations

import torch

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


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape) into a 1-D ``uint8`` tensor of ``ceil(numel/8)`` bytes.

    ``packed[b] = sum_j mask_flat[8b + j] << j``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a torch.bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    n = flat.numel()
    pad = (-n) % 8
    bits = flat.to(torch.uint8)
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    bits = bits.view(-1, 8) << _shifts(bits.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int | None = None, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
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
    flat = packed.reshape(-1)
    bits = (flat.unsqueeze(1) >> _shifts(flat.device)) & 1
    out = bits.reshape(-1)[:numel].to(torch.bool)
    return out.reshape(shape) if shape is not None else out


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed mask (pad bits are zero by construction)."""
    if packed.numel() == 0:
        return 0
    bits = (packed.reshape(-1).unsqueeze(1) >> _shifts(packed.device)) & 1
    return int(bits.sum(dtype=torch.int64))
