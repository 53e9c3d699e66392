"""A student made from the teacher by pruning (Minitron): drop whole layers (depth) and keep the
most important MLP channels, attention heads and embedding channels (width), ranked by their
activations on calibration text, then copy the kept slices of the teacher's weights into a model
of the smaller shape (docs/design.md §12).

Depth: the block influence of layer i is ``1 - cos(x_i, x_{i+1})`` (its input and output hidden
states), averaged over the calibration tokens; ``layers=L`` keeps the L layers of highest
influence. The calibration perplexity of the teacher with each layer alone skipped is reported
beside it (Minitron's second depth metric).

Width, per token and then averaged over the calibration tokens:

* MLP channel c of a layer: ``|act_fn(gate(x)) * up(x)|_c`` (the input of ``down_proj``); each
  layer keeps its own top ``intermediate`` channels.
* Attention head h of a layer: the L2 norm of the head's attention output (its slice of the
  input of ``o_proj``); each layer keeps its own top heads under the GQA rule below.
* Embedding channel c: ``|RMSNorm(x)|_c`` summed over every residual-stream norm the student
  keeps (the input and post-attention norms of the kept layers, and the final norm); one ranking
  for the whole model, since every layer reads and writes the same residual channels.

GQA rule: ``head_dim`` is kept (and written to the config). A model with fewer KV heads than
query heads keeps every KV head, each with its ``heads / num_key_value_heads`` most important
query heads, so ``heads`` must be a multiple of ``num_key_value_heads``. A model with one KV
head per query head (MHA) drops whole heads, each query head with its key and value head.

Kept channels and heads stay in their original order. The output directory is written beside
``out`` under a temporary name and renamed into place, so a failed or killed prune never leaves a
half-written ``out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

from fastkd.training.data import BlockDataset, has_tokenizer, load_tokenizer, pack, read_records
from fastkd.training.evaluate import evaluate
from fastkd.training.files import publish
from fastkd.training.models import describe, load_model

# Decoders laid out as model.layers[i].self_attn.{q,k,v,o}_proj, .mlp.{gate,up,down}_proj with
# RMSNorms: what the slicing below knows.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
REPORT = "prune_report.json"
TMP_SUFFIX = ".prune-tmp"


@dataclass(frozen=True)
class Shape:
    """The sizes that pruning changes, as in a model config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict) -> Shape:
        heads = config["num_attention_heads"]
        return cls(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        )


def _positive(name: str, value, at_most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name}={value} is larger than the teacher's {at_most}")
    return value


def _dropped_layers(layers: int | Sequence[int] | None, count: int) -> list[int] | None:
    """The layers to drop when they are given as a list, checked; None otherwise."""
    if layers is None or (isinstance(layers, int) and not isinstance(layers, bool)):
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(
            f"layers must be an int (layers to keep) or a list of layer indices to drop, got "
            f"{type(layers).__name__}"
        )
    drop = list(layers)
    if not drop:
        raise ValueError("layers: the list of layers to drop is empty (pass None to keep all)")
    for i in drop:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
            raise ValueError(f"layers: {i!r} is not a layer index of the teacher (0..{count - 1})")
    if len(set(drop)) != len(drop):
        raise ValueError(f"layers: the drop list {drop} repeats a layer")
    if len(drop) == count:
        raise ValueError(f"layers: the drop list {drop} drops every layer")
    return sorted(drop)


def plan(
    config: dict,
    *,
    layers: int | Sequence[int] | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
) -> tuple[Shape, list[int] | None]:
    """Check the pruning targets against a teacher's config.json contents (before any weight
    loads): the student's shape, and the layers to drop when ``layers`` is a list."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} cannot be pruned; supported: {', '.join(MODEL_TYPES)} "
            "(decoders with self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj and RMSNorms)"
        )
    if all(v is None for v in (layers, hidden, intermediate, heads)):
        raise ValueError("nothing to prune: give layers, hidden, intermediate or heads")
    teacher = Shape.of(config)
    drop = _dropped_layers(layers, teacher.layers)
    if drop is not None:
        kept_layers = teacher.layers - len(drop)
    elif layers is not None:
        kept_layers = _positive("layers", layers, teacher.layers)
    else:
        kept_layers = teacher.layers
    hidden = teacher.hidden if hidden is None else _positive("hidden", hidden, teacher.hidden)
    intermediate = (
        teacher.intermediate
        if intermediate is None
        else _positive("intermediate", intermediate, teacher.intermediate)
    )
    kv_heads = teacher.kv_heads
    if heads is None:
        heads = teacher.heads
    else:
        _positive("heads", heads, teacher.heads)
        if teacher.heads % teacher.kv_heads:
            raise ValueError(
                f"the teacher's {teacher.heads} heads are not a multiple of its "
                f"{teacher.kv_heads} KV heads"
            )
        if kv_heads == teacher.heads:  # MHA: a head goes with its key and value head
            kv_heads = heads
        elif heads % kv_heads:
            raise ValueError(
                f"heads={heads} must be a multiple of the teacher's {kv_heads} KV heads: every "
                "KV head is kept, with heads / num_key_value_heads of its query heads"
            )
    shape = Shape(kept_layers, hidden, intermediate, heads, kv_heads, teacher.head_dim)
    return shape, drop


@dataclass
class Importance:
    """Activation statistics of a teacher over calibration tokens (means per token).

    ``block_influence`` [L]: 1 - cos(layer input, layer output). ``norms`` [L, 2, H]: |output|
    of each layer's input and post-attention RMSNorm, ``final_norm`` [H]: of the final norm.
    ``heads`` [L, A]: L2 norm of each head's attention output. ``mlp`` [L, I]:
    |act_fn(gate(x)) * up(x)|. All fp64 on the CPU.
    """

    block_influence: torch.Tensor
    norms: torch.Tensor
    final_norm: torch.Tensor
    heads: torch.Tensor
    mlp: torch.Tensor

    def hidden(self, kept_layers: Sequence[int]) -> torch.Tensor:
        """Embedding-channel importance [H] over the norms a student with these layers keeps."""
        return self.norms[list(kept_layers)].sum((0, 1)) + self.final_norm


def _first(value) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def calibration_importance(
    model: transformers.PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 8
) -> Importance:
    """Run ``model`` over ``input_ids`` [N, S] (full blocks, in eval mode) and gather the
    ``Importance`` statistics with forward hooks."""
    decoder = model.model
    layers = decoder.layers
    n, (num_heads, head_dim) = len(layers), (model.config.num_attention_heads, _head_dim(model))
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    sums = {
        "block_influence": torch.zeros(n, dtype=torch.float64),
        "norms": torch.zeros(n, 2, hidden, dtype=torch.float64),
        "final_norm": torch.zeros(hidden, dtype=torch.float64),
        "heads": torch.zeros(n, num_heads, dtype=torch.float64),
        "mlp": torch.zeros(n, inter, dtype=torch.float64),
    }
    inputs: dict[int, torch.Tensor] = {}

    def token_sum(x: torch.Tensor) -> torch.Tensor:  # [..., C] -> [C]
        return x.detach().double().flatten(0, -2).sum(0).cpu()

    def layer_input(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def layer_output(i):
        def hook(module, args, kwargs, output):
            x, y = inputs.pop(i).float(), _first(output).float()
            cos = nn.functional.cosine_similarity(x, y, dim=-1)
            sums["block_influence"][i] += float((1 - cos.double()).sum())

        return hook

    def norm_output(target: torch.Tensor):
        def hook(module, args, output):
            target.add_(token_sum(_first(output).abs()))

        return hook

    def head_norms(i):
        def hook(module, args):
            x = args[0]
            sums["heads"][i] += token_sum(
                x.float().unflatten(-1, (num_heads, head_dim)).norm(dim=-1)
            )

        return hook

    def mlp_channels(i):
        def hook(module, args):
            sums["mlp"][i] += token_sum(args[0].abs())

        return hook

    handles = [decoder.norm.register_forward_hook(norm_output(sums["final_norm"]))]
    for i, layer in enumerate(layers):
        handles += [
            layer.register_forward_pre_hook(layer_input(i), with_kwargs=True),
            layer.register_forward_hook(layer_output(i), with_kwargs=True),
            layer.input_layernorm.register_forward_hook(norm_output(sums["norms"][i, 0])),
            layer.post_attention_layernorm.register_forward_hook(norm_output(sums["norms"][i, 1])),
            layer.self_attn.o_proj.register_forward_pre_hook(head_norms(i)),
            layer.mlp.down_proj.register_forward_pre_hook(mlp_channels(i)),
        ]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    tokens = input_ids.numel()
    return Importance(**{k: v / tokens for k, v in sums.items()})


def _head_dim(model: transformers.PreTrainedModel) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (ties: the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def _kept_heads(scores: torch.Tensor, teacher: Shape, student: Shape) -> tuple:
    """(query heads, KV heads) one layer keeps under the GQA rule (module docstring)."""
    if teacher.kv_heads == teacher.heads:  # MHA
        kept = _top(scores, student.heads)
        return kept, kept
    group = teacher.heads // teacher.kv_heads
    per_group = student.heads // teacher.kv_heads
    query = torch.cat(
        [
            g * group + _top(scores[g * group : (g + 1) * group], per_group)
            for g in range(teacher.kv_heads)
        ]
    )
    return query, torch.arange(teacher.kv_heads)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k/v projection (columns of o_proj) that hold these heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# Per parameter (in a layer: its name after "model.layers.N."), the indices each dimension keeps:
# E embedding channels, Q query-head rows, KV key/value-head rows, C MLP channels; ":" keeps a
# dimension whole, "" the whole parameter.
_LAYER_SLICES = {
    "input_layernorm.weight": "E",
    "post_attention_layernorm.weight": "E",
    "self_attn.q_proj.weight": "Q E",
    "self_attn.q_proj.bias": "Q",
    "self_attn.k_proj.weight": "KV E",
    "self_attn.k_proj.bias": "KV",
    "self_attn.v_proj.weight": "KV E",
    "self_attn.v_proj.bias": "KV",
    "self_attn.o_proj.weight": "E Q",
    "self_attn.o_proj.bias": "E",
    "self_attn.q_norm.weight": "",  # Qwen3's per-head norms: head_dim is kept
    "self_attn.k_norm.weight": "",
    "mlp.gate_proj.weight": "C E",
    "mlp.gate_proj.bias": "C",
    "mlp.up_proj.weight": "C E",
    "mlp.up_proj.bias": "C",
    "mlp.down_proj.weight": "E C",
    "mlp.down_proj.bias": "E",
}
_MODEL_SLICES = {
    "model.embed_tokens.weight": ": E",
    "lm_head.weight": ": E",
    "model.norm.weight": "E",
}


def _sliced(name: str, tensor: torch.Tensor, index: dict[str, torch.Tensor]) -> torch.Tensor:
    """The part of a teacher parameter that the student keeps (``index``: the kept indices
    by the letters of ``_LAYER_SLICES``)."""
    if name.startswith("model.layers."):
        spec = _LAYER_SLICES.get(name.split(".", 3)[3])
    else:
        spec = _MODEL_SLICES.get(name)
    if spec is None:
        raise ValueError(
            f"the teacher's parameter {name} is not one that pruning knows how to slice"
        )
    for dim, key in enumerate(spec.split()):
        if key != ":":
            tensor = tensor.index_select(dim, index[key].to(tensor.device))
    return tensor.contiguous()


_LAYER_MODULES = (
    "input_layernorm",
    "post_attention_layernorm",
    *(f"self_attn.{p}_proj" for p in "qkvo"),
    *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
)


def _check_layout(model: nn.Module) -> None:
    try:
        for name in ("model.embed_tokens", "model.norm"):
            model.get_submodule(name)
        for i in range(len(model.model.layers)):
            for name in _LAYER_MODULES:
                model.get_submodule(f"model.layers.{i}.{name}")
    except AttributeError as e:
        raise ValueError(
            f"{describe(model)} is not laid out as model.layers[i].self_attn.{{q,k,v,o}}_proj, "
            f".mlp.{{gate,up,down}}_proj with RMSNorms ({e})"
        ) from None


class _Skipped(nn.Module):
    """A decoder layer taken out of the forward: its input passes through. It stays in its
    place, so the other layers keep their index (KV cache slot, Qwen2's per-layer mask)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _perplexity_without(model: nn.Module, layer: int, data: BlockDataset, batch_size: int):
    """Calibration perplexity of ``model`` with one layer skipped."""
    layers = model.model.layers
    original = layers[layer]
    layers[layer] = _Skipped()
    try:
        return evaluate(model, data, batch_size=batch_size)["perplexity"]
    finally:
        layers[layer] = original


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf


def _floats(t: torch.Tensor) -> list:
    return [round(float(v), 6) for v in t] if t.dim() == 1 else [_floats(r) for r in t]


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {out} exists and is not an empty directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"out: {parent} exists and is not a directory")
            break


def _write(out: Path, student: nn.Module, tokenizer, report: dict) -> None:
    """Save the student, its tokenizer and the report into a temporary directory beside
    ``out`` and publish it as ``out`` (``files.publish``: flushed, then one rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}{TMP_SUFFIX}")
    if tmp.exists():  # left by a killed prune into the same out
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
        publish(tmp, out)  # out, if it exists, is empty (checked up front)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _student(
    teacher: transformers.PreTrainedModel,
    shape: Shape,
    kept: list[int],
    embed: torch.Tensor,
    per_layer: list[dict[str, torch.Tensor]],
) -> transformers.PreTrainedModel:
    """A model of ``shape`` holding the kept slices of the teacher's weights: layers ``kept``,
    embedding channels ``embed``, per kept layer its query heads "Q", KV heads "KV" and MLP
    channels "C"."""
    config = teacher.config.to_dict()
    changes = {
        "num_hidden_layers": shape.layers,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,  # no longer hidden_size / heads
    }
    if isinstance(config.get("layer_types"), list):  # e.g. Qwen2's sliding-window layers
        changes["layer_types"] = [config["layer_types"][i] for i in kept]
    config = type(teacher.config).from_dict({**config, **changes})
    device = next(teacher.parameters()).device
    with no_init_weights(), device:  # every weight is copied below
        student = transformers.AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        index = {"E": embed}
        source_name = name
        if name.startswith("model.layers."):
            _, _, k, rest = name.split(".", 3)
            layer = per_layer[int(k)]
            source_name = f"model.layers.{kept[int(k)]}.{rest}"
            index.update(
                Q=_rows(layer["Q"], shape.head_dim),
                KV=_rows(layer["KV"], shape.head_dim),
                C=layer["C"],
            )
        state[name] = _sliced(source_name, source[source_name], index)
    student.load_state_dict(state, strict=True)
    student.generation_config = teacher.generation_config
    return student


def prune(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    calibration: str | os.PathLike,
    layers: int | Sequence[int] | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    block_size: int = 128,
    max_blocks: int = 64,
    batch_size: int = 8,
    tokenizer: str | os.PathLike | None = None,
) -> dict:
    """Prune a teacher into a smaller model of the same architecture (module docstring), on
    the GPU when CUDA is available.

    Args:
        teacher: model directory of a Llama, Mistral, Qwen2 or Qwen3 causal LM.
        out: directory to create (absent or empty): the student (safetensors), the tokenizer
            and ``prune_report.json``; ``AutoModelForCausalLM.from_pretrained(out)`` loads it.
        calibration: ``.txt``/``.jsonl`` file or directory, packed as ``fastkd distill`` packs.
        layers: layers to keep (an int: those of highest block influence), or a list of the
            0-based indices of the layers to drop.
        hidden: embedding channels (``hidden_size``) to keep.
        intermediate: MLP channels (``intermediate_size``) to keep in every layer.
        heads: attention heads to keep in every layer (GQA rule in the module docstring).
        block_size: tokens per calibration block.
        max_blocks: calibration blocks used (the first ones).
        batch_size: blocks per forward pass.
        tokenizer: tokenizer directory (default: the teacher's); saved with the student.

    Returns:
        The report (also in ``out/prune_report.json``): kept and dropped layers, the importance
        scores, the shapes and parameter counts before and after, the calibration perplexity of
        the teacher and of the pruned model.

    Raises:
        FileNotFoundError: no teacher config, calibration data or tokenizer directory.
        ValueError: an unsupported architecture, targets that are not positive, larger than the
            teacher's or against the GQA rule, a non-empty ``out``, calibration data shorter than
            one block; all before any weight loads.
    """
    teacher, out = Path(teacher), Path(out)
    for name, value in (
        ("block_size", block_size),
        ("max_blocks", max_blocks),
        ("batch_size", batch_size),
    ):
        _positive(name, value)
    config_file = teacher / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"teacher {teacher}: not a model directory (no config.json)")
    config = json.loads(config_file.read_text())
    shape, drop = plan(config, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads)
    _check_out(out)
    tokenizer_dir = teacher if tokenizer is None else Path(tokenizer)
    if not has_tokenizer(tokenizer_dir):
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}; pass tokenizer=DIR")
    tok = load_tokenizer(tokenizer_dir)
    input_ids, labels = (t[:max_blocks] for t in pack(read_records(calibration), tok, block_size))
    if int(input_ids.max()) >= config["vocab_size"]:
        raise ValueError(
            f"the calibration data holds token id {int(input_ids.max())} but the teacher embeds "
            f"only {config['vocab_size']} ids: the tokenizer in {tokenizer_dir} is not its own"
        )
    data = BlockDataset(input_ids, labels)

    model = load_model(teacher)
    _check_layout(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    source = Shape.of(model.config.to_dict())
    importance = calibration_importance(model, input_ids, batch_size)
    before = evaluate(model, data, batch_size=batch_size)
    # Minitron's second depth metric, reported when the depth is pruned.
    without = (
        [_perplexity_without(model, i, data, batch_size) for i in range(source.layers)]
        if layers is not None
        else None
    )
    if drop is None:
        kept = _top(importance.block_influence, shape.layers).tolist()
    else:
        kept = [i for i in range(source.layers) if i not in drop]

    hidden_importance = importance.hidden(kept)
    embed = _top(hidden_importance, shape.hidden)
    per_layer = []
    for i in kept:
        query, kv = _kept_heads(importance.heads[i], source, shape)
        per_layer.append({"Q": query, "KV": kv, "C": _top(importance.mlp[i], shape.intermediate)})
    student = _student(model, shape, kept, embed, per_layer)
    after = evaluate(student, data, batch_size=batch_size)

    report = {
        "teacher": str(teacher),
        "model_type": config["model_type"],
        "shape": {"teacher": asdict(source), "student": asdict(shape)},
        "parameters": {
            "teacher": sum(p.numel() for p in model.parameters()),
            "student": sum(p.numel() for p in student.parameters()),
        },
        "layers": {
            "kept": kept,
            "dropped": [i for i in range(source.layers) if i not in kept],
            "selected_by": "block_influence" if drop is None else "drop list",
            "block_influence": _floats(importance.block_influence),
            "perplexity_without": None if without is None else [_finite(p) for p in without],
        },
        "hidden": {"kept": embed.tolist(), "importance": _floats(hidden_importance)},
        "heads": {
            "kept": [layer["Q"].tolist() for layer in per_layer],
            "kv_kept": [layer["KV"].tolist() for layer in per_layer],
            "importance": _floats(importance.heads),
        },
        "intermediate": {
            # the full per-channel scores would be L x I numbers; the share each layer keeps
            "importance_kept": [
                round(float(importance.mlp[i][layer["C"]].sum() / importance.mlp[i].sum()), 6)
                for i, layer in zip(kept, per_layer)
            ],
        },
        "calibration": {
            "path": str(calibration),
            "blocks": input_ids.shape[0],
            "block_size": block_size,
            "tokens": before["tokens"],
            "perplexity_before": _finite(before["perplexity"]),
            "perplexity_after": _finite(after["perplexity"]),
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
        },
    }
    _write(out, student, tok, report)
    return report
