"""The root ``vc`` command. Each sub-command lives in its own module and registers here."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from virtcontainers import errors
from virtcontainers.errors import VirtContainersError

app = typer.Typer(
    name="vc",
    help="Run lightweight VM sandboxes (QEMU, Firecracker, Cloud Hypervisor, ACRN).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)
_debug = False


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Log debug output and show tracebacks."),
) -> None:
    global _debug
    _debug = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from virtcontainers.cli import check, image, run, sandboxes  # noqa: F401


def main() -> None:
    """Entry point: one readable error line and a non-zero exit code, tracebacks with --debug."""
    _register()
    try:
        app()
    except VirtContainersError as exc:
        if _debug:
            raise
        # Name the public error class (the tree in errors.py), not a private subclass.
        kind = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in errors.__all__)
        err_console.print(
            f"[bold red]error:[/] {kind}: {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
