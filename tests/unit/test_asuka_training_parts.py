"""The pieces ASUKA's trainers are built from, without ComfyUI: the mask basis (odds, ratio range, kinds), the MAE's
token enlargement, colour jitter against a per-pixel colorsys / numpy re-computation, a harmonizing decoder shaped
from a VAE decoder, and the MAE's training prediction."""
import colorsys
import math

import numpy as np
import pytest
import torch

import layouts
from models import asuka_mae, harmonizing_decoder, imaging, masks
from models.regions import bounding_box
from models.weights import build_from_state_dict


def _bbox_filled(m: torch.Tensor) -> bool:
    box = bounding_box(m)
    return box is not None and bool(m[box[0]:box[1], box[2]:box[3]].all())


def test_asuka_mask_odds_and_ratio_range():
    g = torch.Generator().manual_seed(0)
    s = masks.AsukaMaskSettings()
    kinds, n = [], 500
    for _ in range(n):
        m, kind = masks.asuka_mask(48, 48, g, None, s)
        r = float(m.mean())
        assert s.ratio[0] <= r <= s.ratio[1], (kind, r)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        kinds.append(kind)
    for kind, p in zip(masks.ASUKA_KINDS, s.odds):
        assert abs(kinds.count(kind) / n - p) < 0.06, (kind, kinds.count(kind) / n)


def test_regular_masks_are_rectangles_or_their_complements():
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(40):
        m = masks.regular_mask(40, 56, g)
        rect, comp = _bbox_filled(m), _bbox_filled(1 - m)
        assert rect or comp
        seen.add("rect" if rect and float(m.mean()) < 0.9 else "complement")
    assert seen == {"rect", "complement"}


def test_object_masks_hold_a_moved_copy_of_the_shape_and_half_add_strokes():
    shape = torch.zeros(48, 48)
    shape[5:20, 8:18] = 1
    shape[12:20, 18:30] = 1               # an L, so flips are visible
    g = torch.Generator().manual_seed(2)
    extra = 0
    n = 200
    for _ in range(n):
        m = masks.asuka_kind_mask("object", 48, 48, g, shape)
        obj = shape[5:20, 8:30]
        found = False
        for o in (obj, obj.flip(-1)):
            hits = torch.nn.functional.conv2d(m[None, None], o[None, None])[0, 0]
            found |= bool((hits >= obj.sum() - 1e-6).any())
        assert found, "the object's shape is not in the mask"
        extra += float(m.sum()) > float(shape.sum())
    assert abs(extra / n - 0.5) < 0.12, extra / n


def test_irregular_styles_draw_both():
    g = torch.Generator().manual_seed(3)
    for f in (masks.lama_mask, masks.comod_mask):
        covers = [float(f(64, 64, g).mean()) for _ in range(20)]
        assert max(covers) > 0.02 and min(covers) < 0.9


def test_asuka_mask_rejects_unknown_kind():
    with pytest.raises(ValueError, match="object, irregular, regular"):
        masks.asuka_kind_mask("blob", 8, 8, torch.Generator())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fill_tokens_reaches_the_token_ratio_with_whole_patches(seed):
    g = torch.Generator().manual_seed(seed)
    hole = torch.zeros(64, 64)
    hole[10:21, 5:30] = 1
    out = masks.fill_tokens(hole, 8, 0.75, g)
    assert (out >= hole).all()
    tokens = out.reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
    touched = tokens.amax(dim=1) > 0
    assert int(touched.sum()) == math.ceil(0.75 * 64)
    added = (out - hole).reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
    for row, orig in zip(added, hole.reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)):
        if row.any() and not orig.any():
            assert row.all(), "an added token is not a whole patch"


def test_fill_tokens_leaves_large_holes_alone_and_checks_sizes():
    hole = torch.ones(32, 32)
    hole[:4, :4] = 0
    assert torch.equal(masks.fill_tokens(hole, 8, 0.75, torch.Generator()), hole)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        masks.fill_tokens(torch.zeros(30, 32), 8, 0.75, torch.Generator())


def test_hsv_round_trip_matches_colorsys():
    x = torch.rand(3, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x[:, 0, 0] = 0.5                                   # a grey pixel
    hsv = imaging.rgb_to_hsv(x)
    for y in range(7):
        for xx in range(9):
            want = colorsys.rgb_to_hsv(*x[:, y, xx].tolist())
            assert np.allclose(hsv[:, y, xx].numpy(), want, atol=1e-9)
    assert torch.allclose(imaging.hsv_to_rgb(hsv), x, atol=1e-9)


def _reference_jitter(x: np.ndarray, order, us, b, c, s, h) -> np.ndarray:
    """torchvision ColorJitter's four ops in numpy / colorsys, in the given order with factors from ``us``."""
    gray = lambda im: 0.299 * im[0] + 0.587 * im[1] + 0.114 * im[2]
    for op, u in zip(order, us):
        if op == 0:
            x = np.clip(x * (1 + b * u), 0, 1)
        elif op == 1:
            f = 1 + c * u
            x = np.clip(f * x + (1 - f) * gray(x).mean(), 0, 1)
        elif op == 2:
            f = 1 + s * u
            x = np.clip(f * x + (1 - f) * gray(x)[None], 0, 1)
        else:
            out = np.empty_like(x)
            for yy in range(x.shape[1]):
                for xx in range(x.shape[2]):
                    hh, ss, vv = colorsys.rgb_to_hsv(*x[:, yy, xx])
                    out[:, yy, xx] = colorsys.hsv_to_rgb((hh + h * u) % 1.0, ss, vv)
            x = np.clip(out, 0, 1)
    return x


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_color_jitter_matches_a_per_pixel_reference(seed):
    b, c, s, h = 0.15, 0.2, 0.1, 0.03
    img = torch.rand(2, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + seed))
    g = torch.Generator().manual_seed(seed)
    replay = torch.Generator().manual_seed(seed)
    out = imaging.color_jitter(img, g, b, c, s, h)
    for i in range(2):
        order = torch.randperm(4, generator=replay).tolist()
        us = [float(torch.rand((), generator=replay)) * 2 - 1 for _ in order]
        want = _reference_jitter(img[i].numpy(), order, us, b, c, s, h)
        assert np.allclose(out[i].numpy(), want, atol=1e-6)
    assert not torch.allclose(out, img)


def test_color_jitter_with_zero_strengths_is_the_identity():
    img = torch.rand(1, 3, 4, 4)
    assert torch.equal(imaging.color_jitter(img, torch.Generator(), 0, 0, 0, 0), img)


def test_condition_layers_for_the_sd_vae_are_the_released_layout():
    assert harmonizing_decoder.condition_layers((128, 256, 512, 512), 512) == (
        (4, 128, 3), (128, 256, 3), (256, 512, 4), (512, 512, 4), (512, 512, 4))


def test_decoder_shaped_from_a_vae_decoder_takes_its_weights_and_runs():
    sd = layouts.decoder_state_dict(z=4, ch=32, mult=(1, 2, 2), res_blocks=1, cond=(32, 64, 64, 64))
    vae_sd = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "up_layers."))}
    cfg = harmonizing_decoder.config_from_vae_decoder(vae_sd)
    assert cfg.cond_layers == ((4, 32, 3), (32, 64, 3), (64, 64, 4), (64, 64, 4))
    dec = harmonizing_decoder.HarmonizingDecoder(cfg)
    missing, unexpected = dec.load_state_dict(vae_sd, strict=False)
    assert not unexpected and missing and all(k.startswith("encoder.layers.") for k in missing)
    out = dec(torch.randn(1, 4, 8, 8), torch.rand(1, 3, 32, 32) * 2 - 1, torch.zeros(1, 1, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def _decoder_grads(checkpointing: bool):
    sd = layouts.decoder_state_dict(z=4, ch=32, mult=(1, 2), res_blocks=1, cond=(32, 64, 64))
    sd = harmonizing_decoder.convert_released(sd)
    dec = harmonizing_decoder.HarmonizingDecoder(harmonizing_decoder.config_from_state_dict(sd))
    dec.load_state_dict(sd)
    dec.checkpointing = checkpointing
    g = torch.Generator().manual_seed(0)
    z, img, m = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 16, 16, generator=g), torch.zeros(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 1
    loss = dec(z, img, m).square().mean()
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None}


def test_decoder_checkpointing_gives_the_same_gradients():
    (l0, g0), (l1, g1) = _decoder_grads(False), _decoder_grads(True)
    assert l0 == pytest.approx(l1, rel=1e-6) and g0.keys() == g1.keys()
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-6, rtol=1e-4), k


def _mae():
    sd = layouts.mae_state_dict(dim=96, depth=2, dec_dim=64, dec_depth=8, img=64, patch=8)
    cfg = asuka_mae.config_from_state_dict(sd)
    return build_from_state_dict(lambda **kw: asuka_mae.MAEPrior(cfg, **kw), sd, "mae", "mae", torch.float32)


def test_mae_training_prediction_is_the_reconstruction_before_denormalising():
    mae = _mae()
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    hole = torch.zeros(2, 1, 64, 64)
    hole[:, :, 8:40, 16:48] = 1
    pred, coverage = mae.predict(img, hole)
    _, rec = mae(img, hole)
    mean = torch.tensor(asuka_mae.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(asuka_mae.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose((pred * std + mean).clamp(0, 1), rec, atol=1e-6)
    assert coverage.shape == (2, 64) and float(coverage.max()) == 1.0


def test_mae_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        mae = _mae()
        for p in mae.parameters():
            p.requires_grad_(True)
        mae.checkpointing = flag
        img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        hole = torch.zeros(1, 1, 64, 64)
        hole[..., 20:50, 10:30] = 1
        mae.predict(img, hole)[0].square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in mae.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.0.attn.qkv.weight" in grads[0]
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4), k
