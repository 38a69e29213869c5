"""Training Mask: the masks PainterNet and ASUKA train on, drawn in a graph (to look at them, or to test an inpaint
graph with the kinds of masks users paint)."""
from __future__ import annotations

import torch

from ..models import masks
from .comfy_compat import io
from .layout import mask_view_b1hw

CATEGORY = "inpaint/consistent/training"
PAINTER_MIX, ASUKA_MIX = "mix (PainterNet 25/50/25)", "mix (ASUKA 50/40/10)"
ASUKA_PREFIX = "ASUKA "


def _asuka_mix(seg, g):
    m, k = masks.asuka_mask(*seg.shape, g, seg)
    return m, ASUKA_PREFIX + k


# kind -> draw(region [H, W], generator) -> (mask, kind drawn)
DRAW = {
    PAINTER_MIX: lambda seg, g: masks.painter_mask(seg, g),
    **{k: (lambda seg, g, k=k: (masks.kind_mask(seg, k, g), k)) for k in masks.PAINTER_KINDS},
    ASUKA_MIX: _asuka_mix,
    **{ASUKA_PREFIX + k: (lambda seg, g, k=k: (masks.asuka_kind_mask(k, *seg.shape, g, seg), ASUKA_PREFIX + k))
       for k in masks.ASUKA_KINDS},
}
KINDS = list(DRAW)


class TrainingMask(io.ComfyNode):
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
                io.Combo.Input("kind", options=KINDS, default=KINDS[0]),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
                io.Int.Input("width", default=512, min=16, max=16384, step=8,
                             tooltip="Size of the random ellipse when no region mask is connected"),
                io.Int.Input("height", default=512, min=16, max=16384, step=8),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Masks to draw when no region mask is connected (else one per region mask)"),
                io.Mask.Input("region", optional=True,
                              tooltip="Segmentation / region mask (1 = object), one or a batch"),
            ],
            outputs=[io.Mask.Output(display_name="mask"), io.String.Output(display_name="kinds")],
        )

    @classmethod
    def execute(cls, kind, seed, width=512, height=512, batch_size=1, region=None):
        g = torch.Generator().manual_seed(seed)
        if region is not None:
            segs = [r.cpu() for r in mask_view_b1hw(region, "region")[:, 0]]
        else:
            segs = [masks.random_blob(height, width, g) for _ in range(batch_size)]
        draw = DRAW[kind]
        out, kinds = zip(*(draw(seg, g) for seg in segs))
        return io.NodeOutput(torch.stack(out), ", ".join(kinds))


NODES = [TrainingMask]
