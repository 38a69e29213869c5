"""What the LAR-Gen and Patch-Adapter nodes check before any work (issue 19), in the one refusal style of
``nodes.checks``: widget values against the node's own schema (ranges and combo options — ComfyUI 0.3.64 checks
neither for a value that arrives by link, nor ranges of an input its ``validate_inputs`` names, nor combos of V3
nodes at all), the model and VAE families a node works on, and image sizes.

Every check returns an ``InputError`` or None, so ``validate_inputs`` can return its text and ``execute`` raise it.
"""
from __future__ import annotations

import contextlib
import enum
from typing import Optional

from . import checks
from .checks import InputError
from .comfy_compat import io

def node_name(node) -> str:
    """The display name of a node class (or a name already). In ``execute`` ComfyUI hands a locked clone of the class,
    whose ``GET_SCHEMA`` cannot cache, so the schema is built afresh."""
    if isinstance(node, str):
        return node
    try:
        return node.define_schema().display_name or node.__name__
    except Exception:                     # not a ComfyUI node (tests, trainers)
        return checks.display_name(node)


def refuse(node, expected: str, given: str, fix: str = "") -> InputError:
    """``nodes.checks.refuse`` with the node's display name resolved (also on a locked clone); ``given`` loses a
    final full stop, as it may be another error's text."""
    return checks.refuse(node_name(node), expected, given.rstrip(". "), fix)


# How many options of a combo a message lists (model-file combos can be long).
LISTED_OPTIONS = 12


def _options(inp) -> list:
    return [o.value if isinstance(o, enum.Enum) else o for o in (inp.options or [])]


def widget_problem(cls, values: dict) -> Optional[InputError]:
    """The first widget value of ``values`` outside the node's schema: a number outside [min, max], or a combo value
    not among its options. ``None`` values (driven by a link, not known yet) are skipped."""
    for inp in cls.define_schema().inputs:          # (GET_SCHEMA caches on the class, locked in execute)
        v = values.get(inp.id)
        if v is None:
            continue
        if isinstance(inp, (io.Int.Input, io.Float.Input)):
            lo, hi = inp.min, inp.max
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                return refuse(cls, f"{inp.id} to be a number", repr(v))
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                return refuse(cls, f"{inp.id} between {lo} and {hi}", repr(v), "Change the value (or the node "
                              "that drives it).")
        elif isinstance(inp, io.Combo.Input):
            opts = _options(inp)
            if opts and v not in opts:
                shown = opts if len(opts) <= LISTED_OPTIONS else [*opts[:LISTED_OPTIONS], "…"]
                return refuse(cls, f"{inp.id} to be one of {shown}", repr(v))
    return None


def percent_problem(cls, start_percent, end_percent) -> Optional[InputError]:
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        return refuse(cls, "start_percent <= end_percent", f"start_percent {start_percent} after end_percent "
                      f"{end_percent}", "The patch would never act; swap them or lower start_percent.")
    return None


def first(*problems) -> Optional[InputError]:
    return next((p for p in problems if p is not None), None)


def as_validation(problem: Optional[InputError]):
    """For ``validate_inputs``: True, or the message."""
    return True if problem is None else str(problem)


def raise_if(problem: Optional[InputError]) -> None:
    if problem is not None:
        raise problem


class Checked:
    """Mixin for a V3 node: ``validate_inputs`` checks every widget value against the schema (plus the node's own
    ``more_problems``), deferring values that arrive by link, and ``execute`` calls ``cls.check_inputs(**values)``
    to run the same checks on the values it really got."""

    @classmethod
    def more_problems(cls, values: dict) -> Optional[InputError]:
        """Checks across inputs (None values: not known yet)."""
        return None

    @classmethod
    def input_problem(cls, values: dict) -> Optional[InputError]:
        return first(widget_problem(cls, values),
                     percent_problem(cls, values.get("start_percent"), values.get("end_percent")),
                     cls.more_problems(values))

    @classmethod
    def validate_inputs(cls, **values):
        return as_validation(cls.input_problem(values))

    @classmethod
    def check_inputs(cls, **values) -> None:
        raise_if(cls.input_problem(values))


# -- model and VAE families ---------------------------------------------------------------------------------------
def model_family(model) -> str:
    """A MODEL's family as a user knows it (ComfyUI's model class: SD15 / SDXL / Flux / …)."""
    base = getattr(model, "model", None)
    name = type(base).__name__
    return {"BaseModel": "SD1.5", "SD15_instructpix2pix": "SD1.5"}.get(name, name)


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def require_unet(cls, model, families: str) -> None:
    """The MODEL must be a UNet (input/middle/output blocks; the patches' attention routes); ``families`` names
    the ones the node works on."""
    unet = model.get_model_object("diffusion_model")
    if not hasattr(unet, "input_blocks"):
        raise refuse(cls, f"a {families} UNet MODEL", f"a {model_family(model)} model (no UNet blocks; the node's "
                     "attention patches would never fire)", f"Connect a {families} model.")


def require_sdxl(cls, model, what: str) -> None:
    """An SDXL UNet: the size/pooled vector the LAR-Gen patches read."""
    require_unet(cls, model, "SDXL")
    if getattr(model.model, "adm_channels", 0) != 2816:
        raise refuse(cls, f"an SDXL MODEL ({what})", f"a {model_family(model)} model",
                     "Connect the MODEL from Load LAR-Gen (or another SDXL model).")


def require_vae_of(cls, vae, model) -> None:
    """The VAE's latent must be the MODEL's (4 channels for SD1.5/SDXL, 16 for FLUX, …)."""
    want, got = latent_channels(model), getattr(vae, "latent_channels", None)
    if got != want:
        raise refuse(cls, f"a VAE of the model's family ({model_family(model)}: {want} latent channels)",
                     f"a VAE with {got} latent channels" + (" (e.g. FLUX's)" if got == 16 else ""),
                     f"Connect the {model_family(model)} VAE.")


def require_size(cls, name: str, image, smallest: int) -> None:
    """IMAGE/MASK ``name`` at least ``smallest`` pixels on each side (height, width are the two dims before the
    channels of an IMAGE, the last two of a MASK)."""
    h, w = (image.shape[-3], image.shape[-2]) if image.ndim == 4 else image.shape[-2:]
    if h < smallest or w < smallest:
        raise refuse(cls, f"{name} of at least {smallest}x{smallest} pixels", f"{w}x{h}")


@contextlib.contextmanager
def named(cls):
    """Inside: a plain ValueError of the shared layout helpers (which say what was expected and what came) is
    re-raised with the node's display name in front, as every refusal of the node reads."""
    try:
        yield
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{node_name(cls)}: {e}") from e


def require_rows(node, what: str, have: int, rows: int) -> None:
    """A patch's per-image input (``have`` rows) against the latent batch of the model call (``rows``): one for all,
    or one each."""
    if have not in (1, rows):
        raise refuse(node, f"one {what}, or one per latent of the batch ({rows})", f"{have} {what}s",
                     f"Give one {what}, or {rows}.")
