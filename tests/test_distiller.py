"""Distiller: every loss part against values computed by hand from the models' own outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import fastkd
from fastkd.training import DistillConfig, Distiller, progressive_distill
from fastkd.training.distiller import map_layer, select_layers

V = 97


def llama(hidden=32, layers=2, vocab=V, seed=0, heads=4):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(hidden=32, layers=2, vocab=V, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def batch(seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    return ids, mask, labels


def shifted_targets(ids, mask, labels):
    """The transformers causal-LM convention, by hand: position t predicts labels[t + 1]."""
    y = labels.masked_fill(mask == 0, -100)
    return torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], 1)


def reference_kd(student, teacher, ids, mask, labels, **kw):
    zs = student(input_ids=ids, attention_mask=mask).logits.double()
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits.double()
    return fastkd.kd_loss(zs, zt, shifted_targets(ids, mask, labels), backend="reference", **kw)


@pytest.mark.parametrize(
    "make_student, make_teacher, vocab",
    [
        (lambda: llama(32, 2, seed=1), lambda: llama(48, 3, seed=2), None),
        (lambda: gpt2(32, 2, seed=1), lambda: gpt2(64, 3, seed=2), None),
        (lambda: gpt2(32, 2, vocab=V + 4, seed=1), lambda: llama(48, 3, seed=2), "pad"),
        (lambda: llama(32, 2, seed=1), lambda: gpt2(48, 2, vocab=V + 9, seed=2), "truncate"),
    ],
    ids=["llama", "gpt2", "gpt2-from-llama-pad", "llama-from-gpt2-truncate"],
)
def test_kd_loss_equals_reference_on_materialized_logits(make_student, make_teacher, vocab):
    student, teacher = make_student(), make_teacher()
    kw = dict(temperature=2.0, alpha=0.3, divergence="jsd", beta=0.4, vocab=vocab)
    ids, mask, labels = batch()
    out = Distiller(student, teacher, DistillConfig(**kw))(ids, mask, labels)
    expected = reference_kd(student, teacher, ids, mask, labels, **kw)
    assert math.isclose(float(out.loss.detach()), float(expected.detach()), rel_tol=2e-5)
    ce_only = reference_kd(student, teacher, ids, mask, labels, alpha=1.0, vocab=vocab)
    assert math.isclose(float(out.ce), 0.3 * float(ce_only.detach()), rel_tol=2e-5)
    assert math.isclose(float(out.kd + out.ce), float(out.loss.detach()), rel_tol=1e-6)
    # Gradients reach the student only, and match the reference's.
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    expected.backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_labels_default_to_input_ids_and_padding_is_ignored():
    student, teacher = llama(seed=1), llama(48, 3, seed=2)
    ids, mask, _ = batch(seed=3)
    d = Distiller(student, teacher, DistillConfig(alpha=0.5))
    expected = reference_kd(student, teacher, ids, mask, ids, alpha=0.5)
    assert math.isclose(float(d(ids, mask).loss.detach()), float(expected.detach()), rel_tol=2e-5)


def test_feature_loss_by_hand():
    student, teacher = llama(32, 2, seed=1), llama(48, 4, seed=2)
    cfg = DistillConfig(feature_weight=0.7, feature_layers="all", feature_loss="mse", alpha=0.5)
    d = Distiller(student, teacher, cfg)
    assert sorted(d.projections) == ["t0_l1", "t0_l2"]
    ids, mask, labels = batch(seed=4)
    out = d(ids, mask, labels)
    hs = student.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ht = teacher.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    valid = mask.bool()
    expected = 0.0
    for i, j in ((1, 2), (2, 4)):  # student layer i <-> teacher layer round(i * 4 / 2)
        proj = d.projections[f"t0_l{i}"]
        diff = proj(hs.hidden_states[i][valid]) - ht.hidden_states[j][valid]
        expected += float((diff**2).mean().detach()) / 2
    assert math.isclose(float(out.feature), 0.7 * expected, rel_tol=1e-5)
    assert math.isclose(
        float(out.loss.detach()), float(out.kd + out.ce + out.feature), rel_tol=1e-6
    )

    cos = Distiller(student, teacher, cfg.replace(feature_loss="cosine", feature_layers=[2]))
    got = cos(ids, mask, labels).feature
    s = cos.projections["t0_l2"](hs.hidden_states[2][valid])
    by_hand = (1 - F.cosine_similarity(s, ht.hidden_states[4][valid], dim=-1)).mean()
    assert math.isclose(float(got), 0.7 * float(by_hand.detach()), rel_tol=1e-5)


def test_feature_projections_are_trained():
    student, teacher = llama(32, 2, seed=1), llama(48, 2, seed=2)
    d = Distiller(student, teacher, DistillConfig(feature_weight=1.0, feature_layers="key"))
    ids, mask, labels = batch()
    d(ids, mask, labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.projections.parameters())
    assert {n.split(".")[0] for n, _ in d.named_parameters()} == {"student", "projections"}


def test_attention_loss_by_hand():
    student, teacher = llama(32, 2, seed=1, heads=4), llama(48, 4, seed=2, heads=8)
    cfg = DistillConfig(attention_weight=0.5, attention_layers=[1, 2], alpha=0.5)
    d = Distiller(student, teacher, cfg)
    ids, mask, labels = batch(seed=5)
    out = d(ids, mask, labels)
    a_s = student.base_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    a_t = teacher.base_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()
    expected = 0.0
    for i, j in ((1, 2), (2, 4)):
        p = a_t[j - 1].mean(1)[valid].double()
        q = a_s[i - 1].mean(1)[valid].double()
        kl = torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1).mean()
        expected += float(kl.detach()) / 2
    assert expected > 0
    assert math.isclose(float(out.attention), 0.5 * expected, rel_tol=1e-4)


@pytest.mark.parametrize("mode", ["logits", "mixture", "losses"])
def test_multi_teacher(mode):
    student = llama(32, 2, seed=1)
    teachers = [llama(48, 3, seed=2), gpt2(40, 2, seed=3)]
    cfg = DistillConfig(alpha=0.25, temperature=1.5, teacher_weights=[3.0, 1.0], multi_teacher=mode)
    ids, mask, labels = batch(seed=6)
    got = Distiller(student, teachers, cfg)(ids, mask, labels).loss
    y = shifted_targets(ids, mask, labels)
    zs = student(input_ids=ids, attention_mask=mask).logits.double()
    with torch.no_grad():
        zt = [t(input_ids=ids, attention_mask=mask).logits.double() for t in teachers]
    kw = dict(temperature=1.5, backend="reference")
    if mode == "logits":
        expected = fastkd.kd_loss(zs, 0.75 * zt[0] + 0.25 * zt[1], y, alpha=0.25, **kw)
    elif mode == "mixture":  # T log p of p = sum_k w_k softmax(z_k / T): softmax(. / T) = p
        p = 0.75 * torch.softmax(zt[0] / 1.5, -1) + 0.25 * torch.softmax(zt[1] / 1.5, -1)
        expected = fastkd.kd_loss(zs, 1.5 * p.log(), y, alpha=0.25, **kw)
    else:
        expected = 0.25 * fastkd.kd_loss(zs, zt[0], y, alpha=1.0, **kw) + sum(
            0.75 * w * fastkd.kd_loss(zs, z, y, alpha=0.0, **kw) for w, z in zip((0.75, 0.25), zt)
        )
    assert math.isclose(float(got.detach()), float(expected.detach()), rel_tol=2e-5)


def test_self_distillation():
    student = llama(seed=1)
    ids, mask, labels = batch()
    frozen = Distiller(student, None, DistillConfig(self_distillation="frozen", alpha=0.0))
    assert frozen.teachers[0] is not student
    assert (
        abs(float(frozen(ids, mask, labels).loss.detach())) < 1e-5
    )  # student == teacher at the start

    ema = Distiller(student, None, DistillConfig(self_distillation="ema", ema_decay=0.9))
    teacher = ema.teachers[0]
    before = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update_teacher()
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_progressive_distillation():
    teacher = llama(64, 3, seed=1)
    stages = [llama(48, 2, seed=2), llama(32, 1, seed=3)]
    seen = []

    def train(d):
        seen.append(d.teachers[0])
        opt = torch.optim.SGD(d.parameters(), lr=0.1)
        ids, mask, labels = batch()
        for _ in range(2):
            opt.zero_grad()
            d(ids, mask, labels).loss.backward()
            opt.step()

    done = progressive_distill(teacher, stages, DistillConfig(), train)
    assert done == stages and seen == [teacher, stages[0]]
    assert not any(p.requires_grad for p in stages[0].parameters())


def test_layer_selection_and_mapping():
    assert select_layers("all", 4, 2) == [1, 2, 3, 4]
    assert select_layers("key", 12, 0) == [1, 6, 12]
    assert select_layers("late", 12, 3) == [10, 11, 12]
    assert select_layers("auto", 12, 4) == [3, 6, 9, 12]
    assert select_layers([3, 1, 3], 4, 0) == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        select_layers([0, 5], 4, 0)
    assert [map_layer(i, 4, 8) for i in (1, 2, 3, 4)] == [2, 4, 6, 8]
    assert [map_layer(i, 3, 2) for i in (1, 2, 3)] == [1, 1, 2]


def test_config_files(tmp_path):
    (tmp_path / "c.yaml").write_text("temperature: 3.0\nalpha: 0.1\nfeature_layers: [1, 2]\n")
    cfg = DistillConfig.from_file(tmp_path / "c.yaml")
    assert (cfg.temperature, cfg.alpha, cfg.feature_layers) == (3.0, 0.1, [1, 2])
    (tmp_path / "c.json").write_text('{"divergence": "tvd", "seed": 4}')
    assert DistillConfig.from_file(tmp_path / "c.json").divergence == "tvd"
    (tmp_path / "bad.json").write_text('{"temprature": 3}')
    with pytest.raises(ValueError, match="unknown settings"):
        DistillConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        DistillConfig.from_file(tmp_path / "c.toml")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"feature_weight": -1}, "feature_weight"),
        ({"feature_loss": "l1"}, "feature_loss"),
        ({"feature_layers": "middle"}, "feature_layers"),
        ({"attention_layers": []}, "attention_layers"),
        ({"multi_teacher": "vote"}, "multi_teacher"),
        ({"self_distillation": "copy"}, "self_distillation"),
        ({"teacher_weights": [-1, 2]}, "teacher_weights"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"feature_num_layers": 0}, "feature_num_layers"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_distiller_errors():
    student = llama()
    with pytest.raises(ValueError, match="pass a teacher"):
        Distiller(student, None, DistillConfig())
    with pytest.raises(ValueError, match="teachers=None"):
        Distiller(student, llama(), DistillConfig(self_distillation="frozen"))
    with pytest.raises(ValueError, match="teacher_weights has 1"):
        Distiller(student, [llama(), llama()], DistillConfig(teacher_weights=[1.0]))
    with pytest.raises(ValueError, match="one vocabulary"):
        Distiller(student, [llama(), gpt2(vocab=V + 1)], DistillConfig())
    with pytest.raises(ValueError, match="vocab"):  # vocabularies differ, no vocab mode
        Distiller(student, gpt2(vocab=V + 3), DistillConfig())(*batch())


class _Gradients(transformers.TrainerCallback):
    """The trainable parameters' gradients just before the (first) optimizer step."""

    def __init__(self, distiller):
        self.distiller, self.grads = distiller, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = self.distiller.named_parameters()
        self.grads = {n: p.grad.clone() for n, p in params if p.grad is not None}


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_in_the_trainer(tmp_path, lora):
    """``TrainingArguments(gradient_checkpointing=True)``: the Trainer switches it on through
    the Distiller, and one step gives the loss and gradients of the run without it."""
    from peft import LoraConfig, get_peft_model

    from fastkd.training import DistillationTrainer

    ids, mask, labels = batch()
    data = [dict(input_ids=i, attention_mask=m, labels=y) for i, m, y in zip(ids, mask, labels)]
    runs = []
    for checkpointing in (False, True):
        student = llama(seed=1)
        if lora:
            student = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        d = Distiller(student, llama(48, 3, seed=2), DistillConfig(alpha=0.5))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)),
            max_steps=1,
            per_device_train_batch_size=len(data),
            gradient_checkpointing=checkpointing,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        seen = _Gradients(d)
        trainer = DistillationTrainer(d, args, train_dataset=data, callbacks=[seen])
        trainer.train()
        assert d.is_activation_checkpointing == checkpointing
        runs.append((trainer.state.log_history[0]["loss"], seen.grads))
        d.gradient_checkpointing_disable()
        assert not d.is_activation_checkpointing
    (loss, grads), (loss_gc, grads_gc) = runs
    assert loss == pytest.approx(loss_gc, rel=1e-6)
    assert grads.keys() == grads_gc.keys() and grads
    assert all(".lora_" in n for n in grads) == lora
    for name, g in grads.items():
        torch.testing.assert_close(grads_gc[name], g, rtol=1e-5, atol=1e-7, msg=name)
