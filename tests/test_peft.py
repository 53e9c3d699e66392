"""LoRA students (peft): the loss and gradients of the plain reference, only adapters trained,
adapter and merged saves that peft and transformers load, resume."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import fastkd
from fastkd.training import DistillConfig, Distiller

V = 97
CFG = DistillConfig(temperature=2.0, alpha=0.3)


def llama(hidden=32, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1
    )
    return transformers.GPT2LMHeadModel(config).eval()


def llama_with_head_bias(seed=0):
    model = llama(seed=seed)
    model.lm_head = torch.nn.Linear(32, V, bias=True)
    return model


def lora(base, targets, dropout=0.0, fan_in_fan_out=False):
    # init_lora_weights=False: B is random too, so the adapters change the logits from step 0.
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        lora_dropout=dropout,
        init_lora_weights=False,
        fan_in_fan_out=fan_in_fan_out,
        lora_bias=base.lm_head.bias is not None,  # LoRA's B gets a bias where the head has one
    )
    torch.manual_seed(7)
    return get_peft_model(base, config)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def reference(student, teacher, ids, mask, **kw):
    """fastkd's reference loss on ``model(...).logits`` (the peft model's own forward)."""
    y = ids.masked_fill(mask == 0, -100)
    y = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], 1)
    zs = student(input_ids=ids, attention_mask=mask).logits.double()
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits.double()
    return fastkd.kd_loss(zs, zt, y, backend="reference", **kw)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "make_base, targets, dropout, fan_in_fan_out",
    [
        (llama, ["q_proj", "v_proj"], 0.0, False),
        (llama, ["q_proj", "lm_head"], 0.0, False),
        (llama, ["v_proj", "down_proj", "lm_head"], 0.3, False),
        (gpt2, ["c_attn"], 0.0, True),  # Conv1D weights: fan_in_fan_out
        (llama_with_head_bias, ["lm_head"], 0.0, False),
    ],
    ids=["attention", "attention+head", "mlp+head-dropout", "gpt2-conv1d", "head-bias"],
)
def test_loss_and_gradients_equal_reference(make_base, targets, dropout, fan_in_fan_out):
    student = lora(make_base(seed=1), targets, dropout, fan_in_fan_out)
    teacher = llama(48, seed=2)
    d = Distiller(student, teacher, CFG)
    ids, mask = batch()
    # With dropout, in training mode: the same seed draws the same masks in both runs, since
    # the Distiller applies the head's LoRA dropout on the same input as peft's forward.
    d.train(dropout > 0)
    torch.manual_seed(3)
    out = d(ids, mask)
    out.loss.backward()
    fused = grads(student)
    student.zero_grad()
    torch.manual_seed(3)
    expected = reference(student, teacher, ids, mask, temperature=2.0, alpha=0.3)
    expected.backward()
    assert math.isclose(float(out.loss.detach()), float(expected.detach()), rel_tol=1e-5)

    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert set(fused) == trainable  # the frozen base gets no gradient
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert fused[name].abs().sum() > 0, name
            torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    if "lm_head" in targets:
        assert any("lm_head.lora_" in n for n in fused)
    assert all(p.grad is None for p in teacher.parameters())


def trained(targets=("q_proj", "v_proj", "lm_head")):
    """A LoRA Distiller after two SGD steps."""
    d = Distiller(lora(llama(seed=1), list(targets)), llama(48, seed=2), CFG)
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.5)
    ids, mask = batch()
    for _ in range(2):
        opt.zero_grad()
        d(ids, mask).loss.backward()
        opt.step()
    return d


@torch.no_grad()
def logits(model):
    ids, mask = batch()
    return model.eval()(input_ids=ids, attention_mask=mask).logits


def test_adapter_save_loads_with_peft(tmp_path):
    d = trained()
    d.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob("model*.safetensors"))  # the adapter, not the student
    loaded = PeftModel.from_pretrained(llama(seed=1), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(d.student), rtol=0, atol=1e-6)


def test_merged_save_loads_with_from_pretrained(tmp_path):
    d = trained()
    before = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    expected = logits(d.student)
    d.save_pretrained(tmp_path, merge=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    # The training model is untouched: still adapted, bit for bit.
    assert isinstance(d.student, PeftModel)
    for n, p in d.student.named_parameters():
        assert torch.equal(p, before[n]), n
    torch.testing.assert_close(logits(d.student), expected, rtol=0, atol=0)


def test_resume_restores_the_adapter_exactly(tmp_path):
    d = trained()
    d.save_pretrained(tmp_path)
    fresh = Distiller(lora(llama(seed=1), ["q_proj", "v_proj", "lm_head"]), llama(48, seed=2), CFG)
    fresh.load_weights(tmp_path)
    for (n, p), q in zip(d.student.named_parameters(), fresh.student.parameters()):
        assert torch.equal(p, q), n


def test_save_and_load_errors(tmp_path):
    d = trained()
    d.save_pretrained(tmp_path / "merged", merge=True)
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors"):
        d.load_weights(tmp_path / "merged")
    other = Distiller(lora(llama(seed=1), ["q_proj"]), llama(48, seed=2), CFG)
    d.save_pretrained(tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="adapter weights do not match"):
        other.load_weights(tmp_path / "adapter")
    plain = Distiller(llama(seed=1), llama(48, seed=2), CFG)
    with pytest.raises(ValueError, match="merge=True merges LoRA adapters"):
        plain.save_pretrained(tmp_path / "plain", merge=True)
    assert not (tmp_path / "plain").exists()


def test_evaluate_a_lora_model():
    """evaluate() runs a peft model's adapted head too: its loss is the model's own."""
    from fastkd.training.data import BlockDataset
    from fastkd.training.evaluate import evaluate

    model = trained().student.eval()
    ids, _ = batch()
    with torch.no_grad():
        own = model(input_ids=ids, labels=ids).loss
    got = evaluate(model, BlockDataset(ids, ids.clone()), batch_size=2)
    assert got["loss"] == pytest.approx(float(own), rel=1e-5)
