"""LAR-Gen training (paper §4.4 and §6.2), two stages, through the nodes' own patches.

    python train.py largen --stage 1 --config largen.toml      # main UNet + subject projections, beta = 1
    python train.py largen --stage 2 --config largen.toml      # RefineNet, main model frozen, beta = 0.3

Stage 1 ("Locate" + "Assign"): the SDXL 9-channel inpainting UNet (input ``[x_t, mask, masked latent]``) gets LAR-Gen's
decoupled subject attention, ``Attn(q, K_text, V_text) + beta * Attn(q, c_i W_k', c_i W_v')`` in every cross-attention,
with the subject tokens ``c_i`` from the IP-Adapter-Plus resampler over CLIP ViT-H. The paper freezes CLIP and the
resampler and trains "the main U-Net augmented by the locate and assign mechanism" (stage 2 then freezes it), so by
default the whole main UNet and the new ``W_k'`` / ``W_v'`` train (``train = "subject"``: the projections only). The
output is a LAR-Gen checkpoint in the released layout (``model.diffusion_model.*`` with ``attn2.to_k_ip`` /
``attn2.to_v_ip``, the frozen resampler under ``conditioner.embedders.0.image_proj_model.*``) that Load LAR-Gen reads
as is with ``image_proj = from checkpoint``.

Stage 2 ("Refine"): the stage-1 model is frozen and runs with beta = 0.3; the RefineNet (a UNet copy with a 4-channel
input that denoises the subject latent noised to the same sigma; its decoder self-attention inputs are appended to the
main UNet's decoder self-attention keys/values) trains only the parameters of its cross-attention layers (``attn2``:
to_q, to_k, to_v, to_out) and the detail encoder's MLP (the patch projector over CLIP's last hidden state; the paper:
"only the parameters of MLP are updated"). The output is a RefineNet file (``ref_*`` + ``patch_projector.*``) that
Load LAR-Gen RefineNet reads as is.

Both stages run the networks inside the UNet through the very patch objects the nodes attach
(``nodes.largen.SubjectPatch`` / ``RefinePatch``) and call ComfyUI's ``BaseModel.apply_model`` with the patched
model's transformer options and wrappers, so what is trained is what is sampled.

Data: ``training.common.ImageFolder`` (``name.png`` + ``name.mask.png`` (white = the object, required) +
``name.txt`` (the object's local caption)). As in the paper's data engine, the image prompt is the masked object cut
from the same image, built as the nodes build it (``zoom.subject_crops`` then ``zoom.clip_square`` for CLIP and, in
stage 2, ``zoom.refine_square`` for the RefineNet's subject latent), the inpainting mask is the object mask,
and the model input is the zoom-in crop around it (``zoom.crop_to_mask``, what Crop To Mask does).

Choices where the paper is silent (the README's Train section links here):
* stage 1 initialises ``W_k'`` / ``W_v'`` from each layer's text ``W_k`` / ``W_v`` (IP-Adapter's recipe) unless the
  base is already a LAR-Gen checkpoint (then training continues from its projections);
* stage 2 initialises the RefineNet as a copy of the stage-1 main UNet (input conv: its first 4 channels, the noisy
  latent's) and the patch projector with PyTorch's default Linear init (seeded), unless ``refinenet`` names a file
  to continue from;
* prompt dropout for classifier-free guidance: text and image dropped independently per sample (``drop_text`` /
  ``drop_image``, 0.05 each); a dropped text is the empty prompt's encoding (its pooled vector too), a dropped image
  is the node's unconditional image (a zero image after CLIP normalisation, through CLIP and the resampler). In stage 2
  the RefineNet still sees the subject on image-dropped rows, as on the unconditional rows when sampling;
* epsilon target, timesteps uniform over the 1000 training steps, plain MSE over the whole latent (the paper's
  Eq. 11); AdamW; lr 1e-5 (paper); images squared to ``load_size`` (default 2 x resolution) before the zoom-in crop;
  prompts cut to one 77-token chunk; sample images with euler, CFG ``sample_cfg`` and the RePaint-style blend (masked
  crop, subject, the inpainting);
* the written file in float32 (``save_dtype`` float16 / bfloat16 halve it);
* gradient checkpointing recomputes every res block and transformer of the UNet and the RefineNet.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import comfy.sample
import comfy.sd
import comfy.utils

from ..models import largen, zoom
from ..models.weights import load_weights, tensor_dict
from ..nodes.common import wrap_patcher
from ..nodes.largen import (SDXL_CONTEXT, SDXL_POOLED, RefineNetModel, RefinePatch, SubjectPatch, encode_subject,
                            encode_zero_image, largen_from_parts, load_refinenet, refinenet_from_parts, subject_latent)
from ..nodes.largen import clip_width_error
from .common import (Engine, ImageFolder, Item, Loop, MASK_SUFFIX, PromptEncoder, TrainOptions, adamw,
                     checkpointed_blocks, load_on_device, require_epsilon, sample_conds, sampler_options, save_image,
                     sdxl_y, train_main, unet_blocks, validation_losses, write_atomic)
from .data import first_items, make_stream

log = logging.getLogger("consistent_inpaint.training.largen")

PAPER_BETA = {1: 1.0, 2: 0.3}
TRAIN_CHOICES = ("unet", "subject")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUT_NAMES = {1: "largen_stage1.safetensors", 2: "refinenet.safetensors"}


@dataclass
class LARGenConfig(TrainOptions):
    """Train LAR-Gen: stage 1 (main UNet + subject projections, beta 1) or stage 2 (RefineNet, beta 0.3)."""
    stage: int                     # 1 or 2
    clip_vision: str               # CLIP ViT-H/14 image encoder file (ComfyUI clip_vision)
    output: str                    # folder for the .safetensors, state.pt, loss.csv, logs/, samples/
    data: str = ""                 # folder: name.png + name.mask.png (white = object) [+ name.txt] (or set shards)
    base: str = ""                 # SDXL inpainting checkpoint: stage 1's UNet (or a LAR-Gen file to continue); text
    #                                encoders and VAE of both stages unless `clip` / `vae` are given
    largen: str = ""               # stage 2: the frozen main model (stage 1's output or largen_ckpt_s22k.pth)
    image_proj: str = ""           # ip-adapter-plus_sdxl_vit-h.bin ("" = the resampler inside base / largen)
    refinenet: str = ""            # stage 2: a RefineNet file to continue from ("" = a copy of the main UNet)
    clip: str = ""                 # SDXL text encoders instead of base's: "clip_l.safetensors,clip_g.safetensors"
    vae: str = ""                  # SDXL VAE instead of base's
    train: str = "unet"            # stage 1: "unet" (main UNet + W_k', W_v', the paper) or "subject" (W_k', W_v' only)
    resolution: int = 1024         # side of the zoom-in crop the UNet sees
    load_size: int = 0             # images squared to this side before the zoom-in crop (0: 2 x resolution)
    zoom: bool = True              # crop around the mask (bounding box x context_factor), as the paper
    context_factor: float = 1.3    # the zoom-in crop's side over the mask's bounding box
    subject_resolution: int = 0    # stage 2: side of the subject image the RefineNet denoises (0: resolution)
    batch_size: int = 1            # global batch (paper: 128)
    steps: int = 20000             # optimiser steps (paper: 20K per stage)
    lr: float = 1e-5               # AdamW learning rate (paper)
    beta: float = -1.0             # image-attention weight; -1: the paper's (1.0 stage 1, 0.3 stage 2)
    drop_text: float = 0.05        # probability a sample's text prompt is dropped (empty prompt)
    drop_image: float = 0.05       # probability its image prompt is dropped (zero image), independently
    sample_steps: int = 20         # sampler steps of the sample images
    sample_cfg: float = 7.5        # CFG of the sample images
    save_dtype: str = "float32"    # float32 | float16 | bfloat16 for the written file


def check_config(cfg: LARGenConfig) -> None:
    problems = []
    if cfg.stage not in (1, 2):
        problems.append(f"stage must be 1 or 2; got {cfg.stage}")
    if cfg.resolution % 8 or cfg.resolution < 64:
        problems.append(f"resolution must be a multiple of 8 (and at least 64); got {cfg.resolution}")
    if cfg.subject_resolution % 8:
        problems.append(f"subject_resolution must be a multiple of 8 (0 = resolution); got {cfg.subject_resolution}")
    if cfg.train not in TRAIN_CHOICES:
        problems.append(f"train must be one of {', '.join(TRAIN_CHOICES)}; got {cfg.train!r}")
    for name in ("drop_text", "drop_image"):
        if not 0 <= getattr(cfg, name) <= 1:
            problems.append(f"{name} is a probability in [0, 1]; got {getattr(cfg, name)}")
    if cfg.beta < 0 and cfg.beta != -1:
        problems.append(f"beta must be >= 0 (or -1 for the paper's value); got {cfg.beta}")
    if cfg.save_dtype not in SAVE_DTYPES:
        problems.append(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}; got {cfg.save_dtype!r}")
    if cfg.context_factor < 1:
        problems.append(f"context_factor must be >= 1; got {cfg.context_factor}")
    if cfg.batch_size < 1 or cfg.steps < 1:
        problems.append("batch_size and steps must be >= 1")
    if cfg.stage == 1 and not cfg.base:
        problems.append("stage 1 trains from base = an SDXL inpainting checkpoint (9-channel UNet); none given")
    if cfg.stage == 2 and not cfg.largen:
        problems.append("stage 2 trains the RefineNet on a trained main model: set largen = the stage-1 output "
                        "(largen_stage1.safetensors) or largen_ckpt_s22k.pth")
    if not cfg.base and not (cfg.clip and cfg.vae):
        problems.append("the SDXL text encoders and VAE come from base, or from clip and vae; give base, or both")
    if problems:
        raise ValueError("LAR-Gen training: " + "; ".join(problems))


# -- loading (module functions: one place per outside file) -------------------------------------------------
def load_encoders(cfg: LARGenConfig):
    """-> (CLIP, VAE): SDXL's text encoders and VAE, from ``clip`` / ``vae`` or else the ``base`` checkpoint."""
    clip = vae = None
    if cfg.clip:
        clip = comfy.sd.load_clip([p.strip() for p in cfg.clip.split(",")])
    if cfg.vae:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(cfg.vae, safe_load=True))
    if clip is None or vae is None:
        out = comfy.sd.load_checkpoint_guess_config(cfg.base, output_vae=vae is None, output_clip=clip is None,
                                                    output_model=False)
        clip = clip or out[1]
        vae = vae or out[2]
    if clip is None:
        raise ValueError(f"{cfg.base} carries no text encoders ComfyUI recognises; give clip = "
                         "clip_l.safetensors,clip_g.safetensors")
    return clip, vae


def load_clip_vision(path: str):
    import comfy.clip_vision
    cv = comfy.clip_vision.load(path)
    if cv is None:
        raise ValueError(f"{path} is not a CLIP vision model ComfyUI recognises (LAR-Gen needs CLIP ViT-H/14)")
    return cv


def initial_main_model(cfg: LARGenConfig) -> tuple[largen.LARGenCheckpoint, str]:
    """Stage 1's starting point: ``base``'s UNet with subject projections copied from its text projections, or, when
    ``base`` is already a LAR-Gen checkpoint, its UNet and projections. Stage 2: ``largen`` as released."""
    path = cfg.base if cfg.stage == 1 else cfg.largen
    sd = tensor_dict(load_weights(path), path)
    if cfg.stage == 2 or any(k.endswith("attn2.to_k_ip.weight") for k in sd):
        return largen.split_checkpoint(sd, path), path
    unet = {k: v for k, v in largen.unet_part(sd).items() if not k.startswith(largen.REF_PREFIX)}
    del sd
    if "input_blocks.0.0.weight" not in unet:
        raise ValueError(f"{path} holds no SDXL UNet (no input_blocks.0.0.weight); base must be an SDXL inpainting "
                         "checkpoint (e.g. sd_xl_base_1.0_inpainting_0.1.safetensors)")
    return largen.LARGenCheckpoint(unet=unet, ip=largen.projections_from_text(unet)), path


def initial_refinenet(unet: nn.Module, clip_width: int, seed: int) -> RefineNetModel:
    """A RefineNet copied from the main UNet (no ``out``; input conv = its first 4 channels) with a fresh projector
    ``Linear(clip_width -> 2048)`` (PyTorch's default init, seeded)."""
    sd = {k: v.detach().float().clone() for k, v in unet.state_dict().items() if not k.startswith("out.")}
    sd["input_blocks.0.0.weight"] = sd["input_blocks.0.0.weight"][:, :4].clone()
    g = torch.Generator().manual_seed(seed)
    weight = torch.empty(SDXL_CONTEXT, clip_width)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g)
    bound = 1 / math.sqrt(clip_width)
    bias = torch.empty(SDXL_CONTEXT).uniform_(-bound, bound, generator=g)
    return refinenet_from_parts(sd, {"weight": weight, "bias": bias}, "the initial RefineNet", "float32")


class Sample(NamedTuple):
    """One training image, prepared as the nodes prepare it."""
    crop: torch.Tensor                  # [3, R, R], the zoom-in crop around the mask
    hole: torch.Tensor                  # [1, R, R], 1 = inpaint
    square: torch.Tensor                # [1, 3, s, s], the subject square CLIP sees
    prompt: str
    refine_in: Optional[torch.Tensor]   # [1, 3, r, r], the RefineNet's subject image (stage 2; None in stage 1)


class LARGenTrainer:
    def __init__(self, cfg: LARGenConfig, clip=None, vae=None, clip_vision=None):
        check_config(cfg)
        self.cfg = cfg
        self.stage = cfg.stage
        self.beta = PAPER_BETA[cfg.stage] if cfg.beta == -1 else cfg.beta
        self.resolution = cfg.resolution
        self.subject_resolution = cfg.subject_resolution or cfg.resolution
        if not cfg.data and not cfg.shards:
            raise ValueError("set data (a folder) or shards")
        self.engine = Engine(cfg, cfg.batch_size, cfg.output)
        self.device = self.engine.device
        self._encoders(clip, vae, clip_vision)
        self._main_model()
        self.refine = None
        named = self._stage1_tensors() if self.stage == 1 else self._refinenet_tensors()
        for p in named.values():
            p.requires_grad_(True)
        self.named = named
        # what state.pt keeps: the trainable tensors themselves (loading copies into them)
        self.trainable = nn.ParameterDict({n.replace(".", "__"): p for n, p in named.items()})
        self.optimizer = adamw(list(named.values()), cfg, lr=cfg.lr)
        if self.engine.sharded and self.stage == 1:
            raise ValueError("FSDP shards a module the trainer runs whole; stage 1 trains tensors spread over the "
                             "main UNet and the adapter: launch it with DDP (--multi_gpu), FSDP is for stage 2")
        # what the engine wraps (DDP / FSDP): stage 2 the RefineNet (a whole UNet copy: FSDP shards it), stage 1 the
        # trained tensors themselves
        self.engine.prepare(self.refine.net if self.stage == 2 else self.trainable, self.optimizer,
                            lambda b, step: self.losses(b))
        self.drop_rng = torch.Generator().manual_seed(cfg.seed + 2)
        torch.manual_seed(cfg.seed)
        load_on_device(self.model)

    def _encoders(self, clip, vae, clip_vision) -> None:
        """The SDXL text encoders, VAE and CLIP vision model (given, or read from the configured files), checked."""
        if clip is None or vae is None:
            lc, lv = load_encoders(self.cfg)
            clip, vae = clip or lc, vae or lv
        self.clip, self.vae = clip, vae
        self.clip_vision = clip_vision or load_clip_vision(self.cfg.clip_vision)
        self.encode_text = PromptEncoder(clip)
        empty, empty_pooled, _ = self.encode_text("")
        if empty.shape[-1] != SDXL_CONTEXT or empty_pooled is None or empty_pooled.shape[-1] != SDXL_POOLED:
            got = None if empty_pooled is None else empty_pooled.shape[-1]
            raise ValueError(f"the text encoders must be SDXL's (width {SDXL_CONTEXT}, pooled {SDXL_POOLED}); got "
                             f"width {empty.shape[-1]}, pooled {got}")
        if getattr(vae, "latent_channels", 4) != 4:
            raise ValueError(f"the VAE must be SDXL's (4 latent channels); this one has {vae.latent_channels}")

    def _main_model(self) -> None:
        """The frozen LAR-Gen main model (UNet + adapter) and the zero image's subject tokens."""
        parts, path = initial_main_model(self.cfg)
        if not self.cfg.image_proj and parts.resampler is None:
            raise ValueError(f"{path} carries no IP-Adapter-Plus resampler: set image_proj = "
                             "ip-adapter-plus_sdxl_vit-h.bin")
        self.model, adapter = largen_from_parts(parts, path, self.cfg.image_proj or None, "float32")
        del parts
        self.base_model = self.model.model
        require_epsilon(self.model, "LAR-Gen training")
        self.sampling = self.model.get_model_object("model_sampling")
        self.latent_format = self.model.get_model_object("latent_format")
        self.unet = self.base_model.diffusion_model
        self.adapter = adapter.patcher.model.to(self.device)
        self.unet.requires_grad_(False)
        self.adapter.requires_grad_(False)
        with torch.no_grad():
            zero = encode_zero_image(self.clip_vision)
            self.clip_width = zero.shape[-1]
            if self.clip_width != adapter.embedding_dim:
                raise ValueError(clip_width_error(self.clip_width, adapter.embedding_dim))
            self.zero_tokens = self.adapter.resampler(zero.to(self.device, self.adapter.dtype)).float().cpu()

    def _stage1_tensors(self) -> dict:
        """Stage 1 trains the subject projections W_k', W_v' (and, with train = unet, the whole main UNet)."""
        named = {f"adapter.{n}": p for n, p in self.adapter.named_parameters()
                 if n.startswith(("to_k_ip", "to_v_ip"))}
        if self.cfg.train == "unet":
            named.update({f"unet.{n}": p for n, p in self.unet.named_parameters()})
        return named

    def _refinenet_tensors(self) -> dict:
        """Stage 2 builds (or reads) the RefineNet and trains its cross-attention and subject projector."""
        cfg = self.cfg
        refine = load_refinenet(cfg.refinenet, "float32") if cfg.refinenet else \
            initial_refinenet(self.unet, self.clip_width, cfg.seed)
        net = refine.net.to(self.device)
        self.refine = RefineNetModel(wrap_patcher(net, self.device, self.device))
        if net.projector.in_features != self.clip_width:
            raise ValueError(clip_width_error(self.clip_width, net.projector.in_features))
        return {f"refinenet.{n}": p for n, p in net.named_parameters() if ".attn2." in n or n.startswith("projector.")}

    # -- inputs --
    def dataset(self) -> ImageFolder:
        data = ImageFolder(self.cfg.data, self.cfg.load_size or 2 * self.resolution)
        missing = [p.name for p in data.items if not p.with_name(p.stem + MASK_SUFFIX).exists()]
        if missing:
            raise ValueError(f"LAR-Gen trains on (image, object mask, local prompt) triples; {len(missing)} image(s) "
                             f"in {self.cfg.data} have no name{MASK_SUFFIX} beside them: {', '.join(missing[:5])}")
        return data

    def item(self, data: ImageFolder, i: int) -> "Sample":
        return self.item_of(Item(data.items[i].name, *data[i], 0))

    def item_of(self, it: Item) -> "Sample":
        pixels, mask, prompt = it.pixels, it.mask, it.prompt
        if mask is None or not (mask > 0.5).any():
            raise ValueError(f"{it.key}: its mask is empty; it must mark the object (white)")
        img, m = pixels[None], (mask > 0.5).float()[None, None]
        subject = zoom.subject_crops(img, m)[0]                  # the nodes' (and the authors') subject crop
        square = zoom.clip_square(subject).clamp(0, 1)
        refine_in = zoom.refine_square(subject, self.subject_resolution) if self.stage == 2 else None
        R = self.resolution
        if self.cfg.zoom:
            crop, hole, _ = zoom.crop_to_mask(img, m, self.cfg.context_factor, R)
        else:
            crop = F.interpolate(img, size=(R, R), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            hole = (F.interpolate(m, size=(R, R), mode="bilinear", antialias=True, align_corners=False) > 0.5).float()
        return Sample(crop[0], hole[0], square, prompt, refine_in)

    def dropout(self, n: int, generator: torch.Generator):
        """-> (text dropped [n], image dropped [n]): independent Bernoulli draws, one generator."""
        drop_text = torch.rand(n, generator=generator) < self.cfg.drop_text
        drop_image = torch.rand(n, generator=generator) < self.cfg.drop_image
        return drop_text, drop_image

    @torch.no_grad()
    def batch(self, data: ImageFolder, indices, generator: torch.Generator | None = None, dropout: bool = True):
        return self.batch_items([Item(data.items[i].name, *data[i], 0) for i in indices], generator, dropout)

    @torch.no_grad()
    def batch_items(self, items: list[Item], generator: torch.Generator | None = None, dropout: bool = True):
        """Everything a step needs that does not train: crops, masks, latents, prompt encodings (dropped per sample),
        subject tokens (the zero image's where dropped), the RefineNet's subject latents and CLIP features."""
        items = [self.item_of(it) for it in items]
        n = len(items)
        if dropout:
            drop_text, drop_image = self.dropout(n, generator or self.drop_rng)
        else:
            drop_text = drop_image = torch.zeros(n, dtype=torch.bool)
        pixels = torch.stack([it.crop for it in items])
        hole = torch.stack([it.hole for it in items])
        masked = pixels * (1 - hole) + 0.5 * hole            # as InpaintModelConditioning: hole grey
        raw, masked_raw = self.vae.encode(torch.cat([pixels, masked]).movedim(1, -1)).float().chunk(2)
        context, pooled = self.encode_text.batch(["" if d else it.prompt for it, d in zip(items, drop_text.tolist())])
        squares = [it.square for it in items]
        pens, lasts = zip(*(encode_subject(self.clip_vision, s) for s in squares))    # sizes differ: one by one
        tokens = self.adapter.resampler(torch.cat(pens).to(self.device, self.adapter.dtype)).float().cpu()
        tokens[drop_image] = self.zero_tokens                  # the node's unconditional image where dropped
        b = dict(pixels=pixels, hole=hole, raw=raw, masked_raw=masked_raw, context=context, pooled=pooled,
                 y=sdxl_y(self.base_model, pooled, self.resolution), tokens=tokens, drop_text=drop_text,
                 drop_image=drop_image, squares=squares)
        if self.stage == 2:
            b["clip_last"] = torch.cat(lasts).float()
            refine_in = [it.refine_in for it in items]          # as Apply LAR-Gen RefineNet builds its latent
            b["subject_latent"] = subject_latent(self.vae, self.latent_format, refine_in, self.subject_resolution).cpu()
        return b

    # -- the model with this batch's patches --
    def patched(self, b, seed: int):
        """The MODEL the nodes would hand to a sampler for this batch: the subject attention (its keys/values from the
        trainable projections) and, in stage 2, the RefineNet (its context from the trainable projector)."""
        tokens = b["tokens"].to(self.device, self.adapter.dtype)
        kv = self.adapter.project(tokens)
        kv_zero = self.adapter.project(self.zero_tokens.to(self.device, self.adapter.dtype))
        model = SubjectPatch(kv, kv_zero, self.beta, (math.inf, 0.0), None).attach(self.model)
        if self.stage == 2:
            net = self.refine.net
            context = net.projector(b["clip_last"].to(self.device, net.dtype))
            null = self.encode_text("").pooled
            model = RefinePatch(self.refine, b["subject_latent"], context, null, (math.inf, 0.0), seed).attach(model)
        return model

    def checkpointed_modules(self):
        """What gradient checkpointing recomputes: every res block and transformer of the UNet (and RefineNet)."""
        return unet_blocks(self.unet, *([self.refine.net] if self.refine is not None else []))

    # -- one step --
    def losses(self, b) -> dict:
        dev = self.device
        latent = self.latent_format.process_in(b["raw"]).to(dev)
        B = latent.shape[0]
        t = torch.randint(0, len(self.sampling.sigmas), (B,))
        sigma = self.sampling.sigmas[t].to(dev, torch.float32)
        eps = torch.randn_like(latent)
        refine_seed = int(torch.randint(0, 2 ** 31 - 1, ()))           # the subject latent's own noise
        x = self.sampling.noise_scaling(sigma.view(B, 1, 1, 1), eps, latent)
        concat = self.base_model.concat_cond(noise=x, device=dev, concat_latent_image=b["masked_raw"].to(dev),
                                             concat_mask=b["hole"].to(dev))
        model = self.patched(b, refine_seed)
        load_on_device(self.model)           # again, in case encoding the batch unloaded the UNet
        # what ComfyUI's sampler hands the model: the patched options plus its wrappers, every row a "cond" row
        to = sampler_options(model, sigma)
        checkpointing = checkpointed_blocks(self.checkpointed_modules()) if self.cfg.gradient_checkpointing \
            else nullcontext()
        with checkpointing:
            denoised = self.base_model.apply_model(x, sigma, c_concat=concat, c_crossattn=b["context"].to(dev),
                                                   transformer_options=to, y=b["y"].to(dev))
        pred = (x - denoised.float()) / sigma.view(B, 1, 1, 1)          # EPS: denoised = x - sigma * eps
        err = (pred - eps) ** 2
        m = concat[:, :1].float()                                          # the latent mask the UNet saw
        hole = (err * m).sum() / (m.sum() * err.shape[1]).clamp(min=1)
        return dict(loss=err.mean(), hole=hole)

    def train_step(self, b) -> dict | None:
        """One micro-batch through the engine -> the losses once an optimiser step is complete."""
        return self.engine.step(b, 0)

    # -- files --
    def state_dict_to_save(self) -> dict:
        if self.stage == 1:
            a = self.adapter
            ip = {s: (a.to_k_ip[largen.site_name(s)].weight, a.to_v_ip[largen.site_name(s)].weight) for s in a.sites}
            return largen.join_checkpoint(self.unet.state_dict(), ip, self.adapter.resampler.state_dict())
        sd = self.refine.net.state_dict()
        projector = {k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")}
        return largen.refinenet_file({k: v for k, v in sd.items() if not k.startswith("projector.")}, projector)

    def save(self, path: Path) -> Path:
        dtype = SAVE_DTYPES[self.cfg.save_dtype]
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict_to_save().items()}
        meta = {"consistent_inpaint": "largen_stage1" if self.stage == 1 else "largen_refinenet",
                "beta": str(self.beta)}
        return write_atomic(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))

    @torch.no_grad()
    def sample(self, b, path: Path, steps: int) -> None:
        """The first item of ``b`` inpainted by the current model (euler, CFG, the known region blended back every
        step) beside its masked crop and its subject."""
        b1 = {k: v[:1] for k, v in b.items()}
        model = self.patched(b1, self.cfg.seed)
        r = self.resolution
        positive, negative = sample_conds(self.encode_text, b1["context"], b1["pooled"], r,
                                          concat_latent_image=b1["masked_raw"], concat_mask=b1["hole"])
        noise = torch.randn(b1["raw"].shape, generator=torch.Generator().manual_seed(self.cfg.seed))
        out = comfy.sample.sample(model, noise, steps, self.cfg.sample_cfg, "euler", "normal", positive, negative,
                                  b1["raw"], noise_mask=b1["hole"], seed=self.cfg.seed, disable_pbar=True)
        image = self.vae.decode(out.float())[0].movedim(-1, 0)
        hole = b1["hole"][0]
        subject = F.interpolate(b1["squares"][0], size=(r, r), mode="bilinear", antialias=True)[0]
        save_image(path, [b1["pixels"][0] * (1 - hole) + 0.5 * hole, subject, image])

    # -- the loop --
    def check_items(self, items: list[Item]) -> None:
        missing = [it.key for it in items if it.mask is None]
        if missing:
            raise ValueError(f"LAR-Gen trains on (image, object mask, local prompt) triples; {', '.join(missing[:5])} "
                             f"have no mask (name{MASK_SUFFIX} beside a folder image, mask.png / segmentation in a "
                             "shard)")

    def run(self) -> Path:
        cfg = self.cfg
        if cfg.data and not cfg.shards:
            self.dataset()                                     # every image has its mask
        size = cfg.load_size or 2 * self.resolution
        stream = make_stream(cfg, cfg.data, size, self.engine)
        fixed_items = first_items(cfg, cfg.data, size, cfg.validation_size)
        fixed = self.batch_items(fixed_items[:1], dropout=False)     # the sample images' input, the same after a resume
        validation = self.batch_items(fixed_items, dropout=False)

        def make_batch(items):
            self.check_items(items)
            return self.batch_items(items)

        return Loop.of_run(cfg, f"LAR-Gen stage {self.stage}", self.engine, stream, make_batch=make_batch,
                           loss_names=["loss", "hole"], generators={"drop": self.drop_rng},
                           save_fn=lambda: self.save(Path(cfg.output) / OUTPUT_NAMES[self.stage]),
                           sample_fn=lambda path: self.sample(fixed, path, cfg.sample_steps),
                           validate_fn=lambda: validation_losses(self.losses, validation, cfg.seed)).run()


def main(argv=None):
    train_main(LARGenConfig, LARGenTrainer, "largen", argv)
