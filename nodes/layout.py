"""Tensor layout: the one place ComfyUI's IMAGE [B,H,W,C] / MASK [B,H,W] become the BCHW tensors ``models/`` works
on and back, where a VAE or CLIP vision model is handed BCHW pixels, and where batches are matched.

Masks follow ComfyUI: 1 = inpaint.
"""
from __future__ import annotations

import torch

from .checks import InputError

# ComfyUI's VAEEncode / InpaintModelConditioning centre-crop an image to multiples of 8 pixels before encoding.
COMFY_ENCODE_MULTIPLE = 8


def check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"expected {name} without NaN or infinite values; got {bad} of them. Check the node that "
                         f"made {name}")


# -- IMAGE / MASK <-> BCHW ----------------------------------------------------------------------------------------
def image_to_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE [B,H,W,C] -> [B,3,H,W] float32. RGBA drops alpha; grayscale is repeated to RGB."""
    return image_view_bchw(image, name).float().contiguous()


def image_view_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE [B,H,W,C] -> a [B,3,H,W] *view* (no copy; for 4K+ images read patch by patch). RGBA drops alpha;
    grayscale is repeated to RGB."""
    if image.ndim != 4:
        raise InputError(f"expected {name} to be an IMAGE [batch, height, width, channels]; got shape "
                         f"{tuple(image.shape)}")
    if image.shape[-1] not in (1, 3, 4):
        raise InputError(f"expected {name} with RGB (3), RGBA (4) or grayscale (1) channels; got {image.shape[-1]} "
                         "channels")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise InputError(f"expected a non-empty {name}; got shape {tuple(image.shape)}")
    check_finite(image, name)
    view = image[..., :3] if image.shape[-1] >= 3 else image.expand(-1, -1, -1, 3)
    return view.permute(0, 3, 1, 2)


def mask_view_b1hw(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """MASK -> [B,1,H,W] float32 in [0,1] without copying when it already is (for 4K+ masks)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise InputError(f"expected {name} to be a MASK [batch, height, width]; got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise InputError(f"expected a non-empty {name}; got shape {tuple(mask.shape)}")
    check_finite(mask, name)
    if mask.dtype != torch.float32 or bool((mask < 0).any() or (mask > 1).any()):
        mask = mask.float().clamp(0, 1)
    return mask[:, None]


def mask_to_b1hw(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """MASK [B,H,W] or [H,W] -> [B,1,H,W] float32 in [0,1], 1 = inpaint (a copy)."""
    return mask_view_b1hw(mask, name).clone()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> IMAGE [B,H,W,3] float32 on the CPU (a copy)."""
    return x.permute(0, 2, 3, 1).float().cpu().contiguous()


def b1hw_to_mask(m: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] -> MASK [B,H,W] on the CPU."""
    return m[:, 0].cpu()


def image_copy(image: torch.Tensor) -> torch.Tensor:
    """A [B,3,H,W] view -> a float32 IMAGE-layout copy [B,H,W,3] (the output a node writes its results into)."""
    return image.permute(0, 2, 3, 1).float().clone(memory_format=torch.contiguous_format)


# -- pixels for ComfyUI's VAE and CLIP vision (they take the IMAGE layout) -----------------------------------------
def pixels_for_comfy(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> the [B,H,W,3] layout ComfyUI's VAE.encode / CLIP vision take."""
    return x.movedim(1, -1)[..., :3]


def vae_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> the VAE's raw latent."""
    return vae.encode(pixels_for_comfy(x))


def vae_decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latent -> [B,3,H,W] float32 in [0,1] on the CPU."""
    return vae.decode(latent).movedim(-1, 1)[:, :3].float().cpu()


# -- sizes and batches ----------------------------------------------------------------------------------------------
def centre_crop_to_multiple(x: torch.Tensor, multiple: int = COMFY_ENCODE_MULTIPLE) -> torch.Tensor:
    """[..., H, W] centre-cropped to multiples of ``multiple``, as ComfyUI crops before encoding."""
    H, W = x.shape[-2:]
    h, w = H // multiple * multiple, W // multiple * multiple
    if h == 0 or w == 0:
        raise InputError(f"expected an image of at least {multiple}x{multiple} pixels; got {W}x{H}. Upscale it (e.g. "
                         "ImageScale) first")
    oy, ox = (H - h) // 2, (W - w) // 2
    return x[..., oy:oy + h, ox:ox + w]


def row_batch(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """``t`` with ``rows`` rows: as is, or one row broadcast; anything else is the user's batch mismatch."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:])
    allowed = "1" if rows == 1 else f"1 or {rows}"
    raise InputError(f"expected {what} with a batch of {allowed} (the latent batch is {rows}); got a batch of "
                     f"{t.shape[0]}. Give one, or one per latent")


def match_batches(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches made equal by broadcasting a batch of 1 on either side; ``names`` name them in the error."""
    if a.shape[0] == b.shape[0]:
        return a, b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    raise InputError(f"expected a batch of 1 or {a.shape[0]} for {names[1]}; got: {names[0]} batch is {a.shape[0]} "
                     f"but {names[1]} batch is {b.shape[0]}. Give one {names[1]}, or one per {names[0]}")


def match_image_mask(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check sizes and broadcast a batch of 1 on either side. image [B,3,H,W], mask [B',1,H,W]."""
    if image.shape[-2:] != mask.shape[-2:]:
        raise InputError(f"expected the mask to be the size of the image; got: mask is {mask.shape[-1]}x"
                         f"{mask.shape[-2]} but image is {image.shape[-1]}x{image.shape[-2]}. Resize the mask (e.g. "
                         "with ResizeMask) or the image")
    return match_batches(image, mask, ("image", "mask"))


def image_and_mask(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE + MASK inputs -> (image [B,3,H,W], mask [B,1,H,W]) of one size and one batch (copies)."""
    return match_image_mask(image_to_bchw(image), mask_to_b1hw(mask))
