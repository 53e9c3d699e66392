"""Distilling from a teacher cache on the demo corpus:
``python -m fastkd.bench.teacher_cache_study --out FILE``.

The demo's teacher (``fastkd demo --quick`` sizes, the Python standard library as text) is
trained once, cached with ``fastkd cache-teacher``'s entry point (``build_cache``) at each k,
and the same student (same initialisation, batches, steps and seed) is distilled from every
cache in every tail mode, from the online teacher (dense KD, ``Distiller`` with the model) and
on the hard labels alone. Reported: each cache's build throughput and bytes per token, each
student's held-out perplexity and accuracy (``fastkd.training.evaluate`` on the held-out
blocks), its median step time, and the peak memory of a training step with the cache and with
the online teacher. JSON (``--out``) with every number and setting, and a Markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from fastkd._options import TAILS
from fastkd.memory import peak_memory_bytes
from fastkd.training.config import DistillConfig
from fastkd.training.data import (
    TeacherCacheDataset,
    pack,
    split_datasets,
    stdlib_corpus,
    train_tokenizer,
)
from fastkd.training.demo import DEFAULT, QUICK, DemoSettings, llama
from fastkd.training.distiller import Distiller
from fastkd.training.evaluate import evaluate
from fastkd.training.run import training_arguments
from fastkd.training.teacher_cache import TeacherCache, build_cache
from fastkd.training.trainer import DistillationTrainer

TOP_KS = (1, 8, 64)
CACHE_DTYPE = "bf16"  # what cache-teacher stores by default
# Steps whose time is left out of the median (thread pools, allocator, first cache reads).
WARMUP_STEPS = 2


class _StepTimes(transformers.TrainerCallback):
    """Wall time between consecutive optimizer steps (the batch's loading included, where the
    cache is read), and no checkpoints: the study keeps nothing but its report."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now
        control.should_save = False

    def median(self) -> float:
        timed = self.seconds[WARMUP_STEPS:] or self.seconds
        return statistics.median(timed)


def _memory_mb(settings: DemoSettings, cache_dir: Path | None) -> float:
    """Peak resident memory (MiB) of building the demo's student (and, without a cache, its
    teacher) and one training step (forward, backward, AdamW step) on one batch, with the
    Distiller from ``cache_dir`` or from the online teacher, in a fresh process
    (``fastkd.memory.peak_memory_bytes``, beyond the imports and a warm-up at toy size)."""
    sizes = {"teacher": settings.teacher, "student": settings.student}
    shrink = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    toy = {name: {**value, **shrink} for name, value in sizes.items()}
    setup = f"""
        import torch, transformers
        from fastkd.training import DistillConfig, Distiller
        from fastkd.training.teacher_cache import TeacherCache
        B, S, V = {settings.batch_size}, {settings.block_size}, {settings.vocab_size}
        CACHE = {str(cache_dir) if cache_dir else None!r}
        def llama(sizes):
            config = transformers.LlamaConfig(vocab_size=V, max_position_embeddings=S,
                                              tie_word_embeddings=False, **sizes)
            return transformers.LlamaForCausalLM(config)
        def step(rows, sizes):
            torch.manual_seed(0)
            ids = torch.randint(0, V, (rows, S))
            student = llama(sizes["student"])
            config = DistillConfig(temperature={settings.temperature}, alpha={settings.alpha})
            if CACHE:
                cache = TeacherCache(CACHE)
                t_ids, t_lp = cache.blocks(list(range(rows)))
                distiller = Distiller(student, config=config, teacher_cache=cache)
                batch = dict(teacher_ids=t_ids, teacher_logprobs=t_lp)
            else:
                teacher = llama(sizes["teacher"])
                distiller = Distiller(student, teacher, config)
                batch = {{}}
            opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
            distiller(ids, **batch).loss.backward()
            opt.step()
        # The same code path at toy model sizes first: libraries, kernels, the cache's reader.
        step(2, {toy!r})
    """
    return round(peak_memory_bytes(setup, f"step(B, {sizes!r})") / 2**20, 1)


def run_study(
    work: Path,
    settings: DemoSettings = QUICK,
    *,
    top_ks: tuple[int, ...] = TOP_KS,
    seed: int = 0,
    memory: bool = True,
) -> dict:
    """Run the study in ``work`` (data, teacher and caches are written there) and return the
    report (``main`` writes it as JSON)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    transformers.set_seed(seed)
    corpus = stdlib_corpus(settings.corpus_bytes)
    (work / "data.txt").write_text(corpus)
    tokenizer = train_tokenizer([corpus], settings.vocab_size)
    # Packed as build_cache and fastkd distill pack the file: the cache's block numbers.
    input_ids, labels = pack([{"text": corpus}], tokenizer, settings.block_size)
    train_ds, eval_ds = split_datasets(input_ids, labels, settings.eval_fraction, seed)
    print(f"{len(train_ds)} training, {len(eval_ds)} held-out blocks of {settings.block_size}")

    def train(trainer_cls, model, steps, lr, **kwargs) -> float:
        timer = _StepTimes()
        args = training_arguments(
            work / "trainer",
            max_steps=steps,
            batch_size=settings.batch_size,
            learning_rate=lr,
            seed=seed,
            logging_steps=max(1, steps // 4),
        )
        trainer_cls(model, args, callbacks=[timer], **kwargs).train()
        return timer.median()

    print(f"teacher: {settings.teacher_steps} steps", flush=True)
    teacher = llama(settings.teacher, tokenizer, settings.block_size)
    train(
        transformers.Trainer,
        teacher,
        settings.teacher_steps,
        settings.teacher_learning_rate,
        train_dataset=train_ds,
    )
    teacher.eval()
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    tokens = input_ids.numel()

    caches = {}
    for k in top_ks:
        path = work / f"cache-k{k}"
        print(f"cache k={k}", flush=True)
        t0 = time.perf_counter()
        manifest = build_cache(
            work / "teacher",
            work / "data.txt",
            path,
            temperature=settings.temperature,
            top_k=k,
            dtype=CACHE_DTYPE,
            block_size=settings.block_size,
            batch_size=settings.batch_size,
        )
        seconds = time.perf_counter() - t0
        TeacherCache(path).check_data(input_ids, tokenizer)  # the blocks numbered as here
        on_disk = sum(f.stat().st_size for f in path.iterdir())
        caches[k] = {
            "seconds": round(seconds, 2),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "bytes_on_disk": on_disk,
            "bytes_per_token_on_disk": round(on_disk / tokens, 2),
            "bytes_per_token_payload": manifest["bytes_per_token"],
            "id_dtype": manifest["id_dtype"],
            "dtype": manifest["dtype"],
        }

    transformers.set_seed(seed + 1)
    init = llama(settings.student, tokenizer, settings.block_size)  # every student starts from it
    config = DistillConfig(temperature=settings.temperature, alpha=settings.alpha, seed=seed)
    rows = []

    def student_run(name: str, kind: str, build, **extra) -> None:
        print(name, flush=True)
        student = copy.deepcopy(init)
        trainer_cls, model, kwargs = build(student)
        step_s = train(
            trainer_cls,
            model,
            settings.student_steps,
            settings.student_learning_rate,
            **kwargs,
        )
        metrics = evaluate(student, eval_ds, batch_size=settings.batch_size)
        rows.append(
            {
                "name": name,
                "kind": kind,
                **extra,
                "perplexity": round(metrics["perplexity"], 3),
                "accuracy": round(metrics["accuracy"], 4),
                "loss": round(metrics["loss"], 5),
                "median_step_s": round(step_s, 4),
            }
        )

    for k in top_ks:
        cache = TeacherCache(work / f"cache-k{k}")
        train_set = TeacherCacheDataset(train_ds, cache)
        for tail in TAILS:
            cfg = config.replace(tail=tail)

            def cached(student, cfg=cfg, cache=cache, train_set=train_set):
                distiller = Distiller(student, config=cfg, teacher_cache=cache)
                return DistillationTrainer, distiller, {"train_dataset": train_set}

            student_run(f"cache k={k} {tail}", "cache", cached, top_k=k, tail=tail)

    def online(student):
        return DistillationTrainer, Distiller(student, teacher, config), {"train_dataset": train_ds}

    def hard_labels(student):
        return transformers.Trainer, student, {"train_dataset": train_ds}

    student_run("online dense KD", "online", online)
    student_run("hard labels", "baseline", hard_labels)
    teacher_metrics = evaluate(teacher, eval_ds, batch_size=settings.batch_size)

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seeds": {"split_and_batches": seed, "teacher_init": seed, "student_init": seed + 1},
        "settings": {
            **dataclasses.asdict(settings),
            "top_ks": list(top_ks),
            "cache_dtype": CACHE_DTYPE,
            "train_blocks": len(train_ds),
            "held_out_blocks": len(eval_ds),
        },
        "step_time": (
            f"median wall time between optimizer steps (batch loading included) after the "
            f"first {WARMUP_STEPS}, from a Trainer callback"
        ),
        "teacher": {k: round(v, 4) for k, v in teacher_metrics.items() if k != "tokens"},
        "caches": {str(k): v for k, v in caches.items()},
        "students": rows,
        "seconds": round(time.time() - start, 1),
    }
    if memory:
        report["peak_memory_mb"] = {
            "what": "peak RSS of building the models and one training step (fwd, bwd, AdamW) "
            "on one batch, fresh process, beyond the imports (fastkd.memory.peak_memory_bytes)",
            f"cache_k{max(top_ks)}": _memory_mb(settings, work / f"cache-k{max(top_ks)}"),
            "online_teacher": _memory_mb(settings, None),
        }
    return report


def markdown(report: dict) -> str:
    """The report's tables in Markdown."""
    lines = [
        "| cache k | build tokens/s | bytes/token (payload) | bytes/token (on disk) |",
        "|---:|---:|---:|---:|",
    ]
    for k, c in report["caches"].items():
        lines.append(
            f"| {k} | {c['tokens_per_s']:.0f} | {c['bytes_per_token_payload']} | "
            f"{c['bytes_per_token_on_disk']:.1f} |"
        )
    t = report["teacher"]
    lines += [
        "",
        "| student | held-out perplexity | accuracy | median step (s) |",
        "|---|---:|---:|---:|",
        f"| (teacher) | {t['perplexity']:.2f} | {t['accuracy']:.4f} | |",
    ]
    for r in report["students"]:
        lines.append(
            f"| {r['name']} | {r['perplexity']:.2f} | {r['accuracy']:.4f} | "
            f"{r['median_step_s']:.3f} |"
        )
    memory = report.get("peak_memory_mb")
    if memory:
        values = ", ".join(f"{k} {v} MiB" for k, v in memory.items() if k != "what")
        lines += ["", f"peak memory of a training step: {values}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd.bench.teacher_cache_study", description=__doc__
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="JSON report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings",
        choices=("quick", "default"),
        default="quick",
        help="the demo's sizes and budgets: those of `fastkd demo --quick` (default) or of "
        "`fastkd demo`",
    )
    parser.add_argument(
        "--student-steps", type=int, default=None, help="steps of every student (default: the "
        "settings')",
    )  # fmt: skip
    parser.add_argument(
        "--work", metavar="DIR", help="keep the data, teacher and caches here (default: a "
        "temporary directory, deleted)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastkd-cache-study-") as scratch:
        settings = QUICK if args.settings == "quick" else DEFAULT
        if args.student_steps is not None:
            settings = dataclasses.replace(settings, student_steps=args.student_steps)
        report = run_study(Path(args.work or scratch), settings, seed=args.seed)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
