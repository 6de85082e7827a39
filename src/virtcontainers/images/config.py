"""An image's run config (OCI image-spec ``config``) and how a command line overrides it.

:func:`process_spec` is docker's rule set: the command replaces ``Cmd`` and is appended to
``Entrypoint`` (``--entrypoint`` replaces that), ``-e`` adds to or replaces ``Env`` entries,
``-w`` replaces ``WorkingDir``, ``-u`` replaces ``User``. ``User`` (``name``, ``uid``,
``name:group``, ``uid:gid``) is resolved against the image's own ``/etc/passwd`` and
``/etc/group``, which the store keeps beside the image, so it needs no guest round trip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from virtcontainers.errors import ConfigError
from virtcontainers.persist.records import ImageConfig

__all__ = ["ImageConfig", "ProcessSpec", "parse_env", "process_spec", "resolve_user"]

#: docker's default when an image sets no PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """What the agent is asked to run: argv, the whole environment, cwd, uid and gid."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0


def parse_env(items: Sequence[str], *, source: str = "--env") -> dict[str, str]:
    """``K=V`` items in order (later wins). A bare ``K`` is kept with an empty value.

    Raises:
        ConfigError: an item with an empty name.
    """
    env: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key:
            raise ConfigError(f"{source} {item!r}: the variable name is empty", field=source)
        env[key] = value
    return env


def _table(text: str, fields: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= fields and parts[0] and not line.startswith("#"):
            rows.append(parts)
    return rows


def resolve_user(user: str, passwd: str, group: str) -> tuple[int, int]:
    """``user`` (``name``, ``uid``, ``name:group``, ``uid:gid``, "" for root) as (uid, gid).

    A user found in ``passwd`` brings its primary group; a numeric uid that is not there
    gets gid 0 unless a group is given, as docker does.

    Raises:
        ConfigError: a name that is not in the image's /etc/passwd or /etc/group.
    """
    if not user:
        return 0, 0
    name, _, grp = user.partition(":")
    users = _table(passwd, 4)
    uid: int | None = None
    gid = 0
    if name.isdigit():
        uid = int(name)
        for row in users:
            if row[2] == name and row[3].isdigit():
                gid = int(row[3])
                break
    else:
        for row in users:
            if row[0] == name and row[2].isdigit() and row[3].isdigit():
                uid, gid = int(row[2]), int(row[3])
                break
        if uid is None:
            raise ConfigError(
                f"user {name!r} is not in the image's /etc/passwd", field="user",
                allowed=[r[0] for r in users][:20],
            )  # fmt: skip
    if grp:
        if grp.isdigit():
            gid = int(grp)
        else:
            groups = _table(group, 3)
            found = [int(r[2]) for r in groups if r[0] == grp and r[2].isdigit()]
            if not found:
                raise ConfigError(
                    f"group {grp!r} is not in the image's /etc/group", field="user",
                    allowed=[r[0] for r in groups][:20],
                )  # fmt: skip
            gid = found[0]
    return uid, gid


def process_spec(
    config: ImageConfig,
    argv: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    entrypoint: Sequence[str] | None = None,
    passwd: str = "",
    group: str = "",
) -> ProcessSpec:
    """The process to run for ``argv`` in an image with ``config`` (docker's rules).

    Raises:
        ConfigError: nothing to run (no command and the image has neither Entrypoint nor
            Cmd), or an unknown user/group.
    """
    entry = tuple(entrypoint) if entrypoint is not None else config.entrypoint
    # docker: a new entrypoint also drops the image's Cmd.
    cmd = tuple(argv) if argv else (config.cmd if entrypoint is None else ())
    full = (*entry, *cmd)
    if not full:
        raise ConfigError(
            "nothing to run: give a command (the image has no Entrypoint and no Cmd)",
            field="command",
        )
    merged = parse_env(config.env, source="image Env")
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.update(env or {})
    uid, gid = resolve_user(user if user is not None else config.user, passwd, group)
    merged.setdefault("HOME", _home(uid, passwd))
    cwd = workdir if workdir else (config.working_dir or "/")
    return ProcessSpec(argv=full, env=merged, cwd=cwd, uid=uid, gid=gid)


def _home(uid: int, passwd: str) -> str:
    for row in _table(passwd, 6):
        if row[2] == str(uid) and row[5]:
            return row[5]
    return "/root" if uid == 0 else "/"
