"""The ``vc`` command line: thin over the public API."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """``vc``: `vc exec` through a running server takes :mod:`.fast` (no click); everything
    else is the click application of :mod:`.app`."""
    from virtcontainers.cli import fast

    fast.run(sys.argv[1:])
    from virtcontainers.cli.app import main as click_main

    click_main()
