"""Command line: ``fastkd demo | distill | cache-teacher | generate | prune | compare | eval |
bench | check-gpu`` (also ``python -m fastkd ...``).

The top-level parser only names the commands, so ``fastkd --help`` imports neither torch nor
transformers; a command's parser is built when that command is chosen. ``distill`` parses with
``transformers.HfArgumentParser`` over ``RunArguments``, ``DistillConfig`` and
``TrainingArguments``: every field is a flag and a key of a ``--config`` file (docs/design.md
§10).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMANDS = {
    "demo": "train a tiny teacher, distil a student, compare",
    "distill": "distil teacher model(s) into a student",
    "cache-teacher": "run a teacher over the data once, cache its top-k log-probabilities",
    "generate": "sample a teacher's responses to prompts as training records",
    "prune": "make a smaller student from a teacher: drop layers, heads, channels (Minitron)",
    "compare": "train one student several ways (hard labels, KD, ...), one table",
    "eval": "perplexity and next-token accuracy of a model",
    "bench": "benchmark the losses against eager, compile, peers",
    "check-gpu": "on a CUDA machine: build, correctness suite, memcheck, benchmark (< 25 min)",
}

# fastkd's defaults for the TrainingArguments that every run sets (transformers' defaults are
# for epochs of a large dataset); the rest of fastkd's choices are in
# fastkd.training.run.training_arguments.
TRAINING_DEFAULTS = {
    "max_steps": 100,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,
    "seed": 0,
    "logging_steps": 10,
}
# DistillConfig fields typed "mode name or list of layer numbers".
LAYER_FIELDS = ("feature_layers", "attention_layers")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: a command and its arguments (parsed by the command's parser)."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fastkd",
        description="Fused knowledge distillation for large-vocabulary language models.",
        epilog=f"commands:\n{listing}\n\n`fastkd COMMAND --help` lists the flags of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command")
    return parser


# --- demo, eval, bench, check-gpu ------------------------------------------------------------


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd demo",
        description=COMMANDS["demo"] + " with a hard-label baseline (about 7 minutes on 2 CPU "
        "cores; --quick: about 3)",
        epilog="Writes into --out: report.json (held-out perplexity and accuracy of the teacher, "
        "the distilled student and the baseline, their held-out CE curves, peak memory, time, "
        "settings), loss_curves.png (each model's held-out hard-label CE during training), "
        "tokenizer/, teacher/ and student_kd/ (model directories with their tokenizer). No "
        "training checkpoints are kept.",
    )
    parser.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="output directory (default runs/demo)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run (about 3 minutes) in which distillation still beats the baseline",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the held-out split, the initialisations and the batches; the same seed "
        "gives the same numbers (default 0)",
    )
    return parser


def _demo(argv: list[str]) -> None:
    args = demo_parser().parse_args(argv)
    from fastkd.training.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, seed=args.seed)


def eval_parser() -> argparse.ArgumentParser:
    from fastkd.training.config import DistillConfig, RunArguments

    parser = argparse.ArgumentParser(prog="fastkd eval", description=COMMANDS["eval"])
    parser.add_argument("--model", required=True, metavar="DIR")
    parser.add_argument("--data", required=True, metavar="PATH", help=".txt/.jsonl or a directory")
    parser.add_argument("--block_size", "--block-size", type=int, default=RunArguments.block_size)
    parser.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=TRAINING_DEFAULTS["per_device_train_batch_size"],
    )
    parser.add_argument(
        "--eval_fraction",
        "--eval-fraction",
        type=float,
        default=None,
        help="evaluate only the blocks that `fastkd distill` with this --eval_fraction and "
        "--seed held out (default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=DistillConfig.seed, help="seed of the held-out split"
    )
    return parser


def _eval(argv: list[str]) -> None:
    args = eval_parser().parse_args(argv)
    from fastkd.training.run import evaluate_model

    metrics = evaluate_model(
        args.model,
        args.data,
        block_size=args.block_size,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
    )
    print(json.dumps(metrics, indent=2))


def cache_teacher_parser() -> argparse.ArgumentParser:
    from fastkd.training.config import RunArguments

    parser = argparse.ArgumentParser(
        prog="fastkd cache-teacher",
        description=COMMANDS["cache-teacher"] + ": per token of the data, packed as `fastkd "
        "distill` packs it (all blocks, before the held-out split), the teacher's top-k token "
        "ids and their log softmax(logits / T) over its full vocabulary. Rerun with the same "
        "arguments to resume (complete shards are kept); under torchrun the shards are split "
        "over the processes.",
        epilog="Writes into --out: shard-NNNNN.safetensors (input_ids, ids, logprobs of "
        "--shard-blocks blocks each) and manifest.json (fingerprints of the teacher, tokenizer "
        "and data, T, k, dtypes, block size, the shard list; complete: true once every shard "
        "is there). Storage: 4 + k * (2 + 2) bytes per token for bf16 and a vocabulary of at "
        "most 65536 (4-byte ids above).",
    )
    parser.add_argument("--teacher", required=True, metavar="DIR", help="teacher model directory")
    parser.add_argument("--data", required=True, metavar="PATH", help=".txt/.jsonl or a directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    parser.add_argument(
        "--temperature",
        required=True,
        type=float,
        metavar="T",
        help="temperature of the cached log-probabilities; distil from the cache at this T",
    )
    parser.add_argument(
        "--top-k", "--top_k", type=int, default=64, metavar="K", help="ids per token (default 64)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="storage of the log-probabilities (default bf16)",
    )
    parser.add_argument(
        "--block-size",
        "--block_size",
        type=int,
        default=RunArguments.block_size,
        metavar="N",
        help="tokens per packed block: the --block_size of the distill runs (default "
        f"{RunArguments.block_size})",
    )
    parser.add_argument(
        "--batch-size", "--batch_size", type=int, default=8, help="blocks per teacher forward"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory that packs the data (default: the teacher's)",
    )
    parser.add_argument(
        "--shard-blocks",
        "--shard_blocks",
        type=int,
        metavar="S",
        help="blocks per shard (default: about 256 MiB per shard)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="run the teacher in bf16 (as `distill --bf16`)"
    )
    parser.add_argument(
        "--allow-tokenizer-mismatch",
        "--allow_tokenizer_mismatch",
        action="store_true",
        help="with --tokenizer: take its ids as the teacher's tokens even where the teacher's "
        "own tokenizer disagrees",
    )
    return parser


def _cache_teacher(argv: list[str]) -> None:
    args = cache_teacher_parser().parse_args(argv)
    from fastkd.training.teacher_cache import build_cache

    build_cache(
        args.teacher,
        args.data,
        args.out,
        temperature=args.temperature,
        top_k=args.top_k,
        dtype=args.dtype,
        block_size=args.block_size,
        batch_size=args.batch_size,
        tokenizer=args.tokenizer,
        shard_blocks=args.shard_blocks,
        bf16=args.bf16,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
    )


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd generate",
        description=COMMANDS["generate"] + " (sequence-level KD; with --rationale-template, "
        "rationale distillation). Rerun with the same arguments to resume: complete records are "
        "kept, a line cut short by a kill is dropped.",
        epilog='Writes --out as JSON lines {"prompt", "response", "sample"} (prompt '
        "order, the K samples of a prompt together; `fastkd distill --data OUT` trains on the "
        "responses) and OUT.meta.json (the settings; a rerun with others is an error). Sample "
        "(i, j) depends only on the settings, --batch-size included, not on resumption.",
    )
    parser.add_argument("--teacher", required=True, metavar="DIR", help="teacher model directory")
    parser.add_argument(
        "--prompts", required=True, metavar="FILE", help='.jsonl with a "prompt" per line'
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="output .jsonl")
    parser.add_argument(
        "--max-new-tokens",
        "--max_new_tokens",
        type=int,
        default=128,
        metavar="N",
        help="most tokens per response (default 128)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="sampling temperature; 0 = greedy (default 1)",
    )
    parser.add_argument(
        "--top-p",
        "--top_p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling mass; 1 = off (default 1)",
    )
    parser.add_argument(
        "--num-return-sequences",
        "--num_return_sequences",
        type=int,
        default=1,
        metavar="K",
        help="samples per prompt (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=8,
        metavar="B",
        help="prompts per generate call (default 8)",
    )
    parser.add_argument(
        "--rationale-template",
        "--rationale_template",
        metavar="STR_OR_@FILE",
        help="what the teacher is shown instead of the bare prompt: a str.format template with "
        "a {prompt} field, or @path of a UTF-8 file holding one; records keep the bare prompt",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer directory (default: the teacher's)"
    )
    return parser


def _generate(argv: list[str]) -> None:
    args = generate_parser().parse_args(argv)
    template = args.rationale_template
    if template is not None and template.startswith("@"):
        path = Path(template[1:])
        if not path.is_file():
            raise FileNotFoundError(f"--rationale-template {template}: no such file")
        template = path.read_text(encoding="utf-8")
    from fastkd.training.generate import generate

    count = generate(
        args.teacher,
        args.prompts,
        args.out,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        num_return_sequences=args.num_return_sequences,
        seed=args.seed,
        batch_size=args.batch_size,
        rationale_template=template,
        tokenizer=args.tokenizer,
    )
    print(f"{count} records in {args.out}")


def bench_parser() -> argparse.ArgumentParser:
    from fastkd.bench.run import add_arguments

    parser = argparse.ArgumentParser(prog="fastkd bench", description=COMMANDS["bench"])
    add_arguments(parser)
    return parser


def _bench(argv: list[str]) -> None:
    from fastkd.bench.run import run

    run(bench_parser().parse_args(argv))


def _check_gpu(argv: list[str]) -> int:
    from fastkd.check_gpu import add_arguments, run

    parser = argparse.ArgumentParser(
        prog="fastkd check-gpu",
        description="On a machine with a CUDA GPU: build the CUDA kernels if needed, run the "
        "correctness suite on CUDA tensors, compute-sanitizer memcheck on a small case, and the "
        "benchmark at real shapes; then say what passed, failed and was skipped. Exits 1 on "
        "any failure, and at once (one line) without a GPU.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _layer_list(text: str) -> list[int]:
    """``"1,3"`` -> ``[1, 3]``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 1,3, got {text!r}"
        ) from None


def prune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd prune",
        description=COMMANDS["prune"] + ". Depth: drop the layers of lowest block influence "
        "(1 - cos of a layer's input and output hidden states on the calibration text), or the "
        "given ones. Width: keep the MLP channels, attention heads and embedding channels of "
        "highest activation on the calibration text; a GQA model keeps every KV head and "
        "--heads / num_key_value_heads query heads of each, an MHA model drops whole heads. "
        "Then train it with `fastkd distill --student OUT`.",
        epilog="Writes --out (absent or empty; written under a temporary name beside it and "
        "renamed, so never half-written): the model (safetensors) with the teacher's tokenizer, "
        "and prune_report.json (kept and dropped layers, importance scores, shapes and "
        "calibration perplexity before and after).",
    )
    parser.add_argument("--teacher", required=True, metavar="DIR", help="teacher model directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="student directory to write")
    parser.add_argument(
        "--calibration", required=True, metavar="PATH", help=".txt/.jsonl or a directory"
    )
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--layers", type=int, metavar="L", help="layers to keep")
    depth.add_argument(
        "--drop-layers",
        "--drop_layers",
        type=_layer_list,
        metavar="I,J",
        help="0-based indices of the layers to drop",
    )
    parser.add_argument("--hidden", type=int, metavar="H", help="hidden size to keep")
    parser.add_argument(
        "--intermediate", type=int, metavar="I", help="MLP intermediate size to keep"
    )
    parser.add_argument("--heads", type=int, metavar="A", help="attention heads per layer to keep")
    parser.add_argument(
        "--block-size",
        "--block_size",
        type=int,
        default=128,
        metavar="N",
        help="tokens per calibration block (default 128)",
    )
    parser.add_argument(
        "--max-blocks",
        "--max_blocks",
        type=int,
        default=64,
        metavar="M",
        help="calibration blocks used, the first ones (default 64)",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=8,
        metavar="B",
        help="blocks per forward (default 8)",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer directory (default: the teacher's)"
    )
    return parser


def _prune(argv: list[str]) -> None:
    args = prune_parser().parse_args(argv)
    from fastkd.training.prune import prune

    report = prune(
        args.teacher,
        args.out,
        calibration=args.calibration,
        layers=args.layers if args.drop_layers is None else args.drop_layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        block_size=args.block_size,
        max_blocks=args.max_blocks,
        batch_size=args.batch_size,
        tokenizer=args.tokenizer,
    )
    summary = {
        "out": args.out,
        "shape": report["shape"],
        "parameters": report["parameters"],
        "dropped_layers": report["layers"]["dropped"],
        "calibration_perplexity": {
            "teacher": report["calibration"]["perplexity_before"],
            "pruned": report["calibration"]["perplexity_after"],
        },
    }
    print(json.dumps(summary, indent=2))


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd compare",
        description=COMMANDS["compare"] + ": the same student architecture, data, held-out "
        "blocks, seed, steps and batches for every method of a study (hard labels, vanilla, "
        "feature, sequence-level and on-policy KD, a pruned-teacher init, ...); held-out "
        "perplexity and accuracy, retention vs the teacher, gap closed vs the baseline, ROUGE-L "
        "of greedy continuations against the teacher's, wall time and step peak memory.",
        epilog="Writes into --out: compare.json (study, machine, versions, seeds, one row per "
        "method), compare.md (the table), compare.png (perplexity and ROUGE-L per method). "
        "The study file's schema: examples/compare.yaml.",
    )
    study = parser.add_mutually_exclusive_group(required=True)
    study.add_argument("--config", metavar="FILE", help="the study (.yaml/.yml/.json)")
    study.add_argument(
        "--demo",
        action="store_true",
        help="the built-in study on the demo corpus (examples/compare.yaml; about 7 minutes "
        "on 2 CPU cores)",
    )
    parser.add_argument(
        "--out", default="runs/compare", metavar="DIR", help="output directory (runs/compare)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quarter of every budget (steps, prompts): checks a study end to end; the "
        "numbers mean little",
    )
    parser.add_argument(
        "--work",
        metavar="DIR",
        help="keep the tokenizer, teacher, students' init, prompts and generations here (absent "
        "or empty; default: a temporary directory, deleted)",
    )
    return parser


def _compare(argv: list[str]) -> None:
    args = compare_parser().parse_args(argv)
    from fastkd.training.compare import DEMO_STUDY, load_study, run_study, summary

    study = load_study(DEMO_STUDY if args.demo else args.config)
    if args.quick:
        study = study.quick()
    report = run_study(study, args.out, work=args.work)
    print(summary(report))
    print(f"wrote {args.out}: compare.json, compare.md, compare.png ({report['seconds']:.0f} s)")


# --- distill -------------------------------------------------------------------------------


class _ParseError(Exception):
    """An argparse error, raised instead of exiting so that its source can be named."""


def _distill_flags() -> type:
    """A dataclass with ``DistillConfig``'s fields as the parser should see them: ``seed`` is
    left to ``TrainingArguments`` (one ``--seed``), layer fields take mode names or numbers
    (``HfArgumentParser`` keeps one type of a union), backend names are choices."""
    import dataclasses
    import typing

    from fastkd.backends import BACKENDS
    from fastkd.training.config import DistillConfig

    hints = typing.get_type_hints(DistillConfig)
    specs = []
    for f in dataclasses.fields(DistillConfig):
        if f.name == "seed":
            continue
        kind, metadata = hints[f.name], dict(f.metadata)
        if f.name in LAYER_FIELDS:
            kind = list[str]
            metadata.update(default=f.default, metavar="MODE_OR_LAYER")
        elif f.name == "teacher_weights":
            metadata.update(action="extend", aliases=["--teacher-weight"], metavar="W")
        elif f.name == "backend":
            metadata.update(choices=BACKENDS)
        specs.append((f.name, kind, dataclasses.field(default=f.default, metadata=metadata)))
    flags = dataclasses.make_dataclass("DistillConfig", specs)
    flags._argument_group_name = "distillation (fastkd.training.DistillConfig)"
    return flags


def distill_parser():
    """``HfArgumentParser`` over ``RunArguments``, ``DistillConfig`` and ``TrainingArguments``,
    with ``--config`` and the short spellings ``--out``, ``--lr``, ``--batch-size``,
    ``--resume``."""
    import transformers

    from fastkd.training.config import RunArguments

    class Parser(transformers.HfArgumentParser):
        def error(self, message: str):
            raise _ParseError(message)

    parser = Parser(
        [RunArguments, _distill_flags(), transformers.TrainingArguments],
        prog="fastkd distill",
        description=f"{COMMANDS['distill']}. fastkd's training defaults: cosine schedule, "
        "warm-up over 5% of the steps, weight decay 0.01, the last 2 checkpoints kept (one at "
        "the end unless --save_steps), the CPU when there is no CUDA device, report_to none, "
        "the progress bar on.",
        allow_abbrev=False,  # with ~150 flags a prefix would silently pick one
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON mapping of any flags above by field name (flat); flags given on "
        "the command line win",
    )
    aliases = parser.add_argument_group("short spellings")
    aliases.add_argument("--out", dest="output_dir", metavar="DIR", help="--output_dir")
    aliases.add_argument("--lr", dest="learning_rate", type=float, help="--learning_rate")
    aliases.add_argument(
        "--batch-size",
        "--batch_size",
        dest="per_device_train_batch_size",
        type=int,
        help="--per_device_train_batch_size (the eval batch size follows unless given)",
    )
    from fastkd.training.run import RESUME_LAST

    aliases.add_argument(
        "--resume",
        dest="resume_from_checkpoint",
        nargs="?",
        const=RESUME_LAST,
        metavar="CHECKPOINT",
        help=f"--resume_from_checkpoint; alone: {RESUME_LAST}, the newest checkpoint in --out",
    )
    parser.set_defaults(**TRAINING_DEFAULTS)  # shown by --help
    return parser


def _given(parser, argv: list[str], names: list[str]) -> dict:
    """The values of the flags present in ``argv`` (defaults are applied later, by field)."""
    # Every destination starts as None, so argparse applies no default and what changed was
    # given (no flag parses to None).
    namespace = argparse.Namespace(**dict.fromkeys(names))
    parser.parse_args(argv, namespace=namespace)
    return {k: v for k, v in vars(namespace).items() if v is not None}


def _file_tokens(parser, settings: dict, known: set[str], source: str) -> tuple[list[str], dict]:
    """A config file's settings as command-line tokens (so argparse converts and checks them
    as it does flags), and the settings tokens cannot express (null, empty lists)."""
    # `key: true` for a flag whose value is optional (`--fsdp`, the bool flags) is the bare flag.
    bare = {a.dest for a in parser._actions if a.nargs == "?" and a.const is True}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise _ParseError(f"{source}: unknown settings {unknown}")
    tokens: list[str] = []
    direct = {}
    for key, value in settings.items():
        if value is None or value == []:
            direct[key] = value
            continue
        tokens.append(f"--{key}")
        if value is True and key in bare:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool):
                tokens.append(str(v).lower())
            elif isinstance(v, dict):
                tokens.append(json.dumps(v))
            else:
                tokens.append(str(v))
    return tokens, direct


def _layers(name: str, values: list[str] | str | list[int]) -> str | list[int]:
    """``["auto"]`` -> ``"auto"``, ``["1", "3"]`` -> ``[1, 3]``."""
    if isinstance(values, str):
        return values
    if len(values) == 1 and str(values[0]) in ("auto", "all", "key", "late"):
        return str(values[0])
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(
            f"{name} must be one of auto, all, key, late or layer numbers, got {values}"
        ) from None


def parse_distill_args(argv: list[str]):
    """``(RunArguments, DistillConfig, TrainingArguments)`` of ``fastkd distill ARGV``: the
    ``--config`` file's settings, overridden by the flags given, over fastkd's defaults.

    Usage errors (unknown flags or keys, values of the wrong type or outside a flag's choices,
    a missing required flag) exit like argparse does, naming the flag (and the config file);
    values out of range raise ValueError naming the field.
    """
    import dataclasses

    import transformers

    from fastkd.training.config import DistillConfig, RunArguments, load_settings
    from fastkd.training.run import training_arguments

    parser = distill_parser()
    groups = {
        cls: [f.name for f in dataclasses.fields(cls) if f.init]
        for cls in (RunArguments, DistillConfig, transformers.TrainingArguments)
    }
    names = sorted({name for fields in groups.values() for name in fields})
    try:
        given = _given(parser, argv, [*names, "config"])
        config_file = given.pop("config", None)
        if config_file is not None:
            try:
                tokens, direct = _file_tokens(
                    parser, load_settings(config_file), set(names), config_file
                )
                from_file = {**_given(parser, tokens, names), **direct}
            except _ParseError as e:
                raise _ParseError(f"{config_file}: {e}") from None
            given = {**from_file, **given}
        for name, flag in (("output_dir", "--out"), ("student", "--student"), ("data", "--data")):
            if name not in given:
                raise _ParseError(f"{flag} is required (on the command line or in --config)")
    except _ParseError as e:
        parser.print_usage(sys.stderr)
        parser.exit(2, f"{parser.prog}: error: {e}\n")

    def pick(cls) -> dict:
        return {k: given[k] for k in groups[cls] if k in given}

    run = RunArguments(**pick(RunArguments))
    distill = pick(DistillConfig)
    for name in LAYER_FIELDS:
        if name in distill:
            distill[name] = _layers(name, distill[name])
    config = DistillConfig(**{**distill, "seed": given.get("seed", TRAINING_DEFAULTS["seed"])})
    training = {**TRAINING_DEFAULTS, **pick(transformers.TrainingArguments)}
    for name, value in training.items():  # dict settings as JSON: name the one that is not
        if isinstance(value, str) and value.startswith("{"):
            try:
                json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}: invalid JSON {value!r} ({e})") from None
    batch_size = training.pop("per_device_train_batch_size")
    args = training_arguments(
        training.pop("output_dir"),
        max_steps=training.pop("max_steps"),
        batch_size=batch_size,
        learning_rate=training.pop("learning_rate"),
        seed=training.pop("seed"),
        **training,
    )
    return run, config, args


def _distill(argv: list[str]) -> None:
    run, config, args = parse_distill_args(argv)
    from fastkd.training.run import distill

    distill(run, config, args)


_HANDLERS = {
    "demo": _demo,
    "distill": _distill,
    "cache-teacher": _cache_teacher,
    "generate": _generate,
    "prune": _prune,
    "compare": _compare,
    "eval": _eval,
    "bench": _bench,
    "check-gpu": _check_gpu,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _HANDLERS[args.command](args.args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"fastkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
