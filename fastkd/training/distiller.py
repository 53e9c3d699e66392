"""``Distiller``: the loss of teacher-student training for Hugging Face causal LMs.

It runs each model's body (``model.base_model``; for a peft model, that of the causal LM it
wraps) for hidden states and takes the head from ``get_output_embeddings()`` (a LoRA-adapted
head included), then calls the fused linear KD loss, so neither model's [N, V] logits are ever
materialized, and no architecture needs patching. A probe at construction checks that body and
head reproduce each model's own logits (``fastkd.training.models.check_head``). With a teacher
cache (``fastkd.training.teacher_cache``) instead of teacher models, the cached top-k of the
teacher is the target and the fused sparse loss (``fastkd.fused_linear_sparse_kd_loss``) is
called on the student's hidden states.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.fused_linear_kd_loss import fused_linear_kd_loss
from fastkd.reference import _plog_ratio
from fastkd.sparse_kd_loss import fused_linear_sparse_kd_loss
from fastkd.training.config import DistillConfig
from fastkd.training.fsdp import full_weights, is_sharded
from fastkd.training.models import (
    IGNORE_INDEX,
    Head,
    RouterLoss,
    body,
    causal_lm,
    check_head,
    describe,
    is_peft,
)
from fastkd.training.onpolicy import check_on_policy
from fastkd.training.teacher_cache import TeacherCache

PROJECTIONS_FILE = "fastkd_projections.safetensors"
EMA_TEACHER_FILE = "fastkd_ema_teacher.safetensors"
CONFIG_FILE = "fastkd_distill_config.json"
ADAPTER_FILE = "adapter_model.safetensors"  # peft's name for the adapter weights
DISTILL_PARTS = ("kd", "ce", "feature", "attention", "aux")


class DistillOutput(NamedTuple):
    """Total loss, its parts and evaluation statistics.

    ``loss = kd + ce + feature + attention + aux``; the parts are detached (for logging) and
    already weighted; ``aux`` is an MoE student's router load-balancing loss (zero otherwise).
    In eval mode (``not distiller.training``), per sequence ([B], so that a distributed gather
    of them stays exact): ``nll`` is the sum over its target tokens of the student's unweighted
    hard-label cross-entropy (T = 1, fp64), ``correct`` the number of its targets that are the
    student's argmax and ``tokens`` the number of its targets (int64); zeros in training.
    Perplexity = exp(Σ nll / Σ tokens), accuracy = Σ correct / Σ tokens.
    """

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    feature: torch.Tensor
    attention: torch.Tensor
    aux: torch.Tensor
    nll: torch.Tensor
    correct: torch.Tensor
    tokens: torch.Tensor


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


def check_cache_config(config: DistillConfig, cache) -> None:
    """Raise ValueError unless ``config`` can distil from ``cache`` (a ``TeacherCache``): the
    cache holds the teacher's top-k log-probabilities at one temperature, and nothing else."""
    for name, what in (("feature_weight", "hidden states"), ("attention_weight", "attention maps")):
        if getattr(config, name) > 0:
            raise ValueError(
                f"{name}={getattr(config, name)}: a teacher cache holds no {what} of the "
                f"teacher; set {name}=0 or distil from the teacher model"
            )
    if config.self_distillation is not None:
        raise ValueError(
            f"self_distillation={config.self_distillation!r} makes its own teacher; a teacher "
            "cache is the teacher: give one of them"
        )
    if config.teacher_weights is not None:
        raise ValueError("teacher_weights weigh several teachers; a teacher cache is one teacher")
    if config.on_policy_fraction > 0:
        raise ValueError(
            f"on_policy_fraction={config.on_policy_fraction:g}: a teacher cache holds the "
            "teacher's distribution at the data's tokens only, none at generated ones; distil "
            "from the teacher model"
        )
    if config.vocab is not None:
        raise ValueError(
            f"vocab={config.vocab!r} maps a teacher model's vocabulary; a teacher cache's ids "
            "index the student's vocabulary directly (it must cover the cache's): drop vocab"
        )
    if not math.isclose(config.temperature, cache.temperature, rel_tol=1e-6):
        raise ValueError(
            f"temperature={config.temperature:g}, but the teacher cache holds log-probabilities "
            f"at T={cache.temperature:g} (fixed when it was built): set temperature to "
            f"{cache.temperature:g}"
        )


def open_teacher_cache(cache):
    """A ``TeacherCache`` from a cache directory, or ``cache`` itself when it is one."""
    return TeacherCache(cache) if isinstance(cache, (str, os.PathLike)) else cache


class Distiller(nn.Module):
    """Loss of a student against one or more frozen teachers (or itself, or a teacher cache).

    ``distiller(input_ids, attention_mask=None, labels=None)`` returns a ``DistillOutput``.
    ``labels`` follow the transformers convention: same positions as ``input_ids`` (the causal
    shift happens inside), -100 where ignored; ``None`` means ``input_ids``. Padding
    (``attention_mask == 0``) never counts. Teachers run in eval mode under no_grad, on their
    own device and dtype. The student and the feature projections (created when widths differ)
    are submodules; the teachers are not, so optimizers, DDP and checkpoints see only what
    is trained. Only parameters that require grad are trained: with a peft (LoRA) student, the
    adapters.

    An MoE student with ``config.output_router_logits`` set adds its router load-balancing
    loss (``aux``) as its own forward does. At construction a probe (a few tokens per model)
    checks that body + head reproduce ``model(...).logits`` for the student and every teacher,
    and that the router loss equals the student's own; a mismatch is a ValueError naming the
    model type.

    Args:
        student: a transformers causal LM, or a ``peft`` model wrapping one.
        teachers: one causal LM or a list (``config.teacher_weights`` weighs them); ``None``
            with ``config.self_distillation`` set or with ``teacher_cache``.
        config: a ``DistillConfig``.
        teacher_cache: a ``fastkd.training.teacher_cache.TeacherCache`` or its directory,
            instead of teacher models (none is then in memory). Each batch then brings the
            cached top-k of its positions, ``teacher_ids`` and ``teacher_logprobs``
            ([B, S, k]; ``fastkd.training.data.TeacherCacheDataset`` gives them), and the KD
            term is ``fastkd.fused_linear_sparse_kd_loss`` with ``config.tail``: position t's
            cached distribution (of the token after t) is the target of the student's hidden
            state t. The cache fixes the temperature (``config.temperature`` must equal it) and
            holds no hidden states or attention maps (feature and attention losses are
            errors), and the student's vocabulary must cover the cache's.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers=None,
        config: DistillConfig | None = None,
        teacher_cache=None,
    ):
        super().__init__()
        self.distill_config = config or DistillConfig()
        self.student = student
        cfg = self.distill_config
        self.teacher_cache = None
        if teacher_cache is not None:
            if teachers is not None:
                raise ValueError(
                    "pass teachers or teacher_cache, not both: the cache replaces the teacher"
                )
            self.teacher_cache = open_teacher_cache(teacher_cache)
            check_cache_config(cfg, self.teacher_cache)
            teachers = []
        elif cfg.tail != "bucket":
            raise ValueError(
                f"tail={cfg.tail!r} applies to a teacher cache (its top-k misses the tail); a "
                "teacher model gives its full distribution"
            )
        elif teachers is None:
            if cfg.self_distillation is None:
                raise ValueError("teachers is None: pass a teacher, or set self_distillation")
            teachers = [copy.deepcopy(student)]
        elif cfg.self_distillation is not None:
            raise ValueError("self_distillation makes its own teacher: pass teachers=None")
        teachers = list(teachers) if isinstance(teachers, (list, tuple)) else [teachers]
        if not teachers and self.teacher_cache is None:
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
        for model in (student, *teachers):
            check_head(model)
        self.router_loss = RouterLoss.of(student)
        if self.router_loss is not None:
            self.router_loss.check(student)
        if self.teacher_cache is not None:
            vocab = Head(student).vocab_size
            if self.teacher_cache.vocab_size > vocab:
                raise ValueError(
                    f"the teacher cache's ids cover a vocabulary of {self.teacher_cache.vocab_size}"
                    f" tokens; the student, {describe(student)}, has {vocab} outputs"
                )

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
        check_on_policy(self)

    @property
    def active_parts(self) -> tuple[str, ...]:
        """The loss parts this configuration can make non-zero (the ones worth logging)."""
        cfg = self.distill_config
        on = {
            "kd": cfg.alpha < 1,
            "ce": cfg.alpha > 0,
            "feature": bool(self.feature_layers),
            "attention": self.attention,
            "aux": self.router_loss is not None,
        }
        return tuple(name for name in DISTILL_PARTS if on[name])

    @property
    def config(self):
        """The student's model config: the Trainer reads and aligns it as the model's."""
        return self.student.config

    def _check_logit_mixing(self) -> None:
        mode = self.distill_config.multi_teacher
        if len(self.teachers) < 2 or mode == "losses":
            return
        caps = {Head(t).softcap or None for t in self.teachers}
        if mode == "logits" and caps != {None}:
            raise ValueError(
                "multi_teacher='logits' mixes raw logits and cannot apply a teacher's final "
                "softcap; use multi_teacher='mixture' or 'losses'"
            )
        if len(caps) > 1:
            raise ValueError(
                "multi_teacher='mixture' applies one final softcap to every teacher, got "
                f"{sorted(caps, key=str)}; use multi_teacher='losses'"
            )
        vocabs = {Head(t).vocab_size for t in self.teachers}
        if len(vocabs) > 1:
            raise ValueError(
                f"multi_teacher={mode!r} needs teachers with one vocabulary, got {sorted(vocabs)}"
            )

    # --- gradient checkpointing (the Trainer's hooks, delegated to the student) ------------

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute the student's layers in backward (transformers' activation checkpointing;
        it also makes the embeddings' output require grad, which a peft student with reentrant
        checkpointing needs). Teachers run under no_grad and keep no activations anyway."""
        self._checkpointing_target().activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs,
            every_n_layers=every_n_layers,
            offload=offload,
        )

    def activation_checkpointing_disable(self) -> None:
        lm = self._checkpointing_target()
        lm.activation_checkpointing_disable()
        lm.disable_input_require_grads()  # what enable added (transformers keeps it otherwise)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **kwargs
    ) -> None:
        """transformers' older name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(causal_lm(self.student), "supports_gradient_checkpointing", False))

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.student.modules())

    is_gradient_checkpointing = is_activation_checkpointing

    def _checkpointing_target(self) -> nn.Module:
        lm = causal_lm(self.student)
        if not self.supports_gradient_checkpointing:
            raise ValueError(f"the student, {describe(lm)}, does not support checkpointing")
        return lm

    # --- forward ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
        hard_labels: bool = True,
        token_weights: torch.Tensor | None = None,
    ) -> DistillOutput:
        """The loss of one batch. ``hard_labels=False``: the labels are no ground truth (the
        student's own samples, ``fastkd.training.onpolicy``), so the CE term is dropped and the
        KD term keeps its weight ``1 - alpha``. ``token_weights`` [B, S] (float, in the labels'
        positions: the loss predicting token t + 1 weighs ``token_weights[t + 1]``) weigh each
        token's KD and CE terms, mean = sum(w * loss) / sum(w) over the targets (rationale
        distillation's span weights, ``fastkd.training.data.SpanWeights``); the feature and
        attention losses are not weighted."""
        cfg = self.distill_config
        cached = (teacher_ids, teacher_logprobs)
        if self.teacher_cache is None and any(t is not None for t in cached):
            raise ValueError(
                "teacher_ids/teacher_logprobs are a teacher cache's rows; this Distiller has "
                "teacher models (pass teacher_cache= to distil from a cache)"
            )
        if self.teacher_cache is not None and any(t is None for t in cached):
            raise ValueError(
                "this Distiller distils from a teacher cache: each batch needs teacher_ids and "
                "teacher_logprobs (fastkd.training.data.TeacherCacheDataset gives them)"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = input_ids if labels is None else labels
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        # Shifted as the fused losses shift the labels: position t's loss predicts token t + 1.
        weights = None if token_weights is None else F.pad(token_weights[:, 1:], (0, 1))
        features = bool(self.feature_layers)
        # The router logits are recorded only when asked for (a model-specific keyword).
        router = {} if self.router_loss is None else {"output_router_logits": True}
        out = body(self.student)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=features,
            output_attentions=self.attention,
            use_cache=False,
            **router,
        )
        hidden = out.last_hidden_state
        with torch.no_grad():
            t_outs = [
                body(t)(
                    input_ids=input_ids.to(_device(t)),
                    attention_mask=attention_mask.to(_device(t)),
                    output_hidden_states=features,
                    output_attentions=self.attention,
                    use_cache=False,
                )
                for t in self.teachers
            ]

        s_head = Head(self.student)
        t_heads = [Head(t) for t in self.teachers]
        # A head that FSDP2 shards is gathered for the fused loss (docs/design.md §10).
        with full_weights(s_head.module, *(h.module for h in t_heads)):
            if self.teacher_cache is None:
                kd, ce = self._response_loss(
                    s_head, t_heads, hidden, t_outs, labels, hard_labels, token_weights=weights
                )
            else:
                kd, ce = self._cached_loss(
                    s_head, hidden, labels, *cached, hard_labels, token_weights=weights
                )
            stats = self._statistics(s_head, hidden, labels)
        zero = hidden.new_zeros((), dtype=torch.float32)
        feature = zero
        if features:
            feature = cfg.feature_weight * self._feature_loss(out, t_outs, attention_mask)
        attention = zero
        if self.attention:
            attention = cfg.attention_weight * self._attention_loss(out, t_outs, attention_mask)
        aux = zero
        if self.router_loss is not None:
            aux = self.router_loss(out.router_logits, attention_mask).to(zero.device)
        loss = kd + ce + feature + attention + aux
        parts = (kd, ce, feature, attention, aux)
        return DistillOutput(loss, *(p.detach() for p in parts), *stats)

    def _statistics(self, head: Head, hidden: torch.Tensor, labels: torch.Tensor):
        """(nll, correct, tokens) per sequence [B] of the student in eval mode; zeros in
        training."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        rows = hidden.shape[0]
        device = head.base.weight.device
        nll = torch.zeros(rows, dtype=torch.float64, device=device)
        correct = torch.zeros(rows, dtype=torch.int64, device=device)
        tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        if self.training:
            return nll, correct, tokens
        row_nll, hit = head.statistics(hidden.detach()[:, :-1][keep], targets[keep])
        sequence = keep.nonzero()[:, 0].to(device)  # the sequence of each kept row
        nll.index_add_(0, sequence, row_nll)
        correct.index_add_(0, sequence, hit.long())
        tokens.index_add_(0, sequence, torch.ones_like(sequence))
        return nll, correct, tokens

    def _teacher_head(self, k: int, head: Head, device: torch.device, dtype: torch.dtype):
        """Teacher k's head (weight, bias) on the student's device in ``dtype``. Cached for
        frozen teachers; an EMA teacher changes every step and an FSDP-sharded head holds its
        full weights only inside ``full_weights``, so those are read afresh."""
        key = (k, device, dtype)
        cache = self.distill_config.self_distillation != "ema" and not is_sharded(head.module)
        if cache and key in self._head_cache:
            return self._head_cache[key]
        with torch.no_grad():
            weight = head.weight().to(device=device, dtype=dtype)
            bias = head.bias()
            value = (weight, None if bias is None else bias.to(device=device, dtype=dtype))
        if cache:
            self._head_cache[key] = value
        return value

    def _loss_kwargs(self, s_head: Head) -> dict:
        cfg = self.distill_config
        return dict(
            temperature=cfg.temperature,
            divergence=cfg.divergence,
            beta=cfg.beta,
            skew=cfg.skew,
            backend=cfg.backend,
            chunk_size=cfg.chunk_size,
            memory_budget=cfg.memory_budget,
            student_logit_scale=s_head.scale,
            student_softcap=s_head.softcap or None,
            shift_labels=True,
            return_parts=True,
        )

    def _weights(self, hard_labels: bool) -> dict:
        """KD and CE weights of the fused losses: ``1 - alpha`` and ``alpha``, CE 0 without
        hard labels."""
        alpha = self.distill_config.alpha
        return dict(kd_weight=1.0 - alpha, ce_weight=alpha if hard_labels else 0.0)

    def _response_loss(
        self,
        s_head: Head,
        t_heads: list[Head],
        hidden,
        t_outs,
        labels,
        hard_labels=True,
        *,
        token_weights=None,
    ):
        """(kd, ce) contributions; kd carries the gradient of both."""
        cfg = self.distill_config
        # Under autocast the hidden states come in a lower precision than the (fp32) head:
        # cast the head, differentiably, so the fused GEMMs run in that precision.
        w_s, b_s = s_head.weight(hidden.dtype), s_head.bias(hidden.dtype)
        h_s = s_head.inputs(hidden)
        kwargs = self._loss_kwargs(s_head)
        with torch.no_grad():
            t_hidden = [
                h.inputs(o.last_hidden_state).to(hidden.device) for h, o in zip(t_heads, t_outs)
            ]
        if len({h.dtype for h in t_hidden}) > 1:  # teachers in different precisions
            t_hidden = [h.float() for h in t_hidden]
        if len(self.teachers) == 1 or cfg.multi_teacher == "logits":
            # Weighted mean of the teachers' logits = one GEMM over the concatenated hidden
            # states (each scaled by its weight) and the concatenated heads.
            ht, wt, bt = [], [], []
            for k, (h, lam) in enumerate(zip(t_hidden, self.teacher_weights)):
                w, b = self._teacher_head(k, t_heads[k], hidden.device, h.dtype)
                scale = t_heads[k].scale
                ht.append(h * (lam * scale))
                wt.append(w)
                if b is not None:
                    bt.append(b * (lam * scale))
            parts = fused_linear_kd_loss(
                h_s,
                w_s,
                labels,
                student_bias=b_s,
                teacher_hidden=torch.cat(ht, -1),
                teacher_weight=torch.cat(wt, -1),
                teacher_bias=sum(bt) if bt else None,
                teacher_softcap=(t_heads[0].softcap or None) if len(ht) == 1 else None,
                **self._weights(hard_labels),
                vocab=cfg.vocab,
                token_weights=token_weights,
                **kwargs,
            )
            return parts.loss - parts.ce, parts.ce
        if cfg.multi_teacher == "mixture":
            # One fused loss against p = sum_k w_k softmax(x_k / T), mixed chunk by chunk; each
            # teacher's logit scale is folded into its hidden states and bias.
            heads = [
                self._teacher_head(k, head, hidden.device, h.dtype)
                for k, (head, h) in enumerate(zip(t_heads, t_hidden))
            ]
            parts = fused_linear_kd_loss(
                h_s,
                w_s,
                labels,
                student_bias=b_s,
                teacher_hidden=[h * head.scale for h, head in zip(t_hidden, t_heads)],
                teacher_weight=[w for w, _ in heads],
                teacher_bias=[
                    None if b is None else b * head.scale for (_, b), head in zip(heads, t_heads)
                ],
                teacher_mixture=self.teacher_weights,
                teacher_softcap=t_heads[0].softcap or None,
                **self._weights(hard_labels),
                vocab=cfg.vocab,
                token_weights=token_weights,
                **kwargs,
            )
            return parts.loss - parts.ce, parts.ce
        # Weighted sum of one KD loss per teacher; the CE term is counted once.
        total, ce = 0.0, None
        for k, (h, lam) in enumerate(zip(t_hidden, self.teacher_weights)):
            w, b = self._teacher_head(k, t_heads[k], hidden.device, h.dtype)
            parts = fused_linear_kd_loss(
                h_s,
                w_s,
                labels,
                student_bias=b_s,
                teacher_hidden=h,
                teacher_weight=w,
                teacher_bias=b,
                teacher_logit_scale=t_heads[k].scale,
                teacher_softcap=t_heads[k].softcap or None,
                kd_weight=(1.0 - cfg.alpha) * lam,
                ce_weight=cfg.alpha if k == 0 and hard_labels else 0.0,
                vocab=cfg.vocab,
                token_weights=token_weights,
                **kwargs,
            )
            total = total + parts.loss
            ce = parts.ce if ce is None else ce
        return total - ce, ce

    def _cached_loss(
        self,
        s_head: Head,
        hidden,
        labels,
        teacher_ids,
        teacher_logprobs,
        hard_labels=True,
        *,
        token_weights=None,
    ):
        """(kd, ce) against the teacher cache's rows of the batch; kd carries the gradient of
        both."""
        cfg = self.distill_config
        parts = fused_linear_sparse_kd_loss(
            s_head.inputs(hidden),
            s_head.weight(hidden.dtype),
            teacher_ids.to(hidden.device),
            teacher_logprobs.to(hidden.device),
            labels,
            student_bias=s_head.bias(hidden.dtype),
            tail=cfg.tail,
            **self._weights(hard_labels),
            token_weights=token_weights,
            **self._loss_kwargs(s_head),
        )
        return parts.loss - parts.ce, parts.ce

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

    def save_pretrained(
        self,
        directory: str | Path,
        tokenizer=None,
        state_dict: dict | None = None,
        merge: bool = False,
    ) -> None:
        """The student with ``save_pretrained`` (a directory ``from_pretrained`` loads), the
        feature projections, the EMA teacher when there is one, the config and the tokenizer.

        A peft student writes its adapter (peft's format: ``PeftModel.from_pretrained(base,
        directory)`` loads it) unless ``merge``: then a copy of it has the adapters merged into
        the base weights (``merge_and_unload``) and is saved as a plain causal LM, while the
        training model is left as it is. The copy costs the student's memory once more.

        Args:
            directory: created if missing.
            tokenizer: saved beside the student when given.
            state_dict: a gathered (FSDP/DeepSpeed) state of this module, saved instead of
                the student's own parameters.
            merge: merge a peft student's adapters (needs the student's own parameters).
        """
        from safetensors.torch import save_file

        peft = is_peft(self.student)
        if merge and not peft:
            raise ValueError(
                f"merge=True merges LoRA adapters; the student, "
                f"{describe(self.student)}, is not a peft model"
            )
        if merge and state_dict is not None:
            raise ValueError(
                "merge=True with a gathered state_dict (FSDP/DeepSpeed) is not supported: save "
                "the adapter and merge it with peft's merge_and_unload after training"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        student_state = projections = None
        if state_dict is not None:
            student_state = _under("student.", state_dict)
            projections = _under("projections.", state_dict)
        if merge:
            copy.deepcopy(self.student).merge_and_unload().save_pretrained(directory)
        else:
            self.student.save_pretrained(directory, state_dict=student_state)
        if len(self.projections):
            projections = projections or self.projections.state_dict()
            save_file(_contiguous(projections), str(directory / PROJECTIONS_FILE))
        if self.distill_config.self_distillation == "ema":
            save_file(_contiguous(self.teachers[0].state_dict()), str(directory / EMA_TEACHER_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.distill_config.to_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def load_weights(self, directory: str | Path) -> None:
        """Load what ``save_pretrained`` wrote (resuming from a checkpoint): a peft student's
        adapter, or a plain student's weights. A merged save cannot resume a peft student (its
        adapter is no longer separate). A Distiller sharded by ``shard_distiller`` loads on
        every process at once (call it on all): process 0 reads the files, and each process
        receives its shards."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if is_sharded(self):
            self._load_sharded(directory)
            return
        if is_peft(self.student):
            self._load_adapter(directory)
        else:
            state = {}
            for f in _student_files(directory):
                state.update(load_file(str(f)))
            result = self.student.load_state_dict(state, strict=False)
            tied = set(getattr(self.student, "all_tied_weights_keys", {}) or {})
            missing = [k for k in result.missing_keys if k not in tied]
            _check_names(directory, missing, result.unexpected_keys)
        if len(self.projections):
            self.projections.load_state_dict(load_file(str(directory / PROJECTIONS_FILE)))
        if self.distill_config.self_distillation == "ema":
            self.teachers[0].load_state_dict(load_file(str(directory / EMA_TEACHER_FILE)))

    def _load_sharded(self, directory: Path) -> None:
        """``load_weights`` for a sharded Distiller: every process checks the saved names (the
        files' headers), process 0 alone holds the full tensors (the student once, in CPU
        memory, as when saving), and ``set_model_state_dict`` sends each process its shards."""
        import torch.distributed as dist
        from safetensors import safe_open
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if is_peft(self.student):
            raise ValueError(
                f"{directory}: a sharded peft student cannot resume (its adapter's names differ "
                "from the sharded model's); resume without fsdp"
            )
        files = [("student.", f) for f in _student_files(directory)]
        if len(self.projections):
            files.append(("projections.", directory / PROJECTIONS_FILE))
        names = set()
        for prefix, f in files:
            with safe_open(str(f), "pt") as reader:  # the header only
                saved = reader.keys()
            names.update(prefix + k for k in saved)
        tied = getattr(self.student, "all_tied_weights_keys", None) or {}
        tied = {f"student.{target}": f"student.{source}" for target, source in tied.items()}
        expected = set(self.state_dict())
        _check_names(directory, sorted(expected - names - set(tied)), sorted(names - expected))
        state = {}
        if dist.get_rank() == 0:
            for prefix, f in files:
                state.update({prefix + k: v for k, v in load_file(str(f)).items()})
            for target, source in tied.items():
                state.setdefault(target, state[source])
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self, state, options=options)

    def _load_adapter(self, directory: Path) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        if not (directory / ADAPTER_FILE).is_file():
            raise FileNotFoundError(
                f"no {ADAPTER_FILE} in {directory}: a peft student resumes from an adapter "
                "checkpoint (a merged save holds no separate adapter)"
            )
        name = self.student.active_adapter
        weights = load_peft_weights(str(directory), device=str(_device(self.student)))
        expected = set(get_peft_model_state_dict(self.student, adapter_name=name))
        if set(weights) != expected:
            raise RuntimeError(
                f"{directory}: adapter weights do not match the student's (missing "
                f"{sorted(expected - set(weights))}, unexpected {sorted(set(weights) - expected)})"
            )
        set_peft_model_state_dict(self.student, weights, adapter_name=name)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _student_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {directory}")
    return files


def _check_names(directory: Path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise RuntimeError(
            f"{directory}: student weights do not match (missing {missing}, "
            f"unexpected {unexpected})"
        )


def _under(prefix: str, state: dict) -> dict:
    """The entries of a module's state dict under one submodule, named as in that submodule."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


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
