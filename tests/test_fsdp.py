"""FSDP2 (``shard_distiller``, ``full_weights``, ``DistillationTrainer`` with ``fsdp``): 2 CPU
processes (gloo) against 1 process.

One spawn of 2 workers runs every sharding layout; each worker trains its half of the batch
and rank 0 writes the loss, the gradients and the parameters after one optimizer step,
gathered to full tensors, with what it observed about the sharding. The tests compare those
with the same Distiller run unsharded on the whole batch in this process.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fastkd.training import DistillationTrainer, DistillConfig, Distiller
from fastkd.training.fsdp import full_weights, is_sharded, shard_distiller
from fastkd.training.run import training_arguments
from fastkd.training.trainer import OPTIMIZER_SHARDS, STAGING_DIR

VOCAB = 301  # odd: the heads' rows do not split evenly over 2 ranks
LAYOUTS = {
    "student": dict(shard_head=False, shard_teachers=False),
    "head": dict(shard_head=True, shard_teachers=False),
    "teacher": dict(shard_head=True, shard_teachers=True),
    "tied": dict(shard_head=True, shard_teachers=True),
}
LR = 0.1


def llama(seed: int, hidden: int, tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
    )


def make_distiller(
    layout: str, config: DistillConfig | None = None, student_seed: int = 1
) -> Distiller:
    tied = layout == "tied"
    # Teacher wider than the student: feature projections (root parameters) are trained too.
    config = config or DistillConfig(feature_weight=0.5, feature_layers="key", alpha=0.3)
    return Distiller(llama(student_seed, 32, tied), llama(0, 48, tied), config)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.full_tensor() if isinstance(t, DTensor) else t


def one_step(distiller: Distiller, input_ids: torch.Tensor) -> dict:
    """Loss and gradients of one batch, then the parameters after one SGD step."""
    optimizer = torch.optim.SGD(distiller.parameters(), lr=LR)
    out = distiller(input_ids)
    out.loss.backward()
    loss = out.loss.detach().clone()
    if dist.is_initialized():  # each rank's loss is the mean over its half of the batch
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    grads = {n: full(p.grad) for n, p in distiller.named_parameters()}
    optimizer.step()
    params = {n: full(p.detach()) for n, p in distiller.named_parameters()}
    return {"loss": loss, "grads": grads, "params": params}


def observe(distiller: Distiller) -> dict:
    """What the sharding looks like on this rank."""
    student = distiller.student
    teachers = distiller.teachers
    t_params = [p for t in teachers for p in t.parameters()]
    return {
        "root": isinstance(distiller, FSDPModule),
        "layers": all(isinstance(layer, FSDPModule) for layer in student.model.layers),
        "head": is_sharded(student.lm_head),
        "student_dtensor": all(isinstance(p, DTensor) for p in distiller.parameters()),
        "teacher_dtensor": all(isinstance(p, DTensor) for p in t_params),
        "teacher_local": sum(p.to_local().numel() for p in t_params if isinstance(p, DTensor)),
        "teacher_full": sum(p.numel() for p in t_params),
        "teacher_frozen": all(not p.requires_grad and p.grad is None for p in t_params),
        "tied": student.lm_head.weight is student.get_input_embeddings().weight,
    }


def misuse(distiller: Distiller) -> dict:
    """The two ways ``full_weights`` refuses to lose a gradient; returns the messages."""
    errors = {}
    head = distiller.student.lm_head
    if is_sharded(head):  # trainable, gathered outside the root's forward
        try:
            with full_weights(head):
                pass
        except RuntimeError as e:
            errors["outside_forward"] = str(e)
    t_head = distiller.teachers[0].lm_head
    if is_sharded(t_head):  # a weight kept for backward would be freed on exit
        x = torch.ones(2, t_head.in_features, requires_grad=True)
        try:
            with full_weights(t_head):
                x @ t_head.weight.t()
        except RuntimeError as e:
            errors["saved_weight"] = str(e)
    return errors


def worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    try:
        for layout, options in LAYOUTS.items():
            distiller = shard_distiller(make_distiller(layout), **options)
            seen = observe(distiller)
            rows = batch()[2 * rank : 2 * rank + 2]
            results[layout] = {**one_step(distiller, rows), "seen": seen}
            results[layout]["errors"] = misuse(distiller)
        if rank == 0:
            torch.save(results, out)
        # Gloo's barrier waits for every pending collective: no rank tears its process group
        # down while the other still talks to it (which can abort the first with SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(str(tmp / "store"), str(tmp / "out.pt")), nprocs=2)
    return torch.load(tmp / "out.pt", weights_only=False)


def assert_matches_one_process(layout: str, run: dict) -> None:
    ref = one_step(make_distiller(layout), batch())
    torch.testing.assert_close(run["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    assert run["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert run["grads"][name] is not None, f"{name}: no gradient reached the shard"
        torch.testing.assert_close(run["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, p in ref["params"].items():  # one SGD step on the shards = one on the whole
        torch.testing.assert_close(run["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_student_sharding_matches_one_process(sharded_runs):
    run = sharded_runs["student"]
    seen = run["seen"]
    assert seen["root"] and seen["layers"] and seen["student_dtensor"]
    assert not seen["head"] and not seen["teacher_dtensor"]  # the head is in the root unit
    assert_matches_one_process("student", run)


@pytest.mark.slow
def test_head_sharding_matches_one_process(sharded_runs):
    run = sharded_runs["head"]
    seen = run["seen"]
    assert seen["root"] and seen["layers"] and seen["head"] and seen["student_dtensor"]
    assert not seen["teacher_dtensor"]
    assert "outside its FSDP root's forward" in run["errors"]["outside_forward"]
    assert_matches_one_process("head", run)


@pytest.mark.slow
def test_teacher_sharding_matches_one_process(sharded_runs):
    run = sharded_runs["teacher"]
    seen = run["seen"]
    assert seen["head"] and seen["student_dtensor"] and seen["teacher_dtensor"]
    # No rank holds the full teacher: its shards are about half of it (uneven rows round up).
    assert seen["teacher_local"] <= 0.53 * seen["teacher_full"]
    assert seen["teacher_frozen"]
    assert "keeps a gathered weight" in run["errors"]["saved_weight"]
    assert_matches_one_process("teacher", run)


@pytest.mark.slow
def test_tied_heads_shard_with_their_embedding(sharded_runs):
    run = sharded_runs["tied"]
    seen = run["seen"]
    # The tied weight stays one parameter, sharded once; the embedding's and the loss's
    # gradients add up on it.
    assert seen["tied"] and seen["head"] and seen["student_dtensor"] and seen["teacher_dtensor"]
    assert_matches_one_process("tied", run)


def test_shard_distiller_rejects_bad_input():
    distiller = make_distiller("student")
    with pytest.raises(TypeError, match="distiller must be a fastkd Distiller"):
        shard_distiller(distiller.student)
    with pytest.raises(TypeError, match="mp_policy must be a MixedPrecisionPolicy"):
        shard_distiller(distiller, mp_policy=torch.bfloat16)
    with pytest.raises(RuntimeError, match="initialized process group"):
        shard_distiller(distiller)
    ema = Distiller(llama(1, 32, False), None, DistillConfig(self_distillation="ema"))
    with pytest.raises(ValueError, match="'ema' is not supported with FSDP"):
        shard_distiller(ema)


def test_full_weights_leaves_unsharded_modules_alone():
    head = torch.nn.Linear(4, 3)
    with full_weights(head, None):
        assert not is_sharded(head) and head.weight.shape == (3, 4)


def train(
    out, batch_size: int, *, student_seed: int = 1, resume: str | None = None, **options
) -> DistillationTrainer:
    """4 AdamW steps of DistillationTrainer on 32 random sequences (resumed from the
    checkpoint ``resume`` if given); the student saved in ``out``."""
    rows = torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": r} for r in rows]
    args = training_arguments(
        out, max_steps=4, batch_size=batch_size, learning_rate=1e-2, seed=0, **options
    )
    distiller = make_distiller("teacher", DistillConfig(alpha=0.3), student_seed)
    trainer = DistillationTrainer(distiller, args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


def trainer_worker(rank: int, port: int, root: str) -> None:
    """The sharded runs compared with 1 process (``root/one``, written before): 2 processes
    × 2 sequences with a checkpoint at step 2 (``full``); a fresh Distiller, its student
    initialized differently, resumed from that checkpoint (``resumed``); 2 processes × 1
    sequence × 2 accumulated micro-batches (``accumulated``); and a sharded run asked to
    resume the 1-process checkpoint, and to load a student that lacks a weight."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    quiet = dict(fsdp=True, disable_tqdm=True)
    wrapped = train(f"{root}/full", 2, save_steps=2, **quiet).model_wrapped
    resumed = train(
        f"{root}/resumed", 2, student_seed=7, resume=f"{root}/full/checkpoint-2", **quiet
    )
    train(f"{root}/accumulated", 1, gradient_accumulation_steps=2, save_strategy="no", **quiet)
    try:
        train(f"{root}/cross", 2, resume=f"{root}/one/checkpoint-2", save_strategy="no", **quiet)
        cross = None
    except ValueError as e:
        cross = str(e)
    if rank == 0:
        state = load_file(f"{root}/full/model.safetensors")
        del state["model.norm.weight"]
        os.makedirs(f"{root}/bad")
        save_file(state, f"{root}/bad/model.safetensors")
    dist.barrier()
    try:
        resumed.distiller.load_weights(f"{root}/bad")
        mismatch = None
    except RuntimeError as e:
        mismatch = str(e)
    if rank == 0:  # what the Trainer trained: the sharded Distiller itself, not a DDP wrapper
        seen = {
            "wrapped": type(wrapped).__name__,
            "sharded": is_sharded(wrapped),
            "resumed_step": resumed.state.global_step,
            "cross": cross,
            "mismatch": mismatch,
        }
        torch.save(seen, f"{root}/seen.pt")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_trainer")
    train(root / "one", 4, save_steps=2)
    port = 29600 + os.getpid() % 300
    mp.spawn(trainer_worker, args=(port, str(root)), nprocs=2)
    return root, torch.load(root / "seen.pt")


def assert_same_student(a, b, rtol: float, atol: float) -> None:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.slow
def test_trainer_fsdp_matches_one_process(trainer_runs):
    """DistillationTrainer with ``fsdp=True`` on 2 CPU processes shards the Distiller itself
    (accelerate would fall back to DDP on CPU) and trains the same student as 1 process."""
    root, seen = trainer_runs
    assert (seen["wrapped"], seen["sharded"]) == ("FSDPDistiller", True)
    assert_same_student(root / "one", root / "full", rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trainer_fsdp_resumes_to_the_uninterrupted_run(trainer_runs):
    root, seen = trainer_runs
    checkpoint = root / "full" / "checkpoint-2"
    # The whole state to resume: the gathered student, each process's optimizer shard (DCP),
    # the schedule, each process's RNG state, the trainer state; published atomically.
    assert (checkpoint / OPTIMIZER_SHARDS / ".metadata").is_file()
    assert len(list((checkpoint / OPTIMIZER_SHARDS).glob("*.distcp"))) == 2
    for name in ("model.safetensors", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        assert (checkpoint / name).is_file(), name
    assert not (root / "full" / STAGING_DIR).exists()
    assert seen["resumed_step"] == 4
    # Weights, optimizer moments and learning rate all came back: the resumed student (from
    # another initialization) ends where the uninterrupted run does.
    assert_same_student(root / "full", root / "resumed", rtol=1e-6, atol=1e-7)
    assert_same_student(root / "one", root / "resumed", rtol=1e-4, atol=1e-6)
    at_step_2 = load_file(checkpoint / "model.safetensors")["lm_head.weight"]
    assert not torch.allclose(
        at_step_2, load_file(root / "full" / "model.safetensors")["lm_head.weight"]
    )


@pytest.mark.slow
def test_trainer_fsdp_accumulates_gradients(trainer_runs):
    """2 processes × 1 sequence × 2 accumulated micro-batches = 1 process × 4 sequences: the
    micro-batch gradients stay unsharded until the last one reduce-scatters their sum."""
    root, _ = trainer_runs
    assert_same_student(root / "one", root / "accumulated", rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trainer_fsdp_checkpoints_do_not_mix(trainer_runs, tmp_path):
    """A sharded run cannot load an unsharded run's optimizer state, nor the reverse, nor
    weights that do not match its student: a clear error on every process, before any load."""
    root, seen = trainer_runs
    assert "written by an unsharded run" in seen["cross"]
    assert "missing ['student.model.norm.weight'], unexpected []" in seen["mismatch"]
    with pytest.raises(ValueError, match="written by a sharded"):
        train(tmp_path, 4, resume=str(root / "full" / "checkpoint-2"), save_strategy="no")


def test_trainer_fsdp_errors(tmp_path):
    with pytest.raises(ValueError, match="fsdp needs a distributed run"):
        train(tmp_path, 2, fsdp=True, save_strategy="no")
