"""``DistillationTrainer``: ``transformers.Trainer`` driving a ``Distiller``.

Only the loss, the logging of its parts and the save/load format are new here; checkpointing,
resume, gradient accumulation, mixed precision and DDP/FSDP are the Trainer's (accelerate's).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
import transformers

from fastkd.training.distiller import Distiller


class _EMAUpdate(transformers.TrainerCallback):
    def __init__(self, distiller: Distiller) -> None:
        self.distiller = distiller

    def on_step_end(self, args, state, control, **kwargs):
        self.distiller.update_teacher()


class DistillationTrainer(transformers.Trainer):
    """A Trainer whose model is a ``Distiller``: the student (and any feature projections) is
    trained, the teachers are not. Each active loss part (kd, ce, feature, attention: see
    ``Distiller.active_parts``) is logged as ``loss_<part>``, averaged over the logging
    interval on each process.

    ``save_model`` / checkpoints write the student with ``save_pretrained`` (plus the tokenizer
    given as ``processing_class``, the projections and the distillation config), so an output
    directory is a model directory that ``from_pretrained`` and ``fastkd eval`` accept.
    """

    def __init__(self, distiller: Distiller, args: transformers.TrainingArguments, **kwargs):
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a fastkd Distiller, got {type(distiller).__name__}")
        super().__init__(model=distiller, args=args, **kwargs)
        self.distiller = distiller
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        if distiller.distill_config.self_distillation == "ema":
            self.add_callback(_EMAUpdate(distiller))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        if model.training:
            for name in self.distiller.active_parts:
                self._parts[name].append(getattr(out, name))
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._parts and "loss" in logs:  # a training log line: add the parts
            for name, values in self._parts.items():
                logs[f"loss_{name}"] = round(float(torch.stack(values).float().mean()), 6)
            self._parts.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.distiller.save_pretrained(
            output_dir, tokenizer=self.processing_class, state_dict=state_dict
        )
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.distiller.load_weights(resume_from_checkpoint)
