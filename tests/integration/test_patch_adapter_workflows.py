"""The shipped Patch-Adapter workflows executed as shipped (Dual Context bypassed, as shipped), with the files
swapped for the harness's random-weight ones: a 1536x1152 photo with a painted hole, the shallow SD1.5-inpainting
checkpoint (or the tiny 9-channel SDXL model with random SDXL-shaped conditioning, since ComfyUI only loads
full-depth SDXL files), the TAESD-architecture VAE, 2 steps, and 512 px patches."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_patch_adapter_graph import files, tiny_sdxl, tiny_sdxl_inpaint  # noqa: F401 (fixtures)
from test_workflows_load import _to_api

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
W, H = 1536, 1152
HOLE = (slice(500, 760), slice(600, 980))          # rows, columns painted transparent (= the mask)


@pytest.fixture(scope="module")
def photo(comfy):
    rng = np.random.default_rng(7)
    pic = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    pic[..., 3] = 255
    pic[HOLE[0], HOLE[1], 3] = 0
    Image.fromarray(pic, "RGBA").save(Path(comfy.folder_paths.get_input_directory()) / "ci_patch_photo.png")
    return pic


@pytest.mark.parametrize("name", ["patch_adapter_sd15.json", "patch_adapter_sdxl.json"])
def test_shipped_workflow_runs_and_keeps_every_pixel_outside_the_mask(
        comfy, run_prompt, files, tiny_sdxl_inpaint, photo, checkpoint_with_vae, name):
    wf = json.loads((WORKFLOWS / name).read_text())
    bypassed = {n["type"] for n in wf["nodes"] if n.get("mode") == 4}
    assert bypassed == {"ConsistentInpaintPatchAdapterLoader", "ConsistentInpaintApplyDualContext"}
    prompt = _to_api(wf, comfy.nodes.NODE_CLASS_MAPPINGS)
    sdxl = "sdxl" in name
    for key, node in sorted(prompt.items(), key=lambda kv: int(kv[0])):
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple":
            node.update(class_type=checkpoint_with_vae,
                        inputs={"ckpt_name": "" if sdxl else files["ckpt"], "vae_name": files["vae"]})
        elif ct == "UNETLoader":
            node.update(class_type=tiny_sdxl_inpaint[0], inputs=dict(tiny_sdxl_inpaint[1]))
        elif ct == "CLIPTextEncode" and sdxl:
            node.update(class_type="CITestRandomConditioning",
                        inputs=dict(tokens=8, dim=2048, pooled_dim=1280, seed=int(key), scale=1.0))
        elif ct == "LoadImage":
            inputs["image"] = "ci_patch_photo.png"
        elif ct == "ConsistentInpaintDownscaleForStage1":
            inputs["megapixels"] = 0.1
        elif ct == "KSampler":
            inputs["steps"] = 2
        elif ct == "ConsistentInpaintHighResPatchRefine":
            inputs.update(steps=2, patch_size=512, overlap=64)
    refine = next(k for k, n in prompt.items() if n["class_type"] == "ConsistentInpaintHighResPatchRefine")
    r = run_prompt(prompt)
    out, grid = r.output(refine, 0), r.output(refine, 1)
    original = torch.from_numpy(photo[..., :3].astype(np.float32) / 255.0)
    assert out.shape == (1, H, W, 3) and torch.isfinite(out).all()
    keep = torch.ones(H, W, dtype=torch.bool)
    keep[HOLE] = False
    assert torch.equal(out[0][keep], original[keep])
    assert not torch.allclose(out[0][~keep], original[~keep], atol=0.05)      # the hole was repainted
    assert grid.shape == (1, 768, 1024, 3)
