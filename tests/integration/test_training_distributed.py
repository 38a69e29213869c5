"""The trainers through the distributed engine (Hugging Face accelerate) on the CPU: ``train.py`` run by the real
launcher (``accelerate launch --multi_gpu --num_processes 2``, gloo) on a shallow random SD1.5 checkpoint.

- 2 processes × batch 1 train the same weights as 1 process × batch 2 and as 1 process × batch 1 × 2 accumulation
  steps (tolerance below, from the float32 noise of batching measured in the test itself);
- a run pre-empted (SIGUSR1 to the main process, SIGTERM to the other) saves and exits cleanly; resumed on the same
  and on another process count it continues the data stream with no sample seen twice and none skipped (sample keys
  logged by the test's data);
- WebDataset shards (BrushData's tar layout, written here) split over processes without overlap, a malformed sample
  is skipped and counted, a pattern that matches nothing is an error at start;
- only the main process writes files, every written file is mode 0644, and the trained file loads in Load Inpaint
  Branch in a real ComfyUI graph;
- training/accelerate/multi_node.yaml runs as two "machines" (two launchers on this host, one process each);
- ASUKA's MAE fine-tune runs on 2 processes with gradient accumulation (another method through the same engine);
- every other trainer (ASUKA alignment and decoder, LAR-Gen, Patch-Adapter DCA and RPA) runs two steps on 2
  processes;
- ``python train.py --help`` prints every method's options and exits 0;
- training/accelerate/fsdp.yaml on this machine is refused with the reason below.

FSDP (and DeepSpeed ZeRO) cannot be compared with DDP here, because accelerate (1.15, the installed engine) never
shards on the CPU; torch itself could (FSDP2's ``fully_shard`` trains over gloo on CPU tensors), but only through
code of our own that a GPU user's ``fsdp.yaml`` run would not execute, so such a test would prove nothing about the
shipped path:

- ``accelerate/state.py``, ``PartialState._prepare_backend``: a process without CUDA (the engine passes
  ``cpu=True``) gets ``DistributedType.MULTI_CPU`` over gloo, and ``AcceleratorState.__init__`` sets
  ``DistributedType.FSDP`` only inside ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, MULTI_SDAA,
  MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU, MULTI_NEURON]``, so ``ACCELERATE_USE_FSDP=true`` (what the launcher
  sets from ``distributed_type: FSDP``) is ignored and ``prepare`` wraps the model in plain
  ``DistributedDataParallel``, with ``fsdp_version`` 1 and 2 alike (measured: ``fsdp_sync_module_states: false``
  launches print ``MULTI_CPU DistributedDataParallel``);
- with ``fsdp_sync_module_states: true`` (fsdp.yaml) it does not get that far: ``FullyShardedDataParallelPlugin.
  __post_init__`` (``accelerate/utils/dataclasses.py``) raises ``RuntimeError: There are currently no available
  devices found, must be one of 'XPU', 'CUDA', 'MLU', 'NPU', 'MUSA', or 'HPU'.``;
- DeepSpeed: ``AcceleratorState`` takes ``DistributedType.DEEPSPEED`` only ``if ACCELERATE_USE_DEEPSPEED ... and
  not cpu``; with ``cpu=False`` and no device ``_prepare_backend`` finds no backend and ``PartialState`` sets
  ``num_processes = 1`` on every process (and deepspeed is not installed).

So the engine refuses an FSDP launch without CUDA (training/engine.py ``refuse_fsdp_without_gpus``) rather than
let it train DDP while the user believes the weights are sharded; the FSDP comparison with DDP needs a GPU machine.
"""
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from brushdata_rle import brushdata_rle
from test_branch_graph import _graph
from training_support import ROOT, loss_rows, write_data, install_output

SHIMS = str(Path(__file__).resolve().parent / "shims")
PROMPTS = ["a red apple", "a small wooden boat on a lake", "a green chair", "a blue cup", "an old lamp",
           "a striped cat", "a yellow kite", "a brick wall"]


@pytest.fixture(scope="module")
def base_ckpt(comfy, comfy_models):
    return comfy.folder_paths.get_full_path("checkpoints", comfy_models.sd15_checkpoint(levels=2))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("dist_data"), PROMPTS, box=lambda i: (16, 44, 8 + 6 * i, 40))


def _env(comfy, extra=None):
    env = dict(os.environ, COMFYUI_PATH=str(comfy.path), CONSISTENT_INPAINT_COMFY_SHIMS=SHIMS,
               OMP_NUM_THREADS="1", **(extra or {}))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _cmd(processes: int, port: int, extra=()):
    if processes == 1:
        return [sys.executable, str(ROOT / "train.py")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), *extra, str(ROOT / "train.py")]


def _config(path: Path, base: str, out: Path, **kw) -> Path:
    values = dict(base=base, output=str(out), resolution=64, log_every=1, save_every=100, sample_every=0, lr=1e-4,
                  beta=1e-5, tracker="none")
    values.update(kw)
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def _train(comfy, processes: int, cfg: Path, *flags, port: int = 29611, env=None, check=True):
    r = subprocess.run([*_cmd(processes, port), "painternet", "--config", str(cfg), *flags], env=_env(comfy, env),
                       capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _weights(out: Path) -> dict:
    return load_file(str(out / "painternet.safetensors"))


def _dist(a: dict, b: dict) -> float:
    """The L2 distance of two weight sets over every tensor."""
    assert a.keys() == b.keys()
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)))


def test_two_processes_equal_one_process_with_the_global_batch_and_with_accumulation(comfy, base_ckpt, data_dir,
                                                                                    tmp_path):
    """Global batch 2 for 3 optimiser steps, three ways. Each sample's mask, timestep and noise follow its place in
    the stream, so the three runs see the same samples in the same optimiser steps; what differs is float32 rounding
    (a batch of 2 through one UNet call vs two calls of 1, summed in another order), which AdamW's normalised step
    turns into up to ~lr per weight where a gradient is ~0, so weights are compared as a whole (L2 over every
    tensor). The tolerance is the noise measured here (1 process batch 2 vs batch 1 × 2 accumulation) times 4; that
    noise must itself be under 5 % of the distance to a run with another seed (other samples, masks, noise), so the
    test can fail."""
    runs = {}
    for name, procs, flags in (("ddp", 2, ()), ("batch", 1, ()), ("accum", 1, ("--gradient_accumulation", "2")),
                               ("other", 1, ("--seed", "1"))):
        cfg = _config(tmp_path / f"{name}.toml", base_ckpt, tmp_path / name, data=str(data_dir), batch_size=2, steps=3)
        _train(comfy, procs, cfg, *flags)
        runs[name] = _weights(tmp_path / name)
        for heavy in ("state.pt", "painternet.safetensors"):      # 1.8 GB per run; the weights are in `runs`
            (tmp_path / name / heavy).unlink()
    noise = _dist(runs["batch"], runs["accum"])
    apart = _dist(runs["batch"], runs["other"])
    tol = 4 * noise
    print(f"L2: batch vs accumulation (float32 noise) {noise:.3g}; tolerance {tol:.3g}; "
          f"ddp vs batch {_dist(runs['ddp'], runs['batch']):.3g}; ddp vs accumulation "
          f"{_dist(runs['ddp'], runs['accum']):.3g}; another seed {apart:.3g}")
    assert noise < 0.05 * apart, (noise, apart)
    assert _dist(runs["ddp"], runs["batch"]) <= tol
    assert _dist(runs["ddp"], runs["accum"]) <= tol
    rows = {name: loss_rows(tmp_path / name) for name in runs}
    for name in ("ddp", "accum"):
        for a, b in zip(rows[name], rows["batch"]):
            assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-3, abs=1e-5), name
    assert [r["loss"] for r in rows["other"]] != [r["loss"] for r in rows["batch"]]


def _keys_log(env_dir: Path) -> dict:
    """{rank: [keys]} that the test's hook recorded (one file per process)."""
    out = {}
    for f in sorted(env_dir.glob("keys.*.txt")):
        out[int(f.name.split(".")[1])] = [line.split() for line in f.read_text().splitlines()]
    return out


def _interrupt(comfy, cfg: Path, out: Path, port: int, env=None) -> int:
    """A 2-process run of ``cfg``, once it has logged step 2, sent a cluster's pre-emption notices: SIGUSR1 to the
    main process (rank 0), SIGTERM to the other. Either signal alone would kill a process that did not handle it
    (and the launcher would fail); handled, every process stops at the same step, saves it and exits 0, the main
    process's signal logged once. -> the step it stopped at."""
    p = subprocess.Popen([*_cmd(2, port), "painternet", "--config", str(cfg)], env=_env(comfy, env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    deadline = time.time() + 600
    while time.time() < deadline:
        rows = (out / "loss.csv").read_text().splitlines() if (out / "loss.csv").exists() else []
        if len(rows) >= 3:                                   # header + 2 steps
            break
        time.sleep(0.5)
        assert p.poll() is None, p.stdout.read()[-4000:]
    workers = {int(c.environ()["RANK"]): c for c in psutil.Process(p.pid).children(recursive=True)
               if "train.py" in " ".join(c.cmdline()) and "accelerate" not in " ".join(c.cmdline())}
    assert sorted(workers) == [0, 1], workers
    workers[0].send_signal(signal.SIGUSR1)
    workers[1].send_signal(signal.SIGTERM)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0, text[-4000:]    # the processes saved and exited cleanly, so the launcher too
    assert text.count("SIGUSR1 received") == 1 and "SIGTERM received" not in text     # logged by the main process
    stopped = torch.load(out / "state.pt", weights_only=True)["step"]
    assert 2 <= stopped < 40
    assert [int(r["step"]) for r in loss_rows(out)] == list(range(1, stopped + 1))
    return stopped


def test_sigusr1_and_sigterm_save_and_resume_on_the_same_and_another_process_count(comfy, base_ckpt, data_dir,
                                                                                    tmp_path):
    """A 2-process run is pre-empted (SIGUSR1 and SIGTERM, :func:`_interrupt`) once it has passed step 2: it saves
    the step it is at and exits 0. Resumed on 2 processes, then on 1: the steps continue, and every optimiser step's
    samples (keys) are exactly those of an uninterrupted run: no sample twice within an epoch, none skipped."""
    out = tmp_path / "run"
    cfg = _config(tmp_path / "c.toml", base_ckpt, out, data=str(data_dir), batch_size=2, steps=40)
    keys = tmp_path / "keys"
    keys.mkdir()
    stopped = _interrupt(comfy, cfg, out, 29631, {"CONSISTENT_INPAINT_KEY_LOG": str(keys)})
    assert torch.load(out / "state.pt", weights_only=True)["processes"] == 2

    _config(tmp_path / "c.toml", base_ckpt, out, data=str(data_dir), batch_size=2, steps=stopped + 2)
    _train(comfy, 2, tmp_path / "c.toml", env={"CONSISTENT_INPAINT_KEY_LOG": str(keys)}, port=29632)
    _config(tmp_path / "c.toml", base_ckpt, out, data=str(data_dir), batch_size=2, steps=stopped + 6)
    _train(comfy, 1, tmp_path / "c.toml", env={"CONSISTENT_INPAINT_KEY_LOG": str(keys)})
    assert [int(r["step"]) for r in loss_rows(out)] == list(range(1, stopped + 7))

    seen = {}                 # step -> keys trained at that step (the last record of a step wins: a resumed run
    for rank, lines in _keys_log(keys).items():     # redoes no step, but a killed one may have drawn one unsaved)
        for step, *ks in lines:
            seen.setdefault(int(step), {})[rank] = ks
    per_step = [sorted(k for r in sorted(seen[s]) for k in seen[s][r]) for s in range(stopped + 6)]
    flat = [k for ks in per_step for k in ks]
    n = len(PROMPTS)
    for epoch_start in range(0, len(flat), n):
        epoch = flat[epoch_start:epoch_start + n]
        assert len(set(epoch)) == len(epoch), epoch            # nothing twice within an epoch
    assert sorted(flat[:n]) == sorted(f"img{i}" for i in range(n))   # the first epoch: every image once


def _brushdata_shard(path: Path, start: int, count: int, bad=()):
    """A tar shard in BrushData's layout: key.image (JPEG), key.segmentation (JSON {"mask": [RLE, ...]}, runs of
    (1-based start, length) over column-major pixels), key.caption, key.height, key.width."""
    rng = np.random.default_rng(start)
    with tarfile.open(path, "w") as tar:
        def add(name, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(start, start + count):
            key = f"{i:06d}"
            h, w = 48, 64
            img = Image.fromarray(rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)).resize((w, h), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG")
            m = np.zeros((h, w), np.uint8)
            m[10:30, 8 + i % 20:30 + i % 20] = 1
            runs = brushdata_rle(m)
            add(f"{key}.image", b"not a jpeg" if i in bad else buf.getvalue())
            add(f"{key}.segmentation", json.dumps({"mask": [runs]}).encode())
            add(f"{key}.caption", PROMPTS[i % len(PROMPTS)].encode())
            add(f"{key}.height", str(h).encode())
            add(f"{key}.width", str(w).encode())


def test_brushdata_shards_train_painternet_on_two_processes_without_overlap(comfy, base_ckpt, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(4):
        _brushdata_shard(shards / f"{s:05d}.tar", 6 * s, 6, bad={13})
    out = tmp_path / "run"
    keys = tmp_path / "keys"
    keys.mkdir()
    cfg = _config(tmp_path / "s.toml", base_ckpt, out, shards=str(shards / "{00000..00003}.tar"), batch_size=2,
                  steps=5, shuffle_buffer=4)
    r = _train(comfy, 2, cfg, env={"CONSISTENT_INPAINT_KEY_LOG": str(keys)}, port=29641)
    log = _keys_log(keys)
    assert sorted(log) == [0, 1]
    by_rank = {rank: [k for _, *ks in lines for k in ks] for rank, lines in log.items()}
    assert all(len(v) == 5 for v in by_rank.values())
    assert not set(by_rank[0]) & set(by_rank[1])               # disjoint: the processes read different shards
    shard_of = {rank: {int(k) // 6 for k in ks} for rank, ks in by_rank.items()}
    assert not shard_of[0] & shard_of[1]
    everything = by_rank[0] + by_rank[1]
    assert len(set(everything)) == len(everything) and "000013" not in everything
    rows = loss_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and all(np.isfinite(float(r["loss"])) for r in rows)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["data"]["kind"] == "shards" and state["processes"] == 2
    if 13 // 6 in shard_of[0] | shard_of[1]:
        assert "skipping 000013" in r.stdout + r.stderr

    missing = _config(tmp_path / "m.toml", base_ckpt, tmp_path / "none", shards=str(shards / "nothing-*.tar"),
                      batch_size=2, steps=1)
    bad = _train(comfy, 1, missing, check=False)
    assert bad.returncode != 0 and "match no file" in bad.stderr


AUDIT = """
import os, sys
_out, _log = os.environ["AUDIT_OUTPUT"], os.environ["AUDIT_LOG"]
def _hook(event, args):
    if event in ("open", "os.rename", "os.replace", "os.chmod", "os.mkdir", "os.remove"):
        path, mode = args[0], (args[1] if event == "open" and len(args) > 1 else "")
        write = event != "open" or (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
            (event == "open" and isinstance(args[2] if len(args) > 2 else 0, int) and (args[2] or 0) & 3)
        if write and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(_out):
            with open(_log + "." + os.environ.get("RANK", "single"), "a") as fh:
                fh.write(event + " " + os.fsdecode(path) + "\\n")
sys.addaudithook(_hook)
"""


def test_only_the_main_process_writes_files_with_mode_0644_and_the_file_loads_in_comfyui(
        comfy, run_prompt, base_ckpt, data_dir, tmp_path):
    """Every process runs under a Python audit hook (sitecustomize) that records each file it opens for writing,
    renames, chmods or creates under the output folder: only rank 0 appears."""
    out = tmp_path / "run"
    cfg = _config(tmp_path / "w.toml", base_ckpt, out, data=str(data_dir), batch_size=2, steps=2, sample_every=2,
                  sample_steps=1, tracker="tensorboard", validate_every=1, validation_size=2)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    audit = {"AUDIT_OUTPUT": str(out), "AUDIT_LOG": str(tmp_path / "writes"),
             "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    old = os.umask(0o077)                     # the strictest umask: files would be 0600 without the fix
    try:
        _train(comfy, 2, cfg, env=audit, port=29651)
    finally:
        os.umask(old)
    writers = sorted(p.name.rsplit(".", 1)[1] for p in tmp_path.glob("writes.*"))
    assert writers == ["0"], writers
    written = (tmp_path / "writes.0").read_text()
    assert "state.pt" in written and "loss.csv" in written
    for f in ("painternet.safetensors", "state.pt", "loss.csv", "validation.csv", "samples/step_0000002.png"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o644, f
    assert list((out / "logs").rglob("events.out.tfevents.*"))      # TensorBoard through the engine's tracker
    assert [int(r["step"]) for r in loss_rows(out, "validation.csv")] == [1, 2]     # the fixed validation set
    assert not list(out.rglob("*.tmp"))

    folder = Path(comfy.folder_paths.get_folder_paths("inpaint_branch")[0])
    folder.mkdir(parents=True, exist_ok=True)
    install_output(out / "painternet.safetensors", folder, "painternet_ddp_test.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    g = comfy.graph()
    n = _graph(g, Path(base_ckpt).name, "painternet_ddp_test.safetensors", scale=1.0, counter=False)
    assert torch.isfinite(run_prompt(g).output(n["sampler"].id, 0)["samples"]).all()


def test_help_lists_every_method_and_its_options(comfy):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], env=_env(comfy), capture_output=True,
                       text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    for method in ("painternet", "asuka_mae", "asuka_alignment", "asuka_decoder", "largen", "patch_adapter"):
        assert f"usage: train.py {method}" in r.stdout
    assert "--gradient_accumulation" in r.stdout and "ATAL weight (paper: 1e-5) (default: 1e-05)" in r.stdout


def test_the_multi_node_config_file_trains_across_two_launchers(comfy, base_ckpt, data_dir, tmp_path):
    """training/accelerate/multi_node.yaml as the README and slurm.sbatch use it: two launchers ("machines" 0 and 1,
    here both on this host, one process each) join one run through the static rendezvous at the main machine."""
    out = tmp_path / "run"
    cfg = _config(tmp_path / "n.toml", base_ckpt, out, data=str(data_dir), batch_size=2, steps=2)
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "training" / "accelerate" / "multi_node.yaml"), "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", "29661",
               "--mixed_precision", "no", str(ROOT / "train.py"), "painternet", "--config", str(cfg)]
        procs.append(subprocess.Popen(cmd, env=_env(comfy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, cwd=str(ROOT)))
    texts = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    assert "global batch 2 = 1 per device × 1 accumulation × 2 processes" in texts[0]
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["processes"] == 2 and len(state["rng"]) == 2


def test_asuka_mae_trains_on_two_processes_with_accumulation(comfy, data_dir, tmp_path):
    """Another method through the same engine: ASUKA's MAE fine-tune (a (pixels, holes) batch, the step handed to
    the loss) on 2 processes × batch 1 × 2 accumulation steps = global batch 4; the log states the split, every
    optimiser step is logged once with the learning rate, and the file loads in Load ASUKA Prior's MAE reader."""
    import layouts
    mae = tmp_path / "mae_start.pth"
    torch.save(layouts.mae_checkpoint(dim=192, depth=2, dec_dim=128, dec_depth=8), mae)
    out = tmp_path / "mae"
    cfg = tmp_path / "mae.toml"
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in dict(
        mae=str(mae), data=str(data_dir), output=str(out), batch_size=4, gradient_accumulation=2, steps=3,
        log_every=1, save_every=100, sample_every=0, tracker="none").items()))
    r = subprocess.run([*_cmd(2, 29671), "asuka_mae", "--config", str(cfg)], env=_env(comfy), capture_output=True,
                       text=True, timeout=900, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "global batch 4 = 1 per device × 2 accumulation × 2 processes" in r.stderr
    rows = loss_rows(out)
    assert [int(row["step"]) for row in rows] == [1, 2, 3] and all(float(row["lr"]) == 1e-4 for row in rows)
    from training_support import pack
    mae_model = pack(comfy, "models.asuka").load_mae(str(out / "mae.safetensors"), torch.float32)
    assert torch.load(out / "state.pt", weights_only=True)["processes"] == 2 and mae_model is not None


# -- every trainer under the launcher ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def objects_dir(tmp_path_factory):
    """Four images whose object masks are all non-empty (LAR-Gen refuses an image without its object)."""
    return write_data(tmp_path_factory.mktemp("objects"), PROMPTS[:4], box=lambda i: (16, 44, 8 + 8 * i, 60))


@pytest.fixture(scope="module")
def asuka_files(comfy, comfy_models, tmp_path_factory):
    import test_training_asuka
    return test_training_asuka.input_files(comfy, comfy_models, tmp_path_factory.mktemp("asuka_files"))


@pytest.fixture(scope="module")
def largen_files(comfy, comfy_models, tmp_path_factory):
    import test_training_largen
    return test_training_largen.input_files(comfy, comfy_models, tmp_path_factory.mktemp("largen_files"))


@pytest.fixture(scope="module")
def patch_adapter_ckpt(comfy, comfy_models):
    name = comfy_models.sd15_inpaint_checkpoint(levels=2, skip_top_attention=True)
    return comfy.folder_paths.get_full_path("checkpoints", name)


def _asuka_run(request, method):
    f = request.getfixturevalue("asuka_files")
    keys = dict(base=f["ckpt"], mae=str(f["mae"])) if method == "asuka_alignment" else dict(base=f["ckpt"])
    return ROOT / "train.py", [method], dict(keys, resolution=64)


def _largen_run(request):
    f = {k: str(v) for k, v in request.getfixturevalue("largen_files").items() if k != "objects"}
    keys = dict({k: f[k] for k in ("base", "image_proj", "clip", "vae", "clip_vision")}, resolution=64)
    # the small encoders' architectures: test_training_largen's __main__ is train.py's main with them (its docstring)
    return ROOT / "tests" / "integration" / "test_training_largen.py", ["largen", "--stage", "1"], keys


def _patch_adapter_run(request, stage):
    keys = dict(base=request.getfixturevalue("patch_adapter_ckpt"), resolution=64)
    if stage == "rpa":
        keys.update(full_resolution=128, patch_size=64)
    return ROOT / "train.py", ["patch_adapter", "--stage", stage], keys


# trainer -> (how to run it, the file it writes); painternet and asuka_mae run on 2 processes in the tests above
LAUNCHED = {
    "asuka_alignment": (lambda r: _asuka_run(r, "asuka_alignment"), "alignment.safetensors"),
    "asuka_decoder": (lambda r: _asuka_run(r, "asuka_decoder"), "harmonizing_decoder.safetensors"),
    "largen": (_largen_run, "largen_stage1.safetensors"),
    "patch_adapter_dca": (lambda r: _patch_adapter_run(r, "dca"), "patch_adapter.safetensors"),
    "patch_adapter_rpa": (lambda r: _patch_adapter_run(r, "rpa"), "patch_adapter.safetensors"),
}


@pytest.mark.parametrize("trainer", list(LAUNCHED))
def test_every_trainer_runs_two_steps_on_two_processes(comfy, request, objects_dir, tmp_path, trainer):
    """Each remaining trainer through ``accelerate launch --multi_gpu --num_processes 2`` (tiny models, global batch
    2, two optimiser steps): the processes split the batch, every step is logged once with a finite loss, the state
    holds both processes' random state and the trained file is written."""
    how, written = LAUNCHED[trainer]
    script, args, keys = how(request)
    out = tmp_path / "run"
    cfg = tmp_path / f"{trainer}.toml"
    keys.update(data=str(objects_dir), output=str(out), batch_size=2, steps=2, log_every=1, save_every=100,
                sample_every=0, tracker="none")
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    env = _env(comfy, {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "unit"), str(ROOT / "tests" /
                                                                                      "integration")])})
    port = 29681 + list(LAUNCHED).index(trainer)
    launch = [*_cmd(2, port)[:-1], str(script)]
    r = subprocess.run([*launch, *args, "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "global batch 2 = 1 per device × 1 accumulation × 2 processes" in r.stdout + r.stderr
    rows = loss_rows(out)
    assert [int(row["step"]) for row in rows] == [1, 2] and all(np.isfinite(float(row["loss"])) for row in rows)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["processes"] == 2 and len(state["rng"]) == 2
    trained = load_file(str(out / written))
    assert trained and all(torch.isfinite(v).all() for v in trained.values())


def test_the_fsdp_config_on_the_cpu_is_refused_with_the_reason(comfy, base_ckpt, data_dir, tmp_path):
    """training/accelerate/fsdp.yaml through the real launcher on this machine (no CUDA): every process stops at the
    engine with the reason (accelerate would fail with "no available devices" or silently train DDP), nothing is
    written, and the launcher exits non-zero."""
    out = tmp_path / "run"
    cfg = _config(tmp_path / "f.toml", base_ckpt, out, data=str(data_dir), batch_size=2, steps=1)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "training" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
              "--main_process_port", "29691", str(ROOT / "train.py")]
    r = subprocess.run([*launch, "painternet", "--config", str(cfg)], env=_env(comfy), capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert r.returncode != 0
    assert "FSDP was asked for" in r.stderr and "accelerate runs CPU processes as DDP over gloo" in r.stderr, \
        r.stderr[-3000:]
    assert not (out / "state.pt").exists() and not (out / "painternet.safetensors").exists()
