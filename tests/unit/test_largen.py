"""LAR-Gen on tensors: the checkpoint split (authors' key layout, small SDXL-shaped config), the IP-Adapter-Plus
resampler against a plain float64 re-computation, and the two attention formulas against float64 references."""
import math

import pytest
import torch
from safetensors.torch import save_file

import largen_layouts as L
from models import largen
from models.layers import sdpa_attention, with_reference_tokens
from models.weights import CheckpointFormatError, load_weights, tensor_dict

# -- checkpoint split -------------------------------------------------------------------------------------


def _load(tmp_path, sd, name="largen_ckpt_s22k.pth", container=True):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save({"model": sd} if container else sd, path)
    return tensor_dict(load_weights(str(path)), str(path)), str(path)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "model."])
def test_split_released_layout(tmp_path, prefix):
    sd, path = _load(tmp_path, L.largen_checkpoint(prefix=prefix, refinenet=True, conditioner=True, vae=True))
    parts = largen.split_checkpoint(sd, path)
    shapes = L.sgm_unet_shapes(in_channels=9, **L.SMALL)
    assert set(parts.unet) == set(shapes)                       # the UNet minus its subject projections
    layers = L.cross_attention_layers(shapes)
    assert len(parts.ip) == len(layers) == 4                    # small config: 1 input, 1 middle, 2 output
    assert list(parts.ip) == [("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)]
    k, v = parts.ip[("middle", 0, 0)]
    assert torch.equal(k, sd[f"{prefix}middle_block.1.transformer_blocks.0.attn2.to_k_ip.weight"])
    assert torch.equal(v, sd[f"{prefix}middle_block.1.transformer_blocks.0.attn2.to_v_ip.weight"])
    ref = L.sgm_unet_shapes(in_channels=4, with_out=False, **L.SMALL)
    assert set(parts.refinenet) == set(ref)                     # ref_ dropped, the unused ip copies too
    assert parts.refinenet["input_blocks.0.0.weight"].shape[1] == 4
    assert set(parts.resampler) == set(L.resampler_shapes())
    assert parts.projector["weight"].shape == (2048, 32)
    assert parts.carries == ("VAE", "text encoders")


def test_split_reads_safetensors_copy_without_container(tmp_path):
    sd, path = _load(tmp_path, L.largen_checkpoint(), name="largen.safetensors")
    assert len(largen.split_checkpoint(sd, path).ip) == 4


def test_plain_sdxl_is_refused(tmp_path):
    sd = L.random_tensors(L.sgm_unet_shapes(in_channels=4, **L.SMALL), 0, prefix="model.diffusion_model.")
    sd, path = _load(tmp_path, sd)
    with pytest.raises(CheckpointFormatError, match="4 input channels; LAR-Gen's is a 9-channel"):
        largen.split_checkpoint(sd, path)


def test_inpaint_unet_without_projections_is_refused(tmp_path):
    sd, path = _load(tmp_path, L.largen_checkpoint(drop_ip=4))
    with pytest.raises(CheckpointFormatError, match="without LAR-Gen's subject projections"):
        largen.split_checkpoint(sd, path)


def test_missing_projections_fail_loudly(tmp_path):
    sd, path = _load(tmp_path, L.largen_checkpoint(drop_ip=1))
    with pytest.raises(CheckpointFormatError, match=r"missing for 1 of 4 layers \(\('input', 3, 0\)\)"):
        largen.split_checkpoint(sd, path)


def test_wrong_projection_shape(tmp_path):
    sd = L.largen_checkpoint()
    sd["model.diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_v_ip.weight"] = torch.zeros(128, 768)
    sd, path = _load(tmp_path, sd)
    with pytest.raises(CheckpointFormatError, match=r"to_v_ip at \('output', 1, 0\) has shape \(128, 768\)"):
        largen.split_checkpoint(sd, path)


def test_foreign_file(tmp_path):
    sd, path = _load(tmp_path, {"encoder.weight": torch.zeros(2)})
    with pytest.raises(CheckpointFormatError, match="not a LAR-Gen checkpoint"):
        largen.split_checkpoint(sd, path)


# -- resampler -------------------------------------------------------------------------------------------
def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _resampler_reference(sd, x):
    """The published Perceiver resampler written out in float64 from its state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double() @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    lat = sd["latents"].expand(x.shape[0], -1, -1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}."
        xn = _layer_norm(x, sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        ln = _layer_norm(lat, sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = ln @ sd[p + "0.to_q.weight"].T
        kv = torch.cat([xn, ln], 1) @ sd[p + "0.to_kv.weight"].T
        k, v = kv.chunk(2, -1)
        heads = q.shape[-1] // 64
        out = []
        for h in range(heads):
            sl = slice(64 * h, 64 * (h + 1))
            w = (q[..., sl] @ k[..., sl].transpose(1, 2)) / math.sqrt(64)
            out.append(torch.softmax(w, -1) @ v[..., sl])
        lat = torch.cat(out, -1) @ sd[p + "0.to_out.weight"].T + lat
        f = _layer_norm(lat, sd[p + "1.0.weight"], sd[p + "1.0.bias"]) @ sd[p + "1.1.weight"].T
        f = torch.nn.functional.gelu(f) @ sd[p + "1.3.weight"].T
        lat = f + lat
    out = lat @ sd["proj_out.weight"].T + sd["proj_out.bias"]
    return _layer_norm(out, sd["norm_out.weight"], sd["norm_out.bias"])


def _resampler(sd, path="ip.bin"):
    cfg = largen.resampler_config(sd, path)
    m = largen.Resampler(cfg)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def test_resampler_matches_plain_recomputation(tmp_path):
    path = tmp_path / "ip-adapter-plus_sdxl_vit-h.bin"
    torch.save(L.image_proj(), path)
    sd = largen.read_image_proj(load_weights(str(path)), str(path))
    cfg = largen.resampler_config(sd, str(path))
    assert cfg == largen.ResamplerConfig(dim=64, depth=2, heads=2, num_queries=4, embedding_dim=32, output_dim=2048,
                                         ff_mult=4)
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        got = _resampler(sd)(x)
    assert got.shape == (3, 4, 2048)
    torch.testing.assert_close(got.double(), _resampler_reference(sd, x), atol=2e-5, rtol=1e-4)


def test_resampler_safetensors_copy(tmp_path):
    flat = {f"image_proj.{k}": v for k, v in L.image_proj()["image_proj"].items()}
    flat["ip_adapter.1.to_k_ip.weight"] = torch.zeros(64, 2048)
    path = tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors"
    save_file(flat, str(path))
    sd = largen.read_image_proj(load_weights(str(path)), str(path))
    assert set(sd) == set(L.resampler_shapes())


def test_plain_ip_adapter_is_named(tmp_path):
    obj = {"image_proj": {"proj.weight": torch.zeros(8192, 1280), "proj.bias": torch.zeros(8192),
                          "norm.weight": torch.ones(2048), "norm.bias": torch.zeros(2048)}}
    with pytest.raises(CheckpointFormatError, match="plain IP-Adapter"):
        largen.read_image_proj(obj, "ip-adapter_sdxl.bin")


def test_not_an_ip_adapter(tmp_path):
    with pytest.raises(CheckpointFormatError, match="no IP-Adapter-Plus resampler"):
        largen.read_image_proj({"model.weight": torch.zeros(2)}, "other.bin")


# -- attention formulas -----------------------------------------------------------------------------------
def _attention64(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    return (w @ v).transpose(1, 2).reshape(b, n, c)


def test_decoupled_attention_weight_zero_is_plain_attention():
    q, k, v = torch.randn(2, 24, 128), torch.randn(2, 7, 128), torch.randn(2, 7, 128)
    text = sdpa_attention(q, k, v, 2)
    ki, vi = torch.randn(2, 4, 128), torch.randn(2, 4, 128)
    assert torch.equal(largen.decoupled_attention(text, q, ki, vi, 2, 0.0), text)


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_decoupled_attention_against_float64(weight):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 24, 128), torch.randn(2, 7, 128), torch.randn(2, 7, 128)
    ki, vi = torch.randn(2, 4, 128), torch.randn(2, 4, 128)
    region = (torch.rand(1, 24, 1) > 0.5).float()
    got = largen.decoupled_attention(sdpa_attention(q, k, v, 2), q, ki, vi, 2, weight, region=region)
    want = _attention64(q, k, v, 2) + weight * region.double() * _attention64(q, ki, vi, 2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # the image term really acts where the region is 1 and nowhere else
    plain = sdpa_attention(q, k, v, 2)
    assert torch.equal(got[:, region[0, :, 0] == 0], plain[:, region[0, :, 0] == 0])
    assert not torch.allclose(got[:, region[0, :, 0] == 1], plain[:, region[0, :, 0] == 1])


def test_self_attention_over_own_and_reference_tokens_against_float64():
    """The RefineNet route: keys/values from [own ; reference] through the layer's own projections."""
    torch.manual_seed(1)
    C, heads = 128, 2
    to_q, to_k, to_v = (torch.nn.Linear(C, C, bias=False) for _ in range(3))
    n, ref = torch.randn(2, 16, C), torch.randn(2, 9, C)
    q, ctx, val = with_reference_tokens(n, n, n, ref)
    assert q is n and ctx.shape == (2, 25, C)
    with torch.no_grad():
        got = sdpa_attention(to_q(q), to_k(ctx), to_v(val), heads)
    wq, wk, wv = (m.weight.double() for m in (to_q, to_k, to_v))
    want = torch.empty(2, 16, C, dtype=torch.float64)
    for b in range(2):                                 # per query, a softmax over the 16 + 9 keys, per head
        keys = torch.cat([n[b], ref[b]]).double()
        for i in range(16):
            qi = n[b, i].double() @ wq.T
            for h in range(heads):
                sl = slice(64 * h, 64 * (h + 1))
                s = torch.stack([qi[sl] @ (kk @ wk.T)[sl] for kk in keys]) / 8.0
                want[b, i, sl] = torch.softmax(s, 0) @ (keys @ wv.T)[:, sl]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


