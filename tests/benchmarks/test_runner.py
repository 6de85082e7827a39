"""``python -m bench --quick`` on a cheap subset, for real: QEMU boots, the floor peer runs,
exec-sandbox is skipped with its reason, and results.json has the schema the docs rely on."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from virtcontainers.guest.image import GuestImage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STAGES = "exec,pause,floor,exec-sandbox"
FIGURE_KEYS = {
    "id", "title", "unit", "ours", "baseline", "baseline_label", "ratio", "n",
    "lower_is_better", "ours_samples", "baseline_samples", "orders", "order_effect", "note",
}  # fmt: skip


def test_quick_bench_writes_every_figure_with_baseline_and_ratio(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    png = tmp_path / "chart.png"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", STAGES, "--seed", "5",
         "--out", str(tmp_path), "--png", str(png)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())

    assert results["schema"] == 1
    assert results["quick"] is True
    assert results["errors"] == []
    assert set(results["stages"]) == set(STAGES.split(","))
    assert results["machine"]["uptime_before"].count("load average") == 1
    assert results["order"]["seed"] == 5

    figures = {f["id"]: f for f in results["figures"]}
    assert set(figures) == {"exec_rtt", "pause", "resume", "save"}
    for f in figures.values():
        assert set(f) == FIGURE_KEYS
        assert f["ours"] > 0, f
        assert f["baseline"] > 0, f
        assert len(f["ours_samples"]) == len(f["baseline_samples"]) == len(f["orders"]) == f["n"]
        ratios = [o / b for o, b in zip(f["ours_samples"], f["baseline_samples"], strict=True)]
        assert f["ratio"] == pytest.approx(statistics.median(ratios), rel=0.02)
        assert abs(f["orders"].count("ours-first") - f["orders"].count("baseline-first")) <= 1
        assert f["title"] in done.stdout  # printed, with its baseline and ratio
        assert f"ratio {f['ratio']:.3f}" in done.stdout

    peers = {p["name"]: p for p in results["peers"]}
    floor = peers["qemu.qmp floor"]
    assert floor["ran"] is True
    assert set(floor["figures"]) == {
        "start_ms", "pause_ms", "resume_ms", "save_ms", "restore_ms", "stop_ms"
    }  # fmt: skip
    assert all(v > 0 for v in floor["figures"].values())
    skipped = peers["exec-sandbox"]
    assert skipped["ran"] is False
    assert "internet" in skipped["reason"]
    assert f"exec-sandbox skipped: {skipped['reason']}" in done.stdout

    table = (tmp_path / "results.md").read_text()
    for f in figures.values():
        assert f["title"] in table
    assert "| operation (ms) | virtcontainers | qemu.qmp floor |" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
