"""Lazy public names for the packages (PEP 562): a name resolves by importing its module on first access."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The `(__getattr__, __dir__)` of `package`, whose public `names` map to the (relative) modules defining them.

    Usage, at the end of a package's `__init__.py`: `__getattr__, __dir__ = lazy_exports(__name__, _LAZY)`.
    """

    def __getattr__(name: str):
        if name in names:
            return getattr(import_module(names[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__
