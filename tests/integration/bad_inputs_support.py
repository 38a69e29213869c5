"""Shared pieces of the bad-input matrices: test-only tensor nodes, damaged / hostile weight files, values
driven by link, and one assertion per class of outcome.

* ``tensor_nodes`` (session fixture): registers ``CITestImage`` / ``CITestMask`` / ``CITestLatent``, tensors of any
  size, batch, channel count and content (``fill``: noise, zeros, ones, nan, inf, grid), that ComfyUI's own
  nodes cannot make (NaN pixels, 1x1 sizes, 2-channel images, 5-D latents).
* ``bad_copies(folder, stem, good)``: the file set every loader is tried with (NaN, Inf, integer weights, a hostile
  pickle, a damaged file) -> {variant: file name}; ``delete_later`` removes them when the module ends.
* ``link(g, value)``: the output of a core Primitive node, to drive a widget by link (ComfyUI then passes None to
  ``validate_inputs`` and the value exists only at execution).
* ``refused(comfy, graph, node, *words)``: the prompt fails *because of* ``node``, with a message holding every
  word (validation: in ComfyUI's node errors of that node; execution: an error of the pack's own types, raised by
  that node, starting with its display name), never a deep torch error.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# the marker a hostile pickle tries to write (it never may)
PWNED = Path("/tmp/consistent_inpaint_bad_inputs_pwned")
OUR_ERRORS = ("InputError", "CheckpointFormatError")


class _Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _fill(shape, fill: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if fill == "noise":
        return torch.rand(shape, generator=g)
    if fill == "grid":                               # thin lines through every 16x16 patch (at 256x256)
        t = torch.zeros(shape)
        t[..., 8::16, :] = 1
        t[..., :, 8::16] = 1
        return t
    t = torch.rand(shape, generator=g)
    value = {"zeros": 0.0, "ones": 1.0, "nan": float("nan"), "inf": float("inf")}[fill]
    if fill in ("zeros", "ones"):
        return torch.full(shape, value)
    t.view(-1)[:: max(1, t.numel() // 7)] = value     # a few bad values among good ones
    return t


def _int(default, lo=0):
    return ("INT", {"default": default, "min": lo, "max": 1 << 20})


def _tensor_nodes():
    common = {"width": _int(64), "height": _int(64), "batch": _int(1), "fill": ("STRING", {"default": "noise"}),
              "seed": _int(0)}

    class CITestImage:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": dict(common, channels=_int(3))}
        RETURN_TYPES, FUNCTION, CATEGORY = ("IMAGE",), "run", "testing"

        def run(self, width, height, batch, fill, seed, channels):
            return (_fill((batch, height, width, channels), fill, seed),)

    class CITestMask:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": dict(common)}
        RETURN_TYPES, FUNCTION, CATEGORY = ("MASK",), "run", "testing"

        def run(self, width, height, batch, fill, seed):
            return (_fill((batch, height, width), fill, seed),)

    class CITestLatent:
        """LATENT {"samples": [batch, channels, height, width]} (``frames`` > 0: a 5-D video latent)."""
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": dict(common, channels=_int(4), frames=_int(0))}
        RETURN_TYPES, FUNCTION, CATEGORY = ("LATENT",), "run", "testing"

        def run(self, width, height, batch, fill, seed, channels, frames):
            shape = (batch, channels, frames, height, width) if frames else (batch, channels, height, width)
            return ({"samples": _fill(shape, fill, seed) * 2 - 1},)

    return {"CITestImage": CITestImage, "CITestMask": CITestMask, "CITestLatent": CITestLatent}


@pytest.fixture(scope="session")
def tensor_nodes(comfy):
    for name, cls in _tensor_nodes().items():
        comfy.nodes.NODE_CLASS_MAPPINGS[name] = cls
    return sorted(_tensor_nodes())


def image(g, w=64, h=64, batch=1, fill="noise", channels=3, seed=1):
    return g.node("CITestImage", width=w, height=h, batch=batch, fill=fill, channels=channels, seed=seed).out(0)


def mask(g, w=64, h=64, batch=1, fill="rect", seed=2):
    if fill == "rect":
        return g.node("CITestRectMask", width=w, height=h, x=w // 4, y=h // 8, w=w // 2, h=h // 2).out(0)
    return g.node("CITestMask", width=w, height=h, batch=batch, fill=fill, seed=seed).out(0)


def latent(g, w=8, h=8, batch=1, channels=4, fill="noise", frames=0):
    return g.node("CITestLatent", width=w, height=h, batch=batch, channels=channels, fill=fill, frames=frames,
                  seed=3).out(0)


def link(g, value):
    """``value`` from a core Primitive node (FLOAT for floats, INT for ints)."""
    kind = "PrimitiveFloat" if isinstance(value, float) else "PrimitiveInt"
    return g.node(kind, value=value).out(0)


# -- weight files -------------------------------------------------------------------------------------------------
def _tensors(obj):
    """The state dict inside a saved container (MAE's {"model": ...}, Lightning's {"state_dict": ...})."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _spoiled(good, how: str, key=None):
    """A copy of ``good`` (a tensor, a state dict or a container of one) with tensor ``key`` (default: the largest)
    spoiled."""
    if isinstance(good, torch.Tensor):
        t = good.clone()
        return t.round().to(torch.int64) if how == "int" else t.fill_(float(how))
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
    sd = _tensors(out)
    key = key or max((k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()),
                     key=lambda k: sd[k].numel())
    t = sd[key].clone()
    if how == "int":
        sd[key] = (t * 100).round().to(torch.int64)
    else:
        t.view(-1)[0] = float(how)
        sd[key] = t
    return out


def bad_copies(folder: Path, stem: str, good, ext: str = ".pt", key=None) -> dict:
    """Write the damaged variants of ``good`` (what torch.save takes; ``key``: the tensor to spoil, default the
    largest) into ``folder`` -> {variant: file name}."""
    names = {}
    for how in ("nan", "inf", "int"):
        names[how] = f"{stem}_{how}{ext}"
        torch.save(_spoiled(good, how, key), folder / names[how])
    names["hostile"] = f"{stem}_hostile{ext}"
    torch.save({"weights": torch.zeros(2), "payload": _Hostile()}, folder / names["hostile"])
    names["garbage"] = f"{stem}_garbage{ext}"
    (folder / names["garbage"]).write_bytes(b"PK\x03\x04 not really a checkpoint" * 10)
    names["garbage_st"] = f"{stem}_garbage.safetensors"
    (folder / names["garbage_st"]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return names


def delete_later(comfy, *folders: Path):
    """A finalizer deleting every file that appears in ``folders`` from now on: a module fixture registers it with
    ``request.addfinalizer`` so the GB of damaged copies it writes into ComfyUI's model folders do not outlive the
    module."""
    before = {p for f in folders for p in f.iterdir()}

    def delete():
        for p in {p for f in folders for p in f.iterdir()} - before:
            p.unlink(missing_ok=True)
        comfy.folder_paths.filename_list_cache.clear()
    return delete


# what each damaged variant is refused with
BAD_FILE_WORDS = {"nan": ("NaN or infinite", "expected finite weights"),
                  "inf": ("NaN or infinite", "expected finite weights"),
                  "int": ("int64", "expected floating-point weights"),
                  "hostile": ("cannot be loaded safely", "posix.system"),
                  "garbage": ("not a readable torch checkpoint",),
                  "garbage_st": ("not a readable safetensors file",)}


# -- outcomes -----------------------------------------------------------------------------------------------------
def refused(comfy, g, node, *words, executor=None):
    """Run ``g``; it must fail because of ``node`` (a GraphBuilder node) with every word in the message.
    Returns the error text."""
    with pytest.raises(comfy.PromptError) as info:
        comfy.run_prompt(g, executor=executor)
    err = info.value
    assert not PWNED.exists(), "a hostile pickle ran code"
    if err.kind == "validation":
        errors = err.details["node_errors"].get(node.id)
        assert errors, f"validation failed, but not at node {node.id}: {err}"
        text = " ".join(f"{e.get('message')} {e.get('details')}" for e in errors["errors"])
        assert "Exception when validating" not in text and "Traceback" not in text, text
    else:
        d = err.details
        assert d.get("node_id") == node.id, f"execution failed at node {d.get('node_id')}, not {node.id}: {err}"
        assert d.get("exception_type", "").rsplit(".", 1)[-1] in OUR_ERRORS, f"not a clear refusal: {err}"
        name = comfy.nodes.NODE_CLASS_MAPPINGS[d["node_type"]].GET_SCHEMA().display_name
        text = d.get("exception_message", "")
        assert text.startswith(f"{name}: "), text
    for w in words:
        assert w in text, f"{w!r} not in: {text}"
    return text
