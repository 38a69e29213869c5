"""Harmonizing decoder: released Lightning layout, channel detection, the known-region identities, tiling."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import layouts
from models import asuka
from models.harmonizing_decoder import decode_tiled, tile_count
from models.harmonizing_stream import StreamingDecode
from models.weights import CheckpointFormatError

SMALL = dict(ch=32, mult=(1, 2, 2), res_blocks=1, cond=(32, 64, 64, 64))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("dec")
    torch.save(layouts.decoder_checkpoint(z=16, **SMALL), d / "asuka_decoder.ckpt")
    torch.save(layouts.decoder_checkpoint(z=4, **SMALL), d / "asuka_decoder_sd.ckpt")
    return d


def _data(z_channels, B=2, h=12, w=16, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, z_channels, h, w, generator=g)
    img = torch.rand(B, 3, h * f, w * f, generator=g) * 2 - 1
    m = torch.zeros(B, 1, h * f, w * f)
    m[0, :, 10:30, 20:50] = 1
    m[1, :, 5:40, 5:25] = torch.rand(35, 20, generator=g)  # soft
    return z, img, m


def test_released_layout_and_latent_channels_detected(ckpt, tmp_path):
    flux = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"))
    sd = asuka.load_decoder(str(ckpt / "asuka_decoder_sd.ckpt"))
    assert flux.config.z_channels == 16 and sd.config.z_channels == 4 and flux.config.factor == 4
    # the full release geometry is read from shapes too
    full = layouts.decoder_state_dict(z=16)
    save_file(full, tmp_path / "full.safetensors")            # a bare safetensors copy (no prefix)
    dec = asuka.load_decoder(str(tmp_path / "full.safetensors"))
    assert dec.config.level_channels == (128, 256, 512, 512) and dec.config.factor == 8
    assert dec.config.cond_layers[0] == (4, 128, 3) and dec.config.cond_layers[-1] == (512, 512, 4)


def test_safetensors_copy_equals_ckpt(ckpt, tmp_path):
    sd = {k: v for k, v in layouts.decoder_checkpoint(z=4, **SMALL)["state_dict"].items()}
    save_file(sd, tmp_path / "d.safetensors")
    a = asuka.load_decoder(str(ckpt / "asuka_decoder_sd.ckpt"))
    b = asuka.load_decoder(str(tmp_path / "d.safetensors"))
    z, img, m = _data(4)
    assert torch.equal(a(z, img, m), b(z, img, m))


def test_empty_mask_ignores_latent_and_full_mask_ignores_image(ckpt):
    dec = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"), dtype=torch.float64)
    z, img, _ = _data(16)
    z, img = z.double(), img.double()
    empty, full = torch.zeros_like(img[:, :1]), torch.ones_like(img[:, :1])
    # known region everywhere: every scale takes the condition features, so z cannot matter
    assert torch.allclose(dec(z, img, empty), dec(torch.randn_like(z), img, empty), atol=1e-12)
    # hole everywhere: the masked image is all zero, so the image cannot matter
    assert torch.allclose(dec(z, img, full), dec(z, torch.rand_like(img), full), atol=1e-12)
    # and in between both matter
    _, _, m = _data(16)
    m = m.double()
    assert not torch.allclose(dec(z, img, m), dec(torch.randn_like(z), img, m))
    assert not torch.allclose(dec(z, img, m), dec(z, torch.rand_like(img), m))


def test_known_region_uses_original_pixels_only_through_masked_image(ckpt):
    """Pixels under the hole must not leak into the decode: the decoder masks the image itself."""
    dec = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"), dtype=torch.float64)
    z, img, m = _data(16)
    m = (m > 0).double()
    img2 = torch.where(m.bool().expand_as(img), torch.rand_like(img), img)  # change only hole pixels
    assert torch.allclose(dec(z.double(), img.double(), m), dec(z.double(), img2.double(), m), atol=1e-12)


def test_wrong_files(ckpt, tmp_path):
    torch.save(layouts.alignment_state_dict(dim=64, in_dim=32, head_dim=32), tmp_path / "align.pt")
    with pytest.raises(CheckpointFormatError, match="expected an ASUKA harmonizing decoder"):
        asuka.load_decoder(str(tmp_path / "align.pt"))
    sd = layouts.decoder_checkpoint(z=16, **SMALL)
    sd["state_dict"]["decoder.up.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save(sd, tmp_path / "attn.ckpt")
    with pytest.raises(CheckpointFormatError, match="attention inside up blocks"):
        asuka.load_decoder(str(tmp_path / "attn.ckpt"))


def test_half_precision_runs(ckpt):
    dec = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"), dtype=torch.bfloat16)
    z, img, m = _data(16)
    out = dec(z, img, m)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# -- tiling ----------------------------------------------------------------------------------------------
def _local_decoder(f):
    """A purely local stand-in with the decoder's interface: tiling must reproduce it exactly."""
    def decode(z, image, mask):
        up = F.interpolate(z[:, :3], scale_factor=f, mode="nearest")
        return up * mask + image * (1 - mask)
    return decode


@pytest.mark.parametrize("tile,overlap", [(4, 1), (5, 2), (8, 3), (6, 0)])
def test_tiler_crops_every_input_and_blends_to_exact_result(tile, overlap):
    z, img, m = _data(3, h=13, w=17, f=8)
    dec = _local_decoder(8)
    whole = dec(z, img, m)
    ticks = []
    tiled = decode_tiled(dec, z, img, m, 8, tile, overlap, on_tile=lambda: ticks.append(1))
    assert torch.allclose(tiled, whole, atol=1e-6)
    assert len(ticks) == tile_count(13, 17, tile, overlap) > 1


def test_single_tile_equals_whole_decode(ckpt):
    dec = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"))
    z, img, m = _data(16)
    assert torch.equal(decode_tiled(dec, z, img, m, 4, 64, 8), dec(z, img, m).float())


# -- exact (layer-synchronous) tiling --------------------------------------------------------------------
@pytest.mark.parametrize("tile", [16, 24, 40, 96])
def test_streaming_decode_equals_whole_decode_everywhere(ckpt, tile):
    """Shared GroupNorm statistics, whole-latent attention keys and exact halos: in float64 the tiled result is
    the whole-image result to rounding, at the seams too. Odd latent sizes leave ragged last tiles."""
    dec = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"), dtype=torch.float64)
    z, img, m = _data(16, h=13, w=17)
    z, img, m = z.double(), img.double(), m.double()
    whole = dec(z, img, m)
    ticks = []
    stream = StreamingDecode(dec, "cpu", "cpu", tile, on_step=lambda: ticks.append(1))
    out = stream(z, img, m)
    assert out.dtype == torch.float32 and out.shape == whole.shape
    assert torch.allclose(out.double(), whole, atol=1e-5, rtol=0)
    assert len(ticks) == stream.tile_passes(13, 17)
    # and it is not trivially the same code path: a tile this small differs from per-tile GroupNorm
    if tile < 13 * 4:
        independent = decode_tiled(dec, z, img, m, 4, tile // 4, 1)
        assert (independent - whole.float()).abs().max() > 1e-3


def test_streaming_decode_float64_matches_to_rounding(ckpt):
    dec = asuka.load_decoder(str(ckpt / "asuka_decoder_sd.ckpt"), dtype=torch.float64)
    z, img, m = _data(4, h=11, w=10)
    z, img, m = z.double(), img.double(), m.double()
    stream = StreamingDecode(dec, "cpu", "cpu", 20)
    whole = dec(z, img, m)
    # the float32 output cast is the only rounding left at this precision
    assert (stream(z, img, m).double() - whole).abs().max() <= whole.abs().max() * 2 ** -23


def test_streaming_decode_half_precision_is_close(ckpt):
    dec = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"), dtype=torch.bfloat16)
    ref = asuka.load_decoder(str(ckpt / "asuka_decoder.ckpt"))
    z, img, m = _data(16, h=10, w=12)
    out = StreamingDecode(dec, "cpu", "cpu", 24)(z, img, m)
    whole = ref(z, img, m)
    assert torch.isfinite(out).all()
    assert (out - whole).abs().max() < 0.05 * whole.abs().max()
