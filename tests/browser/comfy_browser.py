"""Real ComfyUI with its real frontend, driven in headless Chromium through Selenium.

Used by the browser test (``test_frontend.py``) and by ``tools/workflow_pictures.py``, which lays the shipped
workflows out and renders their pictures. Nothing here is a stand-in: the server is ComfyUI's own ``main.py``
(``--cpu``), the page is the ``comfyui-frontend-package`` ComfyUI serves, and the pack is loaded from a
``custom_nodes`` folder holding a symlink to this repository, as a user installs it.

ComfyUI's folder is never written to: models, custom_nodes, input, output, temp and user live in a temporary
base directory (``--base-directory``), the database is in memory. ComfyUI's shipped ``input/example.png`` is
copied into that input folder, as a fresh ComfyUI has it. The harness's import-only stand-ins of torchvision,
torchaudio and spandrel (``tests/integration/shims``) are appended to ``sys.path`` after site-packages, so a real,
importable package always wins.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SHIMS = REPO / "tests" / "integration" / "shims"
PACK_FOLDER = "consistent-inpaint"          # the custom_nodes folder name (= the templates' module name)
CHROMIUM = os.environ.get("CHROMIUM_BINARY") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")


def comfyui_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    if p and (Path(p) / "main.py").is_file():
        return Path(p)
    for cand in (REPO.parent / "ComfyUI", REPO.parent / "shared" / "comfyui", REPO.parents[1]):
        if (cand / "main.py").is_file() and (cand / "comfy").is_dir():
            return cand
    return None


def pack_dir() -> Path:
    """The pack folder ComfyUI loads: this repository, or ``CONSISTENT_INPAINT_PACK_DIR`` (a copy of it, e.g. a
    ``git archive`` of a commit with this checkout's workflows/ linked in)."""
    return Path(os.environ.get("CONSISTENT_INPAINT_PACK_DIR") or REPO)


def missing_parts() -> list[str]:
    """What is missing to run the browser test, as readable reasons (empty when everything is there)."""
    why = []
    if comfyui_path() is None:
        why.append("no ComfyUI (set COMFYUI_PATH to a ComfyUI checkout)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        why.append("the Python package selenium is not installed (pip install selenium)")
    if not CHROMIUM:
        why.append("no chromium binary (apt-get install chromium, or set CHROMIUM_BINARY)")
    if not CHROMEDRIVER:
        why.append("no chromedriver (apt-get install chromium-driver, or set CHROMEDRIVER)")
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        why.append("the ComfyUI frontend (pip package comfyui-frontend-package) is not installed")
    return why


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER = """
import runpy, sys
comfy, shims = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy)
if shims:
    sys.path.append(shims)
sys.argv = [comfy + '/main.py'] + sys.argv[3:]
runpy.run_path(comfy + '/main.py', run_name='__main__')
"""


class ComfyServer:
    """``python main.py --cpu`` on a free port with every writable folder in ``base``."""

    def __init__(self, base: Path, settings: dict | None = None):
        self.comfy = comfyui_path()
        self.base = Path(base)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(pack_dir(), target_is_directory=True)
        (self.base / "input").mkdir(exist_ok=True)
        shutil.copy(self.comfy / "input" / "example.png", self.base / "input" / "example.png")
        user = self.base / "user" / "default"
        user.mkdir(parents=True, exist_ok=True)
        (user / "comfy.settings.json").write_text(json.dumps(settings or {}))
        self.log_path = self.base / "comfyui.log"
        self.proc = None

    def start(self, timeout: float = 180.0):
        shims = "" if os.environ.get("CONSISTENT_INPAINT_COMFY_SHIMS") == "none" else str(SHIMS)
        args = [sys.executable, "-c", LAUNCHER, str(self.comfy), shims, "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
                "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=self.base, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer in {timeout:.0f} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        """(status, bytes) of a GET on the server."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


def start_browser(width: int = 1920, height: int = 1080):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=o)
    d.set_script_timeout(60)
    return d


class Page:
    """The ComfyUI page in the browser, with the few frontend calls the tests and the tool need."""

    def __init__(self, driver, url: str):
        self.d = driver
        self.url = url
        self.logs: list[dict] = []

    def open(self, timeout: float = 120.0):
        self.d.get(self.url + "/")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.d.execute_script("return !!(window.app && window.app.graph && window.app.canvas "
                                     "&& window.LiteGraph && window.app.extensionManager)"):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError("the ComfyUI frontend did not start")
        # every node the server defines must be registered before a graph is loaded (a node of a type not yet
        # registered becomes a placeholder that saves its loaded state verbatim)
        served = self.call("return Object.keys(await (await fetch('/api/object_info')).json());")
        self.wait(lambda: self.d.execute_script(
            "const r = window.LiteGraph.registered_node_types; return arguments[0].every(t => r[t]);", served),
            "every served node type to be registered", timeout=60)
        self.served_types = served
        return self

    def wait(self, cond, what: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def js_async(self, script: str, *args):
        """Run ``script`` as the body of an async function; its return value comes back."""
        return self.d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "(async (...a) => {" + script + "})(...Array.from(arguments).slice(0, -1))"
            ".then(v => done({ok: v}), e => done({error: String(e && e.stack || e)}));", *args)

    def call(self, script: str, *args):
        r = self.js_async(script, *args)
        if "error" in r:
            raise RuntimeError(r["error"])
        return r.get("ok")

    def drain_logs(self) -> list[dict]:
        new = self.d.get_log("browser")
        self.logs.extend(new)
        return new

    def close_dialogs(self):
        self.js("window.app.extensionManager.dialog && 0;"
                "document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')"
                ".forEach(b => b.click());")

    def load_workflow(self, workflow: dict, name: str = "workflow"):
        """``app.loadGraphData`` (what opening a workflow file does), then let the canvas draw twice."""
        self.call("await window.app.loadGraphData(a[0], true, true, a[1]);", workflow, name)
        self.settle()

    def settle(self, quiet_ms: int = 400, timeout_ms: int = 10000):
        """Wait until the nodes' positions and sizes stay put for ``quiet_ms`` (the frontend grows nodes to fit
        their widgets a few frames after a load, and moves them back to their loaded places then)."""
        self.call("""
            const snap = () => JSON.stringify(window.app.graph.nodes.map(n => [n.id, Array.from(n.pos),
                                                                                 Array.from(n.size)]));
            let last = snap(), since = performance.now();
            const start = since;
            while (performance.now() - start < a[1]) {
                await new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)));
                const now = snap();
                if (now !== last) { last = now; since = performance.now(); }
                else if (performance.now() - since >= a[0]) return true;
            }
            return false;""", quiet_ms, timeout_ms)

    def drop_file(self, data: bytes, name: str, mime: str, timeout_ms: int = 15000) -> bool:
        """Drop a file on the page the way a user's drag and drop delivers it (a DataTransfer on a drop event,
        which the frontend handles on the document) after clearing the graph; true once nodes have appeared."""
        import base64
        return self.call("""
            window.app.graph.clear();
            const bytes = Uint8Array.from(atob(a[0]), c => c.charCodeAt(0));
            const dt = new DataTransfer(); dt.items.add(new File([bytes], a[1], {type: a[2]}));
            const target = document.querySelector('#graph-canvas') || document;
            target.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
            for (let t = 0; t < a[3]; t += 100) {
                await new Promise(r => setTimeout(r, 100));
                if (window.app.graph.nodes.length) {
                    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
                    return true;
                }
            }
            return false;
        """, base64.b64encode(data).decode(), name, mime, timeout_ms)

    def serialize(self) -> dict:
        """What the frontend saves: the change tracker stores ``app.graph.serialize()`` as the workflow."""
        return self.js("return JSON.parse(JSON.stringify(window.app.graph.serialize()))")

    def api_prompt(self) -> dict:
        return self.call("const p = await window.app.graphToPrompt(); return JSON.parse(JSON.stringify(p.output));")

    def nodes(self) -> list[dict]:
        """Every node as the frontend holds it: type, whether that type is registered, bounding box as drawn
        (title bar included), widgets by name and value."""
        return self.js("""
            const LG = window.LiteGraph;
            return window.app.graph.nodes.map(n => {
                const b = new Float32Array(4); n.measure(b, window.app.canvas.ctx);  // as the frame draws it
                return {id: n.id, type: n.type, title: n.title, mode: n.mode,
                        registered: !!LG.registered_node_types[n.type], has_errors: !!n.has_errors,
                        // a node whose type was unknown when it was loaded: a bare LGraphNode keeping its JSON
                        placeholder: n.constructor === LG.LGraphNode && !!n.last_serialization,
                        pos: Array.from(n.pos), size: Array.from(n.size), bounding: Array.from(b),
                        widgets: (n.widgets || []).map(w => [w.name, w.value === undefined ? null : w.value])};
            });""")

    def driver_screenshot(self, path):
        self.d.save_screenshot(str(path))

    def groups(self) -> list[dict]:
        return self.js("return window.app.graph.groups.map(g => ({title: g.title, bounding: Array.from(g._bounding"
                       " || g.bounding)}))")
