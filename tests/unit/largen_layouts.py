"""Random-weight files in LAR-Gen's released key layouts, for small configs (no ComfyUI needed).

* ``sgm_unet_shapes``: an SGM/LDM-named SDXL-style UNet (``input_blocks.N…``, linear transformers, label_emb), the
  naming ComfyUI uses too (the integration suite checks the names against ComfyUI's UNetModel);
* ``largen_checkpoint``: ``largen_ckpt_s22k.pth``'s content: ``model.diffusion_model.`` UNet with 9 input channels
  and ``attn2.to_k_ip`` / ``attn2.to_v_ip`` in every cross-attention, optionally ``ref_*`` RefineNet copies, the
  ``conditioner.`` IP-Adapter embedder (``image_proj_model``, ``patch_projector``) and a ``first_stage_model.``
  stand-in;
* ``image_proj``: the IP-Adapter-Plus resampler (``ip-adapter-plus_sdxl_vit-h.bin`` key ``image_proj``).
"""
from __future__ import annotations

import torch

SMALL = dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, depth=(0, 1), depth_middle=1,
             context_dim=2048, adm=2816, head_channels=64)


def _resblock(p, cin, cout, emb, shapes):
    shapes.update({f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
                   f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
                   f"{p}.emb_layers.1.weight": (cout, emb), f"{p}.emb_layers.1.bias": (cout,),
                   f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
                   f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,)})
    if cin != cout:
        shapes.update({f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)})


def _transformer(p, ch, depth, ctx, shapes):
    shapes.update({f"{p}.norm.weight": (ch,), f"{p}.norm.bias": (ch,), f"{p}.proj_in.weight": (ch, ch),
                   f"{p}.proj_in.bias": (ch,), f"{p}.proj_out.weight": (ch, ch), f"{p}.proj_out.bias": (ch,)})
    for j in range(depth):
        t = f"{p}.transformer_blocks.{j}"
        for a, kv in (("attn1", ch), ("attn2", ctx)):
            shapes.update({f"{t}.{a}.to_q.weight": (ch, ch), f"{t}.{a}.to_k.weight": (ch, kv),
                           f"{t}.{a}.to_v.weight": (ch, kv), f"{t}.{a}.to_out.0.weight": (ch, ch),
                           f"{t}.{a}.to_out.0.bias": (ch,)})
        shapes.update({f"{t}.ff.net.0.proj.weight": (8 * ch, ch), f"{t}.ff.net.0.proj.bias": (8 * ch,),
                       f"{t}.ff.net.2.weight": (ch, 4 * ch), f"{t}.ff.net.2.bias": (ch,)})
        for n in (1, 2, 3):
            shapes.update({f"{t}.norm{n}.weight": (ch,), f"{t}.norm{n}.bias": (ch,)})


def sgm_unet_shapes(in_channels=9, model_channels=64, channel_mult=(1, 2), num_res_blocks=1, depth=(0, 1),
                    depth_middle=1, context_dim=2048, adm=2816, head_channels=64, with_out=True) -> dict:
    """{name: shape} of an SDXL-style UNet in SGM naming; ``depth[l]`` transformer blocks per attention at level l."""
    C, emb = model_channels, 4 * model_channels
    s = {"time_embed.0.weight": (emb, C), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
         "time_embed.2.bias": (emb,), "label_emb.0.0.weight": (emb, adm), "label_emb.0.0.bias": (emb,),
         "label_emb.0.2.weight": (emb, emb), "label_emb.0.2.bias": (emb,),
         "input_blocks.0.0.weight": (C, in_channels, 3, 3), "input_blocks.0.0.bias": (C,)}
    chans, ch, idx = [C], C, 0
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            idx += 1
            _resblock(f"input_blocks.{idx}.0", ch, mult * C, emb, s)
            ch = mult * C
            if depth[level]:
                _transformer(f"input_blocks.{idx}.1", ch, depth[level], context_dim, s)
            chans.append(ch)
        if level != len(channel_mult) - 1:
            idx += 1
            s.update({f"input_blocks.{idx}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{idx}.0.op.bias": (ch,)})
            chans.append(ch)
    _resblock("middle_block.0", ch, ch, emb, s)
    _transformer("middle_block.1", ch, depth_middle, context_dim, s)
    _resblock("middle_block.2", ch, ch, emb, s)
    k = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            ich = chans.pop()
            _resblock(f"output_blocks.{k}.0", ch + ich, mult * C, emb, s)
            ch, n = mult * C, 1
            if depth[level]:
                _transformer(f"output_blocks.{k}.1", ch, depth[level], context_dim, s)
                n = 2
            if level and i == num_res_blocks:
                s.update({f"output_blocks.{k}.{n}.conv.weight": (ch, ch, 3, 3), f"output_blocks.{k}.{n}.conv.bias": (ch,)})
            k += 1
    if with_out:
        s.update({"out.0.weight": (C,), "out.0.bias": (C,), "out.2.weight": (4, C, 3, 3), "out.2.bias": (4,)})
    return s


def cross_attention_layers(shapes: dict) -> list[str]:
    """Prefixes ``….attn2`` of every cross-attention layer."""
    return sorted(k[:-len(".to_q.weight")] for k in shapes if k.endswith("attn2.to_q.weight"))


def resampler_shapes(dim=64, depth=2, heads=2, queries=4, embedding_dim=32, output_dim=2048, ff_mult=4) -> dict:
    inner = heads * 64
    s = {"latents": (1, queries, dim), "proj_in.weight": (dim, embedding_dim), "proj_in.bias": (dim,),
         "proj_out.weight": (output_dim, dim), "proj_out.bias": (output_dim,), "norm_out.weight": (output_dim,),
         "norm_out.bias": (output_dim,)}
    for i in range(depth):
        p = f"layers.{i}"
        s.update({f"{p}.0.norm1.weight": (dim,), f"{p}.0.norm1.bias": (dim,), f"{p}.0.norm2.weight": (dim,),
                  f"{p}.0.norm2.bias": (dim,), f"{p}.0.to_q.weight": (inner, dim), f"{p}.0.to_kv.weight": (2 * inner, dim),
                  f"{p}.0.to_out.weight": (dim, inner), f"{p}.1.0.weight": (dim,), f"{p}.1.0.bias": (dim,),
                  f"{p}.1.1.weight": (dim * ff_mult, dim), f"{p}.1.3.weight": (dim, dim * ff_mult)})
    return s


def random_tensors(shapes: dict, seed: int, std: float = 0.05, prefix: str = "") -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shp in sorted(shapes.items()):
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                       "in_layers.0.weight", "out_layers.0.weight", ".1.0.weight", "out.0.weight")):
            t = 1 + std * torch.randn(shp, generator=g)
        else:
            t = std * torch.randn(shp, generator=g)
        out[prefix + k] = t
    return out


def image_proj(seed=11, **kw) -> dict:
    """``ip-adapter-plus_sdxl_vit-h.bin`` as published: {"image_proj": …, "ip_adapter": …}."""
    return {"image_proj": random_tensors(resampler_shapes(**kw), seed),
            "ip_adapter": {"1.to_k_ip.weight": torch.zeros(64, 2048), "1.to_v_ip.weight": torch.zeros(64, 2048)}}


def largen_checkpoint(seed=1, unet=None, refinenet=False, conditioner=False, vae=False, drop_ip=0,
                      prefix="model.diffusion_model.", in_channels=9, resampler=None, clip_width=32) -> dict:
    """The released checkpoint's state dict (the ``model`` container is added by the caller if wanted)."""
    cfg = dict(SMALL, **(unet or {}))
    shapes = sgm_unet_shapes(in_channels=in_channels, **cfg)
    sd = random_tensors(shapes, seed, prefix=prefix)
    g = torch.Generator().manual_seed(seed + 100)
    layers = cross_attention_layers(shapes)
    for n, layer in enumerate(layers):
        if n < drop_ip:
            continue
        ch = shapes[f"{layer}.to_q.weight"][0]
        for w in ("to_k_ip", "to_v_ip"):
            sd[f"{prefix}{layer}.{w}.weight"] = 0.05 * torch.randn(ch, cfg["context_dim"], generator=g)
    if refinenet:
        ref = sgm_unet_shapes(in_channels=4, with_out=False, **cfg)
        sd.update(random_tensors(ref, seed + 7, prefix=prefix + "ref_"))
        for layer in cross_attention_layers(ref):       # the authors' copy keeps its (unused) subject projections
            ch = ref[f"{layer}.to_q.weight"][0]
            for w in ("to_k_ip", "to_v_ip"):
                sd[f"{prefix}ref_{layer}.{w}.weight"] = torch.zeros(ch, cfg["context_dim"])
    if conditioner:
        emb = "conditioner.embedders.5."
        sd.update(random_tensors(resampler_shapes(**(resampler or {})), seed + 3, prefix=emb + "image_proj_model."))
        sd[emb + "patch_projector.weight"] = 0.05 * torch.randn(cfg["context_dim"], clip_width, generator=g)
        sd[emb + "patch_projector.bias"] = torch.zeros(cfg["context_dim"])
        sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    if vae:
        sd["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 8, 3, 3)
    return sd
