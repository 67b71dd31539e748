"""The one generation engine: continuous batching over one base model and many adapters.

One thread owns the model. Callers :meth:`Engine.submit` a prompt (token ids), an adapter name
(None: the base) and :class:`Sampling` settings, and get a :class:`Request` back whose sink
receives the reply token by token; :meth:`Request.cancel` drops it at the next token. What
the thread does, over and over:

1. **Admit** waiting requests while the batch has room (``max_batch``). A request whose prompt
   starts with tokens seen before for the same adapter copies that prefix's KV cache from the
   :class:`PromptCache` (an LRU bounded in bytes) and prefills only the rest.
2. **Prefill** new rows. Short prompts with nothing cached that wait together are prefilled in
   one left-padded forward pass (a short prompt reads every weight, as a decode step does);
   the others one row at a time in chunks of at most ``prefill_step`` tokens per turn (so a
   long prompt never stalls the rows already decoding for long), each in its own single-row
   cache. A row whose prompt is done samples its first token and joins the running batch: its
   cache is left-padded into the batch's (mlx-lm's batch caches mask the padding and offset each
   row's positions, so a row decodes as it would alone).
3. **Decode** one token for every row of the batch with one forward pass; each row samples
   with its own temperature, top-p and seeded random key, checks its stop strings, end-of-turn
   tokens and ``max_tokens``, and leaves the batch the moment it is done. New requests join at
   the next token; nobody waits for the batch to drain.

**Many adapters in one batch.** :class:`AdapterBank` loads every adapter onto the base once
and replaces each targeted layer by a :class:`RowLoRALinear`: the base layer runs once for the
whole batch and each row adds its own adapter's low-rank update ``s_i * B_i A_i x``, selected per
row from the adapters' factors laid side by side, each padded to the largest rank of that layer
(an adapter that does not target the layer has zeros there). DoRA rows also take their adapter's per-output gain
``m / ||W + s B A||`` (a constant at inference). When every row of a step uses the same adapter
(or none) the layer computes exactly what a plain :class:`mlx_lora.model.lora.LoRALinear` computes.
"""

from __future__ import annotations

import atexit
import collections
import gc
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_lora.model import adapters as adapters_mod
from mlx_lora.model.integrity import check_adapter_base
from mlx_lora.model.lora import DoRALinear, LoRALinear, dense_weight
from mlx_lora.plumbing import mlx_lm_compat as compat
from mlx_lora.plumbing.errors import MlxLoraError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 64
DEFAULT_PREFILL_STEP = 512
DEFAULT_PROMPT_CACHE_GB = 1.0
MAX_TOP_LOGPROBS = 20


# MLX gives every thread its own streams. A thread that ran compiled functions (mlx-lm compiles
# its activations, e.g. SwiGLU) and ends without freeing its streams makes MLX abort at process
# exit ("terminate called without an active exception"): each engine thread frees its streams as it
# ends (``mx.clear_streams``), and engines still running at exit are closed first (atexit). An
# MLX without per-thread streams has no ``clear_streams``: there compilation is turned off while
# an engine thread runs (uncompiled functions compute the same values).
_CLEAR_STREAMS = getattr(mx, "clear_streams", None)
_COMPILE_LOCK = threading.Lock()
_ENGINES_RUNNING = 0
_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _compile_off(on: bool) -> None:
    """Where MLX cannot free a thread's streams: compilation off while any engine thread runs
    (``on`` True: one more engine; False: one fewer)."""
    global _ENGINES_RUNNING
    if _CLEAR_STREAMS is not None:
        return
    with _COMPILE_LOCK:
        _ENGINES_RUNNING += 1 if on else -1
        if on and _ENGINES_RUNNING == 1:
            mx.disable_compile()
        elif not on and _ENGINES_RUNNING == 0:
            mx.enable_compile()


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE):
        engine.close()


class QueueFull(MlxLoraError):
    """The engine's queue holds ``max_queue`` requests already."""


# ----------------------------------------------------------------------------------------------
# requests and what comes back


@dataclass
class Sampling:
    """How one request is answered. ``temperature`` 0 is greedy; otherwise sampled from ``seed``
    (equal requests give equal replies, whatever else is in the batch), keeping the smallest set
    of tokens whose probability reaches ``top_p``. ``logprobs``: how many alternatives to report
    per token (None: no log-probabilities). ``constraint``: an object with ``allowed(text)``
    (see :mod:`mlx_lora.inference.json_constraint`) that every reply's text must satisfy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    logprobs: Optional[int] = None
    constraint: Optional[object] = None


@dataclass
class Token:
    """One generated token as the sink receives it: the text it adds (may be empty while a
    multi-byte character or a possible stop string is held back), its id and log-probability."""

    text: str
    id: int
    logprob: Optional[float] = None
    top: Optional[list] = None
    """[(token id, logprob)] of the most likely alternatives, when asked for."""


@dataclass
class Result:
    """How a reply ended: ``finish_reason`` is ``stop`` (end of turn or a stop string), ``length``
    (``max_tokens`` or the context reached) or ``cancelled``."""

    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (not prefilled)."""
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)


class Request:
    """A submitted request: ``sink(kind, value)`` is called from the engine thread with
    ("token", :class:`Token`), then ("done", :class:`Result`) or ("error", exception)."""

    def __init__(self, prompt: list[int], adapter: Optional[str], sampling: Sampling, sink: Callable):
        self.prompt, self.adapter, self.sampling, self.sink = list(prompt), adapter, sampling, sink
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.result = Result(prompt_tokens=len(self.prompt))

    def cancel(self) -> None:
        """Stop generating for this request at the next token (its slot is freed)."""
        self.cancelled.set()


# ----------------------------------------------------------------------------------------------
# many adapters on one base


class RowAdapters:
    """Which adapter each row of the current forward pass uses, shared by every RowLoRALinear.
    ``uniform``: the slot every row uses (None: the base alone), when all rows agree; else
    ``index`` holds one slot per row (``n`` for the base) and :meth:`mask` the per-row selectors."""

    def __init__(self, n: int):
        self.n = n
        self.uniform: Optional[int] = None
        self.index: Optional[mx.array] = None
        self._slots: list[int] = []
        self._masks: dict[int, mx.array] = {}

    def set(self, slots: Sequence[Optional[int]]) -> None:
        self._masks = {}
        if len(set(slots)) <= 1:
            self.uniform, self.index = (slots[0] if slots else None), None
        else:
            self.uniform = -1
            self._slots = [self.n if s is None else s for s in slots]
            self.index = mx.array(self._slots, dtype=mx.int32)

    def mask(self, r: int, dtype) -> mx.array:
        """[B, 1, n * r]: ones on the r columns of each row's adapter (none for the base)."""
        key = (r, dtype)
        if key not in self._masks:
            onehot = mx.array([[1.0 if k == s else 0.0 for k in range(self.n)] for s in self._slots])
            self._masks[key] = mx.repeat(onehot, r, axis=1)[:, None, :].astype(dtype)
        return self._masks[key]


@dataclass
class _Low:
    """One adapter's factors on one layer."""

    a: mx.array  # [r, in]
    b: mx.array  # [out, r]
    scale: float
    gain: Optional[mx.array]  # DoRA: m / ||W + s B A||, [out]; None for LoRA


class RowLoRALinear(nn.Module):
    """A base linear layer plus, per row, the low-rank update of that row's adapter.

    The adapters' factors are kept side by side, each padded to the largest rank ``r`` here:
    ``A`` [n r, in] and ``(s B)^T`` [n r, out] (zeros for an adapter that does not target this layer).
    A mixed batch computes ``((x A^T) * mask) (s B)^T``, the mask keeping each row's own adapter's
    r columns: two small matmuls for the whole batch, whatever the number of adapters."""

    def __init__(self, base, rows: RowAdapters, lows: list[Optional[_Low]]):
        super().__init__()
        self.base = base
        self._rows = rows
        self._lows = lows
        out_dims, in_dims = next((lw.b.shape[0], lw.a.shape[1]) for lw in lows if lw is not None)
        r = max(lw.a.shape[0] for lw in lows if lw is not None)
        n = len(lows)
        a = mx.zeros((n * r, in_dims))
        bt = mx.zeros((n * r, out_dims))  # (s B)^T, kept rank-major: a product with it needs no transpose
        gain = mx.ones((n + 1, out_dims))  # the last slot: no adapter
        dora = [False] * (n + 1)
        for i, lw in enumerate(lows):
            if lw is None:
                continue
            k = lw.a.shape[0]
            a[i * r : i * r + k] = lw.a.astype(mx.float32)
            bt[i * r : i * r + k] = lw.b.astype(mx.float32).T * lw.scale
            if lw.gain is not None:
                gain[i] = lw.gain
                dora[i] = True
        self._r = r
        self._a, self._bt = a, bt
        self._gain = gain if any(dora) else None
        self._dora = mx.array(dora)
        mx.eval(self._a, self._bt, self._gain, self._dora)

    def __call__(self, x: mx.array) -> mx.array:
        rows = self._rows
        slot = rows.uniform
        if slot is None:
            return self.base(x)
        if slot >= 0:
            lw = self._lows[slot]
            if lw is None:
                return self.base(x)
            low = ((x @ lw.a.astype(x.dtype).T) @ lw.b.astype(x.dtype).T) * lw.scale
            if lw.gain is None:
                return self.base(x) + low
            return self._dora_out(x, lw.gain.astype(x.dtype), low)
        a, bt = self._a, self._bt
        if a.dtype != x.dtype:
            a, bt = a.astype(x.dtype), bt.astype(x.dtype)
        h = (x @ a.T) * rows.mask(self._r, x.dtype)
        if self._gain is None:
            return mx.addmm(self.base(x), h, bt)  # the base plus each row's update, one op fewer
        low = h @ bt
        plain = self.base(x) + low
        idx = rows.index
        dora = self._dora_out(x, self._gain[idx].astype(x.dtype)[:, None, :], low)
        return mx.where(self._dora[idx][:, None, None], dora, plain)

    def _dora_out(self, x, gain, low):
        bias = self.base.get("bias") if isinstance(self.base, nn.Module) else None
        base_out = self.base(x)
        if bias is not None:
            base_out = base_out - bias
        out = gain * (base_out + low)
        return out + bias if bias is not None else out


class AdapterBank:
    """Adapters (name -> adapter or run folder) loaded onto one base model for per-row use.

    Each is loaded onto the plain base with :func:`mlx_lora.model.adapters.load_adapter` (every check
    of a loaded adapter applies; ``strict`` refuses one trained on another base, else ``warn``
    receives the warning), its factors are kept and the base layers go back; then every layer
    that some adapter targets becomes a :class:`RowLoRALinear` around the base's own layer object,
    so the base weights exist once."""

    def __init__(self, model, base_path, adapters: dict[str, str], *, strict: bool = False, warn=None):
        self.names = list(adapters)
        self.rows = RowAdapters(len(self.names))
        per_layer: dict[str, list] = {}
        bases: dict[str, object] = {}
        for k, (name, folder) in enumerate(adapters.items()):
            try:
                ainfo = adapters_mod.load_adapter(model, folder)
                wrapped = adapters_mod.adapter_layers(model)
                for path, layer in wrapped:
                    if not isinstance(layer, LoRALinear):
                        raise MlxLoraError(
                            f"{folder}: adapters on expert (mixture-of-experts) layers cannot be "
                            f"served beside others yet; fuse it (mlx-lora fuse) and serve the result"
                        )
                    gain = None
                    if isinstance(layer, DoRALinear):
                        w = dense_weight(layer.base).astype(mx.float32) + layer.delta()
                        gain = layer.magnitude / mx.linalg.norm(w, axis=1)
                    low = _Low(layer.lora_a, layer.lora_b, float(layer.scale), gain)
                    mx.eval(low.a, low.b, *([gain] if gain is not None else []))
                    per_layer.setdefault(path, [None] * len(self.names))[k] = low
                    bases[path] = layer.base
            finally:
                wrapped = adapters_mod.adapter_layers(model)
                if wrapped:
                    model.update_modules(tree_unflatten([(p, m.base) for p, m in wrapped]))
            msg = check_adapter_base(ainfo, base_path, strict=strict, adapter_name=str(folder))
            if msg and warn is not None:
                warn(msg)
        self.layers = {p: RowLoRALinear(bases[p], self.rows, lows) for p, lows in per_layer.items()}
        if self.layers:
            model.update_modules(tree_unflatten(list(self.layers.items())))
        model.eval()

    def slot(self, name: Optional[str]) -> Optional[int]:
        return None if name is None else self.names.index(name)


# ----------------------------------------------------------------------------------------------
# the prefix cache


def shared_length(a: Sequence[int], b: Sequence[int], limit: Optional[int] = None) -> int:
    """How many tokens ``a`` and ``b`` start with in common (at most ``limit``)."""
    m = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    n = 0
    while n < m and a[n] == b[n]:
        n += 1
    return n


class PromptCache:
    """KV caches of token sequences seen before, per adapter, least recently used first out,
    at most ``max_bytes`` in all. :meth:`lookup` returns a copy of the longest cached prefix of
    a prompt (a longer cached sequence is cut to the part it shares with the prompt)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: "collections.OrderedDict[tuple, tuple[list, int]]" = collections.OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: Optional[str], prompt: Sequence[int]) -> tuple[Optional[list], int]:
        """(caches holding the first n tokens of ``prompt``, n); n < len(prompt), so at least
        one token is left to prefill (its logits give the first new token). (None, 0): a miss."""
        best, best_n = None, 0
        limit = len(prompt) - 1
        for key in self._entries:
            if key[0] != adapter:
                continue
            n = shared_length(key[1], prompt, limit)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        self._entries.move_to_end(best)
        return compat.kv_prefix(self._entries[best][0], best_n), best_n

    def insert(self, adapter: Optional[str], tokens: Sequence[int], caches: list) -> None:
        if self.max_bytes <= 0 or not tokens or not compat.is_plain_kv(caches):
            return
        size = compat.cache_nbytes(caches)
        if size > self.max_bytes:
            return
        key = (adapter, tuple(tokens))
        # A cached sequence that this one extends is redundant: this one serves all its prompts.
        for old in [
            k for k in self._entries if k[0] == adapter and len(k[1]) <= len(key[1]) and key[1][: len(k[1])] == k[1]
        ]:
            self.nbytes -= self._entries.pop(old)[1]
        self._entries[key] = (caches, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, n) = self._entries.popitem(last=False)
            self.nbytes -= n
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


# ----------------------------------------------------------------------------------------------
# the engine


class _Row:
    """A request in flight: its cache (while prefilling), the tokens its cache holds, what is
    left to prefill, its random key and its text so far."""

    def __init__(self, req: Request, slot: Optional[int], tokenizer):
        self.req = req
        self.slot = slot
        self.cache: Optional[list] = None
        self.todo: list[int] = []
        self.tokens: list[int] = []
        self.next: Optional[int] = None
        s = req.sampling
        self.key = mx.random.key(s.seed) if s.temperature > 0 else None
        self.detok = compat.detokenizer(tokenizer) if tokenizer is not None else None
        self.stops = [t for t in s.stop if t]
        self.text = ""
        self.sent = 0


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (it may yet become one)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Engine:
    """See the module docstring. ``context``: the most tokens (prompt and reply) a row may
    hold; ``prompt_cache_bytes`` 0 turns the prefix cache off. Without a ``tokenizer`` (then
    ``eos`` is required) replies are token ids only: no text, stop strings or constraints."""

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        eos: Optional[set] = None,
        bank: Optional[AdapterBank] = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefill_step: int = DEFAULT_PREFILL_STEP,
        prompt_cache_bytes: int = int(DEFAULT_PROMPT_CACHE_GB * 2**30),
        context: Optional[int] = None,
    ):
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.max_batch, self.max_queue, self.prefill_step = int(max_batch), int(max_queue), int(prefill_step)
        self.context = context
        if eos is None:
            eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self.eos = set(eos)
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self._pending: collections.deque[Request] = collections.deque()
        self._prefilling: list[_Row] = []
        self._rows: list[_Row] = []
        self._batch: Optional[list] = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._recent: collections.deque = collections.deque(maxlen=4096)  # (time, tokens) of decode steps
        self.counters = collections.Counter()
        self.changed = threading.Condition()  # notified after every step (tests wait on it)
        self._vocab_text: Optional[list[str]] = None
        self._split: Optional[tuple] = None  # (inner, head) of the model, checked on first use
        self._split_checked = False
        if bank is None:
            self._set_rows = lambda slots: None
        else:
            self._set_rows = bank.rows.set

    # -- the caller's side ------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        adapter: Optional[str] = None,
        sampling: Optional[Sampling] = None,
        sink: Optional[Callable] = None,
        *,
        wait: bool = False,
    ) -> Request:
        """Queue a request. ``wait`` False: raise :class:`QueueFull` when ``max_queue`` requests
        are waiting already; True (in-process callers): always queue."""
        if not prompt:
            raise MlxLoraError("the prompt holds no tokens")
        if adapter is not None and (self.bank is None or adapter not in self.bank.names):
            raise MlxLoraError(f"no adapter named {adapter!r}")
        sampling = sampling or Sampling()
        if self.tokenizer is None and (sampling.constraint is not None or any(sampling.stop)):
            raise MlxLoraError("stop strings and constrained replies need the engine's tokenizer")
        req = Request(list(prompt), adapter, sampling, sink or (lambda kind, value: None))
        with self._cond:
            if self._closed:
                raise MlxLoraError("the generation engine is closed")
            if not wait and len(self._pending) >= self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(
                    f"the server is busy: {len(self._pending)} requests are waiting already "
                    f"(--max-queue {self.max_queue}); try again shortly"
                )
            self._pending.append(req)
            self.counters["requests"] += 1
            if self._thread is None:
                _compile_off(True)
                _LIVE.add(self)
                self._thread = threading.Thread(target=self._work, name="mlx-lora-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def stream(
        self,
        prompt: Sequence[int],
        adapter: Optional[str] = None,
        sampling: Optional[Sampling] = None,
        result: Optional[Result] = None,
    ) -> Iterator[Token]:
        """Submit and yield the reply's tokens as they come; ``result`` (when given) is filled in
        once the iterator ends. Leaving the loop early (or Ctrl-C) cancels the request."""
        q: queue.Queue = queue.Queue()
        req = self.submit(prompt, adapter, sampling, lambda kind, value: q.put((kind, value)), wait=True)
        try:
            while True:
                kind, value = q.get()
                if kind == "token":
                    yield value
                elif kind == "done":
                    if result is not None:
                        result.__dict__.update(value.__dict__)
                    return
                else:
                    raise value
        finally:
            req.cancel()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        samplings: Sequence[Sampling],
        adapters: Optional[Sequence[Optional[str]]] = None,
        on_done: Optional[Callable[[int], None]] = None,
    ) -> list[Result]:
        """Every prompt's whole reply (they are batched as the engine sees fit); ``on_done(1)`` is
        called as each one finishes (progress)."""
        q: queue.Queue = queue.Queue()
        reqs = [
            self.submit(
                p,
                None if adapters is None else adapters[i],
                s,
                (lambda i: lambda kind, value: q.put((i, kind, value)))(i),
                wait=True,
            )
            for i, (p, s) in enumerate(zip(prompts, samplings))
        ]
        out: list[Optional[Result]] = [None] * len(reqs)
        left = len(reqs)
        try:
            while left:
                i, kind, value = q.get()
                if kind == "done":
                    out[i] = value
                    left -= 1
                    if on_done is not None:
                        on_done(1)
                elif kind == "error":
                    raise value
        finally:
            for r in reqs:
                r.cancel()
        return out  # type: ignore[return-value]

    def metrics(self) -> dict:
        """Counters and gauges: requests, queue, batch occupancy, tokens/s, prefix cache."""
        with self._cond:
            now = time.monotonic()
            window = [(t, n) for t, n in self._recent if now - t <= 10.0]
            span = (now - window[0][0]) if window else 0.0
            tps = sum(n for _, n in window) / span if span > 0 else 0.0
            c = self.prompt_cache
            return {
                "requests_total": self.counters["requests"],
                "requests_finished": self.counters["finished"],
                "requests_cancelled": self.counters["cancelled"],
                "requests_rejected": self.counters["rejected"],
                "requests_failed": self.counters["failed"],
                "queue_length": len(self._pending),
                "prefilling": len(self._prefilling),
                "batch_size": len(self._rows),
                "max_batch": self.max_batch,
                "batch_occupancy": len(self._rows) / self.max_batch,
                "prompt_tokens_total": self.counters["prompt_tokens"],
                "prefill_tokens_total": self.counters["prefill_tokens"],
                "generated_tokens_total": self.counters["generated_tokens"],
                "decode_steps_total": self.counters["decode_steps"],
                "tokens_per_second": round(tps, 3),
                "prompt_cache_hits": c.hits,
                "prompt_cache_misses": c.misses,
                "prompt_cache_entries": len(c),
                "prompt_cache_bytes": c.nbytes,
                "prompt_cache_evictions": c.evictions,
            }

    def wait_until(self, predicate: Callable[[dict], bool], timeout: float = 120.0) -> bool:
        """Block until ``predicate(self.metrics())`` holds (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.metrics()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                _compile_off(False)
            self._thread = None
        _LIVE.discard(self)

    # -- the engine thread ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._pending or self._prefilling or self._rows):
                    self._cond.wait()
                if self._closed:
                    break
                admitted = []
                while self._pending and len(self._rows) + len(self._prefilling) + len(admitted) < self.max_batch:
                    admitted.append(self._pending.popleft())
            try:
                self._step(admitted)
            except Exception as e:  # the step failed: every row in flight gets the error, the engine goes on
                log.exception("generation step failed")
                for req in [r.req for r in self._rows + self._prefilling] + admitted:
                    if not req.finished.is_set():
                        self._fail(req, e)
                self._rows, self._prefilling, self._batch = [], [], None
            with self.changed:
                self.changed.notify_all()
        for row in self._rows + self._prefilling:
            row.req.cancel()
            self._finish(row, None, store=False)
        for req in self._pending:
            req.cancel()
            self._done(req, "cancelled")
        # MLX streams belong to a thread: what this thread made is freed here, not at exit.
        self._rows, self._prefilling, self._batch = [], [], None
        self.prompt_cache.clear()
        if self.bank is not None:
            self.bank.rows.set([])
        gc.collect()
        if _CLEAR_STREAMS is not None:
            _CLEAR_STREAMS()

    def _step(self, admitted: list[Request]) -> None:
        if not self._split_checked:  # once, on the base alone: can the output layer skip the prompt?
            self._split_checked = True
            self._set_rows([None])
            self._split = compat.last_position_head(self.model)
        for req in admitted:
            if req.cancelled.is_set():
                self._done(req, "cancelled")
                continue
            try:
                self._prefilling.append(self._start(req))
            except Exception as e:  # this request could not start (its cache): it alone gets the error
                log.exception("starting a request failed")
                self._fail(req, e)
        self._drop_cancelled()
        budget = self.prefill_step
        group = self._fresh_group()
        if len(group) > 1:
            for row in group:
                self._prefilling.remove(row)
            try:
                budget -= self._prefill_together(group)
            except Exception as e:  # these rows' prompts failed: they alone get the error
                log.exception("prefill failed")
                for row in group:
                    self._fail(row.req, e)
        while self._prefilling and budget > 0:
            row = self._prefilling[0]
            try:
                budget -= self._prefill(row, budget)
            except Exception as e:  # this row's prompt failed: it alone gets the error
                log.exception("prefill failed")
                self._prefilling.pop(0)
                self._fail(row.req, e)
                continue
            if not row.todo:
                self._prefilling.pop(0)
        if self._rows:
            self._decode()

    def _start(self, req: Request) -> _Row:
        row = _Row(req, None if self.bank is None else self.bank.slot(req.adapter), self.tokenizer)
        self.counters["prompt_tokens"] += len(req.prompt)
        caches, n = self.prompt_cache.lookup(req.adapter, req.prompt)
        if caches is None:
            caches, n = compat.new_row_cache(self.model), 0
        row.cache, row.tokens, row.todo = caches, list(req.prompt[:n]), list(req.prompt[n:])
        req.result.cached_tokens = n
        return row

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._prefilling if r.req.cancelled.is_set()]:
            self._prefilling.remove(row)
            self._finish(row, None, store=False)
        gone = [i for i, r in enumerate(self._rows) if r.req.cancelled.is_set()]
        if gone:
            for i in gone:
                self._finish(self._rows[i], None, store=False)
            self._keep([i for i in range(len(self._rows)) if i not in set(gone)])

    def _keep(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        self._batch = compat.keep_rows(self._batch, keep) if self._batch is not None else None

    def _last_logits(self, tokens: mx.array, cache: list, need: bool = True) -> Optional[mx.array]:
        """The logits of the last position of a prefill (None when not ``need``ed: a chunk of a
        longer prompt only fills the cache). The output layer runs on that position alone when
        the model allows it (:func:`compat.last_position_head`)."""
        if self._split is None:
            logits = self.model(tokens, cache=cache)
            return logits[:, -1, :] if need else None
        inner, head = self._split
        hidden = inner(tokens, cache=cache)
        if not need:
            return None
        return head(hidden[:, -1:, :])[:, -1, :]

    def _prefill(self, row: _Row, budget: int) -> int:
        n = min(len(row.todo), budget)
        chunk, row.todo = row.todo[:n], row.todo[n:]
        self._set_rows([row.slot])
        logits = self._last_logits(mx.array([chunk], dtype=mx.int32), row.cache, need=not row.todo)
        row.tokens += chunk
        self.counters["prefill_tokens"] += n
        if row.todo:
            mx.eval([c.state for c in row.cache])
            return n
        tokens, infos = self._sample([row], logits)
        if self._emit(row, tokens[0], infos[0]):
            self._finish(row, None)
        else:
            row.next = tokens[0]
            self._batch = compat.extend_batch(self._batch, compat.batch_of_rows([row.cache]))
            row.cache = None
            self._rows.append(row)
        return n

    def _fresh_group(self) -> list[_Row]:
        """Rows waiting with a whole, short prompt and nothing cached: prefilled in one forward pass
        (a short prompt reads all the weights as a decode step does, so one pass for many is
        nearly the price of one)."""
        group, width = [], 0
        for row in self._prefilling:
            if row.tokens or len(row.todo) > self.prefill_step or not compat.is_plain_kv(row.cache):
                continue
            w = max(width, len(row.todo))
            if group and w * (len(group) + 1) > 2 * self.prefill_step:
                break
            group.append(row)
            width = w
        return group

    def _prefill_together(self, rows: list[_Row]) -> int:
        """Prefill several fresh rows at once, left-padded to one length; they join the batch."""
        width = max(len(r.todo) for r in rows)
        pad = [width - len(r.todo) for r in rows]
        tokens = mx.array([[0] * k + r.todo for k, r in zip(pad, rows)], dtype=mx.int32)
        cache = [compat.batch_kv_cache(pad) for _ in rows[0].cache]
        self._set_rows([r.slot for r in rows])
        logits = self._last_logits(tokens, cache)
        n = 0
        for r in rows:
            r.tokens, r.todo, r.cache = list(r.todo), [], None
            n += len(r.tokens)
        self.counters["prefill_tokens"] += n
        tokens, infos = self._sample(rows, logits)
        keep = []
        for i, (row, tok, info) in enumerate(zip(rows, tokens, infos)):
            if self._emit(row, tok, info):
                self._finish(row, i, batch=cache)
            else:
                row.next = tok
                keep.append(i)
        if keep:
            cache = compat.keep_rows(cache, keep) if len(keep) < len(rows) else cache
            self._batch = compat.extend_batch(self._batch, cache)
            self._rows += [rows[i] for i in keep]
        return n

    def _decode(self) -> None:
        rows = self._rows
        self._set_rows([r.slot for r in rows])
        x = mx.array([[r.next] for r in rows], dtype=mx.int32)
        logits = self.model(x, cache=self._batch)[:, -1, :]
        tokens, infos = self._sample(rows, logits)
        self.counters["decode_steps"] += 1
        self._recent.append((time.monotonic(), len(rows)))
        keep = []
        for i, (row, tok, info) in enumerate(zip(rows, tokens, infos)):
            row.tokens.append(row.next)
            if self._emit(row, tok, info):
                self._finish(row, i)
            else:
                row.next = tok
                keep.append(i)
        if len(keep) < len(rows):
            self._keep(keep)

    def _sample(self, rows: list[_Row], logits: mx.array) -> tuple[list[int], list]:
        """One token per row, with its (logprob, top alternatives) when the row asks for them."""
        logits = logits.astype(mx.float32)
        if all(
            r.req.sampling.temperature == 0 and r.req.sampling.logprobs is None and r.req.sampling.constraint is None
            for r in rows
        ):
            return mx.argmax(logits, axis=-1).tolist(), [None] * len(rows)  # greedy: no softmax needed
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picks = mx.argmax(logprobs, axis=-1)
        chosen: list = [None] * len(rows)
        for i, row in enumerate(rows):
            s = row.req.sampling
            if s.constraint is not None:
                chosen[i] = self._constrained(row, logprobs[i])
            elif s.temperature > 0:
                row.key, sub = mx.random.split(row.key)
                chosen[i] = _sample_row(logprobs[i], s.temperature, s.top_p, sub)
        if any(c is not None for c in chosen):
            picks = mx.stack(
                [picks[i] if c is None else mx.array(c).reshape(()).astype(picks.dtype) for i, c in enumerate(chosen)]
            )
        tokens = picks.tolist()
        infos: list = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.req.sampling.logprobs is not None]
        if want:
            for i in want:
                k = min(max(rows[i].req.sampling.logprobs, 0), MAX_TOP_LOGPROBS)
                lp = logprobs[i]
                top = []
                if k:
                    ids = mx.argpartition(-lp, k - 1)[:k]
                    vals = lp[ids]
                    order = mx.argsort(-vals)
                    top = list(zip(ids[order].tolist(), vals[order].tolist()))
                infos[i] = (lp[tokens[i]].item(), top)
        return tokens, infos

    def _vocab(self, size: int) -> list[str]:
        """Each token's text alone (computed once, the first time a reply is constrained)."""
        if self._vocab_text is None or len(self._vocab_text) < size:
            texts = []
            for t in range(size):
                try:
                    texts.append(self.tokenizer.decode([t]))
                except Exception:  # ids past the tokenizer's vocabulary (padded embeddings)
                    texts.append("")
            self._vocab_text = texts
        return self._vocab_text

    def _constrained(self, row: _Row, logprobs: mx.array) -> int:
        """The most likely (greedy) or a sampled token that keeps the reply acceptable to the
        row's constraint: candidates are tried in order of probability (sampling: of
        probability perturbed by Gumbel noise, which draws from the distribution with the
        refused tokens masked out). When the token budget runs short, only tokens that bring
        the shortest completion nearer are taken, so the reply ends whole."""
        s = row.req.sampling
        con = s.constraint
        vocab = self._vocab(logprobs.shape[-1])
        text = self.tokenizer.decode(row.req.result.tokens)
        status, need = con.check(text)
        left = s.max_tokens - row.req.result.completion_tokens  # tokens this reply may still take
        if self.context is not None:
            left = min(left, self.context - len(row.tokens) - 1)
        eos = next(iter(self.eos))
        if status == "complete" or (left <= 1 and con.complete(text)):
            return eos  # a whole value: nothing may follow it

        def fits(st: str, nd: int) -> bool:
            # A token may leave the reply needing nd more characters only while the tokens left
            # after it (one character each at worst, and one for the end) still cover them;
            # past that, only tokens that bring the end nearer.
            return st == "complete" or (st == "partial" and (nd <= left - 3 or nd < need))

        lp = logprobs
        if s.temperature > 0:
            row.key, sub = mx.random.split(row.key)
            lp = lp / s.temperature - mx.log(-mx.log(mx.random.uniform(shape=lp.shape, key=sub)))
        order = mx.argsort(-lp).tolist()
        for rank, tok in enumerate(order):
            if tok in self.eos:
                if con.complete(text):
                    return tok
                continue
            piece = vocab[tok] if tok < len(vocab) else ""
            # Past the most likely 512, only one-character tokens are tried: enough to reach any
            # JSON text, and a bound on the work one step may do.
            if not piece or (rank >= 512 and len(piece) != 1):
                continue
            st, nd = con.check(text + piece)
            if not fits(st, nd):
                continue
            # The token's text in context can differ from its text alone (a tokenizer's clean-up
            # of spaces, say): the reply as it will be decoded must pass too.
            whole = self.tokenizer.decode(row.req.result.tokens + [tok])
            if whole != text + piece:
                st, nd = con.check(whole)
                if not fits(st, nd):
                    continue
            return tok
        return eos  # nothing fits (the budget ran out): end the reply

    def _emit(self, row: _Row, tok: int, info) -> bool:
        """Add one generated token to the row's reply; True when the reply is complete."""
        req, res = row.req, row.req.result
        self.counters["generated_tokens"] += 1
        res.completion_tokens += 1
        if tok in self.eos:
            return self._end(row, "stop")
        res.tokens.append(tok)
        if info is not None:
            res.logprobs.append(info)
        if row.detok is not None:
            row.detok.add_token(tok)
            row.text += row.detok.last_segment
        piece, hit = self._ready(row, final=False)
        req.sink("token", Token(piece, tok, *(info if info is not None else (None, None))))
        if hit:
            res.finish_reason = "stop"
            return True
        if res.completion_tokens >= req.sampling.max_tokens or (
            self.context is not None and len(row.tokens) + 1 >= self.context
        ):
            return self._end(row, "length")
        return False

    def _end(self, row: _Row, reason: str) -> bool:
        if row.detok is not None:
            row.detok.finalize()
            row.text += row.detok.last_segment
        piece, hit = self._ready(row, final=True)
        if piece:
            row.req.sink("token", Token(piece, -1))
        row.req.result.finish_reason = "stop" if hit else reason
        return True

    def _ready(self, row: _Row, final: bool) -> tuple[str, bool]:
        """The text that may be sent now (up to a stop string, else all but a possible stop
        string's start), and whether a stop string was found."""
        text, sent, stops = row.text, row.sent, row.stops
        hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
        if hits:
            end = max(min(hits), sent)
            row.sent = end
            row.req.result.text += text[sent:end]
            return text[sent:end], True
        ready = len(text) if final else len(text) - _held_back(text, stops)
        if ready <= sent:
            return "", False
        row.sent = ready
        row.req.result.text += text[sent:ready]
        return text[sent:ready], False

    def _finish(self, row: _Row, batch_index: Optional[int], store: bool = True, batch: Optional[list] = None) -> None:
        """A row is done: keep its KV in the prefix cache (from its own cache, or row
        ``batch_index`` of ``batch``, by default the running batch), and report."""
        req = row.req
        if store and self.prompt_cache.max_bytes > 0:
            caches = (
                row.cache
                if batch_index is None
                else compat.row_of_batch(self._batch if batch is None else batch, batch_index)
            )
            if caches is not None and compat.is_plain_kv(caches) and all(c.offset == len(row.tokens) for c in caches):
                mx.eval(compat.kv_arrays(caches))
                self.prompt_cache.insert(req.adapter, row.tokens, caches)
        if req.cancelled.is_set() and req.result.finish_reason is None:
            self._done(req, "cancelled")
        else:
            self._done(req, req.result.finish_reason or "stop")

    def _done(self, req: Request, reason: str) -> None:
        req.result.finish_reason = req.result.finish_reason or reason
        self.counters["cancelled" if req.result.finish_reason == "cancelled" else "finished"] += 1
        req.finished.set()
        req.sink("done", req.result)

    def _fail(self, req: Request, e: Exception) -> None:
        self.counters["failed"] += 1
        req.finished.set()
        req.sink("error", e)


def _sample_row(logprobs: mx.array, temperature: float, top_p: float, key) -> mx.array:
    """A token drawn from softmax(logprobs / temperature), restricted to the smallest set of
    most likely tokens whose probability reaches ``top_p``."""
    lp = logprobs / temperature
    if top_p < 1.0:
        order = mx.argsort(-lp)
        sorted_lp = lp[order]
        probs = mx.softmax(sorted_lp)
        before = mx.cumsum(probs) - probs  # probability of the tokens ranked above each one
        masked = mx.where(before < top_p, sorted_lp, -mx.inf)
        return order[mx.random.categorical(masked, key=key)]
    return mx.random.categorical(lp, key=key)
