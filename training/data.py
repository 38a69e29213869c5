"""Training data as streams that split over processes and data-loader workers and resume where they were.

Two sources, one item: ``Item(key, pixels [3, S, S] in [0, 1], mask [S, S] or None (white = the object), prompt,
seed)`` — ``seed`` is the sample's own random seed, derived from the run's seed and the sample's place in the
stream, so what a sample draws (its mask, timestep, noise) does not depend on how many processes share the work.

- **A folder** (``name.png`` [+ ``name.mask.png``] [+ ``name.txt``]): the global order is a seeded permutation per
  epoch; optimiser step ``s`` takes the samples ``s·G .. (s+1)·G`` of it (G = the global batch), split into the
  micro-batches of every process. The data position is the step itself, so a resumed run continues exactly,
  whatever its process count.
- **WebDataset tar shards** (what img2dataset writes, and BrushData's own layout: ``image``, ``segmentation`` (JSON
  with run-length masks), ``caption``, ``height``, ``width``): read as streams by the ``webdataset`` library. Each
  epoch's shard order is a seeded permutation; every reader (process × data-loader worker) takes every R-th shard
  of it, so readers never share a shard; within a shard, samples are shuffled in windows of ``shuffle_buffer``
  (seeded by the shard and epoch). The position is, per (epoch, shard), how many samples of its order were
  consumed by optimiser steps; a resumed run (on any process or worker count) reads each shard past that point,
  so no sample repeats or is skipped. A sample that does not decode is skipped and counted, and counts as read.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("consistent_inpaint.training.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = ".mask.png"          # beside ``name.png``: ``name.mask.png``, white = the object / region
PROMPT_SUFFIX = ".txt"             # beside ``name.png``: ``name.txt``, the local prompt
IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")
PROMPT_KEYS = ("local_prompt", "txt", "caption")     # PainterData's local prompt first, then the caption
MIX = 0x9E3779B97F4A7C15


@dataclass
class Item:
    key: str
    pixels: torch.Tensor               # [3, S, S] in [0, 1]
    mask: torch.Tensor | None          # [S, S], 1 = object / region
    prompt: str
    seed: int

    def generator(self, salt: int = 0) -> torch.Generator:
        """A generator of this sample's own (``salt`` tells its uses apart)."""
        return torch.Generator().manual_seed((self.seed + salt * 7919) % (2 ** 63))


def sample_seed(*parts: int) -> int:
    """A 63-bit seed of integers (splitmix-style), the same on every machine."""
    h = 0
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * MIX & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def square(img: Image.Image, size: int, resample) -> Image.Image:
    """Shorter side to ``size``, then the centre ``size`` x ``size``."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    image = square(image.convert("RGB"), size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_mask(mask: Image.Image, size: int) -> torch.Tensor:
    m = square(mask.convert("L"), size, Image.NEAREST)
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)


class ImageFolder:
    """``folder/name.{png,jpg,jpeg,webp}`` with optional ``name.mask.png`` (segmentation / region mask, white =
    object) and ``name.txt`` (local prompt). Items: (image [3, S, S] in [0, 1], mask [S, S] or None, prompt)."""

    def __init__(self, folder: str, size: int):
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder {folder} does not exist")
        self.size = size
        self.items = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.name.lower().endswith(MASK_SUFFIX))
        if not self.items:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int):
        path = self.items[i]
        pixels = to_pixels(Image.open(path), self.size)
        mask_path = path.with_name(path.stem + MASK_SUFFIX)
        mask = to_mask(Image.open(mask_path), self.size) if mask_path.exists() else None
        text = path.with_suffix(PROMPT_SUFFIX)
        prompt = text.read_text(encoding="utf-8").strip() if text.exists() else ""
        return pixels, mask, prompt


class FolderStream:
    """A folder as a stream (see the module's docstring): this process's micro-batches of the global order."""
    skipped = 0

    def __init__(self, data: ImageFolder, seed: int, per_device: int, accumulation: int, processes: int, rank: int):
        self.data, self.seed = data, seed
        self.b, self.A, self.P, self.rank = per_device, accumulation, processes, rank
        self.G = per_device * accumulation * processes
        self.step = self.micro = 0
        self._perms = {}

    def _index(self, g: int) -> int:
        n = len(self.data)
        epoch = g // n
        perm = self._perms.get(epoch)
        if perm is None:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch))).tolist()
            self._perms = {epoch: perm}
        return perm[g % n]

    def positions(self, step: int, micro: int) -> list[int]:
        """Global stream positions of this process's micro-batch ``micro`` of optimiser step ``step``."""
        start = step * self.G + micro * self.P * self.b + self.rank * self.b
        return list(range(start, start + self.b))

    def next(self) -> list[Item]:
        items = []
        for g in self.positions(self.step, self.micro):
            i = self._index(g)
            pixels, mask, prompt = self.data[i]
            items.append(Item(self.data.items[i].stem, pixels, mask, prompt, sample_seed(self.seed, g)))
        self.micro += 1
        if self.micro == self.A:
            self.step, self.micro = self.step + 1, 0
        return items

    def state(self) -> dict:
        return {"kind": "folder", "position": self.step * self.G}

    @staticmethod
    def merge(states: list) -> dict:
        return states[0]

    def load(self, state: dict | None, step: int) -> None:
        if state is not None and state.get("kind") != "folder":
            raise ValueError("state.pt was written by a run over WebDataset shards; this run reads a folder")
        if state is not None and state["position"] != step * self.G:
            raise ValueError(f"state.pt's data position {state['position']} is not step {step} × global batch "
                             f"{self.G}")
        self.step, self.micro = step, 0


# -- WebDataset shards ------------------------------------------------------------------------------------------
def expand_shards(spec: str) -> list[str]:
    """``"a/{000..009}.tar,b/*.tar"`` -> the sorted list of existing shard paths (brace ranges as WebDataset writes
    them, shell globs, commas between patterns). An empty result is an error that names the patterns."""
    import braceexpand
    paths = []
    for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
        for one in braceexpand.braceexpand(pattern):
            found = sorted(glob.glob(os.path.expanduser(one)))
            paths.extend(found)
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise FileNotFoundError(f"shards {spec!r} match no file (brace ranges like data/{{00000..00099}}.tar and "
                                "globs like data/*.tar are expanded; commas separate patterns)")
    return paths


def rle_mask(counts, height: int, width: int) -> np.ndarray:
    """BrushData's run-length mask: pairs (start, length), starts 1-based over the column-major (Fortran-order)
    pixels -> [height, width] uint8 (1 = object)."""
    runs = np.asarray(counts, dtype=np.int64).reshape(-1, 2)
    flat = np.zeros(height * width, dtype=np.uint8)
    for start, length in runs:
        flat[start - 1:start - 1 + length] = 1
    return flat.reshape((height, width), order="F")


def decode_sample(sample: dict, size: int, pick: np.random.Generator):
    """A WebDataset sample (bytes per extension) -> (pixels, mask or None, prompt). Images under ``image`` / ``jpg``
    / ``png`` / ``webp``; a mask under ``mask.png`` (white = object) or BrushData's ``segmentation`` JSON (one of its
    masks, chosen by ``pick``); the prompt from ``local_prompt``, ``txt`` or ``caption``."""
    raw = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if raw is None:
        keys = sorted(k for k in sample if not k.startswith("_"))
        raise ValueError(f"no image ({', '.join(IMAGE_KEYS)}) among {keys}")
    image = Image.open(io.BytesIO(raw))
    image.load()
    mask = None
    if "mask.png" in sample:
        mask = to_mask(Image.open(io.BytesIO(sample["mask.png"])), size)
    elif "segmentation" in sample:
        seg = json.loads(sample["segmentation"])
        runs = seg.get("mask", []) if isinstance(seg, dict) else seg
        if runs:
            h = int(sample["height"]) if "height" in sample else image.height
            w = int(sample["width"]) if "width" in sample else image.width
            if (w, h) != image.size:
                raise ValueError(f"segmentation is {w}x{h}, the image {image.size[0]}x{image.size[1]}")
            m = rle_mask(runs[int(pick.integers(len(runs)))], h, w)
            mask = to_mask(Image.fromarray(m * 255), size)
    prompt = ""
    for k in PROMPT_KEYS:
        if k in sample:
            prompt = sample[k].decode("utf-8").strip() if isinstance(sample[k], bytes) else str(sample[k]).strip()
            break
    return to_pixels(image, size), mask, prompt


class ShardReader(torch.utils.data.IterableDataset):
    """One process's share of the shards, split again over its data-loader workers; yields (Item, meta) where meta =
    (epoch, shard, position in the shard's order + 1, bad samples passed before it, shard ended)."""

    def __init__(self, shards: list[str], size: int, seed: int, rank: int, processes: int, shuffle_buffer: int,
                 consumed: dict, start_epoch: int):
        self.shards, self.size, self.seed = shards, size, seed
        self.rank, self.processes, self.buffer = rank, processes, max(1, shuffle_buffer)
        self.consumed, self.start_epoch = consumed, start_epoch

    def shard_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 1))
        return torch.randperm(len(self.shards), generator=g).tolist()

    def readers(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.processes * workers

    def _samples(self, shard: int):
        """The samples of one shard in file order, through webdataset's tar reader (no decoding)."""
        import webdataset as wds
        url = self.shards[shard]
        ds = wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                            handler=wds.handlers.reraise_exception)
        yield from ds

    def _windowed(self, shard: int, epoch: int):
        rng = np.random.default_rng(sample_seed(self.seed, epoch, shard, 2))
        window = []
        for s in self._samples(shard):
            window.append(s)
            if len(window) == self.buffer:
                yield from (window[i] for i in rng.permutation(len(window)))
                window = []
        yield from (window[i] for i in rng.permutation(len(window)))

    def __iter__(self):
        reader, readers = self.readers()
        epoch = self.start_epoch
        while True:
            order = self.shard_order(epoch)
            for shard in order[reader::readers]:
                done = self.consumed.get((epoch, shard), 0)
                if done < 0:                       # finished
                    continue
                bad, pos, last = 0, 0, None
                for s in self._windowed(shard, epoch):
                    pos += 1
                    if pos <= done:
                        continue
                    seed = sample_seed(self.seed, epoch, shard, pos)
                    try:
                        pixels, mask, prompt = decode_sample(s, self.size, np.random.default_rng(seed))
                    except Exception as e:         # a malformed sample: skipped, counted, never a crash mid-run
                        log.warning("skipping %s in %s: %s", s.get("__key__"), self.shards[shard], str(e)[:200])
                        bad += 1
                        continue
                    if last is not None:
                        yield last
                    last = (Item(s["__key__"], pixels, mask, prompt, seed), (epoch, shard, pos, bad, False))
                    bad = 0
                if last is not None:               # the shard's final good sample carries its end
                    item, (e_, sh, p, b, _) = last
                    yield item, (e_, sh, pos, b + bad, True)
            epoch += 1


def _collate(batch):
    return batch


class ShardStream:
    """WebDataset shards as this process's micro-batches (see the module's docstring)."""

    def __init__(self, spec: str, size: int, seed: int, per_device: int, rank: int, processes: int,
                 shuffle_buffer: int = 64, workers: int = 0):
        self.shards = expand_shards(spec)
        self.size, self.seed, self.b = size, seed, per_device
        self.rank, self.processes, self.buffer, self.workers = rank, processes, shuffle_buffer, workers
        self.consumed: dict = {}
        self.skipped = 0
        self._it = None
        if len(self.shards) < processes * max(1, workers):
            log.warning("%d shard(s) for %d readers (processes × workers): some readers wait on the next epoch's "
                        "shards; write more, smaller shards", len(self.shards), processes * max(1, workers))

    def _start(self):
        start = min((e for e, _ in self.consumed), default=0)
        reader = ShardReader(self.shards, self.size, self.seed, self.rank, self.processes, self.buffer,
                             dict(self.consumed), start)
        loader = torch.utils.data.DataLoader(reader, batch_size=self.b, num_workers=self.workers,
                                             collate_fn=_collate, persistent_workers=self.workers > 0)
        self._it = iter(loader)

    def next(self) -> list[Item]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        items = []
        for item, (epoch, shard, pos, bad, ended) in batch:
            self.consumed[(epoch, shard)] = -1 if ended else max(pos, self.consumed.get((epoch, shard), 0))
            self.skipped += bad
            items.append(item)
        return items

    def state(self) -> dict:
        return {"kind": "shards", "shards": len(self.shards), "skipped": self.skipped,
                "consumed": [[e, s, n] for (e, s), n in sorted(self.consumed.items())]}

    @staticmethod
    def merge(states: list) -> dict:
        """Every process's position in one: readers never share a shard, so the entries do not collide (a shard one
        process finished (-1) wins over a count)."""
        out = {}
        for st in states:
            for e, s, n in st["consumed"]:
                old = out.get((e, s), 0)
                out[(e, s)] = -1 if -1 in (n, old) else max(n, old)
        # an epoch every shard of which is finished needs no entries
        epochs = sorted({e for e, _ in out})
        for e in epochs:
            if sum(1 for (e2, _), n in out.items() if e2 == e and n == -1) == states[0]["shards"]:
                out = {k: v for k, v in out.items() if k[0] != e}
                out[(e + 1, -1)] = 0 if (e + 1, -1) not in out else out[(e + 1, -1)]
        return {"kind": "shards", "shards": states[0]["shards"], "skipped": sum(s["skipped"] for s in states),
                "consumed": [[e, s, n] for (e, s), n in sorted(out.items())]}

    def load(self, state: dict | None, step: int) -> None:
        self.consumed, self._it = {}, None
        if state is None:
            return
        if state.get("kind") != "shards":
            raise ValueError("state.pt was written by a run over a folder; this run reads WebDataset shards")
        if state["shards"] != len(self.shards):
            raise ValueError(f"state.pt's run read {state['shards']} shards; {len(self.shards)} match now")
        self.consumed = {(e, s): n for e, s, n in state["consumed"] if s >= 0}
        for e, s, n in state["consumed"]:           # an epoch marker: the stream starts there
            if s < 0:
                self.consumed.setdefault((e, s), 0)
        self.skipped = state["skipped"] if self.rank == 0 else 0


def make_stream(opts, data: str, size: int, engine):
    """The stream a trainer reads: ``opts.shards`` (WebDataset) when set, else the folder ``data``."""
    if opts.shards:
        return ShardStream(opts.shards, size, opts.seed, engine.per_device, engine.rank, engine.processes,
                           opts.shuffle_buffer, opts.workers)
    return FolderStream(ImageFolder(data, size), opts.seed, engine.per_device, opts.gradient_accumulation,
                        engine.processes, engine.rank)


def first_items(opts, data: str, size: int, count: int) -> list[Item]:
    """The fixed validation set (and the sample images' input): the folder's first ``count`` images in name order,
    or the first decodable samples of the first shard; seeds fixed by their place, so every evaluation draws the same
    masks, timesteps and noise."""
    items = []
    if opts.shards:
        import webdataset as wds
        first = expand_shards(opts.shards)[0]
        for pos, s in enumerate(wds.WebDataset(first, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                               empty_check=False)):
            seed = sample_seed(opts.seed, -1, pos)
            try:
                items.append(Item(s["__key__"], *decode_sample(s, size, np.random.default_rng(seed)), seed))
            except Exception:               # the same samples the stream skips
                continue
            if len(items) == count:
                break
        if not items:
            raise ValueError(f"{first}: no sample decodes")
        return items
    folder = ImageFolder(data, size)
    for i in range(min(count, len(folder))):
        items.append(Item(folder.items[i].stem, *folder[i], sample_seed(opts.seed, -1, i)))
    return items
