"""Consistent Inpaint: ASUKA, PainterNet, LAR-Gen and Patch-Adapter inpainting as ComfyUI nodes.

ComfyUI is imported inside ``comfy_entrypoint`` only, so importing this folder outside ComfyUI (test
collection, tooling) has no side effects.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import NODES
    from .nodes.comfy_compat import ComfyExtension

    class ConsistentInpaintExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return ConsistentInpaintExtension()
