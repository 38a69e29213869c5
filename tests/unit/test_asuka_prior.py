"""ASUKA MAE prior + alignment: released layouts load through the loaders; numerics vs a float64 reference."""
import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import layouts
import reference_asuka as ref
from models import asuka
from models.imaging import resize_area_uint8, resize_nearest
from models.weights import CheckpointFormatError

SMALL_MAE = dict(dim=192, depth=2, dec_dim=128, dec_depth=8)   # ViT layout, small widths (heads: 192//64=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("asuka")
    torch.save(layouts.mae_checkpoint(**SMALL_MAE), d / "mae_300.pth")
    torch.save(layouts.alignment_state_dict(seed=1, in_dim=128, dim=256, head_dim=64), d / "asuka_alignment_t5.pt")
    torch.save(layouts.alignment_state_dict(seed=2, in_dim=128, dim=96, head_dim=32), d / "asuka_alignment_clip.pt")
    torch.save(torch.randn(1, 256, 256), d / "txt_256.pt")
    torch.save(torch.randn(1, 512, 256), d / "txt.pt")
    torch.save(torch.randn(1, 96), d / "vec.pt")
    return d


def _inputs(seed=0, h=300, w=420):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (2, 3, h, w), generator=g).float() / 255
    m = torch.zeros(2, 1, h, w)
    m[0, :, 40:170, 90:260] = 1
    m[0, :, 250:252, 10:400:7] = 1                       # scattered hole pixels touching many patches
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    m[1, 0] = (1 - (xx ** 2 + yy ** 2).sqrt()).clamp(0, 1)  # soft mask
    return img, m


def _reference_inputs(img, m):
    """Authors' preprocessing with OpenCV itself: uint8 INTER_AREA resize, ImageNet norm, nearest mask."""
    xs, ms = [], []
    for i in range(img.shape[0]):
        u8 = (img[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        x = cv2.resize(u8, (256, 256), interpolation=cv2.INTER_AREA) / 255.0
        mk = cv2.resize(m[i, 0].numpy(), (256, 256), interpolation=cv2.INTER_NEAREST)
        x = torch.from_numpy(x).permute(2, 0, 1)[None].double()
        mk = torch.from_numpy(mk)[None, None].double()
        xs.append((x - ref.MEAN) / ref.STD * (mk < 0.5))
        ms.append(mk)
    return torch.cat(xs), torch.cat(ms)


@pytest.mark.parametrize("size", [(300, 420), (512, 512), (1024, 1024), (1000, 777), (2000, 1999), (256, 256), (256, 700), (200, 180), (130, 300), (17, 400)])
def test_area_resize_matches_opencv_exactly(size):
    g = torch.Generator().manual_seed(size[0])
    img = torch.randint(0, 256, (1, 3, *size), generator=g).float() / 255
    ours = (resize_area_uint8(img, (256, 256))[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    u8 = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    theirs = cv2.resize(u8, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0


@pytest.mark.parametrize("size", [(300, 420), (301, 419), (1000, 777), (130, 300), (4096, 3000)])
def test_nearest_mask_matches_opencv(size):
    m = torch.rand(1, 1, *size)
    theirs = cv2.resize(m[0, 0].numpy(), (256, 256), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(resize_nearest(m, (256, 256))[0, 0].numpy(), theirs)


def test_released_layout_loads_and_config_is_read_from_shapes(files):
    mae = asuka.load_mae(str(files / "mae_300.pth"))
    c = mae.config
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.decoder_embed_dim, c.decoder_depth) == (256, 16, 192, 2, 128, 8)
    t5 = asuka.load_alignment(str(files / "asuka_alignment_t5.pt"))
    clip = asuka.load_alignment(str(files / "asuka_alignment_clip.pt"))
    assert (t5.config.dim, t5.config.heads, t5.config.depth) == (256, 4, 4)
    assert (clip.config.dim, clip.config.heads) == (96, 3)


def test_prior_and_reconstruction_match_float64_reference(files):
    mae = asuka.load_mae(str(files / "mae_300.pth"), dtype=torch.float64)
    img, m = _inputs()
    prior, recon = mae(img.double(), m.double())
    x, mk = _reference_inputs(img, m)
    sd = layouts.mae_checkpoint(**SMALL_MAE)["model"]
    rp, rr = ref.mae_prior(sd, x, mk, enc_heads=3, dec_heads=16)
    assert (prior - rp).abs().max() < 1e-5   # preprocessing is float32, as the authors
    assert (recon - rr).abs().max() < 1e-5


def test_alignment_and_mixing_match_reference(files):
    t5 = asuka.load_alignment(str(files / "asuka_alignment_t5.pt"), dtype=torch.float64)
    clip = asuka.load_alignment(str(files / "asuka_alignment_clip.pt"), dtype=torch.float64)
    nulls = asuka.NullEmbeddings(asuka.load_null_tokens(str(files / "txt_256.pt")),
                                 asuka.load_null_pooled(str(files / "vec.pt")))
    prior = torch.randn(2, 256, 128, dtype=torch.float64)
    tokens, pooled = asuka.asuka_condition(prior, t5, clip, nulls, 0.5)
    rt = ref.alignment(layouts.alignment_state_dict(seed=1, in_dim=128, dim=256, head_dim=64), prior)
    rc = ref.alignment(layouts.alignment_state_dict(seed=2, in_dim=128, dim=96, head_dim=32), prior).mean(1)
    nt, npool = nulls.tokens.double()[None], nulls.pooled.double()[None]
    assert (tokens.double() - (nt + 0.5 * (rt - nt))).abs().max() < 1e-5   # outputs are float32
    assert (pooled.double() - (npool + 0.5 * (rc - npool))).abs().max() < 1e-5
    # w = 0 returns exactly the null embedding; w = 1 the aligned prior
    t0, p0 = asuka.asuka_condition(prior, t5, clip, nulls, 0.0)
    assert torch.equal(t0, nulls.tokens[None].expand_as(t0)) and torch.equal(p0, nulls.pooled[None].expand_as(p0))


def test_safetensors_copies_load_identically(files, tmp_path):
    sd = layouts.mae_checkpoint(**SMALL_MAE)["model"]
    save_file(sd, tmp_path / "mae.safetensors")
    save_file(layouts.alignment_state_dict(seed=1, in_dim=128, dim=256, head_dim=64), tmp_path / "t5.safetensors")
    save_file({"vec": torch.randn(96)}, tmp_path / "vec.safetensors")
    a, b = asuka.load_mae(str(files / "mae_300.pth")), asuka.load_mae(str(tmp_path / "mae.safetensors"))
    img, m = _inputs()
    assert torch.equal(a(img, m)[0], b(img, m)[0])
    assert asuka.load_alignment(str(tmp_path / "t5.safetensors")).config.dim == 256
    assert asuka.load_null_pooled(str(tmp_path / "vec.safetensors")).shape == (96,)


def test_full_and_empty_masks_are_finite_and_defined(files):
    mae = asuka.load_mae(str(files / "mae_300.pth"))
    img, _ = _inputs()
    full, empty = torch.ones(2, 1, 300, 420), torch.zeros(2, 1, 300, 420)
    pf, rf = mae(img, full)
    pe, re = mae(img, empty)
    assert torch.isfinite(rf).all() and torch.isfinite(pe).all() and torch.isfinite(re).all()
    assert torch.count_nonzero(pf) == 0          # the authors' defined result: prior zeroed
    assert torch.count_nonzero(pe) > 0
    # a full mask in one item does not change the other item (authors zero the whole batch)
    mixed = torch.cat([full[:1], _inputs()[1][1:]])
    pm, _ = mae(img, mixed)
    p1, _ = mae(img[1:], mixed[1:])
    assert torch.count_nonzero(pm[0]) == 0 and torch.allclose(pm[1], p1[0], atol=1e-5)


def _grid_mask(size=256, step=16):
    """Thin lines through every MAE patch (at the MAE's own 256² size): every token touched, ~12 % covered."""
    m = torch.zeros(1, 1, size, size)
    m[..., step // 2::step, :] = 1
    m[..., :, step // 2::step] = 1
    return m


def test_mask_touching_every_patch_gives_the_authors_null_prior(files):
    """No visible key: the authors' softmax is NaN there and their code returns the zero prior; so do we, per
    image, and the other image of the batch is unchanged."""
    mae = asuka.load_mae(str(files / "mae_300.pth"), dtype=torch.float64)
    img, m = _inputs(h=256, w=256)
    grid = _grid_mask()
    assert 0 < float(grid.mean()) < 0.2
    _, mk = _reference_inputs(img[:1], grid)
    assert (torch.nn.functional.avg_pool2d(mk, 16) > 0).all()    # every key excluded: the authors' softmax is NaN
    mixed = torch.cat([grid, m[1:]])
    prior, recon = mae(img.double(), mixed.double())
    assert torch.count_nonzero(prior[0]) == 0 and torch.isfinite(recon).all()
    alone, _ = mae(img[1:].double(), m[1:].double())
    assert torch.allclose(prior[1], alone[0], atol=1e-9)
    # one uncovered patch leaves a key: the prior is the reference's again, not zero
    grid[..., :16, :16] = 0
    prior, _ = mae(img[:1].double(), grid.double())
    x, mk = _reference_inputs(img[:1], grid)
    rp, _ = ref.mae_prior(layouts.mae_checkpoint(**SMALL_MAE)["model"], x, mk, enc_heads=3, dec_heads=16)
    assert torch.count_nonzero(prior) > 0 and (prior - rp).abs().max() < 1e-5


def test_batch_items_are_independent(files):
    mae = asuka.load_mae(str(files / "mae_300.pth"))
    img, m = _inputs()
    batch, _ = mae(img, m)
    for i in range(2):
        single, _ = mae(img[i:i + 1], m[i:i + 1])
        assert torch.allclose(batch[i], single[0], atol=1e-5)


def test_wrong_files_get_clear_errors(files, tmp_path):
    with pytest.raises(CheckpointFormatError, match="expected an ASUKA MAE prior"):
        asuka.load_mae(str(files / "asuka_alignment_t5.pt"))
    with pytest.raises(CheckpointFormatError, match="expected an ASUKA alignment"):
        asuka.load_alignment(str(files / "mae_300.pth"))
    sd = layouts.alignment_state_dict(in_dim=128, dim=256, head_dim=64)
    del sd["3.linear2.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointFormatError, match="missing 1 tensors.*3.linear2.weight"):
        asuka.load_alignment(str(tmp_path / "broken.pt"))
    mae = asuka.load_mae(str(files / "mae_300.pth"))
    clip = asuka.load_alignment(str(files / "asuka_alignment_clip.pt"))
    t5 = asuka.load_alignment(str(files / "asuka_alignment_t5.pt"))
    with pytest.raises(CheckpointFormatError, match="96 wide but the alignment produces 256"):
        asuka.check_compatible(mae, t5, clip, asuka.NullEmbeddings(tokens=torch.zeros(256, 96)))
    with pytest.raises(CheckpointFormatError, match="null_pooled is 256 wide"):
        asuka.check_compatible(mae, t5, clip, asuka.NullEmbeddings(pooled=torch.zeros(256)))


def test_longer_null_sequence_uses_first_tokens(files, caplog):
    nulls = asuka.NullEmbeddings(tokens=asuka.load_null_tokens(str(files / "txt.pt")))
    got = asuka.null_tokens_for(nulls, 256)
    assert torch.equal(got, nulls.tokens[:256]) and "first 256" in caplog.text


def test_sd_variant_without_nulls_uses_aligned_prior(tmp_path):
    torch.save(layouts.alignment_state_dict(seed=5, in_dim=128, dim=768, head_dim=64, depth=4), tmp_path / "sd.pt")
    al = asuka.load_alignment(str(tmp_path / "sd.pt"), dtype=torch.float64)
    prior = torch.randn(1, 256, 128, dtype=torch.float64)
    tokens, pooled = asuka.asuka_condition(prior, al, None, asuka.NullEmbeddings(), 0.3)
    assert pooled is None and tokens.shape == (1, 256, 768)
    assert torch.allclose(tokens, al(prior).float())
