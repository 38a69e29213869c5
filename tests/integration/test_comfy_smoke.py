"""Smoke tests: real ComfyUI runs headless here, and the pack loads the way ComfyUI loads it."""

import pytest

from pathlib import Path

# The node contract of DESIGN.md: ids never change once released (workflows depend on them).
REQUIRED_PACK_NODE_IDS = [
    "ConsistentInpaintASUKALoader",
    "ConsistentInpaintASUKAConditioning",
    "ConsistentInpaintHarmonizingDecoderLoader",
    "ConsistentInpaintHarmonizingDecode",
    "ConsistentInpaintBranchLoader",
    "ConsistentInpaintApplyBranch",
    "ConsistentInpaintLARGenLoader",
    "ConsistentInpaintApplySubjectAttention",
    "ConsistentInpaintRefineNetLoader",
    "ConsistentInpaintApplyRefineNet",
    "ConsistentInpaintCropToMask",
    "ConsistentInpaintPasteBack",
    "ConsistentInpaintPatchAdapterLoader",
    "ConsistentInpaintApplyDualContext",
    "ConsistentInpaintHighResPatchRefine",
]


def _finite(t):
    import torch
    return bool(torch.isfinite(t).all())


def _inpaint_mask(g, size=64, hole=32):
    """Core nodes only: a size x size MASK with a centred hole x hole square of 1 (1 = inpaint)."""
    zeros = g.node("SolidMask", value=0.0, width=size, height=size)
    ones = g.node("SolidMask", value=1.0, width=hole, height=hole)
    off = (size - hole) // 2
    return g.node("MaskComposite", destination=zeros.out(0), source=ones.out(0), x=off, y=off, operation="add")


def _inpaint_and_sample(g, model, vae, conds, image, noise_mask, steps, cfg, scheduler):
    """Core InpaintModelConditioning of ``image`` with the centred hole, KSampler, VAEDecode -> (sampler, decode)."""
    cond = g.node("InpaintModelConditioning", positive=conds[0].out(0), negative=conds[1].out(0), vae=vae,
                  pixels=image.out(0), mask=_inpaint_mask(g).out(0), noise_mask=noise_mask)
    sampler = g.node("KSampler", model=model, seed=0, steps=steps, cfg=cfg, sampler_name="euler",
                     scheduler=scheduler, positive=cond.out(0), negative=cond.out(1), latent_image=cond.out(2),
                     denoise=1.0)
    return sampler, g.node("VAEDecode", samples=sampler.out(0), vae=vae)


def test_core_sd15_inpaint_graph_runs_headless(comfy, run_prompt, graph, sd15_inpaint_ckpt):
    g = graph
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sd15_inpaint_ckpt)
    pos = g.node("CLIPTextEncode", text="a red brick wall", clip=ckpt.out(1))
    neg = g.node("CLIPTextEncode", text="", clip=ckpt.out(1))
    image = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0x808080)
    sampler, decode = _inpaint_and_sample(g, ckpt.out(0), ckpt.out(2), (pos, neg), image, True, 2, 2.0, "normal")
    preview = g.node("PreviewImage", images=decode.out(0))

    result = run_prompt(g)

    model = result.output(ckpt.id, 0)
    # ComfyUI's own detection took it as SD1.5 inpainting (9 input channels).
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_config.unet_config["in_channels"] == 9
    assert model.model.model_config.inpaint_model()

    latent = result.output(sampler.id, 0)["samples"]
    assert tuple(latent.shape) == (1, 4, 8, 8) and _finite(latent)
    image_out = result.output(decode.id, 0)
    assert tuple(image_out.shape) == (1, 64, 64, 3) and _finite(image_out)
    assert float(image_out.min()) >= 0.0 and float(image_out.max()) <= 1.0

    ui = result.ui(preview.id)
    assert ui and len(ui["images"]) == 1 and ui["images"][0]["type"] == "temp"
    progress = [m for m in result.events("progress") if m["node"] == sampler.id]
    assert progress and progress[-1]["max"] == 2
    assert sampler.id in result.executed
    print({result.prompt[n]["class_type"]: round(s, 2) for n, s in result.node_seconds.items()})


def test_pack_loads_like_comfyui_and_registers_required_nodes(comfy):
    log = "\n".join(comfy.pack_load_log)
    assert comfy.pack_loaded, f"ComfyUI failed to load the pack from {comfy.pack_module or 'repo root'}:\n{log}"
    registered = set(comfy.pack_node_ids)
    missing = [n for n in REQUIRED_PACK_NODE_IDS if n not in registered]
    assert not missing, (f"pack loaded but these node ids are missing from nodes.NODE_CLASS_MAPPINGS: {missing}; "
                         f"the pack registered: {sorted(registered)}\n{log}")


def test_every_pack_node_has_a_help_page(comfy):
    docs = Path(__file__).resolve().parents[2] / "web" / "docs"
    missing = [n for n in comfy.pack_node_ids if not (docs / f"{n}.md").is_file()]
    assert comfy.pack_node_ids and not missing, f"nodes without web/docs/<id>.md: {missing}"


def test_pack_does_not_monkeypatch_comfyui(comfy):
    """DESIGN principle 3: no global monkeypatching of ComfyUI functions at load time."""
    assert not comfy.monkeypatched, f"the pack replaced ComfyUI functions while loading: {comfy.monkeypatched}"


def test_core_flux_fill_graph_runs_headless(comfy, run_prompt, graph, flux_fill_unet, flux_vae):
    g = graph
    unet = g.node("UNETLoader", unet_name=flux_fill_unet, weight_dtype="default")
    vae = g.node("VAELoader", vae_name=flux_vae)
    # FLUX's T5-XXL cannot be faked small; the harness node stands in for a text encoder.
    text = g.node("CITestRandomConditioning", tokens=8, dim=4096, pooled_dim=768, seed=1, scale=1.0)
    pos = g.node("FluxGuidance", conditioning=text.out(0), guidance=30.0)
    neg = g.node("ConditioningZeroOut", conditioning=text.out(0))
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=0)
    sampler, decode = _inpaint_and_sample(g, unet.out(0), vae.out(0), (pos, neg), image, False, 1, 1.0, "simple")
    g.node("CITestCapture", value=decode.out(0))

    result = run_prompt(g)

    model = result.output(unet.id, 0)
    assert type(model.model.model_config).__name__ == "FluxInpaint"
    latent = result.output(sampler.id, 0)["samples"]
    assert tuple(latent.shape) == (1, 16, 8, 8) and _finite(latent)
    image_out = result.output(decode.id, 0)
    assert tuple(image_out.shape) == (1, 64, 64, 3) and _finite(image_out)
    print({result.prompt[n]["class_type"]: round(s, 2) for n, s in result.node_seconds.items()})


def test_validation_errors_carry_comfyui_text(comfy, run_prompt, graph):
    g = graph
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="does-not-exist.safetensors")
    g.node("CITestCapture", value=ckpt.out(0))
    with pytest.raises(comfy.PromptError) as err:
        run_prompt(g)
    assert err.value.kind == "validation"
    assert "does-not-exist.safetensors" in str(err.value)
    assert ckpt.id in err.value.details["node_errors"]
