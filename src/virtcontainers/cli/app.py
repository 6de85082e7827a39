"""The root ``vc`` command. Each sub-command lives in its own module and registers here.

Only the module of the command being run is imported (see :func:`_register`), and those
modules import what they need inside the command: `vc ps` and `vc exec` must start fast.
"""

from __future__ import annotations

import logging
import sys

import typer

from virtcontainers import errors
from virtcontainers.errors import VirtContainersError

app = typer.Typer(
    name="vc",
    help="Run lightweight VM sandboxes (QEMU, Firecracker, Cloud Hypervisor, ACRN).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_debug = False

#: Which module defines each command; a name not listed (or --help) imports them all.
_COMMAND_MODULES = {
    "check": "check",
    "guest": "guest",
    "image": "image",
    "run": "run",
    **{
        name: "sandboxes"
        for name in (
            "create", "start", "exec", "cp", "ps", "logs", "pause", "resume", "hotplug",
            "resize", "stop", "rm", "top", "attach", "kill",
        )
    },
}  # fmt: skip
_ALL_MODULES = ("check", "guest", "image", "run", "sandboxes")


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


def _register(argv: list[str]) -> None:
    """Import the command modules (for their side effect of adding commands to ``app``):
    only the one that defines the command in ``argv`` when that is known."""
    import importlib

    words = [a for a in argv if not a.startswith("-")]
    wanted = _COMMAND_MODULES.get(words[0]) if words else None
    for module in (wanted,) if wanted else _ALL_MODULES:
        importlib.import_module(f"virtcontainers.cli.{module}")
    if wanted:
        # typer inspects every registered command's parameters on each run; keep just the
        # one being run (`vc ps` then costs one signature, not fifteen).
        app.registered_commands = [c for c in app.registered_commands if _name(c) == words[0]]


def _name(command: typer.models.CommandInfo) -> str:
    """The name typer gives a command: its own, or the function's with dashes."""
    return command.name or (command.callback.__name__ if command.callback else "").replace("_", "-")


def main() -> None:
    """Entry point: one readable error line and a non-zero exit code, tracebacks with --debug."""
    _register(sys.argv[1:])
    try:
        app()
    except VirtContainersError as exc:
        if _debug:
            raise
        from rich.console import Console
        from rich.markup import escape

        err_console = Console(stderr=True)
        # Name the public error class (the tree in errors.py), not a private subclass.
        kind = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in errors.__all__)
        err_console.print(
            f"[bold red]error:[/] {kind}: {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
