"""Patch-Adapter on tensors: DCA and RPA against float64 re-computations, the patch plan (coverage, alignment,
overlap, dilation), feathered blending and the exactness of the composite outside the mask, reference sampling
against F.interpolate, the reference region, the aspect check and the adapter file format."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import patch_adapter as pa
from models.layers import sdpa_attention, with_reference_tokens
from models.weights import CheckpointFormatError


def _linear(c, d):
    return torch.nn.Linear(c, d, bias=False).requires_grad_(False)


def _attn64(q, k, v, heads):
    """Multi-head attention written out per batch, head and query: softmax(q k^T / sqrt(d)) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    b, n, c = q.shape
    d = c // heads
    out = torch.empty(b, n, c, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            sl = slice(d * h, d * (h + 1))
            s = torch.einsum("nd,td->nt", q[bi, :, sl], k[bi, :, sl]) / math.sqrt(d)
            out[bi, :, sl] = torch.softmax(s, -1) @ v[bi, :, sl]
    return out


# -- the two equations -------------------------------------------------------------------------------------
def _dca_setup(seed=0, B=2, N=12, T=5, C=8, D=16):
    torch.manual_seed(seed)
    z, q = torch.randn(B, N, C), torch.randn(B, N, D)
    k, v = torch.randn(B, T, D), torch.randn(B, T, D)
    return z, q, k, v, _linear(C, D), _linear(D, D), _linear(D, D)


def _dca64(z, q, k, v, known, w_q, w_k, w_v, heads):
    """The paper's equations: Q' = [z (1 - M)] W_q; Z' = Attn(Q', K, V); Z'' = Attn(Q, Z' W_k, Z' W_v)."""
    q_ctx = (z.double() * known.double()) @ w_q.weight.double().T
    z_ctx = _attn64(q_ctx, k, v, heads)
    return _attn64(q, z_ctx @ w_k.weight.double().T, z_ctx @ w_v.weight.double().T, heads), z_ctx


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("kind", ["hard", "soft", "all_known"])
def test_dual_context_term_against_float64(heads, kind):
    z, q, k, v, w_q, w_k, w_v = _dca_setup()
    torch.manual_seed(1)
    known = {"hard": (torch.rand(1, 12, 1) > 0.5).float(), "soft": torch.rand(2, 12, 1),
             "all_known": torch.ones(1, 12, 1)}[kind]
    got = pa.dual_context_term(z, q, k, v, known, (w_q, w_k, w_v), heads)
    want, _ = _dca64(z, q, k, v, known, w_q, w_k, w_v, heads)
    assert got.shape == (2, 12, 16)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_dual_context_hidden_tokens_read_nothing_of_z():
    z, q, k, v, w_q, w_k, w_v = _dca_setup(seed=3)
    known = torch.ones(1, 12, 1)
    known[0, 4:9] = 0                                              # M = 1 on tokens 4..8
    seen = []

    def recording(*args):
        seen.append(sdpa_attention(*args))
        return seen[-1]

    base = pa.dual_context_term(z, q, k, v, known, (w_q, w_k, w_v), 2, attention=recording)
    # Q' of a hidden token is 0, so its Z' is the plain mean of V over the text tokens
    z_ctx = seen[0]
    torch.testing.assert_close(z_ctx[:, 4:9].double(), v.double().mean(1, keepdim=True).expand(-1, 5, -1),
                               atol=1e-6, rtol=1e-6)
    hidden = z.clone()
    hidden[:, 4:9] += 5 * torch.randn(2, 5, 8)
    assert torch.equal(pa.dual_context_term(hidden, q, k, v, known, (w_q, w_k, w_v), 2), base)
    shown = z.clone()
    shown[:, 0] += 5 * torch.randn(2, 8)
    assert not torch.allclose(pa.dual_context_term(shown, q, k, v, known, (w_q, w_k, w_v), 2), base, atol=1e-4)
    # with everything known the same perturbation of tokens 4..8 does reach the output
    full = torch.ones(1, 12, 1)
    assert not torch.allclose(pa.dual_context_term(hidden, q, k, v, full, (w_q, w_k, w_v), 2),
                              pa.dual_context_term(z, q, k, v, full, (w_q, w_k, w_v), 2), atol=1e-4)


def test_reference_patch_term_against_float64():
    torch.manual_seed(4)
    C, D, heads = 12, 16, 2
    q, ref = torch.randn(2, 10, D), torch.randn(2, 7, C)
    w_k, w_v = _linear(C, D), _linear(C, D)
    got = pa.reference_patch_term(q, ref, w_k, w_v, heads)
    r = ref.double()
    want = _attn64(q, r @ w_k.weight.double().T, r @ w_v.weight.double().T, heads)
    assert got.shape == (2, 10, D)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_reference_tokens_are_appended_after_own_tokens():
    torch.manual_seed(5)
    n = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    ctx, val = torch.randn(2, 6, 8, dtype=torch.bfloat16), torch.randn(2, 6, 8, dtype=torch.bfloat16)
    ref = torch.randn(2, 3, 8, dtype=torch.float64)
    q, k, v = with_reference_tokens(n, ctx, val, ref)
    assert q is n
    assert k.shape == v.shape == (2, 9, 8) and k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(k[:, :6], ctx) and torch.equal(v[:, :6], val)
    assert torch.equal(k[:, 6:], ref.to(torch.bfloat16)) and torch.equal(v[:, 6:], ref.to(torch.bfloat16))


# -- planning the patches ----------------------------------------------------------------------------------
def _coverage(boxes, H, W):
    cov = torch.zeros(H, W, dtype=torch.bool)
    for b in boxes:
        cov[b.slices()] = True
    return cov


def _starts(plan):
    return sorted({b.y0 for b in plan.grid}), sorted({b.x0 for b in plan.grid})


@pytest.mark.parametrize("H,W,patch,overlap,align", [
    (136, 200, 64, 16, 8), (200, 136, 64, 24, 8), (128, 192, 64, 16, 16), (24, 200, 64, 16, 8), (256, 256, 96, 32, 8)])
def test_plan_covers_aligns_and_overlaps(H, W, patch, overlap, align):
    torch.manual_seed(6)
    mask = (torch.rand(H, W) > 0.995).float()
    mask[0, 0] = mask[H - 1, W - 1] = 1                            # both corners of the image
    plan = pa.plan_patches(mask, patch, overlap, align)
    assert (plan.height, plan.width) == (H, W)
    for b in plan.grid:
        assert b.y0 % align == b.x0 % align == b.h % align == b.w % align == 0
        assert 0 <= b.y0 and b.y0 + b.h <= H and 0 <= b.x0 and b.x0 + b.w <= W
        assert (b.h, b.w) == (min(patch, H), min(patch, W))
    assert _coverage(plan.grid, H, W).all()
    assert set(plan.selected) <= set(plan.grid)
    assert list(plan.selected) == sorted(plan.selected, key=lambda b: (b.y0, b.x0))   # raster order
    ys, xs = _starts(plan)
    for starts, size in ((ys, plan.patch_h), (xs, plan.patch_w)):
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= overlap                          # neighbours overlap enough
    assert _coverage(plan.selected, H, W)[mask > 0].all()          # every masked pixel is in a selected patch


def test_plan_corner_masks_and_empty_mask():
    H, W = 136, 200
    for y, x in ((0, 0), (H - 1, W - 1), (0, W - 1), (H - 1, 0)):
        mask = torch.zeros(1, 1, H, W)
        mask[..., y, x] = 1
        plan = pa.plan_patches(mask, 64, 16, 8, dilate=0)
        assert len(plan.selected) == 1 and _coverage(plan.selected, H, W)[y, x]
    assert pa.plan_patches(torch.zeros(H, W), 64, 16, 8).selected == ()


def test_plan_image_smaller_than_patch():
    mask = torch.zeros(24, 40)
    mask[5, 7] = 1
    plan = pa.plan_patches(mask, 64, 16, 8)
    assert plan.grid == plan.selected == (pa.PatchBox(0, 0, 24, 40),)


def test_plan_pads_unaligned_sizes_and_covers_the_last_row_and_column():
    mask = torch.zeros(44, 61)
    mask[43, 60] = 1
    plan = pa.plan_patches(mask, 32, 8, 8)
    assert (plan.height, plan.width) == (48, 64)
    assert all(b.y0 + b.h <= 48 and b.x0 + b.w <= 64 for b in plan.grid)
    assert _coverage(plan.selected, 48, 64)[43, 60] and plan.selected


@pytest.mark.parametrize("dilate", [0, 8, 16, 24])
def test_plan_on_cells_equals_a_pixel_dilation(dilate):
    """With dilation a multiple of the alignment the plan tests 8x8 cells; that must equal dilating the pixels."""
    torch.manual_seed(dilate)
    H, W = 203, 317
    for _ in range(5):
        mask = torch.zeros(H, W)
        for _ in range(3):
            y, x = torch.randint(0, H, ()).item(), torch.randint(0, W, ()).item()
            mask[y:y + torch.randint(1, 9, ()).item(), x:x + torch.randint(1, 9, ()).item()] = 0.3
        plan = pa.plan_patches(mask, 64, 16, 8, dilate=dilate)
        grown = F.max_pool2d(F.pad(mask, (0, plan.width - W, 0, plan.height - H))[None, None], 2 * dilate + 1,
                             stride=1, padding=dilate)[0, 0] > 0
        want = tuple(b for b in plan.grid if grown[b.y0:b.y0 + b.h, b.x0:b.x0 + b.w].any())
        assert plan.selected == want


def test_crop_padded_and_union_box():
    t = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    inside = pa.crop_padded(t, pa.PatchBox(1, 2, 3, 4))
    assert torch.equal(inside, t[..., 1:4, 2:6])
    edge = pa.crop_padded(t, pa.PatchBox(2, 4, 8, 8))
    assert edge.shape == (1, 2, 8, 8)
    assert torch.equal(edge[..., :3, :3], t[..., 2:, 4:])
    assert torch.equal(edge[..., 5, 7], t[..., 4, 6])                     # replicated corner
    zero = pa.crop_padded(t, pa.PatchBox(2, 4, 8, 8), mode="constant")
    assert zero[..., 3:, :].abs().sum() == 0 and zero[..., :, 3:].abs().sum() == 0
    u = pa.union_box([pa.PatchBox(8, 16, 8, 8), pa.PatchBox(0, 24, 32, 8)])
    assert u == pa.PatchBox(0, 16, 32, 16)


def test_canvas_over_a_region_composites_like_the_whole_canvas():
    torch.manual_seed(3)
    H, W, ov = 192, 256, 16
    mask = torch.zeros(H, W)
    mask[90:110, 120:160] = torch.rand(20, 40) + 0.01
    plan = pa.plan_patches(mask, 48, ov, 8)
    region = pa.union_box(plan.selected)
    assert region.h * region.w < H * W
    whole, part = pa.PatchCanvas(3, H, W, ov), pa.PatchCanvas(3, H, W, ov, region)
    for b in plan.selected:
        px = torch.rand(3, b.h, b.w)
        whole.add(b, px)
        part.add(b, px)
    image = torch.rand(3, H, W)
    a = image.clone()
    whole.composite_into(a, image, mask)
    out = image.permute(1, 2, 0).clone()                           # a strided view is written through
    part.composite_into(out.permute(2, 0, 1), image, mask, band=7)
    assert torch.allclose(out.permute(2, 0, 1), a, atol=1e-6)
    assert torch.equal(out.permute(2, 0, 1)[:, mask == 0], image[:, mask == 0])
    with pytest.raises(ValueError, match="outside the canvas region"):
        part.add(pa.PatchBox(0, 0, 8, 8), torch.zeros(3, 8, 8))
    stray = mask.clone()
    stray[0, 0] = 1                                                # a masked pixel no planned patch covers
    with pytest.raises(RuntimeError, match="uncovered"):
        part.composite_into(image.permute(1, 2, 0).clone(), image, stray)


@pytest.mark.parametrize("transpose", [False, True])
def test_plan_dilation_selects_near_patches_only(transpose):
    # W = 256, patch 64, overlap 16: columns [0,64) [48,112) [96,160) [144,208) [192,256)
    def plan(col, dilate):
        mask = torch.zeros(64, 256)
        mask[30, col] = 1
        p = pa.plan_patches(mask.T if transpose else mask, 64, 16, 8, dilate=dilate)
        return sorted(b.y0 if transpose else b.x0 for b in p.selected)

    assert plan(40, 0) == [0]
    assert plan(40, 7) == [0] and plan(40, 8) == [0, 48]           # 8 pixels left of the patch at 48
    assert plan(40, None) == [0, 48]                               # default: dilate by the overlap
    assert plan(120, 8) == [96] and plan(120, 9) == [48, 96]       # 9 pixels right of the patch ending at 111
    assert plan(120, 23) == [48, 96] and plan(120, 24) == [48, 96, 144]


@pytest.mark.parametrize("patch,overlap,align,words", [
    (60, 16, 8, ["patch_size 60", "8"]), (64, 12, 8, ["overlap 12", "8"]),
    (64, 64, 8, ["overlap \\(64\\)", "patch_size \\(64\\)"]), (64, 80, 8, ["overlap \\(80\\)", "\\(64\\)"])])
def test_check_patch_settings(patch, overlap, align, words):
    with pytest.raises(ValueError) as err:
        pa.check_patch_settings(patch, overlap, align)
    for w in words:
        assert err.match(w)
    pa.check_patch_settings(64, 16, 8)                              # valid settings pass


# -- blending ----------------------------------------------------------------------------------------------
def _ramp64(start, length, size, overlap):
    """Independent weight along one axis: min(1, distance from an inner side / (overlap + 1))."""
    w = torch.ones(length, dtype=torch.float64)
    for i in range(length):
        if start > 0:
            w[i] = min(w[i], (i + 1) / (overlap + 1))
        if start + length < size:
            w[i] = min(w[i], (length - i) / (overlap + 1))
    return w


def test_patch_weights_ramp_inside_and_flat_at_borders():
    H, W, ov = 160, 160, 16
    for box in (pa.PatchBox(0, 0, 64, 64), pa.PatchBox(48, 48, 64, 64), pa.PatchBox(96, 96, 64, 64),
                pa.PatchBox(0, 96, 64, 64)):
        w = pa.patch_weights(box, H, W, ov)
        assert w.shape == (64, 64) and (w > 0).all() and (w <= 1).all()
        assert (w[ov:-ov, ov:-ov] == 1).all()
        want = _ramp64(box.y0, 64, H, ov)[:, None] * _ramp64(box.x0, 64, W, ov)[None, :]
        torch.testing.assert_close(w.double(), want, atol=1e-6, rtol=0)
        if box.y0 == 0:
            assert (w[0, ov:-ov] == 1).all()                        # flat at the top border
        else:
            d = w[:ov, 32].double().diff()                          # a linear rise on an inner side
            assert (d > 0).all() and torch.allclose(d, d[0].expand_as(d))


def _plan_and_canvas(H=160, W=160, ov=16):
    mask = torch.zeros(H, W)
    mask[40:120, 30:130] = 1
    mask[60:70, 60:70] = 0.4                                       # soft values
    plan = pa.plan_patches(mask, 64, ov, 8)
    assert len(plan.selected) > 4
    return mask, plan, pa.PatchCanvas(3, H, W, ov)


def test_blend_is_normalised_weighted_average():
    mask, plan, canvas = _plan_and_canvas()
    torch.manual_seed(7)
    colours = torch.rand(len(plan.selected), 3)
    num, den = torch.zeros(3, 160, 160, dtype=torch.float64), torch.zeros(160, 160, dtype=torch.float64)
    for b, c in zip(plan.selected, colours):
        canvas.add(b, c[:, None, None].expand(3, b.h, b.w))
        w = _ramp64(b.y0, b.h, 160, 16)[:, None] * _ramp64(b.x0, b.w, 160, 16)[None, :]
        ys, xs = b.slices()
        num[:, ys, xs] += c.double()[:, None, None] * w
        den[ys, xs] += w
    cov = den > 0
    blend = canvas.read(pa.PatchBox(0, 0, 160, 160), torch.full((3, 160, 160), -1.0))
    assert torch.equal((blend != -1).all(0), cov)                  # the blend exactly where a patch landed
    torch.testing.assert_close(blend[:, cov].double(), (num / den.clamp_min(1e-300))[:, cov], atol=1e-6, rtol=0)
    assert (blend[:, ~cov] == -1).all()


def test_composite_constant_patches_and_exact_outside():
    mask, plan, canvas = _plan_and_canvas()
    colour = torch.tensor([0.2, 0.5, 0.9])
    for b in plan.selected:
        canvas.add(b, colour[:, None, None].expand(3, b.h, b.w))
    torch.manual_seed(8)
    image = torch.rand(3, 160, 160)
    out = image.clone()
    canvas.composite_into(out, image, mask)
    outside = (mask == 0).expand_as(image)
    assert torch.equal(out[outside], image[outside])                # bit for bit
    hard = mask == 1
    torch.testing.assert_close(out[:, hard], colour[:, None].expand(3, int(hard.sum())), atol=1e-6, rtol=0)
    soft = out[:, 60:70, 60:70]                                     # image * (1 - m) + blend * m
    torch.testing.assert_close(soft, image[:, 60:70, 60:70] * 0.6 + colour[:, None, None] * 0.4, atol=1e-6, rtol=0)


def test_composite_refuses_uncovered_mask_and_read_falls_back():
    mask, plan, canvas = _plan_and_canvas()
    first = plan.selected[0]
    canvas.add(first, torch.full((3, first.h, first.w), 0.7))
    with pytest.raises(RuntimeError, match="uncovered"):
        image = torch.rand(3, 160, 160)
        canvas.composite_into(image.clone(), image, mask)
    box = pa.PatchBox(first.y0, first.x0, first.h + 32, first.w + 32)
    fallback = torch.rand(3, box.h, box.w)
    got = canvas.read(box, fallback)
    torch.testing.assert_close(got[:, :first.h, :first.w], torch.full((3, first.h, first.w), 0.7), atol=1e-6, rtol=0)
    assert torch.equal(got[:, first.h:], fallback[:, first.h:])
    assert torch.equal(got[:, :, first.w:], fallback[:, :, first.w:])


# -- the reference -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("ref_hw,HW", [((16, 24), (32, 48)), ((16, 24), (64, 96)), ((24, 40), (60, 100)),
                                       ((24, 40), (72, 120))])
def test_sample_reference_equals_interpolate_crop(mode, ref_hw, HW):
    torch.manual_seed(9)
    ref = torch.rand(2, 3, *ref_hw)
    H, W = HW
    full = F.interpolate(ref, (H, W), mode=mode, align_corners=False)
    for box in (pa.PatchBox(8, 8, 16, 24), pa.PatchBox(0, 0, 16, 16), pa.PatchBox(H - 16, W - 24, 16, 24),
                pa.PatchBox(0, W - 8, H, 8), pa.PatchBox(0, 0, H, W)):
        got = pa.sample_reference(ref, box, H, W, mode=mode)
        ys, xs = box.slices()
        assert got.shape == (2, 3, box.h, box.w)
        torch.testing.assert_close(got, full[..., ys, xs], atol=1e-5, rtol=0)


@pytest.mark.parametrize("box,context,cap", [
    (pa.PatchBox(48, 96, 64, 64), 1.5, (8, 8)), (pa.PatchBox(0, 0, 64, 64), 2.0, (8, 8)),
    (pa.PatchBox(192, 336, 64, 64), 1.5, (8, 8)), (pa.PatchBox(96, 0, 64, 128), 3.0, (8, 16)),
    (pa.PatchBox(0, 0, 256, 400), 1.0, (32, 50)), (pa.PatchBox(40, 80, 64, 96), 8.0, (4, 6))])
def test_reference_region(box, context, cap):
    H, W, ref_h, ref_w = 256, 400, 16, 25                           # stage-1 latent of a 128x200 result
    region, size = pa.reference_region(box, H, W, ref_h, ref_w, context, cap)
    sy, sx = ref_h / H, ref_w / W
    assert region.h == min(ref_h, math.ceil(box.h * sy * context))
    assert region.w == min(ref_w, math.ceil(box.w * sx * context))
    assert 0 <= region.y0 and region.y0 + region.h <= ref_h and 0 <= region.x0 and region.x0 + region.w <= ref_w
    cy, cx = (box.y0 + box.h / 2) * sy, (box.x0 + box.w / 2) * sx
    assert region.y0 <= cy <= region.y0 + region.h and region.x0 <= cx <= region.x0 + region.w
    assert 1 <= size[0] <= min(cap[0], region.h) and 1 <= size[1] <= min(cap[1], region.w)
    assert size[0] / size[1] == pytest.approx(region.h / region.w, rel=1.0 / min(size) + 1e-9)


@pytest.mark.parametrize("ref,img", [((768, 1024), (3000, 4000)), ((810, 1216), (2000, 3000)),
                                     ((811, 1216), (2000, 3000)), ((1024, 1024), (1024, 1024))])
def test_reference_aspect_accepts_downscales(ref, img):
    pa.check_reference_aspect(*ref, *img)


@pytest.mark.parametrize("ref,img", [((1024, 1024), (2048, 4096)), ((768, 1024), (4000, 3000))])
def test_reference_aspect_rejects_other_framing(ref, img):
    with pytest.raises(ValueError) as err:
        pa.check_reference_aspect(*ref, *img)
    assert err.match(f"{ref[1]}x{ref[0]}") and err.match(f"{img[1]}x{img[0]}")


# -- the file format ---------------------------------------------------------------------------------------
def _weights(base="sdxl"):
    torch.manual_seed(10)
    dca = {("input", 4, 0): {"to_q": torch.randn(16, 8), "to_k": torch.randn(16, 16), "to_v": torch.randn(16, 16)},
           ("middle", 0, 1): {"to_q": torch.randn(32, 20), "to_k": torch.randn(32, 32), "to_v": torch.randn(32, 32)}}
    rpa = {("output", 3, 1): {"to_k": torch.randn(24, 12), "to_v": torch.randn(24, 12), "gate": torch.randn(1)}}
    return pa.AdapterWeights(dca=dca, rpa=rpa, base=base)


def test_format_round_trip_and_widths():
    w = _weights()
    sd, meta = pa.adapter_state_dict(w)
    assert "dca.input.4.0.to_q.weight" in sd and "rpa.output.3.1.gate" in sd and len(sd) == 9
    got = pa.parse_patch_adapter(sd, "/somewhere/pa_sdxl.safetensors", meta)
    assert got.base == "sdxl"
    for stage in ("dca", "rpa"):
        mine, theirs = getattr(w, stage), getattr(got, stage)
        assert set(mine) == set(theirs)
        for site in mine:
            assert set(mine[site]) == set(theirs[site])
            assert all(torch.equal(mine[site][p], theirs[site][p]) for p in mine[site])
    assert got.widths("dca") == {("input", 4, 0): (8, 16), ("middle", 0, 1): (20, 32)}
    assert got.widths("rpa") == {("output", 3, 1): (12, 24)}
    assert pa.parse_patch_adapter(sd, "x.safetensors").base is None


def _edit(fn):
    sd, meta = pa.adapter_state_dict(_weights())
    fn(sd, meta)
    return sd, meta


@pytest.mark.parametrize("edit,pattern", [
    (lambda sd, m: sd.update({"model.foo.weight": torch.zeros(2)}),
     r"pa\.safetensors is not a Patch-Adapter.*model\.foo\.weight"),
    (lambda sd, m: sd.clear(), "holds no Patch-Adapter tensors"),
    (lambda sd, m: sd.pop("dca.input.4.0.to_v.weight"), r"dca\.input\.4\.0 lacks to_v"),
    (lambda sd, m: sd.update({"dca.input.4.0.to_k.weight": torch.zeros(16, 8)}),
     r"to_k\.weight has shape \(16, 8\); expected \(16, 16\)"),
    (lambda sd, m: sd.update({"rpa.output.3.1.to_v.weight": torch.zeros(12, 24)}),
     r"to_v\.weight has shape \(12, 24\); expected \(24, 12\)"),
    (lambda sd, m: sd.update({"rpa.output.3.1.gate": torch.zeros(2)}), r"gate must hold one number.*\(2,\)"),
    (lambda sd, m: m.update({"format": "consistent_inpaint.largen"}), "says it is 'consistent_inpaint.largen'"),
    (lambda sd, m: m.update({"base": "sd3"}), "base 'sd3' is not one of sd15, sdxl"),
    # a part of the other stage: the listing of foreign keys says DCA has no gate and RPA no to_q
    (lambda sd, m: sd.update({"dca.input.4.0.gate": torch.zeros(1)}), r"dca\.input\.4\.0\.gate"),
    (lambda sd, m: sd.update({"rpa.output.3.1.to_q.weight": torch.zeros(24, 12)}), r"rpa\.output\.3\.1\.to_q"),
], ids=["foreign_key", "empty", "missing_to_v", "dca_to_k_shape", "rpa_to_v_shape", "gate_two_numbers",
        "other_format", "unknown_base", "dca_gate", "rpa_to_q"])
def test_format_errors(edit, pattern):
    sd, meta = _edit(edit)
    with pytest.raises(CheckpointFormatError, match=pattern):
        pa.parse_patch_adapter(sd, "/models/patch_adapter/pa.safetensors", meta)
