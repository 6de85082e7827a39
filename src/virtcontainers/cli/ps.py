"""``vc ps``: the sandboxes in the store. It runs often (scripts poll it), so it imports
click, :mod:`.common` and :mod:`virtcontainers.listing` only; rich for the table."""

from __future__ import annotations

import time

import click

from virtcontainers.cli.common import json_option


@click.command()
@json_option
def ps(as_json: bool) -> None:
    """List sandboxes and their state (checked against the live VMM process)."""
    if as_json:
        from virtcontainers.cli.fast import ps_json

        ps_json()  # what `vc ps --json` prints without click
        return
    from virtcontainers.listing import list_sandboxes

    infos = list_sandboxes()
    from rich.console import Console
    from rich.table import Table

    table = Table("ID", "STATE", "HYPERVISOR", "PID", "CREATED")
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at))
        state = f"{i.state} (server dead)" if i.server == "dead" else i.state
        table.add_row(i.id, state, i.hypervisor, str(i.pid or "-"), created)
    Console().print(table)
