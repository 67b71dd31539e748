"""Data from ``datasets``: folders saved with save_to_disk, hf: ids, column mapping, mixing.

Everything is offline: the tests build tiny ``datasets`` objects and save them; the hub path is
exercised through the real ``datasets.load_dataset`` in offline mode, and with ``load_dataset``
replaced at the boundary where a hub answer is needed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import mlx_lora
from mlx_lora.config import DataConfig, build
from mlx_lora.data import examples as D
from mlx_lora.data import mixture as M
from mlx_lora.data import sources as S
from mlx_lora.plumbing.errors import ConfigError, DataError
from mlx_lora.testing import make_tiny_dataset, make_tokenizer

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()  # the tests' own save_to_disk calls would write bars to stderr

from cli_harness import assert_refused  # noqa: E402
from cli_harness import cli_env as _cli_env  # noqa: E402

cli_env = pytest.fixture(scope="module")(_cli_env)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def qa_rows(n: int, tag: str = "") -> dict:
    return {
        "question": [f"What is the code word for the item {tag}{i}?" for i in range(n)],
        "answer": [f" zebra-{tag}{i}" for i in range(n)],
        "category": ["facts"] * n,
    }


def save_dict(path: Path, **splits) -> Path:
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def targets(tok, ds) -> list[str]:
    return [tok.decode([int(t) for t, m in zip(*ex) if m]) for ex in ds.examples]


QA = {"prompt": "question", "completion": "answer"}

# ----------------------------------------------------------------------------------------------
# naming a source


@pytest.mark.parametrize(
    "spec, want",
    [
        ("hf:tatsu-lab/alpaca", ("tatsu-lab/alpaca", None, None)),
        ("hf:squad", ("squad", None, None)),
        ("hf:abisee/cnn_dailymail:3.0.0", ("abisee/cnn_dailymail", "3.0.0", None)),
        ("hf:HuggingFaceH4/ultrachat_200k@train_sft", ("HuggingFaceH4/ultrachat_200k", None, "train_sft")),
        (
            "hf:Salesforce/wikitext:wikitext-103-raw-v1@validation",
            ("Salesforce/wikitext", "wikitext-103-raw-v1", "validation"),
        ),
    ],
)
def test_hf_ids_parse(spec, want):
    got = S.parse_hf_id(spec)
    assert (got.name, got.config, got.split) == want
    assert str(got) == spec


@pytest.mark.parametrize(
    "spec",
    [
        "hf:",
        "hf:a/b/c",
        "hf:/name",
        "hf:org/name:",
        "hf:org/name@",
        "hf:org/na me",
        "hf:org/name:a:b",
        "hf:../x",
        "hf:org/name@tr ain",
    ],
)
def test_bad_hf_ids_are_refused(spec):
    with pytest.raises(DataError, match="hf:org/name"):
        S.parse_hf_id(spec)


# ----------------------------------------------------------------------------------------------
# datasets folders and column mapping


def test_dataset_dict_folder_splits_and_column_mapping(tmp_path, tok):
    folder = save_dict(tmp_path / "qa", train=qa_rows(6), validation=qa_rows(2, "v"), test=qa_rows(3, "t"))
    got = M.load_datasets(DataConfig(path=str(folder), columns=QA, cache=False), tok)
    assert (len(got.train), len(got.valid), len(got.test)) == (6, 2, 3)
    assert got.train.stats.format == "completions" and got.train.stats.path == f"{folder}[train]"
    # the completion (the mapped answer column) is what carries the loss, EOS included
    assert targets(tok, got.train) == [f" zebra-{i}<|im_end|>" for i in range(6)]
    assert targets(tok, got.valid) == [f" zebra-v{i}<|im_end|>" for i in range(2)]


def test_single_dataset_folder_holds_out_valid_fraction(tmp_path, tok):
    folder = tmp_path / "one"
    datasets.Dataset.from_dict(qa_rows(20)).save_to_disk(str(folder))
    got = M.load_datasets(DataConfig(path=str(folder), columns=QA, valid_fraction=0.25, cache=False), tok, seed=1)
    assert (len(got.train), len(got.valid), got.test) == (15, 5, None)
    again = M.load_datasets(DataConfig(path=str(folder), columns=QA, valid_fraction=0.25, cache=False), tok, seed=1)
    assert targets(tok, again.valid) == targets(tok, got.valid)  # the split depends on the seed only


def test_unmapped_columns_keep_their_names(tmp_path, tok):
    """A preset-free data set already in a format's shape needs no mapping; mapping one field
    keeps the others (dolly: input <- context, output <- response)."""
    folder = tmp_path / "dolly"
    datasets.Dataset.from_dict(
        {"instruction": ["Say hi.", "Say bye."], "context": ["", "politely"], "response": ["hi", "bye"]}
    ).save_to_disk(str(folder))
    got = M.load_datasets(
        DataConfig(
            path=str(folder), columns={"input": "context", "output": "response"}, valid_fraction=0.0, cache=False
        ),
        tok,
    )
    assert got.train.stats.format == "alpaca"
    assert targets(tok, got.train) == ["hi<|im_end|>", "bye<|im_end|>"]


def test_columns_map_jsonl_too(tmp_path, tok):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": q, "answer": a}) + "\n"
            for q, a in zip(qa_rows(3)["question"], qa_rows(3)["answer"])
        )
    )
    got = M.load_datasets(DataConfig(path=str(path), columns=QA, valid_fraction=0.0, cache=False), tok)
    assert targets(tok, got.train) == [f" zebra-{i}<|im_end|>" for i in range(3)]


def test_missing_column_is_one_error_listing_the_columns(tmp_path, tok):
    folder = save_dict(tmp_path / "qa", train=qa_rows(3))
    with pytest.raises(DataError) as e:
        M.load_datasets(DataConfig(path=str(folder), columns={"prompt": "query", "completion": "answer"}), tok)
    msg = str(e.value)
    assert "\n" not in msg and "'query'" in msg and "columns: question, answer, category" in msg
    assert msg.startswith(f"{folder}[train], field 'data.columns'")
    with pytest.raises(DataError) as e:  # a forced format whose fields the data set lacks
        M.load_datasets(DataConfig(path=str(folder), format="completions"), tok)
    assert str(e.value) == (
        f"{folder}[train], field 'data.columns': no column 'prompt', which completions rows "
        "need for field 'prompt' (columns: question, answer, category); map one with data.columns"
    )


def test_bad_row_names_source_and_row_index(tmp_path, tok):
    rows = qa_rows(4)
    rows["answer"][2] = None
    folder = save_dict(tmp_path / "qa", train=rows)
    with pytest.raises(DataError) as e:
        M.load_datasets(DataConfig(path=str(folder), columns=QA, cache=False), tok)
    assert str(e.value).startswith(f"{folder}[train] row 2, field 'completion': ")


def test_token_cache_is_keyed_by_the_data_set(tmp_path, tok):
    folder = save_dict(tmp_path / "qa", train=qa_rows(5))
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(folder), columns=QA, valid_fraction=0.0)
    first = M.load_datasets(cfg, tok, cache_dir=cache)
    files = sorted(cache.iterdir())
    assert len(files) == 1
    again = M.load_datasets(cfg, tok, cache_dir=cache)  # read from the cache: same examples
    assert targets(tok, again.train) == targets(tok, first.train) and sorted(cache.iterdir()) == files
    other = M.load_datasets(
        DataConfig(path=str(folder), columns={"text": "question"}, format="text", valid_fraction=0.0),
        tok,
        cache_dir=cache,
    )
    assert other.train.stats.format == "text" and len(list(cache.iterdir())) == 2
    save_dict(tmp_path / "qa2", train=qa_rows(5, "x"))  # new data, new key
    import shutil

    shutil.rmtree(folder)
    (tmp_path / "qa2").rename(folder)
    changed = M.load_datasets(cfg, tok, cache_dir=cache)
    assert targets(tok, changed.train) == [f" zebra-x{i}<|im_end|>" for i in range(5)]


# ----------------------------------------------------------------------------------------------
# the hub


def test_hub_id_offline_says_what_to_do(tmp_path, monkeypatch, tok):
    """The real datasets.load_dataset, offline and with an empty cache."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        M.load_datasets(DataConfig(path="hf:nobody-here/no-such-set@train"), tok)
    msg = str(e.value)
    assert msg.startswith("hf:nobody-here/no-such-set@train: not in the local datasets cache, and offline mode")
    assert "network access" in msg and "\n" not in msg


def test_hub_ids_load_with_their_presets(tmp_path, monkeypatch, tok):
    """``hf:HuggingFaceH4/ultrachat_200k`` trains on train_sft and validates on test_sft (its
    preset); an unknown name loads all splits with our names."""
    calls = []
    chat = {
        "prompt": ["hi"] * 3,
        "prompt_id": ["x"] * 3,
        "messages": [
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"hello {i}"}] for i in range(3)
        ],
    }

    def fake_load(name, config=None, **kw):
        calls.append((name, config, kw))
        if name == "HuggingFaceH4/ultrachat_200k":
            return datasets.DatasetDict(
                {s: datasets.Dataset.from_dict(chat) for s in ("train_sft", "test_sft", "train_gen", "test_gen")}
            )
        return datasets.DatasetDict(
            {"train": datasets.Dataset.from_dict(qa_rows(4)), "validation": datasets.Dataset.from_dict(qa_rows(2, "v"))}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = M.load_datasets(DataConfig(path="hf:HuggingFaceH4/ultrachat_200k", cache=False), tok)
    assert calls[-1][:2] == ("HuggingFaceH4/ultrachat_200k", None)
    assert got.train.stats.path == "hf:HuggingFaceH4/ultrachat_200k@train_sft"
    assert got.valid.stats.path == "hf:HuggingFaceH4/ultrachat_200k@test_sft" and got.test is None
    assert got.train.stats.format == "chat" and targets(tok, got.train)[2] == "hello 2<|im_end|>\n"

    got = M.load_datasets(DataConfig(path="hf:me/qa:main@validation", columns=QA, cache=False), tok)
    assert calls[-1][:2] == ("me/qa", "main")
    assert got.train.stats.path == "hf:me/qa:main@validation" and len(got.train) + len(got.valid) == 2
    with pytest.raises(DataError, match=r"hf:me/qa@dev: no split 'dev' \(splits: train, validation\)"):
        M.load_datasets(DataConfig(path="hf:me/qa@dev", columns=QA), tok)


# ----------------------------------------------------------------------------------------------
# mixing


def test_epoch_shares_follow_the_weights():
    assert M.epoch_shares([100, 100], [1, 1]) == [100, 100]
    assert M.epoch_shares([100, 50], [1, 2]) == [50, 100]
    assert M.epoch_shares([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert sum(M.epoch_shares([7, 11, 5], [0.3, 1.7, 2.0])) == 23


def test_mixture_counts_over_an_epoch_and_is_deterministic(tmp_path, tok):
    a = save_dict(tmp_path / "a", train=qa_rows(30, "a"))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"prompt": f"Say b{i}.", "completion": f" b{i}"}) + "\n" for i in range(10)))
    cfg = DataConfig(
        sources=[{"path": str(a), "weight": 1, "columns": QA}, {"path": str(b), "weight": 3}],
        valid_fraction=0.0,
        cache=False,
    )
    mixed = M.load_datasets(cfg, tok, seed=7).train
    assert len(mixed) == 40 and mixed.shares == [10, 30]
    text = lambda ds: targets(tok, ds)
    seen = Counter()
    for epoch in range(3):
        view = text(mixed.for_epoch(7, epoch))
        assert len(view) == 40
        from_b = [t for t in view if t.startswith(" b")]
        assert len(from_b) == 30 and len(view) - len(from_b) == 10
        # the small source is repeated as evenly as it can be: 3 times each
        assert set(Counter(from_b).values()) == {3}
        # the large one gives 10 distinct rows, a new draw each epoch
        from_a = [t for t in view if not t.startswith(" b")]
        assert len(set(from_a)) == 10
        seen.update(from_a)
    assert len(seen) > 10
    # a pure function of seed and epoch
    again = M.load_datasets(cfg, tok, seed=7).train
    assert text(again.for_epoch(7, 1)) == text(mixed.for_epoch(7, 1))
    assert text(mixed.for_epoch(8, 1)) != text(mixed.for_epoch(7, 1))
    # what training iterates: every epoch is the sample of that epoch
    batches = D.iterate_batches(mixed, 8, max_seq_length=64, seed=7, loop=False)
    n = 0
    for batch, _ in batches:
        n += len(batch.inputs)
    assert n == 40


def test_mixture_validation_per_source(tmp_path, tok):
    a = save_dict(tmp_path / "a", train=qa_rows(8, "a"), validation=qa_rows(3, "va"))
    b = make_tiny_dataset(tmp_path / "b.jsonl", "completions", n=20)
    cfg = DataConfig(
        sources=[{"path": str(a), "columns": QA}, {"path": str(b), "weight": 0.5}], valid_fraction=0.1, cache=False
    )
    got = M.load_datasets(cfg, tok)
    assert len(got.train) == 8 + 18 and len(got.valid) == 3 + 2
    lines = got.train.source_lines(64)
    assert (
        lines[0]
        == f"source 1  {a}[train] (completions): 8 rows -> 8 examples; weight 1 -> 17/epoch (2.12x, repeated); valid 3 (split)"
    )
    assert (
        lines[1]
        == f"source 2  {b} (completions): 18 rows -> 18 examples; weight 0.5 -> 9/epoch (0.50x); valid 2 (held out)"
    )


@pytest.mark.parametrize(
    "sources, fragment",
    [
        ([], "data.sources: expected a list"),
        ("a.jsonl", "data.sources[0]: expected a mapping"),
        (["a.jsonl"], "data.sources[0]: expected a mapping"),
        ([{"weight": 1}], "data.sources[0].path: required"),
        ([{"path": "a.jsonl", "weight": 0}], "data.sources[0].weight: must be > 0, got 0"),
        ([{"path": "a.jsonl", "weight": float("nan")}], "data.sources[0].weight: must be a finite number"),
        ([{"path": "a.jsonl", "weight": "heavy"}], "data.sources[0].weight: expected float, got 'heavy'"),
        ([{"path": "a.jsonl", "wieght": 2}], "data.sources[0]: unknown key 'wieght'"),
        ([{"path": "a.jsonl", "format": "csv"}], "data.sources[0].format: 'csv' is not one of auto,"),
        ([{"path": "hf:org/x:a:b"}], "data.sources[0].path: hf:org/x:a:b: bad config"),
        ([{"path": "a.jsonl", "columns": "question"}], "data.sources[0].columns: expected a mapping"),
        ([{"path": "a.jsonl", "columns": {"solution": "x"}}], "data.sources[0].columns: 'solution' is not a field"),
        ([{"path": "a.jsonl", "split": ["x"]}], "data.sources[0].split: expected a split name"),
    ],
)
def test_bad_source_specs_are_config_errors(sources, fragment):
    with pytest.raises(ConfigError) as e:
        build(extra={"model": {"path": "m"}, "data": {"sources": sources}})
    assert fragment in str(e.value)


def test_bad_columns_and_path_with_sources():
    with pytest.raises(ConfigError, match="data.columns: 'solution' is not a field of any data format"):
        build(extra={"model": {"path": "m"}, "data": {"path": "x.jsonl", "columns": {"solution": "a"}}})
    with pytest.raises(ConfigError, match="set either data.path or data.sources"):
        build(extra={"model": {"path": "m"}, "data": {"path": "x", "sources": [{"path": "y"}]}})
    cfg = build(
        extra={"model": {"path": "m"}, "data": {"path": "x.jsonl"}},
        overrides=["data.columns={prompt: q, completion: a}"],
    )
    assert cfg.data.columns == {"prompt": "q", "completion": "a"}


# ----------------------------------------------------------------------------------------------
# training


def _cfg(model, out, data, **sets):
    items = [f"{k}={v}" for k, v in sets.items()]
    base = {
        "model": {"path": str(model)},
        "data": dict(valid_fraction=0.0, **data),
        "out": str(out),
        "train": {"log_every": 1, "save_every": 1000, "eval_every": 1000},
    }
    return build(extra=base, overrides=items)


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, m):
        if m["step"] == self.step:
            raise KeyboardInterrupt


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_datasets_folder_trains(tiny_model_dir, tmp_path, cli_env):
    folder = save_dict(tmp_path / "qa", train=qa_rows(8))
    cfg = _cfg(
        tiny_model_dir("llama", init_std=0.2),
        tmp_path / "run",
        {"path": str(folder), "columns": QA},
        **{"train.iters": 60, "train.lr": 3e-3, "train.batch_size": 8, "lora.r": 16, "train.warmup_steps": 10},
    )
    mlx_lora.train(cfg, progress=False)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 60 and losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_resume_mid_epoch_with_mixed_sources_equals_uninterrupted(tiny_llama, tmp_path, cli_env):
    """Two sources of 6 and 3 examples at weights 1:2 (the small one repeated), batch 2: an
    epoch is 5 steps; the run stops at step 7, in the second epoch, and resumes."""
    a = save_dict(tmp_path / "a", train=qa_rows(6, "a"))
    b = make_tiny_dataset(tmp_path / "b.jsonl", "completions", n=3, seed=1)
    data = {"sources": [{"path": str(a), "columns": QA, "weight": 1}, {"path": str(b), "weight": 2}]}
    sets = {
        "train.iters": 12,
        "train.lr": 3e-3,
        "train.batch_size": 2,
        "lora.dropout": 0.1,
        "train.seed": 3,
        "train.save_every": 7,
    }
    full, part = tmp_path / "full", tmp_path / "part"
    mlx_lora.train(_cfg(tiny_llama, full, data, **sets), progress=False)
    r1 = mlx_lora.train(_cfg(tiny_llama, part, data, **sets), progress=False, callbacks=[StopAt(7)])
    assert r1.stopped == "interrupted" and r1.steps == 7
    r2 = mlx_lora.train(build(str(part / "config.yaml")), resume=True, progress=False)
    assert r2.steps == 12
    np.testing.assert_allclose(_losses(part), _losses(full), rtol=1e-4)
    import mlx.core as mx

    a_w = mx.load(str(full / "adapter_model.safetensors"))
    b_w = mx.load(str(part / "adapter_model.safetensors"))
    for k in a_w:
        np.testing.assert_allclose(np.array(a_w[k]), np.array(b_w[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_cli_banner_and_refusals(tiny_llama, tmp_path, cli_env, capsys):
    from cli_harness import run_main

    a = save_dict(tmp_path / "a", train=qa_rows(6, "a"))
    folder = save_dict(tmp_path / "qa", train=qa_rows(4))
    run = tmp_path / "run"
    assert_refused(
        capsys,
        [
            "train",
            "--model",
            str(tiny_llama),
            "--data",
            str(folder),
            "--out",
            str(run),
            "--set",
            "data.columns={prompt: query}",
        ],
        [
            f"error: {folder}[train], field 'data.columns': data.columns maps 'prompt' to column 'query'",
            "columns: question, answer, category",
        ],
        [tmp_path],
    )
    assert_refused(
        capsys,
        ["train", "--model", str(tiny_llama), "--data", "hf:bad/na me", "--out", str(run)],
        ["error: hf:bad/na me: bad data set name"],
        [tmp_path],
    )
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": {"path": str(tiny_llama)},
                "out": str(run),
                "data": {"sources": [{"path": str(a), "columns": QA}, {"path": str(tmp_path / "missing.jsonl")}]},
            }
        )
    )
    assert_refused(
        capsys, ["train", "--config", str(cfg)], ["missing.jsonl", "data.sources[1].path", "no such file"], [tmp_path]
    )
    cfg.write_text(
        json.dumps(
            {
                "model": {"path": str(tiny_llama)},
                "out": str(run),
                "data": {
                    "valid_fraction": 0.2,
                    "sources": [{"path": str(a), "columns": QA, "weight": 3}, {"path": str(folder), "columns": QA}],
                },
                "train": {"iters": 1},
            }
        )
    )
    code, out, err = run_main(capsys, ["train", "--config", str(cfg)])
    assert code == 0, err
    assert f"source 1  {a}[train] (completions): 5 rows -> 5 examples; weight 3 -> 6/epoch (1.20x, repeated)" in err
    assert f"source 2  {folder}[train] (completions): 3 rows -> 3 examples; weight 1 -> 2/epoch (0.67x); valid 1" in err
    assert "train     2 sources: 8 examples (mixed)" in err and "valid     2 sources: 2 examples (mixed)" in err


def test_resume_refuses_other_sources_or_their_order():
    from mlx_lora.training.resume import refused_changes

    a, b = {"path": "a.jsonl", "weight": 1}, {"path": "hf:org/b", "weight": 2}
    cfg = lambda *srcs: build(extra={"model": {"path": "m"}, "data": {"sources": list(srcs)}})
    assert refused_changes(cfg(a, b), cfg(a, b), 4, 4) == []
    for other in (cfg(b, a), cfg(a, dict(b, weight=3)), cfg(a)):
        assert [c.key for c in refused_changes(cfg(a, b), other, 4, 4)] == ["data.sources"]


def test_eval_scores_a_data_sets_test_split(tiny_llama, tmp_path, cli_env, capsys):
    from cli_harness import run_main

    folder = save_dict(tmp_path / "qa", train=qa_rows(4), validation=qa_rows(2, "v"), test=qa_rows(3, "t"))
    code, out, err = run_main(
        capsys,
        [
            "eval",
            "--model",
            str(tiny_llama),
            "--data",
            str(folder),
            "--json",
            "--column",
            "prompt=question",
            "--column",
            "completion=answer",
        ],
    )
    assert code == 0, err
    got = json.loads(out)
    assert got["path"] == f"{folder}[test]" and got["examples"] == 3 and np.isfinite(got["loss"])
    one = tmp_path / "one"
    datasets.Dataset.from_dict(qa_rows(5)).save_to_disk(str(one))
    r = mlx_lora.commands.api.evaluate(str(tiny_llama), str(one), columns=QA)
    assert r["path"] == str(one) and r["examples"] == 5
    assert_refused(
        capsys,
        ["eval", "--model", str(tiny_llama), "--data", str(folder), "--column", "answer"],
        ["--column 'answer': expected FIELD=COLUMN"],
        [tmp_path],
    )
    assert_refused(
        capsys,
        ["eval", "--model", str(tiny_llama), "--data", str(folder), "--column", "solution=x"],
        ["--column: 'solution' is not a field of any data format"],
        [tmp_path],
    )
