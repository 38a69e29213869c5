"""The shared helpers of models/sites.py and models/regions.py: site keys, UNet level grids, bounding boxes, tile
starts and feather ramps."""
import pytest
import torch

from models.regions import bounding_box, feather_ramp, tile_starts
from models.sites import latent_grid, site_name, site_of, site_order


@pytest.mark.parametrize("tokens,h,w,want", [(16384, 128, 128, (128, 128)), (1024, 128, 128, (32, 32)),
                                             (12 * 9, 45, 33, (12, 9)), (45 * 33, 45, 33, (45, 33))])
def test_latent_grid(tokens, h, w, want):
    assert latent_grid(tokens, h, w) == want


def test_latent_grid_rejects_foreign_counts():
    with pytest.raises(ValueError, match="cannot place 77"):
        latent_grid(77, 64, 64)


def test_site_of_reads_block_and_block_index():
    assert site_of({"block": ("output", 3), "block_index": 1}) == ("output", 3, 1)
    assert site_of({"block": ("middle", 0)}) == ("middle", 0, 0)
    assert site_of({"n_heads": 8}) is None
    assert site_name(("output", 3, 1)) == "output_3_1"
    sites = [("output", 0, 0), ("input", 4, 1), ("middle", 0, 0), ("input", 4, 0)]
    assert sorted(sites, key=site_order) == [("input", 4, 0), ("input", 4, 1), ("middle", 0, 0), ("output", 0, 0)]


def test_bounding_box_is_half_open_rows_then_columns():
    m = torch.zeros(10, 12)
    m[2:5, 7:11] = 1
    assert bounding_box(m > 0) == (2, 5, 7, 11)
    assert bounding_box(torch.zeros(4, 4, dtype=torch.bool)) is None


@pytest.mark.parametrize("size,tile,overlap,align", [(100, 30, 10, 1), (64, 16, 4, 1), (160, 64, 16, 8),
                                                     (200, 64, 24, 8), (50, 64, 8, 1)])
def test_tile_starts_cover_with_the_overlap_and_end_flush(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    if tile >= size:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - tile and starts == sorted(set(starts))
    assert all(s % align == 0 for s in starts[:-1])
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))       # neighbours share >= overlap
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()


def test_tile_starts_reject_an_overlap_without_stride():
    with pytest.raises(ValueError, match="no stride"):
        tile_starts(100, 16, 16)


def test_feather_ramp_against_a_plain_loop():
    for length, lo, hi in [(10, 3, 0), (10, 0, 4), (10, 3, 4), (5, 8, 8), (6, 0, 0)]:
        want = []
        for i in range(length):
            w = 1.0
            if lo > 0 and i < lo:
                w = min(w, (i + 1) / (lo + 1))
            if hi > 0 and length - 1 - i < hi:
                w = min(w, (length - i) / (hi + 1))
            want.append(w)
        torch.testing.assert_close(feather_ramp(length, lo, hi), torch.tensor(want), rtol=0, atol=1e-7)
