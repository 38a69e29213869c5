"""The inpaint branch network, built from ComfyUI's own UNet blocks (DESIGN principle 1's one exception).

This is the only module of the pack that imports ``comfy.ldm``. The branch is a UNet copy (BrushNet:
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
from torch import nn

from comfy.ldm.modules.diffusionmodules.openaimodel import (ResBlock, TimestepEmbedSequential, Upsample, UNetModel,
                                                           forward_timestep_embed, timestep_embedding)

from ..models.branch_layouts import MIDDLE_RES_RES


def _unet_kwargs(spec) -> dict:
    kw = spec.unet_config                              # a fresh dict of UNetModel arguments, read from shapes
    if kw["transformer_depth_middle"] is None:         # BrushNet's Res/Res middle: build one, add the other
        kw["transformer_depth_middle"] = -1
    return dict(image_size=None, out_channels=4, **kw)


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
                block = extra["block"]
                captured[(block[0], block[1], extra.get("block_index", 0))] = n
                return n
            to["patches"] = {"attn2_output_patch": [capture]}
        else:
            to["patches"] = {}
        to.pop("patches_replace", None)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h, hs, down, up = x, [], [], []
        for i, block in enumerate(self.input_blocks):
            to["block"] = ("input", i)
            h = forward_timestep_embed(block, h, emb, context, to)
            hs.append(h)
            down.append(self.zero_down[i](h))
        to["block"] = ("middle", 0)
        h = forward_timestep_embed(self.middle_block, h, emb, context, to)
        mid = self.zero_mid(h)
        for i, block in enumerate(self.output_blocks):
            to["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            shape = hs[-1].shape if hs else None
            if isinstance(block[-1], Upsample):
                h = forward_timestep_embed(block[:-1], h, emb, context, to)
                up.append(self.zero_up[len(up)](h))
                h = block[-1](h, output_shape=shape)
            else:
                h = forward_timestep_embed(block, h, emb, context, to)
            up.append(self.zero_up[len(up)](h))
        attn = {}
        if self.acp_sites:
            for site, lin in zip(self.acp_sites, self.zero_attn):
                if site not in captured:
                    raise RuntimeError(f"branch cross-attention site {site} did not run")
                attn[site] = lin(captured[site])
        return dict(down=down, mid=mid, up=up, attn=attn)
