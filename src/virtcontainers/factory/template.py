"""VM templating for QEMU, as the reference's factory does it.

A *template* VM boots with its RAM in a file on tmpfs, shared with the file
(``memory-backend-file,share=on``). Once its agent answers, it is paused, its device state
is migrated to a file with ``x-ignore-shared`` (so RAM stays out of the stream), and it is
stopped: ``<path>/memory`` and ``<path>/state`` are the template.

A *clone* maps the same memory file privately (``share=off``: copy-on-write, the file is
never written), starts with ``-incoming defer``, loads the device state with
``migrate-incoming`` from a descriptor, and resumes; the guest carries on from the moment
the template was paused. Then, as the reference does, the clone's RNG is reseeded and its
clock set (both through the agent, see :meth:`Template.clone`), and CPUs/memory are
hot-added up to the requested size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from virtcontainers.agent import AgentClient
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import AgentError, ConfigError
from virtcontainers.hypervisor import HypervisorType, NetworkNamespace
from virtcontainers.images.sandbox_image import SandboxImage
from virtcontainers.images.store import StoredImage
from virtcontainers.persist.store import StateStore
from virtcontainers.sandbox import Sandbox
from virtcontainers.telemetry.tracing import traced

__all__ = ["DEFAULT_TEMPLATE_ROOT", "Template"]

log = logging.getLogger(__name__)

#: Where templates go by default (tmpfs on Linux; checked before use).
DEFAULT_TEMPLATE_ROOT = Path("/dev/shm")
#: File systems whose pages the clones can map without a copy to disk and back.
_MEMORY_FS = ("tmpfs", "hugetlbfs", "ramfs")
#: Bytes written to the clone's /dev/urandom after resume.
_RESEED_BYTES = 512


def _template_dir(path: str | os.PathLike[str] | None, require_tmpfs: bool) -> Path:
    """The template's directory: ``path`` (created if missing) or a new one in /dev/shm."""
    if path is None:
        if require_tmpfs and _fs_type(DEFAULT_TEMPLATE_ROOT) not in _MEMORY_FS:
            raise ConfigError(
                f"{DEFAULT_TEMPLATE_ROOT} is not tmpfs: pass a tmpfs directory as path",
                field="template.memory_path",
            )
        return Path(tempfile.mkdtemp(prefix="vc-template-", dir=DEFAULT_TEMPLATE_ROOT))
    where = Path(path).absolute()
    fstype = _fs_type(where)  # by mount point prefix: works before the directory exists
    if require_tmpfs and fstype not in _MEMORY_FS:
        raise ConfigError(
            f"template directory {where} is on {fstype or 'an unknown fs'}, not tmpfs",
            field="template.memory_path",
        )
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    return where


def _require_space(path: Path, config: HypervisorConfig) -> None:
    """The memory file is the guest's whole RAM: a tmpfs with less room would fill up while
    the template boots (QEMU then hangs on the page it cannot get), so refuse up front."""
    where = path.absolute()
    while not where.exists():
        where = where.parent
    st = os.statvfs(where)
    free_mib = st.f_bavail * st.f_frsize >> 20
    need = config.resources.memory_size
    if free_mib < need:
        raise ConfigError(
            f"the template's memory file needs {need} MiB (the guest's RAM) but {where} has "
            f"{free_mib} MiB free: free space there, or pass another tmpfs directory as path",
            field="template.memory_path",
        )


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mounts)."""
    target = str(path.resolve())
    best, fstype = "", ""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            mnt = fields[1].replace("\\040", " ")
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    return fstype


@dataclass(eq=False)
class Template:
    """A booted-then-saved QEMU VM that clones restore from.

    ``template = await Template.create(config)``, then ``sb = await template.clone()``
    (a started :class:`~virtcontainers.sandbox.Sandbox`), and ``template.remove()`` when no
    clone will be made any more (running clones keep their mapping of the deleted file).
    """

    config: HypervisorConfig
    path: Path
    _: KW_ONLY
    #: The template made ``path`` (so :meth:`remove` deletes the directory, not only its files).
    owns_path: bool
    #: The OCI image the template (and so every clone) runs in; its read-only disk is
    #: the same file for all of them, and each clone's writable layer starts as a
    #: private copy of the template's (it lives in guest RAM).
    image: StoredImage | None = None

    @property
    def memory_path(self) -> Path:
        return self.path / "memory"

    @property
    def state_path(self) -> Path:
        return self.path / "state"

    @classmethod
    @traced(
        "template.create",
        lambda _cls, config, *_, **__: {
            "vc.driver": "qemu",
            "vc.vcpus": config.resources.num_vcpus,
            "vc.memory_mib": config.resources.memory_size,
        },
        lambda template: {"vc.template.path": str(template.path)},
    )
    async def create(
        cls,
        config: HypervisorConfig,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 120.0,
        require_tmpfs: bool = True,
        image: StoredImage | None = None,
    ) -> Template:
        """Boot a template VM from ``config``, wait for its agent, save it, stop it.

        ``path`` is a directory for ``memory`` and ``state`` (created if missing; default a
        fresh directory under /dev/shm). It must be on tmpfs unless ``require_tmpfs`` is
        false: the memory file is the guest's RAM. ``image``: a stored OCI image the
        template and its clones run in (its root disk is attached read-only to each).

        Raises:
            ConfigError: bad config, ``path`` not on tmpfs, or less free space there than
            the guest's RAM. LaunchError /
            HypervisorTimeout / AgentError: the template VM did not boot or answer.
        """
        owns = path is None
        _require_space(Path(path) if path is not None else DEFAULT_TEMPLATE_ROOT, config)
        where = _template_dir(path, require_tmpfs)
        cfg = config.copy()
        if image is not None:
            cfg = SandboxImage.from_stored(image, "").configure(cfg)
        cfg.template.boot_to_be_template = True
        cfg.template.boot_from_template = False
        template = cls(cfg, where, owns_path=owns, image=image)
        cfg.template.memory_path = str(template.memory_path)
        cfg.template.devices_state_path = str(template.state_path)
        try:
            await template._build(timeout)
        except BaseException:
            template.remove()
            raise
        return template

    async def _build(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        hv = QemuHypervisor()
        await hv.create_sandbox(f"template-{secrets.token_hex(4)}", NetworkNamespace(), self.config)
        if self.image is not None:
            # The same devices, in the same order, as each clone's Sandbox.create gives it:
            # migration needs the device sets to match.
            for drive in SandboxImage.from_stored(self.image, "").devices(self.path):
                await hv.add_device(drive)
        try:
            await hv.start_sandbox(timeout)
            await _wait_for_agent(str(hv.paths.agent), deadline, timeout)
            await hv.pause_sandbox()
            await hv.save_sandbox()
        finally:
            await hv.stop_sandbox()
            await hv.cleanup()
        log.info("template %s saved (%d MiB)", self.path, self.config.resources.memory_size)

    def clone_config(self) -> HypervisorConfig:
        """The config of a clone: the template's, restored from its files."""
        cfg = self.config.copy()
        cfg.template.boot_to_be_template = False
        cfg.template.boot_from_template = True
        return cfg

    @traced(
        "template.clone",
        lambda tpl, *_, **kw: {
            "vc.driver": "qemu",
            "vc.template.path": str(tpl.path),
            "vc.vcpus": kw.get("vcpus") or tpl.config.resources.num_vcpus,
            "vc.memory_mib": kw.get("memory_mb") or tpl.config.resources.memory_size,
            "vc.server": bool(kw.get("server", False)),
        },
        lambda sb: {"vc.sandbox.id": sb.id},
    )
    async def clone(
        self,
        id: str | None = None,
        *,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        store: StateStore | None = None,
        timeout: float = 60.0,
        sync_guest: bool = True,
        server: bool = False,
        ephemeral: bool = False,
    ) -> Sandbox:
        """A started sandbox restored from this template.

        ``server``: the clone runs in its own sandbox server (the restore happens there) and
        the returned ``Sandbox`` is its client, like ``Sandbox.start(server=True)``;
        ``ephemeral`` ties it to this process.

        After resume (``sync_guest``): random bytes from the host are written into the
        guest's ``/dev/urandom`` (mixed into the pool; the agent cannot credit entropy) and
        the guest clock is set to the host's (``date -s @<epoch>``, second resolution), both
        in one agent exec. ``vcpus`` / ``memory_mb`` above the template's are hot-added.

        Raises:
            ConfigError: the template files are gone. LaunchError / HypervisorTimeout /
            AgentError: the clone did not restore or its agent did not answer.
        """
        sb = await Sandbox.create(
            self.clone_config(), id=id, hypervisor=HypervisorType.QEMU, store=store,
            image=self.image,
        )  # fmt: skip
        try:
            await sb.start(timeout, server=server, ephemeral=ephemeral)
            if sync_guest:
                await sync_clone(sb)
            if vcpus is not None and vcpus > self.config.resources.num_vcpus:
                await sb.resize_vcpus(vcpus)
            if memory_mb is not None and memory_mb > self.config.resources.memory_size:
                await sb.resize_memory(memory_mb)
        except BaseException:
            with contextlib.suppress(Exception):
                await sb.remove()
            raise
        return sb

    def remove(self) -> None:
        """Delete the template's files (and its directory when it made it). Idempotent."""
        if self.owns_path:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for file in (self.memory_path, self.state_path):
            file.unlink(missing_ok=True)


async def sync_clone(sb: Sandbox) -> None:
    """Reseed the guest RNG and set its clock to the host's, through the agent."""
    seed = secrets.token_bytes(_RESEED_BYTES)
    script = f"cat > /dev/urandom && date -s @{int(time.time())} > /dev/null"
    # As root whatever the image's User is: setting the clock needs it.
    result = await sb.exec(["/bin/sh", "-c", script], stdin=seed, timeout=10.0, uid=0, gid=0)
    if result.exit_code != 0:
        raise AgentError(
            f"sandbox {sb.id}: reseeding/clock sync failed ({result.exit_code}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )


async def _wait_for_agent(path: str, deadline: float, timeout: float) -> None:
    while True:
        try:
            agent = await AgentClient.connect_unix(path, timeout=1.0)
            try:
                await agent.ping(timeout=1.0)
                return
            finally:
                await agent.close()
        except (AgentError, OSError):
            if time.monotonic() >= deadline:
                raise AgentError(
                    f"template VM: the guest agent did not answer within {timeout:g} s"
                ) from None
            await asyncio.sleep(0.05)
