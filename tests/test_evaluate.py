"""evaluate(): chunked next-token loss/accuracy equal transformers' own numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from fastkd.training import models as models_module
from fastkd.training.data import BlockDataset
from fastkd.training.evaluate import evaluate

VOCAB = 97  # not a power of two
SEQ = 12
# Tiny decoder shapes shared by the Llama-like configs.
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
        "gpt2": lambda: GPT2LMHeadModel(gpt2_config()),
        "gemma2": lambda: Gemma2ForCausalLM(
            Gemma2Config(**LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0)
        ),
        "cohere": lambda: CohereForCausalLM(CohereConfig(**LLAMA_LIKE, logit_scale=0.3)),
        "granite": lambda: GraniteForCausalLM(GraniteConfig(**LLAMA_LIKE, logits_scaling=4.0)),
    }[kind]()
    # Freshly initialized heads give logits of ~0.1, where a scale or softcap barely shows;
    # a larger head makes the logits O(1) and the distribution peaked.
    model.get_output_embeddings().weight.data.mul_(30)
    return model


def make_dataset(n: int = 6, seed: int = 1) -> BlockDataset:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = input_ids.clone()
    labels[torch.rand(n, SEQ, generator=g) < 0.3] = -100  # uneven target counts per block
    labels[0, :7] = -100  # a prompt-like prefix
    return BlockDataset(input_ids, labels)


def with_hits(model: nn.Module, dataset: BlockDataset) -> BlockDataset:
    """Make about half of the targets the model's own prediction, so accuracy is not ~0."""
    with torch.no_grad():
        predicted = model(input_ids=dataset.input_ids).logits[:, :-1].argmax(-1)
    targets = dataset.labels[:, 1:]
    hit = (torch.rand(targets.shape, generator=torch.Generator().manual_seed(2)) < 0.5) & (
        targets != -100
    )
    targets[hit] = predicted[hit]
    return dataset


def full_batch(dataset: BlockDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.input_ids, dataset.labels


def reference_metrics(model: nn.Module, dataset: BlockDataset) -> dict:
    """From the model's own forward: its loss, and accuracy from its full logits."""
    input_ids, labels = full_batch(dataset)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    targets = labels[:, 1:]
    keep = targets != -100
    predicted = out.logits[:, :-1].argmax(-1)
    return {
        "loss": out.loss.item(),
        "accuracy": int((predicted[keep] == targets[keep]).sum()) / int(keep.sum()),
        "tokens": int(keep.sum()),
    }


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "cohere", "granite"])
def test_matches_transformers_loss(kind):
    model = make_model(kind).eval()
    dataset = with_hits(model, make_dataset())
    ref = reference_metrics(model, dataset)
    assert 0.3 < ref["accuracy"] < 0.8
    got = evaluate(model, dataset, batch_size=len(dataset))
    assert got["tokens"] == ref["tokens"]
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ref["loss"]), rel=1e-5)
    assert got["accuracy"] == ref["accuracy"]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_matches_transformers_loss_bf16(kind):
    """The head's product runs in bf16 as in the model's forward, so the loss still matches
    to well within bf16 rounding (about 4e-3 relative)."""
    model = make_model(kind).to(torch.bfloat16)
    dataset = make_dataset()
    ref = reference_metrics(model, dataset)
    got = evaluate(model, dataset, batch_size=len(dataset))
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_logit_transform_matters(kind):
    """The softcap / scale visibly changes the loss, so the match above tests it."""
    model = make_model(kind).eval()
    input_ids, labels = full_batch(make_dataset())
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        raw = model.get_output_embeddings()(hidden)
    plain = nn.functional.cross_entropy(raw[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert abs(evaluate(model, make_dataset())["loss"] - plain.item()) > 1e-3


def test_batches_are_token_weighted_and_chunked(monkeypatch):
    model = make_model("llama")
    dataset = make_dataset(n=7)
    whole = evaluate(model, dataset, batch_size=7)
    # 3 rows per logits chunk and a ragged last batch must not change anything.
    monkeypatch.setattr(models_module, "CHUNK_ELEMENTS", 3 * VOCAB)
    split = evaluate(model, dataset, batch_size=2)
    assert split["tokens"] == whole["tokens"]
    assert split["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert split["accuracy"] == whole["accuracy"]


def test_max_batches():
    model = make_model("gpt2")
    dataset = make_dataset()
    got = evaluate(model, dataset, batch_size=2, max_batches=1)
    assert got["tokens"] == int((dataset.labels[:2, 1:] != -100).sum())
    first_two = BlockDataset(dataset.input_ids[:2], dataset.labels[:2])
    assert got["loss"] == pytest.approx(reference_metrics(model, first_two)["loss"], abs=1e-5)


def test_eval_mode_during_and_training_mode_restored():
    config = gpt2_config()
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.5  # dropout would show
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    dataset = make_dataset()
    ref = reference_metrics(model, dataset)  # leaves the model in eval mode
    assert evaluate(model, dataset)["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert not model.training
    model.train()
    assert evaluate(model, dataset)["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert model.training and all(m.training for m in model.modules())


class _Body(nn.Module):
    """Hidden state = one-hot of the input token."""

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=nn.functional.one_hot(input_ids, 4).float())


class _SuccessorLM(nn.Module):
    """4-token LM: after token i, the logit of ``(i + 1) % 4`` is ``s``, every other logit 0,
    plus the head's bias when given."""

    def __init__(self, s: float, bias: list[float] | None = None) -> None:
        super().__init__()
        self.config = SimpleNamespace()
        self.body = _Body()
        self.lm_head = nn.Linear(4, 4, bias=bias is not None)
        self.lm_head.weight.data = s * torch.eye(4).roll(1, dims=0)
        if bias is not None:
            self.lm_head.bias.data = torch.tensor(bias)

    @property
    def base_model(self) -> nn.Module:
        return self.body

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.lm_head(self.body(input_ids).last_hidden_state))


def test_accuracy_and_loss_by_hand():
    s = 2.0
    input_ids = torch.tensor([[0, 1, 2, 0, 3, 3]])
    labels = torch.tensor([[-100, 1, 2, 0, 3, -100]])
    # Targets and predictions: after 0 -> 1 (right), after 1 -> 2 (right), after 2 -> 0 (wrong,
    # predicts 3), after 0 -> 3 (wrong, predicts 1); the last position is masked.
    got = evaluate(_SuccessorLM(s), BlockDataset(input_ids, labels))
    lse = math.log(math.exp(s) + 3)
    expected_loss = (2 * (lse - s) + 2 * lse) / 4
    assert got["tokens"] == 4
    assert got["accuracy"] == 0.5
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-6)


def test_unknown_logit_transform_is_caught():
    model = make_model("cohere")
    model.config.logit_scale = None  # the forward still scales: evaluate would be wrong
    with pytest.raises(
        ValueError, match=r"CohereForCausalLM \(model_type .cohere.\): logits .* differ"
    ):
        evaluate(model, make_dataset())


def test_no_targets():
    dataset = make_dataset()
    dataset.labels[:, 1:] = -100
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate(make_model("gpt2"), dataset)


def test_head_bias_by_hand():
    s, b = 2.0, 5.0
    input_ids = torch.tensor([[0, 1, 2, 0, 3]])
    # The bias on token 3 outweighs the successor logit: every prediction is 3.
    got = evaluate(_SuccessorLM(s, bias=[0.0, 0.0, 0.0, b]), BlockDataset(input_ids, input_ids))
    # Targets 1, 2, 0, 3 after tokens 0, 1, 2, 0. Logits after token i: s at (i + 1) % 4,
    # b at 3 (s + b when the successor is 3, i.e. after token 2), 0 elsewhere.
    lse_plain = math.log(math.exp(s) + math.exp(b) + 2)  # after 0 or 1
    lse_after_2 = math.log(math.exp(s + b) + 3)
    losses = [lse_plain - s, lse_plain - s, lse_after_2 - 0.0, lse_plain - b]
    assert got["accuracy"] == 0.25
    assert got["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere"])
def test_distiller_eval_statistics_equal_evaluate(kind, monkeypatch):
    """DistillOutput's nll / correct / tokens (eval mode) are evaluate()'s numbers, computed
    in chunks of rows like it; in training they are zeros."""
    from fastkd.training import DistillConfig, Distiller

    student = make_model(kind)
    dataset = with_hits(student, make_dataset())
    expected = evaluate(student, dataset, batch_size=len(dataset))
    assert expected["accuracy"] > 0.3
    torch.manual_seed(5)
    teacher = LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE))
    monkeypatch.setattr(models_module, "CHUNK_ELEMENTS", 5 * VOCAB)  # several chunks
    distiller = Distiller(student, teacher, DistillConfig(alpha=0.7)).eval()
    with torch.no_grad():
        out = distiller(dataset.input_ids, labels=dataset.labels)
    assert (out.nll.dtype, out.correct.dtype, out.tokens.dtype) == (
        torch.float64,
        torch.int64,
        torch.int64,
    )
    assert out.tokens.shape == (len(dataset),)  # per sequence
    assert out.tokens.tolist() == (dataset.labels[:, 1:] != -100).sum(1).tolist()
    assert int(out.tokens.sum()) == expected["tokens"]
    assert int(out.correct.sum()) == round(expected["accuracy"] * expected["tokens"])
    nll = float(out.nll.sum()) / int(out.tokens.sum())
    assert nll == pytest.approx(expected["loss"], rel=1e-6)
    out = distiller.train()(dataset.input_ids, labels=dataset.labels)
    assert not out.tokens.any() and not out.correct.any() and not out.nll.any()
