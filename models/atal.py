"""PainterNet's Actual-Token Attention Loss (ATAL, §3.3 eq. 3-5). Pure torch.

    L_ATAL = 1/N * sum_i || 1/L_S * sum_{j in S} A_{i,j} - m_i ||_2^2

``A_i`` [HW, L] is the cross-attention map of branch layer i (softmax over the L text tokens), ``S`` the positions
of the prompt's actual tokens (start/end tokens and padding removed), ``m_i`` the inpaint mask (1 = hole)
resized to layer i's grid. Where the paper is silent:

* multi-head maps are averaged over heads (the paper writes one map per layer);
* ``m_i`` is the area average of the mask over each cell (a soft value at hole borders);
* the norm is summed over positions (the paper's squared L2 norm, hence its small beta = 1e-5) and the loss is
  averaged over the batch rows that have at least one actual token (an empty local prompt gives no target).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_CHUNK = 77


def actual_token_mask(ids: torch.Tensor, start_id: int, end_id: int, chunk: int = CLIP_CHUNK) -> torch.Tensor:
    """ids [B, L] (L a multiple of ``chunk``: ComfyUI splits long prompts into 77-token chunks, each starting with
    the start token) -> bool [B, L]: True strictly between a chunk's start token and its first end token."""
    if ids.ndim != 2 or ids.shape[1] % chunk:
        raise ValueError(f"token ids must be [batch, k*{chunk}]; got {tuple(ids.shape)}")
    B, L = ids.shape
    c = ids.reshape(B, L // chunk, chunk)
    if not (c[..., 0] == start_id).all():
        raise ValueError("every token chunk must begin with the start token")
    is_end = (c == end_id)
    is_end[..., -1] = True                                   # a chunk cut without an end token stops at its edge
    first_end = is_end.float().argmax(-1, keepdim=True)      # first True
    pos = torch.arange(chunk, device=ids.device)
    inside = (pos > 0) & (pos < first_end)
    return inside.reshape(B, L)


def resize_mask(hole: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """hole [B, 1, H, W] -> [B, h*w]: the fraction of each cell that is hole."""
    return F.interpolate(hole.float(), size=hw, mode="area").flatten(1)


def atal_loss(maps: dict, grids: dict, hole: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """maps {site: A [B, HW, L] (heads averaged)}, grids {site: (h, w)}, hole [B, 1, H, W] (1 = hole), tokens bool
    [B, L] (:func:`actual_token_mask`) -> scalar L_ATAL."""
    if not maps:
        raise ValueError("ATAL needs the cross-attention maps of at least one layer")
    count = tokens.sum(-1)                                    # L_S per row
    rows = count > 0
    if not rows.any():
        return next(iter(maps.values())).sum() * 0.0
    weights = tokens.to(torch.float32) / count.clamp(min=1).to(torch.float32)[:, None]     # 1/L_S on S
    total = 0.0
    for site, a in maps.items():
        h, w = grids[site]
        if a.shape[1] != h * w or a.shape[2] != tokens.shape[1]:
            raise ValueError(f"attention map {site} is {tuple(a.shape)}; expected [B, {h * w}, {tokens.shape[1]}]")
        mean_actual = torch.einsum("bnl,bl->bn", a.float(), weights)
        per_row = ((mean_actual - resize_mask(hole, (h, w))) ** 2).sum(-1)
        total = total + per_row[rows].mean()
    return total / len(maps)
