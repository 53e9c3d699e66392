"""``fastkd prune``: the student loads with the asked shapes and, pruned from a trained teacher,
has a calibration perplexity far below a random init of its shape and below students whose
layers, heads and channels were chosen at random; depth pruning drops the layers of lowest block
influence (or the given ones) and copies the others exactly; width pruning keeps the heads and
channels of highest activation, equal to the teacher with the others masked out (Llama GQA, Qwen2
biases and sliding-window layers, Qwen3 q/k norms, Mistral MHA); embedding channels follow the
norms and tied embeddings stay tied; a bf16 teacher gives a bf16 student; bad targets and inputs
are errors before any weight loads; a failed save leaves no output; the command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from fastkd.cli import main
from fastkd.training import prune as prune_module
from fastkd.training.data import BlockDataset, load_tokenizer, pack, stdlib_corpus, train_tokenizer
from fastkd.training.evaluate import evaluate
from fastkd.training.prune import REPORT, TMP_SUFFIX, prune

BLOCK = 32
BLOCKS = 32  # calibration blocks
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}


def tiny(model_type: str, tokenizer, *, heads=4, kv_heads=2, seed=0, **extra):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=BLOCK,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"tie_word_embeddings": False, **SIZES, **extra},
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Calibration text, its tokenizer, and a Llama teacher (4 layers, 4 heads over 2 KV heads)
    trained 60 steps on it, so that pruning by importance has something to find."""
    root = tmp_path_factory.mktemp("prune")
    text = stdlib_corpus(40_000)
    (root / "calib.txt").write_text(text)
    tokenizer = train_tokenizer([text], 300)
    teacher = tiny("llama", tokenizer)
    ids, labels = pack([{"text": text}], tokenizer, BLOCK)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        rows = torch.randint(0, ids.shape[0], (16,), generator=g)
        teacher(input_ids=ids[rows], labels=labels[rows]).loss.backward()
        opt.step()
        opt.zero_grad()
    save(teacher, tokenizer, root / "teacher")
    return root


def run(ws, out, teacher="teacher", **targets) -> dict:
    return prune(
        ws / teacher,
        out,
        calibration=ws / "calib.txt",
        block_size=BLOCK,
        max_blocks=BLOCKS,
        **targets,
    )


def calibration(ws, teacher="teacher") -> BlockDataset:
    """The calibration blocks as prune packs them (with that teacher's tokenizer)."""
    text = (ws / "calib.txt").read_text()
    ids, labels = pack([{"text": text}], load_tokenizer(ws / teacher), BLOCK)
    return BlockDataset(ids[:BLOCKS], labels[:BLOCKS])


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model, data: BlockDataset) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=data.input_ids[:4]).logits


class PassThrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skipping(model, dropped):
    """``model`` with these layers taken out of its forward (their input passes through)."""
    for i in dropped:
        model.model.layers[i] = PassThrough()
    return model


def test_the_student_loads_with_the_asked_shapes_and_beats_a_random_init(ws, tmp_path):
    out = tmp_path / "student"
    report = run(ws, out, layers=3, hidden=48, intermediate=64, heads=2)
    student = load(out)
    c = student.config
    shape = (c.num_hidden_layers, c.hidden_size, c.intermediate_size)
    assert (*shape, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        3,
        48,
        64,
        2,
        2,
        16,
    )
    assert json.loads((out / "config.json").read_text())["head_dim"] == 16
    layer = student.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2 * 16, 48)
    assert layer.self_attn.k_proj.weight.shape == (2 * 16, 48)
    assert layer.self_attn.o_proj.weight.shape == (48, 2 * 16)
    assert layer.mlp.gate_proj.weight.shape == (64, 48)
    assert layer.mlp.down_proj.weight.shape == (48, 64)
    assert student.lm_head.weight.shape == (c.vocab_size, 48)
    text = (ws / "calib.txt").read_text()[:2000]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(text)["input_ids"] == load_tokenizer(ws / "teacher")(text)["input_ids"]
    assert json.loads((out / REPORT).read_text()) == report
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))

    data = calibration(ws)
    pruned = evaluate(student, data)["perplexity"]
    assert pruned == pytest.approx(report["calibration"]["perplexity_after"], rel=1e-6)
    torch.manual_seed(0)
    random = evaluate(transformers.AutoModelForCausalLM.from_config(c), data)["perplexity"]
    teacher = report["calibration"]["perplexity_before"]
    print(
        f"calibration perplexity: teacher {teacher:.1f}, pruned {pruned:.1f}, random {random:.1f}"
    )
    assert teacher < pruned < random / 3
    assert report["parameters"]["student"] == sum(p.numel() for p in student.parameters())


def test_pruning_by_importance_beats_a_random_choice_of_the_same_shape(ws, tmp_path, monkeypatch):
    targets = {"layers": 3, "hidden": 48, "intermediate": 64, "heads": 2}
    chosen = run(ws, tmp_path / "chosen", **targets)["calibration"]["perplexity_after"]
    for seed in range(3):  # every layer, head and channel choice drawn at random instead
        g = torch.Generator().manual_seed(seed)
        monkeypatch.setattr(
            prune_module,
            "_top",
            lambda s, k, g=g: torch.randperm(len(s), generator=g)[:k].sort()[0],
        )
        random = run(ws, tmp_path / f"random{seed}", **targets)
        assert chosen < random["calibration"]["perplexity_after"]


def test_a_bf16_teacher_gives_a_bf16_student(ws, tmp_path):
    load(ws / "teacher").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    load_tokenizer(ws / "teacher").save_pretrained(tmp_path / "bf16")
    report = prune(
        tmp_path / "bf16",
        tmp_path / "student",
        calibration=ws / "calib.txt",
        hidden=48,
        block_size=BLOCK,
        max_blocks=BLOCKS,
    )
    student = load(tmp_path / "student")
    assert student.dtype == torch.bfloat16
    assert (
        report["calibration"]["perplexity_after"] < 2 * report["calibration"]["perplexity_before"]
    )


def test_depth_pruning_drops_the_layers_of_lowest_block_influence(ws, tmp_path):
    teacher = load(ws / "teacher")
    data = calibration(ws)
    # block influence from the hidden states: hidden_states[i] is the input of layer i; the
    # last layer's output (hidden_states[-1] is after the final norm) is taken by a hook
    last = {}
    teacher.model.layers[-1].register_forward_hook(lambda m, a, o: last.update(out=o))
    with torch.no_grad():
        states = teacher.model(input_ids=data.input_ids, output_hidden_states=True).hidden_states
    outputs = [*states[1:-1], last["out"]]
    influence = torch.stack(
        [1 - torch.cosine_similarity(x, y, dim=-1).mean() for x, y in zip(states, outputs)]
    )
    report = run(ws, tmp_path / "student", layers=2)
    assert report["layers"]["block_influence"] == pytest.approx(influence.tolist(), abs=1e-5)
    dropped = sorted(influence.argsort()[:2].tolist())
    assert report["layers"]["dropped"] == dropped
    assert report["layers"]["selected_by"] == "block_influence"

    student = load(tmp_path / "student")
    kept = [i for i in range(4) if i not in dropped]
    expected = {
        **{k: v for k, v in teacher.state_dict().items() if not k.startswith("model.layers.")},
        **{
            f"model.layers.{k}.{name}": value
            for k, i in enumerate(kept)
            for name, value in teacher.model.layers[i].state_dict().items()
        },
    }
    assert student.state_dict().keys() == expected.keys()
    for name, value in student.state_dict().items():
        assert torch.equal(value, expected[name]), name
    teacher = skipping(teacher, dropped)
    torch.testing.assert_close(logits(student, data), logits(teacher, data))


def test_a_drop_list_is_honoured(ws, tmp_path):
    report = run(ws, tmp_path / "student", layers=[2, 0], hidden=48)
    assert report["layers"]["kept"] == [1, 3] and report["layers"]["dropped"] == [0, 2]
    assert report["layers"]["selected_by"] == "drop list"
    student, teacher = load(tmp_path / "student"), load(ws / "teacher")
    kept = torch.tensor(report["hidden"]["kept"])
    for k, i in enumerate((1, 3)):
        torch.testing.assert_close(
            student.model.layers[k].mlp.up_proj.weight,
            teacher.model.layers[i].mlp.up_proj.weight[:, kept],
            rtol=0,
            atol=0,
        )
    # the report's second depth metric: perplexity with each layer alone skipped
    without = evaluate(skipping(teacher, [0]), calibration(ws))["perplexity"]
    assert report["layers"]["perplexity_without"][0] == pytest.approx(without, rel=1e-6)


def reference_width(model, data, heads: int, intermediate: int):
    """Per layer, the query heads (GQA rule) and MLP channels of highest mean activation,
    computed here from each layer's MLP input and o_proj input."""
    c = model.config
    head_scores, mlp_scores, handles = [], [], []
    for layer in model.model.layers:
        a, m = torch.zeros(c.num_attention_heads), torch.zeros(c.intermediate_size)
        head_scores.append(a)
        mlp_scores.append(m)

        def attention(module, args, a=a):
            a += args[0].unflatten(-1, (c.num_attention_heads, c.head_dim)).norm(dim=-1).sum((0, 1))

        def mlp(module, args, m=m):
            x = args[0]
            m += (module.act_fn(module.gate_proj(x)) * module.up_proj(x)).abs().sum((0, 1))

        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(attention))
        handles.append(layer.mlp.register_forward_pre_hook(mlp))
    with torch.no_grad():
        model(input_ids=data.input_ids)
    for h in handles:
        h.remove()
    kv = c.num_key_value_heads
    kept_heads = []
    for a in head_scores:
        if kv == c.num_attention_heads:
            kept_heads.append(a.topk(heads).indices.sort().values)
        else:  # every KV group keeps its own best heads / kv query heads
            group = c.num_attention_heads // kv
            top = (
                a.view(kv, group).topk(heads // kv, dim=1).indices
                + group * torch.arange(kv)[:, None]
            )
            kept_heads.append(top.flatten().sort().values)
    kept_mlp = [m.topk(intermediate).indices.sort().values for m in mlp_scores]
    return kept_heads, kept_mlp


def masked(model, layers, kept_heads, kept_mlp):
    """The teacher with the dropped heads' and MLP channels' outputs of these layers zeroed."""
    hd = model.config.head_dim
    with torch.no_grad():
        for i, heads, channels in zip(layers, kept_heads, kept_mlp):
            layer = model.model.layers[i]
            keep = torch.zeros(model.config.num_attention_heads, dtype=torch.bool)
            keep[heads] = True
            layer.self_attn.o_proj.weight[:, ~keep.repeat_interleave(hd)] = 0
            keep = torch.zeros(model.config.intermediate_size, dtype=torch.bool)
            keep[channels] = True
            layer.mlp.down_proj.weight[:, ~keep] = 0
    return model


@pytest.mark.parametrize(
    "model_type, kv_heads, extra, drop",
    [
        ("llama", 2, {}, None),  # the trained teacher
        # q/k/v biases; layers 2 and 3 attend over a sliding window: a layer keeps its type
        (
            "qwen2",
            2,
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
            [1],
        ),
        ("qwen3", 1, {"attention_bias": True}, None),  # q/k norms, one KV head
        ("mistral", 4, {}, None),  # MHA: whole heads go
    ],
)
def test_width_pruning_equals_the_teacher_with_the_rest_masked(
    ws, tmp_path, model_type, kv_heads, extra, drop
):
    if model_type == "llama":
        teacher_dir = "teacher"
    else:
        teacher_dir = f"teacher_{model_type}"
        if not (ws / teacher_dir).exists():
            tokenizer = load_tokenizer(ws / "teacher")
            teacher = tiny(model_type, tokenizer, kv_heads=kv_heads, **extra)
            save(teacher, tokenizer, ws / teacher_dir)
    report = run(
        ws, tmp_path / "student", teacher=teacher_dir, heads=2, intermediate=48, layers=drop
    )
    student, teacher = load(tmp_path / "student"), load(ws / teacher_dir)
    assert student.config.num_key_value_heads == (2 if kv_heads == 4 else kv_heads)
    data = calibration(ws, teacher_dir)
    kept_heads, kept_mlp = reference_width(teacher, data, heads=2, intermediate=48)
    kept = [i for i in range(4) if i not in (drop or [])]
    kept_heads, kept_mlp = [kept_heads[i] for i in kept], [kept_mlp[i] for i in kept]
    assert report["heads"]["kept"] == [h.tolist() for h in kept_heads]
    if drop:
        types = ["full_attention", "sliding_attention", "sliding_attention"]
        assert student.config.layer_types == types
        teacher = skipping(teacher, drop)
    torch.testing.assert_close(
        logits(student, data), logits(masked(teacher, kept, kept_heads, kept_mlp), data)
    )


def test_embedding_channels_follow_the_norms_and_tied_embeddings_stay_tied(ws, tmp_path):
    tokenizer = load_tokenizer(ws / "teacher")
    teacher = tiny("llama", tokenizer, tie_word_embeddings=True)
    save(teacher, tokenizer, tmp_path / "tied")
    report = prune(
        tmp_path / "tied",
        tmp_path / "student",
        calibration=ws / "calib.txt",
        hidden=40,
        layers=[1],
        block_size=BLOCK,
        max_blocks=BLOCKS,
    )
    student = load(tmp_path / "student")
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    # importance: mean |RMSNorm output| summed over the norms the student keeps
    score = torch.zeros(64)
    norms = [teacher.model.norm] + [
        n for i, layer in enumerate(teacher.model.layers) if i != 1
        for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]  # fmt: skip

    def add(module, args, output):
        score.add_(output.abs().mean((0, 1)))

    for n in norms:
        n.register_forward_hook(add)
    with torch.no_grad():
        teacher.eval()(input_ids=calibration(ws).input_ids)
    kept = score.topk(40).indices.sort().values
    assert report["hidden"]["kept"] == kept.tolist()
    torch.testing.assert_close(
        student.model.embed_tokens.weight,
        teacher.model.embed_tokens.weight[:, kept],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        student.model.layers[0].input_layernorm.weight,
        teacher.model.layers[0].input_layernorm.weight[kept],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "targets, error, message",
    [
        ({}, ValueError, "nothing to prune"),
        ({"layers": 0}, ValueError, "layers must be positive"),
        ({"layers": 5}, ValueError, "layers=5 is larger than the teacher's 4"),
        ({"layers": 2.5}, TypeError, "layers must be an int"),
        ({"layers": []}, ValueError, "layers to drop is empty"),
        ({"layers": [4]}, ValueError, "4 is not a layer index of the teacher"),
        ({"layers": [1, 1]}, ValueError, "repeats a layer"),
        ({"layers": [0, 1, 2, 3]}, ValueError, "drops every layer"),
        ({"hidden": 65}, ValueError, "hidden=65 is larger than the teacher's 64"),
        ({"intermediate": -8}, ValueError, "intermediate must be positive"),
        ({"heads": 8}, ValueError, "heads=8 is larger"),
        ({"heads": 3}, ValueError, "multiple of the teacher's 2 KV heads"),
        ({"heads": 2, "block_size": 0}, ValueError, "block_size must be positive"),
    ],
)
def test_bad_targets_are_errors_before_any_weight_loads(
    ws, tmp_path, monkeypatch, targets, error, message
):
    monkeypatch.setattr(prune_module, "load_model", pytest.fail)
    targets = {"block_size": BLOCK, **targets}
    with pytest.raises(error, match=message):
        prune(ws / "teacher", tmp_path / "out", calibration=ws / "calib.txt", **targets)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_errors_before_any_weight_loads(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(prune_module, "load_model", pytest.fail)

    def attempt(teacher=ws / "teacher", out=tmp_path / "out", calib=ws / "calib.txt"):
        return prune(teacher, out, calibration=calib, layers=2, block_size=BLOCK)

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' cannot be pruned"):
        attempt(teacher=tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        attempt(teacher=tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        attempt(out=tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        attempt(calib=tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("a few words")
    with pytest.raises(ValueError, match="not enough text for one block"):
        attempt(calib=tmp_path / "short.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        attempt(calib=tmp_path / "missing.txt")
    text = (ws / "calib.txt").read_text()
    big = train_tokenizer([text], 600)  # ids beyond the teacher's 300-odd embeddings
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"holds token id \d+ but the teacher embeds only"):
        prune(ws / "teacher", tmp_path / "out", calibration=ws / "calib.txt", layers=2,
              block_size=BLOCK, tokenizer=tmp_path / "big")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        prune(ws / "teacher", tmp_path / "out", calibration=ws / "calib.txt", layers=2,
              tokenizer=tmp_path / "full")  # fmt: skip


def test_a_failed_or_killed_save_leaves_no_output(ws, tmp_path, monkeypatch):
    out = tmp_path / "student"
    tmp = tmp_path / f".student{TMP_SUFFIX}"

    def fail(self, *args, **kwargs):
        raise RuntimeError("disk full")

    # the model is saved, then the tokenizer fails
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        run(ws, out, layers=3)
    assert not out.exists() and not tmp.exists()
    monkeypatch.undo()

    # SIGKILLed at the same point: the temporary directory stays, out does not exist
    code = (
        "import os, signal, transformers\n"
        "from fastkd.training.prune import prune\n"
        "def killed(self, *args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "transformers.PreTrainedTokenizerBase.save_pretrained = killed\n"
        f"prune({str(ws / 'teacher')!r}, {str(out)!r}, calibration={str(ws / 'calib.txt')!r}, "
        f"layers=3, block_size={BLOCK}, max_blocks=8)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert not out.exists() and (tmp / "model.safetensors").is_file()

    out.mkdir()  # an empty directory is taken; the killed run's leftovers are cleared
    run(ws, out, layers=3)
    assert load(out).config.num_hidden_layers == 3
    assert not tmp.exists()


def test_cli(ws, tmp_path, capsys):
    base = [
        "prune",
        "--teacher", ws / "teacher",
        "--calibration", ws / "calib.txt",
        "--block-size", BLOCK,
        "--max_blocks", 8,
    ]  # fmt: skip
    argv = [*base, "--out", tmp_path / "a", "--drop-layers", "1,2", "--hidden", 48, "--heads", 2]
    assert main([str(a) for a in argv]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dropped_layers"] == [1, 2]
    assert summary["shape"]["student"]["hidden"] == 48
    assert load(tmp_path / "a").config.num_attention_heads == 2

    assert main([str(a) for a in [*base, "--out", tmp_path / "b", "--layers", 0]]) == 2
    assert "fastkd prune: error: layers must be positive" in capsys.readouterr().err
    for bad in (["--layers", "2", "--drop-layers", "1"], ["--drop-layers", "1,x"]):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in [*base, "--out", tmp_path / "c", *bad]])
        assert exit_.value.code == 2
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_pruned_student_distils(ws, tmp_path):
    run(ws, tmp_path / "student", layers=2, hidden=32)
    argv = [
        "distill",
        "--teacher", ws / "teacher",
        "--student", tmp_path / "student",
        "--data", ws / "calib.txt",
        "--out", tmp_path / "distilled",
        "--max-steps", 2,
        "--batch-size", 2,
        "--block-size", BLOCK,
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert load(tmp_path / "distilled").config.num_hidden_layers == 2
