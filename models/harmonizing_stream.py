"""Exact tiled harmonizing decode with compute memory bounded by the tile size.

Why not independent tiles: every ``GroupNorm`` in the decoder normalises with statistics of the whole image
and the mid block attends over the whole latent, so decoding tiles independently changes every pixel a
little (and the seams a lot). Here the decoder runs *layer-synchronously*: each stage is computed tile by
tile on the compute device and written to a full-size feature map kept on a storage device (system RAM),

* every convolution sees its tile plus a halo at least as wide as the stage's receptive field growth, and
  only the exact core of each tile is kept, so no tile border ever reaches the result;
* every ``GroupNorm`` uses statistics accumulated (float64) over the cores of all tiles, i.e. the exact
  whole-image statistics, computed in the pass that produces its input;
* the mid attention takes its keys and values from the whole latent and its queries tile by tile;
* the condition-encoder features are streamed the same way; the full-resolution ones (cheap convs at the
  start of the encoder) are recomputed per tile instead of being stored.

The result equals the whole-image decode up to float summation order, at the seams as well. Compute-device
memory follows the tile size. Storage holds at most two full-resolution feature maps at once (the input and
output of one residual block, 384 channels together for the released decoder: ~0.77 GB per megapixel in
16-bit, twice that in float32) plus the stored lower-resolution encoder features.

A residual block costs one extra ``conv1`` pass: the statistics of ``norm2`` are gathered in a first pass
that discards its output, so the block's hidden activation never needs storing.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .harmonizing_decoder import HarmonizingDecoder, ResnetBlock


class _GroupStats:
    """Per (item, group) mean and variance of everything added, merged tile by tile (Chan et al.'s parallel
    update in float64), for one GroupNorm."""

    def __init__(self, norm):
        self.norm, self.groups = norm, norm.num_groups
        self.mean = self.m2 = self._affine = None
        self.n = 0

    def add(self, x: torch.Tensor):
        B = x.shape[0]
        g = x.reshape(B, self.groups, -1)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        n = g.shape[-1]
        # one-pass float32 sums per tile (cheaper than var_mean), merged across tiles in float64
        mean = g.sum(-1).double() / n
        m2 = torch.linalg.vector_norm(g, 2, -1).double().square() - mean * mean * n
        if self.mean is None:
            self.mean, self.m2, self.n = mean, m2.clamp_min(0), n
            return
        tot = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / tot)
        self.m2 = self.m2 + m2.clamp_min(0) + delta * delta * (self.n * n / tot)
        self.n = tot

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm of x with the accumulated statistics and the norm's affine weights, as one x*a + b."""
        if self._affine is None:
            rstd = torch.rsqrt(self.m2 / self.n + self.norm.eps)                     # [B, G] float64
            rep = self.norm.num_channels // self.groups
            w = self.norm.weight.detach().to("cpu", torch.float64).reshape(1, -1)
            b = self.norm.bias.detach().to("cpu", torch.float64).reshape(1, -1)
            scale = rstd.cpu().repeat_interleave(rep, 1) * w                             # [B, C]
            shift = b - self.mean.cpu().repeat_interleave(rep, 1) * scale
            self._affine = (scale, shift)
        scale, shift = (t.to(x.device, torch.promote_types(x.dtype, torch.float32))[:, :, None, None]
                        for t in self._affine)
        if x.dtype == scale.dtype:
            return torch.addcmul(shift, x, scale)
        return torch.addcmul(shift, x.to(scale.dtype), scale).to(x.dtype)


def _span(lo: int, hi: int, size: int, halo: int, align: int) -> tuple[int, int]:
    """[lo, hi) grown by ``halo``, clipped to [0, size), ends aligned to ``align`` (size is a multiple)."""
    a = max(0, lo - halo) // align * align
    b = min(size, -(-(hi + halo) // align) * align)
    return a, b


class StreamingDecode:
    """One exact tiled decode. ``tile`` is in image pixels and sets the tile size at every scale."""

    def __init__(self, model: HarmonizingDecoder, device, store, tile: int,
                 on_step: Optional[Callable[[], None]] = None):
        self.m, self.device, self.store, self.tile = model, device, store, tile
        self.dtype = model.conv_in.weight.dtype
        self.on_step = on_step or (lambda: None)
        cfg = model.config
        self.f = cfg.factor
        # encoder: layers before the first stride-2 conv run at full resolution and are recomputed per tile
        strides = [1 if k == 3 else 2 for _, _, k in cfg.cond_layers]
        self.prefix = next((i for i, s in enumerate(strides) if s == 2), len(strides))
        if self.prefix == 0:
            raise ValueError("tiled decode needs a condition encoder that starts with a stride-1 convolution")
        self.enc_scale = []
        s = 1
        for st in strides:
            s *= st
            self.enc_scale.append(s)

    # -- tiling helpers --------------------------------------------------------------------------------------
    def _tiles(self, H: int, W: int, s: int):
        t = max(self.tile // s, 1)
        for y in range(0, H, t):
            for x in range(0, W, t):
                yield y, min(y + t, H), x, min(x + t, W)

    def tile_passes(self, h: int, w: int) -> int:
        """How many tile steps ``__call__`` takes for a latent of h x w (for a progress bar)."""
        n = lambda s: len(list(self._tiles(h * self.f // s, w * self.f // s, s)))
        m, cfg = self.m, self.m.config
        total = n(self.f) * (1 + 2 + 2 + 2)                       # conv_in, block_1, attn (k/v, q), block_2
        total += sum(n(s) for s in self.enc_scale[self.prefix:])  # streamed encoder layers
        for i in reversed(range(len(m.up))):
            s = 2 ** i
            total += n(s) * 2 * (cfg.num_res_blocks + 1)
            if i:
                total += n(s // 2)
        return total + n(1)                                       # conv_out

    def _run(self, shape, s, halo, align, fn, stats=None, post=None, into=None):
        """Compute a full map of ``shape`` at scale ``s`` tile by tile. ``fn(y0, y1, x0, x1)`` returns the
        values on the grown span; only the tile core is kept, fed to ``stats`` after ``post``. ``into``: where the
        cores go: None, a new map on ``store``; a dtype, the same in that dtype; a tensor, written into it (when
        ``fn`` reads that tensor only at the core); False, nowhere (``fn`` is run for its side effects)."""
        B, C, H, W = shape
        keep = into is not False
        if isinstance(into, torch.Tensor):
            out = into
        else:
            out = torch.empty(shape, dtype=into or self.dtype, device=self.store) if keep else None
        for y0, y1, x0, x1 in self._tiles(H, W, s):
            cy0, cy1 = _span(y0, y1, H, halo, align)
            cx0, cx1 = _span(x0, x1, W, halo, align)
            core = fn(cy0, cy1, cx0, cx1)[..., y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
            if post is not None:
                core = post(core, s, y0, y1, x0, x1)
            if stats is not None:
                stats.add(core)
            if keep:
                out[..., y0:y1, x0:x1] = core.to(self.store)
            self.on_step()
        return out

    def _get(self, t: torch.Tensor, y0, y1, x0, x1):
        return t[..., y0:y1, x0:x1].to(self.device, self.dtype)

    # -- condition encoder -------------------------------------------------------------------------------------
    def _enc_prefix(self, upto: int, y0, y1, x0, x1) -> torch.Tensor:
        """Exact full-resolution encoder output of layer ``upto`` (< prefix) on [y0,y1) x [x0,x1)."""
        H, W = self.mask.shape[-2:]
        r = upto + 1
        cy0, cy1 = max(0, y0 - r), min(H, y1 + r)
        cx0, cx1 = max(0, x0 - r), min(W, x1 + r)
        img, mask = self._get(self.image, cy0, cy1, cx0, cx1), self._get(self.mask, cy0, cy1, cx0, cx1)
        x = torch.cat([(1 - mask) * img, mask], dim=1)
        for i in range(upto + 1):
            x = self.m.encoder.layers[i](x if i == 0 else F.relu(x))
        return x[..., y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]

    def _stream_encoder(self):
        """Store the encoder features below full resolution (in decoder-consumption order they are needed
        coarsest first, but each needs the finer one, so all are computed up front)."""
        layers, B = self.m.encoder.layers, self.mask.shape[0]
        H, W = self.mask.shape[-2:]
        prev = None
        for i in range(self.prefix, len(layers)):
            s = self.enc_scale[i]
            conv = layers[i]
            r = s // self.enc_scale[i - 1]          # i >= prefix >= 1

            def fn(cy0, cy1, cx0, cx1, conv=conv, r=r, i=i, prev=prev):
                src = (self._enc_prefix(i - 1, cy0 * r, cy1 * r, cx0 * r, cx1 * r) if prev is None
                       else self._get(prev, cy0 * r, cy1 * r, cx0 * r, cx1 * r))
                return conv(F.relu(src))

            prev = self._run((B, conv.out_channels, H // s, W // s), s, 1, 1, fn)
            self.enc[(conv.out_channels, H // s, W // s)] = (s, prev)

    def _feature(self, shape, y0, y1, x0, x1) -> torch.Tensor:
        """Encoder feature of (C, H, W) ``shape`` on a region at that scale."""
        hit = self.enc.get(tuple(shape))
        if hit is not None:
            return self._get(hit[1], y0, y1, x0, x1)
        for i in range(self.prefix):
            conv = self.m.encoder.layers[i]
            if (conv.out_channels,) + tuple(self.mask.shape[-2:]) == tuple(shape):
                return self._enc_prefix(i, y0, y1, x0, x1)
        raise ValueError(f"no condition feature of shape {tuple(shape)}")

    def _replacer(self, soft: bool):
        """post-op: the tile's known region replaced by the condition features (ASUKA's replace_known)."""
        def post(core, s, y0, y1, x0, x1):
            mask = self._get(self.mask, y0 * s, y1 * s, x0 * s, x1 * s)
            if soft:
                hole = mask
            else:   # any hole pixel in the s x s cell counts as hole (area-downsampled mask > 0)
                hole = ((F.avg_pool2d(mask, s) if s > 1 else mask) > 0).to(core.dtype)
            f = self._feature((core.shape[1], self.mask.shape[-2] // s, self.mask.shape[-1] // s), y0, y1, x0, x1)
            return core * hole + f * (1 - hole)
        return post

    # -- decoder stages ----------------------------------------------------------------------------------------
    def _resblock(self, blk: ResnetBlock, x, st1, s, next_norm, post=None):
        """Two passes: conv1 (stored, with norm2's statistics), then conv2 + shortcut. The output overwrites
        x in place when the channel count is unchanged (pass 2 reads x only at the tile core)."""
        B, cin, H, W = x.shape
        st2 = _GroupStats(blk.norm2)
        cout = blk.conv1.out_channels
        hidden = self._run((B, cout, H, W), s, 1, 1,
                           lambda cy0, cy1, cx0, cx1: blk.conv1(F.silu(st1.apply(self._get(x, cy0, cy1, cx0, cx1)))),
                           stats=st2)

        def second(cy0, cy1, cx0, cx1):
            h = blk.conv2(F.silu(st2.apply(self._get(hidden, cy0, cy1, cx0, cx1))))
            xi = self._get(x, cy0, cy1, cx0, cx1)   # only the core of this is used (1x1 shortcut)
            return (xi if blk.nin_shortcut is None else blk.nin_shortcut(xi)) + h

        st_out = _GroupStats(next_norm) if next_norm is not None else None
        out = self._run((B, cout, H, W), s, 1, 1, second, stats=st_out, post=post,
                        into=x if cin == cout else None)
        return out, st_out

    def _attention(self, x, st, next_norm):
        attn = self.m.mid.attn_1
        B, C, H, W = x.shape
        k = torch.empty(B, H * W, C, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)

        def kv(cy0, cy1, cx0, cx1):
            hn = st.apply(self._get(x, cy0, cy1, cx0, cx1))
            idx = (torch.arange(cy0, cy1, device=self.device)[:, None] * W
                   + torch.arange(cx0, cx1, device=self.device)[None, :]).flatten()
            k[:, idx] = attn.k(hn).flatten(2).transpose(1, 2)
            v[:, idx] = attn.v(hn).flatten(2).transpose(1, 2)
            return hn[:, :0]

        self._run((B, 0, H, W), self.f, 0, 1, kv, into=False)

        def q(cy0, cy1, cx0, cx1):
            xi = self._get(x, cy0, cy1, cx0, cx1)
            qi = attn.q(st.apply(xi)).flatten(2).transpose(1, 2)
            o = attn.attention(qi, k, v, 1).transpose(1, 2).reshape(B, C, cy1 - cy0, cx1 - cx0)
            return xi + attn.proj_out(o)

        st_out = _GroupStats(next_norm)
        return self._run(x.shape, self.f, 0, 1, q, stats=st_out), st_out

    def _first_norm(self, i: int):
        """The GroupNorm that consumes the input of up level i (its first block's norm1)."""
        return self.m.up[i].block[0].norm1

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: [B, zc, h, w]; image [B, 3, fh, fw] in [-1, 1]; mask [B, 1, fh, fw] -> [B, 3, fh, fw] float32
        on ``store``."""
        m, f = self.m, self.f
        self.image = image.to(self.store, self.dtype)
        self.mask = mask.to(self.store, self.dtype)
        z = z.to(self.store, self.dtype)
        B, _, h, w = z.shape
        self.enc = {}
        self._stream_encoder()

        st = _GroupStats(m.mid.block_1.norm1)
        x = self._run((B, m.conv_in.out_channels, h, w), f, 1, 1,
                      lambda cy0, cy1, cx0, cx1: m.conv_in(self._get(z, cy0, cy1, cx0, cx1)), stats=st)
        x, st = self._resblock(m.mid.block_1, x, st, f, m.mid.attn_1.norm)
        x, st = self._attention(x, st, m.mid.block_2.norm1)
        top = len(m.up) - 1
        x, st = self._resblock(m.mid.block_2, x, st, f, self._first_norm(top), post=self._replacer(False))
        for i in reversed(range(len(m.up))):
            s = 2 ** i
            blocks = m.up[i].block
            for j, blk in enumerate(blocks):
                last = j == len(blocks) - 1
                if not last:
                    nxt, post = blocks[j + 1].norm1, None
                elif i:
                    nxt, post = None, None   # the upsample's output is what gets normalised next
                else:
                    nxt, post = m.norm_out, self._replacer(True)
                x, st = self._resblock(blk, x, st, s, nxt, post)
            if i:
                up = m.up[i].upsample
                st = _GroupStats(self._first_norm(i - 1))
                src = x

                def upsample(cy0, cy1, cx0, cx1, src=src, up=up):
                    t = self._get(src, cy0 // 2, cy1 // 2, cx0 // 2, cx1 // 2)
                    return up.conv(F.interpolate(t, scale_factor=2.0, mode="nearest"))

                x = self._run((B, up.conv.out_channels, src.shape[-2] * 2, src.shape[-1] * 2), s // 2, 1, 2,
                              upsample, stats=st, post=self._replacer(False))
                del src
                for key in [k for k, (sc, _) in self.enc.items() if sc >= s // 2]:
                    del self.enc[key]   # consumed: this level's start and the coarser ones
        self.enc.clear()

        def out(cy0, cy1, cx0, cx1):
            return m.conv_out(F.silu(st.apply(self._get(x, cy0, cy1, cx0, cx1)))).float()

        return self._run((B, m.conv_out.out_channels, h * f, w * f), 1, 1, 1, out, into=torch.float32)
