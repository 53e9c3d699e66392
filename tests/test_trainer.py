"""DistillationTrainer and the command line: logging, saving, resume, DDP, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import tiny_llama
from safetensors.torch import load_file

from fastkd.cli import main
from fastkd.training import DistillationTrainer, DistillConfig, Distiller
from fastkd.training.data import load_dataset, stdlib_corpus, train_tokenizer
from fastkd.training.run import training_arguments
from fastkd.training.trainer import EVAL_STATS

BLOCK = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A data file, a tokenizer and a teacher directory, as a user would have them."""
    root = tmp_path_factory.mktemp("ws")
    text = stdlib_corpus(120_000)
    (root / "data.txt").write_text(text)
    tokenizer = train_tokenizer([text], 512)
    teacher = tiny_llama(tokenizer, 48, 2, seed=0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    student_config = tiny_llama(tokenizer, 32, 1, seed=1).config.to_dict()
    (root / "student.json").write_text(json.dumps(student_config))
    return root, tokenizer


def make_trainer(
    root, tokenizer, out, *, steps=6, save_steps=None, callbacks=None, config=None, **options
):
    teacher = transformers.AutoModelForCausalLM.from_pretrained(root / "teacher")
    student = tiny_llama(tokenizer, 32, 2, seed=1)
    train_ds, eval_ds = load_dataset(root / "data.txt", tokenizer, BLOCK, 0.1, 0)
    args = training_arguments(
        out,
        max_steps=steps,
        batch_size=4,
        learning_rate=3e-3,
        seed=0,
        save_steps=save_steps,
        logging_steps=2,
        **options,
    )
    config = config or DistillConfig(feature_weight=0.5, feature_layers="key")
    return DistillationTrainer(
        Distiller(student, teacher, config),
        args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def test_logs_parts_and_saves_a_model_directory(workspace, tmp_path):
    root, tokenizer = workspace
    trainer = make_trainer(root, tokenizer, tmp_path / "run", steps=4)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged
    for h in logged:  # the active parts only: attention distillation is off
        assert {k for k in h if k.startswith("loss_")} == {"loss_kd", "loss_ce", "loss_feature"}
    for h in logged:  # the parts add up to the logged loss
        parts = h["loss_kd"] + h["loss_ce"] + h["loss_feature"]
        assert abs(parts - h["loss"]) < 1e-3 * abs(h["loss"]) + 1e-3, h
    trainer.save_model(str(tmp_path / "final"))
    saved = tmp_path / "final"
    assert (saved / "fastkd_projections.safetensors").is_file()
    assert json.loads((saved / "fastkd_distill_config.json").read_text())["feature_weight"] == 0.5
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    for (name, a), b in zip(
        trainer.distiller.student.state_dict().items(), reloaded.state_dict().values()
    ):
        assert torch.equal(a, b), name
    assert transformers.AutoTokenizer.from_pretrained(saved).vocab_size == tokenizer.vocab_size


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_matches_an_uninterrupted_run(workspace, tmp_path):
    root, tokenizer = workspace
    config = DistillConfig(feature_weight=0.5, feature_layers="key", self_distillation=None)
    full = make_trainer(root, tokenizer, tmp_path / "full", steps=6, config=config)
    full.train()

    first = make_trainer(
        root,
        tokenizer,
        tmp_path / "cut",
        steps=6,
        save_steps=3,
        callbacks=[StopAt(3)],
        config=config,
    )
    first.train()
    assert first.state.global_step == 3 and (tmp_path / "cut" / "checkpoint-3").is_dir()
    resumed = make_trainer(root, tokenizer, tmp_path / "cut", steps=6, save_steps=3, config=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    a = full.distiller.state_dict()
    b = resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # The uninterrupted run moved away from the starting point, so the match is not trivial.
    start = tiny_llama(tokenizer, 32, 2, seed=1).state_dict()
    assert not torch.allclose(a["student.lm_head.weight"], start["lm_head.weight"])


def test_load_best_model_at_end_loads_the_best_checkpoint(workspace, tmp_path):
    root, tokenizer = workspace
    trainer = make_trainer(
        root,
        tokenizer,
        tmp_path / "run",
        steps=4,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="perplexity",
        greater_is_better=True,  # the worse checkpoint, so that it is not simply the last
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(tmp_path / "run" / "checkpoint-2")
    saved = load_file(os.path.join(best, "model.safetensors"))
    for name, value in trainer.distiller.student.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def run_cli(*args, env=None, launcher=None):
    cmd = (launcher or [sys.executable, "-m"]) + ["fastkd", *map(str, args)]
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def distill_args(root, out, batch_size):
    return [
        "distill",
        "--teacher",
        root / "teacher",
        "--student",
        root / "student.json",
        "--data",
        root / "data.txt",
        "--out",
        out,
        "--max-steps",
        4,
        "--batch-size",
        batch_size,
        "--block-size",
        BLOCK,
        "--lr",
        3e-3,
        "--seed",
        0,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one(workspace, tmp_path, sharding):
    """torchrun with 2 CPU processes (gloo), 2 blocks each, against 1 process with 4 blocks:
    the same global batches, so the same trained student within float tolerance; with DDP, and
    with FSDP2 (every model sharded, checked to be really in use by the run's own log line)."""
    root, _ = workspace
    one = run_cli(*distill_args(root, tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29517 + (sharding == "fsdp")),
        "-m",
    ]
    extra = ["--fsdp", "--save_only_model"] if sharding == "fsdp" else []
    two = run_cli(
        *distill_args(root, tmp_path / "two", 2),
        *extra,
        launcher=torchrun,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert ("FSDP2: the student and 1 teacher(s) sharded over 2" in two.stdout) == (
        sharding == "fsdp"
    )
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    ev1 = json.loads((tmp_path / "one" / "eval.json").read_text())
    ev2 = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert abs(ev1["loss"] - ev2["loss"]) < 1e-4


def test_cli_distill_then_eval(workspace, tmp_path, capsys):
    root, _ = workspace
    out = tmp_path / "cli"
    assert main([str(a) for a in distill_args(root, out, 2)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--data",
                str(root / "data.txt"),
                "--block-size",
                str(BLOCK),
                "--eval-fraction",
                "0.05",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval.json").read_text())
    assert metrics == pytest.approx(saved)
    assert 1 < metrics["perplexity"] < 512 and 0 <= metrics["accuracy"] <= 1


def test_cli_config_file_and_flags(workspace, tmp_path):
    root, _ = workspace
    (tmp_path / "kd.yaml").write_text("temperature: 4.0\ndivergence: reverse_kl\nalpha: 0.9\n")
    out = tmp_path / "cfg"
    args = [str(a) for a in distill_args(root, out, 2)]
    assert main([*args, "--config", str(tmp_path / "kd.yaml"), "--alpha", "0.2"]) == 0
    saved = json.loads((out / "fastkd_distill_config.json").read_text())
    assert (saved["temperature"], saved["divergence"], saved["alpha"]) == (4.0, "reverse_kl", 0.2)


def test_cli_errors(workspace, tmp_path, capsys):
    root, _ = workspace
    missing = [
        "distill",
        "--teacher",
        str(tmp_path / "nope"),
        "--student",
        str(root / "student.json"),
        "--data",
        str(root / "data.txt"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(missing) == 2
    assert "error" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    bad_data = [str(a) for a in distill_args(root, tmp_path / "o2", 2)]
    bad_data[bad_data.index("--data") + 1] = str(tmp_path / "bad.jsonl")
    assert main(bad_data) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err
    assert main([*distill_args_str(root, tmp_path / "o3"), "--alpha", "2"]) == 2
    assert "alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(root / "teacher")])  # missing required flags


def distill_args_str(root, out):
    return [str(a) for a in distill_args(root, out, 2)]


def test_python_m_fastkd_help():
    out = run_cli("--help")
    assert out.returncode == 0 and "distill" in out.stdout and "demo" in out.stdout


def test_evaluate_reports_parts_perplexity_and_accuracy(workspace, tmp_path):
    """Trainer.evaluate(): the active parts, and the student's perplexity and accuracy equal to
    fastkd.training.evaluate on the same blocks; a user's compute_metrics is called too."""
    from fastkd.training.evaluate import evaluate

    root, tokenizer = workspace
    seen = []

    def user_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"rows": len(prediction.label_ids)}

    trainer = make_trainer(root, tokenizer, tmp_path / "run", steps=2)
    _, eval_ds = load_dataset(root / "data.txt", tokenizer, BLOCK, 0.1, 0)
    metrics = trainer.evaluate(eval_ds)
    assert {"eval_loss", "eval_kd", "eval_ce", "eval_feature"} <= metrics.keys()
    assert "eval_attention" not in metrics and "eval_aux" not in metrics  # not active
    parts = metrics["eval_kd"] + metrics["eval_ce"] + metrics["eval_feature"]
    assert parts == pytest.approx(metrics["eval_loss"], rel=1e-4)
    expected = evaluate(trainer.distiller.student, eval_ds, batch_size=4)
    assert metrics["eval_tokens"] == expected["tokens"]
    assert metrics["eval_perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)

    with_user = DistillationTrainer(
        trainer.distiller, trainer.args, processing_class=tokenizer, compute_metrics=user_metrics
    )
    metrics = with_user.evaluate(eval_ds)
    assert metrics["eval_rows"] == len(eval_ds)
    assert metrics["eval_perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert seen == [(len(eval_ds), len(EVAL_STATS))]
