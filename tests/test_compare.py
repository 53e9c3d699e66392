"""fastkd compare: ROUGE-L, retention and gap closed, the study file's errors, and a tiny study
end to end (every method, every output)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import yaml

from fastkd.cli import main
from fastkd.training.compare import (
    DEMO_STUDY,
    OUTPUTS,
    add_derived,
    lcs_length,
    load_study,
    markdown,
    rouge_l,
    run_study,
)
from fastkd.training.data import stdlib_corpus

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compare.yaml"


# ---------------------------------------------------------------- ROUGE-L


def _lcs_brute(a, b) -> int:
    """The longest subsequence of ``a`` that is also one of ``b``, by enumeration."""

    def is_subsequence(s, t) -> bool:
        it = iter(t)
        return all(x in it for x in s)

    for n in range(min(len(a), len(b)), 0, -1):
        if any(is_subsequence(s, b) for s in itertools.combinations(a, n)):
            return n
    return 0


def test_lcs_matches_enumeration():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(4) for _ in range(rng.randrange(8))]
        b = [rng.randrange(4) for _ in range(rng.randrange(8))]
        assert lcs_length(a, b) == _lcs_brute(a, b) == lcs_length(b, a), (a, b)


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ([1, 2, 3], [1, 2, 3], 1.0),
        ([1, 2, 3], [4, 5], 0.0),
        ([1, 2, 3, 4], [1, 3, 4, 5], 0.75),  # LCS 1 3 4: P = R = 3/4
        ([1, 2], [1, 2, 3, 4], 2 / 3),  # P = 1, R = 1/2
        ([3, 2, 1], [1, 2, 3], 1 / 3),  # order matters: LCS 1
        ([], [], 1.0),
        ([], [1], 0.0),
        ([1], [], 0.0),
    ],
)
def test_rouge_l(candidate, reference, expected):
    assert rouge_l(candidate, reference) == pytest.approx(expected)


# ---------------------------------------------------------------- derived columns


def test_gap_closed_and_retention():
    teacher = {"perplexity": 100.0, "accuracy": 0.4}
    rows = [
        {"method": "hard", "perplexity": 200.0, "accuracy": 0.2},
        {"method": "kd", "perplexity": 150.0, "accuracy": 0.3},
        {"method": "worse", "perplexity": 250.0, "accuracy": 0.1},
    ]
    add_derived(rows, teacher, "hard")
    assert [r["gap_closed"] for r in rows] == [0.0, 0.5, -0.5]
    assert [r["ppl_retention"] for r in rows] == [0.5, pytest.approx(0.6667, abs=1e-4), 0.4]
    assert [r["accuracy_retention"] for r in rows] == [0.5, 0.75, 0.25]
    # A baseline as good as the teacher leaves no gap to close.
    rows = [{"method": "hard", "perplexity": 90.0, "accuracy": 0.5}]
    add_derived(rows, teacher, "hard")
    assert rows[0]["gap_closed"] is None


# ---------------------------------------------------------------- the study file

TINY_TEACHER = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
TINY_STUDENT = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compare") / "data.txt"
    path.write_text(stdlib_corpus(60_000))
    return path


def tiny_study(data_file: Path, **methods) -> dict:
    return {
        "seed": 0,
        "data": str(data_file),
        "block_size": 32,
        "teacher": {"sizes": TINY_TEACHER, "steps": 10, "vocab_size": 300},
        "student": {"sizes": TINY_STUDENT},
        "steps": 4,
        "batch_size": 4,
        "prompts": {
            "count": 4,
            "prompt_tokens": 8,
            "max_new_tokens": 8,
            "train_count": 16,
            "batch_size": 8,
        },
        "methods": methods
        or {"hard": {"alpha": 1.0}, "vanilla": {"alpha": 0.5, "temperature": 1.0}},
    }


def test_example_is_the_demo_study():
    assert yaml.safe_load(EXAMPLE.read_text()) == DEMO_STUDY
    study = load_study(EXAMPLE)
    assert [m.name for m in study.methods] == list(DEMO_STUDY["methods"])
    assert load_study(DEMO_STUDY).to_dict() == study.to_dict()
    quick = study.quick()
    assert quick.steps == study.steps // 4 and quick.teacher.steps == study.teacher.steps // 4


def test_which_methods_use_the_teacher(data_file):
    study = load_study(
        tiny_study(
            data_file,
            hard={"alpha": 1.0},
            seq={"alpha": 1.0, "data": "generated"},
            kd={},
            feature={"alpha": 1.0, "feature_weight": 0.5},
            on_policy={"alpha": 0.5, "on_policy_fraction": 0.5},
        )
    )
    uses = {m.name: m.uses_teacher for m in study.methods}
    assert uses == {"hard": False, "seq": False, "kd": True, "feature": True, "on_policy": True}


def _set(study: dict, path: str, value) -> dict:
    study = copy.deepcopy(study)
    *parents, last = path.split(".")
    node = study
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return study


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("epochs", 3, r"unknown keys \['epochs'\]"),
        ("teacher.layers", 3, r"teacher: unknown keys \['layers'\]"),
        ("student.sizes.vocab_size", 300, r"student.sizes: unknown keys \['vocab_size'\]"),
        ("prompts.top_k", 5, r"prompts: unknown keys \['top_k'\]"),
        ("methods.hard.tempreature", 2, r"methods.hard: unknown keys \['tempreature'\]"),
        ("methods.hard.seed", 1, r"methods.hard: unknown keys \['seed'\]"),
        ("methods.hard.alpha", 2.0, r"methods.hard: alpha"),
        ("methods.hard.init", "distilled", r"methods.hard.init must be one of"),
        ("methods.hard.data", "web", r"methods.hard.data must be one of"),
        ("methods", {}, "methods must be a non-empty mapping"),
        ("baseline", "nope", "baseline 'nope' is not a method"),
        ("steps", 0, "steps must be an int >= 1"),
        ("steps", _DELETE, r"missing \['steps'\]"),
        ("learning_rate", -1, "learning_rate must be a number > 0"),
        ("eval_fraction", 1.5, r"eval_fraction must be in \(0, 1\)"),
        ("corpus_bytes", 1000, "corpus_bytes applies to data: demo only"),
        ("prompts.max_new_tokens", 30, "exceed block_size 32"),
        ("prompts.temperature", -1, "prompts.temperature must be a number >= 0"),
        ("prompts.top_p", 0, r"prompts.top_p must be in \(0, 1\]"),
        ("student.sizes.num_attention_heads", 5, "not a multiple of num_attention_heads"),
        ("student.sizes", {"hidden_size": 24}, r"student.sizes: missing \["),
        ("teacher.dir", "models/t", "either dir .* or sizes"),
    ],
)
def test_study_errors(data_file, path, value, message):
    study = tiny_study(data_file, hard={"alpha": 1.0})
    with pytest.raises(ValueError, match=message):
        load_study(_set(study, path, value))


def test_study_file_errors(data_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt"):
        load_study(tiny_study(tmp_path / "nowhere.txt"))
    study = tiny_study(data_file)
    study["teacher"] = {"dir": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_study(study)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**tiny_study(data_file), "typo": 1}))
    with pytest.raises(ValueError, match=rf"{path}: unknown keys \['typo'\]"):
        load_study(path)


def test_a_teacher_directory_round_trips(data_file, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    study = load_study({**tiny_study(data_file), "teacher": {"dir": str(tmp_path)}})
    assert study.to_dict()["teacher"] == {"dir": str(tmp_path)}
    assert load_study(study.to_dict()) == study
    with pytest.raises(ValueError, match=r"teacher.dir is a trained teacher; drop \['steps'\]"):
        load_study({**tiny_study(data_file), "teacher": {"dir": str(tmp_path), "steps": 5}})


def test_pruned_init_must_reach_the_student(data_file):
    # Pruning keeps the teacher's head size (48 / 4 = 12); the student's is 24 / 4 = 6.
    study = tiny_study(data_file, hard={"alpha": 1.0}, pruned={"init": "pruned"})
    study["student"]["sizes"] = {**TINY_STUDENT, "num_attention_heads": 4, "num_key_value_heads": 4}
    with pytest.raises(ValueError, match="teacher's head size 12; the student's is 6"):
        load_study(study)
    study["student"]["sizes"] = {**TINY_STUDENT, "num_hidden_layers": 3}
    with pytest.raises(ValueError, match=r"larger than the teacher in \['num_hidden_layers'\]"):
        load_study(study)


def test_cli_rejects_a_bad_study_before_training(data_file, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_set(tiny_study(data_file), "methods.hard.init", "x")))
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "fastkd compare: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["compare", "--demo", "--config", str(path)])  # one study or the other


# ---------------------------------------------------------------- end to end


def test_every_method_end_to_end(data_file, tmp_path):
    pytest.importorskip("fastkd.training.generate")
    pytest.importorskip("fastkd.training.prune")
    methods = {
        "hard": {"alpha": 1.0},
        "vanilla": {"alpha": 0.5, "temperature": 1.0},
        "feature": {"alpha": 0.5, "feature_weight": 1.0},
        "seq_kd": {"alpha": 1.0, "data": "generated"},
        "on_policy": {"on_policy_fraction": 1.0, "divergence": "reverse_kl"},
        "pruned": {"alpha": 0.5, "init": "pruned"},
    }
    study = load_study(tiny_study(data_file, **methods))
    work = tmp_path / "work"
    report = run_study(study, tmp_path / "out", work=work, memory=False)

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUTS)
    assert json.loads((tmp_path / "out" / "compare.json").read_text()) == report
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000
    table = (tmp_path / "out" / "compare.md").read_text()
    assert table == markdown(report)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == list(methods)
    t = report["teacher"]
    hard = rows["hard"]["perplexity"]
    for name, r in rows.items():
        assert f"| {name} |" in table
        assert 1 < r["perplexity"] < 2 * 300 and 0 <= r["accuracy"] <= 1
        assert 0 <= r["rouge_l"] <= 1 and r["train_seconds"] > 0
        assert r["ppl_retention"] == pytest.approx(t["perplexity"] / r["perplexity"], abs=1e-3)
        gap = (hard - r["perplexity"]) / (hard - t["perplexity"])
        assert r["gap_closed"] == pytest.approx(gap, abs=1e-3)
    assert rows["hard"]["gap_closed"] == 0
    # Each method ran as asked: the teacher's generations, the student's samples on every
    # batch, the pruned teacher as the start.
    assert rows["seq_kd"]["generate_seconds"] > 0 and report["blocks"]["generated"] > 0
    assert len((work / "generated.jsonl").read_text().splitlines()) == 16
    assert rows["on_policy"]["on_policy_batches"] == study.steps
    assert rows["pruned"]["prune_seconds"] > 0 and (work / "pruned" / "config.json").is_file()
    assert 1 < report["pruned_init"]["perplexity"] < 2 * 300
    assert f"held-out ppl {report['pruned_init']['perplexity']:.2f}" in table
    assert not rows["hard"]["teacher_in_loss"] and not rows["seq_kd"]["teacher_in_loss"]
    # Same init, data, seed and batches: the hard-label student is reproducible.
    again = run_study(
        load_study(tiny_study(data_file, hard={"alpha": 1.0})), tmp_path / "again", memory=False
    )
    assert again["rows"][0]["perplexity"] == hard
    assert again["teacher"]["perplexity"] == t["perplexity"]


@pytest.mark.slow
def test_cli_with_memory(data_file, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_study(data_file)))
    out = tmp_path / "out"
    assert main(["compare", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vanilla" in printed and "wrote" in printed
    report = json.loads((out / "compare.json").read_text())
    assert all(r["step_peak_memory_mb"] > 0 for r in report["rows"])
    assert all(math.isfinite(r["perplexity"]) for r in report["rows"])
    assert "step peak MiB" in (out / "compare.md").read_text()
