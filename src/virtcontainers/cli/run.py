"""``vc run``: boot a sandbox, run one command in it, stream its output, remove it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from virtcontainers.cli import options
from virtcontainers.cli.app import app
from virtcontainers.errors import ConfigError

if TYPE_CHECKING:
    from virtcontainers.config import HypervisorConfig
    from virtcontainers.devices import ColdPlugDevice
    from virtcontainers.images import StoredImage
    from virtcontainers.network import NetworkSpec


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="The command to run in the guest (with --image: the image's default when omitted)."
        ),
    ] = None,
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
    image: options.OciImage = None,
    env: options.Env = None,
    workdir: options.Workdir = None,
    user: options.User = None,
    entrypoint: options.Entrypoint = None,
    disk_size: options.DiskSize = None,
    tls_verify: options.TlsVerify = "true",
) -> None:
    """Boot a VM, run COMMAND in it, stream its output and exit with its exit code.

    Standard input is forwarded to the command when it is not a terminal, so
    `cat file | vc run -- sha256sum` works. The sandbox is removed afterwards. A command
    that cannot be started exits 127 (not found) or 126, as with docker.

    Examples:

      vc run -- uname -a

      vc run --cpus 2 --memory 1024 -- sh -c 'nproc; free -m'

      vc run --network user -p 8080:80 -- httpd -f -p 80
      vc run --image oci:./layout -e GREETING=hi -w /tmp -u 1000 -- python3 -c 'print(6*7)'
    """
    argv = list(command or [])
    if image is None and not argv:
        raise ConfigError("give a command to run (or --image IMAGE to run its default)")
    if image is None and (entrypoint is not None or disk_size):
        raise ConfigError("--entrypoint and --disk-size need --image", field="--image")
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
    process = _Process(
        argv=argv,
        env=options.env_items(env),
        workdir=workdir,
        user=user,
        entrypoint=options.entrypoint_argv(entrypoint),
    )
    stored = None
    if image is not None:
        from virtcontainers.cli.image import progress_bar
        from virtcontainers.images import ImageStore, ensure_image

        with progress_bar(image) as progress:
            stored = ensure_image(
                image,
                store=ImageStore(),
                tls_verify=options.parse_bool(tls_verify, "--tls-verify"),
                progress=progress,
            )
    size = options.disk_size_mb(disk_size)
    raise typer.Exit(asyncio.run(_run(config, hypervisor, devices, process, stored, size, spec)))


class _Process:
    """What the user asked to run, before the image's config fills the gaps."""

    def __init__(
        self,
        *,
        argv: list[str],
        env: dict[str, str] | None,
        workdir: str | None,
        user: str | None,
        entrypoint: list[str] | None,
    ) -> None:
        self.argv = argv
        self.env = env
        self.workdir = workdir
        self.user = user
        self.entrypoint = entrypoint


async def _run(
    config: HypervisorConfig,
    hypervisor: str,
    devices: list[ColdPlugDevice],
    process: _Process,
    image: StoredImage | None,
    disk_size_mb: int,
    network: NetworkSpec,
) -> int:
    from virtcontainers.cli.streams import stream_exec
    from virtcontainers.sandbox import Sandbox

    sandbox = await Sandbox.create(
        config, hypervisor=hypervisor, devices=devices, network=network, image=image,
        disk_size_mb=disk_size_mb,
    )  # fmt: skip
    try:
        # Ephemeral: the server removes the sandbox when this process ends, even by SIGKILL.
        await sandbox.start(server=True, ephemeral=True)
        if sandbox.image is None:
            return await stream_exec(
                sandbox,
                process.argv,
                env=options.plain_env(process.env),
                cwd=process.workdir,
                user=process.user,
            )
        spec = sandbox.image.process(
            process.argv,
            env=process.env,
            workdir=process.workdir,
            user=process.user,
            entrypoint=process.entrypoint,
        )
        return await stream_exec(
            sandbox, list(spec.argv), env=spec.env, cwd=spec.cwd, uid=spec.uid, gid=spec.gid
        )
    finally:
        await sandbox.remove()
