"""Sandbox commands: create, start, cp, logs, pause, resume, hotplug, resize, stop, rm
(`vc ps`: :mod:`.ps`; processes in a sandbox: :mod:`.processes`).

Each is a thin call into :class:`virtcontainers.sandbox.Sandbox`; sandboxes live in the state
store, so any of them works from a new shell on a sandbox another process started. A running
sandbox's commands go to its server; when the server is gone, the record is used directly.

Imports are made inside the commands: `vc ps` and `vc exec` must not pay for the drivers,
configs or rich (see bench/cli.py).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import click

from virtcontainers.cli import options
from virtcontainers.cli.common import json_option, sandbox_id_argument
from virtcontainers.errors import ConfigError

if TYPE_CHECKING:
    from virtcontainers.sandbox import Sandbox
    from virtcontainers.server.sync_client import ServerConnection

T = TypeVar("T")


def _emit(data: object, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        Console().print(human, highlight=False)


def _run(coro: Coroutine[object, object, T]) -> T:
    import asyncio

    return asyncio.run(coro)


@click.command()
@options.sandbox_options
@click.option("--id", "name", help="Sandbox id (default: random).")
@json_option
def create(sandbox: options.SandboxOptions, name: str | None, as_json: bool) -> None:
    """Record a new sandbox (nothing boots until `vc start ID`). Prints its id.

    With --image every `vc exec` runs in that image's root file system, with its Env,
    WorkingDir and User unless -e/-w/-u say otherwise.
    """
    config = sandbox.config()
    if sandbox.image is None and sandbox.disk_size:
        raise ConfigError("--disk-size needs --image", field="--disk-size")
    from virtcontainers.sandbox import Sandbox

    spec = sandbox.network_spec()
    volumes = sandbox.volumes()  # before the pull, which can take minutes
    stored = sandbox.pull_image()
    created = _run(
        Sandbox.create(
            config,
            id=name,
            hypervisor=sandbox.hypervisor,
            devices=sandbox.devices(),
            network=spec,
            image=stored,
            disk_size_mb=sandbox.disk_size_mb(),
            volumes=volumes,
        )
    )
    _emit(created.info().to_dict(), as_json, created.id)


@click.command()
@sandbox_id_argument
@click.option("--timeout", default=60.0, help="Seconds to wait for the guest agent.")
@json_option
def start(sandbox_id: str, timeout: float, as_json: bool) -> None:
    """Boot a created sandbox in the background; returns once its guest agent answers.

    The sandbox's server (`python -m virtcontainers.server`) owns the VM from then on and
    serves every other `vc` command on it; it ends with the VM. On a running sandbox whose
    server died (`vc ps`: server dead), a new server adopts the VM.
    """

    from virtcontainers.sandbox import Sandbox

    async def go() -> dict[str, object]:
        sandbox = await Sandbox.attach(sandbox_id)
        try:
            await sandbox.start(timeout, server=True)
            return sandbox.info().to_dict()
        finally:
            await sandbox.close()

    _emit(_run(go()), as_json, f"{sandbox_id} running")


@click.command()
@click.argument("source", help="LOCAL_PATH or ID:GUEST_PATH")
@click.argument("dest", help="ID:GUEST_PATH or LOCAL_PATH")
@click.option("--mode", default="644", help="Octal mode for a file copied in.")
def cp(source: str, dest: str, mode: str) -> None:
    """Copy a file into (`vc cp f ID:/f`) or out of (`vc cp ID:/f f`) a running sandbox.

    A guest path ending in `/`, or a local directory, receives the file under its own name
    (`vc cp app.py ID:/srv/`, `vc cp ID:/var/log/app.log .`)."""
    if ":" in dest and ":" not in source:
        sandbox_id, guest = dest.split(":", 1)
        try:
            bits = int(mode, 8)
        except ValueError:
            bits = -1
        if not 0 <= bits <= 0o7777:
            raise ConfigError(f"--mode {mode!r} is not an octal mode such as 644", field="--mode")
        if guest.endswith("/"):  # into that directory, as docker cp
            guest += Path(source).name
        data = _host_file(source, lambda path: path.read_bytes(), "read")
        _served(
            sandbox_id,
            lambda server: server.write_file(guest, data, bits),
            lambda s: s.write_file(guest, data, bits),
        )
    elif ":" in source and ":" not in dest:
        sandbox_id, guest = source.split(":", 1)
        got = _served(
            sandbox_id, lambda server: server.read_file(guest), lambda s: s.read_file(guest)
        )
        if Path(dest).is_dir():  # into that directory, as docker cp
            dest = str(Path(dest) / PurePosixPath(guest).name)
        _host_file(dest, lambda path: path.write_bytes(got), "write")
    else:
        raise ConfigError("exactly one of SOURCE and DEST must be ID:PATH", field="cp")


def _host_file(name: str, use: Callable[[Path], T], verb: str) -> T:
    """``use(Path(name))``; an OSError (no such file, a directory, no permission) becomes a
    ConfigError naming the host path."""
    try:
        return use(Path(name))
    except OSError as exc:
        raise ConfigError(f"cannot {verb} {name}: {exc.strerror or exc}", field="cp") from exc


@click.command()
@sandbox_id_argument
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
def logs(sandbox_id: str, follow: bool) -> None:
    """Print the guest console (kernel, init and agent messages)."""
    from virtcontainers.listing import sandbox_info
    from virtcontainers.persist.layout import CONSOLE_LOG

    path = Path(sandbox_info(sandbox_id).run_dir) / CONSOLE_LOG
    out = sys.stdout.buffer
    log = None
    try:
        while True:
            # Whether it still runs is asked before the read: what the VM wrote up to its
            # end is printed before a follower stops.
            live = follow and sandbox_info(sandbox_id).state.live
            if log is None:
                with contextlib.suppress(FileNotFoundError):
                    log = path.open("rb")
            if log is not None:
                while chunk := log.read(1 << 16):
                    out.write(chunk)
                out.flush()
            if not live:
                return
            time.sleep(0.2)
    finally:
        if log is not None:
            log.close()


@click.command()
@sandbox_id_argument
def pause(sandbox_id: str) -> None:
    """Freeze the sandbox's vCPUs."""
    _control(sandbox_id, "pause", lambda s: s.pause())


@click.command()
@sandbox_id_argument
def resume(sandbox_id: str) -> None:
    """Unfreeze a paused sandbox."""
    _control(sandbox_id, "resume", lambda s: s.resume())


@click.command()
@sandbox_id_argument
@click.option(
    "--disk", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
    help="Host file or block device to plug.",
)  # fmt: skip
@click.option("--read-only", is_flag=True, help="Plug it read-only.")
@json_option
def hotplug(sandbox_id: str, disk: Path, read_only: bool, as_json: bool) -> None:
    """Plug a disk into a running sandbox (it appears as /dev/vdX in the guest)."""
    import secrets

    from virtcontainers.devices import BlockDrive

    drive = BlockDrive(
        file=str(disk.resolve()), id=f"disk-{secrets.token_hex(3)}", read_only=read_only
    )

    async def go(s: Sandbox) -> None:
        plugged = await s.hotplug(drive)
        _emit({"id": drive.id, "pci_path": getattr(plugged, "pci_path", "")}, as_json, drive.id)

    _with_sandbox(sandbox_id, go)


@click.command()
@sandbox_id_argument
@click.option("--cpus", type=click.IntRange(min=1), help="vCPUs wanted.")
@click.option("--memory", type=click.IntRange(min=1), help="Memory wanted, MiB (grow only).")
@json_option
def resize(sandbox_id: str, cpus: int | None, memory: int | None, as_json: bool) -> None:
    """Change a running sandbox's vCPUs (up or down) or memory (up, in 128 MiB blocks)."""
    if cpus is None and memory is None:
        raise ConfigError("resize needs --cpus or --memory (or both)", field="resize")
    result: dict[str, object] = {}
    if cpus is not None:
        pair = _control(sandbox_id, "resize_vcpus", lambda s: s.resize_vcpus(cpus), vcpus=cpus)
        result["cpus"] = list(pair)  # (old, new): a list from the server, a tuple direct
    if memory is not None:
        result["memory_mb"] = _control(
            sandbox_id, "resize_memory", lambda s: s.resize_memory(memory), mem_mb=memory
        )
    _emit(result, as_json, ", ".join(f"{k}: {v}" for k, v in result.items()))


@click.command()
@sandbox_id_argument
@click.option("--force", is_flag=True, help="Stop the VMM at once instead of a guest power-off.")
def stop(sandbox_id: str, force: bool) -> None:
    """Stop a sandbox: the guest syncs and powers off (the console log stays complete).
    Its record and logs stay until `vc rm`."""
    _with_sandbox(sandbox_id, lambda s: s.stop(wait_only=not force))


@click.command()
@click.argument("sandbox_ids", nargs=-1, required=True, help="Sandbox ids.")
@click.option("--force", "-f", is_flag=True, help="Stop running ones first.")
def rm(sandbox_ids: tuple[str, ...], force: bool) -> None:
    """Remove sandboxes: record, logs and run dir. Running ones need --force."""
    for sandbox_id in sandbox_ids:

        async def go(s: Sandbox) -> None:
            if s.info().state.live and not force:
                raise ConfigError(f"sandbox {s.id} is running: stop it or use --force")
            await s.remove()

        _with_sandbox(sandbox_id, go)


def _control(
    sandbox_id: str, op: str, direct: Callable[[Sandbox], Awaitable[object]], **args: object
) -> Any:
    """Server op ``op`` (see :func:`_served`); returns the op's result: the server's JSON
    reply, or what ``direct`` returned."""
    return _served(sandbox_id, lambda server: server.call(op, **args), direct)


def _served(
    sandbox_id: str,
    through: Callable[[ServerConnection], T],
    direct: Callable[[Sandbox], Awaitable[T]],
) -> T:
    """``through`` the blocking client when the sandbox's server answers (no sandbox layer,
    drivers or asyncio are imported: most of such a command's cost), else ``direct`` on the
    attached sandbox (the recovery path after its server died, and the traced path).

    Raises:
        what the server or ``direct`` raise, with their public classes.
    """
    from virtcontainers.cli.execution import connect
    from virtcontainers.telemetry import export

    # Traced (`vc --trace`), the sandbox layer runs the command: its spans (sandbox.write_file,
    # sandbox.pause, ...) are wanted, and it is a client of the server all the same.
    connection = None if export.requested() else connect(sandbox_id, timeout=_CONTROL_TIMEOUT)
    if connection is None:
        got: list[T] = []

        async def run(s: Sandbox) -> None:
            got.append(await direct(s))

        _with_sandbox(sandbox_id, run)
        return got[0]
    with contextlib.closing(connection):
        return through(connection)


#: As the Sandbox API's calls to its server: a resize waits for the guest under TCG.
_CONTROL_TIMEOUT = 120.0


def _with_sandbox(sandbox_id: str, action: Callable[[Sandbox], Awaitable[None]]) -> None:
    from virtcontainers.sandbox import Sandbox

    async def go() -> None:
        sandbox = await Sandbox.attach(sandbox_id)
        try:
            await action(sandbox)
        finally:
            await sandbox.close()

    _run(go())
