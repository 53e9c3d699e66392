"""``fastkd check-gpu`` where it can be checked without a GPU: the one-line refusal, the time
plan, the test-report parsing and the summary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastkd import check_gpu
from fastkd.bench.run import cases
from fastkd.check_gpu import StepResult


def test_without_a_gpu_says_so_in_one_line_and_fails():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        [sys.executable, "-m", "fastkd", "check-gpu", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = (r.stdout + r.stderr).strip()
    assert r.returncode == 1, output
    assert len(output.splitlines()) == 1, output
    assert "no CUDA GPU" in output and "nothing checked" in output


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_the_plan_fits_25_minutes(quick):
    budgets = check_gpu.QUICK_BUDGETS_S if quick else check_gpu.BUDGETS_S
    assert set(budgets) == {"build", "tests", "memcheck", "bench"}
    assert sum(budgets.values()) <= check_gpu.TOTAL_BUDGET_S - 60  # a minute to start up
    # A case started just before the soft limit still ends before the hard one.
    assert budgets["bench"] - check_gpu.BENCH_SOFT_S[quick] >= 90
    plan = check_gpu.bench_plan(quick)
    assert set(plan) == {"kd_loss", "fused_linear_kd_loss", "train_step"} and all(plan.values())


def test_bench_shapes_are_real():
    """The issue's shapes: Llama 3 / Qwen 2 / Gemma vocabularies, BT up to 8192, a 2048-wide
    student of a 4096-wide teacher, and the CE-only case."""
    for op in ("kd_loss", "fused_linear_kd_loss"):
        found = cases(op, "cuda", "bfloat16", quick=False)
        assert {c.vocab for c in found} == {128256, 151936, 256000}, op
        assert max(c.bt for c in found) == 8192 and all(c.dtype == "bfloat16" for c in found)
    linear = cases("fused_linear_kd_loss", "cuda", "bfloat16", quick=False)
    assert {(c.hidden, c.teacher_hidden) for c in linear} == {(2048, 4096)}
    assert any(c.alpha == 1.0 for c in linear)


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="3" tests="8">
<testcase name="a"/><testcase name="b"/><testcase name="c"/>
<testcase name="d"><failure message="boom"/></testcase>
<testcase name="e"><error message="setup broke"/></testcase>
<testcase name="f"><skipped message="needs 2 GPUs"/></testcase>
<testcase name="g"><skipped message="needs 2 GPUs"/></testcase>
<testcase name="h"><skipped message="triton has no CUDA backend"/></testcase>
</testsuite></testsuites>
"""


def test_junit_summary(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text(JUNIT)
    summary, skipped = check_gpu._junit_summary(xml)
    assert summary == "3 passed, 2 failed, 3 skipped"
    assert skipped == ["2 tests: needs 2 GPUs", "1 tests: triton has no CUDA backend"]


def test_summary_names_failures_and_skips():
    results = [
        StepResult("build", "ok", 100.0, "rebuilt for sm_90", []),
        StepResult("tests", "failed", 200.0, "pytest exit 1; 3 passed, 1 failed", ["x: why"]),
        StepResult("memcheck", "skipped", 0.0, "no compute-sanitizer", ["memcheck: none"]),
    ]
    text = check_gpu._summary(results, "GPU x1")
    assert "FAILED" in text.splitlines()[2] and "rebuilt for sm_90" in text.splitlines()[1]
    assert "  - x: why" in text and "  - memcheck: none" in text
    assert text.splitlines()[-1] == "result: FAILED (tests)"
    assert check_gpu._summary(results[:1], "GPU x1").endswith("result: all passed")


def test_read_bench_log(tmp_path):
    """fastkd's errors fail the check; the others' errors (eager out of memory, a peer's bug)
    and unavailable contenders are reported as skipped."""
    from fastkd.bench.harness import write_results

    row = {"op": "kd_loss", "bt": 8192, "vocab": 128256, "alpha": 0.5, "mode": "fwd"}
    rows = [
        {**row, "contender": "floor", "status": "ok"},
        {**row, "contender": "fastkd-cuda", "status": "error", "reason": "RuntimeError: x"},
        {**row, "contender": "liger", "status": "error", "reason": "OutOfMemoryError"},
        {**row, "contender": "eager", "status": "error", "reason": "OutOfMemoryError"},
        {**row, "contender": "fastkd-cpu", "status": "unavailable", "reason": "CPU tensors"},
    ]
    result = tmp_path / "kd_loss.json"
    write_results(result, rows, skipped_cases=["8192x256000"])
    log = tmp_path / "bench.log"
    log.write_text(f"kd_loss 8192x128256 ...\nwrote {result}\nwrote {tmp_path / 'x.png'}\n")
    ran, failures, skipped = check_gpu.read_bench_log(log)
    assert ran == 1
    assert failures == ["bench kd_loss fastkd-cuda: RuntimeError: x"]
    assert skipped == [
        "bench kd_loss 8192x256000: time budget spent",
        "bench kd_loss eager: OutOfMemoryError",
        "bench kd_loss fastkd-cpu: CPU tensors",
        "bench kd_loss liger: OutOfMemoryError",
    ]
