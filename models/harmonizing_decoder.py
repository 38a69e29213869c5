"""ASUKA's harmonizing VAE decoder (paper Sec. 3.2 "Visual-consistent alignment"; REFERENCE.md).

A KL-VAE decoder plus a small conv encoder over ``[masked image, mask]`` whose feature maps replace the
decoder features in the known region at every scale (hard replacement by the area-downsampled mask, any
hole pixel counting as hole) and once more at full resolution with the soft mask before ``norm_out``.

Module names follow ``asuka_decoder.ckpt`` after its ``decoder.`` prefix: ``conv_in``, ``mid.*``,
``up.{level}.block.{i}.*``, ``up.{level}.upsample.conv``, ``norm_out``, ``conv_out`` and
``encoder.layers.{0..4}``. The file's unused ``up_layers.*`` transposed convs and the VAE ``encoder.*``
keys outside the ``decoder.`` prefix are ignored.

Tensors are BCHW; ``image`` is the full original in [-1, 1]; ``mask`` is 1 = hole.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .layers import AttentionFn, sdpa_attention, torch_ops
from .regions import feather_ramp, tile_starts
from .weights import CheckpointFormatError, count_indexed, require_keys, strip_prefix

GN_EPS = 1e-6
IGNORED_PREFIXES = ("up_layers.",)  # transposed convs present in the release, unused by the forward pass


@dataclass(frozen=True)
class DecoderConfig:
    z_channels: int
    out_channels: int
    level_channels: tuple[int, ...]   # output channels of up.{i}, i = 0 (full res) … n-1 (latent res)
    mid_channels: int
    num_res_blocks: int               # res blocks per level = num_res_blocks + 1
    cond_layers: tuple[tuple[int, int, int], ...]  # (in, out, kernel) per condition-encoder conv

    @property
    def factor(self) -> int:
        return 2 ** (len(self.level_channels) - 1)


def convert_released(sd: Mapping[str, torch.Tensor], path: str = "decoder") -> dict[str, torch.Tensor]:
    """A Lightning ``state_dict`` with ``decoder.`` keys, or a bare decoder state dict -> decoder keys."""
    if any(k.startswith("decoder.") for k in sd):
        sd = strip_prefix(sd, "decoder.")
    return {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}


def condition_layers(level_channels, mid_channels: int, in_channels: int = 4) -> tuple[tuple[int, int, int], ...]:
    """The condition encoder for a decoder: one feature map per place the decoder's features are replaced — the
    full-resolution input (``level_channels[1]``) and output (``level_channels[0]``) of level 0, the input of each
    lower level, and the latent-resolution mid features — as 3x3 stride-1 convs, then 4x4 stride-2 convs (the layout
    of ``asuka_decoder.ckpt``: 4->128, 128->256, 256->512 s2, 512->512 s2, 512->512 s2 for the SD/FLUX VAE)."""
    c = list(level_channels)
    layers = [(in_channels, c[0], 3), (c[0], c[1], 3)]
    layers += [(c[k], c[k + 1], 4) for k in range(1, len(c) - 1)]
    return tuple(layers + [(c[-1], mid_channels, 4)])


def config_from_vae_decoder(sd: Mapping[str, torch.Tensor], path: str = "VAE decoder") -> DecoderConfig:
    """A harmonizing decoder shaped like a KL-VAE's decoder (``conv_in``, ``mid``, ``up.*`` keys without the prefix),
    for training one from that VAE (the weights shared by name; the condition encoder is new)."""
    require_keys(sd, ("conv_in.weight", "mid.attn_1.q.weight", "conv_out.weight", "up.0.block.0.conv1.weight"),
                 "a KL-VAE decoder", path)
    levels = count_indexed(sd, "up.")
    level_channels = tuple(sd[f"up.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    mid = sd["conv_in.weight"].shape[0]
    return DecoderConfig(z_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
                         level_channels=level_channels, mid_channels=mid,
                         num_res_blocks=count_indexed(sd, "up.0.block.") - 1,
                         cond_layers=condition_layers(level_channels, mid, sd["conv_out.weight"].shape[0] + 1))


def config_from_state_dict(sd: Mapping[str, torch.Tensor], path: str = "decoder") -> DecoderConfig:
    what = "an ASUKA harmonizing decoder (asuka_decoder.ckpt: decoder.conv_in, decoder.encoder.layers.*)"
    require_keys(sd, ("conv_in.weight", "mid.attn_1.q.weight", "conv_out.weight", "encoder.layers.0.weight",
                      "up.0.block.0.conv1.weight"), what, path)
    levels = count_indexed(sd, "up.")
    if any(k.startswith("up.") and ".attn." in k for k in sd):
        raise CheckpointFormatError(f"{os.path.basename(path)}: attention inside up blocks is not part of ASUKA's decoder")
    cond = []
    for i in range(count_indexed(sd, "encoder.layers.")):
        out_c, in_c, k, _ = sd[f"encoder.layers.{i}.weight"].shape
        if k not in (3, 4):
            raise CheckpointFormatError(f"{os.path.basename(path)}: condition conv {i} has kernel {k}; expected 3 or 4")
        cond.append((in_c, out_c, k))
    return DecoderConfig(
        z_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
        level_channels=tuple(sd[f"up.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)),
        mid_channels=sd["conv_in.weight"].shape[0], num_res_blocks=count_indexed(sd, "up.0.block.") - 1,
        cond_layers=tuple(cond))


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, dtype=None, device=None, operations=torch_ops):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.GroupNorm(32, cin, eps=GN_EPS, affine=True, **kw)
        self.conv1 = operations.Conv2d(cin, cout, 3, padding=1, **kw)
        self.norm2 = operations.GroupNorm(32, cout, eps=GN_EPS, affine=True, **kw)
        self.conv2 = operations.Conv2d(cout, cout, 3, padding=1, **kw)
        self.nin_shortcut = operations.Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, scale C^-1/2."""

    def __init__(self, c, dtype=None, device=None, operations=torch_ops, attention: AttentionFn = sdpa_attention):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.attention = attention
        self.norm = operations.GroupNorm(32, c, eps=GN_EPS, affine=True, **kw)
        self.q, self.k, self.v, self.proj_out = (operations.Conv2d(c, c, 1, **kw) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # [B, HW, C]
        out = self.attention(q, k, v, 1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c, dtype=None, device=None, operations=torch_ops):
        super().__init__()
        self.conv = operations.Conv2d(c, c, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x):
        # The authors cast to float32 here; nearest upsampling is exact in any dtype, so we keep x's dtype
        # and half precision works without autocast.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConditionEncoder(nn.Module):
    """Convs over ``[masked image, mask]``; 3x3 stride 1 or 4x4 stride 2 (pad 1), ReLU between."""

    def __init__(self, layers, dtype=None, device=None, operations=torch_ops):
        super().__init__()
        self.layers = nn.ModuleList(
            operations.Conv2d(cin, cout, k, stride=1 if k == 3 else 2, padding=1, dtype=dtype, device=device)
            for cin, cout, k in layers)

    def forward(self, masked_image, mask) -> dict[tuple[int, int, int], torch.Tensor]:
        """-> feature maps (taken before the ReLU) keyed by their (C, H, W)."""
        x, feats = torch.cat([masked_image, mask], dim=1), {}
        for i, conv in enumerate(self.layers):
            x = conv(x if i == 0 else F.relu(x))
            feats[tuple(x.shape[1:])] = x
        return feats


class MidBlock(nn.Module):
    def __init__(self, c, dtype=None, device=None, operations=torch_ops, attention=sdpa_attention):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dtype, device, operations)
        self.attn_1 = AttnBlock(c, dtype, device, operations, attention)
        self.block_2 = ResnetBlock(c, c, dtype, device, operations)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class HarmonizingDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, dtype=None, device=None, operations=torch_ops,
                 attention: AttentionFn = sdpa_attention):
        super().__init__()
        c = self.config = config
        kw = dict(dtype=dtype, device=device)
        self.conv_in = operations.Conv2d(c.z_channels, c.mid_channels, 3, padding=1, **kw)
        self.mid = MidBlock(c.mid_channels, operations=operations, attention=attention, **kw)
        self.up = nn.ModuleList()
        block_in = c.mid_channels
        levels = []
        for i in reversed(range(len(c.level_channels))):
            level = nn.Module()
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, c.level_channels[i], operations=operations, **kw))
                block_in = c.level_channels[i]
            level.block = nn.ModuleList(blocks)
            if i != 0:
                level.upsample = Upsample(block_in, operations=operations, **kw)
            levels.insert(0, level)
        self.up.extend(levels)
        self.norm_out = operations.GroupNorm(32, block_in, eps=GN_EPS, affine=True, **kw)
        self.conv_out = operations.Conv2d(block_in, c.out_channels, 3, padding=1, **kw)
        self.encoder = ConditionEncoder(c.cond_layers, operations=operations, **kw)
        self.checkpointing = False   # training only: recompute the res blocks in backward

    def _run(self, block, h):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        return block(h)

    def forward(self, z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: [B, zc, h, w] VAE latent; image: [B, 3, 8h, 8w] in [-1, 1]; mask: [B, 1, 8h, 8w] -> [B, 3, 8h, 8w]."""
        dtype = self.conv_in.weight.dtype
        z, image, mask = z.to(dtype), image.to(dtype), mask.to(dtype)
        h = self._run(self.mid, self.conv_in(z))
        feats = self.encoder((1 - mask) * image, mask)
        for i in reversed(range(len(self.up))):
            h = replace_known(h, feats, (F.interpolate(mask, size=h.shape[-2:], mode="area") > 0).to(h.dtype))
            for block in self.up[i].block:
                h = self._run(block, h)
            if i != 0:
                h = self.up[i].upsample(h)
        h = replace_known(h, feats, mask)
        return self.conv_out(F.silu(self.norm_out(h)))


def replace_known(h: torch.Tensor, feats: Mapping[tuple, torch.Tensor], hole: torch.Tensor) -> torch.Tensor:
    """Known region of the decoder features replaced by the condition-encoder features of the same shape."""
    f = feats.get(tuple(h.shape[1:]))
    if f is None:
        raise ValueError(f"no condition feature of shape {tuple(h.shape[1:])}; image size must be "
                         f"{h.shape[-2]}x{h.shape[-1]} times the decoder's upsampling at this level")
    return h * hole + f * (1 - hole)


# -- tiling ------------------------------------------------------------------------------------------------
def decode_tiled(decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, factor: int,
                 tile: int, overlap: int, on_tile: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Decode in overlapping latent tiles (``tile``/``overlap`` in latent units), cropping image and mask
    per tile and blending the tiles with linear feathering over their overlaps. Returns [B, 3, H, W] float32
    on ``image``'s device; peak memory follows the tile size, not the image size.
    """
    B, _, h, w = z.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = torch.zeros(B, 3, h * factor, w * factor, dtype=torch.float32, device=image.device)
    weight = torch.zeros(1, 1, h * factor, w * factor, dtype=torch.float32, device=image.device)
    th, tw = min(tile, h), min(tile, w)
    for yi, y in enumerate(ys):
        for xi, x in enumerate(xs):
            sl = (slice(None), slice(None), slice(y * factor, (y + th) * factor), slice(x * factor, (x + tw) * factor))
            px = decode(z[:, :, y:y + th, x:x + tw], image[sl], mask[sl]).float().to(out.device)
            # overlap with the previous / next tile along each axis, in pixels
            top = (ys[yi - 1] + th - y) * factor if yi > 0 else 0
            bottom = (y + th - ys[yi + 1]) * factor if yi + 1 < len(ys) else 0
            left = (xs[xi - 1] + tw - x) * factor if xi > 0 else 0
            right = (x + tw - xs[xi + 1]) * factor if xi + 1 < len(xs) else 0
            wy = feather_ramp(th * factor, top, bottom, out.device, out.dtype)
            wx = feather_ramp(tw * factor, left, right, out.device, out.dtype)
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[sl] += px * wt
            weight[sl] += wt
            if on_tile is not None:
                on_tile()
    return out / weight


def tile_count(h: int, w: int, tile: int, overlap: int) -> int:
    return len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))
