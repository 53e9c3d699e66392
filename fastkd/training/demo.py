"""``fastkd demo``: a complete distillation on text every machine has offline.

Corpus: the Python standard library's own source files. A byte-level BPE tokenizer is trained
on it, then a small Llama-style teacher, then a smaller student is distilled from the teacher
with fastkd while the same student (same initialisation, same batches, same steps) is trained
on the hard labels alone: the classic soft-vs-hard-label experiment. Everything is evaluated on
held-out blocks, during training too (the plotted curves: every model's hard-label CE, so the
students' curves compare like with like), and the fused loss's peak memory is measured beside
the eager loss's.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from fastkd.memory import peak_memory_bytes
from fastkd.training.config import DistillConfig
from fastkd.training.data import BlockDataset, held_out_split, stdlib_corpus, train_tokenizer
from fastkd.training.distiller import Distiller
from fastkd.training.evaluate import evaluate
from fastkd.training.run import training_arguments
from fastkd.training.trainer import DistillationTrainer


@dataclass(frozen=True)
class DemoSettings:
    """Data, model sizes and training budgets of one demo run (``DEFAULT``, ``QUICK``)."""

    corpus_bytes: int
    vocab_size: int
    block_size: int
    batch_size: int
    teacher_steps: int
    student_steps: int
    teacher_learning_rate: float
    student_learning_rate: float
    teacher: dict
    student: dict
    # T = 1: at this budget T = 2 gave a worse student than the hard-label baseline.
    temperature: float = 1.0
    alpha: float = 0.5
    eval_fraction: float = 0.05
    # The plotted held-out CE: measured this many times in each training run, on this many
    # held-out blocks (a subset keeps it cheap; the final table uses them all).
    curve_points: int = 8
    curve_blocks: int = 64


DEFAULT = DemoSettings(
    corpus_bytes=6_000_000,
    vocab_size=8192,
    block_size=128,
    batch_size=16,
    teacher_steps=400,
    student_steps=200,
    teacher_learning_rate=3e-3,
    student_learning_rate=3e-3,
    teacher=dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    student=dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
)
# --quick: distillation still beats the baseline when the teacher is trained long enough to be
# far ahead of a short student run (a 120-step teacher was not: ppl 746 vs 676). A smaller
# vocabulary makes every step cheaper, and with 60 student steps the teacher's soft targets are
# the better signal, so they get most of the weight (alpha = 0.1 beat the baseline by more than
# alpha = 0.5 in our trials).
QUICK = DemoSettings(
    corpus_bytes=2_000_000,
    vocab_size=4096,
    block_size=128,
    batch_size=16,
    teacher_steps=240,
    student_steps=60,
    teacher_learning_rate=3e-3,
    student_learning_rate=3e-3,
    teacher=DEFAULT.teacher,
    student=DEFAULT.student,
    alpha=0.1,
)


def llama(sizes: dict, tokenizer, block_size: int) -> transformers.LlamaForCausalLM:
    """A freshly initialised Llama of ``sizes`` (config fields) for ``tokenizer``'s vocabulary
    and blocks of ``block_size`` tokens, with untied embeddings (the demo's models)."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **sizes,
    )
    return transformers.LlamaForCausalLM(config)


class _HeldOutCE(transformers.TrainerCallback):
    """Records ``model``'s held-out CE every ``every`` steps and at the last step, with the same
    ``evaluate`` as the final table, and vetoes the Trainer's checkpoints: the demo saves the
    models it keeps itself, and a checkpoint of each run would leave ~150 MB behind."""

    def __init__(self, model: torch.nn.Module, dataset: BlockDataset, every: int) -> None:
        self.model, self.dataset, self.every = model, dataset, every
        self.points: list[list] = []  # [step, CE]: JSON as the report holds them

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            ce = evaluate(self.model, self.dataset, batch_size=args.per_device_eval_batch_size)
            self.points.append([state.global_step, round(ce["loss"], 4)])
        control.should_save = False


def _memory(settings: DemoSettings) -> dict:
    """Peak memory of one fwd+bwd of the distillation loss at the demo's shape: fastkd's fused
    loss on hidden states versus eager PyTorch on materialized logits."""
    n = settings.batch_size * settings.block_size
    ht, hs, v = (
        settings.teacher["hidden_size"],
        settings.student["hidden_size"],
        settings.vocab_size,
    )
    setup = f"""
        import torch, torch.nn.functional as F, fastkd
        torch.manual_seed(0)
        def make(n):
            return (torch.randn(n, {hs}, requires_grad=True), torch.randn({v}, {hs}) * 0.05,
                    torch.randn(n, {ht}), torch.randn({v}, {ht}) * 0.05,
                    torch.randint(0, {v}, (n,)))
        def fused(n):
            h, w, t, wt, y = make(n)
            w.requires_grad_(True)
            fastkd.fused_linear_kd_loss(h, w, y, teacher_hidden=t, teacher_weight=wt,
                                        temperature={settings.temperature},
                                        alpha={settings.alpha}).backward()
        def eager(n):
            h, w, t, wt, y = make(n)
            w.requires_grad_(True)
            zs, zt, T = h @ w.t(), t @ wt.t(), {settings.temperature}
            kl = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1),
                          reduction="batchmean", log_target=True)
            a = {settings.alpha}
            ((1 - a) * T * T * kl + a * F.cross_entropy(zs, y)).backward()
        fused(8)
        eager(8)
    """
    return {
        name: round(peak_memory_bytes(setup, f"{name}({n})") / 2**20, 1)
        for name in ("fused", "eager")
    }


def _plot(curves: dict[str, list[list]], blocks: int, path: Path) -> None:
    """``curves``: the teacher's (dashed, for reference), then the two students'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, points), style in zip(curves.items(), ("--", "-", "-")):
        ax.plot(*zip(*points), style, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out cross-entropy (nats/token, lower is better)")
    ax.set_title(f"fastkd demo: hard-label CE on {blocks} held-out blocks during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_output_dir(out: Path) -> None:
    """Reject an ``out`` the demo cannot write its directories into (before any heavy work)."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"out: {parent} exists and is not a directory")
            break


def run_demo(
    out: Path, quick: bool = False, seed: int = 0, settings: DemoSettings | None = None
) -> dict:
    """Run the demo and return its report. Writes into ``out`` (and nothing else, no
    checkpoints): ``report.json``, ``loss_curves.png`` and the directories ``tokenizer/``,
    ``teacher/`` and ``student_kd/`` (each model directory holds the tokenizer too).
    ``settings`` overrides the default (or ``--quick``) sizes."""
    out = Path(out)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if settings is not None and not isinstance(settings, DemoSettings):
        raise TypeError(f"settings must be a DemoSettings, got {type(settings).__name__}")
    check_output_dir(out)
    settings = settings or (QUICK if quick else DEFAULT)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(seed)

    def step(i: int, what: str) -> None:
        print(f"[{i}/6 {time.time() - start:5.0f}s] {what}", flush=True)

    step(1, f"corpus: {settings.corpus_bytes / 1e6:.0f} MB of the Python standard library")
    corpus = stdlib_corpus(settings.corpus_bytes)
    step(2, f"tokenizer: byte-level BPE, {settings.vocab_size} tokens")
    tokenizer = train_tokenizer([corpus], settings.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    train_ds, eval_ds = held_out_split(
        [{"text": corpus}], tokenizer, settings.block_size, settings.eval_fraction, seed
    )
    curve_ds = BlockDataset(
        eval_ds.input_ids[: settings.curve_blocks], eval_ds.labels[: settings.curve_blocks]
    )
    print(
        f"    {len(train_ds)} training and {len(eval_ds)} held-out blocks of "
        f"{settings.block_size} tokens"
    )

    # The Trainer's output directory only: _HeldOutCE vetoes its checkpoints, and the
    # directory goes at the end, so nothing but what the demo saves is left in ``out``.
    scratch = tempfile.TemporaryDirectory(prefix="fastkd-demo-")

    def train_run(trainer_cls, model, watched, steps: int, lr: float, **kwargs):
        every = max(1, steps // settings.curve_points)
        curve = _HeldOutCE(watched, curve_ds, every)
        args = training_arguments(
            Path(scratch.name),
            max_steps=steps,
            batch_size=settings.batch_size,
            learning_rate=lr,
            seed=seed,
            logging_steps=every,
        )
        trainer = trainer_cls(model, args, train_dataset=train_ds, callbacks=[curve], **kwargs)
        trainer.train()
        return trainer, curve.points

    with scratch:
        step(3, f"teacher: Llama {settings.teacher}, {settings.teacher_steps} steps")
        teacher = llama(settings.teacher, tokenizer, settings.block_size)
        _, teacher_curve = train_run(
            transformers.Trainer,
            teacher,
            teacher,
            settings.teacher_steps,
            settings.teacher_learning_rate,
        )
        teacher.save_pretrained(out / "teacher")
        tokenizer.save_pretrained(out / "teacher")

        transformers.set_seed(seed + 1)
        student = llama(settings.student, tokenizer, settings.block_size)
        baseline = copy.deepcopy(student)  # same initialisation
        config = DistillConfig(temperature=settings.temperature, alpha=settings.alpha, seed=seed)
        step(
            4,
            f"student: Llama {settings.student}, distilled for {settings.student_steps} steps "
            f"(T={config.temperature}, alpha={config.alpha} = CE weight)",
        )
        kd_trainer, kd_curve = train_run(
            DistillationTrainer,
            Distiller(student, teacher, config),
            student,
            settings.student_steps,
            settings.student_learning_rate,
            processing_class=tokenizer,
        )
        kd_trainer.save_model(str(out / "student_kd"))

        step(5, f"baseline: the same student on hard labels only, {settings.student_steps} steps")
        _, baseline_curve = train_run(
            transformers.Trainer,
            baseline,
            baseline,
            settings.student_steps,
            settings.student_learning_rate,
        )

    step(6, f"evaluation on {len(eval_ds)} held-out blocks, and the loss's peak memory")
    results = {
        name: {k: round(v, 4) for k, v in evaluate(model, eval_ds).items() if k != "tokens"}
        for name, model in (
            ("teacher", teacher),
            ("student_kd", student),
            ("student_baseline", baseline),
        )
    }
    memory = _memory(settings)
    curves = {"teacher": teacher_curve, "student_kd": kd_curve, "student_baseline": baseline_curve}
    report = {
        **results,
        "retention": round(results["student_kd"]["accuracy"] / results["teacher"]["accuracy"], 4),
        "kd_beats_baseline": results["student_kd"]["perplexity"]
        < results["student_baseline"]["perplexity"],
        # [step, CE] pairs: every model's hard-label CE on the first held-out blocks.
        "held_out_ce_curves": {"blocks": len(curve_ds), **curves},
        "seconds": round(time.time() - start, 1),
        "kd_loss_peak_memory_mb": memory["fused"],
        "eager_loss_peak_memory_mb": memory["eager"],
        "settings": {k: v for k, v in settings.__dict__.items()},
        "backend": fastkd_backend(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plot(
        {
            f"teacher ({settings.teacher_steps} steps)": teacher_curve,
            f"student distilled with fastkd (T={config.temperature}, alpha={config.alpha})": (
                kd_curve
            ),
            "student on hard labels only (baseline)": baseline_curve,
        },
        len(curve_ds),
        out / "loss_curves.png",
    )
    print_table(report)
    print(
        f"wrote {out}: report.json, loss_curves.png (held-out CE during training), tokenizer/, "
        "teacher/, student_kd/ (model directories with their tokenizer; no checkpoints kept)"
    )
    return report


def fastkd_backend() -> str:
    """The backend the distillation ran on (the Trainer trains on the GPU when there is one)."""
    from fastkd.backends import select_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return select_backend(None, device, torch.float32)


def print_table(report: dict) -> None:
    rows = [
        ("teacher", "teacher"),
        ("student, distilled", "student_kd"),
        ("student, hard labels", "student_baseline"),
    ]
    print(f"\n{'model':<22}{'perplexity':>12}{'accuracy':>10}")
    for label, key in rows:
        r = report[key]
        print(f"{label:<22}{r['perplexity']:>12.2f}{r['accuracy']:>10.3f}")
    verdict = "beats" if report["kd_beats_baseline"] else "does NOT beat"
    print(f"\nthe distilled student {verdict} the hard-label baseline on held-out perplexity;")
    print(f"it keeps {100 * report['retention']:.1f}% of the teacher's next-token accuracy.")
    print(
        f"loss peak memory (one batch): fastkd {report['kd_loss_peak_memory_mb']} MB, "
        f"eager PyTorch {report['eager_loss_peak_memory_mb']} MB; "
        f"total time {report['seconds']:.0f} s"
    )
