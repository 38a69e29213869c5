"""Inpaint-branch benchmark: seconds per sampling step with and without the branch, same model and size.

Full-size random weights: ComfyUI's own SD1.5 / SDXL UNet (model_base objects, as a checkpoint would give)
and branch files written in the published layouts (BrushNet SD1.5 / SDXL, PowerPaint-v2) or our PainterNet
format, loaded through the pack's loader. Sampling goes through ComfyUI's sampler (euler, cfg > 1, so every
step is a cond+uncond batch); step time = (T(1 + n steps) - T(1 step)) / n, which removes set-up cost.

Usage: COMFYUI_PATH=/path/to/ComfyUI python bench/branch.py [--cases sd15-brushnet sd15-powerpaint ...]
       [--steps 2] [--size 512]
Run it alone: on a 2-core machine anything running beside it makes the ratios noise.
Peer figures on this machine class (fp32, 512², cfg > 1), ComfyUI-BrushNet: BrushNet SD1.5 1.26-1.29x,
PowerPaint-v2 1.91-1.94x.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))


def import_comfy():
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    shims = os.environ.get("CONSISTENT_INPAINT_COMFY_SHIMS")
    if shims:
        sys.path.insert(0, shims)
    sys.path.insert(0, comfy_path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()


def import_pack():
    spec = importlib.util.spec_from_file_location("consistent_inpaint", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["consistent_inpaint"] = pkg
    spec.loader.exec_module(pkg)
    from consistent_inpaint.nodes import branch
    return branch


SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
            num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
            context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
            use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False)
SDXL = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4],
            num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
            context_dim=2048, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
            use_spatial_transformer=True, legacy=False, adm_in_channels=2816, num_classes="sequential",
            use_temporal_attention=False)


def base_model(kind: str):
    from comfy import model_management as mm, model_patcher, supported_models
    cfg = (supported_models.SD15 if kind == "sd15" else supported_models.SDXL)(dict(SD15 if kind == "sd15" else SDXL))
    model = cfg.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def branch_file(case: str, tmp: str) -> str:
    import branch_layouts as published
    from safetensors.torch import save_file
    path = os.path.join(tmp, f"{case}.safetensors")
    if case == "sd15-brushnet":
        save_file(published.brushnet_sd15(seed=1), path)
    elif case.startswith("sd15-powerpaint"):
        save_file(published.powerpaint_v2(seed=2), path)
    elif case == "sdxl-brushnet":
        save_file(published.brushnet_sdxl(seed=3), path)
    elif case in ("sd15-painternet", "sdxl-painternet"):
        base = case.split("-")[0]
        published.write_painternet(path, base=base, small=False, seed=4)
    return path


def sample_seconds(model, positive, negative, latent, steps: int) -> float:
    import comfy.sample
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, denoise=1.0,
                        disable_pbar=True)
    return time.perf_counter() - t


def calls_per_step(model, positive, negative, latent) -> list[int]:
    """Rows of each UNet call in one euler step (ComfyUI batches cond and uncond in one call when it thinks memory
    allows, else it splits them, which is a different, slower measurement)."""
    import comfy.patcher_extension
    rows = []

    def count(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_calls", count)
    sample_seconds(m, positive, negative, latent, 1)
    return rows


def step_times(models, positive, negative, latent, n: int, repeats: int) -> list[float]:
    """Seconds per step for each model: runs of 1 and 1 + n steps, the models interleaved so that machine
    noise hits them alike; the fastest of ``repeats`` rounds counts."""
    for m in models:
        sample_seconds(m, positive, negative, latent, 1)                 # warm-up
    one = [float("inf")] * len(models)
    more = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, m in enumerate(models):
            one[i] = min(one[i], sample_seconds(m, positive, negative, latent, 1))
            more[i] = min(more[i], sample_seconds(m, positive, negative, latent, 1 + n))
    return [(b - a) / n for a, b in zip(one, more)]


def forward_seconds(case: str, size: int, branch_mod, repeats: int) -> tuple[float, float]:
    """The two networks alone, no sampler: one forward of the base UNet and one of the branch on the same
    cond+uncond batch (2 rows, distinct prompts), interleaved, the fastest of ``repeats`` each. A full-copy branch
    (PowerPaint-v2, PainterNet) costs what the UNet does, so its sampler ratio cannot fall much below 2 when the
    two CFG rows need separate branch rows."""
    from comfy import model_management as mm
    base = case.split("-")[0]
    model = base_model(base)
    with tempfile.TemporaryDirectory() as tmp:
        branch = branch_mod.load_branch(branch_file(case, tmp), torch.float32, mm.get_torch_device(),
                                        mm.unet_offload_device())
    unet, net = model.model.diffusion_model, branch.patcher.model
    g = torch.Generator().manual_seed(0)
    h = size // 8
    ctx = torch.randn(2, 77, 768 if base == "sd15" else 2048, generator=g)
    y = None if base == "sd15" else torch.randn(2, 2816, generator=g)
    x, xb, t = torch.randn(2, 4, h, h, generator=g), torch.randn(2, 9, h, h, generator=g), torch.tensor([500.0] * 2)
    runs = [lambda: unet(x, t, context=ctx, y=y, transformer_options={"cond_or_uncond": [1, 0]}),
            lambda: net(xb, t, ctx if branch.spec.uses_context else None, y if branch.spec.uses_y else None,
                        {"cond_or_uncond": [1, 0]})]
    best = [float("inf")] * 2
    with torch.no_grad():
        for f in runs:
            f()                                                          # warm-up
        for _ in range(repeats):
            for i, f in enumerate(runs):
                t0 = time.perf_counter()
                f()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def run_case(case: str, size: int, steps: int, branch_mod, repeats: int = 2):
    from comfy import model_management as mm
    base = case.split("-")[0]
    model = base_model(base)
    ctx_dim = 768 if base == "sd15" else 2048
    g = torch.Generator().manual_seed(9)
    extra = {} if base == "sd15" else {"pooled_output": torch.randn(1, 1280, generator=g), "width": size,
                                       "height": size, "target_width": size, "target_height": size}
    positive = [[torch.randn(1, 77, ctx_dim, generator=g), dict(extra)]]
    negative = [[torch.randn(1, 77, ctx_dim, generator=g), dict(extra)]]
    latent = torch.zeros(1, 4, size // 8, size // 8)
    with tempfile.TemporaryDirectory() as tmp:
        dev = mm.get_torch_device()
        branch = branch_mod.load_branch(branch_file(case, tmp), torch.float32, dev, mm.unet_offload_device())
    # what ApplyBranch builds, minus the VAE encode (done once per graph, not per step): a random masked-image
    # latent and a centred square hole
    from consistent_inpaint.models import branch_layouts
    keep = torch.ones(1, 1, size // 8, size // 8)
    keep[..., size // 32: 3 * size // 32, size // 32: 3 * size // 32] = 0
    cond = torch.cat([torch.randn(1, 4, size // 8, size // 8, generator=g), keep], dim=1)
    branch_mod._check_model(model, branch.spec)
    sampling = model.get_model_object("model_sampling")
    task = None
    if case.startswith("sd15-powerpaint"):
        # PowerPaint's branch reads its task prompt (PowerPaint Task Prompt node): object removal gives the two
        # CFG rows different prompts (P_ctxt / P_obj), text-guided the same one (P_obj), so one row serves both
        p_task = torch.randn(1, 77, ctx_dim, generator=g)
        task = {0: p_task, 1: p_task if case.endswith("textguided") else torch.randn(1, 77, ctx_dim, generator=g)}
    patch = branch_mod.BranchPatch(branch, cond, 1.0, (float(sampling.percent_to_sigma(0.0)),
                                                      float(sampling.percent_to_sigma(1.0))),
                                   4, task, branch_layouts.injection_sites(branch.spec))
    patched = patch.attach(model)
    plain_s, branch_s = step_times([model, patched], positive, negative, latent, steps, repeats)
    # free this case's models: with them still loaded the next case has less free memory, and ComfyUI then
    # runs the CFG rows in separate model calls, which is a different measurement
    del patched, patch, branch, model
    mm.unload_all_models()
    mm.cleanup_models()
    import gc
    gc.collect()
    return plain_s, branch_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["sd15-brushnet", "sd15-powerpaint", "sd15-powerpaint-textguided",
                                                   "sd15-painternet"],
                    choices=["sd15-brushnet", "sd15-powerpaint", "sd15-powerpaint-textguided", "sd15-painternet",
                             "sdxl-brushnet", "sdxl-painternet"],
                    help="sd15-powerpaint: object-removal task prompts (different per CFG row); "
                         "-textguided: the same task prompt on both rows")
    ap.add_argument("--size", type=int, default=0, help="0 = 512 for SD1.5, 1024 for SDXL")
    ap.add_argument("--steps", type=int, default=1, help="extra steps timed per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--forward", action="store_true",
                    help="time one forward of the UNet and of the branch alone (2 rows), not sampling steps")
    a = ap.parse_args()
    import_comfy()
    branch_mod = import_pack()
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} threads)"
    if a.forward:
        print(f"== Inpaint branch: seconds per forward, 2 rows, no sampler, float32, {device} ==")
        print(f"{'case':>26} {'size':>6} {'UNet s':>13} {'branch s':>14} {'ratio':>7}")
    else:
        print(f"== Inpaint branch: seconds per sampling step (euler, cfg 5, cond+uncond), float32, {device} ==")
        print(f"{'case':>26} {'size':>6} {'plain s/step':>13} {'branch s/step':>14} {'ratio':>7}")
    for case in a.cases:
        size = a.size or (512 if case.startswith("sd15") else 1024)
        if a.forward:
            plain_s, branch_s = forward_seconds(case, size, branch_mod, a.repeats)
        else:
            plain_s, branch_s = run_case(case, size, a.steps, branch_mod, a.repeats)
        print(f"{case:>26} {size:>6} {plain_s:>13.2f} {branch_s:>14.2f} {branch_s / plain_s:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
