"""Recipes: every YAML loads, validates and trains two steps on a tiny model with its bundled demo
data; headers follow the rules and their memory figures come from the estimator; the package
copies equal ``recipes/``; the demo data is exactly what its generator writes; the CLI lists,
shows and copies recipes; the scripts work on local data."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_lora import config
from mlx_lora.commands.cli import cli
from mlx_lora.commands.recipes import (
    DEMO_DATA,
    DEMO_DIR,
    HEADER_KEYS,
    KNOWN_MODELS,
    ModelShape,
    RecipeError,
    copy_recipe,
    demo_data,
    estimate_for_config,
    estimate_peak_memory,
    get_recipe,
    list_recipes,
    memory_text,
    read_recipe,
    smallest_mac,
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
YAMLS = sorted(RECIPES.glob("*.yaml"))
REQUIRED_FAMILIES = {
    "quickstart",
    "instruct-alpaca",
    "chat-sft",
    "summarization",
    "code-generation",
    "qlora-7b-16gb",
    "dora",
    "continued-pretraining",
}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"recipes_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# files


def test_every_required_recipe_exists():
    assert REQUIRED_FAMILIES <= {p.stem for p in YAMLS}
    assert (RECIPES / "train_fuse_export.py").is_file()


def test_demo_data_is_what_the_generator_writes(tmp_path):
    gen = load_script("make_demo_data")
    gen.write(tmp_path)
    made = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.jsonl")}
    shipped = {p.relative_to(DEMO_DIR): p.read_bytes() for p in DEMO_DIR.rglob("*.jsonl")}
    assert made.keys() == shipped.keys()
    assert [k for k in made if made[k] != shipped[k]] == [], "run: python recipes/make_demo_data.py"
    assert sum(len(v) for v in shipped.values()) < 400_000  # "small"


def test_triage_test_split_is_held_out_and_covers_unseen_phrasings():
    gen = load_script("make_demo_data")
    rows = {
        s: [json.loads(l) for l in (DEMO_DIR / "triage" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "valid", "test")
    }
    tickets = {s: [r["messages"][1]["content"] for r in rs] for s, rs in rows.items()}
    assert not set(tickets["test"]) & set(tickets["train"])
    assert not set(tickets["valid"]) & set(tickets["train"])
    labels = {r["messages"][2]["content"] for r in rows["train"]}
    assert labels == {f"{t}/{p}" for t in gen.TEAMS for p in gen.PRIORITIES}
    # The literal start of every held-out phrasing occurs in test and never in train.
    held_out = [t for team in gen.TICKETS.values() for t in team[-gen.HELD_OUT_TICKETS :]]
    fragments = [t.split("{")[0].strip() for t in held_out if len(t.split("{")[0].strip()) > 15]
    assert fragments
    for frag in fragments:
        assert not any(frag.lower() in t.lower() for t in tickets["train"]), frag
    assert sum(any(f.lower() in t.lower() for f in fragments) for t in tickets["test"]) >= 10
    # the quickstart recipe's header states the split sizes
    counts = re.search(r"(\d+) train, (\d+) valid, (\d+) test", get_recipe("quickstart").get("data"))
    assert counts and [int(c) for c in counts.groups()] == [len(rows[s]) for s in ("train", "valid", "test")]


# ---------------------------------------------------------------------------------------------
# headers and memory


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_header_states_command_facts_and_the_estimated_memory(path):
    recipe = read_recipe(path)
    assert recipe.command.startswith(f"mlx-lora train --config recipes/{path.name}")
    missing = [k for k in HEADER_KEYS if not recipe.get(k)]
    assert not missing, f"{path.name}: header lacks {missing}"
    assert recipe.get("demo") in DEMO_DATA
    cfg = config.build(str(path))  # validates as shipped
    assert recipe.get("model") == cfg.model.path
    assert cfg.out.startswith("runs/")
    mem, fits = memory_text(estimate_for_config(cfg))
    assert (recipe.get("memory"), recipe.get("fits")) == (mem, fits), (
        f"{path.name}: header memory is stale; estimator says {mem!r}, {fits!r} (run: python recipes/update_memory_lines.py)"
    )


def test_qlora_recipe_fits_a_16_gb_mac_with_a_quantized_7b_model():
    cfg = config.build(str(RECIPES / "qlora-7b-16gb.yaml"))
    shape, bits = KNOWN_MODELS[cfg.model.path]
    assert bits == 4 and shape.params > 7e9
    assert estimate_for_config(cfg).gb() <= 16 * 0.7
    assert cfg.train.grad_checkpoint


def test_summarization_recipe_uses_long_unpacked_rows():
    cfg = config.build(str(RECIPES / "summarization.yaml"))
    assert cfg.data.packing is False and cfg.data.max_seq_length >= 4096 and cfg.data.overlong == "skip"


def test_chat_recipe_trains_on_assistant_turns_only():
    cfg = config.build(str(RECIPES / "chat-sft.yaml"))
    assert cfg.data.format == "chat" and cfg.data.train_on == "assistant"


def test_parameter_counts_match_the_published_sizes():
    # Published totals (model cards), in billions; the formula leaves out norms and biases (< 0.1%).
    published = {
        "Qwen/Qwen2.5-0.5B": 0.494,
        "Qwen/Qwen2.5-1.5B": 1.54,
        "Qwen/Qwen2.5-7B-Instruct": 7.61,
        "meta-llama/Llama-3.1-8B-Instruct": 8.03,
        "meta-llama/Llama-3.2-1B-Instruct": 1.24,
        "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1.71,
        "mistralai/Mistral-7B-Instruct-v0.3": 7.25,
    }
    for name, billions in published.items():
        assert KNOWN_MODELS[name][0].params / 1e9 == pytest.approx(billions, rel=0.01), name


def test_shape_from_a_real_config_counts_the_loaded_parameters(tiny_llama):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_lora.model.loading import load_model

    cfg = json.loads((tiny_llama / "config.json").read_text())
    shape = ModelShape.from_config(cfg)
    model, _, _ = load_model(str(tiny_llama), with_tokenizer=False)
    total = sum(v.size for k, v in tree_flatten(model.parameters()) if "norm" not in k)
    assert shape.params == total
    # r (in + out) per linear layer, from the adapter the library builds
    from mlx_lora.config import LoraConfig
    from mlx_lora.model import adapters

    adapters.apply_lora(model, LoraConfig(r=4))
    trainable, _ = adapters.count_parameters(model)
    assert shape.lora_params(4) == trainable
    del mx


def test_estimate_terms_follow_the_formula():
    s = ModelShape(hidden=64, layers=2, intermediate=192, heads=4, kv_heads=2, vocab=512, tied=False)
    e = estimate_peak_memory(s, bits=16, seq_len=100, batch=3, r=4, compute_bytes=4)
    assert e.weights == s.params * 4
    assert e.logits == 3 * 100 * 512 * (4 + 12)
    kv = 2 * 16
    per_block = 3 * 100 * 4 * (8 * 64 + 3 * kv + 4 * 192 + 2 * 4 * 100)
    assert e.activations == 2 * per_block
    ck = estimate_peak_memory(s, bits=16, seq_len=100, batch=3, r=4, compute_bytes=4, grad_checkpoint=True)
    assert ck.activations == 2 * 3 * 100 * 64 * 4 + per_block
    att = estimate_peak_memory(s, bits=16, seq_len=100, batch=3, r=4, compute_bytes=4, checkpoint_attention=True)
    scores = 3 * 100 * 4 * 2 * 4 * 100
    assert att.activations == 2 * (per_block - scores) + scores
    chunked = estimate_peak_memory(s, bits=16, seq_len=100, batch=3, r=4, compute_bytes=4, loss_chunk_tokens=64)
    assert chunked.logits == 128 * 512 * (4 + 12) + 3 * 100 * 64 * 4  # two chunks alive + dL/dh
    q4 = estimate_peak_memory(s, bits=4, seq_len=100, batch=3, r=4)
    assert q4.weights == pytest.approx(s.params * 4.5 / 8)
    assert smallest_mac(5.0) == 8 and smallest_mac(5.7) == 16 and smallest_mac(1000) is None


# ---------------------------------------------------------------------------------------------
# every recipe trains


@pytest.fixture(scope="module")
def tiny_quantized(tiny_model_dir, tmp_path_factory):
    from mlx_lora.converters.hf_to_mlx import convert

    return convert(
        str(tiny_model_dir("llama")),
        tmp_path_factory.mktemp("q") / "llama-4bit",
        quantize=True,
        bits=4,
        group_size=64,
        show_progress=False,
    )


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_recipe_trains_two_steps_on_its_demo_data(path, tiny_llama, tiny_model_dir, tiny_quantized, tmp_path):
    from mlx_lora.commands import api
    from mlx_lora.model.adapters import read_adapter

    recipe = read_recipe(path)
    shipped = config.build(str(path))
    quantized = KNOWN_MODELS[shipped.model.path][1] < 16
    model = tiny_quantized if quantized else tiny_llama
    if shipped.lora.r > 32:  # a rank needs layers at least that wide (the tiny k_proj has 32 outputs)
        assert not quantized
        model = tiny_model_dir("llama", hidden_size=128)
    # A smoke run: 2 steps of one micro-batch. The tiny model's 512-word tokenizer needs ~3x the
    # tokens of a real one, so rows get 512 positions, except where the recipe skips rows that do
    # not fit whole (summarization), which keeps its own length.
    sets = [
        f"model.path={model}",
        f"data.path={demo_data(recipe.get('demo'))}",
        "train.iters=2",
        "train.grad_accum=1",
        f"out={tmp_path / 'run'}",
        "data.cache=false",
    ]
    if shipped.data.overlong != "skip":
        sets.append("data.max_seq_length=512")
    cfg = config.build(str(path), sets)
    # Everything else is the recipe's own: adapter, data format, masking, packing, memory savers.
    assert (cfg.lora, cfg.train.batch_size, cfg.train.grad_checkpoint, cfg.train.lr, cfg.train.optimizer) == (
        shipped.lora,
        shipped.train.batch_size,
        shipped.train.grad_checkpoint,
        shipped.train.lr,
        shipped.train.optimizer,
    )
    assert (cfg.data.format, cfg.data.packing, cfg.data.train_on, cfg.data.overlong) == (
        shipped.data.format,
        shipped.data.packing,
        shipped.data.train_on,
        shipped.data.overlong,
    )
    result = api.train(cfg, progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    info, _ = read_adapter(tmp_path / "run")
    assert (info.lora.r, info.lora.use_dora) == (shipped.lora.r, shipped.lora.use_dora)


# ---------------------------------------------------------------------------------------------
# library and CLI


def test_list_show_copy_through_the_cli(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["recipes", "list"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    scripts_from = lines.index("script")
    for recipe in list_recipes():
        i = next(i for i, l in enumerate(lines) if l.startswith(recipe.name + " "))
        if recipe.kind == "config":  # the table of recipes, task and description below each
            assert i < scripts_from
            line, below = lines[i], lines[i + 1]
            memory = recipe.get("memory").split(" (")[0].removesuffix(" peak").lstrip("~")
            assert recipe.get("model") in line and memory in line and recipe.get("fits") in line
            assert below.startswith(f"    {recipe.get('task')}: ") and recipe.description[:30] in below
        else:  # the scripts, apart
            assert i > scripts_from and recipe.description[:30] in lines[i]

    r = runner.invoke(cli, ["recipes", "show", "chat-sft"])
    assert r.exit_code == 0 and r.output == (RECIPES / "chat-sft.yaml").read_text()

    dest = tmp_path / "my.yaml"
    r = runner.invoke(cli, ["recipes", "copy", "chat-sft", str(dest)])
    assert r.exit_code == 0, r.output
    assert dest.read_bytes() == (RECIPES / "chat-sft.yaml").read_bytes()
    assert f"mlx-lora train --config {dest}" in r.output
    dest.write_text("edited")
    r = runner.invoke(cli, ["recipes", "copy", "chat-sft", str(dest)])
    assert r.exit_code != 0 and dest.read_text() == "edited"
    r = runner.invoke(cli, ["recipes", "copy", "chat-sft", str(dest), "--force"])
    assert r.exit_code == 0 and dest.read_bytes() == (RECIPES / "chat-sft.yaml").read_bytes()
    # into a folder, keeping the name
    assert copy_recipe("dora", tmp_path).read_bytes() == (RECIPES / "dora.yaml").read_bytes()

    r = runner.invoke(cli, ["recipes", "data", "triage"])
    assert r.exit_code == 0 and Path(r.output.strip()) == DEMO_DIR / "triage"
    assert (Path(r.output.strip()) / "train.jsonl").is_file()


def test_unknown_names_are_user_errors_with_a_suggestion():
    with pytest.raises(RecipeError, match="did you mean 'chat-sft'"):
        get_recipe("chat-sfft")
    with pytest.raises(RecipeError, match="did you mean 'triage'"):
        demo_data("triag")


def test_header_rules_are_enforced(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n")
    with pytest.raises(RecipeError, match="line 1"):
        read_recipe(bad)
    bad.write_text("# mlx-lora train --config bad.yaml\n# task: a\n# task: b\nmodel: {path: x}\n")
    with pytest.raises(RecipeError, match="line 3: header key 'task' repeated"):
        read_recipe(bad)


def test_recipes_and_quickstart_are_mlx_lora_commands():
    out = CliRunner().invoke(cli, ["--help"]).output
    commands = out.split("Commands:", 1)[1].split()
    assert "recipes" in commands and "quickstart" in commands


# ---------------------------------------------------------------------------------------------
# scripts


def test_prepare_data_converts_preset_columns_and_splits(tmp_path):
    prep = load_script("prepare_data")
    src = tmp_path / "dolly.jsonl"
    rows = [
        {"instruction": f"Say {i}", "context": "" if i % 2 else f"ctx {i}", "response": f"{i}", "category": "qa"}
        for i in range(30)
    ] + [{"instruction": "empty", "context": "", "response": "  "}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = prep.prepare(
        str(src), tmp_path / "out", fmt="alpaca", fields={"input": "context", "output": "response"}, valid=3, test=2
    )
    assert counts == {"valid": 3, "test": 2, "train": 25}  # the row with an empty response is dropped
    out_rows = [
        json.loads(l)
        for s in ("train", "valid", "test")
        for l in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()
    ]
    assert sorted(r["output"] for r in out_rows) == sorted(str(i) for i in range(30))
    by_out = {r["output"]: r for r in out_rows}
    assert by_out["4"] == {"instruction": "Say 4", "input": "ctx 4", "output": "4"}

    # the written folder is what the trainer reads
    from mlx_lora.config import DataConfig
    from mlx_lora.data.mixture import load_datasets
    from mlx_lora.testing import make_tokenizer

    make_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    splits = load_datasets(
        DataConfig(path=str(tmp_path / "out"), cache=False), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    )
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (25, 3, 2)
    assert splits.train.stats.format == "alpaca"


def test_prepare_data_presets_and_errors(tmp_path):
    prep = load_script("prepare_data")
    bill = prep.convert_row(
        {"text": "Section 1. ...", "summary": "A bill.", "title": "t"},
        "completions",
        prep.PRESETS["FiscalNote/billsum"]["fields"],
        prep.PRESETS["FiscalNote/billsum"]["template"],
    )
    assert bill == {
        "prompt": "Summarize the following document.\n\nSection 1. ...\n\nSummary:",
        "completion": " A bill.",
    }
    assert prep.convert_row({"text": " = Heading = \n"}, "text", {}) is None
    assert prep.convert_row({"text": "\n"}, "text", {}) is None
    chat = prep.convert_row(
        {"prompt": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "chat",
        {},
    )
    assert chat == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(prep.PrepareError, match=r"column 'answer' missing.*--field completion=COLUMN"):
        prep.convert_row({"prompt": "q"}, "completions", {"completion": "answer"})
    src = tmp_path / "few.jsonl"
    src.write_text(json.dumps({"text": "one row"}) + "\n")
    assert prep.main([str(src), "--out", str(tmp_path / "o"), "--format", "text"]) == 2


def test_train_fuse_export_script_produces_a_runnable_gguf_and_modelfile(tiny_llama, tmp_path, capsys):
    import gguf

    script = load_script("train_fuse_export")
    out = tmp_path / "pipe"
    rc = script.main(
        [
            "--model",
            str(tiny_llama),
            "--data",
            str(demo_data("chat")),
            "--name",
            "tiny-bot",
            "--out",
            str(out),
            "--iters",
            "2",
            "--no-create",
            "--set",
            "data.cache=false",
            "--set",
            "train.batch_size=2",
        ]
    )
    assert rc == 0
    assert (out / "run" / "adapter_model.safetensors").is_file()
    assert (out / "fused" / "config.json").is_file()
    ggufs = list((out / "ollama").glob("*.gguf"))
    assert [g.name for g in ggufs] == ["tiny-bot.q8_0.gguf"]
    reader = gguf.GGUFReader(str(ggufs[0]))
    assert reader.fields["general.architecture"].contents() == "llama"
    modelfile = (out / "ollama" / "Modelfile").read_text()
    assert re.search(r"^FROM \./tiny-bot\.q8_0\.gguf$", modelfile, re.M)
    err = capsys.readouterr().err
    assert "ollama create tiny-bot -f Modelfile" in err and f"llama-cli -m {ggufs[0]}" in err


@pytest.mark.parametrize("variant", ["plain", "grad_checkpoint", "checkpoint_attention", "chunked_loss"])
def test_estimate_matches_the_measured_peak_of_a_training_step(variant):
    """Two LoRA steps (the library's adapter layers, loss functions and checkpointing) on a random
    4-layer model in float32 on the CPU: MLX's measured peak is within 20% of the estimate
    without the fixed runtime term (which MLX does not count)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.utils import _get_classes

    from mlx_lora.config import LoraConfig
    from mlx_lora.model import adapters
    from mlx_lora.training.losses import make_loss
    from mlx_lora.training.trainer import enable_attention_checkpoint, enable_grad_checkpoint

    shape = ModelShape(hidden=256, layers=4, intermediate=768, heads=4, kv_heads=2, vocab=8192, tied=False)
    B, L, chunk = 2, 256, 128
    cfg = dict(
        model_type="llama",
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    with mx.stream(mx.cpu):
        model_cls, args_cls = _get_classes(cfg)
        model = model_cls(args_cls.from_dict(cfg))
        model.set_dtype(mx.float32)
        model.freeze()
        adapters.apply_lora(model, LoraConfig(r=8))
        if variant == "grad_checkpoint":
            enable_grad_checkpoint(model)
        if variant == "checkpoint_attention":
            enable_attention_checkpoint(model)
        loss = make_loss(model, chunk if variant == "chunked_loss" else None)
        assert loss.chunk_tokens == (chunk if variant == "chunked_loss" else None), loss.note
        opt = optim.AdamW(learning_rate=1e-4)
        step = nn.value_and_grad(model, loss.train)
        x = mx.random.randint(0, shape.vocab, (B, L))
        y = mx.random.randint(0, shape.vocab, (B, L))
        mask = mx.ones((B, L))
        mx.eval(model.parameters(), x, y, mask)
        mx.reset_peak_memory()
        for _ in range(2):
            (value, _), grads = step(model, x, y, mask)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state, value)
        measured = mx.get_peak_memory()
    est = estimate_peak_memory(
        shape,
        seq_len=L,
        batch=B,
        r=8,
        compute_bytes=4,
        grad_checkpoint=variant == "grad_checkpoint",
        checkpoint_attention=variant == "checkpoint_attention",
        loss_chunk_tokens=chunk if variant == "chunked_loss" else None,
    )
    assert 0.8 <= measured / (est.total - est.runtime) <= 1.2, (measured, est)
