"""Regions of an image: the bounding box of a mask, tile starts along an axis and the feathered weights that blend
overlapping tiles. One definition each, shared by the zoom-in crop, the training masks, the tiled harmonizing decode
and the Patch-Adapter patch grid.

Boxes are half-open ``(y0, y1, x0, x1)``: rows ``y0:y1`` and columns ``x0:x1``.
"""
from __future__ import annotations

from typing import Optional

import torch

Box = tuple[int, int, int, int]


def bounding_box(mask: torch.Tensor) -> Optional[Box]:
    """Half-open ``(y0, y1, x0, x1)`` of the non-zero pixels of a [H, W] mask, or None when it is empty."""
    rows, cols = torch.nonzero(mask.any(dim=1)), torch.nonzero(mask.any(dim=0))
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of tiles of ``tile`` along an axis of ``size``: ``align``-multiples, neighbours overlapping by at least
    ``overlap``, the last one flush with the end (one tile when it covers the axis). ``size`` and ``tile`` are
    multiples of ``align``."""
    if tile >= size:
        return [0]
    stride = (tile - overlap) // align * align
    if stride <= 0:
        raise ValueError(f"overlap {overlap} leaves no stride for tile {tile} at alignment {align}")
    return [*range(0, size - tile, stride), size - tile]


def feather_ramp(length: int, lo: int, hi: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """1-D blending weights: 1 in the middle, rising linearly as ``k / (n + 1)``, k = 1 … n, over the first ``lo``
    and the last ``hi`` positions (the overlaps with the neighbours; 0 = no neighbour on that side; a ramp longer than
    ``length`` is cut); > 0 everywhere."""
    w = torch.ones(length, device=device, dtype=dtype)
    for n, flip in ((lo, False), (hi, True)):
        if n <= 0:
            continue
        k = min(n, length)
        up = torch.arange(1, k + 1, device=device, dtype=dtype) / (n + 1)
        if flip:
            w[length - k:] = torch.minimum(w[length - k:], up.flip(0))
        else:
            w[:k] = torch.minimum(w[:k], up)
    return w
