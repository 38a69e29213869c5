"""Patch-Adapter inside real ComfyUI: stage 1 (Dual Context Adapter on a shallow SD1.5-inpainting model and on a
shallow 9-channel SDXL model) and stage 2 (High-Res Patch Refine at 2048² with a TAESD-architecture VAE), with
adapter files written in our format for the model's own sites.

Counters wrap the patch objects' methods (class attributes, patched before the graph runs, so the objects the
nodes attach use them) and record, per call, the site, the step's sigma, the patch ids of the model call and
whether the term changed anything."""
import sys
from collections import defaultdict

import pytest
import torch
from safetensors.torch import save_file

from test_branch_graph import SDXL_UNET, tiny_sdxl  # noqa: F401 (fixture)

SIZE = 2048
PATCH, OVERLAP = 256, 32


def _pack(comfy, sub):
    return sys.modules[f"{comfy.pack_module.__name__}.{sub}"]


def _sites(comfy, unet):
    """{site: ((attn1 C, D), (attn2 C, D))} of a ComfyUI UNet."""
    ts = _pack(comfy, "nodes.branch_unet").transformer_sites(unet)
    return {s: ((tb.attn1.to_q.in_features, tb.attn1.to_q.out_features),
                (tb.attn2.to_q.in_features, tb.attn2.to_q.out_features)) for s, tb in ts.items()}


def _adapter(comfy, sites, *, dca=True, rpa=True, seed=0, scale=0.05, base=None):
    pa = _pack(comfy, "models.patch_adapter")
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(shape, generator=g) * scale

    weights = pa.AdapterWeights(
        dca={s: {"to_q": w(d, c), "to_k": w(d, d), "to_v": w(d, d)} for s, (_, (c, d)) in sites.items()} if dca else {},
        rpa={s: {"to_k": w(d, c), "to_v": w(d, c), "gate": torch.tensor([0.5])} for s, ((c, d), _) in sites.items()}
        if rpa else {}, base=base)
    return pa.adapter_state_dict(weights)


@pytest.fixture(scope="module")
def files(comfy, comfy_models):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ops import disable_weight_init
    ckpt = comfy_models.sd15_inpaint_checkpoint(levels=2, skip_top_attention=True)
    vae = comfy_models.taesd_vae()
    sd15 = _sites(comfy, UNetModel(**comfy_models.sd15_unet_config(2, 9, True), device="meta",
                                   operations=disable_weight_init))
    sdxl = _sites(comfy, UNetModel(**dict(SDXL_UNET, in_channels=9), device="meta",
                                   operations=disable_weight_init))
    d = comfy.models_dir / "patch_adapter"
    d.mkdir(parents=True, exist_ok=True)
    for name, kw in {"pa_sd15.safetensors": dict(sites=sd15, base="sd15"),
                     "pa_sd15_dca_only.safetensors": dict(sites=sd15, rpa=False),
                     "pa_sd15_rpa_only.safetensors": dict(sites=sd15, dca=False),
                     "pa_sdxl.safetensors": dict(sites=sdxl, base="sdxl")}.items():
        sd, meta = _adapter(comfy, **kw)
        save_file(sd, str(d / name), metadata=meta)
    torch.save({"dca.input.1.0.to_q.weight": torch.zeros(4, 4)}, d / "not_safetensors.pth")
    save_file({"blocks.0.weight": torch.zeros(2)}, str(d / "foreign.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    return dict(ckpt=ckpt, vae=vae, sd15=sd15, sdxl=sdxl)


@pytest.fixture(scope="module")
def tiny_sdxl_inpaint(tiny_sdxl):
    """(node, inputs) of a comfy SDXL model object with a 9-channel input (ComfyUI makes it an inpaint model: concat
    mask + masked latent) at 64 channels and two levels, random weights."""
    return tiny_sdxl, {"seed": 0, "in_channels": 9}


@pytest.fixture
def calls(comfy, monkeypatch):
    """Log of every DCA term, reference record/read and RPA term the nodes' patch objects compute."""
    node = _pack(comfy, "nodes.patch_adapter")
    log = []

    def sigma(extra):
        s = extra.get("sigmas")
        return None if s is None else round(float(s.max()), 4)

    dca_term = node.DualContextPatch.term

    def term(self, q, k, v, site, extra):
        out = dca_term(self, q, k, v, site, extra)
        if out is not None:
            log.append(dict(kind="dca", site=site, sigma=sigma(extra), rows=q.shape[0],
                            chunks=list(extra["cond_or_uncond"]), changed=bool(out.abs().amax() > 0)))
        return out

    self_attention = node.ReferencePatch.self_attention

    def sa(self, n, context, value, extra):
        out = self_attention(self, n, context, value, extra)
        state = extra.get(self.key)
        if state is not None:
            log.append(dict(kind=state[0], site=node.site_of(extra), sigma=sigma(extra), rows=n.shape[0],
                            ids=tuple(extra.get(node.PATCH_ID, ())), added=out[1].shape[1] - context.shape[1]))
        return out

    rpa_term = node.ReferencePatch.term

    def rterm(self, q, site, extra):
        out = rpa_term(self, q, site, extra)
        if out is not None:
            log.append(dict(kind="rpa", site=site, sigma=sigma(extra), ids=tuple(extra.get(node.PATCH_ID, ())),
                            changed=bool(out.abs().amax() > 0)))
        return out

    monkeypatch.setattr(node.DualContextPatch, "term", term)
    monkeypatch.setattr(node.ReferencePatch, "self_attention", sa)
    monkeypatch.setattr(node.ReferencePatch, "term", rterm)
    return log


def _cond(g, dim, pooled):
    pos = g.node("CITestRandomConditioning", tokens=8, dim=dim, pooled_dim=pooled, seed=1, scale=1.0)
    neg = g.node("CITestRandomConditioning", tokens=8, dim=dim, pooled_dim=pooled, seed=2, scale=1.0)
    return pos.out(0), neg.out(0)


# -- stage 1 ----------------------------------------------------------------------------------------------------
def _stage1(g, files, *, adapter="pa_sd15.safetensors", strength=1.0, start=0.0, end=1.0, steps=3, sdxl=None,
            size=128, rect=(32, 40, 48, 40), dual=True):
    vae = g.node("VAELoader", vae_name=files["vae"])
    if sdxl:
        model = g.node(sdxl[0], **sdxl[1]).out(0)
        pos, neg = _cond(g, 2048, 1280)
    else:
        model = g.node("CheckpointLoaderSimple", ckpt_name=files["ckpt"]).out(0)
        pos, neg = _cond(g, 768, 0)
    image = g.node("CITestNoiseImage", width=size, height=size, batch_size=1, seed=1)
    x, y, w, h = rect
    mask = g.node("CITestRectMask", width=size, height=size, x=x, y=y, w=w, h=h)
    cond = g.node("InpaintModelConditioning", positive=pos, negative=neg, vae=vae.out(0), pixels=image.out(0),
                  mask=mask.out(0), noise_mask=True)
    if dual:
        ad = g.node("ConsistentInpaintPatchAdapterLoader", adapter=adapter, dtype="float32")
        model = g.node("ConsistentInpaintApplyDualContext", model=model, patch_adapter=ad.out(0), mask=mask.out(0),
                       strength=strength, start_percent=start, end_percent=end).out(0)
    sampler = g.node("KSampler", model=model, seed=0, steps=steps, cfg=4.0, sampler_name="euler", scheduler="normal",
                     positive=cond.out(0), negative=cond.out(1), latent_image=cond.out(2), denoise=1.0)
    g.node("CITestCapture", value=sampler.out(0))
    return sampler


def test_dual_context_fires_in_every_adapted_layer_on_every_step_in_range(comfy, run_prompt, graph, files, calls):
    _stage1(graph, files, start=0.0, end=0.5, steps=4)
    run_prompt(graph)
    dca = [e for e in calls if e["kind"] == "dca"]
    sigmas = sorted({e["sigma"] for e in dca}, reverse=True)
    assert len(sigmas) == 2                                    # the first half of 4 steps, none after
    for s in sigmas:
        here = [e for e in dca if e["sigma"] == s]
        assert sorted(e["site"] for e in here) == sorted(files["sd15"])
        assert all(e["changed"] and e["rows"] == 2 and sorted(e["chunks"]) == [0, 1] for e in here)


def test_strength_zero_is_the_plain_model_and_strength_changes_the_result(comfy, run_prompt, graph, files):
    outs = {}
    for name, kw in {"plain": dict(dual=False), "zero": dict(strength=0.0), "on": dict(strength=1.0)}.items():
        g = comfy.graph()
        s = _stage1(g, files, **kw)
        outs[name] = run_prompt(g).output(s.id)["samples"]
    assert torch.equal(outs["plain"], outs["zero"])
    assert (outs["on"] - outs["plain"]).abs().max() > 1e-4


def test_dual_context_on_sdxl_inpaint(comfy, run_prompt, graph, files, calls, tiny_sdxl_inpaint):
    _stage1(graph, files, adapter="pa_sdxl.safetensors", sdxl=tiny_sdxl_inpaint, steps=2, size=64,
            rect=(16, 16, 24, 24))
    run_prompt(graph)
    dca = [e for e in calls if e["kind"] == "dca"]
    assert len({e["sigma"] for e in dca}) == 2
    assert {e["site"] for e in dca} == set(files["sdxl"]) and all(e["changed"] for e in dca)


@pytest.mark.parametrize("adapter, model, pattern", [
    ("pa_sdxl.safetensors", None, r"Apply Patch-Adapter Dual Context: expected a MODEL the Patch-Adapter fits: .*"
                                  r"in this SD1.5 model; the adapter does not fit this model \(the file says it is for "
                                  r"sdxl\)"),
    ("pa_sd15.safetensors", "sdxl", r"expected a MODEL the Patch-Adapter fits: .*in this SDXL model; the adapter "
                                    r"does not fit this model \(the file says it is for sd15\)"),
    ("pa_sd15_rpa_only.safetensors", None, r"Apply Patch-Adapter Dual Context: expected a Patch-Adapter with Dual "
                                           r"Context Adapter \(dca.\*\) weights; got .*only Reference Patch Adapter"),
    ("foreign.safetensors", None, r"Load Patch-Adapter: expected a Patch-Adapter file .*; got .*not a Patch-Adapter "
                                  r"file.*blocks\.0\.weight"),
])
def test_wrong_adapter_is_refused(comfy, run_prompt, graph, files, tiny_sdxl_inpaint, adapter, model, pattern):
    _stage1(graph, files, adapter=adapter, sdxl=tiny_sdxl_inpaint if model else None, size=64, rect=(8, 8, 16, 16))
    with pytest.raises(Exception, match=pattern):
        run_prompt(graph)


def test_empty_or_full_mask_is_refused_by_dual_context(comfy, run_prompt, files):
    for rect, pattern in (((0, 0, 0, 0), r"Dual Context: expected a mask with a hole to inpaint .*; got an empty mask"),
                          ((0, 0, 128, 128), r"Dual Context: expected a mask that leaves part of the image known; got "
                                             r"a mask that covers the whole image")):
        g = comfy.graph()
        _stage1(g, files, rect=rect)
        with pytest.raises(Exception, match=pattern):
            run_prompt(g)


# -- stage 2 ----------------------------------------------------------------------------------------------------
def _stage2(g, files, rect, *, size=SIZE, ref=(512, 512), patch=PATCH, overlap=OVERLAP, adapter=None, steps=2,
            batch=1, seed=0):
    vae = g.node("VAELoader", vae_name=files["vae"])
    model = g.node("CheckpointLoaderSimple", ckpt_name=files["ckpt"]).out(0)
    pos, neg = _cond(g, 768, 0)
    w, h = size if isinstance(size, tuple) else (size, size)
    image = g.node("CITestNoiseImage", width=w, height=h, batch_size=1, seed=1)
    reference = g.node("CITestNoiseImage", width=ref[0], height=ref[1], batch_size=1, seed=2)
    x, y, mw, mh = rect
    mask = g.node("CITestRectMask", width=w, height=h, x=x, y=y, w=mw, h=mh)
    kw = {}
    if adapter:
        kw["patch_adapter"] = g.node("ConsistentInpaintPatchAdapterLoader", adapter=adapter, dtype="float32").out(0)
    node = g.node("ConsistentInpaintHighResPatchRefine", model=model, vae=vae.out(0), positive=pos, negative=neg,
                  image=image.out(0), mask=mask.out(0), reference=reference.out(0), seed=seed, steps=steps, cfg=4.0,
                  sampler_name="euler", scheduler="normal", denoise=0.6, patch_size=patch, overlap=overlap,
                  patch_batch=batch, reference_context=1.5, **kw)
    g.node("CITestCapture", value=node.out(0))
    g.node("CITestCapture", value=node.out(1))
    g.node("CITestCapture", value=image.out(0))
    g.node("CITestCapture", value=mask.out(0))
    return node, image, mask


def _expected_patches(comfy, mask, patch=PATCH, overlap=OVERLAP):
    pa = _pack(comfy, "models.patch_adapter")
    return pa.plan_patches(mask[0], patch, overlap, 8).selected


def _check_reference_fired(calls, n_patches, sites, steps, *, rpa=False):
    by_patch = defaultdict(list)
    for e in calls:
        if e["kind"] in ("record", "read", "rpa"):
            by_patch[e["ids"]].append(e)
    assert sorted(by_patch) == [(i,) for i in range(n_patches)]
    for ids, log in by_patch.items():
        for kind in ("record", "read") + (("rpa",) if rpa else ()):
            per_sigma = defaultdict(list)
            for e in log:
                if e["kind"] == kind:
                    per_sigma[e["sigma"]].append(e["site"])
            assert len(per_sigma) == steps, (ids, kind, sorted(per_sigma))
            assert all(sorted(s) == sorted(sites) for s in per_sigma.values()), (ids, kind)
        reads = [e for e in log if e["kind"] == "read"]
        if rpa:
            assert all(e["added"] == 0 for e in reads) and all(e["changed"] for e in log if e["kind"] == "rpa")
        else:
            assert all(e["added"] > 0 for e in reads)          # keys/values extended by the reference tokens


@pytest.mark.parametrize("rect", [(900, 1000, 120, 100), (500, 400, 1000, 900)], ids=["small-mask", "large-mask"])
def test_highres_refine_at_2048(comfy, run_prompt, graph, files, calls, rect):
    node, image, mask = _stage2(graph, files, rect)
    res = run_prompt(graph)
    out, grid = res.output(node.id, 0), res.output(node.id, 1)
    img, m = res.output(image.id), res.output(mask.id)
    assert out.shape == img.shape == (1, SIZE, SIZE, 3)
    outside = m[0] == 0
    assert torch.equal(out[0][outside], img[0][outside])           # bit-identical outside the mask
    assert (out[0][~outside] - img[0][~outside]).abs().mean() > 1e-3
    n = len(_expected_patches(comfy, m))
    assert (n <= 4) if rect[2] < PATCH else (n >= 20)
    _check_reference_fired(calls, n, files["sd15"], steps=2)
    assert grid.shape[0] == 1 and max(grid.shape[1:3]) == 1024 and grid.shape[-1] == 3
    progress = [(e["value"], e["max"]) for e in res.events("progress") if e["node"] == node.id]
    assert progress[-1] == (2 * n, 2 * n)                                  # every step of every patch
    assert len({v for v, _ in progress}) == 2 * n


def test_highres_refine_sends_a_live_preview_per_step_like_ksampler(comfy, run_prompt, graph, files, monkeypatch):
    """With a preview method set (ComfyUI's --preview-method), every sampling step of every patch sends a preview
    image through the progress hook, as KSampler's latent_preview callback does; with none set, none is sent."""
    from comfy.cli_args import LatentPreviewMethod, args
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    node, image, mask = _stage2(graph, files, (100, 120, 300, 200), size=512, ref=(256, 256), steps=2)
    res = run_prompt(graph)
    n = len(_expected_patches(comfy, res.output(mask.id)))
    assert n >= 2
    progress = [e for e in res.events("progress") if e["node"] == node.id]
    previews = res.events("preview_image")
    assert len(previews) == len(progress) == 2 * n                       # one per step of every patch
    for fmt, picture, _ in previews:
        assert fmt == "JPEG" and picture.size == (PATCH // 8, PATCH // 8)   # the patch's latent, as RGB
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.NoPreviews)
    g = comfy.graph()
    _stage2(g, files, (100, 120, 300, 200), size=512, ref=(256, 256), steps=2, seed=1)
    assert not run_prompt(g).events("preview_image")


def test_reference_patch_adapter_weights_take_over(comfy, run_prompt, graph, files, calls):
    node, image, mask = _stage2(graph, files, (100, 120, 300, 200), size=1024, ref=(256, 256),
                                adapter="pa_sd15.safetensors")
    res = run_prompt(graph)
    n = len(_expected_patches(comfy, res.output(mask.id)))
    _check_reference_fired(calls, n, files["sd15"], steps=2, rpa=True)


def test_empty_mask_returns_the_image_without_sampling(comfy, run_prompt, graph, files, calls):
    node, image, mask = _stage2(graph, files, (0, 0, 0, 0))
    res = run_prompt(graph)
    assert torch.equal(res.output(node.id, 0), res.output(image.id))
    assert not calls
    assert res.seconds < 30


@pytest.mark.parametrize("rect", [(0, 0, 40, 30), (1000 - 37, 600 - 20, 37, 20), (0, 250, 1000, 40)],
                         ids=["top-left", "bottom-right", "left-to-right"])
def test_mask_touching_borders_on_an_unaligned_image(comfy, run_prompt, graph, files, calls, rect):
    node, image, mask = _stage2(graph, files, rect, size=(1000, 600), ref=(500, 300), patch=256, overlap=32,
                                steps=1)
    res = run_prompt(graph)
    out, img, m = res.output(node.id, 0), res.output(image.id), res.output(mask.id)
    assert out.shape == img.shape == (1, 600, 1000, 3)
    assert torch.equal(out[0][m[0] == 0], img[0][m[0] == 0])
    assert (out[0][m[0] > 0] - img[0][m[0] > 0]).abs().mean() > 1e-3


def test_patches_share_a_batch(comfy, run_prompt, graph, files, calls):
    node, image, mask = _stage2(graph, files, (200, 200, 700, 300), size=1024, ref=(256, 256), batch=3, steps=1)
    res = run_prompt(graph)
    reads = [e for e in calls if e["kind"] == "read"]
    n = len(_expected_patches(comfy, res.output(mask.id)))
    assert n >= 4
    assert {len(e["ids"]) for e in reads} == {3, n % 3 or 3} and max(e["rows"] for e in reads) == 6
    assert sorted({i for e in reads for i in e["ids"]}) == list(range(n))
    m = res.output(mask.id)
    assert torch.equal(res.output(node.id, 0)[0][m[0] == 0], res.output(image.id)[0][m[0] == 0])


@pytest.mark.parametrize("kw, pattern", [
    (dict(ref=(512, 256)), r"High-Res Patch Refine \(Patch-Adapter\): expected a reference with the aspect ratio of "
                           r"the 2048x2048 image .*; got a reference of 512x256"),
    (dict(patch=500), r"High-Res Patch Refine \(Patch-Adapter\): patch_size 500 is not a multiple of the VAE's "
                      r"latent factor 8"),
    (dict(overlap=256), r"\(ConsistentInpaintHighResPatchRefine\):\n.*expected overlap smaller than patch_size "
                        r"\(256\); got overlap 256"),
    (dict(overlap=60), r"High-Res Patch Refine \(Patch-Adapter\): overlap 60 is not a multiple"),
])
def test_bad_stage2_inputs(comfy, run_prompt, graph, files, kw, pattern):
    _stage2(graph, files, (900, 1000, 200, 150), **kw)
    with pytest.raises(Exception, match=pattern):
        run_prompt(graph)


def test_conditioning_is_cropped_to_each_patch(comfy, comfy_models):
    """ControlNet hints (a chain of two), area masks and areas are cut to the patch; the inpaint inputs are replaced."""
    from comfy.controlnet import load_controlnet
    refine = _pack(comfy, "nodes.patch_refine")
    pa = _pack(comfy, "models.patch_adapter")
    path = comfy.folder_paths.get_full_path_or_raise("controlnet", comfy_models.sd15_controlnet(levels=1))
    H, W = 512, 768
    hint = torch.arange(H * W, dtype=torch.float32).reshape(1, 1, H, W).expand(1, 3, H, W) / (H * W)
    first = load_controlnet(path).copy().set_cond_hint(hint[..., ::2, ::2], 0.7)     # half-size hint
    second = load_controlnet(path).copy().set_cond_hint(hint, 0.5)
    second.set_previous_controlnet(first)
    area_mask = torch.zeros(1, H // 4, W // 4)
    area_mask[:, 10:20, 30:40] = 1
    cond = [[torch.zeros(1, 77, 768), {"control": second, "mask": area_mask, "concat_latent_image": torch.ones(1)}],
            [torch.ones(1, 77, 768), {"area": (16, 16, 0, 0)}]]                      # 128x128 px at the top left
    box = pa.PatchBox(128, 256, 256, 256)
    out = refine.crop_conditioning(cond, [box], H, W, 8, {"concat_mask": torch.zeros(1)})
    assert len(out) == 1                                                   # the area entry misses this patch
    d = out[0][1]
    assert "concat_latent_image" not in d and "concat_mask" in d
    assert torch.equal(d["control"].cond_hint_original, hint[..., 128:384, 256:512])
    assert d["control"].strength == 0.5 and d["control"].previous_controlnet.strength == 0.7
    assert torch.equal(d["control"].previous_controlnet.cond_hint_original, hint[..., ::2, ::2][..., 64:192, 128:256])
    assert torch.equal(d["mask"], area_mask[:, 32:96, 64:128])
    assert second.cond_hint_original.shape[-1] == W and cond[0][1]["mask"] is area_mask      # inputs untouched
    top_left = refine.crop_conditioning(cond, [pa.PatchBox(64, 64, 256, 256)], H, W, 8, None)
    assert top_left[1][1]["area"] == (8, 8, 0, 0)                         # the part of the area inside the patch
