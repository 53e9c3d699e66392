"""Training data: read records, train or load a tokenizer, pack tokens into fixed-size blocks.

Conventions shared by everything here and by ``transformers``' causal LMs: ``labels`` has the
same positions as ``input_ids`` (the model shifts them internally, so position t is scored on
predicting ``labels[t + 1]``), and ``-100`` marks a position that is not a target.

A record is ``{"text": str}`` (every token is a target) or ``{"prompt": str, "response": str}``
(only the response is a target). Records are packed into one token stream with an eos token
after each record, so a block can span records: the model is trained to end a record with eos
and then start the next one.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IGNORE_INDEX = -100
END_OF_TEXT = "<|endoftext|>"
RECORD_SUFFIXES = (".txt", ".jsonl")
# Any one of these marks a directory as holding a tokenizer (fast, sentencepiece or BPE files).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})

Record = dict[str, str]


class SpanWeights(NamedTuple):
    """Loss weights of the two spans of a response (rationale distillation, docs/design.md
    §12): the tokens before the first ``marker`` in the response text weigh ``rationale``;
    a token that overlaps the marker or follows it, and the record's eos, weigh ``answer``.
    A response without the marker is all answer."""

    rationale: float = 1.0
    answer: float = 1.0
    marker: str = "Answer:"


def _check_record(obj: object, where: str) -> Record:
    """Validate one record and return only its known fields; ``where`` prefixes every error."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_pair = "prompt" in obj or "response" in obj
    if "text" in obj:
        if has_pair:
            raise ValueError(f"{where}: has both 'text' and 'prompt'/'response'; give one kind")
        fields = ("text",)
    elif has_pair:
        fields = ("prompt", "response")
    else:
        raise ValueError(f"{where}: needs a 'text' field or 'prompt' and 'response' fields")
    for name in fields:
        if name not in obj:
            raise ValueError(f"{where}: missing field '{name}'")
        if not isinstance(obj[name], str):
            raise ValueError(
                f"{where}: field '{name}' must be a string, got {type(obj[name]).__name__}"
            )
    return {name: obj[name] for name in fields}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from e


def _read_file(path: Path) -> list[Record]:
    if path.suffix == ".txt":
        text = _read_text(path)
        if not text.strip():
            raise ValueError(f"{path}: empty file")
        return [{"text": text}]
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: unsupported suffix; accepted: {', '.join(RECORD_SUFFIXES)}")
    records = [_check_record(obj, where) for where, obj in jsonl_objects(path)]
    if not records:
        raise ValueError(f"{path}: empty file (no records)")
    return records


def jsonl_objects(path: Path) -> Iterator[tuple[str, object]]:
    """(``"file:line"``, the parsed JSON) of each non-empty line of a UTF-8 ``.jsonl`` file;
    ValueError naming the file (and line) for bytes that are not UTF-8 or invalid JSON."""
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            yield f"{path}:{lineno}", obj


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read training records from a file, or from every record file under a directory.

    ``.txt``: the whole file is one ``{"text": ...}`` record. ``.jsonl``: one record per
    non-empty line, either ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` (loss on
    the response only); other keys on a line are ignored. A directory is read recursively:
    its ``.txt`` and ``.jsonl`` files in sorted path order, hidden entries skipped.

    Args:
        path: a ``.txt`` or ``.jsonl`` file, or a directory of them.

    Returns:
        The records, each holding only the fields above.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unsupported suffix, a directory without record files, an empty file,
            invalid UTF-8, or a bad line (invalid JSON, not an object, a missing or non-string
            field); the message names the file and, for ``.jsonl``, the line number.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if not path.is_dir():
        return _read_file(path)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.suffix in RECORD_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"{path}: directory holds no {' or '.join(RECORD_SUFFIXES)} files")
    return [record for file in files for record in _read_file(file)]


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (never the hub) and make sure it can pack.

    Args:
        path: a directory written by ``save_pretrained`` (or holding a model's tokenizer files).

    Returns:
        The tokenizer, with ``pad_token`` set to ``eos_token`` when it had none.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ValueError: the directory holds no tokenizer, it fails to load, or it has no eos token
            (packing needs one to separate records).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such tokenizer directory: {path}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{path} holds no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the tokenizer in {path}: {e}") from e
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer in {path} has no eos token; packing needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether a directory holds tokenizer files (``load_tokenizer`` would try it)."""
    return any((Path(path) / name).is_file() for name in _TOKENIZER_FILES)


def tokenizer_difference(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, sample: str
) -> str | None:
    """How two tokenizers disagree on what the shared token ids mean, or None.

    They agree when every id below the smaller of the two sizes is the same token in both,
    both end records with the same eos id, and both encode ``sample`` to the same ids. A
    difference in size alone is not a disagreement (a model's vocabulary may be padded; the
    distillation loss handles it with ``DistillConfig.vocab``).
    """
    common = min(len(a), len(b))
    tokens_a, tokens_b = ({i: t for t, i in tok.get_vocab().items()} for tok in (a, b))
    for i in range(common):
        if tokens_a.get(i) != tokens_b.get(i):
            return f"id {i} is {tokens_a.get(i)!r} in one and {tokens_b.get(i)!r} in the other"
    if a.eos_token_id != b.eos_token_id:
        return f"eos ids {a.eos_token_id} and {b.eos_token_id}"
    encode = {"add_special_tokens": False, "verbose": False}
    ids_a, ids_b = a(sample, **encode)["input_ids"], b(sample, **encode)["input_ids"]
    if ids_a != ids_b:
        shorter = min(len(ids_a), len(ids_b))
        at = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), shorter)
        return f"a sample of the data encodes differently from token {at} on"
    return None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) with the ``tokenizers`` library.

    ``<|endoftext|>`` is the only special token (id 0) and serves as bos, eos and pad; no token
    is added automatically when encoding. Every byte is in the base alphabet, so any text
    encodes without unknown tokens. The same texts give the same tokenizer.

    Args:
        texts: training texts.
        vocab_size: target vocabulary size, special token and 256 byte tokens included; a small
            corpus may yield fewer tokens (``len(tokenizer)`` is the real size).

    Returns:
        A fast tokenizer that round-trips through ``save_pretrained`` and ``load_tokenizer``.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + eos), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
    )


def _span_weights(response: str, offsets: list[tuple[int, int]], spans: SpanWeights) -> list[float]:
    """``spans``' weight of each response token (its character ``offsets``), and of the eos
    after it."""
    at = response.find(spans.marker)
    if at < 0:
        return [spans.answer] * (len(offsets) + 1)
    return [spans.answer if end > at else spans.rationale for _, end in offsets] + [spans.answer]


def pack(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    span_weights: SpanWeights | None = None,
) -> tuple[torch.Tensor, ...]:
    """Tokenize records, join them with eos into one stream and cut it into blocks.

    Text records: every token is a target. Prompt/response records: prompt tokens get label
    -100, response tokens are targets (prompt and response are tokenized separately, so the
    boundary is exact). An eos token follows every record and is a target. The tokenizer adds
    no special tokens of its own (no bos); special-token strings written in the text are
    encoded as those tokens, as ``transformers`` does by default. The ragged tail that does not
    fill a block is dropped.

    Args:
        records: ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` dicts.
        tokenizer: a tokenizer with an eos token.
        block_size: tokens per block, at least 2.
        span_weights: also return per-token loss weights: a response's tokens weigh as
            ``SpanWeights`` says, a text record's 1, a prompt's 0 (not targets). The spans
            are found with the fast tokenizer's offset mapping, so ``input_ids`` and
            ``labels`` are those of a call without weights.

    Returns:
        ``(input_ids, labels)``, both int64 ``[num_blocks, block_size]``; labels are in the
        same positions as input_ids (the model shifts), -100 where not a target. With
        ``span_weights``, ``(input_ids, labels, token_weights)``, the weights float32 in the
        same positions as the labels.

    Raises:
        ValueError: bad records, no eos token, ``block_size < 2``, fewer tokens than one
            block, or ``span_weights`` with a slow tokenizer (no offset mapping).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; packing needs one")
    if span_weights is not None and not tokenizer.is_fast:
        raise ValueError(
            f"span_weights need a fast tokenizer (its offset mapping finds the spans); "
            f"{type(tokenizer).__name__} is not one"
        )
    records = [_check_record(r, f"record {i}") for i, r in enumerate(records)]
    # datasets holds the tokens in Arrow tables, 4 bytes a token instead of a Python int's 28+,
    # and tokenizes in batches (the fast tokenizer encodes each batch in parallel). A text record
    # is a record whose prompt is empty.
    table = {
        "prompt": [r.get("prompt", "") for r in records],
        "target": [r.get("text", r.get("response")) for r in records],
    }
    if span_weights is not None:
        table["is_response"] = ["response" in r for r in records]
    table = datasets.Dataset.from_dict(table)

    columns = {name: datasets.Sequence(datasets.Value("int32")) for name in ("input_ids", "labels")}
    if span_weights is not None:
        columns["weights"] = datasets.Sequence(datasets.Value("float32"))

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        prompts, targets = (
            tokenizer(
                batch[name],
                add_special_tokens=False,
                return_attention_mask=False,
                # Offsets never change the ids: asking for them only where weights need them.
                return_offsets_mapping=span_weights is not None and name == "target",
                verbose=False,  # long records are expected here; they are cut into blocks below
            )
            for name in ("prompt", "target")
        )
        pairs = list(zip(prompts["input_ids"], targets["input_ids"]))
        out = {
            "input_ids": [p + t + [eos] for p, t in pairs],
            "labels": [[IGNORE_INDEX] * len(p) + t + [eos] for p, t in pairs],
        }
        if span_weights is not None:
            out["weights"] = [
                [0.0] * len(p) + _span_weights(text, offsets, span_weights)
                if is_response
                else [1.0] * (len(t) + 1)
                for (p, t), text, offsets, is_response in zip(
                    pairs, batch["target"], targets["offset_mapping"], batch["is_response"]
                )
            ]
        return out

    tokens = table.map(
        tokenize,
        batched=True,
        remove_columns=table.column_names,
        features=datasets.Features(columns),
        keep_in_memory=True,
        new_fingerprint="fastkd-pack",  # in memory, never cached: no need to hash the tokenizer
        desc="tokenizing",
    )
    ids, labels = (_flat(tokens, name) for name in ("input_ids", "labels"))
    weights = _flat(tokens, "weights") if span_weights is not None else None
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"not enough text for one block: {len(ids)} tokens (eos included) from "
            f"{len(records)} record(s), block_size is {block_size}"
        )
    n = num_blocks * block_size
    shape = (num_blocks, block_size)
    packed = (
        torch.from_numpy(ids[:n]).to(torch.int64).view(shape),
        torch.from_numpy(labels[:n]).to(torch.int64).view(shape),
    )
    if weights is None:
        return packed
    return (*packed, torch.from_numpy(weights[:n]).view(shape))


def _flat(tokens: datasets.Dataset, column: str) -> np.ndarray:
    """One list column of a dataset, every row's values in row order."""
    if len(tokens) == 0:  # no records: map leaves an empty table without the columns
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(
        [chunk.flatten().to_numpy() for chunk in tokens.data.column(column).chunks]
    )


def split_indices(
    num_blocks: int, eval_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block numbers of the training and held-out sides of ``split_blocks``.

    ``round(num_blocks * eval_fraction)`` blocks, clamped so each side gets at least one, are
    drawn by a permutation seeded with ``seed``.

    Returns:
        ``(train_blocks, eval_blocks)``, int64, each sorted (the original block order).
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if num_blocks < 2:
        raise ValueError(f"need at least 2 blocks to split into train and eval, got {num_blocks}")
    n_eval = min(max(round(num_blocks * eval_fraction), 1), num_blocks - 1)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    return perm[n_eval:].sort().values, perm[:n_eval].sort().values


def split_blocks(
    input_ids: torch.Tensor, labels: torch.Tensor, eval_fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Hold out a random, reproducible subset of blocks for evaluation (``split_indices``
    says which); each side keeps the original block order.

    Args:
        input_ids: ``[num_blocks, block_size]``.
        labels: same shape as ``input_ids``.
        eval_fraction: share of blocks held out, in (0, 1).
        seed: seed of the permutation.

    Returns:
        ``((train_ids, train_labels), (eval_ids, eval_labels))``.
    """
    _check_blocks(input_ids, labels)
    train_idx, eval_idx = split_indices(input_ids.shape[0], eval_fraction, seed)
    return (input_ids[train_idx], labels[train_idx]), (input_ids[eval_idx], labels[eval_idx])


def _check_blocks(input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and labels must be [num_blocks, block_size] of one shape, got "
            f"{tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as ``transformers.Trainer`` items.

    Each item is ``{"input_ids", "attention_mask", "labels"}``, int64 ``[block_size]``; the
    attention mask is all ones (blocks are full), labels are in the same positions as
    input_ids with -100 where not a target. Batches with ``default_data_collator``.

    ``blocks`` [num_blocks] are the rows' block numbers in the packed data (``pack``'s output,
    before any split): what a teacher cache is indexed by. Default: 0, 1, 2, ...

    ``token_weights`` (float, the shape of ``input_ids``; ``pack`` with ``span_weights`` gives
    them) are the loss weights of the targets, in the labels' positions; each item then also
    holds its row as ``"token_weights"`` (the ``Distiller``'s argument).
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        blocks: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> None:
        _check_blocks(input_ids, labels)
        if token_weights is not None and (
            token_weights.shape != input_ids.shape or not token_weights.is_floating_point()
        ):
            raise ValueError(
                f"token_weights must be a float tensor of the blocks' shape "
                f"{tuple(input_ids.shape)}, got {token_weights.dtype} {tuple(token_weights.shape)}"
            )
        if blocks is None:
            blocks = torch.arange(input_ids.shape[0])
        elif blocks.shape != input_ids.shape[:1]:
            raise ValueError(
                f"blocks must hold one block number per row ({input_ids.shape[0]}), got shape "
                f"{tuple(blocks.shape)}"
            )
        self.input_ids = input_ids
        self.labels = labels
        self.blocks = blocks
        self.token_weights = token_weights

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}
        if self.token_weights is not None:
            item["token_weights"] = self.token_weights[i]
        return item


class TeacherCacheDataset(torch.utils.data.Dataset):
    """A ``BlockDataset`` whose items also hold the cached teacher's top-k of each position:
    ``teacher_ids`` int64 and ``teacher_logprobs`` fp32, ``[block_size, k]``, read from
    ``cache`` (a ``fastkd.training.teacher_cache.TeacherCache``) by the row's block number when
    the item is fetched (a batch at once: ``__getitems__``). ``default_data_collator`` stacks
    them into ``[B, block_size, k]``, the ``Distiller``'s ``teacher_ids``/``teacher_logprobs``.
    """

    def __init__(self, dataset: BlockDataset, cache) -> None:
        if dataset.input_ids.shape[1] != cache.block_size:
            raise ValueError(
                f"the blocks hold {dataset.input_ids.shape[1]} tokens, the teacher cache's "
                f"{cache.block_size}"
            )
        last = int(dataset.blocks.max()) if len(dataset) else -1
        if last >= cache.num_blocks:
            raise ValueError(
                f"block number {last} is beyond the teacher cache's {cache.num_blocks} blocks"
            )
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        ids, logprobs = self.cache.blocks(self.dataset.blocks[list(indices)])
        return [
            {**self.dataset[i], "teacher_ids": t_ids, "teacher_logprobs": t_lp}
            for i, t_ids, t_lp in zip(indices, ids, logprobs)
        ]


def split_datasets(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    eval_fraction: float,
    seed: int,
    token_weights: torch.Tensor | None = None,
) -> tuple[BlockDataset, BlockDataset]:
    """``split_blocks`` as datasets that know their rows' block numbers (and, when given,
    their token weights)."""
    _check_blocks(input_ids, labels)
    return tuple(
        BlockDataset(
            input_ids[idx], labels[idx], idx, None if token_weights is None else token_weights[idx]
        )
        for idx in split_indices(input_ids.shape[0], eval_fraction, seed)
    )


def held_out_split(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    eval_fraction: float,
    seed: int,
) -> tuple[BlockDataset, BlockDataset]:
    """``pack`` -> ``split_datasets``: the training and held-out blocks of ``fastkd distill``;
    ``fastkd eval`` with the same records, tokenizer, block size, fraction and seed gets the
    same held-out blocks."""
    return split_datasets(*pack(records, tokenizer, block_size), eval_fraction, seed)


def load_dataset(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    eval_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[BlockDataset, BlockDataset]:
    """``read_records`` -> ``held_out_split``.

    Returns:
        ``(train, eval)`` datasets of packed blocks.
    """
    return held_out_split(read_records(path), tokenizer, block_size, eval_fraction, seed)


def _stdlib_sources(root: Path) -> Iterable[Path]:
    """The ``.py`` files under ``root`` in sorted order, test and third-party dirs pruned."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes the order os.walk descends in.
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def stdlib_corpus(max_bytes: int) -> str:
    """Text available offline on every machine: the Python standard library's own sources.

    The ``.py`` files of the running interpreter's stdlib (``sysconfig``'s ``stdlib`` path),
    in sorted path order, test directories and site-packages skipped, non-UTF-8 files skipped,
    joined with a blank line and cut at ``max_bytes`` UTF-8 bytes (never inside a character).
    The same Python installation always gives the same text; another Python version gives
    other text. The whole stdlib is about 12 MB (Python 3.11), an upper bound on the size.

    Args:
        max_bytes: size limit of the UTF-8 encoded result.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    parts: list[bytes] = []
    size = 0
    for file in _stdlib_sources(Path(sysconfig.get_paths()["stdlib"])):
        data = file.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(data)
        size += len(data) + 2
        if size >= max_bytes:
            break
    # The cut may split a multi-byte character; "ignore" drops only that partial character.
    return b"\n\n".join(parts)[:max_bytes].decode("utf-8", errors="ignore")
