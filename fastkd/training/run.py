"""The jobs behind the command line: ``distill`` and ``evaluate_model``, and the model and
training-argument helpers the demo shares with them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from fastkd.training.config import DistillConfig
from fastkd.training.data import BlockDataset, load_dataset, load_tokenizer, pack, read_records
from fastkd.training.distiller import Distiller
from fastkd.training.evaluate import evaluate
from fastkd.training.models import load_model, load_student
from fastkd.training.trainer import DistillationTrainer


def training_arguments(
    out: Path,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    bf16: bool = False,
    save_steps: int | None = None,
    logging_steps: int = 10,
) -> transformers.TrainingArguments:
    """Trainer arguments shared by every run of fastkd (cosine schedule with warm-up, AdamW,
    no hub, no external loggers)."""
    return transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.01,
        logging_steps=logging_steps,
        save_steps=save_steps or max_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )


def distill(
    *,
    teachers: list[str],
    student: str,
    data: str,
    out: Path,
    config_file: str | None = None,
    overrides: dict | None = None,
    tokenizer: str | None = None,
    max_steps: int = 100,
    batch_size: int = 8,
    block_size: int = 128,
    learning_rate: float = 1e-3,
    eval_fraction: float = 0.05,
    bf16: bool = False,
    resume: str | bool | None = None,
) -> dict:
    """Distil ``teachers`` into ``student`` on a local text file; save the student (with its
    tokenizer) in ``out`` and return its held-out metrics (also written to out/eval.json)."""
    config = DistillConfig.from_file(config_file) if config_file else DistillConfig()
    config = config.replace(**(overrides or {}))
    tok = load_tokenizer(tokenizer or teachers[0])
    teacher_models = [load_model(t) for t in teachers]
    torch.manual_seed(config.seed)
    student_model = load_student(student, len(tok))
    train_ds, eval_ds = load_dataset(data, tok, block_size, eval_fraction, config.seed)
    args = training_arguments(
        out,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=config.seed,
        bf16=bf16,
    )
    for t in teacher_models:  # teachers are not the Trainer's model: place them here
        t.to(device=args.device, dtype=torch.bfloat16 if bf16 else None)
    trainer = DistillationTrainer(
        Distiller(student_model, teacher_models, config),
        args,
        train_dataset=train_ds,
        processing_class=tok,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out))
    metrics = evaluate(student_model, eval_ds, batch_size=batch_size)
    if trainer.is_world_process_zero():
        (out / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return metrics


def evaluate_model(
    model: str,
    data: str,
    *,
    block_size: int = 128,
    batch_size: int = 8,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> dict:
    """Perplexity and next-token accuracy of a model directory on a text file (all of it, or
    the held-out split ``distill`` used when ``eval_fraction`` is given)."""
    tok = load_tokenizer(model)
    lm = load_model(model)
    if eval_fraction is None:
        dataset = BlockDataset(*pack(read_records(data), tok, block_size))
    else:
        _, dataset = load_dataset(data, tok, block_size, eval_fraction, seed)
    return evaluate(lm, dataset, batch_size=batch_size)
