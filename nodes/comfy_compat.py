"""Every ComfyUI call whose form depends on the core's version, in one module, so a core change is fixed here.

The node API comes from ``comfy_api.v0_0_2``, a versioned module (ComfyUI v0.3.64 has it and newer cores keep the
versioned modules they published), never from ``comfy_api.latest``, which ComfyUI documents as changing without
notice. Below it: the wrapper kinds and the attention call patches use, the model folders' registry, the sampler and
its latent previews, model detection, text/vision encoders and the VAE's latent factor. What the rest of the pack
still imports from ``comfy`` directly is the long-stable core surface (``model_management`` devices and loading,
``ModelPatcher`` patch setters, ``utils.ProgressBar``) and, in ``branch_unet``, ComfyUI's UNet blocks (DESIGN
principle 1).
"""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy.ldm.modules import attention as comfy_attention
from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401  (re-exported: the pack's one import of the node API)

# -- model patching ----------------------------------------------------------------------------------------------
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL   # around the UNet's forward, once per call
APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL           # around BaseModel.apply_model
OUTER_SAMPLE = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE         # around one whole sampling run
OOM_EXCEPTION = mm.OOM_EXCEPTION
SAMPLERS, SCHEDULERS = comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


def add_wrapper(model, kind, key: str, fn) -> None:
    """A keyed wrapper on a cloned MODEL (ComfyUI removes it with the clone)."""
    model.add_wrapper_with_key(kind, key, fn)


def attention(q, k, v, heads, extra):
    """ComfyUI's attention as its CrossAttention calls it (the user's backend, precision and overrides)."""
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"),
                                               transformer_options=extra)


def build_kwargs(device) -> dict:
    """operations + attention so weights follow ComfyUI's casting/offloading and the user's attention backend."""
    return {"operations": comfy.ops.manual_cast,
            "attention": comfy_attention.optimized_attention_for_device(device, mask=True, small_input=True)}


def cast_operations():
    """ComfyUI's weight-casting layer set (networks built from ComfyUI's own UNet blocks)."""
    return comfy.ops.manual_cast


def model_patcher(module, load_device, offload_device):
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


# -- model folders -----------------------------------------------------------------------------------------------
def register_folder(name: str, defaults: list[str], extensions: set[str]) -> None:
    """Add a folder to ComfyUI's registry without dropping paths a user configured already."""
    registry = folder_paths.folder_names_and_paths
    if name in registry:
        paths, old_exts = registry[name]
        paths.extend(d for d in defaults if d not in paths)
        registry[name] = (paths, set(old_exts) | extensions)
    else:
        registry[name] = (defaults, extensions)


def models_dir() -> str:
    return folder_paths.models_dir


def folder_files(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def full_path(folder: str, name: str) -> str:
    return folder_paths.get_full_path_or_raise(folder, name)


# -- sampling ----------------------------------------------------------------------------------------------------
def sample(model, noise, latent, settings, conds, noise_mask, callback, seed):
    """One KSampler run (``settings``: steps, cfg, sampler_name, scheduler, denoise; ``conds``: (positive, negative))
    with our own progress/preview callback; the latent gets the model's channel count first, as KSampler does."""
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    return comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                               *conds, latent, denoise=settings.denoise, noise_mask=noise_mask, callback=callback,
                               disable_pbar=True, seed=seed)


class StepPreviews:
    """Progress and live previews over several sampling runs, the way KSampler's callback (``latent_preview``) sends
    them: one bar over ``total_steps`` and, per step, a preview image of the run's current x0 decoded by the user's
    preview method (none when previews are off)."""

    PREVIEW_FORMAT = "JPEG"          # what ComfyUI's own sampler callback sends

    def __init__(self, model, total_steps: int):
        self.total = max(total_steps, 1)
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.done = 0

    def callback(self, steps: int):
        """The callback of the next run of ``steps`` steps."""
        base = self.done
        self.done += steps

        def cb(step, x0, x, total_steps):
            image = None if self.previewer is None else self.previewer.decode_latent_to_preview_image(
                self.PREVIEW_FORMAT, x0)
            self.bar.update_absolute(min(base + step + 1, self.total), self.total, image)
        return cb


# -- models and encoders -----------------------------------------------------------------------------------------
def latent_factor(vae) -> int:
    """The VAE's spatial compression (8 for SD1.5/SDXL)."""
    f = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else 8
    if not isinstance(f, int) or f < 1:
        raise ValueError(f"this VAE has no single spatial latent factor ({f!r}); use an SD1.5/SDXL VAE")
    return f


def detect_unet_config(sd: dict):
    """ComfyUI's UNet config read from an unprefixed UNet state dict (None when it recognises nothing)."""
    import comfy.model_detection
    return comfy.model_detection.detect_unet_config(sd, "")


def sdxl_model_config(unet_config: dict):
    import comfy.supported_models
    return comfy.supported_models.SDXL(unet_config)


def sd15_text_encoder(sd: dict):
    """A CLIP object from a CLIP-L state dict (ComfyUI's SD1.5 text encoder)."""
    import comfy.sd
    return comfy.sd.load_text_encoder_state_dicts([dict(sd)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


def encode_clip_vision(clip_vision, pixels):
    """-> (penultimate hidden states [S,T,W], last hidden state [S,T,W]) of IMAGE-layout pixels (centre-cropped)."""
    out = clip_vision.encode_image(pixels, crop=True)
    return out["penultimate_hidden_states"], out["last_hidden_state"]
