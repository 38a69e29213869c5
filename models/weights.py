"""The one safe loader for every weight file the pack reads.

* ``.safetensors`` / ``.sft``: read with safetensors (no code can run).
* torch pickles (``.pth .pt .ckpt .bin``): ``torch.load(weights_only=True)`` only. Some released files carry
  harmless Python objects beside the tensors (MAE's training code stores an ``argparse.Namespace`` under
  ``args``; Lightning checkpoints may carry hyper-parameter containers). Those globals are listed in
  :data:`INERT_PICKLE_GLOBALS`; when a file needs them they are mapped onto :class:`InertPickledObject`, a
  class that only stores what the pickle hands it and never runs code. Any other global is refused with
  an error that names it. There is no unrestricted unpickle anywhere in the pack.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from typing import Any, Iterable, Mapping

import torch

log = logging.getLogger(__name__)

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS

# Globals that released checkpoints carry next to their tensors and that are mapped to an inert holder.
INERT_PICKLE_GLOBALS = frozenset({
    "argparse.Namespace",                                   # MAE training code: checkpoint["args"]
    "pytorch_lightning.utilities.parsing.AttributeDict",    # Lightning hyper_parameters
    "lightning.fabric.utilities.data.AttributeDict",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
})


class CheckpointFormatError(ValueError):
    """A weight file is missing, unreadable, unsafe, or not in the layout a loader expects."""


class InertPickledObject:
    """Stand-in for an allow-listed non-tensor object inside a pickle: it keeps its data, runs no code."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointFormatError(
            f"{os.path.basename(path)} is not a readable safetensors file ({e}). "
            "Check that the download is complete and that the file really is .safetensors.") from e


def _load_pickle(path: str) -> Any:
    name = os.path.basename(path)
    kwargs: dict[str, Any] = {"map_location": "cpu"}
    if zipfile.is_zipfile(path):
        kwargs["mmap"] = True  # large files (the T5-side alignment is ~4 GB) are not read into RAM twice
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as first:
        try:
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as e:
            raise CheckpointFormatError(
                f"{name} could not be loaded safely ({first}). Only tensors and plain containers are "
                "accepted from torch pickles; convert the file to .safetensors.") from e
        refused = sorted(needed - INERT_PICKLE_GLOBALS)
        if refused:
            raise CheckpointFormatError(
                f"{name} contains Python objects that cannot be loaded safely: {', '.join(refused)}. "
                "Only tensors, plain containers and the allow-listed objects "
                f"({', '.join(sorted(INERT_PICKLE_GLOBALS))}) are accepted; convert the file to "
                ".safetensors.") from first
        log.info("%s: mapping %s to inert placeholders", name, ", ".join(sorted(needed)))
        with torch.serialization.safe_globals([(InertPickledObject, g) for g in sorted(needed)]):
            return torch.load(path, weights_only=True, **kwargs)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise CheckpointFormatError(
            f"{name} is not a readable torch checkpoint ({e}). Check that the download is complete.") from e


def load_weights(path: str) -> Any:
    """Read a weight file safely. Returns what the file holds (a dict of tensors, a nested dict, a tensor)."""
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"weight file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        return _load_safetensors(path)
    if ext in PICKLE_EXTENSIONS:
        return _load_pickle(path)
    raise CheckpointFormatError(
        f"{os.path.basename(path)}: unsupported file type '{ext}'; expected one of {', '.join(WEIGHT_EXTENSIONS)}")


def tensor_dict(obj: Any, path: str, containers: Iterable[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` mapping inside a loaded file, unwrapping ``state_dict`` / ``model`` keys."""
    if isinstance(obj, Mapping):
        for key in containers:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointFormatError(
        f"{os.path.basename(path)} holds no tensors by name (found {type(obj).__name__}); "
        "expected a state dict, optionally under 'state_dict' or 'model'")


def check_weights(sd: Mapping[str, torch.Tensor], path: str, names: Iterable[str] | None = None,
                  floating: bool = True) -> None:
    """One cheap pass over the tensors ``names`` (default: all) of a loaded file: each must be floating point (when
    ``floating``) and finite. The error names the first bad tensor; no tensor is copied."""
    name = os.path.basename(str(path)) or "weight file"
    for key in (sd if names is None else names):
        t = sd[key]
        if not (t.is_floating_point() or t.is_complex()):
            if floating:
                raise CheckpointFormatError(
                    f"{name}: tensor {key} has dtype {str(t.dtype).replace('torch.', '')}; expected floating-point "
                    "weights. The file is not a weight file of this kind, or it was damaged; re-download it")
            continue
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise CheckpointFormatError(
                f"{name}: tensor {key} holds NaN or infinite values; expected finite weights. The file is damaged "
                "or was saved from a diverged training run; re-download it or use an earlier checkpoint")


def single_tensor(obj: Any, path: str) -> torch.Tensor:
    """A file that stores one tensor: a bare tensor pickle, or a safetensors/dict file with one entry (floating
    point and finite, else an error)."""
    if isinstance(obj, torch.Tensor):
        check_weights({"tensor": obj}, path)
        return obj
    if isinstance(obj, Mapping):
        tensors = [(k, v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            check_weights(dict(tensors), path)
            return tensors[0][1]
        inner = sum(isinstance(v, Mapping) for v in obj.values())
        given = f"{len(tensors)} tensors" + (f" and {inner} containers of more (a model's weights)" if inner else "")
        raise CheckpointFormatError(f"{os.path.basename(path)}: expected one tensor (an embedding); got {given}. "
                                    "Choose the embedding file (e.g. txt_256.pt / vec.pt)")
    raise CheckpointFormatError(f"{os.path.basename(path)}: expected a tensor; got a {type(obj).__name__}")


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed; other keys are dropped."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def count_indexed(sd: Mapping[str, Any], prefix: str) -> int:
    """Number of consecutive ``prefix{i}.`` groups in a state dict (``blocks.0.`` … ``blocks.N-1.``)."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def require_keys(sd: Mapping[str, Any], keys: Iterable[str], what: str, path: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        found = ", ".join(sorted(sd)[:6]) + (" …" if len(sd) > 6 else "")
        raise CheckpointFormatError(
            f"{os.path.basename(path)}: expected {what}; got a file without {', '.join(missing[:4])}"
            f"{' …' if len(missing) > 4 else ''} (its keys: {found}). Choose a file of that kind")


def listing(names, limit: int = 5) -> str:
    """The first ``limit`` names and how many more (for errors that quote a file's keys)."""
    names = list(names)
    more = f" … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more


def check_tensors(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], path: str, what: str,
                  ignore_unexpected: Iterable[str] = ()) -> None:
    """The file must hold exactly the ``expected`` names with their shapes (keys starting with one of the
    ``ignore_unexpected`` prefixes may be extra); the error names what is missing, extra or misshapen."""
    name = os.path.basename(str(path)) or "weight file"
    ignored = tuple(ignore_unexpected)
    extra = sorted(k for k in sd if k not in expected and not k.startswith(ignored))
    missing = sorted(k for k in expected if k not in sd)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({listing(missing, 6)})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors ({listing(extra, 6)})")
        raise CheckpointFormatError(f"{name} does not match {what}: {'; '.join(parts)}")
    bad = [(k, tuple(sd[k].shape), want) for k, want in expected.items() if tuple(sd[k].shape) != tuple(want)]
    if bad:
        k, got, want = bad[0]
        more = f" ({len(bad) - 1} more tensors have wrong shapes)" if len(bad) > 1 else ""
        raise CheckpointFormatError(f"{name}: {k} has shape {got}; {what} needs {want}{more}")


def safetensors_metadata(path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file (None for other files or when it has none)."""
    if os.path.splitext(str(path))[1].lower() not in SAFETENSORS_EXTENSIONS:
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata()
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointFormatError(
            f"{os.path.basename(str(path))} is not a readable safetensors file ({e})") from e


def build_from_state_dict(factory, sd: Mapping[str, torch.Tensor], path: str, what: str, dtype=None,
                          ignore_unexpected: Iterable[str] = ()) -> torch.nn.Module:
    """Build ``factory(device='meta')`` and adopt the file's tensors (no second copy in memory), then cast.

    Every parameter the architecture needs must be in the file (an error names the missing ones); keys
    the architecture does not use are an error too, except prefixes listed in ``ignore_unexpected``. Weights must
    be floating point and finite (:func:`check_weights`, one pass, no copy).
    """
    module = factory(device="meta")
    own = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    check_tensors(sd, expected, path, what, ignore_unexpected)
    check_weights(sd, path, [k for k in expected if own[k].is_floating_point()])
    check_weights(sd, path, [k for k in expected if not own[k].is_floating_point()], floating=False)
    module.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)
    if dtype is not None:
        module.to(dtype)
    return module.eval().requires_grad_(False)
