"""The serving engine: a bounded request queue and one loop that batches continuously. No torch,
no HTTP (runtime/serve.py is the HTTP side).

    eng = Engine(model, max_queue=64)
    eng.start()                        # the engine thread
    req = Request(prompt_ids, max_tokens=32, params=SamplingParams(), emit=callback)
    eng.submit([req])                  # Overloaded past slots + max_queue; Draining after drain()
    eng.cancel(req)                    # client gone: out of the queue, or its slot freed next iteration
    eng.stop()

One thread owns the model. Each iteration of its loop:
  1. drops cancelled requests and those past their deadline (queued or running), freeing slots;
  2. admits queued requests into free slots, oldest first, one prefill each (runtime/slots.py: the
     other rows are not touched), and samples each one's first token;
  3. runs one decode step for every running request together, each at its own position, and
     samples each row with that request's own SamplingParams and random generator.
A finished request frees its slot at once (the next admission may reuse it in the same iteration).
Prefills go first: a waiting request starts at the next iteration boundary, one decode step at
most after it arrives (time to first token over inter-token latency, as llama.cpp's server does).

Events go out through each request's `emit(event)`, called on the engine thread: Token (id, text
delta, log-probabilities when asked for), Done (finish reason, token counts) or Failed (an HTTP
status and an OpenAI error code). A failure is per request: non-finite logits in one row, an
exception while sampling or decoding one request, fail that request only; the others go on.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from kvtrace.errors import KvtraceError
from .generate import Continuation, _stop_ids
from .metrics import Registry
from .sampling import SamplingParams, next_tokens
from .slots import make_slots

log = logging.getLogger("kvtrace.serve")


class Overloaded(KvtraceError):
    """Slots and queue are full: the caller answers 429 with Retry-After."""


class Draining(KvtraceError):
    """The server is shutting down (or not ready): the caller answers 503."""


# ------------------------------------------------------------------------------ events
@dataclass
class Token:
    token_id: int
    text: str  # newly settled text ("" while held back, or without a tokenizer)
    logprob: float | None = None  # log-probability of the chosen token under the model's distribution
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely (id, logprob), when asked


@dataclass
class Done:
    finish_reason: str  # "length" | "stop_token" | "stop_string" (Continuation's reasons)
    text: str | None
    token_ids: list[int]
    prompt_tokens: int


@dataclass
class Failed:
    status: int  # the HTTP status the request ends with
    code: str  # OpenAI-style error code, e.g. "non_finite_logits", "deadline_exceeded"
    message: str
    generated: int = 0  # tokens produced before the failure


Event = Token | Done | Failed


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: set[int] | None = None  # None: the artifact's eos
    stop_strings: Sequence[str] = ()
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    deadline: float | None = None  # time.monotonic() by which it must be done
    # engine state (the engine thread only, except `cancelled`)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    slot: int | None = None
    cont: Continuation | None = None
    rng: np.random.Generator | None = None
    seen: list[int] | None = None
    last_token: int = 0
    t_submit: float = 0.0
    t_last: float = 0.0
    closed: bool = False  # Done or Failed was emitted


class Engine:
    """See the module docstring. `max_slots` caps the static cache rows used (<= max_batch)."""

    def __init__(self, model, *, max_queue: int = 64, max_slots: int | None = None,
                 registry: Registry | None = None, step_delay: float = 0.0):
        if max_queue < 0:
            raise KvtraceError(f"--max-queue {max_queue}: must be >= 0")
        self.model = model
        self.slots = make_slots(model, max_slots)
        self.capacity = self.slots.capacity
        self.max_queue = int(max_queue)
        self.step_delay = float(step_delay)  # seconds before every decode step (a testing aid)
        self._cv = threading.Condition()
        self._pending: deque[Request] = deque()
        self._active: dict[int, Request] = {}  # slot -> request (engine thread)
        self._n_active = 0  # len(_active), readable under _cv
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.default_stops = _stop_ids(model, None)  # the artifact's eos
        self.reg = registry or Registry()
        r = self.reg
        self.m_prompt = r.counter("kvtrace_prompt_tokens_total", "prompt tokens prefilled")
        self.m_gen = r.counter("kvtrace_generation_tokens_total", "tokens generated")
        self.m_steps = r.counter("kvtrace_decode_steps_total", "decode steps run (all active slots together)")
        self.m_fail = r.counter("kvtrace_request_failures_total", "requests ended by the engine with an error, "
                                "by code", ["code"])
        r.gauge("kvtrace_queue_depth", "requests waiting for a slot", lambda: len(self._pending))
        r.gauge("kvtrace_active_slots", "slots holding a request", lambda: self._n_active)
        r.gauge("kvtrace_slots", "slots (static cache rows) the engine batches over", lambda: self.capacity)
        self.m_ttft = r.histogram("kvtrace_time_to_first_token_seconds", "arrival to first token")
        self.m_itl = r.histogram("kvtrace_inter_token_latency_seconds", "between consecutive tokens of a request")
        self.m_e2e = r.histogram("kvtrace_request_duration_seconds", "arrival to the last token")

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvtrace-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return self._n_active

    def submit(self, reqs: Sequence[Request]) -> None:
        """Queue requests, all or none: Overloaded when they do not fit in slots + queue."""
        now = time.monotonic()
        with self._cv:
            if self._draining or self._stopping:
                raise Draining("the server is shutting down")
            held = len(self._pending) + self._n_active
            if held + len(reqs) > self.capacity + self.max_queue:
                raise Overloaded(f"server busy: {self._n_active} of {self.capacity} slots in use and "
                                 f"{len(self._pending)} of {self.max_queue} queue places taken")
            for r in reqs:
                r.t_submit = now
                self._pending.append(r)
            self._cv.notify()

    def cancel(self, req: Request) -> bool:
        """Stop a request (its client went away). True if it was still queued or running."""
        with self._cv:
            if req.closed or req.cancelled:
                return False
            req.cancelled = True
            try:
                self._pending.remove(req)
                req.closed = True  # never started: nothing to free
            except ValueError:
                pass  # running: the engine frees its slot at the start of its next iteration
            self._cv.notify()
            return True

    def drain(self) -> None:
        """Refuse new requests from now on; the queued and running ones go on."""
        with self._cv:
            self._draining = True

    def idle(self) -> bool:
        with self._cv:
            return not self._pending and self._n_active == 0

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop; requests still queued or running fail with 503."""
        with self._cv:
            self._draining = self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop (engine thread)
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._pending and not self._active:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 - the loop outlives any one failure
                log.exception("engine iteration failed")
                for r in list(self._active.values()):
                    self._fail(r, 500, "internal_error", f"the engine failed: {type(e).__name__}: {e}")
        with self._cv:
            left = list(self._pending) + list(self._active.values())
            self._pending.clear()
        for r in left:
            self._fail(r, 503, "server_shutdown", "the server is shutting down")

    def _iteration(self) -> None:
        now = time.monotonic()
        # 1. cancelled and expired requests
        for r in list(self._active.values()):
            if r.cancelled:
                self._free(r)
                r.closed = True
            elif r.deadline is not None and now > r.deadline:
                self._fail(r, 504, "deadline_exceeded",
                           f"request deadline exceeded after {len(r.cont.result.token_ids)} generated tokens")
        with self._cv:
            expired = [r for r in self._pending if r.deadline is not None and now > r.deadline]
            for r in expired:
                self._pending.remove(r)
        for r in expired:
            self._fail(r, 503, "queue_timeout", "request deadline passed while waiting for a free slot")
        # 2. admissions
        while True:
            with self._cv:
                if not self._pending or self.slots.n_busy >= self.capacity:
                    break
                r = self._pending.popleft()
                b = self.slots.acquire()
                r.slot = b
                self._active[b] = r
                self._n_active = len(self._active)
            self._prefill(r)
        # 3. one decode step over every running request
        live = [r for r in self._active.values() if not r.cancelled]
        if not live:
            return
        if self.step_delay:
            time.sleep(self.step_delay)
        rows = [r.slot for r in live]
        try:
            logits = self.slots.step(rows, [r.last_token for r in live])  # (n, V)
        except Exception as e:  # noqa: BLE001 - e.g. onnxruntime failed: these requests, not the server
            log.exception("decode step failed")
            for r in live:
                self._fail(r, 500, "internal_error", f"decode step failed: {e}")
            return
        self.m_steps.inc()
        for r, row in zip(live, logits):
            self._advance(r, row)

    def _prefill(self, r: Request) -> None:
        try:
            r.cont = Continuation(r.prompt_ids, self.model.tokenizer,
                                  stop_ids=self.default_stops if r.stop_ids is None else set(r.stop_ids),
                                  stop_strings=r.stop_strings, max_new_tokens=r.max_tokens)
            r.rng = np.random.default_rng(r.seed)
            use_penalty = r.params.repetition_penalty not in (None, 1.0)
            r.seen = list(r.prompt_ids) if use_penalty else None
            logits = self.slots.prefill(r.slot, r.prompt_ids)  # (V,)
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, KvtraceError):
                log.exception("prefill failed")
            self._fail(r, 500, "internal_error", f"prefill failed: {e}")
            return
        self.m_prompt.inc(len(r.prompt_ids))
        self._advance(r, logits)

    def _advance(self, r: Request, logits: np.ndarray) -> None:
        """Sample r's next token from its logits row (V,), emit it, finish or keep going."""
        try:
            if not np.isfinite(logits).all():
                bad = int((~np.isfinite(logits)).sum())
                self._fail(r, 500, "non_finite_logits",
                           f"the model produced {bad} non-finite logits at position {self.slots.lengths[r.slot] - 1} "
                           "of this request")
                return
            seen = [np.asarray(r.seen)] if r.seen is not None else None
            t = int(next_tokens(logits[None, :], r.params, r.rng, seen)[0])
            ev = Token(t, "")
            if r.logprobs is not None:
                x = logits.astype(np.float64)
                m = x.max()
                lp = x - (m + np.log(np.exp(x - m).sum()))  # (V,) log-softmax
                ev.logprob = float(lp[t])
                if r.logprobs > 0:
                    k = min(r.logprobs, len(lp))
                    top = np.argpartition(-lp, k - 1)[:k]
                    top = top[np.argsort(-lp[top], kind="stable")]
                    ev.top_logprobs = [(int(i), float(lp[i])) for i in top]
            ev.text = r.cont.push(t)
            if r.seen is not None:
                r.seen.append(t)
            r.last_token = t
            now = time.monotonic()
            if len(r.cont.result.token_ids) == 1:
                self.m_ttft.observe(now - r.t_submit)
            else:
                self.m_itl.observe(now - r.t_last)
            r.t_last = now
            self.m_gen.inc()
            r.emit(ev)
            if r.cont.finished:
                self.m_e2e.observe(now - r.t_submit)
                res = r.cont.result
                self._free(r)
                r.closed = True
                r.emit(Done(res.finish_reason, res.text, list(res.token_ids), len(r.prompt_ids)))
        except Exception as e:  # noqa: BLE001 - one request's failure is its own
            log.exception("request %s failed", r.id)
            self._fail(r, 500, "internal_error", f"{type(e).__name__}: {e}")

    def _free(self, r: Request) -> None:
        if r.slot is not None and self._active.get(r.slot) is r:
            with self._cv:
                del self._active[r.slot]
                self._n_active = len(self._active)
            self.slots.release(r.slot)
        r.slot = None

    def _fail(self, r: Request, status: int, code: str, message: str) -> None:
        if r.closed:
            return
        self._free(r)
        r.closed = True
        self.m_fail.inc(code=code)
        generated = len(r.cont.result.token_ids) if r.cont is not None else 0
        try:
            r.emit(Failed(status, code, message, generated))
        except Exception:  # noqa: BLE001 - the receiver is gone
            log.exception("could not deliver the failure of request %s", r.id)

