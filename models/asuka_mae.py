"""ASUKA's MAE prior (the MAE-FAR fine-tune of MAE; ASUKA paper Sec. 3.1, REFERENCE.md "MAE prior").

ViT encoder without class token over the 256² image (hole tokens excluded as attention keys), a ViT
decoder whose hole tokens are the mask token and whose partly-masked tokens are blended with a second
patch embedding of ``[masked image, mask]`` by the learnt scalar ``alpha``. The prior handed to the
alignment module is the decoder hidden state at the input of decoder block 6 (no final norm).

Module names follow the released ``mae_300.pth`` (timm style), so the file loads without renames.
Masks are 1 = hole everywhere in this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .imaging import resize_area_uint8, resize_nearest, token_coverage
from .layers import AttentionFn, sdpa_attention, torch_ops
from .weights import CheckpointFormatError, count_indexed, require_keys

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRIOR_BLOCK = 6  # the prior is the input of decoder block 6 (authors: decoder_layer=6)
LN_EPS = 1e-6    # MAE's norm_layer = partial(nn.LayerNorm, eps=1e-6)

# Head counts are not stored in the tensors; these are the MAE family's (ViT-B/L/H encoders, 16-head decoder).
_ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
_DECODER_HEAD_DIM_FALLBACK = 32


@dataclass(frozen=True)
class MAEConfig:
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_hidden: int
    decoder_mlp_hidden: int

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


MAE_SIGNATURE = ("patch_embed.proj.weight", "pos_embed", "decoder_embed.weight", "mask_token",
                 "decoder_pos_embed", "decoder_patch_embed.proj.weight", "alpha", "decoder_pred.weight")


def config_from_state_dict(sd: Mapping[str, torch.Tensor], path: str = "mae") -> MAEConfig:
    """Read the MAE hyper-parameters from tensor shapes; heads from the MAE family table."""
    require_keys(sd, MAE_SIGNATURE, "an ASUKA MAE prior (MAE-FAR fine-tune, e.g. mae_300.pth)", path)
    embed_dim, in_chans, p, _ = sd["patch_embed.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise CheckpointFormatError(f"{os.path.basename(path)}: pos_embed has {tokens} tokens, not a square grid")
    dec_dim = sd["decoder_embed.weight"].shape[0]
    if sd["decoder_patch_embed.proj.weight"].shape[1] != in_chans + 1:
        raise CheckpointFormatError(
            f"{os.path.basename(path)}: decoder_patch_embed takes {sd['decoder_patch_embed.proj.weight'].shape[1]} "
            f"channels; expected {in_chans + 1} (masked image + mask)")
    depth, dec_depth = count_indexed(sd, "blocks."), count_indexed(sd, "decoder_blocks.")
    if dec_depth <= PRIOR_BLOCK:
        raise CheckpointFormatError(
            f"{os.path.basename(path)}: decoder has {dec_depth} blocks; the prior is read at block {PRIOR_BLOCK}")
    return MAEConfig(
        img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        num_heads=_ENCODER_HEADS.get(embed_dim, max(1, embed_dim // 64)),
        decoder_embed_dim=dec_dim, decoder_depth=dec_depth,
        decoder_num_heads=16 if dec_dim % 16 == 0 else max(1, dec_dim // _DECODER_HEAD_DIM_FALLBACK),
        mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
        decoder_mlp_hidden=sd["decoder_blocks.0.mlp.fc1.weight"].shape[0],
    )


def no_visible_key(coverage: torch.Tensor) -> torch.Tensor:
    """coverage [B, L] -> [B] bool: every patch of the item touches the hole, so the authors' encoder has no key left
    (their softmax gives NaN and they return the zero prior). A full mask is one case; a mask that touches every
    patch without covering all of it (e.g. a grid of thin lines) is another."""
    return (coverage > 0).all(dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch, dtype=None, device=None, operations=torch_ops):
        super().__init__()
        self.proj = operations.Conv2d(in_chans, dim, patch, stride=patch, dtype=dtype, device=device)

    def forward(self, x):  # [B, C, H, W] -> [B, L, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, dtype=None, device=None, operations=torch_ops):
        super().__init__()
        self.fc1 = operations.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, heads, dtype=None, device=None, operations=torch_ops, attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.qkv = operations.Linear(dim, dim * 3, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, key_bias: Optional[torch.Tensor] = None):  # x: [B, L, D]; key_bias: [B, 1, 1, L]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(self.attention(q, k, v, self.heads, mask=key_bias))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, dtype=None, device=None, operations=torch_ops, attention=sdpa_attention):
        super().__init__()
        self.norm1 = operations.LayerNorm(dim, eps=LN_EPS, dtype=dtype, device=device)
        self.attn = Attention(dim, heads, dtype, device, operations, attention)
        self.norm2 = operations.LayerNorm(dim, eps=LN_EPS, dtype=dtype, device=device)
        self.mlp = Mlp(dim, hidden, dtype, device, operations)

    def forward(self, x, key_bias=None):
        x = x + self.attn(self.norm1(x), key_bias)
        return x + self.mlp(self.norm2(x))


class MAEPrior(nn.Module):
    """The MAE-FAR fine-tuned masked autoencoder used by ASUKA, reduced to what inference needs."""

    def __init__(self, config: MAEConfig, dtype=None, device=None, operations=torch_ops,
                 attention: AttentionFn = sdpa_attention):
        super().__init__()
        c = self.config = config
        kw = dict(dtype=dtype, device=device)
        L = c.grid * c.grid
        self.patch_embed = PatchEmbed(c.in_chans, c.embed_dim, c.patch_size, operations=operations, **kw)
        self.pos_embed = nn.Parameter(torch.zeros(1, L, c.embed_dim, **kw), requires_grad=False)
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_hidden, operations=operations,
                                          attention=attention, **kw) for _ in range(c.depth))
        self.norm = operations.LayerNorm(c.embed_dim, eps=LN_EPS, **kw)
        self.decoder_embed = operations.Linear(c.embed_dim, c.decoder_embed_dim, **kw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim, **kw), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L, c.decoder_embed_dim, **kw), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.decoder_mlp_hidden, operations=operations,
                  attention=attention, **kw) for _ in range(c.decoder_depth))
        self.decoder_norm = operations.LayerNorm(c.decoder_embed_dim, eps=LN_EPS, **kw)
        self.decoder_pred = operations.Linear(c.decoder_embed_dim, c.patch_size ** 2 * c.in_chans, **kw)
        self.decoder_patch_embed = PatchEmbed(c.in_chans + 1, c.decoder_embed_dim, c.patch_size,
                                              operations=operations, **kw)
        self.alpha = nn.Parameter(torch.ones((), **kw), requires_grad=False)
        self.checkpointing = False   # training only (the ASUKA MAE trainer)

    # -- preprocessing ---------------------------------------------------------------------------------
    def preprocess(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image: [B,3,H,W] in [0,1], mask: [B,1,H,W] (1 = hole) -> normalised masked image and mask at 256².

        As the authors: uint8 OpenCV-area resize, ImageNet normalisation, pixels with mask >= 0.5 zeroed;
        mask resized with nearest and kept soft.
        """
        s = (self.config.img_size, self.config.img_size)
        m = resize_nearest(mask.float(), s)
        return self.normalise(image) * (m < 0.5), m

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> ImageNet-normalised at the MAE's size (uint8 OpenCV-area resize)."""
        x = resize_area_uint8(image.float(), (self.config.img_size, self.config.img_size))
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    # -- encoder ---------------------------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
        """x: [B,3,S,S] normalised masked image; coverage: [B,L] hole fraction per patch -> [B,L,D].

        Tokens whose patch touches the hole are excluded as keys. Where every token is excluded (every patch
        touched, see :func:`no_visible_key`) the exclusion is dropped for that item so nothing becomes NaN; that
        item's prior is zeroed later, as the authors' code does.
        """
        h = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        excluded = coverage > 0
        excluded = excluded & ~excluded.all(dim=1, keepdim=True)
        key_bias = torch.zeros(excluded.shape, dtype=h.dtype, device=h.device)
        key_bias = key_bias.masked_fill(excluded, float("-inf"))[:, None, None, :]
        for blk in self.blocks:
            h = self._block(blk, h, key_bias)
        return self.norm(h)

    def _block(self, blk, *args):
        """A block, recomputed in backward when training with ``checkpointing`` on."""
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    # -- decoder ---------------------------------------------------------------------------------------
    def decoder_tokens(self, latent: torch.Tensor, x: torch.Tensor, m: torch.Tensor,
                       coverage: torch.Tensor) -> torch.Tensor:
        """Decoder input: hole tokens -> mask token; partly-masked tokens blended with alpha; + pos embed."""
        h = self.decoder_embed(latent)                                   # [B, L, Dd]
        hole = (coverage > 0)[..., None]                                 # any hole pixel in the patch
        partial = hole & (coverage < 1)[..., None]                       # partly masked patch
        h = torch.where(hole, self.mask_token.to(h.dtype), h)
        emb = self.decoder_patch_embed(torch.cat([x * (1 - m), m], dim=1).to(h.dtype))
        alpha = self.alpha.to(h.dtype).clamp(0.0, 1.0)
        h = torch.where(partial, h * alpha + emb * (1 - alpha), h)
        return h + self.decoder_pos_embed.to(h.dtype)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, L, p*p*C] -> [B, C, S, S]
        c, g, p = self.config.in_chans, self.config.grid, self.config.patch_size
        x = tokens.reshape(tokens.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, g * p, g * p)

    def run(self, image: torch.Tensor, mask: torch.Tensor, reconstruct: bool = True):
        """-> (prior [B, L, D_dec], zeros where no key is visible; final decoder hidden state or None; coverage
        [B, L])."""
        x, m = self.preprocess(image, mask)
        dtype = self.decoder_embed.weight.dtype
        x, m = x.to(dtype), m.to(dtype)
        coverage = token_coverage(m.float(), self.config.grid)          # [B, L]
        h = self.decoder_tokens(self.forward_encoder(x, coverage), x, m, coverage)
        prior = None
        for i, blk in enumerate(self.decoder_blocks):
            if i == PRIOR_BLOCK:
                prior = h
                if not reconstruct:
                    break
            h = self._block(blk, h)
        prior = torch.where(no_visible_key(coverage)[:, None, None], torch.zeros_like(prior), prior)
        return prior, (h if reconstruct else None), coverage

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: -> (reconstruction [B,3,S,S] in ImageNet-normalised units, token coverage [B, L])."""
        _, h, coverage = self.run(image, mask)
        return self.unpatchify(self.decoder_pred(self.decoder_norm(h)).float()), coverage

    def forward(self, image: torch.Tensor, mask: torch.Tensor,
                reconstruct: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """image: [B,3,H,W] in [0,1]; mask: [B,1,H,W], 1 = hole.

        Returns the prior [B, L, D_dec] (input of decoder block 6; zeros for an item whose every patch touches
        the hole, as the authors' code returns) and, if ``reconstruct``, the MAE reconstruction [B,3,S,S] in [0,1].
        """
        prior, h, _ = self.run(image, mask, reconstruct)
        if not reconstruct:
            return prior, None
        pixels = self.unpatchify(self.decoder_pred(self.decoder_norm(h)).float())
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
        return prior, (pixels * std + mean).clamp(0, 1)
