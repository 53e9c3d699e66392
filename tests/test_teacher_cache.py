"""The teacher cache (``fastkd cache-teacher`` and ``TeacherCache``): the cached top-k is the
teacher's, a SIGKILLed build resumes without rewriting or reading partial shards, a rerun with
other settings or a cache read against other data is an error naming the difference, and
damaged shards are errors naming the file and block."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open

from fastkd.training import teacher_cache
from fastkd.training.data import load_tokenizer, pack, read_records, stdlib_corpus, train_tokenizer
from fastkd.training.models import load_model
from fastkd.training.teacher_cache import (
    TeacherCache,
    build_cache,
    bytes_per_token,
    data_fingerprint,
    shard_name,
    tokenizer_fingerprint,
    write_shard,
)

BLOCK = 32
SETTINGS = {"temperature": 2.0, "top_k": 8, "block_size": BLOCK, "shard_blocks": 8}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Data (about 80 blocks), a teacher with its tokenizer, a second teacher, a tokenizer
    trained on other text, and a complete cache of the first teacher."""
    root = tmp_path_factory.mktemp("cache")
    text = stdlib_corpus(4_000)
    (root / "data.txt").write_text(text)
    (root / "other.txt").write_text(text[::-1])
    tokenizer = train_tokenizer([text], 300)
    tiny_llama(tokenizer, 32, 2, seed=0).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    tiny_llama(tokenizer, 32, 2, seed=1).save_pretrained(root / "teacher2")
    tokenizer.save_pretrained(root / "teacher2")
    train_tokenizer(["zebra quokka " * 100 + text[:2000]], 300).save_pretrained(root / "tok2")
    build_cache(root / "teacher", root / "data.txt", root / "cache", **SETTINGS)
    return root


def packed(ws, tokenizer_dir=None, block_size=BLOCK, data="data.txt"):
    tokenizer = load_tokenizer(tokenizer_dir or ws / "teacher")
    return pack(read_records(ws / data), tokenizer, block_size)[0], tokenizer


def stamps(out) -> dict:
    """(inode, mtime) of every shard: a rewritten shard gets a new inode (atomic replace)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}


def shard_tensors(path) -> dict:
    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def assert_same_shard(path, expected) -> None:
    """Same tensors, bit for bit (safetensors orders its header's metadata as it likes)."""
    got, want = shard_tensors(path), shard_tensors(expected)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), (path, name)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    ("dtype", "bf16"), [("bf16", False), ("fp32", False), ("fp32", True)], ids=str
)
def test_cached_top_k_is_the_teachers(ws, tmp_path, monkeypatch, dtype, bf16):
    out = tmp_path / dtype
    # Logits of 7 positions at a time (of 32 per block, 8 blocks per batch).
    monkeypatch.setattr(teacher_cache, "CHUNK_ELEMENTS", 7 * 300)
    manifest = build_cache(ws / "teacher", ws / "data.txt", out, dtype=dtype, bf16=bf16, **SETTINGS)
    input_ids, tokenizer = packed(ws)
    cache = TeacherCache(out)
    cache.check_data(input_ids, tokenizer)
    assert cache.manifest == manifest == json.loads((out / "manifest.json").read_text())
    n = input_ids.shape[0]
    assert (cache.num_blocks, cache.block_size, cache.top_k) == (n, BLOCK, 8)
    assert (cache.temperature, cache.vocab_size, manifest["id_dtype"]) == (2.0, 300, "uint16")
    assert n % 8 and len(manifest["shards"]) == n // 8 + 1  # a last, partial shard
    assert manifest["bytes_per_token"] == 4 + 8 * (2 + (2 if dtype == "bf16" else 4))

    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ids, logprobs = cache.blocks(order)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    model = load_model(ws / "teacher").eval()
    if bf16:  # the logits the teacher computes in bf16, upcast
        model.to(torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=input_ids[order]).logits.float()
    full = torch.log_softmax(logits / 2.0, -1)
    stored = teacher_cache.LOGPROB_DTYPES[dtype]
    top = full.topk(8, -1).values.to(stored).float()
    # The cached values are the top 8, largest first, and each is the log-probability of its id
    # (compared in the stored precision, so a near-tie may swap ids, never values).
    tol = {"atol": 1e-5, "rtol": 0} if dtype == "fp32" else {"atol": 0.02, "rtol": 0.01}
    if bf16:  # the teacher's own bf16 rounding (softmax of bf16 logits is computed in fp32)
        tol = {"atol": 1e-3, "rtol": 0}
    torch.testing.assert_close(logprobs, top, **tol)
    torch.testing.assert_close(full.gather(-1, ids).to(stored).float(), logprobs, **tol)
    # The stored input ids are the packed ones.
    stored_ids = torch.cat(
        [shard_tensors(out / e["file"])["input_ids"] for e in manifest["shards"]]
    )
    assert torch.equal(stored_ids.long(), input_ids)


def test_bytes_per_token():
    assert bytes_per_token(64, "bf16", "uint16") == 260 <= 400
    assert bytes_per_token(64, "fp32", "int32") == 516


def test_fingerprints():
    ids = torch.arange(12).view(3, 4)
    assert data_fingerprint(ids) == data_fingerprint(ids.int())  # the values, not the dtype
    assert data_fingerprint(ids) != data_fingerprint(ids.view(4, 3))  # same stream, other blocks
    a = train_tokenizer(["hello world " * 50], 300)
    b = train_tokenizer(["other words " * 50], 300)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(
        train_tokenizer(["hello world " * 50], 300)
    )
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


# ---------------------------------------------------------------- resume


def test_a_rerun_keeps_every_shard_and_loads_no_model(ws, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    shutil.copytree(ws / "cache", out)
    before = stamps(out)

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(teacher_cache, "load_model", fail)
    build_cache(ws / "teacher", ws / "data.txt", out, **SETTINGS)
    assert stamps(out) == before


def test_a_missing_or_foreign_shard_is_recomputed(ws, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(ws / "cache", out)
    (out / shard_name(3)).unlink()
    shutil.copy(out / shard_name(1), out / shard_name(2))  # a complete shard, other blocks
    before = stamps(out)
    build_cache(ws / "teacher", ws / "data.txt", out, **SETTINGS)
    after = stamps(out)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {shard_name(2), shard_name(3)}
    for name in (shard_name(2), shard_name(3)):
        assert_same_shard(out / name, ws / "cache" / name)


# A CLI run that SIGKILLs itself while shard 2 is half written (its temporary file written,
# cut to half and not yet renamed): the worst moment for a kill.
KILLED_RUN = """
import os, signal, sys
from fastkd.cli import main
rename = os.replace
def replace(src, dst):
    if str(dst).endswith("shard-00002.safetensors"):
        os.truncate(src, os.path.getsize(src) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_leaves_no_partial_shard_and_resumes(ws, tmp_path):
    out = tmp_path / "killed"
    argv = [
        "cache-teacher", "--teacher", ws / "teacher", "--data", ws / "data.txt", "--out", out,
        "--temperature", "2", "--top-k", "8", "--block-size", BLOCK, "--shard-blocks", 8,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr[-3000:]
    # Shards 0 and 1 are complete; shard 2 exists only as the temporary file.
    assert sorted(p.name for p in out.glob("shard-*")) == [
        shard_name(0),
        shard_name(1),
        shard_name(2) + teacher_cache.TMP_SUFFIX,
    ]
    with pytest.raises(ValueError, match=r"incomplete: rerun fastkd cache-teacher"):
        TeacherCache(out)
    before = stamps(out)
    del before[shard_name(2) + teacher_cache.TMP_SUFFIX]

    build_cache(ws / "teacher", ws / "data.txt", out, **SETTINGS)
    after = stamps(out)
    assert {name: after[name] for name in before} == before  # not rewritten
    assert not list(out.glob(f"*{teacher_cache.TMP_SUFFIX}"))
    clean = ws / "cache"
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (clean / "manifest.json").read_text()
    )
    for name in after:
        assert_same_shard(out / name, clean / name)


@pytest.mark.slow
def test_torchrun_splits_the_shards_and_rank_0_writes_the_manifest(ws, tmp_path):
    out = tmp_path / "torchrun"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = [
        torchrun, "--standalone", "--nproc_per_node", 2, "-m", "fastkd",
        "cache-teacher", "--teacher", ws / "teacher", "--data", ws / "data.txt", "--out", out,
        "--temperature", "2", "--top-k", "8", "--block-size", BLOCK, "--shard-blocks", 8,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        list(map(str, argv)), capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shards = len(TeacherCache(out).manifest["shards"])
    # Each rank computed its half (s % 2 == rank).
    assert f"rank 0: 0 of {(shards + 1) // 2} shards already" in done.stdout
    assert f"rank 1: 0 of {shards // 2} shards already" in done.stdout
    clean = ws / "cache"
    assert (out / "manifest.json").read_text() == (clean / "manifest.json").read_text()
    for entry in TeacherCache(out).manifest["shards"]:
        assert_same_shard(out / entry["file"], clean / entry["file"])


# ---------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_size": 16}, "block_size 32 there, 16 here"),
        ({"temperature": 1.0}, "temperature 2.0 there, 1.0 here"),
        ({"top_k": 4}, "top_k 8 there, 4 here"),
        ({"dtype": "fp32"}, "dtype 'bf16' there, 'fp32' here"),
        ({"shard_blocks": 4}, "shard_blocks 8 there, 4 here"),
        ({"data": "other.txt"}, "the data (packed token ids)"),
        ({"teacher": "teacher2"}, "the teacher (config or weights)"),
        ({"tokenizer": "tok2", "allow_tokenizer_mismatch": True}, "the tokenizer"),
        ({"bf16": True}, "teacher_bf16 False there, True here"),
    ],
)
def test_a_rerun_with_other_settings_is_an_error(ws, tmp_path, monkeypatch, change, message):
    out = tmp_path / "cache"
    shutil.copytree(ws / "cache", out)
    before = stamps(out)
    monkeypatch.setattr(teacher_cache, "load_model", lambda *a: pytest.fail("a model loaded"))
    teacher, data, kwargs = ws / "teacher", ws / "data.txt", dict(SETTINGS)
    for key, value in change.items():
        if key == "teacher":
            teacher = ws / value
        elif key == "data":
            data = ws / value
        else:
            kwargs[key] = ws / value if key == "tokenizer" else value
    with pytest.raises(ValueError, match="holds a teacher cache built with other settings") as e:
        build_cache(teacher, data, out, **kwargs)
    assert message in str(e.value) and str(out) in str(e.value)
    assert stamps(out) == before


def test_a_non_cache_directory_is_refused(ws, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty and holds no manifest\.json"):
        build_cache(ws / "teacher", ws / "data.txt", tmp_path, **SETTINGS)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("tokenizer", "was built with another tokenizer"),
        ("block_size", "has block size 32, the data is packed in blocks of 16"),
        ("blocks", "holds {n} blocks, the data packs into {m}: another data file"),
        ("data", "was built from other data (the packed token ids differ)"),
    ],
)
def test_check_data_names_the_difference(ws, kind, message):
    cache = TeacherCache(ws / "cache")
    input_ids, tokenizer = packed(ws)
    n = input_ids.shape[0]
    if kind == "tokenizer":
        _, tokenizer = packed(ws, ws / "tok2")
    elif kind == "block_size":
        input_ids, _ = packed(ws, block_size=16)
    elif kind == "blocks":
        input_ids = input_ids[:-1]
    else:
        input_ids = input_ids.flip(0)
    with pytest.raises(ValueError) as e:
        cache.check_data(input_ids, tokenizer)
    assert f"teacher cache {ws / 'cache'} " in str(e.value)
    assert message.format(n=n, m=n - 1) in str(e.value)


# ---------------------------------------------------------------- damaged caches


def test_missing_and_incomplete_caches(ws, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        TeacherCache(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        TeacherCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        TeacherCache(tmp_path)
    manifest = json.loads((ws / "cache" / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is incomplete: rerun fastkd")):
        TeacherCache(tmp_path)


def test_a_truncated_shard_is_an_error_naming_it(ws, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(ws / "cache", out)
    shard = out / shard_name(1)
    os.truncate(shard, shard.stat().st_size - 100)
    cache = TeacherCache(out)
    cache.blocks([0, 1])  # shard 0 reads
    with pytest.raises(ValueError, match=re.escape(f"shard {shard} is ") + ".* bytes, manifest"):
        cache.blocks([3, 9])
    # Truncated and the manifest edited to match: safetensors' own check names it.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = shard.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(f"shard {shard}: not a readable safetensors")):
        TeacherCache(out).blocks([9])
    with pytest.raises(IndexError, match="block 1000 is outside"):
        cache.blocks([1000])


def _damage(ids, logprobs, what):
    if what == "id out of range":
        ids[1, 5, 2] = 300
    elif what == "repeated id":
        ids[1, 5, 3] = ids[1, 5, 0]
    elif what == "nan":
        logprobs[1, 5, 2] = float("nan")
    elif what == "positive":
        logprobs[1, 5, 0] = 0.5
    else:  # probabilities above 1
        logprobs[1, 5, :3] = -0.5


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("id out of range", "an id outside [0, 300)"),
        ("repeated id", "a repeated id"),
        ("nan", "a NaN log-probability"),
        ("positive", "a log-probability above 0"),
        ("sum", "probabilities summing above 1 + 0.01"),
    ],
)
def test_bad_values_are_errors_naming_file_and_block(ws, tmp_path, what, message):
    out = tmp_path / "cache"
    shutil.copytree(ws / "cache", out)
    manifest = json.loads((out / "manifest.json").read_text())
    tensors = shard_tensors(out / shard_name(2))
    ids, logprobs = tensors["ids"].long(), tensors["logprobs"].float()
    _damage(ids, logprobs, what)
    write_shard(out, manifest, 2, tensors["input_ids"], ids, logprobs)
    manifest["shards"][2]["bytes"] = (out / shard_name(2)).stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    cache = TeacherCache(out)
    cache.blocks([16, 23])
    with pytest.raises(ValueError) as e:
        cache.blocks([0, 17])
    assert str(e.value) == (
        f"teacher cache shard {out / shard_name(2)}: {message} at block 17, position 5"
    )
