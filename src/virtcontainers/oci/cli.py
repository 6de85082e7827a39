"""``vc-runtime``: the OCI runtime command line (as runc and crun), for podman, conmon, CRI-O.

Each command imports only what it needs: podman and conmon call ``state`` and ``kill`` often,
and those read a record and talk to a unix socket. ``create`` boots the VM (see
:mod:`virtcontainers.oci.shim`).

Errors go to stderr as ``vc-runtime: MESSAGE`` (and to ``--log`` as runc's JSON lines with
``--log-format json``), exit status 1; an unknown id says "does not exist", the words
podman and CRI-O look for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from virtcontainers.errors import (
    ContainerError,
    ContainerStateError,
    VirtContainersError,
)
from virtcontainers.oci.state import DEFAULT_ROOT, OCI_VERSION, ContainerState, StateDir, Status

__all__ = ["main"]

VERSION = "0.1.0"
#: The configuration file used when neither --config nor $VC_RUNTIME_CONFIG names one
#: (podman passes the runtime almost no environment).
DEFAULT_CONFIG = Path("/etc/vc-runtime/configuration.toml")
#: How long ``delete`` waits for the VM of a container to be gone.
TEARDOWN_TIMEOUT = 60.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vc-runtime",
        description="An OCI runtime that runs each container in its own sandbox VM "
        "(virtcontainers). Use it from podman: podman run --runtime $(which vc-runtime) ...",
        epilog="State lives under --root (default /run/vc-runtime). See docs/oci-runtime.md.",
    )
    p.add_argument("--version", "-v", action="version",
                   version=f"vc-runtime version {VERSION}\nspec: {OCI_VERSION}")  # fmt: skip
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="state directory (default: $VC_RUNTIME_ROOT or /run/vc-runtime)",
    )
    p.add_argument("--log", type=Path, help="also write errors to this file")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument(
        "--systemd-cgroup",
        action="store_true",
        help="accepted for compatibility (cgroups apply to the VM, not here)",
    )
    p.add_argument("--debug", action="store_true", help="accepted for compatibility")
    p.add_argument("--config", type=Path, default=None,
                   help="a Kata-style configuration-*.toml for the VM (default: "
                   "$VC_RUNTIME_CONFIG, /etc/vc-runtime/configuration.toml, else the built "
                   "guest image)")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("create", help="create a container (boots its VM) from a bundle")
    c.add_argument("--bundle", "-b", default=".", help="the bundle directory (default: .)")
    c.add_argument("--pid-file", type=Path, help="write the container process's pid here")
    c.add_argument("--console-socket", help="unix socket that receives the pty master")
    c.add_argument("--no-pivot", action="store_true", help="accepted (the guest never pivots)")
    c.add_argument("--no-new-keyring", action="store_true", help="accepted")
    c.add_argument("--preserve-fds", type=int, default=0, help="accepted; only 0 is supported")
    c.add_argument("id")

    s = sub.add_parser("start", help="start the process of a created container")
    s.add_argument("id")
    s = sub.add_parser("state", help="print a container's state as JSON")
    s.add_argument("id")
    k = sub.add_parser("kill", help="send a signal (default SIGTERM) to the container process")
    k.add_argument("--all", "-a", action="store_true", help="to every process of the container")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM", help="name (TERM, SIGTERM) or number")
    d = sub.add_parser("delete", help="delete a stopped container (--force: any)")
    d.add_argument("--force", "-f", action="store_true", help="kill it first if it runs")
    d.add_argument("id")

    e = sub.add_parser("exec", help="run another process in a running container")
    e.add_argument("--process", "-p", type=Path, help="a process.json (else ARGS)")
    e.add_argument("--tty", "-t", action="store_true")
    e.add_argument("--console-socket")
    e.add_argument("--pid-file", type=Path)
    e.add_argument("--detach", "-d", action="store_true")
    e.add_argument("--cwd")
    e.add_argument("--env", "-e", action="append", default=[])
    e.add_argument("--user", "-u", help="UID[:GID]")
    e.add_argument("--preserve-fds", type=int, default=0)
    e.add_argument("id")
    e.add_argument("args", nargs=argparse.REMAINDER)

    for name, what in (("pause", "freeze the container's VM"), ("resume", "thaw it")):
        s = sub.add_parser(name, help=what)
        s.add_argument("id")
    s = sub.add_parser("ps", help="list the container's processes (in the guest)")
    s.add_argument("--format", "-f", choices=["table", "json"], default="table")
    s.add_argument("id")
    s.add_argument("ps_args", nargs=argparse.REMAINDER)
    s = sub.add_parser("list", help="list containers")
    s.add_argument("--format", "-f", choices=["table", "json"], default="table")
    s.add_argument("--quiet", "-q", action="store_true")
    sub.add_parser("features", help="print the runtime's features as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = args.root or Path(os.environ.get("VC_RUNTIME_ROOT") or DEFAULT_ROOT)
    states = StateDir(root.absolute())
    command: Callable[[argparse.Namespace, StateDir], int] = _COMMANDS[args.command]
    try:
        return command(args, states)
    except (VirtContainersError, ValueError) as exc:
        _error(args, str(exc))
        return 1


def _error(args: argparse.Namespace, message: str) -> None:
    print(f"vc-runtime: {message}", file=sys.stderr)
    if args.log is not None:
        with contextlib.suppress(OSError), open(args.log, "a") as log:
            if args.log_format == "json":
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                log.write(json.dumps({"level": "error", "msg": message, "time": when}) + "\n")
            else:
                log.write(f"error: {message}\n")


# -- commands ---------------------------------------------------------------------------


def _create(args: argparse.Namespace, states: StateDir) -> int:
    from virtcontainers.oci.create import create

    if args.preserve_fds:
        raise ContainerError("--preserve-fds is unsupported: host fds cannot enter the VM")
    config = args.config or (Path(p) if (p := os.environ.get("VC_RUNTIME_CONFIG")) else None)
    if config is None and DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    create(states, args.id, Path(args.bundle), pid_file=args.pid_file,
           console_socket=args.console_socket, config_file=config)  # fmt: skip
    return 0


def _start(args: argparse.Namespace, states: StateDir) -> int:
    state = states.load(args.id)
    if state.status != Status.CREATED:
        raise ContainerStateError(args.id, "start", state.status, [Status.CREATED])
    _ask(states, state, "start")
    return 0


def _state(args: argparse.Namespace, states: StateDir) -> int:
    print(json.dumps(states.load(args.id).oci(), indent=2))
    return 0


def _kill(args: argparse.Namespace, states: StateDir) -> int:
    from virtcontainers.oci.shim import stop_signal

    state = states.load(args.id)
    try:
        sig = stop_signal(args.signal)
    except (KeyError, ValueError):
        raise ContainerError(f"unknown signal {args.signal!r}", id=args.id) from None
    if state.status not in (Status.CREATED, Status.RUNNING, Status.PAUSED):
        raise ContainerStateError(args.id, "kill", state.status, [Status.CREATED, Status.RUNNING])
    try:
        _ask(states, state, f"kill {sig}" + (" all" if args.all else ""))
    except ContainerError:
        if sig != signal.SIGKILL or not StateDir.alive(state):
            raise
        # A container process that cannot answer (its VM hung) still dies by SIGKILL:
        # its sandbox server then removes the VM.
        os.kill(state.pid, signal.SIGKILL)
    return 0


def _delete(args: argparse.Namespace, states: StateDir) -> int:
    state = states.load(args.id)
    live = (Status.CREATING, Status.RUNNING, Status.PAUSED)
    if state.status in live and not args.force:
        raise ContainerStateError(args.id, "delete", state.status, ["stopped", "created"])
    if StateDir.alive(state) and state.pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGKILL)
        _wait(lambda: not StateDir.alive(state), 10.0)
    remove_vm(states, state.sandbox_id)
    shutil.rmtree(states.path(args.id), ignore_errors=True)
    return 0


def remove_vm(states: StateDir, sandbox_id: str) -> None:
    """Wait for the container's VM to be gone (its ephemeral server removes it when the
    container process ends); remove it directly if that does not happen in time."""
    run_dir = states.vm_run_dir(sandbox_id)
    if _wait(lambda: not run_dir.exists(), TEARDOWN_TIMEOUT):
        return
    import asyncio

    from virtcontainers.persist.store import StateStore
    from virtcontainers.sandbox import Sandbox

    async def remove() -> None:
        sandbox = await Sandbox.attach(sandbox_id, store=StateStore(states.vm_root))
        await sandbox.remove()

    asyncio.run(remove())


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _exec(args: argparse.Namespace, states: StateDir) -> int:
    from virtcontainers.oci.exec import exec_process, process_from_args

    state = states.load(args.id)
    if state.status != Status.RUNNING:
        raise ContainerStateError(args.id, "exec in", state.status, [Status.RUNNING])
    if args.process is not None:
        from virtcontainers.oci.spec import load_process

        process = load_process(args.process)
    else:
        process = process_from_args(args.args, cwd=args.cwd, env=args.env, user=args.user,
                                    tty=args.tty)  # fmt: skip
    return exec_process(states, state, process, console_socket=args.console_socket,
                        pid_file=args.pid_file, detach=args.detach)  # fmt: skip


def _pause_resume(args: argparse.Namespace, states: StateDir) -> int:
    state = states.load(args.id)
    want = Status.RUNNING if args.command == "pause" else Status.PAUSED
    if state.status != want:
        raise ContainerStateError(args.id, args.command, state.status, [want])
    _server_call(states, state, args.command)
    states.update(args.id, status=Status.PAUSED if args.command == "pause" else Status.RUNNING)
    return 0


def _ps(args: argparse.Namespace, states: StateDir) -> int:
    state = states.load(args.id)
    if state.status not in (Status.RUNNING, Status.PAUSED):
        raise ContainerStateError(args.id, "list the processes of", state.status,
                                  [Status.RUNNING])  # fmt: skip
    procs = _server_call(states, state, "processes")
    rows = procs if isinstance(procs, list) else []
    if args.format == "json":
        print(json.dumps([r.get("pid") for r in rows if isinstance(r, dict)]))
    else:
        print("PID\tCMD")
        for r in rows:
            if isinstance(r, dict):
                print(f"{r.get('pid')}\t{' '.join(map(str, r.get('argv', [])))}")
    return 0


def _list(args: argparse.Namespace, states: StateDir) -> int:
    found: list[ContainerState] = []
    for cid in states.ids():
        with contextlib.suppress(ContainerError):
            found.append(states.load(cid))
    if args.quiet:
        for s in found:
            print(s.id)
    elif args.format == "json":
        print(json.dumps([s.oci() for s in found]))
    else:
        print(f"{'ID':<20} {'PID':>8} {'STATUS':<8} {'BUNDLE':<40} CREATED")
        for s in found:
            pid = s.oci()["pid"]
            print(f"{s.id[:20]:<20} {pid:>8} {s.status:<8} {s.bundle:<40} {s.created}")
    return 0


def _features(args: argparse.Namespace, states: StateDir) -> int:
    from virtcontainers.oci.spec import RLIMIT_NUMBERS, VM_NAMESPACES

    print(json.dumps({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": [],
        "mountOptions": ["ro", "rw", "nosuid", "nodev", "noexec", "bind", "rbind"],
        "linux": {
            "namespaces": sorted(VM_NAMESPACES),
            "capabilities": [],
            "cgroup": {"v1": False, "v2": False, "systemd": False},
            "rlimits": sorted(RLIMIT_NUMBERS),
        },
        "annotations": {"io.virtcontainers.runtime": "one sandbox VM per container"},
    }, indent=2))  # fmt: skip
    return 0


# -- talking to the container process -------------------------------------------------------


def _ask(states: StateDir, state: ContainerState, request: str) -> str:
    """One request to the container process's control socket.

    Raises:
        ContainerError: it does not answer, or refused (its words).
    """
    from virtcontainers.oci.shim import SHIM_SOCKET

    path = states.path(state.id) / SHIM_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60.0)
        try:
            sock.connect(str(path))
            sock.sendall(request.encode() + b"\n")
            reply = sock.makefile("r").readline().strip()
        except OSError as exc:
            raise ContainerError(
                f"container {state.id}: its container process does not answer "
                f"({exc.strerror or exc})", id=state.id,
            ) from None  # fmt: skip
    if not reply.startswith("ok"):
        raise ContainerError(f"container {state.id}: {reply.removeprefix('error: ')}",
                             id=state.id)  # fmt: skip
    return reply


def _server_call(states: StateDir, state: ContainerState, op: str) -> object:
    import asyncio

    from virtcontainers.server.client import ServerClient

    async def call() -> object:
        client = await ServerClient.connect(states.vm_run_dir(state.sandbox_id))
        try:
            return await client.call(op)
        finally:
            await client.close()

    return asyncio.run(call())


_COMMANDS: dict[str, Callable[[argparse.Namespace, StateDir], int]] = {
    "create": _create,
    "start": _start,
    "state": _state,
    "kill": _kill,
    "delete": _delete,
    "exec": _exec,
    "pause": _pause_resume,
    "resume": _pause_resume,
    "ps": _ps,
    "list": _list,
    "features": _features,
}


if __name__ == "__main__":
    raise SystemExit(main())
