"""Property-based tests (hypothesis) of the data loader, the chat templating and the batcher.

* Random files (valid rows of every format, rows with keys missing or of the wrong type, raw
  garbage, unicode, strings that look like special tokens or template code) either load or
  raise our own :class:`DataError` naming the file; whatever loads obeys the example invariants,
  and batching it loses no target and makes no padding a target.
* On random chat conversations the target tokens decode to exactly the assistant replies (each
  with its end-of-turn), so templating never shifts the mask.
* On random example sets, padded and packed batches hold every example verbatim; padding is
  never a target; the packed attention mask lets no token see another example; and a tiny model
  gives each packed example the logits it gets alone.

Examples per test are modest for CI (``MLX_LORA_FUZZ_EXAMPLES`` scales them) and derandomized
so CI is reproducible (``MLX_LORA_FUZZ_RANDOM=1`` explores new ones).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlx_lora.config import DataConfig
from mlx_lora.data import examples as D
from mlx_lora.plumbing.errors import DataError
from mlx_lora.testing import IM_END, make_tokenizer

SCALE = float(os.environ.get("MLX_LORA_FUZZ_EXAMPLES", "1"))


def fuzz(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=not os.environ.get("MLX_LORA_FUZZ_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The tiny byte-level BPE tokenizer with a ChatML template (eos <|im_end|>, no bos)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------
# strategies

TRICKY = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "{{ messages }}",
    "{% endfor %}",
    "\n",
    "\r\n",
    " ",
    "\t",
    "assistant",
    "user\n",
    "zebra-17",
    "ünïcödé",
    "🙂",
    "\u200b",
    "\\",
    '"',
    "\x00",
    "### Response:",
]
texts = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24),
    st.lists(st.sampled_from(TRICKY), max_size=5).map("".join),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=32), texts)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3), max_leaves=6
)
ROLES = st.sampled_from(["system", "user", "assistant", "tool"])


def messages():
    return st.lists(st.fixed_dictionaries({"role": ROLES, "content": texts}), min_size=1, max_size=5)


ROWS_BY_FORMAT = [
    st.fixed_dictionaries({"messages": messages()}),
    st.fixed_dictionaries(
        {
            "conversations": st.lists(
                st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]), "value": texts}),
                min_size=1,
                max_size=4,
            )
        }
    ),
    st.fixed_dictionaries({"prompt": texts, "completion": texts}),
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": st.one_of(st.none(), texts)}),
    st.fixed_dictionaries({"text": texts}),
]
valid_rows = st.one_of(*ROWS_BY_FORMAT)


@st.composite
def damaged_rows(draw):
    """A valid row with one key deleted or given a random JSON value, or any JSON object."""
    row = dict(draw(valid_rows))
    how = draw(st.sampled_from(["delete", "retype", "inner", "random"]))
    key = draw(st.sampled_from(sorted(row)))
    if how == "delete":
        del row[key]
    elif how == "retype":
        row[key] = draw(json_values)
    elif how == "inner" and isinstance(row[key], list) and row[key]:
        i = draw(st.integers(0, len(row[key]) - 1))
        row[key] = row[key][:i] + [draw(json_values)] + row[key][i + 1 :]
    else:
        row = draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "messages",
                        "prompt",
                        "completion",
                        "text",
                        "output",
                        "instruction",
                        "conversations",
                        "tools",
                        "role",
                    ]
                ),
                json_values,
                max_size=3,
            )
        )
    return row


def as_line(item) -> bytes:
    return item if isinstance(item, bytes) else json.dumps(item, ensure_ascii=False).encode("utf-8")


bad_lines = st.one_of(
    damaged_rows().map(as_line),
    valid_rows.map(as_line),  # a row of another format
    st.binary(max_size=20).filter(lambda b: b"\n" not in b),
    valid_rows.map(as_line).flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n])),
    json_values.map(as_line),
    st.just(b""),
    st.just(b"   "),
)


@st.composite
def files(draw) -> list[bytes]:
    """1-6 lines: rows of one format, and in about half the files one bad line somewhere."""
    rows = draw(st.lists(draw(st.sampled_from(ROWS_BY_FORMAT)), min_size=1, max_size=6))
    raw = [as_line(r) for r in rows]
    if draw(st.booleans()):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(bad_lines)
    return raw


configs = st.fixed_dictionaries(
    {
        "format": st.sampled_from(["auto"] * 5 + ["chat", "completions", "text", "alpaca", "sharegpt"]),
        "max_seq_length": st.one_of(st.integers(2, 48), st.just(512)),
        "train_on": st.sampled_from(["assistant", "last", "all"]),
        "overlong": st.sampled_from(["truncate", "truncate", "skip", "error"]),
    }
)


def write(tmp_path: Path, raw_lines: list[bytes]) -> Path:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    return path


# ----------------------------------------------------------------------------------------------
# loader: no crash but our own error; invariants of whatever loads


@fuzz(200)
@given(raw=files(), conf=configs, packing=st.booleans())
def test_loader_never_crashes_and_padding_is_never_a_target(tok, tmp_path, raw, conf, packing):
    path = write(tmp_path, raw)
    cfg = DataConfig(path=str(path), cache=False, **conf)
    try:
        ds = D.load_jsonl_dataset(path, cfg, tok)
    except DataError as e:
        assert str(path) in str(e), str(e)  # our error, naming the file
        event(f"DataError: {e.reason.split(':')[0].split('(')[0][:40]}")
        return
    event("loaded")
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not a row
    rows = sum(1 for r in data.split(b"\n") if r.strip())
    s = ds.stats
    assert s.rows == rows and s.examples == len(ds) >= 1 and s.examples + s.skipped == rows
    assert s.truncated <= s.examples
    vocab = len(tok)
    for tokens, mask in ds.examples:
        assert 2 <= len(tokens) <= cfg.max_seq_length and len(mask) == len(tokens)
        assert not mask[0] and mask.any()
        assert tokens.min() >= 0 and tokens.max() < vocab
    assert s.target_tokens == sum(int(m.sum()) for _, m in ds.examples)
    # One epoch of single-row batches (no top-up repeats) carries exactly the data set's targets:
    # none lost, and no padding position counted as one.
    got = sum(
        batch.ntokens
        for batch, _ in D.iterate_batches(ds, 1, max_seq_length=cfg.max_seq_length, seed=0, packing=packing, loop=False)
    )
    assert got == s.target_tokens


# ----------------------------------------------------------------------------------------------
# templating: the mask selects exactly the assistant replies


@fuzz(80)
@given(
    turns=st.lists(st.tuples(texts, texts), min_size=1, max_size=3),
    system=st.one_of(st.none(), texts),
    opening=st.one_of(st.none(), texts),
    train_on=st.sampled_from(["assistant", "last"]),
)
def test_chat_targets_are_exactly_the_assistant_replies(tok, tmp_path, turns, system, opening, train_on):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    if opening is not None:  # the assistant speaks first (a greeting)
        msgs.append({"role": "assistant", "content": opening})
    for user, reply in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    path = write(tmp_path, [as_line({"messages": msgs})])
    ds = D.load_jsonl_dataset(path, DataConfig(path=str(path), cache=False, train_on=train_on), tok)
    ((tokens, mask),) = ds.examples
    replies = ([] if opening is None else [opening]) + [r for _, r in turns]
    replies = replies[-1:] if train_on == "last" else replies
    expected = "".join(r + IM_END + "\n" for r in replies)
    assert tok.decode(tokens[mask].tolist(), skip_special_tokens=False) == expected
    # and everything that is not a target is the rest of the conversation, in order
    assert tok.decode(tokens.tolist(), skip_special_tokens=False) == tok.apply_chat_template(msgs, tokenize=False)


# ----------------------------------------------------------------------------------------------
# batching and packing on synthetic examples


@st.composite
def example_sets(draw):
    """Examples whose every token is ``index + 1`` (so a batch position names its example), with
    random target masks (never the first token, at least one target)."""
    n = draw(st.integers(1, 12))
    examples = []
    for i in range(n):
        length = draw(st.integers(2, 20))
        mask = np.array([False] + draw(st.lists(st.booleans(), min_size=length - 1, max_size=length - 1)))
        mask[draw(st.integers(1, length - 1))] = True
        examples.append((np.full(length, i + 1, np.int32), mask))
    stats = D.DataStats(
        "synthetic", "text", n, n, 0, 0, int(sum(m.sum() for _, m in examples)), int(sum(len(t) for t, _ in examples))
    )
    return D.TokenizedDataset(examples, stats)


@fuzz(120)
@given(
    ds=example_sets(),
    batch_size=st.integers(1, 4),
    world=st.integers(1, 3),
    extra=st.integers(0, 30),
    packing=st.booleans(),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 2),
)
def test_batches_hold_examples_verbatim_and_packing_never_crosses_examples(
    ds, batch_size, world, extra, packing, seed, epoch
):
    cap = int(ds.lengths.max()) - 1 + extra
    seen = set()
    for rank in range(world):
        it = D.iterate_batches(
            ds,
            batch_size,
            max_seq_length=cap,
            seed=seed,
            packing=packing,
            loop=False,
            rank=rank,
            world_size=world,
            start=D.BatchPosition(epoch, 0),
        )
        for batch, _ in it:
            B, L = batch.inputs.shape
            assert B == batch_size and L <= cap
            seg = batch.segments if packing else (batch.inputs > 0).astype(np.int32)
            # padding: no token, no target, and (packed) a query that sees only itself
            pad = seg == 0
            assert not batch.inputs[pad].any() and not batch.targets[pad].any() and not batch.loss_mask[pad].any()
            for b in range(B):
                for k in range(1, int(seg[b].max()) + 1):
                    pos = np.flatnonzero(seg[b] == k)
                    assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))), "an example split in two"
                    e = int(batch.inputs[b, pos[0]]) - 1
                    tokens, mask = ds.examples[e]
                    assert len(pos) == len(tokens) - 1
                    assert (batch.inputs[b, pos] == e + 1).all() and (batch.targets[b, pos] == e + 1).all()
                    assert np.array_equal(batch.loss_mask[b, pos], mask[1:].astype(np.float32))
                    seen.add(e)
            if packing:
                attn = D.attention_mask_from_segments(batch.segments)[:, 0]
                t, s = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
                same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
                allowed = (same & (s <= t)[None]) | (np.eye(L, dtype=bool)[None] & pad[:, :, None])
                assert np.array_equal(attn, allowed)
    assert seen == set(range(len(ds)))  # the ranks together see every example each epoch


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from mlx_lora.model.loading import load_model

    model, _, _ = load_model(str(tiny_model_dir("llama")), dtype="float32", with_tokenizer=False)
    return model


@fuzz(15)
@given(lengths=st.lists(st.integers(2, 10), min_size=2, max_size=4), pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_packed_examples_get_the_logits_they_get_alone(tiny_model, lengths, pad, seed):
    import mlx.core as mx

    from mlx_lora.training.losses import model_logits

    rng = np.random.default_rng(seed)
    examples = [rng.integers(3, 512, size=n).astype(np.int32) for n in lengths]
    row = np.concatenate(examples + [np.zeros(pad, np.int32)])
    segments = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)] + [np.zeros(pad)]).astype(np.int32)
    attn = mx.array(D.attention_mask_from_segments(segments[None]))
    packed = np.array(model_logits(tiny_model, mx.array(row[None]), attn)[0])
    at = 0
    for tokens in examples:
        alone = np.array(tiny_model(mx.array(tokens[None]))[0])
        np.testing.assert_allclose(packed[at : at + len(tokens)], alone, rtol=1e-4, atol=1e-4)
        at += len(tokens)
    assert np.isfinite(packed).all()  # padding queries attend to themselves: no NaN leaks
