"""``mlx-lora serve`` against ``mlx_lm.server`` on the same float32 SmolLM2-135M folder.

    python bench/serve_vs_mlx_lm.py                # 2 alternating rounds, about 10 min on a 2-core box
    python bench/serve_vs_mlx_lm.py --rounds 3 --out bench/serve_vs_mlx_lm.json

Both servers run at once (an idle server takes no CPU) and are asked through the plain HTTP API
(greedy, no seed, so mlx_lm.server batches). ``mlx-lora serve`` starts as a user starts it: the
command picks its BLAS (Intel MKL when the ``mkl`` package is installed on an Intel CPU, else the
system OpenBLAS). ``mlx_lm.server`` gets the system OpenBLAS preloaded (``--their-blas openblas``,
the default: a plain ``mlx_lm.server`` on Linux would run on mlx-cpu's reference BLAS, ~40x slower)
or the same MKL (``--their-blas mkl``), to tell the BLAS's share of a ratio from the engine's. Each
server's BLAS is printed (read from the libraries it mapped). Rounds alternate which server goes
first; the best of each figure is kept.

- one request: time to first token (TTFT) and decode tokens/s of one streamed chat reply;
- 8 concurrent different prompts: aggregate completion tokens/s of the burst;
- 8 concurrent requests over 4 adapters and the base (ours only: mlx_lm.server serves one adapter
  per model) against the same burst on the base alone, and the server's peak resident memory;
- a second chat turn after a ~1,000-token history: TTFT of turn 2 over TTFT of turn 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, imported_model
from mlx_lora.plumbing import backend, native
from mlx_lora.plumbing.cache import cache_root

BLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
TOPICS = [
    "the ocean",
    "a mountain village",
    "bread baking",
    "the moon landing",
    "a violin maker",
    "winter birds",
    "an old lighthouse",
    "desert travel",
    "honey bees",
    "a night train",
]
ADAPTERS = [
    ("r4_qv", dict(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])),
    ("r8_all", dict(r=8, alpha=16.0)),
    ("r16_mlp", dict(r=16, alpha=16.0, target_modules=["gate_proj", "up_proj", "down_proj"])),
    ("r2_attn", dict(r=2, alpha=4.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model: Path) -> dict[str, Path]:
    """Four adapters of different ranks and targets with random (non-zero) B, cached."""
    root = cache_root() / "bench" / "serve-adapters"
    out = {name: root / name for name, _ in ADAPTERS}
    if all((p / "adapter_config.json").is_file() for p in out.values()):
        return out
    code = f"""
import mlx.core as mx
from mlx_lora.model import adapters
from mlx_lora.config import LoraConfig
from mlx_lora.model.loading import load_model
for i, (name, kw) in enumerate({ADAPTERS!r}):
    model, _, _ = load_model({str(model)!r})
    cfg = LoraConfig(**kw)
    adapters.apply_lora(model, cfg)
    mx.random.seed(i)
    for _, layer in adapters.adapter_layers(model):
        layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    adapters.save_adapter(model, {str(root)!r} + "/" + name, cfg, {str(model)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, LD_PRELOAD=BLAS), cwd=REPO)
    return out


def blas_env(which: str) -> dict:
    """The environment that preloads ``which`` (``own``: none; the mlx-lora command chooses)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for key in ("LD_PRELOAD", "MLX_LORA_BLAS_REEXEC", "MLX_LORA_NO_BLAS_REEXEC"):
        env.pop(key, None)
    if which != "own":
        chosen = backend.blas_for(which)
        if chosen is None:
            raise SystemExit(f"--their-blas {which}: not installed here")
        env.update(chosen[2], LD_PRELOAD=chosen[1])
    return env


class Server:
    def __init__(self, name: str, argv: list[str], env: dict):
        self.name = name
        self.port = free_port()
        self.proc = subprocess.Popen(
            argv + ["--port", str(self.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode}: {' '.join(argv)}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{name} did not start")

    def blas(self) -> str:
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        kernel = " with mlx-lora's small-batch kernel" if native.MARK in maps else ""
        for lib, kind in (("libmkl_rt", "mkl"), ("openblas", "openblas")):
            if lib in maps:
                return backend.BLAS_LABELS[kind] + kernel
        return "the reference BLAS" + kernel

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def chat(server: Server, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed greedy chat request: TTFT, decode tokens/s, completion tokens, the text."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    pieces, usage = [], None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for ch in data.get("choices") or []:
                text = (ch.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces.append(text)
    n = usage["completion_tokens"] if usage else len(pieces)
    ttft = (first or time.perf_counter()) - t0
    decode = (n - 1) / (last - first) if first and last and last > first and n > 1 else float("nan")
    return {"ttft": ttft, "decode_tps": decode, "tokens": n, "text": "".join(pieces)}


def whole(server: Server, model: str, messages: list, max_tokens: int) -> int:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=900)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def burst(server: Server, models: list[str], max_tokens: int) -> dict:
    msgs = [
        [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]
        for i in range(len(models))
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        tokens = list(pool.map(lambda a: whole(server, a[0], a[1], max_tokens), zip(models, msgs)))
    wall = time.perf_counter() - t0
    return {"tokens": sum(tokens), "seconds": wall, "tps": sum(tokens) / wall}


def history_turns(server: Server, model: str, tag: str) -> dict:
    """A ~1,000-token conversation, then one more turn: TTFT of each. ``tag`` makes each round's
    conversation new to the server (else the first turn of a later round would hit its cache)."""
    words = (
        "The harbor town kept its old customs: boats went out at dawn, nets were mended at noon, and "
        "the lighthouse keeper wrote the weather in a book. "
    )
    history = [
        {
            "role": "system",
            "content": f"Conversation {tag}. You are a helpful assistant who remembers the whole conversation.",
        }
    ]
    for i in range(8):
        history += [
            {"role": "user", "content": f"Part {i + 1} of my notes: " + words * 2},
            {"role": "assistant", "content": f"Noted part {i + 1}. " + words},
        ]
    first_q = history + [{"role": "user", "content": "Summarise my notes in one sentence."}]
    one = chat(server, model, first_q, 16)
    second_q = first_q + [
        {"role": "assistant", "content": one["text"]},
        {"role": "user", "content": "And what did the lighthouse keeper do?"},
    ]
    two = chat(server, model, second_q, 16)
    return {"ttft1": one["ttft"], "ttft2": two["ttft"], "ratio": two["ttft"] / one["ttft"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(REPO / "bench" / "serve_vs_mlx_lm.json"))
    ap.add_argument(
        "--their-blas",
        choices=("openblas", "mkl"),
        default="openblas",
        help="the BLAS preloaded for mlx_lm.server (mlx-lora serve picks its own)",
    )
    args = ap.parse_args()

    model = imported_model("float32")
    adapters = make_adapters(model)
    base = model.name
    ours = Server(
        "mlx-lora serve",
        [sys.executable, "-m", "mlx_lora", "serve", "--model", str(model)]
        + [x for name, path in adapters.items() for x in ("--adapter", f"{name}={path}")],
        blas_env("own"),
    )
    theirs = Server(
        "mlx_lm.server", [sys.executable, "-m", "mlx_lm.server", "--model", str(model)], blas_env(args.their_blas)
    )
    blas = {"ours": ours.blas(), "theirs": theirs.blas()}
    print(f"BLAS: mlx-lora serve on {blas['ours']}, mlx_lm.server on {blas['theirs']}", flush=True)
    servers = {"ours": ours, "theirs": theirs}
    results: dict = {k: {"single": [], "burst8": [], "history": []} for k in servers}
    results["ours"]["adapters8"] = []
    results["ours"]["base8"] = []
    question = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
    try:
        for name, srv in servers.items():  # warm-up: first calls compile the CPU kernels of each shape
            chat(srv, base if name == "ours" else str(model), question, 4)
            history_turns(srv, base if name == "ours" else str(model), f"warm-up-{name}")
            burst(srv, [base if name == "ours" else str(model)] * 8, 4)
        for rnd in range(args.rounds):
            order = ["ours", "theirs"] if rnd % 2 == 0 else ["theirs", "ours"]
            for name in order:
                srv = servers[name]
                m = base if name == "ours" else str(model)
                results[name]["single"].append(chat(srv, m, question, args.max_tokens))
                results[name]["burst8"].append(burst(srv, [m] * 8, args.max_tokens))
                results[name]["history"].append(history_turns(srv, m, f"{rnd}-{name}"))
                if name == "ours":
                    mixed = [base, *adapters, base, *adapters][:8]
                    results["ours"]["adapters8"].append(burst(srv, mixed, args.max_tokens))
                    results["ours"]["base8"].append(burst(srv, [base] * 8, args.max_tokens))
                print(f"round {rnd + 1}: {name} done", flush=True)
        peak = {name: srv.peak_rss_mb() for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()

    def best(name, key, field, low=False):
        vals = [r[field] for r in results[name][key]]
        return min(vals) if low else max(vals)

    rows = [
        (
            "one request: decode tokens/s",
            best("ours", "single", "decode_tps"),
            best("theirs", "single", "decode_tps"),
            ">= 1.0x",
        ),
        (
            "one request: time to first token (s)",
            best("ours", "single", "ttft", True),
            best("theirs", "single", "ttft", True),
            "<= 1.0x",
        ),
        (
            "8 concurrent prompts: aggregate tokens/s",
            best("ours", "burst8", "tps"),
            best("theirs", "burst8", "tps"),
            ">= 1.5x",
        ),
        (
            "second chat turn TTFT / first turn TTFT",
            best("ours", "history", "ratio", True),
            best("theirs", "history", "ratio", True),
            "ours <= 0.3",
        ),
    ]
    print(f"\n{'':44} {'mlx-lora':>10} {'mlx_lm':>10} {'ours/theirs':>12}  target")
    for label, a, b, target in rows:
        print(f"{label:44} {a:10.3f} {b:10.3f} {a / b:11.2f}x  {target}")
    mixed, plain = best("ours", "adapters8", "tps"), best("ours", "base8", "tps")
    print(
        f"\n8 concurrent over 4 adapters + base: {mixed:.2f} tokens/s; same burst on the base alone: {plain:.2f} "
        f"tokens/s; ratio {mixed / plain:.2f}x (target >= 0.8x)"
    )
    print(f"BLAS: mlx-lora serve on {blas['ours']}, mlx_lm.server on {blas['theirs']}")
    print(
        f"peak resident memory: mlx-lora serve (base + 4 adapters) {peak['ours']:.0f} MB, "
        f"mlx_lm.server (base) {peak['theirs']:.0f} MB"
    )
    Path(args.out).write_text(
        json.dumps(
            {
                "results": results,
                "peak_rss_mb": peak,
                "blas": blas,
                "rounds": args.rounds,
                "max_tokens": args.max_tokens,
                "model": str(model),
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
