"""The demo end to end at toy sizes: every artefact the README promises, with sane values."""

from __future__ import annotations

import json
import math

import pytest
import transformers

from fastkd.training.demo import DemoSettings, run_demo

TINY = DemoSettings(
    corpus_bytes=150_000,
    vocab_size=512,
    block_size=32,
    batch_size=8,
    teacher_steps=8,
    student_steps=6,
    teacher_learning_rate=3e-3,
    student_learning_rate=3e-3,
    curve_points=3,
    curve_blocks=8,
    teacher=dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    student=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
)


@pytest.mark.slow
def test_demo_writes_everything(tmp_path, capsys):
    report = run_demo(tmp_path, settings=TINY)
    printed = capsys.readouterr().out
    assert "student, distilled" in printed and "perplexity" in printed
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    for name in ("teacher", "student_kd", "student_baseline"):
        assert 1 < report[name]["perplexity"] < 2 * TINY.vocab_size
        assert 0 <= report[name]["accuracy"] <= 1
        loss, ppl = report[name]["loss"], report[name]["perplexity"]
        assert math.isclose(math.log(ppl), loss, rel_tol=1e-3)
    acc = report["student_kd"]["accuracy"] / report["teacher"]["accuracy"]
    assert report["retention"] == pytest.approx(acc, abs=1e-3)
    assert report["kd_loss_peak_memory_mb"] > 0 and report["eager_loss_peak_memory_mb"] > 0
    assert report["seconds"] > 0
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    # The plotted quantities: each model's hard-label CE on the same held-out blocks, at
    # steps up to the end of its run, the last one close to the final table's CE.
    curves = report["held_out_ce_curves"]
    assert curves["blocks"] == TINY.curve_blocks
    for name, steps in (
        ("teacher", TINY.teacher_steps),
        ("student_kd", TINY.student_steps),
        ("student_baseline", TINY.student_steps),
    ):
        points = curves[name]
        assert [s for s, _ in points] == sorted({s for s, _ in points})
        assert len(points) >= 2 and points[-1][0] == steps
        assert all(0 < ce < math.log(2 * TINY.vocab_size) for _, ce in points)
        assert points[-1][1] == pytest.approx(report[name]["loss"], rel=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "loss_curves.png",
        "report.json",
        "student_kd",
        "teacher",
        "tokenizer",
    ]
    for name in ("teacher", "student_kd", "tokenizer"):
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / name)  # each dir tokenizes
        assert len(tok) == len(transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer"))
    for name in ("teacher", "student_kd"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert model.config.vocab_size == len(tok)


def test_demo_rejects_bad_arguments_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker, blocker / "demo"):
        with pytest.raises(ValueError, match=r"out: .* is not a directory"):
            run_demo(out, settings=TINY)
    with pytest.raises(TypeError, match="seed must be an int"):
        run_demo(tmp_path / "demo", seed="1", settings=TINY)
    with pytest.raises(TypeError, match="settings must be a DemoSettings"):
        run_demo(tmp_path / "demo", settings=dict(TINY.__dict__))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
