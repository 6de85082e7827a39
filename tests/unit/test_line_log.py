"""console.LineLog: the line splitting of the console watcher and Firecracker's FIFO reader."""

from __future__ import annotations

import logging

import pytest

from virtcontainers.console import LineLog


def test_lines_cut_across_reads_are_joined_and_the_last_one_waits_for_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.line_log")
    lines = LineLog(logger)
    with caplog.at_level(logging.DEBUG, logger="test.line_log"):
        lines.feed(b"boot: one\r\nbo")
        lines.feed(b"ot: two\nthe la")
        assert [r.getMessage() for r in caplog.records] == ["boot: one", "boot: two"]
        lines.feed(b"st \xff")
        lines.flush()
        lines.flush()  # nothing left: no empty record
    assert [r.getMessage() for r in caplog.records] == ["boot: one", "boot: two", "the last \ufffd"]
    assert lines.lines == 3
