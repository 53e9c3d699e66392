"""Loading Hugging Face causal LMs from local directories, and what their heads do to logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers


def logit_options(model: torch.nn.Module) -> tuple[float, float | None]:
    """(scale, final softcap) the model's forward applies to ``h @ W.T``: Cohere's
    ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides, Gemma caps with
    ``final_logit_softcapping``."""
    config = model.config
    if hasattr(config, "get_text_config"):  # multimodal configs keep these on the text part
        config = config.get_text_config()
    scale = getattr(config, "logit_scale", None) or 1.0
    scale /= getattr(config, "logits_scaling", None) or 1.0
    cap = getattr(config, "final_logit_softcapping", None)
    return float(scale), (float(cap) if cap else None)


def load_model(path: str | Path) -> transformers.PreTrainedModel:
    """A causal LM from a local directory (no hub access)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def load_student(spec: str | Path, vocab_size: int) -> transformers.PreTrainedModel:
    """A student from a model directory, or freshly initialised from a config (a .json file, or
    a directory holding only config.json)."""
    spec = Path(spec)
    has_weights = spec.is_dir() and any(spec.glob("model*.safetensors"))
    if has_weights:
        return load_model(spec)
    config_file = spec / "config.json" if spec.is_dir() else spec
    if not config_file.is_file():
        raise FileNotFoundError(f"student {spec}: neither a model directory nor a config file")
    data = json.loads(config_file.read_text())
    if "model_type" not in data:
        raise ValueError(f"{config_file}: a model config needs 'model_type' (e.g. 'llama')")
    config = transformers.AutoConfig.for_model(**data)
    if config.vocab_size < vocab_size:
        raise ValueError(
            f"student config has vocab_size {config.vocab_size}, smaller than the tokenizer's "
            f"{vocab_size}"
        )
    return transformers.AutoModelForCausalLM.from_config(config)
