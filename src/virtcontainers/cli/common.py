"""What the process commands share with the rest (`vc exec`, `vc ps` import only this and
click, not :mod:`.options`): the sandbox id argument, --json, docker's -e/-w/-u (their
values are :mod:`.execution`'s, re-exported here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from virtcontainers.cli.execution import GUEST_PATH, env_items, plain_env

__all__ = [
    "GUEST_PATH", "compose", "env_items", "json_option", "plain_env", "process_options",
    "sandbox_id_argument", "terminal_options",
]  # fmt: skip

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


#: ``-t``, ``-i`` as docker spells them (``vc run``, ``vc exec``): ``-it`` is a terminal.
terminal_options = compose(
    click.option("--tty", "-t", is_flag=True, help="Allocate a terminal."),
    click.option("--interactive", "-i", is_flag=True, help="Forward stdin even from a terminal."),
)

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
