"""``fastkd distill`` configuration: one flat YAML/JSON file for the three groups of settings
(RunArguments, DistillConfig, TrainingArguments), flags over the file, and the shipped example."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fastkd.cli import parse_distill_args
from fastkd.training.config import DistillConfig, RunArguments, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill.yaml"
REQUIRED = ["--student", "s", "--data", "d", "--out", "o"]


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_distill_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastkd distill")
    return err.strip().splitlines()[-1]


def test_the_example_config_parses():
    run, config, args = parse_distill_args(["--config", str(EXAMPLE)])
    assert run.teacher == ["models/teacher-1b", "models/teacher-3b"]
    assert (run.student, run.block_size, run.lora_r, run.merge_adapters) == (
        "models/student-300m",
        1024,
        16,
        True,
    )
    assert run.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (config.divergence, config.alpha, config.vocab, config.feature_layers) == (
        "jsd",
        0.3,
        "truncate",
        "key",
    )
    assert config.teacher_weights == [0.4, 0.6] and config.seed == 3
    assert (args.output_dir, args.max_steps, args.gradient_accumulation_steps) == (
        "runs/student-300m",
        2000,
        4,
    )
    assert args.learning_rate == 2e-4 and args.warmup_steps == 100
    assert args.report_to == ["tensorboard"] and args.eval_strategy == "steps"
    assert (args.seed, args.data_seed) == (3, 3)


def test_the_fsdp_example_parses():
    """`fsdp: true` in a file is the bare `--fsdp` flag (its value is optional)."""
    run, config, args = parse_distill_args(["--config", str(EXAMPLE.with_name("fsdp.yaml"))])
    assert run.teacher == ["models/teacher-1b"] and config.alpha == 0.3
    assert args.fsdp and not args.save_only_model and args.gradient_accumulation_steps == 2
    assert args.fsdp_config["cpu_offload"] is False
    _, _, args = parse_distill_args([*REQUIRED, "--fsdp"])
    assert args.fsdp


def test_every_key_of_the_example_is_a_field_of_one_group():
    import transformers

    fields = {
        f.name
        for cls in (RunArguments, DistillConfig, transformers.TrainingArguments)
        for f in dataclasses.fields(cls)
    }
    assert set(load_settings(EXAMPLE)) <= fields


def test_flags_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "teacher: [t1, t2]\nstudent: s\ndata: d\noutput_dir: o\n"
        "temperature: 4.0\nalpha: 0.9\nmax_steps: 7\nfeature_layers: [1, 3]\n"
    )
    run, config, args = parse_distill_args(
        ["--config", str(path), "--alpha", "0.2", "--teacher", "t3", "--max-steps", "9"]
    )
    assert run.teacher == ["t3"]  # replaced, not appended to the file's
    assert (config.temperature, config.alpha, config.feature_layers) == (4.0, 0.2, [1, 3])
    assert (args.max_steps, args.output_dir) == (9, "o")


def test_json_file_with_null_dict_and_bool_values(tmp_path):
    path = tmp_path / "run.json"
    settings = {
        "student": "s",
        "data": "d",
        "output_dir": "o",
        "vocab": None,
        "lr_scheduler_kwargs": {"num_cycles": 2},
        "bf16": False,
        "remove_unused_columns": True,
        "teacher": ["t"],
        "attention_layers": "all",
    }
    path.write_text(json.dumps(settings))
    _, config, args = parse_distill_args(["--config", str(path)])
    assert config.vocab is None and config.attention_layers == "all"
    assert args.lr_scheduler_kwargs == {"num_cycles": 2}
    assert args.bf16 is False and args.remove_unused_columns is True


def test_unknown_keys_are_named(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("student: s\ntemprature: 3\nlearning_rat: 1\n")
    err = parse_error(capsys, ["--config", str(path), *REQUIRED])
    assert str(path) in err and "unknown settings ['learning_rat', 'temprature']" in err


def test_bad_values_in_the_file_name_the_file_and_the_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: many\n")
    err = parse_error(capsys, ["--config", str(path), *REQUIRED])
    assert str(path) in err and "--max_steps" in err and "'many'" in err
    path.write_text("divergence: kld\n")
    err = parse_error(capsys, ["--config", str(path), *REQUIRED])
    assert "--divergence" in err and "invalid choice: 'kld'" in err


def test_required_settings_may_come_from_the_file_or_the_flags(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("student: s\ndata: d\n")
    assert "--out is required" in parse_error(capsys, ["--config", str(path)])
    run, _, args = parse_distill_args(["--config", str(path), "--out", "o"])
    assert (run.student, args.output_dir) == ("s", "o")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: [1,\n", "invalid YAML"),
        ("- 1\n- 2\n", "expected a mapping of settings, got list"),
    ],
)
def test_load_settings_errors(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as exc:
        load_settings(path)
    assert str(path) in str(exc.value)
    with pytest.raises(ValueError, match=r"must be \.yaml, \.yml or \.json"):
        load_settings(tmp_path / "c.toml")
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(ValueError, match=r"c\.json: invalid JSON"):
        load_settings(tmp_path / "c.json")


def test_distill_config_python_api_is_unchanged_by_the_parser(tmp_path):
    before = {f.name: f.type for f in dataclasses.fields(DistillConfig)}
    parse_distill_args([*REQUIRED, "--feature_layers", "2", "4"])
    assert {f.name: f.type for f in dataclasses.fields(DistillConfig)} == before
    assert DistillConfig(feature_layers=[1, 3]).feature_layers == [1, 3]
    assert DistillConfig(attention_layers="key").attention_layers == "key"
    path = tmp_path / "c.yaml"
    path.write_text("feature_layers: [2, 4]\nteacher_weights: [1, 3]\n")
    config = DistillConfig.from_file(path)
    assert (config.feature_layers, config.teacher_weights) == ([2, 4], [1, 3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "cuad"}, "backend must be one of"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
        ({"memory_budget": 1.5}, "memory_budget must be an int >= 1"),
        ({"feature_layers": [0, 2]}, "feature_layers must be one of"),
        ({"attention_layers": "first"}, "attention_layers must be one of"),
    ],
)
def test_distill_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 1}, "block_size must be an int >= 2"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \(0, 1\)"),
        ({"lora_r": 0}, "lora_r must be an int >= 1"),
        ({"lora_r": 4, "lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"lora_r": 4, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_r": 4, "lora_target_modules": []}, "at least one module"),
        ({"merge_adapters": True}, "merge_adapters needs lora_r"),
        ({"lora_target_modules": ["q_proj"]}, "lora_target_modules needs lora_r"),
    ],
)
def test_run_arguments_reject(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunArguments(**kwargs)


def test_teacher_cache_and_tail_flags():
    """Both spellings of --teacher_cache (HfArgumentParser adds the dashed one), and tail."""
    for flag in ("--teacher_cache", "--teacher-cache"):
        run, config, _ = parse_distill_args([*REQUIRED, flag, "cache", "--tail", "renormalize"])
        assert (run.teacher_cache, run.teacher, config.tail) == ("cache", [], "renormalize")
    run, config, _ = parse_distill_args(REQUIRED)
    assert run.teacher_cache is None and config.tail == "bucket"


def test_tail_is_checked(capsys):
    with pytest.raises(ValueError, match=r"tail must be one of \('bucket', 'renormalize', 'igno"):
        DistillConfig(tail="drop")
    assert "argument --tail: invalid choice: 'drop'" in parse_error(
        capsys, [*REQUIRED, "--tail", "drop"]
    )
