"""The shipped workflows as a user meets them in the real frontend (ComfyUI + comfyui-frontend-package in headless
Chromium): the template browser lists them with thumbnails, every workflow file and every workflow picture loads with
no missing node, every widget value as saved and no node overlapping another at the sizes the frontend draws, and a
save writes the file back unchanged. Screenshots go to the artefacts folder (see conftest.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from comfy_browser import PACK_FOLDER, WORKFLOWS

NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note"}          # nodes the frontend defines itself (never queued)
THUMB = (512, 512)                                # workflows/<name>.jpg
DIALOG_ERRORS = ("not allowed", "Only allowed suffixes", "Invalid directory")


def _without_view(wf: dict) -> dict:
    """A workflow less what moving around the canvas changes (``extra.ds``: the view's offset and zoom)."""
    return {**wf, "extra": {k: v for k, v in wf.get("extra", {}).items() if k != "ds"}}


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def _not_found(logs, fragment: str) -> list[str]:
    return [e["message"] for e in logs if "404" in e["message"] and fragment in e["message"]]


def _dialogs(page) -> list[str]:
    return page.js("return Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText);")


def _check_loaded(page, name: str, wf: dict, artifacts: Path, shot: str):
    """What a user sees after opening ``wf``: asserted node by node."""
    nodes = page.nodes()
    assert len(nodes) == len(wf["nodes"]), f"{name}: {len(nodes)} nodes on the canvas, {len(wf['nodes'])} in the file"
    missing = [n["type"] for n in nodes if not n["registered"] or n["placeholder"] or n["has_errors"]]
    assert not missing, f"{name}: missing or broken nodes {missing}"
    saved = page.serialize()
    by_id = {n["id"]: n for n in wf["nodes"]}
    for n in saved["nodes"]:
        assert n.get("widgets_values") == by_id[n["id"]].get("widgets_values"), \
            f"{name} node {n['id']} {n['type']}: widgets {n.get('widgets_values')} != saved {by_id[n['id']].get('widgets_values')}"
        assert n.get("inputs") == by_id[n["id"]].get("inputs"), f"{name} node {n['id']}: inputs re-slotted on load"
    assert _without_view(saved) == _without_view(wf), f"{name}: saving after opening changes the file"
    boxes = {n["id"]: n["bounding"] for n in nodes}
    ids = sorted(boxes)
    clashes = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if _overlap(boxes[a], boxes[b])]
    assert not clashes, f"{name}: overlapping nodes {clashes} (drawn at {[(a, boxes[a]) for a, _ in clashes]})"
    groups = page.groups()
    assert groups, f"{name}: no groups"
    for n in nodes:
        homes = [g["title"] for g in groups if _inside(n["bounding"], g["bounding"])]
        assert len(homes) == 1, f"{name} node {n['id']} {n['title']}: inside groups {homes}"
    gclash = [(a["title"], b["title"]) for i, a in enumerate(groups) for b in groups[i + 1:]
              if _overlap(a["bounding"], b["bounding"])]
    assert not gclash, f"{name}: overlapping groups {gclash}"
    # the Load Image previews: example.png served from the input folder
    page.wait(lambda: page.js("return window.app.graph.nodes.filter(n => n.type === 'LoadImage')"
                              ".every(n => n.imgs && n.imgs.length && n.imgs[0].complete);"), f"{name}: image previews")
    sizes = page.js("return window.app.graph.nodes.filter(n => n.type === 'LoadImage')"
                    ".map(n => n.imgs[0].naturalWidth);")
    assert all(w > 0 for w in sizes), f"{name}: a Load Image preview did not load ({sizes})"
    page.driver_screenshot(artifacts / shot)


@pytest.fixture(scope="module")
def page(frontend):
    return frontend[1]


def test_templates_listed_with_thumbnails(frontend, artifacts):
    server, page = frontend
    status, body = server.get("/api/workflow_templates")
    assert status == 200
    listed = json.loads(body)
    assert sorted(listed.get(PACK_FOLDER, [])) == NAMES, listed
    for name in NAMES:
        status, data = server.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")
        assert status == 200 and data[:3] == b"\xff\xd8\xff", f"{name}.jpg: HTTP {status}"
    page.drain_logs()
    page.close_dialogs()
    page.call("await window.app.extensionManager.command.execute('Comfy.BrowseTemplates');")
    page.wait(lambda: page.js("return !!document.querySelector('.p-dialog')"), "the template browser")
    # the pack's category, under Custom Nodes
    page.wait(lambda: page.js("""
        const item = Array.from(document.querySelectorAll('.p-dialog li, .p-dialog [role=option], .p-dialog button, .p-dialog div'))
            .find(e => e.children.length === 0 && e.textContent.trim() === arguments[0]);
        if (item) { item.click(); return true; } return false;""", PACK_FOLDER), "the pack's template category")
    cards_js = """
        const cards = Array.from(document.querySelectorAll('[data-testid^="template-workflow-"]'));
        const next = cards.find(c => !arguments[0].includes(c.dataset.testid));
        if (next) next.scrollIntoView({block: 'center'});
        return cards.map(c => {
            const img = c.querySelector('img');
            return {id: c.dataset.testid, text: c.innerText,
                    size: img && img.complete ? [img.naturalWidth, img.naturalHeight] : [0, 0]};
        });"""
    # The frontend fetches each card's thumbnail (<name>.jpg) as it scrolls into view and shows it from a blob; a
    # missing one leaves a placeholder. Scroll card by card, noting the size of each picture shown. On a loaded
    # machine the pictures come slowly: give up only after 45 s without a new one (at most 3 min in all).
    shown, start, last_new = {}, time.time(), time.time()
    while True:
        cards = page.js(cards_js, sorted(shown))
        before = len(shown)
        shown.update({c["id"]: c["size"] for c in cards if c["size"][0] > 0})
        now = time.time()
        last_new = now if len(shown) > before else last_new
        if len(shown) == len(NAMES) or now - last_new > 45 or now - start > 180:
            break
        time.sleep(0.3)
    page.js("document.querySelector('[data-testid^=\"template-workflow-\"]').scrollIntoView();")
    try:                      # the artefact: the first row of cards with their thumbnails drawn
        page.wait(lambda: page.js("return Array.from(document.querySelectorAll('[data-testid^=\"template-workflow-\"]"
                                  " img')).slice(0, 4).every(i => i.naturalWidth > 0);"), "thumbnails", timeout=10)
    except AssertionError:
        pass
    page.driver_screenshot(artifacts / "templates.png")
    assert sorted(c["id"] for c in cards) == sorted(f"template-workflow-{n}" for n in NAMES)
    for c in cards:
        assert shown.get(c["id"]) == list(THUMB), f"thumbnail not shown or not the shipped one: {c}"
    assert not _not_found(page.drain_logs(), "workflow_templates"), "a template thumbnail is missing"
    page.close_dialogs()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_file_opens_clean(page, artifacts, name):
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    page.close_dialogs()
    page.drain_logs()
    page.load_workflow(wf, name)
    # the missing-models dialog (no model is installed here) must offer every linked file without an error
    linked = sorted({m["name"] for n in wf["nodes"] for m in n.get("properties", {}).get("models", [])})
    if linked:
        text = "\n".join(page.wait(lambda: _dialogs(page), f"{name}: the missing-models dialog"))
        for model in linked:
            assert model.split("/")[-1] in text, f"{name}: {model} not offered in the missing-models dialog"
        bad = [e for e in DIALOG_ERRORS if e in text]
        assert not bad, f"{name}: the missing-models dialog refuses a link: {text}"
    page.close_dialogs()
    _check_loaded(page, name, wf, artifacts, f"{name}.json.png")
    assert not _not_found(page.drain_logs(), "/api/view"), f"{name}: an input image is missing"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_picture_dropped_on_canvas_loads_it(page, artifacts, name):
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    page.close_dialogs()
    page.drain_logs()
    assert page.drop_file((WORKFLOWS / f"{name}.png").read_bytes(), f"{name}.png", "image/png"), \
        f"dropping {name}.png loaded nothing"
    page.settle()
    page.close_dialogs()
    _check_loaded(page, name, wf, artifacts, f"{name}.png.png")
    assert not _not_found(page.drain_logs(), "/api/view"), f"{name}: an input image is missing"
