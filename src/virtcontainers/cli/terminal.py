"""What `vc` prints for people (rich): consoles for stdout and stderr, a progress bar.

Imported only by commands that print tables or progress; `vc ps --json` and `vc exec` never
load rich.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

#: Full paths and tables must not wrap when piped (rich assumes 80 columns then).
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True)


@contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[str, float | None], None]]:
    """A progress bar on stderr when it is a terminal (else nothing); yields the
    ``(step, fraction)`` callback that pulls and builds report to."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    show = enabled and err.is_terminal
    with Progress(*columns, console=err, transient=True, disable=not show) as bar:
        task = bar.add_task(label, total=1.0)

        def update(step: str, fraction: float | None) -> None:
            bar.update(task, description=f"{label}: {step}", completed=fraction)

        yield update
