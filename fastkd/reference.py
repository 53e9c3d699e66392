"""Plain-PyTorch reference of the fastkd loss (docs/design.md §1).

Used three ways: as ground truth in every test and benchmark (``kd_loss_rows`` with fp64
inputs), as the ``reference`` backend (always available; ``kd_loss_fwd`` / ``kd_loss_bwd``
implement the op contract of docs/design.md §2), and as the documentation of the math the
kernels must reproduce. Gradients come from autograd, so they check the kernels' hand-derived
ones.

Conventions the kernels share (docs/design.md §3): a probability whose log is at or below
``LOG_MIN`` (where e^x rounds to 0 in fp64) is exactly 0 and contributes 0 to every sum
(0 * log 0 = 0), so ``-inf`` logits (masked vocabulary) give finite results; a positive
probability against a partner of probability 0 (log ``-inf``: a student ``-inf`` where the
teacher has mass, in forward KL) makes the divergence +inf, as the math says. A row whose
divergence is +inf gets no KD gradient (an infinite loss has no finite descent direction); its
CE gradient stays. A student ``-inf`` logit gets no gradient: it is a masked entry, and no step
can move it (autograd would give the forward KL's limit -p there, every other divergence's
gradient is 0 in the limit anyway). Softmaxes are taken as x - max(x) first, so neither x / T
nor a log-sum-exp of logits near the fp32 maximum overflows or swallows the log of the sum.
"""

from __future__ import annotations

import math

import torch

from fastkd._options import DIVERGENCES, TAILS, KernelArgs, SparseKernelArgs

# Rows per chunk are chosen so one fp32 temporary holds about this many elements.
CHUNK_ELEMENTS = 1 << 22

# ln 2^-1075: e^x rounds to 0 in fp64 at and below it, so a log-probability there is a
# probability of exactly 0, in every dtype (csrc/kd_math.h kLogMin).
LOG_MIN = -1075 * math.log(2.0)

# The least probability a tail bin of the sparse loss takes (docs/design.md §11): fp32 cannot
# resolve 1 - sum(q_K) much below k * 2^-24, and a teacher tail rounded to 0 would make reverse
# KL +inf (csrc/kd_math.h kTailFloor, kernels/sparse_kd_loss.py TAIL_FLOOR).
TAIL_FLOOR = 2.0**-14


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


def _log_softmax(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(x / t) over the last dim, and t * logsumexp(x / t) (the stats' log-sum-exp
    in logit units, docs/design.md §2), both from x - max(x): x / t would overflow where t < 1
    and |x| is near the fp32 maximum, and x - logsumexp(x) loses the log of the sum there."""
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, 0.0, m)  # an all -inf row: no NaN from -inf - -inf
    y = (x - m) / t
    ls = torch.logsumexp(y, -1, keepdim=True)
    return y - ls, (m + t * ls).squeeze(-1)


def mixture_logits(
    teacher_logits, weights, temperature: float, scale: float = 1.0, softcap: float = 0.0
) -> torch.Tensor:
    """Logits of a probability mixture of teachers (docs/design.md §5): T log p with
    p = sum_k w_k softmax(x_k / T), x_k = teacher k's transformed logits, the weights
    normalized. softmax(these / T) is p again, so they stand in for one teacher's logits (with
    no further transform). Teachers of weight 0 are left out."""
    total = float(sum(weights))
    terms = [
        math.log(w / total) + _log_softmax(transform_logits(z, scale, softcap), temperature)[0]
        for z, w in zip(teacher_logits, weights)
        if w
    ]
    return temperature * torch.logsumexp(torch.stack(terms), 0)


def _plog_ratio(lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """sum_j x_j (log x_j - log y_j) over the last dim: 0 where x_j is 0 (log x_j <= LOG_MIN),
    +inf for the row where some x_j > 0 meets y_j = 0 (log y_j = -inf).

    The masking happens before the arithmetic so that no inf reaches autograd through the
    branch ``torch.where`` discards (it would turn into a NaN gradient); an infinite row is a
    constant, so it gets no gradient.
    """
    live = lx > LOG_MIN
    infinite = live & (ly == -math.inf)
    finite = live & ~infinite
    lx = torch.where(finite, lx, 0.0)
    ly = torch.where(finite, ly, 0.0)
    total = torch.where(finite, lx.exp() * (lx - ly), 0.0).sum(-1)
    return torch.where(infinite.any(-1), math.inf, total)


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


def _counted_rows(student, labels, token_weights, args: KernelArgs | SparseKernelArgs):
    """Each row's weight (0 where its label is ``ignore_index``) in the compute dtype, whether
    it counts, and the transformed student logits with the rows that do not count zeroed
    first: whatever they hold must not reach the sums."""
    ct = compute_dtype(student.dtype)
    weight = torch.ones(student.shape[0], dtype=ct, device=student.device)
    if token_weights is not None:
        weight = weight * token_weights.to(ct)
    if labels is not None:
        weight = torch.where(labels == args.ignore_index, 0.0, weight)
    live = weight != 0
    xs = transform_logits(
        torch.where(live[:, None], student.to(ct), 0.0), args.student_scale, args.student_softcap
    )
    return weight, live, xs


def _ce_term(xs, labels, live, args: KernelArgs | SparseKernelArgs):
    """ce_weight * CE of each row (0 without labels or a CE weight) and lse(x) per row."""
    lc, lse_c = _log_softmax(xs, 1.0)
    if not args.ce_weight or labels is None:
        return torch.zeros_like(lse_c), lse_c
    target = torch.where(live, labels, 0).long()
    return -args.ce_weight * lc.gather(1, target[:, None]).squeeze(1), lse_c


def loss_and_lses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    args: KernelArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted loss [n] of each row of [n, Vs] student and [n, Vt] teacher logits, and the
    log-sum-exps (T lse(x_s / T), T lse(x_t / T), lse(x_s)) [n, 3] of the op contract's stats.

    Differentiable with respect to ``student``. In the compute dtype, 0 for rows whose label is
    ``ignore_index`` or whose token weight is 0. The teacher is not read without a KD term.
    """
    ct = compute_dtype(student.dtype)
    n = student.shape[0]
    weight, live, xs = _counted_rows(student, labels, token_weights, args)
    total = torch.zeros(n, dtype=ct, device=student.device)
    lse_a = lse_b = torch.zeros(n, dtype=ct, device=student.device)
    if args.kd_weight:
        kv = args.kd_vocab
        xt = transform_logits(
            torch.where(live[:, None], teacher[:, :kv].to(ct), 0.0),
            args.teacher_scale,
            args.teacher_softcap,
        )
        if xt.shape[1] < kv:  # vocab="pad": the teacher has no mass on the extra columns
            xt = torch.nn.functional.pad(xt, (0, kv - xt.shape[1]), value=-math.inf)
        t = args.temperature
        lq, lse_a = _log_softmax(xs[:, :kv], t)
        lp, lse_b = _log_softmax(xt, t)
        d = divergence(lp, lq, DIVERGENCES[args.divergence], args.mix)
        # A D that is +inf (or beyond the dtype's range) gives the row no KD gradient.
        d = torch.where(torch.isinf(d), d.detach(), d)
        # T^2 D first: kd_weight T^2 can underflow in fp32 (a subnormal kd_weight), times inf.
        total = total + args.kd_weight * (t * t * d)
    ce, lse_c = _ce_term(xs, labels, live, args)
    total = total + ce
    lses = torch.stack([lse_a, lse_b, lse_c], 1)
    return torch.where(live, weight * total, 0.0), torch.where(live[:, None], lses, 0.0)


def kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    args: KernelArgs,
) -> torch.Tensor:
    """Weighted loss [n] of each row (``loss_and_lses``), differentiable wrt ``student``."""
    return loss_and_lses(student, teacher, labels, token_weights, args)[0]


def _row_chunks(n: int, n_cols: int):
    """Row slices such that one fp32 temporary of a chunk holds about CHUNK_ELEMENTS."""
    rows = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    return (slice(i, i + rows) for i in range(0, n, rows))


def _part(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def kd_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    args: KernelArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op contract's forward (docs/design.md §2), chunked over rows: loss [N] and stats
    [N, 4] in the compute dtype. stats[:, 3] (G) is 0: only a backend's own backward reads G,
    and this one's backward is autograd."""
    return _chunked_fwd(loss_and_lses, 4, student, (teacher,), labels, weights, args)


def kd_loss_bwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
    args: KernelArgs,
    grad: torch.Tensor,
) -> None:
    """The op contract's backward: recompute each chunk of rows and write its gradient into
    ``grad`` (which may be ``student``: a chunk is read before it is written)."""
    _chunked_bwd(kd_loss_rows, student, (teacher,), labels, weights, grad_loss, args, grad)


def _chunked_fwd(loss_and_stats, width: int, student, teacher: tuple, labels, weights, args):
    """loss [N] and stats [N, ``width``] (zero beyond what ``loss_and_stats`` returns) of a
    forward computed a chunk of rows at a time, in the compute dtype."""
    ct = compute_dtype(student.dtype)
    loss = student.new_empty(student.shape[0], dtype=ct)
    stats = student.new_zeros((student.shape[0], width), dtype=ct)
    with torch.no_grad():
        for rows in _row_chunks(student.shape[0], student.shape[1]):
            loss[rows], part = loss_and_stats(
                student[rows],
                *(t[rows] for t in teacher),
                _part(labels, rows),
                _part(weights, rows),
                args,
            )
            stats[rows, : part.shape[1]] = part
    return loss, stats


def _chunked_bwd(loss_rows, student, teacher: tuple, labels, weights, grad_loss, args, grad):
    """Each chunk of rows recomputed through ``torch.func.vjp`` (which torch.compile traces,
    unlike ``torch.autograd.grad``; a term that does not depend on the student, both weights
    0, gives a zero gradient) and its gradient written into ``grad``, which may be
    ``student``. A student -inf logit gets no gradient."""
    for rows in _row_chunks(student.shape[0], student.shape[1]):
        s = student[rows]
        loss, vjp = torch.func.vjp(
            lambda x, rows=rows: loss_rows(
                x, *(t[rows] for t in teacher), _part(labels, rows), _part(weights, rows), args
            ),
            s,
        )
        (g,) = vjp(grad_loss[rows].to(loss.dtype))
        grad[rows] = g.masked_fill(s == -math.inf, 0.0)


# --- the sparse loss: a cached top-k teacher (docs/design.md §11) ------------------------------


def _log_tail(l_k: torch.Tensor) -> torch.Tensor:
    """log max(1 - sum_i e^(l_k[i]), TAIL_FLOOR) per row: the log of the mass outside the k
    bins. The floor is taken straight through: its derivative is that of log(1 - sum e^l)
    divided by the floored value (docs/design.md §11)."""
    raw = -torch.expm1(torch.logsumexp(l_k, -1))
    floored = raw + (raw.clamp_min(TAIL_FLOOR) - raw).detach()
    return floored.log()


def _renormalized(l_k: torch.Tensor) -> torch.Tensor:
    """l_k - log sum e^l_k per row; -inf everywhere for a row of -inf (no mass)."""
    dead = (l_k == -math.inf).all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, 0.0, l_k), -1, keepdim=True)
    return torch.where(dead, -math.inf, l_k - torch.where(dead, 0.0, lse))


def sparse_bins(
    lp_k: torch.Tensor, lq_k: torch.Tensor, tail: str, has_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's and the student's log-probabilities over the bins of a tail mode, from
    the cached teacher log-probs ``lp_k`` and the student's full-vocabulary log-probs ``lq_k``
    at the cached ids ([n, k] each). ``has_tail``: k < V (with k = V the tail is empty)."""
    if tail == "bucket":
        if not has_tail:
            return lp_k, lq_k
        lp = torch.cat([lp_k, _log_tail(lp_k)[:, None]], 1)
        return lp, torch.cat([lq_k, _log_tail(lq_k)[:, None]], 1)
    if tail == "renormalize":
        return _renormalized(lp_k), _renormalized(lq_k)
    if tail == "ignore":
        return _renormalized(lp_k), lq_k
    raise ValueError(f"unknown tail mode {tail!r}")


def sparse_loss_and_stats(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    args: SparseKernelArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted loss [n] of each row of [n, V] student logits against a cached teacher (ids and
    log-probabilities [n, k]), and the stats (T lse(x / T), lse(x), D) [n, 3] of the sparse op
    contract (docs/design.md §11). Differentiable with respect to ``student``; in the compute
    dtype; 0 for rows that do not count, whose inputs are not read."""
    ct = compute_dtype(student.dtype)
    n, vocab = student.shape
    weight, live, xs = _counted_rows(student, labels, token_weights, args)
    total = torch.zeros(n, dtype=ct, device=student.device)
    lse_a = d = torch.zeros(n, dtype=ct, device=student.device)
    if args.kd_weight:
        t = args.temperature
        lq, lse_a = _log_softmax(xs, t)
        lq_k = lq.gather(1, torch.where(live[:, None], ids, 0).long())
        lp_k = torch.where(live[:, None], logprobs.to(ct), 0.0)
        lp, lq = sparse_bins(lp_k, lq_k, TAILS[args.tail], ids.shape[1] < vocab)
        d = divergence(lp, lq, DIVERGENCES[args.divergence], args.mix)
        d = torch.where(torch.isinf(d), d.detach(), d)  # +inf: no KD gradient, as dense
        total = total + args.kd_weight * (t * t * d)
    ce, lse_c = _ce_term(xs, labels, live, args)
    total = total + ce
    stats = torch.stack([lse_a, lse_c, d.detach()], 1)
    return torch.where(live, weight * total, 0.0), torch.where(live[:, None], stats, 0.0)


def sparse_loss_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    args: SparseKernelArgs,
) -> torch.Tensor:
    """Weighted loss [n] of each row (``sparse_loss_and_stats``), differentiable wrt
    ``student``: the ground truth of the sparse kernels (fp64 inputs)."""
    return sparse_loss_and_stats(student, ids, logprobs, labels, token_weights, args)[0]


def sparse_kd_loss_fwd(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    args: SparseKernelArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse op contract's forward (docs/design.md §11), chunked over rows: loss [N] and
    stats [N, 3] in the compute dtype."""
    teacher = (ids, logprobs)
    return _chunked_fwd(sparse_loss_and_stats, 3, student, teacher, labels, weights, args)


def sparse_kd_loss_bwd(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
    args: SparseKernelArgs,
    grad: torch.Tensor,
) -> None:
    """The sparse op contract's backward, as ``kd_loss_bwd``; ``grad`` may be ``student``."""
    teacher = (ids, logprobs)
    _chunked_bwd(sparse_loss_rows, student, teacher, labels, weights, grad_loss, args, grad)
