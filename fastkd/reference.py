"""Plain-PyTorch reference of the fastkd loss (DESIGN §1).

Used three ways: as ground truth in every test and benchmark (call it with fp64 inputs), as the
``reference`` backend (always available), and as the documentation of the math the kernels
must reproduce. Gradients come from autograd, so they check the kernels' hand-derived ones.

Conventions the kernels share: a probability that is exactly 0 contributes 0 to every sum
(0 * log 0 = 0), so ``-inf`` logits (masked vocabulary) give finite results; a student ``-inf``
where the teacher has mass gives an infinite forward KL, as the math says. A student ``-inf``
logit gets no gradient: it is a masked entry, and no step can move it (autograd would give the
forward KL's limit -p there, every other divergence's gradient is 0 in the limit anyway).
"""

from __future__ import annotations

import math

import torch

from fastkd._options import KDOptions

# Rows per chunk are chosen so one fp32 temporary holds about this many elements.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for every input dtype but fp64, which stays fp64 (ground truth)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def transform_logits(z: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Cohere-style ``logit_scale`` then Gemma-style ``softcap * tanh(z / softcap)``.

    ``-inf`` stays ``-inf`` so that a masked vocabulary entry stays masked under a softcap.
    """
    x = z * scale if scale != 1.0 else z
    if softcap:
        x = torch.where(x == -math.inf, x, softcap * torch.tanh(x / softcap))
    return x


def _plog_ratio(lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """sum_j x_j (log x_j - log y_j) over the last dim, with 0 where x_j == 0.

    The masking happens before the arithmetic so that no inf reaches autograd through the
    branch ``torch.where`` discards (it would turn into a NaN gradient).
    """
    live = lx > -math.inf
    lx = torch.where(live, lx, 0.0)
    ly = torch.where(live, ly, 0.0)
    return torch.where(live, lx.exp() * (lx - ly), 0.0).sum(-1)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, wa: float) -> torch.Tensor:
    """log(wa * a + (1 - wa) * b) from log a and log b, for 0 < wa < 1."""
    dead = (la == -math.inf) & (lb == -math.inf)
    la = torch.where(dead, 0.0, la)
    lb = torch.where(dead, 0.0, lb)
    out = torch.logaddexp(la + math.log(wa), lb + math.log1p(-wa))
    return torch.where(dead, -math.inf, out)


def divergence(lp: torch.Tensor, lq: torch.Tensor, kind: str, mix: float) -> torch.Tensor:
    """D(p, q) per row from teacher log-probs ``lp`` and student log-probs ``lq``."""
    if kind == "kl":
        return _plog_ratio(lp, lq)
    if kind == "reverse_kl":
        return _plog_ratio(lq, lp)
    if kind == "jsd":
        lm = _log_mix(lp, lq, mix)
        return mix * _plog_ratio(lp, lm) + (1.0 - mix) * _plog_ratio(lq, lm)
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if kind == "skew_kl":
        return _plog_ratio(lp, _log_mix(lp, lq, mix))
    if kind == "skew_reverse_kl":
        return _plog_ratio(lq, _log_mix(lq, lp, mix))
    raise ValueError(f"unknown divergence {kind!r}")


def kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    opts: KDOptions,
) -> torch.Tensor:
    """Weighted loss of each row of [n, Vs] student and [n, Vt] teacher logits.

    Differentiable with respect to ``student``. Returns [n] in the compute dtype, 0 for rows
    whose label is ``ignore_index`` or whose token weight is 0.
    """
    ct = compute_dtype(student.dtype)
    n, vs = student.shape
    kv = opts.kd_vocab(vs, teacher.shape[1])

    weight = torch.ones(n, dtype=ct, device=student.device)
    if token_weights is not None:
        weight = weight * token_weights.to(ct)
    if labels is not None:
        weight = torch.where(labels == opts.ignore_index, 0.0, weight)
    live = weight != 0
    # Rows that do not count are zeroed first: whatever they hold must not reach the sums.
    xs = transform_logits(
        torch.where(live[:, None], student.to(ct), 0.0), opts.student_scale, opts.student_softcap
    )
    xt = transform_logits(
        torch.where(live[:, None], teacher.to(ct), 0.0), opts.teacher_scale, opts.teacher_softcap
    )

    total = torch.zeros(n, dtype=ct, device=student.device)
    if opts.kd_weight:
        xt = xt[:, :kv]
        if xt.shape[1] < kv:  # vocab="pad": the teacher has no mass on the extra columns
            xt = torch.nn.functional.pad(xt, (0, kv - xt.shape[1]), value=-math.inf)
        t = opts.temperature
        lq = torch.log_softmax(xs[:, :kv] / t, dim=-1)
        lp = torch.log_softmax(xt / t, dim=-1)
        total = total + opts.kd_weight * t * t * divergence(lp, lq, opts.divergence, opts.mix)
    if opts.ce_weight:
        target = torch.where(live, labels, 0).long()
        ce = torch.logsumexp(xs, dim=-1) - xs.gather(1, target[:, None]).squeeze(1)
        total = total + opts.ce_weight * ce
    return torch.where(live, weight * total, 0.0)


def chunk_rows(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


class ReferenceKDFunction(torch.autograd.Function):
    """Row-chunked reference: forward keeps only per-row losses, backward recomputes each
    chunk under autograd, so at most one chunk of fp32 temporaries is alive at a time."""

    @staticmethod
    def forward(ctx, student, teacher, labels, token_weights, opts: KDOptions):
        ctx.save_for_backward(student, teacher, labels, token_weights)
        ctx.opts = opts
        rows = chunk_rows(student.shape[1])
        out = [
            kd_loss_rows(
                student[i : i + rows],
                teacher[i : i + rows],
                None if labels is None else labels[i : i + rows],
                None if token_weights is None else token_weights[i : i + rows],
                opts,
            )
            for i in range(0, student.shape[0], rows)
        ]
        return torch.cat(out) if out else student.new_zeros(0, dtype=compute_dtype(student.dtype))

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, labels, token_weights = ctx.saved_tensors
        grad = torch.empty_like(student)
        rows = chunk_rows(student.shape[1])
        for i in range(0, student.shape[0], rows):
            with torch.enable_grad():
                s = student[i : i + rows].detach().requires_grad_(True)
                loss = kd_loss_rows(
                    s,
                    teacher[i : i + rows],
                    None if labels is None else labels[i : i + rows],
                    None if token_weights is None else token_weights[i : i + rows],
                    ctx.opts,
                )
                (g,) = torch.autograd.grad(
                    loss, s, grad_rows[i : i + rows].to(loss.dtype), materialize_grads=True
                )
            grad[i : i + rows] = g.masked_fill(s == -math.inf, 0.0)
        return grad, None, None, None, None
