"""How `vc` reports an error: one line on stderr, ``error:`` in bold red on a terminal (as
``click.style`` + ``click.echo`` would print it, without importing click: `vc exec`'s fast
path, :mod:`.fast`)."""

from __future__ import annotations

import sys

from virtcontainers import errors


def print_error(message: str) -> None:
    """``error: <message>`` on stderr."""
    label = "\x1b[31m\x1b[1merror:\x1b[0m" if sys.stderr.isatty() else "error:"
    print(f"{label} {message}", file=sys.stderr, flush=True)


def report(exc: errors.VirtContainersError) -> int:
    """Print ``exc`` naming its public class (the tree in errors.py, not a private
    subclass); returns the exit code, 1."""
    kind = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in errors.__all__)
    print_error(f"{kind}: {exc}")
    return 1
