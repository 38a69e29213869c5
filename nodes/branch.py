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
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from comfy_api.latest import io
from torch import nn

import comfy.model_management as mm
import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, Upsample

from ..models import branch_layouts, powerpaint_tasks
from ..models.weights import build_from_state_dict, load_weights, tensor_dict
from .branch_unet import BranchNet
from .common import (Precision, RunState, check_finite, check_percent_range, image_to_bchw, in_sigma_range,
                     mask_to_b1hw, match_image_mask, model_files, model_path, moved, percent_inputs, resolve_dtype,
                     run_scope, run_state, sigma_range, wrap_patcher)

log = logging.getLogger(__name__)
CATEGORY = "inpaint/consistent/branch"
BranchType = io.Custom("INPAINT_BRANCH")


@dataclass(frozen=True)
class InpaintBranch:
    patcher: object            # ModelPatcher holding a BranchNet
    spec: object               # models.branch_layouts.BranchSpec


# -- loading ---------------------------------------------------------------------------------------------
def load_branch(path: str, dtype: torch.dtype, device, offload) -> InpaintBranch:
    import comfy.ops
    spec, sd = branch_layouts.load_branch(path)
    net = build_from_state_dict(
        lambda device: BranchNet(spec, dtype=dtype, device=device, operations=comfy.ops.manual_cast),
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
    """Per sampling run (common.run_scope): the branch's fixed inputs moved to the sampling device once, and the
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


class BranchPatch:
    """Everything one ApplyBranch attaches to a model. Immutable after construction (``__deepcopy__`` returns
    itself, so ModelPatcher.clone() does not copy the cond tensors)."""

    def __init__(self, branch: InpaintBranch, cond: torch.Tensor, scale: float, sigma_range: tuple[float, float],
                 latent_channels: int, branch_context: dict | None, sites):
        self.branch, self.cond, self.scale = branch, cond, scale
        self.sigma_start, self.sigma_end = sigma_range
        self.latent_channels = latent_channels
        self.branch_context = branch_context     # {0: positive tokens, 1: negative tokens} or None
        self.key = f"consistent_inpaint_branch:{uuid.uuid4().hex}"
        # where each up-path residual goes: ('output_h', n) / ('pre_upsample', n) / ('after_last', n)
        self.branch_sites_up = tuple(sites["up"])
        self.out_h = {n: j for j, (kind, n) in enumerate(sites["up"]) if kind == branch_layouts.HOOK_OUTPUT_H}
        self.in_after_skip = {k for k, (kind, _) in enumerate(sites["down"])
                              if kind == branch_layouts.HOOK_INPUT_AFTER_SKIP}
        if sites["mid"] != (branch_layouts.HOOK_OUTPUT_H, 0):
            raise ValueError(f"unsupported middle-block injection site {sites['mid']}")

    def __deepcopy__(self, memo):
        return self

    # - the wrapper: run the branch, pass the residuals down -
    def active(self, transformer_options) -> bool:
        return self.scale != 0 and in_sigma_range(transformer_options, self.sigma_start, self.sigma_end)

    def wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if not self.active(transformer_options):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        res = self.run_branch(x, timesteps, context, y, transformer_options)
        to = dict(transformer_options)
        to[self.key] = res
        return executor(x, timesteps, context, y, control, to, **kwargs)

    def run_branch(self, x, timesteps, context, y, transformer_options):
        net = self.branch.patcher.model
        spec = self.branch.spec
        chunks = transformer_options.get("cond_or_uncond") or [0]
        B = x.shape[0]
        if B % len(chunks):
            raise RuntimeError(f"inpaint branch: batch of {B} rows does not split into {len(chunks)} cond chunks")
        rows = B // len(chunks)
        lat = x[:, :self.latent_channels]
        run = run_state(self.key)
        cond = moved(run, "cond", self.cond, x.device, x.dtype)
        if cond.shape[-2:] != lat.shape[-2:]:
            raise ValueError(f"inpaint branch: the model is sampling a {lat.shape[-1] * 8}x{lat.shape[-2] * 8} area but "
                             f"the branch image is {cond.shape[-1] * 8}x{cond.shape[-2] * 8}; area-restricted "
                             "conditioning (ConditioningSetArea) cannot be combined with an inpaint branch")
        if cond.shape[0] not in (1, rows):
            raise ValueError(f"inpaint branch: image batch {cond.shape[0]} does not match latent batch {rows}")
        ctx = context if spec.uses_context else None
        if ctx is not None and self.branch_context is not None:
            ctx = torch.cat([moved(run, c, self.branch_context[c], x.device, x.dtype).expand(rows, -1, -1) for c in chunks])
        parts = (lat, timesteps, ctx, y if spec.uses_y else None)
        per_chunk = [tuple(None if p is None else p[i * rows:(i + 1) * rows] for p in parts)
                     for i in range(len(chunks))]
        # Chunks whose branch inputs are equal share one branch run: always for BrushNet SD1.5 (it reads no
        # prompt), and for PowerPaint tasks whose positive and negative task prompts are the same; across the
        # model calls of one step too, when ComfyUI runs the rows separately.
        keep, source = _distinct(per_chunk)
        found = [None if run is None else run.lookup(per_chunk[k]) for k in keep]
        todo = [n for n, f in enumerate(found) if f is None]          # positions in keep
        if todo:
            if len(todo) == len(chunks):        # every chunk, in batch order
                lat_in, t_in, ctx_in, y_in = parts
            else:
                lat_in, t_in, ctx_in, y_in = (None if parts[i] is None else
                                              torch.cat([per_chunk[keep[n]][i] for n in todo]) for i in range(4))
            dt = net.dtype
            inp = torch.cat([lat_in, cond.expand(rows, -1, -1, -1).repeat(len(todo), 1, 1, 1)], dim=1)
            to = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace", "wrappers")}
            out = net(inp.to(dt), t_in, None if ctx_in is None else ctx_in.to(dt),
                      None if y_in is None else y_in.to(dt), to)
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
        block = extra_options["block"]
        a = res["attn"].get((block[0], block[1], extra_options.get("block_index", 0)))
        return n if a is None else n + a.to(n.dtype)

    def attach(self, model):
        """-> a patched clone of ``model``."""
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, self.key, self.wrapper)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.key, run_scope(self.key, _RunState))
        m.set_model_input_block_patch(self.input_block)
        m.set_model_input_block_patch_after_skip(self.input_block_after_skip)
        m.set_model_output_block_patch(self.output_block)
        if self.branch.spec.acp_sites:
            m.set_model_attn2_output_patch(self.attn2_output)
        inside = {}
        for j, (kind, n) in enumerate(self.branch_sites_up):
            if kind in (branch_layouts.HOOK_PRE_UPSAMPLE, branch_layouts.HOOK_AFTER_LAST):
                inside.setdefault(n, []).append((kind, j))
        if inside:
            m.set_model_forward_timestep_embed_patch((BranchAdder, _adder_handler))
        for n, adds in inside.items():
            name = f"diffusion_model.output_blocks.{n}"
            block = m.get_model_object(name)
            layers = list(block._modules.items())
            new = []
            for lname, layer in layers:
                for kind, j in adds:
                    if kind == branch_layouts.HOOK_PRE_UPSAMPLE and isinstance(layer, Upsample):
                        new.append((f"consistent_inpaint_add_{j}", BranchAdder(self.key, j)))
                new.append((lname, layer))
            for kind, j in adds:
                if kind == branch_layouts.HOOK_AFTER_LAST:
                    new.append((f"consistent_inpaint_add_{j}", BranchAdder(self.key, j)))
            m.add_object_patch(name, TimestepEmbedSequential(OrderedDict(new)))
        m.set_additional_models(self.key, [self.branch.patcher])
        return m


# -- nodes ------------------------------------------------------------------------------------------------
class BranchLoader(io.ComfyNode):
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
        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        return io.NodeOutput(load_branch(model_path("inpaint_branch", branch), resolve_dtype(dtype, device),
                                         device, offload))


def _check_model(model, spec):
    """The branch must match the UNet it is added to (SD1.5 vs SDXL structure)."""
    unet = model.get_model_object("diffusion_model")
    base = model.model.model_config.unet_config
    want_ctx = spec.unet_config.get("context_dim") or spec.base_context_dim
    if base.get("context_dim") != want_ctx or bool(base.get("adm_in_channels")) != bool(spec.unet_config.get("adm_in_channels")):
        name = {768: "SD1.5", 2048: "SDXL"}
        raise ValueError(f"this {spec.kind} branch is built for {spec.base.upper()} (text width {want_ctx}) but the model "
                         f"is {name.get(base.get('context_dim'), 'another architecture')} (text width "
                         f"{base.get('context_dim')}); load the matching branch")
    ours = (spec.config["model_channels"], tuple(spec.config["channel_mult"]), tuple(spec.config["num_res_blocks"]))
    theirs = (base.get("model_channels"), tuple(base.get("channel_mult") or ()),
              tuple(unet.num_res_blocks) if hasattr(unet, "num_res_blocks") else ())
    if ours != theirs or len(unet.input_blocks) != len(spec.down_channels):
        raise ValueError(f"the branch's UNet structure (channels {ours[0]}, multipliers {list(ours[1])}, res blocks "
                         f"{list(ours[2])}) does not match the model's (channels {theirs[0]}, multipliers "
                         f"{list(theirs[1])}, res blocks {list(theirs[2])})")


class ApplyBranch(io.ComfyNode):
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
    def validate_inputs(cls, start_percent, end_percent, **kwargs):
        return check_percent_range(start_percent, end_percent)

    @classmethod
    @torch.no_grad()
    def execute(cls, model, vae, image, mask, branch, positive, negative, scale, start_percent, end_percent,
                branch_positive=None, branch_negative=None):
        spec = branch.spec
        _check_model(model, spec)
        img, m = match_image_mask(image_to_bchw(image), mask_to_b1hw(mask))
        H, W = img.shape[-2:]
        h8, w8 = H // 8 * 8, W // 8 * 8
        if h8 == 0 or w8 == 0:
            raise ValueError(f"image is {W}x{H}; it must be at least 8x8 pixels")
        oy, ox = (H - h8) // 2, (W - w8) // 2        # centre crop, as core InpaintModelConditioning
        img, m = img[..., oy:oy + h8, ox:ox + w8], m[..., oy:oy + h8, ox:ox + w8]
        hole = (m > 0.5).to(img.dtype)               # BrushNet/PainterNet train on binary masks
        latent_format = model.get_model_object("latent_format")
        masked = vae.encode((img * (1 - hole)).movedim(1, -1)[..., :3])
        original = vae.encode(img.movedim(1, -1)[..., :3])
        # the mask channel in the polarity the branch was trained with (BrushNet / PowerPaint: 1 = keep)
        mask_channel = (1 - hole) if spec.mask == branch_layouts.MASK_KEEP else hole
        mask_channel = F.interpolate(mask_channel, size=masked.shape[-2:], mode="nearest")
        cond = torch.cat([latent_format.process_in(masked.float()), mask_channel.to(masked.device)], dim=1).cpu()
        check_finite(cond, "encoded image")
        branch_context = None
        if branch_positive is not None or branch_negative is not None:
            if branch_positive is None or branch_negative is None:
                raise ValueError("give both branch_positive and branch_negative, or neither")
            if not spec.uses_context:
                raise ValueError(f"this {spec.kind} ({spec.base}) branch has no cross-attention, so it cannot use "
                                 "branch_positive / branch_negative; disconnect them")
            width = spec.config["context_dim"]
            for name, c in (("branch_positive", branch_positive), ("branch_negative", branch_negative)):
                if not c or c[0][0].ndim != 3 or c[0][0].shape[-1] != width:
                    raise ValueError(f"{name} must be text conditioning {width} wide for this {spec.kind} branch, "
                                     f"got {'nothing' if not c else tuple(c[0][0].shape)}")
                if len(c) > 1:
                    log.warning("%s has %d entries; the branch uses the first", name, len(c))
            branch_context = _common_length({0: branch_positive[0][0], 1: branch_negative[0][0]})
        patch = BranchPatch(branch, cond, scale, sigma_range(model, start_percent, end_percent),
                            latent_format.latent_channels, branch_context,
                            branch_layouts.injection_sites(spec))
        latent = {"samples": original.cpu(), "noise_mask": m.reshape(-1, 1, h8, w8)}
        return io.NodeOutput(patch.attach(model), positive, negative, latent)


# -- PowerPaint-v2 task prompts -----------------------------------------------------------------------------
def _task_clip(path, encoder_sd, clip):
    """The text encoder for the task prompts: the one stored in the file (the authors' text_encoder_brushnet)
    when it holds one, else the CLIP given (the authors use plain SD1.5's)."""
    if encoder_sd is not None:
        import comfy.sd
        return comfy.sd.load_text_encoder_state_dicts([dict(encoder_sd)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    if clip is None:
        raise ValueError(f"{path} holds the task embeddings only; connect the SD1.5 CLIP (the authors use the "
                         "plain SD1.5 text encoder for the branch)")
    return clip


def encode_task_word(clip, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[SOT, v_0 … v_{n-1}, EOT, pad…] through ComfyUI's CLIP-L, the learned vectors taking the place of the
    placeholder tokens -> (tokens [1, 77, 768], pooled [1, 768])."""
    base = clip.tokenize("")
    if set(base) != {"l"}:
        raise ValueError(f"PowerPaint's branch uses an SD1.5 (CLIP-L) text encoder; this CLIP has encoders "
                         f"{sorted(base)}")
    row = base["l"][0]
    n = vectors.shape[0]
    if n > len(row) - 2:
        raise ValueError(f"{n} task vectors do not fit into {len(row)} tokens")
    tokens = [row[0]] + [(vectors[i], 1.0) for i in range(n)] + list(row[1:len(row) - n])
    return clip.encode_from_tokens({"l": [tokens]}, return_pooled=True)


class PowerPaintTaskPrompt(io.ComfyNode):
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
                io.Combo.Input("task", options=list(powerpaint_tasks.TASKS), default="text-guided",
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
        path = model_path("inpaint_branch", task_embeddings)
        vectors, encoder_sd = powerpaint_tasks.read_task_file(tensor_dict(load_weights(path), path), path)
        text = _task_clip(path, encoder_sd, clip)
        encoded = {}

        def enc(word):
            if word not in encoded:
                encoded[word] = encode_task_word(text, vectors[word])
            return encoded[word]

        out = []
        for a, b in powerpaint_tasks.TASKS[task]:
            (ca, pa), (cb, pb) = enc(a), enc(b)
            out.append([[powerpaint_tasks.blend(ca, cb, fitting_degree),
                         {"pooled_output": powerpaint_tasks.blend(pa, pb, fitting_degree)}]])
        return io.NodeOutput(*out)


NODES = [BranchLoader, ApplyBranch, PowerPaintTaskPrompt]
