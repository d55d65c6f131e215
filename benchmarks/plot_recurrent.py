"""Plot a bench_recurrent.py result: linforge beside fla, one panel per kind of run.

Usage: python benchmarks/plot_recurrent.py benchmarks/results/recurrent.json OUT.png
(needs matplotlib, which linforge itself does not depend on).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = data["rows"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4))
    for ax, kind in zip(axes, kinds):
        sel = [r for r in rows if r["kind"] == kind]
        xs = range(len(sel))
        ours = [r["linforge"]["ms"] for r in sel]
        theirs = [r["fla"]["ms"] if "fla" in r else 0.0 for r in sel]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="linforge")
        ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="fla 0.6.0")
        floors = [r["state_rw_floor"]["ms"] for r in sel if "state_rw_floor" in r]
        if floors:
            ax.axhline(floors[0], color="k", ls="--", lw=1, label="state read+write floor")
        for x, r in zip(xs, sel):
            if "fla" not in r:
                ax.text(x + 0.2, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [r["op"] for r in sel], rotation=30)
        ax.set_title(f"{kind}\n{sel[0]['shape']}", fontsize=9)
        ax.set_ylabel("median ms (lower is better)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['meta']['device']}, triton {data['meta']['triton']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
