"""Where the time of one fused linear KD step goes: ``python -m fastkd.bench.profile``.

One fwd + bwd of ``fastkd.fused_linear_kd_loss`` under ``torch.profiler``, its self times
grouped into the four GEMMs (the teacher's told apart by its width: Hs ≠ Ht), the row kernel
and the copies, beside the bare GEMMs of the same shapes (the suite's floor) timed in the same
process, alternating; medians of ``--reps`` steps.
The suite (``fastkd bench``) says how fast; this says why (docs/design.md §5)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastkd

PARTS = ("gemm student", "gemm teacher", "gemm grad_h", "gemm grad_W", "row kernel", "copies")
_ROW_KERNELS = ("fastkd::kd_loss_fwd", "fastkd::kd_loss_bwd", "fastkd::kd_loss_fwd_bwd")
_COPIES = ("aten::copy_", "aten::fill_", "aten::zero_", "aten::add_", "aten::mul_")


def split(
    n: int, hidden: int, teacher_hidden: int, vocab: int, divergence: str, alpha: float, reps=3
) -> dict[str, float]:
    """Median ms of the wall time, the floor and each of ``PARTS`` (``other``: the rest)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_()
    ht = torch.randn(n, teacher_hidden, generator=g)
    wt = torch.randn(vocab, teacher_hidden, generator=g) * teacher_hidden**-0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    teacher = {} if alpha == 1 else {"teacher_hidden": ht, "teacher_weight": wt}
    grad = torch.randn(n, vocab, generator=g)

    def step() -> None:
        loss = fastkd.fused_linear_kd_loss(
            h, w, labels, divergence=divergence, alpha=alpha, temperature=2.0, **teacher
        )
        loss.backward()
        h.grad = w.grad = None

    def floor() -> None:
        h.detach() @ w.detach().t()
        if teacher:
            ht @ wt.t()
        grad @ w.detach()
        grad.t() @ h.detach()

    step()
    floor()
    rows = []
    for _ in range(reps):
        t0 = time.perf_counter()
        floor()
        row = {"floor": time.perf_counter() - t0}
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            step()
            row["wall"] = time.perf_counter() - t0
        row = {k: v * 1e3 for k, v in row.items()} | dict.fromkeys(PARTS, 0.0)
        for e in prof.key_averages(group_by_input_shape=True):
            ms, shapes = e.self_cpu_time_total / 1e3, e.input_shapes
            if e.key == "aten::mm" and shapes[1][1] == vocab:  # [c, H] @ [H, V]
                row[
                    "gemm teacher"
                    if teacher and shapes[0][1] == teacher_hidden != hidden
                    else "gemm student"
                ] += ms
            elif e.key == "aten::mm":
                row["gemm grad_h"] += ms
            elif e.key in ("aten::addmm", "aten::addmm_"):
                row["gemm grad_W"] += ms
            elif e.key in _ROW_KERNELS:
                row["row kernel"] += ms
            elif e.key in _COPIES:
                row["copies"] += ms
        row["other"] = row["wall"] - sum(row[p] for p in PARTS)
        rows.append(row)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastkd.bench.profile", description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--divergence", action="append", help="default: jsd and kl")
    parser.add_argument("--ce-only", action="store_true", help="also alpha=1 (no teacher)")
    parser.add_argument("--reps", type=int, default=3)
    a = parser.parse_args(argv)
    cases = [(d, 0.5) for d in a.divergence or ("jsd", "kl")] + [("kl", 1.0)] * a.ce_only
    cols = ("wall", "floor", *PARTS, "other")
    print(
        f"fused_linear_kd_loss fwd+bwd, N={a.n} Hs={a.hidden} Ht={a.teacher_hidden} "
        f"V={a.vocab} fp32, {torch.get_num_threads()} threads, median ms of {a.reps}"
    )
    print("| case | " + " | ".join(cols) + " | wall ÷ floor |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for divergence, alpha in cases:
        r = split(a.n, a.hidden, a.teacher_hidden, a.vocab, divergence, alpha, a.reps)
        name = "CE only" if alpha == 1 else divergence
        cells = " | ".join(f"{r[c]:.0f}" for c in cols)
        print(f"| {name} | {cells} | {r['wall'] / r['floor']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
