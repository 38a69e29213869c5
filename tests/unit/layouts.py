"""Random-weight state dicts in the authors' released layouts, written from REFERENCE.md's key lists and
shapes — independently of the pack's module classes, so a naming or shape mistake there cannot cancel out.

Widths and depths are parameters so the tests can use small configurations of the same layouts.
"""
from __future__ import annotations

import argparse

import torch


def _lin(sd, name, cin, cout, g, bias=True, std=0.05):
    sd[f"{name}.weight"] = torch.randn(cout, cin, generator=g) * std
    if bias:
        sd[f"{name}.bias"] = torch.randn(cout, generator=g) * std


def _ln(sd, name, dim, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)


def _conv(sd, name, cin, cout, k, g, std=0.05):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * std
    sd[f"{name}.bias"] = torch.randn(cout, generator=g) * std


def _vit_block(sd, p, dim, hidden, g):
    _ln(sd, f"{p}.norm1", dim, g)
    _lin(sd, f"{p}.attn.qkv", dim, 3 * dim, g)
    _lin(sd, f"{p}.attn.proj", dim, dim, g)
    _ln(sd, f"{p}.norm2", dim, g)
    _lin(sd, f"{p}.mlp.fc1", dim, hidden, g)
    _lin(sd, f"{p}.mlp.fc2", hidden, dim, g)


def mae_state_dict(seed=0, img=256, patch=16, dim=768, depth=12, dec_dim=512, dec_depth=8, alpha=0.3):
    """``mae_300.pth['model']``: MAE-FAR fine-tune (no class token), timm names, decoder_patch_embed, alpha."""
    g = torch.Generator().manual_seed(seed)
    L = (img // patch) ** 2
    sd = {}
    _conv(sd, "patch_embed.proj", 3, dim, patch, g, std=0.02)
    sd["pos_embed"] = torch.randn(1, L, dim, generator=g) * 0.1
    for i in range(depth):
        _vit_block(sd, f"blocks.{i}", dim, 4 * dim, g)
    _ln(sd, "norm", dim, g)
    _lin(sd, "decoder_embed", dim, dec_dim, g)
    sd["mask_token"] = torch.randn(1, 1, dec_dim, generator=g) * 0.1
    sd["decoder_pos_embed"] = torch.randn(1, L, dec_dim, generator=g) * 0.1
    for i in range(dec_depth):
        _vit_block(sd, f"decoder_blocks.{i}", dec_dim, 4 * dec_dim, g)
    _ln(sd, "decoder_norm", dec_dim, g)
    _lin(sd, "decoder_pred", dec_dim, patch * patch * 3, g)
    _conv(sd, "decoder_patch_embed.proj", 4, dec_dim, patch, g, std=0.02)
    sd["alpha"] = torch.tensor(alpha)
    return sd


def mae_checkpoint(**kw):
    """The container MAE's training code writes: model weights plus an argparse.Namespace and the epoch."""
    return {"model": mae_state_dict(**kw), "args": argparse.Namespace(model="mae_vit_base_patch16", lr=1e-4),
            "epoch": 300}


def alignment_state_dict(seed=0, in_dim=512, dim=768, head_dim=64, depth=4, mlp_ratio=4):
    """``asuka_alignment_*.pt``: nn.Sequential(Linear, 4 x SingleStreamBlockAsuka, LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    _lin(sd, "0", in_dim, dim, g)
    hidden = mlp_ratio * dim
    for i in range(1, depth + 1):
        _lin(sd, f"{i}.linear1", dim, 3 * dim + hidden, g)
        _lin(sd, f"{i}.linear2", dim + hidden, dim, g)
        sd[f"{i}.norm.query_norm.scale"] = 1 + 0.1 * torch.randn(head_dim, generator=g)
        sd[f"{i}.norm.key_norm.scale"] = 1 + 0.1 * torch.randn(head_dim, generator=g)
        _lin(sd, f"{i}.modulation.lin", dim, 3 * dim, g)  # present in the release, unused
    _ln(sd, str(depth + 1), dim, g)
    return sd


def _resblock(sd, p, cin, cout, g):
    _ln(sd, f"{p}.norm1", cin, g)
    _conv(sd, f"{p}.conv1", cin, cout, 3, g)
    _ln(sd, f"{p}.norm2", cout, g)
    _conv(sd, f"{p}.conv2", cout, cout, 3, g)
    if cin != cout:
        _conv(sd, f"{p}.nin_shortcut", cin, cout, 1, g)


def decoder_state_dict(seed=0, z=16, ch=128, mult=(1, 2, 4, 4), res_blocks=2, cond=(128, 256, 512, 512, 512)):
    """Decoder keys of ``asuka_decoder.ckpt`` (without the ``decoder.`` prefix), incl. unused ``up_layers``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    top = ch * mult[-1]
    _conv(sd, "conv_in", z, top, 3, g)
    _resblock(sd, "mid.block_1", top, top, g)
    _ln(sd, "mid.attn_1.norm", top, g)
    for n in ("q", "k", "v", "proj_out"):
        _conv(sd, f"mid.attn_1.{n}", top, top, 1, g)
    _resblock(sd, "mid.block_2", top, top, g)
    block_in = top
    for i in reversed(range(len(mult))):
        out = ch * mult[i]
        for j in range(res_blocks + 1):
            _resblock(sd, f"up.{i}.block.{j}", block_in, out, g)
            block_in = out
        if i != 0:
            _conv(sd, f"up.{i}.upsample.conv", block_in, block_in, 3, g)
    _ln(sd, "norm_out", block_in, g)
    _conv(sd, "conv_out", block_in, 3, 3, g)
    # condition encoder: 3x3 s1 (4->c0), 3x3 s1 (c0->c1), then 4x4 s2 convs
    chans = [4, *cond]
    for i in range(len(cond)):
        _conv(sd, f"encoder.layers.{i}", chans[i], chans[i + 1], 3 if i < 2 else 4, g)
    for i, (cin, cout) in enumerate([(512, 512), (1024, 512), (512, 256), (256, 128)]):
        sd[f"up_layers.{i}.deconv.weight"] = torch.randn(cin, cout, 4, 4, generator=g) * 0.01
        sd[f"up_layers.{i}.deconv.bias"] = torch.zeros(cout)
    return sd


def decoder_checkpoint(**kw):
    """Lightning-style container: ``state_dict`` with ``decoder.`` keys plus the VAE ``encoder.`` keys."""
    g = torch.Generator().manual_seed(99)
    sd = {f"decoder.{k}": v for k, v in decoder_state_dict(**kw).items()}
    sd["encoder.conv_in.weight"] = torch.randn(128, 3, 3, 3, generator=g)
    sd["encoder.conv_in.bias"] = torch.zeros(128)
    return {"state_dict": sd, "epoch": 3, "global_step": 1000}
