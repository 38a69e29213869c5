"""The shipped LAR-Gen workflows executed as shipped, with the files swapped for the harness's random-weight ones (a
LAR-Gen checkpoint and an IP-Adapter-Plus file in the authors' layouts, the shallow CLIP vision model), an 80x64
scene, a 48x40 subject, 2 steps and a 64² crop instead of 50 steps at 1024². Two harness swaps are needed because
ComfyUI only loads full-depth SDXL checkpoints: the SDXL checkpoint loader gives the harness VAE only, and the two
CLIPTextEncode nodes become random SDXL-shaped conditioning (2048-wide tokens, 1280-wide pooled)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_largen_graph import CKPT, CLIP_W, IP, clip_vision_node, largen_files, vae_name  # noqa: F401 (fixtures)
from test_workflows_load import _to_api

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
HOLE = (slice(20, 44), slice(30, 50))          # rows, columns painted transparent (= the mask)


@pytest.fixture(scope="module")
def pictures(comfy):
    rng = np.random.default_rng(4)
    scene = rng.integers(0, 256, (64, 80, 4), dtype=np.uint8)
    scene[..., 3] = 255
    scene[HOLE[0], HOLE[1], 3] = 0
    subject = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    subject[..., 3] = 0
    subject[8:32, 10:40, 3] = 255                 # the subject, on a transparent background
    inp = Path(comfy.folder_paths.get_input_directory())
    Image.fromarray(scene, "RGBA").save(inp / "ci_largen_scene.png")
    Image.fromarray(subject, "RGBA").save(inp / "ci_largen_subject.png")
    return scene


@pytest.mark.parametrize("name", ["largen_text_subject.json", "largen_subject.json"])
def test_shipped_workflow_runs_and_keeps_every_pixel_outside_the_mask(
        comfy, run_prompt, largen_files, clip_vision_node, vae_name, pictures, checkpoint_with_vae, name):
    prompt = _to_api(json.loads((WORKFLOWS / name).read_text()), comfy.nodes.NODE_CLASS_MAPPINGS)
    images = iter(["ci_largen_scene.png", "ci_largen_subject.png"])
    for key, node in sorted(prompt.items(), key=lambda kv: int(kv[0])):
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple":
            node.update(class_type=checkpoint_with_vae, inputs={"ckpt_name": "", "vae_name": vae_name})
        elif ct == "CLIPTextEncode":
            node.update(class_type="CITestRandomConditioning",
                        inputs=dict(tokens=8, dim=2048, pooled_dim=1280, seed=int(key), scale=1.0))
        elif ct == "CLIPVisionLoader":
            node.update(class_type="CITestClipVision", inputs=dict(width=CLIP_W, seed=0))
        elif ct == "LoadImage":
            inputs["image"] = next(images)
        elif ct == "ConsistentInpaintLARGenLoader":
            inputs.update(checkpoint=CKPT, image_proj=IP)
        elif ct == "ConsistentInpaintCropToMask":
            inputs["resolution"] = 64
        elif ct == "KSampler":
            inputs["steps"] = 2
    paste = next(k for k, n in prompt.items() if n["class_type"] == "ConsistentInpaintPasteBack")
    crop = next(k for k, n in prompt.items() if n["class_type"] == "ConsistentInpaintCropToMask")
    r = run_prompt(prompt)
    out = r.output(paste, 0)
    original = torch.from_numpy(pictures[..., :3].astype(np.float32) / 255.0)
    assert out.shape == (1, 64, 80, 3) and torch.isfinite(out).all()
    keep = torch.ones(64, 80, dtype=torch.bool)
    keep[HOLE] = False
    assert torch.equal(out[0][keep], original[keep])
    assert not torch.allclose(out[0][~keep], original[~keep], atol=0.05)      # the hole was repainted
    assert r.output(crop, 0).shape == (1, 64, 64, 3)
