"""The loss options, declared once, and the argument set the kernels receive.

``LossOptions`` is the one declaration of the options every fastkd loss takes (``kd_loss``,
``fused_linear_kd_loss``, ``KDLoss``, ``FusedLinearKDLoss``): each field's name, type, default
and doc. ``takes_loss_options`` turns the fields into keyword parameters of a loss function's
signature and a section of its docstring, so ``help()`` and ``inspect.signature`` show them.
Constructing ``LossOptions`` validates them; ``kernel_args`` resolves them to the canonical
``KernelArgs`` of the op contract (docs/design.md §1, §2).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import textwrap
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

Divergence = Literal["kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]
Reduction = Literal["mean", "sum", "none", "batchmean"]
VocabMode = Literal["truncate", "pad"]
Tail = Literal["bucket", "renormalize", "ignore"]

DIVERGENCES: tuple[str, ...] = typing.get_args(Divergence)
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
VOCAB_MODES: tuple[str, ...] = typing.get_args(VocabMode)
TAILS: tuple[str, ...] = typing.get_args(Tail)  # the code of a tail mode is its index
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}

# A docstring line holding only this marker is replaced by the options' docs.
OPTIONS_MARKER = "<loss options>"
# float32's smallest subnormal and largest finite value (no torch import here).
_FLOAT32_MIN = 2.0**-149
_FLOAT32_MAX = (2.0 - 2.0**-23) * 2.0**127


class KernelArgs(NamedTuple):
    """The scalar arguments of the kernel ops, in the order of their schemas (docs/design.md §2).
    ``fastkd/_ops.py`` generates the schemas from these fields."""

    divergence: int  # DIVERGENCE_CODES; canonical: never a mixture with weight 0
    temperature: float
    kd_weight: float
    ce_weight: float
    mix: float  # beta for jsd, skew for the skew divergences, 0 otherwise
    ignore_index: int
    kd_vocab: int  # student columns in the KD term
    student_scale: float
    student_softcap: float  # 0: no softcap
    teacher_scale: float
    teacher_softcap: float


class SparseKernelArgs(NamedTuple):
    """The scalar arguments of the sparse (cached top-k teacher) kernel ops, in the order of
    their schemas (docs/design.md §11): ``KernelArgs`` less the teacher's transform and
    ``kd_vocab`` (the cached log-probabilities are final), plus the tail mode."""

    divergence: int
    temperature: float
    kd_weight: float
    ce_weight: float
    mix: float
    ignore_index: int
    tail: int  # index in TAILS
    student_scale: float
    student_softcap: float


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The options of every fastkd loss, checked when constructed. Per token::

        loss = alpha * CE(z_s, label) + (1 - alpha) * T^2 * D(p_T || q_T)

    **alpha is the weight of the hard-label cross-entropy**, ``1 - alpha`` that of the
    distillation term, which is multiplied by T^2 so its gradient keeps its scale as T changes
    (Hinton et al.). The teacher gets no gradient.

    Args:
        <loss options>
    """

    # Fields a loss of this kind does not take (left out of its signature and docs).
    NOT_TAKEN: ClassVar[tuple[str, ...]] = ()

    temperature: float = field(
        default=2.0,
        metadata={
            "doc": "T > 0 of the distillation term: q = softmax(z_s / T), p = softmax(z_t / T)."
        },
    )
    alpha: float | None = field(
        default=None,
        metadata={
            "doc": "weight of the hard-label CE in [0, 1]; 1 - alpha weighs the T^2-scaled "
            "distillation term. Default 0.5 when neither kd_weight nor ce_weight is given. "
            "alpha=1 is plain CE (the teacher is not read), alpha=0 plain distillation (labels "
            "may be None)."
        },
    )
    kd_weight: float | None = field(
        default=None,
        metadata={
            "doc": "weight of the T^2-scaled distillation term, instead of alpha (with or "
            "without ce_weight; a missing one is 0): any finite value >= 0, not bounded by 1 "
            "(the weights are plain multipliers, kd_weight=2 doubles the term)."
        },
    )
    ce_weight: float | None = field(
        default=None,
        metadata={
            "doc": "weight of the CE term, instead of alpha (a missing kd_weight is 0): any finite "
            "value >= 0. A lone 0 (kd_weight=0 or ce_weight=0 without the other) is an error: "
            "both weights would be 0; give both explicitly for a loss that is 0."
        },
    )
    divergence: Divergence = field(
        default="kl",
        metadata={
            "doc": "kl (KL(p||q)), reverse_kl (KL(q||p)), jsd (generalized JSD with beta: "
            "beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q; beta=0 is forward KL "
            "and beta=1 reverse KL, as in TRL), tvd (0.5*sum|p-q|), skew_kl (KL(p || skew*p + "
            "(1-skew)*q)) or skew_reverse_kl (KL(q || skew*q + (1-skew)*p))."
        },
    )
    beta: float = field(
        default=0.5, metadata={"doc": "jsd's weight of the teacher in the mixture, in [0, 1]."}
    )
    skew: float = field(
        default=0.1, metadata={"doc": "the skew divergences' mixture weight, in [0, 1)."}
    )
    ignore_index: int = field(
        default=-100,
        metadata={"doc": "label of tokens that count in neither term (their loss is 0)."},
    )
    reduction: Reduction = field(
        default="mean",
        metadata={
            "doc": "mean (sum of the token losses / sum of the weights of the counted tokens, 0 "
            "when none counts), sum, none (per token, in the labels' shape, 0 where ignored) or "
            "batchmean (sum / N, N the number of tokens: B*S for [B, S, V] input, ignored ones "
            "included). With no tokens at all (N = 0) every scalar reduction is 0. The "
            "hand-written (1 - alpha) * T^2 * F.kl_div(log q, log p, reduction='batchmean', "
            "log_target=True) + alpha * F.cross_entropy(z_s, labels) "
            "equals the default mean only when no label is ignored: fastkd leaves an ignored "
            "token out of the KL term too, F.kl_div does not. batchmean divides by N, "
            "torch.nn.KLDivLoss(reduction='batchmean') by input.size(0), which is B for "
            "[B, S, V] input: they agree for [N, V] input."
        },
    )
    student_logit_scale: float = field(
        default=1.0,
        metadata={"doc": "> 0, multiplies the student's raw logits first (Cohere's logit_scale)."},
    )
    teacher_logit_scale: float = field(
        default=1.0, metadata={"doc": "the same for the teacher's logits."}
    )
    student_softcap: float | None = field(
        default=None,
        metadata={
            "doc": "cap > 0: the scaled student logits become cap * tanh(x / cap) (Gemma's "
            "final softcap); None for none. -inf stays -inf."
        },
    )
    teacher_softcap: float | None = field(
        default=None, metadata={"doc": "the same for the teacher's logits."}
    )
    vocab: VocabMode | None = field(
        default=None,
        metadata={
            "doc": "when the vocabularies differ: truncate compares on the shared prefix, pad "
            "treats the teacher's missing entries as -inf (p = 0 there; needs a teacher "
            "vocabulary no larger than the student's). The CE always uses every student column."
        },
    )

    def __post_init__(self) -> None:
        if _number("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if 1.0 / self.temperature > _FLOAT32_MAX:
            raise ValueError(
                f"temperature must be >= {1 / _FLOAT32_MAX:.3g} (1/T must be a finite float32), "
                f"got {self.temperature}"
            )
        if self.kd_weight is not None or self.ce_weight is not None:
            if self.alpha is not None:
                raise ValueError(
                    "give either alpha or kd_weight/ce_weight, not both "
                    "(alpha is the CE weight and 1 - alpha the KD weight)"
                )
            for name in ("kd_weight", "ce_weight"):
                value = getattr(self, name)
                if value is not None and _number(name, value) < 0:
                    raise ValueError(f"{name} must be >= 0, got {value}")
            if (self.kd_weight is None) != (self.ce_weight is None):
                name, other = (
                    ("kd_weight", "ce_weight")
                    if self.ce_weight is None
                    else ("ce_weight", "kd_weight")
                )
                if getattr(self, name) == 0:
                    raise ValueError(
                        f"{name}=0 without {other} makes the loss 0 (a missing weight is 0): "
                        f"pass {other} too (e.g. {name}=0, {other}=1)"
                    )
        elif self.alpha is not None and not 0.0 <= _number("alpha", self.alpha) <= 1.0:
            raise ValueError(f"alpha (the CE weight) must be in [0, 1], got {self.alpha}")
        _choice("divergence", self.divergence, DIVERGENCES)
        if not 0.0 <= _number("beta", self.beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= _number("skew", self.skew) < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {self.skew}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        _choice("reduction", self.reduction, REDUCTIONS)
        for who in ("student", "teacher"):
            name = f"{who}_logit_scale"
            if _number(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
            name = f"{who}_softcap"
            cap = getattr(self, name)
            if cap is not None and _number(name, cap) <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {cap}")
        if self.vocab is not None:
            _choice("vocab", self.vocab, VOCAB_MODES, " or None")

    def kd_vocab(self, student_vocab: int, teacher_vocab: int) -> int:
        """Number of leading student columns that take part in the distillation term."""
        if student_vocab == teacher_vocab:
            return student_vocab
        if self.vocab is None:
            raise ValueError(
                f"student and teacher vocabularies differ ({student_vocab} vs {teacher_vocab}); "
                "pass vocab='truncate' (compare on the shared prefix) or vocab='pad' (missing "
                "teacher entries count as -inf)"
            )
        if self.vocab == "truncate":
            return min(student_vocab, teacher_vocab)
        if teacher_vocab > student_vocab:
            raise ValueError(
                f"vocab='pad' needs teacher vocabulary <= student vocabulary, got teacher "
                f"{teacher_vocab} > student {student_vocab}; use vocab='truncate'"
            )
        return student_vocab

    def kernel_args(self, student_vocab: int, teacher_vocab: int) -> KernelArgs:
        """The canonical kernel arguments: the weights from alpha, and jsd with beta 0/1 or a
        skew divergence with skew 0 rewritten to the plain KL they equal, so no kernel sees a
        mixture weight of 0 (and its log)."""
        if self.kd_weight is None and self.ce_weight is None:
            ce_weight = 0.5 if self.alpha is None else float(self.alpha)
            kd_weight = 1.0 - ce_weight
        else:
            kd_weight, ce_weight = float(self.kd_weight or 0.0), float(self.ce_weight or 0.0)
        divergence, mix = self.divergence, 0.0
        if divergence == "jsd":
            mix = float(self.beta)
            if mix in (0.0, 1.0):  # TRL's convention: beta=0 is forward KL, beta=1 reverse KL
                divergence, mix = ("kl" if mix == 0.0 else "reverse_kl"), 0.0
        elif divergence in ("skew_kl", "skew_reverse_kl"):
            mix = float(self.skew)
            if mix == 0.0:
                divergence = divergence.removeprefix("skew_")
        return KernelArgs(
            divergence=DIVERGENCE_CODES[divergence],
            temperature=float(self.temperature),
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            mix=mix,
            ignore_index=self.ignore_index,
            kd_vocab=self.kd_vocab(student_vocab, teacher_vocab),
            student_scale=float(self.student_logit_scale),
            student_softcap=float(self.student_softcap or 0.0),
            teacher_scale=float(self.teacher_logit_scale),
            teacher_softcap=float(self.teacher_softcap or 0.0),
        )


# Each option's default (read here once: torch.compile cannot trace dataclasses.fields).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossOptions)}


@dataclasses.dataclass(frozen=True)
class SparseLossOptions(LossOptions):
    """The options of the sparse losses (a cached top-k teacher: ``fastkd.sparse_kd_loss``):
    those of ``LossOptions`` but the teacher's logit transform and vocabulary mode (the cached
    log-probabilities are final), plus ``tail``. ``temperature`` must be the one the cache was
    made at. Per token::

        loss = alpha * CE(z_s, label) + (1 - alpha) * T^2 * D(p_bins || q_bins)

    Args:
        <loss options>
    """

    NOT_TAKEN: ClassVar[tuple[str, ...]] = ("teacher_logit_scale", "teacher_softcap", "vocab")

    tail: Tail = field(
        default="bucket",
        metadata={
            "doc": "how the probability outside the k cached tokens counts: bucket (one more "
            "bin holding each model's tail mass 1 - sum over the k tokens; the divergence of "
            "the two (k+1)-bin distributions; equals kd_loss when k = V), renormalize (both "
            "renormalized over the k tokens) or ignore (the teacher renormalized over the k "
            "tokens, the student's full-vocabulary probabilities there, as DistillKit)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("tail", self.tail, TAILS)
        for name in self.NOT_TAKEN:
            if getattr(self, name) != _DEFAULTS[name]:
                raise ValueError(
                    f"{name} does not apply to a cached teacher: its log-probabilities are "
                    "final (made at the cache's temperature by fastkd cache-teacher)"
                )

    def sparse_kernel_args(self) -> SparseKernelArgs:
        """The canonical sparse kernel arguments (the rewrites of ``kernel_args``)."""
        args = self.kernel_args(1, 1)
        return SparseKernelArgs(
            divergence=args.divergence,
            temperature=args.temperature,
            kd_weight=args.kd_weight,
            ce_weight=args.ce_weight,
            mix=args.mix,
            ignore_index=args.ignore_index,
            tail=TAILS.index(self.tail),
            student_scale=args.student_scale,
            student_softcap=args.student_softcap,
        )


def option_fields(options: type[LossOptions] = LossOptions) -> list[dataclasses.Field]:
    """The fields of an options class that its losses take, in order."""
    return [f for f in dataclasses.fields(options) if f.name not in options.NOT_TAKEN]


def option_names(options: type[LossOptions] = LossOptions) -> frozenset[str]:
    return frozenset(f.name for f in option_fields(options))


LOSS_OPTION_NAMES = option_names(LossOptions)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    # The kernels take every option as a float32: one that would round to 0 or overflow there
    # would silently change the loss (a weight of 1e-100 becomes 0, and 0 * inf is NaN).
    if value != 0 and not _FLOAT32_MIN <= abs(value) <= _FLOAT32_MAX:
        raise ValueError(
            f"{name} must be 0 or of magnitude in [{_FLOAT32_MIN:.3g}, {_FLOAT32_MAX:.4g}] (the "
            f"kernels compute in float32), got {value}"
        )
    return float(value)


def _choice(name: str, value: object, allowed: tuple[str, ...], extra: str = "") -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}{extra}, got {value!r}")


# --- the options in signatures and docstrings ------------------------------------------------


def option_parameters(options: type[LossOptions] = LossOptions) -> list[inspect.Parameter]:
    """The fields of an options class as keyword-only parameters, with defaults and types."""
    hints = typing.get_type_hints(options)
    return [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in option_fields(options)
    ]


def document_options(doc: str, options: type[LossOptions] = LossOptions) -> str:
    """``doc`` with its ``OPTIONS_MARKER`` line replaced by one entry per option (its default
    is said where it is not None; the doc of a None default says what None means)."""
    lines = doc.split("\n")
    (i,) = [i for i, line in enumerate(lines) if line.strip() == OPTIONS_MARKER]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    entries = [
        textwrap.fill(
            f"{f.name}: {f.metadata['doc']}"
            + ("" if f.default is None else f" Default {f.default!r}."),
            width=96,
            initial_indent=indent,
            subsequent_indent=indent + "    ",
        )
        for f in option_fields(options)
    ]
    return "\n".join([*lines[:i], *entries, *lines[i + 1 :]])


_Function = TypeVar("_Function", bound=Callable[..., Any])


def takes_loss_options(
    options: type[LossOptions] = LossOptions,
) -> Callable[[_Function], _Function]:
    """Decorator: give a loss function whose ``**options`` are the fields of ``options`` (a
    ``LossOptions`` class) the options as keyword parameters in its signature (before its own)
    and their docs in its docstring (at ``OPTIONS_MARKER``); ``function.loss_options`` is the
    class. The function itself is unchanged, so it still traces."""

    def decorate(function: _Function) -> _Function:
        sig = inspect.signature(function, eval_str=True)
        *own, rest = sig.parameters.values()
        if rest.kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"{function.__name__} must end with **options")
        keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        params = [*positional, *option_parameters(options), *keyword]
        function.__signature__ = sig.replace(parameters=params)
        function.__doc__ = document_options(function.__doc__, options)
        function.loss_options = options
        return function

    return decorate


LossOptions.__doc__ = document_options(LossOptions.__doc__)
SparseLossOptions.__doc__ = document_options(SparseLossOptions.__doc__, SparseLossOptions)
