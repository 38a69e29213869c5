"""Training masks from the papers, in plain torch (no OpenCV), seeded by a ``torch.Generator``.

Masks are float ``[H, W]`` tensors, 1 = hole (ComfyUI's MASK convention); every generator returns a new tensor.

PainterNet (§3.4, eq. 6 and Algorithm 1), from a segmentation mask ``m_seg`` and ``k ~ U[0, 1]``:

* ``k <= 0.25``: ``m_box``, the bounding box of ``m_seg`` with each side pushed out by a random amount;
* ``0.25 < k <= 0.75``: ``m_irr``, ``m_seg`` dilated by a square kernel of random size for a random number of
  iterations (both from the coverage ``r``), then "finger" strokes (lines, circles, squares) started at random
  points of the dilated mask;
* otherwise ``m_seg`` itself.

Where the paper gives no numbers (box expansion, kernel sizes, stroke counts and sizes) the choices are written
next to the code below; they are parameters of :class:`PainterMaskSettings`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAINTER_KINDS = ("box", "irregular", "segmentation")
PAINTER_THRESHOLDS = (0.25, 0.75)     # eq. 6: box if k <= 0.25, irregular if k <= 0.75, else segmentation


@dataclass(frozen=True)
class PainterMaskSettings:
    # m_box: each side moves out by U[0, box_expand] x the box's own extent on that axis (clipped to the image)
    box_expand: float = 0.3
    # m_irr dilation: kernel side U{3, 5, ..., k_max} with k_max = 3 + 2 * floor(dilate_scale * min(H, W) * (1 - r)),
    # so small objects (low coverage r) get the larger relative dilation; iterations U{1 .. max_iterations}
    dilate_scale: float = 0.02
    max_iterations: int = 3
    # m_irr strokes: U{1 .. max_draws} strokes, each U{1 .. max_segments} pieces; a piece is a line (a finger
    # drag, continued from where the last one ended), a disc or a square; width U[min_width, max_width] x min(H, W),
    # line length U[0.05, max_length] x min(H, W)
    max_draws: int = 4
    max_segments: int = 5
    min_width: float = 0.02
    max_width: float = 0.08
    max_length: float = 0.25


def _check(seg: torch.Tensor) -> torch.Tensor:
    if seg.ndim != 2:
        raise ValueError(f"a segmentation mask must be [H, W]; got shape {tuple(seg.shape)}")
    if not torch.isfinite(seg).all():
        raise ValueError("the segmentation mask holds NaN or infinite values")
    return (seg > 0.5).float()


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """U{lo .. hi}, both ends included."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right), bottom/right exclusive, of the non-zero pixels; None when there are none."""
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def box_mask(seg: torch.Tensor, g: torch.Generator, settings: PainterMaskSettings = PainterMaskSettings()):
    """m_box: the bounding box of ``seg``, each side moved out by a random fraction of the box's extent."""
    seg = _check(seg)
    box = bounding_box(seg)
    if box is None:
        return seg
    t, l, b, r = box
    H, W = seg.shape
    bh, bw = b - t, r - l
    t = max(0, t - round(_uniform(g, 0, settings.box_expand) * bh))
    b = min(H, b + round(_uniform(g, 0, settings.box_expand) * bh))
    l = max(0, l - round(_uniform(g, 0, settings.box_expand) * bw))
    r = min(W, r + round(_uniform(g, 0, settings.box_expand) * bw))
    out = torch.zeros_like(seg)
    out[t:b, l:r] = 1
    return out


def dilate(mask: torch.Tensor, kernel: int, iterations: int = 1) -> torch.Tensor:
    """``cv2.dilate`` with a ``kernel`` x ``kernel`` rectangle (odd side), ``iterations`` times; outside = 0."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the dilation kernel must be an odd size >= 1; got {kernel}")
    x = mask[None, None].float()
    for _ in range(iterations):
        x = F.max_pool2d(x, kernel, stride=1, padding=kernel // 2)
    return x[0, 0]


def _grid(H: int, W: int):
    ys = torch.arange(H, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(W, dtype=torch.float32)[None, :] + 0.5
    return ys, xs


def draw_line(mask: torch.Tensor, p0, p1, width: float) -> None:
    """Paints (in place) every pixel whose centre lies within width/2 of the segment p0-p1 ((y, x) in pixels)."""
    ys, xs = _grid(*mask.shape)
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx
    s = ((ys - y0) * dy + (xs - x0) * dx) / length2 if length2 > 0 else torch.zeros_like(ys + xs)
    s = s.clamp(0, 1)
    d2 = (ys - (y0 + s * dy)) ** 2 + (xs - (x0 + s * dx)) ** 2
    mask[d2 <= (width / 2) ** 2] = 1


def draw_disc(mask: torch.Tensor, centre, radius: float) -> None:
    draw_line(mask, centre, centre, 2 * radius)


def draw_square(mask: torch.Tensor, centre, half: float) -> None:
    ys, xs = _grid(*mask.shape)
    mask[((ys - centre[0]).abs() <= half) & ((xs - centre[1]).abs() <= half)] = 1


def irregular_mask(seg: torch.Tensor, g: torch.Generator, settings: PainterMaskSettings = PainterMaskSettings()):
    """m_irr (Algorithm 1): dilate ``seg`` (kernel and iterations from its coverage), then draw strokes from random
    points of the dilated mask."""
    seg = _check(seg)
    H, W = seg.shape
    r = float(seg.mean())
    k_max = 3 + 2 * math.floor(settings.dilate_scale * min(H, W) * (1 - r))
    kernel = 2 * _randint(g, 1, (k_max - 1) // 2) + 1
    out = dilate(seg, kernel, _randint(g, 1, settings.max_iterations))
    points = out.nonzero()
    if points.numel() == 0:
        return out
    side = min(H, W)
    for _ in range(_randint(g, 1, settings.max_draws)):
        y, x = (float(v) + 0.5 for v in points[_randint(g, 0, points.shape[0] - 1)])
        for _ in range(_randint(g, 1, settings.max_segments)):
            width = _uniform(g, settings.min_width, settings.max_width) * side
            shape = _randint(g, 0, 2)
            if shape == 0:
                angle = _uniform(g, 0, 2 * math.pi)
                length = _uniform(g, 0.05, settings.max_length) * side
                y1 = min(max(y + length * math.sin(angle), 0.0), float(H))
                x1 = min(max(x + length * math.cos(angle), 0.0), float(W))
                draw_line(out, (y, x), (y1, x1), width)
                y, x = y1, x1
            elif shape == 1:
                draw_disc(out, (y, x), width / 2)
            else:
                draw_square(out, (y, x), width / 2)
    return out


def kind_mask(seg: torch.Tensor, kind: str, g: torch.Generator,
              settings: PainterMaskSettings = PainterMaskSettings()) -> torch.Tensor:
    """The mask of one kind in :data:`PAINTER_KINDS` drawn from ``seg``."""
    if kind == "box":
        return box_mask(seg, g, settings)
    if kind == "irregular":
        return irregular_mask(seg, g, settings)
    if kind == "segmentation":
        return _check(seg)
    raise ValueError(f"mask kind must be one of {', '.join(PAINTER_KINDS)}; got {kind!r}")


def painter_mask(seg: torch.Tensor, g: torch.Generator, settings: PainterMaskSettings = PainterMaskSettings()):
    """PainterNet's training mask (eq. 6) -> (mask, kind), kind in :data:`PAINTER_KINDS`."""
    k = _uniform(g)
    kind = PAINTER_KINDS[0] if k <= PAINTER_THRESHOLDS[0] else PAINTER_KINDS[1] if k <= PAINTER_THRESHOLDS[1] \
        else PAINTER_KINDS[2]
    return kind_mask(seg, kind, g, settings), kind


def random_blob(H: int, W: int, g: torch.Generator, coverage: tuple[float, float] = (0.05, 0.3)) -> torch.Tensor:
    """A stand-in segmentation mask when a training image comes without one: an ellipse of random centre, axes and
    a coverage in ``coverage``."""
    area = _uniform(g, *coverage) * H * W
    aspect = _uniform(g, 0.5, 2.0)
    a = math.sqrt(area / math.pi * aspect)          # half-axis along x
    b = area / (math.pi * a)                        # half-axis along y
    cy, cx = _uniform(g, b, max(b, H - b)), _uniform(g, a, max(a, W - a))
    ys, xs = _grid(H, W)
    return ((((ys - cy) / b) ** 2 + ((xs - cx) / a) ** 2) <= 1).float()
