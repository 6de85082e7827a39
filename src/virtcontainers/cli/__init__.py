"""The ``vc`` command line: thin over the public API."""

from __future__ import annotations

import gc
import sys

__all__ = ["main"]


def main() -> None:
    """``vc``: `vc ps --json` and `vc exec` through a running server take :mod:`.fast` (no
    click, no collector while it imports); everything else is the click application of
    :mod:`.app`."""
    from virtcontainers.cli import fast

    gc.disable()
    fast.run(sys.argv[1:])
    gc.enable()
    from virtcontainers.cli.app import main as click_main

    click_main()
