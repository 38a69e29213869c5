"""LAR-Gen nodes: the released SDXL checkpoint, decoupled subject attention, the RefineNet, and the zoom-in crop
with exact paste-back.

How the subject reaches the UNet (the input MODEL is cloned, every route is one of ComfyUI's patch routes):

* subject attention: an ``attn2`` *replace* at each of the 70 cross-attention sites computes the text attention
  exactly as ComfyUI would (or calls the replace another node put there first, e.g. an IPAdapter) and adds
  ``weight · Attn(q, K_ip, V_ip)``. The subject's keys and values are projected once, when the node runs: the
  16 tokens go through ``to_k_ip`` / ``to_v_ip`` of every site then, so nothing of the 341 M projection weights
  is needed while sampling. Positive rows attend to the subject, negative rows to the tokens of a zero image
  (CLIP-normalised zeros through CLIP vision and the resampler), as the authors do; rows are told apart by
  ComfyUI's ``cond_or_uncond``.
* RefineNet: an ``APPLY_MODEL`` wrapper noises the subject latent to the step's sigma (ComfyUI's own
  ``noise_scaling`` / ``calculate_input``), runs the RefineNet once per step (its input does not depend on the
  prompt, so one pass serves every CFG row and every model call of the step), and hands its decoder
  self-attention inputs down; an ``attn1_patch`` appends them to the keys/values of the main UNet's decoder
  self-attention.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.model_management as mm

from ..models import largen, zoom
from ..models.layers import with_reference_tokens
from ..models.sites import latent_grid, site_of
from ..models.weights import (CheckpointFormatError, build_from_state_dict, check_weights, load_weights, strip_prefix,
                              tensor_dict)
from . import comfy_compat as compat
from .branch_unet import RefineNet, set_transformer_norm_eps, transformer_sites
from .common import (CheckedNode, PercentRangeNode, Precision, model_files, model_path, percent_inputs,
                     resolve_dtype, wrap_patcher)
from .comfy_compat import io
from .layout import (b1hw_to_mask, bchw_to_image, image_and_mask, image_to_bchw, mask_to_b1hw,
                     row_batch, vae_encode)
from .patching import ModelPatch, StepNoise, add_site_replaces, bound_attention, moved, once_per_run, sigma_range
from .accepts import named, require_rows, require_sdxl, require_unet, require_vae_of
from .checks import refuse

log = logging.getLogger(__name__)
# Display names, for refusals raised while sampling (where the patch, not the node class, is at hand).
SUBJECT_NODE, REFINE_NODE = "Apply LAR-Gen Subject Attention", "Apply LAR-Gen RefineNet"
CATEGORY = "inpaint/consistent/LAR-Gen"
SubjectAdapterType = io.Custom("SUBJECT_ADAPTER")
RefineNetType = io.Custom("REFINENET")
CropInfoType = io.Custom("CROP_INFO")
FROM_CHECKPOINT = "from checkpoint"
AUTHORS_TRANSFORMER_NORM_EPS = 1e-5     # scepter's GroupNorm32 default; SGM / ComfyUI use 1e-6
SDXL_CONTEXT, SDXL_ADM, SDXL_POOLED = 2048, 2816, 1280


# -- loading ---------------------------------------------------------------------------------------------
def _sdxl_unet(sd: dict, path: str, dtype_choice: str, in_channels: int):
    """A ComfyUI SDXL model object for an SGM-layout UNet state dict of any depth (ComfyUI's own detection only
    accepts the exact SDXL depths), loaded strictly: every tensor used, none missing."""
    name = os.path.basename(path)
    cfg = compat.detect_unet_config(sd)
    if (cfg is None or cfg.get("context_dim") != SDXL_CONTEXT or cfg.get("adm_in_channels") != SDXL_ADM
            or not cfg.get("use_linear_in_transformer") or cfg.get("in_channels") != in_channels):
        got = "nothing recognisable" if cfg is None else (
            f"text width {cfg.get('context_dim')}, size/pooled vector {cfg.get('adm_in_channels')}, "
            f"{cfg.get('in_channels')} input channels")
        raise CheckpointFormatError(f"{name}: expected an SDXL UNet (text width {SDXL_CONTEXT}, vector {SDXL_ADM}, "
                                    f"{in_channels} input channels), found {got}")
    check_weights(sd, path)                      # floating point and finite, before anything is built
    model_config = compat.sdxl_model_config(cfg)
    load_device = mm.get_torch_device()
    params = sum(t.numel() for t in sd.values())
    if Precision(dtype_choice) == Precision.AUTO:
        dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=next(iter(sd.values())).dtype)
    else:
        dtype = resolve_dtype(dtype_choice, load_device)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                 model_config.supported_inference_dtypes))
    model = model_config.get_model({}, "")
    expected = model.diffusion_model.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    extra = sorted(k for k in sd if k not in expected)
    bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad:
        raise CheckpointFormatError(
            f"{name}: the UNet does not load strictly: {len(missing)} missing ({', '.join(missing[:3])}), "
            f"{len(extra)} unexpected ({', '.join(extra[:3])}), {len(bad)} of another shape ({', '.join(bad[:3])})")
    model.load_model_weights(sd, "")
    set_transformer_norm_eps(model.diffusion_model, AUTHORS_TRANSFORMER_NORM_EPS)
    return compat.model_patcher(model.to(mm.unet_offload_device()), load_device, mm.unet_offload_device())


@dataclass(frozen=True)
class SubjectAdapter:
    patcher: object                 # ModelPatcher of a SubjectAdapterNet
    channels: dict                  # site -> channels
    embedding_dim: int              # CLIP vision width the resampler reads


def load_largen(path: str, image_proj_path: str | None, dtype_choice: str):
    parts = largen.split_checkpoint(tensor_dict(load_weights(path), path), path)
    if parts.carries:
        log.info("%s also holds %s; the LAR-Gen workflows use the standard SDXL ones (the authors froze them)",
                 path, " and ".join(parts.carries))
    return largen_from_parts(parts, path, image_proj_path, dtype_choice)


def largen_from_parts(parts: largen.LARGenCheckpoint, path: str, image_proj_path: str | None, dtype_choice: str):
    """(MODEL, SubjectAdapter) from a checked :func:`largen.split_checkpoint` result (``path`` names it in errors);
    the training command builds its initial model through here too."""
    model = _sdxl_unet(parts.unet, path, dtype_choice, in_channels=9)
    if image_proj_path is None:
        if parts.resampler is None:
            raise CheckpointFormatError(f"{path} carries no IP-Adapter-Plus resampler; choose "
                                        "ip-adapter-plus_sdxl_vit-h.bin as image_proj")
        rsd, rsrc = parts.resampler, path
    else:
        rsd, rsrc = largen.read_image_proj(load_weights(image_proj_path), image_proj_path), image_proj_path
    rcfg = largen.resampler_config(rsd, rsrc)
    channels = {s: k.shape[0] for s, (k, _) in parts.ip.items()}
    ctx = next(iter(parts.ip.values()))[0].shape[1]
    if rcfg.output_dim != ctx:
        hint = " (an SD1.5 IP-Adapter-Plus)" if rcfg.output_dim == 768 else ""
        raise CheckpointFormatError(
            f"{rsrc}: the resampler makes {rcfg.output_dim}-wide subject tokens{hint}, but LAR-Gen's subject "
            f"projections take {ctx}-wide ones; use ip-adapter-plus_sdxl_vit-h.bin")
    sd = largen.subject_adapter_state_dict(rsd, parts.ip)
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    dtype = model.model.get_dtype()
    kw = compat.build_kwargs(device)
    net = build_from_state_dict(lambda device: largen.SubjectAdapterNet(rcfg, channels, ctx, dtype=dtype, device=device,
                                                                        **kw),
                                sd, rsrc, "the LAR-Gen subject adapter (IP-Adapter-Plus resampler + to_k_ip/to_v_ip)",
                                dtype)
    return model, SubjectAdapter(wrap_patcher(net, device, offload), channels, rcfg.embedding_dim)


@dataclass(frozen=True)
class RefineNetModel:
    patcher: object                 # ModelPatcher of a branch_unet.RefineNet

    @property
    def net(self):
        return self.patcher.model


def load_refinenet(path: str, dtype_choice: str) -> RefineNetModel:
    sd = tensor_dict(load_weights(path), path)
    parts = largen.split_checkpoint(sd, path, need_subject=False)
    name = os.path.basename(path)
    if not parts.refinenet:
        raise CheckpointFormatError(
            f"{name} holds no RefineNet (no ref_input_blocks / ref_middle_block / ref_output_blocks weights). The "
            "public LAR-Gen release disables it; a RefineNet file comes from training (format: docs/largen_format.md)")
    projector = parts.projector or strip_prefix(sd, "patch_projector.") or None
    if not projector or "weight" not in projector:
        raise CheckpointFormatError(f"{name}: the RefineNet needs its patch projector (conditioner …patch_projector."
                                    "weight/bias, or patch_projector.weight/bias at the top level); none found")
    return refinenet_from_parts(parts.refinenet, projector, path, dtype_choice)


def refinenet_from_parts(refinenet: dict, projector: dict, path: str, dtype_choice: str) -> RefineNetModel:
    """The RefineNet from its UNet tensors (ComfyUI names, no ``ref_``) and its projector's ``weight`` / ``bias``;
    ``path`` names them in errors. The training command builds its initial RefineNet through here too."""
    name = os.path.basename(path)
    cfg = compat.detect_unet_config(refinenet)
    if cfg is None or cfg.get("in_channels") != 4 or cfg.get("context_dim") != SDXL_CONTEXT:
        raise CheckpointFormatError(f"{name}: the ref_* weights are not an SDXL UNet with a 4-channel input")
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    dtype = resolve_dtype(dtype_choice, device)
    width = projector["weight"].shape[1]
    full = dict(refinenet, **{f"projector.{k}": v for k, v in projector.items()})
    net = build_from_state_dict(lambda device: RefineNet(cfg, width, dtype=dtype, device=device,
                                                         operations=compat.cast_operations()),
                                full, path, "LAR-Gen's RefineNet (ref_* UNet copy + patch projector)", dtype)
    set_transformer_norm_eps(net, AUTHORS_TRANSFORMER_NORM_EPS)
    return RefineNetModel(wrap_patcher(net, device, offload))


# -- the subject image -------------------------------------------------------------------------------------
# The authors' preprocessing (models/zoom.py says each step): the subject whitened and cropped, then
# * CLIP: padded white to int(1.02 x its longer side) and resized bilinear (antialiased) to 224, normalised;
# * RefineNet: its longer side scaled to the resolution (bilinear), padded white to the square.
def subject_crops(node, image: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """IMAGE (RGB, or RGBA whose alpha marks the subject) + optional MASK (1 = subject) -> one [1,3,h,w] crop per
    subject on white."""
    if image.ndim == 4 and image.shape[-1] == 4 and mask is None:
        mask = image[..., 3]
    pixels = image_to_bchw(image, "subject_image")
    m = None
    if mask is not None:
        m = mask_to_b1hw(mask, "subject_mask")
        if m.shape[-2:] != pixels.shape[-2:]:     # e.g. LoadImage's 64x64 stand-in mask of an image without alpha
            m = F.interpolate(m, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        if m.shape[0] not in (1, pixels.shape[0]):
            raise refuse(node, f"one subject_mask, or one per subject image ({pixels.shape[0]})",
                         f"{m.shape[0]} masks")
        empty = [i for i in range(m.shape[0]) if not (m[i] > zoom.SUBJECT_MASK_THRESHOLD).any()]
        if empty:
            raise refuse(node, "a subject_mask that marks the subject (1 = subject, > 0.5)",
                         f"an empty mask (batch item {empty[0]})", "Paint the subject, or leave subject_mask "
                         "unconnected to use the whole image.")
    return zoom.subject_crops(pixels, m)


def subject_square(image: torch.Tensor, mask: torch.Tensor | None, node="LAR-Gen") -> torch.Tensor:
    """The CLIP input before its resize: [S,3,s,s] white squares (see models/zoom.prepare_subject)."""
    crops = subject_crops(node, image, mask)
    squares = [zoom.clip_square(c) for c in crops]
    side = max(sq.shape[-1] for sq in squares)
    return torch.cat([zoom.resize_bilinear_aa(sq, side) for sq in squares])


CLIP_VISION_WIDTHS = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14"}   # hidden widths


def clip_width_error(width: int, want: int) -> str:
    names = CLIP_VISION_WIDTHS
    return (f"the CLIP vision model gives {width}-wide features ({names.get(width, 'another encoder')}), but LAR-Gen "
            f"needs {want} ({names.get(want, '?')}; e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in "
            "models/clip_vision)")


def clip_width_refusal(node, width: int, want: int):
    names = CLIP_VISION_WIDTHS
    return refuse(node, f"a CLIP vision model with {want}-wide features ({names.get(want, '?')})",
                  f"one with {width}-wide features ({names.get(width, 'another encoder')})",
                  "Load CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors from models/clip_vision.")


def encode_subject(clip_vision, square: torch.Tensor):
    """-> (penultimate hidden states [S,T,W], last hidden state [S,T,W]) of square subject images [S,3,s,s] in
    [0, 1], resized as the authors (bilinear, antialiased, to the encoder's 224) and normalised without ComfyUI's
    8-bit rounding."""
    mm.load_model_gpu(clip_vision.patcher)
    size = getattr(clip_vision, "image_size", zoom.CLIP_SIZE)
    mean = torch.tensor(getattr(clip_vision, "image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(getattr(clip_vision, "image_std", CLIP_STD)).view(1, 3, 1, 1)
    x = (zoom.resize_bilinear_aa(square.float().cpu(), size) - mean) / std
    out = clip_vision.model(pixel_values=x.to(clip_vision.load_device), intermediate_output=-2)
    return out[1].to(mm.intermediate_device()), out[0].to(mm.intermediate_device())


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def subject_latent(vae, latent_format, squares, resolution: int) -> torch.Tensor:
    """The RefineNet's input: square subject images in [0, 1] ([S,3,s,s], or a list of such whose sides differ)
    resized to ``resolution`` (where they are not that size already) and encoded in one VAE call, at the model's
    latent scale -> [S,4,res/8,res/8]."""
    squares = [squares] if torch.is_tensor(squares) else squares
    pixels = torch.cat([sq if sq.shape[-2:] == (resolution, resolution) else
                        F.interpolate(sq, size=(resolution, resolution), mode="bicubic", antialias=True,
                                      align_corners=False) for sq in squares]).clamp(0, 1)
    return latent_format.process_in(vae_encode(vae, pixels).float())


def encode_zero_image(clip_vision) -> torch.Tensor:
    """Penultimate hidden states of the authors' unconditional image: zeros after CLIP normalisation (the image
    preprocessing would round the mean colour to 8 bits, so the pixel values go in directly)."""
    mm.load_model_gpu(clip_vision.patcher)
    size = getattr(clip_vision, "image_size", 224)
    zeros = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    return clip_vision.model(pixel_values=zeros, intermediate_output=-2)[1].to(mm.intermediate_device())


# -- subject attention -----------------------------------------------------------------------------------
class SubjectPatch(ModelPatch):
    """Everything one ApplySubjectAttention attaches."""

    name = "subject"

    def __init__(self, kv: dict, kv_zero: dict, weight: float, sigma_window, region):
        super().__init__(sigma_window)
        self.kv, self.kv_zero, self.weight = kv, kv_zero, weight
        self.region = region                   # [M,1,H,W] CPU or None

    def acts(self) -> bool:
        return self.weight != 0

    def rows_kv(self, site, chunks, rows, device, dtype):
        def build():
            ks, vs = zip(*((row_batch(t, rows, "subject_image") for t in (self.kv if c == 0 else self.kv_zero)[site])
                           for c in chunks))
            return torch.cat(ks).to(device, dtype), torch.cat(vs).to(device, dtype)
        return once_per_run(self.run(), ("kv", site, tuple(chunks), rows, device, dtype), build)

    def region_rows(self, tokens, shape, chunks, rows, device, dtype):
        if self.region is None:
            return None
        h, w = latent_grid(tokens, shape[-2], shape[-1])

        def build():
            m = F.interpolate(self.region, size=(h, w), mode="area")     # exact 0/1 on aligned edges
            m = row_batch(m.reshape(m.shape[0], h * w, 1), rows, "attn_mask")
            return m.repeat(len(chunks), 1, 1).to(device, dtype)
        return once_per_run(self.run(), ("region", h, w, tuple(chunks), rows, device, dtype), build)

    def add_subject(self, text_out, q, k, v, site, extra):
        if not extra.get(self.key):
            return text_out
        chunks, rows = self.chunks_rows(q.shape[0], extra)
        require_rows(SUBJECT_NODE, "subject image", next(iter(self.kv.values()))[0].shape[0], rows)
        if self.region is not None:
            require_rows(SUBJECT_NODE, "attn_mask", self.region.shape[0], rows)
        k, v = self.rows_kv(site, chunks, rows, q.device, q.dtype)
        region = self.region_rows(q.shape[1], extra["original_shape"], chunks, rows, q.device, q.dtype)
        return largen.decoupled_attention(text_out, q, k, v, extra["n_heads"], self.weight, bound_attention(extra),
                                          region)

    def attach(self, model):
        m = self.clone_with_run_scope(model)
        add_site_replaces(m, "attn2", self.kv, self.add_subject)
        compat.add_wrapper(m, compat.DIFFUSION_MODEL, self.key, self.flag_active)
        return m


def model_sites(model, node=SUBJECT_NODE) -> dict:
    """{site: (self-attention channels, cross-attention channels or None)} of a MODEL's UNet."""
    require_unet(node, model, "SDXL")
    unet = model.get_model_object("diffusion_model")
    return {s: (tb.attn1.to_q.out_features, None if tb.attn2 is None else tb.attn2.to_q.out_features)
            for s, tb in transformer_sites(unet).items()}


# -- RefineNet ------------------------------------------------------------------------------------------
class _RefineRun(StepNoise):
    """Per sampling run: a fresh noise draw per step (as the authors' ``diffuse``) and the RefineNet tokens of the
    current step."""

    def __init__(self, seed):
        super().__init__(seed)
        self.entries = []

    def step(self, sigma: float, shape):
        if sigma != self.sigma:
            self.entries = []
        return super().step(sigma, shape)

    def lookup(self, y):
        return next((out for yy, out in self.entries if torch.equal(yy, y)), None)


class RefinePatch(ModelPatch):
    name = "refinenet"

    def __init__(self, refinenet: RefineNetModel, latent, context, null_pooled, sigma_window, seed):
        super().__init__(sigma_window)
        self.refinenet = refinenet
        self.latent, self.context, self.null_pooled = latent, context, null_pooled   # CPU
        self.seed = seed

    def new_run(self):
        return _RefineRun(self.seed)

    def refinenet_tokens(self, base, x, t, y_ref, noise, run, transformer_options):
        """The RefineNet's decoder self-attention inputs for the subject latent noised to this step's sigma."""
        S = self.latent.shape[0]
        dt = base.manual_cast_dtype or base.get_dtype()
        lat = moved(run, "latent", self.latent, x.device, torch.float32)
        # one sigma for every subject while sampling; in training each row has its own, and subject i is
        # noised to row i's (then S == rows)
        s = (t[:S] if 1 < S <= t.shape[0] else t[:1]).to(torch.float32)
        noisy = base.model_sampling.noise_scaling(s.reshape(-1, 1, 1, 1), noise.to(x.device), lat)
        xin = base.model_sampling.calculate_input(s, noisy)
        timesteps = base.model_sampling.timestep(s).float().expand(S)
        net = self.refinenet.net
        ctx = moved(run, "context", self.context, x.device, dt)
        kv = once_per_run(run, ("context_kv", x.device, dt), lambda: net.context_kv(ctx))
        return net(xin.to(dt), timesteps, ctx, y_ref.expand(S, -1).to(x.device, dt), transformer_options, kv)

    def apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        sigma = float(t.max())
        if not self.in_window(sigma):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        y = kwargs.get("y")
        if y is None:
            raise refuse(REFINE_NODE, "an SDXL model (its size/pooled vector 'y')", "a model call without one")
        _, rows = self.chunks_rows(x.shape[0], transformer_options)
        require_rows(REFINE_NODE, "subject image", self.latent.shape[0], rows)
        run = self.run()
        y_ref = y[:1].clone()
        y_ref[:, :self.null_pooled.shape[-1]] = self.null_pooled.to(y_ref)
        if run is not None:
            noise = run.step(sigma, self.latent.shape)
            tokens = run.lookup(y_ref)
        else:
            noise = torch.randn(self.latent.shape, generator=torch.Generator().manual_seed(self.seed))
            tokens = None
        if tokens is None:
            tokens = self.refinenet_tokens(executor.class_obj, x, t, y_ref, noise, run, transformer_options)
            if run is not None:
                run.entries.append((y_ref, tokens))
        return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, self.key: tokens}, **kwargs)

    def attn1(self, n, context_attn1, value_attn1, extra):
        tokens = extra.get(self.key)
        site = site_of(extra)
        ref = None if tokens is None or site is None or site[0] != "output" else tokens.get(site)
        if ref is None:
            return n, context_attn1, value_attn1
        chunks, rows = self.chunks_rows(n.shape[0], extra)
        ref = row_batch(ref, rows, "subject_image").repeat(len(chunks), 1, 1)
        return with_reference_tokens(n, context_attn1, value_attn1, ref)

    def attach(self, model):
        m = self.clone_with_run_scope(model, (self.refinenet.patcher,))
        compat.add_wrapper(m, compat.APPLY_MODEL, self.key, self.apply_model)
        m.set_model_attn1_patch(self.attn1)
        return m


# -- nodes ------------------------------------------------------------------------------------------------
def _loaded(node, what: str, load):
    """``load()``, its weight-file errors refused with the node's name (what the node expected, what it found)."""
    try:
        return load()
    except CheckpointFormatError as e:
        raise refuse(node, what, str(e).rstrip(". "), "See docs/largen_format.md for the files it reads.") from e


class LARGenLoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintLARGenLoader",
            display_name="Load LAR-Gen",
            category=CATEGORY,
            description="Loads LAR-Gen's SDXL inpainting UNet (largen_ckpt_s22k.pth as released) and its subject "
                        "adapter (the 70 to_k_ip/to_v_ip projections + the IP-Adapter-Plus resampler).",
            inputs=[
                io.Combo.Input("checkpoint", options=model_files("largen"),
                               tooltip="largen_ckpt_s22k.pth (or a safetensors copy) in models/largen"),
                io.Combo.Input("image_proj", options=[FROM_CHECKPOINT, *model_files("largen")],
                               tooltip="ip-adapter-plus_sdxl_vit-h.bin (models/largen or models/ipadapter); "
                                       "'from checkpoint' if the LAR-Gen file carries the resampler itself"),
                io.Combo.Input("dtype", options=Precision, default=Precision.AUTO, optional=True,
                               tooltip="auto: ComfyUI's usual UNet precision on this device"),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), SubjectAdapterType.Output(display_name="SUBJECT_ADAPTER")],
        )

    @classmethod
    def execute(cls, checkpoint, image_proj, dtype=Precision.AUTO):
        cls.check_inputs(checkpoint=checkpoint, image_proj=image_proj, dtype=dtype)
        ip = None if image_proj == FROM_CHECKPOINT else model_path("largen", image_proj)
        return io.NodeOutput(*_loaded(cls, "a LAR-Gen checkpoint (SDXL 9-channel UNet with to_k_ip/to_v_ip) and an "
                                           "SDXL IP-Adapter-Plus resampler",
                                      lambda: load_largen(model_path("largen", checkpoint), ip, dtype)))


class ApplySubjectAttention(PercentRangeNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintApplySubjectAttention",
            display_name=SUBJECT_NODE,
            category=CATEGORY,
            description="Adds LAR-Gen's decoupled subject attention: every cross-attention adds weight · "
                        "Attn(q, K_subject, V_subject) to the text attention.",
            inputs=[
                io.Model.Input("model"),
                SubjectAdapterType.Input("subject_adapter"),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H/14 (the image encoder of IP-Adapter-Plus SDXL)"),
                io.Image.Input("subject_image", tooltip="The subject; RGBA alpha or subject_mask cuts it out "
                                                        "(background becomes white, as in training)"),
                io.Float.Input("weight", default=1.0, min=0.0, max=5.0, step=0.01,
                               tooltip="β: 1.0 in the authors' code, 0.3 in the paper's text+subject setting"),
                *percent_inputs("the subject"),
                io.Mask.Input("attn_mask", optional=True, tooltip="Confine the subject to this region (1 = subject)"),
                io.Mask.Input("subject_mask", optional=True,
                              tooltip="1 = subject, 0 = background (made white); resized to the subject image if its "
                                      "size differs"),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    @torch.no_grad()
    def execute(cls, model, subject_adapter, clip_vision, subject_image, weight, start_percent, end_percent,
                attn_mask=None, subject_mask=None):
        cls.check_inputs(weight=weight, start_percent=start_percent, end_percent=end_percent)
        require_sdxl(cls, model, "LAR-Gen's UNet")
        with named(cls):
            check_adapter_fits(cls, subject_adapter, model_sites(model, cls))
            square = subject_square(subject_image, subject_mask, cls)
            region = attention_region(cls, attn_mask)
        feats, _ = encode_subject(clip_vision, square)
        if feats.shape[-1] != subject_adapter.embedding_dim:
            raise clip_width_refusal(cls, feats.shape[-1], subject_adapter.embedding_dim)
        kv, kv_zero = (subject_keys_values(subject_adapter, f) for f in (feats, encode_zero_image(clip_vision)))
        if not torch.isfinite(next(iter(kv.values()))[0]).all():
            raise refuse(cls, "finite subject tokens", "NaN or infinite ones from the CLIP vision model and the "
                         "subject adapter", "Check the CLIP vision file and the LAR-Gen checkpoint.")
        patch = SubjectPatch(kv, kv_zero, weight, sigma_range(model, start_percent, end_percent, cls), region)
        return io.NodeOutput(patch.attach(model))


def check_adapter_fits(node, adapter: SubjectAdapter, sites: dict) -> None:
    """Every cross-attention the adapter projects for must exist in the model (``sites``: :func:`model_sites`) with
    the adapter's width."""
    for site, ch in adapter.channels.items():
        if site not in sites or sites[site][1] != ch:
            raise refuse(node, f"a MODEL whose cross-attention {site} is {ch} wide (the subject adapter's)",
                         "none there" if site not in sites else f"{sites[site][1]} wide",
                         "Connect the MODEL from Load LAR-Gen (or another SDXL model).")


def subject_keys_values(adapter: SubjectAdapter, features: torch.Tensor) -> dict:
    """CLIP penultimate features [S, T, W] -> {site: (K_ip, V_ip)} through the resampler and every site's
    projections, once, when the node runs."""
    mm.load_model_gpu(adapter.patcher)
    net, dev, out_dev = adapter.patcher.model, adapter.patcher.load_device, mm.intermediate_device()
    return {s: (k.to(out_dev), v.to(out_dev)) for s, (k, v) in
            net.project(net.resampler(features.to(dev, net.dtype))).items()}


def attention_region(node, attn_mask) -> torch.Tensor | None:
    """The optional attn_mask as [M, 1, H, W] (1 = the subject acts), or None (everywhere)."""
    if attn_mask is None:
        return None
    region = mask_to_b1hw(attn_mask, "attn_mask")
    if not (region > 0).any():
        raise refuse(node, "an attn_mask that marks where the subject acts", "an empty attn_mask (the subject would "
                     "act nowhere)", "Leave it unconnected to apply the subject everywhere.")
    return region


class RefineNetLoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintRefineNetLoader",
            display_name="Load LAR-Gen RefineNet",
            category=CATEGORY,
            description="Loads LAR-Gen's RefineNet (ref_* weights + patch projector) from a LAR-Gen checkpoint or a "
                        "RefineNet file. No public RefineNet weights are known.",
            inputs=[
                io.Combo.Input("checkpoint", options=model_files("largen")),
                io.Combo.Input("dtype", options=Precision, default=Precision.AUTO, optional=True),
            ],
            outputs=[RefineNetType.Output(display_name="REFINENET")],
        )

    @classmethod
    def execute(cls, checkpoint, dtype=Precision.AUTO):
        cls.check_inputs(checkpoint=checkpoint, dtype=dtype)
        return io.NodeOutput(_loaded(cls, "a LAR-Gen RefineNet (ref_* SDXL UNet copy + patch projector)",
                                     lambda: load_refinenet(model_path("largen", checkpoint), dtype)))


class ApplyRefineNet(PercentRangeNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintApplyRefineNet",
            display_name=REFINE_NODE,
            category=CATEGORY,
            description="Lends the subject's details: the RefineNet runs on the noised subject latent once per step "
                        "and every decoder self-attention of the model also attends to its tokens.",
            inputs=[
                io.Model.Input("model"),
                RefineNetType.Input("refinenet"),
                io.Vae.Input("vae"),
                io.ClipVision.Input("clip_vision"),
                io.Image.Input("subject_image"),
                *percent_inputs("the RefineNet"),
                io.Mask.Input("subject_mask", optional=True, tooltip="1 = subject, 0 = background (made white)"),
                io.Int.Input("subject_resolution", default=1024, min=64, max=4096, step=64, optional=True,
                             tooltip="Side of the square subject latent (the authors: the inpainting resolution)"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                             tooltip="Noise for the subject latent (a fresh draw each step)"),
                io.Clip.Input("clip", optional=True,
                              tooltip="SDXL CLIP: the RefineNet's pooled text is that of an empty prompt. "
                                      "Unconnected: zeros (SGM's dropped-text value)"),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    @torch.no_grad()
    def execute(cls, model, refinenet, vae, clip_vision, subject_image, start_percent, end_percent,
                subject_mask=None, subject_resolution=1024, seed=0, clip=None):
        cls.check_inputs(start_percent=start_percent, end_percent=end_percent, subject_resolution=subject_resolution,
                         seed=seed)
        net = refinenet.net
        require_sdxl(cls, model, "the RefineNet reads its size/pooled vector")
        require_vae_of(cls, vae, model)
        with named(cls):
            check_refinenet_fits(cls, net, model_sites(model, cls))
            crops = subject_crops(cls, subject_image, subject_mask)
        square = torch.cat([zoom.resize_bilinear_aa(zoom.clip_square(c), zoom.CLIP_SIZE) for c in crops])
        _, last = encode_subject(clip_vision, square)
        width = net.projector.in_features
        if last.shape[-1] != width:
            raise clip_width_refusal(cls, last.shape[-1], width)
        refine_in = [zoom.refine_square(c, subject_resolution) for c in crops]
        latent = subject_latent(vae, model.get_model_object("latent_format"), refine_in, subject_resolution)
        mm.load_model_gpu(refinenet.patcher)
        dev = refinenet.patcher.load_device
        context = net.projector(last.to(dev, net.dtype)).to(mm.intermediate_device())
        patch = RefinePatch(refinenet, latent.cpu(), context, empty_prompt_pooled(cls, clip),
                            sigma_range(model, start_percent, end_percent, cls), seed)
        return io.NodeOutput(patch.attach(model))


def check_refinenet_fits(node, net, sites: dict) -> None:
    """Every decoder self-attention of the RefineNet must exist in the model (``sites``: :func:`model_sites`) with
    its width, and the other way round."""
    own = transformer_sites(net)
    for site in net.sites:
        ours = own[site].attn1.to_q.out_features
        if site not in sites or sites[site][0] != ours:
            raise refuse(node, f"a MODEL whose decoder self-attention {site} is {ours} wide (the RefineNet's)",
                         "none there" if site not in sites else f"{sites[site][0]} wide",
                         "Connect the MODEL from Load LAR-Gen and the RefineNet trained for it.")
    missing = [s for s in sites if s[0] == "output" and s not in net.sites]
    if missing:
        raise refuse(node, "a RefineNet with every decoder self-attention of the model",
                     f"one without {missing[:4]}", "Use the RefineNet trained for this model.")


def empty_prompt_pooled(node, clip) -> torch.Tensor:
    """[1, 1280]: SDXL CLIP's pooled vector of an empty prompt, or zeros (SGM's dropped-text value) without one."""
    if clip is None:
        return torch.zeros(1, SDXL_POOLED)
    _, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    if pooled is None or pooled.shape[-1] != SDXL_POOLED:
        raise refuse(node, f"SDXL's CLIP (pooled width {SDXL_POOLED})",
                     f"a CLIP with pooled width {None if pooled is None else pooled.shape[-1]}",
                     "Connect the SDXL CLIP, or leave clip unconnected.")
    return pooled[:1].float().cpu()


class CropToMask(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintCropToMask",
            display_name="Crop To Mask (zoom-in)",
            category=CATEGORY,
            description="LAR-Gen's zoom-in: a square around the mask's bounding box × context_factor, resized to the "
                        "model resolution. Pair with Paste Back.",
            inputs=[
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = area to inpaint"),
                io.Float.Input("context_factor", default=1.3, min=1.0, max=8.0, step=0.05,
                               tooltip="How much larger than the mask's bounding box the crop is (authors: 1.3)"),
                io.Int.Input("resolution", default=1024, min=64, max=8192, step=8,
                             tooltip="Side of the square crop given to the model"),
                io.Combo.Input("padding", options=zoom.Padding, default=zoom.Padding.EDGE, optional=True,
                               tooltip="Where the image is narrower than the square: repeat the edge, or black "
                                       "(the authors)"),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask"),
                     CropInfoType.Output(display_name="crop_info")],
        )

    @classmethod
    def execute(cls, image, mask, context_factor, resolution, padding=zoom.Padding.EDGE):
        cls.check_inputs(context_factor=context_factor, resolution=resolution, padding=padding)
        with named(cls):
            img, m = image_and_mask(image, mask)
            empty = [i for i in range(m.shape[0]) if not (m[i] > 0).any()]
            if empty:
                raise refuse(cls, "a mask that marks the area to inpaint (1 = inpaint)",
                             f"an empty mask (batch item {empty[0]})", "Paint the area to inpaint.")
            crops, masks, info = zoom.crop_to_mask(img, m, context_factor, resolution, padding)
        return io.NodeOutput(bchw_to_image(crops), b1hw_to_mask(masks), info)


class PasteBack(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintPasteBack",
            display_name="Paste Back",
            category=CATEGORY,
            description="Puts the inpainted crop back into the image, only inside the mask (feathered inwards): "
                        "every pixel outside the mask keeps its exact value.",
            inputs=[
                io.Image.Input("image", tooltip="The image that went into Crop To Mask"),
                io.Image.Input("inpainted", tooltip="The decoded result for the crops"),
                CropInfoType.Input("crop_info"),
                io.Int.Input("feather", default=8, min=0, max=256, step=1,
                             tooltip="Pixels inside the mask's border over which the result fades in"),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, image, inpainted, crop_info, feather):
        cls.check_inputs(feather=feather)
        with named(cls):
            out = zoom.paste_back(image_to_bchw(image), image_to_bchw(inpainted, "inpainted"), crop_info, feather)
        return io.NodeOutput(bchw_to_image(out))


NODES = [LARGenLoader, ApplySubjectAttention, RefineNetLoader, ApplyRefineNet, CropToMask, PasteBack]
