"""`vc exec` without click: the process it starts (docker's ``-e/-w/-u`` over the image's
config) and how it reaches the guest (the sandbox's server, or a direct reattach when the
server is gone). :mod:`.processes` (the click command) and :mod:`.fast` (its fast path) both
run :func:`run_exec`; nothing here imports click, the store's documents or asyncio unless
the server is gone (bench/cli.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import closing
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from virtcontainers.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from virtcontainers.server.sync_client import ServerConnection

#: The busybox guest's PATH (its init exports it), under ``-e`` items without an image.
GUEST_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"


def env_items(items: Sequence[str]) -> dict[str, str] | None:
    """``-e`` items as a mapping; a bare ``K`` takes our own ``$K`` (skipped when unset).

    Raises:
        ConfigError: an item with an empty name.
    """
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise ConfigError(f"--env {item!r}: the variable name is empty", field="--env")
        if sep:
            out[key] = value
        elif key in os.environ:
            out[key] = os.environ[key]
    return out


def plain_env(env: dict[str, str] | None) -> dict[str, str] | None:
    """``-e`` for a sandbox without an image: added to the guest's PATH, not replacing it."""
    return {"PATH": GUEST_PATH, **env} if env else None


class ExecHow(NamedTuple):
    """The environment, working directory and ids an exec gets (image defaults applied)."""

    env: dict[str, str] | None
    cwd: str | None
    uid: int | None
    gid: int | None


class ExecCall(NamedTuple):
    """What `vc exec` was asked to run, its options parsed (``env``: ``-e`` items resolved)."""

    argv: list[str]
    tty: bool
    interactive: bool
    detach: bool
    env: dict[str, str] | None
    workdir: str | None
    user: str | None


def run_exec(sandbox_id: str, call: ExecCall) -> NoReturn:
    """Run ``call`` in the sandbox as `vc exec` does and exit with its exit code (``-d``:
    print its guest pid and exit 0).

    Raises:
        StoreError: no such sandbox. StateError: it is not running. ConfigError: ``-u``
            unknown to the image. AgentError: the agent or the server failed.
    """
    from virtcontainers.cli.streams import claim_stdin

    claim_stdin()
    connection = connect(sandbox_id)
    if connection is None:  # no server (it died): reattach directly
        import asyncio

        how = exec_process(sandbox_id, call.env, call.workdir, call.user)
        sys.exit(asyncio.run(_direct_exec(sandbox_id, call, how)))
    exec_through(connection, sandbox_id, call)


def exec_through(connection: ServerConnection, sandbox_id: str, call: ExecCall) -> NoReturn:
    """:func:`run_exec` through ``connection`` to the sandbox's server (closed at exit).

    Raises:
        ConfigError: ``-u`` unknown to the image. AgentError: the agent or the server failed.
    """
    from virtcontainers.agent.protocol import AgentRequestError, ExecSpec
    from virtcontainers.cli.streams import exec_failed, follow_blocking, terminal_size

    with closing(connection):
        how = served_exec_process(connection, sandbox_id, call.env, call.workdir, call.user)
        size = terminal_size() if call.tty else None
        spec = ExecSpec(call.argv, how.env, how.cwd, how.uid, how.gid, tty=call.tty, tty_size=size)
        try:
            proc = connection.start_exec(
                spec, keep=call.detach, no_stdin=call.detach and not call.interactive
            )
        except AgentRequestError as exc:
            sys.exit(exec_failed(exc))
        if call.detach:
            print(proc.pid)
            sys.exit(0)
        sys.exit(follow_blocking(proc, tty=call.tty, interactive=call.interactive))


def exec_process(
    sandbox_id: str, env: dict[str, str] | None, workdir: str | None, user: str | None
) -> ExecHow:
    """``-e/-w/-u`` over the sandbox's image config, read from its record; without an image
    ``-e`` adds to the guest's PATH.

    Raises:
        StoreError: no such sandbox, or its record is unreadable. ConfigError: a bad ``-u``.
    """
    from virtcontainers.images.sandbox_image import SandboxImage, exec_defaults
    from virtcontainers.persist.store import StateStore

    doc = StateStore().load(sandbox_id)
    image = None if doc.image is None else SandboxImage.from_record(doc.image)
    full, cwd, uid, gid = exec_defaults(image, env, workdir, None, None, user)
    return ExecHow(full if image is not None else plain_env(full), cwd, uid, gid)


def served_exec_process(
    connection: ServerConnection,
    sandbox_id: str,
    env: dict[str, str] | None,
    workdir: str | None,
    user: str | None,
) -> ExecHow:
    """:func:`exec_process` by the sandbox's server, which holds its image config: one
    round trip instead of loading the record (msgspec and the records are ~15 ms of a
    `vc exec`, bench/cli.py). A server older than this op: from the record.

    Raises:
        ConfigError: a bad ``-u``. AgentError: a malformed reply.
    """
    try:
        got = connection.call("exec_defaults", env=env, cwd=workdir, user=user)
    except AgentError:
        return exec_process(sandbox_id, env, workdir, user)
    if not isinstance(got, dict):
        raise AgentError(f"malformed exec_defaults reply {got!r}")
    full = got["env"] if got["image"] else plain_env(got["env"])
    return ExecHow(full, got["cwd"], got["uid"], got["gid"])


async def _direct_exec(sandbox_id: str, call: ExecCall, how: ExecHow) -> int:
    from virtcontainers.cli.streams import stream_exec, terminal_size
    from virtcontainers.sandbox import Sandbox

    sandbox = await Sandbox.attach(sandbox_id)
    try:
        if call.detach:
            await sandbox.exec_stream(call.argv, detach=True)  # raises: needs a server
        size = terminal_size() if call.tty else None
        starting = sandbox.exec_stream(
            call.argv, tty=call.tty, tty_size=size, env=how.env, cwd=how.cwd, uid=how.uid,
            gid=how.gid,
        )  # fmt: skip
        return await stream_exec(starting, tty=call.tty, interactive=call.interactive)
    finally:
        await sandbox.close()


def connect(sandbox_id: str, *, timeout: float = 30.0) -> ServerConnection | None:
    """A connection to the sandbox's server, found without loading its record; ``None``
    when none answers. ``timeout`` bounds each of its requests.

    Raises:
        StoreError: an invalid sandbox id, or an unusable ``$VC_RUN_ROOT``.
    """
    from virtcontainers.persist.layout import default_root, sandbox_dir
    from virtcontainers.server.sync_client import ServerConnection

    try:
        return ServerConnection.connect(sandbox_dir(default_root(), sandbox_id), timeout=timeout)
    except AgentError:
        return None
