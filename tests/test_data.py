"""Data pipeline: formats, masking, errors, truncation, splits, bucketing, packing, resume, cache.

Expectations come from the formats themselves: the text a target mask selects is decoded and
compared with the assistant/completion text the row contains; padding waste is compared with the
value derived from the length distribution's quantile function."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from mlx_lora.config import DataConfig
from mlx_lora.data import examples as D
from mlx_lora.data import mixture as M
from mlx_lora.plumbing.errors import DataError

# ----------------------------------------------------------------------------------------------
# a real tokenizer: byte-level BPE trained on a fixed string

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello there! How are you today? I am fine, thank "
    "you. What is two plus two? Two plus two is four. Be nice. user assistant system tool "
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. ### Instruction: ### "
    'Input: ### Response: Translate to French: bonjour le monde. 0123456789 {"name": "add"}'
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=520,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return tok.to_str()


def make_tokenizer(bpe_json: str, chat_template=CHATML, bos: bool = False):
    """HF fast tokenizer; with ``bos`` it declares <s> and adds it in front of every encoding."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(bpe_json)
    kwargs = {}
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
        **kwargs,
    )


@pytest.fixture(scope="module")
def tok(bpe):
    return make_tokenizer(bpe)


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def write_jsonl(path: Path, rows) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings/bytes written as they are."""
    parts = []
    for r in rows:
        if isinstance(r, bytes):
            parts.append(r)
        elif isinstance(r, str):
            parts.append(r.encode())
        else:
            parts.append(json.dumps(r).encode())
    path.write_bytes(b"\n".join(parts) + b"\n")
    return path


def load(tmp_path, rows, tok, name="d.jsonl", **cfg):
    cfg.setdefault("cache", False)
    return D.load_jsonl_dataset(write_jsonl(tmp_path / name, rows), DataConfig(**cfg), tok)


def targets(tok, example) -> str:
    tokens, mask = example
    return decode(tok, tokens[mask])


def target_runs(tok, example) -> list[str]:
    """Decoded text of each contiguous run of target tokens."""
    tokens, mask = example
    runs, cur = [], []
    for t, m in zip(tokens, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(decode(tok, cur))
            cur = []
    if cur:
        runs.append(decode(tok, cur))
    return runs


CONV = {
    "messages": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
    ]
}


# ----------------------------------------------------------------------------------------------
# formats and masking


def test_chat_every_assistant_turn_is_a_target_including_end_of_turn(tmp_path, tok):
    ds = load(tmp_path, [CONV], tok)
    assert ds.stats.format == "chat"
    ex = ds.examples[0]
    # ChatML ends an assistant turn with <|im_end|>\n; the model must learn to emit it to stop.
    assert target_runs(tok, ex) == ["Hello there!<|im_end|>\n", "Two plus two is four.<|im_end|>\n"]
    full = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONV["messages"])
    assert decode(tok, ex[0]) == full
    assert ex[0].dtype == np.int32 and ex[1].dtype == bool
    assert ds.stats.target_tokens == int(ex[1].sum()) and ds.stats.total_tokens == len(ex[0])


def test_train_on_last_and_all(tmp_path, tok):
    last = load(tmp_path, [CONV], tok, train_on="last").examples[0]
    assert target_runs(tok, last) == ["Two plus two is four.<|im_end|>\n"]
    _, mask = load(tmp_path, [CONV], tok, train_on="all").examples[0]
    assert not mask[0] and mask[1:].all()


def test_completions_and_text(tmp_path, tok):
    rows = [{"prompt": "What is two plus two? ", "completion": "Four."}]
    ex = load(tmp_path, rows, tok).examples[0]
    assert D.load_jsonl_dataset(tmp_path / "d.jsonl", DataConfig(cache=False), tok).stats.format == "completions"
    assert targets(tok, ex) == "Four.<|endoftext|>"
    assert decode(tok, ex[0]) == "What is two plus two? Four.<|endoftext|>"
    tokens, mask = load(tmp_path, rows, tok, train_on="all").examples[0]
    assert not mask[0] and mask[1:].all()

    ds = load(tmp_path, [{"text": "The quick brown fox."}], tok)
    tokens, mask = ds.examples[0]
    assert ds.stats.format == "text"
    assert decode(tok, tokens) == "The quick brown fox.<|endoftext|>"
    assert not mask[0] and mask[1:].all()


def test_alpaca_prompt_with_and_without_input(tmp_path, tok):
    rows = [
        {"instruction": "Translate to French.", "input": "hello world", "output": "bonjour le monde"},
        {"instruction": "Say hello.", "output": "Hello there!"},
        {"instruction": "Say hello.", "input": None, "output": "Hello there!"},
    ]
    ds = load(tmp_path, rows, tok)
    assert ds.stats.format == "alpaca"
    with_input, no_input, null_input = (decode(tok, t) for t, _ in ds.examples)
    assert with_input.endswith(
        "### Instruction:\nTranslate to French.\n\n### Input:\nhello world\n\n### Response:\nbonjour le monde<|endoftext|>"
    )
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:" not in no_input and no_input.endswith("### Response:\nHello there!<|endoftext|>")
    assert null_input == no_input
    assert [targets(tok, e) for e in ds.examples] == ["bonjour le monde<|endoftext|>"] + [
        "Hello there!<|endoftext|>"
    ] * 2


def test_sharegpt_matches_the_equivalent_chat_row(tmp_path, tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CONV["messages"]]}
    ds = load(tmp_path, [share], tok)
    assert ds.stats.format == "sharegpt"
    chat = load(tmp_path, [CONV], tok, name="c.jsonl").examples[0]
    assert np.array_equal(ds.examples[0][0], chat[0]) and np.array_equal(ds.examples[0][1], chat[1])


def test_format_override_checks_every_row(tmp_path, tok):
    ds = load(tmp_path, [{"text": "Hello", "prompt": "a", "completion": "b"}], tok, format="text")
    assert decode(tok, ds.examples[0][0]) == "Hello<|endoftext|>"
    with pytest.raises(DataError) as e:
        load(tmp_path, [{"text": "Hello"}, {"prompt": "a", "completion": "b"}], tok, format="text")
    assert e.value.line == 2 and e.value.field == "text" and "completions" in str(e.value)


def test_builtin_chatml_template_and_tools(tmp_path, bpe):
    tok = make_tokenizer(bpe, chat_template=None)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    row = {
        "messages": [
            {"role": "user", "content": "What is two plus two?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}],
            },
            {"role": "tool", "content": "4"},
            {"role": "assistant", "content": "Four."},
        ],
        "tools": tools,
    }
    ex = load(tmp_path, [row], tok, chat_template="chatml").examples[0]
    text = decode(tok, ex[0])
    assert text.startswith("<|im_start|>system\n") and json.dumps(tools[0]) in text
    assert target_runs(tok, ex) == [
        '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call><|im_end|>\n',
        "Four.<|im_end|>\n",
    ]
    # A .jinja path works the same as the built-in name.
    src = Path(D.__file__).parents[1] / "templates" / "chatml.jinja"
    again = load(tmp_path, [row], tok, chat_template=str(src)).examples[0]
    assert np.array_equal(again[0], ex[0])


def test_bos_added_once(tmp_path, bpe):
    bos = make_tokenizer(bpe, bos=True)
    bos_id = bos.convert_tokens_to_ids("<s>")
    ex = load(tmp_path, [CONV], bos).examples[0]  # template without BOS: we add the tokenizer's
    assert ex[0][0] == bos_id and (ex[0] == bos_id).sum() == 1
    assert target_runs(bos, ex) == ["Hello there!<|im_end|>\n", "Two plus two is four.<|im_end|>\n"]
    with_bos = make_tokenizer(bpe, chat_template="{{ bos_token }}" + CHATML, bos=True)
    ex2 = load(tmp_path, [CONV], with_bos).examples[0]  # template already renders it: not twice
    assert np.array_equal(ex2[0], ex[0]) and np.array_equal(ex2[1], ex[1])
    tokens, mask = load(tmp_path, [{"text": "Hello"}], bos).examples[0]
    assert tokens[0] == bos_id and not mask[0] and mask[1:].all()
    # The plain tokenizer adds no BOS.
    assert load(tmp_path, [CONV], make_tokenizer(bpe)).examples[0][0][0] != bos_id


def test_mlx_lm_tokenizer_wrapper_gives_the_same_examples(tmp_path, tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    rows = [CONV, CONV]
    a = load(tmp_path, rows, tok)
    b = load(tmp_path, rows, TokenizerWrapper(tok))
    for (t1, m1), (t2, m2) in zip(a.examples, b.examples):
        assert np.array_equal(t1, t2) and np.array_equal(m1, m2)


def test_no_chat_template_is_an_error_that_says_what_to_set(tmp_path, bpe):
    with pytest.raises(DataError) as e:
        load(tmp_path, [CONV], make_tokenizer(bpe, chat_template=None))
    assert "data.chat_template: chatml" in str(e.value) and e.value.line == 1


def test_inconsistently_tokenizing_template_is_an_error(tmp_path, bpe):
    # The generation prompt ends in a space that BPE merges into the answer's first word, so the
    # prefix does not tokenize to a prefix of the whole conversation.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = make_tokenizer(bpe, chat_template=template)
    head = tok.encode("user: Hello\nassistant: ", add_special_tokens=False)
    full = tok.encode("user: Hello\nassistant: Hello there!\n", add_special_tokens=False)
    assert full[: len(head)] != head  # the premise of this test
    conv = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there!"}]}
    with pytest.raises(DataError) as e:
        load(tmp_path, [conv, conv], tok)
    assert "template does not tokenize consistently" in str(e.value)
    assert e.value.line == 1 and e.value.field == "messages[1]"
    # train_on: all needs no turn boundaries, so the same template works there.
    assert load(tmp_path, [conv], tok, train_on="all").stats.examples == 1


# ----------------------------------------------------------------------------------------------
# errors name file, line and field


@pytest.mark.parametrize(
    "rows, line, field, words",
    [
        ([CONV, "", '{"messages": [}'], 3, None, "invalid JSON"),
        ([CONV, "[1, 2]"], 2, None, "expected a JSON object, got a list"),
        ([CONV, {"messages": "hi"}], 2, "messages", "expected a list"),
        ([CONV, {"messages": [{"role": "user", "content": 3}]}], 2, "messages[0].content", "expected a string"),
        ([CONV, {"messages": [{"role": "user"}]}], 2, "messages[0].content", "missing key"),
        ([CONV, {"messages": [{"content": "x"}]}], 2, "messages[0].role", "missing key"),
        ([CONV, {"messages": [{"role": "robot", "content": "x"}]}], 2, "messages[0].role", "unknown role"),
        ([CONV, {"messages": ["hi"]}], 2, "messages[0]", "expected an object"),
        ([CONV, {"text": "x"}], 2, "messages", "text format"),
        ([CONV, {"foo": 1}], 2, "messages", "missing key"),
        ([{"conversations": [{"from": "bot", "value": "x"}]}], 1, "conversations[0].from", "unknown role"),
        ([{"prompt": "a", "completion": 5}], 1, "completion", "expected a string"),
        ([{"instruction": "a", "input": 3, "output": "b"}], 1, "input", "expected a string"),
        ([{"messages": CONV["messages"], "tools": 5}], 1, "tools", "expected a list of tools"),
        ([{"question": "a", "answer": "b"}], 1, None, "unknown format"),
        (["", CONV, b'{"text": "caf\xe9"}'], 3, None, "not UTF-8"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, tok, rows, line, field, words):
    path = tmp_path / "bad.jsonl"
    with pytest.raises(DataError) as e:
        load(tmp_path, rows, tok, name="bad.jsonl")
    err = e.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert words in str(err) and f"{path}:{line}" in str(err)


def test_missing_and_empty_inputs(tmp_path, tok):
    cases = {}
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    cases["empty.jsonl"] = "empty file"
    cases["nope.jsonl"] = "no such file"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "valid.jsonl").write_text(json.dumps(CONV))
    cases["folder"] = "no train.jsonl"
    for name, words in cases.items():
        with pytest.raises(DataError) as e:
            M.load_datasets(DataConfig(path=str(tmp_path / name), cache=False), tok)
        assert words in str(e.value) and str(tmp_path / name) in str(e.value)
    with pytest.raises(DataError):
        M.load_datasets(DataConfig(path=None), tok)


# ----------------------------------------------------------------------------------------------
# truncation, skipping, nothing to learn


def test_overlong_truncate_skip_error_are_counted(tmp_path, tok):
    short = {"prompt": "Hi ", "completion": "Hello there!"}
    long = {"prompt": "Hi ", "completion": "The quick brown fox jumps over the lazy dog. " * 3}
    long_prompt = {"prompt": "The quick brown fox jumps over the lazy dog. " * 3, "completion": "Hello"}
    rows = [short, long, long_prompt, short]
    n_long = len(load(tmp_path, [long], tok, name="l.jsonl").examples[0][0])
    n_short = len(load(tmp_path, [short], tok, name="s.jsonl").examples[0][0])
    limit = 12
    assert n_short <= limit < n_long

    ds = load(tmp_path, rows, tok, max_seq_length=limit, overlong="truncate")
    # the long completion is cut (kept); the long prompt leaves no target after the cut (skipped)
    assert (ds.stats.rows, ds.stats.examples, ds.stats.truncated, ds.stats.skipped) == (4, 3, 1, 1)
    assert max(len(t) for t, _ in ds.examples) == limit
    assert list(ds.lines) == [1, 2, 4]

    ds = load(tmp_path, rows, tok, max_seq_length=limit, overlong="skip")
    assert (ds.stats.examples, ds.stats.truncated, ds.stats.skipped) == (2, 0, 2)
    assert ds.stats.total_tokens == 2 * n_short

    with pytest.raises(DataError) as e:
        load(tmp_path, rows, tok, max_seq_length=limit, overlong="error")
    assert e.value.line == 2 and "max_seq_length" in str(e.value)


def test_rows_without_targets_are_skipped_and_all_skipped_is_an_error(tmp_path, tok):
    no_answer = {"messages": [{"role": "user", "content": "Hello"}]}
    ds = load(tmp_path, [CONV, no_answer], tok)
    assert (ds.stats.examples, ds.stats.skipped) == (1, 1)
    with pytest.raises(DataError) as e:
        load(tmp_path, [no_answer, no_answer], tok)
    assert "nothing to learn" in str(e.value) and e.value.path == str(tmp_path / "d.jsonl")


# ----------------------------------------------------------------------------------------------
# splits


def test_single_file_split_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"text": f"row {i} " + "fox " * (i % 5)} for i in range(40)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    cfg = DataConfig(path=str(path), valid_fraction=0.1, cache=False)
    a = M.load_datasets(cfg, tok, seed=3)
    b = M.load_datasets(cfg, tok, seed=3)
    c = M.load_datasets(cfg, tok, seed=4)
    assert (a.train.stats.rows, a.valid.stats.rows, a.test) == (36, 4, None)
    assert set(a.train.lines) | set(a.valid.lines) == set(range(1, 41))
    assert not set(a.train.lines) & set(a.valid.lines)
    assert list(a.valid.lines) == list(b.valid.lines) and list(a.valid.lines) != list(c.valid.lines)
    two = M.load_datasets(
        DataConfig(path=str(write_jsonl(tmp_path / "two.jsonl", rows[:2])), valid_fraction=0.01, cache=False), tok
    )
    assert (len(two.train), len(two.valid)) == (1, 1)
    none = M.load_datasets(DataConfig(path=str(path), valid_fraction=0.0, cache=False), tok)
    assert none.valid is None and len(none.train) == 40


def test_folder_with_train_valid_test(tmp_path, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [CONV] * 5)
    write_jsonl(folder / "valid.jsonl", [{"text": "Hello"}] * 2)
    write_jsonl(folder / "test.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    s = M.load_datasets(DataConfig(path=str(folder), cache=False), tok)
    assert (len(s.train), len(s.valid), len(s.test)) == (5, 2, 3)
    assert (s.train.stats.format, s.valid.stats.format, s.test.stats.format) == ("chat", "text", "completions")
    only_test = M.load_datasets(DataConfig(path=str(folder), cache=False), tok, splits=("test",))
    assert only_test.train is None and only_test.valid is None and len(only_test.test) == 3


# ----------------------------------------------------------------------------------------------
# batching


def synthetic(lengths, seed=0) -> D.TokenizedDataset:
    """Examples of the given token counts; tokens are distinct per example so rows can be traced."""
    rng = np.random.default_rng(seed)
    ex = []
    for i, n in enumerate(lengths):
        tokens = np.full(n, i + 1, np.int32)
        mask = rng.random(n) < 0.7
        mask[0], mask[-1] = False, True
        ex.append((tokens, mask))
    return D.TokenizedDataset(ex, D.DataStats("synthetic", "text", len(ex), len(ex), 0, 0, 0, 0))


def rows_of(batch: D.Batch) -> list[tuple[int, ...]]:
    """Each row's real input positions as a tuple of token ids (padding dropped)."""
    out = []
    for b in range(batch.inputs.shape[0]):
        real = batch.segments[b] > 0 if batch.segments is not None else None
        if real is None:
            n = int(np.max(np.nonzero(batch.inputs[b])[0], initial=-1)) + 1
            real = np.arange(batch.inputs.shape[1]) < n
        out.append(tuple(batch.inputs[b][real].tolist()))
    return out


def test_batch_contents_match_examples(tmp_path, tok):
    ds = load(tmp_path, [CONV, {"messages": CONV["messages"][:3]}], tok)
    (batch, pos), *rest = list(D.iterate_batches(ds, 2, max_seq_length=512, seed=0, loop=False, pad_multiple=32))
    assert not rest and pos == D.BatchPosition(1, 0)
    assert batch.inputs.shape[1] % 32 == 0 and batch.segments is None
    used = []
    for b in range(2):
        # the longest example whose shifted tokens this row holds (the shorter one is a prefix of it)
        for e in sorted(range(2), key=lambda i: -len(ds.examples[i][0])):
            tokens, mask = ds.examples[e]
            m = len(tokens) - 1
            if np.array_equal(batch.inputs[b, :m], tokens[:-1]) and np.array_equal(batch.targets[b, :m], tokens[1:]):
                break
        else:
            pytest.fail(f"row {b} holds no example")
        used.append(e)
        assert np.array_equal(batch.loss_mask[b, :m], mask[1:].astype(np.float32))
        assert not batch.loss_mask[b, m:].any() and not batch.inputs[b, m:].any()
    assert sorted(used) == [0, 1]
    assert batch.ntokens == sum(int(m[1:].sum()) for _, m in ds.examples)


def test_length_bucketing_pads_far_less_than_random_batches():
    """Padding waste = 1 - real positions / padded area. For B i.i.d. lengths with quantile function
    Q, random batches waste 1 - E[X] / E[max of B] with E[max of B] = int_0^1 Q(u) B u^(B-1) du.
    Bucketing sorts chunks of C = 50 B, so batch k holds order statistics kB+1..(k+1)B, padded to
    X_((k+1)B) ~ Q((k+1)B / (C+1)); waste ~ 1 - sum_i Q(i/(C+1)) / sum_k B Q((k+1)B/(C+1))."""
    mu, sigma, cap, B, n = np.log(150.0), 0.8, 4096, 8, 4000
    rng = np.random.default_rng(0)
    positions = np.clip(np.rint(np.exp(mu + sigma * rng.standard_normal(n))), 1, cap).astype(int)
    ds = synthetic(positions + 1)

    def Q(u):
        return np.minimum(np.exp(mu + sigma * np.array([NormalDist().inv_cdf(float(x)) for x in u])), cap)

    u = (np.arange(20000) + 0.5) / 20000
    expected_naive = 1 - Q(u).mean() / (Q(u) * B * u ** (B - 1)).mean()
    C = D.BUCKET_BATCHES * B
    q = Q(np.arange(1, C + 1) / (C + 1))
    expected_ours = 1 - q.sum() / (B * q[B - 1 :: B]).sum()

    real = area = 0
    for batch, _ in D.iterate_batches(ds, B, max_seq_length=cap, seed=1, loop=False, pad_multiple=1, bucketing=True):
        real += int(sum(len(r) for r in rows_of(batch)))
        area += batch.inputs.size
    ours = 1 - real / area
    perm = rng.permutation(n)
    naive_batches = [positions[perm[i : i + B]] for i in range(0, n, B)]
    naive = 1 - positions.sum() / sum(len(b) * b.max() for b in naive_batches)

    assert abs(naive - expected_naive) < 0.1 * expected_naive  # the naive measurement matches theory
    assert ours < 1.5 * expected_ours  # and ours reaches the bucketed expectation (~7%)
    assert ours < naive / 5  # vs ~61% for random batches

    # Bucketing off: each batch is a random draw, so the waste is the random batches' (~61%), and
    # the epoch still holds every example exactly once.
    real = area = 0
    seen = []
    for batch, _ in D.iterate_batches(ds, B, max_seq_length=cap, seed=1, loop=False, pad_multiple=1, bucketing=False):
        rows = rows_of(batch)
        real += int(sum(len(r) for r in rows))
        area += batch.inputs.size
        seen += [len(r) for r in rows]
    assert abs((1 - real / area) - expected_naive) < 0.1 * expected_naive
    assert sorted(seen) == sorted(positions.tolist())


def test_length_groups_cover_each_row_once_with_the_least_padding():
    """The split is exact (every row once, at most max_rows per group, each group padded to its
    own longest row) and optimal: no split into groups has a lower cost (brute force)."""
    import itertools

    rng = np.random.default_rng(3)

    def cost(groups, lengths, pm, overhead):
        return sum(len(g) * -(-max(lengths[g]) // pm) * pm + overhead for g in groups)

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for k in range(len(rest) + 1):
            for others in itertools.combinations(rest, k):
                left = [x for x in rest if x not in others]
                for p in partitions(left):
                    yield [[first, *others]] + p

    for trial in range(40):
        n = int(rng.integers(1, 7))
        lengths = rng.integers(1, 300, size=n)
        max_rows, overhead = int(rng.integers(1, 5)), int(rng.choice([0, 16, 256]))
        groups = D.length_groups(lengths, max_rows, pad_multiple=32, overhead=overhead)
        rows = np.concatenate([g for g, _ in groups])
        assert sorted(rows.tolist()) == list(range(n))
        for g, length in groups:
            assert 1 <= len(g) <= max_rows and length == -(-lengths[g].max() // 32) * 32
        best = min(
            cost(p, lengths, 32, overhead) for p in partitions(list(range(n))) if all(len(g) <= max_rows for g in p)
        )
        assert cost([g for g, _ in groups], lengths, 32, overhead) == best
    # one row per group when max_rows is 1; the cap bounds the padded length
    assert [(g.tolist(), L) for g, L in D.length_groups(np.array([40, 7, 90]), 1, cap=64)] == [
        ([1], 32),
        ([0], 64),
        ([2], 64),
    ]


def test_pad_multiple_and_cap():
    ds = synthetic([5, 40, 70, 100, 101])
    for batch, _ in D.iterate_batches(ds, 1, max_seq_length=101, seed=0, loop=False, shuffle=False, pad_multiple=32):
        longest = len(rows_of(batch)[0])
        expected = min(-(-longest // 32) * 32, 101)
        assert batch.inputs.shape == (1, expected)


def test_each_epoch_sees_every_example_and_is_deterministic():
    ds = synthetic(np.random.default_rng(1).integers(2, 60, size=23))
    G = 4
    runs = [[rows_of(b) for b, _ in D.iterate_batches(ds, G, max_seq_length=64, seed=s, loop=False)] for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    seen = [r[0] for batch in runs[0] for r in batch]
    assert len(seen) == 24 and set(seen) == set(range(1, 24))  # 23 examples, one repeat tops up the last batch


@pytest.mark.parametrize("packing", [False, True])
def test_num_batches_matches_the_iterator(packing):
    ds = synthetic(np.random.default_rng(5).integers(2, 50, size=41))
    for world in (1, 2):
        n = D.num_batches(ds, 3, max_seq_length=64, packing=packing, world_size=world)
        for epoch in range(3):
            it = D.iterate_batches(
                ds,
                3,
                max_seq_length=64,
                seed=epoch,
                packing=packing,
                world_size=world,
                start=D.BatchPosition(epoch, 0),
                loop=False,
            )
            assert sum(1 for _ in it) == n
    assert D.num_batches(ds, 3, max_seq_length=64) == 14  # ceil(41 / 3)


@pytest.mark.parametrize("packing", [False, True])
def test_batch_plan_is_the_configs_batching(packing):
    """One plan, built from the config, gives the batches training, evaluation and the estimates
    walk: the training order is iterate_batches with the run's keys, its step count is the epoch's."""
    from mlx_lora.config import build
    from mlx_lora.data.batching import BatchPlan

    ds = synthetic(np.random.default_rng(9).integers(2, 50, size=37))
    cfg = build(
        extra={
            "data": {"packing": packing, "max_seq_length": 64, "length_bucketing": True},
            "train": {"batch_size": 2, "grad_accum": 2, "seed": 11},
        },
        check=False,
    )
    rows = lambda batches: [b.inputs.tolist() for b in batches]
    for rank, world in ((0, 1), (1, 2)):
        plan = BatchPlan.for_training(cfg, ds, rank, world)
        direct = D.iterate_batches(
            ds,
            4,
            max_seq_length=64,
            seed=11,
            shuffle=True,
            packing=packing,
            loop=False,
            rank=rank,
            world_size=world,
            bucketing=True,
        )
        assert rows(plan.first_epoch()) == rows(b for b, _ in direct)
        assert plan.steps_per_epoch() == sum(1 for _ in plan.first_epoch())
    ev = BatchPlan.for_evaluation(cfg, ds)
    assert ev.batch_size == 2 and not ev.shuffle and not ev.bucketing
    if not packing:  # packed rows hold several examples and name none
        assert {i for b in ev.first_epoch() for i in b.items.tolist()} == set(range(len(ds)))


def collect(ds, n, **kw):
    it = D.iterate_batches(ds, **kw)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_position_replays_the_remaining_batches(packing):
    ds = synthetic(np.random.default_rng(2).integers(2, 50, size=30))
    kw = {"batch_size": 3, "max_seq_length": 64, "seed": 7, "packing": packing}
    full = collect(ds, 25, **kw)  # crosses at least one epoch boundary
    epochs = {pos.epoch for _, pos in full}
    assert len(epochs) >= 2
    for k in (1, 5, 11, 17):
        resumed = collect(ds, 25 - k, start=full[k - 1][1], **kw)
        for (a, pa), (b, pb) in zip(full[k:], resumed):
            assert pa == pb
            for name in ("inputs", "targets", "loss_mask", "segments"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None and y is None) or np.array_equal(x, y)


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_partition_the_global_batch(packing):
    ds = synthetic(np.random.default_rng(3).integers(2, 50, size=37))
    kw = {"max_seq_length": 64, "seed": 11, "packing": packing, "loop": False}
    whole = [rows_of(b) for b, _ in D.iterate_batches(ds, 6, **kw)]
    ranks = [[rows_of(b) for b, _ in D.iterate_batches(ds, 2, rank=r, world_size=3, **kw)] for r in range(3)]
    assert all(len(r) == len(whole) for r in ranks)
    for i, rows in enumerate(whole):
        assert ranks[0][i] + ranks[1][i] + ranks[2][i] == rows


def test_packing_keeps_examples_apart():
    lengths = np.random.default_rng(4).integers(2, 40, size=50)
    ds = synthetic(lengths)
    cap = 64
    packed_examples = []
    for batch, _ in D.iterate_batches(ds, 4, max_seq_length=cap, seed=0, packing=True, loop=False):
        seg = batch.segments
        assert seg is not None and batch.inputs.shape[1] <= cap
        # padding (segment 0) is never a target
        assert not batch.loss_mask[seg == 0].any()
        mask = D.attention_mask_from_segments(seg)
        B, L = seg.shape
        assert mask.shape == (B, 1, L, L)
        t, s = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
        for b in range(B):
            m = mask[b, 0]
            real = seg[b] > 0
            allowed = (s <= t) & (seg[b][:, None] == seg[b][None, :]) & real[:, None]
            # real queries: exactly causal within their own example; never a padding key
            assert np.array_equal(m[real], allowed[real])
            # padding queries see only themselves, so no softmax row is empty
            assert np.array_equal(m[~real], np.eye(L, dtype=bool)[~real])
            # each segment is one whole example: its positions carry that example's shifted tokens
            for k in range(1, seg[b].max() + 1):
                pos = seg[b] == k
                ids = set(batch.inputs[b][pos].tolist())
                assert len(ids) == 1
                e = ids.pop() - 1
                tokens, tmask = ds.examples[e]
                assert pos.sum() == len(tokens) - 1
                assert np.array_equal(batch.loss_mask[b][pos], tmask[1:])
                packed_examples.append(e)
    assert set(packed_examples) == set(range(50))
    # best-fit decreasing fills rows: total positions need at least ceil(sum / cap) rows
    rows = D.pack(lengths - 1, cap)
    assert sum(len(r) for r in rows) == 50 and all((lengths - 1)[r].sum() <= cap for r in rows)
    assert len(rows) <= int(np.ceil((lengths - 1).sum() / cap)) + 1


# ----------------------------------------------------------------------------------------------
# cache


def test_cache_hit_tamper_and_corruption(tmp_path, bpe, tok, monkeypatch):
    rows = [CONV, {"messages": CONV["messages"][:3]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(path), valid_fraction=0.0)
    first = M.load_datasets(cfg, tok, cache_dir=cache).train
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    second = M.load_datasets(cfg, tok, cache_dir=cache).train
    for (a, m), (b, n) in zip(first.examples, second.examples):
        assert np.array_equal(a, b) and np.array_equal(m, n)
    assert second.stats == first.stats

    # A hit really reads the file: a (valid) file with other tokens changes what loads.
    with np.load(files[0]) as z:
        arrays = dict(z)
    arrays["tokens"] = arrays["tokens"] + 1
    with open(files[0], "wb") as f:
        np.savez(f, **arrays)
    tampered = M.load_datasets(cfg, tok, cache_dir=cache).train
    assert np.array_equal(tampered.examples[0][0], first.examples[0][0] + 1)

    # A corrupt file is ignored and rebuilt.
    files[0].write_bytes(b"not a zip file at all")
    rebuilt = M.load_datasets(cfg, tok, cache_dir=cache).train
    assert np.array_equal(rebuilt.examples[0][0], first.examples[0][0])
    with np.load(files[0]) as z:
        assert np.array_equal(z["tokens"][: len(first.examples[0][0])], first.examples[0][0])

    # Settings that change tokenization, the file bytes or the tokenizer get their own entry.
    M.load_datasets(DataConfig(path=str(path), valid_fraction=0.0, train_on="last"), tok, cache_dir=cache)
    M.load_datasets(cfg, make_tokenizer(bpe, chat_template="{{ eos_token }}" + CHATML), cache_dir=cache)
    write_jsonl(path, rows + [CONV])
    M.load_datasets(cfg, tok, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 4

    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "env"))
    assert D.default_cache_dir() == tmp_path / "env" / "data"
    D.load_jsonl_dataset(path, DataConfig(), tok)
    assert len(list((tmp_path / "env" / "data").glob("*.npz"))) == 1


LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_tokenizer_template_with_headers_bos_and_trim(tmp_path, bpe):
    """A Llama-3-style template: BOS in the template, header tokens, content trimmed."""
    tok = make_tokenizer(bpe, chat_template=LLAMA3_STYLE, bos=True)
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    conv = {"messages": [dict(m) for m in CONV["messages"]]}
    conv["messages"][2]["content"] = "  Hello there!  "
    ex = load(tmp_path, [conv], tok).examples[0]
    assert decode(tok, ex[0]).startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|>")
    assert (ex[0] == tok.convert_tokens_to_ids("<s>")).sum() == 1
    assert target_runs(tok, ex) == ["Hello there!<|eot_id|>", "Two plus two is four.<|eot_id|>"]
