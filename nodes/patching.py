"""What every patch object the pack attaches to a MODEL shares (DESIGN principle 3, STYLE 8): the ``ModelPatch``
skeleton, state scoped to one sampling run, and attention replaces that keep the replace found at a site.

Patch objects are immutable once attached. What a patch may keep for the length of one sampling run (inputs moved
to the sampling device once, results shared between the model calls of a step, a noise generator) lives in a
``RunState``, keyed by the patch's key, set by an OUTER_SAMPLE wrapper and gone when the run ends.
"""
from __future__ import annotations

import contextvars
import math
import uuid
from typing import Callable, Optional

import torch

from . import checks
from . import comfy_compat as compat
from .common import percent_problem

_RUN_SCOPE: contextvars.ContextVar = contextvars.ContextVar("consistent_inpaint_run", default=None)


class RunState:
    def __init__(self):
        self.values = {}                      # anything derived once per run, by key


class StepNoise(RunState):
    """Run state with a seeded generator and one noise draw per sampling step (shared by every model call of the
    step: cond/uncond split into several calls see the same noise)."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.sigma, self.noise = None, None

    def step(self, sigma: float, shape) -> torch.Tensor:
        if sigma != self.sigma or self.noise is None or tuple(self.noise.shape) != tuple(shape):
            self.sigma = sigma
            self.noise = torch.randn(shape, generator=self.generator)
        return self.noise


def run_state(key: str):
    """The state of patch ``key`` for the sampling run in progress, or None outside one."""
    return (_RUN_SCOPE.get() or {}).get(key)


def once_per_run(run: Optional[RunState], key, build: Callable):
    """``build()``, computed once per sampling run and kept under ``key`` (every call outside one)."""
    if run is None:
        return build()
    if key not in run.values:
        run.values[key] = build()
    return run.values[key]


def moved(run: Optional[RunState], name, t: torch.Tensor, device, dtype) -> torch.Tensor:
    """``t`` on the sampling device: once per run (every call outside one)."""
    return once_per_run(run, ("moved", name, device, dtype), lambda: t.to(device, dtype))


def run_scope(key: str, factory: Callable[[], RunState]):
    """An OUTER_SAMPLE wrapper giving patch ``key`` a fresh ``factory()`` state for one sampling run."""
    def outer_sample(executor, *args, **kwargs):
        token = _RUN_SCOPE.set({**(_RUN_SCOPE.get() or {}), key: factory()})
        try:
            return executor(*args, **kwargs)
        finally:
            _RUN_SCOPE.reset(token)
    return outer_sample


def sigma_range(model, start_percent: float, end_percent: float, node=None) -> tuple[float, float]:
    """(sigma at start, sigma at end) of the model's sampling schedule: a step is inside when end <= sigma <= start.
    Refuses a window that is not one (values that arrived by link are only known here); ``node`` names the node."""
    checks.enforce(node or "model patch", lambda: percent_problem(start_percent, end_percent))
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


EVERY_STEP = (math.inf, 0.0)          # a sigma window that holds every step (training)


class ModelPatch:
    """The skeleton of a patch object: a unique ``key`` (its wrappers, its transformer_options entries, its run
    state), immutability (``__deepcopy__`` returns itself, so ModelPatcher.clone() shares it), the sigma window
    [start_percent, end_percent] it acts in, the split of a model call's rows into cond/uncond chunks, and the
    OUTER_SAMPLE wrapper that gives it a ``new_run()`` state per sampling run."""

    name = "patch"

    def __init__(self, sigma_window: tuple[float, float] = EVERY_STEP):
        self.sigma_start, self.sigma_end = sigma_window
        self.key = f"consistent_inpaint_{self.name}:{uuid.uuid4().hex}"

    def __deepcopy__(self, memo):
        return self

    # - the sigma window -
    def acts(self) -> bool:
        """False when the patch is a no-op whatever the step (e.g. a weight of 0)."""
        return True

    def in_window(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def active(self, transformer_options) -> bool:
        """Whether the patch acts in the model call these options belong to. Read once per model call by a wrapper,
        never inside attention (reading sigma there stalls the GPU)."""
        sigmas = transformer_options.get("sigmas")
        return self.acts() and (sigmas is None or self.in_window(float(sigmas.max())))

    def flag_active(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        """DIFFUSION_MODEL wrapper: marks the call's transformer options (``self.key``: True) when the patch acts."""
        if self.active(transformer_options):
            transformer_options = {**transformer_options, self.key: True}
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    # - rows of a model call -
    def chunks_rows(self, batch: int, transformer_options) -> tuple[list, int]:
        """(cond/uncond chunk ids, rows per chunk) of a model call of ``batch`` rows."""
        chunks = transformer_options.get("cond_or_uncond") or [0]
        if batch % len(chunks):
            raise RuntimeError(f"{self.name}: a batch of {batch} rows does not split into {len(chunks)} cond chunks")
        return chunks, batch // len(chunks)

    # - one sampling run -
    def new_run(self) -> RunState:
        return RunState()

    def run(self) -> Optional[RunState]:
        return run_state(self.key)

    def clone_with_run_scope(self, model, networks: tuple = ()):
        """A clone of ``model`` carrying this patch's run scope; ``networks`` (ModelPatchers) load with it."""
        m = model.clone()
        compat.add_wrapper(m, compat.OUTER_SAMPLE, self.key, run_scope(self.key, self.new_run))
        if networks:
            m.set_additional_models(self.key, list(networks))
        return m


# -- attention replaces at sites ----------------------------------------------------------------------------------
class SiteReplace:
    """An attention replace at one site: the attention already there (ComfyUI's, or the replace another node put
    there first, e.g. an IPAdapter) passed through ``combine(out, q, k, v, site, extra)``. Immutable."""

    def __init__(self, combine: Callable, site, previous):
        self.combine, self.site, self.previous = combine, site, previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = compat.attention(q, k, v, extra_options["n_heads"], extra_options)
        return self.combine(out, q, k, v, self.site, extra_options)


def add_site_replaces(m, attn: str, sites, combine: Callable) -> None:
    """Put a SiteReplace on ``attn`` ("attn1" / "attn2") at every site of the cloned MODEL ``m``, keeping the replace
    found there (site-keyed, else block-keyed) as the one it extends."""
    replaces = m.model_options["transformer_options"].get("patches_replace", {}).get(attn, {})
    setter = m.set_model_attn1_replace if attn == "attn1" else m.set_model_attn2_replace
    for site in sites:
        setter(SiteReplace(combine, site, replaces.get(site, replaces.get(site[:2]))), *site)


def bound_attention(extra) -> Callable:
    """``attention(q, k, v, heads)`` for the models/ equations, through ComfyUI's attention with ``extra``'s
    options."""
    return lambda q, k, v, heads: compat.attention(q, k, v, heads, extra)

