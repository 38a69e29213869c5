"""Inpaint branches inside real ComfyUI: BrushNet / PowerPaint-v2 files in the published diffusers layout and a
PainterNet file in our format drive a shallow SD1.5 UNet (two levels, so an upsampler sits inside an output
block) through ApplyBranch + KSampler.

Counters wrap every patch the branch registered (test-only node ``CITestBranchCounter``) and record, per model
call, which injection sites changed the UNet's features.
"""
import re
from collections import defaultdict

import pytest
import torch
from safetensors.torch import save_file

import branch_layouts as published

LEVELS = 2
CHANNELS = (320, 640)            # the shallow harness UNet: model_channels 320, channel_mult [1, 2]


@pytest.fixture(scope="module")
def unet_ckpt(comfy_models):
    return comfy_models.sd15_inpaint_checkpoint(levels=LEVELS)


SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 2],
                 num_res_blocks=[1, 1], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                 transformer_depth_middle=1, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
                 use_linear_in_transformer=True, num_head_channels=64, num_heads=-1, use_spatial_transformer=True,
                 legacy=False, use_temporal_attention=False)


def _unet_shapes(config, in_channels):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    m = UNetModel(**dict(config, in_channels=in_channels), device="meta", operations=comfy.ops.disable_weight_init)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _painternet_from_unet(shapes, seed=5):
    """Our PainterNet format for a UNet: its own layer shapes (minus ``out``), 9 input channels, a zero conv
    per layer output and a control-point linear per cross-attention, all random (non-zero)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items() if not k.startswith("out.")}

    def out_channels(prefix):
        keys = [k for k in shapes if k.startswith(prefix) and k.endswith(".weight") and len(shapes[k]) == 4]
        return shapes[max(keys, key=lambda k: [int(x) if x.isdigit() else x for x in re.split(r"[.]", k)])][0]

    n_in = len({k.split(".")[1] for k in shapes if k.startswith("input_blocks.")})
    n_out = len({k.split(".")[1] for k in shapes if k.startswith("output_blocks.")})
    for k in range(n_in):
        c = out_channels(f"input_blocks.{k}.")
        sd[f"zero_down.{k}.weight"], sd[f"zero_down.{k}.bias"] = torch.randn(c, c, 1, 1, generator=g) * 0.02, torch.zeros(c)
    c = shapes["middle_block.2.out_layers.3.weight"][0]
    sd["zero_mid.weight"], sd["zero_mid.bias"] = torch.randn(c, c, 1, 1, generator=g) * 0.02, torch.zeros(c)
    j = 0
    for n in range(n_out):
        c = shapes[f"output_blocks.{n}.0.out_layers.3.weight"][0]
        ups = 2 if any(k.startswith(f"output_blocks.{n}.") and k.endswith(".conv.weight") for k in shapes) else 1
        for _ in range(ups):                               # before the upsampler, then after the block
            sd[f"zero_up.{j}.weight"], sd[f"zero_up.{j}.bias"] = torch.randn(c, c, 1, 1, generator=g) * 0.02, torch.zeros(c)
            j += 1
    order = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
    sites = sorted((k for k in shapes if k.endswith(".attn2.to_q.weight")),
                   key=lambda k: (order[k.split(".")[0]], *(int(x) for x in re.findall(r"\d+", k))))
    for n, k in enumerate(sites):
        c = shapes[k][0]
        sd[f"zero_attn.{n}.weight"], sd[f"zero_attn.{n}.bias"] = torch.randn(c, c, generator=g) * 0.02, torch.zeros(c)
    return sd, len(sites), n_in, j


@pytest.fixture(scope="module")
def branch_files(comfy, comfy_models):
    d = comfy.models_dir / "inpaint_branch"
    d.mkdir(parents=True, exist_ok=True)
    save_file(published.diffusers_branch(CHANNELS, None, False, None, (False,) * LEVELS, False, (False,) * LEVELS,
                                         layers=1, seed=1), str(d / "brushnet_sd15_test.safetensors"))
    save_file(published.diffusers_branch(CHANNELS, 768, False, None, (True,) * LEVELS, True, (True,) * LEVELS,
                                         layers=1, seed=2), str(d / "powerpaint_test.safetensors"))
    sd, n_acp, n_in, n_up = _painternet_from_unet(comfy_models._sd15_unet_shapes(LEVELS, 9))
    save_file(sd, str(d / "painternet_sd15_test.safetensors"), metadata=published.painternet_metadata("sd15"))
    # SDXL-structured: BrushNet SDXL (add_embedding 2816, no attention) and PainterNet SDXL for the tiny SDXL UNet
    save_file(published.diffusers_branch((64, 128), None, False, 2816, (False,) * 2, False, (False,) * 2,
                                         layers=1, seed=3), str(d / "brushnet_sdxl_test.safetensors"))
    xl, n_acp_xl, _, _ = _painternet_from_unet(_unet_shapes(SDXL_UNET, 9), seed=6)
    save_file(xl, str(d / "painternet_sdxl_test.safetensors"), metadata=published.painternet_metadata("sdxl"))
    comfy.folder_paths.filename_list_cache.clear()
    return dict(n_acp=n_acp, n_down=n_in, n_up=n_up, n_acp_xl=n_acp_xl)


@pytest.fixture(scope="module")
def tiny_sdxl(comfy):
    """CITestTinySDXL: a real comfy SDXL model object (model_base.SDXL: label_emb/adm, linear transformers,
    context 2048) at 64 channels and two levels with random weights. ComfyUI's checkpoint detection only
    accepts the full-depth SDXL UNet, so the test builds the model object directly."""
    from comfy import model_management as mm, model_patcher, supported_models

    class CITestTinySDXL:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0})},
                    "optional": {"in_channels": ("INT", {"default": 4})}}
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, seed, in_channels=4):
            cfg = supported_models.SDXL(dict(SDXL_UNET, in_channels=in_channels))     # 9: an inpaint model
            model = cfg.get_model({})
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.diffusion_model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            return (model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device()),)

    comfy.nodes.NODE_CLASS_MAPPINGS["CITestTinySDXL"] = CITestTinySDXL
    return "CITestTinySDXL"


@pytest.fixture(scope="module")
def counter(comfy, model_node):
    """CITestBranchCounter: clones MODEL, wraps every patch function registered on it, and logs per call
    (sigma, patch name, site, whether the features changed); it also adds its own attn2_output_patch, as
    another node pack would, and logs the branch network's input batch size."""
    log = []

    def patch(m):
        patches = m.model_options["transformer_options"].get("patches", {})

        def sigma(to):
            s = to.get("sigmas")
            return None if s is None else round(float(s.max()), 4)

        def wrap_block(name, fn):
            def w(h, to):
                out = fn(h, to)
                log.append(("patch", name, to["block"], sigma(to), not torch.equal(out, h)))
                return out
            return w

        def wrap_output(fn):
            def w(h, hsp, to):
                out, hsp2 = fn(h, hsp, to)
                log.append(("patch", "output_block_patch", to["block"], sigma(to), not torch.equal(out, h)))
                return out, hsp2
            return w

        def wrap_attn(fn):
            def w(n, extra):
                out = fn(n, extra)
                site = (*extra["block"], extra.get("block_index", 0))
                log.append(("patch", "attn2_output_patch", site, sigma(extra), not torch.equal(out, n)))
                return out
            return w

        def wrap_fte(handler):
            def w(layer, x, *args, **kw):
                out = handler(layer, x, *args, **kw)
                log.append(("patch", "adder", layer.index, sigma(args[2]), not torch.equal(out, x)))
                return out
            return w

        for name in ("input_block_patch", "input_block_patch_after_skip"):
            patches[name] = [wrap_block(name, f) for f in patches.get(name, [])]
        patches["output_block_patch"] = [wrap_output(f) for f in patches.get("output_block_patch", [])]
        patches["attn2_output_patch"] = [wrap_attn(f) for f in patches.get("attn2_output_patch", [])]
        patches["forward_timestep_embed_patch"] = [(c, wrap_fte(h)) for c, h in
                                                   patches.get("forward_timestep_embed_patch", [])]

        def other_pack(n, extra):       # an unrelated attn2 patch: must keep firing beside the branch
            log.append(("other", "attn2_output_patch", extra["block"], sigma(extra), False))
            return n
        m.set_model_attn2_output_patch(other_pack)
        for models in m.additional_models.values():
            for p in models:
                if not getattr(p.model, "_ci_hooked", False):
                    p.model.register_forward_pre_hook(
                        lambda mod, args: log.append(("branch", "forward", tuple(args[0].shape), None, True)))
                    p.model._ci_hooked = True
        return m

    model_node("CITestBranchCounter", patch)
    return log


def _graph(g, ckpt, branch, *, scale=1.0, start=0.0, end=1.0, steps=2, cfg=3.0, counter=True, batch=1,
           mask_rect=(16, 8, 24, 40), sdxl=False):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=batch, seed=1)
    x, y, w, h = mask_rect
    mask = g.node("CITestRectMask", width=64, height=64, x=x, y=y, w=w, h=h)
    if sdxl:
        base = g.node("CITestTinySDXL", seed=0)
        pos = g.node("CITestRandomConditioning", tokens=8, dim=2048, pooled_dim=1280, seed=1, scale=1.0)
        neg = g.node("CITestRandomConditioning", tokens=8, dim=2048, pooled_dim=1280, seed=2, scale=1.0)
    else:
        base = ck
        pos = g.node("CLIPTextEncode", text="a red apple", clip=ck.out(1))
        neg = g.node("CLIPTextEncode", text="", clip=ck.out(1))
    loader = g.node("ConsistentInpaintBranchLoader", branch=branch, dtype="float32")
    apply = g.node("ConsistentInpaintApplyBranch", model=base.out(0), vae=ck.out(2), image=image.out(0),
                   mask=mask.out(0), branch=loader.out(0), positive=pos.out(0), negative=neg.out(0), scale=scale,
                   start_percent=start, end_percent=end)
    model = g.node("CITestBranchCounter", model=apply.out(0)) if counter else apply
    sampler = g.node("KSampler", model=model.out(0), seed=0, steps=steps, cfg=cfg, sampler_name="euler",
                     scheduler="normal", positive=apply.out(1), negative=apply.out(2), latent_image=apply.out(3),
                     denoise=1.0)
    g.node("CITestCapture", value=sampler.out(0))
    return dict(apply=apply, sampler=sampler, ckpt=ck, pos=pos, neg=neg)


def _changed(log, kind):
    """{sigma: set of sites whose features the branch changed} for one patch kind."""
    out = defaultdict(set)
    for what, name, site, sigma, changed in log:
        if what == "patch" and name == kind and changed:
            out[sigma].add(site)
    return out


@pytest.mark.parametrize("branch,acp", [("brushnet_sd15_test.safetensors", False),
                                         ("powerpaint_test.safetensors", False),
                                         ("painternet_sd15_test.safetensors", True),
                                         ("brushnet_sdxl_test.safetensors", False),
                                         ("painternet_sdxl_test.safetensors", True)])
def test_every_injection_point_fires_on_every_step_in_range_and_none_outside(
        comfy, run_prompt, graph, unet_ckpt, branch_files, counter, tiny_sdxl, branch, acp):
    counter.clear()
    steps = 4
    sdxl = "sdxl" in branch
    _graph(graph, unet_ckpt, branch, start=0.0, end=0.5, steps=steps, sdxl=sdxl)
    run_prompt(graph)
    sigmas = sorted({s for *_, s, _ in counter if s is not None}, reverse=True)
    assert len(sigmas) == steps
    inside, outside = sigmas[:2], sigmas[2:]          # euler/normal, 4 steps: the first half of the schedule
    n_down, n_up = branch_files["n_down"], branch_files["n_up"]
    inp = _changed(counter, "input_block_patch")
    skip = _changed(counter, "input_block_patch_after_skip")
    outp = _changed(counter, "output_block_patch")
    adder = _changed(counter, "adder")
    attn = _changed(counter, "attn2_output_patch")
    for s in inside:
        # input block 0 only after the skip (BrushNet adds to the running features, not to the first skip)
        assert skip[s] == {("input", 0)}
        assert inp[s] == {("input", k) for k in range(1, n_down)}
        # mid at output block 0 and every output block but the last; the rest go through the adders
        assert outp[s] == {("output", n) for n in range(n_down)}
        assert len(adder[s]) == n_up - (n_down - 1)   # one pre-upsample add + the add after the last block
        if acp:
            assert len(attn[s]) == branch_files["n_acp_xl" if sdxl else "n_acp"]
        else:
            assert not attn[s]
    for s in outside:
        assert not (inp[s] or skip[s] or outp[s] or adder[s] or attn[s])
    runs = [e for e in counter if e[0] == "branch"]
    assert len(runs) == 2                              # once per model call, only inside the range
    # the unrelated attn2 patch kept firing on every step
    assert {s for what, *_, s, _ in counter if what == "other"} == set(sigmas)
    if branch.startswith("brushnet_sd15"):
        # BrushNet SD1.5 reads no prompt: one branch row serves both CFG rows (SDXL's reads the pooled text)
        assert all(shape[0] == 1 for _, _, shape, _, _ in runs)
    else:
        assert all(shape[0] == 2 for _, _, shape, _, _ in runs)


def test_scale_zero_is_the_unpatched_model_and_the_input_model_is_untouched(
        comfy, run_prompt, graph, unet_ckpt, branch_files):
    n = _graph(graph, unet_ckpt, "painternet_sd15_test.safetensors", scale=0.0, counter=False)
    plain = graph.node("KSampler", model=n["ckpt"].out(0), seed=0, steps=2, cfg=3.0, sampler_name="euler",
                       scheduler="normal", positive=n["pos"].out(0), negative=n["neg"].out(0),
                       latent_image=n["apply"].out(3), denoise=1.0)
    graph.node("CITestCapture", value=plain.out(0))
    full = _graph(graph, unet_ckpt, "painternet_sd15_test.safetensors", scale=1.0, counter=False)
    r = run_prompt(graph)
    a, b = r.output(n["sampler"].id, 0)["samples"], r.output(plain.id, 0)["samples"]
    c = r.output(full["sampler"].id, 0)["samples"]
    assert torch.equal(a, b)
    assert not torch.allclose(c, b)                    # and the branch does change the result
    latent = r.output(n["apply"].id, 3)
    assert tuple(latent["noise_mask"].shape) == (1, 1, 64, 64) and float(latent["noise_mask"].sum()) == 24 * 40


def test_batch_of_two_images(comfy, run_prompt, graph, unet_ckpt, branch_files, counter):
    counter.clear()
    _graph(graph, unet_ckpt, "powerpaint_test.safetensors", batch=2)
    r = run_prompt(graph)
    runs = [e for e in counter if e[0] == "branch"]
    assert runs and all(shape[0] == 4 for _, _, shape, _, _ in runs)   # 2 images x (cond, uncond), one run


def _bad_graph(g, ckpt, case):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    image = g.node("CITestNoiseImage", width=64, height=64, batch_size=2 if case == "batch" else 1, seed=1)
    size = 48 if case == "mask_size" else 64
    mask = g.node("CITestRectMask", width=size, height=size, x=0, y=0, w=8, h=8)
    m = mask.out(0)
    if case == "batch":
        three = g.node("RepeatImageBatch", image=g.node("MaskToImage", mask=m).out(0), amount=3)
        m = g.node("ImageToMask", image=three.out(0), channel="red").out(0)
    if case in ("empty", "full"):
        m = g.node("SolidMask", value=0.0 if case == "empty" else 1.0, width=64, height=64).out(0)
    pos = g.node("CLIPTextEncode", text="x", clip=ck.out(1))
    name = "brushnet_sd15_test.safetensors"
    if case == "wrong_file":
        name = "not_a_branch.safetensors"
    loader = g.node("ConsistentInpaintBranchLoader", branch=name, dtype="float32")
    apply = g.node("ConsistentInpaintApplyBranch", model=ck.out(0), vae=ck.out(2), image=image.out(0), mask=m,
                   branch=loader.out(0), positive=pos.out(0), negative=pos.out(0), scale=1.0,
                   start_percent=0.6 if case == "start_end" else 0.0, end_percent=0.5 if case == "start_end" else 1.0)
    sampler = g.node("KSampler", model=apply.out(0), seed=0, steps=1, cfg=3.0, sampler_name="euler",
                     scheduler="normal", positive=apply.out(1), negative=apply.out(2), latent_image=apply.out(3),
                     denoise=1.0)
    g.node("CITestCapture", value=sampler.out(0))
    return sampler


@pytest.mark.parametrize("case,match", [
    ("mask_size", "mask is 48x48 but image is 64x64"),
    ("batch", "image batch is 2 but mask batch is 3"),
    ("start_end", "start_percent"),
    ("wrong_file", "expected an inpaint-branch file \\(BrushNet SD1.5.*got a file of conv"),
])
def test_bad_inputs_give_clear_errors(comfy, run_prompt, graph, unet_ckpt, branch_files, case, match):
    if case == "wrong_file":
        d = comfy.models_dir / "inpaint_branch"
        save_file({"conv.weight": torch.zeros(4, 4, 3, 3)}, str(d / "not_a_branch.safetensors"))
        comfy.folder_paths.filename_list_cache.clear()
    _bad_graph(graph, unet_ckpt, case)
    with pytest.raises(comfy.PromptError, match=match):
        run_prompt(graph)


@pytest.mark.parametrize("case", ["empty", "full"])
def test_empty_and_full_masks_give_finite_samples(comfy, run_prompt, graph, unet_ckpt, branch_files, case):
    sampler = _bad_graph(graph, unet_ckpt, case)
    out = run_prompt(graph).output(sampler.id, 0)["samples"]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("base,branch,match", [
    ("sd15", "brushnet_sdxl_test.safetensors", r"expected an SDXL model \(this brushnet branch is built for SDXL.*got "
                                               "a model of the SD1.5 family"),
    ("sdxl", "painternet_sd15_test.safetensors", r"expected an SD1.5 model \(this painternet branch is built for "
                                                 "SD1.5.*got a model of the SDXL family"),
])
def test_branch_for_the_other_base_is_refused(comfy, run_prompt, graph, unet_ckpt, branch_files, tiny_sdxl,
                                              base, branch, match):
    ck = graph.node("CheckpointLoaderSimple", ckpt_name=unet_ckpt)
    if base == "sdxl":
        model = graph.node("CITestTinySDXL", seed=0).out(0)
        pos = graph.node("CITestRandomConditioning", tokens=8, dim=2048, pooled_dim=1280, seed=1, scale=1.0)
    else:
        model, pos = ck.out(0), graph.node("CLIPTextEncode", text="x", clip=ck.out(1))
    image = graph.node("CITestNoiseImage", width=64, height=64, batch_size=1, seed=1)
    mask = graph.node("CITestRectMask", width=64, height=64, x=0, y=0, w=8, h=8)
    loader = graph.node("ConsistentInpaintBranchLoader", branch=branch, dtype="float32")
    apply = graph.node("ConsistentInpaintApplyBranch", model=model, vae=ck.out(2), image=image.out(0),
                       mask=mask.out(0), branch=loader.out(0), positive=pos.out(0), negative=pos.out(0), scale=1.0,
                       start_percent=0.0, end_percent=1.0)
    graph.node("CITestCapture", value=apply.out(0))
    with pytest.raises(comfy.PromptError, match=match):
        run_prompt(graph)


def test_zero_initialised_branch_leaves_the_model_unchanged(comfy, run_prompt, graph, unet_ckpt, branch_files):
    """A freshly initialised branch (zero convs at zero, as training starts) must not change the UNet."""
    d = comfy.models_dir / "inpaint_branch"
    save_file(published.diffusers_branch(CHANNELS, 768, False, None, (True,) * LEVELS, True, (True,) * LEVELS,
                                         layers=1, seed=4, zero_init=True), str(d / "powerpaint_zero_test.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    n = _graph(graph, unet_ckpt, "powerpaint_zero_test.safetensors", counter=False)
    plain = graph.node("KSampler", model=n["ckpt"].out(0), seed=0, steps=2, cfg=3.0, sampler_name="euler",
                       scheduler="normal", positive=n["pos"].out(0), negative=n["neg"].out(0),
                       latent_image=n["apply"].out(3), denoise=1.0)
    graph.node("CITestCapture", value=plain.out(0))
    r = run_prompt(graph)
    assert torch.equal(r.output(n["sampler"].id, 0)["samples"], r.output(plain.id, 0)["samples"])
