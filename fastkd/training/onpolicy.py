"""On-policy distillation (GKD, MiniLLM) and sequence-level KD: a share of the training
batches is replaced by continuations that the student (or, with ``seq_kd``, the teacher)
generates from the batch's prompts, so the student learns on the text it produces rather than
only on the data's (docs/design.md §12).

Per training micro-batch, ``OnPolicy`` draws whether it is replaced, with probability
``DistillConfig.on_policy_fraction``; a replaced batch is ``generated_batch``'s: the first
``prompt_tokens`` of each row, then ``max_new_tokens`` sampled ones. The KD term alone trains
on the student's samples (``Distiller.forward(hard_labels=False)``: they are no ground truth);
the teacher's samples (``seq_kd``) keep the CE term, they are its targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import transformers

from fastkd.training.fsdp import is_sharded
from fastkd.training.models import IGNORE_INDEX, Head, causal_lm, describe

if TYPE_CHECKING:
    from fastkd.training.distiller import Distiller


def check_on_policy(distiller: Distiller) -> None:
    """Raise ValueError unless ``distiller`` can generate what its config asks: the
    generating model can generate, and the teacher's samples are ids the student embeds. (A
    teacher cache, which has no teacher at generated tokens, is refused by
    ``check_cache_config``.)"""
    cfg = distiller.distill_config
    if cfg.on_policy_fraction == 0:
        return
    generator = distiller.teachers[0] if cfg.seq_kd else distiller.student
    role = "the teacher" if cfg.seq_kd else "the student"
    if not causal_lm(generator).can_generate():
        raise ValueError(
            f"{role}, {describe(generator)}, cannot generate (can_generate() is False)"
        )
    if cfg.seq_kd:
        vt, vs = Head(generator).vocab_size, Head(distiller.student).vocab_size
        if vt > vs:
            raise ValueError(
                f"seq_kd: the teacher, {describe(generator)}, samples from {vt} ids, but the "
                f"student embeds only {vs}"
            )


def _seed(*keys: int) -> int:
    """A 64-bit seed mixed from ``keys`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


def draw(seed: int, step: int, index: int, fraction: float) -> bool:
    """Whether micro-batch ``index`` of optimizer step ``step`` is generated: a uniform draw
    of a ``torch.Generator`` seeded from ``(seed, step, index)``, below ``fraction``. The same
    on every process, and a resumed run draws what the uninterrupted one did."""
    g = torch.Generator().manual_seed(_seed(seed, step, index))
    return bool(torch.rand((), generator=g) < fraction)


def generation_seed(seed: int, step: int, index: int, rank: int = 0) -> int:
    """The seed of the torch RNG while micro-batch ``index`` of step ``step`` is generated on
    process ``rank`` (each process samples its own continuations)."""
    return _seed(seed, step, index, rank, 1)


def generation_config(
    distiller: Distiller, max_new_tokens: int, pad_token_id: int
) -> transformers.GenerationConfig:
    """Sampling as the config says, and nothing else: top-k, repetition penalties and the like
    are off whatever the model's own ``generation_config`` sets (its eos is kept)."""
    cfg = distiller.distill_config
    sample = cfg.generation_temperature > 0
    return transformers.GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=sample,
        temperature=cfg.generation_temperature if sample else 1.0,
        top_p=cfg.generation_top_p if sample else 1.0,
        top_k=0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
        pad_token_id=pad_token_id,
    )


def _eos_ids(model) -> list[int]:
    eos = causal_lm(model).generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def generated_batch(
    distiller: Distiller, batch: dict[str, torch.Tensor], *, seed: int | None = None
) -> dict:
    """The batch that replaces ``batch`` on an on-policy step.

    The first ``prompt_tokens`` of each row of ``batch["input_ids"]`` (default: half the
    row) are the prompt; the student (``seq_kd``: the first teacher) continues it with
    ``max_new_tokens`` (default: the rest of the row) sampled with its current weights, in
    eval mode (its training mode is restored), its RNG seeded with ``seed`` (the global RNG is
    left as it was). Tokens after a row's first eos are padding. Returns ``input_ids``,
    ``attention_mask`` and ``labels`` [B, prompt_tokens + max_new_tokens] on the batch's
    device, labels -100 on the prompt and the padding, and ``hard_labels`` (False for the
    student's samples: ``Distiller.forward`` then drops the CE term). Other keys of ``batch``
    (e.g. ``token_weights``, made for its own tokens) are not carried over.
    """
    cfg = distiller.distill_config
    ids = batch["input_ids"]
    length = ids.shape[1]
    prompt = cfg.prompt_tokens if cfg.prompt_tokens is not None else length // 2
    if not 1 <= prompt < length:
        raise ValueError(
            f"prompt_tokens={prompt}: the batch's rows hold {length} tokens; the prompt must "
            "leave at least one"
        )
    new = cfg.max_new_tokens if cfg.max_new_tokens is not None else length - prompt
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask[:, :prompt].all()):
        raise ValueError(
            f"the first prompt_tokens={prompt} tokens of a row hold padding (attention_mask "
            "0): on-policy prompts are the start of full rows (packed blocks)"
        )
    model = distiller.teachers[0] if cfg.seq_kd else distiller.student
    device = next(model.parameters()).device
    prompts = ids[:, :prompt].to(device)
    eos = _eos_ids(model)
    pad = causal_lm(model).generation_config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0  # padding only: masked out below
    training = model.training
    model.eval()
    # FSDP2 (docs/design.md §10): the student's embeddings and norm live in the root unit, the
    # Distiller, gathered here since its forward is not running; its layers and head gather
    # in their own forwards, and ranks step together until all are done (synced_gpus).
    root = is_sharded(distiller) and model is distiller.student
    if root:
        # torch 2.13 FSDP2 internals: the root must set up its tree before a unit under it
        # runs on its own (a no-op once the root has run forward).
        distiller._get_fsdp_state()._lazy_init()
        distiller.unshard()
    try:
        devices = range(torch.cuda.device_count())
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                generation_config=generation_config(distiller, new, pad),
                synced_gpus=is_sharded(distiller),
            )
    finally:
        model.train(training)
        if root:
            distiller.reshard()
    continuation = out[:, prompt:].to(ids.device)
    if continuation.shape[1] < new:  # every row stopped early
        fill = continuation.new_full((len(ids), new - continuation.shape[1]), pad)
        continuation = torch.cat([continuation, fill], 1)
    # A row ends at its first eos (kept: it is a target); what follows is padding.
    is_eos = torch.isin(continuation, continuation.new_tensor(eos))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    input_ids = torch.cat([ids[:, :prompt], continuation], 1)
    attention_mask = torch.cat([torch.ones_like(ids[:, :prompt]), (~after).long()], 1)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "hard_labels": cfg.seq_kd,
    }


class OnPolicy:
    """``DistillationTrainer``'s batch source for ``on_policy_fraction > 0``: called with each
    training micro-batch and the optimizer step it belongs to, returns it, or (with probability
    ``on_policy_fraction``, ``draw``) ``generated_batch`` of it. Counts the micro-batches of a
    step itself (the Trainer calls the loss once per micro-batch, in order)."""

    def __init__(self, distiller: Distiller, rank: int = 0) -> None:
        self.distiller = distiller
        self.rank = rank
        self.generated = 0  # batches replaced so far
        self._step, self._index = -1, 0

    def __call__(self, batch: dict, step: int) -> dict:
        self._index = self._index + 1 if step == self._step else 0
        self._step = step
        cfg = self.distiller.distill_config
        if not draw(cfg.seed, step, self._index, cfg.on_policy_fraction):
            return batch
        self.generated += 1
        seed = generation_seed(cfg.seed, step, self._index, self.rank)
        return generated_batch(self.distiller, batch, seed=seed)
