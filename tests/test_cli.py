"""The command line: a fast top-level help, the distill parser (every flag, the old spellings),
bad arguments rejected before any model loads, tokenizer agreement, one held-out split."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import transformers
from conftest import tiny_llama

import fastkd
from fastkd.cli import main, parse_distill_args
from fastkd.training import run as run_module
from fastkd.training.data import stdlib_corpus, train_tokenizer

BLOCK = 32


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Data, a teacher with its tokenizer, a student config, and a student directory whose
    tokenizer was trained on other text."""
    root = tmp_path_factory.mktemp("cli")
    text = stdlib_corpus(40_000)
    (root / "data.txt").write_text(text)
    tokenizer = train_tokenizer([text], 300)
    teacher = tiny_llama(tokenizer, 32, 2)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "student.json").write_text(json.dumps(tiny_llama(tokenizer).config.to_dict()))
    other = train_tokenizer(["zebra quokka " * 200 + text[::-1][:20_000]], 300)
    tiny_llama(other).save_pretrained(root / "student_other")
    other.save_pretrained(root / "student_other")
    return root


def distill_argv(root, out, *extra):
    return [
        "distill",
        "--teacher", root / "teacher",
        "--student", root / "student.json",
        "--data", root / "data.txt",
        "--out", out,
        "--max-steps", 2,
        "--batch-size", 2,
        "--block-size", BLOCK,
        *extra,
    ]  # fmt: skip


def run_main(argv) -> int:
    return main([str(a) for a in argv])


# ---------------------------------------------------------------- top level


def test_top_level_help_imports_no_torch_and_is_fast():
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from fastkd.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "print(time.perf_counter() - start, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "distill" in done.stdout and "check-gpu" in done.stdout
    seconds, torch_loaded, transformers_loaded = done.stdout.split()[-3:]
    assert (torch_loaded, transformers_loaded) == ("False", "False")
    assert float(seconds) < 2.0
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "fastkd", "--help"], capture_output=True, timeout=60
    )
    assert out.returncode == 0 and time.perf_counter() - start < 5.0


def test_top_level_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distil"])
    assert "invalid choice: 'distil'" in capsys.readouterr().err


def test_distill_help_lists_every_group(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--teacher",
        "--lora_r",
        "--allow_tokenizer_mismatch",
        "--vocab {truncate,pad}",
        "--feature_layers",
        "--gradient_accumulation_steps",
        "--report_to",
        "--eval_strategy",
        "--config FILE",
        "--out DIR",
    ):
        assert flag in text, flag


# ---------------------------------------------------------------- the distill parser


def test_old_spellings_and_fastkd_defaults():
    run, config, args = parse_distill_args(
        [
            "--teacher", "t1", "--teacher", "t2", "--student", "s", "--data", "d",
            "--out", "o", "--max-steps", "40", "--batch-size", "4", "--lr", "3e-3",
            "--seed", "3", "--bf16", "--temperature", "3", "--alpha", "0.25",
            "--teacher-weight", "1", "--teacher-weight", "3", "--block-size", "64",
            "--eval-fraction", "0.1", "--resume",
        ]
    )  # fmt: skip
    assert run.teacher == ["t1", "t2"] and (run.block_size, run.eval_fraction) == (64, 0.1)
    assert (config.temperature, config.alpha, config.teacher_weights) == (3.0, 0.25, [1.0, 3.0])
    assert config.seed == args.seed == args.data_seed == 3  # one seed
    assert (args.output_dir, args.max_steps, args.learning_rate, args.bf16) == ("o", 40, 3e-3, True)
    assert args.per_device_train_batch_size == args.per_device_eval_batch_size == 4
    assert args.resume_from_checkpoint == run_module.RESUME_LAST
    assert (args.warmup_steps, args.save_steps) == (2, 40)  # 5% of the steps; one at the end
    assert args.lr_scheduler_type == "cosine" and args.weight_decay == 0.01
    assert args.report_to == []  # "none" unless asked
    assert args.disable_tqdm is False  # the progress bar is on
    assert args.remove_unused_columns is False


def test_defaults_and_every_trainer_knob():
    _, config, args = parse_distill_args(["--student", "s", "--data", "d", "--output_dir", "o"])
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate) == (100, 8, 1e-3)
    assert config.seed == args.seed == 0 and config == fastkd.training.DistillConfig()
    _, _, args = parse_distill_args(
        [
            "--student", "s", "--data", "d", "--out", "o", "--gradient_accumulation_steps", "4",
            "--logging_steps", "3", "--save_steps", "5", "--report_to", "tensorboard",
            "--per_device_eval_batch_size", "16", "--warmup_steps", "0", "--resume", "ckpt",
        ]
    )  # fmt: skip
    assert (args.gradient_accumulation_steps, args.logging_steps, args.save_steps) == (4, 3, 5)
    assert args.report_to == ["tensorboard"] and args.per_device_eval_batch_size == 16
    assert args.warmup_steps == 0 and args.resume_from_checkpoint == "ckpt"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--feature_layers", "late"], "late"),
        (["--feature_layers", "1", "3"], [1, 3]),
        (["--feature-layers", "2"], [2]),
    ],
)
def test_layer_flags(flags, expected):
    _, config, _ = parse_distill_args(["--student", "s", "--data", "d", "--out", "o", *flags])
    assert config.feature_layers == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--divergence", "kld"], "argument --divergence: invalid choice: 'kld'"),
        (["--backend", "cuad"], "argument --backend: invalid choice: 'cuad'"),
        (["--vocab", "trunc"], "argument --vocab: invalid choice: 'trunc'"),
        (["--max_steps", "x"], "argument --max_steps/--max-steps: invalid int value: 'x'"),
        (["--max_ste", "3"], "unrecognized arguments: --max_ste 3"),  # no prefix matching
        (["--temprature", "3"], "unrecognized arguments: --temprature 3"),
    ],
)
def test_usage_errors_name_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        parse_distill_args(["--student", "s", "--data", "d", "--out", "o", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_layer_values_mixing_modes_and_numbers():
    with pytest.raises(ValueError, match="feature_layers must be one of auto, all, key, late"):
        parse_distill_args(
            ["--student", "s", "--data", "d", "--out", "o", "--feature_layers", "key", "3"]
        )


# ---------------------------------------------------------------- checks before models load


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: every check below must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", fail)
    monkeypatch.setattr(run_module, "load_student", fail)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--teacher": "{root}/nope"}, "--teacher {root}/nope: not a model directory"),
        ({"--student": "{root}/nope.json"}, "--student {root}/nope.json: neither a model"),
        ({"--data": "{root}/nope.txt"}, "--data {root}/nope.txt: no such file or directory"),
        ({"--tokenizer": "{root}"}, "--tokenizer {root}: no tokenizer files there"),
        ({"--backend": "cuda"}, "--backend cuda is not available here"),
        ({"--teacher_weights": "1 2"}, "--teacher_weights has 2 values for 1 teacher(s)"),
        ({"--self_distillation": "ema"}, "makes its own teacher: drop --teacher"),
        ({"--resume": None}, "--resume: no checkpoint in {out}"),
        ({"--resume": "{root}/ckpt"}, "--resume {root}/ckpt: no such checkpoint directory"),
        ({"--alpha": "2"}, "alpha (the CE weight) must be in [0, 1], got 2.0"),
        ({"--lora_r": "0"}, "lora_r must be an int >= 1, got 0"),
        ({"--merge_adapters": None}, "merge_adapters needs lora_r"),
        ({"--block_size": "1"}, "block_size must be an int >= 2, got 1"),
        ({"--eval_fraction": "1.5"}, "eval_fraction must be in (0, 1), got 1.5"),
        ({"--lr_scheduler_kwargs": "{{bad"}, "lr_scheduler_kwargs: invalid JSON '{{bad'"),
    ],
)
def test_bad_values_fail_before_any_model_loads(ws, tmp_path, capsys, no_models, change, message):
    if "cuda" in change.values() and fastkd.backends()["cuda"].available:
        pytest.skip("the CUDA backend is available here")
    out = tmp_path / "out"
    argv = [str(a) for a in distill_argv(ws, out)]
    for flag, value in change.items():
        values = [] if value is None else value.format(root=ws).split()
        if flag in argv:
            argv[argv.index(flag) + 1 : argv.index(flag) + 2] = values
        else:
            argv += [flag, *values]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastkd distill: error: ")
    assert message.format(root=ws, out=out) in err[0]
    assert not out.exists()  # nothing written


def test_missing_required_flags_exit_like_argparse(ws, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(ws / "teacher")])
    assert exc.value.code == 2 and "--out is required" in capsys.readouterr().err
    assert main(["distill", "--student", "s.json", "--data", "d", "--out", "o"]) == 2
    assert "--teacher is required (or self_distillation)" in capsys.readouterr().err


# ---------------------------------------------------------------- tokenizers


def test_different_tokenizers_are_an_error_naming_both(ws, tmp_path, capsys, no_models):
    argv = [str(a) for a in distill_argv(ws, tmp_path / "o")]
    argv[argv.index("--student") + 1] = str(ws / "student_other")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(ws / "student_other") in err and str(ws / "teacher") in err
    assert "--allow_tokenizer_mismatch" in err and not (tmp_path / "o").exists()


def test_tokenizer_choice(ws):
    records = [{"text": "def f():\n    return 1\n"}]
    args = dict(teacher=[str(ws / "teacher")], data="d")
    packing, saved = run_module.run_tokenizers(
        run_module.RunArguments(student=str(ws / "student.json"), **args), records
    )
    assert packing.get_vocab() == saved.get_vocab()  # the teacher's, the only one there
    mixed = run_module.RunArguments(
        student=str(ws / "student_other"), allow_tokenizer_mismatch=True, **args
    )
    packing, saved = run_module.run_tokenizers(mixed, records)
    other = transformers.AutoTokenizer.from_pretrained(ws / "student_other")
    # The student keeps its own tokenizer, and by default packs with it.
    assert saved.get_vocab() == packing.get_vocab() == other.get_vocab()
    with_flag = run_module.RunArguments(
        student=str(ws / "student_other"),
        tokenizer=str(ws / "teacher"),
        allow_tokenizer_mismatch=True,
        **args,
    )
    packing, saved = run_module.run_tokenizers(with_flag, records)
    assert saved.get_vocab() == other.get_vocab() != packing.get_vocab()
    no_tokenizer = run_module.RunArguments(student=str(ws / "student.json"), data="d")
    with pytest.raises(ValueError, match=r"no tokenizer: .* pass --tokenizer"):
        run_module.run_tokenizers(no_tokenizer, records)


# ---------------------------------------------------------------- real runs


@pytest.mark.slow
def test_mismatch_opt_in_trains_and_saves_the_students_tokenizer(ws, tmp_path):
    out = tmp_path / "mixed"
    argv = [str(a) for a in distill_argv(ws, out, "--allow_tokenizer_mismatch")]
    argv[argv.index("--student") + 1] = str(ws / "student_other")
    assert main(argv) == 0
    saved = json.loads((out / "tokenizer.json").read_text())
    own = json.loads((ws / "student_other" / "tokenizer.json").read_text())
    assert saved["model"]["vocab"] == own["model"]["vocab"]


@pytest.mark.slow
def test_eval_reproduces_the_held_out_split_of_distill(ws, tmp_path, capsys):
    out = tmp_path / "seed3"
    assert run_main(distill_argv(ws, out, "--seed", 3, "--eval_fraction", 0.2)) == 0
    held_out = json.loads((out / "eval.json").read_text())
    capsys.readouterr()

    def evaluate(seed):
        argv = ["eval", "--model", out, "--data", ws / "data.txt", "--block_size", BLOCK]
        assert run_main([*argv, "--eval_fraction", 0.2, "--seed", seed]) == 0
        return json.loads(capsys.readouterr().out)

    assert evaluate(3) == pytest.approx(held_out, rel=1e-6)
    assert evaluate(0)["loss"] != pytest.approx(held_out["loss"], rel=1e-6)  # other blocks


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True])
def test_lora_student(ws, tmp_path, merge):
    out = tmp_path / "lora"
    extra = ["--lora_r", 4, "--lora_target_modules", "q_proj", "v_proj"]
    argv = distill_argv(ws, out, *extra, *(["--merge_adapters"] if merge else []))
    argv[argv.index("--student") + 1] = ws / "student_other"
    assert run_main([*argv, "--allow_tokenizer_mismatch"]) == 0
    if merge:
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora" in name for name, _ in model.named_parameters())
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "eval.json").is_file()


def test_eval_flags(ws, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(run_module, "evaluate_model", lambda *a, **k: seen.update(k) or {"x": 1})
    assert main(["eval", "--model", "m", "--data", "d", "--eval-fraction", "0.2"]) == 0
    assert seen == {"block_size": 128, "batch_size": 8, "eval_fraction": 0.2, "seed": 0}
    assert json.loads(capsys.readouterr().out) == {"x": 1}


# ---------------------------------------------------------------- cache-teacher


def cache_argv(root, out, data=None, *extra):
    return [
        "cache-teacher",
        "--teacher", root / "teacher",
        "--data", data or root / "data.txt",
        "--out", out,
        "--temperature", 2,
        "--top-k", 4,
        "--block-size", BLOCK,
        *extra,
    ]  # fmt: skip


def test_cache_teacher_is_listed_and_documented(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "cache-teacher" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["cache-teacher", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--teacher DIR", "--temperature T", "--top-k K", "--dtype {bf16,fp32}",
                 "--block-size N", "--shard-blocks S", "manifest.json"):  # fmt: skip
        assert flag in text, flag


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--top-k": "0"}, "--top-k must be an int >= 1, got 0"),
        ({"--top-k": "100000"}, "--top-k 100000 is larger than the teacher's vocabulary"),
        ({"--temperature": "0"}, "--temperature must be a finite number > 0, got 0.0"),
        ({"--temperature": "-1"}, "--temperature must be a finite number > 0, got -1.0"),
        ({"--temperature": "inf"}, "--temperature must be a finite number > 0, got inf"),
        ({"--block-size": "1"}, "--block-size must be an int >= 2, got 1"),
        ({"--batch-size": "0"}, "--batch-size must be an int >= 1, got 0"),
        ({"--shard-blocks": "0"}, "--shard-blocks must be an int >= 1, got 0"),
        ({"--teacher": "{root}/nope"}, "--teacher {root}/nope: not a model directory"),
        ({"--data": "{root}/nope.txt"}, "--data {root}/nope.txt: no such file or directory"),
        ({"--tokenizer": "{root}"}, "--tokenizer {root}: no tokenizer files there"),
        ({"--out": "{root}/data.txt"}, "--out {root}/data.txt: exists and is not a directory"),
        (
            {"--tokenizer": "{root}/student_other"},
            "the tokenizers in --tokenizer {root}/student_other and --teacher {root}/teacher "
            "differ",
        ),
    ],
)
def test_cache_teacher_bad_values_fail_before_any_model_loads(
    ws, tmp_path, capsys, monkeypatch, change, message
):
    from fastkd.training import teacher_cache

    monkeypatch.setattr(teacher_cache, "load_model", lambda *a: pytest.fail("a model loaded"))
    argv = [str(a) for a in cache_argv(ws, tmp_path / "out")]
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value.format(root=ws)
        else:
            argv += [flag, value.format(root=ws)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastkd cache-teacher: error: ")
    assert message.format(root=ws) in err[-1]
    assert not (tmp_path / "out").exists()  # nothing written


def test_cache_teacher_writes_a_cache_distill_data_matches(ws, tmp_path, capsys):
    from fastkd.training.data import load_tokenizer, pack, read_records
    from fastkd.training.teacher_cache import TeacherCache

    data = tmp_path / "small.txt"
    data.write_text((ws / "data.txt").read_text()[:3000])
    out = tmp_path / "cache"
    assert run_main(cache_argv(ws, out, data, "--dtype", "fp32", "--shard-blocks", 8)) == 0
    cache = TeacherCache(out)
    tokenizer = load_tokenizer(ws / "teacher")
    cache.check_data(pack(read_records(data), tokenizer, BLOCK)[0], tokenizer)
    assert (cache.temperature, cache.top_k, cache.manifest["dtype"]) == (2.0, 4, "fp32")
    ids, logprobs = cache.blocks([cache.num_blocks - 1, 0])
    assert ids.shape == logprobs.shape == (2, BLOCK, 4)
    assert "teacher top-k" in capsys.readouterr().err  # the progress bar
    # Again with another temperature into the same directory: an error, not a mix.
    assert run_main(cache_argv(ws, out, data, "--dtype", "fp32", "--temperature", 1)) == 2
    assert "temperature 2.0 there, 1.0 here" in capsys.readouterr().err
