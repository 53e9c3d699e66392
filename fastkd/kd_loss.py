"""Fused knowledge-distillation loss on logits: ``kd_loss`` and ``KDLoss``."""

from __future__ import annotations

import torch

from fastkd import _inputs
from fastkd._ops import kernel_ops
from fastkd._options import KDOptions, check_reduction, resolve_options
from fastkd.backends import BACKENDS, select_backend
from fastkd.reference import ReferenceKDFunction


class KDLossFunction(torch.autograd.Function):
    """Autograd for the kernel backends (triton, cuda, cpu): forward is the kernels' pass 1
    (per-row loss and statistics), backward their pass 2 (the gradient, written once).

    With ``inplace_grad`` the forward already writes d loss_i / d z_s[i] over the student
    logits and backward only scales it by grad_output: no second [N, V] buffer exists.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, weights, backend: str, args: tuple, inplace: bool):
        ops = kernel_ops(backend)
        loss, stats = ops.fwd(student, teacher, labels, weights, *args)
        ctx.backend, ctx.args = backend, args
        ctx.inplace = inplace and student.requires_grad
        if ctx.inplace:
            ones = torch.ones_like(loss)
            ops.bwd(student, teacher, labels, weights, stats, ones, *args, student)
            ctx.save_for_backward(student)  # saved after the write: later edits are caught
        else:
            ctx.save_for_backward(student, teacher, labels, weights, stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.inplace:
            (grad,) = ctx.saved_tensors
            grad.mul_(grad_loss[:, None].to(grad.dtype))
        else:
            student, teacher, labels, weights, stats = ctx.saved_tensors
            grad = torch.empty_like(student)
            kernel_ops(ctx.backend).bwd(
                student,
                teacher,
                labels,
                weights,
                stats,
                grad_loss.to(torch.float32).contiguous(),
                *ctx.args,
                grad,
            )
        return grad, None, None, None, None, None, None


def kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
    opts: KDOptions,
    backend: str,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Per-row weighted loss [N] (fp32; fp64 on the reference with fp64 inputs) of checked 2-D
    inputs, through the chosen backend's autograd Function."""
    if backend == "reference":
        return ReferenceKDFunction.apply(student, teacher, labels, weights, opts)
    args = opts.kernel_args(opts.kd_vocab(student.shape[1], teacher.shape[1]))
    return KDLossFunction.apply(student, teacher, labels, weights, backend, args, inplace_grad)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    alpha: float | None = None,
    kd_weight: float | None = None,
    ce_weight: float | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    token_weights: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab: str | None = None,
    inplace_grad: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Knowledge-distillation loss of student against teacher logits, fused over the vocabulary.

    Per token, with q = softmax(z_s / T), p = softmax(z_t / T)::

        loss = alpha * CE(z_s, label) + (1 - alpha) * T^2 * D(p, q)

    **alpha is the weight of the hard-label cross-entropy** (at T = 1); ``1 - alpha`` weighs
    the distillation term, which is multiplied by T^2 so its gradient scale does not change
    with T (Hinton et al.). To spell both weights out, pass ``kd_weight`` and/or
    ``ce_weight`` instead of ``alpha`` (a missing one is 0). The teacher gets no gradient.

    Args:
        student_logits: [N, V] or [B, S, V]; float32, bfloat16 or float16 (float64 runs on the
            reference backend). Math is fp32 whatever the dtype.
        teacher_logits: same leading shape, dtype and device; vocabulary may differ with ``vocab``.
        labels: [N] or [B, S] integer class ids, ``ignore_index`` where a token does not count
            (for either term). Needed when the CE weight is > 0.
        temperature: T > 0 of the distillation term.
        alpha: CE weight in [0, 1]; default 0.5 when neither ``kd_weight`` nor ``ce_weight``.
        divergence: ``kl`` (KL(p||q), default), ``reverse_kl`` (KL(q||p)), ``jsd`` (generalized
            JSD with ``beta``: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q;
            beta=0 is forward KL and beta=1 reverse KL, as in TRL), ``tvd`` (0.5*sum|p-q|),
            ``skew_kl`` (KL(p || skew*p + (1-skew)*q)) and ``skew_reverse_kl``
            (KL(q || skew*q + (1-skew)*p)), skew in [0, 1).
        ignore_index: label value of tokens that contribute nothing.
        reduction: ``mean`` (sum of weighted token losses / sum of weights of counted tokens,
            0 when none count), ``sum``, ``none`` (per-token, 0 where ignored) or ``batchmean``
            (sum / number of tokens, as ``torch.nn.KLDivLoss``).
        token_weights: optional [N] or [B, S] per-token multipliers.
        student_logit_scale, teacher_logit_scale: multiply raw logits first (Cohere).
        student_softcap, teacher_softcap: then ``cap * tanh(z / cap)`` (Gemma); -inf stays -inf.
        vocab: when the vocabularies differ, ``truncate`` compares on the shared prefix and
            ``pad`` treats the teacher's missing entries as -inf (p = 0 there). CE always
            uses the full student vocabulary.
        inplace_grad: kernel backends write the gradient over ``student_logits`` during the
            forward (saves one [N, V] buffer); the logits are garbage afterwards.
        backend: ``triton``, ``cuda``, ``cpu`` or ``reference``; default ``FASTKD_BACKEND``,
            else by device (see ``fastkd.backends()``).

    Returns:
        The reduced loss (shape [] or, for ``none``, the labels' shape), in the logits' dtype.
    """
    opts = resolve_options(
        temperature=temperature,
        alpha=alpha,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        divergence=divergence,
        beta=beta,
        skew=skew,
        ignore_index=ignore_index,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
        vocab=vocab,
    )
    reduction = check_reduction(reduction)
    student = _inputs.check_tensor("student_logits", student_logits)
    teacher = _inputs.check_tensor("teacher_logits", teacher_logits)
    _inputs.check_float("student_logits", student)
    _inputs.check_float("teacher_logits", teacher)
    _inputs.check_same("teacher_logits", teacher, "student_logits", student)
    _inputs.check_rows("student_logits", student, "V")
    _inputs.check_rows("teacher_logits", teacher, "V")
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher.shape)} does not match student_logits shape "
            f"{tuple(student.shape)} in the leading (token) dimensions"
        )
    batch_shape = student.shape[:-1]
    opts.kd_vocab(student.shape[-1], teacher.shape[-1])  # vocabulary mismatch check
    labels = _inputs.check_labels(
        labels, batch_shape, student.device, student.shape[-1], opts.ignore_index, opts.ce_weight
    )
    weights = _inputs.check_token_weights(token_weights, batch_shape, student.device)
    chosen = select_backend(backend, student.device, student.dtype)

    rows = kd_loss_rows(
        _inputs.rows_2d(student),
        _inputs.rows_2d(teacher),
        labels,
        weights,
        opts,
        chosen,
        inplace_grad,
    )
    loss = _inputs.reduce_loss(rows, labels, weights, opts.ignore_index, reduction, batch_shape)
    return loss.to(student.dtype)


class LossModule(torch.nn.Module):
    """Base of the loss modules: options given at construction and checked there, so a bad
    configuration fails at once and not at the first batch; tensors in ``forward``."""

    NOT_SCALAR = (
        "reduction",
        "inplace_grad",
        "backend",
        "chunk_size",
        "memory_budget",
        "shift_labels",
    )

    def __init__(self, arguments: dict) -> None:
        super().__init__()
        self.options = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
        resolve_options(**{k: v for k, v in self.options.items() if k not in self.NOT_SCALAR})
        check_reduction(self.options["reduction"])
        backend = self.options["backend"]
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)


class KDLoss(LossModule):
    """Module form of :func:`kd_loss`: options at construction, tensors in ``forward``.

    ``alpha`` is the hard-label CE weight (default 0.5); ``1 - alpha`` weighs the T^2-scaled
    distillation term. Example::

        loss_fn = fastkd.KDLoss(temperature=2.0, alpha=0.5)
        loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        *,
        temperature: float = 2.0,
        alpha: float | None = None,
        kd_weight: float | None = None,
        ce_weight: float | None = None,
        divergence: str = "kl",
        beta: float = 0.5,
        skew: float = 0.1,
        ignore_index: int = -100,
        reduction: str = "mean",
        student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        vocab: str | None = None,
        inplace_grad: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(locals())

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits, teacher_logits, labels, token_weights=token_weights, **self.options
        )
