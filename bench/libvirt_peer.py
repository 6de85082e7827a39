"""The libvirt peer: the same kernel, initrd and kernel command line under libvirtd's QEMU driver.

Run by ``bench.peers`` with the system Python (python3-libvirt is a Debian package, not in
the venv) inside a private mount namespace (``unshare --mount``), so libvirtd's config,
state, run and log dirs are a tmpfs of this run and vanish with it: nothing of the host's
changes. libvirtd is started here, as root, and stopped before the script exits.

Per round: define, start (to the guest's ``vc-init: ready`` on the serial file), suspend,
resume, save (to a file; the domain stops), restore (to running), destroy, undefine.
Prints one JSON line: the medians in ms and every sample.

Usage (by bench.peers): unshare --mount --propagation private /usr/bin/python3
    bench/libvirt_peer.py --root DIR --kernel K --initrd I --cmdline C --memory 512 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape

READY = b"vc-init: ready"
# libvirtd's dirs as root; each becomes a private directory of this run.
DIRS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "run": "/run/libvirt",
}
# libvirt resolves its default QEMU user before reading qemu.conf: it must exist (Debian's
# libvirt-daemon-system would create it); here only in this namespace's /etc/passwd.
USER = ("libvirt-qemu:x:64055:64055::/nonexistent:/usr/sbin/nologin\n", "libvirt-qemu:x:64055:\n")
VIR_DOMAIN_RUNNING = 1
QEMU_CONF = """user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
stdio_handler = "file"
"""


def private_dirs(root: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", root], check=True)
    for name, target in DIRS.items():
        os.mkdir(f"{root}/{name}", 0o700)
        subprocess.run(["mount", "--bind", f"{root}/{name}", target], check=True)
    for name, line in zip(("passwd", "group"), USER, strict=True):
        with open(f"/etc/{name}") as src, open(f"{root}/{name}", "w") as dst:
            dst.write(src.read() + line)
        subprocess.run(["mount", "--bind", f"{root}/{name}", f"/etc/{name}"], check=True)
    with open("/etc/libvirt/qemu.conf", "w") as f:
        f.write(QEMU_CONF)
    with open("/etc/libvirt/libvirtd.conf", "w") as f:
        f.write(f'unix_sock_dir = "/run/libvirt"\nlog_outputs = "3:file:{root}/libvirtd.log"\n')


def start_daemon(root: str) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        ["libvirtd", "-f", "/etc/libvirt/libvirtd.conf", "-p", f"{root}/libvirtd.pid"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not os.path.exists("/run/libvirt/libvirt-sock"):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd did not start (exit {daemon.poll()}): {log_tail(root)}")
        time.sleep(0.01)
    return daemon


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(15)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def log_tail(root: str) -> str:
    try:
        with open(f"{root}/libvirtd.log", errors="replace") as f:
            return "".join(f.readlines()[-5:])
    except OSError:
        return "(no log)"


def domain_xml(args: argparse.Namespace, name: str, serial: str, agent: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{args.memory}</memory>
  <vcpu>1</vcpu>
  <cpu mode='maximum' check='none'/>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(args.kernel)}</kernel>
    <initrd>{escape(args.initrd)}</initrd>
    <cmdline>{escape(args.cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(args.qemu)}</emulator>
    <serial type='file'><source path='{escape(serial)}'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{escape(agent)}'/>
      <target type='virtio' name='vc.agent'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def wait_ready(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                if READY in f.read():
                    return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {READY!r} on the serial console within {timeout} s")
        time.sleep(0.005)


def one_round(conn: Any, args: argparse.Namespace, n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    serial, agent, state = (f"{args.root}/run/{n}.{x}" for x in ("serial", "agent", "state"))

    def timed(name: str, fn: Callable[..., Any], *a: object) -> Any:
        t = time.perf_counter()
        result = fn(*a)
        out[name] = (time.perf_counter() - t) * 1000
        return result

    dom = timed("define_ms", conn.defineXML, domain_xml(args, f"vc-bench-{n}", serial, agent))
    try:
        t = time.perf_counter()
        dom.create()
        wait_ready(serial)
        out["start_ms"] = (time.perf_counter() - t) * 1000
        timed("pause_ms", dom.suspend)
        timed("resume_ms", dom.resume)
        timed("save_ms", dom.save, state)
        timed("restore_ms", conn.restore, state)
        dom = conn.lookupByName(f"vc-bench-{n}")
        if dom.state()[0] != VIR_DOMAIN_RUNNING:
            raise RuntimeError(f"restored domain is in state {dom.state()}")
        timed("stop_ms", dom.destroy)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        for path in (serial, state):
            if os.path.exists(path):
                os.unlink(path)
    return out


def main() -> int:
    # Here, not at the top: the venv side imports this module for DIRS and has no libvirt.
    import libvirt  # type: ignore[import-not-found]

    parser = argparse.ArgumentParser()
    for name in ("--root", "--kernel", "--initrd", "--cmdline", "--qemu"):
        parser.add_argument(name, required=True)
    parser.add_argument("--memory", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    private_dirs(args.root)
    t = time.perf_counter()
    daemon = start_daemon(args.root)
    started = (time.perf_counter() - t) * 1000
    try:
        conn = libvirt.open("qemu:///system")
        try:
            rounds = [one_round(conn, args, n) for n in range(args.rounds)]
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        print(json.dumps({"error": f"{exc}; libvirtd log: {log_tail(args.root)}"}))
        return 1
    finally:
        stop_daemon(daemon)
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(
        json.dumps(
            {
                "version": ".".join(
                    str(libvirt.getVersion() // d % 1000) for d in (10**6, 1000, 1)
                ),
                "daemon_start_ms": started,
                "medians": medians,
                "rounds": rounds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
