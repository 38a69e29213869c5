"""Training throughput through the engine: samples/s and peak memory (RSS) per process for each method on a tiny
config on the CPU, one process and two (``accelerate launch --multi_gpu --num_processes 2``, gloo) with the same
per-device batch, and the scaling ratio (2-process samples/s over 1-process samples/s; 2.0 is perfect) measured side
by side in one run.

    COMFYUI_PATH=/path/to/ComfyUI python bench/train.py [--steps 6] [--methods painternet,asuka_mae,...]

The random-weight models are the integration harness's (tests/integration/conftest.py: full-width, shallow SD1.5
UNets, full CLIP-L and SD VAE, a small MAE). LAR-Gen is left out: its tiny SDXL-shaped inputs are built inside its
test module. Samples/s comes from loss.csv (the trainer's own count: global batch × steps / wall time between log
rows), the first step left out (warm-up). Peak memory is each training process's largest resident set, sampled
every 0.2 s. Timing on a shared 2-core machine is noisy: run it alone.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests" / "unit")]
SHIMS = str(ROOT / "tests" / "integration" / "shims")


def _data(folder: Path, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)).resize((80, 64), Image.BICUBIC).save(
            folder / f"img{i}.png")
        m = np.zeros((64, 80), np.uint8)
        m[16:44, 8 + 4 * i:48 + 4 * i] = 255
        Image.fromarray(m).save(folder / f"img{i}.mask.png")
        (folder / f"img{i}.txt").write_text(f"object number {i}")
    return folder


def _models(work: Path) -> dict:
    from conftest import COMFY_PATH, ComfySession, ModelFactory
    import layouts
    if COMFY_PATH is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH")
    session = ComfySession(COMFY_PATH, work / "comfy")
    cache = Path(os.environ.get("CONSISTENT_INPAINT_TEST_CACHE", Path(tempfile.gettempdir())
                                / "consistent_inpaint_test_cache"))
    f = ModelFactory(session, cache)
    path = lambda name: session.folder_paths.get_full_path("checkpoints", name)   # noqa: E731
    mae = work / "mae_start.pth"
    torch.save(layouts.mae_checkpoint(dim=192, depth=2, dec_dim=128, dec_depth=8), mae)
    return dict(comfy=str(COMFY_PATH), sd15=path(f.sd15_checkpoint(levels=2)),
                inpaint=path(f.sd15_inpaint_checkpoint(levels=1)), mae=str(mae))


def _configs(m: dict, data: Path) -> dict:
    common = dict(log_every=1, save_every=1000, sample_every=0, tracker="none", data=str(data))
    return {
        "painternet": dict(common, base=m["sd15"], resolution=64, beta=1e-5),
        "asuka_mae": dict(common, mae=m["mae"]),
        "asuka_alignment": dict(common, base=m["inpaint"], mae=m["mae"], resolution=64),
        "asuka_decoder": dict(common, base=m["inpaint"], resolution=64, latent_augmentation=0.5),
        "patch_adapter": dict(common, base=m["inpaint"], resolution=64, stage="dca"),
    }


def _run(method: str, cfg: dict, out: Path, processes: int, steps: int, comfy: str, port: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    toml = out.parent / f"{out.name}.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in
                            dict(cfg, output=str(out), steps=steps, batch_size=processes).items()))
    launch = [sys.executable, str(ROOT / "train.py")] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(ROOT / "train.py")]
    env = dict(os.environ, COMFYUI_PATH=comfy, CONSISTENT_INPAINT_COMFY_SHIMS=SHIMS, OMP_NUM_THREADS="1")
    p = subprocess.Popen([*launch, method, "--config", str(toml)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    peak: dict[int, int] = {}
    while p.poll() is None:
        try:
            procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for c in procs:
            try:
                if "train.py" in " ".join(c.cmdline()) and "accelerate" not in " ".join(c.cmdline()):
                    peak[c.pid] = max(peak.get(c.pid, 0), c.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.2)
    err = p.stderr.read()
    if p.returncode:
        raise RuntimeError(f"{method} on {processes} process(es) failed:\n{err[-3000:]}")
    with open(out / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    rates = [float(r["samples_per_s"]) for r in rows[1:]]
    return dict(samples_per_s=float(np.median(rates)), peak_rss_gib=[v / 2 ** 30 for v in peak.values()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--methods", default="painternet,asuka_mae,asuka_alignment,asuka_decoder,patch_adapter")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        models = _models(work)
        configs = _configs(models, _data(work / "data"))
        print(f"torch {torch.__version__}, {psutil.cpu_count()} CPUs, OMP_NUM_THREADS=1 per process, "
              f"{a.steps} steps, per-device batch 1")
        print(f"{'method':16s} {'1 proc samples/s':>17s} {'2 proc samples/s':>17s} {'ratio':>6s} "
              f"{'peak RSS / process (GiB): 1 proc | 2 procs':>44s}")
        for i, method in enumerate(a.methods.split(",")):
            one = _run(method, configs[method], work / f"{method}_1", 1, a.steps, models["comfy"], 29800 + i)
            two = _run(method, configs[method], work / f"{method}_2", 2, a.steps, models["comfy"], 29800 + i)
            ratio = two["samples_per_s"] / one["samples_per_s"]
            mem = (" ".join(f"{v:.2f}" for v in one["peak_rss_gib"]) + " | "
                   + " ".join(f"{v:.2f}" for v in two["peak_rss_gib"]))
            print(f"{method:16s} {one['samples_per_s']:17.3f} {two['samples_per_s']:17.3f} {ratio:6.2f} {mem:>44s}",
                  flush=True)


if __name__ == "__main__":
    main()
