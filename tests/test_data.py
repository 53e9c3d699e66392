"""Training data: record reading, tokenizer training/loading, packing, splitting, stdlib corpus."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, default_data_collator

from fastkd.training import data
from fastkd.training.data import (
    BlockDataset,
    has_tokenizer,
    held_out_split,
    load_dataset,
    load_tokenizer,
    pack,
    read_records,
    split_blocks,
    stdlib_corpus,
    tokenizer_difference,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def corpus() -> str:
    return stdlib_corpus(60_000)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([corpus], vocab_size=600)


def write_jsonl(path, rows) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


# ---------------------------------------------------------------- read_records


def test_read_txt_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"prompt": "q", "response": "r"}])
    (tmp_path / "README.md").write_text("not a record file")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert read_records(tmp_path / "a.txt") == [{"text": "first file\n"}]
    assert read_records(tmp_path) == [
        {"text": "first file\n"},
        {"text": "second file\n"},
        {"prompt": "q", "response": "r"},
    ]


def test_read_jsonl_skips_blank_lines_and_extra_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"text": "a", "id": 7}, "", "   ", {"prompt": "p", "response": "r"}])
    assert read_records(path) == [{"text": "a"}, {"prompt": "p", "response": "r"}]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "ok"}, "{not json"], r"bad\.jsonl:2: invalid JSON"),
        ([{"text": "ok"}, "", "[1, 2]"], r"bad\.jsonl:3: expected a JSON object, got list"),
        ([{"prompt": "p"}], r"bad\.jsonl:1: missing field 'response'"),
        ([{"response": "r"}], r"bad\.jsonl:1: missing field 'prompt'"),
        ([{"text": 3}], r"bad\.jsonl:1: field 'text' must be a string, got int"),
        ([{"prompt": "p", "response": None}], r"field 'response' must be a string, got NoneType"),
        ([{"text": "a", "prompt": "p"}], r"bad\.jsonl:1: has both 'text' and 'prompt'"),
        ([{"content": "a"}], r"bad\.jsonl:1: needs a 'text' field or 'prompt' and 'response'"),
        (["", "  "], r"bad\.jsonl: empty file"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, rows, match):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(ValueError, match=match):
        read_records(path)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        read_records(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match=r"empty\.txt: empty file"):
        read_records(tmp_path / "empty.txt")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"d\.csv: unsupported suffix; accepted: \.txt, \.jsonl"):
        read_records(tmp_path / "d.csv")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: not valid UTF-8"):
        read_records(tmp_path / "latin.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"nothing: directory holds no \.txt or \.jsonl files"):
        read_records(tmp_path / "nothing")


# ---------------------------------------------------------------- tokenizers


def test_train_tokenizer_is_deterministic_and_lossless(corpus, tokenizer):
    again = train_tokenizer([corpus], vocab_size=600)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) == 600
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    text = "def f(x):\n    return 'héllo ✓ 日本'  # bytes outside the corpus\n"
    ids = tokenizer(text)["input_ids"]
    assert 0 not in ids  # nothing added automatically
    assert tokenizer.decode(ids) == text
    assert len(tokenizer("def __init__(self):")["input_ids"]) < len("def __init__(self):")


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_tokenizer(["abc"], vocab_size=100)


def test_tokenizer_round_trips_through_save_and_load(tmp_path, corpus, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    sample = corpus[1000:3000]
    assert loaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (0, 0, len(tokenizer))


def test_load_tokenizer_sets_pad_to_eos(tmp_path, tokenizer):
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>"
    )
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).pad_token == "<|endoftext|>"


def test_load_tokenizer_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds no tokenizer: expected one of tokenizer\.json"):
        load_tokenizer(tmp_path)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    no_eos.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(ValueError, match="has no eos token"):
        load_tokenizer(tmp_path / "no_eos")


def test_has_tokenizer(tmp_path, tokenizer):
    assert not has_tokenizer(tmp_path) and not has_tokenizer(tmp_path / "missing")
    tokenizer.save_pretrained(tmp_path)
    assert has_tokenizer(tmp_path)


def test_tokenizer_difference(corpus, tokenizer):
    sample = corpus[:3000]
    assert tokenizer_difference(tokenizer, tokenizer, sample) is None
    # A padded vocabulary (more ids, the shared ones equal) is not a difference.
    padded = train_tokenizer([corpus], vocab_size=600)
    padded.add_tokens(["<extra_0>", "<extra_1>"])
    assert len(padded) == len(tokenizer) + 2
    assert tokenizer_difference(tokenizer, padded, sample) is None
    other = train_tokenizer([corpus[::-1]], vocab_size=600)
    assert tokenizer_difference(tokenizer, other, sample).startswith("id 259 is ")  # merges
    # Same vocabulary, another normalizer: the sample encodes differently.
    from tokenizers import normalizers

    lower = train_tokenizer([corpus], vocab_size=600)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tokenizer_difference(tokenizer, lower, "Import OS") == (
        "a sample of the data encodes differently from token 0 on"
    )
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert tokenizer_difference(tokenizer, no_eos, sample) == "eos ids 0 and None"


# ---------------------------------------------------------------- pack


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pack_text_records(tokenizer):
    records = [{"text": "import os\n"}, {"text": "def main():\n    pass\n"}]
    stream = [
        *encode(tokenizer, "import os\n"),
        0,
        *encode(tokenizer, "def main():\n    pass\n"),
        0,
    ]
    block = 4
    input_ids, labels = pack(records, tokenizer, block)
    n = len(stream) // block
    assert input_ids.dtype == labels.dtype == torch.int64
    assert input_ids.shape == labels.shape == (n, block)
    assert input_ids.flatten().tolist() == stream[: n * block]  # ragged tail dropped
    assert torch.equal(labels, input_ids)  # every token of a text record is a target, eos too


def test_pack_masks_prompt_tokens(tokenizer):
    records = [
        {"prompt": "Q: 2+2?\n", "response": "A: 4"},
        {"text": "x = 1"},
        {"prompt": "Q: name?\n", "response": "A: fastkd"},
    ]
    expected_ids, expected_labels = [], []
    for r in records:
        if "prompt" in r:
            prompt = encode(tokenizer, r["prompt"])
            expected_ids += prompt
            expected_labels += [-100] * len(prompt)
        target = [*encode(tokenizer, r.get("response", r.get("text"))), 0]
        expected_ids += target
        expected_labels += target
    input_ids, labels = pack(records, tokenizer, block_size=len(expected_ids))
    assert input_ids.shape == (1, len(expected_ids))
    assert input_ids[0].tolist() == expected_ids
    assert labels[0].tolist() == expected_labels
    # The targets, decoded, are exactly the responses and the text, each followed by eos.
    targets = labels[0][labels[0] != -100].tolist()
    assert tokenizer.decode(targets) == "A: 4<|endoftext|>x = 1<|endoftext|>A: fastkd<|endoftext|>"
    masked = input_ids[0][labels[0] == -100].tolist()
    assert tokenizer.decode(masked) == "Q: 2+2?\nQ: name?\n"


def test_pack_blocks_decode_to_the_text(corpus, tokenizer):
    text = corpus[:20_000]
    input_ids, labels = pack([{"text": text}], tokenizer, block_size=64)
    assert input_ids.shape[1] == 64 and input_ids.shape[0] > 10
    assert torch.equal(labels, input_ids)
    for i in (0, 5, input_ids.shape[0] - 1):
        assert tokenizer.decode(input_ids[i]) in text
    assert text.startswith(tokenizer.decode(input_ids[:3].flatten()))


def test_pack_errors(tokenizer):
    with pytest.raises(ValueError, match=r"one block: 3 tokens \(eos included\) from 1 record"):
        pack([{"text": "a b"}], tokenizer, block_size=1000)
    with pytest.raises(ValueError, match="block_size is 1000"):
        pack([], tokenizer, block_size=1000)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        pack([{"text": "abc"}], tokenizer, block_size=1)
    with pytest.raises(ValueError, match="record 1: missing field 'response'"):
        pack([{"text": "abc"}, {"prompt": "p"}], tokenizer, block_size=2)


# ---------------------------------------------------------------- split, dataset


def blocks(n: int, size: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(n * size).view(n, size)
    return ids, ids + 1000


def test_split_is_a_deterministic_partition():
    ids, labels = blocks(40)
    (tr_ids, tr_labels), (ev_ids, ev_labels) = split_blocks(ids, labels, 0.25, seed=3)
    assert ev_ids.shape == (10, 5) and tr_ids.shape == (30, 5)
    assert torch.equal(tr_labels, tr_ids + 1000) and torch.equal(ev_labels, ev_ids + 1000)
    train_rows = set((tr_ids[:, 0] // 5).tolist())
    eval_rows = set((ev_ids[:, 0] // 5).tolist())
    assert train_rows.isdisjoint(eval_rows) and train_rows | eval_rows == set(range(40))
    assert (ev_ids[1:, 0] > ev_ids[:-1, 0]).all()  # original order kept on each side
    (again, _), (ev_again, _) = split_blocks(ids, labels, 0.25, seed=3)
    assert torch.equal(again, tr_ids) and torch.equal(ev_again, ev_ids)
    (_, _), (ev_other, _) = split_blocks(ids, labels, 0.25, seed=4)
    assert not torch.equal(ev_other, ev_ids)


@pytest.mark.parametrize(("fraction", "n_eval"), [(0.01, 1), (0.99, 2), (0.5, 2)])
def test_split_keeps_one_block_each_side(fraction, n_eval):
    (train, _), (held, _) = split_blocks(*blocks(3), fraction, seed=0)
    assert (len(train), len(held)) == (3 - n_eval, n_eval)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"eval_fraction must be in \(0, 1\)"):
        split_blocks(*blocks(10), fraction, seed=0)


def test_split_needs_two_blocks():
    with pytest.raises(ValueError, match="need at least 2 blocks"):
        split_blocks(*blocks(1), 0.5, seed=0)


def test_block_dataset_items_and_collation():
    ids, labels = blocks(3, 4)
    dataset = BlockDataset(ids, labels)
    assert len(dataset) == 3
    item = dataset[1]
    assert item["input_ids"].tolist() == [4, 5, 6, 7]
    assert item["labels"].tolist() == [1004, 1005, 1006, 1007]
    assert item["attention_mask"].tolist() == [1, 1, 1, 1]
    batch = default_data_collator([dataset[0], dataset[2]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="of one shape"):
        BlockDataset(ids, labels[:, :2])


def test_block_dataset_trains_with_transformers_trainer(tmp_path, corpus, tokenizer):
    from transformers import Trainer, TrainingArguments

    write_jsonl(tmp_path / "d.jsonl", [{"text": corpus[:8000]}])
    train, held = load_dataset(tmp_path / "d.jsonl", tokenizer, block_size=32, eval_fraction=0.2)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(GPT2LMHeadModel(config), args, train_dataset=train, eval_dataset=held)
    assert trainer.train().training_loss > 0
    assert trainer.evaluate()["eval_loss"] > 0


def test_load_dataset(tmp_path, corpus, tokenizer):
    rows = [{"prompt": "# file\n", "response": corpus[i : i + 500]} for i in range(0, 6000, 500)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    all_ids, all_labels = pack(read_records(tmp_path / "d.jsonl"), tokenizer, 32)
    train, held = load_dataset(tmp_path / "d.jsonl", tokenizer, 32, eval_fraction=0.1, seed=1)
    assert len(train) + len(held) == len(all_ids)
    assert len(held) == round(0.1 * len(all_ids))
    # Every packed (input_ids, labels) row lands on exactly one side, unchanged.
    seen = torch.cat(
        [torch.cat([train.input_ids, train.labels], 1), torch.cat([held.input_ids, held.labels], 1)]
    )
    packed = torch.cat([all_ids, all_labels], 1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, packed.tolist()))
    assert (train.labels == -100).any()  # the prompts are masked
    again, _ = load_dataset(tmp_path / "d.jsonl", tokenizer, 32, eval_fraction=0.1, seed=1)
    assert torch.equal(again.input_ids, train.input_ids)


def test_held_out_split_is_disjoint_and_reproducible(tmp_path, corpus, tokenizer):
    """distill and eval call the same split with one seed: seed 3 gives the same held-out
    blocks through either path, disjoint from the training blocks."""
    records = [{"text": corpus[:20_000]}]
    train, held = held_out_split(records, tokenizer, 32, eval_fraction=0.2, seed=3)
    rows = lambda d: {tuple(r) for r in d.input_ids.tolist()}  # noqa: E731
    assert rows(train).isdisjoint(rows(held)) and len(held) == round(0.2 * (len(train) + len(held)))
    write_jsonl(tmp_path / "d.jsonl", records)
    _, again = load_dataset(tmp_path / "d.jsonl", tokenizer, 32, eval_fraction=0.2, seed=3)
    assert torch.equal(again.input_ids, held.input_ids)
    _, other = held_out_split(records, tokenizer, 32, eval_fraction=0.2, seed=0)
    assert not torch.equal(other.input_ids, held.input_ids)


# ---------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_walks_sorted_and_skips(tmp_path, monkeypatch):
    files = {
        "b.py": "B",
        "a.py": "A",
        "pkg/c.py": "C é",
        "pkg/tests/t.py": "no",
        "test/test_x.py": "no",
        "idlelib/idle_test/t.py": "no",
        "site-packages/lib.py": "no",
        "notes.txt": "no",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "latin.py").write_bytes(b"caf\xe9")
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert stdlib_corpus(1000) == "A\n\nB\n\nC é"
    assert stdlib_corpus(4) == "A\n\nB"
    # Cut in the middle of the two-byte "é": the partial character is dropped.
    assert stdlib_corpus(len("A\n\nB\n\nC é".encode()) - 1) == "A\n\nB\n\nC "


def test_stdlib_corpus_is_real_and_deterministic():
    text = stdlib_corpus(200_000)
    assert text == stdlib_corpus(200_000)
    assert 200_000 - 4 <= len(text.encode()) <= 200_000
    assert "def " in text and "import " in text
    assert stdlib_corpus(50_000) == text.encode()[:50_000].decode("utf-8", errors="ignore")


def test_stdlib_corpus_rejects_nonpositive():
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        stdlib_corpus(0)
