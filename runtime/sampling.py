"""Next-token choice from logits, in numpy. No torch.

Order per step (the order transformers' generate applies its processors in):
  non-finite guard -> repetition penalty -> greedy argmax, or top-k -> temperature -> top-p -> draw
  (top-k before the temperature keeps the same k entries as after it, for any temperature > 0).
Repetition penalty follows transformers: for every token id already in the row (prompt and
generated), a positive logit is divided by the penalty and a negative one multiplied by it.

Numerics (docs/sampling.md): the sampler works on a float64 copy, subtracts each row's maximum
*before* dividing by the temperature, so every exponent is <= 0 and the row's maximum gets
exp(0) = 1: no temperature > 0 can overflow or produce NaN; a tiny temperature gives exactly the
limit (all mass on the row's maximum, shared equally by exact ties). The repetition penalty is
limited to [1e-6, 1e6], where float32 logits times the penalty stay finite in float64.

Non-finite guard (check_finite): a row about to be sampled that holds NaN or +-Inf raises
NonFiniteLogits naming the step and row, before any token of that step is chosen. Cost,
measured with benchmarks/integrity_cost.py: np.isfinite over the (B, V) rows, ~15 us at B = 1
and ~70 us at B = 8 for a 50k vocabulary (a decode step of a 160M model takes 12-25 ms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvtrace.errors import NonFiniteLogits
from kvtrace.options import check_int, check_number

REPETITION_PENALTY_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0  # > 0 and finite when sampling; any such value is exact (see above)
    top_k: int | None = None  # keep the k largest logits (None or 0: all)
    top_p: float | None = None  # keep the smallest set whose probability mass reaches top_p
    repetition_penalty: float | None = None  # in REPETITION_PENALTY_RANGE; 1.0 or None: off

    def __post_init__(self):
        if not self.greedy:
            check_number("temperature", self.temperature, 0.0, lo_open=True)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 0, None)
        if self.top_p is not None:
            check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.repetition_penalty is not None:
            check_number("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)

    @classmethod
    def make(cls, *, greedy=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None):
        """Greedy unless sampling is asked for: `greedy=False`, or a temperature / top_k / top_p
        given without `greedy=True`. Temperature 0 means greedy."""
        if temperature is not None:
            temperature = check_number("temperature", temperature, 0.0)
        if greedy is None:
            greedy = temperature is None and top_k is None and top_p is None
        if temperature is not None and temperature == 0:
            greedy = True
        return cls(greedy=bool(greedy), temperature=1.0 if temperature is None else float(temperature),
                   top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)


def check_finite(logits: np.ndarray, *, step: int | None = None, rows: np.ndarray | None = None) -> None:
    """Raise NonFiniteLogits when a row of `logits` (B, V) that is about to be sampled (`rows`, a
    (B,) bool mask; None: all) holds NaN or +-Inf. The message names the step and the row."""
    if rows is not None:
        rows = np.asarray(rows, dtype=bool)
        if rows.all():
            rows = None
    x = logits if rows is None else logits[rows]  # (B_live, V); a copy only once some rows finished
    if np.isfinite(x).all():
        return
    live = np.arange(len(logits)) if rows is None else np.flatnonzero(rows)
    b = int(live[int(np.flatnonzero(~np.isfinite(x).all(axis=-1))[0])])
    row = np.asarray(logits[b])
    n_nan, n_inf = int(np.isnan(row).sum()), int(np.isinf(row).sum())
    where = (f"step {step}, " if step is not None else "") + f"row {b}"
    raise NonFiniteLogits(
        f"{where}: the model produced non-finite logits ({n_nan} NaN, {n_inf} Inf of {row.shape[-1]}); "
        "no token was chosen from them. The artifact's weights or numerics are broken (an fp16 overflow, a "
        "corrupted or NaN weight): check it with `kvtrace parity`", step=step, row=b)


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[np.ndarray], penalty: float) -> np.ndarray:
    """logits (B, V) float64 (finite float32 values), modified in place; seen[b]: token ids of
    row b (any order, repeats ok). |logit| * penalty <= 3.4e38 * 1e6 stays finite in float64."""
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


def _tempered_softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(x / T) of float64 rows (B, V), computed as exp((x - max) / T): exponents <= 0 (or
    -inf), the maximum's is exactly 0, so the sum is >= 1 and nothing overflows for any T > 0."""
    z = x - np.max(x, axis=-1, keepdims=True)  # (B, V) <= 0
    with np.errstate(over="ignore", under="ignore"):
        z /= temperature  # an overflow here is a -inf exponent: probability 0, as in the limit
        e = np.exp(z)
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
    (zero outside top-k / the top-p nucleus). Penalty, temperature, top-k, top-p in that order
    (top-k is taken before dividing by the temperature: the same k entries for any T > 0)."""
    x = np.array(logits, dtype=np.float64, copy=True)  # (B, V) float64 working copy
    if params.repetition_penalty not in (None, 1.0) and seen is not None:
        apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.top_k:
        _top_k_mask(x, int(params.top_k))
    probs = _tempered_softmax(x, float(params.temperature))  # (B, V) float64
    if params.top_p is not None and params.top_p < 1.0:
        probs = np.stack([_top_p_row(row, params.top_p) for row in probs])
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def next_tokens(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None,
                seen: Sequence[np.ndarray] | None = None, *, step: int | None = None,
                rows: np.ndarray | None = None) -> np.ndarray:
    """logits (B, V) float32 (not modified) -> next token ids (B,) int64.

    seen[b]: token ids of row b so far (prompt and generated), for the repetition penalty.
    rows: (B,) bool, the rows whose tokens will be used (None: all); a non-finite value in one of
    them raises NonFiniteLogits (naming `step` and the row) before anything is chosen. Rows
    outside `rows` (finished ones, stepping on padding) are not checked and their ids are junk.
    """
    check_finite(logits, step=step, rows=rows)
    if rows is not None and not np.all(rows):  # finished rows may hold anything: sample from zeros
        logits = np.where(np.asarray(rows, dtype=bool)[:, None], logits, np.float32(0))
    if params.greedy:
        x = logits
        if params.repetition_penalty not in (None, 1.0) and seen is not None:
            x = apply_repetition_penalty(np.array(logits, dtype=np.float64, copy=True), seen,
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
