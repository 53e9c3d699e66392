"""The benchmark suite: its tiny version (every op, JSON rows and plots written, every contender
measured or unavailable with a reason), the side-by-side timing, and that every contender,
the peer libraries included, computes the loss fastkd computes."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from fastkd.bench import profile
from fastkd.bench.harness import Case, Runner, Unavailable, runner_for, time_side_by_side
from fastkd.bench.run import cases, run
from fastkd.cli import bench_parser

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LINEAR = {"op": "fused_linear_kd_loss", "hidden": 16, "teacher_hidden": 24}


@pytest.mark.slow
def test_quick_suite(tmp_path):
    args = bench_parser().parse_args(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    written = run(args)
    for op in ("kd_loss", "fused_linear_kd_loss", "train_step"):
        path = tmp_path / f"{op}-quick.json"
        assert path in written and path.with_name(f"{op}-quick-full.png") in written
        data = json.loads(path.read_text())
        assert data["environment"]["torch"] and data["environment"]["cpu"]
        assert data["environment"]["commit"]
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
            assert r["runs"] == floor["runs"]  # timed side by side, round by round
        # --quick leaves out every contender that calls torch.compile.
        compiled = {"compile", "liger-chunked-jsd", "cut-cross-entropy-compile"}
        assert not compiled & {r["contender"] for r in data["rows"]}
        if op == "fused_linear_kd_loss":  # the CE-only case, for Cut Cross-Entropy
            ce_only = [r for r in data["rows"] if r["alpha"] == 1.0]
            assert {r["contender"] for r in ce_only if r["status"] == "ok"} >= {"fastkd-cpu"}
            (cce,) = [r for r in ce_only if r["contender"] == "cut-cross-entropy"]
            assert cce["status"] == "unavailable" and "CUDA" in cce["reason"]
        if op != "train_step":  # the interpreter (TRITON_INTERPRET=1 here) is not timed
            triton = [r for r in data["rows"] if r["contender"] == "fastkd-triton"]
            assert triton and all(r["status"] == "unavailable" for r in triton), triton


def test_time_budget_skips_cases(tmp_path, capsys):
    args = bench_parser().parse_args(
        ["--device", "cpu", "--out", str(tmp_path), "--time-budget", "0"]
    )
    assert run(args) == []
    out = capsys.readouterr().out
    for op in ("kd_loss", "fused_linear_kd_loss", "train_step"):
        for case in cases(op, "cpu", "float32", quick=False):
            assert f"{op} {case.bt}x{case.vocab}" in out
    assert "budget spent" in out


def test_exp_floor_counts_the_unavoidable_exponentials():
    """The kd_loss floor on the CPU: e^a, e^b, the mixture's log, e^c unless a power of e^a."""
    from fastkd.bench.bench_kd_loss import exps_per_element

    def count(**kw):
        return exps_per_element(Case(op="kd_loss", bt=8, vocab=8, **kw))

    assert count(divergence="kl") == 2 and count(divergence="tvd") == 2
    assert count(divergence="jsd") == 3 and count(divergence="skew_reverse_kl") == 3
    assert count(divergence="kl", temperature=3.0) == 3  # e^c is no power of e^a
    assert count(divergence="kl", alpha=0.0, temperature=3.0) == 2
    assert count(alpha=1.0) == 1


def test_summary_rows_are_ratios_to_fastkd():
    from fastkd.bench.plot import summary

    case = {"vocab": 32000, "bt": 4096, "hidden": 256, "teacher_hidden": 512, "alpha": 0.5}
    case["divergence"], case["mode"], case["status"] = "jsd", "full", "ok"
    rows = [
        {**case, "contender": "floor", "median_ms": 80.0, "ratio_to_floor": 1.0},
        {
            **case,
            "contender": "fastkd-cpu",
            "median_ms": 100.0,
            "ratio_to_floor": 1.25,
            "ratio_to_fastkd": 1.0,
            "peak_mem_mb": 256.0,
        },
        {
            **case,
            "contender": "liger-chunked-jsd",
            "median_ms": 250.0,
            "ratio_to_floor": 3.1,
            "ratio_to_fastkd": 2.5,
            "peak_mem_mb": 784.0,
        },
    ]
    table = summary(rows)
    assert (
        "| 4096x32000 H 256/512 jsd | 100 | 1.25 | liger-chunked-jsd | 0.40 | 256 / 784 |" in table
    )


def test_side_by_side_rounds():
    """Every contender runs once per round; one that fails is dropped with its error."""
    calls = []

    def runner(name, fail_at=None):
        def forward():
            calls.append(name)
            if fail_at is not None and calls.count(name) >= fail_at:
                raise RuntimeError(f"{name} broke")
            time.sleep(0.001)

        return Runner(forward, lambda _: None)

    runners = {"floor": runner("floor"), "a": runner("a"), "bad": runner("bad", fail_at=4)}
    timed = time_side_by_side(runners, "fwd", "cpu", warmup=1, reps=5, min_seconds=0.0)
    assert len(timed["floor"]) == len(timed["a"]) == 5
    assert all(t > 0 for t in timed["floor"] + timed["a"])
    assert timed["bad"] == "RuntimeError: bad broke"
    # Round-robin: after warm-up, each round is floor, a (and bad while it lasted).
    assert calls[:3] == ["floor", "a", "bad"]  # warm-up
    assert calls[3:] == ["floor", "a", "bad"] * 3 + ["floor", "a"] * 2


def _value(case: Case, contender: str) -> float:
    return float(runner_for(case, contender).forward().detach())


@pytest.mark.parametrize(
    "kw",
    [
        {"op": "kd_loss", "divergence": "kl"},
        {**LINEAR, "divergence": "jsd"},
        {**LINEAR, "alpha": 1.0},  # CE only: no teacher anywhere
    ],
    ids=["kd_loss-kl", "linear-jsd", "linear-ce-only"],
)
def test_contenders_compute_the_same_loss(kw):
    """fastkd's backends and eager PyTorch compute the same number (the benchmark compares
    like with like)."""
    case = Case(bt=64, vocab=512, **kw)
    values = {name: _value(case, name) for name in ("fastkd-cpu", "fastkd-reference", "eager")}
    ref = values["fastkd-reference"]
    assert all(abs(v - ref) < 1e-4 * abs(ref) for v in values.values()), values


# Each peer contender on cases whose conventions differ from the peer's own: T != 1 (Liger
# leaves out T^2), alpha neither 0 nor 1, an asymmetric JSD beta, kl as Liger's beta=0.
CPU_PEERS = [
    ("liger-chunked-jsd", "liger_kernel", {**LINEAR, "divergence": "jsd", "beta": 0.3}),
    ("liger-chunked-jsd", "liger_kernel", {**LINEAR, "divergence": "kl", "alpha": 0.25}),
    ("cut-cross-entropy-compile", "cut_cross_entropy", {**LINEAR, "alpha": 1.0}),
]
CUDA_PEERS = [  # Triton kernels
    ("liger", "liger_kernel", {"op": "kd_loss", "divergence": "jsd", "beta": 0.3}),
    ("liger", "liger_kernel", {"op": "kd_loss", "divergence": "kl"}),
    ("liger-fused-linear-jsd", "liger_kernel", {**LINEAR, "divergence": "jsd", "alpha": 0.0}),
    ("liger-fused-linear-ce", "liger_kernel", {**LINEAR, "alpha": 1.0}),
    ("cut-cross-entropy", "cut_cross_entropy", {**LINEAR, "alpha": 1.0}),
]
NO_CUDA = pytest.mark.skipif(DEVICE != "cuda", reason="a Triton peer: needs CUDA")
PEERS = [
    pytest.param(*p, id=f"{p[0]}-{p[2]['op']}-{i}", marks=marks)
    for peers, marks in ((CPU_PEERS, ()), (CUDA_PEERS, NO_CUDA))
    for i, p in enumerate(peers)
]


@pytest.mark.parametrize("contender, module, kw", PEERS)
def test_peer_computes_fastkd_loss(contender, module, kw):
    """A peer library's contender, with fastkd's conventions mapped onto the peer's
    arguments, computes fastkd's loss."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    case = Case(bt=64, vocab=512, temperature=2.0, device=DEVICE, **kw)
    try:
        peer = _value(case, contender)
    except Unavailable as exc:
        pytest.fail(f"{contender} is unavailable on {DEVICE}: {exc}")
    ref = _value(case, "fastkd-reference")
    assert abs(peer - ref) < 1e-4 * abs(ref), (contender, peer, ref)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_profile_split_accounts_for_the_step(alpha):
    """The profile finds every GEMM of the step and its row kernel, and its parts add up to the
    wall time (``other`` is the rest)."""
    r = profile.split(64, 16, 24, 301, "jsd", alpha, reps=1)
    gemms = ["gemm student", "gemm grad_h", "gemm grad_W"] + ["gemm teacher"] * (alpha != 1)
    assert all(r[g] > 0 for g in gemms) and r["row kernel"] > 0
    assert (r["gemm teacher"] > 0) == (alpha != 1)
    total = sum(r[p] for p in profile.PARTS) + r["other"]
    assert total == pytest.approx(r["wall"]) and r["floor"] > 0
