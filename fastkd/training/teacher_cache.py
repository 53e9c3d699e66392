"""The offline teacher: its top-k log-probabilities over packed data, cached on disk once
(``fastkd cache-teacher``) and read back block by block for training (``TeacherCache``).

A cache is a directory (docs/design.md §11, "Teacher cache"):

* ``shard-00000.safetensors``, ...: consecutive runs of ``shard_blocks`` blocks, each holding
  ``input_ids`` [b, S] int32, ``ids`` [b, S, k] (uint16 when the teacher's vocabulary fits,
  else int32) and ``logprobs`` [b, S, k] (bf16 or fp32): per position the teacher's top-k token
  ids and log softmax(z / T) at them, over the teacher's full vocabulary, largest first. The
  safetensors metadata names the settings hash and the shard's blocks.
* ``manifest.json``: the settings (``SETTINGS``: format, teacher/tokenizer/data fingerprints,
  the teacher's precision, T, k, dtypes, vocabulary, block size and count, blocks per shard),
  bytes per token, the shard list (file, first block, blocks, bytes) and ``complete``, true
  only once every shard is written.

Blocks are numbered as ``pack`` returns them, before the train/held-out split, so training
looks up any block of ``fastkd distill``'s split by its number.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fastkd.training.data import (
    has_tokenizer,
    load_tokenizer,
    pack,
    read_records,
    tokenizer_difference,
)
from fastkd.training.files import TMP_SUFFIX, atomic_write
from fastkd.training.models import CHUNK_ELEMENTS, Head, body, check_head, load_model

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
    "teacher_bf16",
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


# --- writing: fastkd cache-teacher -----------------------------------------------------------

# Shard size aimed at when --shard-blocks is not given (payload bytes).
SHARD_BYTES = 256 << 20
# Characters of the data on which --tokenizer and the teacher's own tokenizer must agree.
SAMPLE_CHARS = 4000
# Weight files a model directory may hold (what from_pretrained loads).
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# A weight file above WINDOWS windows of WINDOW bytes is fingerprinted by those windows, evenly
# spaced from its first byte (its header) to its last, instead of by its whole content.
WINDOW = 1 << 20
WINDOWS = 64


def _file_digest(path: Path) -> str:
    """sha256 of a file, or of WINDOWS evenly spaced windows of it when it is larger."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= WINDOW * WINDOWS:
            for chunk in iter(lambda: f.read(WINDOW), b""):
                digest.update(chunk)
        else:
            for i in range(WINDOWS):
                f.seek(i * (size - WINDOW) // (WINDOWS - 1))
                digest.update(f.read(WINDOW))
    return digest.hexdigest()


def teacher_fingerprint(teacher: str | os.PathLike) -> str:
    """sha256 (hex) of a model directory's config.json (less ``transformers_version``) and its
    weight files (name, size and content; a file over 64 MiB by 64 evenly spaced 1 MiB windows,
    so the fingerprint of a large teacher costs 64 MiB of reads per file, not all of it)."""
    teacher = Path(teacher)
    config = json.loads((teacher / "config.json").read_text())
    config.pop("transformers_version", None)
    files = sorted(p for p in teacher.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"--teacher {teacher}: no weight files (*.safetensors, *.bin)")
    return _sha256_json({"config": config, "weights": [(p.name, _file_digest(p)) for p in files]})


def write_manifest(out: Path, manifest: dict) -> None:
    """Write ``out``/manifest.json atomically."""
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def write_shard(
    out: Path,
    manifest: dict,
    shard: int,
    input_ids: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
) -> None:
    """Write shard ``shard`` of the cache ``manifest`` describes atomically."""
    first = shard * manifest["shard_blocks"]
    metadata = {
        "format": FORMAT,
        "settings": settings_hash(manifest),
        "first_block": str(first),
        "blocks": str(ids.shape[0]),
    }
    data = save(
        {
            "input_ids": input_ids.to(torch.int32).contiguous(),
            "ids": ids.to(ID_DTYPES[manifest["id_dtype"]]).contiguous(),
            "logprobs": logprobs.to(LOGPROB_DTYPES[manifest["dtype"]]).contiguous(),
        },
        metadata=metadata,
    )
    atomic_write(out / shard_name(shard), data)


def bytes_per_token(top_k: int, dtype: str, id_dtype: str) -> int:
    """Payload bytes a cached token takes: its input id (int32), k ids and k log-probs."""
    size = {"uint16": 2, "int32": 4, "bf16": 2, "fp32": 4}
    return 4 + top_k * (size[id_dtype] + size[dtype])


@torch.no_grad()
def teacher_topk(
    model: torch.nn.Module, input_ids: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k of log softmax(z / T) at every position of ``input_ids`` [b, S].

    z are the logits ``fastkd distill`` sees (body, then ``Head``: the model's logit scale and
    softcap applied, in fp32), computed a chunk of positions at a time so that [b, S, V] logits
    never exist. The model must be in eval mode.

    Returns:
        ``(ids, logprobs)``: int64 and fp32 ``[b, S, k]``, largest log-probability first.
    """
    head = Head(model)
    device = head.base.weight.device
    hidden = body(model)(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids, device=device),
        use_cache=False,
    ).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = head.weight(), head.bias()
    ids = torch.empty((rows.shape[0], top_k), dtype=torch.int64, device=device)
    logprobs = torch.empty((rows.shape[0], top_k), dtype=torch.float32, device=device)
    step = max(1, CHUNK_ELEMENTS // head.vocab_size)
    for start in range(0, rows.shape[0], step):
        # log softmax(a) at the top k of a = z / T is a - lse(a) there: two reads of the
        # chunk (top-k, log-sum-exp), no [rows, V] log-softmax written.
        a = head.logits(rows[start : start + step], weight, bias).div_(temperature)
        values, indices = a.topk(top_k, -1)
        logprobs[start : start + step] = values - a.logsumexp(-1, keepdim=True)
        ids[start : start + step] = indices
    shape = (*input_ids.shape, top_k)
    return ids.view(shape).cpu(), logprobs.view(shape).cpu()


def _check_arguments(
    teacher,
    data,
    out,
    *,
    top_k,
    temperature,
    dtype,
    block_size,
    batch_size,
    tokenizer,
    shard_blocks,
) -> None:
    """ValueError / FileNotFoundError naming the flag of a bad argument (before anything
    loads)."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"--top-k must be an int >= 1, got {top_k}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"--temperature must be a finite number > 0, got {temperature}")
    if dtype not in LOGPROB_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {dtype!r}")
    for flag, value, low in (("--block-size", block_size, 2), ("--batch-size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{flag} must be an int >= {low}, got {value}")
    if shard_blocks is not None and (not isinstance(shard_blocks, int) or shard_blocks < 1):
        raise ValueError(f"--shard-blocks must be an int >= 1, got {shard_blocks}")
    if not (Path(teacher) / "config.json").is_file():
        raise FileNotFoundError(f"--teacher {teacher}: not a model directory (no config.json)")
    if not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    if tokenizer is not None and not has_tokenizer(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer files there")
    if tokenizer is None and not has_tokenizer(teacher):
        raise FileNotFoundError(f"--teacher {teacher} holds no tokenizer: pass --tokenizer")
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")


def _differences(old: dict, new: dict) -> list[str]:
    """The settings in which an existing manifest and this run differ, in words."""
    names = {
        "teacher_fingerprint": "the teacher (config or weights)",
        "tokenizer_fingerprint": "the tokenizer",
        "data_fingerprint": "the data (packed token ids)",
    }
    return [
        names[key] if key in names else f"{key} {old.get(key)!r} there, {new[key]!r} here"
        for key in SETTINGS
        if old.get(key) != new[key]
    ]


def _existing(out: Path, manifest: dict) -> dict | None:
    """The manifest already in ``out`` (None for an empty or new directory); ValueError if it
    is another cache's or ``out`` holds other files."""
    file = out / MANIFEST
    if not file.is_file():
        others = [p.name for p in out.iterdir() if not p.name.endswith(TMP_SUFFIX)]
        if others:
            raise ValueError(
                f"--out {out} is not empty and holds no {MANIFEST} (not a teacher cache): "
                "use an empty or new directory"
            )
        return None
    try:
        old = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    why = _differences(old, manifest) if isinstance(old, dict) else ["not a manifest"]
    if why:
        raise ValueError(
            f"--out {out} holds a teacher cache built with other settings ({'; '.join(why)}): "
            "use another --out, or delete it to rebuild"
        )
    return old


def _shard_blocks(manifest: dict, shard: int) -> tuple[int, int]:
    """(first block, blocks) of shard ``shard``."""
    first = shard * manifest["shard_blocks"]
    return first, min(manifest["shard_blocks"], manifest["num_blocks"] - first)


def _missing(out: Path, manifest: dict, shards) -> list[int]:
    """The shards among ``shards`` that are not (correctly) in ``out``."""
    return [
        s
        for s in shards
        if not (out / shard_name(s)).is_file()
        or shard_problem(out / shard_name(s), manifest, *_shard_blocks(manifest, s)) is not None
    ]


def build_cache(
    teacher: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    temperature: float,
    top_k: int = 64,
    dtype: str = "bf16",
    block_size: int = 128,
    batch_size: int = 8,
    tokenizer: str | os.PathLike | None = None,
    shard_blocks: int | None = None,
    bf16: bool = False,
    allow_tokenizer_mismatch: bool = False,
) -> dict:
    """Run ``teacher`` over ``data`` packed as ``fastkd distill`` packs it and cache its top-k
    log-probabilities at ``temperature`` in ``out`` (the module docstring gives the format).

    Resumable: shards already in ``out`` (checked by their header) are kept, missing ones
    computed; ``out`` holding a cache with other settings is an error. Under torchrun
    (``WORLD_SIZE`` > 1) process r computes the shards s with s % world == r, and process 0
    writes the final manifest after a barrier. Every argument is checked and the data packed
    before the model loads; nothing loads when every shard is there.

    Args:
        teacher: model directory.
        data: records (``read_records``).
        out: cache directory (created).
        temperature: T of the cached log softmax(z / T); distil at the same T.
        top_k: ids per position, at most the teacher's vocabulary.
        dtype: log-probability storage, ``bf16`` or ``fp32``.
        block_size: tokens per packed block (``distill``'s ``--block_size``).
        batch_size: blocks per teacher forward.
        tokenizer: tokenizer directory that packs the data (default: the teacher's).
        shard_blocks: blocks per shard (default: about 256 MiB per shard).
        bf16: run the teacher in bf16 (as ``distill --bf16`` does), else as it loads.
        allow_tokenizer_mismatch: take ``tokenizer``'s ids as the teacher's tokens even where
            the teacher's own tokenizer disagrees with it.

    Returns:
        The final manifest.
    """
    import transformers

    _check_arguments(
        teacher,
        data,
        out,
        top_k=top_k,
        temperature=temperature,
        dtype=dtype,
        block_size=block_size,
        batch_size=batch_size,
        tokenizer=tokenizer,
        shard_blocks=shard_blocks,
    )
    out = Path(out)
    config = transformers.AutoConfig.from_pretrained(teacher, local_files_only=True)
    vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    if top_k > vocab:
        raise ValueError(f"--top-k {top_k} is larger than the teacher's vocabulary ({vocab})")
    tok = load_tokenizer(tokenizer if tokenizer is not None else teacher)
    records = read_records(data)
    if tokenizer is not None and has_tokenizer(teacher) and not allow_tokenizer_mismatch:
        sample = "".join(text for r in records[:50] for text in r.values())[:SAMPLE_CHARS]
        why = tokenizer_difference(tok, load_tokenizer(teacher), sample)
        if why is not None:
            raise ValueError(
                f"the tokenizers in --tokenizer {tokenizer} and --teacher {teacher} differ "
                f"({why}): the teacher would read the ids as other tokens; pass "
                "--allow-tokenizer-mismatch to take them as the same tokens"
            )
    input_ids, _ = pack(records, tok, block_size)
    if int(input_ids.max()) >= vocab:
        raise ValueError(
            f"the data holds token id {int(input_ids.max())} but the teacher's vocabulary has "
            f"{vocab} ids"
        )
    id_dtype = "uint16" if vocab <= 1 << 16 else "int32"
    per_block = bytes_per_token(top_k, dtype, id_dtype) * block_size
    num_blocks = input_ids.shape[0]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "teacher_bf16": bool(bf16),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "data_fingerprint": data_fingerprint(input_ids),
        "temperature": float(temperature),
        "top_k": top_k,
        "dtype": dtype,
        "id_dtype": id_dtype,
        "vocab_size": vocab,
        "block_size": block_size,
        "num_blocks": num_blocks,
        "shard_blocks": shard_blocks or max(1, min(num_blocks, SHARD_BYTES // per_block)),
        "bytes_per_token": bytes_per_token(top_k, dtype, id_dtype),
        "teacher": {"path": str(Path(teacher).resolve()), "model_type": config.model_type},
        "complete": False,
        "shards": [],
    }
    shards = range(math.ceil(num_blocks / manifest["shard_blocks"]))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    try:
        out.mkdir(parents=True, exist_ok=True)
        old = _existing(out, manifest)
        if rank == 0:
            # A shard or manifest being written (files.TMP_SUFFIX) when a run was killed:
            # never read, deleted here.
            for tmp in out.glob(f"*{TMP_SUFFIX}"):
                tmp.unlink()
            if old is None or (old.get("complete") and _missing(out, manifest, shards)):
                write_manifest(out, manifest)
        _barrier(world)
        _compute(teacher, input_ids, out, manifest, shards[rank::world], batch_size, rank)
        _barrier(world)
        if rank == 0:
            absent = _missing(out, manifest, shards)
            if absent:
                raise RuntimeError(f"{out}: shards {absent} were not written")
            manifest["shards"] = [
                {
                    "file": shard_name(s),
                    "first_block": _shard_blocks(manifest, s)[0],
                    "blocks": _shard_blocks(manifest, s)[1],
                    "bytes": (out / shard_name(s)).stat().st_size,
                }
                for s in shards
            ]
            manifest["complete"] = True
            write_manifest(out, manifest)
        _barrier(world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return manifest


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _compute(teacher, input_ids, out, manifest, shards, batch_size: int, rank: int) -> None:
    """Compute and write those of ``shards`` that are missing in ``out`` (a progress bar on
    rank 0); the teacher loads only if there are any."""
    import time

    from tqdm.auto import tqdm

    todo = _missing(out, manifest, shards)
    print(f"rank {rank}: {len(shards) - len(todo)} of {len(shards)} shards already in {out}")
    if not todo:
        return
    model = load_model(teacher)
    if Head(model).vocab_size != manifest["vocab_size"]:
        raise ValueError(
            f"--teacher {teacher}: its head has {Head(model).vocab_size} rows, its config says "
            f"vocab_size {manifest['vocab_size']}"
        )
    if manifest["teacher_bf16"]:
        model.to(torch.bfloat16)
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    model.eval()
    check_head(model)
    blocks = sum(_shard_blocks(manifest, s)[1] for s in todo)
    id_dtype, lp_dtype = ID_DTYPES[manifest["id_dtype"]], LOGPROB_DTYPES[manifest["dtype"]]
    k = manifest["top_k"]
    start = time.perf_counter()
    with tqdm(total=blocks, unit="block", desc="teacher top-k", disable=rank != 0) as bar:
        for s in todo:
            first, n = _shard_blocks(manifest, s)
            parts = []
            for b in range(first, first + n, batch_size):  # batches stay inside the shard
                batch = input_ids[b : min(b + batch_size, first + n)]
                ids, logprobs = teacher_topk(model, batch, k, manifest["temperature"])
                # In the storage types at once: a shard in int64 and fp32 would take 3x.
                parts.append((ids.to(id_dtype), logprobs.to(lp_dtype)))
                bar.update(batch.shape[0])
            ids, logprobs = (torch.cat(p) for p in zip(*parts))
            write_shard(out, manifest, s, input_ids[first : first + n], ids, logprobs)
    seconds = time.perf_counter() - start
    tokens = blocks * input_ids.shape[1]
    print(
        f"rank {rank}: {blocks} blocks ({tokens} tokens) in {seconds:.1f} s, "
        f"{tokens / seconds:.0f} tokens/s"
    )
