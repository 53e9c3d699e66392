"""Tables and plots of benchmark results: ``python -m fastkd.bench.plot RESULT.json ...``
draws, per op and mode, time and peak memory of every contender against the shapes (BT x V)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    """A markdown table of result rows (times also as ratios to the floor)."""
    lines = [
        "| contender | mode | median ms | x floor | TFLOP/s | GB/s | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['contender']} | {r['mode']} | {r['status']}: "
                f"{r.get('reason', '')[:80]} | | | | |"
            )
            continue

        def fmt(key, spec, r=r):
            return format(r[key], spec) if key in r else ""

        lines.append(
            f"| {r['contender']} | {r['mode']} | {fmt('median_ms', '.2f')} | "
            f"{fmt('ratio_to_floor', '.2f')} | {fmt('tflops', '.1f')} | {fmt('gbps', '.0f')} | "
            f"{fmt('peak_mem_mb', '.0f')} |"
        )
    return "\n".join(lines)


def case_key(row: dict) -> tuple:
    """The shape and loss weights a result row (or a Case's fields) measured."""
    return row["vocab"], row["bt"], row["alpha"]


def label(key: tuple) -> str:
    vocab, bt, alpha = key
    return f"{bt}x{vocab}" + (" CE only" if alpha == 1 else "")


def plot_file(path: Path) -> list[Path]:
    """One PNG per mode beside the JSON file: time and peak memory per shape and contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(path).read_text())
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    env = data["environment"]
    device = env.get("gpu") or env.get("cpu")
    written = []
    for mode in sorted({r["mode"] for r in rows}):
        sel = [r for r in rows if r["mode"] == mode]
        # Shapes grouped by loss (alpha; CE only last), lines only within a group.
        shapes = sorted({case_key(r) for r in sel}, key=lambda k: (k[2], k[:2]))
        labels = [label(key) for key in shapes]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for n, contender in enumerate(sorted({r["contender"] for r in sel})):
            by_shape = {case_key(r): r for r in sel if r["contender"] == contender}
            for ax, key in zip(axes, ("median_ms", "peak_mem_mb")):
                for alpha in sorted({s[2] for s in by_shape}):
                    pts = [
                        (i, by_shape[s][key])
                        for i, s in enumerate(shapes)
                        if s in by_shape and s[2] == alpha and by_shape[s].get(key) is not None
                    ]
                    if pts:
                        first = alpha == min(s[2] for s in by_shape)
                        ax.plot(
                            *zip(*pts),
                            marker="o",
                            color=f"C{n % 10}",
                            label=contender if first else None,
                        )
        for ax, title in zip(axes, ("time (ms, median)", "peak extra memory (MiB)")):
            ax.set_xticks(range(len(shapes)), labels, rotation=30, ha="right")
            ax.set_xlabel("BT x V")
            ax.set_title(title)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        op = sel[0]["op"]
        fig.suptitle(f"{op} ({mode}, {sel[0]['dtype']}) on {device}", fontsize=10)
        fig.tight_layout()
        out = Path(path).with_name(f"{Path(path).stem}-{mode}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for written in plot_file(Path(arg)):
            print(f"wrote {written}")
