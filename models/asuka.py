"""ASUKA end to end on tensors: released files -> modules, and image + mask -> condition tokens.

The FLUX.1-Fill release: ``mae_300.pth`` (MAE prior), ``asuka_alignment_t5.pt`` (prior -> 256 tokens that
replace the T5 sequence), ``asuka_alignment_clip.pt`` (prior -> tokens mean-pooled into the 768-d pooled
vector), ``txt_256.pt`` / ``vec.pt`` (null embeddings mixed as ``null + w·(prior − null)``). The paper's
SD1.5 variant is one alignment producing 768-wide tokens and no null mixing.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from . import asuka_alignment, asuka_mae, harmonizing_decoder
from .layers import sdpa_attention, torch_ops
from .weights import CheckpointFormatError, build_from_state_dict, load_weights, single_tensor, tensor_dict

log = logging.getLogger(__name__)


def load_mae(path: str, dtype=None, operations=torch_ops, attention=sdpa_attention) -> asuka_mae.MAEPrior:
    sd = tensor_dict(load_weights(path), path, containers=("model", "state_dict"))
    cfg = asuka_mae.config_from_state_dict(sd, path)
    return build_from_state_dict(partial(asuka_mae.MAEPrior, cfg, operations=operations, attention=attention),
                                 sd, path, "the ASUKA MAE prior", dtype)


def load_alignment(path: str, dtype=None, operations=torch_ops, attention=sdpa_attention) -> asuka_alignment.AsukaAlignment:
    sd = asuka_alignment.convert_released(tensor_dict(load_weights(path), path))
    cfg = asuka_alignment.config_from_state_dict(sd, path)
    return build_from_state_dict(partial(asuka_alignment.AsukaAlignment, cfg, operations=operations,
                                         attention=attention), sd, path, "an ASUKA alignment module", dtype)


def load_decoder(path: str, dtype=None, operations=torch_ops, attention=sdpa_attention) -> harmonizing_decoder.HarmonizingDecoder:
    sd = harmonizing_decoder.convert_released(tensor_dict(load_weights(path), path), path)
    cfg = harmonizing_decoder.config_from_state_dict(sd, path)
    return build_from_state_dict(partial(harmonizing_decoder.HarmonizingDecoder, cfg, operations=operations,
                                         attention=attention), sd, path, "the ASUKA harmonizing decoder", dtype)


def load_null_tokens(path: str) -> torch.Tensor:
    """``txt_256.pt`` / ``txt.pt``: [N, D] or [1, N, D] -> [N, D] float32."""
    t = single_tensor(load_weights(path), path).float()
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise CheckpointFormatError(f"{os.path.basename(path)}: null tokens have shape {tuple(t.shape)}; expected [1, N, D]")
    return t


def load_null_pooled(path: str) -> torch.Tensor:
    """``vec.pt``: [D] or [1, D] -> [D] float32."""
    t = single_tensor(load_weights(path), path).float().reshape(-1)
    return t


@dataclass(frozen=True)
class NullEmbeddings:
    tokens: Optional[torch.Tensor] = None   # [N, D]
    pooled: Optional[torch.Tensor] = None   # [D]


def check_compatible(mae: asuka_mae.MAEPrior, tokens_align, pooled_align, nulls: NullEmbeddings) -> None:
    """Raise a clear error when the pieces of an ASUKA prior do not fit together."""
    width = mae.config.decoder_embed_dim
    for name, a in (("alignment", tokens_align), ("alignment_pooled", pooled_align)):
        if a is not None and a.config.in_dim != width:
            raise CheckpointFormatError(f"{name} takes {a.config.in_dim}-wide input but the MAE prior is {width} wide")
    # (null name, the null, its width, the alignment it mixes with, that alignment's name)
    pairs = (("null_tokens", nulls.tokens, -1, tokens_align, "the alignment"),
             ("null_pooled", nulls.pooled, 0, pooled_align, "alignment_pooled"))
    for name, null, axis, align, align_name in pairs:
        if null is None:
            continue
        if align is None:
            raise CheckpointFormatError(f"{name} given without {align_name}")
        if null.shape[axis] != align.config.dim:
            raise CheckpointFormatError(f"{name} is {null.shape[axis]} wide but {align_name} produces "
                                        f"{align.config.dim}")
    n_tokens = mae.config.grid ** 2
    if nulls.tokens is not None and nulls.tokens.shape[0] < n_tokens:
        raise CheckpointFormatError(
            f"null_tokens: expected at least the prior's {n_tokens} tokens; got {nulls.tokens.shape[0]}. Use "
            "txt_256.pt (the authors' null tokens)")


def null_tokens_for(nulls: NullEmbeddings, n_tokens: int) -> Optional[torch.Tensor]:
    """The null sequence the prior is mixed with. ``txt_256.pt`` has exactly the prior's 256 tokens. The
    authors' ``txt.pt`` is longer; its first 256 tokens are used (our choice, logged; the authors mix only
    with txt_256.pt)."""
    if nulls.tokens is None:
        return None
    if nulls.tokens.shape[0] != n_tokens:
        log.warning("null_tokens hold %d tokens; using the first %d (txt_256.pt is the authors' file for this)",
                    nulls.tokens.shape[0], n_tokens)
    return nulls.tokens[:n_tokens]


def asuka_condition(prior: torch.Tensor, tokens_align, pooled_align, nulls: NullEmbeddings,
                    condition_weight: float) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """prior: [B, L, 512] -> (tokens [B, L, D] or None, pooled [B, D'] or None).

    Each output is mixed as ``null + w·(x − null)`` when its null embedding is loaded; without one the
    aligned prior is used as is (the paper's SD variant), and ``w`` does not apply to it.
    """
    tokens = pooled = None
    if tokens_align is not None:
        tokens = tokens_align(prior.to(tokens_align[0].weight.dtype)).float()
        null = null_tokens_for(nulls, prior.shape[1])
        if null is not None:
            tokens = asuka_alignment.mix_with_null(tokens, null.to(tokens.device)[None], condition_weight)
    if pooled_align is not None:
        pooled = pooled_align(prior.to(pooled_align[0].weight.dtype)).float().mean(dim=1)
        if nulls.pooled is not None:
            pooled = asuka_alignment.mix_with_null(pooled, nulls.pooled.to(pooled.device)[None], condition_weight)
    return tokens, pooled
