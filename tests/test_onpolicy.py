"""On-policy KD and sequence-level KD (fastkd.training.onpolicy): what each training batch
holds (recorded by a forward pre-hook on the Distiller), its loss against the fp64 reference,
the share of generated batches, the errors, and ``fastkd distill`` with the flags."""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch
import transformers
from conftest import tiny_llama

import fastkd
from fastkd.cli import main, parse_distill_args
from fastkd.training import DistillationTrainer, DistillConfig, Distiller, onpolicy
from fastkd.training.data import load_dataset, stdlib_corpus, train_tokenizer
from fastkd.training.run import training_arguments

BLOCK = 16
PROMPT = 6
EOS = torch.tensor([2])  # fsdp_llama's eos


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    text = stdlib_corpus(30_000)
    (root / "data.txt").write_text(text)
    tokenizer = train_tokenizer([text], 300)
    teacher = tiny_llama(tokenizer, 32, 2, seed=0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "student.json").write_text(json.dumps(tiny_llama(tokenizer).config.to_dict()))
    train, _ = load_dataset(root / "data.txt", tokenizer, BLOCK, 0.1, 0)
    return types.SimpleNamespace(root=root, tokenizer=tokenizer, train=train)


def make_trainer(ws, out, config, steps=2, accumulation=1, callbacks=None, **options):
    teacher = transformers.AutoModelForCausalLM.from_pretrained(ws.root / "teacher")
    student = tiny_llama(ws.tokenizer, 32, 1, seed=1)
    args = training_arguments(
        out,
        max_steps=steps,
        batch_size=2,
        learning_rate=3e-3,
        seed=0,
        logging_steps=1,
        gradient_accumulation_steps=accumulation,
        disable_tqdm=True,
        **{"save_strategy": "no", **options},
    )
    distiller = Distiller(student, teacher, config)
    return DistillationTrainer(distiller, args, train_dataset=ws.train, callbacks=callbacks)


def record(trainer):
    """Each training forward's keyword arguments, optimizer step, micro-batch number within
    the step, student (a copy of it as the forward sees it, in eval mode) and output."""
    calls = []

    def before(module, args, kwargs):
        step = trainer.state.global_step
        index = calls[-1]["index"] + 1 if calls and calls[-1]["step"] == step else 0
        student = copy.deepcopy(module.student).eval()
        calls.append({"kwargs": kwargs, "step": step, "index": index, "student": student})

    def after(module, args, kwargs, output):
        calls[-1]["out"] = output

    trainer.distiller.register_forward_pre_hook(before, with_kwargs=True)
    trainer.distiller.register_forward_hook(after, with_kwargs=True)
    return calls


def sampled(model, prompts, seed, new_tokens):
    """The model's own sampling at temperature 1, top-p 1, no top-k, from ``seed``."""
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=config
        )
    return out[:, prompts.shape[1] :]


def check_generated(call, model, ws, eos):
    """The batch of ``call`` is a training block's prompt and ``model``'s continuation."""
    kw = call["kwargs"]
    ids, mask, labels = kw["input_ids"], kw["attention_mask"], kw["labels"]
    assert ids.shape == (2, BLOCK)
    blocks = ws.train.input_ids[:, :PROMPT]
    for row in ids[:, :PROMPT]:  # the prompt is the start of a training block
        assert (blocks == row).all(1).any()
    assert (labels[:, :PROMPT] == -100).all()
    seed = onpolicy.generation_seed(0, call["step"], call["index"])
    want = sampled(model, ids[:, :PROMPT], seed, BLOCK - PROMPT)
    for r in range(2):
        got = ids[r, PROMPT:]
        n = int(mask[r, PROMPT:].sum())  # up to and with the first eos
        stop = (want[r] == eos).nonzero()
        assert n == (int(stop[0]) + 1 if len(stop) else BLOCK - PROMPT)
        assert torch.equal(got[:n], want[r, :n])
        assert torch.equal(labels[r, PROMPT : PROMPT + n], want[r, :n])
        assert (labels[r, PROMPT + n :] == -100).all() and (mask[r, PROMPT + n :] == 0).all()


def reference_loss(call, teacher, config, ce):
    """The batch's loss by fastkd.kd_loss's fp64 reference on the full logits."""
    kw = call["kwargs"]
    ids, mask = kw["input_ids"], kw["attention_mask"]
    labels = kw["labels"].masked_fill(mask == 0, -100)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    with torch.no_grad():
        zs = copy.deepcopy(call["student"]).double()(input_ids=ids, attention_mask=mask).logits
        zt = copy.deepcopy(teacher).double()(input_ids=ids, attention_mask=mask).logits
    return fastkd.kd_loss(
        zs,
        zt,
        targets,
        backend="reference",
        temperature=config.temperature,
        divergence=config.divergence,
        kd_weight=1 - config.alpha,
        ce_weight=config.alpha if ce else 0.0,
    )


def test_fraction_zero_is_off_policy_training(ws, tmp_path, monkeypatch):
    plain = make_trainer(ws, tmp_path / "plain", DistillConfig(), steps=3)
    plain.train()
    monkeypatch.setattr(onpolicy, "generated_batch", None)  # a call would fail
    config = DistillConfig(on_policy_fraction=0.0, prompt_tokens=3, generation_temperature=0.5)
    zero = make_trainer(ws, tmp_path / "zero", config, steps=3)
    assert zero.on_policy is None
    zero.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, zero)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    for (name, a), b in zip(
        plain.distiller.state_dict().items(), zero.distiller.state_dict().values()
    ):
        assert torch.equal(a, b), name


def test_fraction_one_trains_on_the_students_samples(ws, tmp_path):
    config = DistillConfig(
        on_policy_fraction=1.0, prompt_tokens=PROMPT, divergence="reverse_kl", alpha=0.3
    )
    trainer = make_trainer(ws, tmp_path / "run", config, steps=2, accumulation=2)
    calls = record(trainer)
    trainer.train()
    assert len(calls) == 4 and trainer.on_policy.generated == 4
    assert [(c["step"], c["index"]) for c in calls] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    eos = ws.tokenizer.eos_token_id
    teacher = trainer.distiller.teachers[0]
    for call in calls:
        assert call["kwargs"]["hard_labels"] is False
        check_generated(call, call["student"], ws, eos)
        out = call["out"]
        assert float(out.ce) == 0.0
        want = reference_loss(call, teacher, config, ce=False)
        assert math.isclose(float(out.loss.detach()), float(want), rel_tol=1e-5), (out.loss, want)


def test_seq_kd_trains_on_the_teachers_samples_with_ce(ws, tmp_path):
    config = DistillConfig(on_policy_fraction=1.0, seq_kd=True, prompt_tokens=PROMPT)
    trainer = make_trainer(ws, tmp_path / "run", config, steps=2)
    calls = record(trainer)
    trainer.train()
    teacher = trainer.distiller.teachers[0]
    assert len(calls) == 2
    for call in calls:
        assert call["kwargs"]["hard_labels"] is True
        check_generated(call, teacher, ws, ws.tokenizer.eos_token_id)
        out = call["out"]
        assert float(out.ce) > 0
        want = reference_loss(call, teacher, config, ce=True)
        assert math.isclose(float(out.loss.detach()), float(want), rel_tol=1e-5), (out.loss, want)


def test_a_fraction_mixes_generated_and_data_batches(ws, tmp_path):
    config = DistillConfig(
        on_policy_fraction=0.5, prompt_tokens=PROMPT, generation_temperature=0.0, seed=3
    )
    trainer = make_trainer(ws, tmp_path / "run", config, steps=4, accumulation=2)
    calls = record(trainer)
    trainer.train()
    drawn = [onpolicy.draw(3, c["step"], c["index"], 0.5) for c in calls]
    generated = ["hard_labels" in c["kwargs"] for c in calls]
    assert len(calls) == 8 and generated == drawn and 0 < sum(drawn) < 8
    assert trainer.on_policy.generated == sum(drawn)
    for call, gen in zip(calls, generated):
        ids = call["kwargs"]["input_ids"]
        if gen:  # greedy: the student's argmax continuation
            with torch.no_grad():
                want = (
                    call["student"]
                    .float()
                    .generate(
                        input_ids=ids[:, :PROMPT],
                        attention_mask=torch.ones_like(ids[:, :PROMPT]),
                        do_sample=False,
                        max_new_tokens=BLOCK - PROMPT,
                    )[:, PROMPT:]
                )
            n = int(call["kwargs"]["attention_mask"][0].sum()) - PROMPT
            assert torch.equal(ids[0, PROMPT : PROMPT + n], want[0, :n])
        else:  # a training block as it is
            assert (ws.train.input_ids == ids[0]).all(1).any()
    # The same seed draws the same batches whatever the fraction (one draw per batch).
    assert [onpolicy.draw(3, c["step"], c["index"], 1.0) for c in calls] == [True] * 8


class StopAt(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == 2


def test_a_resumed_run_generates_what_the_uninterrupted_one_did(ws, tmp_path):
    config = DistillConfig(on_policy_fraction=0.5, prompt_tokens=PROMPT, seed=1)
    full = make_trainer(ws, tmp_path / "full", config, steps=4, accumulation=2)
    full_calls = record(full)
    full.train()
    cut = tmp_path / "cut"
    make_trainer(ws, cut, config, 4, 2, [StopAt()], save_strategy="steps", save_steps=2).train()
    resumed = make_trainer(ws, cut, config, steps=4, accumulation=2)
    calls = record(resumed)
    resumed.train(resume_from_checkpoint=str(cut / "checkpoint-2"))
    assert [(c["step"], c["index"]) for c in calls] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    generated = ["hard_labels" in c["kwargs"] for c in full_calls[4:]]
    assert any(generated) and not all(generated)  # after the cut: both kinds
    for a, b in zip(full_calls[4:], calls):
        assert a["kwargs"].keys() == b["kwargs"].keys()
        assert torch.equal(a["kwargs"]["input_ids"], b["kwargs"]["input_ids"])
    for (name, a), b in zip(
        full.distiller.state_dict().items(), resumed.distiller.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def fsdp_worker(rank: int, store: str, out: str) -> None:
    """On each of 2 gloo ranks: a sharded Distiller's generated batch (rank 1's generator ends
    every row at once: the ranks stop at different times), its loss after a backward, and the
    unsharded Distiller's batch from the same seed."""
    import torch.distributed as dist

    from fastkd.training.fsdp import shard_distiller

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    try:
        for seq_kd in (False, True):
            config = DistillConfig(on_policy_fraction=1.0, seq_kd=seq_kd, prompt_tokens=4)
            made = [Distiller(fsdp_llama(1, 32), fsdp_llama(0, 48), config) for _ in range(2)]
            sharded, plain = shard_distiller(made[0]), made[1]
            if rank == 1:
                for d in (sharded, plain):
                    generator = d.teachers[0] if seq_kd else d.student
                    generator.lm_head.register_forward_hook(
                        lambda m, i, o: o.index_fill(-1, EOS, 99)
                    )
            ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(rank))
            got = onpolicy.generated_batch(sharded, {"input_ids": ids}, seed=rank)
            sharded(**got).loss.backward()
            want = onpolicy.generated_batch(plain, {"input_ids": ids}, seed=rank)
            results[seq_kd] = (got, want)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_llama(seed: int, hidden: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.mark.slow
def test_sharded_generation_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(fsdp_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        results = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=False)
        for got, want in results.values():
            assert got["hard_labels"] == want["hard_labels"]
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(got[key], want[key]), (rank, key)
            if rank == 1:  # the prompt and an eos
                assert got["attention_mask"].sum(1).tolist() == [5, 5]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"on_policy_fraction": 1.5}, "on_policy_fraction must be in [0, 1]"),
        ({"on_policy_fraction": -0.1}, "on_policy_fraction must be in [0, 1]"),
        ({"on_policy_fraction": float("nan")}, "on_policy_fraction must be a number"),
        ({"seq_kd": True}, "set on_policy_fraction > 0"),
        ({"on_policy_fraction": 0.5, "alpha": 1.0}, "whose weight 1 - alpha is 0"),
        ({"generation_temperature": -1.0}, "generation_temperature must be >= 0"),
        ({"generation_top_p": 0.0}, "generation_top_p must be in (0, 1]"),
        ({"prompt_tokens": 0}, "prompt_tokens must be an int >= 1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an int >= 1"),
    ],
)
def test_config_errors(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        DistillConfig(**settings)


def test_seq_kd_with_alpha_one_is_sequence_level_kd():
    DistillConfig(on_policy_fraction=1.0, seq_kd=True, alpha=1.0)  # CE on the teacher's text


def test_construction_errors(ws):
    tok = ws.tokenizer
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, 32, 2, seed=0)
    config = DistillConfig(on_policy_fraction=0.5)
    cache = types.SimpleNamespace(temperature=2.0, vocab_size=len(tok))
    with pytest.raises(ValueError, match="a teacher cache holds the teacher's distribution"):
        Distiller(student, config=config, teacher_cache=cache)
    mute = tiny_llama(tok, seed=1)
    mute.can_generate = lambda: False
    with pytest.raises(ValueError, match=r"the student, LlamaForCausalLM .* cannot generate"):
        Distiller(mute, teacher, config)
    seq = DistillConfig(on_policy_fraction=0.5, seq_kd=True)
    with pytest.raises(ValueError, match=r"the teacher, LlamaForCausalLM .* cannot generate"):
        Distiller(student, mute, seq)
    wide = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**teacher.config.to_dict(), "vocab_size": len(tok) + 5})
    )
    with pytest.raises(ValueError, match=f"samples from {len(tok) + 5} ids"):
        Distiller(
            student, wide, DistillConfig(on_policy_fraction=0.5, seq_kd=True, vocab="truncate")
        )
    Distiller(student, wide, DistillConfig(on_policy_fraction=0.5, vocab="truncate"))  # fine


def test_prompt_tokens_must_leave_room_in_the_batch(ws):
    tok = ws.tokenizer
    distiller = Distiller(
        tiny_llama(tok, seed=1),
        tiny_llama(tok, seed=0),
        DistillConfig(on_policy_fraction=1.0, prompt_tokens=BLOCK),
    )
    batch = {"input_ids": ws.train.input_ids[:2]}
    with pytest.raises(ValueError, match=f"prompt_tokens={BLOCK}: the batch's rows hold {BLOCK}"):
        onpolicy.generated_batch(distiller, batch)
    distiller.distill_config.prompt_tokens = 4
    padded = {"input_ids": batch["input_ids"], "attention_mask": torch.ones(2, BLOCK)}
    padded["attention_mask"][1, 0] = 0
    with pytest.raises(ValueError, match="hold padding"):
        onpolicy.generated_batch(distiller, padded)


def test_generation_leaves_the_global_rng_and_training_mode(ws):
    tok = ws.tokenizer
    distiller = Distiller(
        tiny_llama(tok, seed=1), tiny_llama(tok, seed=0), DistillConfig(on_policy_fraction=1.0)
    )
    distiller.train()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    batch = onpolicy.generated_batch(distiller, {"input_ids": ws.train.input_ids[:2]}, seed=1)
    assert torch.equal(torch.get_rng_state(), state) and distiller.student.training
    assert (
        batch["input_ids"].shape == (2, BLOCK) and (batch["labels"][:, : BLOCK // 2] == -100).all()
    )
    again = onpolicy.generated_batch(distiller, {"input_ids": ws.train.input_ids[:2]}, seed=1)
    assert torch.equal(batch["input_ids"], again["input_ids"])


def test_cli_flags_parse_and_train(ws, tmp_path, capsys):
    _, config, _ = parse_distill_args(
        ["--student", "s", "--data", "d", "--out", "o", "--on_policy_fraction", "0.5",
         "--seq_kd", "--prompt_tokens", "4", "--max_new_tokens", "6",
         "--generation_temperature", "0.7", "--generation_top_p", "0.9"]
    )  # fmt: skip
    assert (config.on_policy_fraction, config.seq_kd, config.prompt_tokens) == (0.5, True, 4)
    assert (config.max_new_tokens, config.generation_temperature) == (6, 0.7)
    assert config.generation_top_p == 0.9
    out = tmp_path / "out"
    argv = [
        "distill",
        "--teacher", ws.root / "teacher",
        "--student", ws.root / "student.json",
        "--data", ws.root / "data.txt",
        "--out", out,
        "--max-steps", 2,
        "--batch-size", 2,
        "--block-size", BLOCK,
        "--on_policy_fraction", 0.5,
        "--divergence", "reverse_kl",
        "--alpha", 0,
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    saved = json.loads((out / "fastkd_distill_config.json").read_text())
    assert saved["on_policy_fraction"] == 0.5
    assert math.isfinite(json.loads((out / "eval.json").read_text())["perplexity"])
    assert main([str(a) for a in [*argv[:-4], "--on_policy_fraction", 2]]) == 2
    assert "on_policy_fraction must be in [0, 1]" in capsys.readouterr().err
    # Checked before any model loads: the prompt must leave room in a block.
    assert main([str(a) for a in [*argv, "--prompt_tokens", BLOCK]]) == 2
    assert f"--prompt_tokens {BLOCK} must be < --block_size {BLOCK}" in capsys.readouterr().err


def test_a_row_ends_at_its_first_eos(ws):
    tok = ws.tokenizer
    config = DistillConfig(on_policy_fraction=1.0, prompt_tokens=PROMPT, max_new_tokens=5)
    distiller = Distiller(tiny_llama(tok, seed=1), tiny_llama(tok, seed=0), config)
    eos = torch.tensor([tok.eos_token_id])
    # The second row's third new token is an eos; then the row would go on.
    calls = []

    def third_is_eos(module, args, output):
        calls.append(None)
        if len(calls) == 3:
            output[1:, -1] = output[1:, -1].index_fill(-1, eos, 1e4)
        return output

    distiller.student.lm_head.register_forward_hook(third_is_eos)
    batch = onpolicy.generated_batch(distiller, {"input_ids": ws.train.input_ids[:2]}, seed=2)
    assert batch["input_ids"].shape == (2, PROMPT + 5)
    assert batch["input_ids"][1, PROMPT + 2] == tok.eos_token_id
    assert batch["attention_mask"][1].tolist() == [1] * (PROMPT + 3) + [0, 0]
    assert batch["labels"][1, PROMPT + 2] == tok.eos_token_id  # the eos is a target
    assert (batch["labels"][1, PROMPT + 3 :] == -100).all()
    first = (batch["input_ids"][0, PROMPT:] == tok.eos_token_id).nonzero()
    kept = int(first[0]) + 1 if len(first) else 5
    assert int(batch["attention_mask"][0].sum()) == PROMPT + kept
