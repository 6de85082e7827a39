"""What the process commands share with the rest (`vc exec`, `vc ps` import only this and
click, not :mod:`.options`): the sandbox id argument, --json, docker's -e/-w/-u."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import click

from virtcontainers.errors import ConfigError

F = TypeVar("F", bound=Callable[..., object])


def compose(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying ``decorators`` so that they list in this order in --help."""

    def apply(function: F) -> F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


sandbox_id_argument = click.argument("sandbox_id", help="The sandbox id (see `vc ps`).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


#: ``-e``, ``-w``, ``-u`` as docker spells them (``vc run``, ``vc exec``).
process_options = compose(
    click.option(
        "--env",
        "-e",
        multiple=True,
        help="Set K=V in the process environment (K alone: from ours).",
    ),
    click.option("--workdir", "-w", help="Working directory in the guest."),
    click.option(
        "--user", "-u", help="name, uid, name:group or uid:gid (the image's /etc/passwd)."
    ),
)


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


#: The busybox guest's PATH (its init exports it), under ``-e`` items without an image.
GUEST_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"


def plain_env(env: dict[str, str] | None) -> dict[str, str] | None:
    """``-e`` for a sandbox without an image: added to the guest's PATH, not replacing it."""
    return {"PATH": GUEST_PATH, **env} if env else None
