"""Zoom-in crop and paste-back: the square window, and the exactness of the paste-back outside the mask."""
import pytest
import torch
import torch.nn.functional as F

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
    with pytest.raises(ValueError, match="expected image to be the 32x32 image the crops were taken from; got a 31x32 image"):
        zoom.paste_back(image[:1, :, :, :31], crops, info, 0)
    with pytest.raises(ValueError, match=r"expected inpainted with a batch of 1 \(one per crop\); got a batch of 2"):
        zoom.paste_back(image[:1], torch.rand(2, 3, 64, 64), info, 0)
    with pytest.raises(ValueError, match=r"expected a square inpainted image .*; got \d+x\d+"):
        zoom.paste_back(image[:1], torch.rand(1, 3, 64, 48), info, 0)


def test_one_image_serves_every_crop():
    image = torch.rand(1, 3, 32, 32)
    masks = torch.cat([_mask(32, 32, (4, 8, 4, 8)), _mask(32, 32, (20, 30, 10, 28))])
    crops, _, info = zoom.crop_to_mask(image.expand(2, -1, -1, -1), masks, 1.3, 64)
    inpainted = torch.rand_like(crops)
    out = zoom.paste_back(image, inpainted, info, 4)
    assert torch.equal(out, zoom.paste_back(image.repeat(2, 1, 1, 1), inpainted, info, 4))
    assert not torch.equal(out[0], out[1])                        # each crop went back into its own copy
    with pytest.raises(ValueError, match=r"expected image with a batch of 1 or 2 .*; got a batch of 3"):
        zoom.paste_back(torch.rand(3, 3, 32, 32), inpainted, info, 4)


def test_prepare_subject_whitens_crops_and_squares():
    img = torch.zeros(1, 3, 50, 80)
    m = torch.zeros(1, 1, 50, 80)
    m[..., 10:30, 20:60] = 1                                      # a 20 x 40 subject
    img[..., 10:30, 20:60] = 0.25
    out = zoom.prepare_subject(img, m)
    side = out.shape[-1]
    # the authors crop rows 10..28 and columns 20..58 (their last index is a slice end): 19 x 39, then
    # int(39 * 1.02) = 39, the 19 rows padded 10 above and 10 below
    assert out.shape == (1, 3, side, side) and side == 39
    assert torch.all(out[..., :10, :] == 1) and torch.all(out[..., 29:, :] == 1)     # white padding
    assert torch.all(out[..., 10:29, :] == 0.25)
    whole = zoom.prepare_subject(torch.rand(2, 3, 30, 10), None)
    assert whole.shape == (2, 3, 30, 30) and torch.all(whole[..., :, :10] == 1)       # int(30 * 1.02) = 30
    with pytest.raises(ValueError, match="subject mask 0 is empty"):
        zoom.prepare_subject(img, torch.zeros_like(m))


# -- the authors' subject preprocessing (scepter largen_ui.data_preprocess_inpaint) -------------------------------
def _subject(h, w, H=160, W=160, y=5, x=7):
    """An image with a textured h x w subject at (y, x) and its binary mask."""
    img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(h * 1000 + w))
    m = torch.zeros(1, 1, H, W)
    m[..., y:y + h, x:x + w] = 1
    return img, m


@pytest.mark.parametrize("h, w, crop, side", [
    (21, 50, (20, 49), 49),        # int(49 * 1.02) = 49 (rounding up would give 50)
    (40, 131, (39, 130), 132),     # int(130 * 1.02) = int(132.6) = 132 (rounding up: 133)
    (101, 51, (100, 50), 102),     # int(100 * 1.02) = 102
])
def test_subject_square_sizes_are_the_authors(h, w, crop, side):
    img, m = _subject(h, w)
    crops = zoom.subject_crops(img, m)
    assert tuple(crops[0].shape[-2:]) == crop                       # first .. last mask row/column, last excluded
    sq = zoom.clip_square(crops[0])
    assert sq.shape[-2:] == (side, side) == (int(max(crop) * 1.02),) * 2
    top, left = (side - crop[0]) // 2, (side - crop[1]) // 2        # albumentations PadIfNeeded: centred, floor above
    assert torch.equal(sq[..., top:top + crop[0], left:left + crop[1]], img[..., 5:5 + crop[0], 7:7 + crop[1]])
    inner = torch.zeros(side, side, dtype=torch.bool)
    inner[top:top + crop[0], left:left + crop[1]] = True
    assert torch.all(sq[..., ~inner] == 1)


def test_subject_background_white_from_a_binarised_mask():
    img, m = _subject(30, 30)
    m[..., 5 + 3, 7 + 3] = 128 / 255                                # the authors binarise at > 128: background
    m[..., 5 + 4, 7 + 4] = 129 / 255                                # subject, kept as it is (not blended)
    crop = zoom.subject_crops(img, m)[0]
    assert torch.all(crop[..., 3, 3] == 1)
    assert torch.equal(crop[..., 4, 4], img[..., 9, 11])


def test_tiny_subject_masks_and_images():
    """Fewer than 10 mask pixels: the authors keep the whole frame (whitened); a 1x1 image is a 1x1 square."""
    img, m = _subject(3, 3, H=12, W=12)                             # 9 pixels
    crop = zoom.subject_crops(img, m)[0]
    assert crop.shape[-2:] == (12, 12) and torch.all(crop[..., 0, 0] == 1)
    assert zoom.clip_square(crop).shape[-1] == int(12 * 1.02) == 12
    one = zoom.prepare_subject(torch.rand(1, 3, 1, 1), None, size=224)
    assert one.shape == (1, 3, 224, 224) and torch.isfinite(one).all()
    assert zoom.refine_square(torch.rand(1, 3, 1, 1), 64).shape == (1, 3, 64, 64)
    line = torch.zeros(1, 1, 12, 12)
    line[..., 4, 1:11] = 1                                          # 10 pixels in one row: the authors' slice is empty
    assert zoom.subject_crops(img, line)[0].shape[-2:] == (1, 9)   # ours keeps that row


def test_clip_input_resized_bilinear_antialiased_as_torchvision():
    """The square to 224 as torchvision's Resize does on a float tensor (>= 0.17: bilinear, antialiased), which
    matches PIL's bilinear resize of a float image; bicubic (the former choice) is measurably different."""
    PIL = pytest.importorskip("PIL.Image")
    import numpy as np
    for h, w in ((60, 300), (21, 50)):                              # downscale (antialias matters) and upscale
        img, m = _subject(h, w, H=320, W=320)
        out = zoom.prepare_subject(img, m, size=224)
        sq = zoom.clip_square(zoom.subject_crops(img, m)[0])
        ref = torch.stack([torch.from_numpy(np.array(PIL.fromarray(sq[0, c].numpy(), mode="F")
                                                       .resize((224, 224), PIL.BILINEAR))) for c in range(3)])
        assert out.shape == (1, 3, 224, 224)
        torch.testing.assert_close(out[0], ref.clamp(0, 1), atol=2e-5, rtol=0)
        bicubic = F.interpolate(sq, size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        assert (bicubic - out).abs().max() > 1e-2


def test_refine_input_is_longest_side_resized_and_padded_white():
    """The RefineNet's subject: the crop without margin, longer side to the resolution (round, bilinear as cv2's
    INTER_LINEAR), padded white and centred."""
    cv2 = pytest.importorskip("cv2")
    import numpy as np
    img, m = _subject(20, 40)
    crop = zoom.subject_crops(img, m)[0]                            # 19 x 39
    out = zoom.refine_square(crop, 64)
    h = round(19 * 64 / 39)                                         # 31
    top = (64 - h) // 2
    assert out.shape == (1, 3, 64, 64) and h == 31 and top == 16
    assert torch.all(out[..., :top, :] == 1) and torch.all(out[..., top + h:, :] == 1)
    ref = cv2.resize(crop[0].permute(1, 2, 0).numpy().astype(np.float32), (64, h), interpolation=cv2.INTER_LINEAR)
    torch.testing.assert_close(out[0, :, top:top + h], torch.from_numpy(ref).permute(2, 0, 1).clamp(0, 1),
                               atol=1e-5, rtol=0)
