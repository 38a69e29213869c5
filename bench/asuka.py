"""ASUKA benchmarks, printed as ratios measured side by side in one run.

1. Conditioning cost vs one sampling step: MAE prior + alignment (computed once per graph run) against one
   cond+uncond step of an SD1.5 UNet (ComfyUI's own UNetModel, full size, random weights, 512², batch 2).
   The FLUX T5-side alignment (~1 B parameters) is timed too. Needs COMFYUI_PATH for the UNet step.
2. Harmonizing decode, whole vs exact tiles vs independent tiles (full-size decoder, random weights):
   seconds and peak memory growth during the decode at 1024² and 2048² (each case in its own process),
   plus the largest difference from the whole decode at the tile seams and away from them.

Usage: COMFYUI_PATH=/path/to/ComfyUI python bench/asuka.py [--sizes 1024 2048] [--skip-cond]
Run it alone: on a 2-core machine anything running beside it makes the ratios noise.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))

import layouts  # noqa: E402
from models import asuka_alignment, asuka_mae, harmonizing_decoder  # noqa: E402
from models.harmonizing_decoder import decode_tiled  # noqa: E402
from models.harmonizing_stream import StreamingDecode  # noqa: E402
from measure import PeakRSS  # noqa: E402


def timed(fn, repeat=3):
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def build(module_cls, cfg_fn, sd):
    m = module_cls(cfg_fn(sd))
    m.load_state_dict(asuka_alignment.convert_released(sd) if module_cls is asuka_alignment.AsukaAlignment else sd)
    return m.eval().requires_grad_(False)


def bench_conditioning():
    torch.manual_seed(0)
    mae = build(asuka_mae.MAEPrior, asuka_mae.config_from_state_dict, layouts.mae_state_dict())
    al_sd = build(asuka_alignment.AsukaAlignment, asuka_alignment.config_from_state_dict,
                  layouts.alignment_state_dict(dim=768))
    img, m = torch.rand(1, 3, 512, 512), torch.zeros(1, 1, 512, 512)
    m[..., 128:384, 160:352] = 1
    with torch.no_grad():
        t_mae = timed(lambda: mae(img, m))
        prior, _ = mae(img, m)
        t_al = timed(lambda: al_sd(prior))
    del al_sd
    with torch.no_grad():
        t5 = build(asuka_alignment.AsukaAlignment, asuka_alignment.config_from_state_dict,
                   layouts.alignment_state_dict(dim=4096, head_dim=64))
        t_t5 = timed(lambda: t5(prior), repeat=1)
    del t5
    t_step = None
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy:
        sys.path.insert(0, comfy)
        import comfy.options  # noqa: F401
        from comfy.cli_args import args
        args.cpu = not torch.cuda.is_available()
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        import comfy.ops
        unet = UNetModel(image_size=32, in_channels=9, out_channels=4, model_channels=320,
                         num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], num_heads=8,
                         use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                         transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                         context_dim=768, use_linear_in_transformer=False,
                         operations=comfy.ops.disable_weight_init, dtype=torch.float32).eval()
        for p in unet.parameters():
            torch.nn.init.normal_(p, std=0.02)
        x, ctx = torch.randn(2, 9, 64, 64), torch.randn(2, 256, 768)
        with torch.no_grad():
            t_step = timed(lambda: unet(x, torch.tensor([500.0, 500.0]), context=ctx), repeat=2)
    print("\n== ASUKA conditioning (CPU, float32, full-size random weights) ==")
    print(f"MAE prior (ViT-B, 256²)            {t_mae * 1000:8.1f} ms")
    print(f"alignment 768 (SD1.5 variant)      {t_al * 1000:8.1f} ms")
    print(f"alignment 4096 (FLUX T5 side, 1B)  {t_t5 * 1000:8.1f} ms")
    if t_step:
        print(f"SD1.5 UNet step, 512², cond+uncond {t_step * 1000:8.1f} ms")
        print(f"ratio SD-variant conditioning / one SD1.5 step: {(t_mae + t_al) / t_step:.3f}")
        print(f"ratio FLUX-side conditioning (MAE + T5 + CLIP alignments) / one SD1.5 step: "
              f"{(t_mae + t_t5 + t_al) / t_step:.3f}")


MODES = {"whole": "whole image", "exact": "exact tiles", "independent": "independent tiles"}


def decode_case(size: int, mode: str, tile: int, overlap: int) -> dict:
    """Child process: decode one case, report time and the decode's peak memory growth."""
    torch.manual_seed(0)
    sd = harmonizing_decoder.convert_released(layouts.decoder_state_dict(z=16))
    dec = harmonizing_decoder.HarmonizingDecoder(harmonizing_decoder.config_from_state_dict(sd))
    dec.load_state_dict(sd)
    dec.eval().requires_grad_(False)
    del sd
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, size // 8, size // 8, generator=g)
    img = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4: size // 2, size // 3: 2 * size // 3] = 1
    t = time.perf_counter()
    with torch.no_grad(), PeakRSS() as mem:
        if mode == "whole":
            out = dec(z, img, m)
        elif mode == "exact":
            out = StreamingDecode(dec, "cpu", "cpu", tile)(z, img, m)
        else:
            out = decode_tiled(dec, z, img, m, 8, tile // 8, overlap // 8)
    dt = time.perf_counter() - t
    torch.save(out, f"/tmp/ci_bench_{size}_{mode}.pt")
    return {"seconds": dt, "peak_mib": mem.growth_mib}


def bench_decode(sizes, tile=512, overlap=64, modes=tuple(MODES)):
    print(f"\n== Harmonizing decode: whole vs tiled (tile {tile} px; independent tiles overlap {overlap} px; "
          f"CPU float32) ==")
    print("peak = growth of resident memory during the decode (the decoder and inputs are already loaded)")
    print(f"{'size':>6} {'mode':>18} {'seconds':>9} {'time ratio':>10} {'peak MiB':>9} {'mem ratio':>9} "
          f"{'max|d| seams':>13} {'max|d| away':>12}")
    for size in sizes:
        res = {}
        for mode in MODES:
            if mode not in modes:
                res[mode] = {"failed": "not run (--modes)"}
                continue
            out = subprocess.run([sys.executable, __file__, "--case", str(size), mode, str(tile), str(overlap)],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            else:   # e.g. SIGKILL by the kernel's OOM killer: the case does not fit this machine
                res[mode] = {"failed": f"exit {out.returncode}" + (" (killed: out of memory)" if out.returncode == -9
                                                                   else "")}
        whole = torch.load(f"/tmp/ci_bench_{size}_whole.pt", weights_only=True) if "seconds" in res["whole"] else None
        near = torch.zeros(size, size, dtype=torch.bool)          # bands around every tile boundary
        for mode, stride in (("exact", tile), ("independent", tile - overlap)):
            for s in range(stride, size, stride):
                near[:, max(s - overlap, 0): s + 2 * overlap] = True
                near[max(s - overlap, 0): s + 2 * overlap, :] = True
        w = res["whole"]
        for mode, label in MODES.items():
            r = res[mode]
            if "failed" in r:
                print(f"{size:>6} {label:>18} {r['failed']}")
                continue
            cols = ""
            if mode != "whole" and whole is not None:
                diff = (whole - torch.load(f"/tmp/ci_bench_{size}_{mode}.pt", weights_only=True)).abs().amax(dim=(0, 1))
                band = lambda sel: diff[sel].max().item() if sel.any() else float("nan")
                cols = f"{band(near):>13.2e} {band(~near):>12.2e}"
            ratio = (lambda a, b: f"{a / b:>10.2f}") if "seconds" in w else (lambda a, b: f"{'n/a':>10}")
            print(f"{size:>6} {label:>18} {r['seconds']:>9.2f} {ratio(r['seconds'], w.get('seconds', 1))} "
                  f"{r['peak_mib']:>9.0f} {ratio(r['peak_mib'], w.get('peak_mib', 1))[1:]} {cols}")
        if whole is not None:
            print(f"       (output range of the whole decode: {whole.min().item():.2f} .. {whole.max().item():.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        print(json.dumps(decode_case(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        sys.exit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--skip-cond", action="store_true")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if not a.skip_cond:
        bench_conditioning()
    bench_decode(a.sizes, modes=a.modes)
