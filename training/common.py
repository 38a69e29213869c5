"""What every trainer shares: configuration (a TOML file and/or flags), the image folder, resumable state, the
progress bar and loss log, and mixed precision. Needs ComfyUI importable (``train.py`` arranges it)."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import tomllib
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("consistent_inpaint.training")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = ".mask.png"          # beside ``name.png``: ``name.mask.png``, white = the object / region
PROMPT_SUFFIX = ".txt"             # beside ``name.png``: ``name.txt``, the local prompt


# -- configuration ---------------------------------------------------------------------------------------------
def parse_config(cls, argv: list[str] | None = None, prog: str = "train.py"):
    """A ``cls`` dataclass from ``--config file.toml`` (keys = field names) overridden by ``--field value`` flags.
    Unknown keys in the file are errors (a typo must not silently train with a default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ap = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    ap.add_argument("--config", help="TOML file whose keys are the options below")
    for name, f in fields.items():
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}.get(
            str(f.type), str)
        if kind is bool:
            ap.add_argument(f"--{name}", type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=None)
        else:
            ap.add_argument(f"--{name}", type=kind, default=None)
    a = ap.parse_args(argv)
    values = {}
    if a.config:
        with open(a.config, "rb") as fh:
            values = tomllib.load(fh)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SystemExit(f"{a.config}: unknown option(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    values.update({k: v for k, v in vars(a).items() if k in fields and v is not None})
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SystemExit(f"missing required option(s): {', '.join(missing)} (flags or the --config file)")
    return cls(**values)


@dataclasses.dataclass(kw_only=True)
class TrainOptions:
    """The options every training method has (keyword-only, so a method's own required options may come first)."""
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 500        # 0: no sample images
    mixed_precision: str = "no"    # no | fp16 | bf16 (forward under autocast, trained weights float32)
    gradient_checkpointing: bool = False   # recompute activations in backward (what: see each method)

    def __post_init__(self):
        if self.log_every < 1 or self.save_every < 1 or self.sample_every < 0:
            raise ValueError(f"log_every and save_every must be >= 1 and sample_every >= 0 (0: no samples); got "
                             f"{self.log_every}, {self.save_every}, {self.sample_every}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16; got {self.mixed_precision!r}")


# -- data ------------------------------------------------------------------------------------------------------
def _square(img: Image.Image, size: int, resample) -> Image.Image:
    """Shorter side to ``size``, then the centre ``size`` x ``size``."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolder:
    """``folder/name.{png,jpg,jpeg,webp}`` with optional ``name.mask.png`` (segmentation / region mask, white =
    object) and ``name.txt`` (local prompt). Items: (image [3, S, S] in [0, 1], mask [S, S] or None, prompt)."""

    def __init__(self, folder: str, size: int):
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder {folder} does not exist")
        self.size = size
        self.items = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.name.lower().endswith(MASK_SUFFIX))
        if not self.items:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int):
        path = self.items[i]
        image = _square(Image.open(path).convert("RGB"), self.size, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mask_path = path.with_name(path.stem + MASK_SUFFIX)
        mask = None
        if mask_path.exists():
            m = _square(Image.open(mask_path).convert("L"), self.size, Image.NEAREST)
            mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)
        text = path.with_suffix(PROMPT_SUFFIX)
        prompt = text.read_text(encoding="utf-8").strip() if text.exists() else ""
        return pixels, mask, prompt


# -- run state -------------------------------------------------------------------------------------------------
def save_state(path: Path, step: int, trainable: dict, optimizer, generators: dict, scaler=None) -> None:
    """Everything needed to resume (weights, optimiser, loss scaler, the CPU and CUDA generators and the run's own),
    in a file ``torch.load(weights_only=True)`` reads; written atomically."""
    state = {"step": step, "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():          # the noise drawn on the GPU must not replay after a resume
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, module, optimizer, generators: dict, scaler=None) -> int:
    """Restores a :func:`save_state` file; -> the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        module.load_state_dict(state["trainable"])
    except RuntimeError as e:
        raise ValueError(f"{path} does not match this run's trainable weights (another base model or method?): "
                         f"{str(e)[:500]}") from None
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda_rng" in state and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


class LossLog:
    """A CSV of (step, losses...) in the output folder. A resumed run keeps the rows up to the step it resumes from
    (``resumed``) and drops any logged after that state was saved, so every step appears once; a fresh run starts
    the file anew."""

    def __init__(self, path: Path, names: list[str], resumed: int = 0):
        self.path, self.names = path, names
        rows = []
        if resumed and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in list(csv.reader(fh))[1:] if r and int(r[0]) <= resumed]
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([["step", *names], *rows])

    def write(self, step: int, values: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([step, *(f"{values[n]:.6g}" for n in self.names)])


def autocast(device: torch.device, mixed_precision: str):
    """``no`` / ``fp16`` / ``bf16`` -> the autocast context for the forward pass."""
    if mixed_precision == "no":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    if dtype is None:
        raise ValueError(f"mixed_precision must be no, fp16 or bf16; got {mixed_precision!r}")
    return torch.autocast(device.type, dtype=dtype)


def save_image(path: Path, images: list[torch.Tensor]) -> None:
    """[3, H, W] tensors in [0, 1], side by side, as a PNG."""
    row = torch.cat([i.detach().float().cpu().clamp(0, 1) for i in images], dim=-1)
    Image.fromarray((row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def nearest(mask: torch.Tensor, hw) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 1, h, w] by nearest (BrushNet's mask resize)."""
    return F.interpolate(mask, size=hw, mode="nearest")


def cosine_lr(base: float, step: int, steps: int) -> float:
    """Cosine decay from ``base`` at step 0 to 0 at ``steps``."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


class Prompt(NamedTuple):
    context: torch.Tensor              # [1, 77, C], float32, CPU
    pooled: torch.Tensor | None        # [1, P] or None
    ids: torch.Tensor                  # [1, 77] token ids of the first tokenizer


class PromptEncoder:
    """Local prompts through the base's text encoder(s), the first 77-token chunk, as float32 on the CPU; the latest
    ``limit`` prompts are kept (a data set has a prompt per image; most steps meet a prompt seen before)."""

    def __init__(self, clip, limit: int = 512):
        self.clip, self.limit = clip, limit
        self._cache: OrderedDict[str, Prompt] = OrderedDict()

    def __call__(self, prompt: str) -> Prompt:
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            return hit
        tokens = {k: v[:1] for k, v in self.clip.tokenize(prompt).items()}          # one 77-token chunk
        ids = torch.tensor([[t[0] for t in next(iter(tokens.values()))[0]]])
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        out = Prompt(cond.float().cpu(), None if pooled is None else pooled.float().cpu(), ids)
        self._cache[prompt] = out
        while len(self._cache) > self.limit:
            self._cache.popitem(last=False)
        return out

    def batch(self, prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (context [B, 77, C], pooled [B, P] or None) of a list of prompts."""
        enc = [self(p) for p in prompts]
        return (torch.cat([e.context for e in enc]),
                None if enc[0].pooled is None else torch.cat([e.pooled for e in enc]))


def require_epsilon(model, what: str) -> None:
    """The trainers' targets are epsilon: refuse v-prediction, x0, flow and other parameterisations up front (the
    model's ``calculate_denoised`` must be EPS's own: x0 models subclass EPS but denoise differently)."""
    import comfy.model_sampling
    sampling = model.get_model_object("model_sampling")
    if type(sampling).calculate_denoised is not comfy.model_sampling.EPS.calculate_denoised:
        kind = next(c.__name__ for c in type(sampling).__mro__ if "calculate_denoised" in c.__dict__)
        raise ValueError(f"{what} supports epsilon-prediction base models only; this one is {kind}")


def load_base(path: str):
    """(MODEL, CLIP, VAE) of a checkpoint, the UNet in float32 whatever ComfyUI would pick for inference: the
    gradient of every trainer passes back through the frozen UNet, and fp16 weights without loss scaling would let
    it underflow. ``mixed_precision`` decides the compute precision (autocast)."""
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                 model_options={"dtype": torch.float32})[:3]


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI runs a MODEL's UNet in (as ``BaseModel._apply_model``)."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


def make_scaler(device: torch.device, mixed_precision: str, *models) -> torch.amp.GradScaler:
    """The loss scaler: on for fp16 autocast, and whenever a model the gradient passes through computes in float16
    (a MODEL handed in already loaded for inference)."""
    half = any(compute_dtype(m) == torch.float16 for m in models)
    return torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16" or half)


def load_on_device(*patchers) -> None:
    """The patchers on the device, whole: never partially (low-VRAM) loaded, since the optimiser's state and the
    gradients of what trains live on the device."""
    import comfy.model_management as mm
    mm.load_models_gpu(list(patchers), force_full_load=True)


def sample_conds(prompts: PromptEncoder, context: torch.Tensor, pooled: torch.Tensor | None, size: int | None = None,
                 **extra) -> tuple[list, list]:
    """ComfyUI CONDITIONING (positive, negative) for a trainer's sample image: the first row's prompt against the
    empty prompt. ``size``: SDXL's width / height; ``extra``: more keys for both (the inpaint inputs)."""
    if size:
        extra.update(width=size, height=size)
    neg = prompts("")
    positive = [[context[:1], dict(extra, pooled_output=None if pooled is None else pooled[:1])]]
    return positive, [[neg.context, dict(extra, pooled_output=neg.pooled)]]


def sdxl_y(base_model, pooled: torch.Tensor, size: int) -> torch.Tensor:
    """SDXL's ``y`` (pooled text + original / crop / target size) for square ``size`` images, crop 0 -> [B, 2816]."""
    return base_model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                                 target_width=size, target_height=size)


def sampler_options(patcher, sigma: torch.Tensor) -> dict:
    """The transformer options ComfyUI's sampler hands the model for one call on ``patcher``: its patches plus its
    wrappers (the nodes' networks run inside those), every row a "cond" row."""
    return dict(patcher.model_options["transformer_options"], cond_or_uncond=[0], sigmas=sigma,
                wrappers=patcher.wrappers)


def optimizer_step(optimizer, scaler, parts: dict) -> dict:
    """One optimiser step on ``parts["loss"]`` (loss scaling for fp16) -> the parts as floats."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(parts["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}


@contextmanager
def evaluating(module: torch.nn.Module):
    """``module`` in eval mode inside, its own mode restored after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def unet_blocks(*nets) -> list:
    """Every res block and spatial transformer of ComfyUI UNets (``openaimodel.UNetModel`` and the copies built from
    its blocks): what gradient checkpointing recomputes."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    return [m for net in nets for m in net.modules() if isinstance(m, (ResBlock, SpatialTransformer))]


@contextmanager
def checkpointed_blocks(blocks):
    """Inside: every module of ``blocks`` recomputed in backward (non-reentrant activation checkpointing) while
    gradients are on, through an instance ``forward`` removed on exit. ComfyUI offers no patch route around a whole
    UNet block, so for the length of one training forward pass the trainer sets this on the blocks of its own UNet
    (nothing of ComfyUI's code changes; sampling never sees it). Dict arguments (ComfyUI's transformer options,
    whose "block" entries move on as the UNet runs) are copied at call time, so the recomputation sees what the
    first pass saw."""
    blocks = list(blocks)

    def wrap(forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    if any("forward" in m.__dict__ for m in blocks):
        raise RuntimeError("a block already carries an instance forward; gradient checkpointing would stack")
    for m in blocks:
        m.forward = wrap(m.forward)
    try:
        yield blocks
    finally:
        for m in blocks:
            del m.forward


def checkpointed(fn, *args):
    """``fn(*args)`` recomputed in backward (non-reentrant activation checkpointing) when gradients are on."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@dataclasses.dataclass
class Loop:
    """The loop every trainer shares: resume from ``state.pt``, draw a batch, one optimiser step, log, sample, save.

    ``step_fn(step) -> {name: float}`` does one optimiser step (``step`` counts from 0) and returns the losses named in
    ``loss_names`` (the first is the total, checked to be finite); ``sample_fn(path)`` writes a sample image;
    ``save_fn()`` writes the output file and returns its path."""
    name: str
    output: str
    steps: int
    module: torch.nn.Module              # what state.pt keeps (the trainable network)
    optimizer: torch.optim.Optimizer
    generators: dict
    loss_names: list
    step_fn: object
    save_fn: object
    sample_fn: object = None
    scaler: object = None                # the fp16 loss scaler (its scale is part of the state)
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 0

    def run(self) -> Path:
        out = Path(self.output)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        state = out / "state.pt"
        step = load_state(state, self.module, self.optimizer, self.generators, self.scaler) if state.exists() else 0
        if step:
            log.info("resuming %s at step %d", out, step)
        losses = LossLog(out / "loss.csv", self.loss_names, step)
        bar = tqdm(total=self.steps, initial=step, desc=self.name, unit="step")
        path = None
        while step < self.steps:
            parts = self.step_fn(step)
            total = parts[self.loss_names[0]]
            if not math.isfinite(total):
                raise FloatingPointError(f"the loss became {total} at step {step + 1}")
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{parts[k]:.4g}" for k in self.loss_names[:2]})
            if step % self.log_every == 0 or step == self.steps:
                losses.write(step, parts)
            if self.sample_fn is not None and self.sample_every and (step % self.sample_every == 0
                                                                     or step == self.steps):
                self.sample_fn(out / "samples" / f"step_{step:07d}.png")
            if step % self.save_every == 0 or step == self.steps:
                path = self.save_fn()
                save_state(state, step, self.module.state_dict(), self.optimizer, self.generators, self.scaler)
        bar.close()
        return path if path is not None else self.save_fn()
