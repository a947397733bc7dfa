#!/usr/bin/env python3
"""Draws the cold-start comparison of scripts/bench-net.sh (section 4 of scripts/bench.sh).

Usage: bench-plot.py TSV PNG [SUBTITLE]

TSV has a header line and rows of "tool<TAB>seconds<TAB>MiB" (seconds until python3 printed 1,
MiB over the link). Two bar charts side by side, both on a log scale because the full pull is
orders of magnitude above the lazy loaders.
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    rows = []
    with open(sys.argv[1], newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            try:
                rows.append((r["tool"], float(r["seconds"]), float(r["mib"])))
            except (KeyError, ValueError):
                print(f"bench-plot: skipping bad row {r}", file=sys.stderr)
    if not rows:
        print("bench-plot: no data", file=sys.stderr)
        return 1
    names = [r[0] for r in rows]
    palette = ["#999999", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    colours = [palette[i % len(palette)] for i in range(len(rows))]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, values, title, unit in (
        (ax_t, [r[1] for r in rows], "Cold start: time to python3 print(1)", "s"),
        (ax_b, [r[2] for r in rows], "Bytes over the link", "MiB"),
    ):
        bars = ax.bar(names, values, color=colours)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(f"{unit} (log scale)")
        for b, v in zip(bars, values):
            label = f"{v:.2f} {unit}" if v < 10 else f"{v:.0f} {unit}"
            ax.annotate(
                label,
                (b.get_x() + b.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.margins(y=0.25)
    sub = sys.argv[3] if len(sys.argv) > 3 else ""
    fig.suptitle(
        "Data B (Debian + python3) from a registry over a throttled link" + (f"\n{sub}" if sub else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
