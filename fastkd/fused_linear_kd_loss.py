"""Fused linear KD loss: hidden states and lm_head weights in, the [N, V] logits of neither model
ever materialized (docs/design.md §5).

Tokens are processed in chunks of ``c`` rows. Per chunk: the student's and the teacher's
logits (fp32, whatever the input dtype, so the softmax is not fed rounded logits), the fused
row kernel of ``kd_loss`` writing the gradient over the student chunk in place, then
``grad_h[c] = g @ W_s`` and ``grad_W_s += g^T @ h_s[c]``. The chunk size comes from a memory
budget, so the extra memory does not grow with N. With CE only (``kd_weight`` 0) no backend
reads the teacher: none is needed, and its logits are neither computed nor budgeted for.

For the scalar reductions the gradients are finished in the forward (the scale of each row is
known: 1/sum(w) for ``mean``), and backward only multiplies them by grad_output. For
``reduction="none"`` the per-row scale is only known in backward, which then recomputes the
chunks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

import torch

from fastkd import _inputs
from fastkd._options import KernelArgs, LossOptions, SparseKernelArgs, takes_loss_options
from fastkd.backends import RowKernel, get_backend, select_backend
from fastkd.kd_loss import LossModule, check_first_order, graph_kept
from fastkd.reference import compute_dtype, transform_logits

# A teacher tensor, or with ``teacher_mixture`` one per teacher.
Teachers = torch.Tensor | Sequence[torch.Tensor | None] | None
MiB = 1 << 20
DEFAULT_MEMORY_BUDGET = {"cpu": 512 * MiB, "cuda": 2048 * MiB}
# Rows of a default chunk at most, per device: the CPU's fp32 GEMMs of a chunk run ~35% slower
# per row at 256 rows than at 512, and hardly faster beyond (docs/design.md §5).
GEMM_ROWS = {"cpu": 512}


@dataclass(frozen=True)
class _Mixture:
    """A probability mixture of teachers, p = sum_k w_k softmax(x_k / T) (docs/design.md §5),
    with x_k teacher k's logits after the logit transform, applied per teacher here."""

    log_weights: tuple[float, ...]  # log of the normalized weights; -inf: teacher left out
    scale: float
    softcap: float


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor."""

    kernel: RowKernel  # the backend's row ops (dense or sparse) with the call's arguments
    reduction: str
    chunk: int
    low_precision_gemm: bool  # bf16/fp16 GEMMs with fp32 output (CUDA) instead of upcasts
    parts: bool  # also report the CE contribution (for logging)
    mixture: _Mixture | None = None  # teacher tensors are then (h, w, b, z) per teacher


class KDLossParts(NamedTuple):
    """A loss and its two contributions, ``loss = kd + ce`` (``kd`` and ``ce`` are detached
    and already weighted: ``kd`` by ``1 - alpha`` and T^2, ``ce`` by ``alpha``)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


class _Gemms:
    """The GEMMs of one call, with fp32 results (fp64 for fp64 inputs) whatever the input
    dtype: on CUDA, bf16/fp16 tensor-core GEMMs that accumulate and output in fp32; elsewhere
    fp32 math on operands upcast once per call (the weights) or per chunk (the hidden rows)."""

    def __init__(self, plan: _Plan, dtype: torch.dtype) -> None:
        self.low = plan.low_precision_gemm
        self.ct = compute_dtype(dtype)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.low else x.to(self.ct)

    def into(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = a @ b (``out`` in the compute dtype)."""
        if self.low:
            return torch.mm(a, b, out_dtype=self.ct, out=out)
        return torch.mm(a, b, out=out)

    def accumulate(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """acc += a @ b, ``acc`` in the compute dtype."""
        if self.low:
            torch.addmm(acc, a, b, out_dtype=self.ct, out=acc)
        else:
            acc.addmm_(a, b)


def _chunk_rows(zs, teacher: tuple, labels, weights, plan: _Plan, grad_scale):
    """Loss of each row of a chunk against its teacher rows (``plan.kernel``'s tensors), and
    its CE contribution when ``plan.parts`` (else None). With ``grad_scale`` [c], also overwrite
    ``zs`` with the gradient of sum(grad_scale * loss) with respect to it, in the loss's kernel
    call (``fwd_bwd``)."""
    x_y = _label_logits(zs, labels, plan) if plan.parts else None  # before zs is overwritten
    kernel = plan.kernel
    if grad_scale is None:
        loss, stats = kernel.fwd(zs, teacher, labels, weights)
    else:
        loss, stats = kernel.fwd_bwd(zs, teacher, labels, weights, grad_scale.contiguous(), zs)
    ce = None if x_y is None else _ce_rows(x_y, labels, weights, plan, stats[:, kernel.lse_column])
    return loss, ce


def _label_logits(zs, labels, plan: _Plan):
    """The transformed logit of each row's label (of column 0 where ignored); None without a
    CE term."""
    args = plan.kernel.args
    if labels is None or not args.ce_weight:
        return None
    target = torch.where(labels != args.ignore_index, labels, 0)
    x_y = zs.gather(1, target[:, None]).squeeze(1)
    return transform_logits(x_y, args.student_scale, args.student_softcap)


def _ce_rows(x_y, labels, weights, plan: _Plan, lse):
    """Weighted CE contribution of each row, from its label's logit and the log-sum-exp of its
    logits at T = 1."""
    args = plan.kernel.args
    live = labels != args.ignore_index
    w = live.to(lse.dtype) if weights is None else live * weights.to(lse.dtype)
    return torch.where(w != 0, args.ce_weight * w * (lse - x_y), 0.0)


def _teacher_chunks(plan: _Plan, gemm: _Gemms, teacher: tuple, rows_max: int, like):
    """A function of a chunk's rows giving its teacher tensors for ``plan.kernel``: the cached
    ids and log-probabilities (sparse), or the teacher's fp32 logits (given, or from its hidden
    states and head), written into one buffer allocated here (a mixture: ``_mixture_chunks``).
    With CE only no kernel reads the teacher (docs/design.md §2): a teacher with no columns,
    no buffer."""
    if plan.kernel.sparse:
        ids, logprobs = teacher
        return lambda rows: (ids[rows], logprobs[rows])
    if not plan.kernel.args.kd_weight:
        empty = like.new_empty((rows_max, 0), dtype=gemm.ct)
        return lambda rows: (empty[: rows.stop - rows.start],)
    buf = like.new_empty((rows_max, _teacher_vocab(teacher[:4])), dtype=gemm.ct)
    if plan.mixture is not None:
        return _mixture_chunks(plan, gemm, teacher, buf)
    logits = _logit_chunks(gemm, teacher, buf)
    return lambda rows: (logits(rows),)


def _teacher_vocab(teacher: tuple) -> int:
    _, w_t, _, z_t = teacher
    return z_t.shape[1] if z_t is not None else w_t.shape[0]


def _logit_chunks(gemm: _Gemms, teacher: tuple, buf: torch.Tensor):
    """A function of a chunk's rows giving the teacher's fp32 logits there, in ``buf``."""
    h_t, w_t, b_t, z_t = teacher
    wt = None if w_t is None else gemm.operand(w_t)

    def chunk(rows: slice) -> torch.Tensor:
        out = buf[: rows.stop - rows.start]
        if z_t is not None:
            return out.copy_(z_t[rows])
        zt = gemm.into(gemm.operand(h_t[rows]), wt.t(), out)
        return zt if b_t is None else zt.add_(b_t)

    return chunk


def _mixture_chunks(plan: _Plan, gemm: _Gemms, teacher: tuple, buf: torch.Tensor):
    """A function of a chunk's rows giving T log p of the teachers' mixture p there (in
    ``buf``): logits the kernel turns back into p at temperature T, since p is normalized. Each
    teacher's logits go through one scratch buffer and are folded in as log w_k + log
    softmax(x_k / T), a running log-sum-exp, so the chunk holds two [c, V] buffers whatever
    the number of teachers (docs/design.md §5)."""
    mixture, t = plan.mixture, plan.kernel.args.temperature
    scratch = torch.empty_like(buf)
    teachers = [
        (lw, _logit_chunks(gemm, teacher[4 * k : 4 * k + 4], scratch))
        for k, lw in enumerate(mixture.log_weights)
        if lw > -math.inf
    ]

    def chunk(rows: slice) -> tuple:
        out = buf[: rows.stop - rows.start]
        for i, (lw, logits) in enumerate(teachers):
            lp = _log_softmax_(_transform_(logits(rows), mixture.scale, mixture.softcap), t)
            lp.add_(lw)
            if i == 0:
                out.copy_(lp)
            else:
                torch.logaddexp(out, lp, out=out)
        return (out.mul_(t),)

    return chunk


def _transform_(x: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """``reference.transform_logits`` in place (-inf stays -inf under the softcap)."""
    if scale != 1.0:
        x.mul_(scale)
    if softcap:
        masked = x == -math.inf
        x.div_(softcap).tanh_().mul_(softcap).masked_fill_(masked, -math.inf)
    return x


def _log_softmax_(x: torch.Tensor, t: float) -> torch.Tensor:
    """log softmax(x / t) of each row, in place."""
    m = x.amax(1, keepdim=True)
    m.masked_fill_(m == -math.inf, 0.0)  # an all -inf row stays -inf, no NaN
    x.sub_(m).div_(t)
    lse = torch.logsumexp(x, 1, keepdim=True)
    return x.sub_(lse.masked_fill_(lse == -math.inf, 0.0))


def _chunk_loop(plan: _Plan, tensors: tuple, grad_scale, needs: tuple):
    """Run every chunk. ``tensors`` are the student's (hidden, weight, bias), the labels, the
    kernels' weights and the teacher's tensors. Returns per-row losses, their CE contributions
    and, when ``grad_scale`` [N] is given, the gradients of sum(grad_scale * loss) for the
    student tensors flagged in ``needs`` (hidden, weight, bias), in their dtypes. The chunk's
    logits live in buffers allocated once: the extra memory is one chunk, whatever N."""
    h_s, w_s, b_s, labels, weights, *teacher = tensors
    n = h_s.shape[0]
    gemm = _Gemms(plan, h_s.dtype)
    ct = gemm.ct
    ws = gemm.operand(w_s)
    rows_max = min(plan.chunk, n)
    zs_buf = h_s.new_empty((rows_max, w_s.shape[0]), dtype=ct)
    teacher_rows = _teacher_chunks(plan, gemm, tuple(teacher), rows_max, h_s)
    loss = h_s.new_empty(n, dtype=ct)
    ce = h_s.new_zeros(n, dtype=ct)
    want = grad_scale is not None
    grad_h = torch.empty_like(h_s) if want and needs[0] else None
    # Weight and bias gradients sum over chunks: accumulate in fp32, cast once at the end.
    grad_w = torch.zeros(w_s.shape, dtype=ct, device=w_s.device) if want and needs[1] else None
    grad_b = None
    if want and needs[2] and b_s is not None:
        grad_b = torch.zeros(b_s.shape, dtype=ct, device=b_s.device)
    for start in range(0, n, plan.chunk):
        rows = slice(start, min(start + plan.chunk, n))
        hs = gemm.operand(h_s[rows])
        zs = gemm.into(hs, ws.t(), zs_buf[: rows.stop - start])
        if b_s is not None:
            zs.add_(b_s)
        loss[rows], ce_rows = _chunk_rows(
            zs,
            teacher_rows(rows),
            None if labels is None else labels[rows],
            None if weights is None else weights[rows],
            plan,
            None if grad_scale is None else grad_scale[rows],
        )
        if ce_rows is not None:
            ce[rows] = ce_rows
        if not want:
            continue
        g = zs  # now the gradient of the chunk's logits, in the compute dtype
        g_gemm = g.to(h_s.dtype) if gemm.low else g
        if grad_h is not None:
            grad_h[rows] = torch.mm(g_gemm, ws)
        if grad_w is not None:
            gemm.accumulate(grad_w, g_gemm.t(), hs)
        if grad_b is not None:
            grad_b += g.sum(0)
    if grad_w is not None:
        grad_w = grad_w.to(w_s.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(b_s.dtype)
    return loss, ce, (grad_h, grad_w, grad_b)


class FusedLinearKDFunction(torch.autograd.Function):
    """Autograd of the chunked fused linear loss (every backend; the row kernel is the
    backend's, dense or sparse: ``plan.kernel``, whose teacher tensors are ``teacher``). Returns
    the loss reduced as ``plan.reduction`` says (per-row for ``none``) and, not differentiable,
    its CE contribution reduced the same way.

    The kernels get the 0/1 mask of the weighted tokens (``row_mask``) and return the rows'
    unweighted losses u; the token weights w multiply them here, and each row's gradient
    scale is the reduction's scale times w. So the gradient with respect to w is known too:
    ``sum``: u, ``batchmean``: u / N, ``mean``: (u - L [counted]) / sum(w [counted]), with L
    the loss; ``none``: u (times grad_output in each case)."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, labels, weights, plan: _Plan, *teacher):
        tensors = (h_s, w_s, b_s, labels, _inputs.row_mask(weights), *teacher)
        ctx.plan = plan
        needs = ctx.needs_input_grad[:3]
        # The logits must be fp32 GEMM outputs, also inside an autocast region.
        with torch.autocast(h_s.device.type, enabled=False):
            if plan.reduction == "none":
                rows, ce, _ = _chunk_loop(plan, tensors, None, needs)
                ctx.save_for_backward(h_s, w_s, b_s, labels, weights, *teacher)
                loss, ce = _inputs.weigh_rows(rows, weights), _inputs.weigh_rows(ce, weights)
            else:
                loss, ce = FusedLinearKDFunction._forward_scalar(ctx, tensors, weights)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def _forward_scalar(ctx, tensors, weights):
        """Forward of a scalar reduction: the loss, its CE part and, saved for backward, the
        gradients for a grad_output of 1."""
        plan, needs = ctx.plan, ctx.needs_input_grad[:3]
        h_s, labels = tensors[0], tensors[3]
        ignore_index = plan.kernel.args.ignore_index
        scale = _inputs.row_scale(
            plan.reduction,
            h_s.shape[0],
            labels,
            weights,
            ignore_index,
            compute_dtype(h_s.dtype),
            h_s.device,
        )
        row_grad = scale.expand(h_s.shape[0]) if weights is None else scale * weights
        rows, ce, grads = _chunk_loop(plan, tensors, row_grad if any(needs) else None, needs)
        loss = _inputs.weigh_rows(rows, weights).sum() * scale
        grad_weights = None
        if ctx.needs_input_grad[4]:
            grad_weights = scale * rows
            if plan.reduction == "mean":  # the denominator sum(w [counted]) depends on w
                counted = 1.0 if labels is None else labels != ignore_index
                grad_weights = grad_weights - scale * loss * counted
        ctx.save_for_backward(*grads, grad_weights)
        return loss, _inputs.weigh_rows(ce, weights).sum() * scale

    @staticmethod
    def backward(ctx, grad_out, _grad_ce):
        check_first_order("fused_linear_kd_loss")
        needs = ctx.needs_input_grad[:3]
        if ctx.plan.reduction == "none":  # the rows' scales are known now: recompute
            h_s, w_s, b_s, labels, weights, *teacher = ctx.saved_tensors
            tensors = (h_s, w_s, b_s, labels, _inputs.row_mask(weights), *teacher)
            row_grad = _inputs.weigh_rows(grad_out, weights)
            with torch.autocast(grad_out.device.type, enabled=False):
                rows, _, grads = _chunk_loop(ctx.plan, tensors, row_grad, needs)
            grad_weights = grad_out * rows if ctx.needs_input_grad[4] else None
        else:  # finished in forward for a grad_out of 1
            *grads, grad_weights = ctx.saved_tensors
            # In place, no second weight-sized buffer, unless the graph is kept for another
            # backward (its saved gradients must stay as they are: docs/design.md §5).
            kept = graph_kept()
            grads = [
                None if g is None else g * grad_out if kept else g.mul_(grad_out) for g in grads
            ]
            if grad_weights is not None:
                grad_weights = grad_weights * grad_out
        teacher = (None for _ in ctx.needs_input_grad[6:])
        return (*grads, None, grad_weights, None, *teacher)


@overload
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_hidden: Teachers = None,
    teacher_weight: Teachers = None,
    teacher_logits: Teachers = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: Teachers = None,
    teacher_mixture: Sequence[float] | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    shift_labels: bool = False,
    backend: str | None = None,
    return_parts: Literal[False] = False,
    **options: Any,
) -> torch.Tensor: ...


@overload
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_hidden: Teachers = None,
    teacher_weight: Teachers = None,
    teacher_logits: Teachers = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: Teachers = None,
    teacher_mixture: Sequence[float] | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    shift_labels: bool = False,
    backend: str | None = None,
    return_parts: Literal[True],
    **options: Any,
) -> KDLossParts: ...


@takes_loss_options()
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    teacher_hidden: Teachers = None,
    teacher_weight: Teachers = None,
    teacher_logits: Teachers = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: Teachers = None,
    teacher_mixture: Sequence[float] | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    shift_labels: bool = False,
    backend: str | None = None,
    return_parts: bool = False,
    **options: Any,
) -> torch.Tensor | KDLossParts:
    """KD loss of ``kd_loss`` computed from hidden states and lm_head weights, chunk by chunk,
    so that neither model's [N, V] logits exist.

    ``loss = alpha * CE + (1 - alpha) * T^2 * D(p_teacher || q_student)`` per token, exactly as
    :func:`fastkd.kd_loss` on ``student_hidden @ student_weight.T (+ bias)`` and the teacher's
    logits; the options are those of ``kd_loss`` (``alpha`` is the CE weight).

    Args:
        student_hidden: [N, Hs] or [B, S, Hs] final hidden states of the student.
        student_weight: [V, Hs] student lm_head (may be tied to the input embedding).
        labels: [N] or [B, S] target ids (``ignore_index`` where not counted).
        teacher_hidden, teacher_weight, teacher_bias: the teacher as hidden states [.., Ht]
            and head [Vt, Ht] (+ [Vt]); any width and float dtype.
        teacher_logits: or the teacher as logits [N, Vt] / [B, S, Vt] (then no teacher head).
            With CE only (``alpha=1`` or ``kd_weight=0``) no teacher is needed.
        teacher_mixture: weights w_k of several teachers (non-negative, positive sum; they are
            normalized): the teacher distribution is then the probability mixture
            ``p = sum_k w_k softmax(x_k / T)``, formed chunk by chunk, and ``teacher_hidden``,
            ``teacher_weight``, ``teacher_bias`` (entries may be None) or ``teacher_logits``
            are lists with one tensor per teacher, all of one vocabulary. The teacher logit
            transform (``teacher_logit_scale``, ``teacher_softcap``) applies to each teacher.
        student_bias: optional [V] student lm_head bias.
        token_weights: optional [N] or [B, S] per-token multipliers, finite and 0 or a normal
            float, as in :func:`fastkd.kd_loss`; they may require grad.
        chunk_size: token rows per chunk; default from ``memory_budget``.
        memory_budget: bytes for one chunk's logits (student, and teacher with a KD term,
            fp32); default on CPU: 512 rows (the fewest at which its GEMMs run at full speed),
            at most 512 MiB; on CUDA 2 GiB.
        shift_labels: labels are at the input positions (transformers convention); the loss
            at position t uses labels[t + 1], the last position of each sequence is ignored.
        backend: ``triton``, ``cuda``, ``cpu`` or ``reference``; default ``FASTKD_BACKEND``,
            else by device (see ``fastkd.backends()``).
        return_parts: return ``KDLossParts(loss, kd, ce)`` (detached parts, for logging).
        <loss options>

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``; the teacher
    gets none and no teacher activation is kept. Logits are fp32 (bf16/fp16 GEMMs accumulate
    and output in fp32 on CUDA), so low-precision inputs lose no accuracy in the softmax.

    Returns:
        The reduced loss (per token for ``none``), or ``KDLossParts`` with ``return_parts``,
        in float32 whatever the inputs' dtype (float64 for float64 inputs), so that a sum
        over many tokens cannot overflow a low-precision dtype. No tokens (N = 0) give 0
        (``none``: an empty tensor) and empty or zero gradients. Differentiable once
        (double backward raises).
    """
    opts = LossOptions(**options)
    h_s = _inputs.check_tensor("student_hidden", student_hidden)
    w_s = _inputs.check_tensor("student_weight", student_weight)
    _inputs.check_float("student_hidden", h_s)
    _inputs.check_rows("student_hidden", h_s, "H")
    _check_head("student", h_s, w_s, student_bias)
    batch_shape = h_s.shape[:-1]
    vs = w_s.shape[0]

    if teacher_mixture is None:
        teacher, vt = _check_teacher(
            h_s, teacher_hidden, teacher_weight, teacher_bias, teacher_logits
        )
        mixture = None
    else:
        teacher, vt, mixture = _check_mixture(
            h_s, teacher_mixture, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, opts
        )
        # The transform is applied per teacher before mixing; the kernel sees the mixture.
        opts = dataclasses.replace(opts, teacher_logit_scale=1.0, teacher_softcap=None)
    args = opts.kernel_args(vs, vs if vt is None else vt)
    if vt is None and args.kd_weight:
        raise ValueError(
            "the teacher is missing: pass teacher_hidden and teacher_weight, or teacher_logits "
            "(only CE alone, alpha=1 or kd_weight=0, needs no teacher)"
        )

    if shift_labels and labels is not None:
        labels = _shift(labels, batch_shape, args.ignore_index)
    labels = _inputs.check_labels(
        labels, batch_shape, h_s.device, vs, args.ignore_index, args.ce_weight
    )
    weights = _inputs.check_token_weights(
        token_weights, batch_shape, h_s.device, compute_dtype(h_s.dtype)
    )
    chosen = get_backend(select_backend(backend, h_s.device, h_s.dtype))
    low_precision = h_s.device.type == "cuda" and h_s.dtype in (torch.bfloat16, torch.float16)
    plan = _Plan(
        kernel=RowKernel(chosen, args),
        reduction=opts.reduction,
        chunk=_chunk(
            chunk_size,
            memory_budget,
            h_s,
            _row_bytes(args, vs, vt, low_precision, teacher_buffers=1 if mixture is None else 3),
        ),
        low_precision_gemm=low_precision,
        parts=return_parts,
        mixture=mixture,
    )
    return run_fused(
        plan, _inputs.rows_2d(h_s), w_s, student_bias, labels, weights, teacher, batch_shape
    )


def _check_teacher(h_s, hidden, weight, bias, logits) -> tuple[tuple, int | None]:
    """One teacher's tensors, checked and flattened to (hidden, weight, bias, logits) rows, and
    its vocabulary (None: no teacher)."""
    flat = _inputs.rows_2d
    if logits is not None:
        if hidden is not None or weight is not None or bias is not None:
            raise ValueError(
                "give the teacher either as teacher_logits or as teacher_hidden + "
                "teacher_weight (+ teacher_bias), not both"
            )
        _check_teacher_rows("teacher_logits", logits, "Vt", h_s)
        return (None, None, None, flat(logits)), logits.shape[-1]
    if hidden is None and weight is None and bias is None:
        return (None, None, None, None), None
    if hidden is None or weight is None:
        raise ValueError("the teacher is missing: pass teacher_hidden and teacher_weight")
    _check_teacher_rows("teacher_hidden", hidden, "Ht", h_s)
    _check_head("teacher", hidden, weight, bias)
    return (flat(hidden), weight, bias, None), weight.shape[0]


def mixture_log_weights(mixture) -> tuple[float, ...]:
    """log of the normalized ``teacher_mixture`` weights (-inf for a weight of 0); a TypeError
    or ValueError unless they are finite non-negative numbers with a positive sum."""
    if isinstance(mixture, (str, bytes, torch.Tensor)) or not isinstance(mixture, Sequence):
        raise TypeError(
            f"teacher_mixture must be a list of weights, one per teacher, got {mixture!r}"
        )
    weights = list(mixture)
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
    if not weights or not numbers or not all(0 <= w < math.inf for w in weights):
        raise ValueError(f"teacher_mixture must be finite non-negative numbers, got {weights!r}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"teacher_mixture must have a positive sum, got {weights!r}")
    return tuple(math.log(w / total) if w else -math.inf for w in weights)


def _check_mixture(h_s, mixture, hidden, weight, bias, logits, opts: LossOptions):
    """The teachers of ``teacher_mixture`` checked one by one and flattened into one tuple,
    (hidden, weight, bias, logits) per teacher; their vocabulary; the ``_Mixture``."""
    log_weights = mixture_log_weights(mixture)
    k = len(log_weights)
    given = {
        "teacher_hidden": hidden,
        "teacher_weight": weight,
        "teacher_bias": bias,
        "teacher_logits": logits,
    }
    columns = []
    for name, value in given.items():
        if value is None:
            columns.append([None] * k)
        elif isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"with teacher_mixture, {name} must be a list of {k} tensors")
        elif len(value) != k:
            raise ValueError(f"teacher_mixture has {k} weights but {name} has {len(value)}")
        else:
            columns.append(list(value))
    teacher, vocabs = [], set()
    for i, one in enumerate(zip(*columns)):
        try:
            tensors, vt = _check_teacher(h_s, *one)
        except (TypeError, ValueError) as e:
            raise type(e)(f"teacher {i} of teacher_mixture: {e}") from None
        if vt is None:
            raise ValueError(f"teacher {i} of teacher_mixture: no tensors given")
        teacher.extend(tensors)
        vocabs.add(vt)
    if len(vocabs) > 1:
        raise ValueError(
            f"the teachers of teacher_mixture must share one vocabulary, got {sorted(vocabs)}"
        )
    softcap = float(opts.teacher_softcap or 0.0)
    return tuple(teacher), vocabs.pop(), _Mixture(log_weights, opts.teacher_logit_scale, softcap)


def run_fused(plan: _Plan, h_s, w_s, b_s, labels, weights, teacher: tuple, batch_shape):
    """The fused linear loss of checked, flattened inputs, shaped and split as its caller
    returns it (``KDLossParts`` with ``plan.parts``)."""
    loss, ce = FusedLinearKDFunction.apply(h_s, w_s, b_s, labels, weights, plan, *teacher)
    if plan.reduction == "none":
        loss, ce = loss.reshape(batch_shape), ce.reshape(batch_shape)
    if not plan.parts:
        return loss
    return KDLossParts(loss, loss.detach() - ce, ce)


def _check_teacher_rows(name: str, t, what: str, h_s) -> None:
    """A teacher tensor with one row per token of ``student_hidden``, on its device."""
    _inputs.check_tensor(name, t)
    _inputs.check_float(name, t)
    _inputs.check_rows(name, t, what)
    if t.device != h_s.device:
        raise ValueError(f"{name} is on {t.device} but student_hidden is on {h_s.device}")
    if t.shape[:-1] != h_s.shape[:-1]:
        raise ValueError(
            f"{name} shape {tuple(t.shape)} does not match student_hidden shape "
            f"{tuple(h_s.shape)} in the token dimensions"
        )


def _check_head(who: str, hidden, weight, bias) -> None:
    _inputs.check_tensor(f"{who}_weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{who}_weight must be [V, {hidden.shape[-1]}] to match {who}_hidden, "
            f"got {tuple(weight.shape)}"
        )
    _inputs.check_same(f"{who}_weight", weight, f"{who}_hidden", hidden)
    if bias is not None:
        _inputs.check_tensor(f"{who}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{who}_bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        _inputs.check_same(f"{who}_bias", bias, f"{who}_weight", weight)


def _shift(labels, batch_shape, ignore_index):
    """Causal shift: position t is scored against labels[t + 1]; the last position of each
    sequence gets ignore_index."""
    _inputs.check_label_dtype(labels)
    if labels.numel() != batch_shape.numel():
        raise ValueError(
            f"labels must have shape {tuple(batch_shape)} to match student_hidden, "
            f"got {tuple(labels.shape)}"
        )
    labels = labels.reshape(batch_shape)
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def _row_bytes(
    args: KernelArgs | SparseKernelArgs,
    vs: int,
    vt: int | None,
    low_precision: bool,
    teacher_buffers: int = 1,
) -> int:
    """Bytes of one row of a chunk's buffers: fp32 student logits, the teacher's with a KD
    term (``vt`` None: no teacher logits, as for a cached sparse teacher; a mixture: its
    log-probabilities, one teacher's logits and a temporary of their log-sum-exp), and the
    low-precision copy of the gradient for the GEMMs."""
    teacher = teacher_buffers * vt if vt is not None and args.kd_weight else 0
    return 4 * (vs + teacher) + (2 * vs if low_precision else 0)


def _chunk(chunk_size, memory_budget, h_s, row_bytes: int) -> int:
    n = max(1, h_s.shape[:-1].numel())
    if chunk_size is not None:
        if memory_budget is not None:
            raise ValueError("give chunk_size or memory_budget, not both")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        return min(chunk_size, n)
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET.get(h_s.device.type, DEFAULT_MEMORY_BUDGET["cpu"])
        n = min(n, GEMM_ROWS.get(h_s.device.type, n))
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    return max(1, min(n, memory_budget // row_bytes))


class FusedLinearKDLoss(LossModule, function=fused_linear_kd_loss):
    """Module form of :func:`fused_linear_kd_loss`: options at construction, tensors in
    ``forward``. ``alpha`` is the CE weight; ``1 - alpha`` weighs the T^2-scaled KD term."""

    def check_settings(self) -> None:
        if self.settings["teacher_mixture"] is not None:
            mixture_log_weights(self.settings["teacher_mixture"])

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        teacher_hidden: Teachers = None,
        teacher_weight: Teachers = None,
        teacher_logits: Teachers = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: Teachers = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_kd_loss(
            student_hidden,
            student_weight,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_logits=teacher_logits,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            token_weights=token_weights,
            **self.settings,
        )
