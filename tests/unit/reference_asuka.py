"""Independent float64 re-computation of ASUKA's prior and alignment straight from a state dict.

Written from the paper / REFERENCE.md description with explicit formulas (explicit softmax, explicit
LayerNorm, loops over blocks), sharing no code with the pack's modules.
"""
import math

import torch

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)


def layer_norm(x, w=None, b=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if w is None else y * w + b


def softmax_attention(q, k, v, heads, key_excluded=None):
    """q,k,v: [B, L, H*D]; key_excluded: [B, L] bool."""
    B, L, C = q.shape
    d = C // heads
    q, k, v = (t.view(B, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if key_excluded is not None:
        s = s.masked_fill(key_excluded[:, None, None, :], float("-inf"))
    p = torch.exp(s - s.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    return (p @ v).permute(0, 2, 1, 3).reshape(B, -1, C)


def vit_block(sd, p, x, heads, key_excluded=None):
    g = lambda n: sd[f"{p}.{n}"].double()
    h = layer_norm(x, g("norm1.weight"), g("norm1.bias"))
    qkv = h @ g("attn.qkv.weight").T + g("attn.qkv.bias")
    q, k, v = qkv.chunk(3, -1)
    x = x + softmax_attention(q, k, v, heads, key_excluded) @ g("attn.proj.weight").T + g("attn.proj.bias")
    h = layer_norm(x, g("norm2.weight"), g("norm2.bias"))
    h = h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")


def patch_embed(x, w, b):
    p = w.shape[-1]
    B, C, H, W = x.shape
    cols = x.unfold(2, p, p).unfold(3, p, p)                      # B, C, gh, gw, p, p
    cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * p * p)
    return cols @ w.reshape(w.shape[0], -1).T.double() + b.double()


def mae_prior(sd, x, m, enc_heads, dec_heads, prior_block=6):
    """x: [B,3,256,256] normalised masked image (float64), m: [B,1,256,256] -> (prior, reconstruction [0,1])."""
    d = lambda n: sd[n].double()
    p = sd["patch_embed.proj.weight"].shape[-1]
    g = 256 // p
    cov = torch.nn.functional.avg_pool2d(m, p).flatten(1)          # hole fraction per patch (integer factor)
    excluded = cov > 0
    h = patch_embed(x, d("patch_embed.proj.weight"), d("patch_embed.proj.bias")) + d("pos_embed")
    n_enc = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_enc):
        h = vit_block(sd, f"blocks.{i}", h, enc_heads, excluded)
    h = layer_norm(h, d("norm.weight"), d("norm.bias"))
    h = h @ d("decoder_embed.weight").T + d("decoder_embed.bias")
    h = torch.where(excluded[..., None], d("mask_token").expand_as(h), h)
    emb = patch_embed(torch.cat([x * (1 - m), m], 1), d("decoder_patch_embed.proj.weight"), d("decoder_patch_embed.proj.bias"))
    a = min(max(float(sd["alpha"]), 0.0), 1.0)
    partial = (excluded & (cov < 1))[..., None]
    h = torch.where(partial, a * h + (1 - a) * emb, h) + d("decoder_pos_embed")
    n_dec = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    prior = None
    for i in range(n_dec):
        if i == prior_block:
            prior = h
        h = vit_block(sd, f"decoder_blocks.{i}", h, dec_heads)
    h = layer_norm(h, d("decoder_norm.weight"), d("decoder_norm.bias"))
    pix = h @ d("decoder_pred.weight").T + d("decoder_pred.bias")    # B, L, p*p*3
    B = pix.shape[0]
    img = pix.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)
    return prior, (img * STD + MEAN).clamp(0, 1)


def alignment(sd, x, depth=4):
    d = lambda n: sd[n].double()
    dim = sd["0.weight"].shape[0]
    hd = sd["1.norm.query_norm.scale"].shape[0]
    heads = dim // hd
    h = x.double() @ d("0.weight").T + d("0.bias")
    for i in range(1, depth + 1):
        B, L, _ = h.shape
        y = layer_norm(h) @ d(f"{i}.linear1.weight").T + d(f"{i}.linear1.bias")
        q, k, v, mlp = y[..., :dim], y[..., dim:2 * dim], y[..., 2 * dim:3 * dim], y[..., 3 * dim:]
        rms = lambda t, s: t / torch.sqrt((t ** 2).mean(-1, keepdim=True) + 1e-6) * s
        q = rms(q.view(B, L, heads, hd), d(f"{i}.norm.query_norm.scale")).reshape(B, L, dim)
        k = rms(k.view(B, L, heads, hd), d(f"{i}.norm.key_norm.scale")).reshape(B, L, dim)
        att = softmax_attention(q, k, v, heads)
        gelu = 0.5 * mlp * (1 + torch.tanh(math.sqrt(2 / math.pi) * (mlp + 0.044715 * mlp ** 3)))
        h = h + torch.cat([att, gelu], -1) @ d(f"{i}.linear2.weight").T + d(f"{i}.linear2.bias")
    return layer_norm(h, d(f"{depth + 1}.weight"), d(f"{depth + 1}.bias"), eps=1e-5)
