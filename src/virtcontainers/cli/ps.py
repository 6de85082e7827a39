"""``vc ps``: the sandboxes in the store. It runs often (scripts poll it), so it imports
click, :mod:`.common` and :mod:`virtcontainers.listing` only; rich for the table."""

from __future__ import annotations

import json
import time

import click

from virtcontainers.cli.common import json_option


@click.command()
@json_option
def ps(as_json: bool) -> None:
    """List sandboxes and their state (checked against the live VMM process)."""
    from virtcontainers.listing import list_sandboxes

    infos = list_sandboxes()
    if as_json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("ID", "STATE", "HYPERVISOR", "PID", "CREATED")
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at))
        state = f"{i.state} (server dead)" if i.server == "dead" else i.state
        table.add_row(i.id, state, i.hypervisor, str(i.pid or "-"), created)
    Console().print(table)
