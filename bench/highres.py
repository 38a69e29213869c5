"""High-Res Patch Refine benchmark (Patch-Adapter stage 2): time and peak memory against image size and masked area,
and against refining every patch of the image (the naive tiled way, as tiled upscalers do), printed as ratios.

Every case runs the node's own code (``HighResPatchRefine.execute``) in a fresh process, so peak memory is that
case's alone: on the CPU the growth of resident memory during the node (the model, VAE and the input image are
loaded before it starts), on CUDA the allocator's peak. Cases:

* same masked area (a 256² hole near the top-left corner, so every size plans the same patches) at 1024², 2048²,
  4096²: time and memory must not follow the image area;
* growing masked area at 4096² (256², 1024², 2048² holes): time follows the number of masked patches;
* naive at 4096²: every grid patch refined (the 2048² hole), i.e. what a tiled upscaler costs.

Models: ``--model sd15`` is ComfyUI's full-size SD1.5-inpainting UNet (random weights), ``tiny`` a two-level one
without attention at full latent resolution (so a CPU run of the whole table takes minutes); ``--vae sd`` is the
full-size SD VAE, ``taesd`` ComfyUI's TAESD architecture. Both random-weight: the figures are about cost, not
pictures.

Usage: COMFYUI_PATH=/path/to/ComfyUI python bench/highres.py [--model tiny|sd15] [--vae taesd|sd] [--patch 512]
       [--overlap 64] [--steps 1] [--cases same growing naive]
Run it alone: on a 2-core machine anything running beside it makes the ratios noise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from branch import SD15, import_comfy, import_pack  # noqa: E402
from measure import PeakRSS  # noqa: E402

TINY = dict(SD15, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[0, 1],
            transformer_depth_output=[1, 1, 0, 0], transformer_depth_middle=1)
HOLE_AT = 128             # hole's top-left corner (pixels): the same patches at every image size


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


def build(model_kind: str, vae_kind: str):
    from comfy import model_management as mm, model_patcher, supported_models
    from comfy.sd import VAE
    cfg = supported_models.SD15(dict(SD15 if model_kind == "sd15" else TINY, in_channels=9))
    model = cfg.get_model({})
    _randomize(model.diffusion_model, 0)
    patcher = model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    if vae_kind == "taesd":
        from comfy.taesd.taesd import TAESD
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in TAESD(latent_channels=4).state_dict().items()}
    else:
        from comfy.ldm.models.autoencoder import AutoencoderKL
        dd = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
              'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in AutoencoderKL(ddconfig=dd, embed_dim=4).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    if vae_kind == "taesd":
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return patcher, VAE(sd=sd)


def child(a) -> dict:
    import_comfy()
    import_pack()
    import comfy.model_management as mm
    from consistent_inpaint.models import patch_adapter as pa
    from consistent_inpaint.nodes.patch_adapter import HighResPatchRefine
    torch.set_num_threads(os.cpu_count() or 1)
    model, vae = build(a.model, a.vae)
    g = torch.Generator().manual_seed(2)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    S, hole = a.size, a.hole
    image = torch.rand(1, S, S, 3, generator=g)
    mask = torch.zeros(1, S, S)
    mask[:, HOLE_AT:HOLE_AT + hole, HOLE_AT:HOLE_AT + hole] = 1
    side = min(1024, S // 2)                        # the stage-1 result: ~1K, or half the size of smaller images
    ref = torch.rand(1, side, side, 3, generator=g)
    if a.naive:                                     # the tiled way: every patch of the grid, masked or not
        plan = pa.plan_patches
        pa.plan_patches = lambda m, p, o, al, dilate=None: plan(m, p, o, al, dilate=10 ** 9)
    mm.load_models_gpu([model])                     # loaded before the node, as in a warm ComfyUI

    def run(img, m, r):
        return HighResPatchRefine.execute(model, vae, pos, neg, img, m, r, 0, a.steps, 5.0, "euler", "normal", 0.5,
                                          a.patch, a.overlap)
    warm = torch.zeros(1, a.patch, a.patch)
    warm[:, 8:16, 8:16] = 1                         # one warm-up patch: kernels, allocator arenas, model on device
    run(torch.rand(1, a.patch, a.patch, 3, generator=g), warm, torch.rand(1, a.patch // 2, a.patch // 2, 3))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    with PeakRSS() as rss:
        out = run(image, mask, ref)
    seconds = time.perf_counter() - t
    patches = len(pa.plan_patches(mask[0], a.patch, a.overlap, 8).selected)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else rss.growth_mib
    assert torch.equal(out.args[0][0][mask[0] == 0], image[0][mask[0] == 0])
    return {"seconds": seconds, "peak_mib": peak, "patches": patches}


def run_case(a, size, hole, naive=False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(size), "--hole", str(hole),
           "--model", a.model, "--vae", a.vae, "--patch", str(a.patch), "--overlap", str(a.overlap),
           "--steps", str(a.steps)] + (["--naive"] if naive else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        return {"failed": (res.stderr or res.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--vae", choices=["taesd", "sd"], default="taesd")
    ap.add_argument("--patch", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=["same", "growing", "naive"], choices=["same", "growing", "naive"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--hole", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} threads)"
    print(f"== High-Res Patch Refine: {a.model} UNet, {a.vae} VAE, float32, patch {a.patch}, overlap {a.overlap}, "
          f"{a.steps} step(s), cfg 5, {device} ==")
    print("peak = growth of memory during the node (model, VAE and image already in memory)")
    print(f"{'case':>34} {'patches':>8} {'seconds':>9} {'time ratio':>10} {'peak MiB':>9} {'mem ratio':>9}")
    first = None

    def show(label, r):
        nonlocal first
        if "failed" in r:
            print(f"{label:>34}  failed: {r['failed']}", flush=True)
            return
        first = first or r
        print(f"{label:>34} {r['patches']:>8} {r['seconds']:>9.1f} {r['seconds'] / first['seconds']:>10.2f} "
              f"{r['peak_mib']:>9.0f} {r['peak_mib'] / first['peak_mib']:>9.2f}", flush=True)

    if "same" in a.cases:
        for size in (1024, 2048, 4096):
            show(f"{size}², 256² hole", run_case(a, size, 256))
    if "growing" in a.cases:
        for hole in (256, 1024, 2048):
            show(f"4096², {hole}² hole", run_case(a, 4096, hole))
    if "naive" in a.cases:
        show("4096², every patch (naive tiling)", run_case(a, 4096, 2048, naive=True))
    print("ratios are against the first row")


if __name__ == "__main__":
    main()
