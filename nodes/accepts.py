"""What the LAR-Gen and Patch-Adapter nodes accept, checked before any work: the model and VAE families
they work on, the smallest images, per-image batches against the latent batch, and the node's name on the errors of
the shared helpers in ``models/``. Widget values (ranges, combos, values by link) are checked by
``nodes.common.CheckedNode``; every refusal reads as ``nodes.checks.refuse`` writes it.
"""
from __future__ import annotations

import contextlib

from ..models.weights import CheckpointFormatError
from .checks import InputError, display_name, refuse

SDXL_ADM = 2816          # SDXL's size/pooled vector, which the LAR-Gen patches read


def model_family(model) -> str:
    """A MODEL's family as a user knows it (ComfyUI's model class: SD1.5 / SDXL / Flux / …)."""
    name = type(getattr(model, "model", None)).__name__
    return {"BaseModel": "SD1.5", "SD15_instructpix2pix": "SD1.5"}.get(name, name)


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


LATENT_FAMILIES = {4: "SD1.5/SDXL", 16: "FLUX/SD3"}     # latent channels -> the model families that make them


def latent_family(channels) -> str:
    """The families a latent (or VAE) of ``channels`` channels belongs to, as users name them: "an SD1.5/SDXL"."""
    name = LATENT_FAMILIES.get(channels)
    if name is None:
        return f"a {channels}-channel"
    return ("an " if name.startswith("SD") else "a ") + name      # "an ess-dee", "a FLUX"


def require_unet(node, model, families: str) -> None:
    """The MODEL must be a UNet (input/middle/output blocks: the attention routes the patches use); ``families``
    names the ones the node works on."""
    if not hasattr(model.get_model_object("diffusion_model"), "input_blocks"):
        raise refuse(node, f"a {families} UNet MODEL", f"a {model_family(model)} model (no UNet blocks: the node's "
                     "attention patches would never fire)", f"Connect a {families} model.")


def require_sdxl(node, model, what: str) -> None:
    """An SDXL UNet (``what``: why the node needs one)."""
    require_unet(node, model, "SDXL")
    if getattr(model.model, "adm_channels", 0) != SDXL_ADM:
        raise refuse(node, f"an SDXL MODEL ({what})", f"a {model_family(model)} model",
                     "Connect the MODEL from Load LAR-Gen (or another SDXL model).")


def require_vae_of(node, vae, model) -> None:
    """The VAE's latent must be the MODEL's (4 channels for SD1.5 / SDXL, 16 for FLUX, …)."""
    want, got = latent_channels(model), getattr(vae, "latent_channels", None)
    if got != want:
        raise refuse(node, f"a VAE of the model's family ({model_family(model)}: {want} latent channels)",
                     f"a VAE with {got} latent channels ({latent_family(got)} VAE)",
                     f"Connect the {model_family(model)} VAE.")


def require_size(node, name: str, image, smallest: int) -> None:
    """IMAGE ``name`` ([B, H, W, C]) at least ``smallest`` pixels on each side."""
    h, w = image.shape[1], image.shape[2]
    if h < smallest or w < smallest:
        raise refuse(node, f"{name} of at least {smallest}x{smallest} pixels", f"{w}x{h}")


def require_rows(node, what: str, have: int, rows: int) -> None:
    """A patch's per-image input (``have`` rows) against the latent batch of a model call (``rows``): one for all,
    or one each."""
    if have not in (1, rows):
        raise refuse(node, f"one {what}, or one per latent of the batch ({rows})", f"{have} {what}s",
                     f"Give one {what}, or {rows}.")


@contextlib.contextmanager
def named(node):
    """Inside: an error of a shared helper — the layout's refusals, a loader's file errors, and the ValueErrors of
    ``models/`` (which say what was expected and what came) — is raised with the node's display name in front."""
    try:
        yield
    except (InputError, CheckpointFormatError, ValueError) as e:
        name = display_name(node)
        if str(e).startswith(f"{name}:"):
            raise
        cls = type(e) if isinstance(e, (InputError, CheckpointFormatError)) else InputError
        raise cls(f"{name}: {e}") from e
