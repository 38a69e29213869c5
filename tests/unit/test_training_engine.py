"""The engine loop (training/engine.py) and the data streams (training/data.py) in one process, plain torch: the
global batch, the folder stream's split, BrushData's run-length masks, WebDataset shards split over readers with a
malformed sample skipped, resumable positions, the loop's resume / state / file modes, and option help."""
import csv
import dataclasses
import io
import json
import stat
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from brushdata_rle import brushdata_rle
from training import common, data, engine


def test_global_batch_is_per_device_times_accumulation_times_processes():
    assert engine.global_batch(8, 2, 2) == 2
    assert engine.global_batch(4, 1, 1) == 4
    with pytest.raises(ValueError, match="batch_size 6 .* multiple of 4"):
        engine.global_batch(6, 2, 2)


def _folder(tmp_path, n=5):
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    return data.ImageFolder(str(tmp_path), 8)


def test_folder_stream_splits_each_optimiser_step_over_processes_and_micro_batches(tmp_path):
    """Every optimiser step covers the same global positions whatever the split; keys of one epoch never repeat."""
    folder = _folder(tmp_path)

    def steps(per_device, accumulation, processes, n_steps=4):
        out = []
        streams = [data.FolderStream(folder, 3, per_device, accumulation, processes, r) for r in range(processes)]
        for _ in range(n_steps):
            keys = []
            for _ in range(accumulation):
                for s in streams:
                    keys += [(it.key, it.seed) for it in s.next()]
            out.append(sorted(keys))
        return out
    one = steps(2, 1, 1)
    assert one == steps(1, 1, 2) == steps(1, 2, 1)
    order = [k for k, _ in sum(steps(1, 1, 1, 10), [])]
    assert sorted(order[:5]) == sorted(order[5:]) == [f"im{i}" for i in range(5)]   # each epoch: every image once
    assert order[:5] != order[5:]                                                   # reshuffled per epoch
    s = data.FolderStream(folder, 3, 1, 1, 2, 1)
    s.load({"kind": "folder", "position": 4}, 2)
    assert s.positions(2, 0) == [5]                                   # rank 1 of step 2 at batch 2




def test_brushdata_run_length_masks_are_column_major_and_one_based():
    m = np.zeros((5, 7), np.uint8)
    m[1:3, 2:6] = 1
    m[4, 0] = 1
    assert np.array_equal(data.rle_mask(brushdata_rle(m), 5, 7), m)
    assert np.array_equal(data.rle_mask([1, 2], 2, 3), np.array([[1, 0, 0], [1, 0, 0]]))


def _shard(path, keys, bad=()):
    with tarfile.open(path, "w") as tar:
        for k in keys:
            buf = io.BytesIO()
            Image.fromarray(np.full((6, 8, 3), k % 250, np.uint8)).save(buf, "PNG")
            m = np.zeros((6, 8), np.uint8)
            m[1:4, 2:5] = 1
            for name, payload in ((f"{k:05d}.image", b"broken" if k in bad else buf.getvalue()),
                                  (f"{k:05d}.segmentation", json.dumps({"mask": [brushdata_rle(m)]}).encode()),
                                  (f"{k:05d}.caption", f"caption {k}".encode()),
                                  (f"{k:05d}.height", b"6"), (f"{k:05d}.width", b"8")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_shards_split_without_overlap_skip_bad_samples_and_resume_on_another_reader_count(tmp_path):
    for s in range(4):
        _shard(tmp_path / f"{s:03d}.tar", range(10 * s, 10 * s + 5), bad={22})
    spec = str(tmp_path / "{000..003}.tar")
    assert len(data.expand_shards(spec)) == 4
    with pytest.raises(FileNotFoundError, match="match no file"):
        data.expand_shards(str(tmp_path / "none-*.tar"))
    # two processes, 3 micro-batches of 2 each
    streams = [data.ShardStream(spec, 8, 0, 2, r, 2, shuffle_buffer=3) for r in range(2)]
    seen = [[it for _ in range(3) for it in s.next()] for s in streams]
    keys = [[it.key for it in items] for items in seen]
    assert not set(keys[0]) & set(keys[1])
    assert {int(k) // 10 for k in keys[0]}.isdisjoint({int(k) // 10 for k in keys[1]})
    first = seen[0][0]
    assert first.pixels.shape == (3, 8, 8) and first.mask is not None and first.prompt.startswith("caption")
    state = data.ShardStream.merge([s.state() for s in streams])
    # resume on one process: the rest of the epoch, nothing twice, nothing skipped
    rest = data.ShardStream(spec, 8, 0, 1, 0, 1, shuffle_buffer=3)
    rest.load(state, 3)
    later = [rest.next()[0].key for _ in range(19 - 12)]
    everything = keys[0] + keys[1] + later
    good = [f"{k:05d}" for s in range(4) for k in range(10 * s, 10 * s + 5) if k != 22]
    assert sorted(everything) == sorted(good)
    assert streams[0].skipped + streams[1].skipped == 1 == rest.skipped      # counted once, carried in the state
    # and the next draw starts epoch 1
    assert rest.next()[0].key in good


def test_shard_stream_with_data_loader_workers_splits_shards_over_them(tmp_path):
    for s in range(4):
        _shard(tmp_path / f"{s:03d}.tar", range(10 * s, 10 * s + 3))
    st = data.ShardStream(str(tmp_path / "*.tar"), 8, 0, 1, 0, 1, shuffle_buffer=1, workers=2)
    keys = [st.next()[0].key for _ in range(12)]
    assert sorted(keys) == sorted(f"{k:05d}" for s in range(4) for k in range(10 * s, 10 * s + 3))


@dataclasses.dataclass
class Opts(common.TrainOptions):
    """Options."""
    steps: int = 4                 # optimiser steps
    batch_size: int = 2            # global batch


def _loop(out, folder, steps=4, crash_at=None, ema=0.0):
    opts = Opts(log_every=1, save_every=2, sample_every=0, tracker="none", ema_decay=ema, seed=1)
    eng = engine.Engine(opts, 2, str(out))
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss(b, step):
        if step == crash_at:
            raise KeyboardInterrupt
        return {"loss": (net(b) - 1).square().mean()}
    eng.prepare(net, opt, loss, lambda step: 0.5 ** step)
    stream = data.FolderStream(folder, 1, eng.per_device, 1, 1, 0)
    make = lambda items: torch.stack([it.pixels.mean(dim=(1, 2)) for it in items])     # noqa: E731
    saved = out / "w.pt"
    return net, engine.Loop(name="t", output=str(out), steps=steps, engine=eng, stream=stream, make_batch=make,
                            loss_names=["loss"], save_fn=lambda: engine.write_atomic(
                                saved, lambda tmp: torch.save(net.state_dict(), tmp)),
                            log_every=1, save_every=2)


def test_a_resumed_loop_equals_an_uninterrupted_one_and_writes_0644_files(tmp_path):
    """A run stopped after logging step 3 but saving only step 2 resumes at 2: loss.csv keeps 1 and 2, the resumed
    run logs 3 and 4, its weights, schedule and data position equal an uninterrupted run's; files are 0644 under a
    0077 umask."""
    import os
    (tmp_path / "d").mkdir()
    folder = _folder(tmp_path / "d")
    old = os.umask(0o077)
    try:
        whole, loop = _loop(tmp_path / "whole", folder)
        loop.run()
        _, loop = _loop(tmp_path / "resumed", folder, crash_at=2)
        with pytest.raises(KeyboardInterrupt):
            loop.run()
        with open(tmp_path / "resumed" / "loss.csv") as fh:
            assert [r["step"] for r in csv.DictReader(fh)] == ["1", "2"]
        resumed, loop = _loop(tmp_path / "resumed", folder)
        loop.run()
    finally:
        os.umask(old)
    read = lambda p: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in csv.DictReader(open(p))]  # noqa
    assert read(tmp_path / "resumed" / "loss.csv") == read(tmp_path / "whole" / "loss.csv")
    assert torch.equal(resumed.weight, whole.weight)
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["data"] == {"kind": "folder", "position": 8}
    assert state["scheduler"]["last_epoch"] == 4
    for f in ("w.pt", "state.pt", "loss.csv"):
        assert stat.S_IMODE((tmp_path / "resumed" / f).stat().st_mode) == 0o644, f


def test_ema_weights_are_what_the_file_holds(tmp_path):
    folder = _folder(tmp_path)
    net, loop = _loop(tmp_path / "ema", folder, steps=3, ema=0.5)
    loop.run()
    written = torch.load(tmp_path / "ema" / "w.pt", weights_only=True)
    ema = loop.engine.ema.module
    assert torch.equal(written["weight"], ema.weight.detach()) and not torch.equal(written["weight"], net.weight)


def test_option_help_comes_from_the_comments():
    helps = common.option_help(Opts)
    assert helps["steps"] == "optimiser steps" and helps["batch_size"] == "global batch"
    assert helps["ema_decay"].endswith("then hold the EMA weights")
    text = common.config_parser(Opts, "train.py x").format_help()
    assert "--gradient_accumulation" in text and "(default: 1)" in text


def test_optimizer_option_picks_torch_adamw_or_its_fused_kernel():
    net = nn.Linear(3, 2)
    plain = common.adamw(net.parameters(), Opts(), lr=0.1)
    fused = common.adamw(net.parameters(), Opts(optimizer="adamw_fused"), lr=0.1)
    assert isinstance(plain, torch.optim.AdamW) and not plain.defaults["fused"]
    assert fused.defaults["fused"]
    with pytest.raises(ValueError, match="optimizer must be one of adamw, adamw_fused, adamw_8bit"):
        Opts(optimizer="sgd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_an_fsdp_launch_without_gpus_is_refused_instead_of_training_ddp(monkeypatch):
    """What ``accelerate launch --config_file training/accelerate/fsdp.yaml`` sets in each process: without CUDA the
    engine refuses (accelerate would run DDP over gloo, or fail with 'no available devices'); without the flag the
    same call builds the accelerator."""
    assert engine.accelerator_for("no", 1, None, None).distributed_type.name == "NO"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP was asked for .* without CUDA GPUs: accelerate runs CPU processes"):
        engine.accelerator_for("no", 1, None, None)
