"""Benchmark of one distillation training step of the demo's models (Llama-style teacher and
student, ``fastkd demo``'s sizes, ``case.vocab`` tokens), forward + backward + optimizer step:
fastkd's Distiller (fused loss on hidden states) against eager PyTorch (both models' full
logits, the hand-written loss). The floor is the models' bodies alone (teacher forward,
student forward and backward, no head, no loss): what any distillation step must compute."""

from __future__ import annotations

import torch
import transformers

from fastkd.bench.eager import eager_kd_loss
from fastkd.bench.harness import Case, Runner
from fastkd.training import DistillConfig, Distiller
from fastkd.training.demo import DEFAULT

MODES = ("full",)
BLOCK = DEFAULT.block_size


def _models(case: Case):
    def build(sizes, seed):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=case.vocab, max_position_embeddings=BLOCK, tie_word_embeddings=False, **sizes
        )
        return transformers.LlamaForCausalLM(config).to(case.device, case.torch_dtype)

    teacher = build(DEFAULT.teacher, 0).eval().requires_grad_(False)
    student = build(DEFAULT.student, 1)
    g = torch.Generator(device=case.device).manual_seed(0)
    ids = torch.randint(0, case.vocab, (case.bt // BLOCK, BLOCK), generator=g, device=case.device)
    return teacher, student, ids


def _step(student, loss_fn) -> Runner:
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def full():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Runner(loss_fn, lambda loss: loss.backward(), full=full)


def _fastkd(case: Case) -> Runner:
    teacher, student, ids = _models(case)
    distiller = Distiller(
        student, teacher, DistillConfig(temperature=case.temperature, alpha=case.alpha)
    )
    return _step(student, lambda: distiller(ids).loss)


def _eager(case: Case) -> Runner:
    teacher, student, ids = _models(case)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).reshape(-1)

    def loss():
        with torch.no_grad():
            zt = teacher(input_ids=ids).logits
        zs = student(input_ids=ids).logits
        keep = labels != -100
        return eager_kd_loss(
            zs.reshape(-1, case.vocab)[keep],
            zt.reshape(-1, case.vocab)[keep],
            labels[keep],
            temperature=case.temperature,
            alpha=case.alpha,
        )

    return _step(student, loss)


def _floor(case: Case) -> Runner:
    teacher, student, ids = _models(case)

    def loss():
        with torch.no_grad():
            teacher.base_model(input_ids=ids)
        return student.base_model(input_ids=ids).last_hidden_state.float().square().mean()

    return _step(student, loss)


def contenders(case: Case) -> dict:
    return {
        "floor": lambda: _floor(case),
        "fastkd": lambda: _fastkd(case),
        "eager": lambda: _eager(case),
    }


def work(case: Case, mode: str) -> tuple[float, float]:
    return 0.0, 0.0


# The cases of `fastkd bench` (Case fields beyond op, dtype and device).
QUICK_CASES = [dict(bt=256, vocab=2048)]
CPU_CASES = [dict(bt=2048, vocab=8192)]
GPU_CASES = [dict(bt=8192, vocab=128256)]
