"""Inpaint-branch layouts: detection, conversion to the internal (ComfyUI) naming, injection and ACP tables.

Files come from tests/unit/branch_layouts.py (written from the published names/shapes, not from models/);
full-size checks use meta tensors, value checks small configs.
"""
import pytest
import torch

import branch_layouts as W
from models.branch_layouts import (
    MIDDLE_RES_RES, MIDDLE_RES_ST_RES, attention_sites, convert, detect, diffusers_key_map, injection_sites,
    internal_shapes, load_branch, painternet_from_unet, painternet_metadata, zero_conv_channels)
from models.weights import CheckpointFormatError, safetensors_metadata

FULL = {
    "brushnet_sd15": lambda: W.brushnet_sd15(device="meta"),
    "brushnet_sdxl": lambda: W.brushnet_sdxl(device="meta"),
    "powerpaint_v2": lambda: W.powerpaint_v2(device="meta"),
    "painternet_sd15": lambda: W.painternet("sd15", device="meta"),
    "painternet_sdxl": lambda: W.painternet("sdxl", device="meta"),
}


def _meta(name):
    return W.painternet_metadata("sdxl" if name.endswith("sdxl") else "sd15") if name.startswith("painternet") else None


# name: (kind, base, middle, channel_mult, transformer_depth, transformer_depth_output (ComfyUI order),
#        transformer_depth_middle, context_dim, linear, adm, heads, head_channels, n_down, n_up, n_acp, tensors)
EXPECTED = {
    "brushnet_sd15": ("brushnet", "sd15", MIDDLE_RES_RES, [1, 2, 4, 4], [0] * 8, [0] * 12, None, None, False, None,
                      8, -1, 12, 15, 0, 322),
    "brushnet_sdxl": ("brushnet", "sdxl", MIDDLE_RES_RES, [1, 2, 4], [0] * 6, [0] * 9, None, None, False, 2816,
                      -1, 64, 9, 11, 0, 252),
    "powerpaint_v2": ("powerpaint", "sd15", MIDDLE_RES_ST_RES, [1, 2, 4, 4], [1] * 6 + [0] * 2, [1] * 9 + [0] * 3, 1,
                      768, False, None, 8, -1, 12, 15, 0, 738),
    "painternet_sd15": ("painternet", "sd15", MIDDLE_RES_ST_RES, [1, 2, 4, 4], [1] * 6 + [0] * 2, [1] * 9 + [0] * 3,
                        1, 768, False, None, 8, -1, 12, 15, 16, 738 + 32),
    "painternet_sdxl": ("painternet", "sdxl", MIDDLE_RES_ST_RES, [1, 2, 4], [0, 0, 2, 2, 10, 10],
                        [0, 0, 0, 2, 2, 2, 10, 10, 10], 10, 2048, True, 2816, -1, 64, 9, 11, 70, None),
}


@pytest.mark.parametrize("name", list(FULL))
def test_detect_full_size(name):
    sd = FULL[name]()
    spec = detect(sd, _meta(name), f"{name}.safetensors")
    (kind, base, middle, mult, td, tdo, tdm, ctx, lin, adm, heads, head_ch, n_down, n_up, n_acp, n_tensors) = EXPECTED[name]
    cfg = spec.unet_config
    assert (spec.kind, spec.base, spec.middle) == (kind, base, middle)
    assert cfg["model_channels"] == 320 and cfg["in_channels"] == 9
    assert cfg["channel_mult"] == mult and cfg["num_res_blocks"] == [2] * len(mult)
    assert cfg["transformer_depth"] == td and cfg["transformer_depth_output"] == tdo
    assert cfg["transformer_depth_middle"] == tdm
    assert (cfg["context_dim"], cfg["use_linear_in_transformer"], cfg["adm_in_channels"]) == (ctx, lin, adm)
    assert (cfg["num_heads"], cfg["num_head_channels"]) == (heads, head_ch)
    assert cfg["use_spatial_transformer"] == (ctx is not None)
    assert cfg["num_classes"] == ("sequential" if adm else None)
    assert (spec.n_down, spec.n_up, len(spec.acp_sites)) == (n_down, n_up, n_acp)
    assert spec.uses_context == (ctx is not None) and spec.uses_y == (adm is not None)
    assert spec.layout == ("internal" if kind == "painternet" else "diffusers")
    assert (not (spec.uses_context or spec.uses_y)) == (name == "brushnet_sd15")   # no prompt reaches it
    assert spec.base_context_dim == {"sd15": 768, "sdxl": 2048}[base]
    shapes = internal_shapes(spec)
    assert [shapes[f"zero_down.{k}.weight"][0] for k in range(n_down)] == list(spec.down_channels)
    assert [shapes[f"zero_up.{j}.weight"][0] for j in range(n_up)] == list(spec.up_channels)
    assert [shapes[f"zero_attn.{n}.weight"][0] for n in range(n_acp)] == list(spec.acp_channels)
    assert shapes["zero_mid.weight"][0] == spec.mid_channels
    if n_tensors is not None:
        assert len(sd) == n_tensors   # the writers reproduce the published tensor counts (notes §1-2)


@pytest.mark.parametrize("name", list(FULL))
def test_convert_consumes_every_key_with_right_shapes(name):
    sd = FULL[name]()
    spec = detect(sd, _meta(name))
    out = convert(sd, spec)
    assert len(out) == len(sd)
    want = internal_shapes(spec)
    assert set(out) == set(want)
    assert all(tuple(out[k].shape) == want[k] for k in out)
    assert all(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.",
                             "zero_down.", "zero_mid.", "zero_up.", "zero_attn.")) for k in out)
    assert not any(k.startswith("out.") for k in out)


def test_convert_known_renames_brushnet_sd15():
    sd = W.brushnet_sd15(device="meta")
    spec = detect(sd)
    m = diffusers_key_map(spec)
    assert m["conv_in_condition.weight"] == "input_blocks.0.0.weight"
    assert m["time_embedding.linear_2.bias"] == "time_embed.2.bias"
    assert m["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"
    assert m["down_blocks.2.downsamplers.0.conv.weight"] == "input_blocks.9.0.op.weight"
    assert m["mid_block.resnets.1.norm1.weight"] == "middle_block.1.in_layers.0.weight"   # Res/Res middle
    assert m["up_blocks.3.resnets.0.conv1.weight"] == "output_blocks.9.0.in_layers.2.weight"
    assert m["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert m["up_blocks.2.resnets.2.time_emb_proj.weight"] == "output_blocks.8.0.emb_layers.1.weight"
    assert m["brushnet_down_blocks.11.weight"] == "zero_down.11.weight"
    assert m["brushnet_mid_block.bias"] == "zero_mid.bias"
    assert m["brushnet_up_blocks.14.weight"] == "zero_up.14.weight"
    out = convert(sd, spec)
    assert tuple(out["output_blocks.9.0.in_layers.2.weight"].shape) == (320, 960, 3, 3)
    assert tuple(out["zero_up.7.weight"].shape) == (1280, 1280, 1, 1)
    assert tuple(out["zero_up.8.weight"].shape) == (640, 640, 1, 1)


def test_convert_known_renames_powerpaint_and_sdxl():
    pp = diffusers_key_map(detect(W.powerpaint_v2(device="meta")))
    assert pp["mid_block.resnets.1.conv2.weight"] == "middle_block.2.out_layers.3.weight"
    assert pp["mid_block.attentions.0.proj_in.weight"] == "middle_block.1.proj_in.weight"
    assert pp["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert pp["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert (pp["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"]
            == "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight")
    xl = detect(W.brushnet_sdxl(device="meta"))
    m = diffusers_key_map(xl)
    assert m["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert m["add_embedding.linear_2.bias"] == "label_emb.0.2.bias"
    assert m["up_blocks.1.upsamplers.0.conv.bias"] == "output_blocks.5.1.conv.bias"
    assert tuple(internal_shapes(xl)["label_emb.0.0.weight"]) == (1280, 2816)


def test_convert_keeps_tensors_and_two_independent_writers_agree():
    """PowerPaint (diffusers names) converted == PainterNet writer (ComfyUI names) minus the ACPs."""
    sd = W.powerpaint_v2(small=True, seed=3)
    spec = detect(sd)
    out = convert(sd, spec)
    m = diffusers_key_map(spec)
    assert all(out[m[k]] is v for k, v in sd.items())
    pn = W.painternet("sd15", small=True)
    pn_shapes = {k: tuple(v.shape) for k, v in pn.items() if not k.startswith("zero_attn.")}
    assert {k: tuple(v.shape) for k, v in out.items()} == pn_shapes


def test_small_configs_keep_the_structure():
    xl = detect(W.painternet("sdxl", small=True), W.painternet_metadata("sdxl"))
    cfg = xl.unet_config
    assert cfg["model_channels"] == 32 and cfg["channel_mult"] == [1, 2, 4]
    assert cfg["transformer_depth"] == [0, 0, 1, 1, 1, 1] and cfg["transformer_depth_middle"] == 1
    assert cfg["adm_in_channels"] == 2816 and cfg["context_dim"] == 2048 and cfg["use_linear_in_transformer"]
    assert (xl.n_down, xl.n_up, len(xl.acp_sites)) == (9, 11, 4 + 1 + 6)
    bn = detect(W.brushnet_sdxl(small=True))
    assert (bn.kind, bn.base, bn.unet_config["model_channels"]) == ("brushnet", "sdxl", 32)
    assert convert(W.brushnet_sd15(small=True), detect(W.brushnet_sd15(small=True)))["zero_mid.weight"].shape[0] == 128


def test_unet_config_is_a_fresh_plain_dict():
    spec = detect(W.powerpaint_v2(device="meta"))
    a = spec.unet_config
    a["transformer_depth"].pop()
    assert spec.unet_config["transformer_depth"] == [1] * 6 + [0] * 2
    with pytest.raises(TypeError):
        spec.config["model_channels"] = 1


# --- injection tables (notes §1 "How the outputs are added" and §5) ---------------------------------

SD15_UP = [("output_h", 1), ("output_h", 2), ("pre_upsample", 2), ("output_h", 3),
           ("output_h", 4), ("output_h", 5), ("pre_upsample", 5), ("output_h", 6),
           ("output_h", 7), ("output_h", 8), ("pre_upsample", 8), ("output_h", 9),
           ("output_h", 10), ("output_h", 11), ("after_last", 11)]
SDXL_UP = [("output_h", 1), ("output_h", 2), ("pre_upsample", 2), ("output_h", 3),
           ("output_h", 4), ("output_h", 5), ("pre_upsample", 5), ("output_h", 6),
           ("output_h", 7), ("output_h", 8), ("after_last", 8)]


@pytest.mark.parametrize("name,n_in,up", [("brushnet_sd15", 12, SD15_UP), ("powerpaint_v2", 12, SD15_UP),
                                          ("painternet_sd15", 12, SD15_UP), ("brushnet_sdxl", 9, SDXL_UP),
                                          ("painternet_sdxl", 9, SDXL_UP)])
def test_injection_sites_match_the_notes(name, n_in, up):
    spec = detect(FULL[name](), _meta(name))
    sites = injection_sites(spec)
    assert list(sites["down"]) == [("input_after_skip", 0)] + [("input", k) for k in range(1, n_in)]
    assert sites["mid"] == ("output_h", 0)
    assert list(sites["up"]) == up
    assert (len(sites["down"]), len(sites["up"])) == (spec.n_down, spec.n_up)


def test_zero_conv_channels_match_the_notes():
    sd15 = zero_conv_channels(detect(W.brushnet_sd15(device="meta")))
    assert list(sd15["down"]) == [320] * 4 + [640] * 3 + [1280] * 5
    assert list(sd15["up"]) == [1280] * 8 + [640] * 4 + [320] * 3 and sd15["mid"] == 1280
    xl = zero_conv_channels(detect(W.brushnet_sdxl(device="meta")))
    assert list(xl["down"]) == [320] * 4 + [640] * 3 + [1280] * 2
    assert list(xl["up"]) == [1280] * 4 + [640] * 4 + [320] * 3 and xl["mid"] == 1280


def test_acp_sites_order_and_count():
    sd15 = detect(FULL["painternet_sd15"](), _meta("painternet_sd15"))
    assert list(sd15.acp_sites) == ([("input", k, 0) for k in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
                                    + [("output", n, 0) for n in range(3, 12)])
    xl = detect(FULL["painternet_sdxl"](), _meta("painternet_sdxl"))
    assert len(xl.acp_sites) == 70
    expected = ([("input", k, t) for k in (4, 5) for t in range(2)] + [("input", k, t) for k in (7, 8) for t in range(10)]
                + [("middle", 0, t) for t in range(10)]
                + [("output", n, t) for n in (0, 1, 2) for t in range(10)] + [("output", n, t) for n in (3, 4, 5) for t in range(2)])
    assert list(xl.acp_sites) == expected
    assert attention_sites(xl.config) == xl.acp_sites
    shapes = internal_shapes(xl)
    assert shapes["zero_attn.0.weight"] == (640, 640) and shapes["zero_attn.69.weight"] == (640, 640)
    assert shapes["zero_attn.4.weight"] == (1280, 1280) and shapes["zero_attn.24.bias"] == (1280,)
    assert "zero_attn.70.weight" not in shapes
    assert detect(W.powerpaint_v2(device="meta")).acp_sites == ()   # only PainterNet has ACPs


# --- errors ---------------------------------------------------------------------------------------

def test_unknown_file_names_what_was_found_and_what_is_accepted():
    sd = {f"model.diffusion_model.input_blocks.{i}.0.weight": torch.empty(1, device="meta") for i in range(3)}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointFormatError) as e:
        detect(sd, None, "/models/sd15.safetensors")
    msg = str(e.value)
    assert "sd15.safetensors" in msg and "model x3" in msg and "first_stage_model x1" in msg
    assert "BrushNet SD1.5" in msg and "BrushNet SDXL" in msg and "PowerPaint-v2" in msg and "PainterNet" in msg


def test_unexpected_missing_and_misshaped_keys_are_named():
    sd = W.brushnet_sd15(device="meta")
    spec = detect(sd)
    extra = dict(sd, **{"conv_out.weight": torch.empty(4, 320, 3, 3, device="meta")})
    with pytest.raises(CheckpointFormatError, match=r"1 unexpected tensors \(conv_out.weight\)"):
        convert(extra, spec)
    missing = dict(sd)
    del missing["down_blocks.1.resnets.0.conv_shortcut.weight"]
    with pytest.raises(CheckpointFormatError, match=r"missing 1 tensors \(down_blocks.1.resnets.0.conv_shortcut.weight\)"):
        convert(missing, detect(missing))
    bad = dict(sd, **{"brushnet_up_blocks.3.weight": torch.empty(1280, 1280, 3, 3, device="meta")})
    with pytest.raises(CheckpointFormatError, match=r"brushnet_up_blocks.3.weight has shape \(1280, 1280, 3, 3\).*\(1280, 1280, 1, 1\)"):
        convert(bad, detect(bad))


def test_zero_conv_count_and_input_channels_are_checked():
    sd = W.brushnet_sd15(device="meta")
    short = {k: v for k, v in sd.items() if not k.startswith("brushnet_up_blocks.14.")}
    with pytest.raises(CheckpointFormatError, match=r"brushnet_up_blocks x14.*needs 12 and 15"):
        detect(short)
    four = dict(sd, **{"conv_in_condition.weight": torch.empty(320, 4, 3, 3, device="meta")})
    with pytest.raises(CheckpointFormatError, match="takes 4 channels"):
        detect(four)


def test_unpublished_variant_is_refused():
    sd = W.diffusers_branch((32, 64, 128), 2048, True, 2816, (False, True, True), True, (True, True, False),
                            device="meta")
    with pytest.raises(CheckpointFormatError, match=r"3 levels, with cross-attention.*not a known branch"):
        detect(sd)


def test_painternet_metadata_is_required_and_checked():
    sd = W.painternet("sd15", small=True, device="meta")
    with pytest.raises(CheckpointFormatError, match="metadata is missing"):
        detect(sd, None)
    with pytest.raises(CheckpointFormatError, match="base 'sdxl' but the weights have the sd15 structure"):
        detect(sd, W.painternet_metadata("sdxl"))
    with pytest.raises(CheckpointFormatError, match="version '2'"):
        detect(sd, dict(W.painternet_metadata("sd15"), version="2"))
    with pytest.raises(CheckpointFormatError, match="mask '1=inpaint'"):
        detect(sd, dict(W.painternet_metadata("sd15"), mask="1=inpaint"))
    assert detect(sd, W.painternet_metadata("sd15", mask="1=hole")).mask == "1=hole"
    assert detect(sd, dict(W.painternet_metadata("sd15"), trained_by="x")).mask == "1=keep"
    assert painternet_metadata("sd15") == W.painternet_metadata("sd15")   # doc == code


def test_painternet_missing_acp_is_named():
    sd = W.painternet("sdxl", small=True, device="meta")
    del sd["zero_attn.10.bias"]
    spec = detect(sd, W.painternet_metadata("sdxl"))
    with pytest.raises(CheckpointFormatError, match=r"missing 1 tensors \(zero_attn.10.bias\)"):
        convert(sd, spec)


def test_load_branch_from_files(tmp_path):
    p = W.write_painternet(tmp_path / "pn.safetensors", "sdxl", small=True, zero_init=True)
    assert safetensors_metadata(p) == W.painternet_metadata("sdxl")
    spec, sd = load_branch(p)
    assert spec.kind == "painternet" and spec.base == "sdxl" and len(spec.acp_sites) == 11
    assert float(sd["zero_attn.3.weight"].abs().sum()) == 0 and float(sd["zero_up.0.bias"].abs().sum()) == 0
    assert float(sd["input_blocks.0.0.weight"].abs().sum()) > 0
    src = W.brushnet_sd15(small=True, seed=5)
    q = W.write_diffusers(tmp_path / "diffusion_pytorch_model.safetensors", src)
    spec, sd = load_branch(q)
    assert spec.kind == "brushnet" and torch.equal(sd["output_blocks.11.0.out_layers.3.weight"],
                                                    src["up_blocks.3.resnets.2.conv2.weight"])
    assert safetensors_metadata(tmp_path / "x.pt") is None


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_painternet_initialised_from_a_unet(base):
    """The trainer's starting branch: the UNet's weights, the input conv widened with zeros, every zero connection
    at zero, the output head dropped; it reads back as a PainterNet of the same structure."""
    full = W.painternet(base=base, small=True, seed=3)
    spec = detect(full, W.painternet_metadata(base))
    unet = {k: v for k, v in full.items() if not k.startswith("zero_")}
    unet["input_blocks.0.0.weight"] = full["input_blocks.0.0.weight"][:, :4].clone()
    unet["out.2.weight"] = torch.zeros(4, 8, 3, 3)
    got = painternet_from_unet(unet, spec.config)
    assert set(got) == set(full)
    for k, v in got.items():
        assert v.shape == full[k].shape, k
        if k.startswith("zero_"):
            assert not v.any(), k
        elif k == "input_blocks.0.0.weight":
            assert torch.equal(v[:, :4], unet[k]) and not v[:, 4:].any()
        else:
            assert torch.equal(v, full[k]), k
    again = detect(got, W.painternet_metadata(base))
    assert again.kind == "painternet" and again.acp_sites == spec.acp_sites
    with pytest.raises(ValueError, match="4-channel"):
        painternet_from_unet(dict(unet, **{"input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}),
                                            spec.config)
