"""``fastkd generate``: a teacher's responses to prompts, as training records for a student
(sequence-level KD, and rationale distillation with a prompt template; docs/design.md §12).

Output: JSON lines ``{"prompt": str, "response": str, "sample": j}``, prompt-major (prompt i's
samples j = 0..K-1 in order), readable by ``fastkd.training.data.read_records`` (the extra key
is ignored) and so by ``fastkd distill --data``. The settings are stored beside it in
``OUT.meta.json``.

Determinism: the prompts are cut into batches at fixed boundaries (batch b holds prompts
``[b * batch_size, (b + 1) * batch_size)``), and batch b is sampled under a seed derived from
``(seed, b)`` alone. Sample (i, j) therefore depends only on the settings (batch size
included) and the machine's arithmetic, not on where a run stopped or resumed.

Resume: a rerun with the same settings keeps the complete records already in ``OUT``, cuts a
trailing partial line (a run killed mid-write), regenerates the batch holding the first
missing record and appends from that record on. Each batch is appended with one write,
flushed and fsynced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from fastkd.training.data import has_tokenizer, jsonl_objects, load_tokenizer
from fastkd.training.files import atomic_write
from fastkd.training.teacher_cache import teacher_fingerprint, tokenizer_fingerprint

FORMAT = "fastkd-generate"
VERSION = 1
META_SUFFIX = ".meta.json"
# The meta keys whose values must match for a rerun to resume (the rest is information).
SETTINGS = (
    "format",
    "version",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "prompts_fingerprint",
    "num_prompts",
    "rationale_template",
    "max_new_tokens",
    "temperature",
    "top_p",
    "num_return_sequences",
    "seed",
    "batch_size",
)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The ``"prompt"`` string of each non-empty line of a ``.jsonl`` file (other keys are
    ignored).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8, a line that is not a JSON object with a string ``"prompt"``
            (naming file:line), or no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = []
    for where, obj in jsonl_objects(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f'{where}: expected an object with a string "prompt" field')
        prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts")
    return prompts


def check_template(template: str | None) -> None:
    """ValueError unless ``template`` is None or a ``str.format`` template with ``{prompt}``
    as its only field (literal braces doubled)."""
    if template is None:
        return
    if not isinstance(template, str) or "{prompt}" not in template:
        raise ValueError(f"--rationale-template must contain {{prompt}}, got {template!r}")
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"--rationale-template: {{prompt}} must be its only field (write other braces as "
            f"{{{{ and }}}}): {e!r}"
        ) from None


def _check_settings(max_new_tokens, temperature, top_p, num_return_sequences, seed, batch_size):
    for flag, value, low in (
        ("--max-new-tokens", max_new_tokens, 1),
        ("--num-return-sequences", num_return_sequences, 1),
        ("--seed", seed, 0),
        ("--batch-size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(
            f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}"
        )
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature == 0 and num_return_sequences > 1:
        raise ValueError(
            f"--num-return-sequences {num_return_sequences} with --temperature 0 (greedy) would "
            "repeat one response: sample (temperature > 0) or ask for one"
        )


def _generation_class(teacher: Path):
    """The causal LM class of a model directory, from its config alone (no weights read);
    ValueError naming the model type if it is not one that can generate."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(teacher, local_files_only=True)
    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None or not cls.can_generate():
        raise ValueError(
            f"--teacher {teacher}: model type {config.model_type!r} is not a causal LM that "
            "can generate"
        )
    return cls


def _batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``: 63 bits of sha256 of (seed, batch)."""
    digest = hashlib.sha256(f"fastkd-generate:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _existing_records(out: Path, prompts: list[str], k: int) -> int:
    """How many complete records ``out`` holds (after cutting a trailing partial line off the
    file); ValueError if one does not match its expected prompt and sample index."""
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    try:
        lines = data[:end].decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--out {out}: not valid UTF-8 ({e}): not this run's output") from None
    if len(lines) > len(prompts) * k:
        raise ValueError(
            f"--out {out} holds {len(lines)} records, more than {len(prompts)} prompts x {k} "
            "samples: it is not this run's output"
        )
    for r, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        i, j = divmod(r, k)
        if (
            not isinstance(record, dict)
            or record.get("prompt") != prompts[i]
            or record.get("sample") != j
            or not isinstance(record.get("response"), str)
        ):
            raise ValueError(
                f"{out}:{r + 1}: expected the record of prompt {i + 1}, sample {j}; the file "
                "was changed or is another run's: use another --out"
            )
    if end < len(data):  # a write cut short by a kill: never a whole record
        with out.open("r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return len(lines)


def _resume_from(out: Path, meta_file: Path, meta: dict, prompts: list[str]) -> int:
    """Records of ``out`` that this run keeps (0 for a new run); ValueError if ``out`` is
    another run's."""
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_file}: not valid JSON ({e})") from None
        if not isinstance(old, dict):
            old = {}
        differences = [
            f"{key}: {old.get(key)!r} there, {meta[key]!r} here"
            for key in SETTINGS
            if old.get(key) != meta[key]
        ]
        if differences:
            raise ValueError(
                f"--out {out} was generated with other settings ({'; '.join(differences)}): "
                "use another --out, or delete it and its .meta.json to start again"
            )
        return _existing_records(out, prompts, meta["num_return_sequences"]) if out.exists() else 0
    if out.exists() and out.stat().st_size > 0:
        raise ValueError(
            f"--out {out} exists and has no {meta_file.name}: not a fastkd generate output; "
            "use another --out"
        )
    return 0


def generate(
    teacher: str | os.PathLike,
    prompts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    rationale_template: str | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> int:
    """Sample the teacher's responses to ``prompts`` into the JSON lines file ``out`` (the
    module docstring gives the format and the determinism and resume rules).

    Every argument and every prompt is checked before the model loads; the settings are
    stored atomically in ``out + ".meta.json"``.

    Args:
        teacher: model directory of a causal LM that can generate.
        prompts: ``.jsonl`` with a string ``"prompt"`` per non-empty line.
        out: output ``.jsonl`` (created, or resumed).
        max_new_tokens: most tokens per response (fewer when the teacher ends with eos).
        temperature: sampling temperature; 0 = greedy.
        top_p: nucleus sampling mass (1 = off). No top-k cut is applied.
        num_return_sequences: samples per prompt.
        seed: seed of the sampling.
        batch_size: prompts per ``generate`` call (fixes the batches the seeds key on).
        rationale_template: ``str.format`` template with a ``{prompt}`` field: the teacher
            sees ``template.format(prompt=p)``; the record keeps the bare prompt ``p``, so the
            student learns to answer it with the teacher's rationale.
        tokenizer: tokenizer directory (default: the teacher's).

    Returns:
        The number of records in ``out`` (``len(prompts) * num_return_sequences``).
    """
    _check_settings(max_new_tokens, temperature, top_p, num_return_sequences, seed, batch_size)
    check_template(rationale_template)
    teacher, out = Path(teacher), Path(out)
    if not (teacher / "config.json").is_file():
        raise FileNotFoundError(f"--teacher {teacher}: not a model directory (no config.json)")
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else teacher
    if not has_tokenizer(tokenizer_dir):
        raise FileNotFoundError(
            f"{'--tokenizer' if tokenizer is not None else '--teacher'} {tokenizer_dir}: no "
            "tokenizer files there" + ("" if tokenizer is not None else " (pass --tokenizer)")
        )
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give a .jsonl file")
    texts = read_prompts(prompts)
    model_class = _generation_class(teacher)
    tok = load_tokenizer(tokenizer_dir)  # pad = eos when it has no pad token
    tok.padding_side = "left"  # generation continues every row from its last column
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": str(teacher.resolve()),
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "prompts": str(Path(prompts).resolve()),
        "prompts_fingerprint": hashlib.sha256(Path(prompts).read_bytes()).hexdigest(),
        "num_prompts": len(texts),
        "rationale_template": rationale_template,
        "max_new_tokens": max_new_tokens,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "num_return_sequences": num_return_sequences,
        "seed": seed,
        "batch_size": batch_size,
    }
    meta_file = out.with_name(out.name + META_SUFFIX)
    k = num_return_sequences
    done = _resume_from(out, meta_file, meta, texts)
    total = len(texts) * k
    if done == total:
        return total
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(meta_file, (json.dumps(meta, indent=1) + "\n").encode())

    from tqdm.auto import tqdm

    model = model_class.from_pretrained(teacher, local_files_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    sampling = (
        {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    first_batch = done // k // batch_size
    with (
        out.open("ab") as f,
        tqdm(total=len(texts), initial=first_batch * batch_size, unit="prompt") as bar,
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        for b in range(first_batch, math.ceil(len(texts) / batch_size)):
            batch = texts[b * batch_size : (b + 1) * batch_size]
            shown = (
                batch
                if rationale_template is None
                else [rationale_template.format(prompt=p) for p in batch]
            )
            enc = tok(shown, return_tensors="pt", padding=True).to(device)
            torch.manual_seed(_batch_seed(seed, b))
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=k,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    **sampling,
                )
            responses = tok.batch_decode(
                ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            first = b * batch_size * k  # the record number of this batch's first response
            lines = [
                json.dumps({"prompt": batch[r // k], "response": text, "sample": r % k}) + "\n"
                for r, text in enumerate(responses)
                if first + r >= done  # records kept from a killed run are not repeated
            ]
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    return total
