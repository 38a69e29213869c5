"""PowerPaint-v2 task prompts: the learned task tokens and the branch's text encoder, read from the authors'
``PowerPaint_Brushnet/pytorch_model.bin``.

What the authors' code does (open-mmlab/PowerPaint, ``app.py`` and ``powerpaint/utils/utils.py``):

* the branch gets its own CLIP-L text encoder (``text_encoder_brushnet``, SD1.5's), whose token embedding is
  wrapped so that three placeholder words ``P_ctxt``, ``P_shape``, ``P_obj`` each become 10 tokens
  ``P_obj_0 … P_obj_9`` with learned vectors (``…token_embedding.trainable_embeddings.P_obj``, 10×768);
  ``pytorch_model.bin`` is that encoder's state dict, loaded over SD1.5's with ``strict=False``;
* the branch's prompt is only the task word (v2 adds no text to it): ``[SOT, P_x_0 … P_x_9, EOT, pad…]``,
  77 tokens, last hidden state after the final layer norm; the UNet keeps the user's prompt;
* tasks (``add_task``): text-guided ``P_obj`` / negative ``P_obj``; object removal and outpainting
  ``P_ctxt`` / ``P_obj``; shape-guided ``f·E(P_shape) + (1−f)·E(P_ctxt)`` for both, f = fitting degree.

This module only reads and checks the file; the encoding runs in ComfyUI's own CLIP (nodes side).
"""
from __future__ import annotations

import enum
import os
import re
from typing import Mapping

import torch

from .weights import CheckpointFormatError, check_tensors, check_weights

TASK_WORDS = ("P_ctxt", "P_shape", "P_obj")


class Task(str, enum.Enum):
    TEXT_GUIDED = "text-guided"
    OBJECT_REMOVAL = "object-removal"
    OUTPAINTING = "outpainting"
    SHAPE_GUIDED = "shape-guided"


# task -> ((positive A, positive B), (negative A, negative B)); the branch prompt is f·E(A) + (1−f)·E(B).
TASKS = {
    Task.TEXT_GUIDED: (("P_obj", "P_obj"), ("P_obj", "P_obj")),
    Task.OBJECT_REMOVAL: (("P_ctxt", "P_ctxt"), ("P_obj", "P_obj")),
    Task.OUTPAINTING: (("P_ctxt", "P_ctxt"), ("P_obj", "P_obj")),
    Task.SHAPE_GUIDED: (("P_shape", "P_ctxt"), ("P_shape", "P_ctxt")),
}

CLIP_L_LAYERS = 12
CLIP_L_WIDTH = 768


def clip_l_shapes(vocab: int = 49408, positions: int = 77) -> dict[str, tuple]:
    """Tensor names and shapes of a CLIP-L text encoder in the transformers / ComfyUI naming."""
    w = CLIP_L_WIDTH
    shapes = {"text_model.embeddings.token_embedding.weight": (vocab, w),
              "text_model.embeddings.position_embedding.weight": (positions, w),
              "text_model.final_layer_norm.weight": (w,), "text_model.final_layer_norm.bias": (w,)}
    for i in range(CLIP_L_LAYERS):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"], shapes[p + f"self_attn.{proj}.bias"] = (w, w), (w,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{ln}.weight"], shapes[p + f"{ln}.bias"] = (w,), (w,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (4 * w, w), (4 * w,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (w, 4 * w), (w,)
    return shapes


def read_task_file(sd: Mapping[str, torch.Tensor], path: str):
    """-> (task vectors {word: [n, 768]}, text-encoder state dict in ComfyUI's CLIP naming or None when the
    file holds the task vectors only).

    Accepts the authors' layout (``text_model.embeddings.token_embedding.trainable_embeddings.P_obj``,
    ``…token_embedding.wrapped.weight``), with or without a leading module prefix."""
    vectors, encoder = {}, {}
    for k, v in sd.items():
        m = re.search(r"trainable_embeddings\.(P_\w+)$", k)
        if m:
            vectors[m.group(1)] = v
            continue
        i = k.find("text_model.")
        if i < 0:
            continue
        name = k[i:].replace("token_embedding.wrapped.", "token_embedding.")
        if name.endswith("position_ids"):
            continue
        encoder[name] = v
    missing = [w for w in TASK_WORDS if w not in vectors]
    if missing:
        found = sorted(vectors) or "none"
        raise CheckpointFormatError(
            f"{os.path.basename(str(path))}: expected the authors' PowerPaint_Brushnet/pytorch_model.bin, whose keys "
            "end in 'token_embedding.trainable_embeddings.P_ctxt' / 'P_shape' / 'P_obj'; got no task embeddings for "
            f"{', '.join(missing)} (found: {found})")
    shapes = {tuple(v.shape) for v in vectors.values()}
    if len(shapes) != 1 or any(len(s) != 2 or s[1] != CLIP_L_WIDTH for s in shapes):
        raise CheckpointFormatError(
            f"{path}: the task embeddings must all be [n, {CLIP_L_WIDTH}] (CLIP-L); found "
            + ", ".join(f"{w} {tuple(vectors[w].shape)}" for w in TASK_WORDS))
    check_weights(vectors, path, TASK_WORDS)
    if not encoder:
        return {w: vectors[w].float() for w in TASK_WORDS}, None
    vocab = encoder.get("text_model.embeddings.token_embedding.weight")
    check_tensors(encoder, clip_l_shapes(vocab=vocab.shape[0] if vocab is not None else 49408), path,
                  "the PowerPaint branch text encoder (CLIP-L)", ignore_unexpected=("text_projection",))
    check_weights(encoder, path)
    return {w: vectors[w].float() for w in TASK_WORDS}, encoder


def blend(a: torch.Tensor, b: torch.Tensor, fitting: float) -> torch.Tensor:
    """The authors' mix of two task-prompt encodings: ``f·a + (1−f)·b`` (a itself when both are the same)."""
    return a if fitting == 1.0 or a is b else a * fitting + b * (1.0 - fitting)
