"""PainterNet training (paper §3): a branch initialised from the base UNet (cross-attention kept), its zero
connections and attention control points starting at zero, trained with the diffusion loss + beta * ATAL on
images with PainterNet's mask mix (box 25 %, irregular 50 %, segmentation 25 %) and local prompts; the base UNet,
text encoder and VAE stay frozen.

The branch runs inside the base UNet through the very patch the Apply Inpaint Branch node uses
(``nodes.branch.BranchPatch``), so what is trained is exactly what is sampled. The output is a PainterNet
safetensors file (``docs/painternet_format.md``) that Load Inpaint Branch reads as is.

Choices where the paper is silent (the README's Train section links here): learning rate 1e-5 and AdamW
(BrushNet's), timesteps uniform over the 1000 training steps, epsilon target (epsilon-prediction SD1.5 / SDXL base
models only), mask channel "1=keep" (BrushNet's polarity), images without a mask file get a random ellipse as their
"segmentation", prompts longer than one 77-token chunk are cut to it, ATAL's maps averaged over heads with the mask
area-resized to each layer (``models/atal.py``). Gradient checkpointing recomputes the branch's blocks; the frozen
UNet's activations are kept.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import comfy.ops
import comfy.sample
import comfy.sd

from ..models import branch_layouts, masks
from ..models.atal import actual_token_mask, atal_loss
from ..models.sites import latent_grid
from ..nodes.branch import BranchPatch, InpaintBranch
from ..nodes.branch_unet import ATTENTION_PROBE, GRADIENT_CHECKPOINT, BranchNet
from ..nodes.common import wrap_patcher
from .common import (Engine, ImageFolder, Item, Loop, PromptEncoder, TrainOptions, adamw, evaluating, load_base,
                     load_on_device, nearest, require_epsilon, sample_conds, sampler_options, save_image, sdxl_y,
                     train_main, validation_losses, write_atomic)
from .data import first_items, make_stream

log = logging.getLogger("consistent_inpaint.training.painternet")

CLIP_START, CLIP_END = 49406, 49407      # CLIP BPE start / end-of-text ids (SD1.5 and SDXL text encoders)


@dataclass
class PainterNetConfig(TrainOptions):
    """Train a PainterNet branch (writes a file Load Inpaint Branch reads)."""
    base: str                      # ComfyUI checkpoint (UNet + CLIP + VAE), SD1.5 or SDXL, epsilon prediction
    output: str                    # folder for painternet.safetensors, state.pt, loss.csv, logs/, samples/
    data: str = ""                 # folder: name.png [+ name.mask.png] [+ name.txt] (or set shards)
    resolution: int = 512          # training images are squared to this
    batch_size: int = 1            # global batch (paper: 4 GPUs; BrushNet's recipe)
    steps: int = 1000              # optimiser steps
    lr: float = 1e-5               # AdamW learning rate (BrushNet's)
    beta: float = 1e-5             # ATAL weight (paper: 1e-5)
    mask: str = branch_layouts.MASK_KEEP   # the branch's mask channel polarity (keep: 1 = known pixels)
    sample_steps: int = 20         # sampler steps of the sample images


def _base_of(model) -> str:
    cfg = model.model.model_config.unet_config
    base = {768: "sd15", 2048: "sdxl"}.get(cfg.get("context_dim"))
    if base is None or cfg.get("in_channels") != 4:
        raise ValueError("PainterNet trains on a text-to-image SD1.5 or SDXL UNet (4-channel input, text width 768 or "
                         f"2048); this one has in_channels={cfg.get('in_channels')}, "
                         f"context_dim={cfg.get('context_dim')}")
    require_epsilon(model, "PainterNet training")
    return base


class PainterNetTrainer:
    def __init__(self, cfg: PainterNetConfig, model=None, clip=None, vae=None, device=None):
        self.cfg = cfg
        if not cfg.data and not cfg.shards:
            raise SystemExit("missing required option(s): data (a folder) or shards (flags or the --config file)")
        if cfg.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8; got {cfg.resolution}")
        if model is None:
            model, clip, vae = load_base(cfg.base)
        if clip is None or vae is None:
            raise ValueError(f"{cfg.base} must carry the text encoder and the VAE as well as the UNet")
        self.model, self.clip, self.vae = model, clip, vae
        self.base = _base_of(model)
        self.engine = Engine(cfg, cfg.batch_size, cfg.output)
        self.device = device or self.engine.device
        unet = model.model.diffusion_model
        sd = branch_layouts.painternet_from_unet(unet.state_dict(), model.model.model_config.unet_config)
        self.metadata = branch_layouts.painternet_metadata(self.base, cfg.mask)
        self.spec = branch_layouts.detect(sd, self.metadata, "the initial branch")
        net = BranchNet(self.spec, dtype=torch.float32, device=self.device, operations=comfy.ops.manual_cast)
        net.load_state_dict(branch_layouts.convert(sd, self.spec, "the initial branch"))
        self.net = net
        branch = InpaintBranch(wrap_patcher(net, self.device, self.device), self.spec)
        placeholder = torch.zeros(1, 5, 1, 1)
        self.patch = BranchPatch(branch, placeholder, 1.0, (math.inf, 0.0), 4, None,
                                 branch_layouts.injection_sites(self.spec))
        self.patched = self.patch.attach(model)
        load_on_device(self.patched)                # the UNet on the device, with the branch's object patches
        unet.requires_grad_(False)
        net.requires_grad_(True).train()
        self.sampling = model.get_model_object("model_sampling")
        self.latent_format = model.get_model_object("latent_format")
        self.optimizer = adamw(net.parameters(), cfg, lr=cfg.lr)
        self.engine.prepare(net, self.optimizer, lambda b, step: self.losses(b))
        self.mask_rng = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.encode_text = PromptEncoder(clip)

    # -- inputs --
    def y_for(self, pooled: torch.Tensor) -> torch.Tensor | None:
        return sdxl_y(self.model.model, pooled, self.cfg.resolution) if self.base == "sdxl" else None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> latent at the model's scale."""
        with torch.no_grad():
            return self.latent_format.process_in(self.vae.encode(pixels.movedim(1, -1)).float()).to(self.device)

    def branch_cond(self, masked: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """What Apply Inpaint Branch builds from the latent of the masked image (hole pixels set to 0):
        [masked-image latent, mask channel]."""
        m = nearest(hole, masked.shape[-2:]).to(self.device)
        return torch.cat([masked, 1 - m if self.cfg.mask == branch_layouts.MASK_KEEP else m], dim=1)

    def batch(self, data: ImageFolder, indices, generator: torch.Generator | None = None):
        """The batch of the folder's images ``indices``, their sample seeds drawn from ``generator``."""
        g = generator or self.mask_rng
        return self.batch_items([Item(data.items[i].stem, *data[i], int(torch.randint(2 ** 62, (), generator=g)))
                                 for i in indices])

    def batch_items(self, items: list[Item]):
        """Each sample's mask, timestep and noise come from its own seed: the same whatever the process count."""
        pixels = torch.stack([it.pixels for it in items])
        holes = []
        for it in items:
            g, seg = it.generator(1), it.mask
            if seg is None or seg.max() <= 0.5:
                seg = masks.random_blob(it.pixels.shape[1], it.pixels.shape[2], g)
            holes.append(masks.painter_mask(seg, g)[0])
        prompts = [it.prompt for it in items]
        context, pooled = self.encode_text.batch(prompts)
        tokens = torch.cat([actual_token_mask(self.encode_text(p).ids, CLIP_START, CLIP_END) for p in prompts])
        return dict(pixels=pixels, hole=torch.stack(holes)[:, None], context=context, pooled=pooled, tokens=tokens,
                    seeds=[it.seed for it in items], keys=[it.key for it in items])

    # -- one step --
    def losses(self, b) -> dict:
        pixels, hole = b["pixels"], b["hole"]
        latent, masked = self.encode_image(torch.cat([pixels, pixels * (1 - hole)])).chunk(2)   # one VAE call
        self.patch.cond = self.branch_cond(masked, hole)     # training only: this run's own patch
        load_on_device(self.patched)           # again, in case loading the VAE unloaded the UNet and its patches
        B = latent.shape[0]
        gens = [torch.Generator().manual_seed(s + 2) for s in b["seeds"]]            # the samples' own draws
        t = torch.cat([torch.randint(0, len(self.sampling.sigmas), (1,), generator=g) for g in gens])
        sigma = self.sampling.sigmas[t].to(self.device, torch.float32)
        eps = torch.cat([torch.randn(latent.shape[1:], generator=g)[None] for g in gens]).to(latent)
        x = self.sampling.noise_scaling(sigma.view(B, 1, 1, 1), eps, latent)
        probe = {}
        # what ComfyUI's sampler hands the UNet: the patched model's options plus its wrappers (the branch runs in
        # its DIFFUSION_MODEL wrapper)
        to = sampler_options(self.patched, sigma)
        to[ATTENTION_PROBE] = probe
        if self.cfg.gradient_checkpointing:
            to[GRADIENT_CHECKPOINT] = True
        dtype = self.model.model.manual_cast_dtype or self.model.model.get_dtype()   # as BaseModel._apply_model
        context = b["context"].to(self.device, dtype)
        y = self.y_for(b["pooled"])
        y = None if y is None else y.to(self.device, dtype)
        out = self.model.model.diffusion_model(self.sampling.calculate_input(sigma, x).to(dtype),
                                               self.sampling.timestep(sigma).float(), context=context, y=y,
                                               transformer_options=to)
        diff = F.mse_loss(out.float(), eps)
        h, w = latent.shape[-2:]
        grids = {site: latent_grid(a.shape[1], h, w) for site, a in probe.items()}
        atal = atal_loss(probe, grids, b["hole"].to(self.device), b["tokens"].to(self.device))
        return dict(loss=diff + self.cfg.beta * atal, diffusion=diff, atal=atal)

    def train_step(self, b) -> dict | None:
        """One micro-batch through the engine -> the losses once an optimiser step is complete."""
        return self.engine.step(b, 0)

    # -- files --
    def save(self, path: Path) -> Path:
        sd = {k: v.detach().float().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return write_atomic(path, lambda tmp: save_file(sd, str(tmp), metadata=self.metadata))

    @torch.no_grad()
    def sample(self, b, path: Path, steps: int) -> None:
        """The first item of ``b`` inpainted with the current branch (euler, cfg 7.5) beside its masked input."""
        with evaluating(self.net):
            pixels, hole = b["pixels"][:1], b["hole"][:1]
            self.patch.cond = self.branch_cond(self.encode_image(pixels * (1 - hole)), hole)
            positive, negative = sample_conds(self.encode_text, b["context"], b["pooled"],
                                              self.cfg.resolution if self.base == "sdxl" else None)
            r = self.cfg.resolution // 8
            latent = torch.zeros(1, 4, r, r)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(self.cfg.seed))
            out = comfy.sample.sample(self.patched, noise, steps, 7.5, "euler", "normal", positive, negative,
                                      latent, seed=self.cfg.seed, disable_pbar=True)
            image = self.vae.decode(out.to(torch.float32))[0].movedim(-1, 0)   # sample() returns the VAE latent
            shown = b["pixels"][0] * (1 - b["hole"][0]) + 0.5 * b["hole"][0]
            save_image(path, [shown, image])

    # -- the loop --
    def run(self) -> Path:
        cfg = self.cfg
        stream = make_stream(cfg, cfg.data, cfg.resolution, self.engine)
        fixed = self.batch_items(first_items(cfg, cfg.data, cfg.resolution, cfg.validation_size))
        return Loop.of_run(cfg, "PainterNet", self.engine, stream, make_batch=self.batch_items,
                           loss_names=["loss", "diffusion", "atal"], generators={"mask": self.mask_rng},
                           save_fn=lambda: self.save(Path(cfg.output) / "painternet.safetensors"),
                           sample_fn=lambda path: self.sample(fixed, path, cfg.sample_steps),
                           validate_fn=lambda: validation_losses(self.losses, fixed, cfg.seed)).run()


def main(argv=None):
    train_main(PainterNetConfig, PainterNetTrainer, "painternet", argv)
