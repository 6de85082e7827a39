"""Package attributes imported on first use (PEP 562), for ``__init__`` modules that must
not import their heavy submodules (asyncio, drivers) when only a light one is wanted."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping


def lazy_exports(
    package: str, homes: Mapping[str, Iterable[str]], names: Iterable[str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name in ``homes[module]`` is
    imported from ``module`` when first looked up, then cached in the package."""
    where = {name: module for module, exported in homes.items() for name in exported}
    public = set(names)

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip this
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | public)

    return __getattr__, __dir__
