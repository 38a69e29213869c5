"""What every trainer shares: configuration (a TOML file and/or flags, with help taken from the option comments),
the options of the engine and the data stream, prompts, sample images and the pieces that run the frozen base.
Needs ComfyUI importable for the model helpers (``train.py`` arranges it); the engine is in ``training/engine.py``,
the data streams in ``training/data.py``."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import math
import re
import tomllib
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image

from .data import IMAGE_SUFFIXES, MASK_SUFFIX, PROMPT_SUFFIX, ImageFolder, Item  # noqa: F401 (re-exported)
from .engine import FILE_MODE, Engine, Loop, write_atomic  # noqa: F401 (re-exported)

log = logging.getLogger("consistent_inpaint.training")


# -- configuration ---------------------------------------------------------------------------------------------
def option_help(cls) -> dict:
    """{field: help} from the comments after each field in the class bodies of ``cls`` and its bases (the comment
    beside an option is its documentation, in the file and in ``--help`` alike)."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        last = None
        for line in lines:
            m = re.match(r"\s{4}(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$", line)
            if m and not line.lstrip().startswith(("def ", "#")):
                last = m.group(1)
                if m.group(2):
                    out[last] = m.group(2).strip()
            elif last and re.match(r"\s+#\s*(.*)$", line) and last in out:
                out[last] += " " + re.match(r"\s+#\s*(.*)$", line).group(1).strip()
            else:
                last = None
    return out


def config_parser(cls, prog: str = "train.py") -> argparse.ArgumentParser:
    """The argparse parser of a config dataclass: ``--config`` and one ``--field`` per option, with its help and
    default."""
    helps = option_help(cls)
    ap = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    ap.add_argument("--config", help="TOML file whose keys are the options below (a flag overrides the same key)")
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}.get(
            str(f.type), str)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = helps.get(f.name, "").replace("%", "%%") + (" (required)" if required else "")
        default = None if required else f.default
        kw = dict(help=text or " ", metavar=kind.__name__.upper())
        if kind is bool:
            kw.update(type=lambda s: s.lower() in ("1", "true", "yes", "on"), metavar="BOOL")
        else:
            kw.update(type=kind)
        ap.add_argument(f"--{f.name}", default=argparse.SUPPRESS, **kw)
        if default is not None and not required:
            ap._option_string_actions[f"--{f.name}"].help += f" (default: {default!r})"
    return ap


def parse_config(cls, argv: list[str] | None = None, prog: str = "train.py"):
    """A ``cls`` dataclass from ``--config file.toml`` (keys = field names) overridden by ``--field value`` flags.
    Unknown keys in the file are errors (a typo must not silently train with a default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    a = config_parser(cls, prog).parse_args(argv)
    values = {}
    if getattr(a, "config", None):
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


def train_main(config_cls, trainer_cls, method: str, argv: list[str] | None = None) -> None:
    """``python train.py <method> ...``: the options parsed, the trainer built and run. A bad setting or a missing
    file ends the run with its message (which says what was expected), not a traceback; the main process prints the
    file it wrote."""
    cfg = parse_config(config_cls, argv, f"train.py {method}")
    try:
        path = trainer_cls(cfg).run()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{method}: {e}") from None
    if path is not None:
        print(f"wrote {path}")


@dataclasses.dataclass(kw_only=True)
class TrainOptions:
    """The options every training method has (keyword-only, so a method's own required options may come first)."""
    seed: int = 0                  # the run's seed (samples, masks, noise and initial weights follow it)
    log_every: int = 10            # optimiser steps between rows of loss.csv / tracker points
    save_every: int = 500          # optimiser steps between saves of the weight file and state.pt
    sample_every: int = 500        # optimiser steps between sample images (0: none)
    validate_every: int = 0        # optimiser steps between validation losses on the fixed validation set (0: none)
    validation_size: int = 4       # images in the fixed validation set (the stream's first ones)
    mixed_precision: str = "no"    # no | fp16 | bf16: the engine's autocast (fp16 with loss scaling; on GPUs),
    #                                trained weights stay float32
    gradient_checkpointing: bool = False   # recompute activations in backward (what: see each method)
    gradient_accumulation: int = 1  # micro-batches per optimiser step; batch_size = per device × this × processes
    max_grad_norm: float = 0.0     # clip the gradient norm to this (0: no clipping)
    optimizer: str = "adamw"       # adamw | adamw_fused (torch's fused kernel) | adamw_8bit (bitsandbytes, installed
    #                                separately; GPUs)
    ema_decay: float = 0.0         # keep an EMA of the trained weights with this decay (0: none); the written file
    #                                and the samples then hold the EMA weights
    shards: str = ""               # WebDataset tar shards instead of the data folder: brace ranges / globs, commas
    #                                between (e.g. /data/brushdata/{00000..00099}.tar)
    shuffle_buffer: int = 64       # shards: samples shuffled within windows of this many (seeded)
    workers: int = 0               # shards: data-loader worker processes per training process
    tracker: str = "tensorboard"   # tensorboard | none: the engine's tracker (logs in output/logs)

    def __post_init__(self):
        if self.log_every < 1 or self.save_every < 1 or self.sample_every < 0:
            raise ValueError(f"log_every and save_every must be >= 1 and sample_every >= 0 (0: no samples); got "
                             f"{self.log_every}, {self.save_every}, {self.sample_every}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16; got {self.mixed_precision!r}")
        if self.gradient_accumulation < 1 or self.validate_every < 0 or self.validation_size < 1:
            raise ValueError(f"gradient_accumulation and validation_size must be >= 1 and validate_every >= 0; got "
                             f"{self.gradient_accumulation}, {self.validation_size}, {self.validate_every}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.tracker not in ("tensorboard", "none"):
            raise ValueError(f"tracker must be tensorboard or none; got {self.tracker!r}")


OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")


def adamw(params, opts: TrainOptions, **kw) -> torch.optim.Optimizer:
    """AdamW as ``opts.optimizer`` asks: torch's (``adamw``, or its fused kernel: ``adamw_fused``) or bitsandbytes'
    8-bit one (``adamw_8bit``: a quarter of the optimiser state's memory)."""
    if opts.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise SystemExit("optimizer = adamw_8bit needs bitsandbytes (pip install bitsandbytes; CUDA GPUs)") \
                from None
        return bitsandbytes.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, fused=opts.optimizer == "adamw_fused" or None, **kw)


def validation_losses(losses_fn, batch, seed: int) -> dict:
    """The loss of the fixed validation ``batch`` at fixed timesteps and noise (the global generators seeded with
    ``seed`` inside, the run's own random state untouched)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        parts = losses_fn(batch)
    return {k: float(v) for k, v in parts.items()}


def save_image(path: Path, images: list[torch.Tensor]) -> None:
    """[3, H, W] tensors in [0, 1], side by side, as a PNG."""
    row = torch.cat([i.detach().float().cpu().clamp(0, 1) for i in images], dim=-1)
    picture = Image.fromarray((row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    write_atomic(Path(path), lambda tmp: picture.save(tmp, format="PNG"))


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
