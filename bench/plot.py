"""Tables and plots of benchmark results: ``python -m fastkd.bench.plot RESULT.json ...``
draws, per op and mode, time and peak memory of every contender against the shapes (BT x V)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    """A markdown table of result rows (times also as ratios to the floor and to fastkd)."""
    lines = [
        "| contender | mode | median ms | x floor | x fastkd | TFLOP/s | GB/s | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['contender']} | {r['mode']} | {r['status']}: "
                f"{r.get('reason', '')[:80]} | | | | | |"
            )
            continue

        def fmt(key, spec, r=r):
            return format(r[key], spec) if key in r else ""

        lines.append(
            f"| {r['contender']} | {r['mode']} | {fmt('median_ms', '.2f')} | "
            f"{fmt('ratio_to_floor', '.2f')} | {fmt('ratio_to_fastkd', '.2f')} | "
            f"{fmt('tflops', '.1f')} | {fmt('gbps', '.0f')} | {fmt('peak_mem_mb', '.0f')} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict], mode: str = "full") -> str:
    """The README's table: per case and peer, fastkd's time as a multiple of the floor's and
    of the peer's (medians of per-round ratios; < 1: fastkd is faster) and the extra memory of
    both. fastkd's row is the one timed against itself (``ratio_to_fastkd`` 1)."""
    ok = [r for r in rows if r.get("status") == "ok" and r["mode"] == mode]
    lines = [
        "| case | fastkd ms | fastkd ÷ floor | peer | fastkd ÷ peer | extra MiB fastkd / peer |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for key in sorted({case_key(r) for r in ok}, key=_order):
        sel = [r for r in ok if case_key(r) == key]
        ours = [r for r in sel if r.get("ratio_to_fastkd") == 1.0]
        if not ours:
            continue
        (ours,) = ours
        peers = [r for r in sel if r["contender"] not in (ours["contender"], "floor", "copy")]
        peers = [r for r in peers if not r["contender"].startswith("fastkd")] or [None]
        for peer in peers:
            mem = _mib(ours)
            name = ratio = ""
            if peer is not None:
                name, ratio = peer["contender"], f"{1 / peer['ratio_to_fastkd']:.2f}"
                mem += f" / {_mib(peer)}"
            lines.append(
                f"| {label(key)} | {ours['median_ms']:.0f} | {ours['ratio_to_floor']:.2f} | "
                f"{name} | {ratio} | {mem} |"
            )
    return "\n".join(lines)


def _mib(row: dict) -> str:
    return f"{row['peak_mem_mb']:.0f}" if "peak_mem_mb" in row else "?"


def case_key(row: dict) -> tuple:
    """What a result row (or a Case's fields) measured: shape, widths, divergence, weights."""
    return (
        row["vocab"],
        row["bt"],
        row.get("hidden", 0),
        row.get("teacher_hidden", 0),
        row["divergence"],
        row["alpha"],
        row.get("top_k", 0),
        row.get("tail", "bucket"),
    )


def label(key: tuple) -> str:
    vocab, bt, hidden, teacher_hidden, divergence, alpha, top_k, tail = key
    widths = f" H {hidden}/{teacher_hidden}" if hidden and alpha != 1 else ""
    widths = f" H {hidden}" if hidden and alpha == 1 else widths
    cached = f" top-{top_k} {tail}" if top_k else ""
    return f"{bt}x{vocab}{widths} " + ("CE only" if alpha == 1 else divergence) + cached


def _order(key: tuple) -> tuple:
    """Cases grouped by loss (divergence; CE only last), then by size."""
    vocab, bt, hidden, _, divergence, alpha, top_k, tail = key
    return alpha == 1, divergence, alpha, tail, bt * vocab, vocab, hidden, top_k


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
        # Shapes grouped by loss (divergence; CE only last), lines only within a group.
        shapes = sorted({case_key(r) for r in sel}, key=_order)
        labels = [label(key) for key in shapes]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for n, contender in enumerate(sorted({r["contender"] for r in sel})):
            by_shape = {case_key(r): r for r in sel if r["contender"] == contender}
            for ax, key in zip(axes, ("median_ms", "peak_mem_mb")):
                groups = sorted({s[4:] for s in by_shape})  # (divergence, alpha)
                for group in groups:
                    pts = [
                        (i, by_shape[s][key])
                        for i, s in enumerate(shapes)
                        if s in by_shape and s[4:] == group and by_shape[s].get(key) is not None
                    ]
                    if pts:
                        first = group == groups[0]
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
    # python -m fastkd.bench.plot [--summary] RESULT.json ...: plots, or the README's tables
    if sys.argv[1:2] == ["--summary"]:
        for arg in sys.argv[2:]:
            data = json.loads(Path(arg).read_text())
            print(
                f"{Path(arg).stem} ({data['environment'].get('cpu')}, "
                f"commit {data['environment'].get('commit')})\n"
            )
            print(summary(data["rows"]), "\n")
    else:
        for arg in sys.argv[1:]:
            for written in plot_file(Path(arg)):
                print(f"wrote {written}")
