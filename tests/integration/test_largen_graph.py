"""LAR-Gen inside real ComfyUI: a checkpoint in the authors' layout (``{"model": …}`` pickle, ``model.diffusion_model.``
9-channel SDXL-structured UNet with to_k_ip/to_v_ip, ``ref_*`` RefineNet, ``conditioner.`` projector) at 64 channels
and two levels, an IP-Adapter-Plus file, and a shallow CLIP vision model of ComfyUI's own class, through
InpaintModelConditioning + KSampler.

Counters wrap the attention patches on the final MODEL (test-only node ``CITestLARGenCounter``) and record, per
model call, which sites the subject attention changed and how many RefineNet tokens each decoder self-attention
received."""
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

import largen_layouts as L
from test_branch_graph import SDXL_UNET, _unet_shapes

CLIP_W = 128                  # the shallow CLIP vision width (ViT-H's is 1280); the resampler reads this width
SITES = [("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)]
DECODER = [("output", 0, 0), ("output", 1, 0)]
CKPT, IP = "largen_test.pth", "ip_plus_test.bin"


@pytest.fixture(scope="module")
def largen_files(comfy):
    d = comfy.models_dir / "largen"
    d.mkdir(parents=True, exist_ok=True)
    res = dict(embedding_dim=CLIP_W)
    torch.save({"model": L.largen_checkpoint(refinenet=True, conditioner=True, vae=True, clip_width=CLIP_W,
                                             resampler=res)}, d / CKPT)
    torch.save(L.image_proj(**res), d / IP)
    torch.save(L.image_proj(output_dim=768, **res), d / "ip_plus_sd15_test.bin")
    torch.save({"model": L.largen_checkpoint(drop_ip=99)}, d / "sdxl_inpaint_plain_test.pth")
    torch.save({"model": L.largen_checkpoint()}, d / "largen_no_refinenet_test.pth")
    # a RefineNet on its own, in the pack's file format: ref_* + patch_projector.* (the same tensors as above)
    full = L.largen_checkpoint(refinenet=True, conditioner=True, clip_width=CLIP_W, resampler=res)
    own = {k[len("model.diffusion_model."):]: v for k, v in full.items() if k.startswith("model.diffusion_model.ref_")}
    own.update({k.split("embedders.5.")[1]: v for k, v in full.items() if ".patch_projector." in k})
    save_file(own, str(d / "refinenet_test.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()


def test_writer_uses_comfyui_unet_names(comfy):
    """The test checkpoint's UNet names are ComfyUI's (so the layout under test is the real one)."""
    ours = L.sgm_unet_shapes(in_channels=9, **L.SMALL)
    assert ours == _unet_shapes(SDXL_UNET, 9)
    assert L.sgm_unet_shapes(in_channels=4, with_out=False, **L.SMALL) == {
        k: v for k, v in _unet_shapes(SDXL_UNET, 4).items() if not k.startswith("out.")}


@pytest.fixture(scope="module")
def clip_vision_node(comfy, tmp_path_factory):
    """CITestClipVision: ComfyUI's ClipVisionModel (CLIP ViT, 224², patch 14) with ``width`` and two layers."""
    import comfy.clip_vision as cv
    root = tmp_path_factory.mktemp("clipvision")

    class CITestClipVision:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"width": ("INT", {"default": CLIP_W}), "seed": ("INT", {"default": 0})}}
        RETURN_TYPES = ("CLIP_VISION",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, width, seed):
            cfg = dict(json.loads((comfy.path / "comfy" / "clip_vision_config_h.json").read_text()),
                       hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64,
                       num_hidden_layers=2, projection_dim=64)
            path = root / f"vit_{width}.json"
            path.write_text(json.dumps(cfg))
            model = cv.ClipVisionModel(str(path))
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in model.model.named_parameters():
                    p.copy_(1 + 0.02 * torch.randn(p.shape, generator=g) if "norm" in name and "weight" in name
                            else 0.02 * torch.randn(p.shape, generator=g))
            return (model,)

    comfy.nodes.NODE_CLASS_MAPPINGS["CITestClipVision"] = CITestClipVision
    return "CITestClipVision"


@pytest.fixture(scope="module")
def counter(comfy, model_node):
    """CITestLARGenCounter: wraps every attn2 replace and attn1 patch of MODEL and logs per call."""
    from comfy.ldm.modules.attention import optimized_attention
    log = []

    def sigma(extra):
        s = extra.get("sigmas")
        return None if s is None else round(float(s.max()), 4)

    def patch(m):
        to = m.model_options["transformer_options"]
        replaces = to.get("patches_replace", {}).get("attn2", {})

        def wrap_replace(site, fn):
            def w(q, k, v, extra):
                out = fn(q, k, v, extra)
                plain = optimized_attention(q, k, v, extra["n_heads"])
                diff = (out - plain).abs().amax(-1).cpu()                    # [rows, tokens]
                log.append(dict(kind="subject", site=site, sigma=sigma(extra), diff=diff,
                                shape=tuple(extra["original_shape"]), chunks=list(extra["cond_or_uncond"])))
                return out
            return w

        for site, fn in list(replaces.items()):
            m.set_model_attn2_replace(wrap_replace(site, fn), *site)

        def wrap_attn1(fn):
            def w(n, ctx, val, extra):
                n2, ctx2, val2 = fn(n, ctx, val, extra)
                site = (*extra["block"], extra.get("block_index", 0))
                log.append(dict(kind="refine", site=site, sigma=sigma(extra), added=ctx2.shape[1] - ctx.shape[1],
                                rows=n.shape[0]))
                return n2, ctx2, val2
            return w

        patches = to.get("patches", {})
        patches["attn1_patch"] = [wrap_attn1(f) for f in patches.get("attn1_patch", [])]
        for models in m.additional_models.values():
            for p in models:
                if not getattr(p.model, "_ci_hooked", False):
                    p.model.register_forward_pre_hook(
                        lambda mod, args: log.append(dict(kind="refinenet", rows=args[0].shape[0],
                                                          t=float(args[1][0]))))
                    p.model._ci_hooked = True
        return m

    model_node("CITestLARGenCounter", patch)
    return log


@pytest.fixture(scope="module")
def vae_name(comfy_models):
    return comfy_models.sd15_vae()          # the SDXL VAE has the same architecture


def _graph(g, vae_name, *, subject=True, refine=False, weight=1.0, start=0.0, end=1.0, steps=2, cfg=4.0, batch=1,
           subject_batch=1, attn_mask=None, counter=True, ckpt=CKPT, ip=IP, clip_width=CLIP_W, foreign=False,
           refinenet=CKPT, subject_size=(48, 40), subject_node=None, dtype="float32"):
    loader = g.node("ConsistentInpaintLARGenLoader", checkpoint=ckpt, image_proj=ip, dtype=dtype)
    cv = g.node("CITestClipVision", width=clip_width, seed=0)
    subj = subject_node or g.node("CITestNoiseImage", width=subject_size[0], height=subject_size[1],
                                  batch_size=subject_batch, seed=5).out(0)
    vae = g.node("VAELoader", vae_name=vae_name)
    model = loader.out(0)
    if foreign:
        model = g.node("CITestForeignReplace", model=model).out(0)
    if subject:
        kw = {} if attn_mask is None else {"attn_mask": attn_mask}
        model = g.node("ConsistentInpaintApplySubjectAttention", model=model, subject_adapter=loader.out(1),
                       clip_vision=cv.out(0), subject_image=subj, weight=weight, start_percent=start,
                       end_percent=end, **kw).out(0)
    if refine:
        rn = g.node("ConsistentInpaintRefineNetLoader", checkpoint=refinenet, dtype=dtype)
        model = g.node("ConsistentInpaintApplyRefineNet", model=model, refinenet=rn.out(0), vae=vae.out(0),
                       clip_vision=cv.out(0), subject_image=subj, start_percent=start, end_percent=end,
                       subject_resolution=64, seed=0).out(0)
    if counter:
        model = g.node("CITestLARGenCounter", model=model).out(0)
    pos = g.node("CITestRandomConditioning", tokens=8, dim=2048, pooled_dim=1280, seed=1, scale=1.0)
    neg = g.node("CITestRandomConditioning", tokens=8, dim=2048, pooled_dim=1280, seed=2, scale=1.0)
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=batch, seed=1)
    mask = g.node("CITestRectMask", width=64, height=64, x=16, y=8, w=24, h=40)
    cond = g.node("InpaintModelConditioning", positive=pos.out(0), negative=neg.out(0), vae=vae.out(0),
                  pixels=image.out(0), mask=mask.out(0), noise_mask=True)
    sampler = g.node("KSampler", model=model, seed=0, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
                     positive=cond.out(0), negative=cond.out(1), latent_image=cond.out(2), denoise=1.0)
    g.node("CITestCapture", value=sampler.out(0))
    return dict(sampler=sampler, loader=loader, cond=cond)


def _sigmas(log):
    return sorted({e["sigma"] for e in log if e.get("sigma") is not None}, reverse=True)


def test_subject_attention_fires_in_every_cross_attention_on_every_step_in_range(
        comfy, run_prompt, graph, largen_files, clip_vision_node, counter, vae_name):
    counter.clear()
    _graph(graph, vae_name, start=0.0, end=0.5, steps=4)
    run_prompt(graph)
    subject = [e for e in counter if e["kind"] == "subject"]
    sigmas = _sigmas(subject)
    assert len(sigmas) == 4
    for s in sigmas:
        calls = [e for e in subject if e["sigma"] == s]
        assert sorted(e["site"] for e in calls) == sorted(SITES)            # all 70 (here 4) layers, every step
        for e in calls:
            assert e["chunks"] == [1, 0] and e["diff"].shape[0] == 2
            acted = [bool(e["diff"][r].max() > 0) for r in range(2)]
            # inside the range both rows get their image term: the subject (positive), the zero image (negative)
            assert acted == ([True, True] if s in sigmas[:2] else [False, False])


def test_weight_zero_is_the_plain_model_and_weight_changes_the_result(
        comfy, run_prompt, graph, largen_files, clip_vision_node, vae_name):
    off = _graph(graph, vae_name, weight=0.0, counter=False)
    plain = _graph(graph, vae_name, subject=False, counter=False)
    on = _graph(graph, vae_name, weight=1.0, counter=False)
    r = run_prompt(graph)
    a, b, c = (r.output(n["sampler"].id, 0)["samples"] for n in (off, plain, on))
    assert torch.equal(a, b)
    assert not torch.allclose(c, b)
    assert r.output(on["cond"].id, 2)["samples"].shape == (1, 4, 8, 8)


@pytest.fixture(scope="module")
def foreign_replace(comfy, model_node):
    """CITestForeignReplace: an attn2 replace at every cross-attention, as IPAdapter nodes install (a callable
    object that computes the attention itself and adds its own term)."""
    from comfy.ldm.modules.attention import optimized_attention
    calls = []

    class Foreign:
        def __init__(self, site):
            self.site = site

        def __call__(self, q, k, v, extra):
            calls.append(self.site)
            out = optimized_attention(q, k, v, extra["n_heads"])
            return out + 0.5 * optimized_attention(q, k.flip(1), v.flip(1) * 2, extra["n_heads"])

    def patch(m):
        for site in SITES:
            m.set_model_attn2_replace(Foreign(site), *site)
        return m

    model_node("CITestForeignReplace", patch)
    return calls


def test_composes_with_an_attn2_replace_already_on_the_model(
        comfy, run_prompt, graph, largen_files, clip_vision_node, counter, foreign_replace, vae_name):
    foreign_replace.clear(), counter.clear()
    both = _graph(graph, vae_name, foreign=True, steps=2)
    r = run_prompt(graph)
    assert sorted(set(foreign_replace)) == sorted(SITES) and len(foreign_replace) == 2 * len(SITES)
    subject = [e for e in counter if e["kind"] == "subject"]
    assert len(subject) == 2 * len(SITES) and all(e["diff"].max() > 0 for e in subject)
    g2 = comfy.graph()
    only_foreign = _graph(g2, vae_name, foreign=True, subject=False, counter=False)
    only_subject = _graph(g2, vae_name, counter=False)
    r2 = run_prompt(g2)
    x = r.output(both["sampler"].id, 0)["samples"]
    assert not torch.allclose(x, r2.output(only_foreign["sampler"].id, 0)["samples"])
    assert not torch.allclose(x, r2.output(only_subject["sampler"].id, 0)["samples"])


def test_attn_mask_confines_the_subject(comfy, run_prompt, graph, largen_files, clip_vision_node, counter, vae_name):
    from models.sites import latent_grid
    counter.clear()
    left = graph.node("CITestRectMask", width=64, height=64, x=0, y=0, w=32, h=64)
    _graph(graph, vae_name, attn_mask=left.out(0), steps=1)
    run_prompt(graph)
    for e in (e for e in counter if e["kind"] == "subject"):
        h, w = latent_grid(e["diff"].shape[1], e["shape"][-2], e["shape"][-1])
        grid = e["diff"].reshape(-1, h, w)
        assert torch.all(grid[..., w // 2:] == 0), e["site"]               # right half: the text attention alone
        assert torch.all(grid[..., :w // 2] > 0), e["site"]


def test_batch_of_two_with_one_subject_each(comfy, run_prompt, graph, largen_files, clip_vision_node, counter,
                                            vae_name):
    counter.clear()
    n = _graph(graph, vae_name, batch=2, subject_batch=2, steps=1)
    out = run_prompt(graph).output(n["sampler"].id, 0)["samples"]
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert all(e["diff"].shape[0] == 4 for e in counter if e["kind"] == "subject")


@pytest.mark.parametrize("case,match", [
    ("subject_batch", r"Apply LAR-Gen Subject Attention: expected one subject image, or one per latent of the "
                      r"batch \(2\); got 3 subject images"),
    ("clip_width", r"expected a CLIP vision model with 128-wide features .*; got one with 96-wide features"),
    ("plain_sdxl", r"Load LAR-Gen: expected a LAR-Gen checkpoint.*SDXL inpainting UNet without LAR-Gen's subject "
                   r"projections"),
    ("sd15_resampler", r"Load LAR-Gen: expected .*768-wide subject tokens .an SD1.5 IP-Adapter-Plus."),
    ("empty_attn_mask", r"expected an attn_mask that marks where the subject acts; got an empty attn_mask"),
    ("no_refinenet", r"Load LAR-Gen RefineNet: expected a LAR-Gen RefineNet .*holds no RefineNet"),
    ("start_end", r"\(ConsistentInpaintApplySubjectAttention\):\n.*expected start_percent <= end_percent; got "
                  r"start_percent 0.6 > end_percent 0.5"),
])
def test_bad_inputs_give_clear_errors(comfy, run_prompt, graph, largen_files, clip_vision_node, vae_name, case, match):
    kw = {}
    if case == "subject_batch":
        kw = dict(batch=2, subject_batch=3)
    elif case == "clip_width":
        kw = dict(clip_width=96)
    elif case == "plain_sdxl":
        kw = dict(ckpt="sdxl_inpaint_plain_test.pth")
    elif case == "sd15_resampler":
        kw = dict(ip="ip_plus_sd15_test.bin")
    elif case == "empty_attn_mask":
        kw = dict(attn_mask=graph.node("SolidMask", value=0.0, width=64, height=64).out(0))
    elif case == "no_refinenet":
        kw = dict(refine=True, subject=False, refinenet="largen_no_refinenet_test.pth")
    elif case == "start_end":
        kw = dict(start=0.6, end=0.5)
    _graph(graph, vae_name, counter=False, steps=1, **kw)
    with pytest.raises(comfy.PromptError, match=match):
        run_prompt(graph)


def test_subject_images_of_any_size_or_with_alpha(comfy, run_prompt, graph, largen_files, clip_vision_node, vae_name):
    odd = _graph(graph, vae_name, counter=False, steps=1, subject_size=(37, 91))
    # RGBA: alpha cuts the subject out (background to white), so the result differs from the opaque image's
    rgb = graph.node("CITestNoiseImage", width=64, height=48, batch_size=1, seed=5)
    cut = graph.node("CITestRectMask", width=64, height=48, x=8, y=8, w=20, h=20)
    rgba = graph.node("JoinImageWithAlpha", image=rgb.out(0), alpha=graph.node("InvertMask", mask=cut.out(0)).out(0))
    with_alpha = _graph(graph, vae_name, counter=False, steps=1, subject_node=rgba.out(0))
    opaque = _graph(graph, vae_name, counter=False, steps=1, subject_node=rgb.out(0))
    r = run_prompt(graph)
    x, y = (r.output(n["sampler"].id, 0)["samples"] for n in (with_alpha, opaque))
    assert torch.isfinite(r.output(odd["sampler"].id, 0)["samples"]).all() and torch.isfinite(x).all()
    assert not torch.allclose(x, y)


def test_refinenet_runs_once_per_step_and_feeds_every_decoder_self_attention(
        comfy, run_prompt, graph, largen_files, clip_vision_node, counter, vae_name):
    counter.clear()
    _graph(graph, vae_name, subject=False, refine=True, start=0.0, end=0.5, steps=4)
    run_prompt(graph)
    refine = [e for e in counter if e["kind"] == "refine"]
    sigmas = _sigmas(refine)
    assert len(sigmas) == 4
    for s in sigmas:
        calls = [e for e in refine if e["sigma"] == s and e["site"][0] == "output"]
        assert sorted(e["site"] for e in calls) == DECODER
        # inside the range each decoder self-attention gets the RefineNet's tokens (8x8 latent: 4x4 = 16 at level 1)
        assert all(e["added"] == (16 if s in sigmas[:2] else 0) and e["rows"] == 2 for e in calls)
    assert not any(e["added"] for e in refine if e["site"][0] != "output")
    runs = [e for e in counter if e["kind"] == "refinenet"]
    assert len(runs) == 2 and all(e["rows"] == 1 for e in runs)          # once per step in range, one subject row


def test_refinenet_context_projected_once_per_run(comfy, run_prompt, graph, largen_files, clip_vision_node,
                                                  vae_name, monkeypatch):
    """The RefineNet's 257-token context is the same on every step: its cross-attention keys/values are projected
    once per sampling run, not once per step."""
    cls = sys.modules[f"{comfy.pack_module.__name__}.nodes.branch_unet"].RefineNet
    calls = []
    original = cls.context_kv
    monkeypatch.setattr(cls, "context_kv", lambda self, c: calls.append(c.shape) or original(self, c))
    _graph(graph, vae_name, subject=False, refine=True, steps=4, counter=False)
    run_prompt(graph)
    assert len(calls) == 1


def test_refinenet_tokens_equal_comfyui_unet_run_plainly(comfy):
    """RefineNet.forward (kept cross-attention keys/values, stopping after the last decoder transformer) hands
    over the same decoder self-attention inputs as ComfyUI's own UNetModel with the same weights, run the plain
    way (context through every to_k / to_v, all blocks)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ops import manual_cast
    cls = sys.modules[f"{comfy.pack_module.__name__}.nodes.branch_unet"].RefineNet
    cfg = dict(SDXL_UNET, in_channels=4)
    torch.manual_seed(0)
    net = cls(cfg, CLIP_W, operations=manual_cast).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    plain = UNetModel(**cfg, operations=manual_cast).eval()
    missing, unexpected = plain.load_state_dict(
        {k: v for k, v in net.state_dict().items() if not k.startswith("projector.")}, strict=False)
    assert unexpected == [] and all(k.startswith("out.") for k in missing)
    seen = {}

    def capture(n, c, v, extra):
        if extra["block"][0] == "output":
            seen[(*extra["block"], extra.get("block_index", 0))] = n
        return n, c, v

    x, t = torch.randn(2, 4, 16, 12), torch.tensor([700.0, 700.0])
    context, y = torch.randn(2, 257, 2048), torch.randn(2, 2816)
    with torch.no_grad():
        plain(x, t, context, y, transformer_options={"patches": {"attn1_patch": [capture]}})
        ours = net(x, t, context, y, {})
        kept = net(x, t, context, y, {}, net.context_kv(context))
    assert sorted(ours) == sorted(seen) == sorted(net.sites) and len(seen) >= 2
    for site in seen:
        torch.testing.assert_close(ours[site], seen[site], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept[site], ours[site], rtol=0, atol=0)


def test_refinenet_once_per_step_when_rows_run_in_separate_calls(
        comfy, run_prompt, largen_files, clip_vision_node, counter, vae_name, monkeypatch):
    def run():
        g = comfy.graph()
        n = _graph(g, vae_name, subject=False, refine=True, steps=3)
        counter.clear()
        return run_prompt(g).output(n["sampler"].id, 0)["samples"]

    batched = run()
    assert len([e for e in counter if e["kind"] == "refinenet"]) == 3
    real = comfy.model_management.get_free_memory
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: real(dev, torch_free_too) if torch_free_too else 1)
    separate = run()
    rows = {e["rows"] for e in counter if e["kind"] == "refine"}
    assert rows == {1}                                                    # the model was called once per row
    assert len([e for e in counter if e["kind"] == "refinenet"]) == 3     # the RefineNet still once per step
    torch.testing.assert_close(separate, batched, atol=2e-3, rtol=1e-2)


def test_refinenet_file_of_our_format_equals_the_checkpoint_copy(
        comfy, run_prompt, graph, largen_files, clip_vision_node, vae_name):
    loaders = [graph.node("ConsistentInpaintRefineNetLoader", checkpoint=name, dtype="float32")
               for name in (CKPT, "refinenet_test.safetensors")]
    for n in loaders:
        graph.node("CITestCapture", value=n.out(0))
    a = _graph(graph, vae_name, subject=False, refine=True, counter=False)
    b = _graph(graph, vae_name, subject=False, refine=True, counter=False, refinenet="refinenet_test.safetensors")
    plain = _graph(graph, vae_name, subject=False, counter=False)
    r = run_prompt(graph)
    one, two = (r.output(n.id, 0).net.state_dict() for n in loaders)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert "projector.weight" in one and one["input_blocks.0.0.weight"].shape[1] == 4
    x, y, z = (r.output(n["sampler"].id, 0)["samples"] for n in (a, b, plain))
    # same weights; the float32 sums differ in the last bits between a memory-mapped pickle and a safetensors
    # load, and four random-weight steps with CFG amplify that
    torch.testing.assert_close(x, y, atol=1e-2, rtol=0)
    assert (x - z).abs().max() > 10 * (x - y).abs().max()


def test_loaded_model_is_a_native_sdxl_inpaint_model(comfy, run_prompt, graph, largen_files):
    loader = graph.node("ConsistentInpaintLARGenLoader", checkpoint=CKPT, image_proj=IP, dtype="float32")
    graph.node("CITestCapture", value=loader.out(0))
    graph.node("CITestCapture", value=loader.out(1))
    r = run_prompt(graph)
    model, adapter = r.output(loader.id, 0), r.output(loader.id, 1)
    base = model.model
    assert type(base).__name__ == "SDXL" and base.concat_keys == ("mask", "masked_image")
    assert base.diffusion_model.input_blocks[0][0].weight.shape[1] == 9
    norms = [m.norm.eps for m in base.diffusion_model.modules() if type(m).__name__ == "SpatialTransformer"]
    assert norms and set(norms) == {1e-5}
    assert sorted(adapter.channels) == sorted(SITES)
    ck = torch.load(comfy.models_dir / "largen" / CKPT, weights_only=True)["model"]
    w = ck["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k_ip.weight"]
    assert torch.equal(adapter.patcher.model.to_k_ip["middle_0_0"].weight, w)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights(comfy, run_prompt, graph, largen_files, clip_vision_node, counter, vae_name, dtype):
    """The 16-bit paths (on the CPU ComfyUI computes in float32 from 16-bit weights; a GPU computes in 16 bit):
    subject attention and RefineNet both act, the result is finite and near the float32 one (random weights and
    CFG amplify the rounding, hence a relative bound)."""
    counter.clear()
    half = _graph(graph, vae_name, refine=True, dtype=dtype, steps=2)
    full = _graph(graph, vae_name, refine=True, counter=False, steps=2)
    r = run_prompt(graph)
    a, b = (r.output(n["sampler"].id, 0)["samples"] for n in (half, full))
    assert torch.isfinite(a).all()
    assert any(e["kind"] == "subject" and e["diff"].max() > 0 for e in counter)
    assert any(e["kind"] == "refine" and e["added"] > 0 for e in counter)
    assert len([e for e in counter if e["kind"] == "refinenet"]) == 2
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < 0.05, rel           # 16-bit weights really used, and the result stays that of float32
