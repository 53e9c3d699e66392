"""Command line: ``fastkd demo | distill | eval | bench | check-gpu`` (also
``python -m fastkd ...``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> None:
    from fastkd.training.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, seed=args.seed)


def _distill(args: argparse.Namespace) -> None:
    from fastkd.training.run import distill

    overrides = {
        "temperature": args.temperature,
        "alpha": args.alpha,
        "divergence": args.divergence,
        "backend": args.backend,
        "teacher_weights": args.teacher_weight,
        "seed": args.seed,
    }
    distill(
        teachers=args.teacher,
        student=args.student,
        data=args.data,
        out=Path(args.out),
        config_file=args.config,
        overrides=overrides,
        tokenizer=args.tokenizer,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        learning_rate=args.lr,
        eval_fraction=args.eval_fraction,
        bf16=args.bf16,
        resume=args.resume,
    )


def _eval(args: argparse.Namespace) -> None:
    from fastkd.training.run import evaluate_model

    metrics = evaluate_model(
        args.model,
        args.data,
        block_size=args.block_size,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
    )
    print(json.dumps(metrics, indent=2))


def _bench(args: argparse.Namespace) -> None:
    from fastkd.bench.run import run

    run(args)


def _check_gpu(args: argparse.Namespace) -> int:
    from fastkd.check_gpu import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd",
        description="Fused knowledge distillation for large-vocabulary language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny teacher, distil a student, compare")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a shorter run (about 3 minutes)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    dist = sub.add_parser("distill", help="distil teacher model(s) into a student")
    dist.add_argument(
        "--teacher",
        action="append",
        required=True,
        metavar="DIR",
        help="teacher model directory (repeat for several teachers)",
    )
    dist.add_argument(
        "--student",
        required=True,
        metavar="DIR_OR_CONFIG",
        help="student model directory, or a model config (.json file or a "
        "directory with only config.json) to start from scratch",
    )
    dist.add_argument("--data", required=True, metavar="FILE", help=".txt or .jsonl training text")
    dist.add_argument("--out", required=True, metavar="DIR", help="output directory")
    dist.add_argument("--config", metavar="FILE", help="DistillConfig as YAML or JSON")
    dist.add_argument("--tokenizer", metavar="DIR", help="tokenizer (default: the first teacher's)")
    dist.add_argument("--max-steps", type=int, default=100)
    dist.add_argument("--batch-size", type=int, default=8, help="per device")
    dist.add_argument("--block-size", type=int, default=128, help="tokens per packed sequence")
    dist.add_argument("--lr", type=float, default=1e-3)
    dist.add_argument("--eval-fraction", type=float, default=0.05)
    dist.add_argument("--temperature", type=float)
    dist.add_argument("--alpha", type=float, help="weight of the hard-label CE (KD gets 1 - alpha)")
    dist.add_argument("--divergence")
    dist.add_argument("--backend")
    dist.add_argument(
        "--teacher-weight",
        type=float,
        action="append",
        metavar="W",
        help="weight of each teacher, in --teacher order",
    )
    dist.add_argument("--seed", type=int)
    dist.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    dist.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        nargs="?",
        const=True,
        help="resume from a checkpoint (default: the last one in --out)",
    )
    dist.set_defaults(func=_distill)

    ev = sub.add_parser("eval", help="perplexity and next-token accuracy of a model")
    ev.add_argument("--model", required=True, metavar="DIR")
    ev.add_argument("--data", required=True, metavar="FILE")
    ev.add_argument("--block-size", type=int, default=128)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="evaluate only the held-out split that distill uses (default: all)",
    )
    ev.set_defaults(func=_eval)

    from fastkd.bench.run import add_arguments

    bench = sub.add_parser("bench", help="benchmark the losses against eager, compile, peers")
    add_arguments(bench)
    bench.set_defaults(func=_bench)

    from fastkd.check_gpu import add_arguments as add_check_gpu_arguments

    check = sub.add_parser(
        "check-gpu",
        help="on a CUDA machine: build, correctness suite, memcheck, benchmark (< 25 min)",
        description="On a machine with a CUDA GPU: build the CUDA kernels if needed, run the "
        "correctness suite on CUDA tensors, compute-sanitizer memcheck on a small case, and the "
        "benchmark at real shapes; then say what passed, failed and was skipped. Exits 1 on "
        "any failure, and at once (one line) without a GPU.",
    )
    add_check_gpu_arguments(check)
    check.set_defaults(func=_check_gpu)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"fastkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
