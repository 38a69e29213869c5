"""Training Mask: the masks PainterNet trains on, drawn in a graph (to look at them, or to test an inpaint graph
with the kinds of masks users paint)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..models import masks
from .common import check_finite

CATEGORY = "inpaint/consistent/training"
KINDS = ["mix (PainterNet 25/50/25)", *masks.PAINTER_KINDS]


class TrainingMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintTrainingMask",
            display_name="Training Mask (PainterNet)",
            category=CATEGORY,
            description="Draws PainterNet's training masks from a region mask: its bounding box pushed out at random, "
                        "an irregular finger-painted mask (the region dilated, then strokes), or the region itself; "
                        "'mix' picks one per image with the paper's 25/50/25 odds. Without a region mask, a random "
                        "ellipse stands in for it.",
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
            region = region[None] if region.ndim == 2 else region
            if region.ndim != 3:
                raise ValueError(f"region must be a MASK [batch, H, W]; got shape {tuple(region.shape)}")
            check_finite(region, "region")
            segs = [r.float().cpu() for r in region]
        else:
            segs = [masks.random_blob(height, width, g) for _ in range(batch_size)]
        out, kinds = [], []
        for seg in segs:
            m, k = masks.painter_mask(seg, g) if kind == KINDS[0] else (masks.kind_mask(seg, kind, g), kind)
            out.append(m)
            kinds.append(k)
        return io.NodeOutput(torch.stack(out), ", ".join(kinds))


NODES = [TrainingMask]
