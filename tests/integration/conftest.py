"""Integration-test harness: real ComfyUI, in process, headless, on the CPU.

How ComfyUI is found
    * ``COMFYUI_PATH=/path/to/ComfyUI`` (a checkout with ``nodes.py``, ``execution.py``,
      ``folder_paths.py`` and ``comfy/``), or
    * the pack sits at ``<ComfyUI>/custom_nodes/<any folder name>``.
    Otherwise every test in this directory is skipped, with the reason printed in the
    pytest header and in each skip message.

Environment variables
    COMFYUI_PATH                      ComfyUI checkout to test against.
    CONSISTENT_INPAINT_COMFY_SHIMS    Directory appended to ``sys.path`` before ComfyUI is imported
                                      (default: ``tests/integration/shims``, import-only stand-ins of
                                      torchvision and torchaudio, which ComfyUI imports at start-up
                                      and no CPU build of which matches every torch). Appended, not
                                      prepended, so a real, importable package always wins. ``none``
                                      appends nothing. The pack itself never needs it.
    CONSISTENT_INPAINT_TEST_CACHE     Where generated random-weight model files are cached
                                      (default: ``<tempdir>/consistent_inpaint_test_cache``).
                                      Files are written once and reused across runs.

What the harness does (session scope, see ``ComfySession``)
    * imports ComfyUI with ``args.cpu = True`` (set before ``comfy.model_management`` is imported),
    * points output/input/temp/user and every model folder at a fresh temporary directory, so nothing
      is written into the ComfyUI checkout and no user model is picked up,
    * builds a real ``server.PromptServer`` that is never started; its ``send_sync`` records messages,
    * installs the progress-bar hook the way ComfyUI's ``main.py`` does,
    * runs ``nodes.init_extra_nodes`` (built-in extra nodes only: no API nodes, no other packs),
    * loads this repository with ``nodes.load_custom_node(<repo root>)``, exactly as ComfyUI loads a
      pack from ``custom_nodes`` (folder name irrelevant), between ``hook_breaker`` save/restore as
      ``main.py`` does,
    * registers a few test-only helper nodes (prefix ``CITest``), see ``_harness_nodes``.

Fixtures: ``comfy`` (the session), ``run_prompt``, ``graph``, ``comfy_models``,
``sd15_inpaint_ckpt``, ``flux_fill_unet``, ``flux_vae``. See README.md in this directory.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest


def _logical_repo_root() -> Path:
    """The repo root as the user reached it.

    pytest hands conftest a symlink-resolved ``__file__``; a pack symlinked into
    ``<ComfyUI>/custom_nodes/<name>`` must still be found there and loaded under that path, as ComfyUI
    would load it, so the logical working directory ($PWD) is consulted too.
    """
    real_root = Path(os.path.abspath(__file__)).parents[2]
    pwd = os.environ.get("PWD")
    if pwd and os.path.isabs(pwd):
        p = Path(os.path.normpath(pwd))
        for cand in (p, *p.parents):
            try:
                if os.path.samefile(cand, real_root):
                    return cand
            except OSError:
                continue
    return real_root


REPO_ROOT = _logical_repo_root()
ENV_COMFY = "COMFYUI_PATH"
ENV_SHIMS = "CONSISTENT_INPAINT_COMFY_SHIMS"
ENV_CACHE = "CONSISTENT_INPAINT_TEST_CACHE"
DEFAULT_SHIMS = Path(__file__).resolve().parent / "shims"


def shims_dir() -> str | None:
    """The folder of import-only stand-ins appended to ``sys.path`` (None: ``none`` was asked for)."""
    value = os.environ.get(ENV_SHIMS) or str(DEFAULT_SHIMS)
    return None if value == "none" else value

# Node ids the harness registers for tests (never part of the pack).
HARNESS_NODE_PREFIX = "CITest"


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------

def _looks_like_comfyui(path: Path) -> bool:
    return all((path / p).exists() for p in ("nodes.py", "execution.py", "folder_paths.py", "comfy"))


def find_comfyui() -> tuple[Path | None, str]:
    """Return (ComfyUI path, "") or (None, reason it was not found)."""
    env = os.environ.get(ENV_COMFY)
    if env:
        p = Path(env).expanduser().resolve()
        if _looks_like_comfyui(p):
            return p, ""
        return None, f"{ENV_COMFY}={env} is not a ComfyUI checkout (needs nodes.py, execution.py, folder_paths.py, comfy/)"
    parent = REPO_ROOT.parent
    if parent.name == "custom_nodes" and _looks_like_comfyui(parent.parent):
        return parent.parent.resolve(), ""
    return None, (f"ComfyUI not found: set {ENV_COMFY}=/path/to/ComfyUI or place this pack in "
                  f"<ComfyUI>/custom_nodes/ (pack is at {REPO_ROOT})")


COMFY_PATH, COMFY_SKIP_REASON = find_comfyui()


def pytest_report_header(config):
    if COMFY_PATH is None:
        return f"consistent-inpaint integration: SKIPPED - {COMFY_SKIP_REASON}"
    shims = shims_dir()
    return (f"consistent-inpaint integration: ComfyUI at {COMFY_PATH}"
            + (f" (stand-ins appended to sys.path: {shims})" if shims else ""))


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

class ComfyPromptError(AssertionError):
    """A prompt failed validation or execution; the message carries ComfyUI's error text."""

    def __init__(self, message, *, kind, details=None):
        super().__init__(message)
        self.kind = kind            # "validation" | "execution" | "interrupted"
        self.details = details or {}


def _format_validation_error(error, node_errors, prompt) -> str:
    lines = [f"ComfyUI rejected the prompt: {error.get('message', '')}" if error else
             "ComfyUI rejected part of the prompt"]
    if error and error.get("details"):
        lines.append(f"  {error['details']}")
    for node_id, info in (node_errors or {}).items():
        lines.append(f"  node {node_id} ({info.get('class_type')}):")
        for e in info.get("errors", []):
            lines.append(f"    - {e.get('message')}: {e.get('details')}")
            extra = e.get("extra_info") or {}
            if extra.get("traceback"):
                lines.append("      " + "".join(extra["traceback"]).replace("\n", "\n      "))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------

class PromptResult:
    """What one executed prompt produced.

    ``output(node_id, index=0)`` -> the value of output slot ``index`` of any executed node
    (first item; ComfyUI stores a list per slot for list-expanded execution, see ``outputs``).
    ``outputs(node_id)`` -> ComfyUI's raw cached outputs: list (per slot) of lists (per call).
    ``ui(node_id)`` -> the node's UI output (what the frontend would get), from ``history``.
    ``history`` -> ``{"outputs": {...}, "meta": {...}}`` exactly as ComfyUI's history stores it.
    ``messages`` -> every (event, data, sid) the server was asked to send during the run.
    ``executed`` -> node ids in the order they started executing.
    ``seconds`` -> wall time of the execution (not validation).
    ``node_seconds`` -> {node_id: seconds} per executed node.
    """

    def __init__(self, prompt_id, prompt, executor, messages, seconds):
        self.prompt_id = prompt_id
        self.prompt = prompt
        self.executor = executor
        self.history = executor.history_result
        self.status_messages = executor.status_messages
        self.messages = messages
        self.seconds = seconds

    @property
    def executed(self):
        return [d.get("node") for (ev, d, _sid) in self.messages
                if ev == "executing" and isinstance(d, dict) and d.get("node") is not None]

    def outputs(self, node_id):
        node_id = str(node_id)
        entry = self.executor.caches.outputs.get(node_id)
        if entry is None:
            raise KeyError(f"node {node_id} has no cached outputs (not executed, or not in the prompt)")
        return entry

    def output(self, node_id, index=0):
        slot = self.outputs(node_id)[index]
        if isinstance(slot, list):
            if len(slot) == 1:
                return slot[0]
            return slot
        return slot

    def ui(self, node_id):
        return self.history["outputs"].get(str(node_id))

    def events(self, name):
        return [d for (ev, d, _sid) in self.messages if ev == name]


# --------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------

class _RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        try:
            self.records.append(record.levelname + ": " + record.getMessage())
        except Exception:  # pragma: no cover
            pass


def _purge_foreign_module(name: str, comfy_path: Path):
    """Drop a top-level module called ``name`` (and its submodules) that is not ComfyUI's.

    Running ``python -m pytest`` from the repo root puts the repo on sys.path, whose ``nodes/``
    package would shadow ComfyUI's ``nodes.py``.
    """
    mod = sys.modules.get(name)
    if mod is None:
        return
    f = getattr(mod, "__file__", None) or ""
    locations = [f] if f else list(getattr(mod, "__path__", None) or [])
    if any(Path(loc).resolve().is_relative_to(comfy_path) for loc in locations):
        return
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        sys.modules.pop(key, None)
    logging.getLogger(__name__).warning("removed foreign module %r (%s) from sys.modules before importing ComfyUI", name, f)


class ComfySession:
    """Real ComfyUI, imported in this process. One per pytest session (fixture ``comfy``)."""

    PromptError = ComfyPromptError

    def __init__(self, comfy_path: Path, base_dir: Path):
        self.path = comfy_path
        self.base_dir = base_dir
        self.messages = collections.deque(maxlen=2000)   # latest send_sync calls of the session
        self._run_messages = None   # messages of the prompt being run
        self._run_stamps = []
        t0 = time.perf_counter()
        self._import_comfyui()
        self._setup_folders()
        self._setup_server()
        self._load_nodes()
        self.startup_seconds = time.perf_counter() - t0

    # -- start-up ---------------------------------------------------------------------

    def _import_comfyui(self):
        shims = shims_dir()
        if shims and shims not in sys.path:
            sys.path.append(shims)
        p = str(self.path)
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
        for name in ("nodes", "execution", "server", "folder_paths", "utils", "app", "comfy",
                     "comfy_extras", "comfy_execution", "comfy_api", "latent_preview", "node_helpers"):
            _purge_foreign_module(name, self.path)

        import comfy.options  # noqa: F401  (argument parsing stays disabled: defaults)
        from comfy.cli_args import args
        args.cpu = True
        self.args = args
        if "comfy.model_management" in sys.modules:
            import comfy.model_management as mm
            if mm.cpu_state != mm.CPUState.CPU:
                raise RuntimeError("comfy.model_management was imported before the harness set args.cpu")

        import folder_paths
        import utils.extra_config  # noqa: F401  main.py imports ComfyUI's `utils` package this early; `nodes`
        #                            later puts comfy/ (which has a utils.py) first on sys.path
        import comfy.model_management
        import comfy.utils
        import execution
        import server
        import nodes
        import hook_breaker_ac10a0
        from comfy_execution.graph_utils import GraphBuilder

        self.folder_paths = folder_paths
        self.model_management = comfy.model_management
        self.comfy_utils = comfy.utils
        self.execution = execution
        self.server_module = server
        self.nodes = nodes
        self.hook_breaker = hook_breaker_ac10a0
        self.GraphBuilder = GraphBuilder
        assert Path(nodes.__file__).resolve().parent == self.path, f"wrong 'nodes' module: {nodes.__file__}"

    def _setup_folders(self):
        fp = self.folder_paths
        b = self.base_dir
        self.models_dir = b / "models"
        for sub in ("models", "output", "input", "temp", "user"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        old_models = os.path.abspath(fp.models_dir)
        for name, (paths, exts) in list(fp.folder_names_and_paths.items()):
            new_paths = []
            for path in paths:
                ap = os.path.abspath(path)
                if ap == old_models or ap.startswith(old_models + os.sep):
                    ap = os.path.join(str(self.models_dir), os.path.relpath(ap, old_models))
                    os.makedirs(ap, exist_ok=True)
                new_paths.append(ap)
            fp.folder_names_and_paths[name] = (new_paths, exts)
        fp.models_dir = str(self.models_dir)
        fp.set_output_directory(str(b / "output"))
        fp.set_input_directory(str(b / "input"))
        fp.set_temp_directory(str(b / "temp"))
        fp.set_user_directory(str(b / "user"))
        fp.filename_list_cache.clear()

    def _setup_server(self):
        self.loop = asyncio.new_event_loop()
        srv = self.server_module.PromptServer(self.loop)   # never started: no routes served, no socket

        def send_sync(event, data, sid=None):
            rec = (event, data, sid)
            self.messages.append(rec)
            if self._run_messages is not None:
                self._run_messages.append(rec)
                self._run_stamps.append(time.perf_counter())

        srv.send_sync = send_sync
        self.server = srv

        # Same hook as ComfyUI's main.hijack_progress, minus the websocket preview encoding.
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
        mm = self.model_management

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            ctx = get_executing_context()
            if prompt_id is None and ctx is not None:
                prompt_id = ctx.prompt_id
            if node_id is None and ctx is not None:
                node_id = ctx.node_id
            mm.throw_exception_if_processing_interrupted()
            if prompt_id is None:
                prompt_id = getattr(srv, "last_prompt_id", None)
            if node_id is None:
                node_id = srv.last_node_id
            get_progress_state().update_progress(node_id, value, total, preview_image)
            srv.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                          srv.client_id)
            if preview_image is not None:
                srv.send_sync("preview_image", preview_image, srv.client_id)

        self.comfy_utils.set_progress_bar_global_hook(hook)

    def _load_nodes(self):
        nodes = self.nodes
        self.hook_breaker.save_functions()
        try:
            self.extra_nodes_failed = self.loop.run_until_complete(
                nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)) or []
        finally:
            self.hook_breaker.restore_functions()
        self.core_node_ids = set(nodes.NODE_CLASS_MAPPINGS)

        # Load the pack exactly like init_external_custom_nodes does for one folder.
        handler = _RecordingHandler()
        root = logging.getLogger()
        root.addHandler(handler)
        watched = {name: vars(mod).get(attr) for name, (mod, attr) in self._hook_targets().items()}
        t0 = time.perf_counter()
        self.hook_breaker.save_functions()
        try:
            self.pack_loaded = bool(self.loop.run_until_complete(
                nodes.load_custom_node(str(REPO_ROOT), ignore=set(self.core_node_ids), module_parent="custom_nodes")))
            # ComfyUI functions/methods the pack replaced while loading (DESIGN principle 3 forbids it);
            # computed before hook_breaker undoes its own list.
            self.monkeypatched = sorted(name for name, (mod, attr) in self._hook_targets().items()
                                        if name in watched and vars(mod).get(attr) is not watched[name])
        finally:
            self.hook_breaker.restore_functions()
            root.removeHandler(handler)
        self.pack_import_seconds = time.perf_counter() - t0
        self.pack_load_log = handler.records
        self.pack_module = sys.modules.get(str(REPO_ROOT).replace(".", "_x_"))
        self.pack_node_ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - self.core_node_ids)

        for node_id, cls in _harness_nodes(self).items():
            nodes.NODE_CLASS_MAPPINGS[node_id] = cls
            nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] = node_id

    def _hook_targets(self):
        import comfy.samplers
        import comfy.model_patcher
        import comfy.ldm.modules.attention as attention
        import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
        import comfy.sd
        targets = {}
        for mod in (self.model_management, comfy.samplers, comfy.model_patcher, attention, openaimodel,
                    comfy.sd, self.comfy_utils, self.nodes, self.execution):
            for attr, val in list(vars(mod).items()):
                if attr.startswith("__"):
                    continue
                if callable(val) and getattr(val, "__module__", None) == mod.__name__:
                    targets[f"{mod.__name__}.{attr}"] = (mod, attr)
                    if isinstance(val, type):
                        for cattr, cval in list(vars(val).items()):
                            if callable(cval) and not cattr.startswith("__"):
                                targets[f"{mod.__name__}.{attr}.{cattr}"] = (val, cattr)
        return targets

    def unload_all(self):
        """Drop every model ComfyUI holds loaded (between tests that must not share loaded weights)."""
        import gc
        self.model_management.unload_all_models()
        self.model_management.cleanup_models()
        gc.collect()
        self.model_management.soft_empty_cache()

    # -- running prompts ---------------------------------------------------------------

    def graph(self):
        """A ComfyUI ``GraphBuilder`` with plain ids ("1", "2", ...); ``.finalize()`` -> prompt dict."""
        return self.GraphBuilder(prefix="")

    def validate(self, prompt, prompt_id=None, outputs=None):
        prompt_id = prompt_id or str(uuid.uuid4())
        return self.loop.run_until_complete(
            self.execution.validate_prompt(prompt_id, prompt, outputs))

    def run_prompt(self, prompt, *, outputs=None, extra_data=None, prompt_id=None,
                   allow_partial=False, executor=None) -> PromptResult:
        """Validate and execute ``prompt`` (API-format dict, or a GraphBuilder) headless.

        ``outputs``: restrict execution to these output-node ids (ComfyUI's partial execution).
        ``allow_partial``: run even if some outputs failed validation (ComfyUI's own behaviour);
        by default any node error raises.
        ``executor``: reuse a ``PromptExecutor`` (and its cache) across calls; by default every call
        gets a fresh one, so every node really executes.
        Raises ``ComfyPromptError`` carrying ComfyUI's error text on validation or execution failure.
        """
        if hasattr(prompt, "finalize"):
            prompt = prompt.finalize()
        prompt = json.loads(json.dumps(prompt))  # like the HTTP API: plain JSON, no shared objects
        prompt_id = prompt_id or str(uuid.uuid4())
        ok, error, good_outputs, node_errors = self.validate(prompt, prompt_id, outputs)
        if not ok or (node_errors and not allow_partial):
            raise ComfyPromptError(_format_validation_error(error, node_errors, prompt), kind="validation",
                                   details={"error": error, "node_errors": node_errors})
        ex = executor or self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC)
        extra = {"client_id": "pytest"}
        extra.update(extra_data or {})
        self.server.last_prompt_id = prompt_id
        self._run_messages, self._run_stamps = [], []
        t0 = time.perf_counter()
        try:
            ex.execute(prompt, prompt_id, extra, good_outputs)
        finally:
            t1 = time.perf_counter()
            run_messages, self._run_messages = self._run_messages, None
            stamps = self._run_stamps
        result = PromptResult(prompt_id, prompt, ex, run_messages, t1 - t0)
        # Seconds per node: from its "executing" message to the next node's (or the end).
        starts = [(s, d.get("node")) for (ev, d, _), s in zip(run_messages, stamps)
                  if ev == "executing" and isinstance(d, dict) and d.get("node") is not None]
        result.node_seconds = {n: (starts[i + 1][0] if i + 1 < len(starts) else t1) - s
                               for i, (s, n) in enumerate(starts)}
        if not ex.success:
            for ev, data in ex.status_messages:
                if ev == "execution_error":
                    tb = "".join(data.get("traceback") or [])
                    raise ComfyPromptError(
                        f"ComfyUI failed executing node {data.get('node_id')} ({data.get('node_type')}): "
                        f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}",
                        kind="execution", details=data)
                if ev == "execution_interrupted":
                    raise ComfyPromptError(f"execution interrupted: {data}", kind="interrupted", details=data)
            raise ComfyPromptError(f"execution failed: {ex.status_messages}", kind="execution")
        return result


def _harness_nodes(session):
    """Test-only nodes (V1 API), registered after the pack so they never count as pack nodes."""
    import torch

    class CITestCapture:
        """Output sink for any value, so any node can be the end of a test graph."""
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("*",)}}
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        @classmethod
        def VALIDATE_INPUTS(cls, input_types=None, **kwargs):
            return True

        def run(self, value):
            return {}

    class CITestNoiseImage:
        """Seeded uniform-noise IMAGE [B,H,W,3] in 0..1 (textured, unlike EmptyImage)."""
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"width": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8}),
                                 "height": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8}),
                                 "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                                 "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, width, height, batch_size, seed):
            g = torch.Generator().manual_seed(seed)
            return (torch.rand((batch_size, height, width, 3), generator=g),)

    class CITestRectMask:
        """MASK [1,H,W]: 1 inside the rectangle (x, y, w, h), 0 elsewhere (1 = inpaint)."""
        @classmethod
        def INPUT_TYPES(cls):
            i = ("INT", {"default": 0, "min": 0, "max": 4096})
            return {"required": {"width": ("INT", {"default": 64, "min": 1, "max": 4096}),
                                 "height": ("INT", {"default": 64, "min": 1, "max": 4096}),
                                 "x": i, "y": i,
                                 "w": ("INT", {"default": 32, "min": 0, "max": 4096}),
                                 "h": ("INT", {"default": 32, "min": 0, "max": 4096})}}
        RETURN_TYPES = ("MASK",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, width, height, x, y, w, h):
            m = torch.zeros((1, height, width))
            m[:, y:y + h, x:x + w] = 1.0
            return (m,)

    class CITestRandomConditioning:
        """Seeded random CONDITIONING (for models whose text encoder is too big to fake, e.g. FLUX's
        T5-XXL): cond [1, tokens, dim] and pooled_output [1, pooled_dim], scaled by ``scale``."""
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
                                 "dim": ("INT", {"default": 4096, "min": 1, "max": 16384}),
                                 "pooled_dim": ("INT", {"default": 768, "min": 0, "max": 16384}),
                                 "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                                 "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0})}}
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, tokens, dim, pooled_dim, seed, scale):
            g = torch.Generator().manual_seed(seed)
            cond = torch.randn((1, tokens, dim), generator=g) * scale
            extra = {}
            if pooled_dim > 0:
                extra["pooled_output"] = torch.randn((1, pooled_dim), generator=g) * scale
            return ([[cond, extra]],)

    return {f"{HARNESS_NODE_PREFIX}Capture": CITestCapture,
            f"{HARNESS_NODE_PREFIX}NoiseImage": CITestNoiseImage,
            f"{HARNESS_NODE_PREFIX}RectMask": CITestRectMask,
            f"{HARNESS_NODE_PREFIX}RandomConditioning": CITestRandomConditioning}


# --------------------------------------------------------------------------------------
# Random-weight model files that ComfyUI's own detection accepts
# --------------------------------------------------------------------------------------

MODEL_FILES_VERSION = "v1"   # bump when the generator changes, so caches are rewritten
WEIGHT_STD = 0.02


def _fill_tensor(name, shape, dtype, gen):
    import torch
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if name.endswith("bias") or name.endswith(".b"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and (name.endswith("weight") or name.endswith("scale")):
        return torch.ones(shape, dtype=dtype)    # norm gains
    return (torch.randn(shape, generator=gen) * WEIGHT_STD).to(dtype)


def _random_state_dict(shapes: dict, dtype, seed: int, prefix: str = ""):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return {prefix + k: _fill_tensor(k, tuple(v), dtype, gen) for k, v in shapes.items()}


def _meta_shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


class ModelFactory:
    """Writes small random-weight model files once (cached), links them into ComfyUI's folders.

    Every method returns the file *name* to put in a loader node's combo input.
    """

    def __init__(self, session: ComfySession, cache_dir: Path):
        self.session = session
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.timings = {}

    # -- plumbing -----------------------------------------------------------------------

    def cached_path(self, filename: str, spec: dict, writer) -> Path:
        """Path of a cached file; ``writer(path)`` writes it (any format) the first time only.

        ``spec`` (JSON-able) identifies the content: change it and a new file is written.
        Writes go to a temporary name first, so concurrent runs never see half a file.
        """
        tag = hashlib.sha1(json.dumps({"spec": spec, "v": MODEL_FILES_VERSION, "std": WEIGHT_STD},
                                      sort_keys=True, default=str).encode()).hexdigest()[:10]
        stem, ext = os.path.splitext(filename)
        path = self.cache_dir / f"{stem}-{tag}{ext}"
        if not path.exists():
            t0 = time.perf_counter()
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{ext}")
            try:
                writer(tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()
            self.timings[filename] = time.perf_counter() - t0
            for stale in self.cache_dir.glob(f"{stem}-*{ext}"):   # older specs of the same file
                if (stale != path and len(stale.name) == len(path.name)
                        and time.time() - stale.stat().st_mtime > 3600):   # not another live run's
                    try:
                        stale.unlink()
                    except OSError:
                        pass
        return path

    def _cached(self, filename: str, spec: dict, build):
        def writer(tmp):
            from safetensors.torch import save_file
            save_file(build(), str(tmp), metadata={"consistent_inpaint_test": json.dumps(spec)})
        return self.cached_path(filename, spec, writer)

    def provide(self, folder_name: str, filename: str, spec: dict, writer) -> str:
        """Cache a file written by ``writer(path)`` and install it as ``filename`` in ComfyUI's
        ``folder_name`` folder (any folder ``folder_paths`` knows, the pack's own included).
        Returns ``filename``, ready for a loader node's combo input."""
        return self.install(folder_name, self.cached_path(filename, spec, writer), filename)

    def install(self, folder_name: str, cached: Path, name: str) -> str:
        """Link (or copy) ``cached`` into the session's first folder of ``folder_name`` as ``name``."""
        fp = self.session.folder_paths
        paths = fp.get_folder_paths(folder_name) if folder_name in fp.folder_names_and_paths else []
        if not paths:
            raise KeyError(f"folder_paths knows no folder {folder_name!r} (registered: "
                           f"{sorted(fp.folder_names_and_paths)})")
        target_dir = Path(paths[0])
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            if target.exists() and os.path.samefile(target, cached):
                fp.filename_list_cache.pop(folder_name, None)
                return name
            target.unlink()   # same name, other content (another spec) in this session
        try:
            target.symlink_to(cached)
        except OSError:
            import shutil
            shutil.copyfile(cached, target)
        fp.filename_list_cache.pop(folder_name, None)
        return name

    # -- components ---------------------------------------------------------------------

    @staticmethod
    def sd15_unet_config(levels=1, in_channels=9, skip_top_attention=False):
        """UNetModel kwargs ComfyUI detects as SD1.5 (model_channels 320, context_dim 768).

        levels=1: channel_mult [1]; levels=2: [1, 2] (one downsample). One res block and one
        transformer per level, a middle block with one transformer. skip_top_attention: no transformer at the
        first level (as SDXL), so large latents stay cheap on the CPU.
        """
        channel_mult = [1, 2, 4, 4][:levels]
        nrb = [1] * levels
        depth = [0 if skip_top_attention and i == 0 else 1 for i in range(levels)]
        return dict(image_size=32, in_channels=in_channels, model_channels=320, out_channels=4,
                    num_res_blocks=nrb, channel_mult=channel_mult, num_heads=8, num_head_channels=-1,
                    use_spatial_transformer=True, transformer_depth=[depth[i] for i in range(levels)
                                                                    for _ in range(nrb[i])],
                    transformer_depth_output=[depth[i] for i in reversed(range(levels)) for _ in range(nrb[i] + 1)],
                    transformer_depth_middle=1,
                    context_dim=768, use_linear_in_transformer=False, legacy=False, adm_in_channels=None)

    def _sd15_unet_shapes(self, levels, in_channels, skip_top_attention=False):
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        m = UNetModel(**self.sd15_unet_config(levels, in_channels, skip_top_attention), device="meta",
                      operations=comfy.ops.disable_weight_init)
        return _meta_shapes(m)

    def _clip_l_shapes(self):
        import torch
        import comfy.ops
        from comfy.clip_model import CLIPTextModel
        cfg = json.loads((self.session.path / "comfy" / "sd1_clip_config.json").read_text())
        m = CLIPTextModel(cfg, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
        shapes = _meta_shapes(m)
        shapes.pop("text_projection.weight", None)   # SD1.5 checkpoints ship none
        shapes["text_model.embeddings.position_ids"] = (1, 77)
        return shapes

    def _kl_vae_shapes(self, z_channels, quant_convs):
        import torch
        from comfy.ldm.models.autoencoder import AutoencoderKL
        ddconfig = {'double_z': True, 'z_channels': z_channels, 'resolution': 256, 'in_channels': 3,
                    'out_ch': 3, 'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2,
                    'attn_resolutions': [], 'dropout': 0.0}
        with torch.device("meta"):
            m = AutoencoderKL(ddconfig=ddconfig, embed_dim=z_channels)
        shapes = _meta_shapes(m)
        if not quant_convs:
            shapes = {k: v for k, v in shapes.items() if "quant_conv" not in k}
        return shapes

    def _flux_shapes(self, in_channels, depth, depth_single_blocks, guidance_embed=True):
        import comfy.ops
        from comfy.ldm.flux.model import Flux
        m = Flux(image_model="flux", in_channels=in_channels, out_channels=16, vec_in_dim=768,
                 context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=depth,
                 depth_single_blocks=depth_single_blocks, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=guidance_embed, device="meta",
                 operations=comfy.ops.disable_weight_init)
        return _meta_shapes(m)

    # -- public ---------------------------------------------------------------------------

    def sd15_inpaint_checkpoint(self, levels=1, skip_top_attention=False) -> str:
        """SD1.5-inpainting all-in-one checkpoint (checkpoints folder), for CheckpointLoaderSimple:
        shallow 9-channel UNet + full-size CLIP-L + full-size SD VAE, fp16, random weights."""
        import torch
        spec = {"kind": "sd15_inpaint", "levels": levels}
        if skip_top_attention:
            spec["skip_top_attention"] = True

        def build():
            sd = _random_state_dict(self._sd15_unet_shapes(levels, 9, skip_top_attention), torch.float16, 1,
                                    "model.diffusion_model.")
            sd.update(_random_state_dict(self._clip_l_shapes(), torch.float16, 2, "cond_stage_model.transformer."))
            sd.update(_random_state_dict(self._kl_vae_shapes(4, True), torch.float16, 3, "first_stage_model."))
            return sd

        name = f"ci-sd15-inpaint-{levels}level{'-noattn1' if skip_top_attention else ''}.safetensors"
        return self.install("checkpoints", self._cached(name, spec, build), name)

    def sd15_checkpoint(self, levels=2) -> str:
        """SD1.5 text-to-image all-in-one checkpoint (4-channel UNet, attention at every level) + full-size CLIP-L
        and SD VAE, fp16, random weights: a base model for the PainterNet trainer and the branch nodes."""
        import torch
        spec = {"kind": "sd15", "levels": levels}

        def build():
            sd = _random_state_dict(self._sd15_unet_shapes(levels, 4), torch.float16, 4, "model.diffusion_model.")
            sd.update(_random_state_dict(self._clip_l_shapes(), torch.float16, 2, "cond_stage_model.transformer."))
            sd.update(_random_state_dict(self._kl_vae_shapes(4, True), torch.float16, 3, "first_stage_model."))
            return sd

        name = f"ci-sd15-{levels}level.safetensors"
        return self.install("checkpoints", self._cached(name, spec, build), name)

    def sd15_vae(self) -> str:
        """Stand-alone SD1.x VAE (vae folder), for VAELoader."""
        import torch
        spec = {"kind": "sd15_vae"}
        name = "ci-sd15-vae.safetensors"
        path = self._cached(name, spec, lambda: _random_state_dict(self._kl_vae_shapes(4, True), torch.float16, 3))
        return self.install("vae", path, name)

    def taesd_vae(self) -> str:
        """A VAE of ComfyUI's TAESD architecture (``taesd_encoder.*`` / ``taesd_decoder.*``, 4 latent channels, factor
        8), random weights, in the vae folder: VAELoader reads it as a normal VAE file. Encodes/decodes a 512² patch
        in well under a second on the CPU, so tests can work at 2048² and beyond."""
        import torch
        from comfy.taesd.taesd import TAESD
        spec = {"kind": "taesd_vae"}

        def build():
            with torch.device("meta"):
                m = TAESD(latent_channels=4)
            shapes = {k: v for k, v in _meta_shapes(m).items() if k not in ("vae_scale", "vae_shift")}
            sd = _random_state_dict(shapes, torch.float16, 11)
            sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
            return sd

        name = "ci-taesd-vae.safetensors"
        return self.install("vae", self._cached(name, spec, build), name)

    def sd15_controlnet(self, levels=1) -> str:
        """SD1.5 ControlNet (controlnet folder) in the original ``control_model.*`` layout for the shallow UNet
        of ``sd15_inpaint_checkpoint(levels)``: 4 latent + 3 hint channels, random weights (zero convs too)."""
        import torch
        import comfy.ops
        from comfy.cldm.cldm import ControlNet
        spec = {"kind": "sd15_controlnet", "levels": levels}

        def build():
            cfg = self.sd15_unet_config(levels, in_channels=4)
            cfg.pop("out_channels")
            m = ControlNet(hint_channels=3, device="meta", operations=comfy.ops.disable_weight_init, **cfg)
            return _random_state_dict(_meta_shapes(m), torch.float16, 7, "control_model.")

        name = f"ci-sd15-controlnet-{levels}level.safetensors"
        return self.install("controlnet", self._cached(name, spec, build), name)

    def flux_fill_diffusion_model(self, depth=1, depth_single_blocks=1) -> str:
        """FLUX.1-Fill-shaped transformer (img_in 384 inputs -> FluxInpaint), bf16, for UNETLoader."""
        import torch
        spec = {"kind": "flux_fill", "depth": depth, "single": depth_single_blocks}
        name = f"ci-flux1-fill-d{depth}s{depth_single_blocks}.safetensors"
        path = self._cached(name, spec, lambda: _random_state_dict(
            self._flux_shapes(96, depth, depth_single_blocks), torch.bfloat16, 4))
        return self.install("diffusion_models", path, name)

    def flux_vae(self) -> str:
        """FLUX VAE (16 latent channels, no quant convs; ae.safetensors layout), for VAELoader."""
        import torch
        spec = {"kind": "flux_vae"}
        name = "ci-flux-ae.safetensors"
        path = self._cached(name, spec, lambda: _random_state_dict(self._kl_vae_shapes(16, False), torch.float16, 5))
        return self.install("vae", path, name)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------

def _register_model_node(session: "ComfySession", name: str, patch) -> str:
    """Register a test-only node ``name`` (MODEL -> MODEL) that returns ``patch(model.clone())``; -> name."""
    class ModelNode:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",)}}
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, model):
            return (patch(model.clone()),)

    ModelNode.__name__ = name
    session.nodes.NODE_CLASS_MAPPINGS[name] = ModelNode
    return name


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfySession:
    """The in-process ComfyUI session (skips every test if ComfyUI is not found)."""
    if COMFY_PATH is None:
        pytest.skip(COMFY_SKIP_REASON)
    return ComfySession(COMFY_PATH, tmp_path_factory.mktemp("comfyui_base"))


@pytest.fixture(autouse=True)
def _require_comfyui():
    if COMFY_PATH is None:
        pytest.skip(COMFY_SKIP_REASON)


@pytest.fixture
def run_prompt(comfy):
    """``run_prompt(prompt_dict_or_graphbuilder, **kw) -> PromptResult`` (see ComfySession.run_prompt)."""
    return comfy.run_prompt


@pytest.fixture
def graph(comfy):
    """A fresh ``comfy_execution.graph_utils.GraphBuilder`` with ids "1", "2", ..."""
    return comfy.graph()


@pytest.fixture(scope="session")
def model_node(comfy):
    """``model_node(name, patch)``: register a test-only MODEL -> MODEL node returning ``patch(model.clone())``."""
    return lambda name, patch: _register_model_node(comfy, name, patch)


@pytest.fixture(scope="session")
def checkpoint_with_vae(comfy):
    """CITestCheckpointWithVAE: a checkpoint's MODEL and CLIP with a VAE file of the harness (ckpt_name "": only
    the VAE, for workflows whose checkpoint ComfyUI cannot load in its shallow test form, e.g. SDXL)."""
    session = comfy
    from comfy.sd import VAE, load_checkpoint_guess_config
    from comfy.utils import load_torch_file

    class CITestCheckpointWithVAE:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"ckpt_name": ("STRING", {"default": ""}), "vae_name": ("STRING", {"default": ""})}}
        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, ckpt_name, vae_name):
            vae = VAE(sd=load_torch_file(session.folder_paths.get_full_path_or_raise("vae", vae_name)))
            if not ckpt_name:
                return None, None, vae
            out = load_checkpoint_guess_config(session.folder_paths.get_full_path_or_raise("checkpoints", ckpt_name),
                                               output_vae=False, output_clip=True)
            return out[0], out[1], vae

    session.nodes.NODE_CLASS_MAPPINGS["CITestCheckpointWithVAE"] = CITestCheckpointWithVAE
    return "CITestCheckpointWithVAE"


@pytest.fixture(scope="session")
def comfy_models(comfy) -> ModelFactory:
    cache = os.environ.get(ENV_CACHE) or os.path.join(tempfile.gettempdir(), "consistent_inpaint_test_cache")
    return ModelFactory(comfy, Path(cache))


@pytest.fixture(scope="session")
def sd15_inpaint_ckpt(comfy_models) -> str:
    """Checkpoint name (checkpoints folder) of the random SD1.5-inpainting model."""
    return comfy_models.sd15_inpaint_checkpoint(levels=1)


@pytest.fixture(scope="session")
def flux_fill_unet(comfy_models) -> str:
    """Diffusion-model name (diffusion_models folder) of the random FLUX.1-Fill-shaped model."""
    return comfy_models.flux_fill_diffusion_model()


@pytest.fixture(scope="session")
def flux_vae(comfy_models) -> str:
    """VAE name (vae folder) of the random FLUX VAE (16 latent channels)."""
    return comfy_models.flux_vae()
