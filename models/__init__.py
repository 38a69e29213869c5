"""PyTorch side of Consistent Inpaint: architectures, math and checkpoint formats.

Nothing in this package imports ComfyUI. Modules take ``dtype``, ``device`` and an ``operations``
namespace (``Linear``, ``Conv2d``, ``LayerNorm``, ``GroupNorm``) that defaults to plain ``torch.nn``,
and an attention function that defaults to :func:`models.layers.sdpa_attention`; the ComfyUI glue in
``nodes/`` passes ``comfy.ops`` and ComfyUI's optimized attention instead.
"""
