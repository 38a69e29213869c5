"""PainterNet's training masks (eq. 6, Algorithm 1): dilation against a plain loop, the box, the irregular
mask, the 25/50/25 mix, and bad input."""
import numpy as np
import pytest
import torch

from models import masks
from models.regions import bounding_box


def _seg(H=48, W=40, box=(10, 22, 12, 30)):
    m = torch.zeros(H, W)
    m[box[0]:box[1], box[2]:box[3]] = 1
    return m


def _dilate_loop(m: np.ndarray, k: int, it: int) -> np.ndarray:
    r = k // 2
    for _ in range(it):
        out = np.zeros_like(m)
        H, W = m.shape
        for y in range(H):
            for x in range(W):
                out[y, x] = m[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].max()
        m = out
    return m


@pytest.mark.parametrize("k,it", [(1, 1), (3, 1), (5, 2), (7, 3)])
def test_dilate_equals_a_plain_loop(k, it):
    g = torch.Generator().manual_seed(k * 10 + it)
    m = (torch.rand(23, 31, generator=g) > 0.93).float()
    assert np.array_equal(masks.dilate(m, k, it).numpy(), _dilate_loop(m.numpy(), k, it))


def test_dilate_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        masks.dilate(_seg(), 4)


def test_box_contains_the_object_and_stays_within_the_expansion():
    seg = _seg()
    s = masks.PainterMaskSettings()
    for seed in range(40):
        box = masks.box_mask(seg, torch.Generator().manual_seed(seed), s)
        t, b, l, r = bounding_box(box)
        assert box[t:b, l:r].all() and box.sum() == (b - t) * (r - l)          # one filled rectangle
        assert t <= 10 and l <= 12 and b >= 22 and r >= 30                    # holds the object's box
        assert 10 - t <= round(s.box_expand * 12) and b - 22 <= round(s.box_expand * 12)
        assert 12 - l <= round(s.box_expand * 18) and r - 30 <= round(s.box_expand * 18)


def test_irregular_covers_the_dilated_object_and_adds_strokes():
    seg = _seg(96, 96, (40, 48, 44, 52))          # a small object: kernels up to 5, strokes up to 24 px long
    widest = masks.dilate(seg, 5, masks.PainterMaskSettings().max_iterations)
    grew = 0
    for seed in range(20):
        irr = masks.irregular_mask(seg, torch.Generator().manual_seed(seed))
        assert set(irr.unique().tolist()) <= {0.0, 1.0}
        assert (irr >= masks.dilate(seg, 3)).all()            # at least the smallest dilation
        grew += int((irr > widest).any())
    assert grew >= 10                                         # strokes reach beyond any dilation in most draws


def test_line_is_painted_along_its_length_and_not_beyond_its_width():
    m = torch.zeros(40, 40)
    masks.draw_line(m, (10.0, 5.0), (10.0, 35.0), 4.0)
    assert m[8:12, 5:35].all()                       # pixel centres within 2 px of the segment
    assert not m[:7].any() and not m[14:].any()      # nothing 3.5 px or more away


def test_mix_follows_the_paper_probabilities():
    seg = _seg(16, 16, (4, 10, 5, 12))
    g = torch.Generator().manual_seed(0)
    n = 2000
    counts = {k: 0 for k in masks.PAINTER_KINDS}
    for _ in range(n):
        _, kind = masks.painter_mask(seg, g)
        counts[kind] += 1
    for kind, p in zip(masks.PAINTER_KINDS, (0.25, 0.5, 0.25)):
        assert abs(counts[kind] / n - p) < 0.035, counts


def test_segmentation_kind_returns_the_mask_itself():
    seg = _seg()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        m, kind = masks.painter_mask(seg, g)
        if kind == "segmentation":
            assert torch.equal(m, seg)
            return
    pytest.fail("no segmentation draw in 30")


def test_empty_object_gives_an_empty_box_and_irregular_mask():
    z = torch.zeros(20, 20)
    g = torch.Generator().manual_seed(1)
    assert masks.box_mask(z, g).sum() == 0 and masks.irregular_mask(z, g).sum() == 0


@pytest.mark.parametrize("bad,msg", [(torch.zeros(1, 8, 8), r"\[H, W\]"), (torch.full((8, 8), float("nan")), "NaN")])
def test_bad_segmentation_masks_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        masks.painter_mask(bad, torch.Generator())


def test_random_blob_coverage():
    for seed in range(10):
        b = masks.random_blob(64, 80, torch.Generator().manual_seed(seed), (0.1, 0.2))
        assert 0.08 <= float(b.mean()) <= 0.22


@pytest.mark.parametrize("k,it", [(3, 1), (5, 2), (9, 3)])
def test_dilate_equals_opencv(k, it):
    """Algorithm 1 dilates with cv2.dilate; ours is the same operation."""
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(k + it)
    m = (torch.rand(37, 29, generator=g) > 0.95).float()
    want = cv2.dilate(m.numpy().astype(np.uint8), np.ones((k, k), np.uint8), iterations=it)
    assert np.array_equal(masks.dilate(m, k, it).numpy().astype(np.uint8), want)


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="box, irregular, segmentation"):
        masks.kind_mask(_seg(), "circle", torch.Generator())
