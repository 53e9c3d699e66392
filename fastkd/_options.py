"""Validated scalar options shared by every fastkd loss.

The loss of one token (DESIGN §1), with ``alpha`` the weight of the hard-label cross-entropy:

    loss = ce_weight * CE(z_s, y) + kd_weight * T^2 * D(p_T || q_T)
    ce_weight = alpha, kd_weight = 1 - alpha   (unless both weights are spelled out)

Kernels receive the options as plain numbers (``KDOptions.kernel_args``) in one fixed order,
the same for the C++, CUDA and Triton backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
VOCAB_MODES = ("truncate", "pad")
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class KDOptions:
    """Resolved loss options. ``divergence`` is canonical: jsd with beta 0/1 and the skew
    divergences with skew 0 are rewritten to the plain KL they equal, so kernels never see a
    degenerate mixture (and the log of a zero weight)."""

    divergence: str = "kl"
    temperature: float = 2.0
    kd_weight: float = 0.5
    ce_weight: float = 0.5
    mix: float = 0.0  # beta for jsd, skew for the skew divergences, unused otherwise
    ignore_index: int = -100
    student_scale: float = 1.0
    student_softcap: float = 0.0  # 0 means no softcap
    teacher_scale: float = 1.0
    teacher_softcap: float = 0.0
    vocab: str | None = None

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

    def kernel_args(self, kd_vocab: int) -> tuple:
        """Scalar arguments of the kernel ops, in the order of their schemas."""
        return (
            DIVERGENCE_CODES[self.divergence],
            self.temperature,
            self.kd_weight,
            self.ce_weight,
            self.mix,
            self.ignore_index,
            kd_vocab,
            self.student_scale,
            self.student_softcap,
            self.teacher_scale,
            self.teacher_softcap,
        )


def resolve_options(
    *,
    temperature: float = 2.0,
    alpha: float | None = None,
    kd_weight: float | None = None,
    ce_weight: float | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab: str | None = None,
) -> KDOptions:
    """Check every scalar option and return the canonical ``KDOptions``."""
    temperature = _check_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    if kd_weight is not None or ce_weight is not None:
        if alpha is not None:
            raise ValueError(
                "give either alpha or kd_weight/ce_weight, not both "
                "(alpha is the CE weight and 1 - alpha the KD weight)"
            )
        kd_w = 0.0 if kd_weight is None else _check_number("kd_weight", kd_weight)
        ce_w = 0.0 if ce_weight is None else _check_number("ce_weight", ce_weight)
        for name, value in (("kd_weight", kd_w), ("ce_weight", ce_w)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
    else:
        a = 0.5 if alpha is None else _check_number("alpha", alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha (the CE weight) must be in [0, 1], got {a}")
        kd_w, ce_w = 1.0 - a, a

    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = _check_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    skew = _check_number("skew", skew)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")

    mix = 0.0
    if divergence == "jsd":
        # TRL's generalized JSD convention: beta=0 is forward KL, beta=1 is reverse KL.
        if beta == 0.0:
            divergence = "kl"
        elif beta == 1.0:
            divergence = "reverse_kl"
        else:
            mix = beta
    elif divergence in ("skew_kl", "skew_reverse_kl"):
        if skew == 0.0:
            divergence = "kl" if divergence == "skew_kl" else "reverse_kl"
        else:
            mix = skew

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    scales = {}
    for name, value in (
        ("student_logit_scale", student_logit_scale),
        ("teacher_logit_scale", teacher_logit_scale),
    ):
        scales[name] = _check_number(name, value)
        if scales[name] <= 0:
            raise ValueError(f"{name} must be > 0, got {scales[name]}")
    caps = {}
    for name, value in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        caps[name] = 0.0 if value is None else _check_number(name, value)
        if value is not None and caps[name] <= 0:
            raise ValueError(f"{name} must be > 0 or None, got {caps[name]}")

    if vocab is not None and vocab not in VOCAB_MODES:
        raise ValueError(f"vocab must be one of {VOCAB_MODES} or None, got {vocab!r}")

    return KDOptions(
        divergence=divergence,
        temperature=temperature,
        kd_weight=kd_w,
        ce_weight=ce_w,
        mix=mix,
        ignore_index=ignore_index,
        student_scale=scales["student_logit_scale"],
        student_softcap=caps["student_softcap"],
        teacher_scale=scales["teacher_logit_scale"],
        teacher_softcap=caps["teacher_softcap"],
        vocab=vocab,
    )


def check_reduction(reduction: str) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction
