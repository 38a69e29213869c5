"""Bad inputs to the LAR-Gen and Patch-Adapter nodes inside real ComfyUI: every case goes through
ComfyUI's prompt validation and execution and asserts the class of its outcome — a refusal that names the node and
what it expected (``InputError`` at execution, or ComfyUI's "Custom validation failed"), or a defined result the
README documents. Classes: values driven by links (ComfyUI checks neither their ranges nor the nodes' cross checks),
models/VAEs of another family, a model family a node does not support, degenerate sizes down to 1x1, combo values
outside the options, NaN images, batch mismatches, empty/full masks, wrong and hostile weight files.

Then, per patching node, the input MODEL samples bit-identically after the patched one ran, and Dual Context,
subject attention and RefineNet stacked on one model all act.

The models are the tiny random-weight ones of test_largen_graph / test_patch_adapter_graph; one PromptExecutor per
module keeps the loaders' outputs cached between cases.
"""
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bad_inputs_support import BAD_FILE_WORDS, PWNED, bad_copies, delete_later
from test_branch_graph import tiny_sdxl  # noqa: F401 (fixture)
from test_largen_graph import CKPT, CLIP_W, IP, clip_vision_node, largen_files, vae_name  # noqa: F401 (fixtures)
from test_patch_adapter_graph import files  # noqa: F401 (fixture)

SUBJECT, REFINE = "Apply LAR-Gen Subject Attention", "Apply LAR-Gen RefineNet"
LOADER, RN_LOADER = "Load LAR-Gen", "Load LAR-Gen RefineNet"
CROP, PASTE = r"Crop To Mask \(zoom-in\)", "Paste Back"
PA_LOADER, DUAL = "Load Patch-Adapter", "Apply Patch-Adapter Dual Context"
HIRES, DOWN = r"High-Res Patch Refine \(Patch-Adapter\)", "Downscale For Stage 1"
MARKER = "ci_hostile_pickle_ran"


class _Hostile:
    """Pickles to a call of pathlib.Path.touch(marker): a loader that unpickled it unsafely would create the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def env(comfy, largen_files, clip_vision_node, vae_name, files, flux_vae, flux_fill_unet, tiny_sdxl,
        tmp_path_factory, request):
    """Names of every file and test node the cases use, plus the executor they share (the files it writes are
    deleted when the module ends)."""
    marker = tmp_path_factory.mktemp("hostile") / MARKER
    lg, pa = comfy.models_dir / "largen", comfy.models_dir / "patch_adapter"
    request.addfinalizer(delete_later(comfy, lg, pa))
    with open(lg / "hostile.pth", "wb") as f:                        # a plain pickle
        pickle.dump({"model": _Hostile(str(marker))}, f)
    torch.save({"state_dict": _Hostile(str(marker))}, lg / "hostile_zip.pt")     # torch's zip pickle
    shutil.copy(lg / "hostile.pth", pa / "hostile.pth")
    (lg / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors header" * 10)
    shutil.copy(pa / "pa_sdxl.safetensors", lg / "patch_adapter_file.safetensors")   # another method's file
    shutil.copy(lg / CKPT, pa / "largen_file.pth")
    # NaN / Inf / integer weights, a hostile pickle and damaged files, for every loader (bad_inputs_support)
    bad_copies(lg, "largen_bad", torch.load(lg / "largen_no_refinenet_test.pth", weights_only=True))
    bad_copies(lg, "refinenet_bad", load_file(str(lg / "refinenet_test.safetensors")))
    bad_copies(pa, "pa_bad", load_file(str(pa / "pa_sd15.safetensors")))
    comfy.folder_paths.filename_list_cache.clear()

    class CITestNaNImage:
        @classmethod
        def INPUT_TYPES(cls):
            size = ("INT", {"default": 64, "min": 1})
            return {"required": {"width": size, "height": size,
                                 "batch_size": ("INT", {"default": 1, "min": 1})}}
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "run"
        CATEGORY = "testing"

        def run(self, width, height, batch_size):
            img = torch.rand(batch_size, height, width, 3)
            img[:, height // 2, width // 2] = float("nan")
            return (img,)

    comfy.nodes.NODE_CLASS_MAPPINGS["CITestNaNImage"] = CITestNaNImage
    ex = comfy.execution.PromptExecutor(comfy.server, cache_type=comfy.execution.CacheType.CLASSIC)
    return dict(vae=vae_name, taesd=files["vae"], sd15=files["ckpt"], flux_vae=flux_vae, flux=flux_fill_unet,
                marker=marker, ex=ex)


# -- outcomes ---------------------------------------------------------------------------------------------------
def refused(*patterns, at="execution"):
    """A refusal: ComfyUI's error text matches every pattern; ``at`` "execution" (the node raised the pack's
    InputError, not an error from deep in torch) or "validation" (ComfyUI refused the prompt before running it)."""
    return ("refused", at, patterns)


def works(check=None):
    """A defined result: the prompt runs; ``check(result)`` asserts what the README documents."""
    return ("works", check)


def _run(comfy, g, env, outcome):
    if outcome[0] == "works":
        r = comfy.run_prompt(g, executor=env["ex"])
        if outcome[1] is not None:
            outcome[1](r)
        return
    _, at, patterns = outcome
    with pytest.raises(comfy.PromptError) as err:
        comfy.run_prompt(g, executor=env["ex"])
    e = err.value
    assert e.kind == at, str(e)
    if at == "validation":
        # ComfyUI files each message under the node that refused it (and repeats it once per input)
        lines = []
        for info in e.details["node_errors"].values():
            name = comfy.nodes.NODE_CLASS_MAPPINGS[info["class_type"]].GET_SCHEMA().display_name
            for error in info["errors"]:
                assert error["type"] == "custom_validation_failed", error
                lines.append(f"{name}: {str(error['details']).split(' - ', 1)[-1]}")
        text = "\n".join(lines)
    else:
        assert e.details.get("exception_type", "").endswith("InputError"), str(e)
        text = e.details["exception_message"]
        assert text.startswith(comfy.nodes.NODE_CLASS_MAPPINGS[e.details["node_type"]].GET_SCHEMA().display_name)
    for p in patterns:
        assert re.search(p, text), f"{p!r} not in {text!r}"


# -- graph pieces -------------------------------------------------------------------------------------------------
def noise(g, w=64, h=64, b=1, seed=1):
    return g.node("CITestNoiseImage", width=w, height=h, batch_size=b, seed=seed).out(0)


def solid(g, w, h, value=1.0):
    return g.node("SolidMask", value=value, width=w, height=h).out(0)


def rect(g, w, h, x, y, mw, mh):
    return g.node("CITestRectMask", width=w, height=h, x=x, y=y, w=mw, h=mh).out(0)


def empty_image(g, w, h, b=1):
    return g.node("EmptyImage", width=w, height=h, batch_size=b, color=0x336699).out(0)


def nan_image(g, w=64, h=64, b=1):
    return g.node("CITestNaNImage", width=w, height=h, batch_size=b).out(0)


def batch_of(g, image, n):
    return g.node("RepeatImageBatch", image=image, amount=n).out(0)


def mask_batch(g, mask, n):
    return g.node("ImageToMask", image=batch_of(g, g.node("MaskToImage", mask=mask).out(0), n), channel="red").out(0)


def pint(g, v):
    return g.node("PrimitiveInt", value=v).out(0)


def pfloat(g, v):
    return g.node("PrimitiveFloat", value=v).out(0)


def capture(g, *values):
    for v in values:
        g.node("CITestCapture", value=v)


def largen(g, dtype="float32"):
    loader = g.node("ConsistentInpaintLARGenLoader", checkpoint=CKPT, image_proj=IP, dtype=dtype)
    return loader.out(0), loader.out(1), g.node("CITestClipVision", width=CLIP_W, seed=0).out(0)


def sd15(g, e):
    ck = g.node("CheckpointLoaderSimple", ckpt_name=e["sd15"])
    return ck.out(0), ck.out(1)


def flux_model(g, e):
    return g.node("UNETLoader", unet_name=e["flux"], weight_dtype="default").out(0)


def subject_node(g, e, *, model=None, subject=None, clip_vision=None, **kw):
    m, adapter, cv = largen(g)
    inputs = dict(model=model or m, subject_adapter=adapter, clip_vision=clip_vision or cv,
                  subject_image=subject or noise(g, 48, 40), weight=1.0, start_percent=0.0, end_percent=1.0)
    inputs.update(kw)
    n = g.node("ConsistentInpaintApplySubjectAttention", **inputs)
    capture(g, n.out(0))
    return n


def refine_node(g, e, *, model=None, vae=None, subject=None, clip_vision=None, refinenet=CKPT, **kw):
    m, _, cv = largen(g)
    rn = g.node("ConsistentInpaintRefineNetLoader", checkpoint=refinenet, dtype="float32").out(0)
    inputs = dict(model=model or m, refinenet=rn, vae=vae or g.node("VAELoader", vae_name=e["vae"]).out(0),
                  clip_vision=clip_vision or cv, subject_image=subject or noise(g, 48, 40), start_percent=0.0,
                  end_percent=1.0, subject_resolution=64, seed=0)
    inputs.update(kw)
    n = g.node("ConsistentInpaintApplyRefineNet", **inputs)
    capture(g, n.out(0))
    return n


def crop_node(g, *, image=None, mask=None, **kw):
    inputs = dict(image=image or noise(g), mask=mask or rect(g, 64, 64, 16, 8, 24, 40), context_factor=1.3,
                  resolution=64, padding="edge")
    inputs.update(kw)
    n = g.node("ConsistentInpaintCropToMask", **inputs)
    capture(g, n.out(0), n.out(1))
    return n


def paste_node(g, *, image=None, mask=None, inpainted=None, **kw):
    image = image or noise(g)
    crop = crop_node(g, image=image, mask=mask)
    inputs = dict(image=image, inpainted=inpainted or crop.out(0), crop_info=crop.out(2), feather=4)
    inputs.update(kw)
    n = g.node("ConsistentInpaintPasteBack", **inputs)
    capture(g, n.out(0))
    return n, image, crop


def dual_node(g, e, *, model=None, adapter="pa_sd15.safetensors", mask=None, **kw):
    ad = g.node("ConsistentInpaintPatchAdapterLoader", adapter=adapter, dtype="float32").out(0)
    inputs = dict(model=model or sd15(g, e)[0], patch_adapter=ad, mask=mask or rect(g, 64, 64, 16, 16, 24, 24),
                  strength=1.0, start_percent=0.0, end_percent=1.0)
    inputs.update(kw)
    n = g.node("ConsistentInpaintApplyDualContext", **inputs)
    capture(g, n.out(0))
    return n


def _cond(g, dim=768, pooled=0):
    return [g.node("CITestRandomConditioning", tokens=8, dim=dim, pooled_dim=pooled, seed=s, scale=1.0).out(0)
            for s in (1, 2)]


def hires_node(g, e, *, model=None, vae=None, image=None, mask=None, reference=None, adapter=None, **kw):
    image = image or noise(g, 128, 96)
    pos, neg = _cond(g)
    inputs = dict(model=model or sd15(g, e)[0], vae=vae or g.node("VAELoader", vae_name=e["taesd"]).out(0),
                  positive=pos, negative=neg, image=image, mask=mask or rect(g, 128, 96, 40, 30, 30, 20),
                  reference=reference or noise(g, 64, 48, seed=2), seed=0, steps=1, cfg=2.0, sampler_name="euler",
                  scheduler="normal", denoise=0.6, patch_size=64, overlap=16, patch_batch=1, reference_context=1.5)
    if adapter:
        inputs["patch_adapter"] = g.node("ConsistentInpaintPatchAdapterLoader", adapter=adapter,
                                         dtype="float32").out(0)
    inputs.update(kw)
    n = g.node("ConsistentInpaintHighResPatchRefine", **inputs)
    capture(g, n.out(0), n.out(1), image)
    return n


def down_node(g, *, image=None, mask=None, **kw):
    inputs = dict(image=image or noise(g, 96, 64), mask=mask or rect(g, 96, 64, 10, 10, 20, 20), megapixels=0.05,
                  multiple_of=8)
    inputs.update(kw)
    n = g.node("ConsistentInpaintDownscaleForStage1", **inputs)
    capture(g, n.out(0), n.out(1))
    return n


def loader_node(g, node, **inputs):
    n = g.node(node, **inputs)
    capture(g, n.out(0))
    return n


# -- checks of defined results ----------------------------------------------------------------------------------
def shapes(node_id, *expected):
    """The node's outputs have these shapes."""
    def check(r):
        for i, shape in enumerate(expected):
            assert tuple(r.output(node_id, i).shape) == shape, (i, r.output(node_id, i).shape)
    return check


def patched_model(node_id):
    """A MODEL came out: a clone carrying the node's patch (the node acted, the input was not modified)."""
    def check(r):
        m = r.output(node_id)
        assert "consistent_inpaint" in str(m.wrappers), m.wrappers
    return check


def unchanged_outside(node_id, image_id, mask_id=None, *, inside_changes=True):
    def check(r):
        out, img = r.output(node_id), r.output(image_id)
        assert out.shape == img.shape and torch.isfinite(out).all()
        if mask_id is not None:
            m = r.output(mask_id)[0] > 0
            assert torch.equal(out[0][~m], img[0][~m])
            if inside_changes and m.any():
                assert not torch.equal(out[0][m], img[0][m])
    return check


# -- the matrix ------------------------------------------------------------------------------------------------
CASES = {}


def case(name):
    def register(fn):
        assert name not in CASES
        CASES[name] = fn
        return fn
    return register


def combo_cases(prefix, build, inputs):
    """One refused case per combo input given a value outside its options (ComfyUI 0.3.64 checks none of V3's)."""
    for inp, display in inputs:
        def fn(g, e, inp=inp, display=display):
            build(g, e, **{inp: "not-an-option"})
            return refused(f"{display}: expected {inp} to be one of \\[", "got 'not-an-option'", at="validation")
        CASES[f"{prefix}-combo-{inp}"] = fn


def range_cases(prefix, build, display, items):
    """Per (input, literal, linked, primitive): the literal out of range refused before the run, the same value
    driven by a link refused when the node executes (ComfyUI checks no linked value)."""
    for inp, bad, prim in items:
        def literal(g, e, inp=inp, bad=bad):
            build(g, e, **{inp: bad})
            return refused(f"{display}: expected {inp} between .*; got {re.escape(repr(bad))}", at="validation")

        def linked(g, e, inp=inp, bad=bad, prim=prim):
            build(g, e, **{inp: prim(g, bad)})
            return refused(f"{display}: expected {inp} between .*; got {re.escape(repr(bad))}")
        CASES[f"{prefix}-range-{inp}-{bad}-literal"] = literal
        CASES[f"{prefix}-range-{inp}-{bad}-linked"] = linked


def percent_cases(prefix, build, display):
    @case(f"{prefix}-start-after-end-literal")
    def _(g, e):
        build(g, e, start_percent=0.7, end_percent=0.3)
        return refused(f"{display}: expected start_percent <= end_percent; got start_percent 0.7 > end_percent 0.3",
                       at="validation")

    @case(f"{prefix}-start-after-end-linked")
    def _(g, e):
        build(g, e, start_percent=pfloat(g, 0.7), end_percent=pfloat(g, 0.3))
        return refused(f"{display}: expected start_percent <= end_percent; got start_percent 0.7 > end_percent 0.3")

    @case(f"{prefix}-percents-linked-valid")
    def _(g, e):
        n = build(g, e, start_percent=pfloat(g, 0.2), end_percent=pfloat(g, 0.8))
        return works(patched_model(n.id))


# Load LAR-Gen -----------------------------------------------------------------------------------------------------
def _lg_loader(g, e, **kw):
    return loader_node(g, "ConsistentInpaintLARGenLoader", **{**dict(checkpoint=CKPT, image_proj=IP,
                                                                     dtype="float32"), **kw})


combo_cases("largen-loader", _lg_loader, [("checkpoint", LOADER), ("image_proj", LOADER), ("dtype", LOADER)])
for _name, _file, _words in [
        ("plain-sdxl", "sdxl_inpaint_plain_test.pth", r"SDXL inpainting UNet without LAR-Gen's subject projections"),
        ("no-resampler", "largen_no_refinenet_test.pth", r"carries no IP-Adapter-Plus resampler"),
        ("hostile-pickle", "hostile.pth", r"hostile.pth could not be loaded safely"),
        ("hostile-zip-pickle", "hostile_zip.pt", r"cannot be loaded safely: builtins.getattr, pathlib.Path"),
        ("garbage", "garbage.safetensors", r"not a readable safetensors file"),
        ("patch-adapter-file", "patch_adapter_file.safetensors",
         r"is not a LAR-Gen checkpoint: it holds no SDXL UNet")]:
    def _fn(g, e, _file=_file, _words=_words):
        _lg_loader(g, e, checkpoint=_file, image_proj=IP if _file != "largen_no_refinenet_test.pth" else
                   "from checkpoint")
        return refused(f"{LOADER}: expected a LAR-Gen checkpoint", _words)
    CASES[f"largen-loader-{_name}"] = _fn


@case("largen-loader-sd15-resampler")
def _(g, e):
    _lg_loader(g, e, image_proj="ip_plus_sd15_test.bin")
    return refused(f"{LOADER}: expected", r"768-wide subject tokens \(an SD1.5 IP-Adapter-Plus\)")


# Apply LAR-Gen Subject Attention -----------------------------------------------------------------------------------
percent_cases("subject", subject_node, SUBJECT)
range_cases("subject", subject_node, SUBJECT, [("weight", 6.0, pfloat), ("end_percent", 1.5, pfloat)])


@case("subject-sd15-model")
def _(g, e):
    subject_node(g, e, model=sd15(g, e)[0])
    return refused(f"{SUBJECT}: expected an SDXL MODEL", "got a SD1.5 model")


@case("subject-flux-model")
def _(g, e):
    subject_node(g, e, model=flux_model(g, e))
    return refused(f"{SUBJECT}: expected a SDXL UNet MODEL", r"got a Flux\w* model", "would never fire")


@case("subject-clip-vision-width")
def _(g, e):
    subject_node(g, e, clip_vision=g.node("CITestClipVision", width=96, seed=0).out(0))
    return refused(f"{SUBJECT}: expected a CLIP vision model with 128-wide features", "got one with 96-wide")


@case("subject-nan-image")
def _(g, e):
    subject_node(g, e, subject=nan_image(g))
    return refused(f"{SUBJECT}: expected subject_image without NaN or infinite values; got 3 of them")


@case("subject-1x1-image")
def _(g, e):
    n = subject_node(g, e, subject=empty_image(g, 1, 1))
    return works(patched_model(n.id))


@case("subject-rgba-image")
def _(g, e):
    rgba = g.node("JoinImageWithAlpha", image=noise(g, 40, 40), alpha=rect(g, 40, 40, 0, 0, 20, 40)).out(0)
    return works(patched_model(subject_node(g, e, subject=rgba).id))


@case("subject-empty-subject-mask")
def _(g, e):
    subject_node(g, e, subject_mask=solid(g, 48, 40, 0.0))
    return refused(f"{SUBJECT}: expected a subject_mask that marks the subject", "got an empty mask")


@case("subject-full-subject-mask")
def _(g, e):
    return works(patched_model(subject_node(g, e, subject_mask=solid(g, 48, 40, 1.0)).id))


@case("subject-1px-subject-mask")
def _(g, e):          # fewer than 10 mask pixels: the authors keep the whole frame
    return works(patched_model(subject_node(g, e, subject_mask=rect(g, 48, 40, 5, 5, 1, 1)).id))


@case("subject-mask-other-size")
def _(g, e):          # resized to the subject image (LoadImage's 64x64 stand-in mask)
    return works(patched_model(subject_node(g, e, subject_mask=rect(g, 64, 64, 8, 8, 30, 30)).id))


@case("subject-mask-batch-mismatch")
def _(g, e):
    subject_node(g, e, subject=noise(g, 48, 40, b=2), subject_mask=mask_batch(g, solid(g, 48, 40), 3))
    return refused(f"{SUBJECT}: expected one subject_mask, or one per subject image \\(2\\)", "got 3 masks")


@case("subject-empty-attn-mask")
def _(g, e):
    subject_node(g, e, attn_mask=solid(g, 64, 64, 0.0))
    return refused(f"{SUBJECT}: expected an attn_mask that marks where the subject acts", "got an empty attn_mask")


@case("subject-full-attn-mask")
def _(g, e):
    return works(patched_model(subject_node(g, e, attn_mask=solid(g, 64, 64, 1.0)).id))


@case("subject-1x1-attn-mask")
def _(g, e):
    return works(patched_model(subject_node(g, e, attn_mask=solid(g, 1, 1, 1.0)).id))


@case("subject-nan-attn-mask")
def _(g, e):
    subject_node(g, e, attn_mask=g.node("ImageToMask", image=nan_image(g), channel="red").out(0))
    return refused(f"{SUBJECT}: expected attn_mask without NaN or infinite values")


# Load LAR-Gen RefineNet ---------------------------------------------------------------------------------------------
def _rn_loader(g, e, **kw):
    return loader_node(g, "ConsistentInpaintRefineNetLoader", **{**dict(checkpoint=CKPT, dtype="float32"), **kw})


combo_cases("refinenet-loader", _rn_loader, [("checkpoint", RN_LOADER), ("dtype", RN_LOADER)])
for _name, _file, _words in [
        ("no-refinenet", "largen_no_refinenet_test.pth", r"holds no RefineNet"),
        ("hostile-pickle", "hostile.pth", r"hostile.pth could not be loaded safely"),
        ("hostile-zip-pickle", "hostile_zip.pt", r"cannot be loaded safely: builtins.getattr, pathlib.Path"),
        ("garbage", "garbage.safetensors", r"not a readable safetensors file"),
        ("patch-adapter-file", "patch_adapter_file.safetensors",
         r"is not a LAR-Gen checkpoint: it holds no SDXL UNet")]:
    def _fn(g, e, _file=_file, _words=_words):
        _rn_loader(g, e, checkpoint=_file)
        return refused(f"{RN_LOADER}: expected a LAR-Gen RefineNet", _words)
    CASES[f"refinenet-loader-{_name}"] = _fn


@case("refinenet-loader-own-format")
def _(g, e):
    n = _rn_loader(g, e, checkpoint="refinenet_test.safetensors")
    return works(lambda r: r.output(n.id).net.projector.in_features == CLIP_W or pytest.fail("projector"))


# Apply LAR-Gen RefineNet ------------------------------------------------------------------------------------------
percent_cases("refine", refine_node, REFINE)
range_cases("refine", refine_node, REFINE, [("subject_resolution", 32, pint), ("seed", -1, pint)])


@case("refine-flux-vae")
def _(g, e):
    refine_node(g, e, vae=g.node("VAELoader", vae_name=e["flux_vae"]).out(0))
    return refused(f"{REFINE}: expected a VAE of the model's family \\(SDXL: 4 latent channels\\)",
                   "got a VAE with 16 latent channels")


@case("refine-sd15-model")
def _(g, e):
    refine_node(g, e, model=sd15(g, e)[0])
    return refused(f"{REFINE}: expected an SDXL MODEL", "got a SD1.5 model")


@case("refine-flux-model")
def _(g, e):
    refine_node(g, e, model=flux_model(g, e))
    return refused(f"{REFINE}: expected a SDXL UNet MODEL", r"got a Flux\w* model")


@case("refine-clip-vision-width")
def _(g, e):
    refine_node(g, e, clip_vision=g.node("CITestClipVision", width=96, seed=0).out(0))
    return refused(f"{REFINE}: expected a CLIP vision model with 128-wide features", "got one with 96-wide")


@case("refine-sd15-clip")
def _(g, e):
    refine_node(g, e, clip=sd15(g, e)[1])
    return refused(f"{REFINE}: expected SDXL's CLIP \\(pooled width 1280\\)", "got a CLIP with pooled width")


@case("refine-nan-subject")
def _(g, e):
    refine_node(g, e, subject=nan_image(g))
    return refused(f"{REFINE}: expected subject_image without NaN or infinite values")


@case("refine-1x1-subject")
def _(g, e):
    return works(patched_model(refine_node(g, e, subject=empty_image(g, 1, 1)).id))


@case("refine-empty-subject-mask")
def _(g, e):
    refine_node(g, e, subject_mask=solid(g, 48, 40, 0.0))
    return refused(f"{REFINE}: expected a subject_mask that marks the subject", "got an empty mask")


@case("refine-full-subject-mask")
def _(g, e):
    return works(patched_model(refine_node(g, e, subject_mask=solid(g, 48, 40, 1.0)).id))


@case("refine-without-refinenet-file")
def _(g, e):
    refine_node(g, e, refinenet="largen_no_refinenet_test.pth")
    return refused(f"{RN_LOADER}: expected a LAR-Gen RefineNet", "holds no RefineNet")


# Crop To Mask -----------------------------------------------------------------------------------------------------
combo_cases("crop", lambda g, e, **kw: crop_node(g, **kw), [("padding", CROP)])
range_cases("crop", lambda g, e, **kw: crop_node(g, **kw), CROP,
            [("resolution", 7, pint), ("context_factor", 0.5, pfloat)])


@case("crop-empty-mask")
def _(g, e):
    crop_node(g, mask=solid(g, 64, 64, 0.0))
    return refused(f"{CROP}: expected a mask that marks the area to inpaint", "got an empty mask")


@case("crop-full-mask")
def _(g, e):
    n = crop_node(g, mask=solid(g, 64, 64, 1.0))
    return works(shapes(n.id, (1, 64, 64, 3), (1, 64, 64)))


@case("crop-1x1-image")
def _(g, e):
    n = crop_node(g, image=empty_image(g, 1, 1), mask=solid(g, 1, 1, 1.0))
    return works(shapes(n.id, (1, 64, 64, 3), (1, 64, 64)))


@case("crop-1px-mask")
def _(g, e):
    n = crop_node(g, mask=rect(g, 64, 64, 63, 63, 1, 1))
    return works(shapes(n.id, (1, 64, 64, 3), (1, 64, 64)))


@case("crop-mask-other-size")
def _(g, e):
    crop_node(g, mask=rect(g, 32, 32, 4, 4, 8, 8))
    return refused(f"{CROP}: expected the mask to be the size of the image; got: mask is 32x32 but image is 64x64")


@case("crop-nan-image")
def _(g, e):
    crop_node(g, image=nan_image(g))
    return refused(f"{CROP}: expected image without NaN or infinite values")


@case("crop-batch-mismatch")
def _(g, e):
    crop_node(g, image=noise(g, b=2), mask=mask_batch(g, rect(g, 64, 64, 8, 8, 8, 8), 3))
    return refused(f"{CROP}: expected a batch of 1 or 2 for mask; got: image batch is 2 but mask batch is 3")


@case("crop-one-mask-for-a-batch")
def _(g, e):
    n = crop_node(g, image=noise(g, b=2))
    return works(shapes(n.id, (2, 64, 64, 3), (2, 64, 64)))


@case("crop-resolution-linked-valid")
def _(g, e):
    n = crop_node(g, resolution=pint(g, 72))
    return works(shapes(n.id, (1, 72, 72, 3), (1, 72, 72)))


# Paste Back ---------------------------------------------------------------------------------------------------------
range_cases("paste", lambda g, e, **kw: paste_node(g, **kw), PASTE, [("feather", 300, pint), ("feather", -1, pint)])


@case("paste-round-trip")
def _(g, e):
    mask = rect(g, 64, 64, 16, 8, 24, 40)
    n, image, _ = paste_node(g, mask=mask, inpainted=noise(g, 64, 64, seed=9))
    capture(g, image, mask)
    return works(unchanged_outside(n.id, image[0], mask[0]))


@case("paste-other-image-size")
def _(g, e):
    image = noise(g)
    crop = crop_node(g, image=image)
    capture(g, g.node("ConsistentInpaintPasteBack", image=noise(g, 32, 64), inpainted=crop.out(0),
                      crop_info=crop.out(2), feather=4).out(0))
    return refused(f"{PASTE}: expected image to be the 64x64 image the crops were taken from; got a 32x64 image")


@case("paste-not-square")
def _(g, e):
    paste_node(g, inpainted=noise(g, 64, 48))
    return refused(f"{PASTE}: expected a square inpainted image", "got 64x48")


@case("paste-nan-inpainted")
def _(g, e):
    paste_node(g, inpainted=nan_image(g))
    return refused(f"{PASTE}: expected inpainted without NaN or infinite values")


@case("paste-batch-mismatch")
def _(g, e):
    paste_node(g, inpainted=noise(g, b=2))
    return refused(f"{PASTE}: expected inpainted with a batch of 1 \\(one per crop\\); got a batch of 2")


@case("paste-1x1")
def _(g, e):
    img = empty_image(g, 1, 1)
    n, _, _ = paste_node(g, image=img, mask=solid(g, 1, 1, 1.0), inpainted=noise(g, 64, 64))
    return works(shapes(n.id, (1, 1, 1, 3)))


@case("paste-full-mask")
def _(g, e):
    n, image, _ = paste_node(g, mask=solid(g, 64, 64, 1.0), inpainted=noise(g, 64, 64, seed=4), feather=0)
    return works(lambda r: not torch.equal(r.output(n.id), r.output(image[0])) or pytest.fail("unchanged"))


# Load Patch-Adapter -------------------------------------------------------------------------------------------------
def _pa_loader(g, e, **kw):
    return loader_node(g, "ConsistentInpaintPatchAdapterLoader", **{**dict(adapter="pa_sd15.safetensors",
                                                                           dtype="float32"), **kw})


combo_cases("pa-loader", _pa_loader, [("adapter", PA_LOADER), ("dtype", PA_LOADER)])
for _name, _file, _words in [
        ("foreign", "foreign.safetensors", r"not a Patch-Adapter file"),
        ("pickle", "not_safetensors.pth", r"dca.input.1.0 lacks to_k, to_v"),
        ("hostile-pickle", "hostile.pth", r"hostile.pth could not be loaded safely"),
        ("largen-file", "largen_file.pth", r"largen_file.pth is not a Patch-Adapter file")]:
    def _fn(g, e, _file=_file, _words=_words):
        _pa_loader(g, e, adapter=_file)
        return refused(f"{PA_LOADER}: expected a Patch-Adapter file", _words)
    CASES[f"pa-loader-{_name}"] = _fn


# Damaged weights (NaN, Inf, integer), a hostile pickle and broken files through every loader ------------------------
for _prefix, _stem, _build, _display in [
        ("largen-loader", "largen_bad", lambda g, e, f: _lg_loader(g, e, checkpoint=f), LOADER),
        ("refinenet-loader", "refinenet_bad", lambda g, e, f: _rn_loader(g, e, checkpoint=f), RN_LOADER),
        ("pa-loader", "pa_bad", lambda g, e, f: _pa_loader(g, e, adapter=f), PA_LOADER)]:
    for _how, _words in BAD_FILE_WORDS.items():
        def _fn(g, e, _stem=_stem, _how=_how, _words=_words, _build=_build, _display=_display):
            f = f"{_stem}_garbage.safetensors" if _how == "garbage_st" else f"{_stem}_{_how}.pt"
            _build(g, e, f)
            return refused(f"{_display}: expected ", *(re.escape(w) for w in _words))
        CASES[f"{_prefix}-damaged-{_how}"] = _fn


# Apply Patch-Adapter Dual Context -----------------------------------------------------------------------------------
percent_cases("dual", dual_node, DUAL)
range_cases("dual", dual_node, DUAL, [("strength", 5.0, pfloat), ("strength", -1.0, pfloat)])


@case("dual-empty-mask")
def _(g, e):
    dual_node(g, e, mask=solid(g, 64, 64, 0.0))
    return refused(f"{DUAL}: expected a mask with a hole to inpaint", "got an empty mask")


@case("dual-full-mask")
def _(g, e):
    dual_node(g, e, mask=solid(g, 64, 64, 1.0))
    return refused(f"{DUAL}: expected a mask that leaves part of the image known", "covers the whole image")


@case("dual-1x1-full-mask")
def _(g, e):
    dual_node(g, e, mask=solid(g, 1, 1, 1.0))
    return refused(f"{DUAL}: expected a mask that leaves part of the image known")


@case("dual-2x2-mask")
def _(g, e):
    return works(patched_model(dual_node(g, e, mask=rect(g, 2, 2, 0, 0, 1, 1)).id))


@case("dual-nan-mask")
def _(g, e):
    dual_node(g, e, mask=g.node("ImageToMask", image=nan_image(g), channel="red").out(0))
    return refused(f"{DUAL}: expected mask without NaN or infinite values")


@case("dual-rpa-only-file")
def _(g, e):
    dual_node(g, e, adapter="pa_sd15_rpa_only.safetensors")
    return refused(f"{DUAL}: expected a Patch-Adapter with Dual Context Adapter", "only Reference Patch Adapter")


@case("dual-sdxl-adapter-on-sd15")
def _(g, e):
    dual_node(g, e, adapter="pa_sdxl.safetensors")
    return refused(f"{DUAL}: expected a MODEL the Patch-Adapter fits", "SD1.5 model",
                   r"the file says it is for sdxl")


@case("dual-flux-model")
def _(g, e):
    dual_node(g, e, model=flux_model(g, e))
    return refused(f"{DUAL}: expected a SD1.5 / SDXL UNet MODEL", r"got a Flux\w* model")


@case("dual-strength-zero")
def _(g, e):          # strength 0: the input MODEL itself comes back
    n = dual_node(g, e, strength=0.0)
    return works(lambda r: r.output(n.id).wrappers == {} or pytest.fail(str(r.output(n.id).wrappers)))


# High-Res Patch Refine --------------------------------------------------------------------------------------------
combo_cases("hires", hires_node, [("sampler_name", HIRES), ("scheduler", HIRES)])
range_cases("hires", hires_node, HIRES, [("patch_size", 32, pint), ("steps", 0, pint), ("denoise", 1.5, pfloat),
                                         ("cfg", -1.0, pfloat), ("patch_batch", 0, pint),
                                         ("reference_context", 0.5, pfloat), ("overlap", -8, pint)])


@case("hires-overlap-not-below-patch-literal")
def _(g, e):
    hires_node(g, e, patch_size=64, overlap=64)
    return refused(f"{HIRES}: expected overlap smaller than patch_size \\(64\\)", "got overlap 64", at="validation")


@case("hires-overlap-not-below-patch-linked")
def _(g, e):
    hires_node(g, e, patch_size=pint(g, 64), overlap=pint(g, 96))
    return refused(f"{HIRES}: expected overlap smaller than patch_size \\(64\\)", "got overlap 96")


@case("hires-patch-not-multiple-linked")
def _(g, e):
    hires_node(g, e, patch_size=pint(g, 100))
    return refused(f"{HIRES}: patch_size 100 is not a multiple of the VAE's latent factor 8")


@case("hires-flux-vae")
def _(g, e):
    hires_node(g, e, vae=g.node("VAELoader", vae_name=e["flux_vae"]).out(0))
    return refused(f"{HIRES}: expected a VAE of the model's family \\(SD1.5: 4 latent channels\\)",
                   "got a VAE with 16 latent channels")


@case("hires-flux-model")
def _(g, e):
    hires_node(g, e, model=flux_model(g, e), vae=g.node("VAELoader", vae_name=e["flux_vae"]).out(0))
    return refused(f"{HIRES}: expected a SD1.5 / SDXL UNet MODEL", r"got a Flux\w* model", "would never fire")


@case("hires-sdxl-adapter-on-sd15")
def _(g, e):
    hires_node(g, e, adapter="pa_sdxl.safetensors")
    return refused(f"{HIRES}: expected a MODEL the Patch-Adapter fits", "the file says it is for sdxl")


@case("hires-tiny-reference")
def _(g, e):
    hires_node(g, e, reference=empty_image(g, 4, 3))
    return refused(f"{HIRES}: expected reference of at least 8x8 pixels", "got 4x3")


@case("hires-reference-aspect")
def _(g, e):
    hires_node(g, e, reference=noise(g, 64, 64))
    return refused(f"{HIRES}: expected a reference with the aspect ratio of the 128x96 image", "got a reference of 64x64")


@case("hires-mask-other-size")
def _(g, e):
    hires_node(g, e, mask=rect(g, 64, 64, 4, 4, 8, 8))
    return refused(f"{HIRES}: expected the mask to be the size of the image; got: mask is 64x64 but image is 128x96")


@case("hires-nan-image")
def _(g, e):
    hires_node(g, e, image=nan_image(g, 128, 96))
    return refused(f"{HIRES}: expected image without NaN or infinite values")


@case("hires-nan-reference")
def _(g, e):
    hires_node(g, e, reference=nan_image(g, 64, 48))
    return refused(f"{HIRES}: expected reference without NaN or infinite values")


@case("hires-batch-mismatch")
def _(g, e):
    img = noise(g, 128, 96, b=2)
    hires_node(g, e, image=img, mask=mask_batch(g, rect(g, 128, 96, 4, 4, 8, 8), 3))
    return refused(f"{HIRES}: expected a batch of 1 or 2 for mask; got: image batch is 2 but mask batch is 3")


@case("hires-empty-mask")
def _(g, e):
    image, mask = noise(g, 128, 96), solid(g, 128, 96, 0.0)
    n = hires_node(g, e, image=image, mask=mask)
    return works(lambda r: torch.equal(r.output(n.id), r.output(image[0])) or pytest.fail("changed"))


@case("hires-full-mask-64")
def _(g, e):
    image, mask = noise(g, 64, 64), solid(g, 64, 64, 1.0)
    capture(g, mask)
    n = hires_node(g, e, image=image, mask=mask, reference=noise(g, 32, 32, seed=2))
    return works(unchanged_outside(n.id, image[0], mask[0]))


@case("hires-1x1-image")
def _(g, e):
    image, mask = empty_image(g, 1, 1), solid(g, 1, 1, 1.0)
    capture(g, mask)
    n = hires_node(g, e, image=image, mask=mask, reference=noise(g, 8, 8, seed=2))
    return works(unchanged_outside(n.id, image[0], mask[0]))


# Downscale For Stage 1 --------------------------------------------------------------------------------------------
range_cases("down", lambda g, e, **kw: down_node(g, **kw), DOWN, [("megapixels", 0.0, pfloat),
                                                                   ("multiple_of", 0, pint)])


@case("down-1x1")
def _(g, e):
    n = down_node(g, image=empty_image(g, 1, 1), mask=solid(g, 1, 1, 1.0))
    return works(shapes(n.id, (1, 232, 232, 3), (1, 232, 232)))


@case("down-empty-mask")
def _(g, e):
    n = down_node(g, mask=solid(g, 96, 64, 0.0))
    return works(lambda r: float(r.output(n.id, 1).max()) == 0.0 or pytest.fail("mask not empty"))


@case("down-full-mask")
def _(g, e):
    n = down_node(g, mask=solid(g, 96, 64, 1.0))
    return works(lambda r: bool((r.output(n.id, 1) == 1).all()) or pytest.fail("mask not full"))


@case("down-mask-other-size")
def _(g, e):
    down_node(g, mask=solid(g, 64, 64, 1.0))
    return refused(f"{DOWN}: expected the mask to be the size of the image; got: mask is 64x64 but image is 96x64")


@case("down-nan-image")
def _(g, e):
    down_node(g, image=nan_image(g, 96, 64))
    return refused(f"{DOWN}: expected image without NaN or infinite values")


@case("down-batch-mismatch")
def _(g, e):
    down_node(g, image=noise(g, 96, 64, b=2), mask=mask_batch(g, solid(g, 96, 64, 1.0), 3))
    return refused(f"{DOWN}: expected a batch of 1 or 2 for mask; got: image batch is 2 but mask batch is 3")


@case("down-aspect-would-stretch")
def _(g, e):
    down_node(g, image=noise(g, 600, 100), mask=rect(g, 600, 100, 10, 10, 20, 20), multiple_of=64)
    return refused(f"{DOWN}: expected sides that are multiples of 64", "got 576x64 \\(aspect 9.0000 instead of 6.0000\\)")


@case("down-thin-image-keeps-aspect")
def _(g, e):
    n = down_node(g, image=noise(g, 1000, 8), mask=rect(g, 1000, 8, 10, 2, 20, 4), multiple_of=1)
    return works(lambda r: r.output(n.id).shape[1:3] == (20, 2560) or pytest.fail(str(r.output(n.id).shape)))


@case("down-megapixels-linked-valid")
def _(g, e):
    n = down_node(g, megapixels=pfloat(g, 0.0625))
    return works(lambda r: r.output(n.id).shape[1:3] == (208, 312) or pytest.fail(str(r.output(n.id).shape)))


def _order(name):
    """Cases that load the same big files run one after another: ComfyUI's cache keeps a loader's output only
    while consecutive prompts use it."""
    heavy = ("flux-model", "flux-vae", "sd15", "dual-", "hires-")
    return next((i for i, h in enumerate(heavy) if h in name), len(heavy)), name


@pytest.mark.parametrize("name", sorted(CASES, key=_order))
def test_bad_input(comfy, graph, env, name):
    outcome = CASES[name](graph, env)
    _run(comfy, graph, env, outcome)
    assert not env["marker"].exists() and not PWNED.exists()          # no pickle ever ran code


def test_matrix_covers_every_node_with_enough_cases():
    prefixes = {"largen-loader", "subject", "refinenet-loader", "refine", "crop", "paste", "pa-loader", "dual",
                "hires", "down"}
    for p in prefixes:
        assert sum(1 for n in CASES if n.startswith(p + "-")) >= 5, p
    assert len(CASES) >= 100


# -- the input MODEL is never modified -------------------------------------------------------------------------------
def _after(g, latent, dep):
    """``latent`` with its values unchanged (+ 0 x ``dep``), but computed only after the LATENT ``dep`` exists."""
    zero = g.node("LatentMultiply", samples=dep, multiplier=0.0).out(0)
    return g.node("LatentAdd", samples1=latent, samples2=zero).out(0)


def _sampler(g, model, cond, latent, steps=1, seed=0):
    return g.node("KSampler", model=model, seed=seed, steps=steps, cfg=4.0, sampler_name="euler", scheduler="normal",
                  positive=cond.out(0), negative=cond.out(1), latent_image=latent, denoise=1.0)


def _inpaint_setup(g, e, sdxl):
    if sdxl:
        model, adapter, cv = largen(g)
        vae, (pos, neg) = g.node("VAELoader", vae_name=e["vae"]).out(0), _cond(g, 2048, 1280)
    else:
        (model, _), adapter, cv = sd15(g, e), None, None
        vae, (pos, neg) = g.node("VAELoader", vae_name=e["taesd"]).out(0), _cond(g)
    image, mask = noise(g), rect(g, 64, 64, 16, 8, 24, 40)
    cond = g.node("InpaintModelConditioning", positive=pos, negative=neg, vae=vae, pixels=image, mask=mask,
                  noise_mask=True)
    return dict(model=model, adapter=adapter, cv=cv, vae=vae, pos=pos, neg=neg, image=image, mask=mask, cond=cond)


@pytest.mark.parametrize("node", ["subject", "refinenet", "dual", "hires"])
def test_input_model_samples_identically_after_the_patched_one_ran(comfy, graph, env, node):
    """One prompt, in a forced order: KSampler on the input MODEL, then the patching node's MODEL (High-Res Patch
    Refine: the node itself, which samples the patched MODEL inside), then KSampler on the input MODEL again: the two
    plain results are bit-identical, the patched one differs."""
    g, e = graph, env
    seed = ["subject", "refinenet", "dual", "hires"].index(node)     # no sampler result cached from another case
    s = _inpaint_setup(g, e, sdxl=node in ("subject", "refinenet"))
    m, cond = s["model"], s["cond"]
    before = _sampler(g, m, cond, cond.out(2), seed=seed)
    if node == "hires":
        image = g.node("ImageBlend", image1=s["image"], image2=g.node("VAEDecode", samples=before.out(0),
                                                                        vae=s["vae"]).out(0),
                       blend_factor=0.0, blend_mode="normal").out(0)            # the image, after `before` ran
        patched = hires_node(g, e, model=m, vae=s["vae"], image=image, mask=s["mask"],
                             reference=noise(g, 32, 32, seed=2), positive=s["pos"], negative=s["neg"])
        done = g.node("VAEEncode", pixels=patched.out(0), vae=s["vae"]).out(0)
    else:
        if node == "subject":
            pm = g.node("ConsistentInpaintApplySubjectAttention", model=m, subject_adapter=s["adapter"],
                        clip_vision=s["cv"], subject_image=noise(g, 48, 40, seed=5), weight=1.0, start_percent=0.0,
                        end_percent=1.0).out(0)
        elif node == "refinenet":
            rn = g.node("ConsistentInpaintRefineNetLoader", checkpoint=CKPT, dtype="float32").out(0)
            pm = g.node("ConsistentInpaintApplyRefineNet", model=m, refinenet=rn, vae=s["vae"], clip_vision=s["cv"],
                        subject_image=noise(g, 48, 40, seed=5), start_percent=0.0, end_percent=1.0,
                        subject_resolution=64, seed=0).out(0)
        else:
            ad = g.node("ConsistentInpaintPatchAdapterLoader", adapter="pa_sd15.safetensors", dtype="float32").out(0)
            pm = g.node("ConsistentInpaintApplyDualContext", model=m, patch_adapter=ad, mask=s["mask"], strength=1.0,
                        start_percent=0.0, end_percent=1.0).out(0)
        patched = _sampler(g, pm, cond, _after(g, cond.out(2), before.out(0)), seed=seed)
        done = patched.out(0)
    after = _sampler(g, m, cond, _after(g, cond.out(2), done), seed=seed)
    capture(g, after.out(0), s["image"])
    r = comfy.run_prompt(g, executor=e["ex"])           # loaders cached from the cases before; samplers all run
    order = r.executed
    assert order.index(before.id) < order.index(patched.id) < order.index(after.id)
    a, c = (r.output(n.id)["samples"] for n in (before, after))
    assert torch.equal(a, c)                                        # bit-identical: the input MODEL is untouched
    if node == "hires":
        assert not torch.equal(r.output(patched.id), r.output(s["image"][0]))
    else:
        assert not torch.allclose(r.output(patched.id)["samples"], a)


def test_dual_context_subject_attention_and_refinenet_stack_on_one_model(comfy, graph, env, monkeypatch):
    """LAR-Gen's SDXL UNet takes all three (the SDXL Patch-Adapter file is written for its sites): Dual Context, then
    subject attention (its attn2 replace wraps Dual Context's), then the RefineNet (attn1 patch) — and on every step
    each of them changes the attention it patches."""
    import sys
    lg = sys.modules[f"{comfy.pack_module.__name__}.nodes.largen"]
    pa = sys.modules[f"{comfy.pack_module.__name__}.nodes.patch_adapter"]
    fired = []

    def sigma(extra):
        return round(float(extra["sigmas"].max()), 4)

    def spy_term(orig):
        def term(self, q, k, v, site, extra):
            out = orig(self, q, k, v, site, extra)
            if out is not None and out.abs().amax() > 0:
                fired.append(("dual", site, sigma(extra)))
            return out
        return term

    def spy_subject(orig):
        def add_subject(self, text_out, q, k, v, site, extra):
            out = orig(self, text_out, q, k, v, site, extra)
            if not torch.equal(out, text_out):
                fired.append(("subject", site, sigma(extra)))
            return out
        return add_subject

    def spy_refine(orig):
        def attn1(self, n, ctx, val, extra):
            out = orig(self, n, ctx, val, extra)
            if out[1].shape[1] > ctx.shape[1]:
                fired.append(("refine", (*extra["block"], extra.get("block_index", 0)), sigma(extra)))
            return out
        return attn1

    monkeypatch.setattr(pa.DualContextPatch, "term", spy_term(pa.DualContextPatch.term))
    monkeypatch.setattr(lg.SubjectPatch, "add_subject", spy_subject(lg.SubjectPatch.add_subject))
    monkeypatch.setattr(lg.RefinePatch, "attn1", spy_refine(lg.RefinePatch.attn1))
    g, e = graph, env
    s = _inpaint_setup(g, e, sdxl=True)
    ad = g.node("ConsistentInpaintPatchAdapterLoader", adapter="pa_sdxl.safetensors", dtype="float32").out(0)
    m = g.node("ConsistentInpaintApplyDualContext", model=s["model"], patch_adapter=ad, mask=s["mask"], strength=1.0,
               start_percent=0.0, end_percent=1.0).out(0)
    subject = noise(g, 48, 40, seed=5)
    m = g.node("ConsistentInpaintApplySubjectAttention", model=m, subject_adapter=s["adapter"], clip_vision=s["cv"],
               subject_image=subject, weight=1.0, start_percent=0.0, end_percent=1.0).out(0)
    rn = g.node("ConsistentInpaintRefineNetLoader", checkpoint=CKPT, dtype="float32").out(0)
    m = g.node("ConsistentInpaintApplyRefineNet", model=m, refinenet=rn, vae=s["vae"], clip_vision=s["cv"],
               subject_image=subject, start_percent=0.0, end_percent=1.0, subject_resolution=64, seed=0).out(0)
    out = _sampler(g, m, s["cond"], s["cond"].out(2), steps=2)
    capture(g, out.out(0))
    r = comfy.run_prompt(g, executor=e["ex"])
    assert torch.isfinite(r.output(out.id)["samples"]).all()
    steps = sorted({sg for *_, sg in fired}, reverse=True)
    assert len(steps) == 2
    for kind in ("dual", "subject", "refine"):
        for sg in steps:
            sites = {site for k, site, x in fired if k == kind and x == sg}
            assert sites, (kind, sg)
    dual_sites = {site for k, site, _ in fired if k == "dual"}
    assert dual_sites == {site for k, site, _ in fired if k == "subject"}      # every cross-attention: both terms
