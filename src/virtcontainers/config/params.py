"""Key/value parameters for the guest kernel and the hypervisor command line."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Param", "deserialize_params", "serialize_params"]


@dataclass(frozen=True, slots=True)
class Param:
    """One ``key[=value]`` parameter. An empty value means a bare flag (``quiet``)."""

    key: str
    value: str = ""


def serialize_params(params: Iterable[Param], delim: str) -> list[str]:
    """Render parameters as strings, following the reference's rules exactly.

    A param with neither key nor value is dropped; one with only a key or only a value yields
    that alone; with an empty ``delim`` key and value become two separate items (``["-m",
    "512"]``); otherwise ``key + delim + value``.
    """
    out: list[str] = []
    for p in params:
        if not p.key and not p.value:
            continue
        if not p.key:
            out.append(p.value)
        elif not p.value:
            out.append(p.key)
        elif not delim:
            out.extend((p.key, p.value))
        else:
            out.append(f"{p.key}{delim}{p.value}")
    return out


def deserialize_params(strings: Iterable[str]) -> list[Param]:
    """Parse ``key=value`` strings (split on the first ``=``); empty strings are skipped."""
    out: list[Param] = []
    for s in strings:
        if not s:
            continue
        key, sep, value = s.partition("=")
        out.append(Param(key, value if sep else ""))
    return out
