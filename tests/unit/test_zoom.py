"""Zoom-in crop and paste-back: the square window, and the exactness of the paste-back outside the mask."""
import pytest
import torch

from models import zoom


def _mask(h, w, box, batch=1):
    m = torch.zeros(batch, 1, h, w)
    y0, y1, x0, x1 = box
    m[..., y0:y1, x0:x1] = 1
    return m


@pytest.mark.parametrize("H,W,box,factor", [
    (300, 500, (100, 140, 200, 260), 1.3),      # interior
    (300, 500, (0, 30, 470, 500), 1.3),         # touching two borders: the square shifts inside
    (120, 800, (10, 100, 300, 600), 1.3),       # wider than the image is tall: padded vertically
    (64, 64, (0, 64, 0, 64), 2.0),              # the whole image, larger than itself: padded on all sides
    (301, 257, (150, 151, 100, 101), 1.3),      # a single pixel
])
def test_zoom_box_is_a_square_containing_the_box(H, W, box, factor):
    b = zoom.zoom_box(box, H, W, factor)
    t, btm, left, right = b.pad
    assert (b.y1 - b.y0) + t + btm == b.side == (b.x1 - b.x0) + left + right
    assert b.side >= factor * max(box[1] - box[0], box[3] - box[2]) - 1e-9
    assert 0 <= b.y0 <= box[0] and box[1] <= b.y1 <= H and 0 <= b.x0 <= box[2] and box[3] <= b.x1 <= W
    if b.side <= H:
        assert t == btm == 0          # padding only where the image is too small
    if b.side <= W:
        assert left == right == 0


def test_crop_round_trip_is_exact_outside_the_mask():
    torch.manual_seed(0)
    H, W = 173, 311
    image = torch.rand(2, 3, H, W)
    mask = torch.cat([_mask(H, W, (20, 60, 30, 90)), _mask(H, W, (100, 170, 250, 311))])
    mask[0, 0, 40, 40:50] = 0.4                                   # soft values are weights, still "inside"
    crops, cmask, info = zoom.crop_to_mask(image, mask, 1.3, 256)
    assert crops.shape == (2, 3, 256, 256) and cmask.shape == (2, 1, 256, 256)
    assert set(cmask.unique().tolist()) <= {0.0, 1.0} and cmask.sum() > 0
    inpainted = torch.rand_like(crops)                            # whatever the model made
    for feather in (0, 6):
        out = zoom.paste_back(image, inpainted, info, feather)
        outside = (mask == 0).expand_as(image)
        assert torch.equal(out[outside], image[outside])          # bit for bit
        assert not torch.allclose(out[~outside], image[~outside])  # and the hole changed


def test_identity_crop_pastes_back_what_was_there():
    torch.manual_seed(1)
    H, W = 96, 128
    image = torch.rand(1, 3, H, W)
    mask = _mask(H, W, (30, 70, 40, 80))
    crops, _, info = zoom.crop_to_mask(image, mask, 1.5, 60)      # 60 = the square's own size: no resampling
    assert info.boxes[0].side == 60
    out = zoom.paste_back(image, crops, info, 0)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


def test_padding_modes():
    image = torch.rand(1, 3, 40, 200)
    mask = _mask(40, 200, (5, 35, 50, 150))                        # square side 130 > height 40
    crops_edge, _, info = zoom.crop_to_mask(image, mask, 1.3, 130, "edge")
    crops_zero, cm, _ = zoom.crop_to_mask(image, mask, 1.3, 130, "zero")
    t = info.boxes[0].pad[0]
    assert t > 0
    assert torch.equal(crops_zero[..., :t - 2, :], torch.zeros_like(crops_zero[..., :t - 2, :]))
    assert torch.equal(crops_edge[..., 0, :], crops_edge[..., t, :])            # the first image row, repeated
    assert cm[..., :t - 2, :].sum() == 0                          # padding is never to be inpainted


def test_feather_weights():
    mask = _mask(50, 50, (10, 40, 10, 40))
    w = zoom.feather_weights(mask, 5)
    assert torch.equal(w[mask == 0], torch.zeros_like(w[mask == 0]))
    assert w[0, 0, 10, 25] == pytest.approx(0.2) and w[0, 0, 11, 25] == pytest.approx(0.4)
    assert w[0, 0, 25, 25] == 1
    edge = _mask(50, 50, (0, 20, 0, 50))                          # the image border is not a mask border
    assert zoom.feather_weights(edge, 5)[0, 0, 0, 25] == 1


def test_empty_mask_and_mismatches_are_clear():
    image = torch.rand(2, 3, 32, 32)
    mask = torch.cat([_mask(32, 32, (4, 8, 4, 8)), torch.zeros(1, 1, 32, 32)])
    with pytest.raises(ValueError, match="mask 1 of the batch is empty"):
        zoom.crop_to_mask(image, mask, 1.3, 64)
    crops, _, info = zoom.crop_to_mask(image[:1], mask[:1], 1.3, 64)
    with pytest.raises(ValueError, match="image is 31x32 but the crop was taken from a 32x32 image"):
        zoom.paste_back(image[:1, :, :, :31], crops, info, 0)
    with pytest.raises(ValueError, match="inpainted batch is 2 but 1 crops"):
        zoom.paste_back(image[:1], torch.rand(2, 3, 64, 64), info, 0)
    with pytest.raises(ValueError, match="must stay square"):
        zoom.paste_back(image[:1], torch.rand(1, 3, 64, 48), info, 0)


def test_prepare_subject_whitens_crops_and_squares():
    img = torch.zeros(1, 3, 50, 80)
    m = torch.zeros(1, 1, 50, 80)
    m[..., 10:30, 20:60] = 1                                      # a 20 x 40 subject
    img[..., 10:30, 20:60] = 0.25
    out = zoom.prepare_subject(img, m)
    side = out.shape[-1]
    assert out.shape == (1, 3, side, side) and side == 41         # ceil(40 * 1.02)
    assert torch.all(out[..., :5, :] == 1)                         # white padding above
    assert torch.allclose(out[..., 20, 20], torch.full((3,), 0.25))
    whole = zoom.prepare_subject(torch.rand(2, 3, 30, 10), None)
    assert whole.shape == (2, 3, 31, 31) and torch.all(whole[..., :, :5] == 1)
    with pytest.raises(ValueError, match="subject mask 0 is empty"):
        zoom.prepare_subject(img, torch.zeros_like(m))
