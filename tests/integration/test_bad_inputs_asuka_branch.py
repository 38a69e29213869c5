"""Bad-input matrix for the ASUKA, inpaint-branch and Training Mask nodes, in real ComfyUI: every case is a
prompt validated and executed by ComfyUI, and asserts its class of outcome: a refusal by the node under test whose
message names what was expected (``bad_inputs_support.refused``), or the defined result the README documents.

Classes: values by link (checked at execution), model / VAE / latent of another family, sizes down to 1x1, weight
files with NaN / Inf / integer tensors, hostile pickles, damaged and foreign files, combo values outside the
options, NaN images and masks, batch and size mismatches, empty / full / every-patch masks. Apply Inpaint Branch
must leave its input MODEL sampling bit-identically.
"""
import pytest
import torch
from safetensors.torch import save_file

import branch_layouts as published
import layouts
from bad_inputs_support import BAD_FILE_WORDS, bad_copies, delete_later, image, latent, link, mask, refused
from bad_inputs_support import tensor_nodes  # noqa: F401 (fixture)
from test_asuka_graph import asuka_files  # noqa: F401  (fixture)
from test_branch_compose import task_files  # noqa: F401  (fixture)
from test_branch_graph import branch_files, tiny_sdxl, unet_ckpt  # noqa: F401  (fixtures)

ASUKA_LOADER, ASUKA_COND = "ConsistentInpaintASUKALoader", "ConsistentInpaintASUKAConditioning"
DEC_LOADER, DECODE = "ConsistentInpaintHarmonizingDecoderLoader", "ConsistentInpaintHarmonizingDecode"
BRANCH_LOADER, APPLY = "ConsistentInpaintBranchLoader", "ConsistentInpaintApplyBranch"
TASK, TRAINING_MASK = "ConsistentInpaintPowerPaintTaskPrompt", "ConsistentInpaintTrainingMask"
BRUSHNET, POWERPAINT, PAINTERNET = ("brushnet_sd15_test.safetensors", "powerpaint_test.safetensors",
                                    "painternet_sd15_test.safetensors")
DECODER_USED_KEY = "decoder.conv_in.weight"


@pytest.fixture(scope="module")
def files(comfy, asuka_files, branch_files, task_files, request):   # noqa: F811
    """Damaged, hostile and foreign copies in models/asuka and models/inpaint_branch (deleted when the module ends)."""
    a, b = comfy.models_dir / "asuka", comfy.models_dir / "inpaint_branch"
    request.addfinalizer(delete_later(comfy, a, b))
    out = dict(
        mae=bad_copies(a, "bad_mae", layouts.mae_checkpoint(dim=192, depth=2, dec_dim=128, dec_depth=8)),
        align=bad_copies(a, "bad_align", layouts.alignment_state_dict(seed=3, in_dim=128, dim=768, head_dim=64)),
        null=bad_copies(a, "bad_null", torch.randn(1, 256, 768)),
        decoder=bad_copies(a, "bad_decoder", layouts.decoder_checkpoint(z=4, ch=32, mult=(1, 2, 2, 2), res_blocks=1,
                                                                        cond=(32, 64, 64, 64, 64)),
                           ext=".ckpt", key=DECODER_USED_KEY),
        branch=bad_copies(b, "bad_branch", published.diffusers_branch((320, 640), None, False, None, (False,) * 2,
                                                                      False, (False,) * 2, layers=1, seed=1)),
    )
    # another method's files: an ASUKA alignment among the branches, a branch among the ASUKA files
    torch.save(layouts.alignment_state_dict(seed=3, in_dim=128, dim=768, head_dim=64), b / "foreign_align.pt")
    save_file(published.diffusers_branch((320, 640), None, False, None, (False,) * 2, False, (False,) * 2, layers=1,
                                         seed=1), str(a / "foreign_branch.safetensors"))
    torch.save(layouts.alignment_state_dict(seed=4, in_dim=96, dim=768, head_dim=64), a / "align_96_in.pt")
    torch.save(torch.randn(1, 768), a / "vec_test.pt")
    tasks = torch.load(comfy.folder_paths.get_full_path("inpaint_branch", task_files["vectors"]), weights_only=True)
    out["task"] = bad_copies(b, "bad_task", tasks, ext=".bin")
    comfy.folder_paths.filename_list_cache.clear()
    return out


@pytest.fixture(scope="module")
def ex(comfy):
    """One executor for the matrix: loaders' outputs are cached between cases (every node under test still runs,
    its inputs differ per case)."""
    return comfy.execution.PromptExecutor(comfy.server, cache_type=comfy.execution.CacheType.CLASSIC)


def capture(g, *outs):
    for o in outs:
        g.node("CITestCapture", value=o)


# -- ASUKA -------------------------------------------------------------------------------------------------------
def asuka_loader(g, **kw):
    args = dict(mae="mae_test.pth", alignment="align_sd15_test.pt", alignment_pooled="none", null_tokens="none",
                null_pooled="none", dtype="float32")
    args.update(kw)
    n = g.node(ASUKA_LOADER, **args)
    capture(g, n.out(0))
    return n


LOADER_COMBOS = [("dtype", "float64", "['auto', 'float32', 'bfloat16', 'float16']"),
                 ("mae", "missing.pth", "mae to be one of"), ("alignment", "none", "alignment to be one of"),
                 ("alignment_pooled", "x.pt", "alignment_pooled to be one of"),
                 ("null_tokens", "../../etc/passwd", "null_tokens to be one of"),
                 ("null_pooled", "vec.pt", "null_pooled to be one of")]


@pytest.mark.parametrize("field,value,words", LOADER_COMBOS)
def test_asuka_loader_refuses_values_outside_its_options(comfy, files, ex, tensor_nodes, field, value, words):
    g = comfy.graph()
    refused(comfy, g, asuka_loader(g, **{field: value}), "expected", words, executor=ex)


FILE_FIELDS = [("mae", "mae", ".pt"), ("alignment", "align", ".pt"), ("null_tokens", "null", ".pt")]


@pytest.mark.parametrize("variant", sorted(BAD_FILE_WORDS))
@pytest.mark.parametrize("field,kind,ext", FILE_FIELDS)
def test_asuka_loader_refuses_damaged_and_hostile_files(comfy, files, ex, field, kind, ext, variant):
    g = comfy.graph()
    refused(comfy, g, asuka_loader(g, **{field: files[kind][variant]}), "Load ASUKA Prior: ",
            *BAD_FILE_WORDS[variant], executor=ex)


@pytest.mark.parametrize("field,name,words", [
    ("mae", "align_sd15_test.pt", ("expected an ASUKA MAE prior",)),
    ("mae", "decoder_sd_test.ckpt", ("expected an ASUKA MAE prior",)),
    ("mae", "foreign_branch.safetensors", ("expected an ASUKA MAE prior",)),
    ("alignment", "mae_test.pth", ("expected an ASUKA alignment module",)),
    ("alignment", "foreign_branch.safetensors", ("expected an ASUKA alignment module",)),
    ("alignment", "align_96_in.pt", ("takes 96-wide input but the MAE prior is 128 wide",)),
    ("null_pooled", "vec_test.pt", ("null_pooled given without alignment_pooled",)),
])
def test_asuka_loader_names_the_file_it_expected(comfy, files, ex, field, name, words):
    g = comfy.graph()
    refused(comfy, g, asuka_loader(g, **{field: name}), "Load ASUKA Prior: ", *words, executor=ex)


def asuka_cond(g, img, m, weight=0.5):
    n = g.node(ASUKA_COND, asuka_prior=asuka_loader(g).out(0), image=img, mask=m, condition_weight=weight)
    capture(g, n.out(0), n.out(1))
    return n


@pytest.mark.parametrize("case,words", [
    ("weight_high", ("expected condition_weight between 0.0 and 2.0", "got 5.0")),
    ("weight_low", ("expected condition_weight between 0.0 and 2.0", "got -1.0")),
    ("weight_link_high", ("ASUKA Prior Conditioning: expected condition_weight between 0.0 and 2.0",)),
    ("mask_size", ("expected the mask to be the size of the image", "mask is 48x48 but image is 64x64")),
    ("mask_1x1", ("expected the mask to be the size of the image", "mask is 1x1")),
    ("batch", ("expected a batch of 1 or 2 for mask", "image batch is 2 but mask batch is 3")),
    ("nan_image", ("expected image without NaN or infinite values",)),
    ("inf_image", ("expected image without NaN or infinite values",)),
    ("nan_mask", ("expected mask without NaN or infinite values",)),
    ("two_channels", ("expected image with RGB (3), RGBA (4) or grayscale (1) channels", "got 2 channels")),
])
def test_asuka_conditioning_refuses(comfy, asuka_files, ex, tensor_nodes, case, words):  # noqa: F811
    g = comfy.graph()
    img, m, w = image(g), mask(g), 0.5
    if case == "weight_high":
        w = 5.0
    elif case == "weight_low":
        w = -1.0
    elif case == "weight_link_high":
        w = link(g, 3.0)
    elif case == "mask_size":
        m = mask(g, 48, 48)
    elif case == "mask_1x1":
        m = mask(g, 1, 1, fill="ones")
    elif case == "batch":
        img, m = image(g, batch=2), mask(g, batch=3, fill="noise")
    elif case in ("nan_image", "inf_image"):
        img = image(g, fill=case.split("_")[0])
    elif case == "nan_mask":
        m = mask(g, fill="nan")
    elif case == "two_channels":
        img = image(g, channels=2)
    refused(comfy, g, asuka_cond(g, img, m, w), *words, executor=ex)


@pytest.mark.parametrize("case", ["weight_link", "empty", "full", "grid", "batch_broadcast", "gray", "rgba",
                                  "tiny_1x1", "tiny_8x8", "odd_size"])
def test_asuka_conditioning_defined_results(comfy, asuka_files, ex, tensor_nodes, case):  # noqa: F811
    """Accepted: any size down to 1x1 (the MAE resizes to 256x256), batches of 1 broadcast; an empty mask gives the
    prior of the whole image; a full mask and a mask touching every MAE patch give the authors' zero prior."""
    g = comfy.graph()
    size = {"tiny_1x1": 1, "tiny_8x8": 8, "grid": 256}.get(case, 64)
    img = image(g, size, size + (3 if case == "odd_size" else 0), batch=2 if case == "batch_broadcast" else 1,
                channels={"gray": 1, "rgba": 4}.get(case, 3))
    fill = {"empty": "zeros", "full": "ones", "grid": "grid", "tiny_1x1": "ones"}.get(case, "rect")
    m = mask(g, size, size + (3 if case == "odd_size" else 0), fill=fill)
    n = asuka_cond(g, img, m, link(g, 0.7) if case == "weight_link" else 0.5)
    zero = asuka_cond(g, image(g, size, size), mask(g, size, size, fill="ones"))     # the zero prior's tokens
    r = comfy.run_prompt(g, executor=ex)
    tokens, preview = r.output(n.id, 0)[0][0], r.output(n.id, 1)
    assert tokens.shape == (2 if case == "batch_broadcast" else 1, 256, 768) and torch.isfinite(tokens).all()
    assert preview.shape[1:3] == (size + (3 if case == "odd_size" else 0), size) or preview.shape[1] == size
    null = r.output(zero.id, 0)[0][0]
    if case in ("full", "grid", "tiny_1x1"):
        assert torch.equal(tokens, null)          # no visible MAE patch: the authors' zero prior
    else:
        assert (tokens[0] - null[0]).abs().max() > 1e-4


# -- harmonizing decoder -----------------------------------------------------------------------------------------
def dec_loader(g, decoder="decoder_sd_test.ckpt", dtype="float32"):
    n = g.node(DEC_LOADER, decoder=decoder, dtype=dtype)
    capture(g, n.out(0))
    return n


@pytest.mark.parametrize("variant", sorted(BAD_FILE_WORDS))
def test_decoder_loader_refuses_damaged_and_hostile_files(comfy, files, ex, variant):
    g = comfy.graph()
    refused(comfy, g, dec_loader(g, files["decoder"][variant]), "Load Harmonizing Decoder: ",
            *BAD_FILE_WORDS[variant], executor=ex)


@pytest.mark.parametrize("kw,words", [
    (dict(dtype="float64"), ("expected dtype to be one of",)),
    (dict(decoder="nope.ckpt"), ("expected decoder to be one of",)),
    (dict(decoder="mae_test.pth"), ("Load Harmonizing Decoder: ", "expected an ASUKA harmonizing decoder")),
    (dict(decoder="foreign_branch.safetensors"), ("Load Harmonizing Decoder: ", "expected an ASUKA harmonizing decoder")),
])
def test_decoder_loader_refuses(comfy, files, ex, kw, words):
    g = comfy.graph()
    refused(comfy, g, dec_loader(g, **kw), *words, executor=ex)


def decode(g, samples, img=None, m=None, tile_size=0, overlap=16, tiling="exact"):
    n = g.node(DECODE, samples=samples, decoder=dec_loader(g).out(0), image=img if img is not None else image(g),
               mask=m if m is not None else mask(g), tile_size=tile_size, overlap=overlap, tiling=tiling)
    capture(g, n.out(0))
    return n


@pytest.mark.parametrize("case,words", [
    ("flux_latent", ("expected a latent with 4 channels (an SD1.5/SDXL latent", "got 16 channels (a FLUX/SD3 latent)")),
    ("latent_size", ("latent decodes to 96x96 but image is 64x64",)),
    ("nan_latent", ("expected samples without NaN or infinite values",)),
    ("video_latent", ("expected samples to be an image latent",)),
    ("batch", ("expected a batch of 1 or 2 for image", "latent batch is 2 but image batch is 3")),
    ("tile_small", ("expected tile_size 0 (whole image) or at least 64 pixels; got 32",)),
    ("tile_link_small", ("Harmonizing Decode: expected tile_size 0 (whole image) or at least 64",)),
    ("tile_huge", ("expected tile_size between 0 and 8192",)),
    ("overlap", ("expected overlap smaller than tile_size (64); got 64",)),
    ("overlap_link", ("Harmonizing Decode: expected overlap smaller than tile_size (64); got 96",)),
    ("tiling", ("expected tiling to be one of ['exact', 'independent']; got 'fast'",)),
    ("nan_image", ("expected image without NaN or infinite values",)),
    ("mask_size", ("expected the mask to be the size of the image",)),
])
def test_harmonizing_decode_refuses(comfy, asuka_files, ex, tensor_nodes, case, words):  # noqa: F811
    g = comfy.graph()
    kw = dict(samples=latent(g))
    if case == "flux_latent":
        kw["samples"] = latent(g, channels=16)
    elif case == "latent_size":
        kw["samples"] = latent(g, 12, 12)
    elif case == "nan_latent":
        kw["samples"] = latent(g, fill="nan")
    elif case == "video_latent":
        kw["samples"] = latent(g, frames=2)
    elif case == "batch":
        kw.update(samples=latent(g, batch=2), img=image(g, batch=3))
    elif case == "tile_small":
        kw["tile_size"] = 32
    elif case == "tile_link_small":
        kw["tile_size"] = link(g, 32)
    elif case == "tile_huge":
        kw["tile_size"] = 100000
    elif case == "overlap":
        kw.update(tile_size=64, overlap=64, tiling="independent")
    elif case == "overlap_link":
        kw.update(tile_size=64, overlap=link(g, 96), tiling="independent")
    elif case == "tiling":
        kw["tiling"] = "fast"
    elif case == "nan_image":
        kw["img"] = image(g, fill="nan")
    elif case == "mask_size":
        kw["m"] = mask(g, 32, 32)
    refused(comfy, g, decode(g, **kw), *words, executor=ex)


@pytest.mark.parametrize("case", ["empty", "full", "tiny_1x1_latent", "batch_broadcast", "tile_link", "rounded",
                                  "independent_link"])
def test_harmonizing_decode_defined_results(comfy, asuka_files, ex, tensor_nodes, case):  # noqa: F811
    """Accepted: latents down to 1x1 (an 8x8 image), an image rounded down to the latent (as core inpainting does),
    a batch of 1 broadcast, tile sizes by link. Empty and full masks decode (all known / all generated)."""
    g = comfy.graph()
    side = 1 if case == "tiny_1x1_latent" else 8
    kw = dict(samples=latent(g, side, side, batch=2 if case == "batch_broadcast" else 1),
              img=image(g, side * 8 + (5 if case == "rounded" else 0), side * 8),
              m=mask(g, side * 8 + (5 if case == "rounded" else 0), side * 8,
                     fill={"empty": "zeros", "full": "ones"}.get(case, "rect")))
    if case == "tile_link":
        kw["tile_size"] = link(g, 64)
    if case == "independent_link":
        kw.update(tile_size=64, overlap=link(g, 16), tiling="independent")
    n = decode(g, **kw)
    out = comfy.run_prompt(g, executor=ex).output(n.id, 0)
    assert out.shape == (2 if case == "batch_broadcast" else 1, side * 8, side * 8, 3)
    assert torch.isfinite(out).all() and 0 <= float(out.min()) <= float(out.max()) <= 1


# -- inpaint branch ----------------------------------------------------------------------------------------------
def branch_loader(g, branch=BRUSHNET, dtype="float32"):
    n = g.node(BRANCH_LOADER, branch=branch, dtype=dtype)
    capture(g, n.out(0))
    return n


@pytest.mark.parametrize("variant", sorted(BAD_FILE_WORDS))
def test_branch_loader_refuses_damaged_and_hostile_files(comfy, files, ex, variant):
    g = comfy.graph()
    refused(comfy, g, branch_loader(g, files["branch"][variant]), "Load Inpaint Branch (PainterNet / BrushNet / "
            "PowerPaint): ", *BAD_FILE_WORDS[variant], executor=ex)


@pytest.mark.parametrize("kw,words", [
    (dict(dtype="float64"), ("expected dtype to be one of",)),
    (dict(branch="nope.safetensors"), ("expected branch to be one of",)),
    (dict(branch="foreign_align.pt"), ("expected an inpaint-branch file",)),
    (dict(branch="ppt_vectors_only.bin"), ("PowerPaint's task-prompt text encoder, not the branch",)),
])
def test_branch_loader_refuses(comfy, files, ex, kw, words):
    g = comfy.graph()
    refused(comfy, g, branch_loader(g, **kw), *words, executor=ex)


def apply_branch(g, ckpt, branch=BRUSHNET, model=None, vae=None, img=None, m=None, scale=1.0, start=0.0, end=1.0,
                 bpos=None, bneg=None, sample=True, latent_image=None):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.node("CLIPTextEncode", text="x", clip=ck.out(1)).out(0)
    extra = {k: v for k, v in (("branch_positive", bpos), ("branch_negative", bneg)) if v is not None}
    n = g.node(APPLY, model=model or ck.out(0), vae=vae or ck.out(2), image=img if img is not None else image(g),
               mask=m if m is not None else mask(g), branch=branch_loader(g, branch).out(0), positive=pos,
               negative=pos, scale=scale, start_percent=start, end_percent=end, **extra)
    capture(g, n.out(0))
    s = None
    if sample:
        s = g.node("KSampler", model=n.out(0), seed=0, steps=1, cfg=3.0, sampler_name="euler", scheduler="normal",
                   positive=n.out(1), negative=n.out(2), latent_image=latent_image or n.out(3), denoise=1.0)
        capture(g, s.out(0))
    return n, s


@pytest.mark.parametrize("case,words", [
    ("start_after_end", ("expected start_percent <= end_percent", "got start_percent 0.6 > end_percent 0.5")),
    ("start_after_end_link", ("Apply Inpaint Branch: expected start_percent <= end_percent",)),
    ("start_link_high", ("Apply Inpaint Branch: expected start_percent between 0.0 and 1.0", "got 1.5")),
    ("scale_high", ("expected scale between 0.0 and 10.0", "got 20.0")),
    ("scale_link_high", ("Apply Inpaint Branch: expected scale between 0.0 and 10.0",)),
    ("flux_vae", ("expected an SD1.5/SDXL VAE (4 latent channels", "a FLUX/SD3 VAE with 16 latent channels")),
    ("sdxl_branch", ("expected an SDXL model", "got a model of the SD1.5 family (text width 768)")),
    ("sdxl_model", ("expected an SD1.5 model", "got a model of the SDXL family (text width 2048)")),
    ("mask_size", ("expected the mask to be the size of the image", "mask is 48x48 but image is 64x64")),
    ("batch", ("image batch is 2 but mask batch is 3",)),
    ("nan_image", ("expected image without NaN or infinite values",)),
    ("nan_mask", ("expected mask without NaN or infinite values",)),
    ("tiny_4x4", ("expected an image of at least 8x8 pixels; got 4x4",)),
    ("tiny_1x1", ("expected an image of at least 8x8 pixels; got 1x1",)),
    ("only_branch_positive", ("expected both branch_positive and branch_negative, or neither",)),
    ("branch_prompt_on_brushnet", ("expected no branch_positive / branch_negative",)),
    ("branch_prompt_width", ("expected branch_positive to be text conditioning 768 wide", "(1, 8, 2048)")),
])
def test_apply_branch_refuses(comfy, files, ex, tensor_nodes, unet_ckpt, tiny_sdxl, flux_vae, case,  # noqa: F811
                              words):
    g = comfy.graph()
    kw = {}
    cond = g.node("CITestRandomConditioning", tokens=8, dim=768, pooled_dim=768, seed=1, scale=1.0).out(0)
    if case == "start_after_end":
        kw.update(start=0.6, end=0.5)
    elif case == "start_after_end_link":
        kw.update(start=link(g, 0.6), end=link(g, 0.5))
    elif case == "start_link_high":
        kw.update(start=link(g, 1.5))
    elif case == "scale_high":
        kw.update(scale=20.0)
    elif case == "scale_link_high":
        kw.update(scale=link(g, 20.0))
    elif case == "flux_vae":
        kw.update(vae=g.node("VAELoader", vae_name=flux_vae).out(0))
    elif case == "sdxl_branch":
        kw.update(branch="brushnet_sdxl_test.safetensors")
    elif case == "sdxl_model":
        kw.update(model=g.node(tiny_sdxl, seed=0).out(0), branch=PAINTERNET)
    elif case == "mask_size":
        kw.update(m=mask(g, 48, 48))
    elif case == "batch":
        kw.update(img=image(g, batch=2), m=mask(g, batch=3, fill="noise"))
    elif case in ("nan_image", "nan_mask"):
        kw.update(img=image(g, fill="nan")) if case == "nan_image" else kw.update(m=mask(g, fill="nan"))
    elif case.startswith("tiny"):
        side = 4 if case == "tiny_4x4" else 1
        kw.update(img=image(g, side, side), m=mask(g, side, side, fill="ones"))
    elif case == "only_branch_positive":
        kw.update(branch=POWERPAINT, bpos=cond)
    elif case == "branch_prompt_on_brushnet":
        kw.update(bpos=cond, bneg=cond)
    elif case == "branch_prompt_width":
        wide = g.node("CITestRandomConditioning", tokens=8, dim=2048, pooled_dim=1280, seed=1, scale=1.0).out(0)
        kw.update(branch=POWERPAINT, bpos=wide, bneg=wide)
    n, _ = apply_branch(g, unet_ckpt, sample=False, **kw)
    refused(comfy, g, n, *words, executor=ex)


@pytest.mark.parametrize("case,words", [
    ("latent_size", ("Apply Inpaint Branch: expected the sampled latent to be the size of the branch image (64x64 px",
                     "got a 96x96 px latent", "Sample the latent output of Apply Inpaint Branch")),
    ("latent_batch", ("Apply Inpaint Branch: expected a sampled latent batch of 2 (the image batch)",
                      "got a latent batch of 3")),
])
def test_apply_branch_sampled_latent_of_another_size_names_the_cause(comfy, files, ex, tensor_nodes, unet_ckpt,
                                                                     case, words):
    g = comfy.graph()
    if case == "latent_size":
        lat = g.node("EmptyLatentImage", width=96, height=96, batch_size=1).out(0)
        _, s = apply_branch(g, unet_ckpt, latent_image=lat)
    else:
        lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=3).out(0)
        _, s = apply_branch(g, unet_ckpt, img=image(g, batch=2), latent_image=lat)
    with pytest.raises(comfy.PromptError) as info:
        comfy.run_prompt(g, executor=ex)
    assert info.value.details.get("node_id") == s.id               # raised while sampling, by the branch patch
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("case", ["empty", "full", "tiny_8x8", "odd_size", "links", "scale_zero_link",
                                  "batch_broadcast", "powerpaint_task"])
def test_apply_branch_defined_results(comfy, files, ex, tensor_nodes, unet_ckpt, task_files, case):  # noqa: F811
    """Accepted: images from 8x8 (a 1x1 latent; not a multiple of 8: centre-cropped as core inpainting), empty masks
    (the branch sees everything known) and full masks (nothing known), values by link, a batch of 1 broadcast."""
    g = comfy.graph()
    kw = {}
    side = 8 if case == "tiny_8x8" else 64
    if case in ("empty", "full"):
        kw.update(m=mask(g, fill="zeros" if case == "empty" else "ones"))
    elif case == "tiny_8x8":
        kw.update(img=image(g, 8, 8), m=mask(g, 8, 8, fill="ones"))
    elif case == "odd_size":
        kw.update(img=image(g, 69, 67), m=mask(g, 69, 67))
    elif case == "links":
        kw.update(start=link(g, 0.0), end=link(g, 0.9), scale=link(g, 0.5))
    elif case == "scale_zero_link":
        kw.update(scale=link(g, 0.0))
    elif case == "batch_broadcast":
        kw.update(img=image(g, batch=2))
    elif case == "powerpaint_task":
        clip = g.node("CheckpointLoaderSimple", ckpt_name=unet_ckpt).out(1)
        t = g.node(TASK, task_embeddings=task_files["vectors"], task="object-removal", fitting_degree=1.0, clip=clip)
        kw.update(branch=POWERPAINT, bpos=t.out(0), bneg=t.out(1))
    n, s = apply_branch(g, unet_ckpt, **kw)
    r = comfy.run_prompt(g, executor=ex)
    lat, out = r.output(n.id, 3), r.output(s.id, 0)["samples"]
    assert torch.isfinite(out).all()
    h = {"odd_size": 64}.get(case, side) // 8
    assert out.shape == (2 if case == "batch_broadcast" else 1, 4, h, h) and lat["noise_mask"].shape[-1] == h * 8


@pytest.fixture(scope="module")
def reference_ex(comfy):
    """An executor of its own: its MODEL never meets a branch."""
    return comfy.execution.PromptExecutor(comfy.server, cache_type=comfy.execution.CacheType.CLASSIC)


def test_input_model_samples_identically_after_the_patched_one_ran(comfy, files, ex, reference_ex, tensor_nodes,
                                                                  unet_ckpt):  # noqa: F811
    """The MODEL object every branch kind was applied to (cached by the matrix's executor, so every earlier case
    patched clones of it too) samples bit-identically to a MODEL that never met a branch."""
    def plain(g):
        ck = g.node("CheckpointLoaderSimple", ckpt_name=unet_ckpt)
        pos = g.node("CLIPTextEncode", text="x", clip=ck.out(1)).out(0)
        enc = g.node("VAEEncode", pixels=image(g), vae=ck.out(2)).out(0)
        s = g.node("KSampler", model=ck.out(0), seed=5, steps=2, cfg=3.0, sampler_name="euler",
                   scheduler="normal", positive=pos, negative=pos, latent_image=enc, denoise=0.8)
        capture(g, s.out(0))
        return s

    g = comfy.graph()
    s = plain(g)
    before = comfy.run_prompt(g, executor=reference_ex).output(s.id, 0)["samples"]
    g = comfy.graph()
    samplers = [apply_branch(g, unet_ckpt, branch=b)[1] for b in (BRUSHNET, POWERPAINT, PAINTERNET)]
    r = comfy.run_prompt(g, executor=ex)
    patched = [r.output(s.id, 0)["samples"] for s in samplers]
    g = comfy.graph()
    s = plain(g)
    after = comfy.run_prompt(g, executor=ex).output(s.id, 0)["samples"]   # the cached, patched-from MODEL
    assert torch.equal(before, after)
    assert all(torch.isfinite(p).all() and not torch.equal(p, patched[0]) for p in patched[1:])


# -- PowerPaint task prompt ----------------------------------------------------------------------------------------
def task(g, task_embeddings, task_name="text-guided", fitting=1.0, clip=None):
    extra = {} if clip is None else {"clip": clip}
    n = g.node(TASK, task_embeddings=task_embeddings, task=task_name, fitting_degree=fitting, **extra)
    capture(g, n.out(0), n.out(1))
    return n


@pytest.mark.parametrize("variant", sorted(BAD_FILE_WORDS))
def test_task_prompt_refuses_damaged_and_hostile_files(comfy, files, ex, variant):
    g = comfy.graph()
    refused(comfy, g, task(g, files["task"][variant]), "PowerPaint Task Prompt: ", *BAD_FILE_WORDS[variant],
            executor=ex)


@pytest.mark.parametrize("case,words", [
    ("task", ("expected task to be one of ['text-guided', 'object-removal', 'outpainting', 'shape-guided']",)),
    ("fitting_high", ("expected fitting_degree between 0.0 and 1.0", "got 2.0")),
    ("fitting_link_high", ("PowerPaint Task Prompt: expected fitting_degree between 0.0 and 1.0",)),
    ("missing_file", ("expected task_embeddings to be one of",)),
    ("branch_file", ("PowerPaint Task Prompt: ", "expected the authors' PowerPaint_Brushnet", "got no task embeddings")),
    ("no_clip", ("PowerPaint Task Prompt: expected a clip input", "Connect the SD1.5 CLIP")),
])
def test_task_prompt_refuses(comfy, files, ex, task_files, case, words):  # noqa: F811
    g = comfy.graph()
    name, kw = task_files["full"], {}
    if case == "task":
        kw["task_name"] = "fast"
    elif case == "fitting_high":
        kw["fitting"] = 2.0
    elif case == "fitting_link_high":
        kw["fitting"] = link(g, 2.0)
    elif case == "missing_file":
        name = "nope.bin"
    elif case == "branch_file":
        name = BRUSHNET
    elif case == "no_clip":
        name = task_files["vectors"]
    refused(comfy, g, task(g, name, **kw), *words, executor=ex)


@pytest.mark.parametrize("task_name", ["text-guided", "object-removal", "outpainting", "shape-guided"])
def test_task_prompt_every_task_and_fitting_by_link(comfy, files, ex, task_files, unet_ckpt, task_name):  # noqa: F811
    g = comfy.graph()
    clip = g.node("CheckpointLoaderSimple", ckpt_name=unet_ckpt).out(1)      # the vectors-only file takes a CLIP
    n = task(g, task_files["vectors"], task_name, fitting=link(g, 0.5), clip=clip)
    r = comfy.run_prompt(g, executor=ex)
    for i in (0, 1):
        c = r.output(n.id, i)[0][0]
        assert c.shape == (1, 77, 768) and torch.isfinite(c).all()


# -- Training Mask ---------------------------------------------------------------------------------------------------
KINDS = ["mix (PainterNet 25/50/25)", "box", "irregular", "segmentation", "mix (ASUKA 50/40/10)", "ASUKA object",
         "ASUKA irregular", "ASUKA regular"]


def training_mask(g, kind=KINDS[0], seed=0, width=64, height=64, batch_size=1, region=None):
    extra = {} if region is None else {"region": region}
    n = g.node(TRAINING_MASK, kind=kind, seed=seed, width=width, height=height, batch_size=batch_size, **extra)
    capture(g, n.out(0))
    return n


@pytest.mark.parametrize("case,words", [
    ("kind", ("expected kind to be one of ['mix (PainterNet 25/50/25)'", "got 'circle'")),
    ("width_small", ("expected width between 16 and 16384", "got 8")),
    ("width_link_small", ("Training Mask: expected width between 16 and 16384", "got 8")),
    ("height_link_zero", ("Training Mask: expected height between 16 and 16384", "got 0")),
    ("batch_link_zero", ("Training Mask: expected batch_size between 1 and 64", "got 0")),
    ("region_tiny", ("Training Mask: expected a region mask of at least 16x16 pixels; got 8x8",)),
    ("region_1x1", ("Training Mask: expected a region mask of at least 16x16 pixels; got 1x1",)),
    ("region_nan", ("Training Mask: expected region without NaN or infinite values",)),
])
def test_training_mask_refuses(comfy, ex, tensor_nodes, case, words):
    g = comfy.graph()
    kw = {}
    if case == "kind":
        kw["kind"] = "circle"
    elif case == "width_small":
        kw["width"] = 8
    elif case == "width_link_small":
        kw["width"] = link(g, 8)
    elif case == "height_link_zero":
        kw["height"] = link(g, 0)
    elif case == "batch_link_zero":
        kw["batch_size"] = link(g, 0)
    elif case in ("region_tiny", "region_1x1"):
        side = 8 if case == "region_tiny" else 1
        kw["region"] = mask(g, side, side, fill="ones")
    elif case == "region_nan":
        kw["region"] = mask(g, fill="nan")
    refused(comfy, g, training_mask(g, **kw), *words, executor=ex)


@pytest.mark.parametrize("region", ["empty", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_mask_empty_and_full_regions(comfy, ex, tensor_nodes, kind, region):
    """An empty region is replaced by a random ellipse (as without a region): the mask is never empty. A full region
    is a valid object covering the image: PainterNet's kinds give the full mask; ASUKA's draw their own kinds."""
    g = comfy.graph()
    n = training_mask(g, kind, seed=3, region=mask(g, 32, 32, batch=2, fill="zeros" if region == "empty" else "ones"))
    r = comfy.run_prompt(g, executor=ex)
    m, kinds = r.output(n.id, 0), r.output(n.id, 1)
    assert m.shape == (2, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0} and float(m.sum()) > 0
    assert len(kinds.split(", ")) == 2
    if region == "full" and kind in ("box", "irregular", "segmentation"):
        assert bool((m == 1).all())


def test_training_mask_values_by_link_draw_as_typed(comfy, ex, tensor_nodes):
    g = comfy.graph()
    linked = training_mask(g, "ASUKA regular", seed=link(g, 7), width=link(g, 48), height=link(g, 40),
                           batch_size=link(g, 3))
    typed = training_mask(g, "ASUKA regular", seed=7, width=48, height=40, batch_size=3)
    r = comfy.run_prompt(g, executor=ex)
    assert r.output(linked.id, 0).shape == (3, 40, 48)
    assert torch.equal(r.output(linked.id, 0), r.output(typed.id, 0))
