"""`vc ps --json` and `vc exec` through a running sandbox server, without click.

Both run often (scripts poll `vc ps`, agents exec one command after another) and are mostly
start-up: the interpreter, then click (~12 ms with what it imports: inspect, gettext, uuid,
datetime), then the command. The common forms of `vc exec` are parsed here exactly as click
parses the command in :mod:`.processes` (the property test tests/unit/test_cli_fast.py holds
the two parsers to the same result), and run by the same :func:`.execution.exec_through`;
`vc ps --json` prints what :func:`ps_json` prints for click's command too. Anything else
falls through to click and gives what click gives: ``--help``, an unknown or malformed
option, a missing argument, global options before the command, tracing or a log format
asked for by the environment, or a sandbox whose server does not answer (click's path
reattaches directly).

The garbage collector is off while this path imports (``cli.main``): its passes over the
new modules' objects, which live until exit anyway, cost ~8 ms of a `vc ps`. An exec turns
it back on once connected, with the start-up objects frozen out of its way.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, NoReturn

if TYPE_CHECKING:
    from virtcontainers.errors import StoreError

#: `vc exec`'s flags and value options (processes.exec_ and common.process_options).
_FLAGS = {"-t": "tty", "--tty": "tty", "-i": "interactive", "--interactive": "interactive",
          "-d": "detach", "--detach": "detach"}  # fmt: skip
_VALUES = {"-e": "env", "--env": "env", "-w": "workdir", "--workdir": "workdir",
           "-u": "user", "--user": "user"}  # fmt: skip


class ExecArgs(NamedTuple):
    """`vc exec`'s parameters, as click passes them to ``processes.exec_``."""

    sandbox_id: str
    command: tuple[str, ...]
    tty: bool = False
    interactive: bool = False
    detach: bool = False
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None


def parse_exec(args: Sequence[str]) -> ExecArgs | None:
    """The parameters of ``vc exec <args>``, or ``None`` where click would not parse them
    this way (an error, ``--help``): click's rules for options before the first positional
    argument (no interspersed options), short flags in clusters (``-it``), values joined
    (``-eK=V``, ``--env=K=V``) or in the next argument (even one starting with ``-``)."""
    flags: set[str] = set()
    values: dict[str, str] = {}
    env: list[str] = []
    rest = list(args)
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            i += 1
            break
        if arg[:1] != "-" or arg == "-":
            break
        i += 1
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in _FLAGS and not eq:
                flags.add(_FLAGS[name])
                continue
            if name not in _VALUES:
                return None
        else:  # a cluster of short options: flags, then at most one taking a value
            name, value = "", ""
            for at in range(1, len(arg)):
                opt = "-" + arg[at]
                if opt in _FLAGS:
                    flags.add(_FLAGS[opt])
                elif opt in _VALUES:
                    name, value = opt, arg[at + 1 :]
                    break
                else:
                    return None
            if not name:
                continue
            eq = "=" if value else ""
        if not eq:  # the value is the next argument, whatever it looks like
            if i == len(rest):
                return None
            value, i = rest[i], i + 1
        if _VALUES[name] == "env":
            env.append(value)
        else:
            values[_VALUES[name]] = value
    positional = rest[i:]
    if len(positional) < 2:
        return None
    return ExecArgs(
        positional[0], tuple(positional[1:]), tty="tty" in flags,
        interactive="interactive" in flags, detach="detach" in flags, env=tuple(env),
        workdir=values.get("workdir"), user=values.get("user"),
    )  # fmt: skip


def run(argv: Sequence[str]) -> None:
    """Run ``vc <argv>`` here and exit when it is a command this path serves (`vc ps
    --json`, a `vc exec` through a running server); return otherwise (click's path)."""
    if list(argv[:1]) not in (["exec"], ["ps"]) or os.environ.get("VC_LOG_FORMAT"):
        return  # another command, or logging wanted: the full path configures it
    from virtcontainers.telemetry import export

    if export.requested():
        return  # traced: the full path opens the command's root span
    if list(argv) == ["ps", "--json"]:
        _ps()
    elif argv[0] == "exec":
        _exec(argv[1:])


def ps_json(on_unreadable: Callable[[str, StoreError], None] | None = None) -> None:
    """Print `vc ps --json`: every sandbox of the store as JSON objects; a record that
    cannot be read goes to ``on_unreadable`` (default: a logged warning).

    Raises:
        StoreError: the store's root is unusable.
    """
    from virtcontainers.listing import list_sandboxes, warn_unreadable

    infos = list_sandboxes(on_unreadable=on_unreadable or warn_unreadable)
    print(json.dumps([i.to_dict() for i in infos], indent=2))


def _warn_unreadable(sandbox_id: str, exc: StoreError) -> None:
    # Logging is set up as the click group does, but only when there is a warning to give:
    # importing logging is a tenth of a `vc ps`.
    from virtcontainers.listing import warn_unreadable
    from virtcontainers.telemetry import logs

    logs.configure(None)
    warn_unreadable(sandbox_id, exc)


def _ps() -> NoReturn:
    from virtcontainers.cli.report import report
    from virtcontainers.errors import VirtContainersError

    try:
        ps_json(_warn_unreadable)
    except VirtContainersError as exc:
        sys.exit(report(exc))
    finally:
        gc.freeze()
    sys.exit(0)


def _exec(args: Sequence[str]) -> None:
    parsed = parse_exec(args)
    if parsed is None:
        return
    from virtcontainers.cli import execution
    from virtcontainers.cli.report import report
    from virtcontainers.cli.streams import claim_stdin
    from virtcontainers.errors import VirtContainersError

    command = list(parsed.command)
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        call = execution.ExecCall(
            command, parsed.tty, parsed.interactive, parsed.detach,
            execution.env_items(parsed.env), parsed.workdir, parsed.user,
        )  # fmt: skip
        claim_stdin()
        connection = execution.connect(parsed.sandbox_id)
    except VirtContainersError as exc:
        sys.exit(report(exc))
    if connection is None:
        return  # no server: click's path reattaches directly (or says why it cannot)
    gc.freeze()  # start-up is over: what it made lives until exit; collect only what comes
    gc.enable()
    try:
        execution.exec_through(connection, parsed.sandbox_id, call)
    except VirtContainersError as exc:
        sys.exit(report(exc))
    except (KeyboardInterrupt, EOFError):
        print("\nAborted!", file=sys.stderr)  # as click's standalone mode
        sys.exit(1)
    finally:
        gc.freeze()  # as app.main: spare the interpreter's last collections
