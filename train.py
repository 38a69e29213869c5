"""Training entry point, run from a checkout of the pack:

    COMFYUI_PATH=/path/to/ComfyUI python train.py <method> --config method.toml [--steps 2000 ...]

Methods: painternet, asuka_mae, asuka_alignment, asuka_decoder, largen, patch_adapter.

The same command runs under Hugging Face accelerate's launcher on several processes, GPUs and machines:

    accelerate launch --multi_gpu --num_processes 4 train.py painternet --config painternet.toml

``python train.py --help`` lists the methods and every option of each; ``python train.py <method> --help`` one. The methods read their models through ComfyUI (its
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


SUMMARIES = {
    "painternet": "a PainterNet branch for an SD1.5 / SDXL base (Load Inpaint Branch)",
    "asuka_mae": "ASUKA's MAE prior fine-tuned on inpainting masks (Load ASUKA Prior, mae)",
    "asuka_alignment": "ASUKA's alignment module for an SD-inpainting UNet (Load ASUKA Prior, alignment)",
    "asuka_decoder": "ASUKA's harmonizing decoder for an SD VAE (Load Harmonizing Decoder)",
    "largen": "LAR-Gen stage 1 (main UNet + subject projections) or stage 2 (RefineNet)",
    "patch_adapter": "Patch-Adapter's Dual Context Adapter (dca) or Reference Patch Adapter (rpa)",
}
CONFIGS = {"painternet": "PainterNetConfig", "asuka_mae": "MAETrainConfig", "asuka_alignment": "AlignmentTrainConfig",
           "asuka_decoder": "DecoderTrainConfig", "largen": "LARGenConfig", "patch_adapter": "PatchAdapterConfig"}
USAGE = "usage: python train.py {%s} [--config FILE.toml] [--option value ...]" % ",".join(METHODS)


def print_help() -> None:
    """The methods, then every method's options (help text and defaults)."""
    print(USAGE)
    print("\nTrain the networks the pack has no public weights for. Methods:")
    for name, text in SUMMARIES.items():
        print(f"  {name:16s} {text}")
    print("\nSingle process: python train.py <method> ...; several: accelerate launch --multi_gpu --num_processes N "
          "train.py <method> ...\n(README, section Train). A flag overrides the same key of the --config file.")
    try:
        pack = import_pack()
    except SystemExit as e:
        print(f"\n(each method's options are listed once ComfyUI is importable: {e})")
        return
    common = importlib.import_module(f"{pack.__name__}.training.common")
    for name, target in METHODS.items():
        module = importlib.import_module(f"{pack.__name__}.{target.partition(':')[0]}")
        print("\n" + "=" * 100 + f"\n{name}\n" + "=" * 100)
        common.config_parser(getattr(module, CONFIGS[name]), f"train.py {name}").print_help()


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print_help()
        return
    if not argv or argv[0] not in METHODS:
        raise SystemExit(USAGE + "\n(python train.py --help lists the methods and their options)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if "-h" not in argv and "--help" not in argv:
        # the engine's process state first: under a launcher each process takes its own GPU before ComfyUI (which
        # reads the current device) is imported
        import torch
        from accelerate import PartialState
        PartialState(cpu=not torch.cuda.is_available())
    import_pack()
    module, _, function = METHODS[argv[0]].partition(":")
    getattr(importlib.import_module(f"{PACKAGE}.{module}"), function or "main")(argv[1:])


if __name__ == "__main__":
    main()
