"""Patch-Adapter on tensors: the adapter file format, the two attention equations, and the patch arithmetic of
the full-resolution stage (planning, reference sampling, feathered blending).

Stage 1, Dual Context Adapter (DCA), in each adapted cross-attention layer with input ``z``, query ``Q = z W_Q``
and the layer's text keys/values ``K, V`` (hole ``M`` = 1)::

    Q'  = [z ⊙ (1 − M)] W_q          # queries from the known region only
    Z'  = Attn(Q', K, V)             # the known region read against the prompt
    Z'' = Attn(Q, Z' W_k, Z' W_v)    # every position reads that context
    out = Z + strength · Z''         # before the layer's to_out, as IP-Adapter-style adapters add

Stage 2, Reference Patch Adapter (RPA): a full-resolution patch's self-attention reads the tokens ``R`` of the
matching region of the stage-1 result at the same layer. With trained weights::

    out = Z + tanh(g) · Attn(Q, R W_k, R W_v)

and without them the patch's keys/values are extended with ``R`` through the layer's own projections
(``Attn(Q, [z; R] W_K, [z; R] W_V)``), so the stage works with no trained weights.

No code or weights were released; the paper gives the equations above and nothing about patch placement or
blending. Our choices are listed once, in ``docs/patch_adapter_format.md`` ("What the paper leaves open").
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttentionFn, sdpa_attention, torch_ops
from .regions import feather_ramp, tile_starts
from .sites import Site, site_name
from .weights import CheckpointFormatError, listing

FORMAT = "consistent_inpaint.patch_adapter"
FORMAT_VERSION = "1"
BASES = ("sd15", "sdxl")
_KEY_RE = re.compile(r"^(dca|rpa)\.(input|middle|output)\.(\d+)\.(\d+)\.(to_q\.weight|to_k\.weight|to_v\.weight|gate)$")
DCA_PARTS = ("to_q", "to_k", "to_v")
RPA_PARTS = ("to_k", "to_v", "gate")
_STAGE_PARTS = {"dca": {"to_q.weight", "to_k.weight", "to_v.weight"}, "rpa": {"to_k.weight", "to_v.weight", "gate"}}


def site_key(site: Site) -> str:
    """The spelling of a site inside the file: ``input.4.0`` (block kind, block id, transformer index)."""
    return ".".join(str(s) for s in site)


# -- the file format ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterWeights:
    """A Patch-Adapter file, split by stage. Shapes: DCA ``to_q`` [D, C], ``to_k``/``to_v`` [D, D]; RPA
    ``to_k``/``to_v`` [D, C], ``gate`` [1]; C = the layer's channels, D = its attention width."""
    dca: dict = field(default_factory=dict)       # site -> {"to_q", "to_k", "to_v"}
    rpa: dict = field(default_factory=dict)       # site -> {"to_k", "to_v", "gate"}
    base: Optional[str] = None                    # "sd15" / "sdxl" when the file says

    def widths(self, stage: str) -> dict:
        """{site: (channels C, attention width D)} of one stage ("dca" / "rpa")."""
        part = "to_q" if stage == "dca" else "to_k"
        return {s: (w[part].shape[1], w[part].shape[0]) for s, w in getattr(self, stage).items()}


def parse_patch_adapter(sd: Mapping[str, torch.Tensor], path: str,
                        metadata: Optional[Mapping[str, str]] = None) -> AdapterWeights:
    """Split a state dict written in our format (``docs/patch_adapter_format.md``) into its stages; every error
    names the file, the offending key and what was expected."""
    name = os.path.basename(str(path))
    meta = dict(metadata or {})
    if meta.get("format") not in (None, FORMAT):
        raise CheckpointFormatError(f"{name} says it is {meta.get('format')!r}; expected a {FORMAT} file")
    base = meta.get("base")
    if base is not None and base not in BASES:
        raise CheckpointFormatError(f"{name}: metadata base {base!r} is not one of {', '.join(BASES)}")
    groups = {"dca": {}, "rpa": {}}
    unknown = []
    for key, t in sd.items():
        m = _KEY_RE.match(key)
        if m is None or m.group(5) not in _STAGE_PARTS[m.group(1)]:
            unknown.append(key)
            continue
        stage, kind, block, index, part = m.groups()
        site = (kind, int(block), int(index))
        groups[stage].setdefault(site, {})[part.split(".")[0]] = t
    if unknown:
        raise CheckpointFormatError(
            f"{name} is not a Patch-Adapter file: {len(unknown)} tensors are not named dca.<site>.to_q/to_k/to_v.weight "
            f"or rpa.<site>.to_k/to_v.weight/gate ({listing(sorted(unknown))}). See docs/patch_adapter_format.md")
    if not groups["dca"] and not groups["rpa"]:
        raise CheckpointFormatError(f"{name} holds no Patch-Adapter tensors (no dca.* or rpa.* keys)")
    for stage, parts in (("dca", DCA_PARTS), ("rpa", RPA_PARTS)):
        for site, w in groups[stage].items():
            missing = [p for p in parts if p not in w]
            if missing:
                raise CheckpointFormatError(f"{name}: {stage}.{site_key(site)} lacks {', '.join(missing)}")
            _check_shapes(name, stage, site, w)
    return AdapterWeights(dca=groups["dca"], rpa=groups["rpa"], base=base)


def _check_shapes(name: str, stage: str, site: Site, w: dict) -> None:
    where = f"{name}: {stage}.{site_key(site)}"
    for part in ("to_q", "to_k", "to_v"):
        if part in w and w[part].ndim != 2:
            raise CheckpointFormatError(f"{where}.{part}.weight must be a matrix; found shape {tuple(w[part].shape)}")
    if stage == "dca":
        d, c = w["to_q"].shape
        want = {"to_k": (d, d), "to_v": (d, d)}
    else:
        d, c = w["to_k"].shape
        want = {"to_v": (d, c)}
        if w["gate"].numel() != 1:
            raise CheckpointFormatError(f"{where}.gate must hold one number; found shape {tuple(w['gate'].shape)}")
    for part, shape in want.items():
        if tuple(w[part].shape) != shape:
            raise CheckpointFormatError(f"{where}.{part}.weight has shape {tuple(w[part].shape)}; expected {shape} "
                                        f"(attention width {d}, channels {c})")


def adapter_state_dict(weights: AdapterWeights) -> tuple[dict, dict]:
    """(tensors, metadata) of ``weights`` in our file format: what the training command writes."""
    sd = {}
    for stage in ("dca", "rpa"):
        for site, w in getattr(weights, stage).items():
            for part, t in w.items():
                sd[f"{stage}.{site_key(site)}.{part}" + ("" if part == "gate" else ".weight")] = t.contiguous()
    meta = {"format": FORMAT, "version": FORMAT_VERSION}
    if weights.base:
        meta["base"] = weights.base
    return sd, meta


class PatchAdapterNet(nn.Module):
    """The adapter's projections as Linear layers of ``operations`` (module names: ``dca.<site>.to_q`` …, sites spelt
    by :func:`models.sites.site_name`)."""

    def __init__(self, weights: AdapterWeights, dtype=None, device=None, operations=torch_ops, attention=None):
        super().__init__()

        def lin(w):
            return operations.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype, device=device)

        self.dca = nn.ModuleDict({site_name(s): nn.ModuleDict({p: lin(w[p]) for p in DCA_PARTS})
                                  for s, w in weights.dca.items()})
        self.rpa = nn.ModuleDict({site_name(s): nn.ModuleDict({p: lin(w[p]) for p in ("to_k", "to_v")})
                                  for s, w in weights.rpa.items()})


def net_state_dict(weights: AdapterWeights) -> dict:
    """The projections of an adapter file under PatchAdapterNet's names (the gates stay in the file's dict)."""
    return {f"{stage}.{site_name(s)}.{p}.weight": t for stage in ("dca", "rpa")
            for s, w in getattr(weights, stage).items() for p, t in w.items() if p != "gate"}


# -- the two equations -------------------------------------------------------------------------------------
Projection = Callable[[torch.Tensor], torch.Tensor]


def dual_context_term(z: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, known: torch.Tensor,
                      w: tuple[Projection, Projection, Projection], heads: int,
                      attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """Patch-Adapter DCA: ``Z'' = Attn(Q, Z' W_k, Z' W_v)`` with ``Z' = Attn([z ⊙ (1 − M)] W_q, K, V)``.

    z: [B, N, C] layer input; q: [B, N, D] the layer's own query; k, v: [B, T, D] its text keys/values;
    known: [B or 1, N, 1] = 1 − M (1 = known pixel); w: the adapter's (W_q, W_k, W_v). Returns Z'': [B, N, D], to be
    added to the layer's attention output before ``to_out``."""
    w_q, w_k, w_v = w
    q_ctx = w_q(z * known.to(z.dtype))                            # Q'  [B, N, D]
    z_ctx = attention(q_ctx.to(q.dtype), k, v, heads)             # Z'  [B, N, D]
    return attention(q, w_k(z_ctx).to(q.dtype), w_v(z_ctx).to(q.dtype), heads)


def reference_patch_term(q: torch.Tensor, reference: torch.Tensor, w_k: Projection, w_v: Projection, heads: int,
                         attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """Patch-Adapter RPA: ``Attn(Q, R W_k, R W_v)``. q: [B, N, D]; reference: [B, M, C] the reference tokens at this
    layer. The caller adds it times ``tanh(gate)``."""
    return attention(q, w_k(reference).to(q.dtype), w_v(reference).to(q.dtype), heads)


# -- planning the patches ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchBox:
    """A patch in pixels of the (padded) image: rows y0:y0+h, columns x0:x0+w."""
    y0: int
    x0: int
    h: int
    w: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)

    def latent(self, factor: int) -> "PatchBox":
        return PatchBox(self.y0 // factor, self.x0 // factor, self.h // factor, self.w // factor)


@dataclass(frozen=True)
class PatchPlan:
    height: int
    width: int
    patch_h: int
    patch_w: int
    grid: tuple            # every PatchBox of the grid
    selected: tuple        # the ones the mask needs, in raster order


def check_patch_settings(patch_size: int, overlap: int, align: int) -> None:
    if patch_size % align:
        raise ValueError(f"patch_size {patch_size} is not a multiple of the VAE's latent factor {align}; "
                         f"use e.g. {max(align, patch_size // align * align)}")
    if overlap % align:
        raise ValueError(f"overlap {overlap} is not a multiple of the VAE's latent factor {align}; "
                         f"use e.g. {overlap // align * align}")
    if overlap >= patch_size:
        raise ValueError(f"overlap ({overlap}) must be smaller than patch_size ({patch_size})")
    if patch_size - overlap < align:
        raise ValueError(f"patch_size − overlap must be at least {align} pixels")


def _box_sums(integral: torch.Tensor, y0, x0, y1, x1) -> int:
    return int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])


def padded_size(height: int, width: int, align: int) -> tuple[int, int]:
    """The image size rounded up to the latent factor (the pack pads bottom/right edges per patch, never the image)."""
    return math.ceil(height / align) * align, math.ceil(width / align) * align


def plan_patches(mask: torch.Tensor, patch_size: int, overlap: int, align: int, dilate: Optional[int] = None
                 ) -> PatchPlan:
    """The patch grid over a [H, W] mask (> 0 = to inpaint), padded to ``align`` on the bottom/right, and the patches
    that meet the mask dilated by ``dilate`` pixels (default ``overlap``). Images smaller than a patch get one patch
    of the image size along that axis.

    Memory: with ``dilate`` a multiple of ``align`` the test runs on the grid of align x align cells (a cell is hit
    when any of its pixels is), which is exact because boxes are aligned; otherwise on pixels."""
    mask = mask.reshape(mask.shape[-2:])
    H0, W0 = mask.shape
    H, W = padded_size(H0, W0, align)
    check_patch_settings(patch_size, overlap, align)
    ph, pw = min(patch_size, H), min(patch_size, W)
    grid = tuple(PatchBox(y, x, ph, pw) for y in tile_starts(H, ph, overlap, align)
                 for x in tile_starts(W, pw, overlap, align))
    r = overlap if dilate is None else dilate
    unit = align if r % align == 0 else 1
    hit = mask > 0
    if unit > 1:
        hit = F.max_pool2d(hit[None, None].to(torch.float16), unit, ceil_mode=True)[0, 0] > 0
    else:
        hit = F.pad(hit, (0, W - W0, 0, H - H0))
    integral = F.pad(hit.to(torch.int32).cumsum(0).cumsum(1), (1, 0, 1, 0))     # summed-area table
    Hu, Wu = H // unit, W // unit
    selected = tuple(b for b in grid if _box_sums(integral, max((b.y0 - r) // unit, 0), max((b.x0 - r) // unit, 0),
                                                  min((b.y0 + b.h + r) // unit, Hu),
                                                  min((b.x0 + b.w + r) // unit, Wu)) > 0)
    return PatchPlan(H, W, ph, pw, grid, selected)


def crop_padded(t: torch.Tensor, box: PatchBox, mode: str = "replicate") -> torch.Tensor:
    """t[..., box] for t: [B, C, H, W]; where the box runs past the bottom/right edge (the image is not a multiple of
    the latent factor) the crop is padded: ``replicate`` for pixels, ``constant`` (0) for masks."""
    H, W = t.shape[-2:]
    part = t[..., box.y0:min(box.y0 + box.h, H), box.x0:min(box.x0 + box.w, W)]
    ph, pw = box.h - part.shape[-2], box.w - part.shape[-1]
    if ph or pw:
        part = F.pad(part.float(), (0, pw, 0, ph), mode=mode)
    return part


def union_box(boxes) -> PatchBox:
    y0, x0 = min(b.y0 for b in boxes), min(b.x0 for b in boxes)
    y1, x1 = max(b.y0 + b.h for b in boxes), max(b.x0 + b.w for b in boxes)
    return PatchBox(y0, x0, y1 - y0, x1 - x0)


# -- blending ----------------------------------------------------------------------------------------------
def patch_weights(box: PatchBox, height: int, width: int, overlap: int) -> torch.Tensor:
    """[h, w] blending weights of a patch: ramps over ``overlap`` on the sides inside the image, flat at the image
    border (nothing there to blend with)."""
    wy = feather_ramp(box.h, 0 if box.y0 == 0 else overlap, 0 if box.y0 + box.h >= height else overlap)
    wx = feather_ramp(box.w, 0 if box.x0 == 0 else overlap, 0 if box.x0 + box.w >= width else overlap)
    return wy[:, None] * wx[None, :]


class PatchCanvas:
    """Weighted sum of refined patches (pixels, [C, ...]) over ``region`` of a height x width image (default: all of
    it); reading a box gives the blend so far where any patch landed and ``fallback`` elsewhere. Memory: the region
    (the union of the planned patches), not the image, times C + 1 planes."""

    def __init__(self, channels: int, height: int, width: int, overlap: int, region: Optional[PatchBox] = None):
        self.region = region or PatchBox(0, 0, height, width)
        self.height, self.width, self.overlap = height, width, overlap
        self.acc = torch.zeros(channels, self.region.h, self.region.w)
        self.wsum = torch.zeros(1, self.region.h, self.region.w)

    def _local(self, box: PatchBox) -> tuple[slice, slice]:
        r = self.region
        if box.y0 < r.y0 or box.x0 < r.x0 or box.y0 + box.h > r.y0 + r.h or box.x0 + box.w > r.x0 + r.w:
            raise ValueError(f"{box} lies outside the canvas region {r}")
        return slice(box.y0 - r.y0, box.y0 - r.y0 + box.h), slice(box.x0 - r.x0, box.x0 - r.x0 + box.w)

    def add(self, box: PatchBox, pixels: torch.Tensor) -> None:
        """pixels: [C, h, w] of ``box``."""
        w = patch_weights(box, self.height, self.width, self.overlap)
        ys, xs = self._local(box)
        self.acc[:, ys, xs] += pixels.float().cpu() * w
        self.wsum[:, ys, xs] += w

    def read(self, box: PatchBox, fallback: torch.Tensor) -> torch.Tensor:
        """[C, h, w]: the blend where patches landed, ``fallback`` ([C, h, w]) elsewhere."""
        ys, xs = self._local(box)
        ws = self.wsum[:, ys, xs]
        return torch.where(ws > 0, self.acc[:, ys, xs] / ws.clamp_min(1e-12), fallback)

    def composite_into(self, out: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, band: int = 256) -> None:
        """Writes ``image · (1 − m) + blend · m`` where the mask ([H, W], soft) is > 0 into ``out`` ([C, H, W], any
        strides: e.g. a view of the node's output; a copy of the image); everything else of ``out`` is left as it is.
        image: [C, H, W] (any strides). Works in bands of rows, so temporaries stay small at 4K."""
        H, W = mask.shape[-2:]
        r = self.region
        if int((mask > 0).sum()) != int((mask[r.y0:r.y0 + r.h, r.x0:r.x0 + r.w] > 0).sum()):
            raise RuntimeError("patch plan left masked pixels uncovered (outside every planned patch)")
        for y in range(r.y0, min(r.y0 + r.h, H), band):
            y1 = min(y + band, r.y0 + r.h, H)
            x1 = min(r.x0 + r.w, W)
            m = mask[y:y1, r.x0:x1].float()[None]                                   # [1, b, w]
            inside = m > 0
            if not bool(inside.any()):
                continue
            ws = self.wsum[:, y - r.y0:y1 - r.y0, :x1 - r.x0]
            if bool((inside & (ws <= 0)).any()):
                raise RuntimeError("patch plan left masked pixels uncovered")
            blend = self.acc[:, y - r.y0:y1 - r.y0, :x1 - r.x0] / ws.clamp_min(1e-12)
            img = image[:, y:y1, r.x0:x1].float()
            mixed = torch.where(inside, img * (1 - m) + blend * m, img)
            out[:, y:y1, r.x0:x1] = mixed.to(out.dtype)


# -- the reference -----------------------------------------------------------------------------------------
def reference_aspect_problem(ref_h: int, ref_w: int, height: int, width: int, tolerance: float = 0.01) -> str | None:
    """The message when a ``ref_w`` x ``ref_h`` reference does not show the framing of a ``width`` x ``height`` image
    (1 % plus a pixel of rounding on either side), else None."""
    a, b = ref_w / ref_h, width / height
    slack = tolerance + 1.5 / min(ref_h, ref_w)          # one pixel of rounding on either side
    if abs(a / b - 1) <= slack:
        return None
    return (f"expected a reference with the aspect ratio of the {width}x{height} image ({b:.4f}); got a reference of "
            f"{ref_w}x{ref_h} (aspect {a:.4f}). Give the stage-1 result of this image, resized with its aspect ratio "
            "kept (Downscale For Stage 1 does)")


def check_reference_aspect(ref_h: int, ref_w: int, height: int, width: int, tolerance: float = 0.01) -> None:
    """The reference must show the same framing as the image (up to rounding when it was downscaled)."""
    problem = reference_aspect_problem(ref_h, ref_w, height, width, tolerance)
    if problem:
        raise ValueError(problem)


def sample_reference(reference: torch.Tensor, box: PatchBox, height: int, width: int,
                     mode: str = "bicubic") -> torch.Tensor:
    """The pixels of ``box`` in ``reference`` resized to ``height`` x ``width``, without resizing all of it.

    reference: [B, C, h, w]. Equals ``F.interpolate(reference, (height, width), mode=mode, align_corners=False)``
    cropped to the box (half-pixel centres, borders clamped)."""
    B, _, rh, rw = reference.shape
    ys = (torch.arange(box.y0, box.y0 + box.h, dtype=torch.float64) + 0.5) / height * 2 - 1
    xs = (torch.arange(box.x0, box.x0 + box.w, dtype=torch.float64) + 0.5) / width * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).to(reference.dtype)[None].expand(B, -1, -1, -1)
    # grid_sample's normalised coordinate c maps to source pixel ((c + 1) * size - 1) / 2, the same half-pixel
    # convention as interpolate(align_corners=False) with scale size/height.
    return F.grid_sample(reference, grid, mode=mode, padding_mode="border", align_corners=False)


def reference_region(box: PatchBox, height: int, width: int, ref_h: int, ref_w: int, context: float,
                     cap: tuple[int, int]) -> tuple[PatchBox, tuple[int, int]]:
    """Where a patch lies in a reference latent of ref_h x ref_w cells, grown by ``context`` around its centre and
    shifted inside; and the size that region is resized to: itself, or scaled down to fit ``cap`` (the patch's own
    latent size, so the reference never costs more tokens than the patch).

    box: the patch in image pixels; height, width: the (padded) image size; results in latent cells."""
    sy, sx = ref_h / height, ref_w / width
    rh = min(ref_h, max(1, math.ceil(box.h * sy * context)))
    rw = min(ref_w, max(1, math.ceil(box.w * sx * context)))
    cy, cx = (box.y0 + box.h / 2) * sy, (box.x0 + box.w / 2) * sx
    y0 = min(max(round(cy - rh / 2), 0), ref_h - rh)
    x0 = min(max(round(cx - rw / 2), 0), ref_w - rw)
    f = min(1.0, cap[0] / rh, cap[1] / rw)
    return PatchBox(y0, x0, rh, rw), (max(1, round(rh * f)), max(1, round(rw * f)))
