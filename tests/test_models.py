"""Heads that transform their logits: the Distiller's loss equals the reference on each model's
own logits, and a transform fastkd does not know is refused at construction."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import fastkd
from fastkd.training import DistillConfig, Distiller
from fastkd.training.models import logit_options

V = 97
LLAMA_LIKE = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FALCON_H1 = dict(
    mamba_d_ssm=32,
    mamba_n_heads=4,
    mamba_d_head=8,
    mamba_d_state=8,
    mamba_n_groups=1,
    mamba_chunk_size=16,
)
# Architecture -> (config class, model class, its head's transform), scale / softcap as fastkd
# applies them.
HEADS = {
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.3), (0.3, None)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0), (0.25, None)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(head_dim=8, final_logit_softcapping=2.0),
        (1.0, 2.0),
    ),
    "hyperclovax": (
        "HyperCLOVAXConfig",
        "HyperCLOVAXForCausalLM",
        dict(logits_scaling=4.0),
        (4.0, None),
    ),
    "falcon_h1": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        dict(FALCON_H1, lm_head_multiplier=3.0),
        (3.0, None),
    ),
}


def make(kind: str, seed: int, hidden: int = 32) -> transformers.PreTrainedModel:
    config_cls, model_cls, extra, _ = HEADS[kind]
    torch.manual_seed(seed)
    shape = dict(hidden_size=hidden, intermediate_size=2 * hidden)
    config = getattr(transformers, config_cls)(**{**LLAMA_LIKE, **shape, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    # Fresh heads give logits of ~0.1, where a scale or softcap barely shows.
    model.get_output_embeddings().weight.data.mul_(30)
    return model


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def shifted(ids, mask):
    """transformers' causal-LM labels by hand: position t predicts token t + 1."""
    y = ids.masked_fill(mask == 0, -100)
    return torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], 1)


def reference(student, teacher, ids, mask, **kw):
    """fastkd's reference loss on the models' own logits."""
    zs = student(input_ids=ids, attention_mask=mask).logits.double()
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits.double()
    return fastkd.kd_loss(zs, zt, shifted(ids, mask), backend="reference", **kw)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_transform_loss_equals_reference(kind):
    student, teacher = make(kind, seed=1), make(kind, seed=2, hidden=48)
    assert logit_options(student) == HEADS[kind][3]
    kw = dict(temperature=2.0, alpha=0.4)
    ids, mask = batch()
    out = Distiller(student, teacher, DistillConfig(**kw))(ids, mask)
    expected = reference(student, teacher, ids, mask, **kw)
    assert math.isclose(float(out.loss.detach()), float(expected.detach()), rel_tol=1e-5)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    expected.backward()
    for name, p in student.named_parameters():  # fp32 rounding, relative to the largest entry
        atol = 1e-5 * float(p.grad.abs().max())
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=atol, msg=name)

    # The transform matters: the loss on the untransformed logits is far off.
    plain = fastkd.kd_loss(
        raw_logits(student, ids, mask), raw_logits(teacher, ids, mask), shifted(ids, mask), **kw
    )
    assert abs(float(plain) - float(out.loss.detach())) > 0.05 * float(plain)


@torch.no_grad()
def raw_logits(model, ids, mask):
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.get_output_embeddings()(hidden).double()


class TimesThreeLM(transformers.LlamaForCausalLM):
    """A head fastkd does not model: the forward triples the logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 3 * out.logits
        return out


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_unknown_head_transform_is_refused(role):
    torch.manual_seed(0)
    odd = TimesThreeLM(transformers.LlamaConfig(**LLAMA_LIKE))
    plain = make("granite", seed=1)
    models = (odd, plain) if role == "student" else (plain, odd)
    with pytest.raises(ValueError, match=r"TimesThreeLM \(model_type 'llama'\).*relative error"):
        Distiller(*models, DistillConfig())


def test_config_that_disagrees_with_the_forward_is_refused():
    """A Cohere whose config lost ``logit_scale`` while its forward still scales."""
    model = make("cohere", seed=1)
    model.config.logit_scale = None
    with pytest.raises(ValueError, match=r"CohereForCausalLM \(model_type 'cohere'\)"):
        Distiller(make("cohere", seed=2), model, DistillConfig())


MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, head_dim=8),
    ),
}


def moe(kind: str, router_logits: bool) -> transformers.PreTrainedModel:
    config_cls, model_cls, extra = MOE[kind]
    torch.manual_seed(1)
    config = getattr(transformers, config_cls)(
        **LLAMA_LIKE,
        **extra,
        num_experts_per_tok=2,
        output_router_logits=router_logits,
        router_aux_loss_coef=0.05,
    )
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("kind", sorted(MOE))
def test_moe_router_loss_is_the_models_own(kind):
    student, teacher = moe(kind, router_logits=True), make("granite", seed=2)
    kw = dict(temperature=2.0, alpha=0.4)
    d = Distiller(student, teacher, DistillConfig(**kw))
    assert d.active_parts == ("kd", "ce", "aux")
    ids, mask = batch()
    out = d(ids, mask)
    own = student(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert float(own.aux_loss.detach()) > 0
    assert math.isclose(float(out.aux), 0.05 * float(own.aux_loss.detach()), rel_tol=1e-5)
    # The whole loss and its gradients (router weights included) are the reference KD loss
    # plus the model's own weighted router loss.
    expected = reference(student, teacher, ids, mask, **kw) + 0.05 * own.aux_loss
    assert math.isclose(float(out.loss.detach()), float(expected.detach()), rel_tol=1e-5)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    expected.backward()
    for name, p in student.named_parameters():
        atol = 1e-5 * float(p.grad.abs().max())
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=atol, msg=name)


def test_moe_without_router_logits_has_no_router_loss():
    """As in the model's own forward, ``output_router_logits=False`` leaves the term out."""
    student = moe("mixtral", router_logits=False)
    d = Distiller(student, make("granite", seed=2), DistillConfig())
    assert "aux" not in d.active_parts
    assert float(d(*batch()).aux) == 0.0


class DoubleRouterLossMixtral(transformers.MixtralForCausalLM):
    """A router loss fastkd does not model: the forward doubles it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.aux_loss = 2 * out.aux_loss
        return out


def test_unknown_router_loss_is_refused():
    student = DoubleRouterLossMixtral(moe("mixtral", router_logits=True).config)
    with pytest.raises(ValueError, match=r"DoubleRouterLossMixtral \(model_type 'mixtral'\)"):
        Distiller(student, make("granite", seed=2), DistillConfig())
