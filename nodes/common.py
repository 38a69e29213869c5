"""ComfyUI glue shared by every node: model folders, tensor layout, input checks, ModelPatcher wrapping."""
from __future__ import annotations

import contextvars
import enum
import os
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths
from comfy.ldm.modules import attention as comfy_attention
from comfy.ldm.modules.attention import optimized_attention_for_device

from ..models.weights import WEIGHT_EXTENSIONS

# Model folders of the pack, under ComfyUI's models/ directory (also settable in extra_model_paths.yaml).
MODEL_FOLDERS = {
    "asuka": "ASUKA: mae_300.pth, asuka_alignment_*.pt, txt_256.pt, vec.pt, asuka_decoder.ckpt",
    "inpaint_branch": "PainterNet (ours), BrushNet SD1.5/SDXL and PowerPaint-v2 diffusion_pytorch_model.safetensors",
    "largen": "LAR-Gen: largen_ckpt_s22k.pth, ip-adapter-plus_sdxl_vit-h.bin, RefineNet files",
    "patch_adapter": "Patch-Adapter: Dual Context / Reference Patch Adapter files in our safetensors format",
}
# More default directories a folder also lists (ComfyUI/models/<name>): LAR-Gen's resampler is IP-Adapter-Plus's
# file, which users of IPAdapter nodes keep in models/ipadapter already.
EXTRA_DEFAULT_DIRS = {"largen": ("ipadapter",)}
NONE = "none"


def register_model_folders() -> None:
    """Add the pack's folders to ComfyUI's registry without dropping paths a user configured already."""
    exts = set(WEIGHT_EXTENSIONS)
    for name in MODEL_FOLDERS:
        defaults = [os.path.join(folder_paths.models_dir, d) for d in (name, *EXTRA_DEFAULT_DIRS.get(name, ()))]
        if name in folder_paths.folder_names_and_paths:
            paths, old_exts = folder_paths.folder_names_and_paths[name]
            paths.extend(d for d in defaults if d not in paths)
            folder_paths.folder_names_and_paths[name] = (paths, set(old_exts) | exts)
        else:
            folder_paths.folder_names_and_paths[name] = (defaults, exts)


def model_files(folder: str, allow_none: bool = False) -> list[str]:
    files = folder_paths.get_filename_list(folder)
    return ([NONE] if allow_none else []) + files


def model_path(folder: str, name: str) -> Optional[str]:
    """Full path of a file chosen from a registered folder ("none" -> None). Only registered folders resolve."""
    if name == NONE:
        return None
    return folder_paths.get_full_path_or_raise(folder, name)


class Precision(str, enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


def resolve_dtype(choice: str, device: torch.device, params: int = 0) -> torch.dtype:
    """``auto``: bfloat16 where the device supports it, else float16, else float32 (CPU: float32)."""
    match Precision(choice):
        case Precision.FLOAT32:
            return torch.float32
        case Precision.BFLOAT16:
            return torch.bfloat16
        case Precision.FLOAT16:
            return torch.float16
    if mm.should_use_bf16(device, model_params=params, prioritize_performance=False):
        return torch.bfloat16
    if mm.should_use_fp16(device, model_params=params, prioritize_performance=False):
        return torch.float16
    return torch.float32


def comfy_build_kwargs(device: torch.device) -> dict:
    """operations + attention so weights follow ComfyUI's casting/offloading and the user's attention backend."""
    return {"operations": comfy.ops.manual_cast,
            "attention": optimized_attention_for_device(device, mask=True, small_input=True)}


def wrap_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """Hand a network to ComfyUI's model management (loaded to the GPU when used, offloaded after)."""
    module.to(offload_device)
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


# -- state scoped to one sampling run -------------------------------------------------------------------
# Patch objects are immutable once attached. What a patch may keep for the length of one sampling run (inputs
# moved to the sampling device once, results shared between the model calls of a step, a noise generator) lives
# here, keyed by the patch's key, set by an OUTER_SAMPLE wrapper and gone when the run ends.
_RUN_SCOPE: contextvars.ContextVar = contextvars.ContextVar("consistent_inpaint_run", default=None)


class RunState:
    def __init__(self):
        self.values = {}                      # anything derived once per run, by key


class StepNoise(RunState):
    """Run state with a seeded generator and one noise draw per sampling step (shared by every model call of the
    step: cond/uncond split into several calls see the same noise)."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.sigma, self.noise = None, None

    def step(self, sigma: float, shape) -> torch.Tensor:
        if sigma != self.sigma or self.noise is None or tuple(self.noise.shape) != tuple(shape):
            self.sigma = sigma
            self.noise = torch.randn(shape, generator=self.generator)
        return self.noise


def run_state(key: str):
    """The state of patch ``key`` for the sampling run in progress, or None outside one."""
    return (_RUN_SCOPE.get() or {}).get(key)


def once_per_run(run: Optional[RunState], key, build: Callable):
    """``build()``, computed once per sampling run and kept under ``key`` (every call outside one)."""
    if run is None:
        return build()
    if key not in run.values:
        run.values[key] = build()
    return run.values[key]


def moved(run: Optional[RunState], name, t: torch.Tensor, device, dtype) -> torch.Tensor:
    """``t`` on the sampling device: once per run (every call outside one)."""
    return once_per_run(run, ("moved", name, device, dtype), lambda: t.to(device, dtype))


def run_scope(key: str, factory: Callable[[], RunState]):
    """An OUTER_SAMPLE wrapper giving patch ``key`` a fresh ``factory()`` state for one sampling run."""
    def outer_sample(executor, *args, **kwargs):
        token = _RUN_SCOPE.set({**(_RUN_SCOPE.get() or {}), key: factory()})
        try:
            return executor(*args, **kwargs)
        finally:
            _RUN_SCOPE.reset(token)
    return outer_sample


# -- inside attention patches ----------------------------------------------------------------------------
def attention(q, k, v, heads, extra):
    """ComfyUI's attention as its CrossAttention calls it (the user's backend, precision and overrides)."""
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"),
                                               transformer_options=extra)


def site_of(extra) -> tuple | None:
    """(block kind, block id, transformer index) of the attention call ``extra`` (transformer options) belongs to."""
    block = extra.get("block")
    return None if block is None else (block[0], block[1], extra.get("block_index", 0))


class SiteReplace:
    """An attention replace at one site: the attention already there (ComfyUI's, or the replace another node put
    there first, e.g. an IPAdapter) passed through ``combine(out, q, k, v, site, extra)``. Immutable."""

    def __init__(self, combine: Callable, site, previous):
        self.combine, self.site, self.previous = combine, site, previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = attention(q, k, v, extra_options["n_heads"], extra_options)
        return self.combine(out, q, k, v, self.site, extra_options)


def add_site_replaces(m, attn: str, sites, combine: Callable) -> None:
    """Put a SiteReplace on ``attn`` ("attn1" / "attn2") at every site of the cloned MODEL ``m``, keeping the replace
    found there (site-keyed, else block-keyed) as the one it extends."""
    replaces = m.model_options["transformer_options"].get("patches_replace", {}).get(attn, {})
    setter = m.set_model_attn1_replace if attn == "attn1" else m.set_model_attn2_replace
    for site in sites:
        setter(SiteReplace(combine, site, replaces.get(site, replaces.get(site[:2]))), *site)


def row_batch(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """``t`` with ``rows`` rows: as is, or one row broadcast; anything else is the user's batch mismatch."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:])
    raise ValueError(f"{what} has a batch of {t.shape[0]} but the latent batch is {rows}; give one, or one per latent")


# -- the [start_percent, end_percent] range of a model patch -------------------------------------------------
def percent_inputs(what: str = "the patch") -> list:
    from comfy_api.latest import io
    return [io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                           tooltip=f"Where in sampling {what} starts acting (0 = the first step)"),
            io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                           tooltip=f"Where {what} stops acting (1 = the last step)")]


def check_percent_range(start_percent: float, end_percent: float):
    """For a node's validate_inputs: True, or the message."""
    if start_percent > end_percent:
        return f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})"
    return True


def in_sigma_range(transformer_options, sigma_start: float, sigma_end: float) -> bool:
    """Whether the model call these transformer options belong to lies in the patch's range (end <= sigma <= start).
    Read once per model call by a wrapper, never inside attention (reading sigma there stalls the GPU)."""
    sigmas = transformer_options.get("sigmas")
    return sigmas is None or sigma_end <= float(sigmas.max()) <= sigma_start


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma at start, sigma at end) of the model's sampling schedule: a step is inside when end <= sigma <= start."""
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


# -- tensor layout: the one place IMAGE [B,H,W,C] / MASK [B,H,W] become BCHW -----------------------------
def image_to_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE [B,H,W,C] -> [B,3,H,W] float32. RGBA drops alpha; grayscale is repeated to RGB."""
    if image.ndim != 4:
        raise ValueError(f"{name} must be an IMAGE [batch, height, width, channels]; got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c == 4:
        image = image[..., :3]
    elif c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c != 3:
        raise ValueError(f"{name} has {c} channels; expected RGB (3), RGBA (4) or grayscale (1)")
    check_finite(image, name)
    return image.float().permute(0, 3, 1, 2).contiguous()


def image_view_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE [B,H,W,C] -> a [B,3,H,W] *view* (no copy; for 4K+ images read patch by patch). Same checks as
    image_to_bchw."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be an RGB/RGBA/grayscale IMAGE [batch, height, width, channels]; got shape "
                         f"{tuple(image.shape)}")
    check_finite(image, name)
    view = image[..., :3] if image.shape[-1] >= 3 else image.expand(-1, -1, -1, 3)
    return view.permute(0, 3, 1, 2)


def mask_view_b1hw(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """MASK -> [B,1,H,W] float32 in [0,1] without copying when it already is (for 4K+ masks)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a MASK [batch, height, width]; got shape {tuple(mask.shape)}")
    check_finite(mask, name)
    if mask.dtype != torch.float32 or bool((mask < 0).any() or (mask > 1).any()):
        mask = mask.float().clamp(0, 1)
    return mask[:, None]


def mask_to_b1hw(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """MASK [B,H,W] or [H,W] -> [B,1,H,W] float32 in [0,1], 1 = inpaint (a copy)."""
    return mask_view_b1hw(mask, name).clone()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).float().cpu().contiguous()


def check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def match_image_mask(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check sizes and broadcast a batch of 1 on either side. image [B,3,H,W], mask [B',1,H,W]."""
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} but image is {image.shape[-1]}x{image.shape[-2]}; "
                         "they must be the same size (resize the mask, e.g. with ImageToMask/ResizeMask)")
    bi, bm = image.shape[0], mask.shape[0]
    if bi != bm:
        if bm == 1:
            mask = mask.expand(bi, -1, -1, -1)
        elif bi == 1:
            image = image.expand(bm, -1, -1, -1)
        else:
            raise ValueError(f"image batch is {bi} but mask batch is {bm}; give one mask, or one per image")
    return image, mask
