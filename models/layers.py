"""Shared building blocks: the default ``operations`` namespace and the default attention function."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# The default operations namespace: plain torch.nn. ComfyUI's glue passes comfy.ops.* instead,
# which has the same constructor signatures (plus weight casting / offloading).
torch_ops = SimpleNamespace(
    Linear=nn.Linear,
    Conv2d=nn.Conv2d,
    LayerNorm=nn.LayerNorm,
    GroupNorm=nn.GroupNorm,
)

AttentionFn = Callable[..., torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention with ComfyUI's ``optimized_attention`` calling convention.

    q: [B, Lq, H*D], k/v: [B, Lk, H*D]; mask: additive, broadcastable to [B, H, Lq, Lk]. -> [B, Lq, H*D]
    """
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, inner)


def with_reference_tokens(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor,
                          reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention over ``[own tokens ; reference tokens]`` (an ``attn1_patch``'s return): queries stay ``n``, keys
    and values (both taken through the layer's own to_k / to_v later) get the reference tokens appended.
    reference: [B, M, C]. LAR-Gen's RefineNet tokens and Patch-Adapter's weight-free reference route both use it."""
    ref = reference.to(context.dtype)
    return n, torch.cat([context, ref], dim=1), torch.cat([value, ref], dim=1)
