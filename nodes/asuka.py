"""ASUKA nodes: MAE-prior conditioning and the harmonizing decoder."""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.utils

from ..models import asuka
from ..models.harmonizing_decoder import decode_tiled, tile_count
from ..models.harmonizing_stream import StreamingDecode
from . import checks
from . import comfy_compat as compat
from .common import CheckedNode, Precision, model_files, model_path, resolve_dtype, wrap_patcher
from .accepts import latent_family
from .comfy_compat import io
from .layout import bchw_to_image, centre_crop_to_multiple, image_and_mask, match_batches

log = logging.getLogger(__name__)
CATEGORY = "inpaint/consistent/ASUKA"
AsukaPriorType = io.Custom("ASUKA_PRIOR")
DecoderType = io.Custom("HARMONIZING_DECODER")
OOM_TILE = 1024          # px: the exact tiles a whole-image decode falls back to when it runs out of GPU memory
MIN_TILE = 64            # px: the smallest tile (the input's step)


class Tiling(str, enum.Enum):
    EXACT = "exact"                  # equals the whole-image decode (models/harmonizing_stream.py)
    INDEPENDENT = "independent"      # each tile decoded on its own and blended (models/harmonizing_decoder.py)


@dataclass(frozen=True)
class AsukaPrior:
    """Loaded ASUKA prior: MAE + alignment(s) in ModelPatchers, and the null embeddings. Immutable."""
    mae: object
    tokens: object
    pooled: Optional[object]
    nulls: asuka.NullEmbeddings

    def models(self) -> list:
        return [p for p in (self.mae, self.tokens, self.pooled) if p is not None]

    @torch.no_grad()
    def encode(self, image: torch.Tensor, mask: torch.Tensor, weight: float):
        """image [B,3,H,W] in [0,1], mask [B,1,H,W] -> (tokens [B,L,D], pooled [B,D'] | None, preview [B,3,256,256])."""
        mm.load_models_gpu(self.models())
        device = self.mae.load_device
        prior, preview = self.mae.model(image.to(device), mask.to(device), reconstruct=True)
        tokens, pooled = asuka.asuka_condition(prior, self.tokens.model,
                                               self.pooled.model if self.pooled is not None else None,
                                               self.nulls, weight)
        out_device = mm.intermediate_device()
        return tokens.to(out_device), None if pooled is None else pooled.to(out_device), preview.to(out_device)


@dataclass(frozen=True)
class HarmonizingDecoder:
    patcher: object

    @property
    def config(self):
        return self.patcher.model.config

    def models(self) -> list:
        return [self.patcher]


class ASUKALoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintASUKALoader",
            display_name="Load ASUKA Prior",
            category=CATEGORY,
            description="Loads ASUKA's MAE prior, alignment module(s) and null embeddings from models/asuka.",
            inputs=[
                io.Combo.Input("mae", options=model_files("asuka"), tooltip="MAE prior, e.g. mae_300.pth"),
                io.Combo.Input("alignment", options=model_files("asuka"),
                               tooltip="Alignment producing the condition tokens: asuka_alignment_t5.pt (FLUX.1-Fill) "
                                       "or an SD1.5 alignment (768-wide tokens)"),
                io.Combo.Input("alignment_pooled", options=model_files("asuka", allow_none=True),
                               tooltip="Alignment for the pooled vector: asuka_alignment_clip.pt (FLUX); none for SD"),
                io.Combo.Input("null_tokens", options=model_files("asuka", allow_none=True),
                               tooltip="Null token embedding mixed with the prior: txt_256.pt (FLUX); none for SD"),
                io.Combo.Input("null_pooled", options=model_files("asuka", allow_none=True),
                               tooltip="Null pooled embedding: vec.pt (FLUX); none for SD"),
                io.Combo.Input("dtype", options=Precision, default=Precision.AUTO,
                               tooltip="auto: bfloat16 where supported, else float16, float32 on CPU", optional=True),
            ],
            outputs=[AsukaPriorType.Output(display_name="ASUKA_PRIOR")],
        )

    @classmethod
    def execute(cls, mae, alignment, alignment_pooled, null_tokens, null_pooled, dtype=Precision.AUTO.value):
        cls.check_inputs(mae=mae, alignment=alignment, alignment_pooled=alignment_pooled, null_tokens=null_tokens,
                         null_pooled=null_pooled, dtype=dtype)
        with checks.named(cls):
            return io.NodeOutput(load_prior(mae, alignment, alignment_pooled, null_tokens, null_pooled, dtype))


def load_prior(mae, alignment, alignment_pooled, null_tokens, null_pooled, dtype) -> AsukaPrior:
    """The files chosen in Load ASUKA Prior (names in models/asuka, "none" for none) -> an AsukaPrior."""
    device, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
    kw = compat.build_kwargs(device)
    dt = resolve_dtype(dtype, device)
    mae_m = asuka.load_mae(model_path("asuka", mae), dt, **kw)
    tok_m = asuka.load_alignment(model_path("asuka", alignment), dt, **kw)
    pooled_path = model_path("asuka", alignment_pooled)
    pool_m = asuka.load_alignment(pooled_path, dt, **kw) if pooled_path else None
    nt, npool = model_path("asuka", null_tokens), model_path("asuka", null_pooled)
    nulls = asuka.NullEmbeddings(asuka.load_null_tokens(nt) if nt else None,
                                 asuka.load_null_pooled(npool) if npool else None)
    asuka.check_compatible(mae_m, tok_m, pool_m, nulls)
    return AsukaPrior(wrap_patcher(mae_m, device, offload), wrap_patcher(tok_m, device, offload),
                      wrap_patcher(pool_m, device, offload) if pool_m is not None else None, nulls)


class ASUKAConditioning(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintASUKAConditioning",
            display_name="ASUKA Prior Conditioning",
            category=CATEGORY,
            description="Replaces the text conditioning with ASUKA's aligned MAE prior of the masked image.",
            inputs=[
                AsukaPriorType.Input("asuka_prior"),
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = area to inpaint"),
                io.Float.Input("condition_weight", default=0.5, min=0.0, max=2.0, step=0.01,
                               tooltip="w in null + w·(prior − null); the authors use 0.5. Ignored for outputs "
                                       "without a null embedding (SD variant)"),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING"),
                     io.Image.Output(display_name="prior_preview",
                                     tooltip="The MAE reconstruction, resized to the input size")],
        )

    @classmethod
    def execute(cls, asuka_prior, image, mask, condition_weight):
        cls.check_inputs(condition_weight=condition_weight)
        with checks.named(cls):
            img, m = image_and_mask(image, mask)
        tokens, pooled, preview = asuka_prior.encode(img, m, condition_weight)
        extra = {} if pooled is None else {"pooled_output": pooled}
        preview = F.interpolate(preview, size=img.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
        return io.NodeOutput([[tokens, extra]], bchw_to_image(preview))


class HarmonizingDecoderLoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintHarmonizingDecoderLoader",
            display_name="Load Harmonizing Decoder",
            category=CATEGORY,
            description="Loads ASUKA's harmonizing VAE decoder (asuka_decoder.ckpt; 16-channel FLUX or 4-channel SD).",
            inputs=[io.Combo.Input("decoder", options=model_files("asuka"), tooltip="asuka_decoder.ckpt"),
                    io.Combo.Input("dtype", options=Precision, default=Precision.AUTO, optional=True)],
            outputs=[DecoderType.Output(display_name="HARMONIZING_DECODER")],
        )

    @classmethod
    def execute(cls, decoder, dtype=Precision.AUTO.value):
        cls.check_inputs(decoder=decoder, dtype=dtype)
        device, offload = mm.vae_device(), mm.vae_offload_device()
        with checks.named(cls):
            module = asuka.load_decoder(model_path("asuka", decoder), resolve_dtype(dtype, device),
                                        **compat.build_kwargs(device))
        return io.NodeOutput(HarmonizingDecoder(wrap_patcher(module, device, offload)))


def crop_to_latent(x: torch.Tensor, h: int, w: int, name: str) -> torch.Tensor:
    """Centre-crop [B,C,H,W] to h x w when H, W only differ by the rounding core InpaintModelConditioning does."""
    H, W = x.shape[-2:]
    if (H, W) == (h, w):
        return x
    cropped = centre_crop_to_multiple(x) if min(H, W) >= 8 else x
    if tuple(cropped.shape[-2:]) != (h, w):
        raise checks.InputError(
            f"expected {name} of the size the latent decodes to ({w}x{h}, or that size before rounding down to a "
            f"multiple of 8); got: the latent decodes to {w}x{h} but {name} is {W}x{H}. Pass the image the latent "
            "was made from, or resize the latent's image first")
    return cropped


def latent_problem(z, cfg) -> str | None:
    """The message when ``z`` (samples["samples"]) cannot be decoded by a decoder of ``cfg``."""
    if not isinstance(z, torch.Tensor) or z.ndim != 4:
        return (f"expected samples to be an image latent [batch, channels, height, width]; got "
                f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}. Decode video or audio "
                "latents with their own VAE")
    if z.shape[1] != cfg.z_channels:
        return (f"expected a latent with {cfg.z_channels} channels ({latent_family(cfg.z_channels)} latent, as this "
                f"harmonizing decoder decodes); got {z.shape[1]} channels ({latent_family(z.shape[1])} latent). Load "
                "the harmonizing decoder of the model family that made the latent")
    if 0 in z.shape:
        return f"expected a latent of at least 1x1; got shape {tuple(z.shape)}"
    if not torch.isfinite(z).all():
        return "expected samples without NaN or infinite values; got some. The sampler diverged; check its inputs"
    return None


class HarmonizingDecode(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentInpaintHarmonizingDecode",
            display_name="Harmonizing Decode",
            category=CATEGORY,
            description="VAE-decodes a LATENT with the original image and mask so the fill matches the known colours.",
            inputs=[
                io.Latent.Input("samples"),
                DecoderType.Input("decoder"),
                io.Image.Input("image", tooltip="The original image (known pixels come from here)"),
                io.Mask.Input("mask", tooltip="1 = inpainted area"),
                io.Int.Input("tile_size", default=0, min=0, max=8192, step=64,
                             tooltip="Decode in tiles of this many pixels (0 = whole image; falls back to exact "
                                     "1024 px tiles on out-of-memory)"),
                io.Int.Input("overlap", default=64, min=0, max=1024, step=8,
                             tooltip="Tile overlap in pixels, blended linearly (independent tiling only)"),
                io.Combo.Input("tiling", options=Tiling, default=Tiling.EXACT, optional=True,
                               tooltip="exact: equals the whole-image decode (GroupNorm statistics and attention "
                                       "shared across tiles; feature maps kept in system RAM). independent: each "
                                       "tile decoded on its own and blended (least memory, not identical)"),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def problem(cls, tile_size=None, overlap=None, tiling=None, **values):
        if tile_size and tile_size < MIN_TILE:
            return f"expected tile_size 0 (whole image) or at least {MIN_TILE} pixels; got {tile_size}"
        if tile_size and overlap is not None and tiling == Tiling.INDEPENDENT and overlap >= tile_size:
            return f"expected overlap smaller than tile_size ({tile_size}); got {overlap}"
        return None

    @classmethod
    @torch.no_grad()
    def execute(cls, samples, decoder, image, mask, tile_size, overlap, tiling=Tiling.EXACT.value):
        cls.check_inputs(tile_size=tile_size, overlap=overlap, tiling=tiling)
        z = samples.get("samples") if isinstance(samples, dict) else None
        cfg = decoder.config
        checks.enforce(cls, latent_problem, z, cfg)
        f = cfg.factor
        h, w = z.shape[-2] * f, z.shape[-1] * f
        with checks.named(cls):
            img, m = image_and_mask(image, mask)
            img, m = crop_to_latent(img, h, w, "image"), crop_to_latent(m, h, w, "mask")
            z, img = match_batches(z, img, ("latent", "image"))
            _, m = match_batches(z, m, ("latent", "mask"))
        mm.load_models_gpu(decoder.models())
        out = harmonized_decode(decoder.patcher, z, img * 2 - 1, m, tile_size, overlap, Tiling(tiling))
        return io.NodeOutput(bchw_to_image(out))


def _run_on(patcher):
    """decode(z, image, mask) on the decoder's device -> float32."""
    device = patcher.load_device
    return lambda z, image, mask: patcher.model(z.to(device), image.to(device), mask.to(device)).float()


def _decode_exact(patcher, z, image, mask, tile_size: int, overlap: int) -> torch.Tensor:
    """Layer-synchronous tiles (models/harmonizing_stream.py): equals the whole-image decode."""
    stream = StreamingDecode(patcher.model, patcher.load_device, patcher.offload_device, tile_size)
    pbar = comfy.utils.ProgressBar(stream.tile_passes(z.shape[-2], z.shape[-1]))
    stream.on_step = lambda: pbar.update(1)
    return stream(z, image, mask)


def _decode_independent(patcher, z, image, mask, tile_size: int, overlap: int) -> torch.Tensor:
    """Each tile decoded on its own, overlaps blended (models/harmonizing_decoder.py)."""
    f = patcher.model.config.factor
    tile, ov = max(tile_size // f, 1), overlap // f
    pbar = comfy.utils.ProgressBar(tile_count(z.shape[-2], z.shape[-1], tile, ov))
    return decode_tiled(_run_on(patcher), z, image.cpu(), mask.cpu(), f, tile, ov, on_tile=lambda: pbar.update(1))


_TILED_DECODE = {Tiling.EXACT: _decode_exact, Tiling.INDEPENDENT: _decode_independent}


def harmonized_decode(patcher, z, image, mask, tile_size: int, overlap: int, tiling: str = Tiling.EXACT
                      ) -> torch.Tensor:
    """-> [B,3,H,W] in [0,1]. Whole-image decode unless tile_size > 0 or the whole decode runs out of memory."""
    if tile_size <= 0:
        try:
            return ((_run_on(patcher)(z, image, mask).cpu() + 1) / 2).clamp(0, 1)
        except compat.OOM_EXCEPTION:
            if not torch.cuda.is_available():
                raise
            mm.soft_empty_cache(True)
            log.warning("Harmonizing decode ran out of memory; retrying in exact %d px tiles", OOM_TILE)
            tile_size, tiling = OOM_TILE, Tiling.EXACT
    out = _TILED_DECODE[Tiling(tiling)](patcher, z, image, mask, tile_size, overlap)
    return ((out.cpu() + 1) / 2).clamp(0, 1)


NODES = [ASUKALoader, ASUKAConditioning, HarmonizingDecoderLoader, HarmonizingDecode]
