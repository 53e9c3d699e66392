"""Fused knowledge-distillation loss on logits: ``kd_loss`` and ``KDLoss``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from fastkd import _inputs
from fastkd._options import (
    OPTIONS_MARKER,
    LossOptions,
    document_options,
    option_names,
    takes_loss_options,
)
from fastkd.backends import RowKernel, check_backend_name, get_backend, select_backend
from fastkd.reference import compute_dtype


def check_first_order(loss: str) -> None:
    """Called first in a fused backward: the kernels' gradients record no graph, so a
    backward with create_graph=True (which runs in grad mode) would return gradients that
    silently lack their second derivative. Refuse it instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastkd.{loss} is differentiable once: its backward is a fused kernel that records "
            "no graph, so double backward (create_graph=True, e.g. a gradient penalty or "
            "MAML) is not supported. Differentiate it with create_graph=False, or where "
            "second derivatives are needed compute the loss in plain PyTorch: "
            "fastkd.reference.kd_loss_rows(student_logits, teacher_logits, labels, "
            "token_weights, fastkd.LossOptions(...).kernel_args(V_student, V_teacher))"
        )


def graph_kept() -> bool:
    """Whether this backward's graph is kept for another (retain_graph=True, or
    create_graph=True). Saved gradients may be scaled in place only when it is not: in place
    keeps the common single backward free of a second [N, V] (or [V, H]) buffer, out of place
    lets a retained graph run backward again with the same result, as PyTorch's own losses do.
    torch has no public query for this; the private one is the query AOTAutograd's compiled
    backward makes for the same purpose (whether saved tensors are used once). Dynamo cannot
    trace it, and a compiled backward is functional anyway: under torch.compile the graph
    counts as kept."""
    return torch.compiler.is_compiling() or torch._C._autograd._get_current_graph_task_keep_graph()


class KDLossFunction(torch.autograd.Function):
    """Autograd of the per-row loss, for every backend and both teacher forms (``kernel``: the
    dense ops on teacher logits, or the sparse ops on a cached teacher; ``teacher`` the tensors
    they take): forward is the kernel's fwd (per-row loss and statistics), backward its bwd
    (the gradient, written once; docs/design.md §2, §11).

    With ``inplace`` the forward already writes d loss_i / d z_s[i] over the student logits and
    backward only scales it by grad_output, in place unless the graph is kept for another
    backward (``graph_kept``): in the common case no second [N, V] buffer exists.
    """

    @staticmethod
    def forward(ctx, student, labels, weights, kernel: RowKernel, inplace, *teacher):
        ctx.kernel = kernel
        ctx.inplace = inplace and student.requires_grad
        if ctx.inplace:  # one call: the CPU kernels read each row once for loss and gradient
            ones = student.new_ones(student.shape[0], dtype=torch.float32)
            loss, _ = kernel.fwd_bwd(student, teacher, labels, weights, ones, student)
            ctx.save_for_backward(student)  # saved after the write: later edits are caught
        else:
            loss, stats = kernel.fwd(student, teacher, labels, weights)
            ctx.save_for_backward(student, labels, weights, stats, *teacher)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        check_first_order("kd_loss")
        if ctx.inplace:
            (grad,) = ctx.saved_tensors
            scale = grad_loss[:, None].to(grad.dtype)
            grad = grad * scale if graph_kept() else grad.mul_(scale)
        else:
            student, labels, weights, stats, *teacher = ctx.saved_tensors
            grad = torch.empty_like(student)
            ctx.kernel.bwd(student, teacher, labels, weights, stats, grad_loss.contiguous(), grad)
        return grad, None, None, None, None, *(None for _ in ctx.needs_input_grad[5:])


@takes_loss_options()
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
        token_weights: optional [N] or [B, S] per-token multipliers, finite and 0 or a normal
            float (a ValueError on the CPU; elsewhere a negative weight makes the loss NaN).
            They may require grad: the loss is differentiable in them. A token of weight 0 is
            not read, so its weight's gradient has no term from its own loss (for ``mean`` it
            keeps the denominator's).
        inplace_grad: write the gradient over ``student_logits`` during the forward (saves one
            [N, V] buffer); the logits are garbage afterwards. ``student_logits`` must then be
            a non-leaf (an lm_head output, or a view of one): for a leaf that requires grad
            (or a view of one) its ``.grad`` would alias its data, a ValueError.
        backend: ``triton``, ``cuda``, ``cpu`` or ``reference``; default ``FASTKD_BACKEND``,
            else by device (see ``fastkd.backends()``).

    Returns:
        The reduced loss (shape [] or, for ``none``, the labels' shape), in float32 whatever
        the logits' dtype (float64 for float64 logits), so that a sum over many tokens cannot
        overflow a low-precision dtype. No tokens (N = 0) give 0 (``none``: an empty tensor).
        Differentiable once (double backward raises).
    """
    opts = LossOptions(**options)
    student = _inputs.check_tensor("student_logits", student_logits)
    teacher = _inputs.check_tensor("teacher_logits", teacher_logits)
    _inputs.check_float("student_logits", student)
    _inputs.check_float("teacher_logits", teacher)
    _inputs.check_same("teacher_logits", teacher, "student_logits", student)
    if inplace_grad:
        _check_inplace_target(student)
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
    weights = _inputs.check_token_weights(
        token_weights, batch_shape, student.device, compute_dtype(student.dtype)
    )
    chosen = get_backend(select_backend(backend, student.device, student.dtype))
    rows = KDLossFunction.apply(
        _inputs.rows_2d(student),
        labels,
        _inputs.row_mask(weights),
        RowKernel(chosen, args),
        inplace_grad,
        _inputs.rows_2d(teacher),
    )
    # Weighted outside the kernels, so autograd differentiates the weights.
    rows = _inputs.weigh_rows(rows, weights)
    return _inputs.reduce_loss(
        rows, labels, weights, args.ignore_index, opts.reduction, batch_shape
    )


def _check_inplace_target(student: torch.Tensor) -> None:
    """inplace_grad overwrites the logits with their gradient, which autograd then hands on
    as the gradient of whatever they were computed from. For a leaf that requires grad (or a
    view of one) that is the leaf's own ``.grad``: it would alias the leaf's data."""
    if not student.requires_grad:
        return
    base = student if student._base is None else student._base
    if base.is_leaf:
        what = "a leaf tensor" if base is student else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_grad=True writes the gradient over student_logits, which is {what} "
            "that requires grad: its .grad would alias its data. Use inplace_grad=True on "
            "logits computed in the graph (an lm_head output), or inplace_grad=False"
        )


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
        cls._function = staticmethod(function)

        def __init__(self: LossModule, **settings: Any) -> None:
            LossModule.__init__(self, **settings)

        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        __init__.__signature__ = cls._settings.replace(parameters=[self_param, *settings])
        __init__.__doc__ = document_options(
            f"Settings of :func:`fastkd.{function.__name__}` (its other keyword arguments are "
            f"documented there), checked here.\n\n    Args:\n        {OPTIONS_MARKER}\n",
            function.loss_options,
        )
        cls.__init__ = __init__

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        bound = self._settings.bind(**settings)
        bound.apply_defaults()
        self.settings = dict(bound.arguments)
        options = self._function.loss_options
        names = option_names(options)
        options(**{k: v for k, v in self.settings.items() if k in names})
        check_backend_name(self.settings["backend"])
        self.check_settings()

    def check_settings(self) -> None:
        """Check the settings that are not loss options (a subclass's)."""

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
