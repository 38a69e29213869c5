"""ASUKA's alignment module (paper Sec. 3.1 "Dimension/Distribution alignment"; FLUX release layout).

``Linear(512 -> dim)``, N single-stream blocks, ``LayerNorm(dim)``, stored as a plain ``nn.Sequential``
state dict (keys ``0.*``, ``1.*`` … ``N+1.*``). Width, heads (from the per-head RMSNorm size), depth and
MLP width are read from the tensors, so the FLUX pair (768 pooled side, 4096 T5 side) and a paper-style
SD1.5 alignment (768 tokens) load through the same code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttentionFn, sdpa_attention, torch_ops
from .weights import CheckpointFormatError, require_keys

PRE_NORM_EPS = 1e-6  # affine-free LayerNorm in front of each block
RMS_EPS = 1e-6
UNUSED_KEYS = ("modulation.lin.",)  # present in the released blocks, never used in their forward pass


@dataclass(frozen=True)
class AlignmentConfig:
    in_dim: int
    dim: int
    heads: int
    depth: int
    mlp_hidden: int


def config_from_state_dict(sd: Mapping[str, torch.Tensor], path: str = "alignment") -> AlignmentConfig:
    require_keys(sd, ("0.weight", "1.linear1.weight", "1.linear2.weight", "1.norm.query_norm.scale"),
                 "an ASUKA alignment module (asuka_alignment_t5.pt / asuka_alignment_clip.pt)", path)
    dim, in_dim = sd["0.weight"].shape
    depth = 0
    while f"{depth + 1}.linear1.weight" in sd:
        depth += 1
    head_dim = sd["1.norm.query_norm.scale"].shape[0]
    if dim % head_dim:
        raise CheckpointFormatError(f"{os.path.basename(path)}: width {dim} is not a multiple of head size {head_dim}")
    require_keys(sd, (f"{depth + 1}.weight", f"{depth + 1}.bias"), "an ASUKA alignment module (final LayerNorm)", path)
    return AlignmentConfig(in_dim=in_dim, dim=dim, heads=dim // head_dim, depth=depth,
                           mlp_hidden=sd["1.linear1.weight"].shape[0] - 3 * dim)


def convert_released(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the released file's unused ``modulation.lin`` weights."""
    return {k: v for k, v in sd.items() if not any(u in k for u in UNUSED_KEYS)}


class RMSNorm(nn.Module):
    def __init__(self, dim, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):  # computed in float32 like the authors, then back to x's dtype
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return y.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim, dtype=None, device=None):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, dtype, device)
        self.key_norm = RMSNorm(head_dim, dtype, device)


class SingleStreamBlock(nn.Module):
    """Pre-norm -> one linear to (q, k, v, mlp) -> per-head RMSNorm(q, k) -> attention ‖ GELU(tanh) -> linear."""

    def __init__(self, dim, heads, mlp_hidden, dtype=None, device=None, operations=torch_ops,
                 attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.dim, self.heads, self.mlp_hidden = dim, heads, mlp_hidden
        self.attention = attention
        self.linear1 = operations.Linear(dim, 3 * dim + mlp_hidden, dtype=dtype, device=device)
        self.linear2 = operations.Linear(dim + mlp_hidden, dim, dtype=dtype, device=device)
        self.norm = QKNorm(dim // heads, dtype, device)

    def forward(self, x):  # x: [B, L, D]
        B, L, D = x.shape
        qkv, mlp = self.linear1(F.layer_norm(x, (D,), eps=PRE_NORM_EPS)).split([3 * D, self.mlp_hidden], dim=-1)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).unbind(2)   # [B, L, H, Dh] each
        q = self.norm.query_norm(q).to(v.dtype).reshape(B, L, D)
        k = self.norm.key_norm(k).to(v.dtype).reshape(B, L, D)
        attn = self.attention(q, k, v.reshape(B, L, D), self.heads)
        return x + self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class AsukaAlignment(nn.Sequential):
    """Maps the MAE prior [B, L, 512] to condition tokens [B, L, dim]."""

    def __init__(self, config: AlignmentConfig, dtype=None, device=None, operations=torch_ops,
                 attention: AttentionFn = sdpa_attention):
        c = config
        super().__init__(
            operations.Linear(c.in_dim, c.dim, dtype=dtype, device=device),
            *(SingleStreamBlock(c.dim, c.heads, c.mlp_hidden, dtype, device, operations, attention)
              for _ in range(c.depth)),
            operations.LayerNorm(c.dim, dtype=dtype, device=device),  # torch default eps 1e-5, as released
        )
        self.config = config


def mix_with_null(prior: torch.Tensor, null: torch.Tensor, weight: float) -> torch.Tensor:
    """ASUKA release: condition = null + w · (prior − null) (w: the authors' condition weight, 0.5)."""
    return null + weight * (prior - null)
