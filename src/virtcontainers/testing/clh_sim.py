"""A Cloud Hypervisor *simulator*: a test double, not a VMM. It runs no guest.

It serves the Cloud Hypervisor REST API (``cloud-hypervisor.yaml``) on a unix socket with the
VMM's documented state machine, so the clh driver's real launch path (spawn, ping, create,
boot, hot-plug, resize, pause, snapshot, shutdown, signals) can be exercised on machines
without the binary or KVM::

    python -m virtcontainers.testing.clh_sim --api-socket path=PATH [--agent-unix PATH]

Other cloud-hypervisor flags are accepted and ignored. What makes it look like a VM:

* after ``vm.boot`` the process has one thread per vCPU named ``vcpu0``.. (``prctl``), and
  ``vm.resize`` adds or ends them;
* the serial port (mode ``Socket`` or ``File``) prints a few boot lines, and
  ``reboot: Power down`` at shutdown; output waits for the first reader instead of being
  dropped (the real VMM may drop it);
* the vsock socket speaks the hybrid vsock handshake (``CONNECT <port>\\n`` ->
  ``OK <n>\\n``) and then proxies to ``--agent-unix PATH`` when given (a host-run
  ``vc-agent --unix``), else echoes bytes back.

Errors use the spec's status codes where it documents them (404 not created, 405 wrong
state, 409 duplicate id, 400 bad body), else 500 as the real VMM does, always with a text
body. Test knobs: ``--sim-startup-delay S`` (serve the API only after S seconds) and
``--sim-delay ENDPOINT=S`` (answer that endpoint S seconds late). SIGTERM/SIGINT and
``vmm.shutdown`` end the process, removing its sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from virtcontainers.testing._hvsock import accept_loop, read_connect, splice

__all__ = ["SimOptions", "main", "parse_args", "write_wrapper"]

Json = dict[str, Any]

_PR_SET_NAME = 15
_API_PREFIX = "/api/v1/"
_VERSION = "v0.0.0-clh-sim"
#: The first host port the real VMM hands out for hybrid vsock connections.
_FIRST_HOST_PORT = 1 << 30


def _log(message: str) -> None:
    sys.stderr.write(f"clh-sim[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


def _set_thread_name(name: str) -> None:
    """Name the calling OS thread (what ``/proc/<pid>/task/<tid>/comm`` shows)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


class SimError(Exception):
    """An error reply: HTTP ``status`` with a text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- guest-ish pieces ----------------------------------------------------------------------


class Vcpu:
    """A thread named ``vcpuN`` that idles until stopped."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vcpu{index}", daemon=True)
        started = threading.Event()
        self._started = started
        self._thread.start()
        started.wait(5)

    def _run(self) -> None:
        _set_thread_name(f"vcpu{self.index}")
        self._started.set()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Serial:
    """The serial port: to a unix socket (one reader at a time; output is kept until a reader
    connects) or appended to a file."""

    def __init__(self, config: Json) -> None:
        self.mode = str(config.get("mode", "Null"))
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._client: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._path: str = ""
        self._file = str(config.get("file", ""))
        if self.mode == "Socket":
            self._path = str(config["socket"])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self._path)
            self._listener.listen(1)
            threading.Thread(target=self._accept, name="serial", daemon=True).start()

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._client is not None:
                    self._client.close()
                self._client = conn
                pending, self._pending = self._pending, []
                for chunk in pending:
                    with contextlib.suppress(OSError):
                        conn.sendall(chunk)

    def write(self, text: str) -> None:
        data = text.encode()
        if self.mode == "File" and self._file:
            with open(self._file, "ab") as f:
                f.write(data)
            return
        if self.mode != "Socket":
            return
        with self._lock:
            if self._client is None:
                self._pending.append(data)
                return
            try:
                self._client.sendall(data)
            except OSError:
                self._client.close()
                self._client = None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(OSError):
                    self._client.shutdown(socket.SHUT_RDWR)
                self._client.close()
                self._client = None
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class VsockMux:
    """Hybrid vsock: ``CONNECT <port>\\n`` -> ``OK <host port>\\n``, then bytes flow to the
    agent socket (``agent_unix``) or are echoed back."""

    def __init__(self, path: str, agent_unix: str) -> None:
        self.path = path
        self.agent_unix = agent_unix
        self._next_port = _FIRST_HOST_PORT
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        threading.Thread(target=self._accept, name="vsock", daemon=True).start()

    def _accept(self) -> None:
        accept_loop(lambda: self._listener, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if read_connect(conn) is None:
                return  # the real VMM closes on a bad handshake
            upstream: socket.socket | None = None
            if self.agent_unix:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    upstream.connect(self.agent_unix)
                except OSError:
                    upstream.close()
                    return  # nothing listens on that guest port: close, like the VMM
            with self._lock:
                host_port = self._next_port
                self._next_port += 1
            conn.sendall(f"OK {host_port}\n".encode())
            if upstream is None:
                while data := conn.recv(65536):
                    conn.sendall(data)
                return
            splice(conn, upstream)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# -- the VMM state machine -------------------------------------------------------------------


@dataclass
class SimOptions:
    api_socket: str
    agent_unix: str = ""
    startup_delay: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)


_ADD_KINDS = {
    "vm.add-disk": ("disks", "_disk"),
    "vm.add-net": ("net", "_net"),
    "vm.add-device": ("devices", "_vfio"),
    "vm.add-fs": ("fs", "_fs"),
    "vm.add-pmem": ("pmem", "_pmem"),
    "vm.add-vdpa": ("vdpa", "_vdpa"),
}


class SimVmm:
    """The VMM and its one VM. Every method runs under one lock (requests are serialized,
    as the real VMM's single API thread does)."""

    def __init__(self, options: SimOptions, stop: Callable[[], None]) -> None:
        self.options = options
        self._stop_process = stop
        self.lock = threading.Lock()
        self.state: str | None = None  # None: no VM created
        self.config: Json = {}
        self.vcpus: list[Vcpu] = []
        self.serial: Serial | None = None
        self.vsock: VsockMux | None = None
        self.slots: dict[str, int] = {}  # device id -> PCI slot on bus 0
        self._counter = 0

    # -- helpers

    def _require_vm(self) -> None:
        if self.state is None:
            raise SimError(404, "VM is not created")

    def _bdf(self, slot: int) -> str:
        return f"0000:00:{slot:02x}.0"

    def _take_slot(self, dev_id: str) -> int:
        used = set(self.slots.values())
        for slot in range(1, 32):
            if slot not in used:
                self.slots[dev_id] = slot
                return slot
        raise SimError(500, "no free PCI slot on segment 0")

    def _all_ids(self) -> set[str]:
        ids: set[str] = set()
        for key, _ in _ADD_KINDS.values():
            ids |= {str(d.get("id")) for d in self.config.get(key, []) if d.get("id")}
        return ids

    def _set_vcpus(self, n: int) -> None:
        while len(self.vcpus) < n:
            self.vcpus.append(Vcpu(len(self.vcpus)))
        while len(self.vcpus) > n:
            self.vcpus.pop().stop()

    def _teardown_vm(self) -> None:
        self._set_vcpus(0)
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        if self.vsock is not None:
            self.vsock.close()
            self.vsock = None

    def memory_actual(self) -> int:
        mem = self.config.get("memory", {})
        return int(mem.get("size", 0)) + int(mem.get("hotplugged_size", 0))

    # -- endpoints

    def ping(self, body: Json | None) -> tuple[int, Json | None]:
        return 200, {
            "version": _VERSION,
            "build_version": _VERSION,
            "pid": os.getpid(),
            "features": ["simulator"],
        }

    def shutdown_vmm(self, body: Json | None) -> tuple[int, Json | None]:
        self._teardown_vm()
        self._stop_process()
        return 204, None

    def info(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        assert self.state is not None
        return 200, {
            "config": self.config,
            "state": self.state,
            "memory_actual_size": self.memory_actual(),
        }

    def counters(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        return 200, {}

    def create(self, body: Json | None) -> tuple[int, Json | None]:
        if self.state is not None:
            raise SimError(500, "Error creating the VM: VmAlreadyCreated")
        config = _need_body(body)
        payload = config.get("payload")
        if not isinstance(payload, dict) or not (payload.get("kernel") or payload.get("firmware")):
            raise SimError(400, "invalid VM config: payload needs a kernel or firmware")
        cpus = config.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
        boot, maxv = cpus.get("boot_vcpus"), cpus.get("max_vcpus")
        if not (isinstance(boot, int) and isinstance(maxv, int) and 1 <= boot <= maxv):
            raise SimError(400, f"invalid VM config: boot_vcpus {boot} / max_vcpus {maxv}")
        memory = config.setdefault("memory", {"size": 512 << 20})
        if not isinstance(memory.get("size"), int) or memory["size"] <= 0:
            raise SimError(400, "invalid VM config: memory.size")
        memory.setdefault("hotplugged_size", 0)
        ids: set[str] = set()
        for key, prefix in _ADD_KINDS.values():
            for dev in config.get(key, []):
                if not dev.get("id"):
                    dev["id"] = f"{prefix}{self._counter}"
                    self._counter += 1
                if dev["id"] in ids:
                    raise SimError(400, f"invalid VM config: duplicate identifier {dev['id']}")
                ids.add(dev["id"])
        self.config = config
        self.state = "Created"
        return 204, None

    def delete(self, body: Json | None) -> tuple[int, Json | None]:
        self._teardown_vm()
        self.state, self.config, self.slots = None, {}, {}
        return 204, None

    def boot(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        if self.state != "Created":
            raise SimError(500, f"Error booting the VM: VM is {self.state}")
        payload = self.config["payload"]
        for key in ("kernel", "initramfs", "firmware"):
            if payload.get(key) and not os.path.isfile(payload[key]):
                raise SimError(500, f"Error booting the VM: cannot open {key} {payload[key]}")
        for disk in self.config.get("disks", []):
            if disk.get("path") and not os.path.exists(disk["path"]):
                raise SimError(500, f"Error booting the VM: cannot open disk {disk['path']}")
        for fs in self.config.get("fs", []):
            if not os.path.exists(str(fs.get("socket"))):
                raise SimError(500, f"Error booting the VM: cannot connect to {fs.get('socket')}")
        # Like the VMM: the built-in devices take the first slots, then the configured ones.
        for builtin in ("rng", "vsock"):
            if builtin in self.config:
                self._take_slot(f"_{builtin}")
        for key, _ in _ADD_KINDS.values():
            for dev in self.config.get(key, []):
                self._take_slot(str(dev["id"]))
        if "serial" in self.config:
            self.serial = Serial(self.config["serial"])
        vsock = self.config.get("vsock")
        if vsock:
            self.vsock = VsockMux(str(vsock["socket"]), self.options.agent_unix)
        self._set_vcpus(int(self.config["cpus"]["boot_vcpus"]))
        self.state = "Running"
        if self.serial is not None:
            self.serial.write(
                "[    0.000000] Linux version 6.1.0-sim (clh-sim) #1 SMP\n"
                f"[    0.000000] Command line: {payload.get('cmdline', '')}\n"
                f"[    0.010000] smpboot: Allowing {self.config['cpus']['max_vcpus']} CPUs\n"
                "vc-init: ready (simulated guest)\n"
            )
        return 204, None

    def _transition(self, need: str, to: str, what: str) -> tuple[int, Json | None]:
        self._require_vm()
        if self.state == "Created":
            raise SimError(404, f"cannot {what}: VM is not booted")
        if self.state != need:
            raise SimError(405, f"cannot {what}: VM is {self.state}")
        self.state = to
        return 204, None

    def pause(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        if self.state != "Running":
            raise SimError(405, f"cannot pause: VM is {self.state}")
        self.state = "Paused"
        return 204, None

    def resume(self, body: Json | None) -> tuple[int, Json | None]:
        return self._transition("Paused", "Running", "resume")

    def shutdown_vm(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        if self.state == "Created":
            raise SimError(405, "cannot shut down: VM is not booted")
        if self.serial is not None:
            self.serial.write("reboot: Power down\n")
        self._teardown_vm()
        self.state = "Shutdown"
        return 204, None

    def reboot(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        if self.state not in ("Running", "Paused"):
            raise SimError(405, f"cannot reboot: VM is {self.state}")
        return 204, None

    def resize(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        req = _need_body(body)
        cpus, memory = self.config["cpus"], self.config["memory"]
        vcpus, ram = req.get("desired_vcpus"), req.get("desired_ram")
        if vcpus is not None:
            if not isinstance(vcpus, int) or vcpus < 1:
                raise SimError(400, f"invalid desired_vcpus {vcpus!r}")
            if vcpus > cpus["max_vcpus"]:
                raise SimError(
                    500, f"Error resizing VM: desired vCPUs {vcpus} exceed max {cpus['max_vcpus']}"
                )
        if ram is not None:
            if not isinstance(ram, int) or ram <= 0:
                raise SimError(400, f"invalid desired_ram {ram!r}")
            if ram < self.memory_actual():
                raise SimError(500, "Error resizing VM: cannot remove ACPI hot-plugged memory")
            limit = int(memory["size"]) + int(memory.get("hotplug_size", 0))
            if ram > limit:
                raise SimError(
                    500, f"Error resizing VM: {ram} bytes exceed the hot-plug area ({limit})"
                )
        if vcpus is not None:
            cpus["boot_vcpus"] = vcpus
            if self.state in ("Running", "Paused"):
                self._set_vcpus(vcpus)
        if ram is not None:
            memory["hotplugged_size"] = ram - int(memory["size"])
        return 204, None

    def add(self, endpoint: str, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        if self.state == "Shutdown":
            raise SimError(404, "VM is shut down")
        dev = _need_body(body)
        key, prefix = _ADD_KINDS[endpoint]
        _check_device(endpoint, dev)
        if not dev.get("id"):
            dev["id"] = f"{prefix}{self._counter}"
            self._counter += 1
        dev_id = str(dev["id"])
        if dev_id in self._all_ids():
            raise SimError(409, f"identifier {dev_id} is not unique")
        if endpoint == "vm.add-disk" and dev.get("path") and not os.path.exists(dev["path"]):
            raise SimError(500, f"Error adding disk: cannot open {dev['path']}")
        if self.state == "Created":
            self.config.setdefault(key, []).append(dev)
            return 204, None
        slot = self._take_slot(dev_id)
        self.config.setdefault(key, []).append(dev)
        return 200, {"id": dev_id, "bdf": self._bdf(slot)}

    def remove_device(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        dev_id = _need_body(body).get("id")
        if not isinstance(dev_id, str) or dev_id not in self._all_ids():
            raise SimError(404, f"no device with identifier {dev_id!r}")
        for key, _ in _ADD_KINDS.values():
            if key in self.config:
                self.config[key] = [d for d in self.config[key] if d.get("id") != dev_id]
        self.slots.pop(dev_id, None)
        return 204, None

    def snapshot(self, body: Json | None) -> tuple[int, Json | None]:
        self._require_vm()
        if self.state != "Paused":
            raise SimError(405, f"cannot snapshot: VM is {self.state} (pause it first)")
        url = urlparse(str(_need_body(body).get("destination_url", "")))
        if url.scheme != "file" or not os.path.isdir(url.path):
            raise SimError(500, f"Error snapshotting: {url.geturl()!r} is not a file:// directory")
        target = Path(url.path)
        (target / "config.json").write_text(json.dumps(self.config))
        (target / "state.json").write_text(json.dumps({"simulator": True, "state": self.state}))
        (target / "memory-ranges").write_bytes(b"")
        return 204, None

    def routes(self) -> dict[tuple[str, str], Callable[[Json | None], tuple[int, Json | None]]]:
        table: dict[tuple[str, str], Callable[[Json | None], tuple[int, Json | None]]] = {
            ("GET", "vmm.ping"): self.ping,
            ("PUT", "vmm.shutdown"): self.shutdown_vmm,
            ("GET", "vm.info"): self.info,
            ("GET", "vm.counters"): self.counters,
            ("PUT", "vm.create"): self.create,
            ("PUT", "vm.delete"): self.delete,
            ("PUT", "vm.boot"): self.boot,
            ("PUT", "vm.pause"): self.pause,
            ("PUT", "vm.resume"): self.resume,
            ("PUT", "vm.shutdown"): self.shutdown_vm,
            ("PUT", "vm.reboot"): self.reboot,
            ("PUT", "vm.resize"): self.resize,
            ("PUT", "vm.remove-device"): self.remove_device,
            ("PUT", "vm.snapshot"): self.snapshot,
        }
        for endpoint in _ADD_KINDS:
            table[("PUT", endpoint)] = functools.partial(self.add, endpoint)
        return table


def _need_body(body: Json | None) -> Json:
    if body is None:
        raise SimError(400, "a JSON request body is required")
    return body


def _check_device(endpoint: str, dev: Json) -> None:
    """The checks the VMM does before touching anything (400 = "configuration not valid")."""
    if endpoint == "vm.add-disk" and not (dev.get("path") or dev.get("vhost_socket")):
        raise SimError(400, "invalid disk config: path or vhost_socket is required")
    if endpoint == "vm.add-device" and not dev.get("path"):
        raise SimError(400, "invalid device config: path is required")
    if endpoint == "vm.add-fs" and not (dev.get("tag") and dev.get("socket")):
        raise SimError(400, "invalid fs config: tag and socket are required")
    if endpoint == "vm.add-net" and dev.get("vhost_user") and not dev.get("vhost_socket"):
        raise SimError(400, "invalid net config: vhost_user needs vhost_socket")
    for key in ("readonly", "direct", "vhost_user", "iommu"):
        if key in dev and not isinstance(dev[key], bool):
            raise SimError(400, f"invalid config: {key} must be a boolean")


# -- HTTP -------------------------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    vmm: SimVmm


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def address_string(self) -> str:  # unix sockets have no peer address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        _log(format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        vmm = self.server.vmm
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        endpoint = path[len(_API_PREFIX) :] if path.startswith(_API_PREFIX) else ""
        delay = vmm.options.delays.get(endpoint, 0.0)
        if delay:
            time.sleep(delay)
        try:
            body: Json | None = None
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError as exc:
                    raise SimError(400, f"request body is not JSON: {exc}") from None
                if not isinstance(parsed, dict):
                    raise SimError(400, "request body must be a JSON object")
                body = parsed
            routes = vmm.routes()
            handler = routes.get((method, endpoint))
            if handler is None:
                if any(e == endpoint for _, e in routes):
                    raise SimError(405, f"method {method} not allowed on {path}")
                raise SimError(404, f"unknown endpoint {path}")
            with vmm.lock:
                status, reply = handler(body)
        except SimError as exc:
            self._reply(exc.status, str(exc).encode(), "text/plain")
            return
        except Exception as exc:  # a bug in the simulator: say so, keep serving
            self._reply(500, f"simulator error: {exc!r}".encode(), "text/plain")
            return
        if reply is None:
            self._reply(status, b"", "")
        else:
            self._reply(status, json.dumps(reply).encode(), "application/json")
        if endpoint == "vmm.shutdown":
            self.close_connection = True

    def _reply(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)
        self.wfile.flush()


def write_wrapper(path: Path, *, extra_args: Sequence[str] = ()) -> Path:
    """Write an executable ``cloud-hypervisor`` stand-in at ``path`` that runs this simulator
    with this interpreter (``extra_args`` are appended to the driver's argv, e.g.
    ``["--agent-unix", sock]``). Point ``boot.hypervisor_path`` at it."""
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from virtcontainers.testing.clh_sim import main\n"
        f"main(sys.argv[1:] + {list(extra_args)!r})\n"
    )
    path.chmod(0o755)
    return path


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> SimOptions:
    """Accept cloud-hypervisor's ``--api-socket path=P`` (or ``--api-socket=P``) and our own
    ``--agent-unix``, ``--sim-startup-delay``, ``--sim-delay E=S``; ignore everything else."""
    options = SimOptions(api_socket="")
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
        takes_next = not eq
        if name == "--api-socket":
            options.api_socket = dict(
                (kv.partition("=")[0], kv.partition("=")[2]) for kv in value.split(",") if "=" in kv
            ).get("path", value)
        elif name == "--agent-unix":
            options.agent_unix = value
        elif name == "--sim-startup-delay":
            options.startup_delay = float(value)
        elif name == "--sim-delay":
            endpoint, _, seconds = value.partition("=")
            options.delays[endpoint] = float(seconds)
        else:
            i += 1
            continue
        i += 2 if takes_next else 1
    if not options.api_socket:
        raise SystemExit("clh-sim: --api-socket path=PATH is required")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """Run the simulator until SIGTERM/SIGINT or ``vmm.shutdown``."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if options.startup_delay:
        time.sleep(options.startup_delay)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(options.api_socket)
    vmm = SimVmm(options, stop.set)
    server = _Server(options.api_socket, _Handler)
    server.vmm = vmm
    _log(f"serving the Cloud Hypervisor API on {options.api_socket}")
    thread = threading.Thread(target=server.serve_forever, name="http-server", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.2):
            pass
    finally:
        # Give an in-flight vmm.shutdown reply a moment to leave before the process goes.
        time.sleep(0.05)
        server.shutdown()
        server.server_close()
        with vmm.lock:
            vmm._teardown_vm()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(options.api_socket)
        _log("exiting")


if __name__ == "__main__":
    main()
