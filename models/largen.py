"""LAR-Gen (SDXL) on tensors: the released checkpoint split into its parts, the IP-Adapter-Plus resampler that
turns CLIP features into subject tokens, and the attention arithmetic of the two subject paths.

The released ``largen_ckpt_s22k.pth`` is an SGM-layout SDXL checkpoint whose UNet takes 9 input channels
(``[x_t, mask, masked latent]``, as ComfyUI's inpaint models) and whose 70 cross-attention layers each carry
two extra projections, ``attn2.to_k_ip`` / ``attn2.to_v_ip`` (no bias), for the 16 subject tokens. In the
authors' code such a layer returns ``to_out(Attn(q, K_text, V_text) + β · Attn(q, K_ip, V_ip))``: the bias
of ``to_out`` is not scaled by β, so adding ``β · Attn(q, K_ip, V_ip)`` before ``to_out`` is exact.

The RefineNet (keys ``ref_*``) is a second SDXL UNet with a 4-channel input. It reads the subject latent
noised to the current step and cross-attends to ``patch_projector(CLIP last_hidden_state)``; in the decoder
(output blocks) every main self-attention attends over ``[own tokens ; RefineNet tokens]`` with its own
weights, where the RefineNet tokens are ``norm1(x)`` of the RefineNet's self-attention at the same place.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from .layers import AttentionFn, sdpa_attention, torch_ops
from .sites import Site, site_name, site_order
from .weights import CheckpointFormatError, count_indexed, listing, strip_prefix

UNET_PREFIXES = ("model.diffusion_model.", "model.")
VAE_PREFIXES = ("first_stage_model.",)
TEXT_PREFIXES = ("conditioner.", "cond_stage_model.")
REF_PREFIX = "ref_"
_BLOCK_KIND = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
_SITE = r"^(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.\d+\.transformer_blocks\.(\d+)\.attn2\."
_IP_RE = re.compile(_SITE + r"to_([kv])_ip\.weight$")
_ATTN2_Q_RE = re.compile(_SITE + r"to_q\.weight$")


def _matched_site(match: re.Match) -> Site:
    """The site a checkpoint key matched by ``_SITE`` belongs to."""
    if match.group(3):
        return "middle", 0, int(match.group(4))
    return _BLOCK_KIND[match.group(1)], int(match.group(2)), int(match.group(4))


@dataclass
class LARGenCheckpoint:
    unet: dict                                   # ComfyUI/SGM UNet names, 9 input channels, no subject projections
    ip: dict = field(default_factory=dict)       # site -> (to_k_ip weight, to_v_ip weight)
    refinenet: dict = field(default_factory=dict)   # UNet names (the "ref_" dropped)
    projector: Optional[dict] = None             # RefineNet's Linear(CLIP width -> 2048): weight, bias
    resampler: Optional[dict] = None             # the conditioner's IP-Adapter-Plus resampler, if the file has it
    carries: tuple = ()                          # what else the file holds ("VAE", "text encoders")


def _unet_prefix(sd: Mapping[str, torch.Tensor]) -> str:
    for p in UNET_PREFIXES:
        if f"{p}input_blocks.0.0.weight" in sd:
            return p
    return ""


def _conditioner_part(sd: Mapping[str, torch.Tensor], marker: str) -> Optional[dict]:
    """Keys below the first ``…{marker}.`` found under the text-conditioner prefixes (e.g. the IP-Adapter
    embedder's ``image_proj_model`` or ``patch_projector``), with everything up to the marker removed."""
    for k in sd:
        if k.startswith(TEXT_PREFIXES) and f".{marker}." in k:
            head = k[:k.index(f".{marker}.") + len(marker) + 2]
            return strip_prefix(sd, head)
    return None


def split_checkpoint(sd: Mapping[str, torch.Tensor], path: str, need_subject: bool = True) -> LARGenCheckpoint:
    """A LAR-Gen checkpoint (any of its prefixes, or a bare UNet) -> its parts, checked.

    Every cross-attention layer must have both subject projections (the authors' loader would leave missing ones
    random; here that is an error)."""
    name = os.path.basename(str(path))
    prefix = _unet_prefix(sd)
    if not prefix and "input_blocks.0.0.weight" not in sd and not any(k.startswith(REF_PREFIX) for k in sd):
        raise CheckpointFormatError(
            f"{name} is not a LAR-Gen checkpoint: it holds no SDXL UNet (no input_blocks.0.0.weight under "
            f"{' / '.join(UNET_PREFIXES)} or at the top level). Found keys: {listing(sorted(sd))}")
    unet = strip_prefix(sd, prefix) if prefix else {k: v for k, v in sd.items()
                                                     if not k.startswith(VAE_PREFIXES + TEXT_PREFIXES)}
    refinenet = {k[len(REF_PREFIX):]: unet.pop(k) for k in [k for k in unet if k.startswith(REF_PREFIX)]}
    ip_k, ip_v = {}, {}
    for k in [k for k in unet if "_ip." in k]:
        m = _IP_RE.match(k)
        if m is None:
            raise CheckpointFormatError(f"{name}: unexpected subject-projection tensor {k}")
        (ip_k if m.group(5) == "k" else ip_v)[_matched_site(m)] = unet.pop(k)
    for k in [k for k in refinenet if "_ip." in k]:      # the RefineNet is a copy of the UNet: its unused copies
        refinenet.pop(k)
    carries = tuple(what for what, pre in (("VAE", VAE_PREFIXES), ("text encoders", TEXT_PREFIXES))
                    if any(k.startswith(pre) for k in sd))
    out = LARGenCheckpoint(unet=unet, refinenet=refinenet, carries=carries,
                           resampler=_conditioner_part(sd, "image_proj_model"),
                           projector=_conditioner_part(sd, "patch_projector"))
    if not need_subject:
        return out
    first = unet.get("input_blocks.0.0.weight")
    if first is None or first.ndim != 4:
        raise CheckpointFormatError(f"{name} holds no main UNet (input_blocks.0.0.weight); for a RefineNet-only file "
                                    "use Load LAR-Gen RefineNet")
    if first.shape[1] != 9:
        raise CheckpointFormatError(
            f"{name}: the UNet takes {first.shape[1]} input channels; LAR-Gen's is a 9-channel SDXL inpainting UNet "
            "([latent, mask, masked latent]). Is this another model?")
    sites = {}
    for k, t in unet.items():
        m = _ATTN2_Q_RE.match(k)
        if m:
            sites[_matched_site(m)] = t.shape[0]
    if not ip_k and not ip_v:
        raise CheckpointFormatError(
            f"{name} is an SDXL inpainting UNet without LAR-Gen's subject projections (no attn2.to_k_ip / "
            f"attn2.to_v_ip in its {len(sites)} cross-attention layers). Use largen_ckpt_s22k.pth as released.")
    missing = sorted(s for s in sites if s not in ip_k or s not in ip_v)
    stray = sorted(s for s in set(ip_k) | set(ip_v) if s not in sites)
    if missing or stray:
        raise CheckpointFormatError(
            f"{name}: subject projections do not match the cross-attention layers: "
            + "; ".join(p for p in (f"missing for {len(missing)} of {len(sites)} layers ({listing(missing)})" if missing else "",
                                     f"{len(stray)} without a layer ({listing(stray)})" if stray else "") if p))
    ctx = unet[next(k for k in unet if k.endswith("attn2.to_k.weight"))].shape[1]
    for s, ch in sites.items():
        for which, t in (("to_k_ip", ip_k[s]), ("to_v_ip", ip_v[s])):
            if tuple(t.shape) != (ch, ctx):
                raise CheckpointFormatError(f"{name}: {which} at {s} has shape {tuple(t.shape)}; expected {(ch, ctx)}")
    out.ip = {s: (ip_k[s], ip_v[s]) for s in sorted(sites, key=site_order)}
    return out


def site_prefix(site: Site) -> str:
    """The UNet module path of a site's transformer block ("output_blocks.3.1.transformer_blocks.0")."""
    kind, block, index = site
    head = "middle_block" if kind == "middle" else f"{kind}_blocks.{block}"
    return f"{head}.1.transformer_blocks.{index}"


def unet_part(sd: Mapping[str, torch.Tensor]) -> dict:
    """The UNet tensors of a checkpoint (``model.diffusion_model.`` / ``model.`` prefix, or a bare UNet), prefix
    removed; VAE and text-encoder tensors left out."""
    prefix = _unet_prefix(sd)
    if prefix:
        return strip_prefix(sd, prefix)
    return {k: v for k, v in sd.items() if not k.startswith(VAE_PREFIXES + TEXT_PREFIXES)}


def projections_from_text(unet: Mapping[str, torch.Tensor]) -> dict:
    """Initial subject projections, IP-Adapter's recipe: every site's ``to_k_ip`` / ``to_v_ip`` a copy of its text
    ``to_k`` / ``to_v`` -> {site: (to_k_ip weight, to_v_ip weight)}."""
    out = {}
    for k in unet:
        m = _ATTN2_Q_RE.match(k)
        if m:
            site = _matched_site(m)
            p = f"{site_prefix(site)}.attn2."
            out[site] = (unet[p + "to_k.weight"].clone(), unet[p + "to_v.weight"].clone())
    return {s: out[s] for s in sorted(out, key=site_order)}


RESAMPLER_KEY = "conditioner.embedders.0.image_proj_model."


def join_checkpoint(unet: Mapping[str, torch.Tensor], ip: Mapping[Site, tuple], resampler=None,
                    prefix: str = UNET_PREFIXES[0]) -> dict:
    """The inverse of :func:`split_checkpoint` for the main model: UNet + subject projections (+ the resampler under
    ``conditioner.…image_proj_model.``) in the released layout."""
    sd = {prefix + k: v for k, v in unet.items()}
    for site, (k, v) in ip.items():
        p = f"{prefix}{site_prefix(site)}.attn2."
        sd[p + "to_k_ip.weight"], sd[p + "to_v_ip.weight"] = k, v
    for k, v in (resampler or {}).items():
        sd[RESAMPLER_KEY + k] = v
    return sd


def refinenet_file(refinenet: Mapping[str, torch.Tensor], projector: Mapping[str, torch.Tensor]) -> dict:
    """A RefineNet file of its own (docs/largen_format.md): ``ref_*`` UNet tensors + top-level ``patch_projector.*``."""
    sd = {REF_PREFIX + k: v for k, v in refinenet.items()}
    sd.update({f"patch_projector.{k}": v for k, v in projector.items()})
    return sd


# -- the IP-Adapter-Plus resampler (image_proj) ----------------------------------------------------------
RESAMPLER_HEAD_DIM = 64


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int
    depth: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int


def read_image_proj(obj, path: str) -> dict:
    """The resampler's tensors from an IP-Adapter file: the released ``.bin`` ({"image_proj": …, "ip_adapter": …}),
    a safetensors copy (``image_proj.*`` keys) or a bare resampler state dict."""
    name = os.path.basename(str(path))
    if isinstance(obj, Mapping) and isinstance(obj.get("image_proj"), Mapping):
        sd = dict(obj["image_proj"])
    elif isinstance(obj, Mapping) and any(isinstance(k, str) and k.startswith("image_proj.") for k in obj):
        sd = strip_prefix(obj, "image_proj.")
    elif isinstance(obj, Mapping):
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise CheckpointFormatError(f"{name} holds a {type(obj).__name__}; expected an IP-Adapter state dict")
    if "latents" not in sd:
        if "proj.weight" in sd and "norm.weight" in sd:
            raise CheckpointFormatError(
                f"{name} is a plain IP-Adapter (a linear image projection to a few tokens). LAR-Gen uses the Plus "
                "resampler (16 tokens from CLIP patch features): ip-adapter-plus_sdxl_vit-h.bin")
        raise CheckpointFormatError(
            f"{name} holds no IP-Adapter-Plus resampler (no image_proj.latents). Found keys: {listing(sorted(sd))}. "
            "Expected ip-adapter-plus_sdxl_vit-h.bin (or a safetensors copy)")
    return sd


def resampler_config(sd: Mapping[str, torch.Tensor], path: str) -> ResamplerConfig:
    name = os.path.basename(str(path))
    try:
        _, nq, dim = sd["latents"].shape
        depth = count_indexed(sd, "layers.")
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        cfg = ResamplerConfig(dim=dim, depth=depth, heads=inner // RESAMPLER_HEAD_DIM, num_queries=nq,
                              embedding_dim=sd["proj_in.weight"].shape[1], output_dim=sd["proj_out.weight"].shape[0],
                              ff_mult=sd["layers.0.1.1.weight"].shape[0] // dim)
    except (KeyError, ValueError) as e:
        raise CheckpointFormatError(f"{name}: incomplete IP-Adapter-Plus resampler ({e!s}); found keys "
                                    f"{listing(sorted(sd))}") from e
    if inner % RESAMPLER_HEAD_DIM:
        raise CheckpointFormatError(f"{name}: resampler attention width {inner} is not a multiple of 64")
    return cfg


class PerceiverAttention(nn.Module):
    """Latents attend to ``[image features ; latents]``; scale 1/sqrt(head_dim), softmax in float32."""

    def __init__(self, dim, heads, head_dim=RESAMPLER_HEAD_DIM, dtype=None, device=None, operations=torch_ops):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.norm2 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.to_q = operations.Linear(dim, inner, bias=False, dtype=dtype, device=device)
        self.to_kv = operations.Linear(dim, 2 * inner, bias=False, dtype=dtype, device=device)
        self.to_out = operations.Linear(inner, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x, latents, attention: AttentionFn):
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(q, k, v, self.heads))


class Resampler(nn.Module):
    """IP-Adapter-Plus image projection: CLIP penultimate hidden states [B, 257, 1280] -> [B, 16, 2048]."""

    def __init__(self, cfg: ResamplerConfig, dtype=None, device=None, operations=torch_ops,
                 attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.cfg, self.attention = cfg, attention
        self.latents = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.dim, dtype=dtype, device=device))
        self.proj_in = operations.Linear(cfg.embedding_dim, cfg.dim, dtype=dtype, device=device)
        self.proj_out = operations.Linear(cfg.dim, cfg.output_dim, dtype=dtype, device=device)
        self.norm_out = operations.LayerNorm(cfg.output_dim, dtype=dtype, device=device)
        inner = cfg.dim * cfg.ff_mult
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(cfg.dim, cfg.heads, dtype=dtype, device=device, operations=operations),
            nn.Sequential(operations.LayerNorm(cfg.dim, dtype=dtype, device=device),
                          operations.Linear(cfg.dim, inner, bias=False, dtype=dtype, device=device),
                          nn.GELU(),
                          operations.Linear(inner, cfg.dim, bias=False, dtype=dtype, device=device)),
        ]) for _ in range(cfg.depth))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents, self.attention) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class SubjectAdapterNet(nn.Module):
    """The IP-Adapter-Plus resampler and the per-site subject projections (``to_k_ip`` / ``to_v_ip``, module names
    spelt by :func:`models.sites.site_name`)."""

    def __init__(self, rcfg: ResamplerConfig, sites: dict, context_dim: int, dtype=None, device=None,
                 operations=torch_ops, attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.resampler = Resampler(rcfg, dtype=dtype, device=device, operations=operations, attention=attention)
        self.sites = tuple(sites)

        def lin(ch):
            return operations.Linear(context_dim, ch, bias=False, dtype=dtype, device=device)

        self.to_k_ip = nn.ModuleDict({site_name(s): lin(ch) for s, ch in sites.items()})
        self.to_v_ip = nn.ModuleDict({site_name(s): lin(ch) for s, ch in sites.items()})

    @property
    def dtype(self):
        return self.resampler.latents.dtype

    def project(self, tokens: torch.Tensor) -> dict:
        """[S, 16, 2048] -> {site: (K_ip [S, 16, C], V_ip [S, 16, C])}."""
        return {s: (self.to_k_ip[site_name(s)](tokens), self.to_v_ip[site_name(s)](tokens)) for s in self.sites}


def subject_adapter_state_dict(resampler: Mapping[str, torch.Tensor], ip: Mapping[Site, tuple]) -> dict:
    """A resampler's tensors and the subject projections under SubjectAdapterNet's names."""
    sd = {f"resampler.{k}": v for k, v in resampler.items()}
    for s, (k, v) in ip.items():
        sd[f"to_k_ip.{site_name(s)}.weight"], sd[f"to_v_ip.{site_name(s)}.weight"] = k, v
    return sd


# -- attention arithmetic --------------------------------------------------------------------------------
def decoupled_attention(text_out: torch.Tensor, q: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor,
                        heads: int, weight: float, attention: AttentionFn = sdpa_attention,
                        region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``text_out + weight · region · Attn(q, K_ip, V_ip)`` (before ``to_out``).

    text_out, q: [B, N, C]; k_ip, v_ip: [B, T, C] (already projected by to_k_ip / to_v_ip); region: [B or 1, N, 1]
    in [0, 1] or None (everywhere)."""
    image = attention(q, k_ip.to(q.dtype), v_ip.to(q.dtype), heads)
    if region is not None:
        image = image * region.to(image.dtype)
    return text_out + image * weight if weight != 1 else text_out + image


