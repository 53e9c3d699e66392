"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for distillation.

``shard_distiller`` shards a ``Distiller``: the student's decoder layers and head, the teachers'
layers, heads and bodies (frozen), with the ``Distiller`` as the FSDP root. The fused loss
multiplies hidden states by a model's whole head, so a head that FSDP2 shards is gathered for
it by ``full_weights``, explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from fastkd.training.distiller import Distiller


def is_sharded(module: nn.Module | None) -> bool:
    """Whether ``module`` is an FSDP2 unit (its parameters are DTensor shards between uses)."""
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def full_weights(*modules: nn.Module | None) -> Iterator[None]:
    """Inside the block, every FSDP2-sharded module among ``modules`` holds its full
    parameters; other modules (and ``None``) are left alone.

    The gather is explicit: ``unshard()`` (one all-gather per unit) on entry, ``reshard()``
    (the full copy freed) on exit. Its peak memory per module is one full head, [V, H] in the
    unit's parameter dtype (``MixedPrecisionPolicy.param_dtype``, else the parameters'),
    while the block runs; for a trainable head add its full gradient, [V, H] in the same
    dtype, from the loss's forward until the end of backward, when FSDP reduce-scatters it.

    Gradients: a trainable module's full parameter is the leaf the loss differentiates, so
    its gradient accumulates on it even after the reshard (only the storage of the full weight
    is freed). The FSDP root's end-of-backward callback runs the unit's post-backward, which
    reduce-scatters that gradient onto the sharded parameter once per backward (after any
    gradient accumulation that ``set_requires_gradient_sync(False)`` asks for). Two rules follow:

    - a trainable sharded module must be gathered during its FSDP root's forward (the
      ``Distiller`` after ``shard_distiller``), else nothing reduces its gradient: that is
      an error here;
    - the block's computation must not keep a gathered weight for its backward, because the
      weight's storage is freed on exit. ``fused_linear_kd_loss`` with a scalar reduction
      (``mean``, ``sum``, ``batchmean``) finishes its gradients in the forward and keeps
      none; ``reduction="none"`` recomputes from the weights in backward and is rejected.
    """
    sharded = list(dict.fromkeys(m for m in modules if is_sharded(m)))
    trainable = torch.is_grad_enabled() and [m for m in sharded if _trainable(m)]
    for m in trainable or ():
        # torch 2.13 FSDP2 internals: the root sets iter_forward_root on the state context
        # it shares with every unit of its tree for the length of its forward.
        if m._get_fsdp_state()._state_ctx.iter_forward_root is None:
            raise RuntimeError(
                f"full_weights: the sharded trainable {type(m).__name__} is gathered outside "
                "its FSDP root's forward, so no post-backward would reduce its gradient; "
                "gather it inside the root's forward (shard_distiller makes the Distiller "
                "the root)"
            )
    for m in sharded:
        m.unshard()
    gathered = {p.untyped_storage().data_ptr() for m in sharded for p in m.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() in gathered:
            raise RuntimeError(
                "full_weights: the computation keeps a gathered weight for its backward, but "
                "the weight is freed on exit (fused_linear_kd_loss with reduction='none' "
                "does; use a scalar reduction)"
            )
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for m in sharded:
            m.reshard()


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def shard_distiller(
    distiller: Distiller,
    *,
    mesh: DeviceMesh | None = None,
    shard_head: bool = True,
    shard_teachers: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
) -> Distiller:
    """Shard ``distiller`` in place with FSDP2 and return it. Call it on every rank, after the
    process group is initialized (``torchrun``), before the optimizer is built.

    FSDP units (each all-gathered for its use and resharded after):

    - student: each decoder layer (the classes named by the model's ``_no_split_modules``);
      with ``shard_head``, its output head; the rest (embeddings, final norm, the head
      without ``shard_head``) and the feature projections form the root unit, the
      ``Distiller`` itself, which stays gathered from forward to the end of backward.
    - teachers (``shard_teachers``): each decoder layer, the head, and the body
      (``base_model``) as the teacher's root, all resharded after forward and frozen
      (``requires_grad`` False: no gradients, no optimizer state), so no rank holds a full
      teacher. Teachers are not submodules of the ``Distiller``, so optimizers and
      checkpoints never see them.

    A head tied to its input embedding (one weight) cannot be a unit of its own: it is
    sharded together with the embedding, ``fully_shard([embed, head])``. That unit is
    gathered for the embedding lookup and stays gathered through the body's forward (FSDP
    reshards a unit once all its modules have run, and the head module itself never runs);
    ``full_weights`` releases it after the loss, and the embedding's and the head's gradients
    add up in one reduce-scatter.

    ``mp_policy`` and ``offload_policy`` are handed to every ``fully_shard`` call (e.g.
    ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``,
    ``CPUOffloadPolicy()``). The loss gathers sharded heads with ``full_weights``
    (``Distiller`` does).
    """
    from fastkd.training.distiller import Distiller
    from fastkd.training.models import body

    if not isinstance(distiller, Distiller):
        raise TypeError(f"distiller must be a fastkd Distiller, got {type(distiller).__name__}")
    if is_sharded(distiller):
        raise ValueError("distiller is already sharded (shard_distiller was called on it)")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a MixedPrecisionPolicy, got {type(mp_policy).__name__}")
    if offload_policy is not None and not isinstance(offload_policy, OffloadPolicy):
        raise TypeError(
            f"offload_policy must be an OffloadPolicy, got {type(offload_policy).__name__}"
        )
    if distiller.distill_config.self_distillation == "ema":
        raise ValueError(
            "self_distillation='ema' is not supported with FSDP: its teacher is saved with "
            "every checkpoint, which would need a gather on every process"
        )
    if mesh is None and not dist.is_initialized():
        raise RuntimeError(
            "shard_distiller needs an initialized process group (run under torchrun, or call "
            "torch.distributed.init_process_group first) or a mesh"
        )
    models = [distiller.student, *(distiller.teachers if shard_teachers else ())]
    for model in models:  # check every model before sharding any
        _decoder_layers(model)
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if offload_policy is not None:
        options["offload_policy"] = offload_policy

    if shard_teachers:
        for teacher in distiller.teachers:
            # A teacher has no backward: every unit, its root included, reshards after
            # forward, so only shards stay between uses.
            for layer in _decoder_layers(teacher):
                fully_shard(layer, reshard_after_forward=True, **options)
            fully_shard(_head_unit(teacher), reshard_after_forward=True, **options)
            fully_shard(body(teacher), reshard_after_forward=True, **options)
            _keep_output_capture(body(teacher))
            teacher.requires_grad_(False)
    for layer in _decoder_layers(distiller.student):
        fully_shard(layer, **options)
    if shard_head:
        fully_shard(_head_unit(distiller.student), **options)
    fully_shard(distiller, **options)
    return distiller


def _keep_output_capture(model: nn.Module) -> None:
    """transformers 5 finds what a model can return (hidden states, attentions) by the name
    of its class, which ``fully_shard`` changes (``LlamaModel`` -> ``FSDPLlamaModel``); without
    this a sharded body silently returns no hidden states. Register the new class too."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers to shard (no module of the classes in "
            f"its _no_split_modules, {sorted(names)})"
        )
    return layers


def _head_unit(model: nn.Module) -> nn.Module | list[nn.Module]:
    """The head's FSDP unit: the head, or with tied embeddings the embedding and the head."""
    from fastkd.training.models import Head

    head = Head(model).module
    embed = model.get_input_embeddings()
    if embed is not None and embed.weight is head.weight:
        return [embed, head]
    return head
