"""What the trainer tests share: the pack's modules, synthetic data folders, the fixed-batch loss, the command line
and its loss log."""
import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def pack(comfy, sub: str):
    """A module of the pack as ComfyUI loaded it (``training.largen``, ``nodes.branch``, ...)."""
    return importlib.import_module(f"{comfy.pack_module.__name__}.{sub}")


def install_output(src: Path, folder: Path, name: str) -> Path:
    """Put a trained file into a ComfyUI model folder as ``name`` by a hard link (a copy across file systems), so
    the hundreds of MB a trainer wrote are not stored twice; the test's own folder is deleted when it passes."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / name
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        import shutil
        shutil.copyfile(src, dst)
    return dst


def write_data(folder: Path, prompts, size=(80, 64), box=lambda i: (16, 44, 20 + 10 * i, 56), grid=(4, 5),
               seed: int = 0) -> Path:
    """``img{i}.png`` per prompt (a ``grid`` of random colours upscaled bicubically to ``size`` = (width, height)),
    with ``img{i}.mask.png`` (white inside ``box(i)`` = (top, bottom, left, right)) and ``img{i}.txt`` where the
    prompt is not None."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i, prompt in enumerate(prompts):
        small = rng.uniform(0, 255, (*grid, 3)).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"img{i}.png")
        if prompt is not None:
            m = np.zeros((h, w), np.uint8)
            top, bottom, left, right = box(i)
            m[top:bottom, left:right] = 255
            Image.fromarray(m).save(folder / f"img{i}.mask.png")
            (folder / f"img{i}.txt").write_text(prompt)
    return folder


def fixed_loss(trainer, b, *args) -> float:
    """The trainer's loss on ``b`` with the same timesteps and noise every time."""
    torch.manual_seed(5)
    with torch.no_grad():
        return float(trainer.losses(b, *args)["loss"])


def fit(trainer, b, steps: int) -> tuple[float, float]:
    """``steps`` optimiser steps on the one batch ``b`` -> its fixed loss (before, after)."""
    before = fixed_loss(trainer, b)
    for _ in range(steps):
        torch.manual_seed(5)
        trainer.train_step(b)
    return before, fixed_loss(trainer, b)


def run_train_py(comfy, method: str, *args: str, script: Path = ROOT / "train.py", env: dict | None = None):
    """``python train.py <method> <args>`` in a subprocess with ComfyUI's path; fails the test on a non-zero exit."""
    full_env = dict(os.environ, COMFYUI_PATH=str(comfy.path), **(env or {}))
    # train.py imports ComfyUI, which imports torchvision at start-up: the harness's stand-ins (conftest.shims_dir)
    full_env.setdefault("CONSISTENT_INPAINT_COMFY_SHIMS", str(Path(__file__).resolve().parent / "shims"))
    r = subprocess.run([sys.executable, str(script), method, *args], env=full_env, capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def loss_rows(out: Path, name: str = "loss.csv") -> list[dict]:
    with open(out / name) as fh:
        return list(csv.DictReader(fh))


def half_modes(modes=("bf16", "fp16")) -> tuple:
    """The engine's mixed precision modes that autocast here: accelerate runs fp16 on GPUs only (on the CPU it trains
    in float32, without autocast), bf16 on both."""
    return tuple(m for m in modes if m != "fp16" or torch.cuda.is_available())


def mixed_precision_losses(make_trainer, batch_of, params_of, modes=("bf16", "fp16")) -> dict:
    """One optimiser step under each of no / bf16 / fp16 (where the engine autocasts: :func:`half_modes`) from the
    same start (``make_trainer(mode)``, ``batch_of(trainer)``) -> {mode: loss}; every trained weight (``params_of(
    trainer)``: name -> parameter) must stay float32 and finite, and some must have moved (checked here)."""
    modes = half_modes(modes)
    out = {}
    for mp in ("no", *modes):
        trainer = make_trainer(mp)
        b = batch_of(trainer)
        params = dict(params_of(trainer))
        before = {n: p.detach().clone() for n, p in params.items()}
        torch.manual_seed(5)
        loss = trainer.train_step(b)["loss"]
        for n, p in params.items():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), (mp, n)
        assert any(not torch.equal(p, before[n]) for n, p in params.items()), mp
        out[mp] = loss
    return out
