"""Attention sites: the places in a UNet where a patch acts, named the way ComfyUI's attention patches see them.

A site is ``(block kind, block id, transformer index)``: ComfyUI's ``transformer_options["block"]`` (``("input",
4)``, ``("middle", 0)``, ``("output", 3)``) plus ``transformer_options["block_index"]``, the index of the
transformer block inside that UNet block. Every module that names sites uses these helpers; none rebuilds them.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

Site = tuple[str, int, int]
BLOCK_ORDER = {"input": 0, "middle": 1, "output": 2}      # the UNet's forward order of block kinds


def site_of(transformer_options: Mapping) -> Optional[Site]:
    """The site of the attention call ``transformer_options`` (an ``extra_options`` dict) belongs to; None outside
    a UNet block."""
    block = transformer_options.get("block")
    return None if block is None else (block[0], block[1], transformer_options.get("block_index", 0))


def site_name(site: Site) -> str:
    """A module-name-safe spelling of a site ("output_3_1")."""
    return "_".join(str(s) for s in site)


def site_order(site: Site) -> tuple[int, int, int]:
    """Sort key: the order in which the UNet's forward reaches the sites."""
    return BLOCK_ORDER[site[0]], site[1], site[2]


def latent_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of a UNet level with ``tokens`` positions, for a latent of height x width (each level halves,
    rounding up, as a stride-2 conv with padding 1 does)."""
    h, w = height, width
    while h * w > tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w == tokens:
        return h, w
    raise ValueError(f"cannot place {tokens} attention tokens on a {width}x{height} latent")
