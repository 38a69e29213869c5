"""Make the pack's ``models`` package and the unit-test helpers importable without ComfyUI.

The repository root is a ComfyUI custom-node package (its ``__init__.py`` imports ComfyUI), so tests never
import the root package itself; unit tests import ``models`` directly, integration tests load the pack the
way ComfyUI does.
"""
import ctypes
import gc
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests", "unit")):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """A list that gets an entry for every ``torch.utils.checkpoint.checkpoint`` call made during the test."""
    import torch.utils.checkpoint as tuc
    calls = []
    original = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# -- CI: the real-ComfyUI suite must run, not skip ---------------------------------------------------------------
_integration_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and "tests/integration/" in report.nodeid.replace(os.sep, "/"):
        _integration_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Under ``CI=true`` a skipped integration test fails the run (CI must exercise real ComfyUI)."""
    if os.environ.get("CI", "").lower() == "true" and _integration_skips:
        session.config.get_terminal_writer().line(
            f"CI=true but {len(_integration_skips)} integration tests were skipped (is COMFYUI_PATH set to a "
            f"ComfyUI checkout with its requirements installed?), e.g. {_integration_skips[0]}", red=True)
        session.exitstatus = 1


# -- memory: give freed tensor memory back to the system between tests ---------------------------------------------
def _malloc_trim():
    """glibc keeps freed heap pages of the process (freed model weights of a finished test) instead of returning them:
    measured, 9 MiB of live tensors held 2.2 GiB of the pytest process until ``malloc_trim``. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return lambda: None
    return lambda: libc.malloc_trim(0)


_trim = _malloc_trim()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After every test (trylast: its fixtures are finalized by then), and with a garbage collection after the last
    test of a module, so the trainer subprocesses and the next test start from the live memory only (CI memory
    budget, issue 17)."""
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
    _trim()
