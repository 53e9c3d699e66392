"""Held-out evaluation of any ``transformers`` causal LM without materializing its full logits.

The model body gives hidden states, the output embedding gives the head, and logits are formed
a chunk of target rows at a time, so memory beyond the forward pass is bounded by the chunk
whatever the vocabulary size. The numbers equal those from ``model(...).logits``,
including Cohere's ``logit_scale``, Granite's ``logits_scaling`` and Gemma's final logit
softcap. An architecture that transforms its logits some other way is caught by a probe on the
first batch, which compares with ``model(...).logits`` on a few tokens and raises on mismatch.
"""

from __future__ import annotations

import math

import torch

from fastkd.reference import compute_dtype, transform_logits
from fastkd.training.models import logit_options

IGNORE_INDEX = -100
# Rows per logits chunk are chosen so that one chunk holds about this many elements
# (64 MiB in fp32): 512 rows at V = 32k, 64 rows at V = 256k.
CHUNK_ELEMENTS = 1 << 24
# Tokens of the first sequence on which the head is checked against ``model(...).logits``.
PROBE_TOKENS = 16
# Relative (Frobenius) mismatch that fails the probe: far above bf16 rounding (~0.5%), far
# below what a missed scale or softcap does.
PROBE_RTOL = 0.05


class _Head:
    """The model's output layer as the model's own forward applies it:
    ``softcap(scale * (h @ W.T + b))``.

    The product runs in the head's dtype, as in the model's forward (and with no fp32 copy of
    W); the logits are then upcast to fp32 (fp64 for an fp64 model) for everything after.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)
        self.dtype = compute_dtype(self.weight.dtype)
        self.scale, softcap = logit_options(model)
        self.softcap = softcap or 0.0
        self.rows_per_chunk = max(1, CHUNK_ELEMENTS // self.weight.shape[0])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.weight.device, self.weight.dtype)
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias).to(self.dtype)
        return transform_logits(logits, self.scale, self.softcap)


def _hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _probe(model: torch.nn.Module, head: _Head, input_ids: torch.Tensor, mask: torch.Tensor):
    """Raise if ``head`` on the body's output does not give the model's own logits."""
    ids, mask = input_ids[:1, :PROBE_TOKENS], mask[:1, :PROBE_TOKENS]
    expected = model(input_ids=ids, attention_mask=mask).logits[0].to(head.dtype)
    got = head(_hidden(model, ids, mask)[0])
    mismatch = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    if not mismatch <= PROBE_RTOL:
        raise ValueError(
            f"{type(model).__name__}: logits from base_model + get_output_embeddings() differ "
            f"from model(...).logits (relative error {mismatch:.3g}); this architecture "
            "transforms its hidden states or logits in a way evaluate() does not know"
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """Next-token loss, perplexity and accuracy of a causal LM over the target tokens.

    Labels follow the ``transformers`` convention: same positions as ``input_ids`` (position t
    is scored on predicting ``labels[t + 1]``; the shift happens here) and -100 marks tokens
    that are not targets. Averages are over all target tokens of the evaluated batches (not a
    mean of batch means). Logits are computed only for positions that have a target, in chunks
    of rows: the head's product in the model's dtype, as its own forward does, then the softcap
    or scale and the softmax in fp32 (fp64 for an fp64 model).

    The model is put in eval mode for the call and given back in its previous mode.

    Args:
        model: a ``transformers`` causal LM (``base_model`` returns ``last_hidden_state``
            after the final norm; ``get_output_embeddings()`` is the head).
        dataset: items that are dicts of int tensors ``input_ids`` and ``labels`` (and
            optionally ``attention_mask``), e.g. ``fastkd.training.data.BlockDataset``.
        batch_size: blocks per forward pass.
        max_batches: stop after this many batches (all when None).
        device: where the batches are sent; the model must already be there (its input
            embedding, for a model split over devices). Defaults to the device of the model's
            first parameter.

    Returns:
        ``{"loss": mean cross-entropy, "perplexity": exp(loss), "accuracy": share of targets
        whose logit is the argmax, "tokens": number of target tokens}``.

    Raises:
        ValueError: the model has no separate body or no output embedding, its logits are
            transformed in a way not reproduced here, or the batches hold no target token.
    """
    if model.base_model is model:
        raise ValueError(f"{type(model).__name__} has no separate body (base_model)")
    head = _Head(model)
    if device is None:
        device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    # Sums live on the head's device: with a model split over devices, the body's output and
    # the head may be on different ones.
    head_device = head.weight.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=head_device)
    correct = torch.zeros((), dtype=torch.int64, device=head_device)
    tokens = torch.zeros((), dtype=torch.int64, device=head_device)
    was_training = model.training
    model.eval()
    try:
        for step, batch in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
            if step == 0:
                _probe(model, head, input_ids, mask)
            # Position t predicts labels[t + 1]; keep only the rows that have a target.
            targets = batch["labels"].to(head_device)[:, 1:]
            keep = targets != IGNORE_INDEX
            rows = _hidden(model, input_ids, mask)[:, :-1].to(head_device)[keep]
            targets = targets[keep]
            for start in range(0, rows.shape[0], head.rows_per_chunk):
                logits = head(rows[start : start + head.rows_per_chunk])
                y = targets[start : start + head.rows_per_chunk]
                loss_sum += (logits.logsumexp(-1) - logits.gather(1, y[:, None]).squeeze(1)).sum()
                correct += (logits.argmax(-1) == y).sum()
            tokens += targets.numel()
    finally:
        model.train(was_training)

    n = int(tokens)
    if n == 0:
        raise ValueError("no target tokens to evaluate (every label is -100, or no batches)")
    loss = float(loss_sum) / n
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "accuracy": int(correct) / n,
        "tokens": n,
    }
