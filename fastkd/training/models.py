"""Hugging Face causal LMs as fastkd sees them: a body that gives hidden states, and a head
(``get_output_embeddings()``, LoRA-adapted or not) with the transforms its forward applies to
the logits, checked against ``model(...).logits`` by a probe.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from torch import nn

from fastkd.reference import compute_dtype, transform_logits
from fastkd.training.fsdp import full_weights

IGNORE_INDEX = -100
# Rows per logits chunk are chosen so that one chunk holds about this many elements
# (64 MiB in fp32): 512 rows at V = 32k, 64 rows at V = 256k.
CHUNK_ELEMENTS = 1 << 24
# Tokens on which the head is checked against ``model(...).logits``.
PROBE_TOKENS = 16
# Relative (Frobenius) mismatch that fails the probe: far above bf16 rounding (~0.5%), far
# below what a missed scale or softcap does.
PROBE_RTOL = 0.05


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (peft is imported if one exists)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM: ``model`` itself, or the one a PeftModel wraps (its LoRA
    layers are injected in place, so running its modules runs the adapters)."""
    return model.get_base_model() if is_peft(model) else model


def describe(model: nn.Module) -> str:
    """``LlamaForCausalLM (model_type 'llama')``, for error messages."""
    lm = causal_lm(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    return f"{type(lm).__name__} (model_type {model_type!r})"


def body(model: nn.Module) -> nn.Module:
    """The decoder without its head: ``base_model`` of the causal LM."""
    lm = causal_lm(model)
    if lm.base_model is lm:
        raise ValueError(f"{describe(model)} has no separate body (base_model)")
    return lm.base_model


def _text_config(model: nn.Module):
    config = causal_lm(model).config
    if hasattr(config, "get_text_config"):  # multimodal configs keep these on the text part
        config = config.get_text_config()
    return config


def logit_options(model: nn.Module) -> tuple[float, float | None]:
    """(scale, final softcap) the model's forward applies to ``h @ W.T + b``: Cohere's
    ``logit_scale`` and Falcon-H1's ``lm_head_multiplier`` multiply, ``logits_scaling`` divides
    (Granite) except in HyperCLOVAX, where it multiplies (muP), and Gemma caps with
    ``final_logit_softcapping``. Any other transform fails ``check_head``."""
    config = _text_config(model)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale *= getattr(config, "lm_head_multiplier", None) or 1.0
    scaling = getattr(config, "logits_scaling", None) or 1.0
    if getattr(config, "model_type", None) == "hyperclovax":
        scale *= scaling
    else:
        scale /= scaling
    cap = getattr(config, "final_logit_softcapping", None)
    return float(scale), (float(cap) if cap else None)


class Head:
    """A causal LM's output layer as its forward applies it,
    ``softcap(scale * (h @ W.T + b))``, in the form the fused loss takes:
    ``inputs(h) @ weight().T + bias()``.

    For a plain head ``inputs(h) = h``. A LoRA-adapted head (peft's ``lora.Linear``, e.g.
    ``lm_head`` in ``target_modules``) adds ``scaling * B(A(dropout(h)))`` per active adapter;
    that is kept low-rank as r extra input columns, ``inputs(h) = [h, scaling * A(dropout(h))]``
    and ``weight() = [W, B]``, so the logits are exactly peft's (its dropout included, in
    training mode) and the gradient reaches A and B without a [V, H] delta. ``fan_in_fan_out``
    (a Conv1D-layout base weight) is transposed back to [V, H].
    """

    def __init__(self, model: nn.Module) -> None:
        module = model.get_output_embeddings()
        if module is None:
            raise ValueError(f"{describe(model)} has no output embeddings (lm_head)")
        self.module = module
        self.lora = hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
        self.base = module.get_base_layer() if self.lora else module
        self.scale, softcap = logit_options(model)
        self.softcap = softcap or 0.0
        for name, *_ in self._adapters():
            if name in module.lora_variant:
                variant = type(module.lora_variant[name]).__name__
                raise ValueError(
                    f"{describe(model)}: the LoRA variant {variant} on the output layer is not "
                    "supported (plain LoRA is)"
                )

    def _adapters(self) -> Iterator[tuple[str, nn.Module, nn.Module, nn.Module, float]]:
        """(name, A, B, dropout, scaling) of each LoRA adapter peft's forward would apply."""
        m = self.module
        if not self.lora or m.disable_adapters or m.merged:
            return
        for name in m.active_adapters:
            if name in m.lora_A:
                yield name, m.lora_A[name], m.lora_B[name], m.lora_dropout[name], m.scaling[name]

    @property
    def vocab_size(self) -> int:
        transposed = self.lora and self.module.fan_in_fan_out
        return self.base.weight.shape[1 if transposed else 0]

    def inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states extended by the adapters' low-rank activations."""
        extra = [
            s * a(drop(hidden.to(a.weight.dtype))).to(hidden.dtype)
            for _, a, _, drop, s in self._adapters()
        ]
        return torch.cat([hidden, *extra], -1) if extra else hidden

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[V, H (+ r)], differentiable; in ``dtype`` (default: the base weight's)."""
        w = self.base.weight
        if self.lora and self.module.fan_in_fan_out:
            w = w.T
        dtype = w.dtype if dtype is None else dtype
        parts = [p.to(dtype) for p in (w, *(b.weight for _, _, b, _, _ in self._adapters()))]
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """[V] or None, differentiable; in ``dtype`` (default: the base weight's)."""
        b = getattr(self.base, "bias", None)
        for _, _, lora_b, _, s in self._adapters():
            if lora_b.bias is not None:  # peft's lora_bias: needs a base bias
                b = b + s * lora_b.bias
        return None if b is None else b.to(self.base.weight.dtype if dtype is None else dtype)

    def logits(self, hidden: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """The model's logits from its body's output (``weight``/``bias``: this head's, when
        the caller already has them). The product runs in the head's dtype, as in the model's
        forward (and with no fp32 copy of W); the logits are then upcast to fp32 (fp64 for an
        fp64 model) for the transforms and everything after."""
        if weight is None:
            weight, bias = self.weight(), self.bias()
        x = self.inputs(hidden.to(weight.device, weight.dtype))
        z = nn.functional.linear(x, weight, bias)
        return transform_logits(z.to(compute_dtype(weight.dtype)), self.scale, self.softcap)

    @torch.no_grad()
    def statistics(
        self, hidden: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``hidden`` [N, H] with ``targets`` [N] (no ignored ones): the hard-label
        cross-entropy (fp64) and whether the target is the argmax (bool), both [N] on the
        head's device, a chunk of rows at a time so that [N, V] logits never exist."""
        device = self.base.weight.device
        nll = torch.empty(hidden.shape[0], dtype=torch.float64, device=device)
        hit = torch.empty(hidden.shape[0], dtype=torch.bool, device=device)
        rows = max(1, CHUNK_ELEMENTS // self.vocab_size)
        targets = targets.to(device)
        weight, bias = self.weight(), self.bias()
        for start in range(0, hidden.shape[0], rows):
            z = self.logits(hidden[start : start + rows], weight, bias)
            y = targets[start : start + rows]
            nll[start : start + rows] = z.logsumexp(-1) - z.gather(1, y[:, None]).squeeze(1)
            hit[start : start + rows] = z.argmax(-1) == y
        return nll, hit


def _eval_mode(model: nn.Module):
    """Put every module in eval mode; returns a function that restores each one's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()

    def restore() -> None:
        for m, training in modes:
            m.training = training

    return restore


def probe_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed [1, PROBE_TOKENS] batch of ids valid for the model, on its input device."""
    embedding = causal_lm(model).get_input_embeddings()
    vocab = min(embedding.weight.shape[0], Head(model).vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=g).to(embedding.weight.device)
    return ids, torch.ones_like(ids)


@torch.no_grad()
def check_head(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> None:
    """Raise ValueError unless body -> ``Head`` reproduces ``model(...).logits`` (to
    ``PROBE_RTOL``, relative), on the first ``PROBE_TOKENS`` tokens of the first sequence of
    ``input_ids`` (default ``probe_inputs``), with every module in eval mode."""
    if input_ids is None:
        input_ids, attention_mask = probe_inputs(model)
    ids = input_ids[:1, :PROBE_TOKENS]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask[:1, :PROBE_TOKENS]
    head = Head(model)
    restore = _eval_mode(model)
    try:
        with full_weights(head.module):
            logits = model(input_ids=ids, attention_mask=mask).logits[0]
            hidden = body(model)(input_ids=ids, attention_mask=mask)
            got = head.logits(hidden.last_hidden_state[0])
    finally:
        restore()
    expected = logits.to(got)
    mismatch = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    if not mismatch <= PROBE_RTOL:
        raise ValueError(
            f"{describe(model)}: logits from its body and get_output_embeddings() (with logit "
            f"scale {head.scale:g}, softcap {head.softcap:g}) differ from model(...).logits "
            f"(relative error {mismatch:.3g}): its head transforms the logits in a way fastkd "
            "does not know"
        )


class RouterLoss:
    """An MoE model's router load-balancing loss, weighted by ``router_aux_loss_coef``, as its
    own forward adds it to the loss: only when ``config.output_router_logits`` is set (as in
    transformers, where that flag is what turns the term on in training), computed by the
    model's own module's ``load_balancing_loss_func`` from the router logits its body records.
    ``RouterLoss.of(model)`` is None for a model without one (or with a zero coefficient)."""

    def __init__(self, model: nn.Module, coef: float, function) -> None:
        lm = causal_lm(model)
        config = _text_config(model)
        self.coef = coef
        self.function = function
        self.num_experts = getattr(lm, "num_experts", None) or _experts(config)
        self.top_k = getattr(lm, "num_experts_per_tok", None) or config.num_experts_per_tok

    @classmethod
    def of(cls, model: nn.Module) -> RouterLoss | None:
        config = _text_config(model)
        if not getattr(config, "output_router_logits", False):
            return None
        lm = causal_lm(model)
        coef = getattr(lm, "router_aux_loss_coef", None)
        coef = float(getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef)
        function = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
        if function is None or _experts(config) is None:
            raise ValueError(
                f"{describe(model)}: config.output_router_logits is set, but fastkd does not know "
                "this model's router loss (no load_balancing_loss_func beside its forward)"
            )
        return cls(model, coef, function) if coef else None

    def __call__(self, router_logits, attention_mask: torch.Tensor) -> torch.Tensor:
        aux = self.function(router_logits, self.num_experts, self.top_k, attention_mask)
        return self.coef * aux.float()

    @torch.no_grad()
    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless this equals the model's own ``aux_loss * coef`` on the
        probe batch (a model whose forward computes it some other way)."""
        ids, mask = probe_inputs(model)
        restore = _eval_mode(model)
        try:
            expected = model(input_ids=ids, attention_mask=mask).aux_loss
            out = body(model)(input_ids=ids, attention_mask=mask, output_router_logits=True)
            got = self(out.router_logits, mask)
        finally:
            restore()
        got, expected = float(got), self.coef * float(expected)
        if not abs(got - expected) <= 1e-4 * abs(expected) + 1e-7:
            raise ValueError(
                f"{describe(model)}: the router loss from its body's router logits ({got:.6g}) "
                f"differs from its forward's aux_loss * router_aux_loss_coef ({expected:.6g})"
            )


def _experts(config) -> int | None:
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)


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
