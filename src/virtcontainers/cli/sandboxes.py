"""Sandbox commands: create, start, exec, cp, ps, logs, pause, resume, hotplug, resize, stop,
rm, and for processes in a sandbox: top, attach, kill.

Each is a thin call into :class:`virtcontainers.sandbox.Sandbox`; sandboxes live in the state
store, so any of them works from a new shell on a sandbox another process started. A running
sandbox's commands go to its server; when the server is gone, the record is used directly.

Imports are made inside the commands: `vc ps` and `vc exec` must not pay for the drivers,
configs or rich (see bench/cli.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from virtcontainers.cli import options
from virtcontainers.cli.app import app
from virtcontainers.errors import ConfigError

if TYPE_CHECKING:
    from virtcontainers.sandbox import Sandbox
    from virtcontainers.server.client import ServerClient

T = TypeVar("T")
SandboxId = Annotated[str, typer.Argument(help="The sandbox id (see `vc ps`).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _emit(data: object, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        Console().print(human, highlight=False)


def _run(coro: Coroutine[object, object, T]) -> T:
    import asyncio

    return asyncio.run(coro)


@app.command()
def create(
    hypervisor: options.Hypervisor = "qemu",
    cpus: options.Cpus = 1,
    max_cpus: options.MaxCpus = 4,
    memory: options.Memory = 512,
    kernel: options.Kernel = None,
    initrd: options.Initrd = None,
    guest_disk: options.GuestDisk = None,
    flavour: options.Flavour = "cloud",
    share: options.Shares = None,
    network: options.Network = "none",
    publish: options.Publish = None,
    allow_egress: options.AllowEgress = None,
    tap_range: options.TapRange = options.DEFAULT_TAP_RANGE,
    name: Annotated[str | None, typer.Option("--id", help="Sandbox id (default: random).")] = None,
    image: options.OciImage = None,
    disk_size: options.DiskSize = None,
    tls_verify: options.TlsVerify = "true",
    as_json: Json = False,
) -> None:
    """Record a new sandbox (nothing boots until `vc start ID`). Prints its id.

    With --image every `vc exec` runs in that image's root file system, with its Env,
    WorkingDir and User unless -e/-w/-u say otherwise.
    """
    config = options.build_config(
        cpus=cpus, max_cpus=max_cpus, memory=memory, kernel=kernel, initrd=initrd,
        guest_disk=guest_disk, flavour=flavour,
    )  # fmt: skip
    if image is None and disk_size:
        raise ConfigError("--disk-size needs --image", field="--disk-size")
    from virtcontainers.sandbox import Sandbox

    spec = options.network_spec(network, publish, allow_egress, tap_range)
    stored = None
    if image is not None:
        from virtcontainers.cli.image import progress_bar
        from virtcontainers.images import ensure_image

        with progress_bar(image) as progress:
            stored = ensure_image(
                image, tls_verify=options.parse_bool(tls_verify, "--tls-verify"),
                progress=progress,
            )  # fmt: skip
    sandbox = _run(
        Sandbox.create(
            config,
            id=name,
            hypervisor=hypervisor,
            devices=options.share_devices(share),
            network=spec,
            image=stored,
            disk_size_mb=options.disk_size_mb(disk_size),
        )
    )
    _emit(sandbox.info().to_dict(), as_json, sandbox.id)


@app.command()
def start(
    sandbox_id: SandboxId,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest agent.")] = 60,
    as_json: Json = False,
) -> None:
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


@app.command(name="exec", context_settings={"allow_interspersed_args": False})
def exec_(
    sandbox_id: SandboxId,
    command: Annotated[list[str], typer.Argument(help="The command to run in the guest.")],
    tty: Annotated[bool, typer.Option("--tty", "-t", help="Allocate a terminal.")] = False,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Forward stdin even from a terminal.")
    ] = False,
    detach: Annotated[
        bool,
        typer.Option("--detach", "-d", help="Start it in the background; print its pid."),
    ] = False,
    env: options.Env = None,
    workdir: options.Workdir = None,
    user: options.User = None,
) -> None:
    """Run COMMAND in a running sandbox; exits with its exit code (127: not found).

    In an image sandbox the image's Env, WorkingDir and User apply; -e/-w/-u override them.

    `-it` gives an interactive terminal (raw mode, window size forwarded, Ctrl-C reaches the
    guest process). `-d` returns at once with the guest pid: see `vc top`, `vc attach`,
    `vc kill`.

    Examples: vc exec 3f2a9c -- ls -l /     vc exec -it 3f2a9c sh
    """

    argv = command[1:] if command[:1] == ["--"] else command
    how = _exec_process(sandbox_id, options.env_items(env), workdir, user)

    async def go() -> int:
        from virtcontainers.agent.client import AgentRequestError
        from virtcontainers.cli.streams import exec_failed, follow, terminal_size

        client = await _server_client(sandbox_id)
        if client is None:  # no server (it died): reattach directly
            return await _direct_exec(sandbox_id, argv, tty=tty, interactive=interactive,
                                      detach=detach, how=how)  # fmt: skip
        try:
            size = terminal_size() if tty else None
            try:
                proc = await client.exec_stream(
                    argv, how.env, how.cwd, how.uid, how.gid, tty=tty, tty_size=size,
                    keep=detach, no_stdin=detach and not interactive,
                )  # fmt: skip
            except AgentRequestError as exc:
                return exec_failed(exc)
            if detach:
                print(proc.pid)
                return 0
            return await follow(proc, tty=tty, interactive=interactive)
        finally:
            await client.close()

    raise typer.Exit(_run(go()))


class _ExecHow:
    """The environment, working directory and ids an exec gets (image defaults applied)."""

    def __init__(
        self, env: dict[str, str] | None, cwd: str | None, uid: int | None, gid: int | None
    ) -> None:
        self.env, self.cwd, self.uid, self.gid = env, cwd, uid, gid


def _exec_process(
    sandbox_id: str, env: dict[str, str] | None, workdir: str | None, user: str | None
) -> _ExecHow:
    """``-e/-w/-u`` over the sandbox's image config (read from its record, so the server
    path needs no sandbox layer); without an image ``-e`` adds to the guest's PATH."""
    from virtcontainers.persist.store import StateStore

    doc = StateStore().load(sandbox_id)
    if doc.extra.get("image"):
        from virtcontainers.images.sandbox_image import SandboxImage

        image = SandboxImage.from_json(doc.extra["image"])
        full, cwd, uid, gid = image.exec_defaults(env, workdir, None, None, user)
        return _ExecHow(full, cwd, uid, gid)
    ids: tuple[int | None, int | None] = (None, None)
    if user is not None:
        from virtcontainers.images.sandbox_image import SandboxImage

        ids = SandboxImage.numeric_user(user)
    return _ExecHow(options.plain_env(env), workdir, *ids)


async def _direct_exec(
    sandbox_id: str, argv: list[str], *, tty: bool, interactive: bool, detach: bool, how: _ExecHow
) -> int:
    from virtcontainers.cli.streams import stream_exec
    from virtcontainers.sandbox import Sandbox

    sandbox = await Sandbox.attach(sandbox_id)
    try:
        if detach:
            await sandbox.exec_stream(argv, detach=True)  # raises: needs a server
        return await stream_exec(
            sandbox, argv, tty=tty, interactive=interactive, env=how.env, cwd=how.cwd,
            uid=how.uid, gid=how.gid,
        )  # fmt: skip
    finally:
        await sandbox.close()


async def _server_client(sandbox_id: str) -> ServerClient | None:
    """A connection to the sandbox's server, found without loading the sandbox layer."""
    from virtcontainers.errors import AgentError
    from virtcontainers.persist.store import StateStore
    from virtcontainers.server.client import ServerClient, socket_path

    run_dir = StateStore().sandbox_dir(sandbox_id)
    if not socket_path(run_dir).exists():
        return None
    try:
        return await ServerClient.connect(run_dir)
    except AgentError:
        return None


async def _require_server(sandbox_id: str) -> ServerClient:
    client = await _server_client(sandbox_id)
    if client is None:
        from virtcontainers.sandbox import Sandbox

        sandbox = await Sandbox.attach(sandbox_id)  # StoreError for an unknown id
        return await sandbox.server_client()  # StateError: no server
    return client


@app.command()
def top(sandbox_id: SandboxId, as_json: Json = False) -> None:
    """List the processes started in the sandbox through its agent (`vc exec`, `vc run`)."""

    async def go() -> object:
        client = await _require_server(sandbox_id)
        try:
            return await client.call("processes")
        finally:
            await client.close()

    procs = _run(go())
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


@app.command()
def attach(
    sandbox_id: SandboxId,
    pid: Annotated[int, typer.Argument(help="The guest pid (see `vc top`).")],
) -> None:
    """Reconnect to a process started with `vc exec -d`: its output so far (the latest
    256 KiB), then live; stdin is forwarded. Exits with its exit code."""

    async def go() -> int:
        from virtcontainers.cli.streams import follow

        client = await _require_server(sandbox_id)
        try:
            procs = await client.call("processes")
            tty = isinstance(procs, list) and any(p["pid"] == pid and p["tty"] for p in procs)
            proc = await client.attach(pid)
            return await follow(proc, tty=tty, interactive=True)
        finally:
            await client.close()

    raise typer.Exit(_run(go()))


@app.command()
def kill(
    sandbox_id: SandboxId,
    pid: Annotated[int, typer.Argument(help="The guest pid (see `vc top`).")],
    sig: Annotated[str, typer.Argument(metavar="SIGNAL", help="Name or number.")] = "TERM",
) -> None:
    """Send SIGNAL (default TERM) to a guest process started through the agent."""
    import signal

    name = sig.upper().removeprefix("SIG")
    try:
        number = int(name) if name.isdigit() else int(signal.Signals[f"SIG{name}"])
    except KeyError:
        raise ConfigError(f"unknown signal {sig!r}", field="SIGNAL") from None

    async def go() -> object:
        client = await _require_server(sandbox_id)
        try:
            return await client.call("kill", pid=pid, signal=number)
        finally:
            await client.close()

    _run(go())


@app.command()
def cp(
    source: Annotated[str, typer.Argument(help="LOCAL_PATH or ID:GUEST_PATH")],
    dest: Annotated[str, typer.Argument(help="ID:GUEST_PATH or LOCAL_PATH")],
    mode: Annotated[str, typer.Option(help="Octal mode for a file copied in.")] = "644",
) -> None:
    """Copy a file into (`vc cp f ID:/f`) or out of (`vc cp ID:/f f`) a running sandbox."""
    if ":" in dest and ":" not in source:
        sandbox_id, guest = dest.split(":", 1)
        data = Path(source).read_bytes()
        _with_sandbox(sandbox_id, lambda s: s.write_file(guest, data, int(mode, 8)))
    elif ":" in source and ":" not in dest:
        sandbox_id, guest = source.split(":", 1)
        got: list[bytes] = []

        async def fetch(s: Sandbox) -> None:
            got.append(await s.read_file(guest))

        _with_sandbox(sandbox_id, fetch)
        Path(dest).write_bytes(got[0])
    else:
        raise ConfigError("exactly one of SOURCE and DEST must be ID:PATH", field="cp")


@app.command()
def ps(as_json: Json = False) -> None:
    """List sandboxes and their state (checked against the live VMM process)."""
    from virtcontainers.listing import list_sandboxes

    infos = list_sandboxes()
    if as_json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("ID", "STATE", "HYPERVISOR", "PID", "CREATED")
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at))
        state = f"{i.state} (server dead)" if i.server == "dead" else i.state
        table.add_row(i.id, state, i.hypervisor, str(i.pid or "-"), created)
    Console().print(table)


@app.command()
def logs(
    sandbox_id: SandboxId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
) -> None:
    """Print the guest console (kernel, init and agent messages)."""
    from virtcontainers.sandbox import Sandbox

    sandbox = _run(Sandbox.attach(sandbox_id))
    path = sandbox.run_dir / "console.log"
    offset = 0
    while True:
        data = path.read_bytes()[offset:] if path.exists() else b""
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        offset += len(data)
        if not follow or sandbox.info().state not in ("running", "paused"):
            return
        sandbox = _run(Sandbox.attach(sandbox_id))
        time.sleep(0.2)


@app.command()
def pause(sandbox_id: SandboxId) -> None:
    """Freeze the sandbox's vCPUs."""
    _with_sandbox(sandbox_id, lambda s: s.pause())


@app.command()
def resume(sandbox_id: SandboxId) -> None:
    """Unfreeze a paused sandbox."""
    _with_sandbox(sandbox_id, lambda s: s.resume())


@app.command()
def hotplug(
    sandbox_id: SandboxId,
    disk: Annotated[Path, typer.Option("--disk", help="Host file or block device to plug.")],
    read_only: Annotated[bool, typer.Option("--read-only", help="Plug it read-only.")] = False,
    as_json: Json = False,
) -> None:
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


@app.command()
def resize(
    sandbox_id: SandboxId,
    cpus: Annotated[int | None, typer.Option("--cpus", help="vCPUs wanted.")] = None,
    memory: Annotated[
        int | None, typer.Option("--memory", help="Memory wanted, MiB (grow only).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Change a running sandbox's vCPUs (up or down) or memory (up, in 128 MiB blocks)."""
    if cpus is None and memory is None:
        raise ConfigError("resize needs --cpus or --memory (or both)", field="resize")

    async def go(s: Sandbox) -> None:
        result: dict[str, object] = {}
        if cpus is not None:
            result["cpus"] = list(await s.resize_vcpus(cpus))
        if memory is not None:
            result["memory_mb"] = await s.resize_memory(memory)
        _emit(result, as_json, ", ".join(f"{k}: {v}" for k, v in result.items()))

    _with_sandbox(sandbox_id, go)


@app.command()
def stop(
    sandbox_id: SandboxId,
    force: Annotated[
        bool, typer.Option("--force", help="Stop the VMM at once instead of a guest power-off.")
    ] = False,
) -> None:
    """Stop a sandbox: the guest syncs and powers off (the console log stays complete).
    Its record and logs stay until `vc rm`."""
    _with_sandbox(sandbox_id, lambda s: s.stop(wait_only=not force))


@app.command()
def rm(
    sandbox_ids: Annotated[list[str], typer.Argument(help="Sandbox ids.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Stop running ones first.")] = False,
) -> None:
    """Remove sandboxes: record, logs and run dir. Running ones need --force."""
    for sandbox_id in sandbox_ids:

        async def go(s: Sandbox) -> None:
            if s.info().state in ("running", "paused") and not force:
                raise ConfigError(f"sandbox {s.id} is running: stop it or use --force")
            await s.remove()

        _with_sandbox(sandbox_id, go)


def _with_sandbox(sandbox_id: str, action: Callable[[Sandbox], Awaitable[None]]) -> None:
    from virtcontainers.sandbox import Sandbox

    async def go() -> None:
        sandbox = await Sandbox.attach(sandbox_id)
        try:
            await action(sandbox)
        finally:
            await sandbox.close()

    _run(go())
