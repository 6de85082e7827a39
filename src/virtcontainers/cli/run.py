"""``vc run``: boot a sandbox, run one command in it, stream its output, remove it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from virtcontainers.cli import options
from virtcontainers.cli.app import app

if TYPE_CHECKING:
    from virtcontainers.config import HypervisorConfig
    from virtcontainers.devices import ColdPlugDevice
    from virtcontainers.network import NetworkSpec


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run in the guest.")],
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
) -> None:
    """Boot a VM, run COMMAND in it, stream its output and exit with its exit code.

    Standard input is forwarded to the command when it is not a terminal, so
    `cat file | vc run -- sha256sum` works. The sandbox is removed afterwards.

    Examples:

      vc run -- uname -a

      vc run --cpus 2 --memory 1024 -- sh -c 'nproc; free -m'

      vc run --network user -p 8080:80 -- httpd -f -p 80
    """
    config = options.build_config(
        cpus=cpus,
        max_cpus=max_cpus,
        memory=memory,
        kernel=kernel,
        initrd=initrd,
        guest_disk=guest_disk,
        flavour=flavour,
    )
    devices = options.share_devices(share)
    spec = options.network_spec(network, publish, allow_egress, tap_range)
    raise typer.Exit(asyncio.run(_run(config, hypervisor, devices, command, spec)))


async def _run(
    config: HypervisorConfig,
    hypervisor: str,
    devices: list[ColdPlugDevice],
    argv: list[str],
    network: NetworkSpec,
) -> int:
    from virtcontainers.cli.streams import stream_exec
    from virtcontainers.sandbox import Sandbox

    sandbox = await Sandbox.create(config, hypervisor=hypervisor, devices=devices, network=network)
    try:
        # Ephemeral: the server removes the sandbox when this process ends, even by SIGKILL.
        await sandbox.start(server=True, ephemeral=True)
        return await stream_exec(sandbox, argv)
    finally:
        await sandbox.remove()
