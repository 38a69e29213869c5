"""Training Mask: the masks PainterNet and ASUKA train on, drawn in a graph (to look at them, or to test an inpaint
graph with the kinds of masks users paint)."""
from __future__ import annotations

import enum

import torch

from ..models import masks
from . import checks
from .common import CheckedNode
from .comfy_compat import io
from .layout import mask_view_b1hw

CATEGORY = "inpaint/consistent/training"
MIN_SIDE = 16          # px: the smallest mask (and region) the node draws; the strokes are sized from the side


class MaskKind(str, enum.Enum):
    PAINTER_MIX = "mix (PainterNet 25/50/25)"
    BOX = masks.PainterKind.BOX.value
    IRREGULAR = masks.PainterKind.IRREGULAR.value
    SEGMENTATION = masks.PainterKind.SEGMENTATION.value
    ASUKA_MIX = "mix (ASUKA 50/40/10)"
    ASUKA_OBJECT = "ASUKA " + masks.AsukaKind.OBJECT.value
    ASUKA_IRREGULAR = "ASUKA " + masks.AsukaKind.IRREGULAR.value
    ASUKA_REGULAR = "ASUKA " + masks.AsukaKind.REGULAR.value


PAINTER_MIX, ASUKA_MIX = MaskKind.PAINTER_MIX.value, MaskKind.ASUKA_MIX.value
ASUKA_PREFIX = "ASUKA "


def _asuka_mix(seg, g):
    m, k = masks.asuka_mask(*seg.shape, g, seg)
    return m, ASUKA_PREFIX + k


def _painter(kind: masks.PainterKind):
    return lambda seg, g: (masks.kind_mask(seg, kind, g), kind.value)


def _asuka(kind: masks.AsukaKind):
    return lambda seg, g: (masks.asuka_kind_mask(kind, *seg.shape, g, seg), ASUKA_PREFIX + kind.value)


# kind -> draw(region [H, W], generator) -> (mask, kind drawn)
DRAW = {
    MaskKind.PAINTER_MIX: masks.painter_mask,
    MaskKind.BOX: _painter(masks.PainterKind.BOX),
    MaskKind.IRREGULAR: _painter(masks.PainterKind.IRREGULAR),
    MaskKind.SEGMENTATION: _painter(masks.PainterKind.SEGMENTATION),
    MaskKind.ASUKA_MIX: _asuka_mix,
    MaskKind.ASUKA_OBJECT: _asuka(masks.AsukaKind.OBJECT),
    MaskKind.ASUKA_IRREGULAR: _asuka(masks.AsukaKind.IRREGULAR),
    MaskKind.ASUKA_REGULAR: _asuka(masks.AsukaKind.REGULAR),
}
KINDS = checks.options(MaskKind)


def regions(cls, region, width: int, height: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """The region masks to draw from ([H, W] each): the given ones (an empty one replaced by a random ellipse, as
    without a region), or ``batch_size`` random ellipses."""
    if region is None:
        return [masks.random_blob(height, width, g) for _ in range(batch_size)]
    segs = [r.cpu() for r in mask_view_b1hw(region, "region")[:, 0]]
    H, W = segs[0].shape
    if min(H, W) < MIN_SIDE:
        raise checks.refuse(cls, f"a region mask of at least {MIN_SIDE}x{MIN_SIDE} pixels", f"{W}x{H}",
                            "Upscale the region mask (e.g. ResizeMask)")
    return [seg if bool((seg > 0.5).any()) else masks.random_blob(H, W, g) for seg in segs]


class TrainingMask(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintTrainingMask",
            display_name="Training Mask",
            category=CATEGORY,
            description="Draws PainterNet's training masks from a region mask: its bounding box pushed out at random, "
                        "an irregular finger-painted mask (the region dilated, then strokes), or the region itself; "
                        "'mix' picks one per image with the paper's 25/50/25 odds. ASUKA's mask basis: an object shape "
                        "(the region moved to a random place, joined with strokes half of the time), irregular "
                        "strokes (LaMa / Co-Mod style) or a rectangle or its complement, hole ratio 0.1-0.75; its mix "
                        "has the paper's 50/40/10 odds. Without a region mask, a random ellipse stands in for it.",
            inputs=[
                io.Combo.Input("kind", options=MaskKind, default=MaskKind.PAINTER_MIX),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
                io.Int.Input("width", default=512, min=MIN_SIDE, max=16384, step=8,
                             tooltip="Size of the random ellipse when no region mask is connected"),
                io.Int.Input("height", default=512, min=MIN_SIDE, max=16384, step=8),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Masks to draw when no region mask is connected (else one per region mask)"),
                io.Mask.Input("region", optional=True,
                              tooltip="Segmentation / region mask (1 = object), one or a batch, at least 16x16; an "
                                      "empty one is replaced by a random ellipse"),
            ],
            outputs=[io.Mask.Output(display_name="mask"), io.String.Output(display_name="kinds")],
        )

    @classmethod
    def execute(cls, kind, seed, width=512, height=512, batch_size=1, region=None):
        cls.check_inputs(kind=kind, seed=seed, width=width, height=height, batch_size=batch_size)
        g = torch.Generator().manual_seed(seed)
        with checks.named(cls):
            segs = regions(cls, region, width, height, batch_size, g)
        draw = DRAW[MaskKind(kind)]
        out, kinds = zip(*(draw(seg, g) for seg in segs))
        return io.NodeOutput(torch.stack(out), ", ".join(kinds))


NODES = [TrainingMask]
