"""How a node refuses an input: one message style and the checks every node shares.

Every refusal reads ``<node display name>: expected <what>; got <what>. <what to do>`` so a user sees in ComfyUI's
error box which node stopped, why, and how to fix it. Checks that need a widget value run twice: in
``validate_inputs`` (before the graph runs) when the value is a literal, and again in ``execute``, because ComfyUI
passes ``None`` to ``validate_inputs`` for a widget that is driven by a link — the value exists only at execution.
"""
from __future__ import annotations

import contextlib
import enum
import math
from typing import Callable, Mapping, Optional, Type, TypeVar, Union

from ..models.weights import CheckpointFormatError

E = TypeVar("E", bound=enum.Enum)
Node = Union[str, type]


class InputError(ValueError):
    """An input a node refuses (a ValueError, so callers that caught ValueError still do)."""


def display_name(node: Node) -> str:
    """The name the user sees on the node (a V3 node class, or a string already)."""
    if isinstance(node, str):
        return node
    try:
        return node.define_schema().display_name or node.__name__     # (GET_SCHEMA fails on ComfyUI's locked clone)
    except Exception:                                   # a class that is not a ComfyUI node (tests, trainers)
        return getattr(node, "__name__", str(node))


def refuse(node: Node, expected: str, given: str, fix: str = "") -> InputError:
    """The error to raise: ``raise refuse(cls, "a MASK the size of image (512x512)", "a 256x256 mask", "…")``."""
    text = f"{display_name(node)}: expected {expected}; got {given}."
    return InputError(f"{text} {fix}" if fix else text)


def options(enum_cls: Type[enum.Enum]) -> list[str]:
    """The values a combo offers, in the order the node lists them."""
    return [m.value for m in enum_cls]


def choice(node: Node, name: str, value, enum_cls: Type[E]) -> E:
    """``value`` as a member of ``enum_cls``, or an error listing the accepted values. ComfyUI 0.3.64 does not check
    the combo values of V3 nodes, so an API prompt can send anything."""
    try:
        return enum_cls(value)
    except ValueError:
        raise refuse(node, f"{name} to be one of {options(enum_cls)}", repr(value)) from None


def linked(*values) -> bool:
    """True when a value is missing from ``validate_inputs`` because a link drives it (checked at execute)."""
    return any(v is None for v in values)


def validation(check: Callable[..., Optional[str]], *values) -> Union[bool, str]:
    """For ``validate_inputs``: True, or the message of ``check(*values)``; True (deferred to execute) when a value
    arrives by link."""
    if linked(*values):
        return True
    message = check(*values)
    return True if message is None else message


def enforce(node: Node, check: Callable[..., Optional[str]], *values) -> None:
    """For ``execute``: the same ``check`` as :func:`validation`, raised with the node's name."""
    message = check(*values)
    if message is not None:
        raise InputError(f"{display_name(node)}: {message}")


def verdict(message: Optional[str]) -> Union[bool, str]:
    """For ``validate_inputs``: True when ``message`` is None, else the message."""
    return True if message is None else message


def first(*messages: Optional[str]) -> Optional[str]:
    """The first message that is not None (several independent checks, each skipping linked values)."""
    return next((m for m in messages if m is not None), None)


def number_problem(name: str, value, lo=None, hi=None) -> Optional[str]:
    """A widget number within [lo, hi] (and finite); None when it is fine or arrives by link (``value`` None)."""
    if value is None:
        return None
    bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else \
        f"at least {lo}" if lo is not None else f"at most {hi}" if hi is not None else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"expected {name} to be a number {bounds}; got {value!r}"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"expected {name} {bounds}; got {value!r}"
    return None


def option_problem(name: str, value, accepted) -> Optional[str]:
    """A combo value among ``accepted`` (listed in the message, the first 20 of a long list)."""
    accepted = list(accepted)
    if value is None or value in accepted:
        return None
    shown = accepted if len(accepted) <= 20 else accepted[:20] + [f"... {len(accepted) - 20} more"]
    return f"expected {name} to be one of {shown}; got {value!r}"


def _widget(inp, values: Mapping) -> Optional[str]:
    value = values.get(inp.id)
    kind = inp.get_io_type()
    if kind in ("INT", "FLOAT"):
        return number_problem(inp.id, value, getattr(inp, "min", None), getattr(inp, "max", None))
    if kind == "COMBO" and getattr(inp, "options", None) is not None:
        return option_problem(inp.id, value, inp.options)
    return None


def widget_problem(node: type, values: Mapping) -> Optional[str]:
    """Every number of ``node``'s schema within its min/max and every combo value among its options. ComfyUI skips
    both checks for a node that has ``validate_inputs(**kwargs)`` (and for V3 combos, and for values that arrive by
    link), so the node checks them itself: in ``validate_inputs`` and again at execute. Missing values are skipped."""
    return first(*(_widget(inp, values) for inp in node.define_schema().inputs))


@contextlib.contextmanager
def named(node: Node):
    """Inside: a refusal raised by a shared helper (layout, loaders) gets the node's display name in front, so every
    message starts with the node that stopped. The exception type is kept."""
    try:
        yield
    except (InputError, CheckpointFormatError) as e:
        name = display_name(node)
        if str(e).startswith(f"{name}:"):
            raise
        raise type(e)(f"{name}: {e}") from e
