"""``mlx-lora chat`` driven through a pseudo-terminal, as a user types into it: multi-turn replies
that use the history, streaming, ``/system``, ``/reset``, ``/save`` (whose file ``mlx-lora train``
then trains on), Ctrl-C during a reply and at the prompt, Ctrl-D, unknown commands.

Replies are checked against greedy generation of the same messages in the test process, so the
history the chat sends to the model is checked too, not only what it prints."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest
from cli_harness import cli_env as _cli_env
from cli_harness import run_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    yield from _cli_env(tmp_path_factory)


class Terminal:
    """A child process on a pseudo-terminal: write keys, wait for text, with timestamps."""

    def __init__(self, argv: list[str], cwd: Path):
        env = dict(
            os.environ,
            TERM="dumb",
            PYTHONPATH=str(REPO),
            MLX_LORA_NO_BLAS_REEXEC="1",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env.pop("MLX_LORA_DEBUG", None)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its controlling tty, Ctrl-C sends it SIGINT
            os.chdir(cwd)
            # Started as CI runners and `cmd &` in a script start it: with SIGINT inherited ignored
            # (Python then installs no handler). Ctrl-C typed into the chat must still reach it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.execve(sys.executable, [sys.executable, "-m", "mlx_lora", *argv], env)
        self.text = ""
        self.arrivals: list[tuple[float, int]] = []  # (time, length of self.text) after each read
        self.mark = 0

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child closed the terminal
            data = b""
        if not data:
            raise EOFError(self.text[-2000:])
        self.text += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        self.arrivals.append((time.monotonic(), len(self.text)))
        return True

    def expect(self, needle: str, timeout: float = 300) -> str:
        """Wait until ``needle`` appears after the last match; return the text up to it."""
        end = time.monotonic() + timeout
        while needle not in self.text[self.mark :]:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} did not appear; the terminal shows:\n{self.text[-3000:]}")
            try:
                self._read(min(left, 0.5))
            except EOFError:
                raise AssertionError(f"the chat ended before {needle!r}:\n{self.text[-3000:]}") from None
        i = self.text.index(needle, self.mark)
        before, self.mark = self.text[self.mark : i], i + len(needle)
        return before

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def say(self, line: str) -> str:
        """Type ``line`` and Enter; return what the chat printed before its next prompt."""
        self.send(line + "\n")
        self.expect(line + "\n")  # the terminal's echo
        return self.expect(">>> ")

    def wait(self, timeout: float = 300) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                try:
                    while self._read(0.05):
                        pass
                except EOFError:
                    pass
                return os.waitstatus_to_exitcode(status)
            try:
                self._read(0.1)
            except EOFError:
                pass
        self.kill()
        raise AssertionError(f"the chat did not exit:\n{self.text[-2000:]}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def terminal(tmp_path):
    started = []

    def start(*argv) -> Terminal:
        t = Terminal(list(argv), tmp_path)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()
        os.close(t.fd)


@pytest.fixture(scope="module")
def greedy(tiny_llama):
    """What greedy generation answers to a list of messages (the reference for the chat)."""
    from mlx_lora.commands.api import load_for_inference
    from mlx_lora.inference.generation import chat_prompt, chat_template_for, stream

    model, tokenizer, _ = load_for_inference(str(tiny_llama))
    template = chat_template_for(tokenizer, None, str(tiny_llama))

    def answer(messages, max_tokens: int) -> str:
        return "".join(stream(model, tokenizer, chat_prompt(tokenizer, template, messages), max_tokens=max_tokens))

    return answer


def test_multi_turn_chat_system_reset_and_save_as_training_data(
    terminal, tiny_llama, tmp_path, greedy, capsys, cli_env
):
    t = terminal("chat", "--model", str(tiny_llama), "--max-tokens", "8")
    t.expect(">>> ")
    assert "/save FILE" in t.say("/help")
    assert "unknown command /nope; type /help" in t.say("/nope now")
    assert "nothing to save yet" in t.say("/save chats.jsonl")
    assert "system message set: Answer briefly." in t.say("/system Answer briefly.")
    u1, u2, u3 = "What is the code word for the red apple?", "And for the green pear?", "Hello"
    shown1, shown2 = t.say(u1), t.say(u2)
    assert "saved 4 messages and the system message" in t.say("/save chats.jsonl")
    assert "conversation cleared, system message kept" in t.say("/reset")
    shown3 = t.say(u3)
    t.say("/save chats.jsonl")  # appended: a second row
    assert "system message removed" in t.say("/system")
    t.send("\x03")  # Ctrl-C at the prompt leaves, cleanly
    assert t.wait() == 0, t.text[-3000:]

    rows = [json.loads(line) for line in (tmp_path / "chats.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    system = {"role": "system", "content": "Answer briefly."}
    m = rows[0]["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant"]
    assert m[0] == system and m[1]["content"] == u1 and m[3]["content"] == u2
    # Each reply is the model's answer to the whole conversation so far, and is what was printed.
    assert m[2]["content"] == greedy([system, m[1]], 8)
    assert m[4]["content"] == greedy(m[:4], 8)
    assert m[2]["content"].strip() and m[2]["content"] in shown1 and m[4]["content"] in shown2
    # After /reset only the system message and the new turn reach the model.
    m2 = rows[1]["messages"]
    assert m2[:2] == [system, {"role": "user", "content": u3}] and len(m2) == 3
    assert m2[2]["content"] == greedy(m2[:2], 8) and m2[2]["content"] in shown3

    # The saved file is training data as it stands.
    code, out, err = run_main(
        capsys,
        [
            "train",
            "--model",
            str(tiny_llama),
            "--data",
            str(tmp_path / "chats.jsonl"),
            "--out",
            str(tmp_path / "run"),
            "--iters",
            "1",
            "--batch-size",
            "1",
            "--set",
            "data.valid_fraction=0",
            "--quiet",
        ],
    )
    assert code == 0, err
    assert "2 examples (chat)" in err
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_replies_stream_and_ctrl_c_stops_a_reply_not_the_chat(terminal, tiny_llama, tmp_path):
    # A random model rarely ends a reply: 3000 tokens take seconds, time to watch them arrive.
    t = terminal("chat", "--model", str(tiny_llama), "--max-tokens", "3000")
    t.expect(">>> ")
    t.send("Tell me a long story\n")
    t.expect("Tell me a long story\n")
    start = len(t.text)
    # The reply arrives in pieces (at least 3 reads), before it has ended: it streams. Waits on
    # the text itself; the deadline only ends a truly stuck chat.
    end = time.monotonic() + 300
    while len(t.text) - start < 20 or len([a for a in t.arrivals if a[1] > start]) < 3:
        assert time.monotonic() < end, t.text[start:]
        t._read(1)
    assert ">>> " not in t.text[start:], t.text[start:]
    t.send("\x03")
    t.expect("[reply stopped; this exchange is left out of the history]")
    t.expect(">>> ")
    # The chat goes on, and the stopped exchange is not in the history.
    assert "nothing to save yet" in t.say("/save x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
    t.send("\x04")  # Ctrl-D at the prompt leaves
    assert t.wait() == 0


def test_chat_refuses_bad_options_in_one_line(tiny_llama, tmp_path, capsys, cli_env):
    from cli_harness import assert_refused

    base = ["chat", "--model", str(tiny_llama)]
    assert_refused(capsys, base + ["--max-tokens", "0"], ["--max-tokens", ">= 1"], [tmp_path])
    assert_refused(capsys, base + ["--top-p", "2"], ["--top-p", "(0, 1]"], [tmp_path])
    assert_refused(
        capsys,
        base + ["--chat-template", str(tmp_path / "none.jinja")],
        [str(tmp_path / "none.jinja"), "no such file"],
        [tmp_path],
    )
    assert_refused(capsys, ["chat", "--model", str(tmp_path / "missing")], ["does not exist"], [tmp_path])


def test_a_tokenizer_without_a_template_needs_chat_template(tiny_llama, tmp_path):
    import io
    import shutil

    from mlx_lora.commands.chat import chat
    from mlx_lora.plumbing.errors import MlxLoraError

    model = tmp_path / "no-template"
    shutil.copytree(tiny_llama, model)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    del conf["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(conf))
    lines = iter(["Hello", "/quit"])
    with pytest.raises(MlxLoraError, match="no chat template; pass --chat-template chatml"):
        chat(str(model), read=lambda prompt: next(lines), out=io.StringIO(), err=io.StringIO())
    out = io.StringIO()
    conv = chat(
        str(model), chat_template="chatml", max_tokens=4, read=lambda prompt: next(lines), out=out, err=io.StringIO()
    )
    assert [m["role"] for m in conv.turns] == ["user", "assistant"]
    assert conv.turns[1]["content"] and conv.turns[1]["content"] in out.getvalue()


def test_a_second_turn_reuses_the_first_turns_cache(tiny_llama, caplog):
    import logging

    from mlx_lora.commands.api import load_for_inference
    from mlx_lora.commands.chat import run_chat
    from mlx_lora.inference.generation import chat_template_for

    model, tok, _ = load_for_inference(str(tiny_llama))
    lines = iter(["Tell me about the red apple and the code word, please.", "And the green one?"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    with caplog.at_level(logging.DEBUG, logger="mlx_lora.commands.chat"):
        conv = run_chat(
            model,
            tok,
            chat_template_for(tok, None, "tiny"),
            system="Be brief.",
            max_tokens=6,
            read=read,
            out=io.StringIO(),
        )
    assert len(conv.turns) == 4
    turns = [r.args for r in caplog.records if r.getMessage().startswith("turn ")]
    (t1, cached1, prompt1), (t2, cached2, prompt2) = turns
    assert cached1 == 0 and prompt2 > prompt1
    assert cached2 >= prompt1  # the whole first prompt (and part of the reply) was not prefilled again
