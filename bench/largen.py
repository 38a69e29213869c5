"""LAR-Gen benchmark: seconds per sampling step of the plain LAR-Gen UNet, with subject attention, and with the
RefineNet, same model and size, as ratios.

Full-size random weights: ComfyUI's SDXL model object with LAR-Gen's 9-channel input (what Load LAR-Gen returns),
the subject patch with 16 random subject tokens projected for all 70 cross-attention sites (what Apply Subject
Attention attaches; the CLIP / resampler work happens once per graph, not per step), and a full-size RefineNet
(SDXL copy, 4-channel input) with a 257-token context (what Apply RefineNet attaches). Sampling goes through
ComfyUI's sampler (euler, cfg 5: every step is a cond+uncond batch); step time = (T(1 + n steps) - T(1 step)) / n.

Weights are float32 by default (two float32 SDXL UNets, 20.6 GB, fit a 24 GB machine at 512²: 21.4 GB peak).
``--weights bfloat16`` stores the UNet and the RefineNet in bfloat16 and computes in float32 (ComfyUI's manual cast);
that cast of every weight on every call is a CPU-only cost (a GPU computes in the half-precision dtype itself) and
weighs more on the one-row RefineNet pass than on the two-row UNet pass.

Usage: COMFYUI_PATH=/path/to/ComfyUI python bench/largen.py [--cases subject refinenet] [--size 512]
       [--weights float32|bfloat16] [--breakdown]
Run it alone: on a 2-core machine anything running beside it makes the ratios noise.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from branch import SDXL, calls_per_step, import_comfy, import_pack, step_times  # noqa: E402


def lar_gen_unet(weight_dtype):
    from comfy import model_management as mm, model_patcher, supported_models
    cfg = supported_models.SDXL(dict(SDXL, in_channels=9))
    if weight_dtype != torch.float32:
        # a GPU computes in the half-precision dtype itself; the CPU casts every weight to float32 on each call
        cfg.set_inference_dtype(weight_dtype, None if torch.cuda.is_available() else torch.float32)
    model = cfg.get_model({})
    _randomize(model.diffusion_model, 0)
    return model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


def subject_patch(largen, model, sampling):
    g = torch.Generator().manual_seed(3)
    sites = largen.model_sites(model)
    kv = {s: (torch.randn(1, 16, ch, generator=g), torch.randn(1, 16, ch, generator=g)) for s, (_, ch) in sites.items()}
    kv0 = {s: (torch.randn(1, 16, ch, generator=g), torch.randn(1, 16, ch, generator=g)) for s, (_, ch) in sites.items()}
    assert len(kv) == 70, len(kv)
    return largen.SubjectPatch(kv, kv0, 1.0, _full_range(sampling), None)


def refine_patch(largen, size, sampling, weight_dtype):
    import comfy.ops
    from comfy import model_management as mm
    from consistent_inpaint.nodes.branch_unet import RefineNet
    from consistent_inpaint.nodes.common import wrap_patcher
    cfg = {k: v for k, v in SDXL.items() if k not in ("num_heads", "num_head_channels")}
    net = RefineNet(dict(cfg, in_channels=4), 1280, dtype=weight_dtype, operations=comfy.ops.manual_cast).eval()
    _randomize(net, 1)
    g = torch.Generator().manual_seed(4)
    rn = largen.RefineNetModel(wrap_patcher(net, mm.get_torch_device(), mm.unet_offload_device()))
    latent = torch.randn(1, 4, size // 8, size // 8, generator=g)
    return largen.RefinePatch(rn, latent, torch.randn(1, 257, 2048, generator=g), torch.zeros(1, 1280),
                              _full_range(sampling), 0)


def breakdown(model, patched, net, positive, negative, latent, steps: int = 3):
    """Where a sampling step's time goes, in seconds per step: the whole sample, the UNet calls, and (patched) the
    RefineNet passes, timed inside ComfyUI's sampler (a wrapper around the UNet call, hooks on the RefineNet)."""
    import time

    import comfy.patcher_extension
    from branch import sample_seconds
    rows = []
    for m in (model, patched):
        unet, ref = [], []

        def timed(executor, *args, **kwargs):
            t = time.perf_counter()
            out = executor(*args, **kwargs)
            unet.append(time.perf_counter() - t)
            return out

        c = m.clone()          # added after the RefineNet's wrapper, so it times the UNet call alone
        c.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_time", timed)
        hooks = [net.register_forward_pre_hook(lambda *a: ref.append(-time.perf_counter())),
                 net.register_forward_hook(lambda *a: ref.__setitem__(-1, ref[-1] + time.perf_counter()))]
        total = sample_seconds(c, positive, negative, latent, steps)
        for h in hooks:
            h.remove()
        rows.append((total / steps, sum(unet) / steps, sum(ref) / steps, len(unet) / steps))
    print(f"{'per step (s)':>20} {'sample':>8} {'UNet':>8} {'RefineNet':>10} {'other':>8} {'UNet calls':>10}")
    for name, (total, u, r, n) in zip(("plain", "RefineNet"), rows):
        print(f"{name:>20} {total:>8.2f} {u:>8.2f} {r:>10.2f} {total - u - r:>8.2f} {n:>10.1f}", flush=True)


def _full_range(sampling):
    return float(sampling.percent_to_sigma(0.0)), float(sampling.percent_to_sigma(1.0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["subject", "refinenet"], choices=["subject", "refinenet"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1, help="extra steps timed per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--weights", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the UNet calls and the RefineNet passes inside one 3-step sample")
    a = ap.parse_args()
    import_comfy()
    import_pack()
    from comfy import model_management as mm
    from consistent_inpaint.nodes import largen
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} threads)"
    name = a.weights
    weight_dtype = getattr(torch, name)
    print(f"== LAR-Gen: seconds per sampling step (euler, cfg 5, cond+uncond), {a.size}², weights {name}, "
          f"compute {name if torch.cuda.is_available() else 'float32'}, {device} ==")
    model = lar_gen_unet(weight_dtype)
    sampling = model.get_model_object("model_sampling")
    g = torch.Generator().manual_seed(9)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": a.size, "height": a.size,
             "target_width": a.size, "target_height": a.size}
    positive = [[torch.randn(1, 77, 2048, generator=g), dict(extra)]]
    negative = [[torch.randn(1, 77, 2048, generator=g), dict(extra)]]
    latent = torch.zeros(1, 4, a.size // 8, a.size // 8)
    variants = {}
    if "subject" in a.cases:
        variants["subject attention"] = subject_patch(largen, model, sampling).attach(model)
    if "refinenet" in a.cases:
        refine = refine_patch(largen, a.size, sampling, weight_dtype)
        variants["RefineNet"] = refine.attach(model)
    names = list(variants)
    times = step_times([model, *variants.values()], positive, negative, latent, a.steps, a.repeats)
    calls = [calls_per_step(m, positive, negative, latent) for m in [model, *variants.values()]]
    print(f"{'variant':>20} {'s/step':>8} {'ratio':>7} {'target':>7}  UNet call rows per step")
    print(f"{'plain LAR-Gen UNet':>20} {times[0]:>8.2f} {1:>7.3f} {'':>7}  {calls[0]}")
    targets = {"subject attention": "<= 1.1", "RefineNet": "<= 1.6"}
    for n, t, c in zip(names, times[1:], calls[1:]):
        print(f"{n:>20} {t:>8.2f} {t / times[0]:>7.3f} {targets[n]:>7}  {c}", flush=True)
    if a.breakdown and "RefineNet" in variants:
        breakdown(model, variants["RefineNet"], refine.refinenet.net, positive, negative, latent)
    del variants, model
    mm.unload_all_models()
    gc.collect()


if __name__ == "__main__":
    main()
