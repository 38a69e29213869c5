"""ComfyUI-facing side: V3 node classes (one module per method) and the glue to ComfyUI's model objects."""
from .common import register_model_folders

register_model_folders()

from . import asuka, branch, largen, masks, patch_adapter  # noqa: E402

NODES = [*asuka.NODES, *branch.NODES, *largen.NODES, *patch_adapter.NODES, *masks.NODES]
