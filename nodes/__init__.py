"""ComfyUI-facing side: V3 node classes (one module per method) and the glue to ComfyUI's model objects."""
from .common import register_model_folders

register_model_folders()

from .asuka import ASUKAConditioning, ASUKALoader, HarmonizingDecode, HarmonizingDecoderLoader  # noqa: E402
from .branch import ApplyBranch, BranchLoader  # noqa: E402

NODES = [ASUKALoader, ASUKAConditioning, HarmonizingDecoderLoader, HarmonizingDecode, BranchLoader, ApplyBranch]
