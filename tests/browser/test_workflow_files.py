"""The files beside each workflow, checked without a browser: ``<name>.png`` carries the workflow itself (ComfyUI reads a
PNG's ``tEXt`` chunk ``workflow`` when the picture is dropped on the canvas), ``<name>.jpg`` is the template browser's
thumbnail, and the workflow starts from ComfyUI's shipped ``example.png`` with model links the frontend accepts."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
# What the missing-models dialog of comfyui-frontend-package 1.27.10 (MissingModelsWarning) lets a user download:
# a URL from these hosts and a file name with one of these suffixes, else it shows an error instead of a button.
ALLOWED_SOURCES = ("https://civitai.com/", "https://huggingface.co/")
ALLOWED_SUFFIXES = (".safetensors", ".sft")
# Selected .safetensors files with no public direct download the dialog could use (the workflows' notes say where):
NO_PUBLIC_LINK = {
    "realisticVisionV60B1_v51VAE.safetensors",    # the authors' SD1.5 checkpoint: any SD1.5 model will do
    "random_mask_brushnet_ckpt/diffusion_pytorch_model.safetensors",          # BrushNet: Google Drive only
    "random_mask_brushnet_ckpt_sdxl_v0/diffusion_pytorch_model.safetensors",  # BrushNet: Google Drive only
    "patch_adapter_sd15.safetensors", "patch_adapter_sdxl.safetensors",       # Patch-Adapter: none released
}


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG, read the way the frontend's ``getFromPngBuffer`` reads them (an ``iTXt`` chunk
    is reported under its raw keyword, as the frontend would mis-read it)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    out, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0], "bad CRC"
        if kind in (b"tEXt", b"iTXt"):
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("utf-8") if kind == b"tEXt" else "<iTXt>"
        pos += 12 + length
    return out


@pytest.mark.parametrize("name", NAMES)
def test_png_is_the_workflow(name):
    data = (WORKFLOWS / f"{name}.png").read_bytes()
    assert len(data) < 500_000, f"{name}.png is {len(data)} bytes"
    chunks = png_text_chunks(data)
    assert "workflow" in chunks, f"{name}.png has no workflow chunk (found {sorted(chunks)})"
    assert json.loads(chunks["workflow"]) == json.loads((WORKFLOWS / f"{name}.json").read_text()), \
        f"{name}.png embeds a workflow other than {name}.json: run tools/workflow_pictures.py"
    prompt = json.loads(chunks["prompt"])
    wf = json.loads(chunks["workflow"])
    queued = {str(n["id"]) for n in wf["nodes"] if n.get("mode", 0) == 0 and n["type"] not in ("MarkdownNote", "Note")}
    assert set(prompt) == queued, f"{name}.png: prompt nodes {sorted(prompt)}, active nodes {sorted(queued)}"


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_a_picture(name):
    from PIL import Image, ImageStat
    path = WORKFLOWS / f"{name}.jpg"
    assert path.stat().st_size < 500_000
    with Image.open(path) as im:
        assert im.format == "JPEG" and min(im.size) >= 256, (im.format, im.size)
        assert max(ImageStat.Stat(im.convert("L")).stddev) > 10, f"{name}.jpg is blank"


@pytest.mark.parametrize("name", NAMES)
def test_inputs_and_model_links(name):
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for n in wf["nodes"]:
        if n["type"] == "LoadImage":
            assert n["widgets_values"][0] == "example.png", f"{name} node {n['id']} loads {n['widgets_values'][0]}"
        values = {v for v in n.get("widgets_values") or [] if isinstance(v, str)}
        for m in n.get("properties", {}).get("models", []):
            assert set(m) >= {"name", "url", "directory"}, m
            assert m["name"] in values, f"{name} node {n['id']}: link for {m['name']}, not selected"
            assert m["url"].startswith(ALLOWED_SOURCES) and m["name"].endswith(ALLOWED_SUFFIXES), m
        for v in values:
            if v.endswith(ALLOWED_SUFFIXES) and v not in NO_PUBLIC_LINK:
                assert any(m["name"] == v for m in n.get("properties", {}).get("models", [])), \
                    f"{name} node {n['id']}: {v} has no download link"
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1 and "Models for this workflow" in notes[0]["widgets_values"][0], f"{name}: no models note"
