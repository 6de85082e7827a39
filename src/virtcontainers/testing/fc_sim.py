"""A Firecracker simulator: a TEST DOUBLE, not a VMM. It runs no guest.

It serves Firecracker's REST API (the subset the driver and its tests use) on a unix
socket with Firecracker's rules, so the driver's real launch, configuration, hot-plug,
pause/resume, snapshot and stop paths run where Firecracker or KVM is missing:

* pre-boot resources (machine config, boot source, drives, NICs, vsock, logger, metrics)
  only before ``InstanceStart``, then 400 with Firecracker's ``fault_message``;
  ``PATCH /drives`` and ``PATCH /network-interfaces`` only after it; ``PATCH /vm``
  (Paused/Resumed) only once started; ``PUT /snapshot/create`` only when paused (it writes
  the state file and a sparse memory file of the guest's size);
* ``InstanceStart`` needs a boot source whose kernel exists and (stricter than Firecracker,
  which defaults it) a machine config; drive and log paths must exist, as Firecracker opens
  them; request bodies are checked field by field and unknown fields are refused, as
  Firecracker's deserializer does; unknown paths and malformed JSON get 400;
* once started it looks like a VM from the host: threads named ``fc_vcpu N``, log lines in
  the logger FIFO, a metrics line in the metrics FIFO, and a hybrid vsock socket answering
  ``CONNECT <port>`` — proxied to a host unix socket with ``--agent-unix PATH`` (e.g. a
  host-run ``vc-agent --unix``), else closed as Firecracker does when no guest listens;
* SIGTERM/SIGINT end it; the ``SendCtrlAltDel`` action ends it too, like a guest that
  powers off (for ``stop_sandbox(wait_only=True)`` tests). Like Firecracker it refuses to
  start when the API socket path already exists, and it leaves its sockets behind on exit.

Not simulated: the guest, networking (taps are not opened), rate limiting, snapshot
loading, balloon, MMDS, entropy, pmem, CPU templates.

Run: ``python -m virtcontainers.testing.fc_sim --api-sock PATH [--id ID] [--agent-unix
PATH]``; other Firecracker flags are accepted and ignored. ``--sim-root DIR`` resolves
absolute paths under DIR, standing in for the jailer's chroot; ``--sim-ignore-sigterm`` plays
a hung VMM (only SIGKILL ends it). Tests point
``boot.hypervisor_path`` at a script made by :func:`write_launcher`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import http.server
import json
import os
import re
import signal
import socket
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any

from virtcontainers.testing._hvsock import accept_loop, read_connect, splice

__all__ = ["VERSION", "main", "write_launcher"]

VERSION = "1.10.1-sim"
_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace")
_AFTER_START = "The requested operation is not supported after starting the microVM."
_BEFORE_START = "The requested operation is not supported before starting the microVM."
_PR_SET_NAME = 15
#: Firecracker numbers host-side ends of vsock connections from 2^30.
_FIRST_LOCAL_PORT = 1 << 30

# Field rules per body kind: (required, optional, types). Unknown fields are refused.
_STR, _INT, _BOOL, _OBJ = str, int, bool, dict
_BODIES: dict[str, tuple[set[str], set[str], dict[str, type]]] = {
    "MachineConfiguration": (
        {"vcpu_count", "mem_size_mib"},
        {"smt", "track_dirty_pages", "cpu_template", "huge_pages"},
        {"vcpu_count": _INT, "mem_size_mib": _INT, "smt": _BOOL, "track_dirty_pages": _BOOL},
    ),
    "BootSource": (
        {"kernel_image_path"},
        {"boot_args", "initrd_path"},
        {"kernel_image_path": _STR, "boot_args": _STR, "initrd_path": _STR},
    ),
    "Drive": (
        {"drive_id", "is_root_device"},
        {
            "partuuid",
            "cache_type",
            "is_read_only",
            "path_on_host",
            "rate_limiter",
            "io_engine",
            "socket",
        },
        {
            "drive_id": _STR,
            "is_root_device": _BOOL,
            "is_read_only": _BOOL,
            "path_on_host": _STR,
            "rate_limiter": _OBJ,
            "partuuid": _STR,
        },
    ),
    "PartialDrive": (
        {"drive_id"},
        {"path_on_host", "rate_limiter"},
        {"drive_id": _STR, "path_on_host": _STR, "rate_limiter": _OBJ},
    ),
    "NetworkInterface": (
        {"iface_id", "host_dev_name"},
        {"guest_mac", "rx_rate_limiter", "tx_rate_limiter", "mtu"},
        {
            "iface_id": _STR,
            "host_dev_name": _STR,
            "guest_mac": _STR,
            "rx_rate_limiter": _OBJ,
            "tx_rate_limiter": _OBJ,
            "mtu": _INT,
        },
    ),
    "PartialNetworkInterface": (
        {"iface_id"},
        {"rx_rate_limiter", "tx_rate_limiter"},
        {"iface_id": _STR, "rx_rate_limiter": _OBJ, "tx_rate_limiter": _OBJ},
    ),
    "Vsock": (
        {"guest_cid", "uds_path"},
        {"vsock_id"},
        {"guest_cid": _INT, "uds_path": _STR, "vsock_id": _STR},
    ),
    "Logger": (
        set(),
        {"log_path", "level", "show_level", "show_log_origin", "module"},
        {"log_path": _STR, "level": _STR, "show_level": _BOOL, "show_log_origin": _BOOL},
    ),
    "Metrics": ({"metrics_path"}, {"emit_id", "properties"}, {"metrics_path": _STR}),
    "InstanceActionInfo": ({"action_type"}, set(), {"action_type": _STR}),
    "Vm": ({"state"}, set(), {"state": _STR}),
    "SnapshotCreateParams": (
        {"snapshot_path", "mem_file_path"},
        {"snapshot_type"},
        {"snapshot_path": _STR, "mem_file_path": _STR, "snapshot_type": _STR},
    ),
}


class Fault(Exception):
    """An error reply: ``{"fault_message": ...}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _same_id(doc: dict[str, Any], key: str, ident: str) -> None:
    """The body's id (``key``) must be the one in the request's path."""
    if doc[key] != ident:
        raise Fault("The id from the path does not match the id from the body!")


def _check_body(body: object, kind: str) -> dict[str, Any]:
    """Firecracker's (serde) checks: an object, required fields, no unknown fields, types."""
    if not isinstance(body, dict):
        raise Fault(
            f"An error occurred when deserializing the json body of a request: "
            f"invalid type: expected struct {kind}."
        )
    required, optional, types = _BODIES[kind]
    for key in body:
        if key not in required | optional:
            expected = ", ".join(f"`{k}`" for k in sorted(required | optional))
            raise Fault(
                "An error occurred when deserializing the json body of a request: "
                f"unknown field `{key}`, expected one of {expected}."
            )
    for key in sorted(required):
        if key not in body:
            raise Fault(
                "An error occurred when deserializing the json body of a request: "
                f"missing field `{key}`."
            )
    for key, want in types.items():
        value = body.get(key)
        if value is None:
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok or (want is int and value < 0):
            raise Fault(
                "An error occurred when deserializing the json body of a request: "
                f"invalid type for `{key}`: {value!r}, expected {want.__name__}."
            )
    for key in ("rate_limiter", "rx_rate_limiter", "tx_rate_limiter"):
        if key in body:
            _check_rate_limiter(body[key])
    return body


def _check_rate_limiter(limiter: object) -> None:
    if not isinstance(limiter, dict) or set(limiter) - {"bandwidth", "ops"}:
        raise Fault(f"Invalid rate limiter: {limiter!r}")
    for bucket in limiter.values():
        if not isinstance(bucket, dict) or set(bucket) - {"size", "refill_time", "one_time_burst"}:
            raise Fault(f"Invalid token bucket: {bucket!r}")
        for field in ("size", "refill_time"):
            value = bucket.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise Fault(f"Invalid token bucket field `{field}`: {value!r}")


def set_thread_name(name: str) -> None:
    """Name the calling OS thread (``/proc/<pid>/task/<tid>/comm``), as Firecracker does."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


class Vm:
    """The simulated microVM: configuration, state machine and host-side effects."""

    def __init__(self, instance_id: str, root: str, agent_unix: str) -> None:
        self.id = instance_id
        self.root = root
        self.agent_unix = agent_unix
        self.lock = threading.Lock()
        self.state = "Not started"
        self.machine: dict[str, Any] = {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
            "huge_pages": "None",
        }
        self.machine_set = False
        self.boot: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.log_fd: int | None = None
        self.log_level = "Info"
        self.metrics_fd: int | None = None
        self.resumed = threading.Event()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.vsock_listener: socket.socket | None = None
        self.next_port = _FIRST_LOCAL_PORT
        self.requests = 0
        #: Ends the process (set by :func:`main`): a guest power-off.
        self.power_off: Any = lambda: None

    # -- host paths and outputs -----------------------------------------------------------

    def host(self, path: str) -> str:
        """A path as Firecracker would open it (under ``--sim-root`` when jailed)."""
        if self.root and path.startswith("/"):
            return os.path.join(self.root, path.lstrip("/"))
        return path

    def log(self, level: str, message: str, thread: str = "fc_api") -> None:
        if self.log_fd is None or _LEVELS.index(level) > _LEVELS.index(self.log_level):
            return
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        line = f"{stamp} [{self.id}:{thread}:{level.upper()}] {message}\n"
        with contextlib.suppress(OSError):  # a full FIFO drops lines, as Firecracker's does
            os.write(self.log_fd, line.encode())

    def flush_metrics(self) -> None:
        if self.metrics_fd is None:
            return
        doc = {
            "utc_timestamp_ms": int(datetime.datetime.now(datetime.UTC).timestamp() * 1000),
            "api_server": {"requests": self.requests},
            "vcpu": {"count": len(self.threads)},
            "simulated": True,
        }
        with contextlib.suppress(OSError):
            os.write(self.metrics_fd, (json.dumps(doc) + "\n").encode())

    def _open_output(self, path: str, what: str) -> int:
        try:
            # Firecracker opens its log/metrics path read-write and non-blocking, so a FIFO
            # without a reader does not block it.
            return os.open(self.host(path), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise Fault(f"Failed to initialize the {what}: {exc.strerror} ({path})") from None

    # -- the API ------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: object) -> tuple[int, object]:
        with self.lock:
            self.requests += 1
            return self._route(method, path, body)

    def _route(self, method: str, path: str, body: object) -> tuple[int, object]:
        if (method, path) == ("GET", "/"):
            return 200, {
                "id": self.id,
                "state": self.state,
                "vmm_version": VERSION,
                "app_name": "Firecracker",
            }
        if (method, path) == ("GET", "/version"):
            return 200, {"firecracker_version": VERSION}
        if (method, path) == ("GET", "/machine-config"):
            return 200, dict(self.machine)
        if (method, path) == ("GET", "/vm/config"):
            full: dict[str, object] = {
                "machine-config": self.machine,
                "drives": list(self.drives.values()),
                "network-interfaces": list(self.ifaces.values()),
            }
            if self.boot is not None:
                full["boot-source"] = self.boot
            if self.vsock is not None:
                full["vsock"] = self.vsock
            return 200, full
        simple = {
            ("PUT", "/machine-config"): self._put_machine,
            ("PATCH", "/machine-config"): self._patch_machine,
            ("PUT", "/boot-source"): self._put_boot,
            ("PUT", "/vsock"): self._put_vsock,
            ("PUT", "/logger"): self._put_logger,
            ("PUT", "/metrics"): self._put_metrics,
            ("PUT", "/actions"): self._action,
            ("PATCH", "/vm"): self._patch_vm,
            ("PUT", "/snapshot/create"): self._snapshot_create,
            ("PUT", "/snapshot/load"): self._snapshot_load,
        }
        if (method, path) in simple:
            simple[(method, path)](body)
            return 204, None
        match = re.fullmatch(r"/(drives|network-interfaces)/([^/]+)", path)
        if match and method in ("PUT", "PATCH"):
            kind, ident = match.groups()
            if kind == "drives":
                (self._put_drive if method == "PUT" else self._patch_drive)(ident, body)
            else:
                (self._put_iface if method == "PUT" else self._patch_iface)(ident, body)
            return 204, None
        raise Fault(f"Invalid request method and/or path: {method} {path}.")

    def _pre_boot(self) -> None:
        if self.state != "Not started":
            raise Fault(_AFTER_START)

    def _post_boot(self) -> None:
        if self.state == "Not started":
            raise Fault(_BEFORE_START)

    def _put_machine(self, body: object) -> None:
        self._pre_boot()
        doc = _check_body(body, "MachineConfiguration")
        self._set_machine({**self.machine, "smt": False, "track_dirty_pages": False, **doc})

    def _patch_machine(self, body: object) -> None:
        self._pre_boot()
        if not isinstance(body, dict):
            raise Fault("Invalid machine configuration body.")
        _, optional, _ = _BODIES["MachineConfiguration"]
        unknown = set(body) - optional - {"vcpu_count", "mem_size_mib"}
        if unknown:
            raise Fault(f"unknown field `{sorted(unknown)[0]}`")
        self._set_machine({**self.machine, **body})

    def _set_machine(self, doc: dict[str, Any]) -> None:
        vcpus, mem = doc["vcpu_count"], doc["mem_size_mib"]
        if not isinstance(vcpus, int) or not 1 <= vcpus <= 32:
            raise Fault(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even "
                "number when SMT is enabled."
            )
        if doc.get("smt") and vcpus > 1 and vcpus % 2:
            raise Fault(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even "
                "number when SMT is enabled."
            )
        if not isinstance(mem, int) or mem <= 0:
            raise Fault("The memory size (MiB) is invalid.")
        self.machine = doc
        self.machine_set = True

    def _put_boot(self, body: object) -> None:
        self._pre_boot()
        doc = _check_body(body, "BootSource")
        for key in ("kernel_image_path", "initrd_path"):
            if key in doc and not os.path.isfile(self.host(doc[key])):
                what = "kernel" if key == "kernel_image_path" else "initrd"
                raise Fault(
                    f"The {what} file cannot be opened: No such file or directory (os error 2)"
                )
        self.boot = doc

    def _put_drive(self, ident: str, body: object) -> None:
        self._pre_boot()
        doc = _check_body(body, "Drive")
        _same_id(doc, "drive_id", ident)
        path = doc.get("path_on_host")
        if path is None:
            raise Fault("Unable to create the block device: missing path_on_host.")
        self._backing_file(path, "create the virtio")
        if doc["is_root_device"] and any(
            d["is_root_device"] for k, d in self.drives.items() if k != ident
        ):
            raise Fault("A root block device already exists!")
        self.drives[ident] = doc

    def _backing_file(self, path: str, action: str) -> None:
        """Firecracker's error when a drive's file does not exist (``action``: "create the
        virtio" or "patch the", as its messages say)."""
        if not os.path.exists(self.host(path)):
            raise Fault(
                f"Unable to {action} block device: BackingFile(Os {{ code: 2, kind: "
                f'NotFound, message: "No such file or directory" }}, "{path}")'
            )

    def _patch_drive(self, ident: str, body: object) -> None:
        self._post_boot()
        doc = _check_body(body, "PartialDrive")
        _same_id(doc, "drive_id", ident)
        if ident not in self.drives:
            raise Fault(f"Unable to patch the block device: drive {ident} not found.")
        path = doc.get("path_on_host")
        if path is not None:
            self._backing_file(path, "patch the")
            self.drives[ident] = {**self.drives[ident], "path_on_host": path}
            self.log("Info", f"Drive {ident} backing file updated to {path}")

    def _put_iface(self, ident: str, body: object) -> None:
        self._pre_boot()
        doc = _check_body(body, "NetworkInterface")
        _same_id(doc, "iface_id", ident)
        mac = doc.get("guest_mac")
        if mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
            raise Fault(f"Invalid MAC address: {mac}")
        for other_id, other in self.ifaces.items():
            if other_id != ident and other["host_dev_name"] == doc["host_dev_name"]:
                raise Fault(f"The host device name {doc['host_dev_name']} is already in use.")
        self.ifaces[ident] = doc

    def _patch_iface(self, ident: str, body: object) -> None:
        self._post_boot()
        doc = _check_body(body, "PartialNetworkInterface")
        if doc["iface_id"] != ident or ident not in self.ifaces:
            raise Fault(f"Unable to patch the network interface {ident}: not found.")
        self.ifaces[ident] = {**self.ifaces[ident], **doc}

    def _put_vsock(self, body: object) -> None:
        self._pre_boot()
        doc = _check_body(body, "Vsock")
        if doc["guest_cid"] < 3:
            raise Fault(f"Invalid guest CID {doc['guest_cid']}: must be 3 or higher.")
        self.vsock = doc

    def _put_logger(self, body: object) -> None:
        self._pre_boot()
        doc = _check_body(body, "Logger")
        level = str(doc.get("level", "Info")).capitalize()
        if level not in _LEVELS and level != "Off":
            raise Fault(f"Invalid log level: {doc.get('level')}")
        if "log_path" in doc:
            if self.log_fd is not None:
                os.close(self.log_fd)
            self.log_fd = self._open_output(doc["log_path"], "logger")
        self.log_level = "Error" if level == "Off" else level
        self.log("Info", f"Running Firecracker v{VERSION}", thread="main")

    def _put_metrics(self, body: object) -> None:
        doc = _check_body(body, "Metrics")
        if self.metrics_fd is not None:
            raise Fault("Reinitialization of metrics not allowed.")
        self.metrics_fd = self._open_output(doc["metrics_path"], "metrics system")

    def _action(self, body: object) -> None:
        doc = _check_body(body, "InstanceActionInfo")
        action = doc["action_type"]
        if action == "InstanceStart":
            self._pre_boot()
            self._start()
        elif action == "FlushMetrics":
            self._post_boot()
            self.flush_metrics()
        elif action == "SendCtrlAltDel":
            self._post_boot()
            self.log("Info", "Guest requested a shutdown (Ctrl+Alt+Del)", thread="main")
            # The guest powers off a moment later; Firecracker then exits.
            threading.Timer(0.05, self.power_off).start()
        else:
            raise Fault(f"Invalid action type: {action}")

    def _start(self) -> None:
        if self.boot is None:
            raise Fault("Cannot start microvm without kernel configuration.")
        if not self.machine_set:
            raise Fault("Cannot start microvm without machine configuration (simulator rule).")
        if not os.path.isfile(self.host(self.boot["kernel_image_path"])):
            raise Fault("Start microvm error: Kernel image not found.")
        if self.vsock is not None:
            uds = self.host(self.vsock["uds_path"])
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(uds)
            except OSError as exc:
                listener.close()
                raise Fault(
                    f"Start microvm error: Cannot create vsock device: {exc.strerror} ({uds})"
                ) from None
            listener.listen(16)
            self.vsock_listener = listener
            _thread(self._vsock_accept, "fc_vsock")
        self.resumed.set()
        for index in range(int(self.machine["vcpu_count"])):
            self.threads.append(_thread(self._vcpu, f"fc_vcpu {index}"))
        self.state = "Running"
        self.log("Info", "Successfully started microvm", thread="main")
        self.flush_metrics()

    def _vcpu(self) -> None:
        while not self.stopping.is_set():
            if self.resumed.wait(0.2):
                self.stopping.wait(0.2)  # "running guest code"

    def _patch_vm(self, body: object) -> None:
        doc = _check_body(body, "Vm")
        self._post_boot()
        if doc["state"] == "Paused":
            self.resumed.clear()
            self.state = "Paused"
            self.log("Info", "The microVM has been paused")
        elif doc["state"] == "Resumed":
            self.resumed.set()
            self.state = "Running"
            self.log("Info", "The microVM has been resumed")
        else:
            raise Fault(f"Invalid VM state: {doc['state']}")

    def _snapshot_create(self, body: object) -> None:
        doc = _check_body(body, "SnapshotCreateParams")
        self._post_boot()
        if self.state != "Paused":
            raise Fault(
                "Create snapshot error: Cannot save the microVM state: the microVM is not paused."
            )
        kind = doc.get("snapshot_type", "Full")
        if kind not in ("Full", "Diff"):
            raise Fault(f"Invalid snapshot type: {kind}")
        if kind == "Diff" and not self.machine.get("track_dirty_pages"):
            raise Fault("Diff snapshots require track_dirty_pages in the machine config.")
        state = {
            "simulated": True,
            "machine-config": self.machine,
            "boot-source": self.boot,
            "drives": self.drives,
            "network-interfaces": self.ifaces,
            "vsock": self.vsock,
        }
        try:
            Path(self.host(doc["snapshot_path"])).write_text(json.dumps(state))
            with open(self.host(doc["mem_file_path"]), "wb") as mem:
                mem.truncate(int(self.machine["mem_size_mib"]) << 20)  # sparse
        except OSError as exc:
            raise Fault(f"Create snapshot error: {exc.strerror}: {exc.filename}") from None
        self.log("Info", f"Snapshot written to {doc['snapshot_path']}")

    def _snapshot_load(self, body: object) -> None:
        raise Fault("Loading a snapshot is not supported by this simulator.")

    # -- hybrid vsock --------------------------------------------------------------------

    def _vsock_accept(self) -> None:
        accept_loop(
            lambda: None if self.stopping.is_set() else self.vsock_listener, self._vsock_conn
        )

    def _vsock_conn(self, conn: socket.socket) -> None:
        with conn:
            if read_connect(conn) is None or not self.agent_unix or self.state == "Paused":
                return  # no guest listener on that port: Firecracker closes the connection
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.agent_unix)
            except OSError:
                return
            with self.lock:
                port, self.next_port = self.next_port, self.next_port + 1
            conn.sendall(f"OK {port}\n".encode())
            splice(conn, upstream)

    def shutdown(self) -> None:
        self.stopping.set()
        self.resumed.set()
        if self.vsock_listener is not None:
            with contextlib.suppress(OSError):
                self.vsock_listener.shutdown(socket.SHUT_RDWR)
            self.vsock_listener.close()


def _thread(target: Any, name: str) -> threading.Thread:
    def run() -> None:
        set_thread_name(name)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        return  # requests go to the logger FIFO, like Firecracker's

    def _serve(self) -> None:
        vm = self.server.vm
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        try:
            body: object = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise Fault(
                        f"An error occurred when deserializing the json body of a request: {exc}."
                    ) from None
            elif self.command in ("PUT", "PATCH"):
                raise Fault("Empty request body.")
            vm.log(
                "Debug",
                f'The API server received a {self.command.capitalize()} request on "{path}" '
                f'with body "{raw.decode(errors="replace")}".',
            )
            status, reply = vm.handle(self.command, path, body)
        except Fault as fault:
            status, reply = fault.status, {"fault_message": fault.message}
            vm.log("Error", f"Received Error. Status code: {status}. Message: {fault.message}")
        self.send_response(status)
        if status == 204:
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(reply).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _serve


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, vm: Vm) -> None:
        self.vm = vm
        super().__init__(path, _Handler)


def main(argv: list[str] | None = None) -> None:
    """Run the simulator until SIGTERM/SIGINT (or a guest-driven ``SendCtrlAltDel``)."""
    parser = argparse.ArgumentParser(
        prog="fc_sim", description="Firecracker API simulator (a test double: runs no guest)"
    )
    parser.add_argument("--api-sock", default="/run/firecracker.socket")
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--agent-unix", default="", help="proxy vsock CONNECTs to this socket")
    parser.add_argument("--sim-root", default="", help="resolve absolute paths under this dir")
    parser.add_argument(
        "--sim-ignore-sigterm", action="store_true", help="ignore SIGTERM (a hung VMM)"
    )
    args, ignored = parser.parse_known_args(argv)
    set_thread_name("firecracker")
    vm = Vm(args.id, args.sim_root, args.agent_unix)
    api_sock = vm.host(args.api_sock)
    if os.path.exists(api_sock):
        print(
            f"Failed to open the API socket at: {api_sock}. Check that it is not already used.",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)
    server = _Server(api_sock, vm)
    print(f"Running Firecracker v{VERSION} (simulator; ignored flags: {ignored})", flush=True)

    def power_off() -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    def stop(signum: int, frame: object) -> None:
        power_off()

    vm.power_off = power_off

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.sim_ignore_sigterm else stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        vm.shutdown()
        server.server_close()
    print("Firecracker exiting", flush=True)


def write_launcher(path: Path, *extra_args: str) -> Path:
    """Write an executable that runs the simulator with this Python (for
    ``boot.hypervisor_path``); ``extra_args`` are appended to its command line."""
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from virtcontainers.testing.fc_sim import main\n"
        f"main(sys.argv[1:] + {list(extra_args)!r})\n"
    )
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    main()
