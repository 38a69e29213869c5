"""ASUKA inside real ComfyUI: the SD1.5 variant of the prior conditioning drives a shallow SD1.5-inpaint
UNet through core InpaintModelConditioning + KSampler, and the harmonizing decoder decodes the result.

The ASUKA files are random weights in the authors' released containers (mae_300.pth with its Namespace,
plain alignment state dict, Lightning decoder checkpoint), written into ComfyUI's models/asuka folder.
"""
import pytest
import torch

import layouts

N_TOKENS, CTX = 256, 768


@pytest.fixture(scope="module")
def asuka_files(comfy):
    d = comfy.models_dir / "asuka"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(layouts.mae_checkpoint(dim=192, depth=2, dec_dim=128, dec_depth=8), d / "mae_test.pth")
    torch.save(layouts.alignment_state_dict(seed=3, in_dim=128, dim=CTX, head_dim=64), d / "align_sd15_test.pt")
    torch.save(layouts.decoder_checkpoint(z=4, ch=32, mult=(1, 2, 2, 2), res_blocks=1, cond=(32, 64, 64, 64, 64)),
               d / "decoder_sd_test.ckpt")
    comfy.folder_paths.filename_list_cache.clear()
    return d


@pytest.fixture(scope="module")
def context_spy(comfy, model_node):
    """A test-only node that clones MODEL and records the cross-attention context of every model call."""
    calls = []

    def patch(m):
        def wrapper(apply_model, args):
            calls.append(args["c"]["c_crossattn"].detach().clone())
            return apply_model(args["input"], args["timestep"], **args["c"])
        m.set_model_unet_function_wrapper(wrapper)
        return m

    model_node("CITestContextSpy", patch)
    return calls


def _sd_prior_loader(g):
    return g.node("ConsistentInpaintASUKALoader", mae="mae_test.pth", alignment="align_sd15_test.pt",
                  alignment_pooled="none", null_tokens="none", null_pooled="none")


def _asuka_graph(g, ckpt_name, size=64, batch=1, tile=0, tiling="exact"):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    image = g.node("CITestNoiseImage", width=size, height=size, batch_size=batch, seed=1)
    mask = g.node("CITestRectMask", width=size, height=size, x=16, y=8, w=24, h=40)
    prior = _sd_prior_loader(g)
    cond = g.node("ConsistentInpaintASUKAConditioning", asuka_prior=prior.out(0), image=image.out(0),
                  mask=mask.out(0), condition_weight=0.5)
    neg = g.node("CLIPTextEncode", text="", clip=ckpt.out(1))
    inp = g.node("InpaintModelConditioning", positive=cond.out(0), negative=neg.out(0), vae=ckpt.out(2),
                 pixels=image.out(0), mask=mask.out(0), noise_mask=True)
    spy = g.node("CITestContextSpy", model=ckpt.out(0))
    sampler = g.node("KSampler", model=spy.out(0), seed=0, steps=2, cfg=3.0, sampler_name="euler",
                     scheduler="normal", positive=inp.out(0), negative=inp.out(1), latent_image=inp.out(2),
                     denoise=1.0)
    dec_loader = g.node("ConsistentInpaintHarmonizingDecoderLoader", decoder="decoder_sd_test.ckpt")
    decode = g.node("ConsistentInpaintHarmonizingDecode", samples=sampler.out(0), decoder=dec_loader.out(0),
                    image=image.out(0), mask=mask.out(0), tile_size=tile, tiling=tiling, overlap=16)
    g.node("PreviewImage", images=decode.out(0))
    g.node("PreviewImage", images=cond.out(1))
    whole = None
    if tile:
        whole = g.node("ConsistentInpaintHarmonizingDecode", samples=sampler.out(0), decoder=dec_loader.out(0),
                       image=image.out(0), mask=mask.out(0), tile_size=0, tiling=tiling, overlap=16)
        g.node("PreviewImage", images=whole.out(0))
    return dict(cond=cond, sampler=sampler, decode=decode, image=image, prior=prior, whole=whole)


def test_asuka_sd_variant_graph_runs_and_conditioning_reaches_the_model(
        comfy, run_prompt, graph, sd15_inpaint_ckpt, asuka_files, context_spy):
    context_spy.clear()
    n = _asuka_graph(graph, sd15_inpaint_ckpt)
    result = run_prompt(graph)

    cond = result.output(n["cond"].id, 0)
    tokens = cond[0][0]
    assert tuple(tokens.shape) == (1, N_TOKENS, CTX) and torch.isfinite(tokens).all()
    preview = result.output(n["cond"].id, 1)
    assert tuple(preview.shape) == (1, 64, 64, 3) and 0 <= float(preview.min()) <= float(preview.max()) <= 1

    # the cond rows of both steps carried exactly the ASUKA tokens as cross-attention context (ComfyUI runs
    # cond (256 tokens) and uncond (77 CLIP tokens) in separate calls because their lengths do not concat)
    asuka_calls = [ctx for ctx in context_spy if ctx.shape[-2] == N_TOKENS]
    assert len(asuka_calls) == 2 and len(context_spy) == 4
    for ctx in asuka_calls:
        assert all(torch.allclose(row, tokens[0].to(row.dtype), atol=1e-5) for row in ctx)

    out = result.output(n["decode"].id, 0)
    assert tuple(out.shape) == (1, 64, 64, 3) and torch.isfinite(out).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


@pytest.mark.parametrize("tiling", ["exact", "independent"])
def test_tiled_harmonizing_decode_in_graph_and_batch(comfy, run_prompt, graph, sd15_inpaint_ckpt, asuka_files,
                                                     context_spy, tiling):
    n = _asuka_graph(graph, sd15_inpaint_ckpt, size=128, batch=2, tile=64, tiling=tiling)
    result = run_prompt(graph)
    tokens = result.output(n["cond"].id, 0)[0][0]
    assert tuple(tokens.shape) == (2, N_TOKENS, CTX)
    out, whole = result.output(n["decode"].id, 0), result.output(n["whole"].id, 0)
    assert tuple(out.shape) == (2, 128, 128, 3) and torch.isfinite(out).all()
    progress = [m for m in result.events("progress") if m["node"] == n["decode"].id]
    assert progress and all(b["value"] - a["value"] == 1 for a, b in zip(progress, progress[1:]))
    diff = (out - whole).abs()
    if tiling == "exact":
        # layer-synchronous tiles: the whole-image result everywhere, seams included
        assert float(diff.max()) < 1e-5
        assert progress[-1]["value"] == progress[-1]["max"] > 9
    else:
        # independent tiles: 128 px, 64 px tiles, 16 px overlap -> 3 x 3; own GroupNorm statistics per tile
        assert progress[-1]["max"] == 9 and float(diff.max()) > 1e-4


@pytest.mark.parametrize("case,match", [
    ("size", "mask is 48x48 but image is 64x64"),
    ("batch", "image batch is 2 but mask batch is 3"),
])
def test_bad_inputs_give_clear_errors(comfy, run_prompt, graph, asuka_files, case, match):
    g = graph
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=2, seed=1)
    if case == "size":
        mask = g.node("CITestRectMask", width=48, height=48, x=0, y=0, w=8, h=8)
        m = mask.out(0)
    else:
        mask = g.node("CITestRectMask", width=64, height=64, x=0, y=0, w=8, h=8)
        as_image = g.node("MaskToImage", mask=mask.out(0))
        three = g.node("RepeatImageBatch", image=as_image.out(0), amount=3)
        m = g.node("ImageToMask", image=three.out(0), channel="red").out(0)
    prior = _sd_prior_loader(g)
    cond = g.node("ConsistentInpaintASUKAConditioning", asuka_prior=prior.out(0), image=image.out(0), mask=m,
                  condition_weight=0.5)
    g.node("CITestCapture", value=cond.out(0))
    with pytest.raises(comfy.PromptError, match=match):
        run_prompt(g)


def test_full_and_empty_masks_give_finite_conditioning(comfy, run_prompt, graph, asuka_files):
    g = graph
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=2)
    prior = _sd_prior_loader(g)
    conds = []
    for value in (0.0, 1.0):
        mask = g.node("SolidMask", value=value, width=64, height=64)
        conds.append(g.node("ConsistentInpaintASUKAConditioning", asuka_prior=prior.out(0), image=image.out(0),
                            mask=mask.out(0), condition_weight=0.5))
        g.node("CITestCapture", value=conds[-1].out(0))
    result = run_prompt(g)
    for c in conds:
        assert torch.isfinite(result.output(c.id, 0)[0][0]).all()


def test_wrong_file_in_loader_names_expected_layout(comfy, run_prompt, graph, asuka_files):
    g = graph
    prior = g.node("ConsistentInpaintASUKALoader", mae="align_sd15_test.pt", alignment="align_sd15_test.pt",
                   alignment_pooled="none", null_tokens="none", null_pooled="none")
    g.node("CITestCapture", value=prior.out(0))
    with pytest.raises(comfy.PromptError, match="expected an ASUKA MAE prior"):
        run_prompt(g)
    g2 = comfy.graph()
    dec = g2.node("ConsistentInpaintHarmonizingDecoderLoader", decoder="mae_test.pth")
    g2.node("CITestCapture", value=dec.out(0))
    with pytest.raises(comfy.PromptError, match="expected an ASUKA harmonizing decoder"):
        run_prompt(g2)


def _sd_decode(g, image, mask, latent_side):
    """Harmonizing Decode (the SD test decoder, whole image) of an empty latent of ``latent_side`` pixels."""
    dec = g.node("ConsistentInpaintHarmonizingDecoderLoader", decoder="decoder_sd_test.ckpt")
    latent = g.node("EmptyLatentImage", width=latent_side, height=latent_side, batch_size=1)
    d = g.node("ConsistentInpaintHarmonizingDecode", samples=latent.out(0), decoder=dec.out(0), image=image.out(0),
               mask=mask.out(0), tile_size=0, overlap=16)
    g.node("CITestCapture", value=d.out(0))
    return d


def test_latent_of_wrong_channels_or_size_is_rejected(comfy, run_prompt, graph, asuka_files):
    g = graph
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=1)
    _sd_decode(g, image, g.node("CITestRectMask", width=64, height=64, x=0, y=0, w=8, h=8), 96)
    with pytest.raises(comfy.PromptError, match="latent decodes to 96x96 but image is 64x64"):
        run_prompt(g)


def test_decode_accepts_image_rounded_down_to_the_latent_like_core_inpaint(comfy, run_prompt, graph, asuka_files):
    g = graph
    noise = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=1)
    image = g.node("ImageScale", image=noise.out(0), upscale_method="nearest-exact", width=68, height=70, crop="disabled")
    d = _sd_decode(g, image, g.node("CITestRectMask", width=68, height=70, x=10, y=10, w=20, h=20), 64)
    out = run_prompt(g).output(d.id, 0)
    assert tuple(out.shape) == (1, 64, 64, 3) and torch.isfinite(out).all()


def test_rgba_and_grayscale_images_are_accepted_and_other_channel_counts_rejected(comfy, run_prompt, graph,
                                                                                   asuka_files):
    import sys
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["ConsistentInpaintASUKAConditioning"]
    layout = sys.modules[cls.__module__.rsplit(".", 1)[0] + ".layout"]
    rgb = torch.rand(2, 8, 10, 3)
    rgba = torch.cat([rgb, torch.rand(2, 8, 10, 1)], -1)
    assert torch.equal(layout.image_to_bchw(rgba), layout.image_to_bchw(rgb))
    gray = layout.image_to_bchw(rgb[..., :1])
    assert gray.shape == (2, 3, 8, 10) and torch.equal(gray[:, 0], gray[:, 2])
    with pytest.raises(ValueError, match="got 2 channels"):
        layout.image_to_bchw(rgb[..., :2])
    with pytest.raises(ValueError, match="NaN"):
        layout.image_to_bchw(torch.full((1, 4, 4, 3), float("nan")))
    # and through a real graph: an RGBA image made by core nodes
    g = graph
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=4)
    alpha = g.node("SolidMask", value=0.5, width=64, height=64)
    rgba_node = g.node("JoinImageWithAlpha", image=image.out(0), alpha=alpha.out(0))
    mask = g.node("CITestRectMask", width=64, height=64, x=8, y=8, w=16, h=16)
    prior = _sd_prior_loader(g)
    c_rgba = g.node("ConsistentInpaintASUKAConditioning", asuka_prior=prior.out(0), image=rgba_node.out(0),
                    mask=mask.out(0), condition_weight=0.5)
    c_rgb = g.node("ConsistentInpaintASUKAConditioning", asuka_prior=prior.out(0), image=image.out(0),
                   mask=mask.out(0), condition_weight=0.5)
    g.node("CITestCapture", value=c_rgba.out(0))
    g.node("CITestCapture", value=c_rgb.out(0))
    r = run_prompt(g)
    assert torch.equal(r.output(c_rgba.id, 0)[0][0], r.output(c_rgb.id, 0)[0][0])
