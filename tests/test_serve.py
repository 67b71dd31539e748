"""``mlx-lora serve`` through the real ``openai`` client against a server on a free local port: the
base and two adapters (different ranks, targets, LoRA and DoRA) on one set of base weights each
answer as the model loaded alone does, streaming equals the whole reply, stop strings, usage
counts, the OpenAI error shape for bad requests, concurrent requests kept apart, and the command
itself (its start-up lines, Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli_harness import assert_refused, cli_env as _cli_env

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

    from mlx_lora import adapters
    from mlx_lora.config import LoraConfig
    from mlx_lora.models import load_model

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
    return {"alpha": make_adapter(tiny_llama, root / "alpha", 1, r=8, alpha=16.0),
            "beta": make_adapter(tiny_llama, root / "beta", 2, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"],
                                 use_dora=True)}


@pytest.fixture(scope="module")
def server(tiny_llama, adapter_dirs):
    import uvicorn

    from mlx_lora import serve

    engine = serve.build_server(str(tiny_llama), {k: str(v) for k, v in adapter_dirs.items()}, max_tokens=16)
    sock = serve.bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(serve.create_app(engine), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not srv.started and time.monotonic() < end:
        time.sleep(0.05)
    assert srv.started
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    yield url, engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_llama, adapter_dirs):
    """Greedy answers of the model loaded alone, with each adapter loaded the usual way."""
    from mlx_lora.api import load_for_inference
    from mlx_lora.generation import chat_prompt, chat_template_for, encode, stream

    out = {}
    for name, folder in [("tiny", None), *adapter_dirs.items()]:
        model, tok, _ = load_for_inference(str(tiny_llama), None if folder is None else str(folder))
        template = chat_template_for(tok, None, "tiny")
        out[name] = {"chat": "".join(stream(model, tok, chat_prompt(tok, template, QUESTION), max_tokens=12)),
                     "text": "".join(stream(model, tok, encode(tok, "The code word for the"), max_tokens=12))}
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
    chunks = list(client.chat.completions.create(model="beta", messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert sum(1 for p in pieces if p) > 1  # it came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt="The code word for the", max_tokens=12, temperature=0, stream=True))
    assert text == client.completions.create(model="alpha", prompt="The code word for the", max_tokens=12,
                                             temperature=0).choices[0].text


def test_stop_strings_end_the_reply_before_them_streamed_or_not(client, reference):
    full = reference["beta"]["chat"]
    # Three characters from the middle of the reply, where they first occur.
    stop = next(full[k:k + 3] for k in range(3, len(full) - 3)
                if full.index(full[k:k + 3]) == k and "\ufffd" not in full[k:k + 3])
    expected = full[:full.index(stop)]
    r = client.chat.completions.create(model="beta", messages=QUESTION, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="beta", messages=QUESTION, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True))
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
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json"}, timeout=60)


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
        ({**ok, "max_tokens": "ten"}, "max_tokens"), ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "max_tokens": 10**9}, "max_tokens"), ({**ok, "temperature": -1}, "temperature"),
        ({**ok, "top_p": 0}, "top_p"), ({**ok, "n": 0}, "n"), ({**ok, "messages": "hi"}, "messages"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**ok, "stream": "yes"}, "stream"), ({**ok, "stop": [1]}, "stop"), ({**ok, "seed": -3}, "seed"),
        ({k: v for k, v in ok.items() if k != "model"}, "model"), ([ok], None),
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
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lora", "serve", "--model", str(tiny_llama), "--adapter",
                             f"alpha={adapter_dirs['alpha']}", "--port", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving http://127.0.0.1:"), first + proc.stderr.read()
        assert proc.stdout.readline().split() == ["models", "llama,", "alpha"]
        url = first.split()[1]
        assert [m["id"] for m in httpx.get(url + "/models", timeout=30).json()["data"]] == ["llama", "alpha"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read().strip() == "server stopped"
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_bad_adapters_before_starting(tiny_llama, adapter_dirs, tmp_path, capsys, cli_env):
    base = ["serve", "--model", str(tiny_llama), "--port", "0"]
    assert_refused(capsys, base + ["--adapter", str(adapter_dirs["alpha"])], ["NAME=RUN"], [tmp_path])
    assert_refused(capsys, base + ["--adapter", f"a={adapter_dirs['alpha']}", "--adapter", f"a={adapter_dirs['beta']}"],
                   ["given twice"], [tmp_path])
    assert_refused(capsys, base + ["--adapter", f"llama={adapter_dirs['alpha']}"], ["names the base model"], [tmp_path])
    assert_refused(capsys, base + ["--adapter", f"x={tmp_path}"], [str(tmp_path), "not an adapter folder"], [tmp_path])
    assert_refused(capsys, base + ["--max-tokens", "0"], ["--max-tokens"], [tmp_path])
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_refused(capsys, base[:-1] + [port], [f"127.0.0.1:{port}", "pick another with --port"], [tmp_path])


def test_adapters_wrap_the_one_copy_of_the_base_layers(server, client):
    """Every adapter's per-row layer computes on the base model's own layer object: no copy of a weight."""
    import mlx.nn as nn

    from mlx_lora.engine import RowLoRALinear

    srv = server[1]
    ask(client, "llama")
    rows = {p: m for p, m in srv.model.named_modules() if isinstance(m, RowLoRALinear)}
    plain = {p: m for p, m in srv.model.named_modules() if isinstance(m, nn.Linear)}
    assert rows and all(p + ".base" in plain and m.base is plain[p + ".base"] for p, m in rows.items())
    bank = srv.engine.bank
    beta = bank.names.index("beta")
    # beta (q/v only) has factors on fewer layers than alpha (all linear layers)
    assert {p for p, m in rows.items() if m._lows[beta] is not None} < set(rows)
