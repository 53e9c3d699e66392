"""``DistillConfig``: every knob of the distillation loss, loadable from YAML or JSON; and
``RunArguments``: what a ``fastkd distill`` run reads (models, data, LoRA). Both are plain
dataclasses, so the command line (``transformers.HfArgumentParser``, docs/design.md §10) makes
every field a flag and a key of a ``--config`` file."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastkd._options import TAILS, Divergence, LossOptions, Tail, VocabMode

LayerMode = Literal["auto", "all", "key", "late"]
LAYER_MODES = ("auto", "all", "key", "late")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DistillConfig:
    """Settings of a distillation run.

    Loss: ``alpha * CE + (1 - alpha) * T^2 * D(teacher || student)`` per token (``alpha`` is the
    hard-label CE weight, as everywhere in fastkd), plus ``feature_weight`` times the feature
    loss and ``attention_weight`` times the attention loss. Each field's ``help`` metadata says
    what it does (``fastkd distill --help`` shows them).
    """

    temperature: float = field(default=2.0, metadata=_help("softmax temperature T of the KD term"))
    alpha: float = field(
        default=0.5, metadata=_help("weight of the hard-label CE; the KD term gets 1 - alpha")
    )
    divergence: Divergence = field(
        default="kl", metadata=_help("D(teacher || student) of the KD term (see fastkd.kd_loss)")
    )
    beta: float = field(default=0.5, metadata=_help("mixture weight of the jsd divergence"))
    skew: float = field(default=0.1, metadata=_help("skew of skew_kl / skew_reverse_kl"))
    backend: str | None = field(
        default=None, metadata=_help("kernel backend of the fused loss (default: per device)")
    )
    chunk_size: int | None = field(
        default=None, metadata=_help("rows per chunk of the fused loss (default: from memory)")
    )
    memory_budget: int | None = field(
        default=None, metadata=_help("bytes of logits one chunk may hold (default: automatic)")
    )
    vocab: VocabMode | None = field(
        default=None,
        metadata=_help(
            "when teacher and student vocabularies differ: truncate (compare the shared "
            "prefix) or pad (missing teacher entries are -inf)"
        ),
    )
    tail: Tail = field(
        default="bucket",
        metadata=_help(
            "with a teacher cache (top-k of the teacher): how the mass outside the cached ids "
            "is treated; bucket: one more bin against the student's mass outside them, "
            "renormalize: both distributions renormalized over the cached ids, ignore: the "
            "teacher's renormalized, the student's not (see fastkd.sparse_kd_loss)"
        ),
    )
    rationale_weight: float = field(
        default=1.0,
        metadata=_help(
            "loss weight of a response's tokens before its first answer_marker (the rationale "
            "of fastkd generate --rationale-template records); 1 with answer_weight 1 = off"
        ),
    )
    answer_weight: float = field(
        default=1.0,
        metadata=_help(
            "loss weight of a response's tokens from answer_marker on (all of a response "
            "without it); text records weigh 1"
        ),
    )
    answer_marker: str = field(
        default="Answer:", metadata=_help("text that starts the answer span of a response")
    )
    feature_weight: float = field(
        default=0.0, metadata=_help("weight of the hidden-state loss (0 = off)")
    )
    feature_loss: Literal["mse", "cosine"] = field(
        default="mse", metadata=_help("between projected student and teacher hidden states")
    )
    feature_layers: LayerMode | list[int] = field(
        default="auto",
        metadata=_help(
            "student layers (1 = first block's output): auto (feature_num_layers evenly "
            "spaced, ending at the last), all, key (first, middle, last), late (the last "
            "feature_num_layers) or layer numbers; teacher layer of student layer i is "
            "round(i * L_teacher / L_student)"
        ),
    )
    feature_num_layers: int = field(default=4, metadata=_help("layers of auto and late"))
    attention_weight: float = field(
        default=0.0, metadata=_help("weight of the attention-map loss (0 = off)")
    )
    attention_loss: Literal["kl", "mse"] = field(
        default="kl", metadata=_help("between head-averaged attention maps")
    )
    attention_layers: LayerMode | list[int] = field(
        default="late", metadata=_help("as feature_layers, for attention maps")
    )
    attention_num_layers: int = field(default=1, metadata=_help("layers of auto and late"))
    teacher_weights: list[float] | None = field(
        default=None,
        metadata=_help("one weight per teacher, in teacher order (normalized; default equal)"),
    )
    multi_teacher: Literal["logits", "mixture", "losses"] = field(
        default="logits",
        metadata=_help(
            "logits: distil from the weighted mean of the teachers' logits; mixture: from the "
            "weighted mean of their probabilities at T, sum_k w_k softmax(z_k / T); losses: "
            "weighted sum of one KD loss per teacher"
        ),
    )
    self_distillation: Literal["frozen", "ema"] | None = field(
        default=None,
        metadata=_help(
            "no teacher: a frozen copy of the student, or an exponential moving average of it"
        ),
    )
    ema_decay: float = field(default=0.999, metadata=_help("decay of self_distillation=ema"))
    on_policy_fraction: float = field(
        default=0.0,
        metadata=_help(
            "on-policy KD: share of the training batches whose continuations the student "
            "generates from the batch's first prompt_tokens; the KD term alone trains on them "
            "(CE dropped: the student's samples are no ground truth)"
        ),
    )
    seq_kd: bool = field(
        default=False,
        metadata=_help(
            "sequence-level KD: the teacher (the first) generates those continuations instead; "
            "they keep the CE term (the teacher's tokens are targets)"
        ),
    )
    prompt_tokens: int | None = field(
        default=None,
        metadata=_help("tokens of each block kept as the prompt (default: half the block)"),
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata=_help("tokens generated per prompt (default: block size - prompt_tokens)"),
    )
    generation_temperature: float = field(
        default=1.0, metadata=_help("sampling temperature of the generation (0 = greedy)")
    )
    generation_top_p: float = field(
        default=1.0, metadata=_help("nucleus (top-p) sampling of the generation (1 = off)")
    )
    seed: int = field(default=0, metadata=_help("random seed of the run"))

    def __post_init__(self) -> None:
        LossOptions(
            temperature=self.temperature,
            alpha=self.alpha,
            divergence=self.divergence,
            beta=self.beta,
            skew=self.skew,
            vocab=self.vocab,
        )
        if self.backend is not None:
            from fastkd.backends import check_backend_name

            check_backend_name(self.backend)
        for name in ("chunk_size", "memory_budget"):
            value = getattr(self, name)
            if value is not None and not _is_int(value, 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        for name in ("feature_weight", "attention_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        _choice("tail", self.tail, TAILS)
        _check_span_weights(self)
        _choice("feature_loss", self.feature_loss, ("mse", "cosine"))
        _choice("attention_loss", self.attention_loss, ("kl", "mse"))
        _choice("multi_teacher", self.multi_teacher, ("logits", "mixture", "losses"))
        _choice("self_distillation", self.self_distillation, (None, "frozen", "ema"))
        for name in ("feature_layers", "attention_layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                _choice(name, value, LAYER_MODES)
            elif not (
                isinstance(value, (list, tuple)) and value and all(_is_int(i, 1) for i in value)
            ):
                raise ValueError(
                    f"{name} must be one of {LAYER_MODES} or a list of layer numbers >= 1, "
                    f"got {value!r}"
                )
        for name, low in (("feature_num_layers", 1), ("attention_num_layers", 1), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value, low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.teacher_weights is not None:
            w = self.teacher_weights
            numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
            if not w or not numbers or min(w) < 0 or not sum(w) > 0:
                raise ValueError(
                    f"teacher_weights must be non-negative numbers with a positive sum, got {w!r}"
                )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check_generation(self)

    @classmethod
    def from_file(cls, path: str | Path) -> DistillConfig:
        """Load from ``.yaml``/``.yml`` or ``.json``; unknown keys are an error."""
        return cls.from_dict(load_settings(path), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> DistillConfig:
        """A copy with some settings changed (validated again); ``None`` values are ignored,
        so command-line flags that were not given leave the file's settings alone."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class RunArguments:
    """The models, data and adapters of a ``fastkd distill`` run (the command line's third
    group, beside ``DistillConfig`` and ``transformers.TrainingArguments``). Values are checked
    here; paths are checked by ``fastkd.training.run.check_run`` before any model loads."""

    _argument_group_name = "models, data, adapters"  # its heading in ``fastkd distill --help``

    teacher: list[str] = field(
        default_factory=list,
        metadata={
            "help": "teacher model directory; repeat the flag or give several for several "
            "teachers (none with self_distillation or --teacher_cache)",
            "action": "extend",
            "metavar": "DIR",
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "distil from a teacher cache (a directory written by fastkd cache-teacher: "
            "the teacher's top-k per token) instead of --teacher; the data, tokenizer and "
            "--block_size must be those it was built from, --temperature its temperature",
            "metavar": "DIR",
        },
    )
    student: str | None = field(
        default=None,
        metadata={
            "help": "student model directory, or a model config (.json file or a directory "
            "with only config.json) to start from scratch (required)",
            "metavar": "DIR_OR_CONFIG",
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": ".txt or .jsonl training text, or a directory of them (required)",
            "metavar": "PATH",
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "tokenizer directory that packs the data (default: the student's, else "
            "the first teacher's)",
            "metavar": "DIR",
        },
    )
    block_size: int = field(default=128, metadata=_help("tokens per packed sequence"))
    eval_fraction: float = field(
        default=0.05,
        metadata=_help(
            "share of the packed blocks held out for evaluation, drawn with --seed "
            "(fastkd eval --eval_fraction F --seed S evaluates the same blocks)"
        ),
    )
    allow_tokenizer_mismatch: bool = field(
        default=False,
        metadata=_help(
            "accept teacher, student and --tokenizer tokenizers that differ (vocabulary or the "
            "encoding of a sample of the data): token ids are then taken as the same tokens; "
            "vocabulary sizes that differ still need --vocab"
        ),
    )
    lora_r: int | None = field(
        default=None, metadata=_help("train a LoRA adapter of this rank instead of the student")
    )
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling numerator"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA input"))
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=_help(
            "module names that get adapters, or all-linear (default: peft's choice for the "
            "model type)"
        ),
    )
    merge_adapters: bool = field(
        default=False,
        metadata=_help(
            "save the student with the LoRA adapter merged into its weights (default: the "
            "adapter alone, in peft's format)"
        ),
    )

    def __post_init__(self) -> None:
        if not _is_int(self.block_size, 2):
            raise ValueError(f"block_size must be an int >= 2, got {self.block_size!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.lora_r is None:
            for name in ("lora_target_modules", "merge_adapters"):
                if getattr(self, name):
                    raise ValueError(f"{name} needs lora_r (a LoRA run)")
            return
        if not _is_int(self.lora_r, 1):
            raise ValueError(f"lora_r must be an int >= 1, got {self.lora_r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module")


def load_settings(path: str | Path) -> dict:
    """The mapping of settings in a ``.yaml``/``.yml`` or ``.json`` file."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"config file must be .yaml, .yml or .json, got {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _check_generation(config: DistillConfig) -> None:
    """The on-policy / sequence-level KD settings (docs/design.md §12)."""
    for name in ("on_policy_fraction", "generation_temperature", "generation_top_p"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= config.on_policy_fraction <= 1.0:
        raise ValueError(f"on_policy_fraction must be in [0, 1], got {config.on_policy_fraction}")
    if not config.generation_temperature >= 0.0:
        raise ValueError(
            f"generation_temperature must be >= 0 (0 = greedy), got {config.generation_temperature}"
        )
    if not 0.0 < config.generation_top_p <= 1.0:
        raise ValueError(f"generation_top_p must be in (0, 1], got {config.generation_top_p}")
    for name in ("prompt_tokens", "max_new_tokens"):
        value = getattr(config, name)
        if value is not None and not _is_int(value, 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    if config.seq_kd and config.on_policy_fraction == 0:
        raise ValueError(
            "seq_kd=True makes the teacher generate the on_policy_fraction share of the "
            "batches, which is 0: set on_policy_fraction > 0 (1 for sequence-level KD alone)"
        )
    if config.on_policy_fraction > 0 and not config.seq_kd and config.alpha == 1:
        raise ValueError(
            f"on_policy_fraction={config.on_policy_fraction:g} with alpha=1: the student's "
            "samples train with the KD term alone, whose weight 1 - alpha is 0; lower alpha"
        )


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_span_weights(config: DistillConfig) -> None:
    """The rationale/answer span weights (docs/design.md §12)."""
    weights = {name: getattr(config, name) for name in ("rationale_weight", "answer_weight")}
    for name, value in weights.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and 0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not any(weights.values()):
        raise ValueError("rationale_weight and answer_weight are both 0: no response token counts")
    if not isinstance(config.answer_marker, str) or not config.answer_marker:
        raise ValueError(f"answer_marker must be a non-empty string, got {config.answer_marker!r}")
