"""Package an exported model for Ollama (a Modelfile) and LM Studio (its models folder layout).

Ollama. The Modelfile has ``FROM`` (the GGUF file), ``ADAPTER`` when the base model and a GGUF
LoRA are shipped separately, a ``TEMPLATE`` in Ollama's Go template syntax translated from the
model's Jinja chat template, ``PARAMETER stop`` for the end-of-turn tokens and parameters taken
from ``generation_config.json``. ``ollama create`` is run when ``ollama`` is on PATH; otherwise
the command is printed.

The translation does not parse Jinja. It renders the template with marker messages and reads
off the text the template puts around each role (see :class:`ChatFormat`), checks that this
description reproduces the template on a longer conversation, and only then emits the Go
template. Templates with logic beyond "a fixed wrapper per role" (tools, conditional content)
are left out of the Modelfile: Ollama then uses the chat template stored in the GGUF metadata.

LM Studio. Models live in ``<models dir>/<publisher>/<model>/<file>.gguf`` (LM Studio's
documented layout; the models dir defaults to ``~/.lmstudio/models``) and LM Studio reads the
chat template from the GGUF metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlx_lora.converters.adapter_export import export_gguf_adapter
from mlx_lora.converters.fuse import ensure_output_path, load_fused
from mlx_lora.converters.gguf_export import check_type, export_gguf
from mlx_lora.data.templates import apply_chat_template
from mlx_lora.plumbing import ownership
from mlx_lora.plumbing.errors import ExportError
from mlx_lora.plumbing.io import atomic_write_text
from mlx_lora.plumbing.ownership import building, read_marker, record

logger = logging.getLogger(__name__)

_U1, _U2, _A1, _S1 = "MLXLORAUSER1", "MLXLORAUSER2", "MLXLORAASSISTANT1", "MLXLORASYSTEM1"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|eom_id|>")


def _log_default(msg: str) -> None:
    logger.info(msg)


# ---------------------------------------------------------------------------------------------
# Chat template translation


@dataclass
class ChatFormat:
    """A chat template that wraps each turn in fixed text.

    ``head + [system turn] + (user turn | assistant turn)* + generation_prompt`` where a user turn
    is ``user_prefix + content + user_suffix`` and so on. ``head`` is what the template emits
    before the first turn when no system message is given (a default system prompt, or "").
    With ``system_in_user`` the system text is put in front of the first user message's content
    (``system_prefix + system + system_suffix``) instead of a turn of its own; ``system_prefix``
    is None when the template has no place for a system message.
    """

    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    head: str = ""
    system_prefix: str | None = None
    system_suffix: str = ""
    system_in_user: bool = False
    bos: str = ""  # literal BOS text the template emits (kept only when the runtime does not add BOS)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the template produces for ``messages`` (the Python twin of :meth:`go_template`)."""
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        out = [self.bos]
        if system is not None and not self.system_in_user:
            out.append(self.system_prefix + system + self.system_suffix)
        elif system is None:
            out.append(self.head)
        pending = system if self.system_in_user else None
        for m in messages:
            if m["role"] == "user":
                sys_text = ""
                if pending is not None:
                    sys_text, pending = self.system_prefix + pending + self.system_suffix, None
                out.append(self.user_prefix + sys_text + m["content"] + self.user_suffix)
            elif m["role"] == "assistant":
                out.append(self.assistant_prefix + m["content"] + self.assistant_suffix)
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return "".join(out)

    def go_template(self) -> str:
        """The same structure in Ollama's template language (``.System``, ``.Messages``)."""
        parts = [self.bos]
        if self.system_prefix is None:
            parts.append(self.head)
        elif self.system_in_user:
            if self.head:
                parts.append(f"{{{{ if not .System }}}}{self.head}{{{{ end }}}}")
            parts.append("{{ $sys := .System }}")
        else:
            otherwise = f"{{{{ else }}}}{self.head}" if self.head else ""
            parts.append(
                f"{{{{ if .System }}}}{self.system_prefix}{{{{ .System }}}}{self.system_suffix}{otherwise}{{{{ end }}}}"
            )
        user_content = "{{ .Content }}"
        if self.system_in_user and self.system_prefix is not None:
            user_content = (
                f"{{{{ if $sys }}}}{self.system_prefix}{{{{ $sys }}}}{self.system_suffix}"
                f'{{{{ $sys = "" }}}}{{{{ end }}}}{{{{ .Content }}}}'
            )
        parts.append(
            f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{self.user_prefix}{user_content}'
            f'{self.user_suffix}{{{{ else if eq .Role "assistant" }}}}{self.assistant_prefix}'
            f"{{{{ .Content }}}}{self.assistant_suffix}{{{{ end }}}}{{{{ end }}}}"
        )
        parts.append(self.generation_prompt)
        return "".join(parts)


def _render(tokenizer, messages, gen: bool) -> str:
    return apply_chat_template(tokenizer, messages, add_generation_prompt=gen)


def derive_chat_format(tokenizer, add_bos: bool) -> ChatFormat | None:
    """Describe ``tokenizer``'s chat template as a :class:`ChatFormat`, or None when it does not
    have that shape. ``add_bos``: the runtime adds BOS itself (so a BOS the template writes is
    dropped rather than doubled)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    u1, a1, u2, s1 = (
        {"role": "user", "content": _U1},
        {"role": "assistant", "content": _A1},
        {"role": "user", "content": _U2},
        {"role": "system", "content": _S1},
    )
    try:
        r_u = _render(tokenizer, [u1], False)
        r_ua = _render(tokenizer, [u1, a1], False)
        r_uau = _render(tokenizer, [u1, a1, u2], False)
        r_ug = _render(tokenizer, [u1], True)
    except Exception:
        return None
    bos = getattr(tokenizer, "bos_token", None) or ""
    # A template that prints bos_token starts every rendering with it; a template may also simply
    # start with the same text (SmolLM2's BOS is <|im_start|>), which is not a BOS to drop.
    prints_bos = "bos_token" in str(tokenizer.chat_template)
    lead = bos if bos and prints_bos and all(r.startswith(bos) for r in (r_u, r_ua, r_uau, r_ug)) else ""
    r_u, r_ua, r_uau, r_ug = (r[len(lead) :] for r in (r_u, r_ua, r_uau, r_ug))
    if not (r_ua.startswith(r_u) and r_uau.startswith(r_ua) and r_ug.startswith(r_u)) or r_u.count(_U1) != 1:
        return None
    i = r_u.index(_U1)
    first_prefix, user_suffix = r_u[:i], r_u[i + len(_U1) :]
    turn = r_ua[len(r_u) :]
    if turn.count(_A1) != 1:
        return None
    j = turn.index(_A1)
    assistant_prefix, assistant_suffix = turn[:j], turn[j + len(_A1) :]
    second = r_uau[len(r_ua) :]
    if second.count(_U2) != 1 or not second.endswith(_U2 + user_suffix):
        return None
    user_prefix = second[: second.index(_U2)]
    if not first_prefix.endswith(user_prefix):
        return None
    fmt = ChatFormat(
        user_prefix,
        user_suffix,
        assistant_prefix,
        assistant_suffix,
        r_ug[len(r_u) :],
        head=first_prefix[: len(first_prefix) - len(user_prefix)],
        bos="" if add_bos else lead,
    )
    try:
        r_s = _render(tokenizer, [s1, u1], False)[len(lead) :]
    except Exception:
        r_s = None
    if r_s is not None and r_s.count(_S1) == 1:
        user_turn = user_prefix + _U1 + user_suffix
        k = r_s.index(_S1)
        if r_s.endswith(user_turn) and k < len(r_s) - len(user_turn):
            block = r_s[: len(r_s) - len(user_turn)]
            fmt.system_prefix, fmt.system_suffix = block[:k], block[k + len(_S1) :]
        elif r_s.startswith(fmt.head + user_prefix) and r_s.endswith(_U1 + user_suffix):
            inner = r_s[len(fmt.head + user_prefix) : len(r_s) - len(_U1 + user_suffix)]
            k = inner.find(_S1)
            if k >= 0:
                fmt.system_in_user = True
                fmt.system_prefix, fmt.system_suffix = inner[:k], inner[k + len(_S1) :]
    # The description must reproduce the template on a conversation it was not derived from.
    # Short contents too: a template that branches on the content would be caught here.
    convo = ([s1] if fmt.system_prefix is not None else []) + [
        u1,
        a1,
        u2,
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hi"},
    ]
    try:
        want = _render(tokenizer, convo, True)[len(lead) :]
    except Exception:
        return None
    probe = ChatFormat(**{**fmt.__dict__, "bos": ""})
    if probe.render(convo) != want:
        return None
    if any(p and ("{{" in p or '"""' in p) for p in fmt.__dict__.values() if isinstance(p, str)):
        return None  # cannot be written literally into a Go template / Modelfile string
    return fmt


# ---------------------------------------------------------------------------------------------
# Modelfile


def _special_tokens(tokenizer) -> set[str]:
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        out |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    except AttributeError:
        pass
    return out


def stop_tokens(tokenizer, fmt: ChatFormat | None, generation: dict) -> list[str]:
    """Tokens Ollama should stop on: the EOS token(s) and the special tokens that end an
    assistant turn in the chat format."""
    stops: list[str] = []
    eos = generation.get("eos_token_id")
    for tid in eos if isinstance(eos, list) else [eos]:
        if tid is not None:
            try:
                tok = tokenizer.convert_ids_to_tokens(int(tid))
            except (ValueError, TypeError, IndexError, KeyError, OverflowError):
                tok = None
            if tok:
                stops.append(tok)
    if getattr(tokenizer, "eos_token", None):
        stops.append(tokenizer.eos_token)
    specials = _special_tokens(tokenizer)
    if fmt is not None:
        for text in (fmt.assistant_suffix, fmt.user_prefix):
            stops += sorted((s for s in specials if s and s in text), key=text.find)
    stops += [t for t in END_OF_TURN if t in specials and fmt is None]
    return list(dict.fromkeys(s for s in stops if s and '"' not in s))


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def modelfile_text(
    from_path: str,
    *,
    adapter_path: str | None = None,
    fmt: ChatFormat | None = None,
    stops: list[str] = (),
    num_ctx: int | None = None,
    generation: dict | None = None,
    system: str | None = None,
) -> str:
    lines = ["# Modelfile written by mlx-lora", f"FROM {from_path}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.go_template()}"""')
    else:
        lines.append("# TEMPLATE: taken by Ollama from the GGUF file's tokenizer.chat_template")
    if system:
        if '"""' in system:
            raise ExportError('--system must not contain """')
        lines.append(f'SYSTEM """{system}"""')
    for s in stops:
        lines.append(f"PARAMETER stop {_quote(s)}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    gen = generation or {}
    for key, param in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("repetition_penalty", "repeat_penalty"),
    ):
        if gen.get(key) is not None and (key != "top_k" or int(gen[key]) > 0):
            lines.append(f"PARAMETER {param} {gen[key]}")
    return "\n".join(lines) + "\n"


@dataclass
class PackageResult:
    folder: Path
    files: list[Path] = field(default_factory=list)
    command: list[str] | None = None
    created: bool = False
    template: str = "translated"
    lines_: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return self.lines_


def _generation(fm) -> dict:
    path = fm.info.local_path / "generation_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", name or ""):
        raise ExportError(f"--name '{name}': use letters, digits, '.', '_', '-', ':' and '/' only")
    return name


def export_ollama(
    model: str | None,
    adapter,
    name: str,
    *,
    out_dir=None,
    type_name: str = "q8_0",
    mode: str = "fused",
    create: bool | None = None,
    system: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    num_ctx: int | None = None,
    log: Callable[[str], None] = _log_default,
) -> PackageResult:
    """Write a folder with the GGUF file(s) and a Modelfile for ``ollama create``.

    ``mode``: ``fused`` (one GGUF with the adapter merged; works for LoRA and DoRA) or
    ``adapter`` (the base model GGUF, or the ``--model`` .gguf file itself, plus a GGUF LoRA on
    an ``ADAPTER`` line). ``create``: run ``ollama create`` (default: when ollama is on PATH).
    """

    name = _safe_name(name)
    type_name = check_type(type_name)
    if mode not in ("fused", "adapter"):
        raise ExportError(f"--mode {mode}: choose 'fused' or 'adapter'")
    if mode == "adapter" and adapter is None:
        raise ExportError("--mode adapter needs --adapter")
    folder = ensure_output_path(
        Path(out_dir or f"{name.replace('/', '_').replace(':', '_')}-ollama"), overwrite, is_dir=True, kind="ollama"
    )
    exe = shutil.which("ollama")
    if create and exe is None:
        raise ExportError("--create: the 'ollama' command is not on PATH")
    stem = name.replace("/", "_").replace(":", "_")
    files: list[Path] = []
    lines: list[str] = []
    fm = load_fused(model, adapter if mode == "fused" else None)
    # Built beside an earlier package and swapped in at the end: a failure leaves that one as it was.
    with building(folder, "ollama", "export ollama", suffix=".tmp") as tmp:
        base_gguf = str(fm.info.source).lower().endswith(".gguf")
        if mode == "adapter" and base_gguf:
            from_path = str(Path(fm.info.source).expanduser().resolve())
            lines.append(f"FROM uses the base GGUF file itself: {from_path}")
        else:
            gguf_file = tmp / f"{stem}.{type_name}.gguf"
            export_gguf(
                None, None, gguf_file, type_name=type_name, verify=verify, fused=fm, name=name, log=lines.append
            )
            files.append(folder / gguf_file.name)
            from_path = f"./{gguf_file.name}"
        adapter_line = None
        if mode == "adapter":
            lora_file = tmp / f"{stem}-lora.gguf"
            export_gguf_adapter(adapter, lora_file, model=model or str(fm.info.source), verify=verify, log=lines.append)
            files.append(folder / lora_file.name)
            adapter_line = f"./{lora_file.name}"
        add_bos = bool(getattr(fm.tokenizer, "bos_token", None)) and _adds_bos(fm.tokenizer)
        fmt = derive_chat_format(fm.tokenizer, add_bos)
        generation = _generation(fm)
        ctx = num_ctx or min(int(fm.config.get("max_position_embeddings") or 4096), 8192)
        text = modelfile_text(
            from_path,
            adapter_path=adapter_line,
            fmt=fmt,
            stops=stop_tokens(fm.tokenizer, fmt, generation),
            num_ctx=ctx,
            generation=generation,
            system=system,
        )
        modelfile = folder / "Modelfile"
        atomic_write_text(tmp / modelfile.name, text)
        files.append(modelfile)
        lines.append(
            f"wrote {modelfile}"
            + (
                ""
                if fmt
                else " (no TEMPLATE: the chat template is not a fixed "
                "per-role wrapper; Ollama reads it from the GGUF metadata)"
            )
        )
    lines = [line.replace(str(tmp), str(folder)) for line in lines]  # name the files where they now are
    command = ["ollama", "create", name, "-f", str(modelfile)]
    result = PackageResult(folder, files, command, False, "translated" if fmt else "gguf", lines)
    run = exe is not None if create is None else create
    if run:
        lines.append("running: " + " ".join(command))
        proc = subprocess.run([exe, *command[1:]], cwd=folder, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ExportError(
                f"ollama create failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}"
            )
        result.created = True
        lines.append(f"created Ollama model '{name}': ollama run {name}")
    else:
        lines.append(
            f"ollama is not on PATH; to register the model run:\n  cd {folder} && ollama create {name} -f Modelfile"
        )
    for line in lines:
        log(line)
    return result


def _adds_bos(tokenizer) -> bool:
    """Whether encoding adds BOS by itself (then llama.cpp's add_bos_token is true too)."""
    try:
        ids = tokenizer.encode("a")
        return bool(ids) and ids[0] == tokenizer.bos_token_id
    except (ValueError, TypeError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# LM Studio


def lmstudio_models_dir(explicit=None) -> Path:
    """``explicit``, ``$LMSTUDIO_MODELS_DIR``, ``~/.lmstudio/models``, or the pre-0.3 location
    ``~/.cache/lm-studio/models`` when only that exists."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("LMSTUDIO_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    new, old = Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"
    return old if old.is_dir() and not new.is_dir() else new


def export_lmstudio(
    model: str | None,
    adapter,
    name: str,
    *,
    models_dir=None,
    publisher: str = "mlx-lora",
    type_name: str = "q8_0",
    verify: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = _log_default,
) -> PackageResult:
    """Write ``<models dir>/<publisher>/<name>/<name>-<type>.gguf`` (adapter fused)."""

    type_name = check_type(type_name)
    for what, v in (("--name", name), ("--publisher", publisher)):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v or ""):
            raise ExportError(f"{what} '{v}': use letters, digits, '.', '_' and '-' only (it becomes a folder name)")
    root = lmstudio_models_dir(models_dir)
    target = root / publisher / name / f"{name}-{type_name.upper()}.gguf"
    new_folder = not target.parent.exists()
    lines: list[str] = []
    st = export_gguf(
        model, adapter, target, type_name=type_name, verify=verify, overwrite=overwrite, name=name, log=lines.append
    )
    if new_folder:
        ownership.write_marker(target.parent, "lmstudio", "export lmstudio", files=[target.name])
    elif read_marker(target.parent) is not None:
        # Several types of one model share the folder; the marker records every file the tool wrote.
        record(target.parent, target.name)
    lines.append(f"LM Studio: the model appears as {publisher}/{name} (models folder {root})")
    for line in lines:
        log(line)
    return PackageResult(target.parent, [st.path], None, False, "gguf", lines)
