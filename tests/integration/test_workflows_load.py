"""The shipped UI workflows load against the node definitions real ComfyUI serves (what the frontend does on load):
every node type exists, every widget value lines up with a widget input in order and fits its type, range and
options, and every link joins an output and an input of the same type. Then each workflow, converted to an API
prompt the way the frontend queues it, passes ComfyUI's own prompt validation in full (the model and image files
it names are placed in this session's folders as empty placeholders: validation checks names only)."""
import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Nodes the frontend defines itself (comfyui-frontend-package); the server never sees them: the frontend leaves them
# out of the prompt it queues. Each holds one text widget.
FRONTEND_ONLY = {"MarkdownNote", "Note"}


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            kind, opts = value[0], (value[1] if len(value) > 1 else {}) or {}
            if isinstance(kind, (list, tuple)):
                kind, opts = "COMBO", dict(opts, options=list(kind))
            elif kind == "COMBO":
                opts = dict(opts, options=list(opts.get("options", [])))
            out.append((name, kind, opts))
    return out


def _widgets(cls):
    """[(input name, type, options, extra)] in the order the frontend lays out widget values; ``extra`` marks the
    value of the control_after_generate / image-upload widget the frontend adds after an input."""
    ws = []
    for name, kind, opts in _inputs(cls):
        if kind not in WIDGET_TYPES or opts.get("forceInput"):
            continue
        ws.append((name, kind, opts, False))
        if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            ws.append((name + ":control", "CONTROL", {}, True))
        if opts.get("image_upload"):
            ws.append((name + ":upload", "UPLOAD", {}, True))
    return ws


def _looks_like_files(options):
    return any("." in str(o) or "/" in str(o) for o in options)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_the_served_node_definitions(comfy, path):
    wf = json.loads(path.read_text())
    mapping = comfy.nodes.NODE_CLASS_MAPPINGS
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            values = n.get("widgets_values") or []
            assert len(values) == 1 and isinstance(values[0], str), f"{path.name} node {n['id']}: {values!r}"
            assert not n.get("inputs") and not n.get("outputs"), f"{path.name} node {n['id']} has slots"
            continue
        assert n["type"] in mapping, f"{path.name}: node type {n['type']} is not served"
        cls = mapping[n["type"]]
        ws, values = _widgets(cls), n.get("widgets_values") or []
        assert len(values) == len(ws), (f"{path.name} node {n['id']} {n['type']}: {len(values)} widget values for "
                                        f"widgets {[w[0] for w in ws]}")
        for (name, kind, opts, _extra), v in zip(ws, values):
            where = f"{path.name} node {n['id']} {n['type']}.{name} = {v!r}"
            if kind == "INT":
                assert isinstance(v, int) and not isinstance(v, bool), where
                assert opts.get("min", v) <= v <= opts.get("max", v), where
            elif kind == "FLOAT":
                assert isinstance(v, (int, float)) and opts.get("min", v) <= v <= opts.get("max", v), where
            elif kind == "BOOLEAN":
                assert isinstance(v, bool), where
            elif kind == "COMBO" and not _looks_like_files(opts["options"] + [v]):
                assert v in opts["options"], where
            elif kind == "CONTROL":
                assert v in ("fixed", "increment", "decrement", "randomize"), where
    outputs = {nid: list(mapping[n["type"]].RETURN_TYPES) for nid, n in nodes.items() if n["type"] not in FRONTEND_ONLY}
    for link_id, src, src_slot, dst, dst_slot, ltype in wf["links"]:
        assert outputs[src][src_slot] == ltype, f"{path.name} link {link_id}: output is {outputs[src][src_slot]}"
        slot = nodes[dst]["inputs"][dst_slot]
        assert slot["link"] == link_id and slot["type"] == ltype, f"{path.name} link {link_id}"
        declared = {name: kind for name, kind, _ in _inputs(mapping[nodes[dst]["type"]])}
        assert declared.get(slot["name"]) in (ltype, "*"), f"{path.name} link {link_id}: input {slot['name']}"


BYPASS = 4          # LiteGraph node mode: the frontend leaves the node out and routes its inputs through


def _to_api(wf, mapping):
    """The API prompt the frontend queues for a UI workflow (widget values by name, links as [node, slot]).
    A bypassed node is left out; a link from one of its outputs goes to its first linked input of the same type."""
    prompt = {}
    links = {l[0]: l for l in wf["links"]}
    nodes = {n["id"]: n for n in wf["nodes"]}

    def source(link):
        _, src, slot, _, _, ltype = link
        n = nodes[src]
        if n.get("mode") != BYPASS:
            return [str(src), slot]
        for inp in n.get("inputs", []):
            if inp.get("link") is not None and inp["type"] == ltype:
                return source(links[inp["link"]])
        return None

    for n in wf["nodes"]:
        if n.get("mode") == BYPASS or n["type"] in FRONTEND_ONLY:
            continue
        cls = mapping[n["type"]]
        inputs = {}
        for (name, kind, _opts, extra), v in zip(_widgets(cls), n.get("widgets_values") or []):
            if not extra:
                inputs[name] = v
        for slot in n.get("inputs", []):
            if slot.get("link") is not None:
                src = source(links[slot["link"]])
                if src is not None:
                    inputs[slot["name"]] = src
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


FILE_INPUTS = {"unet_name": "diffusion_models", "vae_name": "vae", "clip_name1": "text_encoders",
               "clip_name2": "text_encoders", "ckpt_name": "checkpoints", "mae": "asuka", "alignment": "asuka",
               "alignment_pooled": "asuka", "null_tokens": "asuka", "null_pooled": "asuka", "decoder": "asuka",
               "branch": "inpaint_branch", "task_embeddings": "inpaint_branch", "checkpoint": "largen",
               "image_proj": "largen", "clip_name": "clip_vision", "adapter": "patch_adapter"}


def _install_placeholders(comfy, prompt):
    """Empty files under the names the workflow selects (validation checks names only; nothing is loaded),
    and a real PNG for LoadImage, in this test session's own model and input folders."""
    import numpy as np
    from PIL import Image
    fp = comfy.folder_paths
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and name in FILE_INPUTS:
                target = Path(fp.get_folder_paths(FILE_INPUTS[name])[0]) / value
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(b"")
            elif isinstance(value, str) and node["class_type"] == "LoadImage" and name == "image":
                target = Path(fp.get_input_directory()) / value
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(target)
    fp.filename_list_cache.clear()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_passes_comfyui_prompt_validation(comfy, path):
    wf = json.loads(path.read_text())
    prompt = _to_api(wf, comfy.nodes.NODE_CLASS_MAPPINGS)
    _install_placeholders(comfy, prompt)
    valid, error, outputs, node_errors = comfy.validate(prompt)
    assert valid and not node_errors, f"{path.name}: {error} {node_errors}"
    saving = [k for k, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    assert sorted(outputs) == sorted(saving), f"{path.name}: validated outputs {outputs}, expected {saving}"
