"""One measurement in a fresh process: ``python bench/worker.py SPEC.json``.

The spec's ``kind`` picks what runs; the result is written (atomically) as JSON to
``spec["result"]``. A fresh process per run makes ``mx.get_peak_memory`` a per-run number and keeps
one trainer's compiled graphs and allocator cache away from the other.

kinds:
  probe   backend facts, BLAS, matmul peak, model shape (for FLOPs), token lengths of the data
  ours      mlx_lora.train with the given config overrides
  batches   our trainer's compiled step on chosen batches of its own plan (memory-constrained mode)
  mlx_lm    mlx-lm's LoRA trainer (mlx_lm.tuner.trainer.train, what ``mlx_lm.lora`` calls); also
            records its first batches and its initial LoRA weights for ``lockstep``
  lockstep  our trainer's compiled step on mlx-lm's recorded batches from mlx-lm's initial weights

probe, ours and mlx_lm also score their model (base, or the adapter just trained) on the
validation rows of ``spec["valid_data"]`` with one evaluator, ``validation``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _write(path: str, obj: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _facts() -> dict:
    from mlx_lora.plumbing import backend

    facts = backend.summary()
    # what MLX's CPU matmuls call, as the dynamic loader binds them (MKL, OpenBLAS or the bundled one)
    if backend.backend_name() != "cpu":
        facts["blas"] = "n/a (GPU matmuls)"
    else:
        blas = backend.loaded_blas()
        facts["blas"] = "reference BLAS bundled with mlx-cpu" if "reference BLAS" in blas else blas
    facts.pop("blas_hint", None)
    facts["versions"] = backend.versions()
    return facts


# ----------------------------------------------------------------------------------------------


def probe(spec: dict) -> dict:
    from mlx import nn

    from mlx_lora.config import DataConfig, LoraConfig, TrainConfig
    from mlx_lora.data.batching import iterate_batches
    from mlx_lora.data.mixture import load_datasets
    from mlx_lora.model.adapters import adapter_layers, apply_lora
    from mlx_lora.model.loading import load_model
    from mlx_lora.plumbing import backend
    from mlx_lora.training.trainer import call_overhead, micro_batches

    dtype = backend.compute_dtype(spec.get("dtype", "auto"))
    # Matmul peak of this backend in the compute dtype: the best of a few square sizes.
    peak = max(backend.measure_matmul_gflops(n, dtype=dtype, repeats=3) for n in spec.get("matmul_sizes", [1024, 2048]))
    model, tokenizer, info = load_model(spec["model"], dtype=spec.get("dtype", "auto"))
    args = info.config
    hidden = args["hidden_size"]
    heads = args["num_attention_heads"]
    head_dim = args.get("head_dim") or hidden // heads
    head_params = args["vocab_size"] * hidden
    val = validation(model, tokenizer, spec)  # the base model's, before any adapter
    apply_lora(model, LoraConfig(r=spec["lora_r"], alpha=spec["lora_alpha"]))
    linear = lora = 0
    for _, layer in adapter_layers(model):
        out_dims, in_dims = layer.out_features, layer.in_features
        linear += out_dims * in_dims
        lora += layer.lora_a.size + layer.lora_b.size
    # Frozen linear layers that got no adapter still run forward and backward.
    for block in model.layers:
        for _, m in block.named_modules():
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not any(
                m is l.base for _, l in adapter_layers(block)
            ):
                linear += m.weight.shape[0] * (
                    m.weight.shape[1] * (32 // m.bits if isinstance(m, nn.QuantizedLinear) else 1)
                )
    shape = {
        "linear_params": linear,
        "head_params": head_params,
        "lora_params": lora,
        "attn_dim": heads * head_dim,
        "layers": len(model.layers),
        "vocab": args["vocab_size"],
    }
    data = {}
    tcfg = TrainConfig(batch_size=spec["batch_size"])
    gpu = backend.backend_name() != "cpu"
    overhead = call_overhead(model, gpu)
    for name, folder in spec.get("data", {}).items():
        dcfg = DataConfig(path=folder, valid_fraction=0.0, max_seq_length=spec["max_seq_length"])
        ds = load_datasets(dcfg, tokenizer, seed=0, splits=("train",)).train
        # The batches our trainer will build for one epoch (same function, data and seed), and
        # the calls it computes each in ([rows, positions] each).
        calls = [
            [[len(r), l] for r, l in micro_batches(b, tcfg, gpu, overhead)]
            for b, _ in iterate_batches(
                ds,
                spec["batch_size"],
                max_seq_length=spec["max_seq_length"],
                seed=spec["seed"],
                loop=False,
                bucketing=dcfg.length_bucketing,
            )
        ]
        data[name] = {
            "lengths": [len(t) for t, _ in ds.examples],
            "targets": [int(m[1:].sum()) for _, m in ds.examples],
            "ours_batch_calls": calls,
        }
    return {
        "facts": _facts(),
        "matmul_peak_gflops": peak,
        "compute_dtype": str(dtype).replace("mlx.core.", ""),
        "shape": shape,
        "data": data,
        "val": val,
    }


class _Recorder:
    """Per-step (loss, target tokens, seconds, peak memory) from the trainer's step metrics, and
    the wall time of the training loop alone (as mlx-lm's is timed: no loading, no tokenizing)."""

    def __init__(self):
        self.steps = []
        self.start = self.end = self.trainer = None

    def on_train_start(self, trainer):
        self.start = time.perf_counter()
        self.trainer = trainer

    def on_train_end(self, trainer, result):
        self.end = time.perf_counter()

    def on_step(self, trainer, m):
        self.steps.append(
            {
                "step": m["step"],
                "loss": m["loss"],
                "tokens": m["tokens"],
                "seconds": m["tokens"] / m["tokens_per_s"] if m["tokens_per_s"] else 0.0,
                "peak_memory_gb": m["peak_memory_gb"],
            }
        )


def ours(spec: dict) -> dict:
    import mlx.core as mx

    import mlx_lora
    from mlx_lora.config import build

    cfg = build(extra=spec["config"], overrides=spec.get("overrides", []))
    rec = _Recorder()
    t0 = time.perf_counter()
    result = mlx_lora.train(cfg, progress=False, overwrite=True, callbacks=[rec])
    out = {
        "facts": _facts(),
        "steps": rec.steps,
        "train_wall_s": rec.end - rec.start,
        "process_train_call_s": time.perf_counter() - t0,
        "trained_tokens": result.trained_tokens,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "adapter": cfg.out,
        "process_peak_rss_gb": _rss_gb(),
    }
    out.update(_shape_facts(rec.trainer))
    if spec.get("valid_data"):
        from mlx_lm.utils import load_tokenizer

        from mlx_lora.model.loading import resolve

        out["val"] = validation(rec.trainer.model, load_tokenizer(resolve(cfg.model.path)[0]), spec)
    return out


def _shape_facts(trainer) -> dict:
    """The shape policy the trainer used, the calls ([rows, positions]) of each batch of its first
    epoch as it laid them out, and the distinct call shapes it met."""
    from mlx_lora.training.estimate import _plan

    return {
        "shape_policy": trainer.shapes.name,
        "shape_choice": trainer.shapes.chosen,
        "batch_calls": [[list(c) for c in calls] for *_, calls in _plan(trainer)],
        "distinct_shapes": len(trainer.shape_stats.shapes),
    }


def _our_trainer(spec: dict, before_trainer=None):
    """Our Trainer as ``mlx_lora.train`` sets it up (same seed, model, data, LoRA), without a run
    folder: for runs that feed it chosen batches. ``before_trainer(model)`` may change the adapter
    weights before the trainer takes the model."""
    import mlx.core as mx

    from mlx_lora.config import build
    from mlx_lora.data.mixture import load_datasets
    from mlx_lora.model.adapters import apply_lora
    from mlx_lora.model.loading import load_model
    from mlx_lora.training.trainer import Trainer

    cfg = build(extra=spec["config"], overrides=spec.get("overrides", []))
    mx.random.seed(cfg.train.seed)
    model, tokenizer, _ = load_model(cfg.model.path, dtype=cfg.model.dtype)
    train_set = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed, splits=("train",)).train
    apply_lora(model, cfg.lora)
    if before_trainer is not None:
        before_trainer(model)
    return cfg, train_set, Trainer(model, cfg, train_set, None, None)


def _timed_steps(trainer, batches) -> list[dict]:
    import mlx.core as mx

    steps = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss, ntoks = trainer.step_on(batch)
        steps.append(
            {
                "step": i + 1,
                "loss": loss,
                "tokens": ntoks,
                "seconds": time.perf_counter() - t0,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
            }
        )
    return steps


def batches(spec: dict) -> dict:
    """Our trainer's step on the batches of its own epoch plan numbered ``spec["plan_steps"]``
    (1-based, as the full run numbers them), from the full run's initial state. Peak memory is set
    by the longest batches, so a memory-constrained run needs only those to show its peak and its
    speed on them."""
    import mlx.core as mx

    from mlx_lora.data.examples import iterate_batches

    cfg, train_set, trainer = _our_trainer(spec)
    plan = [
        b
        for b, _ in iterate_batches(
            train_set,
            cfg.train.batch_size,
            max_seq_length=cfg.data.max_seq_length,
            seed=cfg.train.seed,
            packing=cfg.data.packing,
            loop=False,
            bucketing=cfg.data.length_bucketing,
        )
    ]
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    steps = _timed_steps(trainer, [plan[k - 1] for k in spec["plan_steps"]])
    wall = time.perf_counter() - t0
    for s, k in zip(steps, spec["plan_steps"]):
        s["plan_step"] = k
    return {
        "facts": _facts(),
        "steps": steps,
        "train_wall_s": wall,
        "trained_tokens": sum(s["tokens"] for s in steps),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "process_peak_rss_gb": _rss_gb(),
    }


def lockstep(spec: dict) -> dict:
    """Our compiled step, on exactly the batches mlx-lm trained on (its tokens, its padding, its
    target mask) from exactly its initial LoRA weights, so the per-step losses of the two trainers
    can be compared number for number: any difference is a difference in the computation."""
    import mlx.core as mx
    import numpy as np

    from mlx_lora.data.examples import Batch
    from mlx_lora.model.adapters import adapter_layers

    rec = np.load(spec["recorded"])

    def mlx_lm_init(model):
        layers = dict(adapter_layers(model))
        for key in rec.files:
            if key.startswith("lora_a/"):
                path = key[len("lora_a/") :]
                name = next(n for n in layers if n == path or n.endswith("." + path))
                layers[name].lora_a = mx.array(rec[key].T)  # mlx-lm keeps A as [in, r], we as [r, in]

    _, _, trainer = _our_trainer(spec, before_trainer=mlx_lm_init)
    mlx_batches = []
    for k in range(int(rec["n"])):
        tokens, lengths = rec[f"batch{k}"], rec[f"lengths{k}"]
        targets = tokens[:, 1:]
        # mlx-lm's mask (tuner.trainer.default_loss): target j+1 counts when offset <= j+1 <= length.
        pos = np.arange(1, targets.shape[1] + 1)
        mask = ((pos >= lengths[:, :1]) & (pos <= lengths[:, 1:])).astype(np.float32)
        # Each row fills positions 0..length-1 (its last target is the padding token after it), so
        # our default step may run it at its own length like any of our rows.
        filled = np.minimum(lengths[:, 1], targets.shape[1])
        mlx_batches.append(Batch(tokens[:, :-1].astype(np.int32), targets.astype(np.int32), mask, None, filled))
    steps = _timed_steps(trainer, mlx_batches)
    return {"facts": _facts(), "steps": steps}


def mlx_lm(spec: dict) -> dict:
    """mlx-lm's LoRA fine-tuning as ``mlx_lm.lora --train`` runs it (load, datasets, LoRA layers,
    optimizer, ``tuner.trainer.train``), minus its validation passes and console UI."""
    import types

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    args = types.SimpleNamespace(data=spec["data"], train=True, test=False, mask_prompt=True, hf_dataset=None)
    np.random.seed(spec["seed"])
    mx.random.seed(spec["seed"])
    model, tokenizer = load(spec["model"])
    train_set, _, _ = load_dataset(args, tokenizer)
    model.freeze()
    lora = {"rank": spec["lora_r"], "scale": spec["lora_alpha"] / spec["lora_r"], "dropout": 0.0, "keys": spec["keys"]}
    linear_to_lora_layers(model, -1, lora)
    # What the lockstep run needs: the initial LoRA A matrices and the first batches as trained.
    recorded = {
        f"lora_a/{k[: -len('.lora_a')]}": np.array(v)
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith(".lora_a")
    }
    n_record = spec.get("record_steps", 0)
    adapter_dir = Path(spec["adapter_dir"])
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": lora})
    )

    steps = []

    class Recorder(TrainingCallback):
        def on_train_loss_report(self, info):
            done = info["trained_tokens"] - sum(s["tokens"] for s in steps)
            steps.append(
                {
                    "step": info["iteration"],
                    "loss": info["train_loss"],
                    "tokens": done,
                    "seconds": done / info["tokens_per_second"] if info["tokens_per_second"] else 0.0,
                    "peak_memory_gb": info["peak_memory"],
                }
            )

    targs = TrainingArgs(
        batch_size=spec["batch_size"],
        iters=spec["steps"],
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=spec["max_seq_length"],
        adapter_file=str(adapter_dir / "adapters.safetensors"),
        grad_checkpoint=False,
    )
    shapes = []

    def recording_batches(*a, **kw):
        """mlx-lm's own batching, unchanged; records each batch's [rows, positions]."""
        for batch, lengths in iterate_batches(*a, **kw):
            k = len(shapes)
            if k < n_record:
                recorded[f"batch{k}"], recorded[f"lengths{k}"] = np.array(batch), np.array(lengths)
            shapes.append([batch.shape[0], batch.shape[1] - 1])  # inputs are batch[:, :-1]
            yield batch, lengths

    opt = optim.Adam(learning_rate=spec["lr"])
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    train(
        model=model,
        optimizer=opt,
        train_dataset=CacheDataset(train_set),
        val_dataset=None,
        args=targs,
        training_callback=Recorder(),
        iterate_batches=recording_batches,
    )
    wall = time.perf_counter() - t0
    if n_record:
        recorded["n"] = np.array(min(n_record, len(shapes)))
        np.savez(spec["record_file"], **recorded)
    peak = mx.get_peak_memory() / 1e9
    return {
        "facts": _facts(),
        "steps": steps,
        "train_wall_s": wall,
        "trained_tokens": sum(s["tokens"] for s in steps),
        "peak_memory_gb": peak,
        "batch_shapes": shapes[: len(steps)],
        "val": validation(model, tokenizer, spec),
        "adapter": str(adapter_dir),
        "weights_dtype": str(model.layers[0].self_attn.q_proj.linear.weight.dtype),
        "process_peak_rss_gb": _rss_gb(),
    }


def validation(model, tokenizer, spec: dict):
    """Per-row summed target loss and target count of ``model`` on the validation rows
    (``spec["valid_data"]``), one row per forward, no padding: the one evaluator every adapter
    (and the base model) is scored by, in the process that trained it. None without rows."""
    import mlx.core as mx

    from mlx_lora.config import DataConfig
    from mlx_lora.data.mixture import load_datasets
    from mlx_lora.training.losses import masked_cross_entropy

    if not spec.get("valid_data"):
        return None
    training = model.training
    model.eval()
    ds = load_datasets(
        DataConfig(path=spec["valid_data"], valid_fraction=0.0, max_seq_length=spec["max_seq_length"]),
        tokenizer,
        splits=("train",),
    ).train
    losses, counts = [], []
    t0 = time.perf_counter()
    for tokens, mask in ds.examples:
        loss, n = masked_cross_entropy(
            model, mx.array(tokens[None, :-1]), mx.array(tokens[None, 1:]), mx.array(mask[None, 1:].astype("float32"))
        )
        losses.append(loss.item())
        counts.append(n.item())
    model.train(training)
    return {"loss_sums": losses, "targets": counts, "seconds": time.perf_counter() - t0}


def _rss_gb() -> float:
    import resource

    # ru_maxrss is in KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


KINDS = {"probe": probe, "ours": ours, "batches": batches, "mlx_lm": mlx_lm, "lockstep": lockstep}

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    _write(spec["result"], KINDS[spec["kind"]](spec))
