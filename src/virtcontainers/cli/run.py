"""``vc run``: boot a sandbox, run one command in it, stream its output, remove it."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, NamedTuple

import click

from virtcontainers.cli import common, options
from virtcontainers.errors import ConfigError

if TYPE_CHECKING:
    from virtcontainers.config import HypervisorConfig
    from virtcontainers.devices import ColdPlugDevice
    from virtcontainers.images import StoredImage
    from virtcontainers.network import NetworkSpec
    from virtcontainers.volumes import Volume


@click.command(context_settings={"allow_interspersed_args": False})
@click.argument(
    "command",
    nargs=-1,
    help="The command to run in the guest (with --image: the image's default when omitted).",
)
@options.sandbox_options
@common.terminal_options
@common.process_options
@options.entrypoint_option
def run(
    command: tuple[str, ...],
    sandbox: options.SandboxOptions,
    tty: bool,
    interactive: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    entrypoint: str | None,
) -> None:
    """Boot a VM, run COMMAND in it, stream its output and exit with its exit code.

    Standard input is forwarded to the command when it is not a terminal, so
    `cat file | vc run -- sha256sum` works; `-it` gives an interactive terminal (raw mode,
    window size forwarded, Ctrl-C reaches the guest process). The sandbox is removed
    afterwards. A command that cannot be started exits 127 (not found) or 126, as with
    docker.

    Examples:

    \b
      vc run -- uname -a
      vc run -it -- sh
      vc run --cpus 2 --memory 1024 -- sh -c 'nproc; free -m'
      vc run --network user -p 8080:80 -- httpd -f -p 80
      vc run -v "$PWD":/src -w /src -- sh -c 'ls; echo built > out.txt'  # live, both ways
      vc run --image oci:./layout -e GREETING=hi -w /tmp -u 1000 -- python3 -c 'print(6*7)'
    """
    from virtcontainers.cli.streams import claim_stdin

    claim_stdin()
    argv = list(command)
    if sandbox.image is None and not argv:
        raise ConfigError("give a command to run (or --image IMAGE to run its default)")
    if sandbox.image is None and (entrypoint is not None or sandbox.disk_size):
        raise ConfigError("--entrypoint and --disk-size need --image", field="--image")
    config = sandbox.config()
    devices = sandbox.devices()
    volumes = sandbox.volumes()
    spec = sandbox.network_spec()
    process = _Process(
        argv=argv,
        tty=tty,
        interactive=interactive,
        env=common.env_items(env),
        workdir=workdir,
        user=user,
        entrypoint=options.entrypoint_argv(entrypoint),
    )
    stored = sandbox.pull_image()
    size = sandbox.disk_size_mb()
    hypervisor = sandbox.hypervisor
    sys.exit(asyncio.run(_run(config, hypervisor, devices, process, stored, size, spec, volumes)))


class _Process(NamedTuple):
    """What the user asked to run, before the image's config fills the gaps."""

    argv: list[str]
    tty: bool
    interactive: bool
    env: dict[str, str] | None
    workdir: str | None
    user: str | None
    entrypoint: list[str] | None


async def _run(
    config: HypervisorConfig,
    hypervisor: str,
    devices: list[ColdPlugDevice],
    process: _Process,
    image: StoredImage | None,
    disk_size_mb: int,
    network: NetworkSpec,
    volumes: list[Volume],
) -> int:
    from virtcontainers.cli.streams import stream_exec, terminal_size
    from virtcontainers.sandbox import Sandbox

    sandbox = await Sandbox.create(
        config, hypervisor=hypervisor, devices=devices, network=network, image=image,
        disk_size_mb=disk_size_mb, volumes=volumes,
    )  # fmt: skip
    try:
        # Ephemeral: the server removes the sandbox when this process ends, even by SIGKILL.
        await sandbox.start(server=True, ephemeral=True)
        tty, size = process.tty, terminal_size() if process.tty else None
        if sandbox.image is None:
            starting = sandbox.exec_stream(
                process.argv, tty=tty, tty_size=size, env=common.plain_env(process.env),
                cwd=process.workdir, user=process.user,
            )  # fmt: skip
        else:
            spec = sandbox.image.process(
                process.argv,
                env=process.env,
                workdir=process.workdir,
                user=process.user,
                entrypoint=process.entrypoint,
            )
            starting = sandbox.exec_stream(
                spec.argv, tty=tty, tty_size=size, env=spec.env, cwd=spec.cwd, uid=spec.uid,
                gid=spec.gid,
            )  # fmt: skip
        return await stream_exec(starting, tty=tty, interactive=process.interactive)
    finally:
        await sandbox.remove()
