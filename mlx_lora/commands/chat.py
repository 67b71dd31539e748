"""``mlx-lora chat``: a multi-turn conversation in the terminal, the reply streamed as it is made.

The conversation is a list of ``{role, content}`` messages rendered with the model's chat template
(or ``--chat-template``) on every turn. Slash commands act on it: ``/reset`` forgets the turns (the
system message stays), ``/system TEXT`` sets the system message (``/system`` alone removes it),
``/save FILE`` appends the conversation to FILE as one chat JSONL row, which ``mlx-lora train``
reads as training data, ``/help`` and ``/quit``.

Ctrl-C during a reply stops it and returns to the prompt; the interrupted exchange (the question
and the partial reply) is left out of the history, so the next turn and ``/save`` never see half
an answer. Ctrl-C or Ctrl-D at the prompt ends the chat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

import click

from mlx_lora.commands.api import load_for_inference
from mlx_lora.commands.cli import sampling_options
from mlx_lora.commands.run_inputs import resolve
from mlx_lora.config import check_options
from mlx_lora.inference.engine import DEFAULT_PROMPT_CACHE_GB, Engine, Result, Sampling
from mlx_lora.inference.evaluation import PromptTooLong, context_length
from mlx_lora.inference.generation import chat_prompt, chat_template_for, sampling_checks
from mlx_lora.plumbing.errors import MlxLoraError
from mlx_lora.plumbing.interrupts import ctrl_c_on_terminal
from mlx_lora.plumbing.io import atomic_write_text

HELP = """commands:
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message (/system alone removes it)
  /save FILE     append the conversation to FILE as one chat JSONL row (training data)
  /help          this list
  /quit          leave (or Ctrl-D); Ctrl-C stops a reply"""

PROMPT = ">>> "
log = logging.getLogger(__name__)


class Conversation:
    """The system message and the turns, as the chat template and a training row see them."""

    def __init__(self, system: Optional[str] = None):
        self.system = system or None
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(self.turns)

    def save(self, path: str) -> Path:
        """Append ``{"messages": [...]}`` to ``path`` (a new file if absent). An existing file is
        appended to only when it is a chat JSONL of the rows ``/save`` writes (every line one such
        row); anything else, and a symbolic link, is refused and left untouched. The file is
        rewritten whole through a temporary file and a rename (keeping its permissions), so it is
        never left half-written."""

        if not self.turns:
            raise MlxLoraError("nothing to save yet: the conversation has no turns")
        target = Path(path).expanduser()
        if target.is_symlink():
            raise MlxLoraError(
                f"{target} is a symbolic link; /save writes only to a plain file (give the file "
                f"it points to, or another name)"
            )
        if target.is_dir():
            raise MlxLoraError(f"{target} is a folder; give a file name such as chats.jsonl")
        old = ""
        if target.exists():
            if not target.is_file():
                raise MlxLoraError(f"{target} is not a regular file; give a file name such as chats.jsonl")
            try:
                old = target.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MlxLoraError(f"{target}: cannot append to it ({getattr(e, 'strerror', None) or e})") from None
            for i, line in enumerate(old.splitlines(), 1):
                if not is_saved_row(line):
                    raise MlxLoraError(
                        f"{target}, line {i}: not a chat row that /save writes; /save appends only "
                        f"to its own chat JSONL files (give a new file name)"
                    )
        if old and not old.endswith("\n"):
            old += "\n"
        row = json.dumps({"messages": self.messages()}, ensure_ascii=False)
        try:
            atomic_write_text(target, old + row + "\n")
        except OSError as e:
            raise MlxLoraError(f"{target}: cannot write it ({e.strerror or e})") from None
        return target


def is_saved_row(line: str) -> bool:
    """Whether ``line`` is a row :meth:`Conversation.save` writes: ``{"messages": [...]}`` with
    system, user and assistant messages of text content, and nothing else."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    if not isinstance(row, dict) or set(row) != {"messages"} or not isinstance(row["messages"], list):
        return False
    return bool(row["messages"]) and all(
        isinstance(m, dict)
        and set(m) == {"role", "content"}
        and m["role"] in ("system", "user", "assistant")
        and isinstance(m["content"], str)
        for m in row["messages"]
    )


def run_chat(
    model,
    tokenizer,
    template,
    *,
    system: Optional[str] = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    read: Callable[[str], str] = input,
    out: Optional[TextIO] = None,
    context: Optional[int] = None,
    prompt_cache_gb: float = DEFAULT_PROMPT_CACHE_GB,
) -> Conversation:
    """The read-reply loop; returns the conversation when the user leaves. ``read`` is called
    with the prompt and raises EOFError or KeyboardInterrupt to end the chat. ``context``: the
    model's context length, which a turn's prompt and its reply must fit in."""
    out = out or sys.stdout
    # One engine for the whole chat: its prefix cache keeps the conversation's KV between turns,
    # so a turn prefills only what is new since the last reply.
    engine = Engine(model, tokenizer, max_batch=1, prompt_cache_bytes=int(prompt_cache_gb * 2**30))
    try:
        return _chat_loop(engine, tokenizer, template, system, max_tokens, temperature, top_p, seed, read, out, context)
    finally:
        engine.close()


def _chat_loop(engine: Engine, tokenizer, template, system, max_tokens, temperature, top_p, seed, read, out, context):
    conv = Conversation(system)

    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    turn = 0
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            say()
            return conv
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            arg = arg.strip()
            if command in ("/quit", "/exit", "/bye"):
                return conv
            if command == "/help":
                say(HELP)
            elif command == "/reset":
                conv.turns.clear()
                say("[conversation cleared" + (", system message kept]" if conv.system else "]"))
            elif command == "/system":
                conv.system = arg or None
                say(f"[system message set: {arg}]" if arg else "[system message removed]")
            elif command == "/save":
                if not arg:
                    say("[usage: /save FILE]")
                    continue
                try:
                    saved = conv.save(arg)
                    say(
                        f"[saved {len(conv.turns)} messages"
                        + (" and the system message" if conv.system else "")
                        + f" to {saved}]"
                    )
                except MlxLoraError as e:
                    say(f"[not saved: {e}]")
            else:
                say(f"[unknown command {command}; type /help for the list]")
            continue
        messages = conv.messages() + [{"role": "user", "content": line}]
        try:
            prompt = chat_prompt(tokenizer, template, messages, context=context, max_tokens=max_tokens)
        except PromptTooLong as e:
            say(f"[not sent: {e}; /reset starts a new conversation]")
            continue
        except Exception as e:  # a template that refuses this conversation (role order, say)
            say(f"[the chat template failed on this conversation: {type(e).__name__}: {str(e)[:200]}]")
            continue
        result = Result()
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + turn)
        try:
            for token in engine.stream(prompt, None, sampling, result):
                if token.text:
                    out.write(token.text)
                    out.flush()
        except KeyboardInterrupt:
            say("\n[reply stopped; this exchange is left out of the history]")
            continue
        turn += 1
        log.debug(
            "turn %d: %d of %d prompt tokens came from the prefix cache",
            turn,
            result.cached_tokens,
            result.prompt_tokens,
        )
        say()
        if result.finish_reason == "length":
            say(f"[reply cut at --max-tokens {max_tokens}]")
        conv.turns += [{"role": "user", "content": line}, {"role": "assistant", "content": result.text}]


def chat(
    model_path: str,
    adapter: Optional[str] = None,
    *,
    chat_template: Optional[str] = None,
    system: Optional[str] = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    strict: bool = False,
    read: Callable[[str], str] = input,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    trust_remote_code: bool = False,
) -> Conversation:
    """Load ``model_path`` (+ ``adapter``) and chat on the terminal until the user leaves."""

    check_options(sampling_checks(max_tokens, temperature, top_p, seed))
    if system is not None and not isinstance(system, str):
        raise MlxLoraError(f"--system must be text, got {type(system).__name__}")
    err = err or sys.stderr
    model, tokenizer, info = load_for_inference(
        model_path, adapter, strict=strict, stream=err, dequantize_on_cpu="auto", trust_remote_code=trust_remote_code
    )
    template = chat_template_for(tokenizer, chat_template, model_path)
    interactive = _readline_wanted(read)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    err.write(
        f"chat with {model_path}"
        + (f" + adapter {adapter}" if adapter else "")
        + f" ({template.name}); /help for commands, Ctrl-D to leave\n"
    )
    err.flush()
    # Ctrl-C is how a reply is stopped and the chat left, also when SIGINT was inherited ignored.
    with ctrl_c_on_terminal() if interactive else contextlib.nullcontext():
        return run_chat(
            model,
            tokenizer,
            template,
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            read=read,
            out=out,
            context=context_length(info.config),
        )


def _readline_wanted(read) -> bool:
    return read is input and sys.stdin.isatty()


@click.command(name="chat")
@click.argument("run", required=False)
@click.option(
    "--model",
    help="Base, fused or quantized model (folder, repo id or .gguf) [default: the one RUN or --adapter records].",
)
@click.option("--adapter", help="Adapter or run folder (or give it as RUN).")
@click.option(
    "--chat-template",
    help="'chatml' or a .jinja file, for tokenizers without a template [default: the run's data.chat_template].",
)
@click.option("--system", help="System message for the conversation.")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="At most this many new tokens a reply.")
@sampling_options
def chat_command(
    run, model, adapter, chat_template, system, max_tokens, temperature, top_p, seed, strict, trust_remote_code
):
    """Chat with a model (and adapter) in the terminal; replies stream as they are made.

    RUN, a run folder (e.g. runs/quickstart/run), is the adapter and names its base model; the
    chat template it trained with is used unless --chat-template says otherwise."""
    model, adapter, recorded = resolve(model, adapter, run)
    if chat_template is None and recorded is not None:
        chat_template = recorded.chat_template
    chat(
        model,
        adapter,
        chat_template=chat_template,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        strict=strict,
        trust_remote_code=trust_remote_code,
    )
