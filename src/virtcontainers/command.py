"""Running a host tool to completion (apt, skopeo, ip, nft, ``--version`` probes), one way."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["run_captured"]


def run_captured(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a list, never through a shell) with stdin from /dev/null (or ``input``),
    stdout and stderr captured as text (undecodable bytes replaced). A non-zero exit is the
    caller's to judge.

    Raises:
        OSError: it cannot be executed. subprocess.TimeoutExpired: it ran longer than
            ``timeout`` seconds (it was killed).
    """
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env=env,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
