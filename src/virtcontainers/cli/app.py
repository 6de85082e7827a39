"""The root ``vc`` command, a click group whose sub-commands are imported on first use.

Each sub-command lives in a module of this package; :data:`COMMANDS` says which. Only the
module of the command being run is imported (``vc --help`` imports them all), and those
modules import what they need inside the command: `vc ps` and `vc exec` must start fast
(bench/cli.py). click, not typer: typer builds its parameters from type hints on every run
and costs ~50 ms more per command here (docs/status.md, "A fast CLI").
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys

import click

from virtcontainers.errors import VirtContainersError

#: Sub-command name -> ``module:attribute`` in this package, in the order `vc --help` lists.
COMMANDS = {
    "check": "check:check",
    "run": "run:run",
    "create": "sandboxes:create",
    "start": "sandboxes:start",
    "exec": "processes:exec_",
    **{name: f"processes:{name}" for name in ("top", "attach", "kill")},
    "cp": "sandboxes:cp",
    "ps": "ps:ps",
    **{
        name: f"sandboxes:{name}"
        for name in ("logs", "pause", "resume", "hotplug", "resize", "stop", "rm")
    },
    "guest": "guest:guest",
    "image": "image:image",
    "metrics": "metrics:metrics",
}

_debug = False


class LazyGroup(click.Group):
    """A group whose commands are ``module:attribute`` names, imported when asked for."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy, *(n for n in super().list_commands(ctx) if n not in self.lazy)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attribute)
        if not isinstance(command, click.Command):  # pragma: no cover - a wrong table entry
            raise TypeError(f"{target} is not a click command")
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            result = super().invoke(ctx)
        except BaseException as exc:
            # The command's root span (vc --trace) ends with the context, which does not see
            # the exception: record it (or the exit code) here.
            root = ctx.meta.get("vc.span")
            if root is not None:
                if isinstance(exc, SystemExit | click.exceptions.Exit):
                    code = exc.code if isinstance(exc, SystemExit) else exc.exit_code
                    root.set("vc.exit_code", code if isinstance(code, int) else 1)
                elif not isinstance(exc, click.ClickException):
                    root.fail(exc)
            raise
        if (root := ctx.meta.get("vc.span")) is not None:
            root.set("vc.exit_code", 0)
        return result


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"show_default": True, "max_content_width": 100},
)
@click.option("--debug", is_flag=True, help="Log debug output and show tracebacks.")
@click.option(
    "--trace",
    "trace_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Append every span of this command, and of the sandbox server it starts, to FILE "
    "as JSON lines (needs the otlp extra). OTEL_EXPORTER_OTLP_ENDPOINT exports too.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="Log lines as text, or as JSON objects with the spans' ids (json also logs every "
    "operation). [default: text, or $VC_LOG_FORMAT]",
)
@click.pass_context
def app(ctx: click.Context, debug: bool, trace_file: str | None, log_format: str | None) -> None:
    """Run lightweight VM sandboxes (QEMU, Firecracker, Cloud Hypervisor, ACRN)."""
    global _debug
    _debug = debug
    from virtcontainers.telemetry import export, logs

    if log_format is not None:
        os.environ[logs.LOG_FORMAT_ENV] = log_format  # for the sandbox servers we start
    logs.configure(log_format, level=logging.DEBUG if debug else logging.WARNING)
    if trace_file is not None:
        os.environ[export.TRACE_FILE_ENV] = os.path.abspath(trace_file)
    elif not export.requested():
        return  # untraced: neither the API nor the SDK is imported
    export.configure(service_name="vc")
    from virtcontainers.telemetry.tracing import operation

    name = f"vc {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "vc"
    ctx.meta["vc.span"] = ctx.with_resource(operation(name))


def main() -> None:
    """Entry point: one readable error line and exit code 1 for a typed error (tracebacks
    with --debug); click's usage errors exit 2."""
    try:
        app.main(prog_name="vc")
    except VirtContainersError as exc:
        if _debug:
            raise
        from virtcontainers.cli.report import report

        sys.exit(report(exc))
    finally:
        # The process ends now: spare the interpreter's last collections over every object
        # of ~150 modules (~25 ms of a `vc ps`, bench/cli.py). Shutdown still runs atexit
        # handlers and flushes the streams; only cyclic garbage is left to the OS.
        gc.freeze()
