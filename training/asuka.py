"""ASUKA training (paper §3, §4 "Implementation details"): the three parts that have no public SD weights.

* ``asuka_mae`` — fine-tunes the MAE prior on inpainting masks: the mask basis of §3.1 (object shapes 50 %, each
  joined with an irregular mask half of the time; irregular Co-Mod/LaMa-style masks 40 %; rectangles and their
  complements 10 %; hole ratio in [0.1, 0.75]), each hole enlarged to 75 % of the tokens by random whole patches,
  pixel MSE on the masked tokens (MAE's loss, in ImageNet-normalised units) at the MAE's 256². Writes the MAE in the
  layout Load ASUKA Prior reads (``mae``).
* ``asuka_alignment`` — trains the alignment module (Linear(512 -> text width), 4 self-attention blocks, LayerNorm;
  from scratch, AdamW, lr 5e-2 as the paper states) with the standard diffusion loss of a frozen SD-inpainting UNet
  whose text conditioning is replaced by the aligned prior of a frozen MAE; with probability p the prior of the
  masked image is replaced by the MAE's reconstructed prior (the same image with nothing masked), p decaying
  linearly 1.0 -> 0.1 over the first 2K steps and then held. Writes the ``alignment`` file of Load ASUKA Prior.
* ``asuka_decoder`` — the harmonizing decoder: a KL-VAE decoder (initialised from the checkpoint's VAE decoder; the
  condition encoder over [masked image, mask] is new) trained to decode to the original image from a corrupted
  latent — colour augmentation (ColorJitter brightness 0.15, contrast 0.2, saturation 0.1, hue 0.03 on every image
  before encoding) and, on half of the images, latent augmentation (the frozen SD-inpainting UNet's one-step estimate
  of z0 from t in [500, 1000), conditioned on the clean latent and an all-zero mask) — conditioned on the unaugmented
  known pixels. AdamW lr 8e-5 with cosine decay. Writes the file Load Harmonizing Decoder reads.

Choices where the paper is silent (the README's Train section links here):
- MAE: AdamW lr 1e-4, weight decay 0.05 (MAE's fine-tuning optimiser); everything trains but the fixed sin-cos
  position embeddings (the mask token and the blend scalar ``alpha`` too).
- Alignment: AdamW weight decay 0.01, timesteps uniform over the 1000 training steps, epsilon target, no condition
  dropout (the paper names none, so sample with cfg 1); the substitution is drawn per image.
- Decoder: L1 loss in [-1, 1] over the whole image. SD's KL-VAE recipe also has LPIPS (needs VGG weights the pack
  cannot download) and a GAN term that starts at step 50 001 in SD's config, i.e. never within the paper's 50K steps;
  neither is used. Latent augmentation is computed online (the paper precomputes it) with the empty prompt.
- Data for all three: a folder of images (``training/common.ImageFolder``); ``name.mask.png`` files, when present,
  are the object shapes of the mask basis (a random one per draw, placed at random), else random ellipses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import comfy.sample
import comfy.sd

from ..models import asuka, asuka_alignment, harmonizing_decoder, masks
from ..models.imaging import color_jitter
from .common import (Engine, ImageFolder, Loop, MASK_SUFFIX, TrainOptions, adamw, checkpointed, cosine_lr,
                     evaluating, load_base, load_on_device, require_epsilon, save_image, train_main,
                     validation_losses, write_atomic)
from .data import first_items, make_stream, square

log = logging.getLogger("consistent_inpaint.training.asuka")


# -- data ------------------------------------------------------------------------------------------------------
class MaskedImages:
    """Images of a folder with ASUKA basis masks; the folder's ``name.mask.png`` files are the object shapes."""

    def __init__(self, folder: str, size: int, settings: masks.AsukaMaskSettings = masks.AsukaMaskSettings()):
        self.images = ImageFolder(folder, size) if folder else None          # "" with shards
        self.size, self.settings = size, settings
        self.shapes = [p.with_name(p.stem + MASK_SUFFIX) for p in (self.images.items if self.images else [])
                       if p.with_name(p.stem + MASK_SUFFIX).exists()]

    def shape(self, g: torch.Generator) -> torch.Tensor | None:
        if not self.shapes:
            return None
        path = self.shapes[int(torch.randint(len(self.shapes), (), generator=g))]
        m = square(Image.open(path).convert("L"), self.size, Image.NEAREST)
        return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)

    def batch(self, indices, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixels [B, 3, S, S] in [0, 1], holes [B, 1, S, S] (1 = hole)."""
        pixels = torch.stack([self.images[i][0] for i in indices])
        holes = [masks.asuka_mask(self.size, self.size, g, self.shape(g), self.settings)[0] for _ in indices]
        return pixels, torch.stack(holes)[:, None]

    def draw(self, batch_size: int, g: torch.Generator) -> list[int]:
        return torch.randint(0, len(self.images), (batch_size,), generator=g).tolist()

    def batch_items(self, items, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream items -> (pixels, holes); an item's own mask is its object shape, else one of the folder's."""
        pixels = torch.stack([it.pixels for it in items])
        holes = [masks.asuka_mask(self.size, self.size, g, it.mask if it.mask is not None and it.mask.max() > 0.5
                                  else self.shape(g), self.settings)[0] for it in items]
        return pixels, torch.stack(holes)[:, None]


class _Trainer:
    """What the three trainers share: the engine, seeds, the fixed sample and validation batches and the loop."""
    name = "ASUKA"
    losses = ("loss",)
    output_name = ""

    def setup(self, cfg, data: MaskedImages, module: torch.nn.Module, lr: float, weight_decay: float, through=()):
        """``through``: the frozen MODELs the gradient passes back through (loaded float32; the engine autocasts)."""
        self.cfg, self.data, self.module = cfg, data, module
        self.base_lr = lr
        self.optimizer = adamw([p for p in module.parameters() if p.requires_grad], cfg, lr=lr,
                               weight_decay=weight_decay)
        self.engine.prepare(module, self.optimizer, self.losses_for, lambda step: self.lr_at(step) / self.base_lr)
        self.mask_rng = torch.Generator().manual_seed(cfg.seed)
        self.aug_rng = torch.Generator().manual_seed(cfg.seed + 3)
        torch.manual_seed(cfg.seed)
        fixed = first_items(cfg, cfg.data, data.size, cfg.validation_size)       # the same after a resume
        self.fixed = data.batch_items(fixed[:1], torch.Generator().manual_seed(cfg.seed + 2))
        self.validation = data.batch_items(fixed, torch.Generator().manual_seed(cfg.seed + 4))

    def make_engine(self, cfg, device=None):
        """The engine of this run (-> the device to train on: the engine's, unless one is given)."""
        if not cfg.data and not cfg.shards:
            raise SystemExit("missing required option(s): data (a folder) or shards (flags or the --config file)")
        self.engine = Engine(cfg, cfg.batch_size, cfg.output)
        return device or self.engine.device

    def lr_at(self, step: int) -> float:
        return self.base_lr

    def validate(self) -> dict:
        """The fixed validation set's loss: its masks drawn once, timesteps, noise and augmentations from fixed seeds
        (the run's own generators put back after)."""
        saved = {g: g.get_state() for g in (self.mask_rng, self.aug_rng)}
        try:
            self.mask_rng.manual_seed(self.cfg.seed + 5)
            self.aug_rng.manual_seed(self.cfg.seed + 6)
            return validation_losses(lambda b: self.losses_for(b, self.cfg.steps), self.validation, self.cfg.seed)
        finally:
            for g, st in saved.items():
                g.set_state(st)

    def train_step(self, batch, step: int = 0) -> dict | None:
        """One micro-batch through the engine (its autocast, loss scaling, accumulation; the schedule follows
        optimiser steps) -> the losses once an optimiser step is complete."""
        return self.engine.step(batch, step)

    def save(self) -> Path:
        path = Path(self.cfg.output) / self.output_name
        sd = {k: v.detach().float().cpu().contiguous() for k, v in self.module.state_dict().items()}
        meta = {"format": f"consistent_inpaint.{self.name}", "version": "1"}
        return write_atomic(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))

    def run(self) -> Path:
        cfg = self.cfg
        stream = make_stream(cfg, cfg.data, self.data.size, self.engine)
        return Loop.of_run(cfg, self.name, self.engine, stream,
                           make_batch=lambda items: self.data.batch_items(items, self.mask_rng),
                           loss_names=list(self.losses), generators={"mask": self.mask_rng, "augment": self.aug_rng},
                           save_fn=self.save, sample_fn=self.sample, validate_fn=self.validate).run()


def _load_checkpoint(path: str, model=None, clip=None, vae=None):
    if model is None and vae is None:
        model, clip, vae = load_base(path)
    if vae is None:
        raise ValueError(f"{path} must carry a VAE")
    return model, clip, vae


def _inpaint_unet(model, what: str) -> None:
    """ASUKA's SD parts sit on a frozen epsilon-prediction SD-inpainting UNet (9 input channels, text tokens only)."""
    cfg = model.model.model_config.unet_config
    if cfg.get("in_channels") != 9 or cfg.get("adm_in_channels") or cfg.get("num_classes"):
        raise ValueError(f"{what} needs an SD-inpainting checkpoint (9-channel UNet conditioned on text tokens only, "
                         f"e.g. sd-v1-5-inpainting); this one has in_channels={cfg.get('in_channels')}"
                         + (", and a pooled/class input (SDXL?)" if cfg.get("adm_in_channels") else ""))
    require_epsilon(model, what)


def _masked_pixels(pixels: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """What InpaintModelConditioning encodes: hole pixels (mask > 0.5) set to grey."""
    m = (hole > 0.5).float()
    return pixels * (1 - m) + 0.5 * m


class _InpaintUNet:
    """The frozen SD-inpainting UNet called the way ComfyUI's sampler calls it (its own ``concat_cond``)."""

    def __init__(self, model, vae, device):
        self.model, self.vae, self.device = model, vae, device
        self.sampling = model.get_model_object("model_sampling")
        self.latent_format = model.get_model_object("latent_format")
        model.model.diffusion_model.requires_grad_(False)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the VAE latent (ComfyUI's LATENT space, unscaled)."""
        with torch.no_grad():
            return self.vae.encode(pixels.movedim(1, -1)).float().to(self.device)

    def noised(self, latent_raw: torch.Tensor, t: torch.Tensor):
        """-> (x at sigma_t in the model's space, sigma, eps)."""
        sigma = self.sampling.sigmas[t].to(self.device, torch.float32)
        eps = torch.randn_like(latent_raw)
        x = self.sampling.noise_scaling(sigma.view(-1, 1, 1, 1), eps,
                                        self.latent_format.process_in(latent_raw))
        return x, sigma, eps

    def eps(self, x, sigma, hole, masked_raw, context, checkpoint: bool = False) -> torch.Tensor:
        load_on_device(self.model)
        concat = self.model.model.concat_cond(noise=x, concat_mask=hole.to(self.device),
                                              concat_latent_image=masked_raw, device=self.device)
        xc = torch.cat([self.sampling.calculate_input(sigma, x), concat.to(x.dtype)], dim=1)
        t = self.sampling.timestep(sigma).float()
        to = {"cond_or_uncond": [0], "sigmas": sigma}
        unet = self.model.model.diffusion_model
        dtype = self.model.model.manual_cast_dtype or self.model.model.get_dtype()   # as BaseModel._apply_model

        def run(xc, context):
            return unet(xc.to(dtype), t, context=context.to(dtype), transformer_options=dict(to)).float()

        return checkpointed(run, xc, context) if checkpoint else run(xc, context)


# -- MAE -------------------------------------------------------------------------------------------------------
@dataclass
class MAETrainConfig(TrainOptions):
    """Fine-tune ASUKA's MAE prior on inpainting masks (writes a file Load ASUKA Prior reads as `mae`)."""
    mae: str = ""                  # the MAE to start from, e.g. mae_300.pth (models/asuka)
    data: str = ""                 # folder: name.png [+ name.mask.png object shapes]
    output: str = ""               # folder for mae.safetensors, state.pt, loss.csv, samples/
    batch_size: int = 8            # paper: 1024
    steps: int = 10000
    lr: float = 1e-4
    weight_decay: float = 0.05
    token_ratio: float = 0.75      # holes enlarged to this share of the tokens by random whole patches


class MAETrainer(_Trainer):
    name, output_name = "asuka_mae", "mae.safetensors"
    losses = ("loss",)

    def __init__(self, cfg: MAETrainConfig, device=None):
        _require(cfg, ("mae", "output"))
        self.device = self.make_engine(cfg, device)
        mae = asuka.load_mae(cfg.mae, torch.float32).to(self.device)
        fixed = {"pos_embed", "decoder_pos_embed"}
        for name, p in mae.named_parameters():
            p.requires_grad_(name not in fixed)
        mae.checkpointing = cfg.gradient_checkpointing
        mae.train()
        if not 0 < cfg.token_ratio <= 1:
            raise ValueError(f"token_ratio must be in (0, 1]; got {cfg.token_ratio}")
        self.setup(cfg, MaskedImages(cfg.data, mae.config.img_size), mae, cfg.lr, cfg.weight_decay)

    def losses_for(self, batch, step):
        pixels, holes = batch
        p = self.module.config.patch_size
        holes = torch.stack([masks.fill_tokens(h[0], p, self.cfg.token_ratio, self.mask_rng) for h in holes])[:, None]
        pixels, holes = pixels.to(self.device), holes.to(self.device)
        pred, coverage = self.module.predict(pixels, holes)
        target = self.module.normalise(pixels)
        g = self.module.config.grid
        weight = (coverage > 0).float().view(-1, 1, g, g)
        weight = F.interpolate(weight, scale_factor=p, mode="nearest")
        loss = ((pred - target) ** 2 * weight).sum() / (weight.sum() * 3).clamp(min=1)
        return {"loss": loss}

    @torch.no_grad()
    def sample(self, path: Path) -> None:
        """The fixed image with its basis mask: masked input, the MAE reconstruction, the original."""
        with evaluating(self.module):
            pixels, hole = (t.to(self.device) for t in self.fixed)
            _, rec = self.module(pixels, hole)
            size = rec.shape[-2:]
            shown = F.interpolate(_masked_pixels(pixels, hole), size=size, mode="bilinear", align_corners=False)
            save_image(path, [shown[0], rec[0], F.interpolate(pixels, size=size, mode="bilinear",
                                                              align_corners=False)[0]])


# -- alignment -------------------------------------------------------------------------------------------------
@dataclass
class AlignmentTrainConfig(TrainOptions):
    """Train ASUKA's alignment module for an SD-inpainting UNet (writes Load ASUKA Prior's `alignment` file)."""
    base: str = ""                 # SD-inpainting checkpoint (UNet + VAE), e.g. sd-v1-5-inpainting.ckpt
    mae: str = ""                  # the (fine-tuned) MAE prior, frozen
    data: str = ""
    output: str = ""               # folder for alignment.safetensors, state.pt, loss.csv, samples/
    resolution: int = 512
    batch_size: int = 4
    steps: int = 10000
    lr: float = 5e-2               # paper
    weight_decay: float = 0.01
    depth: int = 4                 # self-attention blocks (paper: 4)
    substitution_start: float = 1.0   # p: the reconstructed prior replaces the masked one with probability p,
    substitution_end: float = 0.1     # decaying linearly from start to end over substitution_steps, then held
    substitution_steps: int = 2000
    sample_steps: int = 20


class AlignmentTrainer(_Trainer):
    name, output_name = "asuka_alignment", "alignment.safetensors"
    losses = ("loss", "substitution")

    def __init__(self, cfg: AlignmentTrainConfig, model=None, clip=None, vae=None, device=None):
        _require(cfg, ("base", "mae", "output"))
        if cfg.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8; got {cfg.resolution}")
        model, _, vae = _load_checkpoint(cfg.base, model, clip, vae)
        _inpaint_unet(model, "ASUKA alignment training")
        self.device = self.make_engine(cfg, device)
        self.unet = _InpaintUNet(model, vae, self.device)
        self.mae = asuka.load_mae(cfg.mae, torch.float32).to(self.device).eval().requires_grad_(False)
        width = model.model.model_config.unet_config["context_dim"]
        align_cfg = asuka_alignment.AlignmentConfig(in_dim=self.mae.config.decoder_embed_dim, dim=width,
                                                    heads=width // 64, depth=cfg.depth, mlp_hidden=4 * width)
        torch.manual_seed(cfg.seed)               # the new module's initial weights follow the run's seed
        align = asuka_alignment.AsukaAlignment(align_cfg, dtype=torch.float32, device=self.device)
        self.setup(cfg, MaskedImages(cfg.data, cfg.resolution), align.train(), cfg.lr, cfg.weight_decay, (model,))

    def substitution(self, step: int) -> float:
        c = self.cfg
        if step >= c.substitution_steps:
            return c.substitution_end
        return c.substitution_start + (c.substitution_end - c.substitution_start) * step / c.substitution_steps

    @torch.no_grad()
    def prior(self, pixels, hole, p: float) -> torch.Tensor:
        """The MAE prior of the masked images; with probability ``p`` per image the prior of the whole image."""
        prior = self.mae(pixels, hole, reconstruct=False)[0]
        swap = torch.rand(pixels.shape[0], generator=self.aug_rng) < p
        if swap.any():
            idx = swap.nonzero()[:, 0].to(self.device)
            whole = self.mae(pixels[idx], torch.zeros_like(hole[idx]), reconstruct=False)[0]
            prior = prior.index_copy(0, idx, whole)
        return prior

    def losses_for(self, batch, step):
        pixels, hole = (t.to(self.device) for t in batch)
        p = self.substitution(step)
        tokens = self.module(self.prior(pixels, hole, p))
        latent, masked = self.unet.encode(torch.cat([pixels, _masked_pixels(pixels, hole)])).chunk(2)
        t = torch.randint(0, len(self.unet.sampling.sigmas), (pixels.shape[0],))
        x, sigma, eps = self.unet.noised(latent, t)
        out = self.unet.eps(x, sigma, hole, masked, tokens, self.cfg.gradient_checkpointing)
        return {"loss": F.mse_loss(out, eps), "substitution": p}

    @torch.no_grad()
    def sample(self, path: Path) -> None:
        """The fixed image inpainted with the current alignment (euler, cfg 1) beside its masked input."""
        with evaluating(self.module):
            pixels, hole = (t.to(self.device) for t in self.fixed)
            tokens = self.module(self.mae(pixels, hole, reconstruct=False)[0]).float().cpu()
            masked = self.unet.encode(_masked_pixels(pixels, hole)).cpu()
            extra = {"concat_latent_image": masked, "concat_mask": hole.cpu()}
            positive, negative = [[tokens, dict(extra)]], [[torch.zeros_like(tokens), dict(extra)]]
            latent = torch.zeros_like(masked)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(self.cfg.seed))
            out = comfy.sample.sample(self.unet.model, noise, self.cfg.sample_steps, 1.0, "euler", "normal",
                                      positive, negative, latent, seed=self.cfg.seed, disable_pbar=True)
            image = self.unet.vae.decode(out.float())[0].movedim(-1, 0)
            save_image(path, [_masked_pixels(pixels, hole)[0], image])


# -- harmonizing decoder ---------------------------------------------------------------------------------------
@dataclass
class DecoderTrainConfig(TrainOptions):
    """Train ASUKA's harmonizing VAE decoder (writes a file Load Harmonizing Decoder reads)."""
    base: str = ""                 # checkpoint with the VAE (and, for latent augmentation, an SD-inpainting UNet)
    data: str = ""
    output: str = ""               # folder for harmonizing_decoder.safetensors, state.pt, loss.csv, samples/
    resolution: int = 512
    batch_size: int = 4            # paper: 40
    steps: int = 50000             # paper
    lr: float = 8e-5               # paper, cosine decay to 0 over `steps`
    weight_decay: float = 0.01
    brightness: float = 0.15       # ColorJitter (paper)
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.03
    latent_augmentation: float = 0.5   # share of images decoded from the UNet's one-step estimate (paper: 50 %)
    latent_t_min: int = 500            # t ~ U{min .. max-1} (paper: [500, 1000))
    latent_t_max: int = 1000


class DecoderTrainer(_Trainer):
    name, output_name = "asuka_decoder", "harmonizing_decoder.safetensors"
    losses = ("loss", "augmented")

    def __init__(self, cfg: DecoderTrainConfig, model=None, clip=None, vae=None, device=None):
        _require(cfg, ("base", "output"))
        if cfg.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8; got {cfg.resolution}")
        if not 0 <= cfg.latent_augmentation <= 1:
            raise ValueError(f"latent_augmentation is a probability; got {cfg.latent_augmentation}")
        if not 0 <= cfg.latent_t_min < cfg.latent_t_max <= 1000:
            raise ValueError(f"need 0 <= latent_t_min < latent_t_max <= 1000; got {cfg.latent_t_min}, "
                             f"{cfg.latent_t_max}")
        model, clip, vae = _load_checkpoint(cfg.base, model, clip, vae)
        self.device = self.make_engine(cfg, device)
        self.unet = None
        if cfg.latent_augmentation > 0:
            if model is None or clip is None:
                raise ValueError(f"latent augmentation needs the checkpoint's UNet and text encoder; {cfg.base} "
                                 "has none (set latent_augmentation = 0 to train with colour augmentation only)")
            _inpaint_unet(model, "latent augmentation (set latent_augmentation = 0 to train without it)")
            self.unet = _InpaintUNet(model, vae, self.device)
            with torch.no_grad():
                self.empty = clip.encode_from_tokens(clip.tokenize("")).float()
        self.vae = vae
        vae_sd = vae.first_stage_model.decoder.state_dict()
        dcfg = harmonizing_decoder.config_from_vae_decoder(vae_sd, cfg.base)
        torch.manual_seed(cfg.seed)               # the new condition encoder's initial weights follow the run's seed
        dec = harmonizing_decoder.HarmonizingDecoder(dcfg, dtype=torch.float32, device=self.device)
        missing, unexpected = dec.load_state_dict(vae_sd, strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise ValueError(f"the VAE decoder of {cfg.base} does not have the KL-VAE layout ASUKA's decoder extends: "
                             f"unexpected {unexpected[:5]}, missing {[k for k in missing if 'encoder.' not in k][:5]}")
        dec.checkpointing = cfg.gradient_checkpointing
        self.setup(cfg, MaskedImages(cfg.data, cfg.resolution), dec.train(), cfg.lr, cfg.weight_decay)

    def lr_at(self, step: int) -> float:
        return cosine_lr(self.base_lr, step, self.cfg.steps)

    @torch.no_grad()
    def one_step_estimate(self, latent_raw: torch.Tensor) -> torch.Tensor:
        """Eq. 1: z0 estimated in one step from z_t (t ~ U[t_min, t_max)) by the frozen inpainting UNet given the
        clean latent as the masked image and an all-zero mask; -> the estimate in the VAE's latent space."""
        c, B = self.cfg, latent_raw.shape[0]
        t = torch.randint(c.latent_t_min, c.latent_t_max, (B,), generator=self.aug_rng)
        x, sigma, _ = self.unet.noised(latent_raw, t)
        hole = torch.zeros(B, 1, latent_raw.shape[-2] * 8, latent_raw.shape[-1] * 8, device=self.device)
        eps = self.unet.eps(x, sigma, hole, latent_raw, self.empty.to(self.device).expand(B, -1, -1))
        z0 = self.unet.sampling.calculate_denoised(sigma, eps, x)
        return self.unet.latent_format.process_out(z0.float())

    @torch.no_grad()
    def corrupted_latent(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour-jittered images encoded; a ``latent_augmentation`` share replaced by the one-step estimate."""
        c = self.cfg
        jittered = color_jitter(pixels.cpu(), self.aug_rng, c.brightness, c.contrast, c.saturation, c.hue)
        z = self.vae.encode(jittered.movedim(1, -1)).float().to(self.device)
        aug = torch.rand(z.shape[0], generator=self.aug_rng) < c.latent_augmentation
        if aug.any():
            idx = aug.nonzero()[:, 0].to(self.device)
            z = z.index_copy(0, idx, self.one_step_estimate(z[idx]))
        return z, aug

    def losses_for(self, batch, step):
        pixels, hole = (t.to(self.device) for t in batch)
        z, aug = self.corrupted_latent(pixels)
        target = pixels * 2 - 1
        out = self.module(z, target, hole).float()
        return {"loss": F.l1_loss(out, target), "augmented": aug.float().mean()}

    @torch.no_grad()
    def sample(self, path: Path) -> None:
        """The fixed image: masked input, the plain VAE decode of its corrupted latent, the harmonizing decode of
        the same latent, the original."""
        with evaluating(self.module):
            pixels, hole = (t.to(self.device) for t in self.fixed)
            state = self.aug_rng.get_state()
            z, _ = self.corrupted_latent(pixels)
            self.aug_rng.set_state(state)                    # sampling must not shift the training draws
            plain = self.vae.decode(z)[0].movedim(-1, 0)
            ours = (self.module(z, pixels * 2 - 1, hole).float()[0] + 1) / 2
            save_image(path, [_masked_pixels(pixels, hole)[0], plain, ours, pixels[0]])


def _require(cfg, names) -> None:
    missing = [n for n in names if not getattr(cfg, n)]
    if missing:
        raise SystemExit(f"missing required option(s): {', '.join(missing)} (flags or the --config file)")


def main_mae(argv=None):
    train_main(MAETrainConfig, MAETrainer, "asuka_mae", argv)


def main_alignment(argv=None):
    train_main(AlignmentTrainConfig, AlignmentTrainer, "asuka_alignment", argv)


def main_decoder(argv=None):
    train_main(DecoderTrainConfig, DecoderTrainer, "asuka_decoder", argv)
