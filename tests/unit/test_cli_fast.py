"""The fast path (cli/fast.py): its `vc exec` parser gives what click gives or declines, and
`vc exec` through a sandbox server and `vc ps --json` really run without click, with click's
results (mock driver, real agent)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from virtcontainers.cli.app import app
from virtcontainers.cli.fast import ExecArgs, parse_exec
from virtcontainers.cli.processes import exec_

from .test_cli_mock import VC, Cli, vc  # noqa: F401  (the fixture)

TOKENS = [
    "-t", "-i", "-d", "-it", "-itd", "-ti", "-e", "-eA=1", "-e=B", "--env", "--env=C=2",
    "--env=", "-w", "-w/tmp", "--workdir", "--workdir=/srv", "-u", "-uroot", "--user",
    "--user=1:2", "--tty", "--interactive", "--detach", "--tty=1", "--", "-", "-x", "-tx",
    "--help", "--nope", "ID", "sb-1", "true", "sh", "-c", "echo $A", "", "A=1",
]  # fmt: skip


def click_parse(args: list[str]) -> ExecArgs | None:
    """What click passes to `vc exec`'s function for ``args``, or None when it refuses."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ctx = exec_.make_context("exec", list(args))
    except (click.exceptions.UsageError, click.exceptions.Exit):
        return None
    return ExecArgs(**ctx.params)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=8))
def test_the_fast_parser_gives_what_click_gives_or_declines(args: list[str]) -> None:
    fast = parse_exec(args)
    if fast is not None:
        assert fast == click_parse(args)


@pytest.mark.parametrize(
    "args",
    [
        ["ID", "--", "true"],
        ["ID", "true"],
        ["-it", "ID", "sh"],
        ["-d", "ID", "--", "sleep", "60"],
        ["-e", "A=1", "--env=B=2", "-w", "/tmp", "-u", "1000:1000", "ID", "--", "id", "-u"],
        ["--tty", "--interactive", "ID", "sh", "-c", "echo -t"],
        ["--", "ID", "ls", "-l"],
        ["-w", "-t", "ID", "pwd"],  # the value of -w, as click takes it
    ],
)
def test_the_forms_users_type_take_the_fast_path(args: list[str]) -> None:
    fast = parse_exec(args)
    assert fast is not None
    assert fast == click_parse(args)


@pytest.mark.parametrize(
    "args", [[], ["ID"], ["--help"], ["-h", "ID", "true"], ["ID", "--"][:1], ["-e"]]
)
def test_what_click_refuses_is_left_to_click(args: list[str]) -> None:
    assert parse_exec(args) is None
    assert click_parse(args) is None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the agent")
def test_exec_through_a_server_imports_no_click_and_keeps_its_errors(vc: Cli) -> None:  # noqa: F811
    vc.started("f1")
    env = {**vc.env, "PYTHONPROFILEIMPORTTIME": "1"}
    out = subprocess.run(
        [VC, "exec", "-e", "GREETING=hi", "f1", "--", "sh", "-c", 'echo "$GREETING"; exit 3'],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert (out.returncode, out.stdout) == (3, "hi\n"), out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "virtcontainers.cli.fast" in imported
    assert "click" not in imported
    assert "virtcontainers.persist.document" not in imported
    # Errors are click's path's: one line, exit 1 (a bad -e), 127 (no such program).
    bad = vc("exec", "-e", "=x", "f1", "--", "true")
    assert (bad.returncode, bad.stderr) == (
        1, "error: ConfigError: --env '=x': the variable name is empty\n"
    )  # fmt: skip
    missing = vc("exec", "f1", "--", "no-such-program")
    assert missing.returncode == 127, missing.stderr
    assert missing.stderr.startswith("error: "), missing.stderr
    # `vc ps --json` takes the fast path too, and prints what click's command prints.
    ps = subprocess.run([VC, "ps", "--json"], capture_output=True, text=True, env=env,
                        timeout=60, check=True)  # fmt: skip
    imported = {line.rsplit("|", 1)[-1].strip() for line in ps.stderr.splitlines()}
    assert "click" not in imported
    assert "virtcontainers.listing" in imported
    assert "logging" not in imported  # loaded only to warn of a record it cannot read

    listed = CliRunner().invoke(app, ["ps", "--json"], env={"VC_RUN_ROOT": vc.env["VC_RUN_ROOT"]})
    assert json.loads(ps.stdout) == json.loads(listed.stdout)
    assert [i["id"] for i in json.loads(ps.stdout)] == ["f1"]
    # Without a server (none answers at the socket) click's path takes over and says why.
    gone = vc("exec", "nosuch", "--", "true")
    assert gone.returncode == 1, gone.stderr
    assert gone.stderr.startswith("error: StoreError: "), gone.stderr
    assert os.path.exists(vc.state_path("f1"))
