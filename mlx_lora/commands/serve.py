"""``mlx-lora serve``: an OpenAI-compatible HTTP API over one base model and its adapters.

Endpoints (FastAPI on uvicorn): ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream`` as server-sent events), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``. The
``model`` field of a request picks the base (named after its folder or file) or one of the
adapters given as ``--adapter NAME=RUN``.

Generation runs in the one generation engine (:mod:`mlx_lora.inference.engine`): requests join and leave a
running batch at token boundaries, requests for different adapters share one decode step (the
base weights exist once), and a prefix cache skips the prefill of prompts that start as an
earlier one did. The event loop only reads, checks and answers: the body is parsed and the
prompt rendered and tokenized in worker threads, so ``/v1/models``, ``/health`` and
``/metrics`` answer at once under load. A client that goes away has its rows dropped at the
next token. A bad request gets the OpenAI error shape ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status (413 for a body over ``--max-body-mb``, 429 when ``--max-queue``
requests wait already); an exception while serving one is reported to it (500) and logged,
never taking the server down.
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request),
# which are imported inside create_app, so they must be evaluated where they are written.

import asyncio
import json
import logging
import random
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, TextIO

import click

from mlx_lora.commands.api import load_for_inference
from mlx_lora.commands.run_inputs import read_run, serve_name
from mlx_lora.config import MAX_SEED, Bound, check_options, show
from mlx_lora.inference.engine import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PROMPT_CACHE_GB,
    MAX_TOP_LOGPROBS,
    AdapterBank,
    Engine,
    QueueFull,
    Sampling,
)
from mlx_lora.inference.generation import LIMITS, MAX_STOPS, chat_prompt, chat_template_for, encode
from mlx_lora.inference.json_constraint import JsonConstraint, schema_problem
from mlx_lora.plumbing.errors import DataError, MlxLoraError
from mlx_lora.plumbing.interrupts import sigterm_as_interrupt

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BODY_MB = 8.0
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Request fields and the values they may take (temperature as the OpenAI API bounds it; max_tokens
# by the model's context, see parse_request).
FIELD_BOUNDS = {"temperature": Bound(float, 0, 2, cap=False), "top_p": LIMITS["top_p"], "seed": LIMITS["seed"]}


class RequestError(Exception):
    """A request the server refuses, in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
    ):
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
            raise MlxLoraError(
                f"--adapter {show(spec)}: the name may hold letters, digits and . _ : / - "
                f"(at most 128, starting with a letter or digit)"
            )
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


class Server:
    """What the HTTP app serves: the generation engine (which owns the model and runs on its own
    thread), the tokenizer and chat template, the model names and the limits."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        template,
        adapter_names: list[str],
        base_name: str,
        *,
        context: Optional[int] = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20,
        log: Optional[TextIO] = None,
    ):
        self.engine, self.tokenizer, self.template = engine, tokenizer, template
        self.adapter_names, self.base_name = list(adapter_names), base_name
        self.context = context
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = int(max_body_bytes)
        self.log = log or sys.stderr
        self.created = int(time.time())
        self.vocab_size = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else None

    @property
    def model(self):
        return self.engine.model

    @property
    def model_names(self) -> list[str]:
        return [self.base_name] + self.adapter_names

    def adapter_for(self, name) -> Optional[str]:
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"'model' must be one of: {', '.join(self.model_names)}", "model")
        if name == self.base_name:
            return None
        if name in self.adapter_names:
            return name
        raise RequestError(
            404,
            f"The model '{name[:200]}' does not exist; this server has: {', '.join(self.model_names)}",
            "model",
            "model_not_found",
        )

    def close(self) -> None:
        self.engine.close()


def build_server(
    model_path: str,
    adapters: dict[str, str],
    *,
    chat_template: Optional[str] = None,
    strict: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    context: Optional[int] = None,
    prompt_cache_gb: float = DEFAULT_PROMPT_CACHE_GB,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    log: Optional[TextIO] = None,
    trust_remote_code: bool = False,
) -> Server:
    """Load the base once, then every adapter (all checked before the server starts)."""

    check_options(
        [
            ("--max-tokens", max_tokens, LIMITS["max_tokens"]),
            ("--max-batch", max_batch, Bound(int, 1, 1024)),
            ("--max-queue", max_queue, Bound(int, 0, 10**6)),
            ("--prompt-cache-gb", prompt_cache_gb, Bound(float, 0, 2**20)),
            ("--max-body-mb", max_body_mb, Bound(float, 0, 2**20, lo_open=True)),
        ]
        + ([("--max-context", context, Bound(int, 2, 2**24))] if context is not None else [])
    )
    log = log or sys.stderr
    base_name = base_model_name(model_path)
    if base_name in adapters:
        raise MlxLoraError(
            f"--adapter {base_name}=...: {base_name!r} already names the base model; choose another adapter name"
        )
    model, tokenizer, info = load_for_inference(
        model_path, None, stream=log, dequantize_on_cpu="auto", trust_remote_code=trust_remote_code
    )
    bank = (
        AdapterBank(
            model,
            info.local_path,
            adapters,
            strict=strict,
            warn=lambda m: click.echo(f"warning: {m}", file=log, flush=True),
        )
        if adapters
        else None
    )
    template = None
    try:
        template = chat_template_for(tokenizer, chat_template, model_path)
    except MlxLoraError as e:
        if chat_template is not None or isinstance(e, DataError):  # a template that fails its check
            raise
        logger.warning(
            f"{model_path} has no chat template: /v1/chat/completions will refuse requests "
            f"(start with --chat-template chatml or FILE.jinja); /v1/completions works"
        )
    model_context = _context_length(info.config)
    if context is None:
        context = model_context
    elif model_context is not None:
        context = min(context, model_context)
    engine = Engine(
        model,
        tokenizer,
        bank=bank,
        max_batch=max_batch,
        max_queue=max_queue,
        context=context,
        prompt_cache_bytes=int(prompt_cache_gb * 2**30),
    )
    return Server(
        engine,
        tokenizer,
        template,
        list(adapters),
        base_name,
        context=context,
        default_max_tokens=max_tokens,
        max_body_bytes=int(max_body_mb * 2**20),
        log=log,
    )


def _context_length(config: dict) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# ----------------------------------------------------------------------------------------------
# requests

# The request fields each endpoint understands; any other field is refused, named.
CHAT_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "metadata",
    "store",
}
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "echo",
    "best_of",
    "suffix",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "response_format",
}
MAX_N = 16
MAX_STOP_CHARS = 256


@dataclass
class Parsed:
    """A checked request: the adapter, prompt ids, sampling of choice 0, how many choices, and
    what the reply carries."""

    adapter: Optional[str]
    prompt: list
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tools: Optional[list] = None
    forced_tool: bool = False
    """tool_choice 'required' or a named function: the reply is constrained to one tool call."""


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
                raise RequestError(
                    400,
                    f'\'{where}\': only text parts ({{"type": "text", "text": ...}}) are supported, got {show(part)}',
                    where,
                    "invalid_type",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(
        400, f"'{where}' must be a string or a list of text parts, got {show(content)}", where, "invalid_type"
    )


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            400,
            f"'messages' must be a non-empty list of messages, got {show(messages)}",
            "messages",
            "invalid_type" if messages is not None else "missing_required_parameter",
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(
                400, f"'{where}' must be an object with 'role' and 'content', got {show(m)}", where, "invalid_type"
            )
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(
                400,
                f"'{where}.role' must be a string such as 'user', got {show(role)}",
                f"{where}.role",
                "invalid_type",
            )
        calls = m.get("tool_calls")
        msg = {"role": role}
        if calls is not None:  # an assistant turn that called tools (content may be null)
            msg["tool_calls"] = _tool_calls_in(calls, f"{where}.tool_calls")
            msg["content"] = "" if m.get("content") is None else _text_content(m.get("content"), f"{where}.content")
        else:
            msg["content"] = _text_content(m.get("content"), f"{where}.content")
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise RequestError(
                        400, f"'{where}.{key}' must be a string, got {show(m[key])}", f"{where}.{key}", "invalid_type"
                    )
                msg[key] = m[key]
        out.append(msg)
    return out


def _tool_calls_in(calls, where: str) -> list[dict]:
    """An assistant message's tool calls, as chat templates read them (arguments as an object)."""
    if not isinstance(calls, list):
        raise RequestError(400, f"'{where}' must be a list of tool calls, got {show(calls)}", where, "invalid_type")
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(
                400,
                f'\'{where}[{i}]\' must be {{"type": "function", "function": {{"name", "arguments"}}}}, got {show(c)}',
                f"{where}[{i}]",
                "invalid_type",
            )
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise RequestError(
                    400,
                    f"'{where}[{i}].function.arguments' is not JSON",
                    f"{where}[{i}].function.arguments",
                    "invalid_value",
                ) from None
        out.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _tools(body: dict) -> tuple[Optional[list], bool, Optional[dict]]:
    """(tools for the template, whether a call is forced, the JSON schema of a forced call)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise RequestError(400, "'tool_choice' names a tool but 'tools' is missing", "tool_choice")
        return None, False, None
    if not isinstance(tools, list) or not tools:
        raise RequestError(
            400, f"'tools' must be a non-empty list of functions, got {show(tools)}", "tools", "invalid_type"
        )
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if (
            not isinstance(t, dict)
            or t.get("type") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not fn["name"]
        ):
            raise RequestError(
                400,
                f'\'tools[{i}]\' must be {{"type": "function", "function": {{"name": ..., '
                f'"parameters": ...}}}}, got {show(t)}',
                f"tools[{i}]",
                "invalid_type",
            )
        params = fn.get("parameters", {"type": "object"})
        problem = schema_problem(params)
        if problem:
            raise RequestError(
                400,
                f"'tools[{i}].function.parameters': {problem}",
                f"tools[{i}].function.parameters",
                "unsupported_value",
            )
        names.append(fn["name"])
    if choice in (None, "auto", "none"):
        return (None if choice == "none" else tools), False, None
    if choice == "required":
        chosen = tools
    elif (
        isinstance(choice, dict)
        and isinstance(choice.get("function"), dict)
        and choice["function"].get("name") in names
    ):
        chosen = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    else:
        raise RequestError(
            400,
            f"'tool_choice' must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": one of {names}}}}}, '
            f"got {show(choice)}",
            "tool_choice",
            "invalid_value",
        )
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"enum": [t["function"]["name"]]},
                    "arguments": t["function"].get("parameters", {"type": "object"}),
                },
                "required": ["name", "arguments"],
            }
            for t in chosen
        ]
    }
    return tools, True, schema


def _response_format(body: dict) -> Optional[dict]:
    """The JSON schema the reply must satisfy ({} for any JSON object), or None for free text."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise RequestError(
                400,
                "'response_format.json_schema.schema' must be a JSON schema object",
                "response_format.json_schema.schema",
                "invalid_type",
            )
        problem = schema_problem(schema)
        if problem:
            raise RequestError(
                400,
                f"'response_format.json_schema.schema': {problem}",
                "response_format.json_schema.schema",
                "unsupported_value",
            )
        return schema
    raise RequestError(
        400,
        f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {show(kind)}",
        "response_format.type",
        "invalid_value",
    )


def _completion_prompt(body: dict, server: Server) -> list[int]:

    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(server.tokenizer, prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        size = server.vocab_size
        bad = [t for t in prompt if t < 0 or (size is not None and t >= size)]
        if bad:
            raise RequestError(
                400, f"'prompt' holds token ids outside the vocabulary: {show(bad)}", "prompt", "invalid_value"
            )
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError(
            400,
            "one prompt per request is supported; send the others as separate requests",
            "prompt",
            "unsupported_value",
        )
    else:
        raise RequestError(
            400,
            f"'prompt' must be a string or a list of token ids, got {show(prompt)}",
            "prompt",
            "invalid_type" if prompt is not None else "missing_required_parameter",
        )
    if not ids:
        raise RequestError(400, "'prompt' encodes to no tokens", "prompt", "invalid_value")
    return ids


def _refuse_unsupported(body: dict, chat: bool) -> None:
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise RequestError(
            400,
            f"unsupported field{'s' if len(unknown) > 1 else ''}: {', '.join(repr(k[:60]) for k in unknown[:10])}",
            unknown[0][:60],
            "unsupported_parameter",
        )
    refused = {
        "frequency_penalty": body.get("frequency_penalty") not in (None, 0, 0.0),
        "presence_penalty": body.get("presence_penalty") not in (None, 0, 0.0),
        "logit_bias": body.get("logit_bias") not in (None, {}),
        "echo": body.get("echo") not in (None, False),
        "best_of": not chat and body.get("best_of") not in (None, 1),
        "suffix": not chat and body.get("suffix") not in (None, ""),
    }
    for key, bad in refused.items():
        if bad:
            raise RequestError(
                400, f"'{key}' is not supported by this server, got {show(body.get(key))}", key, "unsupported_parameter"
            )


def parse_request(body, server: Server, chat: bool) -> Parsed:
    """The checked request of a body, or RequestError."""

    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    adapter = server.adapter_for(body.get("model"))
    _refuse_unsupported(body, chat)
    n = body.get("n")
    if n is None:
        n = 1
    elif isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise RequestError(400, f"'n' must be an integer in [1, {MAX_N}], got {show(n)}", "n", "invalid_value")
    stream = _get(body, "stream", (bool,), "true or false", False)
    options = _get(body, "stream_options", (dict,), "an object", {}) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError(
            400,
            f"'stream_options.include_usage' must be true or false, got {show(include_usage)}",
            "stream_options.include_usage",
            "invalid_type",
        )
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(
            400, f"'stop' must be a string or a list of strings, got {show(stop)}", "stop", "invalid_type"
        )
    if len(stop) > MAX_STOPS:
        raise RequestError(
            400, f"'stop' may hold at most {MAX_STOPS} strings, got {len(stop)}", "stop", "invalid_value"
        )
    if any(len(x) > MAX_STOP_CHARS for x in stop):  # each token is checked against every stop string
        raise RequestError(
            400, f"a 'stop' string may hold at most {MAX_STOP_CHARS} characters", "stop", "invalid_value"
        )
    temperature = _number(body, "temperature", 1.0)  # the OpenAI default
    top_p = _number(body, "top_p", 1.0)
    seed = _number(body, "seed", None)
    # logprobs: chat takes true/false and top_logprobs; completions an integer (alternatives per token)
    if chat:
        logprobs = _get(body, "logprobs", (bool,), "true or false", False)
        top = body.get("top_logprobs")
        if top is not None:
            problem = Bound(int, 0, MAX_TOP_LOGPROBS, cap=False).violation(top)
            if problem:
                raise RequestError(400, f"'top_logprobs' {problem}", "top_logprobs", "invalid_value")
            if not logprobs:
                raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        top = top or 0
    else:
        top = body.get("logprobs")
        if top is not None:
            problem = Bound(int, 0, 5, cap=False).violation(top)
            if problem:
                raise RequestError(400, f"'logprobs' {problem}", "logprobs", "invalid_value")
        logprobs, top = top is not None, top or 0
    schema = _response_format(body)
    tools, forced, tool_schema = _tools(body) if chat else (None, False, None)
    if forced:
        if schema is not None:
            raise RequestError(
                400,
                "'response_format' and a forced 'tool_choice' cannot be combined",
                "response_format",
                "invalid_value",
            )
        schema = tool_schema
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if chat:
        if server.template is None:
            raise RequestError(
                400,
                f"the model '{server.base_name}' has no chat template; use /v1/completions, or "
                f"restart the server with --chat-template chatml or FILE.jinja",
                "messages",
                "no_chat_template",
            )
        messages = _messages(body)
        try:
            prompt = chat_prompt(server.tokenizer, server.template, messages, tools=tools)
        except MlxLoraError as e:
            raise RequestError(400, f"the chat template refused these messages: {e}", "messages") from None
        except Exception as e:  # raise_exception() in a template (e.g. roles out of order)
            raise RequestError(
                400, f"the chat template refused these messages: {one_line(e)[:300]}", "messages"
            ) from None
        if not prompt:
            raise RequestError(400, "the messages render to no tokens", "messages", "invalid_value")
    else:
        prompt = _completion_prompt(body, server)
    room = None if server.context is None else server.context - len(prompt)
    if room is not None and room < 1:
        raise RequestError(
            400,
            f"the prompt has {len(prompt)} tokens, the context is {server.context}",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = server.default_max_tokens if room is None else min(server.default_max_tokens, room)
    else:
        hi = room if room is not None else Bound(int, 1, 2**20).hi
        problem = Bound(int, 1, hi, cap=False).violation(max_tokens)
        if problem:
            extra = (
                f" (the context is {server.context} tokens, the prompt takes {len(prompt)})" if room is not None else ""
            )
            raise RequestError(400, f"'{key}' {problem}{extra}", key, "invalid_value")
    if seed is None:
        seed = random.randrange(MAX_SEED - MAX_N)
    constraint = JsonConstraint(schema) if schema is not None else None
    sampling = Sampling(
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=int(seed),
        stop=stop,
        logprobs=top if logprobs else None,
        constraint=constraint,
    )
    return Parsed(adapter, prompt, sampling, n, stream, include_usage, logprobs, top, tools, forced)


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------------------------
# tool calls in a reply

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def tool_calls_of(text: str, forced: bool) -> tuple[Optional[str], list[dict]]:
    """(the text outside any tool call, or None; the calls as {"name", "arguments"}) of a reply.
    Recognised: ``<tool_call>{...}</tool_call>`` blocks (Hermes, Qwen, SmolLM3), or a reply that
    is one JSON object (or a list of them) with "name" and "arguments" / "parameters" (Llama 3,
    and every reply constrained by a forced ``tool_choice``)."""
    calls, rest = [], text
    blocks = _TOOL_CALL.findall(text)
    if blocks:
        for b in blocks:
            call = _as_call(b)
            if call is None:
                return text, []
            calls.append(call)
        rest = _TOOL_CALL.sub("", text).strip()
        return (rest or None), calls
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            value = json.loads(stripped)
        except ValueError:
            return text, []
        items = value if isinstance(value, list) else [value]
        parsed = [_as_call(i) for i in items]
        if parsed and all(p is not None for p in parsed):
            return None, parsed
    return text, []


def _as_call(value) -> Optional[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": value["name"], "arguments": args}


# ----------------------------------------------------------------------------------------------
# the app


def create_app(server: Server):
    """The FastAPI application serving ``server``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mlx-lora", docs_url=None, redoc_url=None, openapi_url=None)
    engine = server.engine

    @app.exception_handler(RequestError)
    async def _refused(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(f"{request.method} {request.url.path}: {e.detail}", kind), status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def _crashed(request, e: Exception):
        traceback.print_exception(type(e), e, e.__traceback__, file=server.log)
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}: {one_line(e)[:300]}", "server_error"), status_code=500
        )

    async def read_json(request) -> object:
        limit = server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                413,
                f"the request body has {int(declared)} bytes, more than this server's limit of {limit} (--max-body-mb)",
                None,
                "request_too_large",
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    413,
                    f"the request body is larger than this server's limit of {limit} bytes (--max-body-mb)",
                    None,
                    "request_too_large",
                )
            chunks.append(chunk)
        # Parsing a big body takes time: off the event loop, so other clients are answered meanwhile.
        return await asyncio.to_thread(parse_json_body, b"".join(chunks))

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "mlx-lora"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(n) for n in server.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.adapter_for(name)  # 404 for a name this server does not have
        return card(name)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(format: Optional[str] = None):
        m = engine.metrics()
        if format == "json":
            return m
        lines = []
        for k, v in m.items():
            name = f"mlx_lora_{k}"
            lines.append(f"# TYPE {name} {'counter' if k.endswith('_total') or k.endswith('hits') else 'gauge'}")
            lines.append(f"{name} {v}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def complete(request: Request, chat: bool):
        body = await read_json(request)
        # Rendering the template and tokenizing can take seconds for a big prompt: in a worker thread.
        try:
            parsed = await asyncio.to_thread(parse_request, body, server, chat)
        except RecursionError:  # a value nested almost as deep as the JSON parser allows
            raise RequestError(400, "the request nests arrays or objects too deeply", None, "invalid_value") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for i in range(parsed.n):
                s = parsed.sampling if i == 0 else replace(parsed.sampling, seed=parsed.sampling.seed + i)
                reqs.append(engine.submit(parsed.prompt, parsed.adapter, s, _sink(loop, events, i)))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise RequestError(429, str(e), None, "queue_full", type="rate_limit_error") from None
        reply = Reply(server, parsed, chat, body["model"])
        if parsed.stream:
            return StreamingResponse(
                _sse(reply, events, reqs), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            kind, value = await _until_done_or_gone(request, events, parsed.n)
        finally:
            for r in reqs:
                r.cancel()  # a client that went away frees its rows (no-op when finished)
        if kind == "gone":
            return Response(status_code=499)  # nobody reads it
        if kind == "error":
            raise value
        return reply.whole(value)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def _sink(loop, events: asyncio.Queue, index: int):
    def put(kind, value):
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
        except RuntimeError:  # the request's event loop is gone (server shutting down)
            pass

    return put


async def _until_done_or_gone(request, events: asyncio.Queue, n: int) -> tuple:
    """("done", [Result per choice]) or ("error", exception) once every choice is done, or
    ("gone", None) as soon as the client disconnects."""

    async def done():
        results = [None] * n
        left = n
        while left:
            i, kind, value = await events.get()
            if kind == "error":
                return "error", value
            if kind == "done":
                results[i] = value
                left -= 1
        return "done", results

    async def gone():
        while True:  # the body has been read, so the next message is the disconnect
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return "gone", None

    tasks = [asyncio.ensure_future(done()), asyncio.ensure_future(gone())]
    try:
        finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(finished)).result()
    finally:
        for t in tasks:
            t.cancel()


class Reply:
    """The OpenAI shapes of a reply: whole, or as server-sent event chunks."""

    def __init__(self, server: Server, parsed: Parsed, chat: bool, name: str):
        self.server, self.parsed, self.chat, self.name = server, parsed, chat, name
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tools = parsed.tools is not None

    def _token_text(self, tok: int) -> str:
        return self.server.tokenizer.decode([tok])

    def _chat_logprobs(self, tokens, infos) -> dict:
        content = []
        for tok, (lp, top) in zip(tokens, infos):
            text = self._token_text(tok)
            content.append(
                {
                    "token": text,
                    "logprob": lp,
                    "bytes": list(text.encode("utf-8", "replace")),
                    "top_logprobs": [
                        {"token": (t := self._token_text(i)), "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                        for i, v in (top or [])[: self.parsed.top_logprobs]
                    ],
                }
            )
        return {"content": content}

    def _text_logprobs(self, tokens, infos, offset: int = 0) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, (lp, top) in zip(tokens, infos):
            text = self._token_text(tok)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._token_text(i): v for i, v in (top or [])})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _calls(self, result) -> tuple[Optional[str], list]:
        if not self.tools:
            return result.text, []
        text, calls = tool_calls_of(result.text, self.parsed.forced_tool)
        return text, [
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
            }
            for c in calls
        ]

    def choice(self, i: int, result) -> dict:
        lps = None
        if self.parsed.logprobs:
            lps = (self._chat_logprobs if self.chat else self._text_logprobs)(result.tokens, result.logprobs)
        if not self.chat:
            return {"index": i, "text": result.text, "logprobs": lps, "finish_reason": result.finish_reason}
        text, calls = self._calls(result)
        message = {"role": "assistant", "content": text}
        finish = result.finish_reason
        if calls:
            message["tool_calls"] = calls
            finish = "tool_calls"
        return {"index": i, "message": message, "logprobs": lps, "finish_reason": finish}

    def usage(self, results) -> dict:
        prompt = results[0].prompt_tokens
        completion = sum(r.completion_tokens for r in results)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens},
        }

    def whole(self, results) -> dict:
        return {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.name,
            "choices": [self.choice(i, r) for i, r in enumerate(results)],
            "usage": self.usage(results),
        }

    def chunk(
        self,
        i: int,
        content: Optional[str] = None,
        finish=None,
        role: bool = False,
        usage=None,
        choices: bool = True,
        logprobs=None,
        delta: Optional[dict] = None,
    ) -> str:
        if self.chat:
            if delta is None:
                delta = {} if content is None else {"content": content}
                if role:
                    delta = {"role": "assistant", "content": ""}
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": content or "", "logprobs": logprobs, "finish_reason": finish}
        data = {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.name,
            "choices": [choice] if choices else [],
        }
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(reply: Reply, events: asyncio.Queue, reqs: list):
    n = reply.parsed.n
    # With tools offered, a reply may turn out to be a call: its text is sent once it is complete.
    hold = reply.tools and reply.chat
    results: list = [None] * n
    try:
        if reply.chat:
            for i in range(n):
                yield reply.chunk(i, role=True)
        left = n
        while left:
            i, kind, value = await events.get()
            if kind == "token":
                if hold:
                    continue
                lps = None
                if reply.parsed.logprobs and value.id >= 0:
                    info = [(value.logprob, value.top)]
                    lps = (reply._chat_logprobs if reply.chat else reply._text_logprobs)([value.id], info)
                if value.text or lps:
                    yield reply.chunk(i, value.text, logprobs=lps)
            elif kind == "done":
                results[i] = value
                left -= 1
                if hold:
                    text, calls = reply._calls(value)
                    if calls:
                        yield reply.chunk(i, delta={"tool_calls": [dict(c, index=k) for k, c in enumerate(calls)]})
                    elif text:
                        yield reply.chunk(i, text)
                    yield reply.chunk(i, finish="tool_calls" if calls else value.finish_reason)
                else:
                    yield reply.chunk(i, finish=value.finish_reason)
            else:
                body = error_body(f"internal error: {type(value).__name__}: {one_line(value)[:300]}", "server_error")
                yield f"data: {json.dumps(body)}\n\n"
                break
        else:
            if reply.parsed.include_usage:
                yield reply.chunk(0, usage=reply.usage(results), choices=False)
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()  # the client went away, or the reply is complete


def parse_json_body(raw: bytes) -> object:
    """The JSON value of a request body, or a 400 naming what is wrong: not UTF-8, not JSON,
    nested too deep, or a string holding a lone surrogate (which no tokenizer can encode)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the request body is not UTF-8 (byte {e.start})", None, "invalid_json") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise RequestError(400, "the request body nests arrays or objects too deeply", None, "invalid_json") from None
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    where = _lone_surrogate(value)
    if where is not None:
        raise RequestError(
            400, f"'{where or 'body'}' holds a lone UTF-16 surrogate (not a character)", where or None, "invalid_value"
        )
    return value


def _lone_surrogate(value) -> Optional[str]:
    """The path of the first string (key or value) in ``value`` that is not valid Unicode text."""
    stack = [("", value)]
    while stack:  # iterative: a deep body must not exhaust the recursion limit
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(v, dict):
            for k, item in v.items():
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return path
                stack.append((f"{path}.{k}" if path else str(k), item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
    return None


# ----------------------------------------------------------------------------------------------
# the command


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
        raise MlxLoraError(
            f"cannot listen on {host}:{port}: {e.strerror or e}"
            + (" (another server uses this port; pick another with --port)" if e.errno in (98, 48) else "")
        ) from None
    sock.set_inheritable(True)
    return sock


def _server_class():
    import uvicorn

    class AppServer(uvicorn.Server):
        """uvicorn's server, whose Ctrl-C / SIGTERM first stops the generation in progress (every
        stream ends at its next token instead of running into the graceful-shutdown timeout and
        being cancelled with a traceback) and then ends ``serve`` normally, without uvicorn raising
        the signal again inside the event loop."""

        def __init__(self, server: "Server", config):
            super().__init__(config)
            self.mlx_server = server

        def handle_exit(self, sig, frame) -> None:
            # Not in the handler itself: it interrupts the main thread anywhere, perhaps holding the
            # very lock that stopping the engine takes.
            threading.Thread(target=self.mlx_server.close, name="mlx-lora-stop", daemon=True).start()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()  # serve's own return is the way out

    return AppServer


def _Server(server, config):
    return _server_class()(server, config)


def serve(
    model_path: str,
    adapters=(),
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    chat_template: Optional[str] = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    strict: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    context: Optional[int] = None,
    prompt_cache_gb: float = DEFAULT_PROMPT_CACHE_GB,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    out: Optional[TextIO] = None,
    trust_remote_code: bool = False,
) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM). Everything that can be refused (options,
    adapters, the port) is refused before the server starts."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MlxLoraError(
            f"mlx-lora serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'mlx-lora[serve]'"
        ) from None

    out = out or sys.stdout
    named = parse_adapters(adapters)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MlxLoraError(f"--port must be in [0, 65535], got {show(port)}")
    sock = bind(host, port)  # a taken port is refused before the seconds the model takes to load
    try:
        server = build_server(
            model_path,
            named,
            chat_template=chat_template,
            strict=strict,
            max_tokens=max_tokens,
            max_batch=max_batch,
            max_queue=max_queue,
            context=context,
            prompt_cache_gb=prompt_cache_gb,
            max_body_mb=max_body_mb,
            trust_remote_code=trust_remote_code,
        )
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    # On Ctrl-C a reply still streaming ends at its next token, then the server closes.
    app = _Server(
        server, uvicorn.Config(create_app(server), log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    )

    try:
        # Ctrl-C or SIGTERM from the first line printed on (a script that reads it may stop the
        # server at once) ends here, as the normal way out; inside app.run uvicorn handles them.
        with sigterm_as_interrupt():
            click.echo(
                f"serving http://{shown}:{bound}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models)",
                file=out,
            )
            click.echo(f"models   {', '.join(server.model_names)}", file=out)
            if host not in ("127.0.0.1", "localhost", "::1"):
                click.echo(
                    f"warning: listening on {host}: anyone who can reach this address can use the models "
                    f"(there is no authentication)",
                    file=out,
                )
            app.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        sock.close()
    click.echo("server stopped", file=out)


@click.command(name="serve")
@click.argument("runs", nargs=-1)
@click.option("--model", help="Base model (folder, repo id or .gguf) [default: the one the runs record].")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=RUN",
    help="An adapter or run folder, served as model NAME (repeatable).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free port).")
@click.option("--chat-template", help="'chatml' or a .jinja file, for tokenizers without a template.")
@click.option(
    "--max-tokens",
    type=int,
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="New tokens when a request does not say.",
)
@click.option(
    "--max-batch",
    type=int,
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    help="Requests decoded together at most (the rest wait in the queue).",
)
@click.option(
    "--max-queue",
    type=int,
    default=DEFAULT_MAX_QUEUE,
    show_default=True,
    help="Requests waiting at most; more are answered 429.",
)
@click.option(
    "--max-context",
    "context",
    type=int,
    help="Tokens (prompt and reply) a request may use [default: the model's context].",
)
@click.option(
    "--prompt-cache-gb",
    type=float,
    default=DEFAULT_PROMPT_CACHE_GB,
    show_default=True,
    help="Memory for KV caches of earlier prompts, reused by prompts that start the same (0: off).",
)
@click.option(
    "--max-body-mb",
    type=float,
    default=DEFAULT_MAX_BODY_MB,
    show_default=True,
    help="Largest request body accepted; larger ones are answered 413.",
)
@click.option("--strict", is_flag=True, help="Refuse an adapter trained on a different base model (default: warn).")
@click.option("--trust-remote-code", is_flag=True, help="Let the model folder run the Python code it ships.")
def serve_command(
    runs,
    model,
    adapters,
    host,
    port,
    chat_template,
    max_tokens,
    max_batch,
    max_queue,
    context,
    prompt_cache_gb,
    max_body_mb,
    strict,
    trust_remote_code,
):
    """Serve the model and its adapters over an OpenAI-compatible HTTP API.

    RUNS, run folders (e.g. runs/quickstart/run), are served as adapters named after their
    folders (runs/support/run: support), on the base model they record when --model is not given."""
    adapters = tuple(adapters) + tuple(f"{serve_name(r)}={r}" for r in runs)
    recorded = [read_run(folder) for folder in parse_adapters(adapters).values()]
    if model is None:
        bases = sorted({r.base_model for r in recorded if r.base_model})
        if len(bases) != 1 or any(r.base_model is None for r in recorded):
            raise MlxLoraError(
                "no --model given and the runs do not name one base model"
                + (f" ({', '.join(bases)})" if bases else "")
                + ": pass --model"
            )
        model = bases[0]
    if chat_template is None:
        templates = {r.chat_template for r in recorded}
        if len(templates) == 1:
            chat_template = templates.pop()
    serve(
        model,
        adapters,
        host=host,
        port=port,
        chat_template=chat_template,
        max_tokens=max_tokens,
        strict=strict,
        max_batch=max_batch,
        max_queue=max_queue,
        context=context,
        prompt_cache_gb=prompt_cache_gb,
        max_body_mb=max_body_mb,
        trust_remote_code=trust_remote_code,
    )
