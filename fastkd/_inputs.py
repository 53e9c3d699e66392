"""Checks and reshapes of user tensors, shared by every loss: a bad input fails here with an
error that names the argument, before any kernel runs."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D] with a contiguous last dim (kernels take any row stride)."""
    t = t.reshape(-1, t.shape[-1])
    # contiguous() keeps a stride-0 last dim of size 1 (or of an empty tensor): clone instead.
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def check_rows(name: str, t: torch.Tensor, what: str) -> None:
    if t.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be [N, {what}] or [B, S, {what}], got shape {tuple(t.shape)}"
        )
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(t.shape)}")


def check_per_token(
    name: str, t: torch.Tensor, batch_shape: torch.Size, device: torch.device
) -> None:
    n = batch_shape.numel()
    if tuple(t.shape) not in (tuple(batch_shape), (n,)):
        raise ValueError(
            f"{name} must have shape {tuple(batch_shape)} or ({n},) to match the logits, "
            f"got {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")


def check_label_dtype(labels: object) -> None:
    check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        # Narrower types cannot hold every class id of a real vocabulary, and uint8 cannot
        # hold the default ignore_index (-100).
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")


def check_labels(
    labels: torch.Tensor | None,
    batch_shape: torch.Size,
    device: torch.device,
    vocab: int,
    ignore_index: int,
    ce_weight: float,
) -> torch.Tensor | None:
    """Labels as a contiguous int64 [N] tensor (or None), range-checked on the CPU.

    On other devices, and under torch.compile, the range is not checked here (that would
    synchronise with the host or break the graph); the kernels give a NaN loss for an
    out-of-range label instead.
    """
    if labels is None:
        if ce_weight > 0:
            raise ValueError(
                f"labels=None needs a CE weight of 0, got ce_weight={ce_weight} "
                "(alpha is the CE weight: pass alpha=0.0 for a pure distillation loss)"
            )
        return None
    check_label_dtype(labels)
    check_per_token("labels", labels, batch_shape, device)
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"labels[{i}] (flattened) is {int(labels[i])}"
            )
    return labels


def check_token_weights(
    token_weights: torch.Tensor | None,
    batch_shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Token weights as a contiguous [N] tensor of the compute ``dtype`` (or None), still
    differentiable. They must be finite and 0 or at least the dtype's smallest normal number:
    checked on the CPU; on other devices, and under torch.compile, where a check would
    synchronise with the host or break the graph, a negative weight becomes NaN instead, so the
    loss is NaN (NaN and inf weights make it NaN or inf already)."""
    if token_weights is None:
        return None
    check_tensor("token_weights", token_weights)
    if not token_weights.is_floating_point():
        raise TypeError(f"token_weights must be a floating tensor, got {token_weights.dtype}")
    check_per_token("token_weights", token_weights, batch_shape, device)
    weights = token_weights.reshape(-1).to(dtype).contiguous()
    if weights.device.type == "cpu" and not torch.compiler.is_compiling():
        # A subnormal weight would make mean's 1 / sum(w) overflow.
        tiny = torch.finfo(dtype).tiny
        bad = ~(torch.isfinite(weights) & ((weights == 0) | (weights >= tiny)))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"token_weights must be finite and 0 or >= {tiny:.4g}; token_weights[{i}] "
                f"(flattened) is {float(weights[i])}"
            )
        return weights
    return torch.where(weights >= 0, weights, torch.nan)


def row_mask(weights: torch.Tensor | None) -> torch.Tensor | None:
    """What the kernels get as their weights: 1 for a token whose weight is not 0, else 0.
    The losses multiply the kernels' row losses by the weights themselves, so that autograd
    (or, for the fused linear loss, its own backward) differentiates them (docs/design.md §5)."""
    return None if weights is None else (weights != 0).to(torch.float32)


def weigh_rows(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The kernels' unweighted row losses (see ``row_mask``) times the token weights."""
    return rows if weights is None else rows * weights


def row_scale(
    reduction: str,
    n: int,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    ignore_index: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """d(reduced loss) / d(loss of one row) for the scalar reductions, as a 0-dim tensor on the
    device (no host sync): 1 for ``sum``, 1/n for ``batchmean``, and for ``mean`` 1 / (sum of
    the weights of the counted tokens), or 1 when none count (their losses are 0 anyway)."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if reduction == "batchmean":
        return torch.full((), 1.0 / max(n, 1), dtype=dtype, device=device)
    weight = (
        torch.ones(n, dtype=dtype, device=device)
        if token_weights is None
        else token_weights.to(dtype)
    )
    if labels is not None:
        weight = weight * (labels != ignore_index)
    denom = weight.sum()
    return 1.0 / torch.where(denom != 0, denom, 1.0)


def reduce_loss(
    rows: torch.Tensor,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    batch_shape: torch.Size,
) -> torch.Tensor:
    """Reduce per-row losses (already weighted, 0 where ignored) without a host sync."""
    if reduction == "none":
        return rows.reshape(batch_shape)
    scale = row_scale(
        reduction, rows.numel(), labels, token_weights, ignore_index, rows.dtype, rows.device
    )
    return rows.sum() * scale
