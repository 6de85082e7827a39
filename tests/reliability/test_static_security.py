"""Security properties read from the source and the argv builders, no VM needed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_qemu_options import _split_opts as _qemu_split
from virtcontainers.drivers.qemu.argv import opt

SRC = Path(__file__).resolve().parents[2] / "src" / "virtcontainers"
#: Calls that start a program. Their first argument must be an argv list, never a string.
_SPAWNERS = {
    ("subprocess", "run"), ("subprocess", "Popen"), ("subprocess", "call"),
    ("subprocess", "check_call"), ("subprocess", "check_output"),
    ("asyncio", "create_subprocess_exec"), ("os", "execv"), ("os", "execvp"),
    ("os", "execve"), ("os", "execvpe"), ("os", "spawnv"), ("os", "posix_spawn"),
    ("os", "posix_spawnp"),
}  # fmt: skip
#: Calls that always go through /bin/sh.
_SHELLS = {
    ("os", "system"), ("os", "popen"), ("asyncio", "create_subprocess_shell"),
    ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
}  # fmt: skip


def _dotted(node: ast.expr) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _is_string(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.JoinedStr)
        or (isinstance(node, ast.Constant) and isinstance(node.value, str))
        or (isinstance(node, ast.BinOp) and (_is_string(node.left) or _is_string(node.right)))
    )


def shell_uses(source: str, name: str) -> list[str]:
    """Every place in ``source`` that runs a shell: ``shell=True`` (any call), a shell-only
    call, or a program-starting call given a string (or f-string) instead of an argv list."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{name}:{node.lineno}"
        for kw in node.keywords:
            if kw.arg == "shell" and not (
                isinstance(kw.value, ast.Constant) and kw.value.value is False
            ):
                found.append(f"{where}: shell={ast.unparse(kw.value)}")
        target = _dotted(node.func)
        if target in _SHELLS:
            found.append(f"{where}: {'.'.join(target)}")
        if target in _SPAWNERS and node.args and _is_string(node.args[0]):
            found.append(f"{where}: {'.'.join(target)} given a string")
    return found


def test_the_checker_finds_each_kind_of_shell_use() -> None:
    bad = (
        "import os, subprocess, asyncio\n"
        "subprocess.run('ls', shell=True)\n"
        "subprocess.Popen(f'ls {x}')\n"
        "os.system('ls')\n"
        "asyncio.create_subprocess_shell('ls')\n"
        "subprocess.check_output('a' + b)\n"
    )
    assert len(shell_uses(bad, "bad.py")) == 6  # shell=True is also a string argv
    good = "import subprocess\nsubprocess.run(['ls', '-l'], shell=False)\nsubprocess.run(argv)\n"
    assert shell_uses(good, "good.py") == []


def test_no_shell_anywhere_in_src() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50  # the whole package was read
    found = [hit for f in files for hit in shell_uses(f.read_text(), str(f.relative_to(SRC)))]
    assert found == []


@given(st.text(st.sampled_from("/a,=.r x\\o"), min_size=1, max_size=40))
def test_a_user_path_cannot_add_a_qemu_option(path: str) -> None:
    option = f"file={opt(path)},format=raw,readonly=on"
    assert _qemu_split(option) == [f"file={path}", "format=raw", "readonly=on"]


@pytest.mark.parametrize("path", ["/x,readonly=off", "/x,,y", "/x,", ",/x"])
def test_comma_injection_examples(path: str) -> None:
    assert _qemu_split(f"path={opt(path)},id=c0") == [f"path={path}", "id=c0"]
