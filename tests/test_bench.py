"""The benchmark suite's tiny version (what CI runs): every op, JSON rows and plots written,
every contender either measured or unavailable with a reason."""

from __future__ import annotations

import json

import pytest

from fastkd.bench.harness import Case, runner_for
from fastkd.bench.run import run
from fastkd.cli import build_parser


@pytest.mark.slow
def test_quick_suite(tmp_path):
    args = build_parser().parse_args(
        ["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    )
    written = run(args)
    for op in ("kd_loss", "fused_linear_kd_loss", "train_step"):
        path = tmp_path / f"{op}-quick.json"
        assert path in written and path.with_name(f"{op}-quick-full.png") in written
        data = json.loads(path.read_text())
        assert data["environment"]["torch"] and data["environment"]["cpu"]
        rows = {(r["contender"], r["mode"]): r for r in data["rows"]}
        for row in data["rows"]:
            assert row["status"] in ("ok", "unavailable"), row
            assert row["status"] == "ok" or row["reason"]
        floor = rows[("floor", "full")]
        assert floor["ratio_to_floor"] == pytest.approx(1.0)
        fastkd_name = "fastkd" if op == "train_step" else "fastkd-cpu"
        ours, eager = rows[(fastkd_name, "full")], rows[("eager", "full")]
        for r in (ours, eager):
            assert r["median_ms"] > 0 and r["peak_mem_mb"] >= 0 and r["ratio_to_floor"] > 0
        assert ("compile", "full") not in rows  # --quick skips torch.compile
        if op == "fused_linear_kd_loss":  # the CE-only case, for Cut Cross-Entropy
            ce_only = [r for r in data["rows"] if r["alpha"] == 1.0]
            assert {r["contender"] for r in ce_only if r["status"] == "ok"} >= {"fastkd-cpu"}
            (cce,) = [r for r in ce_only if r["contender"] == "cut-cross-entropy"]
            assert cce["status"] == "unavailable" and "CUDA" in cce["reason"]
        if op != "train_step":  # the interpreter (TRITON_INTERPRET=1 here) is not timed
            triton = [r for r in data["rows"] if r["contender"] == "fastkd-triton"]
            assert triton and all(r["status"] == "unavailable" for r in triton), triton


def test_contenders_compute_the_same_loss():
    """Every contender of a loss op computes the same number (the benchmark compares like with
    like)."""
    linear = {"op": "fused_linear_kd_loss", "hidden": 16, "teacher_hidden": 24}
    for kw in (
        {"op": "kd_loss", "divergence": "kl"},
        {**linear, "divergence": "jsd"},
        {**linear, "alpha": 1.0},  # CE only
    ):
        case = Case(bt=64, vocab=512, **kw)
        op = case.op
        values = {}
        for name in ("fastkd-cpu", "fastkd-reference", "eager"):
            values[name] = float(runner_for(case, name).forward().detach())
        ref = values["fastkd-reference"]
        assert all(abs(v - ref) < 1e-4 * abs(ref) for v in values.values()), (op, values)
