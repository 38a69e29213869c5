"""Training entry point, run from a checkout of the pack:

    COMFYUI_PATH=/path/to/ComfyUI python train.py <method> --config method.toml [--steps 2000 ...]

Methods: painternet, asuka_mae, asuka_alignment, asuka_decoder, largen, patch_adapter.

``python train.py <method> --help`` lists every option. The methods read their models through ComfyUI (its
model loading and the pack's own nodes), so ComfyUI must be importable: ``COMFYUI_PATH`` names its folder
(not needed when the pack sits in ``ComfyUI/custom_nodes/``).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# method -> "module" (its main) or "module:function"
METHODS = {
    "painternet": "training.painternet",
    "asuka_mae": "training.asuka:main_mae",
    "asuka_alignment": "training.asuka:main_alignment",
    "asuka_decoder": "training.asuka:main_decoder",
    "largen": "training.largen",
    "patch_adapter": "training.patch_adapter",
}
PACKAGE = "consistent_inpaint"


def _comfyui_path() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else [ROOT.parent.parent]          # ComfyUI/custom_nodes/<pack>
    for c in candidates:
        if (c / "comfy" / "model_management.py").exists():
            return c
    raise SystemExit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout")


def import_pack():
    """ComfyUI on the path (its own argument parsing off), then the pack imported as a package."""
    sys.path.insert(0, str(_comfyui_path()))
    shims = os.environ.get("CONSISTENT_INPAINT_COMFY_SHIMS")     # test machines without torchvision
    if shims and shims != "none":
        sys.path.append(shims)                                   # appended: a real package always wins
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import torch
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pkg
        spec.loader.exec_module(pkg)
    return sys.modules[PACKAGE]


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in METHODS:
        raise SystemExit(f"usage: python train.py {{{','.join(METHODS)}}} --config FILE.toml [--option value ...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import_pack()
    module, _, function = METHODS[argv[0]].partition(":")
    getattr(importlib.import_module(f"{PACKAGE}.{module}"), function or "main")(argv[1:])


if __name__ == "__main__":
    main()
