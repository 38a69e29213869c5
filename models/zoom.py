"""Zoom-in crop around a mask and exact paste-back (LAR-Gen's preprocessing, usable with any inpaint graph), and
the subject preparation of LAR-Gen (background to white, cropped to the subject, padded square with white).

The authors' zoom-in: the mask's bounding box, scaled about its centre by ``context_factor`` (1.3), made square
on its longer side, clipped to the image, padded with black to a square and resized to the model resolution;
after sampling the whole square is resized back and written over the image.

Ours differs where that loses information (documented in the node help):
* the square is shifted to stay inside the image instead of being clipped, so it keeps real context; padding
  is only needed where the image itself is narrower than the square, and it repeats the edge pixels by default
  (``zero`` pads with black, as the authors);
* the paste-back writes only inside the mask (feathered inwards), so every pixel outside the mask keeps its
  exact input value.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .regions import Box, bounding_box



class Padding(str, enum.Enum):
    """How the square is filled where the image is narrower than it."""
    EDGE = "edge"          # repeat the edge pixels (ours)
    ZERO = "zero"          # black (the authors)


_PAD_MODE = {Padding.EDGE: "replicate", Padding.ZERO: "constant"}       # -> torch.nn.functional.pad's mode


@dataclass(frozen=True)
class CropBox:
    """One image's square window: rows [y0, y1) and columns [x0, x1) of the image, then padding (top, bottom,
    left, right) to a ``side`` x ``side`` square."""
    y0: int
    y1: int
    x0: int
    x1: int
    pad: tuple[int, int, int, int]
    side: int


@dataclass(frozen=True)
class CropInfo:
    boxes: tuple                 # one CropBox per batch item
    height: int                  # the original image size
    width: int
    mask: torch.Tensor           # [B, 1, H, W] the original mask (paste weights), CPU float32
    resolution: int              # the square size the crops were resized to


def _span(lo: int, hi: int, side: int, size: int) -> tuple[int, int, int, int]:
    """A window of ``side`` containing [lo, hi), centred on it, shifted inside [0, size) when it fits;
    -> (start, stop, pad_before, pad_after) in image coordinates plus padding."""
    start = round((lo + hi) / 2 - side / 2)
    start = max(min(start, lo), hi - side)              # contain the box despite rounding
    if side <= size:
        start = min(max(start, 0), size - side)
        return start, start + side, 0, 0
    before = side - size
    return 0, size, before // 2, before - before // 2   # the image is narrower than the square: pad it


def zoom_box(bbox: Box, height: int, width: int, context_factor: float) -> CropBox:
    y0, y1, x0, x1 = bbox
    side = max(1, math.ceil(max(y1 - y0, x1 - x0) * context_factor))
    sy, ey, pt, pb = _span(y0, y1, side, height)
    sx, ex, pl, pr = _span(x0, x1, side, width)
    return CropBox(sy, ey, sx, ex, (pt, pb, pl, pr), side)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int], mode: Padding) -> torch.Tensor:
    t, b, l, r = pad
    if not any(pad):
        return x
    return F.pad(x, (l, r, t, b), mode=_PAD_MODE[mode])


def crop_to_mask(image: torch.Tensor, mask: torch.Tensor, context_factor: float, resolution: int,
                 padding: str = Padding.EDGE) -> tuple[torch.Tensor, torch.Tensor, CropInfo]:
    """image [B,3,H,W] in [0,1], mask [B,1,H,W] in [0,1] (1 = inpaint; same batch) -> (crops [B,3,R,R],
    crop masks [B,1,R,R] binary (resized, > 0.5, as the authors), CropInfo)."""
    if padding not in {p.value for p in Padding}:
        raise ValueError(f"padding must be one of {', '.join(p.value for p in Padding)}, got {padding!r}")
    padding = Padding(padding)
    B, _, H, W = image.shape
    crops, masks, boxes = [], [], []
    for i in range(B):
        bbox = bounding_box(mask[i, 0] > 0)
        if bbox is None:
            raise ValueError(f"mask {i} of the batch is empty: there is nothing to crop to; paint the area to inpaint")
        box = zoom_box(bbox, H, W, context_factor)
        win = (slice(None), slice(box.y0, box.y1), slice(box.x0, box.x1))
        img = _pad(image[i:i + 1][(slice(None),) + win], box.pad, padding)
        m = _pad(mask[i:i + 1][(slice(None),) + win], box.pad, Padding.ZERO)
        crops.append(_resize(img, resolution).clamp(0, 1))
        masks.append((F.interpolate(m, size=(resolution, resolution), mode="bilinear", antialias=True,
                                    align_corners=False) > 0.5).to(image.dtype))
        boxes.append(box)
    info = CropInfo(tuple(boxes), H, W, mask.detach().float().cpu().clone(), resolution)
    return torch.cat(crops), torch.cat(masks), info


def feather_weights(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """Paste weights: the mask, ramped down over ``feather`` pixels towards its border from the inside, and exactly
    0 wherever the mask is 0. mask [B,1,H,W] in [0,1]."""
    if feather <= 0:
        return mask
    inside = (mask > 0).to(mask.dtype)
    ramp, eroded = inside.clone(), inside
    for _ in range(feather - 1):
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)   # 3x3 erosion (image border counts as inside)
        ramp = ramp + eroded
    return torch.minimum(mask, ramp / feather)


def paste_back(image: torch.Tensor, inpainted: torch.Tensor, info: CropInfo, feather: int) -> torch.Tensor:
    """image [B,3,H,W] (the original; a batch of 1 serves every crop), inpainted [B,3,h,w] (the crops after
    sampling, any square size) -> [B,3,H,W]; pixels where the crop info's mask is 0 are returned bit-for-bit unchanged."""
    if image.shape[0] == 1 and len(info.boxes) > 1:        # one image for every crop
        image = image.expand(len(info.boxes), *image.shape[1:])
    B, _, H, W = image.shape
    if (H, W) != (info.height, info.width):
        raise ValueError(f"expected image to be the {info.width}x{info.height} image the crops were taken from; got "
                         f"a {W}x{H} image. Connect the image that went into Crop To Mask")
    if B != len(info.boxes):
        raise ValueError(f"expected image with a batch of 1 or {len(info.boxes)} (the crops crop_info describes); got "
                         f"a batch of {B}. Give the image that went into Crop To Mask")
    if inpainted.shape[0] != B:
        raise ValueError(f"expected inpainted with a batch of {B} (one per crop); got a batch of {inpainted.shape[0]}. "
                         "Decode the latent sampled from Crop To Mask's crops")
    if inpainted.shape[-1] != inpainted.shape[-2]:
        raise ValueError(f"expected a square inpainted image (Crop To Mask made {info.resolution}x{info.resolution} "
                         f"crops); got {inpainted.shape[-1]}x{inpainted.shape[-2]}. Keep the crops square")
    out = image.clone()
    weights = feather_weights(info.mask.to(image.device, image.dtype), feather)
    for i, box in enumerate(info.boxes):
        t, b, l, r = box.pad
        patch = _resize(inpainted[i:i + 1].to(image.dtype), box.side).clamp(0, 1)
        patch = patch[..., t:box.side - b, l:box.side - r]
        region = (slice(i, i + 1), slice(None), slice(box.y0, box.y1), slice(box.x0, box.x1))
        w = weights[i:i + 1, :, box.y0:box.y1, box.x0:box.x1]
        base = image[region]
        out[region] = torch.where(w > 0, base * (1 - w) + patch * w, base)
    return out


# -- the subject image --------------------------------------------------------------------------------------
# The authors' subject preprocessing (scepter's LAR-Gen UI, ``data_preprocess_inpaint``), reproduced step by step:
#   mask = alpha/sketch > 128 (of 255); image * mask + white * (1 - mask);
#   box = get_bbox_from_mask: first and last non-zero row/column, the *last* used as an exclusive end; fewer than
#         10 mask pixels -> the whole image;
#   CLIP input: the crop padded with white, centred (top = (side - h) // 2), to side = int(max(h, w) * 1.02), then
#               torchvision Resize((224, 224)) on a float tensor: bilinear, antialiased (torchvision >= 0.17);
#   RefineNet input: the crop (no margin) with its longer side scaled to the resolution (albumentations
#               LongestMaxSize: round(side * scale), cv2 INTER_LINEAR, no antialias), padded white, centred.
SUBJECT_MARGIN = 1.02
SUBJECT_MASK_THRESHOLD = 128 / 255       # the authors binarise the 8-bit sketch at > 128
SUBJECT_MIN_PIXELS = 10                  # below this many mask pixels the authors keep the whole frame
CLIP_SIZE = 224


def subject_box(mask: torch.Tensor) -> Box:
    """The authors' crop of a binary [H, W] subject mask: rows/columns from the first non-zero one to the last one
    (exclusive, as their code slices), the whole frame for fewer than 10 mask pixels. Where their slice would be
    empty (every subject pixel in one row or column) the box keeps that one row/column."""
    H, W = mask.shape
    if int(mask.sum()) < SUBJECT_MIN_PIXELS:
        return 0, H, 0, W
    y0, y1, x0, x1 = bounding_box(mask)
    return y0, max(y1 - 1, y0 + 1), x0, max(x1 - 1, x0 + 1)


def subject_crops(image: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """image [S,3,H,W] in [0,1], mask [S or 1,1,H,W] (1 = subject) or None (the whole image is the subject) ->
    one [1,3,h,w] crop per subject, background (mask <= 128/255) white."""
    if mask is None:
        return list(image.split(1))
    out = []
    for i in range(image.shape[0]):
        m = (mask[min(i, mask.shape[0] - 1)][None] > SUBJECT_MASK_THRESHOLD).to(image.dtype)
        if not m.any():
            raise ValueError(f"subject mask {i} is empty; it must cover the subject (1 = subject)")
        y0, y1, x0, x1 = subject_box(m[0, 0])
        out.append((image[i:i + 1] * m + (1 - m))[..., y0:y1, x0:x1])
    return out


def pad_white_centre(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., h, w] padded with white to at least ``height`` x ``width``, centred as albumentations' PadIfNeeded
    (top = (height - h) // 2)."""
    h, w = x.shape[-2:]
    dh, dw = max(height - h, 0), max(width - w, 0)
    if not (dh or dw):
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=1.0)


def clip_square(crop: torch.Tensor, margin: float = SUBJECT_MARGIN) -> torch.Tensor:
    """[1,3,h,w] -> the white square of side int(max(h, w) * margin) around it (the authors' CLIP input before
    resizing)."""
    side = int(max(crop.shape[-2:]) * margin)
    return pad_white_centre(crop, side, side)


def resize_bilinear_aa(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Resize((size, size)) of a float tensor: bilinear, antialiased, half-pixel centres."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def prepare_subject(image: torch.Tensor, mask: torch.Tensor | None, margin: float = SUBJECT_MARGIN,
                    size: int | None = None) -> torch.Tensor:
    """LAR-Gen's subject square (the CLIP input): every subject cropped and whitened (:func:`subject_crops`), padded
    white to int(longer side x ``margin``) (:func:`clip_square`) and, with ``size``, resized as the authors resize to
    224 (:func:`resize_bilinear_aa`) -> [S,3,s,s]. Without ``size`` the squares keep their side; subjects of
    different sides are then brought to the largest the same way."""
    squares = [clip_square(c, margin) for c in subject_crops(image, mask)]
    side = size or max(sq.shape[-1] for sq in squares)
    return torch.cat([resize_bilinear_aa(sq, side) for sq in squares]).clamp(0, 1)


def refine_square(crop: torch.Tensor, resolution: int) -> torch.Tensor:
    """The authors' RefineNet input of one [1,3,h,w] crop: the longer side scaled to ``resolution`` (round, bilinear
    without antialias, as cv2's INTER_LINEAR), then padded white and centred -> [1,3,resolution,resolution]."""
    h, w = crop.shape[-2:]
    scale = resolution / max(h, w)
    if scale != 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        crop = F.interpolate(crop, size=size, mode="bilinear", antialias=False, align_corners=False)
    return pad_white_centre(crop, resolution, resolution).clamp(0, 1)
