"""Export an adapter on its own: as a Hugging Face PEFT folder or as a llama.cpp GGUF LoRA.

PEFT. Our adapters are already stored in PEFT's layout; the export checks every tensor
(``base_model.model.<module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_magnitude_vector`` [out] for DoRA, the names ``peft`` itself writes), converts mlx-lm
adapters, and writes an ``adapter_config.json`` with only keys PEFT knows
(``base_model_name_or_path`` filled in), so ``peft.PeftModel.from_pretrained`` loads it.

GGUF LoRA (``llama-cli --lora``), as llama.cpp's ``convert_lora_to_gguf.py`` lays it out:
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and for every
adapted weight ``W`` named ``blk.N.<t>.weight`` in the base GGUF two tensors
``blk.N.<t>.weight.lora_a`` (numpy [r, in], ggml ne {in, r}) and ``.lora_b`` ([out, r]).
llama.cpp adds ``(alpha / r) * B (A x)`` with ``r`` read from ``lora_b``, so for rsLoRA
(scale ``alpha / sqrt(r)``) the file stores ``alpha * sqrt(r)``. The q/k row permutation of
llama-architecture models permutes the output rows, i.e. the rows of ``B`` only. DoRA cannot be
written this way (its magnitude rescales every output row of the merged weight).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

from mlx_lora.commands.api import load_for_inference
from mlx_lora.config import LoraConfig
from mlx_lora.converters import gguf_arch, moe_layout
from mlx_lora.converters import verify as V
from mlx_lora.converters.fuse import ensure_output_path, made_dirs
from mlx_lora.converters.gguf_export import _encode, _nbytes, _qtype
from mlx_lora.converters.io import disk_error
from mlx_lora.model.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MLX_LM_WEIGHTS,
    PEFT_PREFIX,
    apply_lora,
    load_adapter,
    mlx_lm_layout,
    peft_config,
    read_adapter,
    set_adapter_state,
)
from mlx_lora.model.loading import load_model, read_config, resolve
from mlx_lora.plumbing.errors import AdapterError, ExportError, ModelError
from mlx_lora.plumbing.io import atomic_path, atomic_save_safetensors, atomic_write_json
from mlx_lora.plumbing.mlx_lm_compat import model_classes as _get_classes
from mlx_lora.plumbing.ownership import building

logger = logging.getLogger(__name__)

PEFT_CONFIG_KEYS = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "layers_to_transform",
    "use_dora",
    "use_rslora",
    "bias",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "revision",
)
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<leaf>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class AdapterExport:
    path: Path
    format: str
    layers: int
    seconds: float
    verify: object | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"wrote {self.format} adapter {self.path} ({self.layers} layers) in {self.seconds:.1f} s"]
        out += [f"  {n}" for n in self.notes]
        if self.verify is not None:
            out += self.verify.lines()
        return out


def _log_default(msg: str) -> None:
    logger.info(msg)


def check_adapter_state(state: dict, r: int, source: str) -> dict[str, dict]:
    """Group PEFT tensors by module and check names and shapes; returns {path: {leaf: array}}."""
    groups: dict[str, dict] = {}
    problems = []
    for k, v in state.items():
        m = _KEY.match(k)
        if not m:
            problems.append(f"'{k}' is not a PEFT LoRA tensor name")
            continue
        groups.setdefault(m["path"], {})[m["leaf"]] = v
    for path, g in sorted(groups.items()):
        a, b = g.get("lora_A.weight"), g.get("lora_B.weight")
        if a is None or b is None:
            problems.append(f"'{path}': lora_A and lora_B must both be present")
            continue
        if (a.ndim, b.ndim) not in ((2, 2), (3, 3)) or a.shape[-2] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
            problems.append(
                f"'{path}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and "
                f"[out, r] (nor [experts, r, in] and [experts, out, r])"
            )
        elif a.shape[-2] != r:
            problems.append(f"'{path}': rank {a.shape[-2]} differs from the config's r = {r}")
        mag = g.get("lora_magnitude_vector")
        if mag is not None and tuple(mag.shape) != tuple(b.shape[:-1]):
            problems.append(f"'{path}': lora_magnitude_vector {tuple(mag.shape)} should be {list(b.shape[:-1])}")
    if problems:
        raise AdapterError(f"{source}: not a valid PEFT LoRA adapter:\n  - " + "\n  - ".join(problems[:20]))
    if not groups:
        raise AdapterError(f"{source}: the adapter has no LoRA tensors")
    return groups


def _read(adapter, model: str | None):
    """(AdapterInfo, PEFT state) of ``adapter``; an mlx-lm adapter needs the model to be read."""

    folder = Path(adapter).expanduser()
    if (folder / MLX_LM_WEIGHTS).is_file() and not (folder / "adapter_model.safetensors").is_file():
        if not model:
            raise AdapterError(f"{folder}: an mlx-lm adapter can only be converted with its base model: pass --model")

        m, _, _ = load_model(model, with_tokenizer=False)
        return read_adapter(folder, m)
    return read_adapter(folder)


def _verify_peft(model: str, original, exported: Path):
    """Logits of base + original adapter vs base + exported adapter (through our loader)."""

    ref_model, tok, _ = load_for_inference(model, str(original), dtype="float32")
    tokens = V.prompts(tok)
    ref = V.logits(ref_model, tokens)
    del ref_model
    test_model, _, _ = load_for_inference(model, str(exported), dtype="float32")
    return V.VerifyReport([V.compare_models(ref, test_model, tokens, "PEFT adapter", "f32")])


def export_peft(
    adapter,
    out_dir,
    *,
    model: str | None = None,
    base_model: str | None = None,
    verify: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = _log_default,
) -> AdapterExport:
    """Write ``adapter`` as a PEFT folder at ``out_dir``; ``base_model`` (or ``model``, or the
    adapter's own) becomes ``base_model_name_or_path``. ``verify`` compares logits of the base
    model with the original and with the exported adapter (needs ``model``)."""

    t0 = time.perf_counter()
    out = ensure_output_path(Path(out_dir), overwrite, is_dir=True, kind="peft")
    info, state = _read(adapter, model)
    groups = check_adapter_state(state, info.lora.r, str(adapter))
    has_mag = {p for p, g in groups.items() if "lora_magnitude_vector" in g}
    if info.lora.use_dora and len(has_mag) != len(groups):
        raise AdapterError(
            f"{adapter}: use_dora is set but {len(groups) - len(has_mag)} layers have no lora_magnitude_vector"
        )
    if not info.lora.use_dora and has_mag:
        raise AdapterError(f"{adapter}: lora_magnitude_vector tensors present but use_dora is false")
    targets = list(groups)
    expert_notes = []
    if any(g["lora_A.weight"].ndim == 3 for g in groups.values()):
        state, targets, expert_notes = peft_expert_state(
            state, groups, info, model or info.base_model_name_or_path, str(adapter)
        )
    conf = peft_config(info.lora, targets, base_model or model or info.base_model_name_or_path)
    conf = {k: conf[k] for k in PEFT_CONFIG_KEYS if k in conf}
    if info.lora.layers_to_transform is None:
        conf["layers_to_transform"] = None
    if expert_notes:
        # peft adapts transformers 5's fused expert parameters through ParamWrapper, which has no
        # dropout; dropout plays no part in inference.
        conf["lora_dropout"] = 0.0
        # peft maps the per-expert names onto the fused parameters by their leaf names, not by a
        # regex over per-expert paths: name the leaves, and the blocks when not all are adapted.
        conf["target_modules"], conf["layers_to_transform"] = _leaves_and_blocks(targets, str(adapter))
    tensors = {k: v.astype(mx.float32) for k, v in sorted(state.items())}
    try:
        with building(out, "peft", "export adapter --format peft", suffix=".tmp") as tmp:
            atomic_save_safetensors(tmp / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
            atomic_write_json(tmp / ADAPTER_CONFIG, conf)
            vr = None
            if verify:
                if not model:
                    raise ExportError("--verify for a PEFT export needs --model (the base model)")
                vr = _verify_peft(model, adapter, tmp)
                vr.raise_if_failed(str(out))
    except OSError as e:
        raise disk_error(e, out) from None
    res = AdapterExport(
        out,
        "PEFT",
        len(groups),
        time.perf_counter() - t0,
        vr,
        [f"base_model_name_or_path = {conf['base_model_name_or_path']}"] + expert_notes,
    )
    for line in res.lines():
        log(line)
    return res


def export_mlx_lm(
    adapter,
    out_dir,
    *,
    model: str | None = None,
    verify: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = _log_default,
) -> AdapterExport:
    """Write ``adapter`` as an mlx-lm adapter folder (``adapters.safetensors`` and the
    ``adapter_config.json`` keys ``mlx_lm.load(base, adapter_path=...)`` reads). The base model
    (``model``, or the adapter's own) gives the block structure that mlx-lm's ``num_layers`` and
    ``keys`` describe. ``verify`` loads the folder with mlx-lm's own loader and compares logits
    with the original adapter on the same base."""

    t0 = time.perf_counter()
    out = ensure_output_path(Path(out_dir), overwrite, is_dir=True, kind="mlx-lm")
    info, _ = _read(adapter, model)
    base = model or info.base_model_name_or_path
    if not base:
        raise AdapterError(f"{adapter}: records no base model; pass --model (mlx-lm's layout depends on its blocks)")
    m, _, _ = load_model(base, dtype="float32", with_tokenizer=False)
    load_adapter(m, adapter)
    layout = mlx_lm_layout(m, info.lora)
    if layout is None:
        raise AdapterError(f"{adapter}: mlx-lm has no layer for this adapter (DoRA on expert layers); fuse it instead")
    conf, weights = layout
    conf = {"model": base, **conf}
    try:
        with building(out, "mlx-lm", "export adapter --format mlx-lm", suffix=".tmp") as tmp:
            atomic_save_safetensors(tmp / MLX_LM_WEIGHTS, weights, metadata={"format": "mlx"})
            atomic_write_json(tmp / ADAPTER_CONFIG, conf)
            vr = None
            if verify:
                vr = _verify_mlx_lm(base, m, tmp)
                vr.raise_if_failed(str(out))
    except OSError as e:
        raise disk_error(e, out) from None
    del m
    mx.clear_cache()
    params = conf["lora_parameters"]
    res = AdapterExport(
        out,
        "mlx-lm",
        len(weights) // 2 if conf["fine_tune_type"] == "lora" else len(weights) // 3,
        time.perf_counter() - t0,
        vr,
        [
            f"num_layers {conf['num_layers']}, rank {params['rank']}, scale {params['scale']:g}, keys "
            f"{', '.join(params['keys'])}"
        ],
    )
    for line in res.lines():
        log(line)
    return res


def _verify_mlx_lm(base: str, original_model, exported: Path):
    """Logits of base + original adapter (our layers) vs base + exported folder (mlx-lm's loader)."""

    folder, _ = resolve(base)
    test_model, tok = mlx_lm_load(str(folder), adapter_path=str(exported))
    test_model.set_dtype(mx.float32, lambda x: mx.issubdtype(x, mx.floating))  # as the original was loaded
    tokens = V.prompts(tok)
    ref = V.logits(original_model, tokens)
    return V.VerifyReport([V.compare_models(ref, test_model, tokens, "mlx-lm adapter", "f32")])


def _model_type(info, model: str | None) -> str | None:

    model_type = (info.extra or {}).get("model_type")
    source = model or info.base_model_name_or_path
    if not model_type and source:
        folder, _ = resolve(str(source))
        model_type = read_config(folder).get("model_type")
    return model_type


def _leaves_and_blocks(targets: list[str], source: str) -> tuple[list[str], list[int] | None]:
    """(leaf names, block indices or None for all) selecting exactly ``targets``, the same leaves
    in every adapted block; otherwise the selection cannot be written for peft."""
    per_block: dict[int, set[str]] = {}
    for t in targets:
        m = re.search(r"\.layers\.(\d+)\.", t)
        if m is None:
            raise ExportError(f"{source}: '{t}' is outside the transformer blocks; fuse instead")
        per_block.setdefault(int(m.group(1)), set()).add(t.rsplit(".", 1)[-1])
    leaves = set.union(*per_block.values())
    if any(v != leaves for v in per_block.values()):
        raise ExportError(
            f"{source}: the adapter adapts different layers in different blocks, which peft cannot "
            f"select on a model with expert layers; fuse instead"
        )
    return sorted(leaves), sorted(per_block)


def peft_expert_state(state: dict, groups: dict, info, model: str | None, source: str):
    """An adapter with expert layers, in the layout ``peft`` loads: one ``lora_A`` [r, in] and
    ``lora_B`` [out, r] per expert under the hub's per-expert names
    (``...mlp.experts.E.gate_proj``, see :mod:`moe_layout`). On a transformers 5 model peft itself
    stacks them onto the fused expert parameters (``gate_up_proj`` through ``target_parameters``,
    with rank and alpha doubled there, ``down_proj``). Returns (state, target paths, notes).

    Refused (fuse instead) where that is not known to load exactly: a family outside
    :data:`moe_layout.PEFT_FAMILIES`, DoRA, rsLoRA (peft's doubled rank and alpha change ``alpha / sqrt(r)``)."""

    model_type = _model_type(info, model)
    fuse_hint = (
        f"fuse instead: mlx-lora fuse --model {model or 'MODEL'} --adapter {source} --out FOLDER "
        f"(a full model folder transformers loads)"
    )
    expert_paths = [p for p, g in groups.items() if g["lora_A.weight"].ndim == 3]
    if model_type not in moe_layout.PEFT_FAMILIES or any(
        moe_layout.split_expert_path(model_type, p) is None for p in expert_paths
    ):
        raise ExportError(
            f"{source}: PEFT export of adapters on expert layers ({expert_paths[0]}) is supported for "
            f"{', '.join(moe_layout.PEFT_FAMILIES)}, not '{model_type}'; {fuse_hint}"
        )
    if info.lora.use_dora:
        raise ExportError(
            f"{source}: a DoRA adapter on expert layers cannot be written for peft, whose adapters on "
            f"transformers 5's fused expert parameters are LoRA only; {fuse_hint}"
        )
    if info.lora.use_rslora:
        raise ExportError(
            f"{source}: an rsLoRA adapter on expert layers cannot be written for peft, which doubles "
            f"the rank of the fused gate/up experts and so changes alpha / sqrt(r); {fuse_hint}"
        )
    out = {k: v for k, v in state.items() if _KEY.match(k)["path"] not in expert_paths}
    targets = [p for p in groups if p not in expert_paths]
    added = []
    for path in expert_paths:
        block, layout, proj = moe_layout.split_expert_path(model_type, path)
        a, b = groups[path]["lora_A.weight"], groups[path]["lora_B.weight"]
        for e in range(a.shape[0]):
            module = moe_layout.expert_module(model_type, path, e)
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a[e]
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b[e]
            targets.append(module)
        # transformers 5 fuses gate and up into one parameter, and peft's conversion expects the
        # fused gate/up and the down experts adapted together: a projection left out gets an
        # exactly-zero adapter (A = B = 0).
        r, e_count = a.shape[1], a.shape[0]
        hidden, inner = (a.shape[2], b.shape[1]) if proj in layout.fused_pairs else (b.shape[1], a.shape[2])
        for partner in layout.names:
            other = f"{block}.{layout.stacked}.{partner}"
            if other in groups or other in added:
                continue
            added.append(other)
            in_dims, out_dims = (hidden, inner) if partner in layout.fused_pairs else (inner, hidden)
            for e in range(e_count):
                module = moe_layout.expert_module(model_type, other, e)
                out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = mx.zeros((r, in_dims), dtype=mx.float32)
                out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = mx.zeros((out_dims, r), dtype=mx.float32)
                targets.append(module)
    notes = [f"{len(expert_paths)} expert layers written per expert ({a.shape[0]} experts each), as peft loads them"]
    if added:
        notes.append(
            f"{len(added)} expert layers the adapter leaves alone written as zero adapters (peft adapts "
            f"gate, up and down experts together)"
        )
    return out, targets, notes


# ---------------------------------------------------------------------------------------------
# GGUF LoRA


def _base_config(model: str | None, info) -> tuple[str, dict]:

    source = model or info.base_model_name_or_path
    if not source:
        raise ModelError("a GGUF adapter needs the base model's architecture: pass --model")
    folder, _ = resolve(str(source))
    return str(source), read_config(folder)


def gguf_adapter_tensors(groups: dict[str, dict], config: dict) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every ``lora_a`` / ``lora_b``, B's rows permuted for q/k."""
    spec = gguf_arch.arch_spec(config["model_type"])
    names = gguf_arch.TensorNames(spec, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings"))
    out = []
    for path, g in sorted(groups.items(), key=lambda kv: _natural(kv[0])):
        if tied and path.endswith("lm_head"):
            raise ExportError(
                f"the adapter adapts '{path}', but this model ties lm_head to the embeddings; "
                f"llama.cpp cannot apply it (fuse instead)"
            )
        if any(f".{stacked}" in f"{path}." for stacked in spec.experts):
            raise ExportError(
                f"the adapter adapts the experts of '{path}', which the GGUF LoRA export does not "
                f"write; fuse instead (mlx-lora export gguf --adapter ...)"
            )
        base = names.gguf_module(path)
        a = np.array(g["lora_A.weight"], dtype=np.float32)
        b = np.array(g["lora_B.weight"], dtype=np.float32)
        perm = gguf_arch.row_permutation(spec, config, path + ".weight", b.shape[0])
        if perm is not None:
            b = b[perm]
        out += [(base + ".lora_a", a), (base + ".lora_b", b)]
    return out


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def gguf_alpha(lora) -> float:
    """The alpha llama.cpp must read so that its ``alpha / r`` equals our scale."""
    return float(lora.alpha * math.sqrt(lora.r)) if lora.use_rslora else float(lora.alpha)


def export_gguf_adapter(
    adapter,
    out,
    *,
    model: str | None = None,
    type_name: str = "f32",
    verify: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    log: Callable[[str], None] = _log_default,
) -> AdapterExport:
    """Write ``adapter`` as a llama.cpp GGUF LoRA adapter at ``out`` (for ``--lora``)."""

    t0 = time.perf_counter()
    if type_name not in ADAPTER_TYPES:
        raise ExportError(f"unknown GGUF adapter type '{type_name}'; choose one of {', '.join(ADAPTER_TYPES)}")
    out = ensure_output_path(Path(out), overwrite, is_dir=False)
    info, state = _read(adapter, model)
    if info.lora.use_dora or any(k.endswith("lora_magnitude_vector") for k in state):
        raise ExportError(
            f"{adapter} is a DoRA adapter: its magnitude vector rescales every output row of the merged "
            f"weight, which a plain LoRA (what llama.cpp applies) cannot express. Fuse it instead: "
            f"mlx-lora export gguf --model {model or 'MODEL'} --adapter {adapter} --out model.gguf"
        )
    groups = check_adapter_state(state, info.lora.r, str(adapter))
    experts = [p for p, g in groups.items() if g["lora_A.weight"].ndim == 3]
    if experts:
        raise ExportError(
            f"{adapter} adapts expert layers ({experts[0]}, ...), which a GGUF LoRA file cannot hold "
            f"yet. Fuse it instead: mlx-lora export gguf --model {model or 'MODEL'} --adapter {adapter} "
            f"--out model.gguf"
        )
    source, config = _base_config(model, info)
    spec = gguf_arch.arch_spec(config["model_type"])
    spec.refuse(config, "GGUF LoRA export")
    tensors = gguf_adapter_tensors(groups, config)
    notes, planned = [], []
    for tname, arr in tensors:
        qt = type_name
        if qt == "q8_0" and arr.shape[-1] % 32:
            qt = "f16"
        planned.append((tname, arr, qt))
    if any(qt != type_name for _, _, qt in planned):
        notes.append(f"rank {info.lora.r} is not a multiple of 32: lora_b kept as F16 instead of Q8_0")
    if info.lora.use_rslora:
        notes.append(f"rsLoRA: adapter.lora.alpha = alpha * sqrt(r) = {gguf_alpha(info.lora):g}")

    writer = gguf.GGUFWriter(path=None, arch=spec.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(info.lora))
    writer.add_name(name or Path(adapter).expanduser().resolve().name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tname, arr, qt in planned:
        writer.add_tensor_info(tname, arr.shape, np.dtype(np.float32), _nbytes(arr.shape, qt), raw_dtype=_qtype(qt))
    vr = None
    with made_dirs(out.parent):
        try:
            # Published only once verification passes; removed on any failure.
            with atomic_path(out, temp_suffix=".partial") as tmp:
                try:
                    writer.write_header_to_file(path=tmp)
                    writer.write_kv_data_to_file()
                    writer.write_ti_data_to_file()
                    for _, arr, qt in planned:
                        writer.write_tensor_data(_encode(arr, qt))
                finally:
                    writer.close()
                if verify:
                    vr = verify_gguf_adapter(tmp, source, adapter, config)
                    vr.raise_if_failed(str(out))
        except OSError as e:
            raise disk_error(e, out) from None
    res = AdapterExport(out, f"GGUF LoRA ({type_name})", len(groups), time.perf_counter() - t0, vr, notes)
    for line in res.lines():
        log(line)
    return res


def read_gguf_adapter(path, config: dict) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {HF module path: (A [r, in], B [out, r])}) of a GGUF LoRA file, B un-permuted."""

    meta, tensors = V.read_gguf(path)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise ExportError(f"{path}: not a GGUF LoRA adapter (general.type {meta.get('general.type')!r})")
    spec = gguf_arch.arch_spec(config["model_type"])
    names = gguf_arch.TensorNames(spec, int(config["num_hidden_layers"]))
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict({k: v for k, v in config.items() if k != "quantization"}))
    by_gguf = {
        names.gguf_name(n): n[: -len(".weight")] for n, _ in tree_flatten(model.parameters()) if n.endswith(".weight")
    }
    out = {}
    for tname in tensors:
        if not tname.endswith(".lora_a"):
            continue
        base = tname[: -len(".lora_a")]
        path_hf = by_gguf.get(base)
        if path_hf is None:
            raise ExportError(f"{path}: tensor '{tname}' matches no layer of the model")
        a = V.dequantize(*tensors[tname])
        b = V.dequantize(*tensors[base + ".lora_b"])
        perm = gguf_arch.row_permutation(spec, config, path_hf + ".weight", b.shape[0])
        if perm is not None:
            inv = np.empty_like(b)
            inv[perm] = b
            b = inv
        out[path_hf] = (a, b)
    return float(meta["adapter.lora.alpha"]), out


def verify_gguf_adapter(path: Path, model: str, adapter, config: dict):
    """Apply the GGUF adapter (read back, un-permuted, llama.cpp's ``alpha / r`` scale) to the
    base model and compare logits with the base model plus the original adapter."""

    ref_model, tok, _ = load_for_inference(model, str(adapter), dtype="float32")
    tokens = V.prompts(tok)
    ref = V.logits(ref_model, tokens)
    del ref_model
    alpha, layers = read_gguf_adapter(path, config)
    r = next(iter(layers.values()))[0].shape[0]
    m, _, _ = load_model(model, dtype="float32", with_tokenizer=False)
    apply_lora(m, LoraConfig(r=r, alpha=alpha, target_modules=["re:" + "|".join(re.escape(p) for p in layers)]))
    state = {}
    for p, (a, b) in layers.items():
        state[f"{PEFT_PREFIX}{p}.lora_A.weight"] = mx.array(a)
        state[f"{PEFT_PREFIX}{p}.lora_B.weight"] = mx.array(b)
    set_adapter_state(m, state)
    m.eval()
    kind = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
    _, tensors = V.read_gguf(path)
    t = gguf_type_name(next(iter(tensors.values()))[0])
    return V.VerifyReport([V.compare_models(ref, m, tokens, "GGUF adapter", kind.get(t, "q8_0"))])


def gguf_type_name(type_id: int) -> str:

    return gguf.GGMLQuantizationType(type_id).name
