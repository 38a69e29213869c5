"""Patch-Adapter training (arXiv 2510.13419): the two adapters of the paper on a frozen SD1.5- or SDXL-inpainting
UNet (text encoder and VAE frozen too; only adapter weights train), one stage per run:

* ``--stage dca`` — the Dual Context Adapter at the reduced resolution (``resolution``, ~1K for SDXL): images
  squared to it, a hole drawn per image, the diffusion loss of the UNet run through
  ``nodes.patch_adapter.DualContextPatch`` — the very object Apply Patch-Adapter Dual Context attaches — with that
  hole as the node's mask.
* ``--stage rpa`` — the Reference Patch Adapter on full-resolution patches: images squared to ``full_resolution``,
  a ``patch_size`` patch cut around the hole, its reference made as High-Res Patch Refine makes it (the reference
  image's latent under the patch, grown by ``reference_context``) and fed through ``nodes.patch_adapter.
  ReferencePatch`` — the object that node attaches per patch — which runs the UNet on the noised reference, records
  every self-attention input and adds ``tanh(g) · Attn(Q, R W_k, R W_v)`` in the patch's own pass.

What is trained is therefore exactly what is sampled. The output, ``patch_adapter.safetensors``, is in the format of
``docs/patch_adapter_format.md`` and Load Patch-Adapter reads it as is. ``init`` names an earlier file (typically the
stage-1 result when training stage 2): the stage being trained starts from its weights when it has them, and the
other stage's weights are copied into the output unchanged, so one file can hold both stages.

Choices where the paper is silent (the README's Train section links here; it publishes only an abstract and a
summary):
- Sites: every transformer block of the UNet (each cross-attention for the DCA, each self-attention for the RPA),
  unless ``sites`` names a subset (block kinds ``input,middle,output`` and/or sites such as ``output.2.1``).
- Initialisation: DCA ``W_q`` = the layer's own ``attn2.to_q`` (Q' is the layer's query of the known region),
  ``W_k`` ~ U(±1/√D) (torch's Linear default), ``W_v`` = 0, so Z'' = 0 and the untrained adapter leaves the model
  exactly as it is. RPA ``W_k``, ``W_v`` = the layer's own ``attn1.to_k`` / ``to_v`` (the term starts as the
  patch's attention over the reference tokens through the layer's own projections, what the weight-free route
  computes), gate ``g`` = 0 (tanh 0 = 0: no effect). At g = 0 the projections get no gradient while g gets the
  full one (tanh'(0) = 1); after the first optimiser step g != 0 and the projections learn too (the zero-init
  gating of Flamingo / LLaMA-Adapter). Nothing else is needed; a test checks both steps.
- Optimiser: AdamW, lr 1e-4 (IP-Adapter's), weight decay 1e-2 on the projections and 0 on the gates, constant lr;
  mixed precision, loss scaling and accumulation are the engine's (``training/engine.py``).
- Loss: epsilon MSE over the whole latent (of the image in stage dca, of the patch in stage rpa), as SD-inpainting
  UNets are trained. Epsilon-prediction base models only.
- Timesteps: uniform integers in [0, ``max_timestep``) of the 1000 training steps; one per image in stage dca, one
  per batch in stage rpa (ReferencePatch noises the reference to one sigma per model call, as every row of a
  sampling call shares it). The reference's noise is fresh every step (a seed drawn from torch's generator).
- Inpaint inputs: as InpaintModelConditioning makes them (hole pixels set to grey 0.5 for the masked-image latent,
  the hole as concat mask), assembled by the model's own ``concat_cond``.
- Masks: PainterNet's mix (``models.masks.painter_mask``: box 25 %, irregular 50 %, segmentation 25 %) from
  ``name.mask.png`` when the image has one, else from a random ellipse (``masks.random_blob``). Stage rpa draws the
  hole at ``resolution`` and scales it to full resolution by nearest (the same shapes — stroke widths follow the
  image size — at a fraction of the cost).
- Patches (stage rpa): a random hole pixel is picked and the patch placed uniformly among the positions on the
  latent grid (multiples of 8) that hold it inside the image (High-Res Patch Refine only samples patches meeting
  the hole); an image whose hole is empty gets a uniformly placed patch.
- Reference (stage rpa): the training image itself, downscaled to ``resolution`` (bicubic, antialiased, as Downscale
  For Stage 1 does), stands in for the stage-1 result.
- Data: ``training/common.ImageFolder`` squares every image (shorter side scaled, centre crop) to ``resolution``
  (stage dca) or ``full_resolution`` (stage rpa); images smaller than that are upscaled, which teaches the RPA blur,
  so stage-2 data should be at least ``full_resolution`` on its shorter side.
- Prompts: ``name.txt`` beside the image (the local prompt; empty when absent), the first 77-token chunk, no prompt
  dropout; the same prompt for every patch of an image (High-Res Patch Refine gives every patch the same
  conditioning). SDXL size conditioning: the size the UNet sees (``resolution``, or ``patch_size``), crop 0.
- Stage rpa trains on the base model alone (the DCA is a reduced-resolution component; High-Res Patch Refine does
  not apply it).
- Gradient checkpointing: every res block and spatial transformer of the frozen UNet is recomputed in backward
  (non-reentrant checkpointing); only block inputs are kept. The UNet's activations, not the adapters, are what
  fills memory — the gradient must pass back through every frozen layer after an adapted one — and the adapter
  terms live inside the transformers, so they are recomputed with them. ComfyUI offers no patch route around a
  whole block, so for the length of one training forward pass the trainer sets an instance ``forward`` on the
  blocks of its own UNet and removes it after (nothing of ComfyUI's code is changed; sampling never sees it).
- Sample images: stage dca: masked input | base model | base model + DCA (euler, ``sample_steps``, ``sample_cfg``,
  denoise 1, as KSampler on InpaintModelConditioning); stage rpa: masked patch | the reference under it | the
  weight-free reference attention | with the RPA, each made by High-Res Patch Refine's own patch routine at
  ``sample_denoise``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import comfy.ops
import comfy.sample
import comfy.sd

from ..models import masks
from ..models import patch_adapter as pa
from ..models.sites import site_name
from ..models.weights import load_weights, safetensors_metadata, tensor_dict
from ..nodes import patch_refine
from ..nodes.branch_unet import transformer_sites
from ..nodes.common import wrap_patcher
from ..models.patch_adapter import PatchAdapterNet
from ..nodes.patch_adapter import DualContextPatch, PatchAdapter, ReferencePatch
from ..nodes.patch_adapter import reference_attacher as _attach_reference
from ..nodes.patch_refine import reference_latents as _reference_tokens_latent
from .common import (Engine, ImageFolder, Item, Loop, PromptEncoder, TrainOptions, adamw, checkpointed_blocks,
                     evaluating, load_base, load_on_device, require_epsilon, sample_conds, sampler_options,
                     save_image, sdxl_y, train_main, unet_blocks, validation_losses, write_atomic)
from .data import first_items, make_stream

log = logging.getLogger("consistent_inpaint.training.patch_adapter")

STAGES = ("dca", "rpa")
KINDS = ("input", "middle", "output")
OUTPUT_NAME = "patch_adapter.safetensors"


@dataclass
class PatchAdapterConfig(TrainOptions):
    """Train one Patch-Adapter stage (writes a file Load Patch-Adapter reads)."""
    base: str                      # ComfyUI checkpoint (UNet + CLIP + VAE): SD1.5- or SDXL-inpainting, epsilon
    output: str                    # folder for patch_adapter.safetensors, state.pt, loss.csv, logs/, samples/
    data: str = ""                 # folder: name.png [+ name.mask.png] [+ name.txt] (or set shards)
    stage: str = "dca"             # dca: Dual Context Adapter (stage 1) | rpa: Reference Patch Adapter (stage 2)
    init: str = ""                 # Patch-Adapter file: its weights of this stage start the run, the other's are kept
    sites: str = "all"             # all | comma list of block kinds (input, middle, output) and/or sites (output.2.1)
    resolution: int = 1024         # dca: the training size; rpa: the reference's size (the stage-1 resolution)
    full_resolution: int = 4096    # rpa: training images are squared to this
    patch_size: int = 1024         # rpa: side of a patch, as High-Res Patch Refine's patch_size
    reference_context: float = 1.5  # rpa: as High-Res Patch Refine's reference_context
    batch_size: int = 1            # global batch
    steps: int = 10000             # optimiser steps
    lr: float = 1e-4               # AdamW learning rate
    weight_decay: float = 1e-2     # projections only (gates: 0)
    max_timestep: int = 1000       # timesteps uniform in [0, max_timestep)
    sample_steps: int = 20         # sampler steps of the sample images
    sample_cfg: float = 7.5        # CFG of the sample images
    sample_denoise: float = 0.5    # rpa samples (High-Res Patch Refine's default)


# -- checks ------------------------------------------------------------------------------------------------------
def check_config(cfg: PatchAdapterConfig) -> None:
    """Every setting that can be judged before loading anything; errors name the option and the fix."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {cfg.stage!r}")
    sizes = {"resolution": cfg.resolution}
    if cfg.stage == "rpa":
        sizes.update(full_resolution=cfg.full_resolution, patch_size=cfg.patch_size)
    for name, v in sizes.items():
        if v < 8 or v % 8:
            raise ValueError(f"{name} must be a positive multiple of 8 (the VAE's latent factor); got {v}")
    if cfg.stage == "rpa":
        if cfg.patch_size > cfg.full_resolution:
            raise ValueError(f"patch_size ({cfg.patch_size}) must not exceed full_resolution ({cfg.full_resolution}): "
                             "a patch is cut from the full-resolution image")
        if cfg.resolution > cfg.full_resolution:
            raise ValueError(f"resolution ({cfg.resolution}) is the reference's (stage-1) size and must not exceed "
                             f"full_resolution ({cfg.full_resolution})")
        if cfg.reference_context < 1:
            raise ValueError(f"reference_context must be >= 1; got {cfg.reference_context}")
    if not 1 <= cfg.max_timestep <= 1000:
        raise ValueError(f"max_timestep must lie in 1..1000; got {cfg.max_timestep}")
    if cfg.batch_size < 1 or cfg.steps < 1:
        raise ValueError("batch_size and steps must be at least 1")


def base_of(model) -> str:
    """"sd15" / "sdxl" of an inpainting UNet with epsilon prediction; anything else is refused."""
    cfg = model.model.model_config.unet_config
    base = {768: "sd15", 2048: "sdxl"}.get(cfg.get("context_dim"))
    concat = tuple(getattr(model.model, "concat_keys", ()))
    if base is None or cfg.get("in_channels") != 9 or "mask" not in concat:
        raise ValueError("Patch-Adapter trains on an SD1.5- or SDXL-inpainting UNet (9-channel input: noisy latent, "
                         "mask, masked-image latent; text width 768 or 2048); this one has "
                         f"in_channels={cfg.get('in_channels')}, context_dim={cfg.get('context_dim')}, "
                         f"inpaint inputs {list(concat) or 'none'}")
    require_epsilon(model, "Patch-Adapter training")
    return base


def select_sites(available, spec: str) -> list:
    """The sites ``spec`` names ("all", block kinds, site names), in the UNet's order."""
    words = [w.strip() for w in spec.split(",") if w.strip()]
    if not words or words == ["all"]:
        return list(available)
    chosen = set()
    for w in words:
        if w in KINDS:
            chosen.update(s for s in available if s[0] == w)
        else:
            hit = [s for s in available if pa.site_key(s) == w]
            if not hit:
                raise ValueError(f"sites: {w!r} is neither a block kind ({', '.join(KINDS)}) nor a transformer site "
                                 f"of this UNet ({', '.join(pa.site_key(s) for s in available)})")
            chosen.update(hit)
    return [s for s in available if s in chosen]


def _fits(weights: pa.AdapterWeights, sites: dict, path: str) -> None:
    """Every site of ``weights`` exists in the UNet with the same widths (as the nodes' check_fits)."""
    for stage, attn in (("dca", "attn2"), ("rpa", "attn1")):
        for site, (c, d) in weights.widths(stage).items():
            tb = sites.get(site)
            have = None if tb is None else (getattr(tb, attn).to_q.in_features, getattr(tb, attn).to_q.out_features)
            if have != (c, d):
                found = "absent" if have is None else f"{have[0]} channels / {have[1]} wide"
                raise ValueError(f"init file {path} does not fit the base model: {stage}.{pa.site_key(site)} is {c} "
                                 f"channels / {d} wide in the file, {found} in the UNet")


# -- the weights ---------------------------------------------------------------------------------------------------
def initial_weights(sites: dict, stage: str, chosen, generator: torch.Generator) -> dict:
    """{site: {part: tensor}} of an untrained stage (see the module docstring): a no-op on the model."""
    out = {}
    for s in chosen:
        tb = sites[s]
        if stage == "dca":
            to_q = tb.attn2.to_q.weight.detach().float().cpu().clone()              # [D, C]
            d = to_q.shape[0]
            out[s] = {"to_q": to_q, "to_k": (torch.rand(d, d, generator=generator) * 2 - 1) / math.sqrt(d),
                      "to_v": torch.zeros(d, d)}
        else:
            out[s] = {"to_k": tb.attn1.to_k.weight.detach().float().cpu().clone(),
                      "to_v": tb.attn1.to_v.weight.detach().float().cpu().clone(), "gate": torch.zeros(1)}
    return out


class TrainableAdapter(nn.Module):
    """The weights of the stage being trained: its projections in a PatchAdapterNet (as Load Patch-Adapter builds
    it, module names ``<stage>.<site>.to_*``) and, for the RPA, the gates g as parameters (``gate.<site>``)."""

    def __init__(self, weights: pa.AdapterWeights, device):
        super().__init__()
        self.net = PatchAdapterNet(weights, dtype=torch.float32, device=device, operations=comfy.ops.manual_cast)
        self.net.load_state_dict({f"{stage}.{site_name(s)}.{p}.weight": t for stage in ("dca", "rpa")
                                  for s, w in getattr(weights, stage).items() for p, t in w.items() if p != "gate"})
        self.gate = nn.ParameterDict({site_name(s): nn.Parameter(w["gate"].detach().float().reshape(1).to(device))
                                      for s, w in weights.rpa.items()})
        self.dca_sites, self.rpa_sites = list(weights.dca), list(weights.rpa)

    def weights(self) -> pa.AdapterWeights:
        def get(stage, s, p):
            return getattr(self.net, stage)[site_name(s)][p].weight.detach().float().cpu()
        return pa.AdapterWeights(
            dca={s: {p: get("dca", s, p) for p in pa.DCA_PARTS} for s in self.dca_sites},
            rpa={s: {"to_k": get("rpa", s, "to_k"), "to_v": get("rpa", s, "to_v"),
                     "gate": self.gate[site_name(s)].detach().float().cpu()} for s in self.rpa_sites})


class LiveGates(Mapping):
    """site -> tanh(g) as a 0-dim tensor of the current gate parameter (the nodes' PatchAdapter.gates, live)."""

    def __init__(self, gates: nn.ParameterDict, sites):
        self.gates, self.sites = gates, list(sites)

    def __getitem__(self, site):
        return torch.tanh(self.gates[site_name(site)]).reshape(())

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)


def read_adapter(path: str) -> pa.AdapterWeights:
    return pa.parse_patch_adapter(tensor_dict(load_weights(path), path), path, safetensors_metadata(path))


def place_patch(hole: torch.Tensor, size: int, g: torch.Generator, align: int = 8) -> pa.PatchBox:
    """A size x size box on the ``align`` grid inside hole ([H, W], 1 = inpaint) holding a random hole pixel at a
    uniformly random place (any place when the hole is empty)."""
    H, W = hole.shape
    points = hole.nonzero()

    def start(p, extent):
        lo = math.ceil(max(0, p - size + 1) / align) * align
        hi = min(p, extent - size) // align * align
        return lo + align * int(torch.randint(0, (hi - lo) // align + 1, (), generator=g))

    if points.numel():
        y, x = (int(v) for v in points[int(torch.randint(0, points.shape[0], (), generator=g))])
    else:
        y, x = int(torch.randint(0, H, (), generator=g)), int(torch.randint(0, W, (), generator=g))
    return pa.PatchBox(start(y, H), start(x, W), size, size)


# -- the trainer ---------------------------------------------------------------------------------------------------
class PatchAdapterTrainer:
    def __init__(self, cfg: PatchAdapterConfig, model=None, clip=None, vae=None, device=None):
        check_config(cfg)
        self.cfg, self.stage = cfg, cfg.stage
        if not cfg.data and not cfg.shards:
            raise ValueError("set data (a folder) or shards")
        self.dataset = ImageFolder(cfg.data, self.image_size) if not cfg.shards else None  # fails before any loading
        self.engine = Engine(cfg, cfg.batch_size, cfg.output)
        if model is None:
            model, clip, vae = load_base(cfg.base)
        self.base = base_of(model)
        if clip is None or vae is None:
            raise ValueError(f"{cfg.base} must carry the text encoder and the VAE as well as the UNet")
        if patch_refine.latent_factor(vae) != 8:
            raise ValueError(f"the VAE's latent factor is {patch_refine.latent_factor(vae)}; SD1.5/SDXL VAEs have 8")
        self.model, self.clip, self.vae = model, clip, vae
        self.device = device or self.engine.device
        unet = model.model.diffusion_model
        sites = transformer_sites(unet)

        # the stage being trained, from ``init`` or fresh; the other stage carried as it is
        init = read_adapter(cfg.init) if cfg.init else pa.AdapterWeights()
        if cfg.init:
            _fits(init, sites, cfg.init)
        other = "rpa" if self.stage == "dca" else "dca"
        self.carried = getattr(init, other)
        init_g = torch.Generator().manual_seed(cfg.seed + 3)
        own = getattr(init, self.stage) or initial_weights(sites, self.stage, select_sites(list(sites), cfg.sites),
                                                           init_g)
        if getattr(init, self.stage):
            log.info("%s: starting from the %s weights of %s (%d sites)", self.stage, self.stage, cfg.init, len(own))
        if not own:
            raise ValueError(f"sites {cfg.sites!r} selects no transformer block of this UNet")
        weights = pa.AdapterWeights(**{self.stage: own}, base=self.base)
        self.module = TrainableAdapter(weights, self.device)
        self.adapter = PatchAdapter(wrap_patcher(self.module.net, self.device, self.device), weights.widths("dca"),
                                    weights.widths("rpa"), LiveGates(self.module.gate, weights.rpa), self.base,
                                    "training")
        if self.stage == "dca":
            self.patch = DualContextPatch(self.adapter, torch.zeros(1, 1, 8, 8), 1.0, (math.inf, 0.0))
        else:
            self.patch = ReferencePatch(torch.zeros(1, 4, 1, 1), self.adapter, 0, (0,))
        self.patched = self.patch.attach(model)
        load_on_device(self.patched)              # the UNet on the device, with the adapter as an additional model
        unet.requires_grad_(False)
        self.module.requires_grad_(True).train()
        decay = [p for n, p in self.module.named_parameters() if not n.startswith("gate.")]
        gates = [p for n, p in self.module.named_parameters() if n.startswith("gate.")]
        self.optimizer = adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                                {"params": gates, "weight_decay": 0.0}], cfg, lr=cfg.lr)
        self.engine.prepare(self.module, self.optimizer, lambda b, step: self.losses(b))
        self.sampling = model.get_model_object("model_sampling")
        self.latent_format = model.get_model_object("latent_format")
        self.mask_rng = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.encode_text = PromptEncoder(clip)
        self._plain_sample = None

    # -- inputs --
    @property
    def image_size(self) -> int:
        return self.cfg.resolution if self.stage == "dca" else self.cfg.full_resolution

    @property
    def unet_size(self) -> int:
        return self.cfg.resolution if self.stage == "dca" else self.cfg.patch_size

    def y_for(self, pooled):
        return sdxl_y(self.model.model, pooled, self.unet_size) if self.base == "sdxl" else None

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the raw VAE latent (float32, CPU)."""
        with torch.no_grad():
            return self.vae.encode(pixels.movedim(1, -1)).float().cpu()

    def _hole(self, seg, size: int, g: torch.Generator) -> torch.Tensor:
        """A training hole [size, size] (1 = inpaint) from a segmentation mask (any size) or a random ellipse."""
        if seg is not None and seg.shape[-1] != size:
            seg = F.interpolate(seg[None, None], size=(size, size), mode="nearest")[0, 0]
        if seg is None or seg.max() <= 0.5:
            seg = masks.random_blob(size, size, g)
        return masks.painter_mask(seg, g)[0]

    def batch(self, data: ImageFolder, indices, generator: torch.Generator | None = None) -> dict:
        return self.batch_items([Item(data.items[i].stem, *data[i], 0) for i in indices], generator)

    def batch_items(self, items: list[Item], generator: torch.Generator | None = None) -> dict:
        """dca: pixels [B, 3, R, R], hole [B, 1, R, R]; rpa: the patches (pixels, hole [B, ., P, P]), their boxes in the
        full image, the full image's reference [B, 3, R, R]. Both: context, pooled."""
        g = generator or self.mask_rng
        cfg = self.cfg
        items = [(it.pixels, it.mask, it.prompt) for it in items]
        context, pooled = self.encode_text.batch([prompt for _, _, prompt in items])
        out = dict(context=context, pooled=pooled)
        if self.stage == "dca":
            out["pixels"] = torch.stack([p for p, _, _ in items])
            out["hole"] = torch.stack([self._hole(seg, cfg.resolution, g) for _, seg, _ in items])[:, None]
            return out
        S, R = cfg.full_resolution, cfg.resolution
        pixels, holes, refs, boxes = [], [], [], []
        for p, seg, _ in items:
            hole = F.interpolate(self._hole(seg, R, g)[None, None], size=(S, S), mode="nearest")[0]     # [1, S, S]
            box = place_patch(hole[0], cfg.patch_size, g)
            ys, xs = box.slices()
            pixels.append(p[:, ys, xs])
            holes.append(hole[:, ys, xs])
            refs.append(F.interpolate(p[None], size=(R, R), mode="bicubic", antialias=R < S,
                                      align_corners=False)[0].clamp(0, 1))
            boxes.append(box)
        out.update(pixels=torch.stack(pixels), hole=torch.stack(holes), reference=torch.stack(refs), boxes=boxes)
        if len(items) == 1:            # for the sample image: the whole picture and its hole
            out["full"], out["full_hole"] = items[0][0][None], hole[None]
        return out

    def reference_latents(self, b) -> torch.Tensor:
        """[B, 4, h, w]: the reference latent under each patch, exactly as High-Res Patch Refine cuts it."""
        ref = self.vae_encode(b["reference"])
        S = self.cfg.full_resolution
        return torch.cat([_reference_tokens_latent(ref[i:i + 1], [box], S, S, 8, self.cfg.reference_context)
                          for i, box in enumerate(b["boxes"])])

    # -- one step --
    def losses(self, b, patcher=None) -> dict:
        """The diffusion loss of ``b`` through ``patcher`` (default: the base model with this run's patch)."""
        patcher = patcher or self.patched
        pixels, hole = b["pixels"], b["hole"]
        grey = (pixels - 0.5) * (1 - hole.round()) + 0.5           # InpaintModelConditioning's masked pixels
        raw, raw_masked = self.vae_encode(torch.cat([pixels, grey])).chunk(2)       # one VAE call
        B = raw.shape[0]
        if self.stage == "dca":
            self.patch.hole = hole                       # training only: this run's own patch
            t = torch.randint(0, self.cfg.max_timestep, (B,))
        else:
            self.patch.latent = self.reference_latents(b)
            self.patch.seed = int(torch.randint(0, 2 ** 31, ()))      # the reference's noise for this step
            t = torch.randint(0, self.cfg.max_timestep, (1,)).expand(B)
        load_on_device(patcher)               # again, in case loading the VAE unloaded the UNet and the adapter
        x0 = self.latent_format.process_in(raw).to(self.device)
        sigma = self.sampling.sigmas[t].to(self.device, torch.float32)
        eps = torch.randn_like(x0)
        x = self.sampling.noise_scaling(sigma.view(B, 1, 1, 1), eps, x0)
        base = self.model.model
        concat = base.concat_cond(concat_latent_image=raw_masked, concat_mask=hole, noise=x, device=self.device)
        # what ComfyUI's sampler hands the model: the patcher's options plus its wrappers (ReferencePatch runs in
        # the APPLY_MODEL wrapper, the DCA's step gate in the DIFFUSION_MODEL one)
        to = sampler_options(patcher, sigma)
        extra = {}
        y = self.y_for(b["pooled"])
        if y is not None:
            extra["y"] = y.to(self.device)
        blocks = checkpointed_blocks(unet_blocks(base.diffusion_model)) if self.cfg.gradient_checkpointing \
            else nullcontext()
        with blocks:
            denoised = base.apply_model(x, sigma, c_concat=concat, c_crossattn=b["context"].to(self.device),
                                        control=None, transformer_options=to, **extra)
        predicted = (x - denoised.float()) / sigma.view(B, 1, 1, 1)      # epsilon: denoised = x - sigma * eps
        return dict(loss=F.mse_loss(predicted, eps))

    def train_step(self, b) -> dict | None:
        """One micro-batch through the engine -> the losses once an optimiser step is complete."""
        return self.engine.step(b, 0)

    # -- files --
    def weights(self) -> pa.AdapterWeights:
        own = self.module.weights()
        return pa.AdapterWeights(**{self.stage: getattr(own, self.stage),
                                    ("rpa" if self.stage == "dca" else "dca"): self.carried}, base=self.base)

    def save(self, path: Path) -> Path:
        sd, meta = pa.adapter_state_dict(self.weights())
        sd = {k: v.float().contiguous() for k, v in sd.items()}
        return write_atomic(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))

    def _conds(self, b, **extra):
        return sample_conds(self.encode_text, b["context"], b["pooled"],
                            self.unet_size if self.base == "sdxl" else None, **extra)

    @torch.no_grad()
    def sample(self, b, path: Path, steps: int) -> None:
        with evaluating(self.module):
            save_image(path, self._sample_dca(b, steps) if self.stage == "dca" else self._sample_rpa(b, steps))

    def _sample_dca(self, b, steps):
        """The first item inpainted by the base model alone and with the DCA (KSampler on InpaintModelConditioning)."""
        pixels, hole = b["pixels"][:1], b["hole"][:1]
        grey = (pixels - 0.5) * (1 - hole.round()) + 0.5
        raw, raw_masked = self.vae_encode(torch.cat([pixels, grey])).chunk(2)
        positive, negative = self._conds(b, concat_latent_image=raw_masked, concat_mask=hole)
        noise = torch.randn(raw.shape, generator=torch.Generator().manual_seed(self.cfg.seed))
        self.patch.hole = hole

        def run(model):
            out = comfy.sample.sample(model, noise, steps, self.cfg.sample_cfg, "euler", "normal", positive, negative,
                                      raw, noise_mask=hole, seed=self.cfg.seed, disable_pbar=True)
            return self.vae.decode(out)[0].movedim(-1, 0)
        if self._plain_sample is None:                  # the base model does not change during training
            self._plain_sample = run(self.model)
        shown = pixels[0] * (1 - hole[0]) + 0.5 * hole[0]
        return [shown, self._plain_sample, run(self.patched)]

    def _sample_rpa(self, b, steps):
        """The first item's patch refined by High-Res Patch Refine's own routine: weight-free and with the RPA."""
        cfg = self.cfg
        S, P = cfg.full_resolution, cfg.patch_size
        box = b["boxes"][0]
        image, reference = b["full"], b["reference"][:1]
        ys, xs = box.slices()
        hole = torch.zeros_like(b["full_hole"])               # the hole inside this patch: the one patch sampled
        hole[..., ys, xs] = b["full_hole"][..., ys, xs]
        plan = pa.PatchPlan(S, S, P, P, (box,), (box,))
        settings = patch_refine.RefineSettings(cfg.seed, steps, cfg.sample_cfg, "euler", "normal", cfg.sample_denoise,
                                               P, 0, 1, cfg.reference_context)
        positive, negative = self._conds(b)

        def run(adapter):
            out = image[0].permute(1, 2, 0).clone()
            job = patch_refine.RefineJob(self.model, self.vae, positive, negative, settings, _attach_reference(adapter),
                                         1, None)
            patch_refine.refine_picture(job, image, hole, reference, out, plan)
            return out[ys, xs].permute(2, 0, 1)
        if self._plain_sample is None:
            self._plain_sample = run(None)
        shown = b["pixels"][0] * (1 - b["hole"][0]) + 0.5 * b["hole"][0]
        under = pa.sample_reference(reference, box, S, S)[0].clamp(0, 1)
        return [shown, under, self._plain_sample, run(self.adapter)]

    # -- the loop --
    def _check_output(self, out: Path) -> None:
        """A folder holding another stage's run is refused (its state.pt cannot continue this one)."""
        done = out / OUTPUT_NAME
        if (out / "state.pt").exists() and done.exists():
            with safe_open(str(done), framework="pt") as f:
                if not any(k.startswith(self.stage + ".") for k in f.keys()):
                    raise ValueError(f"{out} holds a run of the other stage; give each stage its own output folder "
                                     f"(stage 2 reads stage 1's file through init)")

    def run(self) -> Path:
        cfg = self.cfg
        self._check_output(Path(cfg.output))
        stream = make_stream(cfg, cfg.data, self.image_size, self.engine)
        fixed_items = first_items(cfg, cfg.data, self.image_size, cfg.validation_size)
        fixed = self.batch_items(fixed_items[:1], torch.Generator().manual_seed(cfg.seed + 2))   # same after a resume
        validation = self.batch_items(fixed_items, torch.Generator().manual_seed(cfg.seed + 4))
        return Loop.of_run(cfg, f"Patch-Adapter {self.stage}", self.engine, stream, make_batch=self.batch_items,
                           loss_names=["loss"], generators={"mask": self.mask_rng},
                           save_fn=lambda: self.save(Path(cfg.output) / OUTPUT_NAME),
                           sample_fn=lambda path: self.sample(fixed, path, cfg.sample_steps),
                           validate_fn=lambda: validation_losses(self.losses, validation, cfg.seed)).run()


def main(argv=None):
    train_main(PatchAdapterConfig, PatchAdapterTrainer, "patch_adapter", argv)
