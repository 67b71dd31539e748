"""Exports checked by independent implementations: llama.cpp (llama-cpp-python), transformers and
peft on torch. Marked ``reference``: not in the default run; run by hand with the reference extra::

    pip install -e '.[reference]'
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 pytest -m reference tests/test_export_reference.py

Set ``LLAMA_CPP_DIR`` to a llama.cpp source tree to also compare with its own
``convert_hf_to_gguf.py`` output byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_fuse import TOKENS, adapter_logits, make_adapter

from mlx_lora.converters import gguf_arch
from mlx_lora.converters import verify as V
from mlx_lora.converters.adapter_export import export_gguf_adapter, export_peft
from mlx_lora.converters.fuse import fuse, load_fused
from mlx_lora.converters.gguf_export import export_gguf
from mlx_lora.testing import ARCHITECTURES

pytestmark = pytest.mark.reference
QUIET = {"log": lambda m: None}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def targets(arch: str):
    """LoRA targets of these tests: every linear layer, or for MoE families the attention layers and
    the router (``gate``; LoRA on experts and its GGUF form belong to the expert work)."""
    return ATTENTION + ["gate"] if gguf_arch.ARCHS[arch].moe else None


def rank(arch: str) -> int:
    return 4 if gguf_arch.ARCHS[arch].moe else 8  # the tiny routers have 4 outputs


def _llama(path: Path, lora: Path | None = None):
    llama_cpp = pytest.importorskip("llama_cpp")
    kwargs = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=512, n_threads=2, seed=0, **kwargs)


def llama_cpp_logits(llm, token_lists) -> list[np.ndarray]:
    out = []
    for toks in token_lists:
        llm.reset()
        llm.eval(list(toks))
        out.append(np.array(llm.scores[: len(toks)], dtype=np.float32))
    return out


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def mlx_greedy(model, prompt: list[int], n: int) -> list[int]:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]  # argmax by default


# ---------------------------------------------------------------------------------------------
# tiny models, every architecture


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llama_cpp_runs_the_fused_gguf_like_mlx(tmp_path, tiny_models, arch):
    ad = make_adapter(tiny_models[arch], tmp_path / "ad", targets=targets(arch), r=rank(arch))
    fm = load_fused(str(tiny_models[arch]), ad)
    path = export_gguf(None, None, tmp_path / "m.gguf", type_name="f32", fused=fm, **QUIET).path
    tokens = V.prompts(fm.tokenizer)
    top1, err, _ = V.compare(V.logits(fm.model, tokens), llama_cpp_logits(_llama(path), tokens))
    assert top1 == 1.0 and err < 2e-3, (arch, top1, err)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llama_cpp_base_plus_gguf_lora_matches_the_fused_model(tmp_path, tiny_models, arch):
    folder = tiny_models[arch]
    ad = make_adapter(folder, tmp_path / "ad", rslora=arch == "qwen3", targets=targets(arch), r=rank(arch))
    base = export_gguf(str(folder), None, tmp_path / "base.gguf", type_name="f32", **QUIET).path
    lora = export_gguf_adapter(ad, tmp_path / "lora.gguf", model=str(folder), **QUIET).path
    fm = load_fused(str(folder), ad)
    tokens = V.prompts(fm.tokenizer)
    top1, err, _ = V.compare(V.logits(fm.model, tokens), llama_cpp_logits(_llama(base, lora), tokens))
    assert top1 == 1.0 and err < 2e-3, (arch, top1, err)


def test_llama_cpp_tokenizes_like_the_source(tmp_path, tiny_models):
    for arch in ("llama", "qwen2"):
        fm = load_fused(str(tiny_models[arch]))
        path = export_gguf(None, None, tmp_path / f"{arch}.gguf", type_name="f16", fused=fm, **QUIET).path
        llm = _llama(path)
        for text in V.VERIFY_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == fm.tokenizer.encode(text), (arch, text)


def test_kquants_from_llama_cpps_quantizer_run_in_llama_cpp(tmp_path, tiny_model_dir):
    folder = tiny_model_dir("llama", hidden_size=256)  # K-quant blocks hold 256 values
    fm = load_fused(str(folder))
    for type_name in ("q4_k_m", "q6_k"):
        st = export_gguf(None, None, tmp_path / f"{type_name}.gguf", type_name=type_name, fused=fm, **QUIET)
        assert st.verify.ok
        tokens = V.prompts(fm.tokenizer)
        _, err, _ = V.compare(V.logits(fm.model, tokens), llama_cpp_logits(_llama(st.path), tokens))
        assert err < V.THRESHOLDS[type_name].rel_error, (type_name, err)


# ---------------------------------------------------------------------------------------------
# transformers and peft


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transformers_loads_the_fused_folder(tmp_path, tiny_models, arch):
    # MoE families too: fuse writes their experts one matrix each, as the hub's checkpoints hold them
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    ad = make_adapter(tiny_models[arch], tmp_path / "ad", dora=arch == "gemma2", targets=targets(arch), r=rank(arch))
    out = fuse(str(tiny_models[arch]), ad, tmp_path / "fused", **QUIET).out_dir
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = [hf(torch.tensor(TOKENS)).logits[0].numpy()]
    assert V.compare(adapter_logits(tiny_models[arch], ad), got)[1] < 1e-4


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora"])
def test_peft_loads_the_peft_export(tmp_path, tiny_models, kind):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "phi3"):
        folder = tiny_models[arch]
        ad = make_adapter(folder, tmp_path / f"ad-{arch}", dora=kind == "dora", rslora=kind == "rslora")
        out = export_peft(ad, tmp_path / f"peft-{arch}", model=str(folder), **QUIET).path
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            got = [model(torch.tensor(TOKENS)).logits[0].numpy()]
        top1, err, _ = V.compare(adapter_logits(folder, ad), got)
        assert top1 == 1.0 and err < 1e-4, (arch, kind, err)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a LoRA adapter is in one sentence.",
]


@pytest.fixture(scope="module")
def smol(smollm2_hf, tmp_path_factory):
    """SmolLM2 with a LoRA on every linear layer (random non-zero B: a fine-tune that visibly
    changes the outputs) and the fused in-memory model."""
    root = tmp_path_factory.mktemp("smol-export")
    ad = make_adapter(smollm2_hf, root / "adapter", r=8, alpha=16.0, b_std=0.02)
    fm = load_fused(str(smollm2_hf), ad)
    prompts = []
    for p in CHAT_PROMPTS:
        ids = fm.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    return {"root": root, "adapter": ad, "fm": fm, "prompts": prompts, "base": smollm2_hf}


@pytest.mark.parametrize("type_name", ["f16", "q8_0"])
def test_smollm2_gguf_greedy_continuations_match_mlx(smol, type_name):
    """llama.cpp's greedy continuation equals MLX's on the same weights: the fused model itself
    for f16 (rounding to f16 does not flip a greedy choice here), and the q8_0 weights read back
    from the file for q8_0. For q8_0 llama.cpp also rounds the activations to 8 bits inside each
    matrix product (its q8_0 x q8_0 dot product), which can flip a near tie: there the two
    continuations may part, but only where MLX itself rates llama.cpp's token within a tie
    (0.1 standard deviations of that position's logits; measured here: 0.12 of 3.3-3.5)."""
    fm = smol["fm"]
    st = export_gguf(
        None, None, smol["root"] / f"smol.{type_name}.gguf", type_name=type_name, fused=fm, overwrite=True, **QUIET
    )
    llm = _llama(st.path)
    ref = fm.model if type_name == "f16" else V.model_from_gguf(st.path, fm.config)[0]
    for prompt in smol["prompts"]:
        want = mlx_greedy(ref, prompt, 24)
        got = llama_cpp_greedy(llm, prompt, 24)
        if type_name == "f16" or got == want:
            assert got == want, (type_name, fm.tokenizer.decode(want), fm.tokenizer.decode(got))
            continue
        k = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        logits = np.array(ref(mx.array([prompt + want[:k]]))[0, -1].astype(mx.float32))
        gap = float(logits[want[k]] - logits[got[k]])
        assert gap < 0.1 * float(logits.std()), (k, gap, fm.tokenizer.decode(want), fm.tokenizer.decode(got))
    # Against the same weights (the file's, read back), so only the runtimes' arithmetic differs.
    top1, err, _ = V.compare(V.logits(ref, smol["prompts"]), llama_cpp_logits(llm, smol["prompts"]))
    assert top1 >= V.THRESHOLDS[type_name].min_top1 and err < V.THRESHOLDS[type_name].rel_error, (top1, err)


def test_smollm2_base_gguf_plus_gguf_lora_matches_fused(smol):
    base = export_gguf(
        str(smol["base"]), None, smol["root"] / "base.f16.gguf", type_name="f16", overwrite=True, **QUIET
    ).path
    lora = export_gguf_adapter(
        smol["adapter"], smol["root"] / "lora.gguf", model=str(smol["base"]), overwrite=True, **QUIET
    ).path
    llm = _llama(base, lora)
    for prompt in smol["prompts"]:
        assert llama_cpp_greedy(llm, prompt, 24) == mlx_greedy(smol["fm"].model, prompt, 24)


def test_smollm2_peft_export_in_transformers(smol):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = export_peft(smol["adapter"], smol["root"] / "peft", model=str(smol["base"]), overwrite=True, **QUIET).path
    base = AutoModelForCausalLM.from_pretrained(smol["base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = [model(torch.tensor([p])).logits[0].numpy() for p in smol["prompts"]]
    top1, err, _ = V.compare(adapter_logits(smol["base"], smol["adapter"], smol["prompts"]), got)
    assert top1 == 1.0 and err < 1e-4, err


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_DIR"), reason="set LLAMA_CPP_DIR to a llama.cpp source tree")
@pytest.mark.parametrize("type_name", ["f16", "q8_0"])
def test_smollm2_gguf_equals_llama_cpps_converter(smol, type_name):
    fused = fuse(str(smol["base"]), smol["adapter"], smol["root"] / "fused", overwrite=True, **QUIET).out_dir
    ours = export_gguf(
        str(fused), None, smol["root"] / f"ours.{type_name}.gguf", type_name=type_name, overwrite=True, **QUIET
    ).path
    theirs = smol["root"] / f"theirs.{type_name}.gguf"
    script = Path(os.environ["LLAMA_CPP_DIR"]) / "convert_hf_to_gguf.py"
    subprocess.run(
        [sys.executable, str(script), str(fused), "--outtype", type_name, "--outfile", str(theirs)],
        check=True,
        capture_output=True,
    )
    ma, ta = V.read_gguf(ours)
    mb, tb = V.read_gguf(theirs)
    assert {k: v for k, v in ma.items() if k != "general.name"} == {k: v for k, v in mb.items() if k != "general.name"}
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name][:2] == tb[name][:2] and np.array_equal(ta[name][2], tb[name][2]), name


# ---------------------------------------------------------------------------------------------
# Every family against llama.cpp's own converter

# Keys this exporter writes that llama.cpp's converter does not: Gemma 3's layer pattern when it is
# not the 5-local-to-1-global llama.cpp assumes (without it llama.cpp would run the tiny model's
# global layer as a sliding one).
EXTRA_KEYS = {
    "gemma3_text": {"gemma3.attention.sliding_window_pattern"},
    # the converter writes it on its SentencePiece path, which this test keeps Gemma 2 off
    "gemma2": {"tokenizer.ggml.add_space_prefix"},
}


def _with_smollm2_tokenizer(arch: str, smollm2_hf: Path, out: Path) -> Path:
    """A tiny ``arch`` model with SmolLM2's tokenizer (whose pre-tokenizer llama.cpp's converter
    recognises; the tiny BPE's it does not). Special ids 0, 1, 2 agree with the tiny configs."""
    import shutil

    from mlx_lora.testing import make_tiny_model

    folder = make_tiny_model(arch, out, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(smollm2_hf / name, folder / name)
    return folder


# Rope variants with tensors of their own: Llama 3.x scaling (rope_freqs) and Phi-3 LongRoPE
# (rope_factors_long/short), each also run by llama.cpp below.
LLAMA3 = {
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rope_theta": 500000.0,
}
LONGROPE = {
    "rope_scaling": {
        "type": "longrope",
        "long_factor": [1.0 + i / 4 for i in range(8)],
        "short_factor": [1.0 + i / 8 for i in range(8)],
    },
    "max_position_embeddings": 131072,
}
CONVERTER_CASES = [(a, {}) for a in ARCHITECTURES] + [("llama", LLAMA3), ("phi3", LONGROPE)]


def _changed(folder: Path, change: dict) -> Path:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("arch, change", [("llama", LLAMA3), ("phi3", LONGROPE)], ids=["llama3-rope", "phi3-longrope"])
def test_llama_cpp_runs_rope_scaled_exports_like_transformers(tmp_path, tiny_model_dir, arch, change):
    """llama.cpp runs the exported file as transformers runs the HF folder. (mlx-lm's Phi-3 LongRoPE
    itself differs from transformers here: relative error 2.9e-3, top-1 0.993 over 297 positions,
    the same numbers llama.cpp gives against MLX; Llama 3 scaling agrees everywhere.)"""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = _changed(Path(shutil.copytree(tiny_model_dir(arch), tmp_path / "hf")), change)
    path = export_gguf(str(folder), None, tmp_path / "m.gguf", type_name="f32", **QUIET).path
    tokens = [list(range(3, 300))]  # long enough for the scaled frequencies to matter
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = [hf(torch.tensor(tokens)).logits[0].numpy()]
    top1, err, _ = V.compare(ref, llama_cpp_logits(_llama(path), tokens))
    assert top1 == 1.0 and err < 2e-3, (arch, top1, err)


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_DIR"), reason="set LLAMA_CPP_DIR to a llama.cpp source tree")
@pytest.mark.parametrize("arch, change", CONVERTER_CASES, ids=[a + ("-rope" if c else "") for a, c in CONVERTER_CASES])
def test_every_family_equals_llama_cpps_converter(tmp_path, smollm2_hf, arch, change):
    """Our f16 GGUF of a tiny model of each family equals convert_hf_to_gguf.py's: every tensor's
    name, type, shape and bytes, and every metadata key it writes (general.name aside)."""
    folder = _changed(_with_smollm2_tokenizer(arch, smollm2_hf, tmp_path / "hf"), change)
    ours = export_gguf(str(folder), None, tmp_path / "ours.gguf", type_name="f16", **QUIET).path
    ma, ta = V.read_gguf(ours)
    theirs = tmp_path / "theirs.gguf"
    # The converter names a BPE pre-tokenizer by hashing how it splits a test text and knows only
    # the original tokenizers' hashes; the tokenizer rebuilt from SmolLM2's GGUF is told the name
    # our export found (the same path the llama family takes without hashing). Gemma 2 and Phi-3
    # read only a SentencePiece tokenizer.model; they are given the BPE path the others take.
    script = Path(os.environ["LLAMA_CPP_DIR"]) / "convert_hf_to_gguf.py"
    wrapper = (
        f"import sys, runpy; sys.path[:0] = [{str(script.parent)!r}, {str(script.parent / 'gguf-py')!r}]\n"
        f"import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, t: "
        f"{ma['tokenizer.ggml.pre']!r}\n"
        "import conversion.gemma as g, conversion.phi as p\n"
        "g.Gemma2Model.set_vocab = p.Phi3MiniModel.set_vocab = b.TextModel._set_vocab_gpt2\n"
        f"sys.argv = [{str(script)!r}, {str(folder)!r}, '--outtype', 'f16', '--outfile', {str(theirs)!r}]\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", wrapper], check=True, capture_output=True)
    mb, tb = V.read_gguf(theirs)
    mb.pop("general.name")
    assert {k: ma.get(k) for k in mb} == mb
    assert set(ma) - set(mb) - {"general.name"} == EXTRA_KEYS.get(arch, set())
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name][:2] == tb[name][:2], name
        if name == "rope_freqs.weight":  # the converter computes it with torch's float32 pow (1-ulp
            a, b = (t[2].view(np.float32) for t in (ta[name], tb[name]))  # accurate); we in float64
            np.testing.assert_allclose(a, b, rtol=2.5e-7, atol=0, err_msg=name)
        else:
            assert np.array_equal(ta[name][2], tb[name][2]), name
