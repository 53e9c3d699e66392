"""``DistillationTrainer``: ``transformers.Trainer`` driving a ``Distiller``.

Only the loss, the logging and evaluation of its parts, the save/load format, atomic
checkpoints and FSDP2 (sharding, its optimizer checkpoints, deferred gradient reduction) are
new here; resume, gradient accumulation, mixed precision and DDP are the Trainer's
(accelerate's).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import transformers
from accelerate.optimizer import AcceleratedOptimizer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers.trainer import (
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalPrediction, rotate_checkpoints

from fastkd.training.distiller import DISTILL_PARTS, Distiller
from fastkd.training.files import publish
from fastkd.training.fsdp import is_sharded, shard_distiller
from fastkd.training.onpolicy import OnPolicy

# Where a checkpoint is written before it is renamed to checkpoint-N (docs/design.md §10).
STAGING_DIR = ".checkpoint-staging"
# The optimizer state of a sharded run in a checkpoint: one shard per process, written with
# torch.distributed.checkpoint (docs/design.md §10).
OPTIMIZER_SHARDS = "optimizer_shards"
# Columns of the per-sequence statistics that evaluation gathers instead of logits.
EVAL_STATS = ("tokens", "nll", "correct", *DISTILL_PARTS)


class _EMAUpdate(transformers.TrainerCallback):
    def __init__(self, distiller: Distiller) -> None:
        self.distiller = distiller

    def on_step_end(self, args, state, control, **kwargs):
        self.distiller.update_teacher()


class DistillationTrainer(transformers.Trainer):
    """A Trainer whose model is a ``Distiller``: the student (and any feature projections) is
    trained, the teachers are not. Each active loss part (kd, ce, feature, attention, aux: see
    ``Distiller.active_parts``) is logged as ``loss_<part>``, averaged over the logging
    interval on each process.

    ``evaluate()`` reports ``eval_loss``, each active part (``eval_kd``, ``eval_ce``, ...),
    ``eval_perplexity`` and ``eval_accuracy`` of the student's next-token prediction, and
    ``eval_tokens``, without materializing logits. A ``compute_metrics`` given by the user
    receives an ``EvalPrediction`` whose ``predictions`` are per-sequence statistics, one
    column per name in ``EVAL_STATS`` (the parts are their batch's value), and whose
    ``label_ids`` are the labels; what it returns is added to those metrics.

    ``save_model`` / checkpoints write the student with ``Distiller.save_pretrained`` (plus the
    tokenizer given as ``processing_class``, the projections and the distillation config), so
    an output directory is a model directory that ``from_pretrained`` and ``fastkd eval``
    accept (a PEFT student: its adapter, or the merged model with ``merge_adapters=True``). A
    checkpoint is written into ``.checkpoint-staging`` under the output directory, synced to
    disk and renamed to ``checkpoint-N`` only when complete, so a run killed at any moment
    resumes from its newest complete checkpoint.

    With ``args.fsdp`` (or a Distiller already sharded by ``shard_distiller``) the Distiller is
    sharded with FSDP2 on every platform (docs/design.md §10). Its checkpoints hold the
    gathered student, each process's shard of the optimizer state (``optimizer_shards``,
    written with ``torch.distributed.checkpoint``), the schedule, RNG and trainer state, so a
    sharded run resumes; accumulated micro-batches are reduce-scattered once, after the last.

    With ``on_policy_fraction > 0`` each training micro-batch may be replaced by continuations
    the student (``seq_kd``: the teacher) generates from its prompts (``self.on_policy``, a
    ``fastkd.training.onpolicy.OnPolicy``, counts them).
    """

    def __init__(self, distiller: Distiller, args: transformers.TrainingArguments, **kwargs):
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a fastkd Distiller, got {type(distiller).__name__}")
        if args.batch_eval_metrics:
            raise ValueError(
                "batch_eval_metrics is not supported by DistillationTrainer: its evaluation "
                "gathers a few statistics per sequence, never logits"
            )
        kwargs["compute_metrics"] = _metrics(distiller, kwargs.get("compute_metrics"))
        sharded = bool(args.fsdp) or is_sharded(distiller)
        if sharded:
            _shard(distiller, args)
        # The Trainer refuses to checkpoint the optimizer of a model marked as sharded (it
        # cannot gather that state); _save_optimizer_and_scheduler below saves it, so that
        # check, the only use of save_only_model in the Trainer's __init__ without an
        # accelerate FSDP plugin, is passed over.
        weights_only = args.save_only_model
        args.save_only_model = weights_only or (sharded and args.save_strategy != "no")
        try:
            super().__init__(model=distiller, args=args, **kwargs)
        finally:
            args.save_only_model = weights_only
        self.distiller = distiller
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._staging: Path | None = None
        if distiller.distill_config.self_distillation == "ema":
            self.add_callback(_EMAUpdate(distiller))
        # On-policy / sequence-level KD: generated training batches (docs/design.md §12).
        self.on_policy = None
        if distiller.distill_config.on_policy_fraction > 0:
            self.on_policy = OnPolicy(distiller, rank=args.process_index)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.on_policy is not None:
            inputs = self.on_policy(inputs, self.state.global_step)
        out = model(**inputs)
        if model.training:
            for name in self.distiller.active_parts:
                self._parts[name].append(getattr(out, name))
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        rows = inputs["input_ids"].shape[0]
        columns = [getattr(out, name).detach().double().expand(rows) for name in EVAL_STATS]
        labels = inputs.get("labels")
        labels = inputs["input_ids"] if labels is None else labels
        return loss.detach(), torch.stack(columns, 1), labels

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._parts and "loss" in logs:  # a training log line: add the parts
            for name, values in self._parts.items():
                logs[f"loss_{name}"] = round(float(torch.stack(values).float().mean()), 6)
            self._parts.clear()
        super().log(logs, start_time)

    def save_model(
        self, output_dir: str | None = None, _internal_call: bool = False, *, merge_adapters=False
    ) -> None:
        """Write the student (see the class docstring); ``merge_adapters=True`` writes a PEFT
        student merged into its base model, loadable with ``from_pretrained``."""
        output_dir = output_dir or self.args.output_dir
        state_dict = None
        if is_sharded(self.distiller):  # gathered to full tensors on rank 0, on every rank
            state_dict = get_model_state_dict(
                self.distiller, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        elif self.is_fsdp_enabled or self.is_deepspeed_enabled:
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)  # on every rank
        if self.args.should_save:
            self.distiller.save_pretrained(
                output_dir,
                tokenizer=self.processing_class,
                state_dict=state_dict,
                merge=merge_adapters,
            )
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # The private methods below have no public counterpart: loading a checkpoint (to resume,
    # or the best one at the end) into the model, where the Trainer writes a checkpoint, the
    # optimizer state of a sharded run, and gradient accumulation with it.

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.distiller.load_weights(resume_from_checkpoint)  # a sharded one on every process

    def _load_best_model(self) -> None:  # load_best_model_at_end
        self.distiller.load_weights(self.state.best_model_checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not is_sharded(self.distiller):
            return super()._save_optimizer_and_scheduler(output_dir)
        # Every process writes its own shard of the optimizer state, nothing is gathered.
        optimizer = _unwrap(self.optimizer)
        state = {"optimizer": get_optimizer_state_dict(self.distiller, optimizer)}
        dcp.save(state, checkpoint_id=os.path.join(output_dir, OPTIMIZER_SHARDS))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        shards = Path(checkpoint, OPTIMIZER_SHARDS)
        if not is_sharded(self.distiller):
            if shards.exists():
                raise ValueError(
                    f"resume_from_checkpoint {checkpoint}: written by a sharded (fsdp) run, whose "
                    "optimizer state only a sharded run can load"
                )
            return super()._load_optimizer_and_scheduler(checkpoint)
        if not shards.is_dir():
            if Path(checkpoint, OPTIMIZER_NAME).is_file():
                raise ValueError(
                    f"resume_from_checkpoint {checkpoint}: written by an unsharded run, whose "
                    f"optimizer state ({OPTIMIZER_NAME}) a sharded (fsdp) run cannot load"
                )
            return  # weights only (save_only_model): a fresh optimizer, as the Trainer does
        # Each process reads its shards (DCP reshards if the number of processes changed).
        optimizer = _unwrap(self.optimizer)
        state = {"optimizer": get_optimizer_state_dict(self.distiller, optimizer)}
        dcp.load(state, checkpoint_id=str(shards))
        set_optimizer_state_dict(self.distiller, optimizer, state["optimizer"])
        scheduler = torch.load(Path(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """The Trainer's no-sync for a model sharded at load time reads its config's
        ``distributed_config``, which a Distiller sharded by ``shard_distiller`` lacks: the
        micro-batches but the last keep their gradients unsharded (summed), the last one
        reduce-scatters the sum."""
        self.distiller.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.distiller.set_requires_gradient_sync(True)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging directory and renamed into place
        once every process has written its part and the files are on disk."""
        run_dir = Path(self._get_output_dir(trial))
        staging = run_dir / STAGING_DIR
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging:
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            if self.args.should_save:  # the copy in the checkpoint named the staging path
                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process wrote its RNG state
        if self.args.should_save:
            publish(staging / name, run_dir / name)  # the same step saved again: replaced
            staging.rmdir()
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def _shard(distiller: Distiller, args: transformers.TrainingArguments) -> None:
    """FSDP2 with ``shard_distiller`` (docs/design.md §10), on every platform: accelerate
    ignores an FSDP plugin on CPU and would wrap the model in DDP. The sharded Distiller
    owns its gradient reduction, so it is marked as transformers marks a model sharded at
    load time: the Trainer then neither wraps it in DDP nor lets accelerate shard it again."""
    if args.parallel_mode != transformers.training_args.ParallelMode.DISTRIBUTED:
        raise ValueError("fsdp needs a distributed run: launch with torchrun --nproc_per_node N")
    if not is_sharded(distiller):
        offload = CPUOffloadPolicy() if args.fsdp_config.get("cpu_offload") else None
        shard_distiller(distiller, offload_policy=offload)
    distiller.is_distributed_loading_by_transformers = True


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper, which the DCP state-dict functions
    step (to create empty state) and load without the wrapper's device moves."""
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def _metrics(distiller: Distiller, user: Callable | None) -> Callable[[EvalPrediction], dict]:
    """``compute_metrics``: the student's perplexity and accuracy and the active loss parts
    from the gathered per-sequence statistics, plus what the user's function returns."""

    def compute(prediction: EvalPrediction) -> dict:
        stats = np.asarray(prediction.predictions, dtype=np.float64).reshape(-1, len(EVAL_STATS))
        column = dict(zip(EVAL_STATS, stats.T))
        tokens = float(column["tokens"].sum())
        metrics: dict = {name: float(column[name].mean()) for name in distiller.active_parts}
        if tokens > 0:
            nll = float(column["nll"].sum()) / tokens
            metrics["perplexity"] = math.exp(nll) if nll < 700 else math.inf
            metrics["accuracy"] = float(column["correct"].sum()) / tokens
        metrics["tokens"] = int(tokens)
        if user is not None:
            metrics.update(user(prediction))
        return metrics

    return compute
