"""Ollama Modelfiles and LM Studio folders.

The chat-template translation is checked against transformers' own rendering of each template
(written here in the style of the families' published templates) on conversations that the
translation did not see; ``ollama`` itself is replaced by a script on PATH that records how it
was called.
"""

from __future__ import annotations

import copy
import os
import re
import stat

import pytest
from click.testing import CliRunner
from test_fuse import make_adapter

from mlx_lora.converters.packaging import derive_chat_format, export_lmstudio, export_ollama, lmstudio_models_dir
from mlx_lora.plumbing.errors import ExportError

QUIET = {"log": lambda m: None}

TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "<start_of_turn>{{ role }}\n{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('system messages are not supported') }}{% endif %}{% endfor %}"
    ),
    "qwen-default-system": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
        "<|im_start|>assistant\n{% endif %}"
    ),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}, {"role": "user", "content": "d?"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "z"},
        {"role": "assistant", "content": "w"},
        {"role": "user", "content": "v"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.bos_token = "<|endoftext|>"  # so templates that print bos_token print something
    return tok


def _with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def _balanced(go: str) -> bool:
    actions = re.findall(r"{{\s*(\S+)", go)
    opens = sum(a in ("if", "range") for a in actions)
    return go.count("{{") == go.count("}}") and opens == actions.count("end")


@pytest.mark.parametrize("family", ["chatml", *TEMPLATES])
def test_translated_template_reproduces_the_jinja_template(tokenizer, family):
    tok = tokenizer if family == "chatml" else _with_template(tokenizer, TEMPLATES[family])
    fmt = derive_chat_format(tok, add_bos=False)
    assert fmt is not None
    for conv in CONVERSATIONS:
        if fmt.system_prefix is None and any(m["role"] == "system" for m in conv):
            continue  # the template itself refuses system messages
        assert fmt.render(conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), conv
    go = fmt.go_template()
    assert _balanced(go), go
    assert "{{ range .Messages }}" in go and '{{ if eq .Role "user" }}' in go and "{{ .Content }}" in go


def test_translation_details(tokenizer):
    gemma = derive_chat_format(_with_template(tokenizer, TEMPLATES["gemma"]), add_bos=True)
    assert gemma.system_in_user and gemma.system_prefix == "" and gemma.system_suffix == "\n\n"
    assert gemma.bos == ""  # the runtime adds BOS; the template must not add a second one
    assert "{{ $sys := .System }}" in gemma.go_template()
    qwen = derive_chat_format(_with_template(tokenizer, TEMPLATES["qwen-default-system"]), add_bos=False)
    assert qwen.head == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert "{{ else }}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{{ end }}" in qwen.go_template()
    # SmolLM2's BOS token is <|im_start|>: a ChatML template starts with it without printing bos_token
    smol = _with_template(tokenizer, TEMPLATES["qwen-default-system"])
    smol.bos_token = "<|im_start|>"
    assert derive_chat_format(smol, add_bos=False).go_template().startswith("{{ if .System }}<|im_start|>system\n")
    mistral = derive_chat_format(_with_template(tokenizer, TEMPLATES["mistral"]), add_bos=False)
    assert mistral.system_prefix is None and mistral.generation_prompt == ""
    assert mistral.go_template().startswith("<|endoftext|>{{ range .Messages }}")


def test_template_with_logic_is_not_translated(tokenizer):
    branching = (
        "{% for m in messages %}{% if m['content'] | length > 5 %}LONG {% endif %}{{ m['content'] }}{% endfor %}"
    )
    assert derive_chat_format(_with_template(tokenizer, branching), add_bos=False) is None
    assert derive_chat_format(_with_template(tokenizer, None), add_bos=False) is None


@pytest.fixture()
def fake_ollama(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ollama-calls.txt"
    script = bindir / "ollama"
    script.write_text(f'#!/bin/sh\n{{ pwd; echo "$@"; cat Modelfile; }} >> "{log}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_ollama_fused_modelfile_and_create(tmp_path, tiny_llama, fake_ollama):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    res = export_ollama(str(tiny_llama), ad, "my-model", out_dir=tmp_path / "pkg", **QUIET)
    assert res.created and res.template == "translated"
    text = (tmp_path / "pkg" / "Modelfile").read_text()
    assert text.splitlines()[1] == "FROM ./my-model.q8_0.gguf"
    assert (tmp_path / "pkg" / "my-model.q8_0.gguf").is_file()
    assert "ADAPTER" not in text
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER num_ctx 4096" in text  # the model's context (4096), capped at 8192
    calls = fake_ollama.read_text().splitlines()
    assert calls[0] == str(tmp_path / "pkg") and calls[1] == f"create my-model -f {tmp_path / 'pkg' / 'Modelfile'}"


def test_ollama_adapter_mode(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ollama on PATH
    lines = []
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    res = export_ollama(
        str(tiny_llama), ad, "m2", out_dir=tmp_path / "pkg", mode="adapter", type_name="f16", log=lines.append
    )
    assert not res.created
    text = (tmp_path / "pkg" / "Modelfile").read_text()
    assert "FROM ./m2.f16.gguf\nADAPTER ./m2-lora.gguf\n" in text
    assert {p.name for p in (tmp_path / "pkg").iterdir()} == {
        "Modelfile",
        "m2.f16.gguf",
        "m2-lora.gguf",
        ".mlx-lora.json",
    }
    assert any("ollama create m2 -f Modelfile" in line for line in lines)


def test_ollama_adapter_mode_on_a_gguf_base_uses_that_file(tmp_path, tiny_llama, monkeypatch):
    from mlx_lora.converters.gguf_export import export_gguf

    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    base = export_gguf(str(tiny_llama), None, tmp_path / "base.gguf", type_name="f32", **QUIET).path
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    export_ollama(str(base), ad, "m3", out_dir=tmp_path / "pkg", mode="adapter", **QUIET)
    text = (tmp_path / "pkg" / "Modelfile").read_text()
    assert f"FROM {base.resolve()}\nADAPTER ./m3-lora.gguf\n" in text


def test_ollama_bad_input(tmp_path, tiny_llama):
    with pytest.raises(ExportError, match="--name"):
        export_ollama(str(tiny_llama), None, "bad name!", out_dir=tmp_path / "pkg", **QUIET)
    with pytest.raises(ExportError, match="--mode adapter needs --adapter"):
        export_ollama(str(tiny_llama), None, "ok", out_dir=tmp_path / "pkg", mode="adapter", **QUIET)
    assert not (tmp_path / "pkg").exists()


def test_lmstudio_layout(tmp_path, tiny_llama, monkeypatch):
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    res = export_lmstudio(str(tiny_llama), ad, "tiny-chat", models_dir=tmp_path / "models", publisher="me", **QUIET)
    assert res.files == [tmp_path / "models" / "me" / "tiny-chat" / "tiny-chat-Q8_0.gguf"]
    assert res.files[0].is_file()
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert lmstudio_models_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LMSTUDIO_MODELS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert lmstudio_models_dir() == tmp_path / "home" / ".lmstudio" / "models"
    with pytest.raises(ExportError, match="--publisher"):
        export_lmstudio(str(tiny_llama), ad, "x", models_dir=tmp_path / "models", publisher="a/b", **QUIET)


def test_cli_export_ollama_and_lmstudio(tmp_path, tiny_llama, monkeypatch):
    from mlx_lora.commands.cli import cli

    monkeypatch.setenv("PATH", str(tmp_path))
    ad = make_adapter(tiny_llama, tmp_path / "ad")
    r = CliRunner().invoke(
        cli,
        [
            "export",
            "ollama",
            "--model",
            str(tiny_llama),
            "--adapter",
            str(ad),
            "--name",
            "my-model",
            "--out",
            str(tmp_path / "pkg"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ollama create my-model -f Modelfile" in r.output
    r = CliRunner().invoke(
        cli,
        [
            "export",
            "lmstudio",
            "--model",
            str(tiny_llama),
            "--adapter",
            str(ad),
            "--name",
            "my-model",
            "--models-dir",
            str(tmp_path / "lms"),
            "--type",
            "f16",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "lms" / "mlx-lora" / "my-model" / "my-model-F16.gguf").is_file()


def test_failed_packages_leave_nothing(tmp_path, tiny_llama, monkeypatch):
    from mlx_lora.converters import verify as V

    monkeypatch.setenv("PATH", str(tmp_path))
    dora = make_adapter(tiny_llama, tmp_path / "dora", dora=True)
    # the base GGUF is written first, then the DoRA adapter is refused: both go
    with pytest.raises(ExportError, match="DoRA"):
        export_ollama(str(tiny_llama), dora, "m", out_dir=tmp_path / "pkg", mode="adapter", **QUIET)
    assert not (tmp_path / "pkg").exists()
    monkeypatch.setitem(V.THRESHOLDS, "q8_0", V.Threshold(-1.0, 1.0))
    with pytest.raises(ExportError, match="verification"):
        export_lmstudio(str(tiny_llama), None, "m", models_dir=tmp_path / "models", **QUIET)
    assert not (tmp_path / "models").exists()
