"""The options of ``vc run`` and ``vc create`` (the sandbox to make) and the config they
build. (``env_items`` is :mod:`.common`'s, also importable from here.)"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from virtcontainers.cli.common import compose
from virtcontainers.cli.common import env_items as env_items
from virtcontainers.errors import ConfigError

if TYPE_CHECKING:  # imported where used: these pull in the sandbox layer
    from virtcontainers.config import HypervisorConfig
    from virtcontainers.devices import ColdPlugDevice
    from virtcontainers.images import StoredImage
    from virtcontainers.network import NetworkSpec
    from virtcontainers.volumes import Volume

_PATH = click.Path(path_type=Path)

#: ``virtcontainers.network.DEFAULT_TAP_RANGE`` (a literal here: this module stays light;
#: a unit test pins the two equal).
DEFAULT_TAP_RANGE = "10.213.0.0/16"

tls_verify_option = click.option(
    "--tls-verify", default="true", help="false: pull over plain HTTP / unverified TLS."
)
_machine_options = compose(
    click.option(
        "--hypervisor", default="qemu", help="Driver: qemu, firecracker, clh, acrn or mock."
    ),
    click.option("--cpus", type=click.IntRange(min=1), default=1, help="vCPUs at boot."),
    click.option(
        "--max-cpus", type=click.IntRange(min=1), default=4, help="vCPUs the VM may grow to."
    ),
    click.option(
        "--memory", type=click.IntRange(min=256), default=512, help="Guest memory at boot, MiB."
    ),
    click.option("--kernel", type=_PATH, help="Guest kernel (default: the built image's)."),
    click.option("--initrd", type=_PATH, help="Guest initrd (default: the built image's)."),
    click.option(
        "--guest-disk",
        type=_PATH,
        help="A raw guest root disk to boot instead of the initrd (the guest OS itself; "
        "for container software use --image).",
    ),
    click.option(
        "--flavour",
        help="Built image to use: cloud (fast; the default) or generic (has 9p; the default "
        "with --volume or --share).",
    ),
    click.option(
        "--volume",
        "-v",
        multiple=True,
        help="Mount a host directory live in the guest: HOST_DIR:GUEST_PATH[:ro|rw], as "
        "docker -v (virtio-9p, qemu driver; in the image's root with --image). Repeatable.",
    ),
    click.option(
        "--share",
        multiple=True,
        help="Share a host directory as HOST_DIR[:TAG] over virtio-9p, unmounted; in the "
        "guest: mount -t 9p -o trans=virtio TAG /mnt (--volume mounts it for you).",
    ),
    click.option(
        "--network",
        default="none",
        help="none (default: only lo), user (NAT inside QEMU, no root) or tap (a netns with "
        "a tap and a veth pair, needs root; every driver). The guest reaches the host as "
        "host.vc.internal.",
    ),
    click.option(
        "--publish",
        "-p",
        multiple=True,
        help="Publish a guest port: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp] (HOST_IP "
        "defaults to 127.0.0.1). Repeatable.",
    ),
    click.option(
        "--allow-egress",
        multiple=True,
        help="Deny all egress except to CIDR[:PORT[-PORT]] (repeatable; tap mode; allow DNS "
        "explicitly, e.g. RESOLVER/32:53). Enforced on the host side.",
    ),
    click.option(
        "--tap-range",
        default=DEFAULT_TAP_RANGE,
        help="Private IPv4 range tap-mode addresses come from.",
    ),
    click.option(
        "--image",
        help="An OCI image to run in (pulled when not in the store): NAME[:TAG], "
        "HOST[:PORT]/PATH[:TAG][@sha256:HEX], oci:DIR[:TAG], docker-archive:FILE, dir:PATH, "
        "tar:FILE. Without a command the image's Entrypoint + Cmd run.",
    ),
    click.option(
        "--disk-size",
        help="A scratch disk of this size (512M, 2G) for the image's writable layer instead "
        "of guest RAM (tmpfs).",
    ),
    click.option(
        "--pull",
        type=click.Choice(["missing", "always", "never"]),
        default="missing",
        show_default=True,
        help="When to fetch --image: missing (only when the store lacks it), always (fetch "
        "again; an unchanged image keeps its disk) or never (the store's, else an error).",
    ),
    tls_verify_option,
)


@dataclass(frozen=True)
class SandboxOptions:
    """What ``vc run`` and ``vc create`` are told about the sandbox to make."""

    hypervisor: str
    cpus: int
    max_cpus: int
    memory: int
    kernel: Path | None
    initrd: Path | None
    guest_disk: Path | None
    flavour: str | None
    volume: tuple[str, ...]
    share: tuple[str, ...]
    network: str
    publish: tuple[str, ...]
    allow_egress: tuple[str, ...]
    tap_range: str
    image: str | None
    disk_size: str | None
    pull: str
    tls_verify: str

    def config(self) -> HypervisorConfig:
        """See :func:`build_config`."""
        return build_config(
            cpus=self.cpus, max_cpus=self.max_cpus, memory=self.memory, kernel=self.kernel,
            initrd=self.initrd, guest_disk=self.guest_disk, flavour=self.guest_flavour(),
        )  # fmt: skip

    def guest_flavour(self) -> str:
        """``--flavour``, else generic when a volume or share needs 9p, else cloud."""
        if self.flavour is not None:
            return self.flavour
        return "generic" if self.volume or self.share else "cloud"

    def volumes(self) -> list[Volume]:
        """The ``--volume`` items. Raises ConfigError for a malformed one (see
        :meth:`Volume.parse`)."""
        from virtcontainers.volumes import Volume

        return [Volume.parse(text) for text in self.volume]

    def devices(self) -> list[ColdPlugDevice]:
        """See :func:`share_devices`."""
        return share_devices(self.share)

    def network_spec(self) -> NetworkSpec:
        """See :func:`network_spec`."""
        return network_spec(self.network, self.publish, self.allow_egress, self.tap_range)

    def disk_size_mb(self) -> int:
        """See :func:`disk_size_mb`."""
        return disk_size_mb(self.disk_size)

    def pull_image(self) -> StoredImage | None:
        """The ``--image``, from the store or pulled (with a progress bar) as ``--pull`` says.

        Raises:
            ConfigError: a bad ``--tls-verify``; ImageError subclasses from the pull
                (ImageNotFoundError for ``--pull never`` and an image not in the store).
        """
        if self.image is None:
            return None
        from virtcontainers.cli.terminal import progress_bar
        from virtcontainers.images import PullPolicy, pull

        verify = parse_bool(self.tls_verify, "--tls-verify")
        with progress_bar(self.image) as progress:
            return pull(
                self.image, policy=PullPolicy(self.pull), tls_verify=verify, progress=progress
            )


_SANDBOX_FIELDS = tuple(field.name for field in fields(SandboxOptions))


def sandbox_options(function: Callable[..., None]) -> Callable[..., None]:
    """The ``--hypervisor ... --tls-verify`` options, passed to ``function`` as one
    :class:`SandboxOptions` argument named ``sandbox``."""

    @functools.wraps(function)
    def with_sandbox_options(**kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in _SANDBOX_FIELDS}
        function(sandbox=SandboxOptions(**given), **kwargs)

    return _machine_options(with_sandbox_options)


def network_spec(
    network: str, publish: Sequence[str], allow_egress: Sequence[str], tap_range: str
) -> NetworkSpec:
    """The network options as a spec. Raises ConfigError for malformed values."""
    from virtcontainers.network import NetworkSpec

    return NetworkSpec.build(network, list(publish), list(allow_egress), tap_range)


def build_config(
    *,
    cpus: int,
    max_cpus: int,
    memory: int,
    kernel: Path | None,
    initrd: Path | None,
    guest_disk: Path | None,
    flavour: str,
) -> HypervisorConfig:
    """A config from the command line; the built guest image fills what is not given.

    Raises:
        ConfigError: no image built and no --kernel given, contradictory options, or more
            vCPUs than allowed (see :func:`vcpus`).
    """
    from virtcontainers.config import HypervisorConfig
    from virtcontainers.guest.image import find_image

    config = HypervisorConfig()
    if kernel is None or (initrd is None and guest_disk is None):
        built = find_image(flavour)
        if built is None:
            raise ConfigError(
                f"no {flavour} guest image yet: run `vc guest build --flavour {flavour}`, "
                "or pass --kernel and --initrd/--guest-disk"
            )
        kernel = kernel or built.kernel
        if guest_disk is None:
            initrd = initrd or built.initrd
    config.boot.kernel_path = str(kernel.resolve())
    if initrd is not None:
        config.boot.initrd_path = str(initrd.resolve())
    if guest_disk is not None:
        config.boot.image_path = str(guest_disk.resolve())
    config.resources.num_vcpus, config.resources.default_max_vcpus = vcpus(cpus, max_cpus)
    config.resources.memory_size = memory
    config.storage.block_device_driver = "virtio-blk"
    return config


def vcpus(cpus: int, max_cpus: int) -> tuple[int, int]:
    """``(vCPUs at boot, maximum)`` for ``--cpus`` / ``--max-cpus``.

    The maximum follows katautils' defaultMaxVCPUs: never above the host's CPUs (nor QEMU's
    limit), so ``--max-cpus 4`` on a 2-CPU host means 2. Where Kata would silently clamp the
    boot vCPUs to that, an explicit ``--cpus`` the VM cannot have is refused.

    Raises:
        ConfigError: ``--cpus`` exceeds the maximum; the message names the limit and why.
    """
    from virtcontainers.config.defaults import default_max_vcpus

    limit = default_max_vcpus(max_cpus)
    if cpus > limit:
        host = os.cpu_count() or 1
        why = f"--max-cpus {max_cpus}" if max_cpus <= limit else f"this host has {host} CPUs"
        raise ConfigError(
            f"--cpus {cpus} exceeds the limit of {limit} vCPUs ({why})", field="--cpus"
        )
    return cpus, limit


def share_devices(shares: Sequence[str]) -> list[ColdPlugDevice]:
    """``HOST_DIR[:TAG]`` options as 9p shares (tag defaults to the directory's name)."""
    from virtcontainers.devices import FsShare

    devices: list[ColdPlugDevice] = []
    for spec in shares:
        host, _, tag = spec.partition(":")
        path = Path(host).resolve()
        if not path.is_dir():
            raise ConfigError(f"--share {spec}: {path} is not a directory", field="--share")
        devices.append(FsShare(host_path=str(path), mount_tag=tag or path.name))
    return devices


# -- OCI images and the process (docker's spellings) ---------------------------------------

entrypoint_option = click.option(
    "--entrypoint", help="Replace the image's Entrypoint ('' clears it)."
)


def disk_size_mb(text: str | None) -> int:
    """``--disk-size`` (``512M``, ``2G``, ``1024`` = MiB) in MiB; 0 when not given.

    Raises:
        ConfigError: not a size.
    """
    if not text:
        return 0
    units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor: float = 1
    if raw and raw[-1] in units:
        factor, raw = units[raw[-1]], raw[:-1]
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"--disk-size {text!r} is not a size", field="--disk-size",
            allowed=["512M", "2G", "1024 (MiB)"],
        ) from None  # fmt: skip
    return int(value * factor)


def entrypoint_argv(entrypoint: str | None) -> list[str] | None:
    if entrypoint is None:
        return None
    return [entrypoint] if entrypoint else []


def parse_bool(value: str, option: str) -> bool:
    """``true``/``false`` (and 1/0, yes/no) as podman spells its boolean options.

    Raises:
        ConfigError: anything else.
    """
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ConfigError(f"{option}={value!r}", field=option, allowed=["true", "false"])
