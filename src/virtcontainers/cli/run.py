"""``vc run``: boot a sandbox, run one command in it, stream its output, stop."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

import typer

from virtcontainers.agent.client import Stream
from virtcontainers.cli.app import app
from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import ConfigError
from virtcontainers.guest.image import find_image
from virtcontainers.sandbox import Sandbox


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: list[str] = typer.Argument(..., help="The command to run in the guest (after --)."),
    hypervisor: str = typer.Option("qemu", "--hypervisor", help="Driver: qemu (others: soon)."),
    cpus: int = typer.Option(1, "--cpus", min=1, help="vCPUs at boot."),
    memory: int = typer.Option(512, "--memory", min=256, help="Guest memory in MiB."),
    kernel: Path | None = typer.Option(
        None, "--kernel", help="Guest kernel (default: built image)."
    ),
    initrd: Path | None = typer.Option(
        None, "--initrd", help="Guest initrd (default: built image)."
    ),
) -> None:
    """Boot a VM, run COMMAND inside it, print its output and exit with its exit code.

    Example: vc run -- uname -a     (build the guest image first: vc image build)
    """
    config = HypervisorConfig()
    if kernel is None or initrd is None:
        image = find_image("cloud")
        if image is None:
            raise ConfigError("no guest image yet: run `vc image build`, or pass --kernel/--initrd")
        kernel, initrd = kernel or image.kernel, initrd or image.initrd
    config.boot.kernel_path = str(kernel.resolve())
    config.boot.initrd_path = str(initrd.resolve())
    config.resources.num_vcpus = cpus
    config.resources.memory_size = memory
    code = asyncio.run(_run(config, hypervisor, command))
    raise typer.Exit(code)


async def _run(config: HypervisorConfig, hypervisor: str, argv: list[str]) -> int:
    async with Sandbox(f"run-{secrets.token_hex(4)}", config, hypervisor) as sandbox:
        proc = await sandbox.exec_stream(argv)
        feeder = asyncio.create_task(_feed_stdin(proc)) if not sys.stdin.isatty() else None
        if feeder is None:
            await proc.close_stdin()
        async for stream, data in proc:
            out = sys.stdout.buffer if stream is Stream.STDOUT else sys.stderr.buffer
            out.write(data)
            out.flush()
        status = await proc.wait()
        if feeder is not None:
            feeder.cancel()
        if status.signal is not None:
            return 128 + status.signal
        return status.exit_code if status.exit_code is not None else 1


async def _feed_stdin(proc: object) -> None:
    from virtcontainers.agent.client import ExecProcess

    assert isinstance(proc, ExecProcess)
    fd = sys.stdin.fileno()
    while chunk := await asyncio.to_thread(os.read, fd, 65536):
        await proc.write_stdin(chunk)
    await proc.close_stdin()
