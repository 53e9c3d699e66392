"""``fastkd compare``: one student architecture trained several ways on the same data.

A study (a YAML file, or ``--demo``'s built-in one, ``DEMO_STUDY``) names a corpus, a teacher
(a model directory, or sizes and steps to train one on the corpus first, as ``fastkd demo``
does), one student architecture and a set of methods. Every method trains that student from
the same initialisation (or from the teacher pruned to its shape) with the same steps, batch
size, learning rate, seed and batch order, on the same training blocks (or on the teacher's
generations), and is scored on the same held-out blocks:

- held-out perplexity and next-token accuracy (``fastkd.training.evaluate``);
- retention: teacher perplexity / student perplexity, and student / teacher accuracy;
- gap closed: ``(ppl_baseline - ppl) / (ppl_baseline - ppl_teacher)``, the baseline being the
  study's ``baseline`` method (hard labels): 1 = as good as the teacher, 0 = no better than
  the baseline, < 0 = worse;
- ROUGE-L F1 of the student's greedy continuations of held-out prompts against the teacher's
  greedy continuations (LCS over token ids, ``rouge_l``): how closely it imitates the teacher;
- wall time of the training, and separately of the teacher's generation (``data: generated``)
  and of the pruning (``init: pruned``);
- peak memory of one training step (``fastkd.memory``, in a fresh process).

Methods are ``DistillConfig`` overrides plus two keys of their own: ``init`` (``random``: the
shared initialisation, or ``pruned``: ``fastkd.training.prune.prune`` of the teacher to the
student's sizes) and ``data`` (``corpus``: the training blocks, or ``generated``: the teacher's
sampled continuations of held-in prompts, ``fastkd.training.generate.generate``, packed with
the prompt masked: sequence-level KD). A method whose loss has no teacher term (``alpha: 1``,
no feature, attention or on-policy part) is trained on its labels alone by a plain
``transformers.Trainer``, without a teacher in memory.

Writes ``compare.json`` (settings, seeds, machine, versions, one row per method),
``compare.md`` (the table) and ``compare.png`` (held-out perplexity and ROUGE-L per method).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from fastkd.memory import peak_memory_bytes
from fastkd.training.config import DistillConfig, load_settings
from fastkd.training.data import (
    BlockDataset,
    held_out_split,
    load_tokenizer,
    pack,
    read_records,
    stdlib_corpus,
    train_tokenizer,
)
from fastkd.training.demo import QUICK, check_output_dir, llama
from fastkd.training.distiller import Distiller
from fastkd.training.evaluate import evaluate
from fastkd.training.files import atomic_write, replace_file
from fastkd.training.models import load_model
from fastkd.training.run import training_arguments
from fastkd.training.trainer import DistillationTrainer

INITS = ("random", "pruned")
DATA = ("corpus", "generated")
# The student's Llama sizes a study may set (the rest of its config follows the tokenizer and
# the block size, as in fastkd demo).
STUDENT_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
OUTPUTS = ("compare.json", "compare.md", "compare.png")

# The built-in study (``fastkd compare --demo``; examples/compare.yaml holds the same): the
# teacher of ``fastkd demo --quick``, a student of the demo's student sizes but 2 heads of 64
# (the teacher's head size, which pruning keeps), 120 student steps (at 200 the hard-label
# student comes close to this teacher and KD has little left to show), about 8 minutes on 2
# CPU cores.
DEMO_STUDY: dict = {
    "seed": 0,
    "data": "demo",
    "corpus_bytes": QUICK.corpus_bytes,
    "eval_fraction": QUICK.eval_fraction,
    "block_size": QUICK.block_size,
    "teacher": {
        "sizes": dict(QUICK.teacher),
        "steps": QUICK.teacher_steps,
        "learning_rate": QUICK.teacher_learning_rate,
        "vocab_size": QUICK.vocab_size,
    },
    "student": {
        "sizes": {**QUICK.student, "num_attention_heads": 2, "num_key_value_heads": 2},
    },
    "steps": 120,
    "batch_size": QUICK.batch_size,
    "learning_rate": QUICK.student_learning_rate,
    "prompts": {
        "count": 32,
        "prompt_tokens": 32,
        "max_new_tokens": 32,
        "train_count": 4096,
        "temperature": 1.0,
        "top_p": 1.0,
        "batch_size": 64,
    },
    "baseline": "hard",
    "methods": {
        "hard": {"alpha": 1.0},
        "vanilla": {"temperature": 1.0, "alpha": 0.1},
        "feature": {
            "temperature": 1.0,
            "alpha": 0.1,
            "feature_weight": 1.0,
            "feature_loss": "cosine",
        },
        "feature_mse": {"temperature": 1.0, "alpha": 0.1, "feature_weight": 0.1},
        "seq_kd": {"alpha": 1.0, "data": "generated"},
        "on_policy": {
            "temperature": 1.0,
            "alpha": 0.1,
            "divergence": "reverse_kl",
            "on_policy_fraction": 0.5,
            "prompt_tokens": 96,
        },
        "pruned": {"temperature": 1.0, "alpha": 0.1, "init": "pruned"},
        "pruned_hard": {"alpha": 1.0, "init": "pruned"},
    },
}


# --- the study file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher directory (``dir``), or a Llama of ``sizes`` trained for ``steps`` on the
    study's training blocks with a byte-level BPE tokenizer of ``vocab_size`` trained on the
    corpus."""

    dir: str | None = None
    sizes: dict | None = None
    steps: int = QUICK.teacher_steps
    learning_rate: float = QUICK.teacher_learning_rate
    vocab_size: int = QUICK.vocab_size


@dataclass(frozen=True)
class PromptSpec:
    """Prompts are the first ``prompt_tokens`` tokens of blocks: ``count`` held-out blocks for
    ROUGE-L (greedy continuations of ``max_new_tokens``), ``train_count`` training blocks whose
    continuations the teacher samples (``temperature``, ``top_p``; ``batch_size`` prompts per
    ``generate`` call) for ``data: generated``."""

    count: int = 32
    prompt_tokens: int = 32
    max_new_tokens: int = 32
    train_count: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64


@dataclass(frozen=True)
class MethodSpec:
    """One way to train the student: its loss (``config``, the study's seed), its start
    (``init``) and its data (``data``)."""

    name: str
    config: DistillConfig
    overrides: dict  # the DistillConfig fields the study set, as written
    init: str = "random"
    data: str = "corpus"

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss has a teacher term (else the labels alone train the student)."""
        c = self.config
        return (
            c.alpha < 1
            or c.feature_weight > 0
            or c.attention_weight > 0
            or c.on_policy_fraction > 0
        )


@dataclass(frozen=True)
class Study:
    """A checked study (``load_study``); ``source`` names its file in error messages."""

    seed: int
    data: str
    corpus_bytes: int
    eval_fraction: float
    block_size: int
    teacher: TeacherSpec
    student: dict
    steps: int
    batch_size: int
    learning_rate: float
    prompts: PromptSpec
    baseline: str
    methods: tuple[MethodSpec, ...]
    source: str = "study"

    def to_dict(self) -> dict:
        """The study as a file would give it (every default filled in)."""
        study = {
            "seed": self.seed,
            "data": self.data,
            "corpus_bytes": self.corpus_bytes,
            "eval_fraction": self.eval_fraction,
            "block_size": self.block_size,
            "teacher": (
                {"dir": self.teacher.dir}
                if self.teacher.dir is not None
                else {k: v for k, v in dataclasses.asdict(self.teacher).items() if k != "dir"}
            ),
            "student": {"sizes": dict(self.student)},
            "steps": self.steps,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "prompts": dataclasses.asdict(self.prompts),
            "baseline": self.baseline,
            "methods": {
                m.name: {**m.overrides, "init": m.init, "data": m.data} for m in self.methods
            },
        }
        if self.data != "demo":
            del study["corpus_bytes"]
        return study

    def quick(self) -> Study:
        """A quarter of every budget (steps, prompts): a smoke run of the study's code paths,
        whose numbers mean little."""

        def cut(n: int) -> int:
            return max(1, n // 4)

        return dataclasses.replace(
            self,
            steps=cut(self.steps),
            teacher=dataclasses.replace(self.teacher, steps=cut(self.teacher.steps)),
            prompts=dataclasses.replace(
                self.prompts,
                count=cut(self.prompts.count),
                train_count=cut(self.prompts.train_count),
            ),
        )


_STUDY_KEYS = (
    "seed",
    "data",
    "corpus_bytes",
    "eval_fraction",
    "block_size",
    "teacher",
    "student",
    "steps",
    "batch_size",
    "learning_rate",
    "prompts",
    "baseline",
    "methods",
)
_REQUIRED = ("data", "teacher", "student", "steps", "methods")


def _keys(where: str, value, known: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return value


def _int(where: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where} must be an int >= {low}, got {value!r}")
    return value


def _positive(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where} must be a number > 0, got {value!r}")
    return float(value)


def _sizes(where: str, value, required: bool) -> dict:
    sizes = _keys(where, value, STUDENT_SIZES)
    if required:
        missing = [k for k in STUDENT_SIZES if k not in sizes]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
    for k, v in sizes.items():
        _int(f"{where}.{k}", v, 1)
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(
            f"{where}: hidden_size {sizes['hidden_size']} is not a multiple of "
            f"num_attention_heads {sizes['num_attention_heads']}"
        )
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise ValueError(
            f"{where}: num_attention_heads {sizes['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {sizes['num_key_value_heads']}"
        )
    return dict(sizes)


def _method(name: str, value, seed: int, source: str) -> MethodSpec:
    where = f"{source}: methods.{name}"
    if value is None:
        value = {}
    fields = [f.name for f in dataclasses.fields(DistillConfig) if f.name != "seed"]
    value = _keys(where, value, [*fields, "init", "data"])
    overrides = {k: v for k, v in value.items() if k not in ("init", "data")}
    init, data = value.get("init", "random"), value.get("data", "corpus")
    if init not in INITS:
        raise ValueError(f"{where}.init must be one of {INITS}, got {init!r}")
    if data not in DATA:
        raise ValueError(f"{where}.data must be one of {DATA}, got {data!r}")
    try:
        config = DistillConfig(**overrides, seed=seed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if config.self_distillation is not None or config.teacher_weights is not None:
        raise ValueError(f"{where}: a study has one teacher (no self_distillation/teacher_weights)")
    return MethodSpec(name, config, overrides, init, data)


def load_study(study: str | os.PathLike | dict) -> Study:
    """Read and check a study (a ``.yaml``/``.json`` file or its mapping). Every error, an
    unknown key at any level included, is a ValueError (FileNotFoundError for missing files)
    raised before anything is trained."""
    source = "study" if isinstance(study, dict) else str(study)
    raw = study if isinstance(study, dict) else load_settings(study)
    raw = _keys(source, raw, _STUDY_KEYS)
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing {missing}")
    seed = _int(f"{source}: seed", raw.get("seed", 0), 0)
    data = raw["data"]
    if not isinstance(data, str) or not data:
        raise ValueError(f"{source}: data must be 'demo' or a path, got {data!r}")
    if data != "demo":
        if not Path(data).exists():
            raise FileNotFoundError(f"{source}: data {data}: no such file or directory")
        if "corpus_bytes" in raw:
            raise ValueError(f"{source}: corpus_bytes applies to data: demo only")
    corpus_bytes = _int(f"{source}: corpus_bytes", raw.get("corpus_bytes", QUICK.corpus_bytes), 1)
    eval_fraction = raw.get("eval_fraction", QUICK.eval_fraction)
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, (int, float))
        or not (0 < eval_fraction < 1)
    ):
        raise ValueError(f"{source}: eval_fraction must be in (0, 1), got {eval_fraction!r}")
    block_size = _int(f"{source}: block_size", raw.get("block_size", QUICK.block_size), 2)

    t = _keys(
        f"{source}: teacher", raw["teacher"], [f.name for f in dataclasses.fields(TeacherSpec)]
    )
    if ("dir" in t) == ("sizes" in t):
        raise ValueError(f"{source}: teacher needs either dir (a model directory) or sizes")
    if "dir" in t:
        extra = sorted(set(t) - {"dir"})
        if extra:
            raise ValueError(f"{source}: teacher.dir is a trained teacher; drop {extra}")
        if not (Path(t["dir"]) / "config.json").is_file():
            raise FileNotFoundError(
                f"{source}: teacher.dir {t['dir']}: not a model directory (no config.json)"
            )
        teacher = TeacherSpec(dir=str(t["dir"]))
    else:
        teacher = TeacherSpec(
            sizes=_sizes(f"{source}: teacher.sizes", t["sizes"], required=True),
            steps=_int(f"{source}: teacher.steps", t.get("steps", TeacherSpec.steps), 1),
            learning_rate=_positive(
                f"{source}: teacher.learning_rate",
                t.get("learning_rate", TeacherSpec.learning_rate),
            ),
            vocab_size=_int(
                f"{source}: teacher.vocab_size", t.get("vocab_size", TeacherSpec.vocab_size), 257
            ),
        )
    s = _keys(f"{source}: student", raw["student"], ["sizes"])
    if "sizes" not in s:
        raise ValueError(f"{source}: student needs sizes")
    student = _sizes(f"{source}: student.sizes", s["sizes"], required=True)

    p = _keys(
        f"{source}: prompts",
        raw.get("prompts", {}),
        [f.name for f in dataclasses.fields(PromptSpec)],
    )
    prompts = PromptSpec(
        **{
            k: v if k in ("temperature", "top_p") else _int(f"{source}: prompts.{k}", v, 1)
            for k, v in p.items()
        }
    )
    if (
        isinstance(prompts.top_p, bool)
        or not isinstance(prompts.top_p, (int, float))
        or not (0 < prompts.top_p <= 1)
    ):
        raise ValueError(f"{source}: prompts.top_p must be in (0, 1], got {prompts.top_p!r}")
    if (
        isinstance(prompts.temperature, bool)
        or not isinstance(prompts.temperature, (int, float))
        or prompts.temperature < 0
    ):
        raise ValueError(
            f"{source}: prompts.temperature must be a number >= 0 (0: greedy), got "
            f"{prompts.temperature!r}"
        )
    if prompts.prompt_tokens + prompts.max_new_tokens > block_size:
        raise ValueError(
            f"{source}: prompts.prompt_tokens + prompts.max_new_tokens "
            f"({prompts.prompt_tokens} + {prompts.max_new_tokens}) exceed block_size {block_size}"
        )

    if not isinstance(raw["methods"], dict) or not raw["methods"]:
        raise ValueError(f"{source}: methods must be a non-empty mapping of name: settings")
    methods = tuple(_method(str(n), v, seed, source) for n, v in raw["methods"].items())
    baseline = raw.get("baseline", "hard")
    if baseline not in {m.name for m in methods}:
        raise ValueError(
            f"{source}: baseline {baseline!r} is not a method (gap closed is measured against it)"
        )
    study = Study(
        seed=seed,
        data=data,
        corpus_bytes=corpus_bytes,
        eval_fraction=float(eval_fraction),
        block_size=block_size,
        teacher=teacher,
        student=student,
        steps=_int(f"{source}: steps", raw["steps"], 1),
        batch_size=_int(f"{source}: batch_size", raw.get("batch_size", QUICK.batch_size), 1),
        learning_rate=_positive(
            f"{source}: learning_rate", raw.get("learning_rate", QUICK.student_learning_rate)
        ),
        prompts=prompts,
        baseline=baseline,
        methods=methods,
        source=source,
    )
    _check_methods(study)
    return study


def _check_methods(study: Study) -> None:
    """What each method needs: its module, and for ``init: pruned`` a teacher that prunes to
    exactly the study's student (a Llama whose head size the student shares)."""
    for m in study.methods:
        if m.data == "generated":
            _module("generate", f"methods.{m.name}.data: generated")
        if m.init == "pruned":
            _module("prune", f"methods.{m.name}.init: pruned")
            _check_prunable(study, m.name)


def _module(name: str, what: str):
    import importlib

    try:
        return importlib.import_module(f"fastkd.training.{name}")
    except ImportError as e:
        raise ValueError(f"{what} needs fastkd.training.{name}, not available: {e}") from None


def _check_prunable(study: Study, method: str) -> None:
    where = f"{study.source}: methods.{method}.init: pruned"
    if study.teacher.dir is not None:
        config = json.loads((Path(study.teacher.dir) / "config.json").read_text())
        if config.get("model_type") != "llama":
            raise ValueError(
                f"{where}: the pruned teacher must be a Llama like the study's student, got "
                f"model_type {config.get('model_type')!r}"
            )
        if config.get("tie_word_embeddings", False):
            raise ValueError(f"{where}: the teacher ties its embeddings; the student does not")
        sizes = {k: config[k] for k in STUDENT_SIZES if k in config}
        head_dim = config.get("head_dim") or sizes["hidden_size"] // sizes["num_attention_heads"]
    else:
        sizes = study.teacher.sizes
        head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    student = study.student
    larger = [k for k in STUDENT_SIZES if student[k] > sizes.get(k, student[k])]
    if larger:
        raise ValueError(f"{where}: the student is larger than the teacher in {larger}")
    student_head = student["hidden_size"] // student["num_attention_heads"]
    if student_head != head_dim:
        raise ValueError(
            f"{where}: pruning keeps the teacher's head size {head_dim}; the student's is "
            f"{student_head} (hidden_size / num_attention_heads)"
        )


# --- ROUGE-L -----------------------------------------------------------------------------------


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 (Lin, 2004, with beta = 1) of two token sequences: the harmonic mean of
    LCS / len(candidate) and LCS / len(reference). Two empty sequences score 1, one empty
    sequence 0."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, eos: int
) -> list[list[int]]:
    """The greedy continuation of each prompt row ([N, P] ids, no padding), up to (without)
    the first eos."""
    was_training = model.training
    model.eval()
    try:
        config = transformers.GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=eos,
            eos_token_id=eos,
        )
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), generation_config=config
        )
    finally:
        model.train(was_training)
    rows = []
    for row in out[:, prompts.shape[1] :].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


# --- the study ---------------------------------------------------------------------------------


def _train(model, train_ds, steps: int, lr: float, study: Study, scratch: Path, **kwargs):
    """Train ``model`` (a causal LM, or a ``Distiller``) for ``steps``; the trainer and the
    seconds its training took."""
    args = training_arguments(
        scratch,
        max_steps=steps,
        batch_size=study.batch_size,
        learning_rate=lr,
        seed=study.seed,
        logging_steps=max(1, steps // 4),
        save_strategy="no",  # the study keeps its models itself
        disable_tqdm=True,
    )
    cls = DistillationTrainer if isinstance(model, Distiller) else transformers.Trainer
    trainer = cls(model, args, train_dataset=train_ds, **kwargs)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def _generated_dataset(study: Study, tokenizer, train_ds: BlockDataset, work: Path, teacher_dir):
    """The teacher's sampled continuations of ``prompts.train_count`` training blocks' first
    ``prompt_tokens`` tokens (decoded to text), packed with the prompt masked; and the seconds
    the generation took."""
    from fastkd.training.generate import generate

    p = study.prompts
    pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(study.seed))
    rows = train_ds.input_ids[pick[: p.train_count], : p.prompt_tokens]
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": tokenizer.decode(r)}) + "\n" for r in rows.tolist())
    )
    out = work / "generated.jsonl"
    start = time.perf_counter()
    generate(
        teacher_dir,
        prompts,
        out,
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        seed=study.seed,
        batch_size=p.batch_size,
    )
    seconds = time.perf_counter() - start
    ids, labels = pack(read_records(out), tokenizer, study.block_size)
    return BlockDataset(ids, labels), seconds


def _memory_probe(spec: str):
    """In ``fastkd.memory``'s fresh process: the method's models loaded and a function that
    runs one training step (its Trainer over ``rows`` real blocks: forward, backward, AdamW)."""
    spec = json.loads(spec)
    config = DistillConfig(**spec["config"])
    if config.on_policy_fraction > 0:  # measure a generated batch's step
        config = config.replace(on_policy_fraction=1.0)
    student = load_model(spec["student"])
    model = Distiller(student, load_model(spec["teacher"]), config) if spec["teacher"] else student
    blocks = torch.load(spec["blocks"])
    scratch = tempfile.TemporaryDirectory(prefix="fastkd-compare-memory-")  # gone at exit

    def step(rows: int) -> None:
        args = training_arguments(
            scratch.name,
            max_steps=1,
            batch_size=rows,
            learning_rate=1e-4,
            seed=0,
            save_strategy="no",
            disable_tqdm=True,
        )
        cls = DistillationTrainer if isinstance(model, Distiller) else transformers.Trainer
        dataset = BlockDataset(blocks["input_ids"][:rows], blocks["labels"][:rows])
        cls(model, args, train_dataset=dataset).train()

    return step


def _step_memory_mb(
    method: MethodSpec, student_dir: Path, teacher_dir: Path, blocks: Path, rows: int
) -> float:
    spec = {
        "config": method.config.to_dict(),
        "student": str(student_dir),
        "teacher": str(teacher_dir) if method.uses_teacher else None,
        "blocks": str(blocks),
    }
    setup = f"""
        from fastkd.training.compare import _memory_probe
        step = _memory_probe({json.dumps(spec)!r})
        step(1)  # libraries, thread pools, the optimizer's code paths
    """
    return round(peak_memory_bytes(setup, f"step({rows})") / 2**20, 1)


def run_study(
    study: Study,
    out: str | os.PathLike,
    *,
    work: str | os.PathLike | None = None,
    memory: bool = True,
) -> dict:
    """Run ``study`` (from ``load_study``); write compare.json, compare.md and compare.png
    into ``out`` and return the report. ``work`` keeps the intermediate files (tokenizer,
    teacher, initial and pruned students, prompts and generations; default: a temporary
    directory, deleted). ``memory=False`` skips the peak-memory measurements."""
    if not isinstance(study, Study):
        raise TypeError(f"study must be a Study (from load_study), got {type(study).__name__}")
    out = Path(out)
    check_output_dir(out)
    if work is not None:
        work = Path(work)
        check_output_dir(work)
        if work.exists() and any(work.iterdir()):
            raise ValueError(f"work: {work} is not empty")
    with tempfile.TemporaryDirectory(prefix="fastkd-compare-") as scratch:
        work = Path(work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        report = _run(study, work, memory)
    write_outputs(report, out)
    return report


def _run(study: Study, work: Path, memory: bool) -> dict:
    start = time.time()
    seed = study.seed

    def say(what: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {what}", flush=True)

    transformers.set_seed(seed)
    if study.data == "demo":
        say(f"corpus: {study.corpus_bytes / 1e6:.1f} MB of the Python standard library")
        records = [{"text": stdlib_corpus(study.corpus_bytes)}]
    else:
        records = read_records(study.data)
    if study.teacher.dir is None:
        tokenizer = train_tokenizer(
            (t for r in records for t in r.values()), study.teacher.vocab_size
        )
    else:
        tokenizer = load_tokenizer(study.teacher.dir)
    train_ds, eval_ds = held_out_split(
        records, tokenizer, study.block_size, study.eval_fraction, seed
    )
    say(f"{len(train_ds)} training and {len(eval_ds)} held-out blocks of {study.block_size}")

    teacher_seconds = None
    if study.teacher.dir is None:
        say(f"teacher: Llama {study.teacher.sizes}, {study.teacher.steps} steps")
        teacher = llama(study.teacher.sizes, tokenizer, study.block_size)
        _, teacher_seconds = _train(
            teacher,
            train_ds,
            study.teacher.steps,
            study.teacher.learning_rate,
            study,
            work / "trainer",
        )
        teacher_dir = work / "teacher"
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    else:
        teacher_dir = Path(study.teacher.dir)
        teacher = load_model(teacher_dir)
    teacher.eval()
    teacher_metrics = evaluate(teacher, eval_ds, batch_size=study.batch_size)

    eos = tokenizer.eos_token_id
    p = study.prompts
    held_out_prompts = eval_ds.input_ids[: p.count, : p.prompt_tokens]
    reference = greedy_continuations(teacher, held_out_prompts, p.max_new_tokens, eos)

    def texts(continuations: list[list[int]]) -> dict:
        """What the greedy continuations look like: their mean length, the first one."""
        lengths = [len(c) for c in continuations]
        return {
            "continuation_tokens": round(sum(lengths) / len(lengths), 2),
            "first_continuation": tokenizer.decode(continuations[0]),
        }

    transformers.set_seed(seed + 1)
    init = llama(study.student, tokenizer, study.block_size)  # every random-init method starts here
    init_dir = work / "student-init"
    init.save_pretrained(init_dir)
    blocks = work / "memory-blocks.pt"
    torch.save(
        {
            "input_ids": train_ds.input_ids[: study.batch_size],
            "labels": train_ds.labels[: study.batch_size],
        },
        blocks,
    )

    generated, generate_seconds = None, 0.0
    if any(m.data == "generated" for m in study.methods):
        say(f"teacher generates {p.max_new_tokens} tokens for {p.train_count} held-in prompts")
        generated, generate_seconds = _generated_dataset(
            study, tokenizer, train_ds, work, teacher_dir
        )
        say(f"    {len(generated)} blocks of generated data in {generate_seconds:.0f} s")
    pruned_dir, prune_seconds, pruned_metrics = None, 0.0, None
    if any(m.init == "pruned" for m in study.methods):
        pruned_dir, prune_seconds = _pruned(study, tokenizer, train_ds, work, teacher_dir, init)
        # Where the pruned students start: the pruning's own cost in quality.
        pruned_metrics = evaluate(load_model(pruned_dir), eval_ds, batch_size=study.batch_size)
        say(
            f"teacher pruned to the student's sizes in {prune_seconds:.0f} s: held-out ppl "
            f"{pruned_metrics['perplexity']:.2f} before training"
        )

    rows = []
    memory_of: dict[str, float] = {}
    for m in study.methods:
        say(f"method {m.name}: init {m.init}, data {m.data}, {_settings(m.overrides)}")
        student = copy.deepcopy(init) if m.init == "random" else load_model(pruned_dir)
        transformers.set_seed(seed + 2)  # the same feature projections wherever there are any
        model = Distiller(student, teacher, m.config) if m.uses_teacher else student
        data = generated if m.data == "generated" else train_ds
        trainer, seconds = _train(
            model, data, study.steps, study.learning_rate, study, work / "trainer"
        )
        metrics = evaluate(student, eval_ds, batch_size=study.batch_size)
        continuations = greedy_continuations(student, held_out_prompts, p.max_new_tokens, eos)
        row = {
            "method": m.name,
            "init": m.init,
            "data": m.data,
            "settings": m.overrides,
            "teacher_in_loss": m.uses_teacher,
            "perplexity": round(metrics["perplexity"], 3),
            "accuracy": round(metrics["accuracy"], 4),
            "rouge_l": round(sum(map(rouge_l, continuations, reference)) / len(reference), 4),
            "train_seconds": round(seconds, 1),
            "generate_seconds": round(generate_seconds, 2) if m.data == "generated" else 0.0,
            "prune_seconds": round(prune_seconds, 2) if m.init == "pruned" else 0.0,
            **texts(continuations),
        }
        if getattr(trainer, "on_policy", None) is not None:
            row["on_policy_batches"] = trainer.on_policy.generated
        if memory:
            # The same loss on the same shapes needs the same memory: measured once.
            key = json.dumps([m.uses_teacher, m.config.to_dict()], sort_keys=True)
            if key not in memory_of:
                memory_of[key] = _step_memory_mb(m, init_dir, teacher_dir, blocks, study.batch_size)
            row["step_peak_memory_mb"] = memory_of[key]
        rows.append(row)
        say(
            f"    ppl {row['perplexity']:.2f}, accuracy {row['accuracy']:.4f}, "
            f"ROUGE-L {row['rouge_l']:.3f}, {seconds:.0f} s"
        )

    from fastkd.bench.harness import environment  # the benchmarks' record of the machine

    env = environment()
    teacher_row = {k: round(v, 4) for k, v in teacher_metrics.items() if k != "tokens"}
    add_derived(rows, teacher_row, study.baseline)
    return {
        "study": study.to_dict(),
        "machine": {
            "cpu": env["cpu"],
            "torch_threads": env["cpu_threads"],
            "gpu": env["gpu"],
            "platform": platform.platform(),
        },
        "versions": {
            k: env[k] for k in ("python", "torch", "transformers", "fastkd", "cuda", "commit")
        },
        "seeds": {
            "split_and_batches": seed,
            "teacher_init": seed,
            "student_init": seed + 1,
            "feature_projections": seed + 2,
            "held_in_prompts_and_sampling": seed,
        },
        "blocks": {
            "train": len(train_ds),
            "held_out": len(eval_ds),
            "generated": len(generated) if generated else 0,
        },
        "teacher": {
            **teacher_row,
            "train_seconds": None if teacher_seconds is None else round(teacher_seconds, 1),
            **texts(reference),
        },
        "pruned_init": None
        if pruned_metrics is None
        else {k: round(v, 4) for k, v in pruned_metrics.items() if k != "tokens"},
        "first_prompt": tokenizer.decode(held_out_prompts[0]),
        "rows": rows,
        "memory": (
            "step_peak_memory_mb: peak resident memory of one training step (forward, backward, "
            "AdamW) on batch_size blocks beyond the loaded models, after a one-block warm-up "
            "step, in a fresh process (fastkd.memory); on-policy methods: a generated batch"
        )
        if memory
        else None,
        "seconds": round(time.time() - start, 1),
    }


def _pruned(study: Study, tokenizer, train_ds: BlockDataset, work: Path, teacher_dir: Path, init):
    """The teacher pruned to the student's sizes (calibration: 64 training blocks as text);
    its directory and the seconds it took. Its parameters must have the init's shapes."""
    from fastkd.training.prune import prune

    pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(study.seed))
    calibration = work / "calibration.jsonl"
    calibration.write_text(
        "".join(
            json.dumps({"text": tokenizer.decode(r)}) + "\n"
            for r in train_ds.input_ids[pick[:64]].tolist()
        )
    )
    s = study.student
    start = time.perf_counter()
    prune(
        teacher_dir,
        work / "pruned",
        calibration=calibration,
        layers=s["num_hidden_layers"],
        hidden=s["hidden_size"],
        intermediate=s["intermediate_size"],
        heads=s["num_attention_heads"],
        block_size=study.block_size,
        max_blocks=64,
    )
    seconds = time.perf_counter() - start
    shapes = {k: tuple(v.shape) for k, v in load_model(work / "pruned").state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in init.state_dict().items()}
    if shapes != expected:
        differ = sorted(set(shapes.items()) ^ set(expected.items()))[:4]
        raise ValueError(f"the pruned teacher is not the study's student architecture: {differ}")
    return work / "pruned", seconds


def add_derived(rows: list[dict], teacher: dict, baseline: str) -> None:
    """Add retention and gap closed to each row (in place): ``ppl_retention`` = teacher ppl /
    ppl, ``accuracy_retention`` = accuracy / teacher accuracy, ``gap_closed`` =
    (ppl_baseline - ppl) / (ppl_baseline - ppl_teacher), None when the baseline is not worse
    than the teacher (no gap to close)."""
    base = next(r for r in rows if r["method"] == baseline)["perplexity"]
    gap = base - teacher["perplexity"]
    for r in rows:
        r["ppl_retention"] = round(teacher["perplexity"] / r["perplexity"], 4)
        r["accuracy_retention"] = (
            round(r["accuracy"] / teacher["accuracy"], 4) if teacher["accuracy"] else None
        )
        r["gap_closed"] = round((base - r["perplexity"]) / gap, 4) if gap > 0 else None


# --- outputs -----------------------------------------------------------------------------------


_COLUMNS = (
    "method",
    "init",
    "data",
    "held-out ppl",
    "accuracy",
    "ppl retention",
    "acc. retention",
    "gap closed",
    "ROUGE-L vs teacher",
    "train s",
    "generation s",
    "pruning s",
)


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """The study's table in Markdown, the teacher's row first, the settings under it."""
    study, t, blocks = report["study"], report["teacher"], report["blocks"]
    memory = report["memory"] is not None
    columns = [*_COLUMNS, "step peak MiB"] if memory else list(_COLUMNS)
    teacher = ["(teacher)", "", "", f"{t['perplexity']:.2f}", f"{t['accuracy']:.4f}"]
    teacher += ["1", "1", "1", "1", _cell(t["train_seconds"], ".0f"), "", ""]
    table = [teacher + [""] * memory]
    for r in report["rows"]:
        cells = [r["method"], r["init"], r["data"], f"{r['perplexity']:.2f}"]
        cells += [f"{r['accuracy']:.4f}", f"{r['ppl_retention']:.3f}"]
        cells += [_cell(r["accuracy_retention"], ".3f"), _cell(r["gap_closed"], ".3f")]
        cells += [f"{r['rouge_l']:.3f}", f"{r['train_seconds']:.0f}"]
        cells += [_cell(r["generate_seconds"] or None, ".0f")]
        cells += [_cell(r["prune_seconds"] or None, ".0f")]
        if memory:
            cells.append(f"{r['step_peak_memory_mb']:.0f}")
        table.append(cells)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|---|---|---|" + "---:|" * (len(columns) - 3),
        *("| " + " | ".join(cells) + " |" for cells in table),
    ]
    methods = "; ".join(f"{r['method']}: {_settings(r['settings'])}" for r in report["rows"])
    m, v = report["machine"], report["versions"]
    generated = f", {blocks['generated']} generated blocks" if blocks["generated"] else ""
    device = f", {m['gpu']}" if m["gpu"] else ""
    lines += [
        "",
        f"{study['steps']} steps of {study['batch_size']} blocks of {study['block_size']} "
        f"tokens per student, learning rate {study['learning_rate']}, seed {study['seed']}; "
        f"{blocks['train']} training, {blocks['held_out']} held-out blocks{generated}. Gap "
        f"closed is measured from {study['baseline']}. Methods: {methods}.",
        "",
        *(
            [
                f"The pruned teacher before any training (init of the pruned rows): held-out "
                f"ppl {report['pruned_init']['perplexity']:.2f}, accuracy "
                f"{report['pruned_init']['accuracy']:.4f}.",
                "",
            ]
            if report["pruned_init"]
            else []
        ),
        f"Machine: {m['cpu']}, {m['torch_threads']} torch threads"
        f"{device}; torch {v['torch']}, transformers {v['transformers']}, fastkd commit "
        f"{v['commit']}; the whole study "
        f"{report['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["method"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.bar(names, [r["perplexity"] for r in rows], color="tab:blue")
    left.axhline(report["teacher"]["perplexity"], ls="--", color="black", label="teacher")
    left.set_ylabel("held-out perplexity (lower is better)")
    left.legend()
    right.bar(names, [r["rouge_l"] for r in rows], color="tab:orange")
    right.set_ylabel("ROUGE-L F1 vs the teacher's greedy text")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    study = report["study"]
    fig.suptitle(f"fastkd compare: {study['steps']} steps per student, seed {study['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    """compare.json, compare.md and compare.png in ``out`` (each written whole or not at all)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compare.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(out / "compare.md", markdown(report).encode())
    replace_file(out / "compare.png", lambda p: _plot(report, p))


def summary(report: dict) -> str:
    """A short plain-text summary for the terminal."""
    lines = [f"{'method':<12}{'ppl':>10}{'acc':>8}{'gap':>8}{'ROUGE-L':>9}"]
    t = report["teacher"]
    lines.append(f"{'(teacher)':<12}{t['perplexity']:>10.2f}{t['accuracy']:>8.4f}")
    for r in report["rows"]:
        gap = "–" if r["gap_closed"] is None else f"{r['gap_closed']:.3f}"
        lines.append(
            f"{r['method']:<12}{r['perplexity']:>10.2f}{r['accuracy']:>8.4f}{gap:>8}{r['rouge_l']:>9.3f}"
        )
    return "\n".join(lines)
