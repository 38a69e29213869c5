"""The shipped SD1.5 inpaint-branch workflows executed as shipped, with only the files swapped for the harness's
random-weight ones (shallow SD1.5-inpaint checkpoint, BrushNet / PowerPaint files in the published layout, a
PowerPaint task-embedding file in the authors' layout), a 64² image and 2 steps instead of 30.
The SDXL workflow is covered by test_workflows_load (ComfyUI only detects full-depth SDXL checkpoints)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_branch_compose import task_files  # noqa: F401 (fixture)
from test_branch_graph import branch_files, unet_ckpt  # noqa: F401 (fixtures)
from test_workflows_load import _to_api

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
HOLE = (slice(16, 48), slice(8, 40))          # rows, columns painted transparent (= the mask)


@pytest.fixture(scope="module")
def picture(comfy):
    rgba = np.random.default_rng(3).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[HOLE[0], HOLE[1], 3] = 0
    Image.fromarray(rgba, "RGBA").save(Path(comfy.folder_paths.get_input_directory()) / "ci_branch_workflow.png")
    return "ci_branch_workflow.png", rgba


@pytest.mark.parametrize("name,branch", [("branch_inpaint_sd15.json", "brushnet_sd15_test.safetensors"),
                                         ("powerpaint_removal.json", "powerpaint_test.safetensors")])
def test_shipped_workflow_runs_and_keeps_every_pixel_outside_the_mask(comfy, run_prompt, unet_ckpt, branch_files,
                                                                      task_files, picture, name, branch):
    prompt = _to_api(json.loads((WORKFLOWS / name).read_text()), comfy.nodes.NODE_CLASS_MAPPINGS)
    swap = {"ckpt_name": unet_ckpt, "branch": branch, "task_embeddings": task_files["full"], "image": picture[0],
            "steps": 2}
    for node in prompt.values():
        node["inputs"].update({k: v for k, v in swap.items()
                               if k in node["inputs"] and not isinstance(node["inputs"][k], list)})  # not links
    comp = next(k for k, n in prompt.items() if n["class_type"] == "ImageCompositeMasked")
    apply = next(k for k, n in prompt.items() if n["class_type"] == "ConsistentInpaintApplyBranch")
    r = run_prompt(prompt)
    out = r.output(comp, 0)
    original = torch.from_numpy(picture[1][..., :3].astype(np.float32) / 255.0)
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()
    keep = torch.ones(64, 64, dtype=torch.bool)
    keep[HOLE] = False
    assert torch.equal(out[0][keep], original[keep])
    assert not torch.allclose(out[0][~keep], original[~keep], atol=0.05)      # the hole was repainted
    assert float(r.output(apply, 3)["noise_mask"].sum()) == 32 * 32
