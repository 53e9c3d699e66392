"""Held-out evaluation of any ``transformers`` causal LM without materializing its full logits.

The model body gives hidden states, the output embedding gives the head, and logits are formed
a chunk of target rows at a time, so memory beyond the forward pass is bounded by the chunk
whatever the vocabulary size. The numbers equal those from ``model(...).logits``, with the
logit transforms of ``fastkd.training.models.logit_options`` and LoRA-adapted heads. An
architecture that transforms its logits some other way is caught by the probe
(``fastkd.training.models.check_head``) on the first batch, which raises on mismatch.
"""

from __future__ import annotations

import math

import torch

from fastkd.training.models import IGNORE_INDEX, Head, body, check_head


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
    model_body = body(model)
    head = Head(model)
    if device is None:
        device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    # Sums live on the head's device: with a model split over devices, the body's output and
    # the head may be on different ones.
    head_device = head.base.weight.device
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
                check_head(model, input_ids, mask)
            # Position t predicts labels[t + 1]; keep only the rows that have a target.
            targets = batch["labels"].to(head_device)[:, 1:]
            keep = targets != IGNORE_INDEX
            hidden = model_body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            nll, hits = head.statistics(hidden[:, :-1].to(head_device)[keep], targets[keep])
            loss_sum += nll.sum()
            correct += hits.sum()
            tokens += keep.sum()
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
