"""Fused knowledge-distillation loss on logits: ``kd_loss`` and ``KDLoss``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from fastkd import _inputs
from fastkd._options import (
    LOSS_OPTION_NAMES,
    OPTIONS_MARKER,
    KernelArgs,
    LossOptions,
    document_options,
    takes_loss_options,
)
from fastkd.backends import Backend, check_backend_name, get_backend, select_backend


class KDLossFunction(torch.autograd.Function):
    """Autograd of the per-row loss, for every backend: forward is the backend's fwd (per-row
    loss and statistics), backward its bwd (the gradient, written once; docs/design.md §2).

    With ``inplace`` the forward already writes d loss_i / d z_s[i] over the student logits and
    backward only scales it by grad_output: no second [N, V] buffer exists.
    """

    @staticmethod
    def forward(
        ctx, student, teacher, labels, weights, backend: Backend, args: KernelArgs, inplace
    ):
        loss, stats = backend.fwd(student, teacher, labels, weights, args)
        ctx.backend, ctx.args = backend, args
        ctx.inplace = inplace and student.requires_grad
        if ctx.inplace:
            ones = torch.ones_like(loss)
            backend.bwd(student, teacher, labels, weights, stats, ones, args, student)
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
            ctx.backend.bwd(
                student, teacher, labels, weights, stats, grad_loss.contiguous(), ctx.args, grad
            )
        return grad, None, None, None, None, None, None


@takes_loss_options
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    token_weights: torch.Tensor | None = None,
    inplace_grad: bool = False,
    backend: str | None = None,
    **options: Any,
) -> torch.Tensor:
    r"""Knowledge-distillation loss of student against teacher logits, fused over the vocabulary.

    Per token, with q = softmax(z_s / T), p = softmax(z_t / T)::

        loss = alpha * CE(z_s, label) + (1 - alpha) * T^2 * D(p, q)

    **alpha is the weight of the hard-label cross-entropy** (at T = 1); ``1 - alpha`` weighs
    the distillation term, which is multiplied by T^2 so its gradient scale does not change
    with T (Hinton et al.). To spell both weights out, pass ``kd_weight`` and/or
    ``ce_weight`` instead of ``alpha`` (a missing one is 0). The teacher gets no gradient.
    The options are the fields of :class:`fastkd.LossOptions` (docs/design.md §1).

    Args:
        student_logits: [N, V] or [B, S, V]; float32, bfloat16 or float16 (float64 runs on the
            reference backend). Math is fp32 whatever the dtype.
        teacher_logits: same leading shape, dtype and device; vocabulary may differ with ``vocab``.
        labels: [N] or [B, S] integer class ids, ``ignore_index`` where a token does not count
            (for either term). Needed when the CE weight is > 0.
        <loss options>
        token_weights: optional [N] or [B, S] per-token multipliers.
        inplace_grad: write the gradient over ``student_logits`` during the forward (saves one
            [N, V] buffer); the logits are garbage afterwards.
        backend: ``triton``, ``cuda``, ``cpu`` or ``reference``; default ``FASTKD_BACKEND``,
            else by device (see ``fastkd.backends()``).

    Returns:
        The reduced loss (shape [] or, for ``none``, the labels' shape), in the logits' dtype.
    """
    opts = LossOptions(**options)
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
    args = opts.kernel_args(student.shape[-1], teacher.shape[-1])
    labels = _inputs.check_labels(
        labels, batch_shape, student.device, student.shape[-1], args.ignore_index, args.ce_weight
    )
    weights = _inputs.check_token_weights(token_weights, batch_shape, student.device)
    chosen = get_backend(select_backend(backend, student.device, student.dtype))
    rows = KDLossFunction.apply(
        _inputs.rows_2d(student),
        _inputs.rows_2d(teacher),
        labels,
        weights,
        chosen,
        args,
        inplace_grad,
    )
    loss = _inputs.reduce_loss(
        rows, labels, weights, args.ignore_index, opts.reduction, batch_shape
    )
    return loss.to(student.dtype)


class LossModule(torch.nn.Module):
    """Base of the loss modules: the functional form's settings (the loss options and its own
    keyword settings, less what ``forward`` takes per call) given at construction and checked
    there, so a bad configuration fails at once and not at the first batch."""

    _settings: inspect.Signature

    def __init_subclass__(cls, *, function: Callable[..., Any], **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        per_call = inspect.signature(cls.forward).parameters
        settings = [
            p
            for p in inspect.signature(function).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in per_call and p.name != "return_parts"
        ]
        cls._settings = inspect.Signature(settings)

        def __init__(self: LossModule, **settings: Any) -> None:
            LossModule.__init__(self, **settings)

        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        __init__.__signature__ = cls._settings.replace(parameters=[self_param, *settings])
        __init__.__doc__ = document_options(
            f"Settings of :func:`fastkd.{function.__name__}` (its other keyword arguments are "
            f"documented there), checked here.\n\n    Args:\n        {OPTIONS_MARKER}\n"
        )
        cls.__init__ = __init__

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        bound = self._settings.bind(**settings)
        bound.apply_defaults()
        self.settings = dict(bound.arguments)
        LossOptions(**{k: v for k, v in self.settings.items() if k in LOSS_OPTION_NAMES})
        check_backend_name(self.settings["backend"])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items() if v is not None)


class KDLoss(LossModule, function=kd_loss):
    """Module form of :func:`kd_loss`: options at construction, tensors in ``forward``.

    ``alpha`` is the hard-label CE weight (default 0.5); ``1 - alpha`` weighs the T^2-scaled
    distillation term. Example::

        loss_fn = fastkd.KDLoss(temperature=2.0, alpha=0.5)
        loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits, teacher_logits, labels, token_weights=token_weights, **self.settings
        )
