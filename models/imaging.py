"""Resizing exactly as the authors' OpenCV preprocessing does it, in torch (no OpenCV dependency).

All tensors are BCHW. Images are float in [0, 1]; masks are float with 1 = hole.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_COEF_BITS = 11  # OpenCV INTER_RESIZE_COEF_BITS: fixed-point weights of its uint8 linear resize


def _area_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's INTER_AREA table (computeResizeAreaTab) when shrinking: per output pixel, the source indices
    and float32 weights in OpenCV's order, slivers under 1e-3 dropped. -> idx [dst, K] long, w [dst, K] f32."""
    scale = src / dst
    taps = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        cell = min(scale, src - f1)
        row = []
        if s1 - f1 > 1e-3:
            row.append((s1 - 1, (s1 - f1) / cell))
        row += [(s, 1.0 / cell) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            row.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        taps.append(row)
    k = max(len(r) for r in taps)
    idx = torch.zeros(dst, k, dtype=torch.long)
    w = torch.zeros(dst, k, dtype=torch.float32)   # padding taps add 0.0 exactly
    for d, row in enumerate(taps):
        for j, (s, a) in enumerate(row):
            idx[d, j], w[d, j] = s, a
    return idx, w


def _area_shrink_uint8(src: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """OpenCV's uint8 INTER_AREA shrink. src: [B, C, H, W] float holding 0..255 integers."""
    H, W = src.shape[-2:]
    sy, sx = H / h, W / w
    if sy == int(sy) and sx == int(sx):  # OpenCV's fast path for integer factors
        fy, fx = int(sy), int(sx)
        total = src.double().reshape(*src.shape[:-2], h, fy, w, fx).sum(dim=(-3, -1))
        if fy == 2 and fx == 2:
            return torch.floor((total + 2) / 4)
        return torch.round(total.float() * torch.tensor(1.0 / (fy * fx), dtype=torch.float32)).double()
    # general path: float32 horizontal then vertical accumulation in OpenCV's tap order, then cvRound
    ix, wx = _area_taps(W, w)
    iy, wy = _area_taps(H, h)
    s32 = src.float()
    buf = torch.zeros(*src.shape[:-1], w, dtype=torch.float32, device=src.device)
    for k in range(ix.shape[1]):
        buf = buf + s32[..., ix[:, k].to(src.device)] * wx[:, k].to(src.device)
    out = torch.zeros(*src.shape[:-2], h, w, dtype=torch.float32, device=src.device)
    for k in range(iy.shape[1]):
        out = out + wy[:, k].to(src.device)[:, None] * buf[..., iy[:, k].to(src.device), :]
    return torch.round(out).double()  # cvRound: half to even


def _area_enlarge_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-tap fixed-point weights (sum 2**11) of OpenCV's INTER_AREA on an enlarged image. -> idx, w [dst, 2]."""
    scale = src / dst
    one = 1 << _COEF_BITS
    idx = torch.zeros(dst, 2, dtype=torch.long)
    w = torch.zeros(dst, 2, dtype=torch.long)
    for d in range(dst):
        sx = math.floor(d * scale)
        fx = (d + 1) - (sx + 1) / scale
        fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        c1 = round(fx * one)
        idx[d] = torch.tensor([min(max(sx, 0), src - 1), min(max(sx + 1, 0), src - 1)])
        w[d] = torch.tensor([one - c1, c1])
    return idx, w


def _area_enlarge_uint8(src: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """OpenCV's uint8 linear resize: integer horizontal pass, then its SIMD vertical pass
    ``((((a >> 4) * b0) >> 16) + (((c >> 4) * b1) >> 16) + 2) >> 2``."""
    H, W = src.shape[-2:]
    ix, wx = (t.to(src.device) for t in _area_enlarge_taps(W, w))
    iy, wy = (t.to(src.device) for t in _area_enlarge_taps(H, h))
    s = src.long()
    rows = s[..., ix[:, 0]] * wx[:, 0] + s[..., ix[:, 1]] * wx[:, 1]          # [B, C, H, w]
    top, bottom = rows[..., iy[:, 0], :] >> 4, rows[..., iy[:, 1], :] >> 4   # [B, C, h, w]
    out = (((top * wy[:, 0, None]) >> 16) + ((bottom * wy[:, 1, None]) >> 16) + 2) >> 2
    return out.double()


def resize_area_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """OpenCV ``cv2.resize(img_uint8, size, interpolation=cv2.INTER_AREA)`` on a [0, 1] image.

    image: [B, C, H, W] in [0, 1] -> [B, C, h, w] in [0, 1], quantised to 1/255 like the uint8 original.
    The image is quantised to uint8 first (ComfyUI images loaded from 8-bit files round-trip exactly).
    """
    h, w = size
    src = torch.round(image.to(torch.float64).clamp(0, 1) * 255)
    H, W = src.shape[-2:]
    if H >= h and W >= w:  # OpenCV's true area path (both axes shrink or keep)
        out = _area_shrink_uint8(src, h, w)
    else:  # OpenCV's INTER_AREA falls back to a fixed-point linear filter with area-style coefficients
        out = _area_enlarge_uint8(src, h, w)
    return (out.clamp(0, 255) / 255).to(image.dtype)


def resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """OpenCV INTER_NEAREST: source index floor(d / (dst / src)) in double precision. mask: [B,1,H,W].

    Differs from torch ``nearest`` where src/dst is exact (e.g. 420 -> 256): OpenCV multiplies by the
    reciprocal of dst/src, which falls just below the exact ratio, so boundary rows go to the lower pixel.
    """
    H, W = mask.shape[-2:]
    h, w = size
    iy = [min(math.floor(d * (1.0 / (h / H))), H - 1) for d in range(h)]
    ix = [min(math.floor(d * (1.0 / (w / W))), W - 1) for d in range(w)]
    iy_t = torch.tensor(iy, device=mask.device)
    ix_t = torch.tensor(ix, device=mask.device)
    return mask[..., iy_t, :][..., ix_t]


def token_coverage(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Fraction of each patch that is hole: area-downsample [B,1,S,S] -> [B, grid*grid]."""
    return F.interpolate(mask, size=(grid, grid), mode="area").flatten(1)


# -- colour jitter (ASUKA's decoder training), without torchvision -------------------------------------------------
def _gray(img: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] -> [..., 1, H, W], ITU-R 601 luma (the weights torchvision's ColorJitter uses)."""
    r, g, b = img.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> h, s, v in [0, 1] (h = 0 for grey pixels)."""
    r, g, b = img.unbind(-3)
    maxc, minc = img.max(dim=-3).values, img.min(dim=-3).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(-3)
    h6 = (h % 1.0) * 6
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, rgb in enumerate(table):
        sel = i == k
        for c in range(3):
            out[c] = torch.where(sel, rgb[c], out[c])
    return torch.stack(out, dim=-3)


def color_jitter(img: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> torch.Tensor:
    """torchvision ``ColorJitter`` semantics per image of a [B, 3, H, W] batch in [0, 1]: factors
    U[1-b, 1+b], U[1-c, 1+c], U[1-s, 1+s] and a hue shift U[-h, h], applied in a random order; brightness scales,
    contrast blends with the image's mean luma, saturation with the pixel's luma, hue rotates in HSV; clamped to
    [0, 1] after each."""
    out = []
    for x in img:
        for op in torch.randperm(4, generator=generator).tolist():
            u = float(torch.rand((), generator=generator)) * 2 - 1
            if op == 0 and brightness:
                x = (x * (1 + brightness * u)).clamp(0, 1)
            elif op == 1 and contrast:
                f = 1 + contrast * u
                x = (f * x + (1 - f) * _gray(x).mean()).clamp(0, 1)
            elif op == 2 and saturation:
                f = 1 + saturation * u
                x = (f * x + (1 - f) * _gray(x)).clamp(0, 1)
            elif op == 3 and hue:
                hsv = rgb_to_hsv(x)
                x = hsv_to_rgb(torch.cat([(hsv[:1] + hue * u) % 1.0, hsv[1:]])).clamp(0, 1)
        out.append(x)
    return torch.stack(out)
