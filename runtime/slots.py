"""Slots: the static KV cache as a set of independent sequences, for continuous batching. No torch.

A static artifact's cache buffers are (max_batch, n_kv, S, hd) per layer, and row b of each
buffer is contiguous (the batch axis is the outermost). So row b is a slot: one sequence at its
own position. SlotBatch allocates the buffers once, for max_batch rows, and then

    sb = SlotBatch(model)
    b = sb.acquire()                    # lowest free row (None when all are busy)
    logits = sb.prefill(b, prompt_ids)  # (V,): the graph runs at batch 1, bound to row b's memory
    logits = sb.step([b0, b1, ...], [t0, t1, ...])  # (n, V): every listed row, one token each
    sb.release(b)                       # the row is free at once; nothing is copied or cleared

Prefill binds, as the graph's pasts and presents, views of rows [b, b+1) of the cache buffers
(the backend's `rows(buf, lo, hi)`: an OrtValue over a numpy view, i.e. over the same memory),
so the other rows are neither read nor written: a request is admitted between two decode steps
without touching the sequences in flight. A decode step runs rows [lo, hi) = the span of the
active rows (acquire() hands out the lowest free row, so active rows stay packed low). A free row
inside that span steps too, on the pad token at position 0: it writes only its own slot 0, which
the next prefill of that row overwrites, and position 0 keeps the graph's attention span
L = max(position_ids) + 1 (exporter/onnx_graph.py ModelGraph.mask) set by the active rows alone.
Each row attends to its own slots < its position only, so a sequence's logits do not depend on
which other rows run beside it (up to floating-point summation order; greedy tokens are tested
to be identical, tests/test_serve_slots.py).

SerialSlots has the same interface with a single slot, through Model.start/step: the behaviour for
dynamic-cache artifacts (past -> present by concatenation: rows cannot be admitted one at a time
without copying every other row's cache) and for backends without row views. Requests then run
one after another.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kvtrace import io_spec
from kvtrace.errors import KvtraceError


def make_slots(model, max_slots: int | None = None):
    """SlotBatch when the artifact and backend allow it, else SerialSlots; max_slots caps the rows."""
    if model.layout == "static" and hasattr(model.backend, "rows") and getattr(model.backend, "device", "") == "cpu":
        return SlotBatch(model, max_slots)
    return SerialSlots(model)


class SlotBatch:
    """Continuous batching over the rows of the static cache (see the module docstring)."""

    mode = "continuous"

    def __init__(self, model, max_slots: int | None = None):
        if model.layout != "static":
            raise KvtraceError("SlotBatch needs a static-cache artifact (this one is "
                               f"{model.layout}); use SerialSlots")
        be, cfg = model.backend, model.config
        if not hasattr(be, "rows"):
            raise KvtraceError(f"backend {model.backend_name} cannot bind a part of a buffer; use SerialSlots")
        self.model = model
        self.capacity = int(model.max_batch if max_slots is None else min(max_slots, model.max_batch))
        if self.capacity < 1:
            raise KvtraceError(f"max_slots {max_slots}: must be >= 1")
        self.max_seq = model.max_seq
        self.vocab_size = cfg.vocab_size
        self.pad = model.pad_token_id
        shape = (self.capacity, cfg.n_kv_heads, model.max_seq_graph, cfg.head_dim)  # (B, n_kv, S, hd)
        self._caches = [be.alloc(shape, model.cache_dtype) for _ in model.cache_pairs]
        self._views: dict[tuple[int, int], list] = {}  # (lo, hi) -> per cache tensor, rows [lo, hi)
        self._logits: dict[int, object] = {}  # n rows -> (n, 1, V) float32 decode logits buffer
        self._bound: tuple[int, int] | None = None
        self.lengths = np.zeros(self.capacity, dtype=np.int64)  # (B,) tokens held per row
        self.busy = np.zeros(self.capacity, dtype=bool)  # (B,) row holds a sequence

    # ------------------------------------------------------------------ rows
    def acquire(self) -> int | None:
        free = np.flatnonzero(~self.busy)
        if len(free) == 0:
            return None
        b = int(free[0])  # lowest first: keeps the active span [lo, hi) short
        self.busy[b] = True
        self.lengths[b] = 0
        return b

    def release(self, b: int) -> None:
        self.busy[b] = False
        self.lengths[b] = 0

    @property
    def n_busy(self) -> int:
        return int(self.busy.sum())

    def _bind_rows(self, lo: int, hi: int) -> None:
        if self._bound == (lo, hi):
            return
        be = self.model.backend
        views = self._views.get((lo, hi))
        if views is None:
            views = [be.rows(buf, lo, hi) for buf in self._caches]  # (hi - lo, n_kv, S, hd), same memory
            self._views[(lo, hi)] = views
        for (past, present), v in zip(self.model.cache_pairs, views):
            be.bind_input(past, v)
            be.bind_output(present, v)  # in place: TensorScatter writes the rows' own memory
        self._bound = (lo, hi)

    # ------------------------------------------------------------------ prefill
    def prefill(self, b: int, prompt: Sequence[int]) -> np.ndarray:
        """Write `prompt` at positions 0..T-1 of row b; returns the last token's logits (V,) float32."""
        m = self.model
        if not self.busy[b]:
            raise KvtraceError(f"prefill of slot {b}, which was not acquired")
        ids = np.asarray(prompt, dtype=np.int64).reshape(1, -1)  # (1, T)
        T = ids.shape[1]
        if T == 0:
            raise KvtraceError("empty prompt (give at least one token, e.g. BOS)")
        if T > self.max_seq:
            raise KvtraceError(f"prompt of {T} tokens is longer than the cache ({self.max_seq} positions)")
        m._check_ids(ids, "prompt")
        be = m.backend
        self._bind_rows(b, b + 1)
        K = 1 if m.has_logits_index else T  # older artifacts return every position
        out = be.alloc((1, K, self.vocab_size), "float32")  # (1, K, V)
        be.bind_output(io_spec.LOGITS, out)
        feeds = {io_spec.INPUT_IDS: ids, io_spec.POSITION_IDS: np.arange(T, dtype=np.int64).reshape(1, T)}
        if m.has_logits_index:
            feeds[io_spec.LOGITS_INDEX] = np.array([[T - 1]], dtype=np.int64)  # (1, 1): the last token
        be.run(feeds)
        self.lengths[b] = T
        return np.array(be.to_host(out)[0, K - 1])  # (V,)

    # ------------------------------------------------------------------ decode
    def step(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token for each of `rows` (busy, prefilled), at each row's own position.
        Returns logits (len(rows), V) float32, in the order of `rows`."""
        m = self.model
        rows = np.asarray(rows, dtype=np.int64)
        tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(rows) == 0 or len(rows) != len(tok):
            raise KvtraceError(f"step() got {len(tok)} tokens for {len(rows)} rows")
        if not self.busy[rows].all() or (self.lengths[rows] == 0).any():
            raise KvtraceError("step() of a slot that is free or not prefilled")
        m._check_ids(tok, "step token")
        if int(self.lengths[rows].max()) >= self.max_seq:
            raise KvtraceError(f"sequence of {int(self.lengths[rows].max()) + 1} tokens is longer than the "
                               f"cache ({self.max_seq} positions)")
        lo, hi = int(rows.min()), int(rows.max()) + 1
        n = hi - lo
        ids = np.full((n, 1), self.pad, dtype=np.int64)  # (n, 1): rows not stepped get the pad token...
        pos = np.zeros((n, 1), dtype=np.int64)  # (n, 1): ... at position 0 of their own (free) row
        ids[rows - lo, 0] = tok
        pos[rows - lo, 0] = self.lengths[rows]
        be = m.backend
        self._bind_rows(lo, hi)
        out = self._logits.get(n)
        if out is None:
            out = self._logits[n] = be.alloc((n, 1, self.vocab_size), "float32")  # (n, 1, V)
        be.bind_output(io_spec.LOGITS, out)
        feeds = {io_spec.INPUT_IDS: ids, io_spec.POSITION_IDS: pos}
        if m.has_logits_index:
            feeds[io_spec.LOGITS_INDEX] = np.zeros((n, 1), dtype=np.int64)  # the one new token
        be.run(feeds)
        self.lengths[rows] += 1
        return np.array(be.to_host(out)[rows - lo, 0, :])  # (len(rows), V) copy: the buffer is reused

    def cache_rows(self) -> list:
        """The full (B, n_kv, S, hd) cache buffers (for tests): [(past name, buffer)]."""
        return list(zip([p for p, _ in self.model.cache_pairs], self._caches))

    def close(self) -> None:
        self._views.clear()
        self._logits.clear()
        self._caches = []
        self._bound = None


class SerialSlots:
    """One slot through Model.start/step: requests run one at a time (dynamic caches, or a backend
    that cannot bind part of a buffer)."""

    mode = "serial"

    def __init__(self, model):
        self.model = model
        self.capacity = 1
        self.max_seq = model.max_seq
        self.vocab_size = model.config.vocab_size
        self.busy = np.zeros(1, dtype=bool)
        self.lengths = np.zeros(1, dtype=np.int64)

    def acquire(self) -> int | None:
        if self.busy[0]:
            return None
        self.busy[0] = True
        self.lengths[0] = 0
        return 0

    def release(self, b: int) -> None:
        self.busy[0] = False
        self.lengths[0] = 0

    @property
    def n_busy(self) -> int:
        return int(self.busy[0])

    def prefill(self, b: int, prompt: Sequence[int]) -> np.ndarray:
        out = np.asarray(self.model.start([list(prompt)], logits="last"))[0, 0]  # (V,)
        self.lengths[0] = len(prompt)
        return np.array(out)

    def step(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        if list(rows) != [0]:
            raise KvtraceError(f"SerialSlots.step: rows {list(rows)}, expected [0]")
        out = self.model.step([int(tokens[0])])  # (1, V)
        self.lengths[0] += 1
        return out

    def close(self) -> None:
        pass
