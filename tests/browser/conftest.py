"""The browser test: real ComfyUI and its real frontend in headless Chromium (see comfy_browser.py, README.md).

Skipped, with the reason printed in the header and in each skip, when ComfyUI, chromium, chromedriver, selenium or the
frontend package is missing; under ``CI=true`` a missing part fails the test instead, and any skipped test in this
folder fails the run (CI must exercise the frontend).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_browser import ComfyServer, Page, missing_parts, start_browser  # noqa: E402

ENV_ARTIFACTS = "CONSISTENT_INPAINT_BROWSER_ARTIFACTS"
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Graph.CanvasInfo": False, "Comfy.Minimap.Visible": False}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_report_header(config):
    why = missing_parts()
    if why:
        return ["browser tests: " + ("FAIL under CI=true: " if _ci() else "skipped: ") + "; ".join(why)]
    return ["browser tests: real ComfyUI + frontend in headless Chromium"]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots and logs go: ``$CONSISTENT_INPAINT_BROWSER_ARTIFACTS``, or
    ``<tempdir>/consistent_inpaint_browser_artifacts`` emptied of an earlier run's files. Not a pytest temporary
    folder: pytest deletes those when the run passes (pyproject.toml), and the screenshots are kept."""
    p = os.environ.get(ENV_ARTIFACTS)
    path = Path(p) if p else Path(tempfile.gettempdir()) / "consistent_inpaint_browser_artifacts"
    if not p:
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def frontend(artifacts):
    """(server, page): ComfyUI started and the frontend opened once per test module, and both stopped when the
    module's tests end (the server and Chromium hold about 1 GB; the rest of the suite does not need them)."""
    why = missing_parts()
    if why:
        (pytest.fail if _ci() else pytest.skip)("browser test needs: " + "; ".join(why))
    tmp = tempfile.TemporaryDirectory(prefix="ci_browser_")
    server = ComfyServer(Path(tmp.name), SETTINGS)
    driver = None
    try:
        server.start()
        driver = start_browser()
        page = Page(driver, server.url).open()
        page.drain_logs()
        yield server, page
    finally:
        if driver is not None:
            try:
                (artifacts / "browser_console.log").write_text(
                    "\n".join(f"{e.get('level')} {e.get('message')}" for e in page.logs + driver.get_log("browser")))
            except Exception:  # noqa: BLE001 - best effort artefact
                pass
            driver.quit()
        server.stop()
        (artifacts / "comfyui.log").write_text(server.log())
        tmp.cleanup()
        print(f"\nbrowser test artefacts (screenshots, logs): {artifacts}")


# -- CI: the browser test must run, not skip ---------------------------------------------------------------------
_browser_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and "tests/browser/" in report.nodeid.replace(os.sep, "/"):
        _browser_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Under ``CI=true`` a skipped browser test fails the run."""
    if _ci() and _browser_skips:
        session.config.get_terminal_writer().line(
            f"CI=true but {len(_browser_skips)} browser tests were skipped ({'; '.join(missing_parts()) or 'see above'})"
            f", e.g. {_browser_skips[0]}", red=True)
        session.exitstatus = 1
