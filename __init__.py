"""Consistent Inpaint: ASUKA, PainterNet, LAR-Gen and Patch-Adapter inpainting as ComfyUI nodes.

ComfyUI is imported inside ``comfy_entrypoint`` only, so importing this folder outside ComfyUI (test
collection, tooling) has no side effects.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class ConsistentInpaintExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return ConsistentInpaintExtension()
