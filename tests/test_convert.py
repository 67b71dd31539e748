"""HF -> MLX conversion: round trips through mlx-lm, dtypes, sharding, quantization error,
keep patterns, and bad input (truncated or corrupt files, missing pieces, full disk)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_lora.converters import io
from mlx_lora.converters.hf_to_mlx import convert
from mlx_lora.plumbing.errors import ExportError, ModelError
from mlx_lora.plumbing.ownership import OwnershipError

IDS = [[1, 5, 9, 33, 100, 200, 7, 64, 300, 42, 17, 3]]


def load(folder: Path):
    from mlx_lm.utils import load_model

    return load_model(Path(folder))


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32)[0])


def as_float32(model):
    model.update(
        tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    )
    return model


def no_partial_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith(".partial")]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "qwen3", "mistral"])
def test_roundtrip_gives_identical_logits_in_mlx_lm(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    out = convert(str(src), tmp_path / "mlx")
    (m_src, cfg_src), (m_out, cfg_out) = load(src), load(out)
    np.testing.assert_array_equal(logits(m_out), logits(m_src))
    assert cfg_out["model_type"] == cfg_src["model_type"] and "quantization" not in cfg_out
    _, meta = io.read_safetensors_header(out / "model.safetensors")
    assert meta == {"format": "mlx"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    from mlx_lm import load as mlx_lm_load  # the full mlx-lm entry point, tokenizer included

    _, tokenizer = mlx_lm_load(str(out))
    assert tokenizer.encode("What is the code word for the red apple?")


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", {"quantize": True, "bits": 4, "group_size": 32}),
        ("phi3", {"quantize": True, "bits": 8, "group_size": 64, "dtype": "float16"}),
        ("gemma2", {"dtype": "bfloat16"}),
    ],
)
def test_same_tensors_as_mlx_lm_convert(tiny_models, tmp_path, arch, kwargs):
    """mlx-lm's own converter (which loads the whole model) writes bit-identical tensors."""
    from mlx_lm.convert import convert as mlx_lm_convert

    src = tiny_models[arch]
    ours = convert(str(src), tmp_path / "ours", **kwargs)
    mlx_lm_convert(
        str(src),
        str(tmp_path / "theirs"),
        quantize=kwargs.get("quantize", False),
        q_group_size=kwargs.get("group_size"),
        q_bits=kwargs.get("bits"),
        dtype=kwargs.get("dtype"),
    )
    a, b = mx.load(str(ours / "model.safetensors")), mx.load(str(tmp_path / "theirs" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    cfg_a = json.loads((ours / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert cfg_a.get("quantization") == cfg_b.get("quantization")


def _shard(src: Path, dst: Path, parts: int) -> Path:
    """Re-save ``src`` as ``parts`` safetensors shards with an index, as the hub stores big models."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    weights = mx.load(str(src / "model.safetensors"))
    names = sorted(weights)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: weights[n] for n in names[i::parts]}
        mx.save_safetensors(str(dst / fname), chunk, metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sharded_source_and_output_with_dtype(tiny_model_dir, tmp_path, dtype):
    """Sharded in, sharded out (small shard limit); values are the source's cast to ``dtype``."""
    src = _shard(tiny_model_dir("llama"), tmp_path / "src", 3)
    out = convert(str(src), tmp_path / "mlx", dtype=dtype, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    for s in shards:
        infos, _ = io.read_safetensors_header(out / s)
        assert {i.dtype for i in infos.values()} == {"BF16" if dtype == "bfloat16" else "F16"}
    model_out, cfg = load(out)
    assert cfg["torch_dtype"] == dtype
    model_src, _ = load(src)
    # The reference: the source weights rounded to dtype, computed in float32 like ours.
    model_src.update(tree_map(lambda a: a.astype(getattr(mx, dtype)).astype(mx.float32), model_src.parameters()))
    np.testing.assert_array_equal(logits(as_float32(model_out)), logits(model_src))


# ---------------------------------------------------------------------------------------------
# Quantization


def _group_steps(w: np.ndarray, group: int, bits: int) -> np.ndarray:
    g = w.reshape(*w.shape[:-1], -1, group)
    return (g.max(-1) - g.min(-1)) / (2**bits - 1)


@pytest.mark.parametrize("bits, group", [(8, 64), (4, 64), (4, 32), (3, 32), (2, 32), (6, 64)])
def test_quantized_weights_within_one_step(tiny_models, tmp_path, bits, group):
    """Every quantized weight is within one step of the float weight: affine quantization with a
    zero-aligned offset rounds to a grid of spacing ``scale`` that covers the group's range, and
    the stored scale is at most 1.25x the group's ``(max - min) / (2^bits - 1)``."""
    src = tiny_models["qwen2"]
    out = convert(str(src), tmp_path / "q", quantize=True, bits=bits, group_size=group)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"} == cfg["quantization_config"]
    float_w = {k: np.array(v) for k, v in mx.load(str(src / "model.safetensors")).items()}
    q = mx.load(str(out / "model.safetensors"))
    quantized = [k[: -len(".scales")] for k in q if k.endswith(".scales")]
    assert len(quantized) == 1 + 7 * 2  # embeddings + 7 linear layers in each of 2 blocks
    for base in quantized:
        w = float_w[f"{base}.weight"]
        deq = np.array(
            mx.dequantize(q[f"{base}.weight"], q[f"{base}.scales"], q[f"{base}.biases"], group_size=group, bits=bits)
        )
        scale = np.abs(np.array(q[f"{base}.scales"]))
        assert np.all(np.abs(deq - w) <= np.repeat(scale, group, axis=-1) * 1.001 + 1e-8), base
        assert np.all(scale <= 1.25 * _group_steps(w, group, bits) + 1e-8), base


def test_quantized_logits_error_matches_the_rounding_noise_model(tiny_models, tmp_path):
    """Logit error of a quantized model is what its rounding noise predicts.

    Model: each weight's error is uniform on [-scale/2, scale/2]. Perturbing the float model by
    such noise (fresh draws, same scales) gives the expected logit error; the quantized model's
    error must be of that size (within a factor 1.5), and shrink ~17x from 4 to 8 bits
    (step ratio (2^8 - 1) / (2^4 - 1) = 17).
    """
    src = tiny_models["llama"]
    base = logits(load(src)[0])
    errors = {}
    for bits in (4, 8):
        out = convert(str(src), tmp_path / f"q{bits}", quantize=True, bits=bits, group_size=64)
        model_q, _ = load(out)
        assert isinstance(model_q.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
        err_q = np.sqrt(np.mean((logits(model_q) - base) ** 2))
        q = mx.load(str(out / "model.safetensors"))
        predicted = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            model_n, _ = load(src)
            noisy = {}
            for name, w in tree_flatten(model_n.parameters()):
                module = name[: -len(".weight")]
                if f"{module}.scales" in q:
                    scale = np.repeat(np.abs(np.array(q[f"{module}.scales"])), 64, axis=-1)
                    noisy[name] = mx.array(np.array(w) + (rng.random(w.shape, dtype=np.float32) - 0.5) * scale)
            model_n.load_weights(list(noisy.items()), strict=False)
            predicted.append(np.sqrt(np.mean((logits(model_n) - base) ** 2)))
        err_pred = float(np.mean(predicted))
        assert err_pred / 1.5 < err_q < err_pred * 1.5, (bits, err_q, err_pred)
        errors[bits] = err_q
    assert 17 / 1.5 < errors[4] / errors[8] < 17 * 1.5, errors


def test_our_loader_loads_the_converted_folder(tiny_models, tmp_path):
    from mlx_lora.model.loading import load_model

    src = tiny_models["qwen3"]
    out = convert(str(src), tmp_path / "q", quantize=True, bits=8, group_size=32, keep=["embeddings"])
    model, tokenizer, info = load_model(str(out))
    assert info.quantization["bits"] == 8 and info.kind == "folder"
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.QuantizedLinear)
    assert type(model.model.embed_tokens) is nn.Embedding
    np.testing.assert_allclose(logits(model), logits(as_float32(load(out)[0])), rtol=0, atol=1e-5)
    assert tokenizer.encode("the red apple")


def test_keep_patterns(tiny_models, tmp_path):
    src = tiny_models["llama"]  # untied: has lm_head
    out = convert(
        str(src), tmp_path / "q", quantize=True, bits=4, group_size=32, keep=["lm_head", "embeddings", "down_proj=8"]
    )
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg["lm_head"] is False and cfg["model.embed_tokens"] is False
    assert cfg["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    model, _ = load(out)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.model.layers[1].mlp.down_proj.bits == 8 and model.model.layers[1].mlp.up_proj.bits == 4
    stored = mx.load(str(out / "model.safetensors"))
    np.testing.assert_array_equal(
        np.array(stored["lm_head.weight"]), np.array(mx.load(str(src / "model.safetensors"))["lm_head.weight"])
    )
    # A regex, and a pattern that matches nothing (a typo must not pass silently).
    convert(str(src), tmp_path / "r", quantize=True, keep=[r"re:model\.layers\.0\..*"])
    assert (
        json.loads((tmp_path / "r" / "config.json").read_text())["quantization"]["model.layers.0.self_attn.q_proj"]
        is False
    )
    with pytest.raises(ExportError, match="'lm_haed'"):
        convert(str(src), tmp_path / "typo", quantize=True, keep=["lm_haed"])
    assert not (tmp_path / "typo").exists()


def test_invalid_options(tiny_llama, tmp_path):
    for kwargs, needle in [
        ({"quantize": True, "bits": 7}, "--bits 7"),
        ({"quantize": True, "group_size": 48}, "--group-size 48"),
        ({"keep": ["lm_head"]}, "needs -q"),
        ({"dtype": "float8"}, "float8"),
        ({"keep_quantized": True}, "GGUF"),
        ({"quantize": True, "group_size": 128}, "multiple of the group size 128"),  # hidden size is 64
    ]:
        with pytest.raises(ExportError, match=needle):
            convert(str(tiny_llama), tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Bad input


def _expect(tmp_path: Path, src: Path, error=ModelError, *needles: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(error) as e:
        convert(str(src), out)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not out.exists() and no_partial_dirs(tmp_path)
    return str(e.value)


def test_truncated_safetensors_names_file_and_tensor(tiny_llama, tmp_path):
    src = copy_model(tiny_llama, tmp_path / "src")
    f = src / "model.safetensors"
    infos, _ = io.read_safetensors_header(f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    # The tensor stored last is the one cut.
    header_len = int.from_bytes(data[:8], "little")
    last = max(
        json.loads(data[8 : 8 + header_len]).items(),
        key=lambda kv: kv[1]["data_offsets"][1] if kv[0] != "__metadata__" else -1,
    )[0]
    _expect(tmp_path, src, ModelError, str(f), f"'{last}'", "truncated")


def test_corrupt_safetensors_header(tiny_llama, tmp_path):
    src = copy_model(tiny_llama, tmp_path / "src")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    _expect(tmp_path, src, ModelError, str(f), "corrupt")


def test_missing_pieces(tiny_llama, tmp_path):
    src = copy_model(tiny_llama, tmp_path / "a")
    (src / "config.json").unlink()
    _expect(tmp_path, src, ModelError, "config.json")

    src = copy_model(tiny_llama, tmp_path / "b")
    (src / "tokenizer.json").unlink()
    _expect(tmp_path, src, ModelError, "tokenizer")

    src = copy_model(tiny_llama, tmp_path / "c")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "transmogrifier"}))
    _expect(tmp_path, src, ModelError, "unsupported architecture 'transmogrifier'")

    src = _shard(tiny_llama, tmp_path / "d", 2)
    (src / "model-00002-of-00002.safetensors").unlink()
    _expect(tmp_path, src, ModelError, "model-00002-of-00002.safetensors", "missing")

    src = copy_model(tiny_llama, tmp_path / "e")
    weights = dict(mx.load(str(src / "model.safetensors")))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    _expect(tmp_path, src, ModelError, "model.layers.1.mlp.up_proj.weight")

    src = copy_model(tiny_llama, tmp_path / "f")
    weights = dict(mx.load(str(src / "model.safetensors")))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:5]
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    _expect(tmp_path, src, ModelError, "model.layers.0.mlp.up_proj.weight", "shape")

    _expect(tmp_path, tmp_path / "does-not-exist", ModelError, "does-not-exist")


def test_out_of_disk(tiny_llama, tmp_path, monkeypatch):
    # Checked before writing when the disk is visibly too small...
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    _expect(tmp_path, tiny_llama, ExportError, "not enough disk space")
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    # ...and reported by file and tensor when a write fails anyway.
    calls = {"n": 0}
    real = io._tensor_bytes

    def failing(t, a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(t, a)

    monkeypatch.setattr(io, "_tensor_bytes", failing)
    _expect(tmp_path, tiny_llama, ExportError, "out of disk space", "model.safetensors", "tensor '")


def test_output_folder_is_atomic(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("a user's file")
    for overwrite in (False, True):  # a folder the tool did not write is never replaced
        with pytest.raises(OwnershipError, match="'old.txt'"):
            convert(str(tiny_llama), out, overwrite=overwrite)
    assert (out / "old.txt").read_text() == "a user's file"
    (out / "old.txt").unlink()
    convert(str(tiny_llama), out)
    with pytest.raises(OwnershipError, match="already exists"):
        convert(str(tiny_llama), out)
    first = (out / "model.safetensors").stat().st_ino
    convert(str(tiny_llama), out, overwrite=True)  # a folder the tool wrote is replaced on request
    assert (out / "model.safetensors").stat().st_ino != first
    stale = out / "model.safetensors"
    stale.write_bytes(b"edited model")  # changed since the tool wrote it: no longer provably its own
    with pytest.raises(OwnershipError, match="'model.safetensors', which changed since"):
        convert(str(tiny_llama), out, overwrite=True)
    assert stale.read_bytes() == b"edited model"
    assert no_partial_dirs(tmp_path) and not [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700) and (out / "config.json").stat().st_mode & 0o044


# ---------------------------------------------------------------------------------------------
# Safetensors writer, checked by an independent reader


def test_streaming_writer_is_read_back_by_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    arrays = {
        "a.f32": mx.array(rng.standard_normal((3, 5)).astype(np.float32)),
        "b.f16": mx.array(rng.standard_normal((7,)).astype(np.float16)),
        "c.bf16": mx.array(rng.standard_normal((2, 3)).astype(np.float32)).astype(mx.bfloat16),
        "d.u32": mx.array(rng.integers(0, 2**32 - 1, (4, 2), dtype=np.uint32)),
        "e.scalar": mx.array(np.float32(3.5)),
        "f.numpy": rng.standard_normal((2, 2)).astype(np.float32),
    }
    groups = [
        (
            [io.PendingTensor(k, tuple(v.shape), io.dtype_name(v.dtype) if isinstance(v, mx.array) else "float32")],
            (lambda v=v: [v]),
        )
        for k, v in arrays.items()
    ]
    io.write_safetensors_streaming(tmp_path / "t.safetensors", groups, metadata={"format": "mlx"})
    back = mx.load(str(tmp_path / "t.safetensors"))
    for k, v in arrays.items():
        assert mx.array_equal(back[k], mx.array(v) if isinstance(v, np.ndarray) else v), k
    with safe_open(str(tmp_path / "t.safetensors"), framework="np") as f:  # numpy has no bfloat16
        independent = {k: f.get_tensor(k) for k in ("a.f32", "d.u32", "e.scalar")}
        assert f.metadata() == {"format": "mlx"}
    np.testing.assert_array_equal(independent["a.f32"], np.array(arrays["a.f32"]))
    np.testing.assert_array_equal(independent["d.u32"], np.array(arrays["d.u32"]))
    np.testing.assert_array_equal(independent["e.scalar"], np.float32(3.5))


def test_cli_convert_quantized(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from mlx_lora.commands.convert_cli import convert as cli_convert

    result = CliRunner().invoke(
        cli_convert,
        [
            str(tiny_llama),
            "--out",
            str(tmp_path / "m"),
            "-q",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--keep",
            "lm_head",
            "--dtype",
            "float16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "peak memory" in result.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization"]["lm_head"] is False and cfg["torch_dtype"] == "float16"
    result = CliRunner().invoke(cli_convert, [str(tmp_path / "nope"), "--out", str(tmp_path / "n")])
    assert isinstance(result.exception, ModelError)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    """Tests never reach the hub; with HF_HUB_OFFLINE=1 a repo id that is not cached says so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty hub cache
    with pytest.raises(ModelError, match="some-org/some-model") as e:
        convert("some-org/some-model", tmp_path / "out")
    assert "offline" in str(e.value) or "could not download" in str(e.value)
    assert not (tmp_path / "out").exists()
