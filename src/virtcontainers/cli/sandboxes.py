"""Sandbox commands: create, start, exec, cp, ps, logs, pause, resume, hotplug, resize, stop, rm.

Each is a thin call into :class:`virtcontainers.sandbox.Sandbox`; sandboxes live in the state
store, so any of them works from a new shell on a sandbox another process started.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from virtcontainers.cli import options
from virtcontainers.cli.app import app
from virtcontainers.cli.streams import stream_exec
from virtcontainers.devices import BlockDrive
from virtcontainers.errors import ConfigError, HypervisorTimeout, LaunchError
from virtcontainers.persist.store import StateStore
from virtcontainers.sandbox import Sandbox

SandboxId = Annotated[str, typer.Argument(help="The sandbox id (see `vc ps`).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
out = Console()


def _emit(data: object, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        out.print(human, highlight=False)


@app.command()
def create(
    hypervisor: options.Hypervisor = "qemu",
    cpus: options.Cpus = 1,
    max_cpus: options.MaxCpus = 4,
    memory: options.Memory = 512,
    kernel: options.Kernel = None,
    initrd: options.Initrd = None,
    image: options.Image = None,
    flavour: options.Flavour = "cloud",
    share: options.Shares = None,
    name: Annotated[str | None, typer.Option("--id", help="Sandbox id (default: random).")] = None,
    as_json: Json = False,
) -> None:
    """Record a new sandbox (nothing boots until `vc start ID`). Prints its id."""
    config = options.build_config(
        cpus=cpus, max_cpus=max_cpus, memory=memory, kernel=kernel, initrd=initrd,
        image=image, flavour=flavour,
    )  # fmt: skip
    sandbox = asyncio.run(
        Sandbox.create(config, id=name, hypervisor=hypervisor, devices=options.share_devices(share))
    )
    _emit(sandbox.info().to_dict(), as_json, sandbox.id)


@app.command()
def start(
    sandbox_id: SandboxId,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest agent.")] = 60,
    as_json: Json = False,
) -> None:
    """Boot a created sandbox in the background; returns once its guest agent answers.

    A small shim process (`python -m virtcontainers.shim`) keeps logging the console until
    the VM ends; `vc logs ID` shows it.
    """
    store = StateStore()
    run_dir = store.sandbox_dir(sandbox_id)
    log_path = run_dir / "shim.log"
    with open(log_path, "ab") as log:
        os.chmod(log_path, 0o600)
        shim = subprocess.Popen(
            [sys.executable, "-m", "virtcontainers.shim", sandbox_id, "--root", str(store.root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout + 10
    while True:
        info = store.load(sandbox_id)
        if info.state == "running" and shim.poll() is None and _agent_ready(run_dir):
            break
        if info.state == "failed" or shim.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise LaunchError(
                f"sandbox {sandbox_id} failed to start (shim exit code {shim.poll()})",
                exit_code=shim.poll(),
                argv=[],
                log_tail="\n".join(tail),
            )
        if time.monotonic() > deadline:
            raise HypervisorTimeout(f"starting sandbox {sandbox_id}", timeout)
        time.sleep(0.05)
    sandbox = asyncio.run(Sandbox.attach(sandbox_id, store=store))
    _emit(sandbox.info().to_dict(), as_json, f"{sandbox_id} running")


def _agent_ready(run_dir: Path) -> bool:
    # The shim releases the agent channel only after the agent answered a ping.
    return (run_dir / "shim.ready").exists()


@app.command(name="exec", context_settings={"allow_interspersed_args": False})
def exec_(
    sandbox_id: SandboxId,
    command: Annotated[list[str], typer.Argument(help="The command to run in the guest.")],
    tty: Annotated[bool, typer.Option("--tty", "-t", help="Allocate a terminal.")] = False,
) -> None:
    """Run COMMAND in a running sandbox; exits with its exit code.

    Example: vc exec 3f2a9c -- ls -l /
    """

    argv = command[1:] if command[:1] == ["--"] else command

    async def go() -> int:
        sandbox = await Sandbox.attach(sandbox_id)
        try:
            return await stream_exec(sandbox, argv, tty=tty)
        finally:
            await sandbox.close()

    raise typer.Exit(asyncio.run(go()))


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
    infos = Sandbox.list()
    if as_json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    table = Table("ID", "STATE", "HYPERVISOR", "PID", "CREATED")
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at))
        table.add_row(i.id, i.state, i.hypervisor, str(i.pid or "-"), created)
    out.print(table)


@app.command()
def logs(
    sandbox_id: SandboxId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
) -> None:
    """Print the guest console (kernel, init and agent messages)."""
    sandbox = asyncio.run(Sandbox.attach(sandbox_id))
    path = sandbox.run_dir / "console.log"
    offset = 0
    while True:
        data = path.read_bytes()[offset:] if path.exists() else b""
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        offset += len(data)
        if not follow or sandbox.info().state not in ("running", "paused"):
            return
        sandbox = asyncio.run(Sandbox.attach(sandbox_id))
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
    async def go() -> None:
        sandbox = await Sandbox.attach(sandbox_id)
        try:
            await action(sandbox)
        finally:
            await sandbox.close()

    asyncio.run(go())
