"""Random-weight inpaint-branch state dicts in the released layouts, written independently of ``models/``.

* Diffusers ``BrushNetModel`` layouts (BrushNet SD1.5 / SDXL, PowerPaint-v2), built the way diffusers
  builds the model (``block_out_channels`` loops), with the names and shapes listed in
  notes/issue3_branch.md §1-2 (full size: 322 / 252 / 738 tensors).
* Our PainterNet format (ComfyUI ``UNetModel`` names + ``zero_*`` + ``zero_attn.*``), built the way
  ComfyUI's ``UNetModel`` constructor walks its blocks, with the safetensors metadata of docs/painternet_format.md.

``small=True`` keeps every structure (levels, ResBlocks per level, where attention sits, SDXL's
add_embedding of 2816, the 768 / 2048 text widths) with tiny widths (model_channels 32) and SDXL
transformer depth 1, so integration tests can build the branch quickly. ``device="meta"`` gives
shape-only tensors (full-size checks cost nothing). ``zero_init=True`` zeroes every zero conv / ACP
(a branch that must leave the UNet unchanged).
"""
from __future__ import annotations

import torch

SD15 = dict(block_out=(320, 640, 1280, 1280), context_dim=768, linear=False, adm=None)
SDXL = dict(block_out=(320, 640, 1280), context_dim=2048, linear=True, adm=2816)
SMALL_SD15 = dict(SD15, block_out=(32, 64, 128, 128))
SMALL_SDXL = dict(SDXL, block_out=(32, 64, 128))

PAINTERNET_METADATA_KEYS = ("format", "version", "base", "mask")


class _Writer:
    def __init__(self, seed, device, dtype, zero_init, std=0.02):
        self.sd = {}
        self.g = torch.Generator().manual_seed(seed)
        self.device, self.dtype, self.zero_init, self.std = device, dtype, zero_init, std

    def t(self, name, shape, zero=False):
        if self.device == "meta" or str(self.device) == "meta":
            v = torch.empty(shape, device="meta", dtype=self.dtype)
        elif zero:
            v = torch.zeros(shape, dtype=self.dtype)
        else:
            v = (torch.randn(shape, generator=self.g) * self.std).to(self.dtype)
        self.sd[name] = v

    def conv(self, name, cin, cout, k, zero=False):
        self.t(f"{name}.weight", (cout, cin, k, k), zero)
        self.t(f"{name}.bias", (cout,), zero)

    def linear(self, name, cin, cout, bias=True, zero=False):
        self.t(f"{name}.weight", (cout, cin), zero)
        if bias:
            self.t(f"{name}.bias", (cout,), zero)

    def embeddings(self, time: tuple, label: tuple, ch, temb, adm):
        """The timestep MLP (two linears, named ``time``) and, with ``adm``, the label MLP (named ``label``)."""
        self.linear(time[0], ch, temb)
        self.linear(time[1], temb, temb)
        if adm is not None:
            self.linear(label[0], adm, temb)
            self.linear(label[1], temb, temb)

    def norm(self, name, ch):
        self.t(f"{name}.weight", (ch,))
        self.t(f"{name}.bias", (ch,))

    def zero_conv(self, name, ch):
        self.conv(name, ch, ch, 1, zero=self.zero_init)

    # the same ResBlock tensors under diffusers names and under ComfyUI names
    DIFFUSERS_RES = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
    COMFY_RES = ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3", "skip_connection")

    def _res(self, p, cin, cout, temb, names):
        norm1, conv1, emb, norm2, conv2, skip = names
        self.norm(f"{p}.{norm1}", cin)
        self.conv(f"{p}.{conv1}", cin, cout, 3)
        self.linear(f"{p}.{emb}", temb, cout)
        self.norm(f"{p}.{norm2}", cout)
        self.conv(f"{p}.{conv2}", cout, cout, 3)
        if cin != cout:
            self.conv(f"{p}.{skip}", cin, cout, 1)

    def resnet(self, p, cin, cout, temb):
        self._res(p, cin, cout, temb, self.DIFFUSERS_RES)

    def resblock(self, p, cin, cout, temb):
        self._res(p, cin, cout, temb, self.COMFY_RES)

    def transformer(self, p, ch, depth, context_dim, linear):
        """diffusers Transformer2DModel == ComfyUI SpatialTransformer names."""
        self.norm(f"{p}.norm", ch)
        for proj in ("proj_in", "proj_out"):
            if linear:
                self.linear(f"{p}.{proj}", ch, ch)
            else:
                self.conv(f"{p}.{proj}", ch, ch, 1)
        for t in range(depth):
            b = f"{p}.transformer_blocks.{t}"
            for attn, kv in (("attn1", ch), ("attn2", context_dim)):
                self.linear(f"{b}.{attn}.to_q", ch, ch, bias=False)
                self.linear(f"{b}.{attn}.to_k", kv, ch, bias=False)
                self.linear(f"{b}.{attn}.to_v", kv, ch, bias=False)
                self.linear(f"{b}.{attn}.to_out.0", ch, ch)
            self.linear(f"{b}.ff.net.0.proj", ch, ch * 8)
            self.linear(f"{b}.ff.net.2", ch * 4, ch)
            for n in ("norm1", "norm2", "norm3"):
                self.norm(f"{b}.{n}", ch)


def diffusers_branch(block_out, context_dim, linear, adm, attn_down, attn_mid, attn_up, layers=2,
                     depth=1, seed=0, device="cpu", dtype=torch.float32, zero_init=False):
    """A ``BrushNetModel`` state dict (diffusers names): conv_in_condition, down/mid/up blocks, zero convs.

    ``attn_down`` / ``attn_up``: per down / up block, whether it is a CrossAttn block.
    """
    w = _Writer(seed, device, dtype, zero_init)
    c0, temb = block_out[0], 4 * block_out[0]
    w.conv("conv_in_condition", 9, c0, 3)
    w.embeddings(("time_embedding.linear_1", "time_embedding.linear_2"),
                 ("add_embedding.linear_1", "add_embedding.linear_2"), c0, temb, adm)
    zero_down = [c0]
    out = c0
    for b, ch in enumerate(block_out):
        cin, out = out, ch
        final = b == len(block_out) - 1
        for j in range(layers):
            w.resnet(f"down_blocks.{b}.resnets.{j}", cin if j == 0 else out, out, temb)
            if attn_down[b]:
                w.transformer(f"down_blocks.{b}.attentions.{j}", out, depth, context_dim, linear)
            zero_down.append(out)
        if not final:
            w.conv(f"down_blocks.{b}.downsamplers.0.conv", out, out, 3)
            zero_down.append(out)
    for k, ch in enumerate(zero_down):
        w.zero_conv(f"brushnet_down_blocks.{k}", ch)
    mid = block_out[-1]
    w.resnet("mid_block.resnets.0", mid, mid, temb)
    if attn_mid:
        w.transformer("mid_block.attentions.0", mid, depth, context_dim, linear)
    w.resnet("mid_block.resnets.1", mid, mid, temb)
    w.zero_conv("brushnet_mid_block", mid)
    rev = list(reversed(block_out))
    out = rev[0]
    zero_up = []
    for u in range(len(rev)):
        prev, out, skip_in = out, rev[u], rev[min(u + 1, len(rev) - 1)]
        for j in range(layers + 1):
            skip = skip_in if j == layers else out
            res_in = prev if j == 0 else out
            w.resnet(f"up_blocks.{u}.resnets.{j}", res_in + skip, out, temb)
            if attn_up[u]:
                w.transformer(f"up_blocks.{u}.attentions.{j}", out, depth, context_dim, linear)
            zero_up.append(out)
        if u != len(rev) - 1:
            w.conv(f"up_blocks.{u}.upsamplers.0.conv", out, out, 3)
            zero_up.append(out)
    for j, ch in enumerate(zero_up):
        w.zero_conv(f"brushnet_up_blocks.{j}", ch)
    return w.sd


def brushnet_sd15(small=False, **kw):
    """``segmentation_mask_brushnet_ckpt`` / ``random_mask_brushnet_ckpt`` (322 tensors at full size)."""
    c = SMALL_SD15 if small else SD15
    return diffusers_branch(c["block_out"], None, False, None, (False,) * 4, False, (False,) * 4, **kw)


def brushnet_sdxl(small=False, **kw):
    """``*_brushnet_ckpt_sdxl_v0`` (252 tensors at full size): no attention, add_embedding 2816 -> 1280."""
    c = SMALL_SDXL if small else SDXL
    return diffusers_branch(c["block_out"], None, False, c["adm"], (False,) * 3, False, (False,) * 3, **kw)


def powerpaint_v2(small=False, **kw):
    """``PowerPaint_Brushnet/diffusion_pytorch_model.safetensors`` (738 tensors at full size): BrushNet SD1.5
    with CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3."""
    c = SMALL_SD15 if small else SD15
    return diffusers_branch(c["block_out"], 768, False, None, (True, True, True, False), True,
                            (False, True, True, True), **kw)


def painternet(base="sd15", small=False, seed=0, device="cpu", dtype=torch.float32, zero_init=False):
    """Our PainterNet format (ComfyUI UNet names), SD1.5- or SDXL-structured.

    Attention per level as the base UNet: SD1.5 depth 1 on levels 0-2 and in the middle; SDXL depth
    (0, 2, 10) per level and 10 in the middle (small: (0, 1, 1) and 1).
    """
    c = dict({"sd15": SMALL_SD15 if small else SD15, "sdxl": SMALL_SDXL if small else SDXL}[base])
    depth = {"sd15": (1, 1, 1, 0), "sdxl": (0, 1, 1) if small else (0, 2, 10)}[base]
    mid_depth = {"sd15": 1, "sdxl": 1 if small else 10}[base]
    chans, ctx, lin, adm = c["block_out"], c["context_dim"], c["linear"], c["adm"]
    w = _Writer(seed, device, dtype, zero_init)
    mc, temb = chans[0], 4 * chans[0]
    w.conv("input_blocks.0.0", 9, mc, 3)
    w.embeddings(("time_embed.0", "time_embed.2"), ("label_emb.0.0", "label_emb.0.2"), mc, temb, adm)
    acp = []                   # channels of each attn2, forward order
    skips = [mc]
    ch, ib = mc, 1
    for level, out in enumerate(chans):
        for _ in range(2):
            w.resblock(f"input_blocks.{ib}.0", ch, out, temb)
            ch = out
            if depth[level]:
                w.transformer(f"input_blocks.{ib}.1", ch, depth[level], ctx, lin)
                acp += [ch] * depth[level]
            skips.append(ch)
            ib += 1
        if level != len(chans) - 1:
            w.conv(f"input_blocks.{ib}.0.op", ch, ch, 3)
            skips.append(ch)
            ib += 1
    zero_down = list(skips)
    w.resblock("middle_block.0", ch, ch, temb)
    w.transformer("middle_block.1", ch, mid_depth, ctx, lin)
    w.resblock("middle_block.2", ch, ch, temb)
    acp += [ch] * mid_depth
    zero_up, ob = [], 0
    for level in reversed(range(len(chans))):
        for i in range(3):
            w.resblock(f"output_blocks.{ob}.0", ch + skips.pop(), chans[level], temb)
            ch = chans[level]
            layer = 1
            if depth[level]:
                w.transformer(f"output_blocks.{ob}.1", ch, depth[level], ctx, lin)
                acp += [ch] * depth[level]
                layer = 2
            zero_up.append(ch)
            if level and i == 2:
                w.conv(f"output_blocks.{ob}.{layer}.conv", ch, ch, 3)
                zero_up.append(ch)
            ob += 1
    for k, cz in enumerate(zero_down):
        w.zero_conv(f"zero_down.{k}", cz)
    w.zero_conv("zero_mid", chans[-1])
    for j, cz in enumerate(zero_up):
        w.zero_conv(f"zero_up.{j}", cz)
    for n, ca in enumerate(acp):
        w.linear(f"zero_attn.{n}", ca, ca, zero=zero_init)
    return w.sd


def painternet_metadata(base="sd15", mask="1=keep"):
    """The safetensors metadata of docs/painternet_format.md (written here from the doc, not from models/)."""
    return {"format": "consistent_inpaint.painternet", "version": "1", "base": base, "mask": mask}


def write_painternet(path, base="sd15", small=True, mask="1=keep", **kw):
    from safetensors.torch import save_file
    save_file(painternet(base, small=small, **kw), str(path), metadata=painternet_metadata(base, mask))
    return path


def write_diffusers(path, sd):
    """As diffusers' ``save_pretrained`` writes ``diffusion_pytorch_model.safetensors``."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return path


def powerpaint_text_encoder(vectors=None, encoder=True, width=768, vocab=49408, prefix="", words=("P_ctxt", "P_shape", "P_obj")):
    """PowerPaint_Brushnet/pytorch_model.bin as the authors' code writes it: the state dict of a transformers
    CLIPTextModel (CLIP-L) whose token embedding was wrapped by ``EmbeddingLayerWithFixes`` (``.wrapped``) and
    given one trainable [10, 768] parameter per task word (``.trainable_embeddings.P_obj`` …).

    Encoder tensors are zero-stride views (shapes only; nothing is allocated) unless ``encoder`` is a dict."""
    sd = {}
    if encoder is True:
        z = torch.zeros(())

        def t(*shape):
            return z.expand(*shape)
        e = "text_model.embeddings."
        sd[e + "token_embedding.wrapped.weight"] = t(vocab, width)
        sd[e + "position_embedding.weight"] = t(77, width)
        sd[e + "position_ids"] = torch.arange(77).unsqueeze(0)
        for i in range(12):
            p = f"text_model.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                sd[p + f"self_attn.{proj}.weight"], sd[p + f"self_attn.{proj}.bias"] = t(width, width), t(width)
            for ln in ("layer_norm1", "layer_norm2"):
                sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = t(width), t(width)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = t(4 * width, width), t(4 * width)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = t(width, 4 * width), t(width)
        sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"] = t(width), t(width)
    elif isinstance(encoder, dict):
        sd.update(encoder)
    g = torch.Generator().manual_seed(0)
    for w in words:
        v = None if vectors is None else vectors.get(w)
        sd[f"text_model.embeddings.token_embedding.trainable_embeddings.{w}"] = (
            torch.randn(10, width, generator=g) if v is None else v)
    return {prefix + k: v for k, v in sd.items()}
