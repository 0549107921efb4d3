"""A proxy adapter that forwards only the members its protocol declares.

Every probe and defense runs through it in `tests/test_protocol.py`: a use of an
undeclared member (an implementation detail of one adapter class) raises
`UndeclaredMember` instead of silently working on that class only.
"""
from __future__ import annotations

from audit.adapters.base import DualEncoderWhiteBox, GenerativeWhiteBox, ModelAdapter, declared_members

__all__ = ["declared_only", "UndeclaredMember", "protocol_of"]


class UndeclaredMember(Exception):
    """Not an AttributeError on purpose: hasattr/getattr defaults must not hide it."""


def protocol_of(adapter) -> type:
    for proto in (GenerativeWhiteBox, DualEncoderWhiteBox):
        if isinstance(adapter, proto):
            return proto
    return ModelAdapter


def declared_only(adapter, *, used: set | None = None):
    proto = protocol_of(adapter)
    allowed = declared_members(proto)

    def __getattribute__(self, name):
        if name.startswith("__") or name in ("_inner", "_used"):
            return object.__getattribute__(self, name)
        if name not in allowed:
            raise UndeclaredMember(f"{name!r} is not declared by {proto.__name__}")
        if object.__getattribute__(self, "_used") is not None:
            object.__getattribute__(self, "_used").add(name)
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name, value):
        if name not in allowed:
            raise UndeclaredMember(f"setting {name!r}, which {proto.__name__} does not declare")
        setattr(object.__getattribute__(self, "_inner"), name, value)

    cls = type(f"DeclaredOnly{proto.__name__}", (proto,), {"__getattribute__": __getattribute__,
                                                           "__setattr__": __setattr__})
    cls.__abstractmethods__ = frozenset()
    obj = object.__new__(cls)
    object.__setattr__(obj, "_inner", adapter)
    object.__setattr__(obj, "_used", used)
    return obj
