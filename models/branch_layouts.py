"""Checkpoint layouts of the inpaint branch: BrushNet (SD1.5 / SDXL), PowerPaint-v2 and our PainterNet.

Pure torch/python (no ``comfy`` import). Three jobs:

* :func:`detect` reads a :class:`BranchSpec` — kind, base and a ComfyUI-``UNetModel``-style config — from
  the keys and shapes of a file (signature table :data:`SOURCES`, variant table :data:`VARIANTS`).
* :func:`convert` renames the file to the pack's **internal naming** and checks every name and shape: no
  key is left over, none is missing.
* :func:`injection_sites` / :func:`attention_sites` say where each branch output goes in ComfyUI's UNet.

Internal naming
    ComfyUI's ``UNetModel`` names (the ComfyUI side of ``comfy.utils.unet_to_diffusers``), with:

    * ``input_blocks.0.0.*``     the branch's 9-channel input conv (diffusers ``conv_in_condition``);
    * ``time_embed.{0,2}.*``, ``label_emb.0.{0,2}.*`` (SDXL only; diffusers ``add_embedding.linear_{1,2}``);
    * middle: BrushNet's attention-free Res/Res middle -> ``middle_block.0.*``, ``middle_block.1.*``
      (``middle == "res_res"``); PowerPaint/PainterNet Res/ST/Res -> ``middle_block.{0,1,2}.*``
      (``middle == "res_st_res"``);
    * zero convs ``zero_down.{k}.{weight,bias}`` (weight ``(C, C, 1, 1)``, k = 0 … n_down-1),
      ``zero_mid.*``, ``zero_up.{j}.*`` (j = 0 … n_up-1) — diffusers ``brushnet_down_blocks.{k}``,
      ``brushnet_mid_block``, ``brushnet_up_blocks.{j}``;
    * PainterNet only: attention control points ``zero_attn.{n}.{weight,bias}``, weight ``(C, C)`` (a
      Linear over tokens), one per cross-attention (attn2) site of the UNet, n in :func:`attention_sites`
      order: input blocks ascending, then the middle block, then output blocks ascending; inside a
      SpatialTransformer by transformer depth index.
    * no ``out.*`` (the branch has no output head).

PainterNet file format (version 1; full text in ``docs/painternet_format.md``)
    A ``.safetensors`` file already in the internal naming above, ACP at every attn2 site, with the
    safetensors metadata ``{"format": "consistent_inpaint.painternet", "version": "1",
    "base": "sd15" | "sdxl", "mask": "1=keep" | "1=hole"}`` (all four required; other metadata keys are
    ignored). Branch input channels ``[noisy latent (4), masked-image latent x VAE scale (4), mask (1)]``,
    masked image = image with hole pixels set to 0 in [0, 1] (BrushNet's convention); ``mask`` says the
    polarity of the mask channel ("1=keep" is BrushNet's, the recommended value). ``training/painternet.py``
    writes it, starting from :func:`painternet_from_unet`; :func:`painternet_metadata` gives the metadata dict.

Attention heads are not stored in the weights: the SD1.5 family uses 8 heads at every width
(``num_heads=8``), the SDXL family a head size of 64 (``num_head_channels=64``), as ComfyUI's own SD15 /
SDXL configs do.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import torch

from .weights import (CheckpointFormatError, check_tensors, count_indexed, load_weights, safetensors_metadata,
                      tensor_dict)

log = logging.getLogger(__name__)

PAINTERNET_FORMAT = "consistent_inpaint.painternet"
PAINTERNET_VERSION = "1"
MASK_KEEP = "1=keep"   # mask channel: 1 = known pixels, 0 = hole (BrushNet, PowerPaint-v2)
MASK_HOLE = "1=hole"
MASK_POLARITIES = (MASK_KEEP, MASK_HOLE)
BRANCH_IN_CHANNELS = 9  # [x_t (4), masked-image latent x scale (4), mask (1)]

MIDDLE_RES_RES = "res_res"          # BrushNet: two ResBlocks, no attention
MIDDLE_RES_ST_RES = "res_st_res"    # PowerPaint-v2, PainterNet: ComfyUI's standard middle

# injection hooks (see injection_sites)
HOOK_INPUT_AFTER_SKIP = "input_after_skip"   # input_block_patch_after_skip at ("input", 0)
HOOK_INPUT = "input"                         # input_block_patch at ("input", k)
HOOK_OUTPUT_H = "output_h"                   # output_block_patch at ("output", n): added to h
HOOK_PRE_UPSAMPLE = "pre_upsample"           # inside output block n, after its ResBlock(+ST), before Upsample
HOOK_AFTER_LAST = "after_last"               # after the last output block n, before the UNet's `out`

# per base: head layout (not stored in the weights)
_HEADS = {"sd15": {"num_heads": 8, "num_head_channels": -1},
          "sdxl": {"num_heads": -1, "num_head_channels": 64}}
_BASE_CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}


@dataclass(frozen=True)
class BranchSpec:
    """What a branch file is, read from its keys and shapes.

    ``config`` (read-only; lists stored as tuples) uses ``comfy.ldm...openaimodel.UNetModel`` argument
    names: ``in_channels`` (9), ``model_channels``, ``channel_mult``, ``num_res_blocks`` (per level),
    ``transformer_depth`` (per input ResBlock, input order), ``transformer_depth_output`` (per output
    block in ComfyUI's order: UNetModel *pops from the end*, so the last entry is output block 0),
    ``transformer_depth_middle`` (None for the Res/Res middle), ``context_dim`` (None without attention),
    ``num_heads``, ``num_head_channels``, ``use_linear_in_transformer``, ``use_spatial_transformer``,
    ``adm_in_channels`` (SDXL: read from ``add_embedding``, 2816 for released files; else None),
    ``num_classes`` ("sequential" with adm, else None), ``legacy`` (False).
    :attr:`unet_config` is a fresh plain dict (lists) for ``UNetModel(**...)``.
    """
    kind: str                      # "brushnet" | "powerpaint" | "painternet"
    base: str                      # "sd15" | "sdxl"
    config: Mapping[str, Any]
    middle: str                    # MIDDLE_RES_RES | MIDDLE_RES_ST_RES
    n_down: int                    # zero_down convs (= number of input blocks)
    n_up: int                      # zero_up convs (per output block: 1, +1 if it upsamples)
    acp_sites: tuple = ()          # painternet: ((block, block_id, block_index), ...) = zero_attn.{n} order
    mask: str = MASK_KEEP          # polarity of the branch's mask input channel
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def layout(self) -> str:
        """Naming of the file: "diffusers" (BrushNet, PowerPaint) or "internal" (PainterNet)."""
        return VARIANT_SOURCE[self.kind]

    @property
    def uses_context(self) -> bool:
        """The branch reads the text context (has cross-attention)."""
        return self.config["context_dim"] is not None

    @property
    def uses_y(self) -> bool:
        """The branch reads the UNet's ``y`` (SDXL pooled text + size embedding) through ``label_emb``."""
        return self.config["adm_in_channels"] is not None

    @property
    def base_context_dim(self) -> int:
        """Text width of the base model family (768 SD1.5, 2048 SDXL), also for attention-free branches."""
        return _BASE_CONTEXT_DIM[self.base]

    @property
    def unet_config(self) -> dict[str, Any]:
        """A fresh plain dict (lists, not tuples) of :attr:`config`, ready for ``UNetModel(**...)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()}

    @property
    def down_channels(self) -> tuple[int, ...]:
        """Channels of ``zero_down.{k}``."""
        return _zero_channels(self.config)["down"]

    @property
    def mid_channels(self) -> int:
        return _zero_channels(self.config)["mid"]

    @property
    def up_channels(self) -> tuple[int, ...]:
        """Channels of ``zero_up.{j}``."""
        return _zero_channels(self.config)["up"]

    @property
    def acp_channels(self) -> tuple[int, ...]:
        """Channels of ``zero_attn.{n}`` (empty unless PainterNet)."""
        return tuple(c for _s, c in _attention_sites_with_channels(self.config)) if self.acp_sites else ()


# --------------------------------------------------------------------------------------------------
# Structure of a UNet-shaped branch (one derivation, used by layout, sites and injection tables)
# --------------------------------------------------------------------------------------------------

class _InBlock(NamedTuple):
    kind: str      # "conv" | "res" | "down"
    level: int
    i: int         # index of the ResBlock inside its level (res), else 0
    ch: int        # output channels
    depth: int     # SpatialTransformer depth (0 = none)


class _OutBlock(NamedTuple):
    level: int
    u: int         # diffusers up_blocks index (= reversed level)
    i: int         # index of the ResBlock inside the up block
    cin: int
    ch: int
    depth: int
    upsample: bool


class _Plan(NamedTuple):
    inputs: tuple
    mid_ch: int
    mid_depth: int | None
    outputs: tuple


def _plan(config: Mapping[str, Any]) -> _Plan:
    """Blocks of ComfyUI's UNetModel for ``config``, in forward order (mirrors its constructor)."""
    mc, mult, nrb = config["model_channels"], config["channel_mult"], config["num_res_blocks"]
    depths = list(config["transformer_depth"])
    depths_out = list(config["transformer_depth_output"])
    ch = mc
    inputs = [_InBlock("conv", 0, 0, mc, 0)]
    for level, m in enumerate(mult):
        for i in range(nrb[level]):
            ch = mc * m
            inputs.append(_InBlock("res", level, i, ch, depths.pop(0)))
        if level != len(mult) - 1:
            inputs.append(_InBlock("down", level, 0, ch, 0))
    skips = [b.ch for b in inputs]
    outputs = []
    for u, level in enumerate(reversed(range(len(mult)))):
        for i in range(nrb[level] + 1):
            cin = ch + skips.pop()
            ch = mc * mult[level]
            outputs.append(_OutBlock(level, u, i, cin, ch, depths_out.pop(), bool(level) and i == nrb[level]))
    return _Plan(tuple(inputs), mc * mult[-1], config["transformer_depth_middle"], tuple(outputs))


def attention_sites(config: Mapping[str, Any]) -> tuple[tuple[str, int, int], ...]:
    """Every cross-attention (attn2) of a UNet with ``config``, in ComfyUI forward order.

    Each site is ``(block, block_id, block_index)`` as ComfyUI's attention patches see it:
    ``extra_options["block"] == (block, block_id)`` and ``extra_options["block_index"] == block_index``.
    SD1.5: 16 sites, SDXL: 70.
    """
    return tuple(s for s, _ in _attention_sites_with_channels(config))


def _attention_sites_with_channels(config):
    plan = _plan(config)
    sites = [(("input", k, t), b.ch) for k, b in enumerate(plan.inputs) for t in range(b.depth)]
    sites += [(("middle", 0, t), plan.mid_ch) for t in range(plan.mid_depth or 0)]
    sites += [(("output", n, t), b.ch) for n, b in enumerate(plan.outputs) for t in range(b.depth)]
    return sites


def zero_conv_channels(spec: BranchSpec) -> dict[str, Any]:
    """Channels of every zero conv: ``{"down": (C_0, ...), "mid": C, "up": (C_0, ...)}``."""
    return _zero_channels(spec.config)


def _zero_channels(config):
    plan = _plan(config)
    up = []
    for b in plan.outputs:
        up += [b.ch, b.ch] if b.upsample else [b.ch]
    return {"down": tuple(b.ch for b in plan.inputs), "mid": plan.mid_ch, "up": tuple(up)}


def injection_sites(spec: BranchSpec) -> dict[str, Any]:
    """Where each zero-conv output is added in ComfyUI's UNet (BrushNet's diffusers semantics).

    Returns ``{"down": ((hook, block), ...) per zero_down.k, "mid": (hook, block), "up": (...) per
    zero_up.j}`` with hooks:

    * ``("input_after_skip", 0)`` for k = 0 (diffusers stores the conv_in skip *before* adding, so only
      the running state changes); ``("input", k)`` for k >= 1 (added before the skip is stored);
    * mid: ``("output_h", 0)`` — added to ``h`` before output block 0;
    * up: ``("output_h", n + 1)`` after output block n, ``("pre_upsample", n)`` inside output block n
      after its ResBlock(+ST) and before its Upsample, ``("after_last", n)`` after the last output block.
    """
    plan = _plan(spec.config)
    down = ((HOOK_INPUT_AFTER_SKIP, 0),) + tuple((HOOK_INPUT, k) for k in range(1, len(plan.inputs)))
    last = len(plan.outputs) - 1
    up = []
    for n, b in enumerate(plan.outputs):
        if b.upsample:
            up.append((HOOK_PRE_UPSAMPLE, n))
        up.append((HOOK_OUTPUT_H, n + 1) if n < last else (HOOK_AFTER_LAST, n))
    return {"down": down, "mid": (HOOK_OUTPUT_H, 0), "up": tuple(up)}


# --------------------------------------------------------------------------------------------------
# Name and shape table: (internal name, diffusers name or None, shape) for every tensor
# --------------------------------------------------------------------------------------------------

RESNET_NAMES = (  # diffusers ResnetBlock2D -> ComfyUI ResBlock
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


class _Table:
    def __init__(self):
        self.rows: list[tuple[str, str | None, tuple[int, ...]]] = []

    def add(self, internal, diffusers, shape):
        self.rows.append((internal, diffusers, tuple(shape)))

    def param(self, i, d, name, shape):
        self.add(f"{i}.{name}", None if d is None else f"{d}.{name}", shape)

    def conv(self, i, d, cout, cin, k):
        self.param(i, d, "weight", (cout, cin, k, k))
        self.param(i, d, "bias", (cout,))

    def linear(self, i, d, cout, cin, bias=True):
        self.param(i, d, "weight", (cout, cin))
        if bias:
            self.param(i, d, "bias", (cout,))

    def norm(self, i, d, ch):
        self.param(i, d, "weight", (ch,))
        self.param(i, d, "bias", (ch,))

    def resblock(self, i, d, cin, cout, emb):
        r = {dn: f"{i}.{cn}" for dn, cn in RESNET_NAMES}
        self.norm(r["norm1"], f"{d}.norm1", cin)
        self.conv(r["conv1"], f"{d}.conv1", cout, cin, 3)
        self.linear(r["time_emb_proj"], f"{d}.time_emb_proj", cout, emb)
        self.norm(r["norm2"], f"{d}.norm2", cout)
        self.conv(r["conv2"], f"{d}.conv2", cout, cout, 3)
        if cin != cout:
            self.conv(r["conv_shortcut"], f"{d}.conv_shortcut", cout, cin, 1)

    def transformer(self, i, d, ch, depth, context_dim, linear):
        """SpatialTransformer: same sub-names in diffusers ``attentions.N`` and ComfyUI (inner dim = ch)."""
        self.norm(f"{i}.norm", f"{d}.norm", ch)
        proj = self.linear if linear else (lambda a, b, co, ci: self.conv(a, b, co, ci, 1))
        proj(f"{i}.proj_in", f"{d}.proj_in", ch, ch)
        for t in range(depth):
            bi, bd = f"{i}.transformer_blocks.{t}", f"{d}.transformer_blocks.{t}"
            for attn, kv in (("attn1", ch), ("attn2", context_dim)):
                self.linear(f"{bi}.{attn}.to_q", f"{bd}.{attn}.to_q", ch, ch, bias=False)
                self.linear(f"{bi}.{attn}.to_k", f"{bd}.{attn}.to_k", ch, kv, bias=False)
                self.linear(f"{bi}.{attn}.to_v", f"{bd}.{attn}.to_v", ch, kv, bias=False)
                self.linear(f"{bi}.{attn}.to_out.0", f"{bd}.{attn}.to_out.0", ch, ch)
            self.linear(f"{bi}.ff.net.0.proj", f"{bd}.ff.net.0.proj", 8 * ch, ch)   # GEGLU: 2 x 4ch
            self.linear(f"{bi}.ff.net.2", f"{bd}.ff.net.2", ch, 4 * ch)
            for n in ("norm1", "norm2", "norm3"):
                self.norm(f"{bi}.{n}", f"{bd}.{n}", ch)
        proj(f"{i}.proj_out", f"{d}.proj_out", ch, ch)


def _table(spec: BranchSpec) -> list[tuple[str, str | None, tuple[int, ...]]]:
    c = spec.config
    mc, emb = c["model_channels"], 4 * c["model_channels"]
    ctx, lin = c["context_dim"], c["use_linear_in_transformer"]
    plan = _plan(c)
    t = _Table()
    t.conv("input_blocks.0.0", "conv_in_condition", mc, c["in_channels"], 3)
    t.linear("time_embed.0", "time_embedding.linear_1", emb, mc)
    t.linear("time_embed.2", "time_embedding.linear_2", emb, emb)
    if c["adm_in_channels"] is not None:
        t.linear("label_emb.0.0", "add_embedding.linear_1", emb, c["adm_in_channels"])
        t.linear("label_emb.0.2", "add_embedding.linear_2", emb, emb)
    prev = mc
    for k, b in enumerate(plan.inputs):
        if b.kind == "res":
            t.resblock(f"input_blocks.{k}.0", f"down_blocks.{b.level}.resnets.{b.i}", prev, b.ch, emb)
            if b.depth:
                t.transformer(f"input_blocks.{k}.1", f"down_blocks.{b.level}.attentions.{b.i}", b.ch, b.depth, ctx, lin)
        elif b.kind == "down":
            t.conv(f"input_blocks.{k}.0.op", f"down_blocks.{b.level}.downsamplers.0.conv", b.ch, b.ch, 3)
        prev = b.ch
    m = plan.mid_ch
    t.resblock("middle_block.0", "mid_block.resnets.0", m, m, emb)
    if spec.middle == MIDDLE_RES_ST_RES:
        t.transformer("middle_block.1", "mid_block.attentions.0", m, plan.mid_depth, ctx, lin)
        t.resblock("middle_block.2", "mid_block.resnets.1", m, m, emb)
    else:
        t.resblock("middle_block.1", "mid_block.resnets.1", m, m, emb)
    for n, b in enumerate(plan.outputs):
        t.resblock(f"output_blocks.{n}.0", f"up_blocks.{b.u}.resnets.{b.i}", b.cin, b.ch, emb)
        if b.depth:
            t.transformer(f"output_blocks.{n}.1", f"up_blocks.{b.u}.attentions.{b.i}", b.ch, b.depth, ctx, lin)
        if b.upsample:
            t.conv(f"output_blocks.{n}.{2 if b.depth else 1}.conv", f"up_blocks.{b.u}.upsamplers.0.conv",
                   b.ch, b.ch, 3)
    zc = zero_conv_channels(spec)
    for k, ch in enumerate(zc["down"]):
        t.conv(f"zero_down.{k}", f"brushnet_down_blocks.{k}", ch, ch, 1)
    t.conv("zero_mid", "brushnet_mid_block", zc["mid"], zc["mid"], 1)
    for j, ch in enumerate(zc["up"]):
        t.conv(f"zero_up.{j}", f"brushnet_up_blocks.{j}", ch, ch, 1)
    if spec.kind == "painternet":
        for n, (_site, ch) in enumerate(_attention_sites_with_channels(c)):
            t.linear(f"zero_attn.{n}", None, ch, ch)
    return t.rows


def internal_shapes(spec: BranchSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the branch in the internal naming, with its shape (what :func:`convert` returns)."""
    return {i: s for i, _d, s in _table(spec)}


def diffusers_key_map(spec: BranchSpec) -> dict[str, str]:
    """Diffusers name -> internal name for every tensor of a BrushNet / PowerPaint file."""
    return {d: i for i, d, _s in _table(spec) if d is not None}


# --------------------------------------------------------------------------------------------------
# Reading the structure from a file
# --------------------------------------------------------------------------------------------------

def _name(path) -> str:
    return os.path.basename(str(path)) if path else "branch file"


def _families(sd: Mapping[str, Any], top: int = 10) -> str:
    """'down_blocks x120, brushnet_up_blocks x30, ...' — what a file holds, for error messages."""
    fam = Counter(k.split(".", 1)[0] for k in sd)
    parts = [f"{f} x{n}" for f, n in fam.most_common(top)]
    more = len(fam) - top
    return ", ".join(parts) + (f", … ({more} more families)" if more > 0 else "") + f"; {len(sd)} tensors"


def _transformer(sd, prefix, where, path):
    """(depth, context_dim, linear) of a SpatialTransformer at ``prefix`` (depth 0 if absent)."""
    depth = count_indexed(sd, f"{prefix}.transformer_blocks.")
    if depth == 0:
        if any(k.startswith(prefix + ".") for k in sd):
            raise CheckpointFormatError(
                f"{_name(path)}: {where} ({prefix}) has attention weights but no transformer_blocks")
        return 0, None, None
    to_k = sd.get(f"{prefix}.transformer_blocks.0.attn2.to_k.weight")
    proj = sd.get(f"{prefix}.proj_in.weight")
    if to_k is None or proj is None:
        raise CheckpointFormatError(f"{_name(path)}: {where} lacks {prefix}.proj_in.weight or "
                                    f"{prefix}.transformer_blocks.0.attn2.to_k.weight")
    return depth, int(to_k.shape[1]), proj.dim() == 2


class _Structure:
    """Collects per-block facts while a reader walks a file; turns them into a UNetModel config."""

    def __init__(self, path):
        self.path = path
        self.attn = set()     # (context_dim, linear) of every transformer

    def transformer(self, sd, prefix, where):
        depth, ctx, lin = _transformer(sd, prefix, where, self.path)
        if depth:
            self.attn.add((ctx, lin))
        return depth

    def channels(self, sd, key, where):
        if key not in sd:
            raise CheckpointFormatError(f"{_name(self.path)}: {where} is missing {key}")
        return int(sd[key].shape[0])

    def config(self, *, in_channels, model_channels, level_channels, nrb, depths, depths_out,
               depth_mid, adm):
        if len(self.attn) > 1:
            raise CheckpointFormatError(
                f"{_name(self.path)}: attention layers disagree on (context_dim, linear proj): {sorted(self.attn)}")
        mult = []
        for ch in level_channels:
            if ch % model_channels:
                raise CheckpointFormatError(
                    f"{_name(self.path)}: level width {ch} is not a multiple of model_channels {model_channels}")
            mult.append(ch // model_channels)
        ctx, lin = next(iter(self.attn)) if self.attn else (None, False)
        return {
            "in_channels": in_channels, "model_channels": model_channels, "channel_mult": tuple(mult),
            "num_res_blocks": tuple(nrb), "transformer_depth": tuple(depths),
            "transformer_depth_output": tuple(reversed(depths_out)),   # ComfyUI: popped from the end
            "transformer_depth_middle": depth_mid, "context_dim": ctx,
            "use_linear_in_transformer": bool(lin), "use_spatial_transformer": bool(self.attn),
            "adm_in_channels": adm, "num_classes": "sequential" if adm is not None else None,
            "legacy": False,
        }


def _config(s, sd, keys: tuple[str, str], level_ch, nrb, depths, depths_out, mid_depth):
    """The UNetModel config both readers end with: input width from the branch input conv, adm width if any
    (``keys``: the names of those two tensors in this layout)."""
    w, adm = sd[keys[0]], sd.get(keys[1])
    return s.config(in_channels=int(w.shape[1]), model_channels=int(w.shape[0]), level_channels=level_ch, nrb=nrb,
                    depths=depths, depths_out=depths_out, depth_mid=mid_depth or None,
                    adm=None if adm is None else int(adm.shape[1]))


def _read_diffusers(sd, path):
    """BrushNet / PowerPaint-v2 (diffusers ``BrushNetModel`` names) -> (config, middle, n_down, n_up)."""
    s = _Structure(path)
    levels = count_indexed(sd, "down_blocks.")
    if levels == 0:
        raise CheckpointFormatError(f"{_name(path)}: no down_blocks.* (found {_families(sd)})")
    nrb, level_ch, depths = [], [], []
    for b in range(levels):
        n = count_indexed(sd, f"down_blocks.{b}.resnets.")
        if n == 0:
            raise CheckpointFormatError(f"{_name(path)}: down_blocks.{b} has no resnets")
        nrb.append(n)
        level_ch.append(s.channels(sd, f"down_blocks.{b}.resnets.0.conv1.weight", f"down_blocks.{b}"))
        depths += [s.transformer(sd, f"down_blocks.{b}.attentions.{i}", f"down_blocks.{b}") for i in range(n)]
    ups = count_indexed(sd, "up_blocks.")
    depths_out = []
    for u in range(ups):
        n = count_indexed(sd, f"up_blocks.{u}.resnets.")
        depths_out += [s.transformer(sd, f"up_blocks.{u}.attentions.{i}", f"up_blocks.{u}") for i in range(n)]
    expected_up = [n + 1 for n in reversed(nrb)]
    found_up = [count_indexed(sd, f"up_blocks.{u}.resnets.") for u in range(ups)]
    if found_up != expected_up:
        raise CheckpointFormatError(
            f"{_name(path)}: up_blocks have {found_up} resnets; {levels} down levels with {nrb} need {expected_up}")
    mid_depth = s.transformer(sd, "mid_block.attentions.0", "mid_block")
    mid_res = count_indexed(sd, "mid_block.resnets.")
    if mid_res != 2:
        raise CheckpointFormatError(f"{_name(path)}: mid_block has {mid_res} resnets; BrushNet-family middles have 2")
    config = _config(s, sd, ("conv_in_condition.weight", "add_embedding.linear_1.weight"), level_ch, nrb, depths,
                     depths_out, mid_depth)
    middle = MIDDLE_RES_ST_RES if mid_depth else MIDDLE_RES_RES
    counts = (count_indexed(sd, "brushnet_down_blocks."), count_indexed(sd, "brushnet_up_blocks."))
    return config, middle, counts


def _read_internal(sd, path):
    """PainterNet (ComfyUI UNetModel names + zero_*) -> (config, middle, (n_down, n_up))."""
    s = _Structure(path)
    n_in = count_indexed(sd, "input_blocks.")
    nrb, level_ch, depths = [0], [], []
    ch = None
    for k in range(1, n_in):
        p = f"input_blocks.{k}.0"
        if f"{p}.op.weight" in sd:               # Downsample closes a level
            if nrb[-1] == 0:
                raise CheckpointFormatError(f"{_name(path)}: input_blocks.{k} downsamples a level with no ResBlock")
            level_ch.append(ch)
            nrb.append(0)
            continue
        c = s.channels(sd, f"{p}.out_layers.3.weight", f"input_blocks.{k} (ResBlock)")
        if nrb[-1] and c != ch:
            raise CheckpointFormatError(f"{_name(path)}: input_blocks.{k} is {c} wide inside a {ch}-wide level")
        ch = c
        nrb[-1] += 1
        depths.append(s.transformer(sd, f"input_blocks.{k}.1", f"input_blocks.{k}"))
    if ch is None or nrb[-1] == 0:
        raise CheckpointFormatError(f"{_name(path)}: input_blocks hold no ResBlocks after the last Downsample")
    level_ch.append(ch)
    n_out = count_indexed(sd, "output_blocks.")
    if n_out != sum(n + 1 for n in nrb):
        raise CheckpointFormatError(
            f"{_name(path)}: {n_out} output_blocks; input levels with {nrb} ResBlocks need {sum(n + 1 for n in nrb)}")
    depths_out = [s.transformer(sd, f"output_blocks.{n}.1", f"output_blocks.{n}")   # .1 may be the Upsample
                  if f"output_blocks.{n}.1.proj_in.weight" in sd else 0 for n in range(n_out)]
    if "middle_block.1.in_layers.0.weight" in sd:
        mid_depth, middle = 0, MIDDLE_RES_RES
    else:
        mid_depth, middle = s.transformer(sd, "middle_block.1", "middle_block"), MIDDLE_RES_ST_RES
        if not mid_depth:
            raise CheckpointFormatError(f"{_name(path)}: middle_block.1 is neither a ResBlock nor a SpatialTransformer")
    config = _config(s, sd, ("input_blocks.0.0.weight", "label_emb.0.0.weight"), level_ch, nrb, depths, depths_out,
                     mid_depth)
    counts = (count_indexed(sd, "zero_down."), count_indexed(sd, "zero_up."))
    return config, middle, counts


class Source(NamedTuple):
    layout: str
    signature: tuple        # keys that identify the naming
    describe: str
    read: Callable


SOURCES = (
    Source("diffusers", ("conv_in_condition.weight", "brushnet_mid_block.weight"),
           "BrushNet / PowerPaint-v2 diffusers layout (diffusion_pytorch_model.safetensors: conv_in_condition, "
           "down_blocks, mid_block, up_blocks, brushnet_down_blocks/mid_block/up_blocks)", _read_diffusers),
    Source("internal", ("input_blocks.0.0.weight", "zero_mid.weight"),
           f"PainterNet (format '{PAINTERNET_FORMAT}' v{PAINTERNET_VERSION}: ComfyUI UNet names + zero_down/"
           "zero_mid/zero_up/zero_attn, see docs/painternet_format.md)", _read_internal),
)

# (layout, has attention, has add_embedding) -> (kind, base, description). The number of levels and blocks is
# read from the shapes and checked against the model the branch is applied to (published files: SD1.5 4
# levels, SDXL 3), so structurally smaller test models work through the same code.
VARIANTS = {
    ("diffusers", False, False): ("brushnet", "sd15", "BrushNet SD1.5 (no attention, 12/1/15 zero convs)"),
    ("diffusers", False, True): ("brushnet", "sdxl", "BrushNet SDXL (no attention, add_embedding, 9/1/11 zero convs)"),
    ("diffusers", True, False): ("powerpaint", "sd15", "PowerPaint-v2 BrushNet SD1.5 (BrushNet + cross-attention)"),
    ("internal", True, False): ("painternet", "sd15", "PainterNet SD1.5"),
    ("internal", True, True): ("painternet", "sdxl", "PainterNet SDXL (label_emb)"),
}
VARIANT_SOURCE = {kind: layout for (layout, *_), (kind, _b, _d) in VARIANTS.items()}


def accepted_layouts() -> str:
    return "; ".join(d for (_k, _b, d) in VARIANTS.values())


def _check_painternet_metadata(metadata, base, path) -> str:
    """Validate the PainterNet metadata; returns the mask polarity."""
    want = painternet_metadata(base)
    if not metadata or metadata.get("format") != PAINTERNET_FORMAT:
        raise CheckpointFormatError(
            f"{_name(path)} has PainterNet-style keys but its safetensors metadata is "
            f"{dict(metadata) if metadata else 'missing'}; a PainterNet file carries {want} "
            "(see docs/painternet_format.md). Re-save it with that metadata.")
    problems = []
    if metadata.get("version") != PAINTERNET_VERSION:
        problems.append(f"version {metadata.get('version')!r} (this pack reads version {PAINTERNET_VERSION!r})")
    if metadata.get("base") != base:
        problems.append(f"base {metadata.get('base')!r} but the weights have the {base} structure")
    if metadata.get("mask") not in MASK_POLARITIES:
        problems.append(f"mask {metadata.get('mask')!r} (expected one of {', '.join(MASK_POLARITIES)})")
    if problems:
        raise CheckpointFormatError(f"{_name(path)}: PainterNet metadata: {'; '.join(problems)}")
    return metadata["mask"]


def detect(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, path="") -> BranchSpec:
    """Recognise a branch file from its keys and shapes (``metadata``: the safetensors header metadata)."""
    source = next((s for s in SOURCES if all(k in sd for k in s.signature)), None)
    if source is None:
        if any("trainable_embeddings.P_" in k for k in sd):
            raise CheckpointFormatError(
                f"{_name(path)} is PowerPaint's task-prompt text encoder, not the branch: load it with the "
                "'PowerPaint Task Prompt' node, and the branch (diffusion_pytorch_model.safetensors) here")
        raise CheckpointFormatError(
            f"{_name(path)}: expected an inpaint-branch file ({accepted_layouts()}; signature keys: "
            f"{'; '.join(f'{s.layout}: ' + ', '.join(s.signature) for s in SOURCES)}); got a file of {_families(sd)}. "
            "Choose the branch's diffusion_pytorch_model.safetensors (or a PainterNet file)")
    config, middle, (n_down, n_up) = source.read(sd, path)
    attention = config["use_spatial_transformer"]
    adm = config["adm_in_channels"] is not None
    key = (source.layout, attention, adm)
    if key not in VARIANTS:
        raise CheckpointFormatError(
            f"{_name(path)}: {source.layout} layout with {len(config['channel_mult'])} levels, "
            f"{'with' if attention else 'no'} cross-attention, {'with' if adm else 'no'} add_embedding/label_emb "
            f"is not a known branch. Accepted: {accepted_layouts()}.")
    kind, base, _desc = VARIANTS[key]
    if config["in_channels"] != BRANCH_IN_CHANNELS:
        raise CheckpointFormatError(
            f"{_name(path)}: branch input conv takes {config['in_channels']} channels; the branch needs "
            f"{BRANCH_IN_CHANNELS} (noisy latent 4 + masked-image latent 4 + mask 1)")
    config.update(_HEADS[base])
    mask = _check_painternet_metadata(metadata, base, path) if kind == "painternet" else MASK_KEEP
    zc = _zero_channels(config)
    want = (len(zc["down"]), len(zc["up"]))
    if (n_down, n_up) != want:
        names = (("brushnet_down_blocks", "brushnet_up_blocks") if source.layout == "diffusers"
                 else ("zero_down", "zero_up"))
        raise CheckpointFormatError(
            f"{_name(path)}: {names[0]} x{n_down}, {names[1]} x{n_up}; the {base} structure has "
            f"{want[0]} input blocks and {want[1]} output layers, so it needs {want[0]} and {want[1]}")
    return BranchSpec(kind=kind, base=base, config=MappingProxyType(config), middle=middle, n_down=want[0],
                      n_up=want[1], acp_sites=attention_sites(config) if kind == "painternet" else (), mask=mask,
                      metadata=MappingProxyType(dict(metadata or {})))


def convert(sd: Mapping[str, torch.Tensor], spec: BranchSpec, path="") -> dict[str, torch.Tensor]:
    """The file's tensors in the internal naming. Every key must be used; names and shapes are checked."""
    rows = [(d if spec.layout == "diffusers" else i, i, s) for i, d, s in _table(spec)]   # (file name, ours, shape)
    rename = {f: i for f, i, _s in rows}
    check_tensors(sd, {f: s for f, _i, s in rows}, path, VARIANTS_BY_KIND[(spec.kind, spec.base)])
    return {rename[k]: v for k, v in sd.items()}


VARIANTS_BY_KIND = {(kind, base): desc for (kind, base, desc) in VARIANTS.values()}


# --------------------------------------------------------------------------------------------------
# PainterNet files
# --------------------------------------------------------------------------------------------------

def painternet_metadata(base: str, mask: str = MASK_KEEP) -> dict[str, str]:
    """The safetensors metadata a PainterNet file carries (pass to ``safetensors.torch.save_file``)."""
    if base not in _HEADS:
        raise ValueError(f"base must be one of {', '.join(_HEADS)}, got {base!r}")
    if mask not in MASK_POLARITIES:
        raise ValueError(f"mask must be one of {', '.join(MASK_POLARITIES)}, got {mask!r}")
    return {"format": PAINTERNET_FORMAT, "version": PAINTERNET_VERSION, "base": base, "mask": mask}


def load_branch(path) -> tuple[BranchSpec, dict[str, torch.Tensor]]:
    """Read a branch file safely, detect its layout and return it in the internal naming."""
    sd = tensor_dict(load_weights(str(path)), str(path))
    spec = detect(sd, safetensors_metadata(path), path)
    return spec, convert(sd, spec, path)


def painternet_from_unet(unet_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A PainterNet branch initialised from a base UNet (ComfyUI names, ``diffusion_model.`` stripped) with
    ``config`` (its ComfyUI ``unet_config``), as BrushNet initialises its branch: every UNet weight copied
    (cross-attention kept), the input conv widened from 4 to 9 channels with zeros for the masked-image latent and
    mask, no output head, and every zero connection (layer outputs and attention control points) at zero. The
    result is in the internal naming; :func:`detect` with :func:`painternet_metadata` reads it back. Copied weights
    are the UNet's own tensors (no copy of a multi-GB UNet): load the result into a module, which copies them."""
    sd = {k: v for k, v in unet_sd.items() if not k.startswith("out.")}
    w = sd.get("input_blocks.0.0.weight")
    if w is None or w.ndim != 4 or w.shape[1] != 4:
        raise ValueError("the base UNet must take a 4-channel latent (a text-to-image SD1.5 / SDXL UNet); got "
                         f"input conv {None if w is None else tuple(w.shape)}")
    sd["input_blocks.0.0.weight"] = torch.cat([w, w.new_zeros(w.shape[0], BRANCH_IN_CHANNELS - 4, *w.shape[2:])], 1)
    ch = _zero_channels(config)

    def zero(name, c, conv=True):
        shape = (c, c, 1, 1) if conv else (c, c)
        sd[f"{name}.weight"], sd[f"{name}.bias"] = w.new_zeros(shape), w.new_zeros(c)

    for k, c in enumerate(ch["down"]):
        zero(f"zero_down.{k}", c)
    zero("zero_mid", ch["mid"])
    for j, c in enumerate(ch["up"]):
        zero(f"zero_up.{j}", c)
    for n, (_site, c) in enumerate(_attention_sites_with_channels(config)):
        zero(f"zero_attn.{n}", c, conv=False)
    return sd
