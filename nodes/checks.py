"""How a node refuses an input: one message style and the checks every node shares (issue 19).

Every refusal reads ``<node display name>: expected <what>; got <what>. <what to do>`` so a user sees in ComfyUI's
error box which node stopped, why, and how to fix it. Checks that need a widget value run twice: in
``validate_inputs`` (before the graph runs) when the value is a literal, and again in ``execute``, because ComfyUI
passes ``None`` to ``validate_inputs`` for a widget that is driven by a link — the value exists only at execution.
"""
from __future__ import annotations

import enum
from typing import Callable, Optional, Type, TypeVar, Union

E = TypeVar("E", bound=enum.Enum)
Node = Union[str, type]


class InputError(ValueError):
    """An input a node refuses (a ValueError, so callers that caught ValueError still do)."""


def display_name(node: Node) -> str:
    """The name the user sees on the node (a V3 node class, or a string already)."""
    if isinstance(node, str):
        return node
    try:
        return node.GET_SCHEMA().display_name or node.__name__
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
