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

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .regions import bounding_box

class PainterKind(str, enum.Enum):
    """PainterNet's mask kinds (eq. 6)."""
    BOX = "box"
    IRREGULAR = "irregular"
    SEGMENTATION = "segmentation"


PAINTER_KINDS = tuple(k.value for k in PainterKind)
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


def box_mask(seg: torch.Tensor, g: torch.Generator, settings: PainterMaskSettings = PainterMaskSettings()):
    """m_box: the bounding box of ``seg``, each side moved out by a random fraction of the box's extent."""
    seg = _check(seg)
    box = bounding_box(seg)
    if box is None:
        return seg
    t, b, l, r = box
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


# kind -> draw(seg, g, settings)
_PAINTER_DRAW = {PainterKind.BOX: box_mask, PainterKind.IRREGULAR: irregular_mask,
                 PainterKind.SEGMENTATION: lambda seg, g, settings: _check(seg)}


def _kind(enum_cls, kind, what: str):
    try:
        return enum_cls(kind)
    except ValueError:
        raise ValueError(f"expected {what} to be one of {', '.join(k.value for k in enum_cls)}; got {kind!r}") from None


def kind_mask(seg: torch.Tensor, kind: str, g: torch.Generator,
              settings: PainterMaskSettings = PainterMaskSettings()) -> torch.Tensor:
    """The mask of one :class:`PainterKind` drawn from ``seg``."""
    return _PAINTER_DRAW[_kind(PainterKind, kind, "the mask kind")](seg, g, settings)


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


# -- ASUKA (§3.1 "Training MAE") -------------------------------------------------------------------------------
# The mask basis: object-shape masks 50 % (each combined with an irregular mask half of the time), irregular masks
# 40 % (the Co-Mod and LaMa styles), regular masks 10 % (a rectangle or its complement); the hole ratio is kept in
# [0.1, 0.75]. The MAE is then trained with the hole enlarged to 75 % of its tokens by whole random patches
# (:func:`fill_tokens`); the alignment module and the decoder train on the basis masks as they are.
class AsukaKind(str, enum.Enum):
    """ASUKA's mask basis."""
    OBJECT = "object"
    IRREGULAR = "irregular"
    REGULAR = "regular"


ASUKA_KINDS = tuple(k.value for k in AsukaKind)


@dataclass(frozen=True)
class AsukaMaskSettings:
    odds: tuple[float, float, float] = (0.5, 0.4, 0.1)   # object / irregular / regular (paper)
    object_with_irregular: float = 0.5                   # paper: an object mask is joined with an irregular one 50 %
    ratio: tuple[float, float] = (0.1, 0.75)             # paper: the hole ratio is kept in this range
    tries: int = 30          # redraws of the chosen kind until the ratio fits; then a rectangle of a fitting area
    # Our choices (the paper only names the styles). LaMa-style: U{1..5} polylines of U{1..6} segments, turning by
    # U[0, 4] rad, length U[0.05, 0.3] x side, width U[0.03, 0.12] x side. Co-Mod-style: U{1..4} brush strokes of
    # U{4..12} segments turning around 2pi/5 +- 2pi/15, width U[0.02, 0.09] x side, plus U{0..2} rectangles of side
    # U[0.1, 0.5] x the image side.
    lama_strokes: int = 5
    lama_segments: int = 6
    lama_width: tuple[float, float] = (0.03, 0.12)
    lama_length: tuple[float, float] = (0.05, 0.3)
    comod_strokes: int = 4
    comod_segments: tuple[int, int] = (4, 12)
    comod_width: tuple[float, float] = (0.02, 0.09)
    comod_boxes: int = 2
    # objects are moved to a random place inside the image and flipped left-right half of the time
    # regular: a rectangle of sides U[0.3, 0.9], or everything but a rectangle of sides U[0.5, 0.95]
    rect_side: tuple[float, float] = (0.3, 0.9)
    complement_side: tuple[float, float] = (0.5, 0.95)


def _polyline(mask: torch.Tensor, g: torch.Generator, segments: int, turn, length, width) -> None:
    """One stroke from a random point: ``segments`` pieces, each turning by ``turn()`` radians."""
    H, W = mask.shape
    side = min(H, W)
    y, x = _uniform(g, 0, H), _uniform(g, 0, W)
    angle = _uniform(g, 0, 2 * math.pi)
    w = _uniform(g, *width) * side
    for _ in range(segments):
        angle += turn()
        n = _uniform(g, *length) * side
        y1 = min(max(y + n * math.sin(angle), 0.0), float(H))
        x1 = min(max(x + n * math.cos(angle), 0.0), float(W))
        draw_line(mask, (y, x), (y1, x1), w)
        y, x = y1, x1


def lama_mask(H: int, W: int, g: torch.Generator, s: AsukaMaskSettings = AsukaMaskSettings()) -> torch.Tensor:
    """Thick random polylines in the style of LaMa's irregular masks."""
    m = torch.zeros(H, W)
    for _ in range(_randint(g, 1, s.lama_strokes)):
        _polyline(m, g, _randint(g, 1, s.lama_segments), lambda: _uniform(g, 0, 4.0), s.lama_length, s.lama_width)
    return m


def comod_mask(H: int, W: int, g: torch.Generator, s: AsukaMaskSettings = AsukaMaskSettings()) -> torch.Tensor:
    """Brush strokes and rectangles in the style of Co-Mod-GAN's free-form masks."""
    m = torch.zeros(H, W)
    for _ in range(_randint(g, 0, s.comod_boxes)):
        bh, bw = round(_uniform(g, 0.1, 0.5) * H), round(_uniform(g, 0.1, 0.5) * W)
        t, l = _randint(g, 0, H - bh), _randint(g, 0, W - bw)
        m[t:t + bh, l:l + bw] = 1
    mean, spread = 2 * math.pi / 5, 2 * math.pi / 15
    for _ in range(_randint(g, 1, s.comod_strokes)):
        sign = 1 if _uniform(g) < 0.5 else -1
        _polyline(m, g, _randint(g, *s.comod_segments), lambda: sign * _uniform(g, mean - spread, mean + spread),
                  (0.03, 0.12), s.comod_width)
    return m


def object_mask(shape: torch.Tensor, H: int, W: int, g: torch.Generator) -> torch.Tensor:
    """An object's shape (a segmentation mask of any image, [h, w]) placed at a random spot of an H x W mask and
    flipped left-right half of the time; shapes larger than the mask are shrunk to fit (nearest)."""
    shape = _check(shape)
    box = bounding_box(shape)
    if box is None:
        raise ValueError("the object shape is empty")
    t, b, l, r = box
    obj = shape[t:b, l:r]
    scale = min(1.0, H / obj.shape[0], W / obj.shape[1])
    if scale < 1:
        size = (max(1, int(obj.shape[0] * scale)), max(1, int(obj.shape[1] * scale)))
        obj = F.interpolate(obj[None, None], size=size, mode="nearest")[0, 0]
    if _uniform(g) < 0.5:
        obj = obj.flip(-1)
    oy, ox = _randint(g, 0, H - obj.shape[0]), _randint(g, 0, W - obj.shape[1])
    out = torch.zeros(H, W)
    out[oy:oy + obj.shape[0], ox:ox + obj.shape[1]] = obj
    return out


def regular_mask(H: int, W: int, g: torch.Generator, s: AsukaMaskSettings = AsukaMaskSettings()) -> torch.Tensor:
    """A rectangle, or (half of the time) everything but a rectangle."""
    complement = _uniform(g) < 0.5
    lo, hi = s.complement_side if complement else s.rect_side
    bh, bw = max(1, round(_uniform(g, lo, hi) * H)), max(1, round(_uniform(g, lo, hi) * W))
    t, l = _randint(g, 0, H - bh), _randint(g, 0, W - bw)
    m = torch.zeros(H, W)
    m[t:t + bh, l:l + bw] = 1
    return 1 - m if complement else m


def asuka_kind_mask(kind: str, H: int, W: int, g: torch.Generator, shape: torch.Tensor | None = None,
                    s: AsukaMaskSettings = AsukaMaskSettings()) -> torch.Tensor:
    """One draw of a basis kind (no ratio control). ``shape``: the object shape for ``object`` (else an ellipse)."""
    return _ASUKA_DRAW[_kind(AsukaKind, kind, "the ASUKA mask kind")](H, W, g, shape, s)


def _object_kind(H: int, W: int, g: torch.Generator, shape, s: AsukaMaskSettings) -> torch.Tensor:
    m = object_mask(shape if shape is not None and shape.max() > 0.5 else random_blob(H, W, g), H, W, g)
    if _uniform(g) < s.object_with_irregular:
        m = torch.maximum(m, _irregular_kind(H, W, g, shape, s))
    return m


def _irregular_kind(H: int, W: int, g: torch.Generator, shape, s: AsukaMaskSettings) -> torch.Tensor:
    return lama_mask(H, W, g, s) if _uniform(g) < 0.5 else comod_mask(H, W, g, s)


# kind -> draw(H, W, g, shape, settings)
_ASUKA_DRAW = {AsukaKind.OBJECT: _object_kind, AsukaKind.IRREGULAR: _irregular_kind,
               AsukaKind.REGULAR: lambda H, W, g, shape, s: regular_mask(H, W, g, s)}


def asuka_mask(H: int, W: int, g: torch.Generator, shape: torch.Tensor | None = None,
               s: AsukaMaskSettings = AsukaMaskSettings()) -> tuple[torch.Tensor, str]:
    """ASUKA's training mask -> (mask, kind). The kind is drawn first with the paper's odds, then masks of that kind
    are drawn until the hole ratio lies in ``s.ratio`` (so the odds hold exactly); after ``s.tries`` misses a
    rectangle of a fitting area stands in (a rare event, counted as the chosen kind)."""
    k, lo, hi = _uniform(g), *s.ratio
    kind = ASUKA_KINDS[0] if k < s.odds[0] else ASUKA_KINDS[1] if k < s.odds[0] + s.odds[1] else ASUKA_KINDS[2]
    for _ in range(s.tries):
        m = asuka_kind_mask(kind, H, W, g, shape, s)
        if lo <= float(m.mean()) <= hi:
            return m, kind
    area = _uniform(g, lo, hi) * H * W
    aspect = _uniform(g, 0.5, 2.0)
    bh = min(H, max(1, round(math.sqrt(area / aspect))))
    bw = min(W, max(1, round(area / bh)))
    t, l = _randint(g, 0, H - bh), _randint(g, 0, W - bw)
    m = torch.zeros(H, W)
    m[t:t + bh, l:l + bw] = 1
    return m, kind


def fill_tokens(mask: torch.Tensor, patch: int, target: float, g: torch.Generator) -> torch.Tensor:
    """MAE fine-tuning: holes that touch fewer than ``target`` of the ``patch`` x ``patch`` tokens get random whole
    tokens added until they touch ``ceil(target * tokens)`` of them (the paper's "enlarge the mask ratio to 75 % with
    randomly selected mask regions"). mask: [H, W], H and W multiples of ``patch``."""
    H, W = mask.shape
    if H % patch or W % patch:
        raise ValueError(f"mask size {W}x{H} is not a multiple of the patch size {patch}")
    gh, gw = H // patch, W // patch
    touched = (mask > 0).reshape(gh, patch, gw, patch).any(dim=3).any(dim=1).reshape(-1)
    need = math.ceil(target * gh * gw) - int(touched.sum())
    if need <= 0:
        return mask.clone()
    free = (~touched).nonzero()[:, 0]
    pick = free[torch.randperm(free.numel(), generator=g)[:need]]
    add = torch.zeros(gh * gw)
    add[pick] = 1
    add = add.reshape(gh, 1, gw, 1).expand(gh, patch, gw, patch).reshape(H, W)
    return torch.maximum(mask, add)
