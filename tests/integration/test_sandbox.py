"""The Sandbox API in real guests: what a user does, checked from inside the guest."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import qemu_processes_for, wait_for_console
from virtcontainers import Sandbox, SyncSandbox
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive, FsShare
from virtcontainers.guest.image import GuestImage

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))


def _config(image: GuestImage, *, cpus: int = 1, memory: int = 512) -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(image.kernel)
    cfg.boot.initrd_path = str(image.initrd)
    cfg.resources.num_vcpus = cpus
    cfg.resources.default_max_vcpus = 4
    cfg.resources.memory_size = memory
    cfg.storage.block_device_driver = "virtio-blk"
    return cfg


def _mem_total_kib(text: str) -> int:
    line = next(ln for ln in text.splitlines() if ln.startswith("MemTotal:"))
    return int(line.split()[1])


async def test_resources_grow_inside_the_guest(guest_image: GuestImage, vc_root: Path) -> None:
    async with await Sandbox.create(_config(guest_image)) as sb:
        nproc = await sb.exec(["nproc"])
        assert nproc.stdout == b"1\n"
        assert await sb.resize_vcpus(2) == (1, 2)
        assert (await sb.exec(["nproc"])).stdout == b"2\n"

        before = _mem_total_kib((await sb.read_file("/proc/meminfo")).decode())
        assert await sb.resize_memory(512 + 256) == 768
        after = _mem_total_kib((await sb.read_file("/proc/meminfo")).decode())
        assert after - before >= 200 * 1024

        disk = vc_root / "disk.img"
        with disk.open("wb") as f:
            f.truncate(64 << 20)
        await sb.hotplug(BlockDrive(file=str(disk), id="data0"))
        script = textwrap.dedent(
            """
            for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
            cat /sys/block/vda/size
            echo payload-123 | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
            dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 11
            """
        )
        result = await sb.exec(["sh", "-c", script])
        assert result.exit_code == 0, result.stderr
        sectors, data = result.stdout.split(b"\n", 1)
        assert int(sectors) * 512 == 64 << 20
        assert data == b"payload-123"
    # Written through to the host file, as a real disk would be.
    assert disk.read_bytes()[:11] == b"payload-123"


async def test_twenty_concurrent_execs_keep_their_output_apart(
    guest_image: GuestImage, vc_root: Path
) -> None:
    async with await Sandbox.create(_config(guest_image)) as sb:
        script = 'for j in 1 2 3 4 5; do echo "exec-$0-line-$j"; sleep 0.0$0; done; echo err-$0 >&2'
        results = await asyncio.gather(*(sb.exec(["sh", "-c", script, str(i)]) for i in range(20)))
        for i, r in enumerate(results):
            assert r.exit_code == 0
            assert r.stdout.decode().splitlines() == [f"exec-{i}-line-{j}" for j in range(1, 6)]
            assert r.stderr == f"err-{i}\n".encode()


async def test_agent_survives_garbage_frames(guest_image: GuestImage, vc_root: Path) -> None:
    async with await Sandbox.create(_config(guest_image)) as sb:
        await sb.close()  # give the channel back, then talk to it raw
        _, writer = await asyncio.open_unix_connection(str(sb.run_dir / "agent.sock"))
        writer.write(os.urandom(4096) + b"VCAG\x01\xff" + b"\xff" * 40)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        again = await Sandbox.attach(sb.id)
        result = await again.exec(["echo", "still-serving"])
        assert result.stdout == b"still-serving\n"
        await again.close()
        # The agent reports what it skipped on the console, which reaches the log a moment
        # after the exec's reply.
        await wait_for_console(sb.run_dir / "console.log", "bytes of garbage", 10)


async def test_9p_share_shows_host_files(guest_image_generic: GuestImage, vc_root: Path) -> None:
    shared = vc_root / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("from the host\n")
    cfg = _config(guest_image_generic)
    share = FsShare(host_path=str(shared), mount_tag="hostshare")
    async with await Sandbox.create(cfg, devices=[share]) as sb:
        result = await sb.exec(
            ["sh", "-c", "mkdir -p /mnt && mount -t 9p -o trans=virtio,version=9p2000.L,"
             "msize=8192 hostshare /mnt && cat /mnt/hello.txt"]
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert result.stdout == b"from the host\n"


def test_sync_facade(guest_image: GuestImage, vc_root: Path) -> None:
    with SyncSandbox.create(_config(guest_image)) as sb:
        sb.write_file("/tmp/x", b"\x00\x01binary\xff", 0o600)
        assert sb.read_file("/tmp/x") == b"\x00\x01binary\xff"
        assert sb.exec(["stat", "-c", "%a", "/tmp/x"]).stdout == b"600\n"
        assert sb.exec(["id", "-u"], uid=1000, gid=1000).stdout == b"1000\n"
        assert sb.exec(["cat"], stdin=b"in\x00put").stdout == b"in\x00put"
        slow = sb.exec(["sleep", "30"], timeout=0.5)
        assert slow.timed_out
        assert slow.exit_code is None
        sb_id, run_dir = sb.id, Path(sb.info().run_dir)
    assert qemu_processes_for(run_dir) == []
    assert not run_dir.exists(), sb_id


STARTER = """
import asyncio, sys
from virtcontainers import Sandbox
from virtcontainers.config import HypervisorConfig

async def main():
    cfg = HypervisorConfig()
    cfg.boot.kernel_path, cfg.boot.initrd_path = sys.argv[1], sys.argv[2]
    cfg.resources.memory_size = 512
    sb = await Sandbox.create(cfg, id="orphan")
    await sb.start()
    print("started", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_reattach_after_the_starter_is_killed(guest_image: GuestImage, vc_root: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(guest_image.kernel), str(guest_image.initrd)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    assert starter.stdout.readline().strip() == "started"
    starter.send_signal(signal.SIGKILL)
    starter.wait()

    ps = subprocess.run([VC, "ps", "--json"], capture_output=True, text=True, check=True)
    assert '"state": "running"' in ps.stdout
    out = subprocess.run(
        [VC, "exec", "orphan", "--", "sh", "-c", "echo reattached; exit 5"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 5
    assert out.stdout == "reattached\n"

    run_dir = vc_root / "sandboxes" / "orphan"
    start = time.monotonic()
    subprocess.run([VC, "stop", "orphan"], check=True, capture_output=True)
    assert time.monotonic() - start < 30
    assert qemu_processes_for(run_dir) == []
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock", "console.log", "qemu.log", "state.json"
    ]  # fmt: skip
    assert "reboot: Power down" in (run_dir / "console.log").read_text()
    subprocess.run([VC, "rm", "orphan"], check=True, capture_output=True)
    assert not run_dir.exists()


def test_cli_detached_lifecycle(guest_image: GuestImage, vc_root: Path, tmp_path: Path) -> None:
    def vc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VC, *args], capture_output=True, text=True, timeout=120)

    assert vc("create", "--id", "det", "--cpus", "1").stdout.strip() == "det"
    assert vc("start", "det").returncode == 0
    (tmp_path / "in.txt").write_text("copied in\n")
    assert vc("cp", str(tmp_path / "in.txt"), "det:/tmp/in.txt").returncode == 0
    assert vc("exec", "det", "--", "cat", "/tmp/in.txt").stdout == "copied in\n"
    assert vc("cp", "det:/proc/sys/kernel/hostname", str(tmp_path / "hostname")).returncode == 0
    assert (tmp_path / "hostname").read_text() == "vc-guest\n"
    assert vc("pause", "det").returncode == 0
    assert '"state": "paused"' in vc("ps", "--json").stdout
    assert vc("resume", "det").returncode == 0
    assert vc("resize", "det", "--cpus", "2").returncode == 0
    assert vc("exec", "det", "--", "nproc").stdout == "2\n"
    assert "vc-init: ready" in vc("logs", "det").stdout
    assert vc("rm", "det").returncode != 0  # running: needs --force
    assert vc("stop", "det").returncode == 0
    assert '"state": "stopped"' in vc("ps", "--json").stdout
    assert "reboot: Power down" in vc("logs", "det").stdout
    assert vc("rm", "det").returncode == 0
    assert vc("ps", "--json").stdout.strip() == "[]"
    assert qemu_processes_for(vc_root) == []
