"""pytest-benchmark entry points for the suite's cases (the quick shapes; pass
``--benchmark-only``): ``pytest bench/test_bench.py --benchmark-only``. Each contender that is
unavailable here is skipped with its reason; those that call torch.compile are left out."""

from __future__ import annotations

import pytest
import torch

from fastkd.bench.harness import Unavailable, op_module, runner_for
from fastkd.bench.run import OPS, cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
PARAMS = [
    pytest.param(case, name, mode, id=f"{case.op}-{case.bt}x{case.vocab}-{name}-{mode}")
    for op in OPS
    for case in cases(op, DEVICE, DTYPE, quick=True)
    for name in op_module(op).contenders(case)
    if name not in getattr(op_module(op), "COMPILED", ())
    for mode in getattr(op_module(op), "MODES", ("fwd", "bwd", "full"))
]


@pytest.mark.parametrize("case, contender, mode", PARAMS)
def test_bench(benchmark, case, contender, mode):
    try:
        runner = runner_for(case, contender)
    except Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(op=case.op, bt=case.bt, vocab=case.vocab, dtype=case.dtype)

    def run():
        runner.run(mode)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
