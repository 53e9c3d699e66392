"""The offline teacher: its top-k log-probabilities over packed data, cached on disk once
(``fastkd cache-teacher``) and read back block by block for training (``TeacherCache``).

A cache is a directory (docs/design.md §11, "Teacher cache"):

* ``shard-00000.safetensors``, ...: consecutive runs of ``shard_blocks`` blocks, each holding
  ``input_ids`` [b, S] int32, ``ids`` [b, S, k] (uint16 when the teacher's vocabulary fits,
  else int32) and ``logprobs`` [b, S, k] (bf16 or fp32): per position the teacher's top-k token
  ids and log softmax(z / T) at them, over the teacher's full vocabulary, largest first. The
  safetensors metadata names the settings hash and the shard's blocks.
* ``manifest.json``: the settings (format, teacher/tokenizer/data fingerprints, T, k, dtypes,
  vocabulary, block size and count, blocks per shard), their hash, the shard list (file, first
  block, blocks, bytes) and ``complete``, true only once every shard is written.

Blocks are numbered as ``pack`` returns them, before the train/held-out split, so training
looks up any block of ``fastkd distill``'s split by its number.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

FORMAT = "fastkd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
# Log-probability storage types, by their --dtype name.
LOGPROB_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Id storage types, by their manifest name.
ID_DTYPES = {"uint16": torch.uint16, "int32": torch.int32}
# How far above 1 the exp-sum of a position's cached probabilities may round: bf16 keeps 8
# significant bits (each p off by up to 2^-9 relative), fp32 24.
EXP_SUM_TOL = {"bf16": 1e-2, "fp32": 1e-4}
# The manifest keys that fix a cache's content; a rerun into the same directory must agree on
# every one (the shard list and ``complete`` are progress, ``teacher`` is informational).
SETTINGS = (
    "format",
    "version",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "data_fingerprint",
    "temperature",
    "top_k",
    "dtype",
    "id_dtype",
    "vocab_size",
    "block_size",
    "num_blocks",
    "shard_blocks",
)


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) of what packing depends on: the vocabulary (every token with its id, added
    tokens included), the eos id and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return _sha256_json(
        {
            "vocab": vocab,
            "eos_token_id": tokenizer.eos_token_id,
            "special_tokens": sorted(tokenizer.all_special_tokens),
        }
    )


def data_fingerprint(input_ids: torch.Tensor) -> str:
    """sha256 (hex) of packed ``input_ids`` [num_blocks, block_size]: the shape, then the ids
    as little-endian int64 in row-major order."""
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be [num_blocks, block_size], got shape {tuple(input_ids.shape)}"
        )
    digest = hashlib.sha256(f"{input_ids.shape[0]}x{input_ids.shape[1]}:".encode())
    digest.update(input_ids.detach().cpu().numpy().astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.safetensors"


def settings_hash(manifest: dict) -> str:
    """sha256 (hex) of the manifest's ``SETTINGS``: stored in every shard's metadata, so a shard
    from another cache is recognised."""
    return _sha256_json({key: manifest[key] for key in SETTINGS})


def shard_problem(path: Path, manifest: dict, first: int, blocks: int) -> str | None:
    """Why the file at ``path`` is not shard (``first``, ``blocks``) of the cache ``manifest``
    describes (unreadable, truncated, another cache's, other blocks, shapes or dtypes), or None.
    Reads only the header."""
    s, k = manifest["block_size"], manifest["top_k"]
    expected = {
        "input_ids": ((blocks, s), "I32"),
        "ids": ((blocks, s, k), {"uint16": "U16", "int32": "I32"}[manifest["id_dtype"]]),
        "logprobs": ((blocks, s, k), {"bf16": "BF16", "fp32": "F32"}[manifest["dtype"]]),
    }
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            names = f.keys()
            slices = {name: f.get_slice(name) for name in names}
            found = {name: (tuple(t.get_shape()), t.get_dtype()) for name, t in slices.items()}
    except (SafetensorError, OSError) as e:
        return f"not a readable safetensors file (truncated or corrupt: {e})"
    if meta.get("format") != FORMAT or meta.get("settings") != settings_hash(manifest):
        return "a shard of another cache (its settings hash differs from the manifest's)"
    if (meta.get("first_block"), meta.get("blocks")) != (str(first), str(blocks)):
        return (
            f"holds blocks {meta.get('first_block')}+{meta.get('blocks')}, expected "
            f"{first}+{blocks}"
        )
    if found != expected:
        return f"tensors {found}, expected {expected}"
    return None


class TeacherCache:
    """A complete teacher cache written by ``fastkd cache-teacher``, read block by block.

    Attributes:
        path: the cache directory.
        manifest: ``manifest.json`` as a dict.
        temperature: T of the cached log-probabilities (the loss's temperature must be it).
        top_k: k, ids and log-probabilities per position.
        block_size: tokens per block.
        num_blocks: blocks in the cache (all of ``pack``'s blocks, before any split).
        vocab_size: the teacher's vocabulary size (every cached id is below it).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        """Read and check ``path``/manifest.json.

        Raises:
            FileNotFoundError: ``path`` or its manifest does not exist.
            ValueError: the manifest is not a fastkd teacher cache's (of this format version),
                is malformed, or the cache is incomplete (a ``cache-teacher`` run that did not
                finish: rerun it to complete the cache).
        """
        self.path = Path(path)
        file = self.path / MANIFEST
        if not self.path.is_dir():
            raise FileNotFoundError(f"teacher cache {self.path}: no such directory")
        if not file.is_file():
            raise FileNotFoundError(
                f"teacher cache {self.path}: no {MANIFEST} (not a cache written by "
                "fastkd cache-teacher)"
            )
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{file}: not a fastkd teacher cache manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(
                f"{file}: format version {manifest.get('version')}, this fastkd reads {VERSION}"
            )
        missing = [key for key in (*SETTINGS, "complete", "shards") if key not in manifest]
        if missing:
            raise ValueError(f"{file}: missing keys {missing}")
        if manifest["complete"] is not True:
            raise ValueError(
                f"teacher cache {self.path} is incomplete: rerun fastkd cache-teacher with the "
                "same arguments to finish it"
            )
        self.manifest = manifest
        self.temperature = float(manifest["temperature"])
        self.top_k = int(manifest["top_k"])
        self.block_size = int(manifest["block_size"])
        self.num_blocks = int(manifest["num_blocks"])
        self.vocab_size = int(manifest["vocab_size"])
        self.shard_blocks = int(manifest["shard_blocks"])
        if manifest["dtype"] not in LOGPROB_DTYPES or manifest["id_dtype"] not in ID_DTYPES:
            raise ValueError(
                f"{file}: dtype {manifest['dtype']!r} / id_dtype {manifest['id_dtype']!r} "
                f"not among {list(LOGPROB_DTYPES)} / {list(ID_DTYPES)}"
            )
        self._tol = EXP_SUM_TOL[manifest["dtype"]]
        self._shards = manifest["shards"]
        covered = [(e.get("first_block"), e.get("blocks")) for e in self._shards]
        expected = [
            (first, min(self.shard_blocks, self.num_blocks - first))
            for first in range(0, self.num_blocks, self.shard_blocks)
        ]
        if covered != expected:
            raise ValueError(
                f"{file}: the shard list does not cover blocks 0..{self.num_blocks - 1} in "
                f"runs of {self.shard_blocks}"
            )
        self._checked: set[int] = set()  # shards whose header was checked

    def check_data(self, input_ids: torch.Tensor, tokenizer) -> None:
        """Raise ValueError unless ``input_ids`` [num_blocks, block_size] (``pack``'s, before
        the split) and ``tokenizer`` are what the cache was built from; the message names what
        differs: the tokenizer, the block size, the number of blocks or the data."""
        where = f"teacher cache {self.path}"
        if tokenizer_fingerprint(tokenizer) != self.manifest["tokenizer_fingerprint"]:
            raise ValueError(
                f"{where} was built with another tokenizer (its vocabulary or special tokens "
                "differ): pack the data with the cache's tokenizer or rebuild the cache"
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [num_blocks, block_size], got {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] != self.block_size:
            raise ValueError(
                f"{where} has block size {self.block_size}, the data is packed in blocks of "
                f"{input_ids.shape[1]}: pass --block_size {self.block_size}"
            )
        if input_ids.shape[0] != self.num_blocks:
            raise ValueError(
                f"{where} holds {self.num_blocks} blocks, the data packs into "
                f"{input_ids.shape[0]}: another data file"
            )
        if data_fingerprint(input_ids) != self.manifest["data_fingerprint"]:
            raise ValueError(
                f"{where} was built from other data (the packed token ids differ): another "
                "data file"
            )

    def blocks(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached teacher top-k of blocks ``index`` (a list or 1-d tensor of block numbers).

        Reads only the shards holding them, and of those only the requested rows.

        Returns:
            ``(ids, logprobs)``: int64 and fp32, both ``[len(index), block_size, top_k]``, in
            the order of ``index``; per position the ids are distinct, in
            ``[0, vocab_size)``, and the log-probabilities descending.

        Raises:
            IndexError: a block number outside ``[0, num_blocks)``.
            ValueError: a shard that is missing, truncated or corrupt, or of another cache, or
                whose values break the format (an id out of range or repeated, a
                log-probability above 0 or NaN, probabilities summing above 1 + tolerance);
                the message names the file and the block.
        """
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        outside = (index < 0) | (index >= self.num_blocks)
        if outside.any():
            bad = index[outside][0]
            raise IndexError(f"block {int(bad)} is outside [0, {self.num_blocks}) in {self.path}")
        n, s, k = index.numel(), self.block_size, self.top_k
        ids = torch.empty((n, s, k), dtype=torch.int64)
        logprobs = torch.empty((n, s, k), dtype=torch.float32)
        shard_of = index // self.shard_blocks
        for shard in shard_of.unique().tolist():
            where = (shard_of == shard).nonzero().squeeze(1)
            local = index[where] - shard * self.shard_blocks
            got_ids, got_lp = self._read(shard, local)
            ids[where], logprobs[where] = got_ids, got_lp
        return ids, logprobs

    def _read(self, shard: int, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``local`` of shard ``shard``, checked, as (int64, fp32)."""
        entry = self._shards[shard]
        path = self.path / entry["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            state = "missing" if size is None else f"{size} bytes, manifest: {entry['bytes']}"
            raise ValueError(f"teacher cache shard {path} is {state} (truncated or replaced)")
        if shard not in self._checked:
            why = shard_problem(path, self.manifest, entry["first_block"], entry["blocks"])
            if why is not None:
                raise ValueError(f"teacher cache shard {path}: {why}")
            self._checked.add(shard)
        # Consecutive rows are read as one slice: a batch of neighbouring blocks is one read.
        order = local.argsort()
        rows = local[order].tolist()
        runs, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                runs.append((rows[start], rows[i - 1] + 1))
                start = i
        try:
            with safe_open(path, "pt") as f:
                parts = [[f.get_slice(name)[a:b] for a, b in runs] for name in ("ids", "logprobs")]
        except SafetensorError as e:
            raise ValueError(f"teacher cache shard {path}: unreadable ({e})") from None
        ids = torch.empty((len(rows), self.block_size, self.top_k), dtype=torch.int64)
        logprobs = torch.empty(ids.shape, dtype=torch.float32)
        ids[order] = torch.cat(parts[0]).to(torch.int64)
        logprobs[order] = torch.cat(parts[1]).to(torch.float32)
        self._validate(path, entry["first_block"] + local, ids, logprobs)
        return ids, logprobs

    def _validate(self, path: Path, blocks: torch.Tensor, ids, logprobs) -> None:
        """ValueError naming the file, block and position of the first value breaking the
        format."""
        sorted_ids = ids.sort(-1).values
        checks = (
            ((ids < 0) | (ids >= self.vocab_size)).any(-1),
            (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(-1),
            logprobs.isnan().any(-1),
            (logprobs > 0).any(-1),
            logprobs.exp().sum(-1) > 1 + self._tol,
        )
        what = (
            f"an id outside [0, {self.vocab_size})",
            "a repeated id",
            "a NaN log-probability",
            "a log-probability above 0",
            f"probabilities summing above 1 + {self._tol:g}",
        )
        for bad, text in zip(checks, what):
            if bad.any():
                b, t = (int(v) for v in bad.nonzero()[0])
                raise ValueError(
                    f"teacher cache shard {path}: {text} at block {int(blocks[b])}, position {t}"
                )
