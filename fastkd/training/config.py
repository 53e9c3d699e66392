"""``DistillConfig``: every knob of a distillation run, loadable from YAML or JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from fastkd._options import LossOptions

LAYER_MODES = ("auto", "all", "key", "late")


@dataclass
class DistillConfig:
    """Settings of a distillation run.

    Loss: ``alpha * CE + (1 - alpha) * T^2 * D(teacher || student)`` per token (``alpha`` is the
    hard-label CE weight, as everywhere in fastkd), plus ``feature_weight`` times the feature
    loss and ``attention_weight`` times the attention loss.

    Attributes:
        temperature, alpha, divergence, beta, skew: the response-KD loss (see ``fastkd.kd_loss``).
        backend, chunk_size, memory_budget: where and in what pieces the fused loss runs.
        vocab: ``truncate`` or ``pad`` when teacher and student vocabularies differ.
        feature_weight: weight of the hidden-state loss (0 = off).
        feature_loss: ``mse`` or ``cosine`` between projected student and teacher states.
        feature_layers: student layers (1 = first block's output): ``auto`` (``feature_num_layers``
            evenly spaced, ending at the last), ``all``, ``key`` (first, middle, last), ``late``
            (the last ``feature_num_layers``) or an explicit list. Teacher layer of student layer
            i is round(i * L_teacher / L_student).
        attention_weight, attention_loss (``kl`` or ``mse`` of head-averaged attention maps),
            attention_layers, attention_num_layers: the same for attention maps.
        teacher_weights: one weight per teacher (normalized to sum 1; default equal).
        multi_teacher: ``logits`` (distil from the weighted mean of the teachers' logits,
            computed chunk by chunk) or ``losses`` (weighted sum of one KD loss per teacher).
        self_distillation: ``frozen`` (a frozen copy of the student is the teacher) or ``ema``
            (an exponential moving average of the student, decay ``ema_decay``).
        seed: random seed of the run.
    """

    temperature: float = 2.0
    alpha: float = 0.5
    divergence: str = "kl"
    beta: float = 0.5
    skew: float = 0.1
    backend: str | None = None
    chunk_size: int | None = None
    memory_budget: int | None = None
    vocab: str | None = None
    feature_weight: float = 0.0
    feature_loss: str = "mse"
    feature_layers: str | list[int] = "auto"
    feature_num_layers: int = 4
    attention_weight: float = 0.0
    attention_loss: str = "kl"
    attention_layers: str | list[int] = "late"
    attention_num_layers: int = 1
    teacher_weights: list[float] | None = field(default=None)
    multi_teacher: str = "logits"
    self_distillation: str | None = None
    ema_decay: float = 0.999
    seed: int = 0

    def __post_init__(self) -> None:
        LossOptions(
            temperature=self.temperature,
            alpha=self.alpha,
            divergence=self.divergence,
            beta=self.beta,
            skew=self.skew,
            vocab=self.vocab,
        )
        for name in ("feature_weight", "attention_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        _choice("feature_loss", self.feature_loss, ("mse", "cosine"))
        _choice("attention_loss", self.attention_loss, ("kl", "mse"))
        _choice("multi_teacher", self.multi_teacher, ("logits", "losses"))
        _choice("self_distillation", self.self_distillation, (None, "frozen", "ema"))
        for name in ("feature_layers", "attention_layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                _choice(name, value, LAYER_MODES)
            elif not (
                isinstance(value, (list, tuple))
                and value
                and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
            ):
                raise ValueError(
                    f"{name} must be one of {LAYER_MODES} or a list of ints, got {value!r}"
                )
        for name, low in (("feature_num_layers", 1), ("attention_num_layers", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
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

    @classmethod
    def from_file(cls, path: str | Path) -> DistillConfig:
        """Load from ``.yaml``/``.yml`` or ``.json``; unknown keys are an error."""
        path = Path(path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"config file must be .yaml, .yml or .json, got {path}")
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

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


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
