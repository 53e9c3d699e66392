"""Training from a teacher cache: the Distiller's sparse loss against the online teacher (k = V)
and the fp64 reference (k < V), the configurations a cache rejects, the datasets that carry the
cache's rows by block number, and ``fastkd distill --teacher_cache`` end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import transformers
from conftest import tiny_llama
from test_distiller import batch, llama, shifted_targets

from fastkd._options import DIVERGENCE_CODES, TAILS, SparseKernelArgs
from fastkd.cli import main
from fastkd.reference import sparse_loss_rows
from fastkd.training import DistillConfig, Distiller
from fastkd.training import run as run_module
from fastkd.training.data import (
    BlockDataset,
    TeacherCacheDataset,
    held_out_split,
    load_tokenizer,
    read_records,
    split_blocks,
    split_datasets,
    stdlib_corpus,
    train_tokenizer,
)
from fastkd.training.evaluate import evaluate

V = 97


@dataclass
class RowsCache:
    """What the Distiller and TeacherCacheDataset read of a ``TeacherCache``, over rows held in
    memory (``ids``/``logprobs`` [num_blocks, S, k])."""

    temperature: float
    vocab_size: int
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.ids.shape[0]

    @property
    def block_size(self) -> int:
        return self.ids.shape[1]

    def blocks(self, index):
        return self.ids[index], self.logprobs[index]


@torch.no_grad()
def teacher_top_k(teacher, ids, mask, temperature, k):
    """What a cache holds for each position t: the teacher's top-k of log softmax(z_t / T)."""
    z = teacher(input_ids=ids, attention_mask=mask).logits.double()
    lp, top = torch.log_softmax(z / temperature, -1).topk(k, -1)
    return top, lp.float()


def student_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize(
    "kw",
    [
        dict(divergence="kl", temperature=2.0, alpha=0.3),
        dict(divergence="reverse_kl", temperature=1.0, alpha=0.0),
        dict(divergence="jsd", beta=0.4, temperature=3.0, alpha=0.5),
        dict(divergence="skew_kl", skew=0.2, temperature=2.0, alpha=0.1),
    ],
    ids=lambda kw: kw["divergence"],
)
def test_k_equals_v_is_the_online_teacher(kw):
    """A cache of every id (k = V, tail bucket: no tail bin) gives the dense loss: the same
    loss, parts and student gradients as the Distiller with the teacher model."""
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    ids, mask, labels = batch()
    config = DistillConfig(**kw)
    online = Distiller(student, teacher, config)(ids, mask, labels)
    online.loss.backward()
    online_grads = student_grads(student)

    t_ids, t_lp = teacher_top_k(teacher, ids, mask, config.temperature, V)
    cached = Distiller(student, config=config, teacher_cache=RowsCache(config.temperature, V))
    assert cached.teachers == [] and cached.active_parts == online_parts(config)
    out = cached(ids, mask, labels, teacher_ids=t_ids, teacher_logprobs=t_lp)
    # The two differ by fp32 roundings of terms of O(T^2) (the cache's log-probabilities are
    # the teacher's fp32 log softmax): an absolute margin, as the KD part may be ~0.01.
    atol = 1e-6 * config.temperature**2
    for name in ("loss", "kd", "ce"):
        got, expected = float(getattr(out, name).detach()), float(getattr(online, name).detach())
        assert math.isclose(got, expected, rel_tol=2e-5, abs_tol=atol), (name, got, expected)
    out.loss.backward()
    for name, grad in student_grads(student).items():
        torch.testing.assert_close(grad, online_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def online_parts(config: DistillConfig) -> tuple[str, ...]:
    return tuple(name for name, on in (("kd", config.alpha < 1), ("ce", config.alpha > 0)) if on)


def make_student(kind: str):
    """Students whose heads transform the logits, so that the cache path must apply them."""
    like = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(3)
    if kind == "llama":
        return llama(32, 2, seed=3)
    if kind == "gemma2-softcap":
        config = transformers.Gemma2Config(**like, head_dim=8, final_logit_softcapping=2.0)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**like, logit_scale=0.3))
    model.get_output_embeddings().weight.data.mul_(30)  # O(1) logits: the transforms show
    return model.eval()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize(
    "kind, kw",
    [
        ("llama", dict(divergence="kl", temperature=2.0, alpha=0.3)),
        ("gemma2-softcap", dict(divergence="reverse_kl", temperature=1.5, alpha=0.0)),
        ("cohere", dict(divergence="jsd", beta=0.3, temperature=0.7, alpha=0.6)),
    ],
    ids=["llama-kl", "gemma2-softcap-reverse_kl", "cohere-scale-jsd"],
)
def test_top_k_equals_the_reference_on_the_students_logits(tail, kind, kw):
    """k < V: the Distiller's loss and gradients are the fp64 reference's
    (``fastkd.reference.sparse_loss_rows``) on the student's own logits, position t against
    the cached row of t, targets shifted, padding and -100 labels left out."""
    student, teacher = make_student(kind), llama(48, 3, seed=2)
    ids, mask, labels = batch(seed=5)
    config = DistillConfig(tail=tail, **kw)
    t_ids, t_lp = teacher_top_k(teacher, ids, mask, config.temperature, 8)
    distiller = Distiller(student, config=config, teacher_cache=RowsCache(config.temperature, V))
    out = distiller(ids, mask, labels, teacher_ids=t_ids, teacher_logprobs=t_lp)
    out.loss.backward()
    got = student_grads(student)

    z = student(input_ids=ids, attention_mask=mask).logits.double().flatten(0, 1)
    targets = shifted_targets(ids, mask, labels).flatten()
    args = SparseKernelArgs(
        divergence=DIVERGENCE_CODES[config.divergence],
        temperature=config.temperature,
        kd_weight=1.0 - config.alpha,
        ce_weight=config.alpha,
        mix=config.beta if config.divergence == "jsd" else 0.0,
        ignore_index=-100,
        tail=TAILS.index(tail),
        student_scale=1.0,  # the model's logits are already transformed
        student_softcap=0.0,
    )
    rows = sparse_loss_rows(
        z, t_ids.flatten(0, 1), t_lp.double().flatten(0, 1), targets, None, args
    )
    expected = rows.sum() / (targets != -100).sum()
    got_loss, expected_loss = float(out.loss.detach()), float(expected.detach())
    assert math.isclose(got_loss, expected_loss, rel_tol=2e-5), (got_loss, expected_loss)
    expected.backward()
    for name, grad in student_grads(student).items():
        torch.testing.assert_close(got[name], grad.float(), rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- what a cache rejects


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(feature_weight=0.5), "feature_weight=0.5: a teacher cache holds no hidden states"),
        (dict(attention_weight=1.0), "attention_weight=1.0: a teacher cache holds no attention"),
        (dict(self_distillation="frozen"), "self_distillation='frozen' makes its own teacher"),
        (dict(teacher_weights=[1.0, 2.0]), "teacher_weights weigh several teachers"),
        (dict(vocab="pad"), "vocab='pad' maps a teacher model's vocabulary"),
        (dict(temperature=1.0), r"temperature=1, but the teacher cache holds .* at T=2 "),
    ],
)
def test_what_a_cache_cannot_do_fails_at_construction(kwargs, match):
    config = DistillConfig(**{"temperature": 2.0, **kwargs})
    with pytest.raises(ValueError, match=match):
        Distiller(llama(seed=1), config=config, teacher_cache=RowsCache(2.0, V))


def test_cache_errors():
    student, cache = llama(seed=1), RowsCache(2.0, V)
    with pytest.raises(ValueError, match="pass teachers or teacher_cache, not both"):
        Distiller(student, llama(seed=2), DistillConfig(), teacher_cache=cache)
    with pytest.raises(ValueError, match="pass teachers or teacher_cache, not both"):
        Distiller(student, [llama(seed=2), llama(seed=3)], DistillConfig(), teacher_cache=cache)
    with pytest.raises(ValueError, match=r"cover a vocabulary of 98 tokens; the student, .* 97"):
        Distiller(student, config=DistillConfig(), teacher_cache=RowsCache(2.0, V + 1))
    with pytest.raises(ValueError, match="tail='ignore' applies to a teacher cache"):
        Distiller(student, llama(seed=2), DistillConfig(tail="ignore"))
    ids, mask, labels = batch()
    cached = Distiller(student, config=DistillConfig(), teacher_cache=cache)
    with pytest.raises(ValueError, match="each batch needs teacher_ids and teacher_logprobs"):
        cached(ids, mask, labels)
    t_ids, t_lp = teacher_top_k(llama(seed=2), ids, mask, 2.0, 4)
    with pytest.raises(ValueError, match="each batch needs teacher_ids and teacher_logprobs"):
        cached(ids, mask, labels, teacher_ids=t_ids)
    online = Distiller(student, llama(seed=2), DistillConfig())
    with pytest.raises(ValueError, match="this Distiller has teacher models"):
        online(ids, mask, labels, teacher_ids=t_ids, teacher_logprobs=t_lp)


def test_eval_statistics_and_saving_are_the_students(tmp_path):
    """In eval mode the statistics are the student's own (as with a teacher model), and the
    saved directory is a plain student with the config (tail included)."""
    student, teacher = llama(seed=1), llama(48, 3, seed=2)
    ids, mask, labels = batch()
    config = DistillConfig(alpha=0.2, tail="renormalize")
    t_ids, t_lp = teacher_top_k(teacher, ids, mask, config.temperature, 5)
    cached = Distiller(student, config=config, teacher_cache=RowsCache(2.0, V)).eval()
    online = Distiller(student, teacher, DistillConfig(alpha=0.2)).eval()
    with torch.no_grad():
        got = cached(ids, mask, labels, teacher_ids=t_ids, teacher_logprobs=t_lp)
        expected = online(ids, mask, labels)
    for name in ("nll", "correct", "tokens"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), msg=name)
    assert int(got.tokens.sum()) == int((shifted_targets(ids, mask, labels) != -100).sum())
    cached.save_pretrained(tmp_path / "s")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    for (name, p), q in zip(student.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    saved = DistillConfig.from_file(tmp_path / "s" / "fastkd_distill_config.json")
    assert saved == config


# ---------------------------------------------------------------- data


def test_split_datasets_keep_their_block_numbers():
    ids = torch.arange(40).view(10, 4)
    labels = ids + 100
    train, held = split_datasets(ids, labels, 0.3, seed=7)
    (tr_ids, _), (ev_ids, ev_labels) = split_blocks(ids, labels, 0.3, seed=7)
    assert torch.equal(train.input_ids, tr_ids) and torch.equal(held.labels, ev_labels)
    assert torch.equal(ids[train.blocks], tr_ids) and torch.equal(ids[held.blocks], ev_ids)
    assert sorted(train.blocks.tolist() + held.blocks.tolist()) == list(range(10))
    assert torch.equal(BlockDataset(ids, labels).blocks, torch.arange(10))
    with pytest.raises(ValueError, match=r"blocks must hold one block number per row \(10\)"):
        BlockDataset(ids, labels, torch.arange(3))


def test_teacher_cache_dataset_reads_rows_by_block_number():
    ids = torch.arange(40).view(10, 4)
    g = torch.Generator().manual_seed(0)
    cache = RowsCache(
        2.0,
        V,
        torch.randint(0, V, (10, 4, 3), generator=g),
        torch.rand(10, 4, 3, generator=g).log(),
    )
    _, held = split_datasets(ids, ids.clone(), 0.3, seed=1)
    dataset = TeacherCacheDataset(held, cache)
    items = [dataset[i] for i in range(len(dataset))]
    collated = transformers.default_data_collator(items)
    assert set(collated) == {
        "input_ids",
        "attention_mask",
        "labels",
        "teacher_ids",
        "teacher_logprobs",
    }
    assert torch.equal(collated["input_ids"], held.input_ids)
    assert torch.equal(collated["teacher_ids"], cache.ids[held.blocks])
    assert torch.equal(collated["teacher_logprobs"], cache.logprobs[held.blocks])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=transformers.default_data_collator
    )
    first = next(iter(loader))  # through __getitems__: one read per batch
    assert torch.equal(first["teacher_ids"], cache.ids[held.blocks[:2]])
    with pytest.raises(ValueError, match="the blocks hold 4 tokens, the teacher cache's 5"):
        TeacherCacheDataset(held, RowsCache(2.0, V, cache.ids.new_zeros(10, 5, 3), None))
    with pytest.raises(ValueError, match="block number 9 is beyond the teacher cache's 9 blocks"):
        TeacherCacheDataset(BlockDataset(ids, ids), RowsCache(2.0, V, cache.ids[:9], None))


# ---------------------------------------------------------------- fastkd distill --teacher_cache

BLOCK = 32


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Data, a teacher with its tokenizer, a student config, another tokenizer, and a cache of
    the teacher's top-8 at T = 2 over the data packed in blocks of BLOCK."""
    from fastkd.training.teacher_cache import build_cache

    root = tmp_path_factory.mktemp("cache")
    text = stdlib_corpus(40_000)
    (root / "data.txt").write_text(text)
    (root / "other.txt").write_text(text[20_000:] + text[:20_000])  # as many blocks
    tokenizer = train_tokenizer([text], 300)
    tiny_llama(tokenizer, 32, 2, seed=0).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "student.json").write_text(json.dumps(tiny_llama(tokenizer).config.to_dict()))
    train_tokenizer(["zebra quokka " * 200 + text[:20_000]], 300).save_pretrained(root / "tok2")
    build_cache(
        root / "teacher", root / "data.txt", root / "cache", temperature=2.0, top_k=8,
        block_size=BLOCK,
    )  # fmt: skip
    return root


def cache_argv(root, out, *extra):
    return [str(a) for a in (
        "distill",
        "--teacher_cache", root / "cache",
        "--student", root / "student.json",
        "--tokenizer", root / "teacher",
        "--data", root / "data.txt",
        "--out", out,
        "--max-steps", 2,
        "--batch-size", 2,
        "--block-size", BLOCK,
        "--eval_fraction", 0.2,
        *extra,
    )]  # fmt: skip


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: every check below must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", fail)
    monkeypatch.setattr(run_module, "load_student", fail)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--teacher": "{root}/teacher"}, "--teacher_cache replaces --teacher: give one of them"),
        ({"--teacher_cache": "{root}/nope"}, "teacher cache {root}/nope: no such directory"),
        ({"--teacher_cache": "{root}/teacher"}, "teacher cache {root}/teacher: no manifest.json"),
        ({"--block-size": "16"}, "has block size 32, the data is packed in blocks of 16"),
        ({"--data": "{root}/other.txt"}, "was built from other data"),
        ({"--tokenizer": "{root}/tok2"}, "was built with another tokenizer"),
        ({"--temperature": "1"}, "temperature=1, but the teacher cache holds log-probabilities"),
        ({"--feature_weight": "1"}, "feature_weight=1.0: a teacher cache holds no hidden states"),
        ({"--self_distillation": "ema"}, "self_distillation='ema' makes its own teacher"),
        ({"--tokenizer": None}, "no tokenizer: the student directory holds none; pass --tokenizer"),
    ],
)
def test_bad_runs_fail_before_any_model_loads(ws, tmp_path, capsys, no_models, change, message):
    out = tmp_path / "out"
    argv = cache_argv(ws, out)
    for flag, value in change.items():
        if value is None:  # drop the flag
            del argv[argv.index(flag) : argv.index(flag) + 2]
        elif flag in argv:
            argv[argv.index(flag) + 1] = value.format(root=ws)
        else:
            argv += [flag, value.format(root=ws)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the tokenizing progress
    assert err.startswith("fastkd distill: error: ") and message.format(root=ws) in err, err
    assert not out.exists()


def test_distill_from_a_cache_end_to_end(ws, tmp_path, monkeypatch):
    """`fastkd distill --teacher_cache` trains without loading a teacher, saves a loadable
    student and its held-out metrics."""
    loaded = []
    load_student = run_module.load_student
    monkeypatch.setattr(run_module, "load_model", lambda path: loaded.append(path))
    monkeypatch.setattr(run_module, "load_student", lambda *a: loaded.append(a) or load_student(*a))
    out = tmp_path / "student"
    extra = ["--tail", "renormalize", "--alpha", "0.2", "--eval_strategy", "steps"]
    assert main(cache_argv(ws, out, *extra, "--eval_steps", "2")) == 0
    assert len(loaded) == 1  # the student, no teacher
    # The Trainer's evaluation reads the held-out blocks' cache rows too: a KD part.
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    (logged,) = [e for e in state["log_history"] if "eval_loss" in e]
    assert logged["eval_kd"] > 0 and logged["eval_ce"] > 0 and logged["eval_perplexity"] > 1
    metrics = json.loads((out / "eval.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    _, held = held_out_split(read_records(ws / "data.txt"), load_tokenizer(out), BLOCK, 0.2, 0)
    assert evaluate(model, held, batch_size=2) == pytest.approx(metrics, rel=1e-6)
    saved = DistillConfig.from_file(out / "fastkd_distill_config.json")
    assert (saved.tail, saved.alpha, saved.temperature) == ("renormalize", 0.2, 2.0)


# ---------------------------------------------------------------- the study (issue 12, item 4)


@pytest.mark.slow
def test_teacher_cache_study_at_toy_size(tmp_path):
    """``fastkd.bench.teacher_cache_study`` end to end at toy size: a report row for every
    cache and tail mode, the online teacher and the baseline, and every measured number."""
    from fastkd.bench.teacher_cache_study import markdown, run_study
    from fastkd.training.demo import DemoSettings

    tiny = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    settings = DemoSettings(
        corpus_bytes=12_000,
        vocab_size=300,
        block_size=16,
        batch_size=4,
        teacher_steps=3,
        student_steps=3,
        teacher_learning_rate=3e-3,
        student_learning_rate=3e-3,
        teacher={**tiny, "hidden_size": 32},
        student=tiny,
        eval_fraction=0.2,
    )
    report = json.loads(json.dumps(run_study(tmp_path, settings, top_ks=(1, 8, 64))))
    names = [r["name"] for r in report["students"]]
    expected = [f"cache k={k} {t}" for k in (1, 8, 64) for t in TAILS]
    assert names == [*expected, "online dense KD", "hard labels"]
    for row in report["students"]:
        assert math.isfinite(row["perplexity"]) and row["median_step_s"] > 0, row
    assert set(report["caches"]) == {"1", "8", "64"}
    for k, cache in report["caches"].items():
        assert cache["tokens_per_s"] > 0 and cache["id_dtype"] == "uint16"  # V = 300
        assert cache["bytes_per_token_payload"] == 4 + int(k) * (2 + 2)  # bf16 values
        assert cache["bytes_per_token_on_disk"] > cache["bytes_per_token_payload"]  # headers
    memory = report["peak_memory_mb"]
    assert memory["cache_k64"] > 0 and memory["online_teacher"] > 0
    assert report["versions"]["torch"] == torch.__version__
    table = markdown(report)
    assert all(name in table for name in names)
