"""Inpaint branch nodes: PainterNet (with attention control points), BrushNet and PowerPaint-v2.

How the branch reaches the UNet (all per model, through ComfyUI's patch routes; the input MODEL is cloned):

* a ``DIFFUSION_MODEL`` wrapper runs the branch once per model call for the whole cond/uncond batch (once for
  both CFG rows when the branch ignores the prompt and the rows are identical, BrushNet SD1.5), only inside
  [start_percent, end_percent], and hands the scaled residuals to the UNet in its ``transformer_options``;
* ``input_block_patch`` / ``input_block_patch_after_skip`` / ``output_block_patch`` add them where the UNet
  exposes a hook (input blocks, after the middle block, after each output block);
* BrushNet also adds inside the output blocks that end in an upsampler (before the upsampler) and after the
  last output block, where ComfyUI has no hook: for those blocks an *object patch* (``add_object_patch``,
  undone by ComfyUI when the model is unpatched) swaps in a ``TimestepEmbedSequential`` holding the very
  same layers under the same names plus a weightless ``BranchAdder`` that a ``forward_timestep_embed_patch``
  handler resolves. Weight names (LoRA, low-VRAM casting) are unchanged;
* PainterNet's attention control points go through ``attn2_output_patch``;
* the branch network is an additional model of the patched MODEL, so ComfyUI loads and offloads it with
  the UNet.
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_management as mm

from ..models import branch_layouts, powerpaint_tasks
from ..models.sites import site_of
from ..models.weights import build_from_state_dict, load_weights, tensor_dict
from . import checks
from . import comfy_compat as compat
from .branch_unet import BranchNet, TimestepEmbedSequential, Upsample
from .common import (CheckedNode, PercentRangeNode, Precision, model_files, model_path, percent_inputs, resolve_dtype,
                     wrap_patcher)
from .accepts import latent_family
from .comfy_compat import io
from .layout import centre_crop_to_multiple, check_finite, image_and_mask, row_batch, vae_encode
from .patching import ModelPatch, RunState, moved, sigma_range

log = logging.getLogger(__name__)
CATEGORY = "inpaint/consistent/branch"
APPLY = "Apply Inpaint Branch"        # the display name of the node whose patch refuses at sampling time
BASE_NAMES = {768: "SD1.5", 2048: "SDXL"}          # text width -> model family
BranchType = io.Custom("INPAINT_BRANCH")


@dataclass(frozen=True)
class InpaintBranch:
    patcher: object            # ModelPatcher holding a BranchNet
    spec: object               # models.branch_layouts.BranchSpec


# -- loading ---------------------------------------------------------------------------------------------
def load_branch(path: str, dtype: torch.dtype, device, offload) -> InpaintBranch:
    spec, sd = branch_layouts.load_branch(path)
    net = build_from_state_dict(
        lambda device: BranchNet(spec, dtype=dtype, device=device, operations=compat.cast_operations()),
        sd, path, f"the {spec.kind} ({spec.base}) branch network built from its shapes", dtype)
    return InpaintBranch(wrap_patcher(net, device, offload), spec)


# -- patching -------------------------------------------------------------------------------------------
class BranchAdder(nn.Module):
    """Weightless marker layer placed inside an output block; the forward_timestep_embed_patch handler adds
    the branch residual ``up[index]`` of the patch keyed ``key`` (a no-op when that patch is inactive)."""

    def __init__(self, key: str, index: int):
        super().__init__()
        self.key, self.index = key, index

    def forward(self, x):          # only reached if the handler is missing; stay harmless
        return x


def _adder_handler(layer, x, emb, context, transformer_options, *args, **kwargs):
    res = transformer_options.get(layer.key)
    return x if res is None else x + res["up"][layer.index].to(x.dtype)


def _same(a: tuple, b: tuple) -> bool:
    """Two chunks' branch inputs (tuples of tensors or None) are identical."""
    return all((x is None) == (y is None) and (x is None or (x.shape == y.shape and torch.equal(x, y)))
               for x, y in zip(a, b))


class _RunState(RunState):
    """Per sampling run (patching.run_scope): the branch's fixed inputs moved to the sampling device once, and the
    branch results of the current step. When ComfyUI runs the positive and the negative rows in separate model
    calls (it does so when memory is short), a row whose branch inputs equal one already computed in this step
    reuses it."""

    def __init__(self):
        super().__init__()
        self.timesteps, self.entries = None, []   # the current step's [(chunk inputs, outputs for its rows)]

    def lookup(self, parts):
        """Outputs computed this step for inputs equal to ``parts`` (parts[1] = timesteps; a new step clears)."""
        if self.timesteps is None or not torch.equal(self.timesteps, parts[1]):
            self.timesteps, self.entries = parts[1], []
            return None
        return next((out for inputs, out in self.entries if _same(inputs, parts)), None)

    def store(self, parts, outputs):
        self.entries.append((parts, outputs))


def _split_rows(out: dict, start: int, stop: int) -> dict:
    return dict(down=[t[start:stop] for t in out["down"]], mid=out["mid"][start:stop],
                up=[t[start:stop] for t in out["up"]], attn={k: v[start:stop] for k, v in out["attn"].items()})


def _cat_rows(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return dict(down=[torch.cat(ts) for ts in zip(*(p["down"] for p in parts))],
                mid=torch.cat([p["mid"] for p in parts]), up=[torch.cat(ts) for ts in zip(*(p["up"] for p in parts))],
                attn={k: torch.cat([p["attn"][k] for p in parts]) for k in parts[0]["attn"]})


def _distinct(chunks: list[tuple]):
    """-> (keep, source): indices of the chunks to run and, for every chunk, the position in ``keep`` of the
    chunk whose inputs are identical."""
    keep, source = [], []
    for i, parts in enumerate(chunks):
        j = next((j for j, k in enumerate(keep) if _same(parts, chunks[k])), None)
        if j is None:
            j = len(keep)
            keep.append(i)
        source.append(j)
    return keep, source


def _common_length(contexts: dict) -> dict:
    """Token sequences of different lengths (e.g. 77 and 154) repeated to their least common multiple, as
    ComfyUI batches cross-attention contexts; -> a new dict."""
    n = 1
    for c in contexts.values():
        n = n * c.shape[1] // math.gcd(n, c.shape[1])
    return {k: c.repeat(1, n // c.shape[1], 1) if c.shape[1] != n else c for k, c in contexts.items()}


class BranchPatch(ModelPatch):
    """Everything one ApplyBranch attaches to a model."""

    name = "branch"

    def __init__(self, branch: InpaintBranch, cond: torch.Tensor, scale: float, sigma_window: tuple[float, float],
                 latent_channels: int, branch_context: dict | None, sites):
        super().__init__(sigma_window)
        self.branch, self.cond, self.scale = branch, cond, scale
        self.latent_channels = latent_channels
        self.branch_context = branch_context     # {0: positive tokens, 1: negative tokens} or None
        # where each up-path residual goes: ('output_h', n) / ('pre_upsample', n) / ('after_last', n)
        self.branch_sites_up = tuple(sites["up"])
        self.out_h = {n: j for j, (kind, n) in enumerate(sites["up"]) if kind == branch_layouts.HOOK_OUTPUT_H}
        self.in_after_skip = {k for k, (kind, _) in enumerate(sites["down"])
                              if kind == branch_layouts.HOOK_INPUT_AFTER_SKIP}
        if sites["mid"] != (branch_layouts.HOOK_OUTPUT_H, 0):
            raise ValueError(f"unsupported middle-block injection site {sites['mid']}")

    def acts(self) -> bool:
        return self.scale != 0

    def new_run(self):
        return _RunState()

    # - the wrapper: run the branch, pass the residuals down -
    def wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if not self.active(transformer_options):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        res = self.run_branch(x, timesteps, context, y, transformer_options)
        return executor(x, timesteps, context, y, control, {**transformer_options, self.key: res}, **kwargs)

    def branch_inputs(self, x, timesteps, context, y, transformer_options, run):
        """(the branch image for one chunk's rows, per-chunk (latent, timesteps, context, y), chunks, rows)."""
        chunks, rows = self.chunks_rows(x.shape[0], transformer_options)
        lat = x[:, :self.latent_channels]
        cond = moved(run, "cond", self.cond, x.device, x.dtype)
        if cond.shape[-2:] != lat.shape[-2:]:
            raise checks.refuse(APPLY, f"the sampled latent to be the size of the branch image ({cond.shape[-1] * 8}x"
                                f"{cond.shape[-2] * 8} px, the latent output of {APPLY})",
                                f"a {lat.shape[-1] * 8}x{lat.shape[-2] * 8} px latent",
                                f"Sample the latent output of {APPLY} (not an empty or upscaled latent of another "
                                "size); area conditioning (ConditioningSetArea) cannot be combined with an inpaint "
                                "branch either")
        if cond.shape[0] not in (1, rows):
            raise checks.refuse(APPLY, f"a sampled latent batch of {cond.shape[0]} (the image batch) or an image "
                                "batch of 1", f"a latent batch of {rows}",
                                f"Sample the latent output of {APPLY}, or give one image per latent")
        spec = self.branch.spec
        ctx = context if spec.uses_context else None
        if ctx is not None and self.branch_context is not None:
            ctx = torch.cat([row_batch(moved(run, c, self.branch_context[c], x.device, x.dtype), rows, "branch prompt")
                             for c in chunks])
        parts = (lat, timesteps, ctx, y if spec.uses_y else None)
        per_chunk = [tuple(None if p is None else p[i * rows:(i + 1) * rows] for p in parts)
                     for i in range(len(chunks))]
        return cond, per_chunk, chunks, rows

    def run_net(self, cond, inputs: list, rows: int, transformer_options) -> dict:
        """The branch network on the chunks ``inputs`` (each (latent, timesteps, context, y)), in one batch."""
        lat, t, ctx, y = (None if inputs[0][i] is None else torch.cat([p[i] for p in inputs]) for i in range(4))
        net = self.branch.patcher.model
        dt = net.dtype
        inp = torch.cat([lat, row_batch(cond, rows, "image").repeat(len(inputs), 1, 1, 1)], dim=1)
        to = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace", "wrappers")}
        return net(inp.to(dt), t, None if ctx is None else ctx.to(dt), None if y is None else y.to(dt), to)

    def run_branch(self, x, timesteps, context, y, transformer_options):
        run = self.run()
        cond, per_chunk, chunks, rows = self.branch_inputs(x, timesteps, context, y, transformer_options, run)
        # Chunks whose branch inputs are equal share one branch run: always for BrushNet SD1.5 (it reads no
        # prompt), and for PowerPaint tasks whose positive and negative task prompts are the same; across the
        # model calls of one step too, when ComfyUI runs the rows separately.
        keep, source = _distinct(per_chunk)
        found = [None if run is None else run.lookup(per_chunk[k]) for k in keep]
        todo = [n for n, f in enumerate(found) if f is None]          # positions in keep
        if todo:
            out = self.run_net(cond, [per_chunk[keep[n]] for n in todo], rows, transformer_options)
            for r, n in enumerate(todo):
                found[n] = out if len(todo) == 1 else _split_rows(out, r * rows, (r + 1) * rows)
                if run is not None:
                    run.store(per_chunk[keep[n]], found[n])
        res = out if len(todo) == len(chunks) else _cat_rows([found[j] for j in source])
        s = self.scale

        def fin(t):   # in the UNet's dtype and scaled once per call, so the patches only add
            return t.to(x.dtype) if s == 1 else t.to(x.dtype) * s

        return dict(down=[fin(t) for t in res["down"]], mid=fin(res["mid"]), up=[fin(t) for t in res["up"]],
                    attn={k: fin(v) for k, v in res["attn"].items()})

    # - the UNet-side patches -
    def input_block(self, h, transformer_options):
        res = transformer_options.get(self.key)
        if res is None:
            return h
        i = transformer_options["block"][1]
        return h if i in self.in_after_skip else h + res["down"][i].to(h.dtype)

    def input_block_after_skip(self, h, transformer_options):
        res = transformer_options.get(self.key)
        if res is None:
            return h
        i = transformer_options["block"][1]
        return h + res["down"][i].to(h.dtype) if i in self.in_after_skip else h

    def output_block(self, h, hsp, transformer_options):
        res = transformer_options.get(self.key)
        if res is None:
            return h, hsp
        n = transformer_options["block"][1]
        if n == 0:
            h = h + res["mid"].to(h.dtype)
        j = self.out_h.get(n)
        if j is not None:
            h = h + res["up"][j].to(h.dtype)
        return h, hsp

    def attn2_output(self, n, extra_options):
        res = extra_options.get(self.key)
        if res is None:
            return n
        a = res["attn"].get(site_of(extra_options))
        return n if a is None else n + a.to(n.dtype)

    def attach(self, model):
        """-> a patched clone of ``model``."""
        m = self.clone_with_run_scope(model, (self.branch.patcher,))
        compat.add_wrapper(m, compat.DIFFUSION_MODEL, self.key, self.wrapper)
        m.set_model_input_block_patch(self.input_block)
        m.set_model_input_block_patch_after_skip(self.input_block_after_skip)
        m.set_model_output_block_patch(self.output_block)
        if self.branch.spec.acp_sites:
            m.set_model_attn2_output_patch(self.attn2_output)
        self.add_inside_blocks(m)
        return m

    def add_inside_blocks(self, m) -> None:
        """BrushNet's additions inside output blocks (before an upsampler, after the last block): the block swapped,
        by an object patch, for one holding the same layers under the same names plus BranchAdders."""
        inside = {}
        for j, (kind, n) in enumerate(self.branch_sites_up):
            if kind in (branch_layouts.HOOK_PRE_UPSAMPLE, branch_layouts.HOOK_AFTER_LAST):
                inside.setdefault(n, []).append((kind, j))
        if inside:
            m.set_model_forward_timestep_embed_patch((BranchAdder, _adder_handler))
        for n, adds in inside.items():
            name = f"diffusion_model.output_blocks.{n}"
            new = []
            for lname, layer in m.get_model_object(name)._modules.items():
                new.extend((f"consistent_inpaint_add_{j}", BranchAdder(self.key, j)) for kind, j in adds
                           if kind == branch_layouts.HOOK_PRE_UPSAMPLE and isinstance(layer, Upsample))
                new.append((lname, layer))
            new.extend((f"consistent_inpaint_add_{j}", BranchAdder(self.key, j)) for kind, j in adds
                       if kind == branch_layouts.HOOK_AFTER_LAST)
            m.add_object_patch(name, TimestepEmbedSequential(OrderedDict(new)))


# -- nodes ------------------------------------------------------------------------------------------------
class BranchLoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintBranchLoader",
            display_name="Load Inpaint Branch (PainterNet / BrushNet / PowerPaint)",
            category=CATEGORY,
            description="Loads an inpaint branch: PainterNet (our format), BrushNet SD1.5/SDXL or PowerPaint-v2, "
                        "detected from the file.",
            inputs=[
                io.Combo.Input("branch", options=model_files("inpaint_branch"),
                               tooltip="A file in models/inpaint_branch (diffusion_pytorch_model.safetensors as "
                                       "published, renamed as you like)"),
                io.Combo.Input("dtype", options=Precision, default=Precision.AUTO,
                               tooltip="auto: the UNet's usual precision on this device"),
            ],
            outputs=[BranchType.Output(display_name="INPAINT_BRANCH")],
        )

    @classmethod
    def execute(cls, branch, dtype):
        cls.check_inputs(branch=branch, dtype=dtype)
        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        with checks.named(cls):
            return io.NodeOutput(load_branch(model_path("inpaint_branch", branch), resolve_dtype(dtype, device),
                                             device, offload))


def _check_model(model, spec):
    """The branch must match the UNet it is added to (SD1.5 vs SDXL structure)."""
    unet = model.get_model_object("diffusion_model")
    base = model.model.model_config.unet_config
    want_ctx = spec.unet_config.get("context_dim") or spec.base_context_dim
    want = BASE_NAMES.get(want_ctx, spec.base.upper())
    if base.get("context_dim") != want_ctx or bool(base.get("adm_in_channels")) != bool(spec.unet_config.get("adm_in_channels")):
        got = BASE_NAMES.get(base.get("context_dim"), type(model.model).__name__)
        raise checks.refuse(APPLY, f"an {want} model (this {spec.kind} branch is built for {want}, text width {want_ctx})",
                            f"a model of the {got} family (text width {base.get('context_dim')})",
                            f"Load the branch made for {got}, or an {want} model")
    ours = (spec.config["model_channels"], tuple(spec.config["channel_mult"]), tuple(spec.config["num_res_blocks"]))
    theirs = (base.get("model_channels"), tuple(base.get("channel_mult") or ()),
              tuple(unet.num_res_blocks) if hasattr(unet, "num_res_blocks") else ())
    if ours != theirs or len(unet.input_blocks) != len(spec.down_channels):
        raise checks.refuse(APPLY, f"a model of the branch's UNet structure (channels {ours[0]}, multipliers "
                            f"{list(ours[1])}, res blocks {list(ours[2])})",
                            f"a model with channels {theirs[0]}, multipliers {list(theirs[1])}, res blocks "
                            f"{list(theirs[2])}", "Load the branch made for this model")


class ApplyBranch(PercentRangeNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintApplyBranch",
            display_name="Apply Inpaint Branch",
            category=CATEGORY,
            description="Adds an inpaint branch (PainterNet / BrushNet / PowerPaint) to a model for inpainting "
                        "the masked area; returns the patched model, the conditioning and a latent to sample.",
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = area to inpaint"),
                BranchType.Input("branch"),
                io.Conditioning.Input("positive", tooltip="For PainterNet: the local prompt, describing the masked area"),
                io.Conditioning.Input("negative"),
                io.Float.Input("scale", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Strength of the branch (PainterNet's preservation scale w)"),
                *percent_inputs("the branch"),
                io.Conditioning.Input("branch_positive", optional=True,
                                      tooltip="PowerPaint: the task prompt for the branch (e.g. P_obj / P_ctxt "
                                              "embeddings); empty = the branch uses positive/negative like the UNet"),
                io.Conditioning.Input("branch_negative", optional=True),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    @torch.no_grad()
    def execute(cls, model, vae, image, mask, branch, positive, negative, scale, start_percent, end_percent,
                branch_positive=None, branch_negative=None):
        cls.check_inputs(scale=scale, start_percent=start_percent, end_percent=end_percent)
        window = sigma_range(model, start_percent, end_percent, cls)
        _check_model(model, branch.spec)
        _check_vae(vae, branch.spec)
        with checks.named(cls):
            img, m = image_and_mask(image, mask)
            img, m = centre_crop_to_multiple(img), centre_crop_to_multiple(m)   # as core InpaintModelConditioning
            context = branch_prompt(branch.spec, branch_positive, branch_negative)
            latent_format = model.get_model_object("latent_format")
            cond, original = branch_condition(vae, latent_format, img, m, branch.spec)
        patch = BranchPatch(branch, cond, scale, window, latent_format.latent_channels, context,
                            branch_layouts.injection_sites(branch.spec))
        latent = {"samples": original.cpu(), "noise_mask": m.reshape(-1, 1, *m.shape[-2:])}
        return io.NodeOutput(patch.attach(model), positive, negative, latent)


def _check_vae(vae, spec) -> None:
    """The VAE must make the latents the branch was trained on (4 channels for SD1.5 and SDXL) before any encoding."""
    want = (spec.config["in_channels"] - 1) // 2           # in: noisy latent + masked-image latent + mask
    got = getattr(vae, "latent_channels", None)
    if got is not None and got != want:
        raise checks.refuse(APPLY, f"{latent_family(want)} VAE ({want} latent channels, as this {spec.kind} "
                            f"{spec.base.upper()} branch takes)", f"{latent_family(got)} VAE with {got} latent channels",
                            "Connect the VAE of the model the branch is for (e.g. the checkpoint's own VAE)")


def branch_condition(vae, latent_format, img, m, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(the branch image [B, C + 1, h, w]: the masked image's latent at the model's scale and the mask channel, CPU;
    the image's raw latent). img [B, 3, H, W], m [B, 1, H, W] (1 = inpaint), H and W multiples of 8."""
    hole = (m > 0.5).to(img.dtype)               # BrushNet/PainterNet train on binary masks
    masked = vae_encode(vae, img * (1 - hole))
    original = vae_encode(vae, img)
    # the mask channel in the polarity the branch was trained with (BrushNet / PowerPaint: 1 = keep)
    mask_channel = (1 - hole) if spec.mask == branch_layouts.MASK_KEEP else hole
    mask_channel = F.interpolate(mask_channel, size=masked.shape[-2:], mode="nearest")
    cond = torch.cat([latent_format.process_in(masked.float()), mask_channel.to(masked.device)], dim=1).cpu()
    check_finite(cond, "encoded image")
    return cond, original


def branch_prompt(spec, branch_positive, branch_negative) -> dict | None:
    """{0: positive tokens, 1: negative tokens} of the branch's own prompt (PowerPaint's task prompt), or None."""
    if branch_positive is None and branch_negative is None:
        return None
    if branch_positive is None or branch_negative is None:
        raise checks.InputError("expected both branch_positive and branch_negative, or neither; got only "
                                f"{'branch_positive' if branch_negative is None else 'branch_negative'}. Connect the "
                                "other output of PowerPaint Task Prompt too")
    if not spec.uses_context:
        raise checks.InputError(f"expected no branch_positive / branch_negative for this {spec.kind} ({spec.base}) "
                                "branch (it has no cross-attention); got them. Disconnect them")
    width = spec.config["context_dim"]
    for name, c in (("branch_positive", branch_positive), ("branch_negative", branch_negative)):
        t = c[0][0] if c and isinstance(c[0][0], torch.Tensor) else None
        if t is None or t.ndim != 3 or t.shape[-1] != width:
            raise checks.InputError(f"expected {name} to be text conditioning {width} wide for this {spec.kind} "
                                    f"branch; got {'nothing' if t is None else tuple(t.shape)}. Use PowerPaint Task "
                                    "Prompt with the SD1.5 CLIP")
        if not torch.isfinite(t).all():
            raise checks.InputError(f"expected {name} without NaN or infinite values; got some. Check the node that "
                                    f"made {name}")
        if len(c) > 1:
            log.warning("%s has %d entries; the branch uses the first", name, len(c))
    return _common_length({0: branch_positive[0][0], 1: branch_negative[0][0]})


# -- PowerPaint-v2 task prompts -----------------------------------------------------------------------------
def _task_clip(path, encoder_sd, clip):
    """The text encoder for the task prompts: the one stored in the file (the authors' text_encoder_brushnet)
    when it holds one, else the CLIP given (the authors use plain SD1.5's)."""
    if encoder_sd is not None:
        return compat.sd15_text_encoder(encoder_sd)
    if clip is None:
        raise checks.InputError(f"expected a clip input for {os.path.basename(path)}, which holds the task "
                                "embeddings only; got none. Connect the SD1.5 CLIP (the authors use the plain SD1.5 "
                                "text encoder for the branch)")
    return clip


def encode_task_word(clip, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[SOT, v_0 … v_{n-1}, EOT, pad…] through ComfyUI's CLIP-L, the learned vectors taking the place of the
    placeholder tokens -> (tokens [1, 77, 768], pooled [1, 768])."""
    base = clip.tokenize("")
    if set(base) != {"l"}:
        raise checks.InputError(f"expected an SD1.5 CLIP (CLIP-L alone, PowerPaint's branch text encoder); got a CLIP "
                                f"with encoders {sorted(base)}. Connect the SD1.5 checkpoint's CLIP")
    row = base["l"][0]
    n = vectors.shape[0]
    if n > len(row) - 2:
        raise checks.InputError(f"expected at most {len(row) - 2} task vectors per word; got {n}")
    if vectors.shape[-1] != 768:
        raise checks.InputError(f"expected task vectors 768 wide (CLIP-L); got {vectors.shape[-1]}")
    tokens = [row[0]] + [(vectors[i], 1.0) for i in range(n)] + list(row[1:len(row) - n])
    return clip.encode_from_tokens({"l": [tokens]}, return_pooled=True)


class PowerPaintTaskPrompt(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintPowerPaintTaskPrompt",
            display_name="PowerPaint Task Prompt",
            category=CATEGORY,
            description="The PowerPaint-v2 branch's task prompt (its learned P_obj / P_ctxt / P_shape tokens) as "
                        "branch_positive / branch_negative for Apply Inpaint Branch. The UNet keeps your own prompt.",
            inputs=[
                io.Combo.Input("task_embeddings", options=model_files("inpaint_branch"),
                               tooltip="PowerPaint_Brushnet/pytorch_model.bin as published (in models/inpaint_branch)"),
                io.Combo.Input("task", options=powerpaint_tasks.Task, default=powerpaint_tasks.Task.TEXT_GUIDED,
                               tooltip="object-removal / outpainting: the authors also add 'empty scene blur' / "
                                       "'empty scene' to the UNet prompt"),
                io.Float.Input("fitting_degree", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="shape-guided: how closely the object follows the mask shape "
                                       "(f·P_shape + (1−f)·P_ctxt)"),
                io.Clip.Input("clip", optional=True,
                              tooltip="Only for a file that holds the task vectors alone: the SD1.5 text encoder"),
            ],
            outputs=[io.Conditioning.Output(display_name="branch_positive"),
                     io.Conditioning.Output(display_name="branch_negative")],
        )

    @classmethod
    @torch.no_grad()
    def execute(cls, task_embeddings, task, fitting_degree, clip=None):
        cls.check_inputs(task_embeddings=task_embeddings, task=task, fitting_degree=fitting_degree)
        with checks.named(cls):
            path = model_path("inpaint_branch", task_embeddings)
            vectors, encoder_sd = powerpaint_tasks.read_task_file(tensor_dict(load_weights(path), path), path)
            text = _task_clip(path, encoder_sd, clip)
            return io.NodeOutput(*task_prompts(text, vectors, task, fitting_degree))


def task_prompts(text, vectors: dict, task: str, fitting_degree: float) -> list:
    """(branch_positive, branch_negative) of ``task``: its two words encoded with ``text`` and blended."""
    encoded = {}

    def enc(word):
        if word not in encoded:
            encoded[word] = encode_task_word(text, vectors[word])
        return encoded[word]

    out = []
    for a, b in powerpaint_tasks.TASKS[powerpaint_tasks.Task(task)]:
        (ca, pa), (cb, pb) = enc(a), enc(b)
        out.append([[powerpaint_tasks.blend(ca, cb, fitting_degree),
                     {"pooled_output": powerpaint_tasks.blend(pa, pb, fitting_degree)}]])
    return out


NODES = [BranchLoader, ApplyBranch, PowerPaintTaskPrompt]
