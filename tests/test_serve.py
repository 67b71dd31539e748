"""``mlx-lora serve`` through the real ``openai`` client against a server on a free local port: the
base and two adapters (different ranks, targets, LoRA and DoRA) on one set of base weights each
answer as the model loaded alone does, streaming equals the whole reply, stop strings, usage
counts, the OpenAI error shape for bad requests, concurrent requests kept apart, and the command
itself (its start-up lines, Ctrl-C)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_harness import assert_refused
from cli_harness import cli_env as _cli_env

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is the code word for the red apple?"}]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    yield from _cli_env(tmp_path_factory)


def make_adapter(model_path: Path, out: Path, seed: int, **lora) -> Path:
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
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(tiny_llama, root / "alpha", 1, r=8, alpha=16.0),
        "beta": make_adapter(
            tiny_llama, root / "beta", 2, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], use_dora=True
        ),
    }


@pytest.fixture(scope="module")
def server(tiny_llama, adapter_dirs):
    import uvicorn

    from mlx_lora.commands import serve

    engine = serve.build_server(str(tiny_llama), {k: str(v) for k, v in adapter_dirs.items()}, max_tokens=16)
    sock = serve.bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(serve.create_app(engine), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 300
    while not srv.started and time.monotonic() < end:
        time.sleep(0.05)
    assert srv.started
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    yield url, engine
    srv.should_exit = True
    thread.join(timeout=120)
    engine.close()
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(tiny_llama, adapter_dirs):
    """Greedy answers of the model loaded alone, with each adapter loaded the usual way."""
    from mlx_lora.commands.api import load_for_inference
    from mlx_lora.inference.generation import chat_prompt, chat_template_for, encode, stream

    out = {}
    for name, folder in [("tiny", None), *adapter_dirs.items()]:
        model, tok, _ = load_for_inference(str(tiny_llama), None if folder is None else str(folder))
        template = chat_template_for(tok, None, "tiny")
        out[name] = {
            "chat": "".join(stream(model, tok, chat_prompt(tok, template, QUESTION), max_tokens=12)),
            "text": "".join(stream(model, tok, encode(tok, "The code word for the"), max_tokens=12)),
        }
    return out


def test_models_lists_the_base_and_every_adapter(client, tiny_llama):
    assert tiny_llama.name == "llama"
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta", "llama"]
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")


def ask(client, model: str, **kw) -> str:
    kw.setdefault("temperature", 0)
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, **kw)
    return r.choices[0].message.content


def test_each_adapter_and_the_base_answer_as_when_loaded_alone(client, reference):
    # Interleaved, so each request must swap the right layers in (and the base's back).
    got = {m: [] for m in ("llama", "alpha", "beta")}
    for m in ("alpha", "llama", "beta", "alpha", "beta", "llama"):
        got[m].append(ask(client, m))
    assert got["llama"] == [reference["tiny"]["chat"]] * 2
    assert got["alpha"] == [reference["alpha"]["chat"]] * 2
    assert got["beta"] == [reference["beta"]["chat"]] * 2
    assert len({reference[k]["chat"] for k in ("tiny", "alpha", "beta")}) == 3  # they do differ
    for m, ref in (("llama", "tiny"), ("beta", "beta")):
        r = client.completions.create(model=m, prompt="The code word for the", max_tokens=12, temperature=0)
        assert r.choices[0].text == reference[ref]["text"]
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12


def test_streaming_equals_the_whole_reply_with_usage(client):
    whole = client.chat.completions.create(model="beta", messages=QUESTION, max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(
        client.chat.completions.create(
            model="beta",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert sum(1 for p in pieces if p) > 1  # it came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="alpha", prompt="The code word for the", max_tokens=12, temperature=0, stream=True
        )
    )
    assert (
        text
        == client.completions.create(model="alpha", prompt="The code word for the", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )


def test_stop_strings_end_the_reply_before_them_streamed_or_not(client, reference):
    full = reference["beta"]["chat"]
    # Three characters from the middle of the reply, where they first occur.
    stop = next(
        full[k : k + 3]
        for k in range(3, len(full) - 3)
        if full.index(full[k : k + 3]) == k and "\ufffd" not in full[k : k + 3]
    )
    expected = full[: full.index(stop)]
    r = client.chat.completions.create(model="beta", messages=QUESTION, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="beta", messages=QUESTION, max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_is_seeded(client):
    kw = dict(temperature=1.0, top_p=0.95)
    assert ask(client, "beta", seed=7, **kw) == ask(client, "beta", seed=7, **kw) != ask(client, "beta", seed=8, **kw)


def test_concurrent_requests_for_different_adapters_get_their_own_answers(client, reference):
    jobs = ["alpha", "beta", "llama"] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda m: ask(client, m), jobs))
    names = {"alpha": "alpha", "beta": "beta", "llama": "tiny"}
    assert answers == [reference[names[m]]["chat"] for m in jobs]


def _post(url: str, path: str, content) -> httpx.Response:
    data = content if isinstance(content, (bytes, str)) else json.dumps(content)
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json"}, timeout=300)


def _error(r: httpx.Response, status: int, param=None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body
    return body["error"]["message"]


def test_bad_requests_get_the_openai_error_shape_and_the_server_goes_on(server, client):
    url = server[0]
    ok = {"model": "alpha", "messages": QUESTION, "max_tokens": 3}
    assert "not valid JSON" in _error(_post(url, "/chat/completions", b'{"model": "alpha", "messages": ['), 400)
    assert ask(client, "alpha")  # the next request works
    cases = [
        ({**ok, "max_tokens": "ten"}, "max_tokens"),
        ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "max_tokens": 10**9}, "max_tokens"),
        ({**ok, "temperature": -1}, "temperature"),
        ({**ok, "top_p": 0}, "top_p"),
        ({**ok, "n": 0}, "n"),
        ({**ok, "messages": "hi"}, "messages"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**ok, "stream": "yes"}, "stream"),
        ({**ok, "stop": [1]}, "stop"),
        ({**ok, "seed": -3}, "seed"),
        ({**ok, "stop": ["x" * 100_000]}, "stop"),
        ({**ok, "n": 10**6}, "n"),
        ({k: v for k, v in ok.items() if k != "model"}, "model"),
        ([ok], None),
    ]
    for body, param in cases:
        _error(_post(url, "/chat/completions", body), 400, param)
    _error(_post(url, "/completions", {"model": "alpha", "prompt": ["a", "b"]}), 400, "prompt")
    _error(_post(url, "/completions", {"model": "alpha", "prompt": "x", "echo": True}), 400, "echo")
    msg = _error(_post(url, "/chat/completions", {**ok, "model": "gamma"}), 404, "model")
    assert "gamma" in msg and "alpha, beta" in msg
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gamma", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="beta", messages=QUESTION, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    _error(httpx.get(url + "/nowhere"), 404)
    assert ask(client, "beta")


def test_an_exception_inside_one_request_does_not_stop_the_server(server, client, monkeypatch):
    engine = server[1].engine
    real = engine._prefill
    calls = []

    def failing_once(row, budget):
        calls.append(row)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(row, budget)

    monkeypatch.setattr(engine, "_prefill", failing_once)
    r = _post(server[0], "/chat/completions", {"model": "alpha", "messages": QUESTION, "max_tokens": 3})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert ask(client, "alpha")


def test_the_serve_command_prints_its_url_and_models_and_stops_on_ctrl_c(tiny_llama, adapter_dirs):
    env = dict(os.environ, PYTHONPATH=str(REPO), MLX_LORA_NO_BLAS_REEXEC="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lora",
            "serve",
            "--model",
            str(tiny_llama),
            "--adapter",
            f"alpha={adapter_dirs['alpha']}",
            "--port",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving http://127.0.0.1:"), first + proc.stderr.read()
        assert proc.stdout.readline().split() == ["models", "llama,", "alpha"]
        url = first.split()[1]
        assert [m["id"] for m in httpx.get(url + "/models", timeout=300).json()["data"]] == ["llama", "alpha"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 0
        assert proc.stdout.read().strip() == "server stopped"
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_bad_adapters_before_starting(tiny_llama, adapter_dirs, tmp_path, capsys, cli_env):
    base = ["serve", "--model", str(tiny_llama), "--port", "0"]
    assert_refused(capsys, base + ["--adapter", str(adapter_dirs["alpha"])], ["NAME=RUN"], [tmp_path])
    assert_refused(
        capsys,
        base + ["--adapter", f"a={adapter_dirs['alpha']}", "--adapter", f"a={adapter_dirs['beta']}"],
        ["given twice"],
        [tmp_path],
    )
    assert_refused(capsys, base + ["--adapter", f"llama={adapter_dirs['alpha']}"], ["names the base model"], [tmp_path])
    assert_refused(capsys, base + ["--adapter", f"x={tmp_path}"], [str(tmp_path), "not an adapter folder"], [tmp_path])
    assert_refused(capsys, base + ["--max-tokens", "0"], ["--max-tokens"], [tmp_path])
    for flag, value in (
        ("--max-batch", "0"),
        ("--max-body-mb", "0"),
        ("--prompt-cache-gb", "-1"),
        ("--max-queue", "-2"),
        ("--max-context", "1"),
    ):
        assert_refused(capsys, base + [flag, value], [flag], [tmp_path])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_refused(capsys, base[:-1] + [port], [f"127.0.0.1:{port}", "pick another with --port"], [tmp_path])


def test_adapters_wrap_the_one_copy_of_the_base_layers(server, client):
    """Every adapter's per-row layer computes on the base model's own layer object: no copy of a weight."""
    import mlx.nn as nn

    from mlx_lora.inference.engine import RowLoRALinear

    srv = server[1]
    ask(client, "llama")
    rows = {p: m for p, m in srv.model.named_modules() if isinstance(m, RowLoRALinear)}
    plain = {p: m for p, m in srv.model.named_modules() if isinstance(m, nn.Linear)}
    assert rows and all(p + ".base" in plain and m.base is plain[p + ".base"] for p, m in rows.items())
    bank = srv.engine.bank
    beta = bank.names.index("beta")
    # beta (q/v only) has factors on fewer layers than alpha (all linear layers)
    assert {p for p, m in rows.items() if m._lows[beta] is not None} < set(rows)


# ----------------------------------------------------------------------------------------------
# limits, cancellation, metrics and what clients send


@contextlib.contextmanager
def running(model_path, adapters=None, **limits):
    """A server on a free port with the given limits: (url, Server)."""
    import uvicorn

    from mlx_lora.commands import serve

    srv_obj = serve.build_server(str(model_path), adapters or {}, **limits)
    sock = serve.bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(serve.create_app(srv_obj), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 120
    while not srv.started and time.monotonic() < end:
        thread.join(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", srv_obj
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        srv_obj.close()
        sock.close()


def test_body_size_bad_json_surrogates_and_deep_arrays_get_4xx(tiny_llama):
    with running(tiny_llama, max_body_mb=0.01, max_tokens=4) as (url, _):
        ok = {"model": "llama", "messages": QUESTION}
        big = {**ok, "messages": [{"role": "user", "content": "x" * 20000}]}
        assert "--max-body-mb" in _error(_post(url, "/chat/completions", big), 413)
        # without a Content-Length (chunked), the limit holds as the body arrives
        chunks = (json.dumps(big)[i : i + 1000].encode() for i in range(0, 21000, 1000))
        r = httpx.post(
            url + "/chat/completions", content=chunks, headers={"Content-Type": "application/json"}, timeout=60
        )
        _error(r, 413)
        assert "not valid JSON" in _error(_post(url, "/chat/completions", b'{"model": "llama", "messages": [}'), 400)
        assert "not UTF-8" in _error(_post(url, "/chat/completions", b'{"model": "\xff\xfe"}'), 400)
        deep = b'{"model": "llama", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        with running(tiny_llama, max_tokens=4) as (url2, _):
            assert "too deeply" in _error(_post(url2, "/chat/completions", deep), 400)
            # just within what the parser takes, a deep value is still a 400, not a crash
            for depth in (900, 990):
                almost = (
                    b'{"model": "llama", "messages": [{"role": "user", "content": '
                    + b"[" * depth
                    + b"]" * depth
                    + b"}]}"
                )
                r = _post(url2, "/chat/completions", almost)
                assert r.status_code == 400 and "\n" not in r.json()["error"]["message"], r.text[:300]
        lone = b'{"model": "llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
        assert "surrogate" in _error(_post(url, "/chat/completions", lone), 400, "messages[0].content")
        lone_key = b'{"model": "llama", "messages": [{"role": "user", "content": "a", "\\udfff": 1}]}'
        _error(_post(url, "/chat/completions", lone_key), 400, "messages[0]")
        msg = _error(_post(url, "/chat/completions", {**ok, "frobnicate": 1, "top_k": 3}), 400, "frobnicate")
        assert "'frobnicate'" in msg and "'top_k'" in msg and "\n" not in msg
        assert "frequency_penalty" in _error(
            _post(url, "/chat/completions", {**ok, "frequency_penalty": 0.5}), 400, "frequency_penalty"
        )
        _error(httpx.delete(url + "/models", timeout=30), 405)
        r = _post(url, "/chat/completions", ok)  # and the server goes on
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def _metrics(url: str) -> dict:
    r = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30)
    assert r.status_code == 200
    return {line.split()[0]: float(line.split()[1]) for line in r.text.splitlines() if not line.startswith("#")}


def test_gone_clients_free_their_rows_and_a_full_queue_answers_429(tiny_llama):
    long = {"model": "llama", "messages": QUESTION, "max_tokens": 4000, "temperature": 0}
    with running(tiny_llama, max_batch=1, max_queue=1) as (url, srv):
        engine = srv.engine
        # a streaming client reads one chunk and leaves
        with httpx.stream("POST", url + "/chat/completions", json={**long, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            assert engine.wait_until(lambda m: m["batch_size"] == 1 and m["generated_tokens_total"] > 0)
            # meanwhile the cheap endpoints answer
            assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json() == {"status": "ok"}
            assert httpx.get(url + "/models", timeout=30).status_code == 200
            m = _metrics(url)
            assert m["mlx_lora_batch_size"] == 1 and m["mlx_lora_batch_occupancy"] == 1.0
        assert engine.wait_until(lambda m: m["requests_cancelled"] == 1 and m["batch_size"] == 0)
        # a non-streaming client that hangs up
        raw = socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0])))
        body = json.dumps(long).encode()
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert engine.wait_until(lambda m: m["batch_size"] == 1 and m["requests_total"] == 2)
        # the batch is full and one request waits: the next one is refused with 429
        waiting = ThreadPoolExecutor(1).submit(_post, url, "/chat/completions", {**long, "max_tokens": 2})
        assert engine.wait_until(lambda m: m["queue_length"] == 1)
        r = _post(url, "/chat/completions", {**long, "max_tokens": 2})
        assert "--max-queue" in _error(r, 429)
        raw.close()
        assert engine.wait_until(lambda m: m["requests_cancelled"] == 2)
        assert waiting.result(timeout=120).status_code == 200  # the waiting request got the freed row
        m = _metrics(url)
        assert m["mlx_lora_requests_rejected"] == 1 and m["mlx_lora_queue_length"] == 0


def test_a_repeated_prefix_is_not_prefilled_again(client, server):
    engine = server[1].engine
    system = {"role": "system", "content": "You answer questions about fruit. " * 20}
    first = client.chat.completions.create(model="alpha", messages=[system, QUESTION[0]], max_tokens=4, temperature=0)
    before = engine.metrics()
    follow = [
        system,
        QUESTION[0],
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the green one?"},
    ]
    second = client.chat.completions.create(model="alpha", messages=follow, max_tokens=4, temperature=0)
    after = engine.metrics()
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > first.usage.prompt_tokens // 2
    assert after["prefill_tokens_total"] - before["prefill_tokens_total"] == second.usage.prompt_tokens - cached
    assert after["prompt_cache_hits"] == before["prompt_cache_hits"] + 1


def test_json_schema_and_json_object_answers_parse(client):
    schema = {
        "type": "object",
        "properties": {"fruit": {"type": "string"}, "count": {"type": "integer"}, "ripe": {"type": "boolean"}},
        "required": ["fruit", "count", "ripe"],
    }
    for model, kw in (("llama", {}), ("beta", {"temperature": 1.0, "seed": 5}), ("alpha", {"stream": True})):
        kw.setdefault("temperature", 0)
        r = client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=48,
            response_format={"type": "json_schema", "json_schema": {"name": "fruit", "schema": schema}},
            **kw,
        )
        text = (
            "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            if kw.get("stream")
            else r.choices[0].message.content
        )
        value = json.loads(text)
        assert set(value) == {"fruit", "count", "ripe"} and isinstance(value["count"], int)
    r = client.chat.completions.create(
        model="beta", messages=QUESTION, max_tokens=10, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="beta",
            messages=QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "patternProperties": {}}},
            },
        )
    assert "patternProperties" in e.value.body["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_tool_calls_come_back_in_the_openai_shape(client):
    r = client.chat.completions.create(
        model="alpha", messages=QUESTION, tools=[WEATHER, TIME], tool_choice="required", max_tokens=80, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name in ("get_weather", "get_time") and call.id
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict) and (call.function.name == "get_time" or isinstance(args["city"], str))
    named = client.chat.completions.create(
        model="llama",
        messages=QUESTION,
        tools=[WEATHER, TIME],
        max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    # streamed, the call arrives as one tool_calls delta
    chunks = list(
        client.chat.completions.create(
            model="beta",
            messages=QUESTION,
            tools=[WEATHER],
            max_tokens=80,
            tool_choice="required",
            temperature=0,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back to the model as the next turn
    follow = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(
        model="alpha", messages=follow, tools=[WEATHER, TIME], max_tokens=5, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="alpha",
            messages=QUESTION,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert e.value.body["param"] == "tool_choice"


def test_tool_calls_in_the_reply_text_are_recognised():
    from mlx_lora.commands.serve import tool_calls_of

    assert tool_calls_of('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', False) == (
        None,
        [{"name": "f", "arguments": {"x": 1}}],
    )
    assert tool_calls_of('Sure. <tool_call>{"name": "g", "arguments": "{}"}</tool_call>', False) == (
        "Sure.",
        [{"name": "g", "arguments": {}}],
    )
    assert tool_calls_of('{"name": "h", "parameters": {"a": "b"}}', False) == (
        None,
        [{"name": "h", "arguments": {"a": "b"}}],
    )
    assert tool_calls_of("plain words", False) == ("plain words", [])
    assert tool_calls_of('{"not": "a call"}', False) == ('{"not": "a call"}', [])


def test_logprobs_n_and_seed(client):
    r = client.chat.completions.create(
        model="beta", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the most likely
    # the tokens spell the reply (the reply drops the space a first token may start with)
    assert "".join(e.token for e in content).lstrip() == r.choices[0].message.content.lstrip()
    c = client.completions.create(
        model="llama", prompt="The code word for the", max_tokens=5, temperature=0, logprobs=2
    )
    assert len(c.choices[0].logprobs.tokens) == 5 and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)
    many = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=9)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in many.choices}) > 1
    again = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=9)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in many.choices]
    assert (
        many.usage.completion_tokens == sum(8 if ch.finish_reason == "length" else 0 for ch in many.choices)
        or many.usage.completion_tokens <= 24
    )
    streamed = list(
        client.chat.completions.create(
            model="alpha", messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=9, stream=True
        )
    )
    for i in range(3):
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices and ch.choices[0].index == i)
        assert text == many.choices[i].message.content
