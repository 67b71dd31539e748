"""``mlx-lora serve``: an OpenAI-compatible HTTP API over one base model and its adapters.

Endpoints (FastAPI on uvicorn): ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream`` as server-sent events) and ``GET /v1/models``. The ``model`` field of a request picks
the base (named after its folder or file) or one of the adapters given as ``--adapter NAME=RUN``.
The base is loaded once; each adapter's LoRA layers are swapped in for the requests that name it
(:class:`mlx_lora.inference.generation.AdapterSet`).

Generation is not thread-safe, so one worker thread runs the requests one after another in the
order they arrive; a request waits in the queue, never shares the model with another. Requests
are validated before they are queued: a bad one gets the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, and an exception while
serving one is reported to that request (500) and logged, never taking the server down.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request),
# which are imported inside create_app, so they must be evaluated where they are written.

import asyncio
import json
import queue
import random
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import click

from mlx_lora.config import MAX_SEED, Bound, show
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.inference.generation import LIMITS
from mlx_lora.plumbing.errors import DataError
from mlx_lora.commands.run_inputs import read_run, serve_name

DEFAULT_MAX_TOKENS = 512
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Request fields and the values they may take (temperature as the OpenAI API bounds it; max_tokens
# by the model's context, see parse_request).
FIELD_BOUNDS = {"temperature": Bound(float, 0, 2, cap=False), "top_p": LIMITS["top_p"], "seed": LIMITS["seed"]}


class RequestError(Exception):
    """A request the server refuses, in the OpenAI error shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------
# the model and its adapters


def parse_adapters(specs) -> dict[str, str]:
    """``NAME=RUN`` options as {name: folder}; a bad or repeated name is an error."""
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, folder = str(spec).partition("=")
        name, folder = name.strip(), folder.strip()
        if not eq or not name or not folder:
            raise MlxLoraError(f"--adapter {show(spec)}: expected NAME=RUN_FOLDER, e.g. --adapter support=runs/support")
        if not NAME.match(name):
            raise MlxLoraError(f"--adapter {show(spec)}: the name may hold letters, digits and . _ : / - "
                               f"(at most 128, starting with a letter or digit)")
        if name in out:
            raise MlxLoraError(f"--adapter {show(spec)}: the name {name!r} is given twice")
        out[name] = folder
    return out


def base_model_name(model_path: str) -> str:
    """The name requests use for the base alone: its folder or file name (a hub id as given)."""
    path = Path(model_path).expanduser()
    if path.exists():
        path = path.resolve()
        return path.stem if path.suffix.lower() == ".gguf" else path.name
    return model_path


@dataclass
class Job:
    """One request's work and the channel its text comes back on."""

    adapter: Optional[str]
    prompt: list
    params: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's event loop is gone (server shutting down)
            self.cancelled.set()


class Engine:
    """The model, its adapters and the one thread that generates."""

    def __init__(self, model, tokenizer, template, adapters, base_name: str, *, context: Optional[int] = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, log: Optional[TextIO] = None):
        self.model, self.tokenizer, self.template, self.adapters = model, tokenizer, template, adapters
        self.base_name = base_name
        self.context = context
        self.default_max_tokens = default_max_tokens
        self.log = log or sys.stderr
        self.created = int(time.time())
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._current: Optional[Job] = None  # the job the worker is generating for, if any

    @property
    def model_names(self) -> list[str]:
        return [self.base_name] + self.adapters.names

    def adapter_for(self, name) -> Optional[str]:
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"'model' must be one of: {', '.join(self.model_names)}", "model")
        if name == self.base_name:
            return None
        if name in self.adapters.names:
            return name
        raise RequestError(404, f"The model '{name[:200]}' does not exist; this server has: "
                                f"{', '.join(self.model_names)}", "model", "model_not_found")

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="mlx-lora-generate", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        """Stop generating and wait for the worker: the reply in progress ends at its next token,
        queued requests are dropped. When this returns no thread is inside MLX any more: a process
        that exits while MLX still computes on another thread aborts in C++ ("terminate called
        without an active exception"), which is what a Ctrl-C during a streamed reply used to do."""
        if self._thread is None:
            return
        self.stop()
        # The worker finishes what MLX has queued on its streams and then waits, alive, for the
        # process to end: a thread that exits leaves its MLX thread-local stream to be torn down
        # against the exiting process, which aborts it the same way now and then.
        settled = threading.Event()
        self._jobs.put(settled)
        while self._thread.is_alive() and not settled.wait(0.5):
            pass  # a token away at most: the worker checks the cancel flag after each

    def stop(self) -> None:
        """End the reply in progress at its next token (its client gets the end of the stream) and
        drop the queued requests: what Ctrl-C does first, so that shutting down waits for nothing."""
        current = self._current
        if current is not None:
            current.cancelled.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.put("done", _stopped())

    def _work(self) -> None:
        from mlx_lora.inference.generation import Result, stream

        while True:
            job = self._jobs.get()
            if job is None:
                _settle()
                return
            if isinstance(job, threading.Event):  # close(): settle, then stay for the process's end
                _settle()
                job.set()
                continue
            if job.cancelled.is_set():
                continue
            self._current = job
            pieces = None
            try:
                self.adapters.activate(job.adapter)
                result = Result()
                pieces = stream(self.model, self.tokenizer, job.prompt, result=result, **job.params)
                for piece in pieces:
                    if job.cancelled.is_set():
                        break
                    job.put("piece", piece)
                job.put("done", result)
            except Exception as e:  # reported to this request; the next one is served as usual
                traceback.print_exc(file=self.log)
                job.put("error", e)
            finally:
                self._current = None
                if pieces is not None and hasattr(pieces, "close"):
                    pieces.close()  # a reply stopped early: its generator (and MLX's next token) ends here


def _stopped():
    from mlx_lora.inference.generation import Result

    result = Result()
    result.finish_reason = "stop"
    return result


def _settle() -> None:
    """Wait for the work MLX has queued on this thread's streams (a generator stopped early may have
    started the next token asynchronously), so that nothing is computing when the process exits."""
    try:
        import mlx.core as mx

        mx.synchronize()
        from mlx_lm.generate import generation_stream  # mlx-lm's (thread-local) stream of generation

        mx.synchronize(generation_stream)
    except Exception:  # shutting down: nothing left to report to
        pass


def build_engine(model_path: str, adapters: dict[str, str], *, chat_template: Optional[str] = None,
                 strict: bool = False, max_tokens: int = DEFAULT_MAX_TOKENS, log: Optional[TextIO] = None,
                 trust_remote_code: bool = False) -> Engine:
    """Load the base once, then every adapter's layers (all checked before the server starts)."""
    from mlx_lora.commands.api import load_for_inference
    from mlx_lora.inference.generation import AdapterSet, chat_template_for
    from mlx_lora.config import check_options

    check_options([("--max-tokens", max_tokens, LIMITS["max_tokens"])])
    log = log or sys.stderr
    base_name = base_model_name(model_path)
    if base_name in adapters:
        raise MlxLoraError(f"--adapter {base_name}=...: {base_name!r} already names the base model; "
                           f"choose another adapter name")
    model, tokenizer, info = load_for_inference(model_path, None, stream=log, dequantize_on_cpu="auto",
                                                trust_remote_code=trust_remote_code)
    adapter_set = AdapterSet(model, info.local_path, adapters, strict=strict,
                             warn=lambda m: print(f"warning: {m}", file=log, flush=True))
    template = None
    try:
        template = chat_template_for(tokenizer, chat_template, model_path)
    except MlxLoraError as e:
        if chat_template is not None or isinstance(e, DataError):  # a template that fails its check
            raise
        print(f"warning: {model_path} has no chat template: /v1/chat/completions will refuse requests "
              f"(start with --chat-template chatml or FILE.jinja); /v1/completions works", file=log, flush=True)
    context = _context_length(info.config)
    return Engine(model, tokenizer, template, adapter_set, base_name, context=context,
                  default_max_tokens=max_tokens, log=log)


def _context_length(config: dict) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# ----------------------------------------------------------------------------------------------
# requests


def _get(body: dict, key: str, kinds: tuple, what: str, default=None):
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise RequestError(400, f"'{key}' must be {what}, got {show(value)}", key, "invalid_type")
    return value


def _number(body: dict, key: str, default):
    bound = FIELD_BOUNDS[key]
    value = body.get(key)
    if value is None:
        return default
    problem = bound.violation(value)
    if problem:
        raise RequestError(400, f"'{key}' {problem}", key, "invalid_value")
    return value


def _text_content(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content array)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"'{where}': only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                        f"are supported, got {show(part)}", where, "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, f"'{where}' must be a string or a list of text parts, got {show(content)}",
                       where, "invalid_type")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"'messages' must be a non-empty list of messages, got {show(messages)}",
                           "messages", "invalid_type" if messages is not None else "missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(400, f"'{where}' must be an object with 'role' and 'content', got {show(m)}",
                               where, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(400, f"'{where}.role' must be a string such as 'user', got {show(role)}",
                               f"{where}.role", "invalid_type")
        out.append({"role": role, "content": _text_content(m.get("content"), f"{where}.content")})
    return out


def _completion_prompt(body: dict, engine: Engine) -> list[int]:
    from mlx_lora.inference.generation import encode

    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(engine.tokenizer, prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        size = len(engine.tokenizer.get_vocab()) if hasattr(engine.tokenizer, "get_vocab") else None
        bad = [t for t in prompt if t < 0 or (size is not None and t >= size)]
        if bad:
            raise RequestError(400, f"'prompt' holds token ids outside the vocabulary: {show(bad)}", "prompt",
                               "invalid_value")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError(400, "one prompt per request is supported; send the others as separate requests",
                           "prompt", "unsupported_value")
    else:
        raise RequestError(400, f"'prompt' must be a string or a list of token ids, got {show(prompt)}", "prompt",
                           "invalid_type" if prompt is not None else "missing_required_parameter")
    if not ids:
        raise RequestError(400, "'prompt' encodes to no tokens", "prompt", "invalid_value")
    return ids


def parse_request(body, engine: Engine, chat: bool):
    """(adapter name, prompt ids, generation params, stream, include usage in the stream) of a
    request body, or RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    adapter = engine.adapter_for(body.get("model"))
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise RequestError(400, f"'n' must be 1 (one choice per request is supported), got {show(n)}", "n",
                           "unsupported_value")
    unsupported = {"logprobs": body.get("logprobs") not in (None, False, 0),
                   "echo": body.get("echo") not in (None, False),
                   "best_of": not chat and body.get("best_of") not in (None, 1)}
    for key, refused in unsupported.items():
        if refused:
            raise RequestError(400, f"'{key}' is not supported by this server, got {show(body.get(key))}", key,
                               "unsupported_parameter")
    stream = _get(body, "stream", (bool,), "true or false", False)
    options = _get(body, "stream_options", (dict,), "an object", {}) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError(400, f"'stream_options.include_usage' must be true or false, got {show(include_usage)}",
                           "stream_options.include_usage", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(400, f"'stop' must be a string or a list of strings, got {show(stop)}", "stop",
                           "invalid_type")
    from mlx_lora.inference.generation import MAX_STOPS, chat_prompt

    if len(stop) > MAX_STOPS:
        raise RequestError(400, f"'stop' may hold at most {MAX_STOPS} strings, got {len(stop)}", "stop",
                           "invalid_value")
    temperature = _number(body, "temperature", 1.0)  # the OpenAI default
    top_p = _number(body, "top_p", 1.0)
    seed = _number(body, "seed", None)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if chat:
        if engine.template is None:
            raise RequestError(400, f"the model '{engine.base_name}' has no chat template; use /v1/completions, or "
                                    f"restart the server with --chat-template chatml or FILE.jinja", "messages",
                               "no_chat_template")
        messages = _messages(body)
        try:
            prompt = chat_prompt(engine.tokenizer, engine.template, messages)
        except MlxLoraError as e:
            raise RequestError(400, f"the chat template refused these messages: {e}", "messages") from None
        except Exception as e:  # raise_exception() in a template (e.g. roles out of order)
            raise RequestError(400, f"the chat template refused these messages: {str(e)[:300]}", "messages") from None
    else:
        prompt = _completion_prompt(body, engine)
    room = None if engine.context is None else engine.context - len(prompt)
    if room is not None and room < 1:
        raise RequestError(400, f"the prompt has {len(prompt)} tokens, the model's context is {engine.context}",
                           "messages" if chat else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = engine.default_max_tokens if room is None else min(engine.default_max_tokens, room)
    else:
        hi = room if room is not None else Bound(int, 1, 2**20).hi
        problem = Bound(int, 1, hi, cap=False).violation(max_tokens)
        if problem:
            extra = (f" (the model's context is {engine.context} tokens, the prompt takes {len(prompt)})"
                     if room is not None else "")
            raise RequestError(400, f"'{key}' {problem}{extra}", key, "invalid_value")
    if seed is None:
        seed = random.randrange(MAX_SEED)
    params = {"max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p),
              "seed": int(seed), "stop": stop}
    return adapter, prompt, params, stream, include_usage


# ----------------------------------------------------------------------------------------------
# the app


def create_app(engine: Engine):
    """The FastAPI application serving ``engine``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mlx-lora", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _refused(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crashed(request, e: Exception):
        traceback.print_exception(type(e), e, e.__traceback__, file=engine.log)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {str(e)[:300]}", "server_error"),
                            status_code=500)

    async def read_json(request) -> object:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "mlx-lora"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(n) for n in engine.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        engine.adapter_for(name)  # 404 for a name this server does not have
        return card(name)

    async def complete(request: Request, chat: bool):
        body = await read_json(request)
        adapter, prompt, params, stream, include_usage = parse_request(body, engine, chat)
        loop = asyncio.get_running_loop()
        job = Job(adapter, prompt, params, loop, asyncio.Queue())
        name = body["model"]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        engine.submit(job)
        if stream:
            return StreamingResponse(_sse(job, rid, created, name, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
        finally:
            job.cancelled.set()  # a client that went away frees the worker (no-op when finished)
        return _response(rid, created, name, chat, value)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _response(rid: str, created: int, name: str, chat: bool, result) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": name, "choices": [choice], "usage": _usage(result)}


async def _sse(job: Job, rid: str, created: int, name: str, chat: bool, include_usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(content: Optional[str], finish=None, role: bool = False, usage=None, choices=True) -> str:
        if chat:
            delta = {} if content is None else {"content": content}
            if role:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
        data = {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice] if choices else []}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk(None, role=True)
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield chunk(value)
            elif kind == "done":
                yield chunk(None, finish=value.finish_reason)
                if include_usage:
                    yield chunk(None, usage=_usage(value), choices=False)
                break
            else:
                body = error_body(f"internal error: {type(value).__name__}: {str(value)[:300]}", "server_error")
                yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away, or the reply is complete


# ----------------------------------------------------------------------------------------------
# the command


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose Ctrl-C / SIGTERM first stops the generation in progress (its
        stream ends at once instead of running into the graceful-shutdown timeout and being
        cancelled with a traceback) and then ends ``serve`` normally, without uvicorn raising the
        signal again inside the event loop."""

        def __init__(self, engine: "Engine", config):
            super().__init__(config)
            self.engine = engine

        def handle_exit(self, sig, frame) -> None:
            # Not in the handler itself: it interrupts the main thread anywhere, perhaps holding the
            # very lock (a queue's, an event's) that stopping the engine takes.
            threading.Thread(target=self.engine.stop, name="mlx-lora-stop", daemon=True).start()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()  # serve's own return is the way out

    return Server


def _Server(engine, config):
    return _server_class()(engine, config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or one clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MlxLoraError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise MlxLoraError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                           + (" (another server uses this port; pick another with --port)"
                              if e.errno in (98, 48) else "")) from None
    sock.set_inheritable(True)
    return sock


def serve(model_path: str, adapters=(), *, host: str = "127.0.0.1", port: int = 8080,
          chat_template: Optional[str] = None, max_tokens: int = DEFAULT_MAX_TOKENS, strict: bool = False,
          out: Optional[TextIO] = None, trust_remote_code: bool = False) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM). Everything that can be refused (options,
    adapters, the port) is refused before the server starts."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MlxLoraError(f"mlx-lora serve needs FastAPI and uvicorn ({e.name} is missing): "
                           f"pip install 'mlx-lora[serve]'") from None

    out = out or sys.stdout
    named = parse_adapters(adapters)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MlxLoraError(f"--port must be in [0, 65535], got {show(port)}")
    sock = bind(host, port)  # a taken port is refused before the seconds the model takes to load
    try:
        engine = build_engine(model_path, named, chat_template=chat_template, strict=strict, max_tokens=max_tokens,
                              trust_remote_code=trust_remote_code)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving http://{shown}:{bound}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models)",
          file=out, flush=True)
    print(f"models   {', '.join(engine.model_names)}", file=out, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this address can use the models "
              f"(there is no authentication)", file=out, flush=True)
    # On Ctrl-C a reply still streaming ends at its next token, then the server closes.
    server = _Server(engine, uvicorn.Config(create_app(engine), log_level="warning", access_log=False,
                                            timeout_graceful_shutdown=5))
    from mlx_lora.plumbing.interrupts import sigterm_as_interrupt

    try:
        # Ctrl-C or SIGTERM from the first line printed on (a script that reads it may stop the
        # server at once) ends here, as the normal way out; inside server.run uvicorn handles them.
        with sigterm_as_interrupt():
            print(f"serving http://{shown}:{bound}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, "
                  f"/v1/models)", file=out, flush=True)
            print(f"models   {', '.join(engine.model_names)}", file=out, flush=True)
            if host not in ("127.0.0.1", "localhost", "::1"):
                print(f"warning: listening on {host}: anyone who can reach this address can use the models "
                      f"(there is no authentication)", file=out, flush=True)
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
        sock.close()
    print("server stopped", file=out, flush=True)


@click.command(name="serve")
@click.argument("runs", nargs=-1)
@click.option("--model", help="Base model (folder, repo id or .gguf) [default: the one the runs record].")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=RUN",
              help="An adapter or run folder, served as model NAME (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free port).")
@click.option("--chat-template", help="'chatml' or a .jinja file, for tokenizers without a template.")
@click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True,
              help="New tokens when a request does not say.")
@click.option("--strict", is_flag=True, help="Refuse an adapter trained on a different base model (default: warn).")
@click.option("--trust-remote-code", is_flag=True, help="Let the model folder run the Python code it ships.")
def serve_command(runs, model, adapters, host, port, chat_template, max_tokens, strict, trust_remote_code):
    """Serve the model and its adapters over an OpenAI-compatible HTTP API.

    RUNS, run folders (e.g. runs/quickstart/run), are served as adapters named after their
    folders (runs/support/run: support), on the base model they record when --model is not given."""
    adapters = tuple(adapters) + tuple(f"{serve_name(r)}={r}" for r in runs)
    recorded = [read_run(folder) for folder in parse_adapters(adapters).values()]
    if model is None:
        bases = sorted({r.base_model for r in recorded if r.base_model})
        if len(bases) != 1 or any(r.base_model is None for r in recorded):
            raise MlxLoraError("no --model given and the runs do not name one base model"
                               + (f" ({', '.join(bases)})" if bases else "") + ": pass --model")
        model = bases[0]
    if chat_template is None:
        templates = {r.chat_template for r in recorded}
        if len(templates) == 1:
            chat_template = templates.pop()
    serve(model, adapters, host=host, port=port, chat_template=chat_template, max_tokens=max_tokens, strict=strict,
          trust_remote_code=trust_remote_code)
