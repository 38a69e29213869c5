"""PainterNet's Actual-Token Attention Loss against a plain float64 re-computation."""
import pytest
import torch
import torch.nn.functional as F

from models import atal

S, E = 49406, 49407


def _ids(lengths, chunks=1):
    """Rows of CLIP ids: per chunk SOT, ``n`` words, EOT, then EOT padding."""
    rows = []
    for n in lengths:
        row = []
        for _ in range(chunks):
            row += [S] + list(range(100, 100 + n)) + [E] * (77 - 1 - n)
        rows.append(row)
    return torch.tensor(rows)


def test_actual_tokens_exclude_start_end_and_padding():
    m = atal.actual_token_mask(_ids([3, 0, 75]), S, E)
    assert m[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert not m[1].any()
    assert m[2].nonzero().flatten().tolist() == list(range(1, 76))


def test_actual_tokens_per_chunk():
    m = atal.actual_token_mask(_ids([2], chunks=2), S, E)
    assert m[0].nonzero().flatten().tolist() == [1, 2, 78, 79]


def test_chunk_without_start_token_is_refused():
    ids = _ids([2])
    ids[0, 0] = 5
    with pytest.raises(ValueError, match="start token"):
        atal.actual_token_mask(ids, S, E)


def _reference(maps, grids, hole, tokens):
    total, n = 0.0, 0
    for site, a in maps.items():
        h, w = grids[site]
        per = []
        for b in range(a.shape[0]):
            sel = tokens[b].nonzero().flatten()
            if len(sel) == 0:
                continue
            mean = a[b][:, sel].double().mean(-1)
            m = F.adaptive_avg_pool2d(hole[b:b + 1].double(), (h, w)).flatten()   # exact for integer factors
            per.append(((mean - m) ** 2).sum())
        total += torch.stack(per).mean()
        n += 1
    return total / n


def test_loss_matches_a_plain_recomputation():
    g = torch.Generator().manual_seed(0)
    grids = {("input", 1, 0): (8, 8), ("middle", 0, 0): (2, 2), ("output", 3, 0): (4, 4)}
    maps = {s: torch.softmax(torch.randn(3, h * w, 77, generator=g), -1) for s, (h, w) in grids.items()}
    hole = torch.zeros(3, 1, 16, 16)
    hole[0, :, 2:9, 3:14] = 1
    hole[1, :, 8:, :] = 1
    tokens = atal.actual_token_mask(_ids([4, 0, 9]), S, E)      # row 1 has no actual token: left out
    got = atal.atal_loss(maps, grids, hole, tokens)
    torch.testing.assert_close(got.double(), _reference(maps, grids, hole, tokens), rtol=1e-5, atol=1e-7)


def test_attention_on_the_hole_gives_zero_and_gradients_reach_the_maps():
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., :2, :] = 1
    tokens = atal.actual_token_mask(_ids([2]), S, E)
    a = torch.zeros(1, 16, 77)
    a[0, :8, 1:3] = 1.0                  # the actual tokens sit exactly on the hole
    a.requires_grad_(True)
    loss = atal.atal_loss({("input", 1, 0): a}, {("input", 1, 0): (4, 4)}, hole, tokens)
    assert float(loss.detach()) == 0.0
    b = torch.rand(1, 16, 77, requires_grad=True)
    atal.atal_loss({("input", 1, 0): b}, {("input", 1, 0): (4, 4)}, hole, tokens).backward()
    assert b.grad[0, :, 1:3].abs().sum() > 0 and b.grad[0, :, 3:].abs().sum() == 0


def test_wrong_map_shape_is_named():
    tokens = atal.actual_token_mask(_ids([2]), S, E)
    with pytest.raises(ValueError, match="attention map"):
        atal.atal_loss({("x", 0, 0): torch.rand(1, 15, 77)}, {("x", 0, 0): (4, 4)}, torch.zeros(1, 1, 4, 4), tokens)
