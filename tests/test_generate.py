"""``fastkd generate`` (a teacher's responses as records: format, resume after a kill equal to a
clean run, settings sidecar, errors before the model loads, rationale templates, the command)
and the rationale/answer span weights (``pack``, ``BlockDataset``, ``Distiller`` against the
fp64 reference, ``fastkd distill`` end to end, with a teacher model and a teacher cache)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import assert_close, tiny_llama
from test_distill_cache import RowsCache, teacher_top_k
from test_distiller import V, batch, llama, shifted_targets

import fastkd
from fastkd.cli import main
from fastkd.reference import mixture_logits
from fastkd.training import DistillConfig, Distiller
from fastkd.training.data import (
    BlockDataset,
    SpanWeights,
    load_tokenizer,
    pack,
    read_records,
    split_datasets,
    stdlib_corpus,
    train_tokenizer,
)
from fastkd.training.generate import generate

PROMPTS = ["def add(a, b):", "class Stack:", "import os\n", "for i in range(", "x = [", "# note"]
SMALL = {"max_new_tokens": 5, "batch_size": 2}
TEMPLATE = "Think step by step about:\n{prompt}\nthen write {{Answer:}}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny teacher with its tokenizer, a prompts file, a student config and rationale
    records (prompt, rationale, marker, answer)."""
    root = tmp_path_factory.mktemp("generate")
    text = stdlib_corpus(6_000)
    tokenizer = train_tokenizer([text], 300)
    tiny_llama(tokenizer, 32, 1, seed=0).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "student.json").write_text(json.dumps(tiny_llama(tokenizer).config.to_dict()))
    write_prompts(root / "prompts.jsonl", PROMPTS)
    records = [
        {
            "prompt": f"Q: what is {i} + {i}? ",
            "response": f"{i} and {i} make {2 * i}. Answer: {2 * i}",
        }
        for i in range(40)
    ]
    records += [{"text": text[:500]}, {"prompt": "no marker: ", "response": "just the answer"}]
    (root / "rationale.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def write_prompts(path, prompts, extra=None):
    path.write_text("".join(json.dumps({"prompt": p, **(extra or {})}) + "\n" for p in prompts))


def run(ws, out, **kw):
    return generate(ws / "teacher", ws / "prompts.jsonl", out, **{**SMALL, **kw})


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def no_model(monkeypatch):
    """Loading the teacher fails the test: the check under test must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", fail)


def greedy(ws, text: str, max_new_tokens: int) -> str:
    """The teacher's greedy continuation of one text, by transformers alone."""
    tok = load_tokenizer(ws / "teacher")
    model = transformers.AutoModelForCausalLM.from_pretrained(ws / "teacher").eval()
    enc = tok(text, return_tensors="pt")
    ids = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- records


def test_records_are_the_teachers_samples_in_prompt_order(ws, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(ws, out, num_return_sequences=2) == 12
    got = lines(out)
    assert [(r["prompt"], r["sample"]) for r in got] == [(p, j) for p in PROMPTS for j in (0, 1)]
    assert all(set(r) == {"prompt", "response", "sample"} for r in got)
    assert read_records(out) == [{"prompt": r["prompt"], "response": r["response"]} for r in got]
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert (meta["num_prompts"], meta["num_return_sequences"], meta["seed"]) == (6, 2, 0)
    assert len({r["response"] for r in got}) > 6  # sampled, not one response repeated
    run(ws, tmp_path / "seed1.jsonl", seed=1, num_return_sequences=2)
    assert lines(tmp_path / "seed1.jsonl") != got  # another seed, other samples


def test_greedy_responses_are_the_teachers_continuations(ws, tmp_path):
    """Temperature 0, left-padded batches: each response is what the teacher continues the
    prompt with alone (no padding)."""
    out = tmp_path / "out.jsonl"
    run(ws, out, temperature=0, batch_size=4)
    assert [r["response"] for r in lines(out)] == [greedy(ws, p, 5) for p in PROMPTS]


def test_rationale_template_is_what_the_teacher_sees(ws, tmp_path):
    out = tmp_path / "out.jsonl"
    run(ws, out, temperature=0, rationale_template=TEMPLATE)
    got = lines(out)
    assert [r["prompt"] for r in got] == PROMPTS  # the student answers the bare prompt
    shown = [TEMPLATE.format(prompt=p) for p in PROMPTS]
    assert [r["response"] for r in got] == [greedy(ws, s, 5) for s in shown]
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["rationale_template"] == (
        TEMPLATE
    )


# ---------------------------------------------------------------- resume


def test_a_killed_run_resumes_to_the_clean_runs_file(ws, tmp_path, monkeypatch):
    clean = tmp_path / "clean.jsonl"
    run(ws, clean, num_return_sequences=2)
    data = clean.read_bytes()
    cut = tmp_path / "cut.jsonl"
    shutil.copy(tmp_path / "clean.jsonl.meta.json", tmp_path / "cut.jsonl.meta.json")
    # Killed inside batch 1 (records 4..7), mid-way through record 5's line.
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    cut.write_bytes(data[: starts[5] + 10])
    assert run(ws, cut, num_return_sequences=2) == 12
    assert cut.read_bytes() == data
    # A complete file: nothing to do, the model does not load.
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", None)
    assert run(ws, cut, num_return_sequences=2) == 12
    assert cut.read_bytes() == data


def test_other_settings_or_other_files_are_errors(ws, tmp_path, no_model):
    out = tmp_path / "out.jsonl"
    meta = {"format": "fastkd-generate", "version": 1, "temperature": 1.0}
    (tmp_path / "out.jsonl.meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"other settings \(.*max_new_tokens: None there, 5 here"):
        run(ws, out)
    (tmp_path / "out.jsonl.meta.json").unlink()
    out.write_text("my notes\n")
    with pytest.raises(ValueError, match=r"exists and has no out\.jsonl\.meta\.json"):
        run(ws, out)
    assert out.read_text() == "my notes\n"


def test_a_changed_setting_or_record_is_an_error(ws, tmp_path):
    out = tmp_path / "out.jsonl"
    run(ws, out)
    with pytest.raises(ValueError, match=r"temperature: 1\.0 there, 0\.5 here"):
        run(ws, out, temperature=0.5)
    with pytest.raises(ValueError, match="rationale_template: None there"):
        run(ws, out, rationale_template=TEMPLATE)
    edited = out.read_text().replace(PROMPTS[1], "edited", 1)
    out.write_text(edited)
    with pytest.raises(ValueError, match=r"out.jsonl:2: expected the record of prompt 2, sample 0"):
        run(ws, out)
    assert out.read_text() == edited


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a"}\n{"text": "b"}\n',
            r'prompts.jsonl:2: expected an object with a string "prompt"',
        ),
        (
            '{"prompt": "a"}\n\n{"prompt": 3}\n',
            r'prompts.jsonl:3: expected an object with a string "prompt"',
        ),
        ('{"prompt": "a"\n', r"prompts.jsonl:1: invalid JSON"),
        ("\n", "no prompts"),
    ],
)
def test_bad_prompts_fail_before_the_model_loads(ws, tmp_path, no_model, content, message):
    (tmp_path / "prompts.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        generate(ws / "teacher", tmp_path / "prompts.jsonl", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"temperature": -1}, "--temperature must be a finite number >= 0"),
        ({"top_p": 0}, r"--top-p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be an int >= 1"),
        ({"temperature": 0, "num_return_sequences": 2}, "would repeat one response"),
        ({"rationale_template": "no field"}, "must contain {prompt}"),
        ({"rationale_template": "{prompt} {other}"}, "{prompt} must be its only field"),
    ],
)
def test_bad_settings_fail_before_the_model_loads(ws, tmp_path, no_model, kw, message):
    with pytest.raises(ValueError, match=message):
        run(ws, tmp_path / "out.jsonl", **kw)


def test_a_model_that_cannot_generate_is_an_error(ws, tmp_path, no_model):
    model = tmp_path / "distilbert"
    transformers.DistilBertConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2).save_pretrained(
        model
    )
    load_tokenizer(ws / "teacher").save_pretrained(model)
    with pytest.raises(ValueError, match="model type 'distilbert' is not a causal LM that can"):
        generate(model, ws / "prompts.jsonl", tmp_path / "out.jsonl")


def test_the_command(ws, tmp_path, capsys):
    (tmp_path / "template.txt").write_text(TEMPLATE)
    argv = ["generate", "--teacher", ws / "teacher", "--prompts", ws / "prompts.jsonl"]
    argv += ["--max-new-tokens", 5, "--temperature", 0, "--batch_size", 3]
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                str(a)
                for a in [
                    *argv,
                    "--out",
                    out,
                    "--rationale-template",
                    "@" + str(tmp_path / "template.txt"),
                ]
            ]
        )
        == 0
    )
    assert f"6 records in {out}" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "out.jsonl.meta.json").read_text())["rationale_template"] == TEMPLATE
    )
    assert main([str(a) for a in [*argv, "--out", tmp_path / "b.jsonl", "--top-p", 2]]) == 2
    assert "fastkd generate: error: --top-p must be in (0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------- span weights


def test_pack_weighs_the_rationale_and_the_answer(ws):
    records = read_records(ws / "rationale.jsonl")
    tok = load_tokenizer(ws / "teacher")
    ids, labels = pack(records, tok, 16)
    w_ids, w_labels, weights = pack(records, tok, 16, SpanWeights(0.25, 2.0))
    assert torch.equal(ids, w_ids) and torch.equal(labels, w_labels)
    assert weights.dtype == torch.float32 and weights.shape == ids.shape
    flat_ids, flat_w, flat_labels = ids.flatten(), weights.flatten(), labels.flatten()
    eos = (flat_ids == tok.eos_token_id).nonzero().flatten().tolist()
    start = 0
    for record, end in zip(records, eos):  # each record's tokens end with its eos
        w = flat_w[start : end + 1]
        if "text" in record:
            assert (w == 1).all()
        else:
            is_prompt = flat_labels[start : end + 1] == -100
            assert (w[is_prompt] == 0).all()
            response = flat_ids[start : end + 1][~is_prompt]
            spans = w[~is_prompt]
            rationale = tok.decode(response[spans == 0.25])
            answer = tok.decode(response[spans == 2.0], skip_special_tokens=True)
            assert (spans > 0).all() and spans[-1] == 2.0  # the eos is the answer's
            assert rationale + answer == record["response"]
            if "Answer:" in record["response"]:
                assert answer.strip().startswith("Answer:") and len(rationale) > 0
            else:
                assert rationale == ""
        start = end + 1
    assert start > 0


def test_block_datasets_carry_their_rows_weights():
    ids = torch.arange(40).view(10, 4)
    weights = torch.rand(10, 4)
    train, held = split_datasets(ids, ids, 0.3, 0, weights)
    for ds in (train, held):
        for i in range(len(ds)):
            assert torch.equal(ds[i]["token_weights"], weights[ds.blocks[i]])
    assert "token_weights" not in BlockDataset(ids, ids)[0]
    with pytest.raises(ValueError, match="token_weights must be a float tensor"):
        BlockDataset(ids, ids, token_weights=weights[:, :3])


def weights_of(labels, seed=0):
    """Span-like weights: 0 on a rationale (positions 2..5), 0.5 and 2 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    w = torch.where(torch.rand(labels.shape, generator=g) < 0.5, 0.5, 2.0)
    w[:, 2:6] = 0.0
    return w


@pytest.mark.parametrize("multi_teacher", [None, "losses", "mixture"])
def test_weighted_loss_equals_the_fp64_reference(multi_teacher):
    student = llama(32, 2, seed=1)
    teachers = [llama(48, 2, seed=2)] + ([llama(32, 1, seed=3)] if multi_teacher else [])
    kw = dict(temperature=2.0, divergence="kl")
    config = DistillConfig(**kw, alpha=0.3, multi_teacher=multi_teacher or "logits")
    ids, mask, labels = batch()
    w = weights_of(labels)
    out = Distiller(student, teachers, config)(ids, mask, labels, token_weights=w)
    zs = student(input_ids=ids, attention_mask=mask).logits.double()
    with torch.no_grad():
        zt = [t(input_ids=ids, attention_mask=mask).logits.double() for t in teachers]
    if multi_teacher == "mixture":
        zt = [mixture_logits(zt, [1.0, 1.0], 2.0)]
    target = shifted_targets(ids, mask, labels)
    shifted_w = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], 1).double()
    truth = sum(
        fastkd.kd_loss(
            zs,
            z,
            target,
            token_weights=shifted_w,
            backend="reference",
            **kw,
            kd_weight=0.7 / len(zt),
            ce_weight=0.3 * (k == 0),
        )
        for k, z in enumerate(zt)
    )
    assert_close(out.loss, truth, atol=1e-5, rtol=1e-5, name="weighted loss")


def test_weights_of_one_are_the_unweighted_loss_and_zero_stops_the_gradient():
    student, teacher = llama(32, 2, seed=1), llama(48, 2, seed=2)
    distiller = Distiller(student, teacher, DistillConfig(alpha=0.5))
    ids, mask, labels = batch()
    captured = []
    student.model.register_forward_hook(lambda m, a, o: captured.append(o.last_hidden_state))

    def loss_and_grad(**kw):
        captured.clear()
        out = distiller(ids, mask, labels, **kw)
        captured[0].retain_grad()
        out.loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        return out, captured[0].grad, grads

    plain, _, plain_grads = loss_and_grad()
    ones, _, ones_grads = loss_and_grad(token_weights=torch.ones(ids.shape))
    assert torch.equal(plain.loss, ones.loss) and torch.equal(plain.kd, ones.kd)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ones_grads))
    w = weights_of(labels)
    _, hidden_grad, _ = loss_and_grad(token_weights=w)
    target = shifted_targets(ids, mask, labels)
    counted = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], 1) * (target != -100)
    per_position = hidden_grad.abs().sum(-1)
    assert (per_position[counted == 0] == 0).all()
    assert (per_position[counted > 0] > 0).all()


def test_cached_teacher_is_weighted_as_the_online_one():
    """With k = V the cache holds the whole teacher: weighted losses agree."""
    student, teacher = llama(32, 2, seed=1), llama(48, 2, seed=2)
    ids, mask, labels = batch()
    w = weights_of(labels)
    config = DistillConfig(temperature=2.0, alpha=0.3)
    online = Distiller(student, teacher, config)(ids, mask, labels, token_weights=w)
    cache = RowsCache(2.0, V)
    cached = Distiller(student, config=config, teacher_cache=cache)
    top, lp = teacher_top_k(teacher, ids, mask, 2.0, V)
    got = cached(ids, mask, labels, teacher_ids=top, teacher_logprobs=lp, token_weights=w)
    assert_close(got.loss, online.loss.double(), atol=1e-5, rtol=1e-5, name="cached")
    assert not torch.isclose(
        got.loss, cached(ids, mask, labels, teacher_ids=top, teacher_logprobs=lp).loss
    )


def test_span_weight_settings_are_checked():
    for kw, message in [
        ({"rationale_weight": -1}, "rationale_weight must be a finite number >= 0"),
        ({"answer_weight": float("inf")}, "answer_weight must be a finite number >= 0"),
        ({"rationale_weight": 0, "answer_weight": 0}, "both 0"),
        ({"answer_marker": ""}, "answer_marker must be a non-empty string"),
    ]:
        with pytest.raises(ValueError, match=message):
            DistillConfig(**kw)


# ---------------------------------------------------------------- fastkd distill


def distill_argv(ws, out, *extra):
    return [str(a) for a in (
        "distill",
        "--student", ws / "student.json",
        "--tokenizer", ws / "teacher",
        "--data", ws / "rationale.jsonl",
        "--out", out,
        "--max-steps", 2,
        "--batch-size", 4,
        "--block-size", 32,
        "--eval_fraction", 0.2,
        "--save_strategy", "no",
        *extra,
    )]  # fmt: skip


@pytest.fixture
def seen(monkeypatch):
    """The token weights of every batch the Distiller gets (None: none given)."""
    batches = []
    forward = Distiller.forward

    def spy(self, input_ids, *args, token_weights=None, **kw):
        batches.append((input_ids, token_weights))
        return forward(self, input_ids, *args, token_weights=token_weights, **kw)

    monkeypatch.setattr(Distiller, "forward", spy)
    return batches


@pytest.mark.parametrize("source", ["teacher", "cache"])
def test_distill_trains_with_the_span_weights(ws, tmp_path, seen, source):
    if source == "teacher":
        teacher = ["--teacher", str(ws / "teacher")]
    else:
        from fastkd.training.teacher_cache import build_cache

        build_cache(ws / "teacher", ws / "rationale.jsonl", tmp_path / "cache", temperature=2.0,
                    top_k=8, block_size=32)  # fmt: skip
        teacher = ["--teacher_cache", str(tmp_path / "cache")]
    argv = distill_argv(ws, tmp_path / "a", *teacher)
    assert main([*argv, "--rationale_weight", "0", "--answer-weight", "3"]) == 0
    tok = load_tokenizer(ws / "teacher")
    ids, _, weights = pack(read_records(ws / "rationale.jsonl"), tok, 32, SpanWeights(0.0, 3.0))
    row = {tuple(r.tolist()): w for r, w in zip(ids, weights)}
    assert len(seen) >= 2
    for batch_ids, batch_weights in seen:
        assert torch.equal(batch_weights, torch.stack([row[tuple(r.tolist())] for r in batch_ids]))
    seen.clear()
    assert main([*distill_argv(ws, tmp_path / "b", *teacher), "--answer_weight", "1"]) == 0
    assert seen and all(w is None for _, w in seen)
