"""The generation engine (mlx_lora.inference.engine) on tiny random models: a batched greedy answer equals the
same request alone token for token, for the base and adapters of different ranks, targets and
LoRA/DoRA mixed in one batch (and equals the adapter loaded the usual way); requests join a
running batch; a cancelled request frees its row; the prefix cache skips the prefill of a prompt
seen before and stays within its byte bound; sampling is seeded per request; JSON constraints
always give text that parses."""

from __future__ import annotations

import json
import threading

import pytest

from mlx_lora.inference.engine import AdapterBank, Engine, PromptCache, Sampling
from mlx_lora.inference.json_constraint import JsonConstraint

PROMPTS = [
    "What is the code word for the red apple?",
    "Hi",
    "The quick brown fox jumps over the lazy dog again",
    "a b c",
    "Tell me about the sea and the sky",
    "Once",
]


def make_adapter(model_path, out, seed: int, **lora):
    """An adapter with random, large A and B: it changes the model's greedy answers."""
    import mlx.core as mx

    from mlx_lora.config import LoraConfig
    from mlx_lora.model import adapters
    from mlx_lora.model.loading import load_model

    model, _, _ = load_model(str(model_path))
    cfg = LoraConfig(**lora)
    adapters.apply_lora(model, cfg)
    mx.random.seed(seed)
    for _, layer in adapters.adapter_layers(model):
        layer.lora_b = 0.3 * mx.random.normal(layer.lora_b.shape)
        if hasattr(layer, "magnitude"):
            layer.magnitude = layer.magnitude * (1 + 0.3 * mx.random.normal(layer.magnitude.shape))
    adapters.save_adapter(model, out, cfg, str(model_path))
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_adapters")
    return {
        "wide": make_adapter(tiny_llama, root / "wide", 1, r=8, alpha=16.0),
        "narrow": make_adapter(tiny_llama, root / "narrow", 2, r=2, alpha=4.0, target_modules=["q_proj", "v_proj"]),
        "dora": make_adapter(
            tiny_llama,
            root / "dora",
            3,
            r=4,
            alpha=8.0,
            use_dora=True,
            target_modules=["o_proj", "down_proj", "v_proj"],
        ),
    }


@pytest.fixture(scope="module")
def banked(tiny_llama, adapter_dirs):
    from mlx_lora.commands.api import load_for_inference

    model, tok, info = load_for_inference(str(tiny_llama))
    bank = AdapterBank(model, info.local_path, {k: str(v) for k, v in adapter_dirs.items()})
    return model, tok, bank


def test_batched_greedy_equals_alone_for_base_and_mixed_adapters(banked, tiny_llama, adapter_dirs):
    from mlx_lora.commands.api import load_for_inference

    model, tok, bank = banked
    names = [None, "wide", "narrow", "dora", "wide", None, "dora", "narrow"]
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(len(names))]
    greedy = Sampling(max_tokens=10)
    engine = Engine(model, tok, bank=bank, max_batch=16, prompt_cache_bytes=0)
    try:
        alone = [engine.generate([p], [greedy], [a])[0].tokens for p, a in zip(prompts, names)]
        steps = engine.metrics()["decode_steps_total"]
        together = engine.generate(prompts, [greedy] * len(prompts), names)
        batched_steps = engine.metrics()["decode_steps_total"] - steps
    finally:
        engine.close()
    assert [r.tokens for r in together] == alone
    assert all(len(t) == 10 for t in alone)
    assert batched_steps < 10 * len(prompts) // 2  # rows really shared decode steps
    assert len({tuple(alone[i]) for i in (0, 1, 2, 3)}) == 4  # each adapter changes the answer
    # ... and each equals the adapter loaded the usual way (LoRALinear / DoRALinear layers in the model)
    for name in ("wide", "narrow", "dora"):
        plain, ptok, _ = load_for_inference(str(tiny_llama), str(adapter_dirs[name]))
        e = Engine(plain, ptok, prompt_cache_bytes=0)
        try:
            i = names.index(name)
            assert e.generate([prompts[i]], [greedy])[0].tokens == alone[i], name
        finally:
            e.close()


def test_a_request_joins_a_running_batch_and_a_cancelled_one_frees_its_row(banked):
    model, tok, bank = banked
    engine = Engine(model, tok, bank=bank, max_batch=4, prompt_cache_bytes=0)
    try:
        got = threading.Event()
        long = engine.submit(
            tok.encode(PROMPTS[0]),
            "wide",
            Sampling(max_tokens=3000),
            lambda kind, value: got.set() if kind == "token" else None,
        )
        assert got.wait(120)
        # the long request decodes; a short one joins without waiting for it to finish
        short = engine.generate([tok.encode(PROMPTS[1])], [Sampling(max_tokens=5)], [None])[0]
        assert short.finish_reason == "length" and len(short.tokens) == 5
        assert not long.finished.is_set()
        long.cancel()
        assert engine.wait_until(lambda m: m["requests_cancelled"] == 1 and m["batch_size"] == 0)
        assert long.result.finish_reason == "cancelled" and long.result.completion_tokens < 3000
    finally:
        engine.close()


def test_prefix_cache_skips_the_prefill_of_a_prompt_seen_before(banked):
    model, tok, bank = banked
    engine = Engine(model, tok, bank=bank, prompt_cache_bytes=10 * 2**20)
    try:
        history = tok.encode(" ".join(PROMPTS) * 3)
        first = engine.generate([history], [Sampling(max_tokens=4)], ["narrow"])[0]
        before = engine.metrics()["prefill_tokens_total"]
        follow = history + first.tokens + tok.encode(" and then?")
        second = engine.generate([follow], [Sampling(max_tokens=4)], ["narrow"])[0]
        m = engine.metrics()
        prefilled = m["prefill_tokens_total"] - before
        assert second.cached_tokens >= len(history) and prefilled == len(follow) - second.cached_tokens
        assert prefilled < len(follow) - len(history) + 5 and m["prompt_cache_hits"] == 1
        # another adapter does not share this cache; the answer equals an uncached run
        other = engine.generate([follow], [Sampling(max_tokens=4)], ["wide"])[0]
        assert other.cached_tokens == 0
        cold = Engine(model, tok, bank=bank, prompt_cache_bytes=0)
        try:
            assert cold.generate([follow], [Sampling(max_tokens=4)], ["narrow"])[0].tokens == second.tokens
        finally:
            cold.close()
    finally:
        engine.close()


def test_prompt_cache_evicts_the_least_recently_used_beyond_its_byte_bound():
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    def caches(n):
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 2, n, 8)), mx.zeros((1, 2, n, 8)))
        return [c]

    one = 2 * (2 * 10 * 8 * 4)  # keys and values of 10 positions, float32... as allocated (256 steps)
    size = sum(c.nbytes for c in caches(10))
    assert size >= one
    pc = PromptCache(int(2.5 * size))
    pc.insert(None, list(range(10)), caches(10))
    pc.insert(None, list(range(100, 110)), caches(10))
    assert pc.lookup(None, list(range(10)) + [7])[1] == 10  # touch the first: the second is now oldest
    pc.insert("x", list(range(200, 210)), caches(10))
    assert pc.nbytes <= pc.max_bytes and len(pc) == 2 and pc.evictions == 1
    assert pc.lookup(None, list(range(100, 110)) + [1]) == (None, 0)
    assert pc.lookup(None, list(range(10)) + [1])[1] == 10
    # a longer sequence replaces the cached prefix it extends; a prompt never takes all its tokens from it
    pc.insert(None, list(range(12)), caches(12))
    assert pc.lookup(None, list(range(12)))[1] == 11
    assert len([k for k in pc._entries if k[0] is None]) == 1


def test_sampling_is_seeded_per_request_whatever_shares_the_batch(banked):
    model, tok, bank = banked
    engine = Engine(model, tok, bank=bank, prompt_cache_bytes=0)
    try:
        p = tok.encode(PROMPTS[4])
        hot = Sampling(max_tokens=8, temperature=1.5, seed=11)
        alone = engine.generate([p], [hot])[0].tokens
        crowd = engine.generate(
            [p, tok.encode(PROMPTS[0]), p],
            [hot, Sampling(max_tokens=8), Sampling(max_tokens=8, temperature=1.5, seed=12)],
            [None, "wide", None],
        )
        assert crowd[0].tokens == alone and crowd[2].tokens != alone
        greedy = engine.generate([p], [Sampling(max_tokens=8)])[0].tokens
        narrow = engine.generate([p], [Sampling(max_tokens=8, temperature=1.5, top_p=1e-6, seed=3)])[0].tokens
        assert narrow == greedy
    finally:
        engine.close()


@pytest.mark.parametrize(
    "schema,max_tokens",
    [
        ({"type": "object"}, 6),
        ({"type": "object"}, 40),
        (
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer"},
                    "ok": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"enum": ["x", "y"]}},
                },
                "required": ["name", "age", "ok"],
            },
            48,
        ),
        ({"type": "array", "items": {"type": "number"}, "minItems": 2}, 30),
        (
            {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "name": {"enum": ["get_weather"]},
                            "arguments": {
                                "type": "object",
                                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                                "required": ["city"],
                            },
                        },
                        "required": ["name", "arguments"],
                    }
                ]
            },
            60,
        ),
    ],
)
def test_constrained_replies_always_parse_and_fit_the_schema(banked, schema, max_tokens):
    model, tok, bank = banked
    engine = Engine(model, tok, bank=bank, prompt_cache_bytes=0)
    try:
        # many rows, greedy and sampled, some on adapters: every path must end in text that parses
        runs = [(PROMPTS[i % len(PROMPTS)] + " " * (i % 3), 0.0 if i % 2 else 1.0, i) for i in range(12)]
        samplings = [
            Sampling(max_tokens=max_tokens, temperature=t, seed=s, constraint=JsonConstraint(schema))
            for _, t, s in runs
        ]
        results = engine.generate(
            [tok.encode(p) for p, _, _ in runs], samplings, [(None, "dora", "wide")[i % 3] for i in range(len(runs))]
        )
    finally:
        engine.close()
    for r in results:
        value = json.loads(r.text)
        assert len(r.tokens) <= max_tokens
        if "anyOf" in schema:
            assert value["name"] == "get_weather" and isinstance(value["arguments"]["city"], str)
        elif schema.get("type") == "object":
            assert isinstance(value, dict)
            for key in schema.get("required", []):
                assert key in value
            if "properties" in schema:
                assert set(value) <= set(schema["properties"])
                assert isinstance(value["name"], str) and isinstance(value["age"], int)
                assert isinstance(value["ok"], bool)
        else:
            assert isinstance(value, list) and len(value) >= 2 and all(isinstance(v, (int, float)) for v in value)


def test_a_batch_generation_prefills_its_prompts_shared_start_once(banked, monkeypatch):
    """An eval set's prompts share a system prompt: it is prefilled once, each row prefills only
    the rest, and the answers are those of prefilling every prompt whole."""
    from mlx_lora.inference import evaluation

    model, tok, _ = banked
    system = tok.encode("You are a careful assistant. Answer with one word, lower case, and nothing else. " * 2)
    prompts = [system + tok.encode(p) for p in PROMPTS * 3]  # more rows than one batch holds
    engines = []

    class Recorded(Engine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            engines.append(self)

    monkeypatch.setattr(evaluation, "Engine", Recorded)
    eos = evaluation.eos_ids(tok)
    warm = evaluation.generate_tokens(model, prompts, 6, eos, batch_size=4, tokenizer=tok)
    shared = len(evaluation.common_prefix(prompts))
    assert shared >= len(system) >= evaluation.MIN_SHARED_PREFIX
    m = engines[-1].counters
    # (at most: a row may also find more of itself in a finished row's cache)
    assert m["prefill_tokens"] <= shared + sum(len(p) - shared for p in prompts)

    monkeypatch.setattr(evaluation, "MIN_SHARED_PREFIX", 10**9)  # every prompt prefilled whole
    cold = evaluation.generate_tokens(model, prompts, 6, eos, batch_size=4, tokenizer=tok)
    assert engines[-1].counters["prefill_tokens"] == sum(len(p) for p in prompts)
    assert warm == cold


def test_the_output_layer_runs_on_the_last_prompt_position_alone_with_the_same_logits(tiny_models):
    # Prefill needs the last position's logits only: every family laid out as inner model + output
    # layer gets them without the output layer over the whole prompt, and they equal the full pass's.
    import mlx.core as mx

    from mlx_lora.commands.api import load_for_inference
    from mlx_lora.plumbing import mlx_lm_compat as compat

    split = {}
    for arch, path in tiny_models.items():
        model, _, _ = load_for_inference(str(path))
        found = compat.last_position_head(model)
        split[arch] = found is not None
        if found is None:
            continue
        inner, head = found
        tokens = mx.array([[5, 9, 2, 7, 11, 3, 8]], dtype=mx.int32)
        cache_a, cache_b = compat.new_row_cache(model), compat.new_row_cache(model)
        full = model(tokens, cache=cache_a)[:, -1, :]
        last = head(inner(tokens, cache=cache_b)[:, -1:, :])[:, -1, :]
        step = mx.array([[4]], dtype=mx.int32)  # and the caches it filled are the same
        assert mx.allclose(full, last, rtol=1e-4, atol=1e-4), arch
        assert mx.allclose(model(step, cache=cache_a), model(step, cache=cache_b), rtol=1e-4, atol=1e-4), arch
    # the common families all take the short path; soft-capped (Gemma 2) and scaled (Granite) logits keep
    # the whole forward pass
    assert all(split[a] for a in ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "mixtral")), split
    assert not split["gemma2"] and not split["granite"], split


def test_prefill_through_the_last_position_head_answers_as_the_whole_forward(banked, monkeypatch):
    # Chunked (prefill_step 4: a prompt in several pieces, the first ones computing no logits) and
    # grouped prefill give the same greedy tokens with and without the last-position output layer.
    from mlx_lora.plumbing import mlx_lm_compat as compat

    model, tok, bank = banked
    prompts = [tok.encode(p) for p in PROMPTS]

    def answers(split: bool):
        out = []
        for step in (4, 512):
            eng = Engine(model, tok, bank=bank, prefill_step=step, prompt_cache_bytes=0)
            try:
                adapters = [None, "wide", "narrow", "dora", None, "wide"]
                samplings = [Sampling(max_tokens=6) for _ in prompts]
                out.append([r.tokens for r in eng.generate(prompts, samplings, adapters)])
                assert (eng._split is not None) == split
            finally:
                eng.close()
        return out

    short = answers(True)
    monkeypatch.setattr(compat, "last_position_head", lambda model: None)
    assert short == answers(False)


EXIT_SCRIPT = """
import sys
import mlx.core as mx
import mlx.nn as nn
from mlx_lora.commands.api import load_for_inference
from mlx_lora.inference.engine import Engine, Sampling

same = mx.compile(lambda y: y * 1.0)  # compiled on the main thread, run on the engine thread


class Through(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __call__(self, x):
        return same(self.inner(x))


model, tok, _ = load_for_inference(sys.argv[1])
model.layers[0].mlp = Through(model.layers[0].mlp)
engine = Engine(model, tok, prompt_cache_bytes=0)
prompts = [tok.encode(p) for p in ("Hi", "Once upon a time")]
out = engine.generate(prompts, [Sampling(max_tokens=4)] * 2)
assert all(r.completion_tokens for r in out)
x = mx.ones((2, 8))
assert mx.allclose(same(x), x).item()  # the main thread compiles while the engine lives
if sys.argv[2] == "close":
    engine.close()
print("done", flush=True)
"""


@pytest.mark.parametrize("ending", ["close", "left-running"])
def test_a_process_that_generated_with_compiled_functions_exits_cleanly(tiny_llama, tmp_path, ending):
    """MLX streams belong to a thread: an engine thread that ran compiled functions (mlx-lm's SwiGLU,
    the model's own) and did not free them made the process abort at exit ("terminate called
    without an active exception", most runs). Closed or left running at exit, the engine frees them."""
    import subprocess
    import sys

    script = tmp_path / "gen.py"
    script.write_text(EXIT_SCRIPT)
    for _ in range(3):  # the abort did not happen on every run
        run = subprocess.run(
            [sys.executable, str(script), str(tiny_llama), ending], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-2000:]
        assert run.stdout.strip().endswith("done")


def test_a_request_that_cannot_start_gets_the_error_and_the_others_go_on(banked, monkeypatch):
    """A request whose start fails (its KV cache could not be made) gets that error instead of
    waiting forever, and the requests admitted with it are answered."""
    from mlx_lora.plumbing import mlx_lm_compat

    model, tok, bank = banked
    real, made = mlx_lm_compat.new_row_cache, []

    def first_fails(m):
        made.append(m)
        if len(made) == 1:
            raise RuntimeError("out of cache memory")
        return real(m)

    monkeypatch.setattr(mlx_lm_compat, "new_row_cache", first_fails)
    engine = Engine(model, tok, bank=bank, prompt_cache_bytes=0)
    got: dict = {}
    try:
        reqs = [
            engine.submit(
                tok.encode(p), None, Sampling(max_tokens=3), (lambda i: lambda k, v: got.setdefault(i, []).append(k))(i)
            )
            for i, p in enumerate(PROMPTS[:3])
        ]
        for r in reqs:
            assert r.finished.wait(120)
    finally:
        engine.close()
    assert sorted(got[i][-1] for i in range(3)) == ["done", "done", "error"]
    assert engine.counters["failed"] == 1
