"""``Distiller``: the loss of teacher-student training for Hugging Face causal LMs.

It runs each model's body (``model.base_model``) for hidden states and takes the head from
``get_output_embeddings()``, then calls the fused linear KD loss, so neither model's [N, V]
logits are ever materialized, and no architecture needs patching.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.fused_linear_kd_loss import fused_linear_kd_loss
from fastkd.reference import _plog_ratio
from fastkd.training.config import DistillConfig
from fastkd.training.models import logit_options

PROJECTIONS_FILE = "fastkd_projections.safetensors"
EMA_TEACHER_FILE = "fastkd_ema_teacher.safetensors"
CONFIG_FILE = "fastkd_distill_config.json"
DISTILL_PARTS = ("kd", "ce", "feature", "attention")


class DistillOutput(NamedTuple):
    """Total loss and its parts; ``loss = kd + ce + feature + attention``. The parts are
    detached (for logging) and already weighted."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    feature: torch.Tensor
    attention: torch.Tensor


def select_layers(mode: str | list[int], num_layers: int, k: int) -> list[int]:
    """Student layer indices (1 = output of the first block) for a layer-selection mode."""
    if not isinstance(mode, str):
        bad = [i for i in mode if not 1 <= i <= num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range 1..{num_layers}")
        return sorted(set(mode))
    if mode == "all":
        return list(range(1, num_layers + 1))
    if mode == "key":
        return sorted({1, (num_layers + 1) // 2, num_layers})
    k = min(k, num_layers)
    if mode == "late":
        return list(range(num_layers - k + 1, num_layers + 1))
    return sorted({max(1, round((j + 1) * num_layers / k)) for j in range(k)})  # auto


def map_layer(i: int, student_layers: int, teacher_layers: int) -> int:
    """Teacher layer at the same relative depth as student layer ``i``."""
    return max(1, min(teacher_layers, round(i * teacher_layers / student_layers)))


def _num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def _hidden_size(model) -> int:
    return int(model.config.hidden_size)


class Distiller(nn.Module):
    """Loss of a student against one or more frozen teachers (or itself).

    ``distiller(input_ids, attention_mask=None, labels=None)`` returns a ``DistillOutput``.
    ``labels`` follow the transformers convention: same positions as ``input_ids`` (the causal
    shift happens inside), -100 where ignored; ``None`` means ``input_ids``. Padding
    (``attention_mask == 0``) never counts. Teachers run in eval mode under no_grad, on their
    own device and dtype. The student and the feature projections (created when widths differ)
    are submodules; the teachers are not, so optimizers, DDP and checkpoints see only what
    is trained.

    Args:
        student: a transformers causal LM.
        teachers: one causal LM or a list (``config.teacher_weights`` weighs them); ``None``
            with ``config.self_distillation`` set.
        config: a ``DistillConfig``.
    """

    def __init__(self, student: nn.Module, teachers=None, config: DistillConfig | None = None):
        super().__init__()
        self.distill_config = config or DistillConfig()
        self.student = student
        cfg = self.distill_config
        if teachers is None:
            if cfg.self_distillation is None:
                raise ValueError("teachers is None: pass a teacher, or set self_distillation")
            teachers = [copy.deepcopy(student)]
        elif cfg.self_distillation is not None:
            raise ValueError("self_distillation makes its own teacher: pass teachers=None")
        teachers = list(teachers) if isinstance(teachers, (list, tuple)) else [teachers]
        if not teachers:
            raise ValueError("teachers must hold at least one model")
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
        # A plain list, so the teachers are not submodules (not trained, saved or wrapped).
        self.teachers: list[nn.Module] = teachers
        weights = cfg.teacher_weights or [1.0] * len(teachers)
        if len(weights) != len(teachers):
            raise ValueError(
                f"teacher_weights has {len(weights)} entries for {len(teachers)} teachers"
            )
        total = float(sum(weights))
        self.teacher_weights = [float(w) / total for w in weights]
        self._check_logit_mixing()

        self.attention = cfg.attention_weight > 0
        if self.attention:
            for model in (student, *teachers):
                model.set_attn_implementation("eager")  # the fused kernels return no maps
        ls = _num_layers(student)
        self.feature_layers = (
            select_layers(cfg.feature_layers, ls, cfg.feature_num_layers)
            if cfg.feature_weight > 0
            else []
        )
        self.attention_layers = (
            select_layers(cfg.attention_layers, ls, cfg.attention_num_layers)
            if self.attention
            else []
        )
        self.projections = nn.ModuleDict()
        for k, teacher in enumerate(teachers):
            if _hidden_size(teacher) == _hidden_size(student):
                continue
            for i in self.feature_layers:
                self.projections[f"t{k}_l{i}"] = nn.Linear(
                    _hidden_size(student), _hidden_size(teacher), bias=False
                )
        self._head_cache: dict = {}

    @property
    def active_parts(self) -> tuple[str, ...]:
        """The loss parts this configuration can make non-zero (the ones worth logging)."""
        cfg = self.distill_config
        on = {
            "kd": cfg.alpha < 1,
            "ce": cfg.alpha > 0,
            "feature": bool(self.feature_layers),
            "attention": self.attention,
        }
        return tuple(name for name in DISTILL_PARTS if on[name])

    @property
    def config(self):
        """The student's model config: the Trainer reads and aligns it as the model's."""
        return self.student.config

    def _check_logit_mixing(self) -> None:
        if len(self.teachers) > 1 and self.distill_config.multi_teacher == "logits":
            if any(logit_options(t)[1] for t in self.teachers):
                raise ValueError(
                    "multi_teacher='logits' mixes raw logits and cannot apply a teacher's final "
                    "softcap; use multi_teacher='losses'"
                )
            vocabs = {t.get_output_embeddings().weight.shape[0] for t in self.teachers}
            if len(vocabs) > 1:
                raise ValueError(
                    "multi_teacher='logits' needs teachers with one vocabulary, got "
                    f"{sorted(vocabs)}"
                )

    # --- forward ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> DistillOutput:
        cfg = self.distill_config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = input_ids if labels is None else labels
        labels = labels.masked_fill(attention_mask == 0, -100)
        features = bool(self.feature_layers)
        out = self.student.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=features,
            output_attentions=self.attention,
        )
        hidden = out.last_hidden_state
        with torch.no_grad():
            t_outs = [
                t.base_model(
                    input_ids=input_ids.to(_device(t)),
                    attention_mask=attention_mask.to(_device(t)),
                    output_hidden_states=features,
                    output_attentions=self.attention,
                )
                for t in self.teachers
            ]

        kd, ce = self._response_loss(hidden, t_outs, labels)
        zero = hidden.new_zeros((), dtype=torch.float32)
        feature = zero
        if features:
            feature = cfg.feature_weight * self._feature_loss(out, t_outs, attention_mask)
        attention = zero
        if self.attention:
            attention = cfg.attention_weight * self._attention_loss(out, t_outs, attention_mask)
        loss = kd + ce + feature + attention
        return DistillOutput(loss, kd.detach(), ce, feature.detach(), attention.detach())

    def _student_head(self, dtype: torch.dtype):
        head = self.student.get_output_embeddings()
        bias = getattr(head, "bias", None)
        # Under autocast the hidden states come in a lower precision than the (fp32) head:
        # cast the head, differentiably, so the fused GEMMs run in that precision.
        return head.weight.to(dtype), None if bias is None else bias.to(dtype)

    def _teacher_head(self, k: int, device: torch.device, dtype: torch.dtype):
        """Teacher k's head on the student's device in ``dtype``. Cached for frozen teachers;
        an EMA teacher changes every step and is read afresh."""
        teacher = self.teachers[k]
        head = teacher.get_output_embeddings()
        key = (k, device, dtype)
        if self.distill_config.self_distillation != "ema" and key in self._head_cache:
            return self._head_cache[key]
        bias = getattr(head, "bias", None)
        value = (
            head.weight.detach().to(device=device, dtype=dtype),
            None if bias is None else bias.detach().to(device=device, dtype=dtype),
        )
        if self.distill_config.self_distillation != "ema":
            self._head_cache[key] = value
        return value

    def _loss_kwargs(self) -> dict:
        cfg = self.distill_config
        scale, cap = logit_options(self.student)
        return dict(
            temperature=cfg.temperature,
            divergence=cfg.divergence,
            beta=cfg.beta,
            skew=cfg.skew,
            vocab=cfg.vocab,
            backend=cfg.backend,
            chunk_size=cfg.chunk_size,
            memory_budget=cfg.memory_budget,
            student_logit_scale=scale,
            student_softcap=cap,
            shift_labels=True,
            return_parts=True,
        )

    def _response_loss(self, hidden, t_outs, labels):
        """(kd, ce) contributions; kd carries the gradient of both."""
        cfg = self.distill_config
        w_s, b_s = self._student_head(hidden.dtype)
        kwargs = self._loss_kwargs()
        t_hidden = [o.last_hidden_state.to(hidden.device) for o in t_outs]
        if len({h.dtype for h in t_hidden}) > 1:  # teachers in different precisions
            t_hidden = [h.float() for h in t_hidden]
        if len(self.teachers) == 1 or cfg.multi_teacher == "logits":
            # Weighted mean of the teachers' logits = one GEMM over the concatenated hidden
            # states (each scaled by its weight) and the concatenated heads.
            ht, wt, bt = [], [], []
            for k, (h, lam) in enumerate(zip(t_hidden, self.teacher_weights)):
                w, b = self._teacher_head(k, hidden.device, h.dtype)
                scale, cap = logit_options(self.teachers[k])
                ht.append(h * (lam * scale))
                wt.append(w)
                if b is not None:
                    bt.append(b * (lam * scale))
            parts = fused_linear_kd_loss(
                hidden,
                w_s,
                labels,
                student_bias=b_s,
                teacher_hidden=torch.cat(ht, -1),
                teacher_weight=torch.cat(wt, -1),
                teacher_bias=sum(bt) if bt else None,
                teacher_softcap=logit_options(self.teachers[0])[1] if len(ht) == 1 else None,
                alpha=cfg.alpha,
                **kwargs,
            )
            return parts.loss - parts.ce, parts.ce
        # Weighted sum of one KD loss per teacher; the CE term is counted once.
        total, ce = 0.0, None
        for k, (h, lam) in enumerate(zip(t_hidden, self.teacher_weights)):
            w, b = self._teacher_head(k, hidden.device, h.dtype)
            scale, cap = logit_options(self.teachers[k])
            parts = fused_linear_kd_loss(
                hidden,
                w_s,
                labels,
                student_bias=b_s,
                teacher_hidden=h,
                teacher_weight=w,
                teacher_bias=b,
                teacher_logit_scale=scale,
                teacher_softcap=cap,
                kd_weight=(1.0 - cfg.alpha) * lam,
                ce_weight=cfg.alpha if k == 0 else 0.0,
                **kwargs,
            )
            total = total + parts.loss
            ce = parts.ce if ce is None else ce
        return total - ce, ce

    def _feature_loss(self, out, t_outs, mask) -> torch.Tensor:
        """Mean over selected layers and teachers (weighted) of the per-token feature loss."""
        valid = mask.bool()
        ls = _num_layers(self.student)
        total = 0.0
        for k, (teacher, t_out, lam) in enumerate(zip(self.teachers, t_outs, self.teacher_weights)):
            lt = _num_layers(teacher)
            for i in self.feature_layers:
                s = out.hidden_states[i][valid].float()
                key = f"t{k}_l{i}"
                if key in self.projections:
                    s = self.projections[key](s.to(self.projections[key].weight.dtype)).float()
                t = (
                    t_out.hidden_states[map_layer(i, ls, lt)]
                    .to(s.device)[valid.to(s.device)]
                    .float()
                )
                if self.distill_config.feature_loss == "mse":
                    value = F.mse_loss(s, t)
                else:
                    value = (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
                total = total + lam * value / len(self.feature_layers)
        return total

    def _attention_loss(self, out, t_outs, mask) -> torch.Tensor:
        """KL (teacher || student) per query row, or MSE, of head-averaged attention maps."""
        valid = mask.bool()
        ls = _num_layers(self.student)
        total = 0.0
        for teacher, t_out, lam in zip(self.teachers, t_outs, self.teacher_weights):
            lt = _num_layers(teacher)
            for i in self.attention_layers:
                a_s = out.attentions[i - 1].float().mean(1)[valid]  # [rows, S]
                a_t = t_out.attentions[map_layer(i, ls, lt) - 1].to(a_s.device).float().mean(1)
                a_t = a_t[valid.to(a_s.device)]
                if self.distill_config.attention_loss == "mse":
                    value = F.mse_loss(a_s, a_t)
                else:
                    value = _plog_ratio(a_t.log(), a_s.log()).mean()
                total = total + lam * value / len(self.attention_layers)
        return total

    # --- self-distillation -----------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA self-distillation: teacher <- decay * teacher + (1 - decay) * student. Call
        after each optimizer step (DistillationTrainer does)."""
        if self.distill_config.self_distillation != "ema":
            return
        decay = self.distill_config.ema_decay
        for p_t, p_s in zip(self.teachers[0].parameters(), self.student.parameters()):
            p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - decay)

    # --- saving ----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, tokenizer=None, state_dict=None) -> None:
        """The student with ``save_pretrained`` (a directory ``from_pretrained`` loads), the
        feature projections, the EMA teacher when there is one, the config and the tokenizer."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        student_state = None
        if state_dict is not None:  # a gathered (FSDP/DeepSpeed) state of this module
            student_state = {
                k.removeprefix("student."): v
                for k, v in state_dict.items()
                if k.startswith("student.")
            }
        self.student.save_pretrained(directory, state_dict=student_state)
        if len(self.projections):
            save_file(_contiguous(self.projections.state_dict()), str(directory / PROJECTIONS_FILE))
        if self.distill_config.self_distillation == "ema":
            save_file(_contiguous(self.teachers[0].state_dict()), str(directory / EMA_TEACHER_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.distill_config.to_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def load_weights(self, directory: str | Path) -> None:
        """Load what ``save_pretrained`` wrote (resuming from a checkpoint)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        files = sorted(directory.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no model*.safetensors in {directory}")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        result = self.student.load_state_dict(state, strict=False)
        tied = set(getattr(self.student, "all_tied_weights_keys", {}) or {})
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{directory}: student weights do not match (missing {missing}, "
                f"unexpected {result.unexpected_keys})"
            )
        if len(self.projections):
            self.projections.load_state_dict(load_file(str(directory / PROJECTIONS_FILE)))
        if self.distill_config.self_distillation == "ema":
            self.teachers[0].load_state_dict(load_file(str(directory / EMA_TEACHER_FILE)))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _contiguous(state: dict) -> dict:
    # safetensors refuses shared and non-contiguous storage.
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def progressive_distill(
    teacher: nn.Module,
    students: list[nn.Module],
    config: DistillConfig,
    train: Callable[[Distiller], None],
) -> list[nn.Module]:
    """Progressive distillation: stage k distils ``students[k]`` from the student of stage
    k - 1 (the first from ``teacher``), e.g. 7B -> 3B -> 1B. ``train`` runs one stage, for
    example ``lambda d: DistillationTrainer(d, args, train_dataset=ds).train()``. Returns the
    trained students; each is frozen once it becomes the next stage's teacher."""
    if not students:
        raise ValueError("students must hold at least one stage")
    for student in students:
        train(Distiller(student, teacher, config))
        teacher = student
    return students
