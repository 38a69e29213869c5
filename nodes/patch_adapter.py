"""Patch-Adapter nodes: the adapter file, the Dual Context Adapter (stage 1, ~1K) and the reference-guided patch
refinement at full resolution (stage 2, 4K and beyond).

How they reach the UNet (the input MODEL is cloned; every route is one of ComfyUI's patch routes):

* Dual Context Adapter: the DCA needs the layer input ``z`` and the layer's own ``Q, K, V``. An ``attn2_patch``
  (which ComfyUI calls with ``z = norm2(x)``) leaves ``z`` in the block's ``extra_options`` (one dict per
  transformer block call, handed to the patch and then to the replace); the ``attn2`` *replace* at each adapted
  site computes the text attention (ComfyUI's, or the replace another node put there first) and adds
  ``strength · Z''``. A replace that finds no ``z`` raises instead of silently doing nothing.
* Reference attention (stage 2): an ``APPLY_MODEL`` wrapper runs the same UNet once on the reference region of
  the patch, noised to the step's sigma, and records every self-attention input ``norm1(x)`` (``attn1_patch``).
  Then the patch's own pass reads those tokens: through an ``attn1`` replace adding ``tanh(g)·Attn(Q, R W_k,
  R W_v)`` where Reference Patch Adapter weights exist, otherwise by extending the self-attention keys/values
  with them (``attn1_patch``).

Training (``training/patch_adapter.py``) runs these very patch objects. Its one hook: ``PatchAdapter.gates`` may hold
0-dim tensors (tanh of the trainer's gate parameters, so the gates learn) where the loader puts numbers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_management as mm

from ..models import patch_adapter as pa
from ..models.layers import with_reference_tokens
from ..models.sites import latent_grid, site_name, site_of
from ..models.weights import (CheckpointFormatError, build_from_state_dict, load_weights, safetensors_metadata,
                              tensor_dict)
from . import comfy_compat as compat
from . import patch_refine
from .branch_unet import transformer_sites
from .common import (CheckedNode, PercentRangeNode, Precision, model_files, model_path, percent_inputs, resolve_dtype,
                     wrap_patcher)
from .comfy_compat import io
from .layout import (b1hw_to_mask, bchw_to_image, image_and_mask, image_copy, image_to_bchw, image_view_bchw,
                     mask_to_b1hw, mask_view_b1hw, match_image_mask, row_batch)
from .patching import ModelPatch, StepNoise, add_site_replaces, bound_attention, once_per_run, sigma_range
from .accepts import model_family, named, require_rows, require_size, require_unet, require_vae_of
from .checks import refuse

log = logging.getLogger(__name__)
# Display names, for refusals raised while sampling (where the patch, not the node class, is at hand).
DUAL_NODE, REFINE_NODE = "Apply Patch-Adapter Dual Context", patch_refine.NODE
CATEGORY = "inpaint/consistent/Patch-Adapter"
PatchAdapterType = io.Custom("PATCH_ADAPTER")
PATCH_ID = "consistent_inpaint_patch"          # transformer_options entry: indices of the patches in this call
# How far the Dual Context mask's aspect may differ from the latent's: 2 % plus a latent cell of rounding.
MASK_ASPECT_TOLERANCE = 0.02
MEGAPIXEL = 1024 * 1024          # pixels, as ComfyUI's ImageScaleToTotalPixels counts a megapixel


# -- the adapter file -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchAdapter:
    patcher: object               # ModelPatcher of a models.patch_adapter.PatchAdapterNet
    dca: dict                     # site -> (channels, width)
    rpa: dict                     # site -> (channels, width)
    gates: dict                   # site -> tanh(g), the RPA fusion weight (a float; the trainer: a 0-dim tensor)
    base: str | None
    name: str

    def modules(self, stage: str, site) -> nn.ModuleDict:
        return getattr(self.patcher.model, stage)[site_name(site)]


def load_patch_adapter(path: str, dtype_choice: str) -> PatchAdapter:
    weights = pa.parse_patch_adapter(tensor_dict(load_weights(path), path), path, safetensors_metadata(path))
    sd = pa.net_state_dict(weights)
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    dtype = resolve_dtype(dtype_choice, device, sum(t.numel() for t in sd.values()))
    kw = compat.build_kwargs(device)
    net = build_from_state_dict(lambda device: pa.PatchAdapterNet(weights, dtype=dtype, device=device, **kw), sd, path,
                                "the Patch-Adapter projections", dtype)
    gates = {s: math.tanh(float(w["gate"].float().reshape(()))) for s, w in weights.rpa.items()}
    return PatchAdapter(wrap_patcher(net, device, offload), weights.widths("dca"), weights.widths("rpa"), gates,
                        weights.base, path)


def check_fits(node, adapter: PatchAdapter, model, stage: str) -> None:
    """Every site of ``stage`` must exist in the model with the same widths (an SDXL adapter on SD1.5 fails here)."""
    require_unet(node, model, "SD1.5 / SDXL")
    unet = model.get_model_object("diffusion_model")
    sites = transformer_sites(unet)
    attn = "attn2" if stage == "dca" else "attn1"
    for site, (c, d) in getattr(adapter, stage).items():
        tb = sites.get(site)
        layer = None if tb is None else getattr(tb, attn)
        have = None if layer is None else (layer.to_q.in_features, layer.to_q.out_features)
        if have != (c, d):
            base = f" (the file says it is for {adapter.base})" if adapter.base else ""
            found = "absent" if have is None else f"{have[0]} channels / {have[1]} wide"
            raise refuse(node, f"a MODEL the Patch-Adapter fits: {attn} at {site} {c} channels / {d} wide",
                         f"{found} in this {model_family(model)} model; the adapter does not fit this "
                         f"model{base}", "Connect the model the adapter was trained for.")


# -- stage 1: the Dual Context Adapter ------------------------------------------------------------------------
class DualContextPatch(ModelPatch):
    """Everything one Apply Dual Context attaches."""

    name = "dca"

    def __init__(self, adapter: PatchAdapter, hole: torch.Tensor, strength: float, sigma_window):
        super().__init__(sigma_window)
        self.adapter, self.hole, self.strength = adapter, hole, strength      # hole: [B, 1, H, W] CPU, 1 = inpaint
        self.z_key = self.key + ":z"

    def keep_input(self, n, context, value, extra):
        """attn2_patch: leave the layer input z for the replace of the same block call."""
        if extra.get(self.key) and site_of(extra) in self.adapter.dca:
            extra[self.z_key] = n
        return n, context, value

    def known_rows(self, tokens, shape, chunks, rows, device, dtype):
        """[rows · chunks, N, 1]: 1 − M area-resized to this layer's grid, rows ordered as the model's batch."""
        h, w = latent_grid(tokens, shape[-2], shape[-1])

        def build():
            mh, mw = self.hole.shape[-2:]
            if abs((mw / mh) / (shape[-1] / shape[-2]) - 1) > MASK_ASPECT_TOLERANCE + 2 / min(shape[-2:]):
                raise refuse(DUAL_NODE, f"the mask of the image being sampled (the latent is {shape[-1]}x{shape[-2]})",
                             f"a {mw}x{mh} mask (another aspect ratio)", "Give the mask of the image being inpainted.")
            require_rows(DUAL_NODE, "mask", self.hole.shape[0], rows)
            known = 1 - F.interpolate(self.hole, size=(h, w), mode="area")
            known = row_batch(known.reshape(known.shape[0], h * w, 1), rows, "mask")
            return known.repeat(len(chunks), 1, 1).to(device, dtype)
        return once_per_run(self.run(), ("known", h, w, tuple(chunks), rows, device, dtype), build)

    def combine(self, out, q, k, v, site, extra):
        term = self.term(q, k, v, site, extra)
        return out if term is None else out + term.to(out.dtype)

    def term(self, q, k, v, site, extra):
        """strength · Z'' for this call, or None when the adapter is not acting."""
        if not extra.get(self.key):
            return None
        z = extra.pop(self.z_key, None)
        if z is None:
            raise refuse(DUAL_NODE, f"the layer input of {site} to reach its attention replace",
                         "none (ComfyUI's attn2_patch/extra_options contract changed?)")
        chunks, rows = self.chunks_rows(q.shape[0], extra)
        known = self.known_rows(q.shape[1], extra["original_shape"], chunks, rows, q.device, z.dtype)
        mods = self.adapter.modules("dca", site)
        out = pa.dual_context_term(z, q, k, v, known, (mods["to_q"], mods["to_k"], mods["to_v"]), extra["n_heads"],
                                   bound_attention(extra))
        return out * self.strength

    def attach(self, model):
        m = self.clone_with_run_scope(model, (self.adapter.patcher,))
        add_site_replaces(m, "attn2", self.adapter.dca, self.combine)
        m.set_model_attn2_patch(self.keep_input)
        compat.add_wrapper(m, compat.DIFFUSION_MODEL, self.key, self.flag_active)
        return m


# -- stage 2: reference attention inside each patch -------------------------------------------------------------
# The inpaint inputs of a fully known reference, per concat key of the model: mask 0, masked image = the latent.
_REFERENCE_CONCAT = {
    "mask": lambda latent: torch.zeros_like(latent[:, :1]),
    "mask_inverted": lambda latent: torch.ones_like(latent[:, :1]),
    "masked_image": lambda latent: latent,
    "concat_image": lambda latent: latent,
}


def _reference_concat(keys, latent: torch.Tensor) -> torch.Tensor:
    """The inpaint inputs of a fully known reference: mask 0, masked image = the reference latent."""
    unknown = [k for k in keys if k not in _REFERENCE_CONCAT]
    if unknown:
        raise refuse(REFINE_NODE, f"a model whose concat inputs are among {sorted(_REFERENCE_CONCAT)}",
                     f"one with {unknown[0]!r}", "Use an SD1.5 / SDXL (inpainting) model.")
    return torch.cat([_REFERENCE_CONCAT[k](latent) for k in keys], dim=1)


class ReferencePatch(ModelPatch):
    """One batch of patches: their reference latents and, optionally, the Reference Patch Adapter."""

    name = "reference"

    def __init__(self, latent: torch.Tensor, adapter: PatchAdapter | None, seed: int, ids: tuple):
        super().__init__()
        self.latent = latent                   # [P, C, h, w] raw VAE latents of the reference regions, CPU
        self.adapter = adapter if adapter is not None and adapter.rpa else None
        self.seed, self.ids = seed, ids

    def new_run(self):
        return StepNoise(self.seed)

    def reference_input(self, base, x, t, c_concat, chunks):
        """(the reference latents noised to this step's sigma, their concat inputs) for every chunk's rows."""
        run = self.run()
        sigma = t[:1].float()
        noise = (run.step(float(sigma), self.latent.shape) if run is not None else
                 torch.randn(self.latent.shape, generator=torch.Generator().manual_seed(self.seed)))
        lat = once_per_run(run, ("latent", x.device),
                           lambda: base.process_latent_in(self.latent).to(x.device, torch.float32))
        noisy = base.model_sampling.noise_scaling(sigma.reshape(1, 1, 1, 1), noise.to(x.device), lat)
        concat = None if c_concat is None else once_per_run(
            run, ("concat", x.device, len(chunks)),
            lambda: _reference_concat(base.concat_keys, lat).repeat(len(chunks), 1, 1, 1))
        return noisy.repeat(len(chunks), 1, 1, 1).to(x.dtype), concat

    def apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        chunks, rows = self.chunks_rows(x.shape[0], transformer_options)
        if rows != self.latent.shape[0]:
            raise refuse(REFINE_NODE, f"{self.latent.shape[0]} rows per model call (one per patch)",
                         f"{x.shape[0]} rows in {len(chunks)} cond chunks")
        noisy, concat = self.reference_input(executor.class_obj, x, t, c_concat, chunks)
        tokens = {}
        executor(noisy, t, concat, c_crossattn, None, {**transformer_options, self.key: ("record", tokens)}, **kwargs)
        return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, self.key: ("read", tokens)},
                        **kwargs)

    def self_attention(self, n, context, value, extra):
        """attn1_patch: record the reference pass's tokens; in the patch pass extend keys/values with them where no
        adapter weights take over."""
        state = extra.get(self.key)
        if state is None:
            return n, context, value
        mode, tokens = state
        site = site_of(extra)
        if mode == "record":
            tokens[site] = n
        elif site in tokens and (self.adapter is None or site not in self.adapter.rpa):
            return with_reference_tokens(n, context, value, tokens[site])
        return n, context, value

    def combine(self, out, q, k, v, site, extra):
        term = self.term(q, site, extra)
        return out if term is None else out + term.to(out.dtype)

    def term(self, q, site, extra):
        state = extra.get(self.key)
        if state is None or state[0] != "read" or site not in state[1]:
            return None
        mods = self.adapter.modules("rpa", site)
        out = pa.reference_patch_term(q, state[1][site], mods["to_k"], mods["to_v"], extra["n_heads"],
                                      bound_attention(extra))
        return out * self.adapter.gates[site]

    def attach(self, model):
        m = self.clone_with_run_scope(model, () if self.adapter is None else (self.adapter.patcher,))
        m.model_options["transformer_options"][PATCH_ID] = self.ids
        compat.add_wrapper(m, compat.APPLY_MODEL, self.key, self.apply_model)
        m.set_model_attn1_patch(self.self_attention)
        if self.adapter is not None:
            add_site_replaces(m, "attn1", self.adapter.rpa, self.combine)
        return m


def reference_attacher(adapter: PatchAdapter | None):
    """``attach(model, latents, seed, ids)`` -> the MODEL with a ReferencePatch for one batch of patches."""
    def attach(model, latents, seed, ids):
        return ReferencePatch(latents, adapter, seed, ids).attach(model)
    return attach


# -- nodes ------------------------------------------------------------------------------------------------
class PatchAdapterLoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintPatchAdapterLoader",
            display_name="Load Patch-Adapter",
            category=CATEGORY,
            description="Loads Patch-Adapter weights in the pack's safetensors format: the Dual Context Adapter "
                        "(stage 1) and/or the Reference Patch Adapter (stage 2). No official weights exist.",
            inputs=[
                io.Combo.Input("adapter", options=model_files("patch_adapter"),
                               tooltip="A Patch-Adapter file in models/patch_adapter (docs/patch_adapter_format.md)"),
                io.Combo.Input("dtype", options=Precision, default=Precision.AUTO, optional=True,
                               tooltip="auto: bfloat16/float16 where the device supports it, else float32"),
            ],
            outputs=[PatchAdapterType.Output(display_name="PATCH_ADAPTER")],
        )

    @classmethod
    def execute(cls, adapter, dtype=Precision.AUTO):
        cls.check_inputs(adapter=adapter, dtype=dtype)
        try:
            return io.NodeOutput(load_patch_adapter(model_path("patch_adapter", adapter), dtype))
        except CheckpointFormatError as e:
            raise refuse(cls, "a Patch-Adapter file (dca.* / rpa.* tensors, docs/patch_adapter_format.md)",
                         str(e).rstrip(". "),
                         "Choose a file written in the pack's Patch-Adapter format.") from e


class ApplyDualContext(PercentRangeNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintApplyDualContext",
            display_name=DUAL_NODE,
            category=CATEGORY,
            description="Stage 1 (~1K): every adapted cross-attention also reads the known region against the "
                        "prompt and adds strength · Attn(Q, Z'W_k, Z'W_v), Z' = Attn([z⊙(1−M)]W_q, K, V).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5- or SDXL-inpainting model (the adapter's base)"),
                PatchAdapterType.Input("patch_adapter"),
                io.Mask.Input("mask", tooltip="The hole, 1 = inpaint, at the resolution being sampled"),
                io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.01,
                               tooltip="Weight of the dual-context term (1 = as trained; 0 = the plain model)"),
                *percent_inputs("the adapter"),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, patch_adapter, mask, strength, start_percent=0.0, end_percent=1.0):
        cls.check_inputs(strength=strength, start_percent=start_percent, end_percent=end_percent)
        if not patch_adapter.dca:
            raise refuse(cls, "a Patch-Adapter with Dual Context Adapter (dca.*) weights",
                         f"{patch_adapter.name}, which holds only Reference Patch Adapter weights",
                         "Use it with High-Res Patch Refine (stage 2), or load a file with dca.* weights.")
        check_fits(cls, patch_adapter, model, "dca")
        with named(cls):
            hole = mask_to_b1hw(mask)
        if not (hole > 0).any():
            raise refuse(cls, "a mask with a hole to inpaint (1 = inpaint)", "an empty mask",
                         "Paint the hole; without one there is nothing to inpaint.")
        if bool((hole >= 1).all()):
            raise refuse(cls, "a mask that leaves part of the image known", "a mask that covers the whole image",
                         "The Dual Context Adapter reads the known region; leave it out for a full repaint.")
        if strength == 0:
            return io.NodeOutput(model)
        window = sigma_range(model, start_percent, end_percent, cls)
        patch = DualContextPatch(patch_adapter, hole.cpu(), strength, window)
        return io.NodeOutput(patch.attach(model))


class HighResPatchRefine(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintHighResPatchRefine",
            display_name=REFINE_NODE,
            category=CATEGORY,
            description="Stage 2: refines the hole of a full-resolution image (4K and beyond) patch by patch, each "
                        "patch attending to its region of the stage-1 result. Only patches the mask needs are "
                        "sampled; pixels outside the mask are returned exactly.",
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Image.Input("image", tooltip="The full-resolution image"),
                io.Mask.Input("mask", tooltip="1 = inpaint, full resolution"),
                io.Image.Input("reference", tooltip="The stage-1 result (the same picture at lower resolution)"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=compat.SAMPLERS),
                io.Combo.Input("scheduler", options=compat.SCHEDULERS),
                io.Float.Input("denoise", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of each patch is re-generated; the hole starts from the "
                                       "upscaled reference"),
                io.Int.Input("patch_size", default=1024, min=64, max=4096, step=8,
                             tooltip="Side of a patch in pixels (a multiple of the VAE's factor, 8)"),
                io.Int.Input("overlap", default=128, min=0, max=2048, step=8,
                             tooltip="Pixels shared by neighbouring patches; results are blended across them"),
                PatchAdapterType.Input("patch_adapter", optional=True,
                                       tooltip="Reference Patch Adapter weights; without them each patch's "
                                               "self-attention is extended with the reference tokens"),
                io.Int.Input("patch_batch", default=1, min=1, max=64, optional=True,
                             tooltip="Patches sampled together (faster on a large GPU; each batch reads the "
                                     "canvas as it was when the batch started)"),
                io.Float.Input("reference_context", default=1.5, min=1.0, max=4.0, step=0.05, optional=True,
                               tooltip="How much larger than the patch the reference region it attends to is"),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.Image.Output(display_name="patch_grid")],
        )

    @classmethod
    def problem(cls, patch_size=None, overlap=None, **values):
        if patch_size is not None and overlap is not None and overlap >= patch_size:
            return (f"expected overlap smaller than patch_size ({patch_size}); got overlap {overlap}. Lower the "
                    "overlap (or raise patch_size)")
        return None

    @classmethod
    @torch.no_grad()
    def execute(cls, model, vae, positive, negative, image, mask, reference, seed, steps, cfg, sampler_name,
                scheduler, denoise, patch_size, overlap, patch_adapter=None, patch_batch=1, reference_context=1.5):
        cls.check_inputs(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                         denoise=denoise, patch_size=patch_size, overlap=overlap, patch_batch=patch_batch,
                         reference_context=reference_context)
        check_refine_inputs(cls, model, vae, patch_adapter, reference)
        settings = patch_refine.RefineSettings(seed, steps, cfg, sampler_name, scheduler, denoise, patch_size, overlap,
                                               patch_batch, reference_context)
        with named(cls):
            # 4K+ images: no image-sized copies beyond the output itself (views for reading, crops per patch).
            img, m = match_image_mask(image_view_bchw(image), mask_view_b1hw(mask))     # views, expanded not copied
            ref = image_to_bchw(reference, "reference")
            pa.check_patch_settings(patch_size, overlap, patch_refine.latent_factor(vae))
            row_batch(ref, img.shape[0], "reference")
            pa.check_reference_aspect(ref.shape[-2], ref.shape[-1], img.shape[-2], img.shape[-1])
        job = patch_refine.RefineJob(model, vae, positive, negative, settings, reference_attacher(patch_adapter))
        out = image_copy(img)
        plans = patch_refine.refine(job, img, m, ref, out)
        grid = torch.stack([patch_refine.patch_grid_preview(img[i], m[i], plans[i]) for i in range(img.shape[0])])
        return io.NodeOutput(out, bchw_to_image(grid))


def check_refine_inputs(node, model, vae, patch_adapter, reference) -> None:
    """Before any work: a UNet model (the reference attention's route), the VAE of its family, an adapter that
    fits, a reference of at least one latent cell."""
    require_unet(node, model, "SD1.5 / SDXL")
    require_vae_of(node, vae, model)
    require_size(node, "reference", reference, patch_refine.latent_factor(vae))
    if patch_adapter is not None:
        if patch_adapter.rpa:
            check_fits(node, patch_adapter, model, "rpa")
        else:
            log.info("%s has no Reference Patch Adapter weights; patches extend their self-attention with the "
                     "reference tokens instead", patch_adapter.name)


class DownscaleForStage1(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintDownscaleForStage1",
            display_name="Downscale For Stage 1",
            category=CATEGORY,
            description="Scales an image and its mask together to about `megapixels`, keeping the aspect ratio, with "
                        "sides that are multiples of `multiple_of`, so the stage-1 result covers exactly the whole "
                        "frame (ComfyUI's VAE encode would otherwise crop the edges).",
            inputs=[
                io.Image.Input("image"),
                io.Mask.Input("mask"),
                io.Float.Input("megapixels", default=1.0, min=0.05, max=16.0, step=0.01,
                               tooltip="Target size (1.0 ≈ 1024² for SDXL; 0.25 ≈ 512² for SD1.5)"),
                io.Int.Input("multiple_of", default=8, min=1, max=256,
                             tooltip="Sides are rounded to this (8 = the SD/SDXL latent factor)"),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, image, mask, megapixels, multiple_of=8):
        cls.check_inputs(megapixels=megapixels, multiple_of=multiple_of)
        with named(cls):
            img, m = image_and_mask(image, mask)
        H, W = img.shape[-2:]
        scale = math.sqrt(megapixels * MEGAPIXEL / (H * W))
        h = max(multiple_of, round(H * scale / multiple_of) * multiple_of)
        w = max(multiple_of, round(W * scale / multiple_of) * multiple_of)
        if pa.reference_aspect_problem(h, w, H, W):     # rounding to multiple_of would stretch it: stage 2 refuses
            raise refuse(cls, f"sides that are multiples of {multiple_of} near {megapixels} megapixels keeping the "
                         f"{W}x{H} image's aspect ratio (to 1 % and a pixel, as High-Res Patch Refine needs)",
                         f"{w}x{h} (aspect {w / h:.4f} instead of {W / H:.4f})",
                         "Raise megapixels or lower multiple_of.")
        aa = h < H or w < W
        small = F.interpolate(img, size=(h, w), mode="bicubic", antialias=aa, align_corners=False).clamp(0, 1)
        small_mask = F.interpolate(m, size=(h, w), mode="bilinear", antialias=aa, align_corners=False).clamp(0, 1)
        return io.NodeOutput(bchw_to_image(small), b1hw_to_mask(small_mask))


NODES = [PatchAdapterLoader, ApplyDualContext, HighResPatchRefine, DownscaleForStage1]
