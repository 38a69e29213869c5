"""The distributed engine every trainer runs through: Hugging Face ``accelerate`` (processes, devices, DDP / FSDP
wrapping, mixed precision, gradient accumulation, trackers), and the loop around it (global batch, learning-rate
schedule per optimiser step, resumable state written by one process, pre-emption signals, validation, EMA, logs).

The same command runs on one process (``python train.py ...``) and on many (``accelerate launch --multi_gpu
--num_processes N train.py ...``, or a config file for several machines / FSDP): what the launcher set up is what
``Accelerator()`` finds. The trainer's own code is its loss and its data (STYLE.md habit 13).
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("consistent_inpaint.training")

FILE_MODE = 0o644            # written files are readable by a ComfyUI running as another user


def write_atomic(path: Path, write) -> Path:
    """``write(tmp_path)`` then an atomic rename onto ``path``, mode 0644 (``torch.save`` / ``save_file`` create
    0600 files under some umasks; a ComfyUI running as another user must read them)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    return path


def accelerator_for(mixed_precision: str, accumulation: int, project_dir: str | None, tracker: str | None):
    """The ``accelerate.Accelerator`` of this process. On a machine without CUDA the processes a launcher started
    join over gloo (``cpu=True``). A single process may re-configure (tests build trainers of several precisions in
    one process); several processes must agree with what the launcher set."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    refuse_fsdp_without_gpus()
    kwargs = {}
    if tracker and project_dir:
        logs = str(Path(project_dir) / "logs")
        kwargs.update(log_with=tracker, project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=logs))
    # find_unused_parameters: a trainer's network may leave parts unused in a step (ATAL's maps at beta 0, a gate)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                       gradient_accumulation_steps=accumulation, step_scheduler_with_optimizer=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], **kwargs)


def refuse_fsdp_without_gpus() -> None:
    """A clear error for an FSDP launch (training/accelerate/fsdp.yaml) on a machine without CUDA. accelerate
    (1.15) would otherwise either fail with "no available devices" (``fsdp_sync_module_states: true``, in
    ``FullyShardedDataParallelPlugin.__post_init__``) or silently train plain DDP over gloo (``AcceleratorState``
    switches to FSDP only for GPU-like distributed types, never for ``MULTI_CPU``), replicating what the user asked
    to shard."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise ValueError("FSDP was asked for (accelerate launch with an FSDP config such as "
                         "training/accelerate/fsdp.yaml) on a machine without CUDA GPUs: accelerate runs CPU processes "
                         "as DDP over gloo only. Launch FSDP on GPUs, or launch without the FSDP config "
                         "(--multi_gpu --num_processes N) for DDP")


class _Objective(nn.Module):
    """What the engine wraps (DDP / FSDP): the trainable network as its only submodule, and the method's loss as its
    forward. The network itself runs inside the frozen base through the nodes' patches, so the wrapper's forward is
    where DDP prepares its gradient hooks and FSDP gathers the shards."""

    def __init__(self, module: nn.Module, loss_fn):
        super().__init__()
        self.module = module
        self._loss_fn = [loss_fn]            # a list: not a submodule

    def forward(self, batch, step):
        return self._loss_fn[0](batch, step)


def global_batch(batch_size: int, processes: int, accumulation: int) -> int:
    """-> the per-device batch of a global ``batch_size`` = per-device × accumulation × processes."""
    if accumulation < 1 or batch_size < 1:
        raise ValueError(f"batch_size and gradient_accumulation must be >= 1; got {batch_size}, {accumulation}")
    per = batch_size // (processes * accumulation)
    if per * processes * accumulation != batch_size:
        raise ValueError(f"batch_size {batch_size} (global) is not per-device × gradient_accumulation "
                         f"{accumulation} × processes {processes}; make it a multiple of {processes * accumulation}")
    return per


class Engine:
    """One trainer's view of the engine: the accelerator, the prepared (wrapped) objective, optimiser and schedule.

    ``batch_size`` is the global batch; ``per_device`` what one process draws per micro-step."""

    def __init__(self, opts, batch_size: int, output: str | None = None):
        self.opts = opts
        self.acc = accelerator_for(opts.mixed_precision, opts.gradient_accumulation, output,
                                   None if opts.tracker == "none" else opts.tracker)
        self.batch_size = batch_size
        self.per_device = global_batch(batch_size, self.acc.num_processes, opts.gradient_accumulation)
        self.device = self.acc.device
        self.model = self.optimizer = self.scheduler = self.ema = None
        self._sums, self._count = {}, 0

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def processes(self) -> int:
        return self.acc.num_processes

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, lr_at=None):
        """Wraps ``module`` (DDP / FSDP, as launched) with ``loss_fn(batch, step) -> {name: tensor}`` as its forward;
        ``lr_at(step) -> factor`` is the schedule over optimiser steps (constant by default)."""
        objective = _Objective(module, loss_fn)
        self.model, self.optimizer = self.acc.prepare(objective, optimizer)
        self.module = module
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer if hasattr(
            self.optimizer, "optimizer") else self.optimizer, lr_at or (lambda step: 1.0))
        if self.opts.ema_decay > 0:
            if self.acc.is_fsdp2 or self.acc.distributed_type.name == "FSDP":
                raise ValueError("ema_decay needs the whole trained weights on every process; it does not combine "
                                 "with FSDP (train without EMA or with DDP)")
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(self.opts.ema_decay),
                                     use_buffers=True)
        return self.model

    def step(self, batch, step: int) -> dict | None:
        """One micro-batch: forward (the engine's autocast), backward (its loss scaling, accumulation and gradient
        sync) and, on the last micro-batch of an optimiser step, the step itself, the schedule and the EMA. -> the
        losses averaged over the micro-batches and processes of the optimiser step, or None between."""
        acc = self.acc
        with acc.accumulate(self.model):
            parts = self.model(batch, step)
            acc.backward(parts["loss"])
            if acc.sync_gradients and self.opts.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), self.opts.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for k, v in parts.items():
            self._sums[k] = self._sums.get(k, 0.0) + (float(v.detach()) if torch.is_tensor(v) else float(v))
        self._count += 1
        if not acc.sync_gradients:
            return None
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        means = torch.tensor([self._sums[k] / self._count for k in self._sums], dtype=torch.float64,
                             device=self.device)
        if self.processes > 1:
            means = acc.reduce(means, "mean")
        out = dict(zip(self._sums, means.tolist()))
        self._sums, self._count = {}, 0
        return out

    @contextlib.contextmanager
    def ema_weights(self):
        """Inside: the trained module holds the EMA weights (for saving and sampling); its own weights after."""
        if self.ema is None:
            yield
            return
        own = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.module.load_state_dict(own)

    # -- state --
    @property
    def sharded(self) -> bool:
        """FSDP (1 or 2): the trained weights and the optimiser state are split over the processes."""
        return self.acc.distributed_type.name == "FSDP"

    def full_state(self) -> tuple[dict, dict]:
        """(model, optimiser) state dicts, whole, on the CPU; every process must call it. Under FSDP through
        torch.distributed.checkpoint's full state dicts (gathered from the shards, keyed by parameter name), so a
        run resumes on any process count."""
        if not self.sharded:
            model_sd = {k: v.detach().cpu() for k, v in self.acc.unwrap_model(self.model).state_dict().items()}
            return model_sd, self.optimizer.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.model, self.optimizer.optimizer, options=opts)

    def load_full_state(self, model_sd: dict, optim_sd: dict) -> None:
        if not self.sharded:
            self.acc.unwrap_model(self.model).load_state_dict(model_sd)
            self.optimizer.optimizer.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(self.model, self.optimizer.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True, strict=True))


def rng_state(generators: dict) -> dict:
    """This process's random generators (torch CPU and CUDA, numpy, python, the trainer's own)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "python": repr(random.getstate()),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    import ast
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_process(seed: int, rank: int, generators: dict) -> None:
    """A process without a saved random state (a new run, or more processes than the saved run had): its own seeds
    derived from the run's seed and its rank."""
    torch.manual_seed(seed + 1000 * rank)
    np.random.seed((seed + 1000 * rank) % 2 ** 32)
    random.seed(seed + 1000 * rank)
    for i, g in enumerate(generators.values()):
        if rank:
            g.manual_seed(seed + 1000 * rank + 17 * (i + 1))


class LossLog:
    """A CSV of (step, values...) in the output folder. A resumed run keeps the rows up to the step it resumes from
    (``resumed``) and drops any logged after that state was saved, so every step appears once; a fresh run starts
    the file anew. Written by the main process only."""

    def __init__(self, path: Path, names: list[str], resumed: int = 0):
        self.path, self.names = path, names
        rows = []
        if resumed and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in list(csv.reader(fh))[1:] if r and int(r[0]) <= resumed]
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([["step", *names], *rows])
        os.chmod(path, FILE_MODE)

    def write(self, step: int, values: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([step, *(f"{values[n]:.6g}" for n in self.names)])


class StopSignal:
    """SIGTERM / SIGUSR1 (a cluster's pre-emption notice) set a flag; the loop saves at the end of the optimiser step
    and exits cleanly. Every process's flag is combined, so all stop at the same step."""

    def __init__(self):
        self.raised = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Loop:
    """The loop every trainer shares: resume from ``state.pt``, draw this process's micro-batches, step through the
    engine, log (CSV, tracker, throughput, ETA), validate, sample, save; stop cleanly on SIGTERM / SIGUSR1.

    ``make_batch(items) -> batch`` turns the stream's items into what the loss takes; ``validate_fn() -> {name:
    float}`` evaluates the fixed validation set (fixed timesteps and noise); ``sample_fn(path)`` writes a sample grid;
    ``save_fn()`` writes the output file (main process) and returns its path."""
    name: str
    output: str
    steps: int
    engine: Engine
    stream: object                        # training.data stream: next() -> this process's micro-batch items
    make_batch: object
    loss_names: list
    save_fn: object
    generators: dict = field(default_factory=dict)
    sample_fn: object = None
    validate_fn: object = None
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 0
    validate_every: int = 0

    def _save_state(self, path: Path, step: int) -> None:
        """Gathers everything to the main process, which alone writes ``state.pt`` (atomically, 0644)."""
        from accelerate.utils import gather_object
        e = self.engine
        model_sd, optim_sd = e.full_state()
        rngs = gather_object([rng_state(self.generators)])
        data = self.stream.state()
        datas = gather_object([data])
        if e.acc.is_main_process:
            state = {"step": step, "trainable": model_sd, "optimizer": optim_sd,
                     "scheduler": e.scheduler.state_dict(), "rng": rngs, "data": self.stream.merge(datas),
                     "processes": e.processes, "batch_size": e.batch_size}
            if e.acc.scaler is not None:
                state["scaler"] = e.acc.scaler.state_dict()
            if e.ema is not None:
                state["ema"] = e.ema.state_dict()
            write_atomic(path, lambda tmp: torch.save(state, tmp))
        e.acc.wait_for_everyone()

    def _load_state(self, path: Path) -> int:
        e = self.engine
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("batch_size", e.batch_size) != e.batch_size:
            raise ValueError(f"{path} was trained at global batch_size {state['batch_size']}; this run asks for "
                             f"{e.batch_size}. Resume with the same global batch (per-device batch and accumulation "
                             "may change with the process count)")
        try:
            e.load_full_state(state["trainable"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"{path} does not match this run's trainable weights (another base model or method?): "
                             f"{str(err)[:500]}") from None
        e.scheduler.load_state_dict(state["scheduler"])
        if e.acc.scaler is not None and "scaler" in state:
            e.acc.scaler.load_state_dict(state["scaler"])
        if e.ema is not None and "ema" in state:
            e.ema.load_state_dict(state["ema"])
        rngs = state["rng"]
        if e.rank < len(rngs):
            set_rng_state(rngs[e.rank], self.generators)
        else:
            seed_process(self.engine.opts.seed + int(state["step"]), e.rank, self.generators)
        if len(rngs) != e.processes:
            log.info("resuming a %d-process run on %d processes: the data stream continues where it was; "
                     "processes without a saved random state draw from fresh seeds", len(rngs), e.processes)
        self.stream.load(state["data"], int(state["step"]))
        return int(state["step"])

    @classmethod
    def of_run(cls, cfg, name: str, engine: Engine, stream, **kw) -> "Loop":
        """The loop of a trainer's run: its output folder, step count and log / save / sample / validation intervals
        from the run's options ``cfg``; ``kw`` the trainer's own parts (``make_batch``, ``loss_names``, ...)."""
        return cls(name=name, output=cfg.output, steps=cfg.steps, engine=engine, stream=stream,
                   log_every=cfg.log_every, save_every=cfg.save_every, sample_every=cfg.sample_every,
                   validate_every=cfg.validate_every, **kw)

    def run(self) -> Path:
        e, acc = self.engine, self.engine.acc
        out = Path(self.output)
        state_path = out / "state.pt"
        step = self._start(out, state_path)
        if acc.is_main_process:
            log.info("%s: global batch %d = %d per device × %d accumulation × %d processes; %d optimiser steps",
                     self.name, e.batch_size, e.per_device, e.opts.gradient_accumulation, e.processes, self.steps)
        names = list(self.loss_names) + ["lr", "samples_per_s", "skipped"]
        self._losses = LossLog(out / "loss.csv", names, step) if acc.is_main_process else None
        self._validation, self._resumed = None, step          # validation.csv: opened at the first evaluation
        self._t_log, self._n_log = time.perf_counter(), 0
        bar = None
        if acc.is_main_process:
            from tqdm import tqdm
            bar = tqdm(total=self.steps, initial=step, desc=self.name, unit="step")
        path, saved = None, -1
        with StopSignal() as stop_sig:
            while step < self.steps:
                parts = self._optimiser_step(step)
                step += 1
                self._n_log += 1
                stop = self._agree(stop_sig.raised is not None)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{parts[k]:.4g}" for k in self.loss_names[:2]})
                if step % self.log_every == 0 or step == self.steps or stop:
                    self._log(step, parts)
                self._validate_and_sample(step, out)
                if step % self.save_every == 0 or step == self.steps or stop:
                    path, saved = self._save(step, state_path), step
                if stop:
                    if acc.is_main_process:
                        log.info("%s received: saved step %d, exiting", stop_sig.raised or "a stop signal", step)
                    break
        if bar is not None:
            bar.close()
        if saved != step:                      # nothing to train (already at `steps`): the file all the same
            path = self._save(step, state_path)
        acc.end_training()
        return path

    def _start(self, out: Path, state_path: Path) -> int:
        """The output folder, the trackers, and the resumed state or this run's seeds -> the step to start from."""
        e, acc = self.engine, self.engine.acc
        if acc.is_main_process:
            (out / "samples").mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if state_path.exists():
            step = self._load_state(state_path)
            log.info("resuming %s at step %d", out, step)
        else:
            step = 0
            seed_process(e.opts.seed, e.rank, self.generators)
            self.stream.load(None, 0)
        if acc.trackers == [] and acc.log_with:
            acc.init_trackers(self.name.replace(" ", "_"), config={
                "batch_size": e.batch_size, "per_device": e.per_device,
                "accumulation": e.opts.gradient_accumulation, "processes": e.processes})
        return step

    def _optimiser_step(self, step: int) -> dict:
        """This process's micro-batches of one optimiser step through the engine -> the step's mean losses."""
        e = self.engine
        parts, keys = None, []
        while parts is None:
            items = self.stream.next()
            keys += [it.key for it in items]
            parts = e.step(self.make_batch(items), step)
        key_log = os.environ.get("CONSISTENT_INPAINT_KEY_LOG")      # debugging aid: the samples of every step
        if key_log:
            with open(Path(key_log) / f"keys.{e.rank}.txt", "a") as fh:
                fh.write(" ".join([str(step), *keys]) + "\n")
        total = parts[self.loss_names[0]]
        if not math.isfinite(total):
            raise FloatingPointError(f"the loss became {total} at step {step + 1}")
        return parts

    def _log(self, step: int, parts: dict) -> None:
        """loss.csv and the log line (main process), the tracker (every process: the engine keeps the main's)."""
        e, acc = self.engine, self.engine.acc
        now = time.perf_counter()
        rate = self._n_log * e.batch_size / max(now - self._t_log, 1e-9)
        parts.update(lr=e.scheduler.get_last_lr()[0], samples_per_s=rate, skipped=float(self.stream.skipped))
        if self._losses is not None:
            self._losses.write(step, parts)
            eta = (self.steps - step) * e.batch_size / max(rate, 1e-9)
            log.info("step %d/%d loss %.4g | %.2f samples/s (%.2f per process) | ETA %s", step, self.steps,
                     parts[self.loss_names[0]], rate, rate / e.processes, _hms(eta))
        acc.log({f"train/{k}": v for k, v in parts.items()}, step=step)
        self._t_log, self._n_log = now, 0

    def _validate_and_sample(self, step: int, out: Path) -> None:
        acc = self.engine.acc
        if self.validate_fn is not None and self.validate_every and step % self.validate_every == 0:
            values = self.validate_fn()
            acc.log({f"validation/{k}": v for k, v in values.items()}, step=step)
            if acc.is_main_process:
                if self._validation is None:
                    self._validation = LossLog(out / "validation.csv", list(values), self._resumed)
                self._validation.write(step, values)
                log.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if self.sample_fn is not None and self.sample_every and (step % self.sample_every == 0
                                                                 or step == self.steps):
            if acc.is_main_process:
                with self.engine.ema_weights():
                    self.sample_fn(out / "samples" / f"step_{step:07d}.png")
            acc.wait_for_everyone()

    def _save(self, step: int, state_path: Path) -> Path:
        acc = self.engine.acc
        path = None
        if acc.is_main_process:
            with self.engine.ema_weights():
                path = self.save_fn()
            os.chmod(path, FILE_MODE)
        self._save_state(state_path, step)
        return path

    def _agree(self, flag: bool) -> bool:
        """True on every process when any process has the flag."""
        if self.engine.processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.engine.device)
        return bool(self.engine.acc.reduce(t, "sum").item() > 0)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
