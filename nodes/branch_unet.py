"""The networks that are copies of the UNet, built from ComfyUI's own UNet blocks (DESIGN principle 1's one
exception): the inpaint branch and LAR-Gen's RefineNet. The pack's one import of ComfyUI's UNet blocks (those
``nodes/branch.py`` places in a patched output block come from here too).

The inpaint branch is a UNet copy (BrushNet:
attention-free; PowerPaint-v2 and PainterNet: with cross-attention) whose every layer output goes through a
zero-initialised 1x1 conv, and (PainterNet) whose every cross-attention output goes through a zero-initialised
linear, the attention control point. Weights arrive in the internal naming of ``models.branch_layouts``,
which is ComfyUI's UNet naming plus ``zero_down/zero_mid/zero_up/zero_attn``.

``BranchNet.forward`` returns the scaled-later residuals:
  ``down[k]`` per input block, ``mid``, ``up[j]`` per up-path site (after every output block, and before each
  upsampler), and ``attn[(block_kind, block_id, block_index)]`` per cross-attention site (PainterNet).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from comfy.ldm.modules.diffusionmodules.openaimodel import (ResBlock, TimestepEmbedSequential, Upsample, UNetModel,
                                                           forward_timestep_embed, timestep_embedding)

from comfy.ldm.modules.attention import SpatialTransformer

from ..models.branch_layouts import MIDDLE_RES_RES
from ..models.sites import site_of
from .comfy_compat import attention


def transformer_sites(unet) -> dict:
    """{(block kind, block id, transformer index): BasicTransformerBlock} of a ComfyUI UNetModel (or a copy), in
    the naming of ComfyUI's transformer_options "block" / "block_index"."""
    groups = ([("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
              + [("output", i, b) for i, b in enumerate(unet.output_blocks)])
    return {(kind, i, j): tb for kind, i, block in groups for layer in block if isinstance(layer, SpatialTransformer)
            for j, tb in enumerate(layer.transformer_blocks)}


def set_transformer_norm_eps(unet, eps: float) -> None:
    """The GroupNorm in front of every spatial transformer (ComfyUI and SGM: eps 1e-6). Only for networks the
    pack itself built (LAR-Gen was trained with 1e-5 there)."""
    for m in unet.modules():
        if isinstance(m, SpatialTransformer):
            m.norm.eps = eps


def _unet_kwargs(spec) -> dict:
    kw = spec.unet_config                              # a fresh dict of UNetModel arguments, read from shapes
    if kw["transformer_depth_middle"] is None:         # BrushNet's Res/Res middle: build one, add the other
        kw["transformer_depth_middle"] = -1
    return dict(image_size=None, out_channels=4, **kw)


# transformer_options key for training: a dict that the branch fills with {site: cross-attention probabilities
# [B, HW, L], averaged over heads} (PainterNet's ATAL reads them). Computed explicitly (softmax of QK^T), so only
# for training; inference never sets it.
ATTENTION_PROBE = "consistent_inpaint_attention_probe"
# transformer_options key for training: recompute each branch block in backward (gradient checkpointing)
GRADIENT_CHECKPOINT = "consistent_inpaint_checkpoint"


def _probed_attention(probe: dict):
    def attn(q, k, v, extra):
        heads = extra["n_heads"]
        B, N, C = q.shape
        d = C // heads
        qh, kh, vh = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        p = torch.softmax((qh.float() @ kh.float().transpose(-1, -2)) * d ** -0.5, dim=-1)
        probe[site_of(extra)] = p.mean(1)
        return (p.to(vh.dtype) @ vh).transpose(1, 2).reshape(B, N, C)
    return attn


class BranchNet(nn.Module):
    def __init__(self, spec, dtype=None, device=None, operations=None):
        super().__init__()
        unet = UNetModel(**_unet_kwargs(spec), dtype=dtype, device=device, operations=operations)
        self.model_channels = unet.model_channels
        self.time_embed = unet.time_embed
        self.label_emb = getattr(unet, "label_emb", None)
        self.input_blocks, self.output_blocks = unet.input_blocks, unet.output_blocks
        mid_ch = unet.model_channels * unet.channel_mult[-1]
        if spec.middle == MIDDLE_RES_RES:  # BrushNet: two ResBlocks, no attention (UNetModel cannot build it)
            first = unet.middle_block[0]
            second = ResBlock(mid_ch, first.emb_channels, 0, out_channels=mid_ch, dims=2,
                              dtype=dtype, device=device, operations=operations)
            self.middle_block = TimestepEmbedSequential(first, second)
        else:
            self.middle_block = unet.middle_block
        del unet

        def zconv(ch):
            return operations.Conv2d(ch, ch, 1, dtype=dtype, device=device)

        self.zero_down = nn.ModuleList(zconv(c) for c in spec.down_channels)
        self.zero_mid = zconv(mid_ch)
        self.zero_up = nn.ModuleList(zconv(c) for c in spec.up_channels)
        self.acp_sites = tuple(spec.acp_sites)
        self.attn2_sites = tuple(transformer_sites(self))       # every cross-attention (the training probe's)
        self.zero_attn = nn.ModuleList(operations.Linear(c, c, dtype=dtype, device=device)
                                       for c in spec.acp_channels)

    @property
    def dtype(self):
        return self.zero_mid.weight.dtype

    def forward(self, x, timesteps, context=None, y=None, transformer_options=None):
        """x: [B, 9, h, w] branch input; -> dict(down=[...], mid=T, up=[...], attn={site: [B, HW, C]})."""
        to = dict(transformer_options or {})
        captured = {}
        if self.acp_sites:
            def capture(n, extra):
                captured[site_of(extra)] = n
                return n
            to["patches"] = {"attn2_output_patch": [capture]}
        else:
            to["patches"] = {}
        to.pop("patches_replace", None)
        probe = to.pop(ATTENTION_PROBE, None)
        checkpointed = to.pop(GRADIENT_CHECKPOINT, False) and torch.is_grad_enabled()

        def run_block(block, h):
            if checkpointed:
                # a copy of the options: ``to["block"]`` moves on before the recomputation in backward
                return torch.utils.checkpoint.checkpoint(forward_timestep_embed, block, h, emb, context, dict(to),
                                                         use_reentrant=False)
            return forward_timestep_embed(block, h, emb, context, to)

        if probe is not None:
            to["patches_replace"] = {"attn2": {site: _probed_attention(probe) for site in self.attn2_sites}}
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h, hs, down, up = x, [], [], []
        for i, block in enumerate(self.input_blocks):
            to["block"] = ("input", i)
            h = run_block(block, h)
            hs.append(h)
            down.append(self.zero_down[i](h))
        to["block"] = ("middle", 0)
        h = run_block(self.middle_block, h)
        mid = self.zero_mid(h)
        for i, block in enumerate(self.output_blocks):
            to["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            shape = hs[-1].shape if hs else None
            if isinstance(block[-1], Upsample):
                h = run_block(block[:-1], h)
                up.append(self.zero_up[len(up)](h))
                h = block[-1](h, output_shape=shape)
            else:
                h = run_block(block, h)
            up.append(self.zero_up[len(up)](h))
        attn = {}
        if self.acp_sites:
            for site, lin in zip(self.acp_sites, self.zero_attn):
                if site not in captured:
                    raise RuntimeError(f"branch cross-attention site {site} did not run")
                attn[site] = lin(captured[site])
        return dict(down=down, mid=mid, up=up, attn=attn)


class RefineNet(nn.Module):
    """LAR-Gen's RefineNet: a copy of the SDXL UNet with a 4-channel input (weights in ComfyUI's UNet naming, i.e.
    the authors' ``ref_*`` keys without ``ref_``; the output convolution ``out`` does not exist), plus the projector
    ``Linear(CLIP width -> context width)`` that makes its cross-attention context from CLIP's last hidden state.

    ``forward`` returns ``norm1(x)`` of every self-attention in the output blocks, keyed by ComfyUI site
    ``("output", block id, transformer index)``: the tokens the main UNet's decoder self-attention appends. The
    network stops after the last output block that has a transformer."""

    def __init__(self, unet_config: dict, clip_width: int, dtype=None, device=None, operations=None):
        super().__init__()
        cfg = dict(unet_config, num_heads=-1, num_head_channels=64)
        cfg.update(use_checkpoint=False, image_size=None)
        unet = UNetModel(**cfg, dtype=dtype, device=device, operations=operations)
        self.model_channels = unet.model_channels
        self.time_embed, self.label_emb = unet.time_embed, unet.label_emb
        self.input_blocks, self.middle_block, self.output_blocks = unet.input_blocks, unet.middle_block, unet.output_blocks
        del unet
        self.projector = operations.Linear(clip_width, cfg["context_dim"], dtype=dtype, device=device)
        every = transformer_sites(self)
        self.sites = tuple(s for s in every if s[0] == "output")
        self.last_block = max((s[1] for s in self.sites), default=-1)
        self.run_sites = {s: tb for s, tb in every.items() if s[0] != "output" or s[1] <= self.last_block}

    @property
    def dtype(self):
        return self.projector.weight.dtype

    def context_kv(self, context: torch.Tensor) -> dict:
        """{site: (keys, values)} of every cross-attention the forward runs, for ``context`` [S, 257, 2048]. The
        context is the same on every step of a run, so a caller keeps these per run instead of projecting 257
        tokens in all 70 cross-attentions on every step (about 5 % of an SDXL step at 512²)."""
        return {site: (tb.attn2.to_k(context), tb.attn2.to_v(context)) for site, tb in self.run_sites.items()}

    def forward(self, x, timesteps, context, y, transformer_options=None, context_kv=None):
        """x: [S, 4, h, w] the subject latent at the model's input scaling; context: [S, 257, 2048] (projected);
        y: [S, 2816]; context_kv: ``context_kv(context)`` when the caller keeps it. -> {site: [S, tokens, channels]}."""
        if context_kv is None:
            context_kv = self.context_kv(context)

        def cross_attention(q, k, v, extra):      # k, v: the projections of an empty context (below)
            keys, values = context_kv[site_of(extra)]
            return attention(q, keys, values, extra["n_heads"], extra)

        captured = {}

        def capture(n, context_attn1, value_attn1, extra):
            site = site_of(extra)
            if site[0] == "output":
                captured[site] = n
            return n, context_attn1, value_attn1

        to = {k: v for k, v in (transformer_options or {}).items() if k not in ("patches", "patches_replace", "wrappers")}
        to["patches"] = {"attn1_patch": [capture]}
        # Every cross-attention reads its kept keys/values; ComfyUI's block still applies to_q, to_out and its
        # attention options. It projects the context it is given through to_k / to_v first, so it gets none.
        to["patches_replace"] = {"attn2": {site: cross_attention for site in context_kv}}
        context = context[:, :0]
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        emb = emb + self.label_emb(y)
        h, hs = x, []
        for i, block in enumerate(self.input_blocks):
            to["block"] = ("input", i)
            h = forward_timestep_embed(block, h, emb, context, to)
            hs.append(h)
        to["block"] = ("middle", 0)
        h = forward_timestep_embed(self.middle_block, h, emb, context, to)
        for i, block in enumerate(self.output_blocks[:self.last_block + 1]):
            to["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            if i == self.last_block and isinstance(block[-1], Upsample):
                block = block[:-1]          # nothing after this block's self-attention is read
            h = forward_timestep_embed(block, h, emb, context, to, output_shape=hs[-1].shape if hs else None)
        missing = [s for s in self.sites if s not in captured]
        if missing:
            raise RuntimeError(f"RefineNet self-attention sites did not run: {missing[:4]}")
        return captured
