"""The distillation loss as people write it by hand in PyTorch (materialized log-softmaxes):
the eager contender, and what ``torch.compile`` is given."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastkd


def eager_kd_loss(
    student_logits, teacher_logits, labels, *, temperature=2.0, alpha=0.5, divergence="kl", beta=0.5
):
    """``alpha * CE + (1 - alpha) * T^2 * D``, mean over tokens (no ignored labels); alpha=1 is
    the plain CE (``teacher_logits`` may be None)."""
    ce = F.cross_entropy(student_logits.float(), labels) if alpha else None
    if alpha == 1:
        return ce
    t = temperature
    lq = F.log_softmax(student_logits.float() / t, -1)
    lp = F.log_softmax(teacher_logits.float() / t, -1)
    if divergence == "kl":
        d = F.kl_div(lq, lp, reduction="batchmean", log_target=True)
    elif divergence == "reverse_kl":
        d = F.kl_div(lp, lq, reduction="batchmean", log_target=True)
    elif divergence == "jsd":  # TRL's generalized JSD
        lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), 0)
        d = beta * F.kl_div(lm, lp, reduction="batchmean", log_target=True) + (1 - beta) * F.kl_div(
            lm, lq, reduction="batchmean", log_target=True
        )
    else:  # no common hand-written form: fastkd's reference (T^2 * D, mean over tokens)
        d = fastkd.kd_loss(
            student_logits,
            teacher_logits,
            None,
            temperature=t,
            alpha=0.0,
            divergence=divergence,
            backend="reference",
        ) / (t * t)
    loss = (1 - alpha) * t * t * d
    return loss if ce is None else loss + alpha * ce
