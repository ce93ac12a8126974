"""Next-token choice from logits, in numpy. No torch.

Order per step (the order transformers' generate applies its processors in):
  repetition penalty -> greedy argmax, or temperature -> top-k -> top-p -> draw.
Repetition penalty follows transformers: for every token id already in the row (prompt and
generated), a positive logit is divided by the penalty and a negative one multiplied by it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvtrace.errors import KvtraceError


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None  # keep the k largest logits (None or 0: all)
    top_p: float | None = None  # keep the smallest set whose probability mass reaches top_p
    repetition_penalty: float | None = None  # > 0; 1.0 or None: off

    def __post_init__(self):
        if not self.greedy and not (self.temperature > 0):
            raise KvtraceError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise KvtraceError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise KvtraceError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not (self.repetition_penalty > 0):
            raise KvtraceError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def make(cls, *, greedy=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None):
        """Greedy unless sampling is asked for: `greedy=False`, or a temperature / top_k / top_p
        given without `greedy=True`. Temperature 0 means greedy."""
        if greedy is None:
            greedy = temperature is None and top_k is None and top_p is None
        if temperature is not None and temperature == 0:
            greedy = True
        return cls(greedy=bool(greedy), temperature=1.0 if temperature is None else float(temperature),
                   top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[np.ndarray], penalty: float) -> np.ndarray:
    """logits (B, V) float32, modified in place; seen[b]: token ids of row b (any order, repeats ok)."""
    for b, ids in enumerate(seen):
        if len(ids) == 0:
            continue
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        x = logits[b, ids]
        logits[b, ids] = np.where(x > 0, x / penalty, x * penalty)
    return logits


def _top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Set everything below each row's k-th largest logit to -inf (ties at the threshold kept)."""
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return logits
    kth = np.partition(logits, V - k, axis=-1)[:, V - k : V - k + 1]  # (B, 1) k-th largest
    logits[logits < kth] = -np.inf
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def _top_p_row(probs: np.ndarray, p: float) -> np.ndarray:
    """probs (V,) -> probs with everything outside the nucleus zeroed (not renormalised).

    Only the head of the distribution matters, so sort a partition of the largest few first
    (a full argsort of a 50k vocabulary costs milliseconds per step) and fall back to a full
    sort when their mass does not reach p.
    """
    V = probs.shape[0]
    order = None
    if V > 1024:
        cand = np.argpartition(probs, V - 256)[V - 256 :]  # the 256 largest, unordered
        if probs[cand].sum() >= p:
            order = cand[np.argsort(-probs[cand], kind="stable")]
    if order is None:  # a flat distribution: sort everything
        order = np.argsort(-probs)
    csum = np.cumsum(probs[order])
    # keep tokens up to and including the one where the mass first reaches p
    n_keep = min(int(np.searchsorted(csum, p, side="left")) + 1, len(order))
    out = np.zeros_like(probs)
    keep = order[:n_keep]
    out[keep] = probs[keep]
    return out


def probabilities(logits: np.ndarray, params: SamplingParams, seen: Sequence[np.ndarray] | None = None
                  ) -> np.ndarray:
    """The sampling distribution: logits (B, V) -> probabilities (B, V) float64, rows sum to 1
    (zero outside top-k / the top-p nucleus). Penalty, temperature, top-k, top-p in that order."""
    x = np.array(logits, dtype=np.float32, copy=True)  # (B, V) working copy
    if params.repetition_penalty not in (None, 1.0) and seen is not None:
        apply_repetition_penalty(x, seen, params.repetition_penalty)
    x /= np.float32(params.temperature)
    if params.top_k:
        _top_k_mask(x, int(params.top_k))
    probs = _softmax(x.astype(np.float64))  # (B, V) float64: cumulative sums stay exact enough
    if params.top_p is not None and params.top_p < 1.0:
        probs = np.stack([_top_p_row(row, params.top_p) for row in probs])
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def next_tokens(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None,
                seen: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """logits (B, V) float32 (not modified) -> next token ids (B,) int64.

    seen[b]: token ids of row b so far (prompt and generated), for the repetition penalty.
    """
    if params.greedy:
        x = logits
        if params.repetition_penalty not in (None, 1.0) and seen is not None:
            x = apply_repetition_penalty(np.array(logits, dtype=np.float32, copy=True), seen,
                                         params.repetition_penalty)
        return np.argmax(x, axis=-1).astype(np.int64)
    if rng is None:
        rng = np.random.default_rng()
    probs = probabilities(logits, params, seen)  # (B, V)
    u = rng.random(len(probs))  # one uniform per row: the draw is reproducible for a seed
    out = np.empty(len(probs), dtype=np.int64)
    for b, row in enumerate(probs):
        c = np.cumsum(row)
        # the first index whose cumulative mass exceeds u: never a zero-probability entry
        out[b] = min(int(np.searchsorted(c, u[b] * c[-1], side="right")), len(row) - 1)
        if row[out[b]] == 0:  # only reachable through rounding at the very end of the row
            out[b] = int(np.argmax(row))
    return out
