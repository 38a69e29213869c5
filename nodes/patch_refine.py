"""Stage 2 of Patch-Adapter: refine the hole of a full-resolution image patch by patch.

Per image: pad to the VAE's latent factor, plan a latent-aligned grid (``models.patch_adapter.plan_patches``) and
keep the patches the mask needs; for each patch (or batch of patches) crop the current canvas — the blend of the
patches done so far, else the image with its hole filled from the reference resized to full resolution — build
the model's inpaint inputs for that crop (VAE latent, the crop with its hole greyed as ComfyUI's
InpaintModelConditioning does, the mask as concat and noise mask) and every other spatial input of the
conditioning cropped to it (area masks, areas, ControlNet hints), sample with the reference attention attached,
decode, and add it to the canvas with feathered weights. Only the patch is ever encoded, sampled or decoded, so
peak memory follows the patch size; the image-sized buffers are the image, the canvas and one weight plane.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import comfy.model_management as mm

from ..models import patch_adapter as pa
from . import comfy_compat as compat
from .checks import refuse
from .layout import row_batch, vae_decode, vae_encode

log = logging.getLogger(__name__)
NODE = "High-Res Patch Refine (Patch-Adapter)"        # the node's display name, for refusals while sampling
GREY = 0.5          # the value InpaintModelConditioning gives the hole of the masked image it encodes


@dataclass(frozen=True)
class RefineSettings:
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float
    patch_size: int
    overlap: int
    patch_batch: int = 1
    reference_context: float = 1.5


latent_factor = compat.latent_factor      # the patch grid's alignment (training/patch_adapter.py reads it here)


# -- cropping the conditioning to a patch --------------------------------------------------------------------
def _crop_plane(t: torch.Tensor, boxes, height: int, width: int) -> torch.Tensor:
    """t: [B, ..., h, w] at any resolution covering the image -> the region of each box (proportionally), stacked
    per box (row i for box i, or the single row for all)."""
    th, tw = t.shape[-2:]
    out = []
    for i, b in enumerate(boxes):
        y0, x0 = math.floor(b.y0 * th / height), math.floor(b.x0 * tw / width)
        y1 = max(y0 + 1, math.ceil((b.y0 + b.h) * th / height))
        x1 = max(x0 + 1, math.ceil((b.x0 + b.w) * tw / width))
        row = t[i:i + 1] if t.shape[0] == len(boxes) else t[:1]
        out.append(row[..., min(y0, th - 1):min(y1, th), min(x0, tw - 1):min(x1, tw)])
    sizes = {tuple(o.shape[-2:]) for o in out}
    if len(sizes) > 1:                                    # rounding differs between boxes: bring to one size
        size = max(sizes)
        out = [F.interpolate(o.float(), size=size, mode="bilinear").to(o.dtype) if tuple(o.shape[-2:]) != size else o
               for o in out]
    return torch.cat(out)


def _crop_area(area, box, factor: int, height: int, width: int):
    """ConditioningSetArea's (h, w, y, x) in latent cells (or ("percentage", h, w, y, x)) within a patch; None when
    the area misses the patch."""
    if area[0] == "percentage":
        _, h, w, y, x = area
        lh, lw = height // factor, width // factor
        h, w, y, x = round(h * lh), round(w * lw), round(y * lh), round(x * lw)
    else:
        h, w, y, x = area
    lb = box.latent(factor)
    y0, x0 = max(y, lb.y0), max(x, lb.x0)
    y1, x1 = min(y + h, lb.y0 + lb.h), min(x + w, lb.x0 + lb.w)
    if y1 <= y0 or x1 <= x0:
        return None
    return (y1 - y0, x1 - x0, y0 - lb.y0, x0 - lb.x0)


def _crop_control(control, boxes, height: int, width: int):
    if control is None:
        return None
    c = control.copy()
    if c.cond_hint_original is not None:
        c.cond_hint_original = _crop_plane(c.cond_hint_original, boxes, height, width)
    c.extra_concat_orig = [_crop_plane(e, boxes, height, width) if e.ndim == 4 and min(e.shape[-2:]) > 1 else e
                           for e in c.extra_concat_orig]
    c.set_previous_controlnet(_crop_control(control.previous_controlnet, boxes, height, width))
    return c


def crop_conditioning(conds: list, boxes, height: int, width: int, factor: int, inpaint: dict | None) -> list:
    """The conditioning of a batch of patches: every spatial entry cropped to them, the inpaint inputs replaced by
    the patches' own (``inpaint``: concat_latent_image / concat_mask). Entries whose area misses the patch are
    left out."""
    out = []
    for t, d in conds:
        d = dict(d)
        if "area" in d:
            if len(boxes) != 1:
                raise refuse(NODE, "patch_batch 1 with conditioning that has an area", f"{len(boxes)} patches")
            area = _crop_area(d["area"], boxes[0], factor, height, width)
            if area is None:
                continue
            d["area"] = area
        if d.get("mask") is not None:
            m = d["mask"]
            d["mask"] = _crop_plane(m if m.ndim == 3 else m[None], boxes, height, width)
        if d.get("control") is not None:
            d["control"] = _crop_control(d["control"], boxes, height, width)
        for key in ("concat_latent_image", "concat_mask", "noise_mask"):
            d.pop(key, None)
        if inpaint:
            d.update(inpaint)
        out.append([t, d])
    if not out:
        raise refuse(NODE, "a conditioning entry that covers this patch", "entries whose areas all lie elsewhere",
                     "Add one without an area.")
    return out


def _has_area(conds) -> bool:
    return any("area" in d for _, d in conds)


# -- the patch loop -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RefineJob:
    """What every patch of one High-Res Patch Refine run shares. ``attach_reference(model, latents, seed, ids)`` ->
    the MODEL that samples one batch of patches; ``batch`` patches per sampling call; ``previews`` (optional) gets
    every sampling step."""
    model: object
    vae: object
    positive: list
    negative: list
    settings: RefineSettings
    attach_reference: Callable
    batch: int = 1
    previews: Optional[compat.StepPreviews] = None


@dataclass
class _Picture:
    """One image being refined: image [1, 3, H, W] (any strides: a view of the IMAGE), mask [1, 1, H, W]
    (1 = inpaint), reference [1, 3, h, w] and its latent, the plan, and the canvas the patches blend into."""
    image: torch.Tensor
    mask: torch.Tensor
    reference: torch.Tensor
    ref_latent: torch.Tensor
    plan: pa.PatchPlan
    canvas: pa.PatchCanvas


def reference_latents(ref_latent, boxes, height, width, factor, context):
    """[P, C, h, w]: the reference latent under each patch (grown by ``context``), at most the patch's latent size."""
    out = []
    for b in boxes:
        region, size = pa.reference_region(b, height, width, ref_latent.shape[-2], ref_latent.shape[-1], context,
                                           (b.h // factor, b.w // factor))
        ys, xs = region.slices()
        r = ref_latent[..., ys, xs]
        if tuple(r.shape[-2:]) != size:
            r = F.interpolate(r, size=size, mode="area")
        out.append(r)
    return torch.cat(out)


def patch_pixels(pic: _Picture, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """([P, 3, h, w], [P, 1, h, w]): each patch as the canvas has it so far (its hole filled from the reference
    resized to full resolution where no patch landed yet) and its hole."""
    H, W = pic.image.shape[-2:]
    pixels, holes = [], []
    for b in boxes:
        hole = pa.crop_padded(pic.mask, b, "constant")[0].float()
        filled = (pa.crop_padded(pic.image, b)[0].float() * (1 - hole)
                  + pa.sample_reference(pic.reference, b, H, W)[0].clamp(0, 1) * hole)
        pixels.append(pic.canvas.read(b, filled))
        holes.append(hole)
    return torch.stack(pixels), torch.stack(holes)


def inpaint_inputs(job: RefineJob, pixels, holes) -> tuple[torch.Tensor, Optional[dict]]:
    """(the patches' latent, the inpaint model's concat inputs or None): for an inpainting model one VAE call
    encodes the patches and their greyed-hole copies, as InpaintModelConditioning builds them."""
    if not getattr(job.model.model, "concat_keys", ()):
        return vae_encode(job.vae, pixels), None
    grey = (pixels - GREY) * (1 - holes.round()) + GREY
    latent, concat = vae_encode(job.vae, torch.cat([pixels, grey])).split(len(pixels))
    return latent, {"concat_latent_image": concat, "concat_mask": holes}


def patch_noise(shape, seed: int, ids) -> torch.Tensor:
    """The initial noise of each patch from its own seed (seed + patch id), so a patch's noise does not depend on
    the batch it is sampled in."""
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float32)[None]
                      for i in ids])


def sample_patches(job: RefineJob, pic: _Picture, boxes, ids) -> torch.Tensor:
    """One sampling call for a batch of patches -> their decoded pixels [P, 3, h, w]."""
    s, f = job.settings, latent_factor(job.vae)
    H, W = pic.image.shape[-2:]
    pixels, holes = patch_pixels(pic, boxes)
    latent, extra = inpaint_inputs(job, pixels, holes)
    pos = crop_conditioning(job.positive, boxes, pic.plan.height, pic.plan.width, f, extra)
    neg = crop_conditioning(job.negative, boxes, pic.plan.height, pic.plan.width, f, extra)
    refs = reference_latents(pic.ref_latent, boxes, H, W, f, s.reference_context)
    model = job.attach_reference(job.model, refs, s.seed + ids[0], ids)
    callback = job.previews.callback(s.steps) if job.previews else None
    samples = compat.sample(model, patch_noise(latent.shape[1:], s.seed, ids), latent, s, (pos, neg), holes, callback,
                            s.seed + ids[0])
    return vae_decode(job.vae, samples)


def refine_picture(job: RefineJob, image, mask, reference, out, plan: pa.PatchPlan, first_id: int = 0) -> None:
    """One image (see ``_Picture``) and its ``plan``: writes the result into ``out`` ([H, W, 3], a copy of the image)
    inside the mask only. Nothing image-sized is allocated: patches are cropped (and padded at the bottom/right edge)
    one at a time, the canvas covers the union of the planned patches, and the composite is written in bands."""
    ref_latent = vae_encode(job.vae, reference).float().cpu()
    canvas = pa.PatchCanvas(3, plan.height, plan.width, job.settings.overlap, pa.union_box(plan.selected))
    pic = _Picture(image, mask, reference, ref_latent, plan, canvas)
    order = list(enumerate(plan.selected))
    for start in range(0, len(order), job.batch):
        mm.throw_exception_if_processing_interrupted()
        chunk = order[start:start + job.batch]
        boxes = [b for _, b in chunk]
        decoded = sample_patches(job, pic, boxes, tuple(first_id + i for i, _ in chunk))
        for b, d in zip(boxes, decoded):
            canvas.add(b, d[:, :b.h, :b.w])
    canvas.composite_into(out.permute(2, 0, 1), image[0], mask[0, 0])     # out: the IMAGE layout


def refine(job: RefineJob, image, mask, reference, out):
    """image [B, 3, H, W] (a view), mask [B, 1, H, W], reference [B or 1, 3, h, w]; ``out`` [B, H, W, 3] holds a
    copy of the image and receives the results. Plans the patches, sends progress and live previews over all of
    them, and returns the plans."""
    s, f = job.settings, latent_factor(job.vae)
    pa.check_patch_settings(s.patch_size, s.overlap, f)
    B = image.shape[0]
    reference = row_batch(reference, B, "reference")
    pa.check_reference_aspect(reference.shape[-2], reference.shape[-1], image.shape[-2], image.shape[-1])
    plans = [pa.plan_patches(mask[i, 0], s.patch_size, s.overlap, f) for i in range(B)]
    batch = 1 if _has_area(job.positive) or _has_area(job.negative) else s.patch_batch   # an area crop is per patch
    calls = sum(math.ceil(len(p.selected) / batch) for p in plans)
    job = RefineJob(job.model, job.vae, job.positive, job.negative, s, job.attach_reference, batch,
                    compat.StepPreviews(job.model, calls * s.steps))
    first = 0
    for i, plan in enumerate(plans):
        if plan.selected:
            refine_picture(job, image[i:i + 1], mask[i:i + 1], reference[i:i + 1], out[i], plan, first)
            first += len(plan.selected)
    return plans


# -- the preview -------------------------------------------------------------------------------------------------
_COLOURS = torch.tensor([[0.1, 0.9, 0.2], [0.2, 0.6, 1.0], [1.0, 0.8, 0.1], [0.9, 0.3, 0.9]])


def patch_grid_preview(image: torch.Tensor, mask: torch.Tensor, plan, max_side: int = 1024) -> torch.Tensor:
    """[3, h, w]: the image (at most ``max_side``), the hole tinted red, every selected patch outlined (colours
    alternate so overlaps show), the rest of the grid in faint grey."""
    H, W = image.shape[-2:]
    scale = min(1.0, max_side / max(H, W))
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    img = F.interpolate(image[None], size=(h, w), mode="area")[0] if scale < 1 else image.clone()
    m = F.interpolate(mask[None].float(), size=(h, w), mode="area")[0] if scale < 1 else mask.float()
    img = img * (1 - 0.35 * m) + torch.tensor([1.0, 0.1, 0.1])[:, None, None] * 0.35 * m
    selected = set(plan.selected) if plan is not None else set()
    boxes = [] if plan is None else [(b, None) for b in plan.grid if b not in selected] + [
        (b, _COLOURS[i % len(_COLOURS)]) for i, b in enumerate(plan.selected)]
    t = 2 if min(h, w) >= 128 else 1
    for b, colour in boxes:
        y0, x0 = int(b.y0 * scale), int(b.x0 * scale)
        y1, x1 = min(h, max(y0 + 1, int((b.y0 + b.h) * scale))), min(w, max(x0 + 1, int((b.x0 + b.w) * scale)))
        y1c, x1c = max(y1 - t, 0), max(x1 - t, 0)
        for ys, xs in ((slice(y0, y0 + t), slice(x0, x1)), (slice(y1c, y1), slice(x0, x1)),
                       (slice(y0, y1), slice(x0, x0 + t)), (slice(y0, y1), slice(x1c, x1))):
            if colour is None:
                img[:, ys, xs] = img[:, ys, xs] * 0.6 + 0.4 * 0.75
            else:
                img[:, ys, xs] = colour[:, None, None]
    return img.clamp(0, 1)
