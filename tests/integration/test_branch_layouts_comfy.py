"""The branch layouts against ComfyUI itself (meta tensors, no weights, no sampling).

* Our diffusers -> internal renames equal ``comfy.utils.unet_to_diffusers`` for every non-zero-conv key,
  with the two documented differences: ``conv_in_condition`` (ComfyUI: ``conv_in``) and BrushNet's
  Res/Res middle (ComfyUI maps the second mid resnet to ``middle_block.2``; ours is ``middle_block.1``).
* ``spec.unet_config`` builds ComfyUI's ``UNetModel`` whose tensors are exactly ours minus the zero
  convs / ACPs and ComfyUI's ``out`` head.
"""
import pytest

import branch_layouts as W   # tests/unit, on sys.path via tests/conftest.py
from models.branch_layouts import MIDDLE_RES_RES, detect, diffusers_key_map, internal_shapes

DIFFUSERS = {
    "brushnet_sd15": lambda: W.brushnet_sd15(device="meta"),
    "brushnet_sdxl": lambda: W.brushnet_sdxl(device="meta"),
    "powerpaint_v2": lambda: W.powerpaint_v2(device="meta"),
}
ZERO = ("zero_down.", "zero_mid.", "zero_up.", "zero_attn.")


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_renames_match_comfy_unet_to_diffusers(comfy, name):
    sd = DIFFUSERS[name]()
    spec = detect(sd)
    cfg = spec.unet_config
    if spec.middle == MIDDLE_RES_RES:
        cfg["transformer_depth_middle"] = 0        # unet_to_diffusers needs an int
    theirs = comfy.comfy_utils.unet_to_diffusers(cfg)
    ours = diffusers_key_map(spec)
    checked = 0
    for d, internal in ours.items():
        if d.startswith("brushnet_"):
            assert internal.startswith(ZERO)
            continue
        key = "conv_in" + d[len("conv_in_condition"):] if d.startswith("conv_in_condition.") else d
        want = theirs.get(key)
        assert want is not None, f"ComfyUI does not map {d}"
        if spec.middle == MIDDLE_RES_RES and d.startswith("mid_block.resnets.1."):
            want = want.replace("middle_block.2.", "middle_block.1.", 1)
        assert internal == want, d
        checked += 1
    assert checked == sum(not k.startswith("brushnet_") for k in sd) > 200


def _comfy_unet_shapes(spec):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
    cfg = spec.unet_config
    res_res = spec.middle == MIDDLE_RES_RES
    if res_res:
        cfg["transformer_depth_middle"] = -1       # ComfyUI builds a single ResBlock middle ...
    unet = UNetModel(image_size=32, out_channels=4, device="meta", operations=comfy.ops.disable_weight_init, **cfg)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items() if not k.startswith("out.")}
    if res_res:                                    # ... and the branch adds the second one itself
        ch = cfg["model_channels"] * cfg["channel_mult"][-1]
        block = ResBlock(ch, 4 * cfg["model_channels"], 0, out_channels=ch, device="meta",
                         operations=comfy.ops.disable_weight_init)
        shapes.update({f"middle_block.1.{k}": tuple(v.shape) for k, v in block.state_dict().items()})
    return shapes


@pytest.mark.parametrize("name,small", [("brushnet_sd15", False), ("brushnet_sdxl", False), ("powerpaint_v2", False),
                                        ("painternet_sd15", True), ("painternet_sdxl", False),
                                        ("painternet_sdxl", True)])
def test_unet_config_builds_comfy_blocks_with_our_shapes(comfy, name, small):
    if name.startswith("painternet"):
        base = name.split("_")[1]
        spec = detect(W.painternet(base, small=small, device="meta"), W.painternet_metadata(base))
    else:
        spec = detect(DIFFUSERS[name]())
    ours = {k: v for k, v in internal_shapes(spec).items() if not k.startswith(ZERO)}
    assert _comfy_unet_shapes(spec) == ours
