"""Processes in a running sandbox: exec, top, attach, kill.

These talk to the sandbox's server over a blocking connection
(:mod:`virtcontainers.server.sync_client`): no asyncio, no sandbox layer, so `vc exec`
starts fast (bench/cli.py). Only `vc exec` on a sandbox without a server (a library ran it
in-process and died) reattaches directly, through the async sandbox layer.
"""

from __future__ import annotations

import json
import sys
from contextlib import closing
from typing import TYPE_CHECKING

import click

from virtcontainers.cli import common, execution
from virtcontainers.cli.common import json_option, sandbox_id_argument
from virtcontainers.errors import ConfigError

if TYPE_CHECKING:
    from virtcontainers.server.sync_client import ServerConnection


@click.command(name="exec", context_settings={"allow_interspersed_args": False})
@sandbox_id_argument
@click.argument("command", nargs=-1, required=True, help="The command to run in the guest.")
@common.terminal_options
@click.option("--detach", "-d", is_flag=True, help="Start it in the background; print its pid.")
@common.process_options
def exec_(
    sandbox_id: str,
    command: tuple[str, ...],
    tty: bool,
    interactive: bool,
    detach: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
) -> None:
    """Run COMMAND in a running sandbox; exits with its exit code (127: not found).

    In an image sandbox the image's Env, WorkingDir and User apply; -e/-w/-u override them.

    `-it` gives an interactive terminal (raw mode, window size forwarded, Ctrl-C reaches the
    guest process). `-d` returns at once with the guest pid: see `vc top`, `vc attach`,
    `vc kill`.

    \b
    Examples:
      vc exec 3f2a9c -- ls -l /
      vc exec -it 3f2a9c sh
    """

    argv = list(command[1:] if command[:1] == ("--",) else command)
    call = execution.ExecCall(
        argv, tty, interactive, detach, execution.env_items(env), workdir, user
    )
    execution.run_exec(sandbox_id, call)


def _require_server(sandbox_id: str) -> ServerConnection:
    """A connection to the sandbox's server.

    Raises:
        StoreError: no such sandbox.
        StateError: it has no server (not running, or run in a library process).
    """
    connection = execution.connect(sandbox_id)
    if connection is None:
        import asyncio

        from virtcontainers.sandbox import Sandbox

        async def why() -> None:
            sandbox = await Sandbox.attach(sandbox_id)  # StoreError for an unknown id
            try:
                await sandbox.server_client()  # StateError: no server
            finally:
                await sandbox.close()

        asyncio.run(why())
        from virtcontainers.errors import AgentError

        raise AgentError(f"the server of sandbox {sandbox_id} does not answer (retry)")
    return connection


@click.command()
@sandbox_id_argument
@json_option
def top(sandbox_id: str, as_json: bool) -> None:
    """List the processes started in the sandbox through its agent (`vc exec`, `vc run`)."""

    with closing(_require_server(sandbox_id)) as connection:
        procs = connection.call("processes")
    if as_json or not isinstance(procs, list):
        print(json.dumps(procs, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("PID", "STATE", "TTY", "DETACHED", "ATTACHED", "COMMAND")
    for p in procs:
        if p["running"]:
            state = "running"
        elif p.get("signal") is not None:
            state = f"killed ({p['signal']})"
        else:
            state = f"exited ({p.get('exit_code')})"
        table.add_row(str(p["pid"]), state, "yes" if p["tty"] else "", "yes" if p["detached"]
                      else "", "yes" if p["attached"] else "", " ".join(p["argv"]))  # fmt: skip
    Console().print(table)


@click.command()
@sandbox_id_argument
@click.argument("pid", type=int, help="The guest pid (see `vc top`).")
def attach(sandbox_id: str, pid: int) -> None:
    """Reconnect to a process started with `vc exec -d`: its output so far (the latest
    256 KiB), then live; stdin is forwarded. Exits with its exit code."""

    from virtcontainers.cli.streams import claim_stdin, follow_blocking

    claim_stdin()
    with closing(_require_server(sandbox_id)) as connection:
        procs = connection.call("processes")
        tty = isinstance(procs, list) and any(p["pid"] == pid and p["tty"] for p in procs)
        proc = connection.attach(pid)
        sys.exit(follow_blocking(proc, tty=tty, interactive=True))


@click.command()
@sandbox_id_argument
@click.argument("pid", type=int, help="The guest pid (see `vc top`).")
@click.argument("sig", metavar="[SIGNAL]", default="TERM", help="Name or number.")
def kill(sandbox_id: str, pid: int, sig: str) -> None:
    """Send SIGNAL (default TERM) to a guest process started through the agent."""
    import signal

    name = sig.upper().removeprefix("SIG")
    try:
        number = int(name) if name.isdigit() else int(signal.Signals[f"SIG{name}"])
    except KeyError:
        raise ConfigError(f"unknown signal {sig!r}", field="SIGNAL") from None

    with closing(_require_server(sandbox_id)) as connection:
        connection.call("kill", pid=pid, signal=number)
