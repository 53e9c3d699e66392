"""The suite behind ``fastkd bench``: every op at the real shapes of the device (scaled down on
the CPU), results as JSON under ``bench/results/<device>/`` and a plot beside them.

With ``--time-budget`` the suite starts no new case once the budget is spent; the cases left
out are listed in the JSON (``skipped_cases``) and printed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastkd.bench import plot
from fastkd.bench.harness import (
    MODES,
    Case,
    device_slug,
    environment,
    op_module,
    run_case,
    write_results,
)

OPS = ("kd_loss", "fused_linear_kd_loss", "fused_linear_sparse_kd_loss", "train_step")
RESULTS = Path(__file__).parent / "results"


def cases(op: str, device: str, dtype: str, quick: bool) -> list[Case]:
    """The op's cases on ``device``: its module's ``QUICK_CASES``, ``CPU_CASES`` or
    ``GPU_CASES``."""
    module = op_module(op)
    specs = (
        module.QUICK_CASES
        if quick
        else (module.GPU_CASES if device == "cuda" else module.CPU_CASES)
    )
    return [Case(op=op, dtype=dtype, device=device, **spec) for spec in specs]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, no contender that calls torch.compile, memory of full steps only",
    )
    parser.add_argument("--op", action="append", choices=OPS, help="ops to run (default: all)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default: bench/results/<device>)"
    )
    parser.add_argument("--skip", action="append", default=[], metavar="CONTENDER")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--memory-mode",
        action="append",
        choices=MODES,
        help="modes whose peak memory is measured (default: all; --quick: full)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new case after this many seconds (default: no limit)",
    )


def run(args: argparse.Namespace) -> list[Path]:
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    out_dir = args.out or RESULTS / device_slug(args.device)
    start = time.monotonic()
    env = environment()  # the commit and versions the run starts from
    written = []
    for op in args.op or OPS:
        compiled = getattr(op_module(op), "COMPILED", ()) if args.quick else ()
        skip = (*args.skip, *compiled)
        rows, skipped = [], []
        for case in cases(op, args.device, dtype, args.quick):
            key = plot.case_key(case.__dict__)
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                skipped.append(plot.label(key))
                print(f"{op} {plot.label(key)}: skipped, {args.time_budget:.0f} s budget spent")
                continue
            case_start = time.monotonic()
            print(f"{op} {plot.label(key)} {dtype} on {args.device} ...", flush=True)
            default = ("full",) if args.quick else MODES
            memory = () if args.no_memory else tuple(args.memory_mode or default)
            rows += run_case(
                case,
                memory_modes=memory,
                skip=skip,
                reps=3 if args.quick else 5,
                min_seconds=0.1 if args.quick else 0.5,
            )
            print(plot.table([r for r in rows if plot.case_key(r) == key]))
            print(f"  ({time.monotonic() - case_start:.0f} s)", flush=True)
        if not rows:
            continue
        path = out_dir / f"{op}{'-quick' if args.quick else ''}.json"
        write_results(path, rows, env, **({"skipped_cases": skipped} if skipped else {}))
        written.append(path)
        written += plot.plot_file(path)
    for path in written:
        print(f"wrote {path}")
    return written
