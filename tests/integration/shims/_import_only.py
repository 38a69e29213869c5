"""Import-only stand-ins for packages ComfyUI imports at start-up but the pack never uses.

ComfyUI v0.3.64 imports ``torchvision`` (Stable Cascade, Cosmos, spandrel's architectures) and
``torchaudio`` (audio nodes) when it starts. On a CPU machine where no build of them matches the
installed torch, the integration harness appends this folder to ``sys.path`` (after every real
site-packages, so an importable real package always wins). Every attribute and submodule of a
stand-in package is a placeholder: importing, subclassing and annotating work; calling raises.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class Placeholder:
    """Any attribute of a stand-in: a name that raises when it is used for real."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is an import-only stand-in of the test harness "
                           f"(no {self._name.split('.')[0]} build matches this torch)")

    def __mro_entries__(self, bases):   # `class X(torchvision.Something)` still defines X
        return (object,)

    def __or__(self, other):            # `Placeholder | None` in annotations
        return object

    __ror__ = __or__
    __getitem__ = __getattr__            # `Placeholder[...]` in annotations

    def __repr__(self):
        return f"<import-only stand-in {self._name}>"


class StandInModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves every submodule of the stand-in packages (``torchvision.transforms.functional``, …)."""

    roots: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots and "." in fullname:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


_FINDER = _Finder()


def stand_in(module: types.ModuleType) -> None:
    """Turn the package being imported into a stand-in (call from its ``__init__``)."""
    module.__class__ = StandInModule
    module.__version__ = "0.0.0+import-only-stand-in"
    _FINDER.roots.add(module.__name__)
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
