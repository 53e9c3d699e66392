"""Checkpoints survive any kill: a real ``fastkd distill`` killed with SIGKILL while it writes a
checkpoint resumes from the newest complete one to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from fastkd.training.data import stdlib_corpus, train_tokenizer
from fastkd.training.trainer import STAGING_DIR

BLOCK = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    text = stdlib_corpus(60_000)
    (root / "data.txt").write_text(text)
    tokenizer = train_tokenizer([text], 512)
    teacher = tiny_llama(tokenizer, 64, 2, seed=0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    # A student wide enough (~6M parameters, ~70 MB with its optimizer state) that writing a
    # checkpoint takes long enough to be caught in the middle.
    student = tiny_llama(tokenizer, 512, 2).config.to_dict()
    (root / "student.json").write_text(json.dumps(student))
    return root


def distill_command(root, out, *extra):
    args = [
        "distill",
        "--teacher", root / "teacher",
        "--student", root / "student.json",
        "--data", root / "data.txt",
        "--out", out,
        "--max-steps", 6,
        "--save-steps", 2,
        "--batch-size", 2,
        "--block-size", BLOCK,
        "--lr", 1e-3,
        "--seed", 0,
        *extra,
    ]  # fmt: skip
    return [sys.executable, "-m", "fastkd", *map(str, args)]


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_while_writing(cmd, partial) -> None:
    """Start ``cmd`` and SIGKILL it as soon as the directory ``partial`` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 600
    while not partial.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the checkpoint write: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "no checkpoint write seen"
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_to_the_same_weights(workspace, tmp_path):
    root = workspace
    run(distill_command(root, tmp_path / "full"))

    out = tmp_path / "killed"
    kill_while_writing(distill_command(root, out), out / STAGING_DIR / "checkpoint-4")
    # Killed mid-write: the partial checkpoint never became checkpoint-4, the previous one is
    # complete.
    assert (out / STAGING_DIR).is_dir()
    assert not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    at_step_2 = load_file(out / "checkpoint-2" / "model.safetensors")

    run(distill_command(root, out, "--resume"))
    assert not (out / STAGING_DIR).exists()
    assert (out / "checkpoint-6").is_dir()
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(out / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    # The resumed run trained on from step 2, so the match is not trivial.
    assert not torch.allclose(resumed["lm_head.weight"], at_step_2["lm_head.weight"])
