"""ACRN against a fake ``acrn-dm`` and ``acrnctl`` (no ACRN host anywhere near CI).

The fakes are small Python programs written next to the test. They are strict where the real
tools are: the fake ``acrn-dm`` parses its whole command line and exits 1 on anything the
real one would reject (unknown option, a UUID outside ACRN's 8, a UUID or name already
running, a missing kernel or disk, a reused PCI slot, no console), serves the console and
every virtio-console port as unix-socket servers, prints boot lines on the console, keeps a
monitor socket that ``acrnctl`` talks to, and on SIGINT prints the guest's last line and
exits 0. The fake ``acrnctl`` records every call and answers ``list``, ``pause``,
``continue`` and ``blkrescan`` through that monitor; ``blkrescan`` refuses a slot that
already has a backend, as ``acrn-dm`` does.

Guest-side knobs ride on the kernel command line (``-B``): ``fake.exit_early=N`` (exit N
before serving anything), ``fake.ignore_signals=1`` (only SIGKILL ends it),
``fake.poweroff_after=S`` (the guest powers off by itself S seconds after the console
connects).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.behaviour.harness import Harness
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.acrn import ACRN_UUIDS, AcrnHypervisor
from virtcontainers.hypervisor import Hypervisor

NAME = "acrn-fake"
MARKS: list[pytest.MarkDecorator] = []

_FAKE_ACRN_DM = r"""
import asyncio, json, os, re, signal, sys

MNGR = {mngr!r}
UUIDS = {uuids!r}
SOCKETS = []


def die(code, message):
    print(f"acrn-dm: {{message}}", file=sys.stderr, flush=True)
    sys.exit(code)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def parse(args):
    opts, slots, positional, i = {{}}, {{}}, [], 0
    while i < len(args):
        a = args[i]
        if a == "-A":
            opts["-A"] = True
            i += 1
        elif a in ("-U", "-m", "-k", "-B", "-l", "-s"):
            if i + 1 >= len(args):
                die(1, f"option {{a}} requires an argument")
            value = args[i + 1]
            i += 2
            if a == "-s":
                where, _, dev = value.partition(",")
                slot = int(where.split(":")[0])
                if slot in slots or slot == 2:
                    die(1, f"invalid PCI slot {{slot}}")
                slots[slot] = dev
            else:
                opts[a] = value
        elif a.startswith("-"):
            die(1, f"unrecognized option {{a}}")
        else:
            positional.append(a)
            i += 1
    if len(positional) != 1:
        die(1, "usage: acrn-dm [options] <vmname>")
    return opts, slots, positional[0]


def die_with_parent():
    # A test that fails half-way must not leave a fake VM holding a UUID: go with pytest.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main():
    die_with_parent()
    opts, slots, name = parse(sys.argv[1:])
    knobs = dict(p.partition("=")[::2] for p in opts.get("-B", "").split())
    if "fake.exit_early" in knobs:
        die(int(knobs["fake.exit_early"]), "fake.exit_early requested")
    uuid = opts.get("-U", "")
    if uuid not in UUIDS:
        die(1, f"invalid uuid {{uuid!r}}: not one of ACRN's pre-defined VM UUIDs")
    if not re.fullmatch(r"[0-9]+M", opts.get("-m", "")):
        die(1, f"invalid memory size {{opts.get('-m')!r}}")
    if not os.path.isfile(opts.get("-k", "")):
        die(1, f"kernel {{opts.get('-k')!r}} not found")
    if slots.get(0) != "hostbridge" or slots.get(1) != "lpc":
        die(1, "slot 0 must be the hostbridge and slot 1 the lpc")
    for f in os.listdir(MNGR):
        if f.endswith(".json"):
            info = json.load(open(os.path.join(MNGR, f)))
            if alive(info["pid"]) and (info["uuid"] == uuid or info["name"] == name):
                die(1, f"VM {{info['name']}} already runs with uuid {{info['uuid']}}")
    disks, ports, console = {{}}, [], None
    for slot, dev in sorted(slots.items()):
        kind, _, rest = dev.partition(",")
        if kind == "virtio-blk":
            path = rest.split(",")[0]
            if "nodisk" not in path and not os.path.isfile(path):
                die(1, f"Could not open backing file {{path}}")
            disks[slot] = "nodisk" if "nodisk" in path else path
        elif kind == "virtio-console":
            m = re.fullmatch(r"(@?)socket:([^=]+)=(.+)", rest)
            if not m:
                die(1, f"bad virtio-console option {{rest!r}}")
            if m.group(1):
                console = m.group(3)
            ports.append((m.group(2), m.group(3), bool(m.group(1))))
        elif kind not in ("hostbridge", "lpc", "virtio-net", "vhost-vsock"):
            die(1, f"unknown device {{kind}}")
    if console is None:
        die(1, "no console port")
    asyncio.run(run(name, uuid, opts, knobs, disks, ports))


async def run(name, uuid, opts, knobs, disks, ports):
    state = {{"state": "started", "client": None}}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    ignore = knobs.get("fake.ignore_signals") == "1"

    def on_signal(sig):
        print(f"acrn-dm: got {{sig.name}}" + (", ignoring it" if ignore else ""), flush=True)
        if not ignore:
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    def say(line):
        writer = state["client"]
        if writer is not None:
            writer.write(line.encode() + b"\n")

    async def on_console(reader, writer):
        if state["client"] is not None:
            writer.close()
            return
        state["client"] = writer
        say("[    0.000000] Linux version 6.1.0-fake (fake acrn-dm)")
        say(f"[    0.000001] Command line: {{opts.get('-B', '')}}")
        say(f"[    0.100000] ACRN guest {{name}} uuid {{uuid}} memory {{opts['-m']}}")
        say("vc-init: ready")
        await writer.drain()
        if "fake.poweroff_after" in knobs:
            loop.call_later(float(knobs["fake.poweroff_after"]), stop.set)

    async def on_port(reader, writer):
        while await reader.read(4096):
            pass
        writer.close()

    async def on_monitor(reader, writer):
        line = (await reader.readline()).decode().strip()
        cmd, _, arg = line.partition(" ")
        reply = "ok"
        if cmd == "status":
            reply = state["state"]
        elif cmd == "pause":
            state["state"] = "paused"
        elif cmd == "continue":
            state["state"] = "started"
        elif cmd == "blkrescan":
            slot_s, _, path = arg.partition(",")
            slot = int(slot_s) if slot_s.isdigit() else -1
            if slot not in disks:
                reply = f"error vdev info failed for Slot {{slot}}"
            elif "nodisk" in path or not path:
                reply = "error no valid backend file found"
            elif disks[slot] != "nodisk":
                reply = "error Replacing valid backend file not supported!"
            elif not os.path.isfile(path):
                reply = "error Error opening backing file"
            else:
                disks[slot] = path
                size = os.path.getsize(path) // 512
                say(f"virtio_blk virtio{{slot}}: new size: {{size}} 512-byte logical blocks")
        else:
            reply = f"error unknown command {{cmd}}"
        writer.write(reply.encode() + b"\n")
        await writer.drain()
        writer.close()

    monitor = os.path.join(MNGR, f"{{name}}.monitor.{{os.getpid()}}.socket")
    info = os.path.join(MNGR, f"{{name}}.{{os.getpid()}}.json")
    servers = []
    # The console last: a client that finds it can rely on every other port being served.
    for port, path, is_console in sorted(ports, key=lambda p: p[2]):
        handler = on_console if is_console else on_port
        servers.append(await asyncio.start_unix_server(handler, path))
        SOCKETS.append(path)
    servers.append(await asyncio.start_unix_server(on_monitor, monitor))
    SOCKETS.append(monitor)
    with open(info, "w") as f:
        json.dump({{"pid": os.getpid(), "uuid": uuid, "name": name, "monitor": monitor}}, f)
    SOCKETS.append(info)
    print(f"acrn-dm: fake VM {{name}} running (pid {{os.getpid()}})", flush=True)
    await stop.wait()
    say("reboot: Power down")
    writer = state["client"]
    if writer is not None:
        await writer.drain()
        writer.close()
    for server in servers:
        server.close()
    for path in SOCKETS:
        try:
            os.unlink(path)
        except OSError:
            pass
    print("acrn-dm: fake VM exited", flush=True)


main()
"""

_FAKE_ACRNCTL = r"""
import json, os, socket, sys

MNGR = {mngr!r}
CALLS = {calls!r}

with open(CALLS, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def vms():
    for f in sorted(os.listdir(MNGR)):
        if f.endswith(".json"):
            try:
                info = json.load(open(os.path.join(MNGR, f)))
            except (OSError, ValueError):
                continue
            if alive(info["pid"]) and os.path.exists(info["monitor"]):
                yield info


def ask(info, line):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(info["monitor"])
    s.sendall(line.encode() + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply.decode().strip()


def find(name):
    for info in vms():
        if info["name"] == name:
            return info
    print(f"can't find {{name}}", file=sys.stderr)
    sys.exit(1)


args = sys.argv[1:]
if not args:
    print("support:\n  list\n  pause\n  continue\n  blkrescan", file=sys.stderr)
    sys.exit(1)
cmd = args[0]
if cmd == "list" and len(args) == 1:
    for info in vms():
        print(f"{{info['name']}}\t\t{{ask(info, 'status')}}")
elif cmd in ("pause", "continue") and len(args) == 2:
    reply = ask(find(args[1]), cmd)
    if reply != "ok":
        print(reply, file=sys.stderr)
        sys.exit(1)
elif cmd == "blkrescan" and len(args) == 3:
    reply = ask(find(args[1]), f"blkrescan {{args[2]}}")
    if reply != "ok":
        print(reply, file=sys.stderr)
        sys.exit(1)
else:
    print(f"{{cmd}}: invalid arguments {{args[1:]}}", file=sys.stderr)
    sys.exit(1)
"""


@dataclass(frozen=True)
class FakeAcrn:
    """Paths of one set of fakes: the two programs, their monitor dir and the call log."""

    dm: Path
    ctl: Path
    mngr: Path
    calls: Path

    def ctl_calls(self) -> list[list[str]]:
        """Every acrnctl argv (without the program) in call order."""
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines()]

    def remove(self) -> None:
        shutil.rmtree(self.mngr, ignore_errors=True)


def write_fakes(directory: Path) -> FakeAcrn:
    """Write an executable fake ``acrn-dm`` and ``acrnctl`` into ``directory``.

    The monitor sockets live in a short private dir under /tmp (unix socket paths are
    limited to 107 bytes); call :meth:`FakeAcrn.remove` when done.
    """
    directory.mkdir(parents=True, exist_ok=True)
    mngr = Path(tempfile.mkdtemp(prefix="acrn-mngr-"))
    calls = directory / "acrnctl-calls.jsonl"
    fake = FakeAcrn(directory / "acrn-dm", directory / "acrnctl", mngr, calls)
    shebang = f"#!{sys.executable}\n"
    fake.dm.write_text(shebang + _FAKE_ACRN_DM.format(mngr=str(mngr), uuids=list(ACRN_UUIDS)))
    fake.ctl.write_text(shebang + _FAKE_ACRNCTL.format(mngr=str(mngr), calls=str(calls)))
    for program in (fake.dm, fake.ctl):
        program.chmod(0o755)
    return fake


def fake_config(tmp: Path, fake: FakeAcrn) -> HypervisorConfig:
    """A config the fake acrn-dm accepts: dummy kernel and rootfs image in ``tmp``."""
    kernel, image = tmp / "vmlinuz", tmp / "rootfs.img"
    kernel.write_bytes(b"\0" * 4096)
    image.write_bytes(b"\0" * (1 << 20))
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(kernel)
    cfg.boot.image_path = str(image)
    cfg.boot.hypervisor_path = str(fake.dm)
    cfg.boot.hypervisor_ctl_path = str(fake.ctl)
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 4
    cfg.resources.memory_size = 512
    cfg.resources.mem_slots = 4
    return cfg


def _kill_leftover(hv: AcrnHypervisor) -> None:
    """A test that failed before stopping its VM (the shared suite has no ``finally``)."""
    for pid in hv.get_pids():
        os.kill(pid, signal.SIGKILL)


class AcrnFakeHarness(Harness):
    name = NAME
    # ACRN's vCPUs run on physical CPUs the hypervisor partitions: no host threads, and
    # get_thread_ids() returns {} as in the reference.
    vcpu_threads = False

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._fakes: dict[Path, FakeAcrn] = {}

    def fake(self, tmp: Path) -> FakeAcrn:
        if tmp not in self._fakes:
            fake = write_fakes(tmp / "fake-acrn")
            self._request.addfinalizer(fake.remove)
            self._fakes[tmp] = fake
        return self._fakes[tmp]

    def config(self, tmp: Path) -> HypervisorConfig:
        return fake_config(tmp, self.fake(tmp))

    def new(self, tmp: Path) -> Hypervisor:
        hv = AcrnHypervisor(uuid_pool_dir=tmp / "uuid-pool")
        self._request.addfinalizer(lambda: _kill_leftover(hv))
        return hv

    def kill_vmm(self, hv: Hypervisor) -> None:
        os.kill(hv.get_pids()[0], signal.SIGKILL)


def make_harness(request: pytest.FixtureRequest) -> Harness:
    return AcrnFakeHarness(request)
