"""The jobs behind the command line: ``distill`` and ``evaluate_model``, the checks that run
before any model loads, and the training arguments the demo shares with them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import transformers

from fastkd.training.config import DistillConfig, RunArguments
from fastkd.training.data import (
    BlockDataset,
    SpanWeights,
    TeacherCacheDataset,
    has_tokenizer,
    load_dataset,
    load_tokenizer,
    pack,
    read_records,
    split_datasets,
    tokenizer_difference,
)
from fastkd.training.distiller import Distiller, check_cache_config, open_teacher_cache
from fastkd.training.evaluate import evaluate
from fastkd.training.fsdp import is_sharded
from fastkd.training.models import load_model, load_student
from fastkd.training.trainer import DistillationTrainer

# ``resume_from_checkpoint`` value meaning "the newest checkpoint in the output directory".
RESUME_LAST = "last"
# Characters of the data that every tokenizer of a run must encode alike.
_SAMPLE_CHARS = 4000


def training_arguments(
    out: str | Path,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    bf16: bool = False,
    save_steps: float | None = None,
    logging_steps: float = 10,
    **overrides,
) -> transformers.TrainingArguments:
    """Trainer arguments of every fastkd run: cosine schedule with a warm-up of 5% of the
    steps, AdamW with weight decay 0.01, the last 2 checkpoints kept (one at the end unless
    ``save_steps``), the CPU when there is no CUDA device, no external loggers, the progress
    bar on. ``overrides`` are any other ``TrainingArguments`` fields, and win over these
    (e.g. ``report_to="tensorboard"``, ``warmup_steps=0``)."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"not TrainingArguments fields: {unknown}")
    by_steps = max_steps > 0  # else the run is measured in epochs
    settings = {
        "output_dir": str(out),
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, max_steps // 20) if by_steps else 0.05,
        "weight_decay": 0.01,
        "logging_steps": logging_steps,
        "save_steps": save_steps or (max_steps if by_steps else 500),
        "save_total_limit": 2,
        "seed": seed,
        "data_seed": seed,
        "bf16": bf16,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
        "remove_unused_columns": False,
        # On even when the user's logging level would hide it (the Trainer's default is off
        # above WARNING, and the demo quiets transformers).
        "disable_tqdm": False,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def check_run(run: RunArguments, config: DistillConfig, args: transformers.TrainingArguments):
    """Check what ``distill`` would find out only after loading models: the teachers (or the
    teacher cache and the settings it allows), the student, the data and the tokenizer exist,
    the backend runs here, one weight per teacher, a checkpoint to resume from. Raises
    ValueError or FileNotFoundError naming the argument. Returns the ``TeacherCache`` of
    ``--teacher_cache`` (None without one)."""
    cache = None
    if run.teacher_cache is not None:
        if run.teacher:
            raise ValueError("--teacher_cache replaces --teacher: give one of them")
        cache = open_teacher_cache(run.teacher_cache)
        check_cache_config(config, cache)
    elif config.self_distillation is None and not run.teacher:
        raise ValueError("--teacher is required (or self_distillation), or --teacher_cache")
    if config.self_distillation is not None and run.teacher:
        raise ValueError(
            f"self_distillation={config.self_distillation!r} makes its own teacher: drop --teacher"
        )
    for teacher in run.teacher:
        if not (Path(teacher) / "config.json").is_file():
            raise FileNotFoundError(f"--teacher {teacher}: not a model directory (no config.json)")
    if run.student is None:
        raise ValueError("--student is required")
    student = Path(run.student)
    if not (student / "config.json").is_file() and not (
        student.is_file() and student.suffix == ".json"
    ):
        raise FileNotFoundError(
            f"--student {student}: neither a model directory (with config.json) nor a .json "
            "model config"
        )
    if run.data is None:
        raise ValueError("--data is required")
    if not Path(run.data).exists():
        raise FileNotFoundError(f"--data {run.data}: no such file or directory")
    prompt = config.prompt_tokens
    if config.on_policy_fraction > 0 and prompt is not None and prompt >= run.block_size:
        raise ValueError(
            f"--prompt_tokens {prompt} must be < --block_size {run.block_size}: the prompt must "
            "leave room for the continuation"
        )
    if run.tokenizer is not None and not has_tokenizer(run.tokenizer):
        raise FileNotFoundError(f"--tokenizer {run.tokenizer}: no tokenizer files there")
    weights = config.teacher_weights
    if weights is not None and len(weights) != len(run.teacher):
        raise ValueError(
            f"--teacher_weights has {len(weights)} values for {len(run.teacher)} teacher(s)"
        )
    if config.backend is not None:
        from fastkd import backends

        status = backends()[config.backend]
        if not status.available:
            raise ValueError(f"--backend {config.backend} is not available here: {status.reason}")
    resume = args.resume_from_checkpoint
    if resume == RESUME_LAST:
        out = Path(args.output_dir)
        if not out.is_dir() or transformers.trainer_utils.get_last_checkpoint(out) is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    elif resume is not None and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return cache


def run_tokenizers(run: RunArguments, records: list[dict[str, str]]):
    """The tokenizer that packs the data and the one saved with the student.

    Packing uses ``run.tokenizer``, else the student's, else the first teacher's that has
    one. Every tokenizer of the run (that one, the student's, each teacher's) must agree with
    it on a sample of the data (``tokenizer_difference``) unless
    ``run.allow_tokenizer_mismatch``. The student keeps its own tokenizer when it has one.
    """
    student_dir = [run.student] if has_tokenizer(run.student) else []
    candidates = [d for d in (run.tokenizer, *student_dir, *run.teacher) if d is not None]
    owners = [d for d in candidates if has_tokenizer(d)]
    if not owners:
        if run.teacher_cache is not None:  # a cache holds no tokenizer, only its fingerprint
            raise ValueError(
                "no tokenizer: the student directory holds none; pass --tokenizer, the one the "
                "teacher cache was built with (the teacher's, unless cache-teacher had one)"
            )
        raise ValueError(
            "no tokenizer: neither the student nor a teacher directory holds one; pass --tokenizer"
        )
    loaded = {d: load_tokenizer(d) for d in dict.fromkeys(owners)}
    packing_dir = owners[0]
    packing = loaded[packing_dir]
    if not run.allow_tokenizer_mismatch:
        sample = "".join(text for r in records[:50] for text in r.values())[:_SAMPLE_CHARS]
        for other_dir, other in loaded.items():
            why = tokenizer_difference(packing, other, sample) if other is not packing else None
            if why is not None:
                raise ValueError(
                    f"the tokenizers in {packing_dir} and {other_dir} differ ({why}): the "
                    "models would read the same ids as different tokens; use one tokenizer, "
                    "or pass --allow_tokenizer_mismatch to take the ids as the same tokens"
                )
    saved = loaded[student_dir[0]] if student_dir else packing
    return packing, saved


def _check_vocab(name: str, model: torch.nn.Module, max_id: int) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if max_id >= rows:
        raise ValueError(f"the data holds token id {max_id} but {name} embeds only {rows} ids")


def distill(run: RunArguments, config: DistillConfig, args: transformers.TrainingArguments) -> dict:
    """Distil ``run.teacher`` (or the teacher cache ``run.teacher_cache``) into
    ``run.student`` on ``run.data``; save the student (an adapter, or merged, for a LoRA run),
    with its tokenizer, in ``args.output_dir`` and return its held-out metrics (also written to
    ``eval.json`` there). Every argument is checked, the data read and packed (and matched
    against the teacher cache's manifest), before any model loads."""
    cache = check_run(run, config, args)
    records = read_records(run.data)
    tokenizer, student_tokenizer = run_tokenizers(run, records)
    spans = SpanWeights(config.rationale_weight, config.answer_weight, config.answer_marker)
    # Span weights leave input_ids as they are (a teacher cache still matches); weights of 1
    # are the unweighted loss, so they are built only when one differs.
    weighted = (spans.rationale, spans.answer) != (1, 1)
    input_ids, labels, *weights = pack(
        records, tokenizer, run.block_size, spans if weighted else None
    )
    if cache is not None:  # the cache's rows are the blocks of exactly this packing
        cache.check_data(input_ids, tokenizer)
    train_ds, eval_ds = split_datasets(input_ids, labels, run.eval_fraction, config.seed, *weights)
    max_id = int(input_ids.max())

    teachers = [load_model(t) for t in run.teacher]
    torch.manual_seed(config.seed)
    student = load_student(run.student, len(tokenizer))
    for name, model in (("--student", student), *zip(run.teacher, teachers)):
        _check_vocab(name, model, max_id)
    if run.lora_r is not None:
        student = _with_lora(student, run)
    for t in teachers:  # teachers are not the Trainer's model: place them here
        t.to(device=args.device, dtype=torch.bfloat16 if args.bf16 else None)
    if cache is None:
        distiller = Distiller(student, teachers or None, config)
        train_set, eval_set = train_ds, eval_ds
    else:
        distiller = Distiller(student, config=config, teacher_cache=cache)
        train_set, eval_set = (TeacherCacheDataset(d, cache) for d in (train_ds, eval_ds))
    trainer = DistillationTrainer(
        distiller,
        args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=student_tokenizer,
    )
    if is_sharded(trainer.distiller) and trainer.is_world_process_zero():
        print(
            f"FSDP2: the student and {len(teachers)} teacher(s) sharded over "
            f"{args.world_size} processes"
        )
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == RESUME_LAST else resume)
    out = Path(args.output_dir)
    trainer.save_model(str(out), merge_adapters=run.merge_adapters)
    if is_sharded(trainer.distiller):  # each process holds a shard: score the saved student
        trainer.accelerator.wait_for_everyone()
        student = load_model(out)
    metrics = evaluate(student, eval_ds, batch_size=args.per_device_eval_batch_size)
    if trainer.is_world_process_zero():
        (out / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return metrics


def _with_lora(student: transformers.PreTrainedModel, run: RunArguments):
    import peft

    targets = run.lora_target_modules
    if targets == ["all-linear"]:  # peft's keyword for every linear layer but the head
        targets = "all-linear"
    lora = peft.LoraConfig(
        r=run.lora_r,
        lora_alpha=run.lora_alpha,
        lora_dropout=run.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(student, lora)


def evaluate_model(
    model: str,
    data: str,
    *,
    block_size: int = 128,
    batch_size: int = 8,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> dict:
    """Perplexity and next-token accuracy of a model directory on a text file (all of it, or,
    with ``eval_fraction``, the held-out blocks that ``distill`` with that fraction and seed
    kept out of training)."""
    tok = load_tokenizer(model)
    if eval_fraction is None:
        dataset = BlockDataset(*pack(read_records(data), tok, block_size))
    else:
        _, dataset = load_dataset(data, tok, block_size, eval_fraction, seed)
    return evaluate(load_model(model), dataset, batch_size=batch_size)
