"""The report of a benchmark run: results.json, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from bench.stats import fmt

#: Operations the peers have in common, and which of our figures is ours for each.
PEER_OPS = {
    "start": ("start to ready (ours: to first exec)", "start_to_first_exec"),
    "pause": ("pause", "pause"),
    "resume": ("resume", "resume"),
    "save": ("save to a file", "save"),
    "restore": ("restore to running (ours: template clone to first exec)", "clone_to_first_exec"),
    "stop": ("stop / destroy", "stop"),
}


def peer_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (operation, ours, each peer that ran) in ms; None where there is no figure."""
    ours = {f["id"]: f["ours"] for f in results["figures"]}
    rows = []
    for op, (label, our_id) in PEER_OPS.items():
        row: dict[str, Any] = {"op": op, "label": label, "ours": ours.get(our_id)}
        for peer in results["peers"]:
            if peer["ran"]:
                row[peer["name"]] = peer["figures"].get(f"{op}_ms")
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    out = [
        "| figure | ours | baseline | ratio | n | order effect | baseline is |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for f in results["figures"]:
        effect = f"{f['order_effect']:.3f}" if f["order_effect"] else "—"
        better = "" if f["lower_is_better"] else " (higher is better)"
        out.append(
            f"| {f['title']}{better} | {fmt(f['ours'])} {f['unit']} | "
            f"{fmt(f['baseline'])} {f['unit']} | {f['ratio']:.3f} | {f['n']} | {effect} | "
            f"{f['baseline_label']} |"
        )
    ran = [p for p in results["peers"] if p["ran"]]
    out += ["", "| operation (ms) | virtcontainers | " + " | ".join(p["name"] for p in ran) + " |"]
    out.append("| --- | ---: |" + " ---: |" * len(ran))
    for row in peer_table(results):
        cells = [row["ours"], *(row.get(p["name"]) for p in ran)]
        out.append(
            f"| {row['label']} | " + " | ".join("—" if c is None else fmt(c) for c in cells) + " |"
        )
    skipped = [p for p in results["peers"] if not p["ran"]]
    if skipped:
        out.append("")
        out += [f"- **{p['name']}** skipped: {p['reason']}" for p in skipped]
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    """Left: each figure's ratio to its baseline (log scale, 1 = the baseline). Right: the
    operations the peers share, ms (log scale)."""
    figures = results["figures"]
    rows = peer_table(results)
    ran = [p["name"] for p in results["peers"] if p["ran"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(4, 0.4 * len(figures) + 1)))
    names = [f["title"] for f in figures][::-1]
    ratios = [f["ratio"] if f["ratio"] and math.isfinite(f["ratio"]) else 1.0 for f in figures]
    left.barh(names, ratios[::-1], color="tab:blue")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_xscale("log")
    left.set_xlabel("ours / baseline (same run)")
    left.set_title("figures against their baselines")
    left.tick_params(axis="y", labelsize=7)
    series = ["ours", *ran]
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [r.get(name) or 0 for r in rows]
        xs = [j + i * width for j in range(len(rows))]
        label = "virtcontainers" if name == "ours" else name
        right.bar(xs, [v if v > 0 else float("nan") for v in values], width, label=label)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["op"] for r in rows])
    if any((r.get(name) or 0) > 0 for r in rows for name in series):
        right.set_yscale("log")  # else (a run without the peers' stages) nothing to scale
    right.set_ylabel("ms")
    right.set_title("peers, same run")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path, png: Path) -> tuple[Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown(results))
    png.parent.mkdir(parents=True, exist_ok=True)
    chart(results, png)
    return json_path, md_path, png
