"""The Triton kernels compiled ahead of time for sm_80 and sm_90, without a GPU (docs/design.md
§6): what the launchers would launch compiles, does not spill, reads and writes 128-bit vectors,
and matches the committed results under bench/results/aot/ (regenerate them with
``python -m fastkd.kernels.aot`` after changing a kernel or its launch configuration)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
if "nvidia" not in triton.backends.backends:
    pytest.skip(f"triton {triton.__version__} has no CUDA backend", allow_module_level=True)

from fastkd.kernels import aot  # noqa: E402  (after the skips: needs triton)

RESOURCES = ("n_regs", "local_bytes", "shared", "ldg128", "ldg", "stg128", "stg")


def _key(row: dict) -> tuple:
    keys = ("arch", "op", "kernel", "dtype", "divergence", "tail", "setting")
    return tuple(row.get(k) for k in keys)


def _index(report: dict) -> dict[tuple, dict]:
    """Rows by (case without vocabulary, vocabulary)."""
    return {(_key(row), v): row for row in report["kernels"] for v in row["vocabs"]}


@pytest.fixture(scope="module")
def committed() -> dict:
    path = aot.default_path()
    if not path.exists():
        pytest.fail(
            f"no committed AOT results for triton {triton.__version__} ({path}); "
            "generate them with `python -m fastkd.kernels.aot`"
        )
    return json.loads(path.read_text())


def test_committed_results_cover_the_launch_configs(committed):
    """Every case of the full matrix is in the committed results, with the configuration the
    launchers pick today, without spills, with 128-bit loads (stores too for the backward)."""
    rows = _index(committed)
    for case in aot.cases():
        _, _, meta = aot.launch(case)
        row = rows.get((_key(dataclasses.asdict(case)), case.vocab))
        assert row is not None, f"{case} missing: regenerate with `python -m fastkd.kernels.aot`"
        config = {k: meta[k] for k in ("BLOCK", "num_warps", "ALIGN")}
        assert {k: row[k] for k in config} == config, f"{case}: launch configuration changed"
        assert row["local_bytes"] == 0, f"{case} spills: {row}"
        assert row["ldg128"] > 0, f"{case}: no 128-bit loads"
        assert case.kernel == "fwd" or row["stg128"] > 0, f"{case}: no 128-bit stores"


@pytest.mark.slow
def test_compile_for_sm80_sm90(tmp_path, committed):
    """Compile the reduced matrix for both targets (a compile error or a spill fails) and find
    the committed numbers for it: the committed file is the current kernels'."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "fastkd.kernels.aot", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = _index(committed)
    report = json.loads(out.read_text())
    assert report["kernels"], "nothing compiled"
    for row in report["kernels"]:
        assert row["local_bytes"] == 0, row
        old = rows[(_key(row), row["vocabs"][0])]
        assert {k: row[k] for k in RESOURCES} == {k: old[k] for k in RESOURCES}, (
            f"{_key(row)} differs from the committed results: regenerate them"
        )
