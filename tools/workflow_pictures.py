"""Lay out the shipped workflows in the real ComfyUI frontend and render their pictures.

    COMFYUI_PATH=/path/to/ComfyUI python tools/workflow_pictures.py [name ...]

For every ``workflows/<name>.json`` (or the names given) this starts real ComfyUI with its frontend (the same harness
as the browser test, ``tests/browser/comfy_browser.py``: headless Chromium through Selenium) and

1. loads the workflow in the frontend and measures every node as the frontend draws it (title bar included, after
   the frontend has grown nodes to fit their widgets);
2. lays the graph out left to right: columns of groups, one group per stage (``STAGES`` below), nodes stacked in
   each group, no two nodes or groups overlapping;
3. writes ``<name>.json`` as the frontend serialises it (``app.graph.serialize()``, what its Save writes), then loads
   that file again and checks the frontend writes it back unchanged;
4. screenshots the graph (the canvas and the widgets the frontend draws over it, no menus) and writes
   ``<name>.png`` with the workflow embedded the way ComfyUI's Save Image does (PNG ``tEXt`` chunks ``workflow``: the
   UI JSON, identical to ``<name>.json``; ``prompt``: the API prompt the frontend would queue), so dropping the
   picture on the canvas loads the workflow;
5. writes ``<name>.jpg``, the thumbnail ComfyUI's template browser shows for the custom-node template ``<name>``
   (the frontend asks ``/api/workflow_templates/<pack folder>/<name>.jpg``).

Edit the workflow content (widgets, links, notes) in the JSON files, the stage of a node here, then run this again.
Needs what the browser test needs (see tests/browser/README.md).
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))
from comfy_browser import WORKFLOWS, ComfyServer, Page, missing_parts, start_browser  # noqa: E402

# Columns left to right; each column a list of (group title, node ids top to bottom).
STAGES = {
    "asuka_flux_fill": [
        [("Image (paint the mask)", [1])],
        [("Models", [8, 2, 6, 11, 15])],
        [("ASUKA prior", [3, 14])],
        [("FLUX.1-Fill conditioning", [9, 4, 5, 7])],
        [("Sample", [10])],
        [("Harmonizing decode", [12])],
        [("Save", [13])],
    ],
    "harmonizing_decode": [
        [("Image (paint the mask)", [1])],
        [("Models", [2, 3, 7, 11, 16])],
        [("Prompt", [4, 5, 6])],
        [("FLUX.1-Fill conditioning", [9, 8])],
        [("Sample", [10])],
        [("Decode twice", [12, 13])],
        [("Compare", [14, 15])],
    ],
    "branch_inpaint_sd15": [
        [("Image (paint the mask)", [2])],
        [("Models", [1, 5, 11])],
        [("Prompt", [3, 4])],
        [("Inpaint branch", [6])],
        [("Sample", [7])],
        [("Decode, keep the unmasked pixels", [8, 9])],
        [("Save", [10])],
    ],
    "powerpaint_removal": [
        [("Image (paint the mask)", [2])],
        [("Models", [1, 5, 12])],
        [("Prompts", [3, 4, 6])],
        [("Inpaint branch", [7])],
        [("Sample", [8])],
        [("Decode, keep the unmasked pixels", [9, 10])],
        [("Save", [11])],
    ],
    "largen_text_subject": [
        [("Scene (paint the area)", [2]), ("Subject", [8, 9])],
        [("Models", [1, 6, 7, 17])],
        [("Crop and prompt", [3, 4, 5])],
        [("Inpaint conditioning", [12]), ("Subject attention", [10, 11])],
        [("Sample", [13])],
        [("Decode, paste back", [14, 15])],
        [("Save", [16])],
    ],
    "patch_adapter_sdxl": [
        [("Full-resolution image (paint the hole)", [3])],
        [("Models", [1, 2, 16])],
        [("Prompt", [4, 5]), ("Stage 1 size", [6])],
        [("Stage 1 conditioning", [7]), ("Patch-Adapter (bypassed)", [8, 9])],
        [("Stage 1: sample", [10])],
        [("Stage 1: decode (the reference)", [11, 12])],
        [("Stage 2: High-Res Patch Refine", [13])],
        [("Save", [14, 15])],
    ],
    "patch_adapter_sd15": [
        [("Full-resolution image (paint the hole)", [2])],
        [("Models", [1, 15])],
        [("Prompt", [3, 4]), ("Stage 1 size", [5])],
        [("Stage 1 conditioning", [6]), ("Patch-Adapter (bypassed)", [7, 8])],
        [("Stage 1: sample", [9])],
        [("Stage 1: decode (the reference)", [10, 11])],
        [("Stage 2: High-Res Patch Refine", [12])],
        [("Save", [13, 14])],
    ],
}
STAGES["branch_inpaint_sdxl"] = STAGES["branch_inpaint_sd15"]
STAGES["largen_subject"] = STAGES["largen_text_subject"]

COL_GAP, GROUP_GAP, NODE_GAP, PAD = 70, 50, 30, 20      # canvas units
PICTURE_WINDOW = (2400, 1300)                           # browser window for the embedded picture
THUMB = (512, 512)
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Graph.CanvasInfo": False, "Comfy.Minimap.Visible": False,
            "Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Workflow.ShowMissingNodesWarning": False}


def layout(stages, boxes: dict[int, list[float]], title_h: float, group_title_h: float):
    """Node positions and group rectangles for ``stages`` given each node's drawn bounding box ``[x, y, w, h]``
    (title bar included; ``pos`` is the top left of the body, ``title_h`` below the bounding box's top)."""
    positions, groups = {}, []
    x = 0.0
    for column in stages:
        width = max(max(boxes[i][2] for i in ids) for _, ids in column) + 2 * PAD
        y = 0.0
        for title, ids in column:
            top = y
            y += group_title_h + PAD
            for i in ids:
                positions[i] = [round(x + PAD), round(y + title_h)]
                y += boxes[i][3] + NODE_GAP
            y += PAD - NODE_GAP
            groups.append({"title": title, "bounding": [round(x), round(top), round(width), round(y - top)]})
            y += GROUP_GAP
        x += width + COL_GAP
    return positions, groups


def overlaps(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def graph_equal_ignoring_view(a: dict, b: dict) -> bool:
    strip = lambda w: {**w, "extra": {k: v for k, v in w.get("extra", {}).items() if k != "ds"}}  # noqa: E731
    return strip(a) == strip(b)


def apply_layout(page: Page, stages):
    boxes = {n["id"]: n["bounding"] for n in page.nodes()}
    listed = [i for column in stages for _, ids in column for i in ids]
    assert sorted(listed) == sorted(boxes), f"stages list {sorted(listed)}, the graph has {sorted(boxes)}"
    title_h, group_title_h = page.js("const G = new window.LiteGraph.LGraphGroup('x');"
                                     "return [window.LiteGraph.NODE_TITLE_HEIGHT, G.titleHeight];")
    positions, groups = layout(stages, boxes, title_h, group_title_h)
    page.js("""
        const graph = window.app.graph, LG = window.LiteGraph;
        for (const g of [...graph.groups]) graph.remove(g);
        if (graph.state) graph.state.lastGroupId = 0;      // group ids 1.. in column order, run after run
        // groups first: moving a group moves the nodes inside it
        for (const g of a1) {
            const group = new LG.LGraphGroup(g.title);
            group.pos = [g.bounding[0], g.bounding[1]]; group.size = [g.bounding[2], g.bounding[3]];
            graph.add(group);
        }
        for (const n of graph.nodes) { const p = a0[String(n.id)]; n.pos = [p[0], p[1]]; }
        graph.setDirtyCanvas(true, true);""".replace("a0", "arguments[0]").replace("a1", "arguments[1]"),
            {str(k): v for k, v in positions.items()}, groups)
    page.settle()
    moved = [n["id"] for n in page.nodes() if [round(v) for v in n["pos"]] != positions[n["id"]]]
    assert not moved, f"the frontend moved nodes {moved} after the layout"
    return groups


def fit_view(page: Page, bounds, width: float, height: float, margin: float = 40):
    """A view (``extra.ds``) that shows ``bounds`` whole in a ``width`` x ``height`` canvas."""
    x0, y0, x1, y1 = bounds
    scale = min(1.0, (width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0))
    return {"scale": round(scale, 4), "offset": [round(margin / scale - x0, 1), round(margin / scale - y0, 1)]}


def graph_bounds(page: Page):
    boxes = [n["bounding"] for n in page.nodes()] + [g["bounding"] for g in page.groups()]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[0] + b[2] for b in boxes),
            max(b[1] + b[3] for b in boxes))


HIDE_UI = """
    let st = document.getElementById('ci-picture');
    if (!st) { st = document.createElement('style'); st.id = 'ci-picture'; document.head.appendChild(st); }
    st.textContent = arguments[0] ? `body * { visibility: hidden !important; }
        #graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }` : '';
"""


def picture(page: Page, driver) -> "Image.Image":
    """A screenshot of the whole graph (canvas and the widgets drawn over it, no menus) in a window of
    PICTURE_WINDOW, at the largest scale up to 1 that fits it."""
    from PIL import Image
    x0, y0, x1, y1 = graph_bounds(page)
    margin = 30
    driver.set_window_size(*PICTURE_WINDOW)
    page.wait(lambda: page.js("const c = document.getElementById('graph-canvas');"
                              "return window.innerWidth === arguments[0] && c.clientWidth === c.width"
                              " && c.getBoundingClientRect().right >= window.innerWidth - 1;", PICTURE_WINDOW[0]), "the canvas to follow the window size", timeout=10)
    page.call("await new Promise(r => setTimeout(r, 300));")
    left, top, cw, ch = page.js("const c = document.getElementById('graph-canvas'); const r = c.getBoundingClientRect();"
                                "return [r.left, r.top, Math.min(c.width, r.width), Math.min(c.height, r.height)];")
    scale = min(1.0, (cw - 2 * margin) / (x1 - x0), (ch - 2 * margin) / (y1 - y0))
    w, h = int((x1 - x0) * scale + 2 * margin), int((y1 - y0) * scale + 2 * margin)
    page.js("""const c = window.app.canvas; c.ds.scale = arguments[0];
               c.ds.offset = [arguments[1], arguments[2]]; c.setDirty(true, true);""",
            scale, margin / scale - x0, margin / scale - y0)
    page.js(HIDE_UI, True)
    page.call("await new Promise(r => setTimeout(r, 800));"
              "await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));")
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    page.js(HIDE_UI, False)
    to_px = lambda gx: (gx - x0) * scale + margin  # noqa: E731 - graph x to picture x
    return shot.crop((int(left), int(top), int(left) + w, int(top) + h)), to_px


def png_with_workflow(img, workflow: dict, prompt: dict) -> bytes:
    """PNG bytes with ``workflow`` and ``prompt`` in tEXt chunks (ASCII JSON, as ComfyUI's Save Image writes them)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("workflow", json.dumps(workflow))
    info.add_text("prompt", json.dumps(prompt))
    buf = io.BytesIO()
    img.quantize(colors=256, method=2, dither=0).save(buf, "PNG", pnginfo=info, optimize=True)
    return buf.getvalue()


def thumbnail(img, center_x: float) -> bytes:
    """A square of the picture, its full height, centred on ``center_x`` (the method's own node): the template
    card is square, and the whole graph shrunk into it would be a thin unreadable strip."""
    from PIL import Image
    side = min(img.height, img.width)
    left = int(min(max(center_x - side / 2, 0), img.width - side))
    square = img.crop((left, 0, left + side, side)).resize(THUMB, Image.LANCZOS)
    buf = io.BytesIO()
    square.save(buf, "JPEG", quality=88, optimize=True)
    return buf.getvalue()


KEY_TYPES = ["ConsistentInpaintASUKAConditioning", "ConsistentInpaintHighResPatchRefine",
             "ConsistentInpaintApplySubjectAttention", "ConsistentInpaintApplyBranch",
             "ConsistentInpaintHarmonizingDecode"]


def key_node(page: Page) -> dict:
    """The node a thumbnail centres on: the method's own node (KEY_TYPES, in that order of preference), else the
    pack's first node that is not a loader, in column order."""
    nodes = sorted(page.nodes(), key=lambda n: (n["pos"][0], n["pos"][1]))
    for t in KEY_TYPES:
        for n in nodes:
            if n["type"] == t:
                return n
    pack = [n for n in nodes if n["type"].startswith("ConsistentInpaint") and "Loader" not in n["type"]]
    return (pack or nodes)[0]


def process(page: Page, driver, name: str):
    path = WORKFLOWS / f"{name}.json"
    wf = json.loads(path.read_text())
    wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"consistent-inpaint/workflows/{name}"))
    driver.set_window_size(1920, 1080)
    page.load_workflow(wf, name)
    apply_layout(page, STAGES[name])
    x0, y0, x1, y1 = graph_bounds(page)
    saved = page.serialize()
    saved.setdefault("extra", {})["ds"] = fit_view(page, (x0, y0, x1, y1), 1840, 960)
    # the frontend's own serialisation of what it loads back must be the file itself
    page.load_workflow(saved, name)
    again = page.serialize()
    assert graph_equal_ignoring_view(again, saved), f"{name}: the frontend rewrites the laid-out graph on load"
    boxes = [n["bounding"] for n in page.nodes()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not overlaps(a, b), f"{name}: nodes overlap at {a} and {b}"
    path.write_text(json.dumps(saved, indent=2) + "\n")
    prompt = page.api_prompt()
    key = key_node(page)
    img, to_px = picture(page, driver)
    (WORKFLOWS / f"{name}.png").write_bytes(png_with_workflow(img, saved, prompt))
    (WORKFLOWS / f"{name}.jpg").write_bytes(thumbnail(img, to_px(key["bounding"][0] + key["bounding"][2] / 2)))
    driver.set_window_size(1920, 1080)
    print(f"{name}: {len(saved['nodes'])} nodes in {len(saved['groups'])} groups, picture {img.width}x{img.height}, "
          f"png {(WORKFLOWS / f'{name}.png').stat().st_size // 1024} KB")


def main(names: list[str]):
    why = missing_parts()
    if why:
        sys.exit("cannot run: " + "; ".join(why))
    names = names or sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    with tempfile.TemporaryDirectory(prefix="ci_pictures_") as tmp:
        server = ComfyServer(Path(tmp), SETTINGS).start()
        driver = start_browser()
        try:
            page = Page(driver, server.url).open()
            for name in names:
                process(page, driver, name)
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
