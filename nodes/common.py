"""ComfyUI glue shared by every node: the pack's model folders, precision choices, ModelPatcher wrapping and the
[start_percent, end_percent] inputs of a model patch. Tensor layout lives in ``layout``, patch objects' shared
skeleton in ``patching``, version-sensitive ComfyUI calls in ``comfy_compat``."""
from __future__ import annotations

import enum
import os
from typing import Optional

import torch

import comfy.model_management as mm

from ..models.weights import WEIGHT_EXTENSIONS
from . import checks
from . import comfy_compat as compat
from .comfy_compat import io

# Model folders of the pack, under ComfyUI's models/ directory (also settable in extra_model_paths.yaml).
MODEL_FOLDERS = {
    "asuka": "ASUKA: mae_300.pth, asuka_alignment_*.pt, txt_256.pt, vec.pt, asuka_decoder.ckpt",
    "inpaint_branch": "PainterNet (ours), BrushNet SD1.5/SDXL and PowerPaint-v2 diffusion_pytorch_model.safetensors",
    "largen": "LAR-Gen: largen_ckpt_s22k.pth, ip-adapter-plus_sdxl_vit-h.bin, RefineNet files",
    "patch_adapter": "Patch-Adapter: Dual Context / Reference Patch Adapter files in our safetensors format",
}
# More default directories a folder also lists (ComfyUI/models/<name>): LAR-Gen's resampler is IP-Adapter-Plus's
# file, which users of IPAdapter nodes keep in models/ipadapter already.
EXTRA_DEFAULT_DIRS = {"largen": ("ipadapter",)}
NONE = "none"


def register_model_folders() -> None:
    """Add the pack's folders to ComfyUI's registry without dropping paths a user configured already."""
    for name in MODEL_FOLDERS:
        defaults = [os.path.join(compat.models_dir(), d) for d in (name, *EXTRA_DEFAULT_DIRS.get(name, ()))]
        compat.register_folder(name, defaults, set(WEIGHT_EXTENSIONS))


def model_files(folder: str, allow_none: bool = False) -> list[str]:
    return ([NONE] if allow_none else []) + compat.folder_files(folder)


def model_path(folder: str, name: str) -> Optional[str]:
    """Full path of a file chosen from a registered folder ("none" -> None). Only registered folders resolve."""
    if name == NONE:
        return None
    try:
        return compat.full_path(folder, name)
    except FileNotFoundError:
        raise checks.InputError(f"expected a file of models/{folder}; got {name!r}, which is not there. Put the file "
                                f"into ComfyUI/models/{folder} (or a path of extra_model_paths.yaml) and refresh"
                                ) from None


class Precision(str, enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


_FIXED_DTYPES = {Precision.FLOAT32: torch.float32, Precision.BFLOAT16: torch.bfloat16,
                 Precision.FLOAT16: torch.float16}


def resolve_dtype(choice: str, device: torch.device, params: int = 0) -> torch.dtype:
    """``auto``: bfloat16 where the device supports it, else float16, else float32 (CPU: float32)."""
    if choice not in checks.options(Precision):
        raise checks.InputError(checks.option_problem("dtype", choice, checks.options(Precision)))
    fixed = _FIXED_DTYPES.get(Precision(choice))
    if fixed is not None:
        return fixed
    if mm.should_use_bf16(device, model_params=params, prioritize_performance=False):
        return torch.bfloat16
    if mm.should_use_fp16(device, model_params=params, prioritize_performance=False):
        return torch.float16
    return torch.float32


def wrap_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """Hand a network to ComfyUI's model management (loaded to the GPU when used, offloaded after)."""
    module.to(offload_device)
    return compat.model_patcher(module, load_device, offload_device)


# -- the [start_percent, end_percent] range of a model patch -------------------------------------------------
def percent_inputs(what: str = "the patch") -> list:
    return [io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                           tooltip=f"Where in sampling {what} starts acting (0 = the first step)"),
            io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                           tooltip=f"Where {what} stops acting (1 = the last step)")]


def percent_problem(start_percent: Optional[float], end_percent: Optional[float]) -> Optional[str]:
    """The message when the [start_percent, end_percent] window is not one (each in [0, 1], start <= end); a value
    that is None arrives by link and is checked at execute."""
    return checks.first(checks.number_problem("start_percent", start_percent, 0.0, 1.0),
                        checks.number_problem("end_percent", end_percent, 0.0, 1.0),
                        None if checks.linked(start_percent, end_percent) or start_percent <= end_percent else
                        f"expected start_percent <= end_percent; got start_percent {start_percent} > end_percent "
                        f"{end_percent}. Swap them (the patch would never act)")


def check_percent_range(start_percent: Optional[float], end_percent: Optional[float]):
    """For a node's validate_inputs: True, or the message (True when a value arrives by link)."""
    return checks.verdict(percent_problem(start_percent, end_percent))


class CheckedNode(io.ComfyNode):
    """A node whose inputs are checked twice: in ``validate_inputs`` for the values typed into widgets, and again in
    ``execute`` (:meth:`check_inputs`) where the values that arrive by link exist. Checked: every number of the
    schema within its min/max, every combo value among its options (ComfyUI 0.3.64 checks neither for a node with
    ``validate_inputs``, nor V3 combos), and the node's own :meth:`problem`."""

    @classmethod
    def problem(cls, **values) -> Optional[str]:
        """The node's own checks between values ("expected ...; got ..."); a value may be None (linked)."""
        return None

    @classmethod
    def input_problem(cls, values: dict) -> Optional[str]:
        return checks.widget_problem(cls, values) or cls.problem(**values)

    @classmethod
    def validate_inputs(cls, **values):
        return checks.verdict(cls.input_problem(values))

    @classmethod
    def check_inputs(cls, **values) -> None:
        """For ``execute``: the checks of ``validate_inputs`` on the values the node really got."""
        checks.enforce(cls, lambda: cls.input_problem(values))


class PercentRangeNode(CheckedNode):
    """A node with :func:`percent_inputs`: a start after the end is refused before the graph runs when typed in, and
    when the node executes when linked (:func:`patching.sigma_range` checks it again for every patch)."""

    @classmethod
    def problem(cls, start_percent=None, end_percent=None, **values) -> Optional[str]:
        return percent_problem(start_percent, end_percent)
