"""The one parity harness: an artifact's logits against a reference's, step by step. No torch.

Used by `kvtrace export` (validation), `kvtrace parity` (against our torch model, transformers,
or a golden file) and the tests; a golden file (kvtrace.runtime.golden) is a recorded `Trace`.

Two halves, run one after the other so the reference's memory can be freed before the
artifact loads:
  record(reference, prompts, steps) -> Trace
      the reference runs a ragged batch of prompts (each row alone: no padding on its side),
      then `steps` decode steps, each feeding every row the reference's own greedy token.
      A reference has start(prompts) -> [(T_b, V) per row] and step(tokens) -> (B, V).
  replay(artifact, trace) -> report dict
      the artifact (kvtrace.runtime.model.Model, or anything with the same start/step) runs the
      same prompts in one right-padded batch through its own cache path, then is fed the
      *trace's* tokens (teacher forcing), so a difference at step s never leaks into the inputs
      of step s + 1.

The reference's logits at each position are dense (every vocabulary entry) or sparse (a golden
file keeps the top k, a uniform sample of the rest, the log-sum-exp, the std and the mass
outside the top k: RefLogits); dense is the case k = V, and every metric has one definition
(`compare`, METRICS) that is exact when dense.
Verdict (configs.TOLERANCES[dtype]): finite logits; per position |Δ| <= max(max_abs tolerance,
max_rel tolerance x std of the reference's logits there); top1 >= the top-1 tolerance when top1
is not None. Per prompt row (row_verdicts): whether it contributes to a failure, from which step.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvtrace.errors import KvtraceError

REPORT_VERSION = 3
# A reference top-2 margin below this is a tie that rounding may break either way: fp16 keeps
# about 3 significant digits, so logits of ~10 differ by ~0.01 through rounding alone.
TIE_MARGIN = 1e-2


# --------------------------------------------------------------------------- prompts
def make_prompts(batch: int, longest: int, vocab_size: int, seed: int, avoid=(), ragged: bool = True
                 ) -> list[list[int]]:
    """`batch` prompts of different lengths (longest first, then shorter by ~1/(2·batch) steps;
    all `longest` long with ragged=False), token ids drawn uniformly from the vocabulary minus
    `avoid` (special tokens: XGLM and some tokenizers treat bos/pad specially, which is not what
    parity is about). The one prompt generator of kvtrace: export validation, parity, golden
    files and bench (ragged=False) use it."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.array([a for a in avoid if a is not None], dtype=np.int64))
    if allowed.size == 0:
        raise KvtraceError(f"no token ids to draw prompts from (vocabulary of {vocab_size}, all special)")
    step = max(1, longest // (2 * max(batch, 1))) if ragged else 0
    lengths = [max(1, longest - b * step) for b in range(batch)]
    return [rng.choice(allowed, size=n).astype(np.int64).tolist() for n in lengths]


# The metric definitions, as golden files and reports state them (compare() implements them).
METRICS = {
    "max_abs": "max |reference - artifact| logit over the compared positions and the stored vocabulary entries "
               "(all entries when dense; a golden's top-k plus its sampled entries when sparse); inf where the "
               "artifact's logits at a position are not all finite",
    "mean_abs": "mean |reference - artifact| over the same entries",
    "max_rel": "max over positions of that position's max |Δ| divided by the std of the reference's logits over "
               "the whole vocabulary at that position",
    "top1": f"fraction of decisive positions (reference top-2 margin >= {TIE_MARGIN:g}) where the artifact's "
            "argmax is the reference's argmax (or an entry of equal reference logit); None when none is decisive",
    "top1_strict": "the same over every position (reported, not judged)",
    "top10_overlap": "mean over positions of |reference top-10 ∩ artifact top-10| / 10 (reported, not judged)",
    "kl": "KL(reference || artifact), float64: exact over the reference's top-k entries plus the remaining "
          "vocabulary as one outcome, P_tail·log(P_tail/Q_tail); a lower bound of the full KL, short by at most "
          "P_tail x (range of reference - artifact over the tail entries); exact when dense (P_tail = 0)",
    "verdict": "per position |Δ| <= max(max_abs tolerance, max_rel tolerance x std), all finite, and "
               "top1 >= the top-1 tolerance",
}

# --------------------------------------------------------------------------- metrics
OVERLAP_K = 10  # top-k overlap is over the reference's and the artifact's 10 largest logits


@dataclass
class RefLogits:
    """The reference's logits at N positions, as every comparison sees them: dense (all V entries)
    or sparse (a golden file's top-k plus a sample of the rest). Dense is the case n_top = V.

    indices (N, K) int64: the vocabulary entries stored per position. [:, :n_top] are the
             reference's n_top largest logits, the first min(n_top, OVERLAP_K) of them in
             descending order (ties: lowest id first, so [:, 0] is numpy's argmax);
             [:, n_top:] a uniform random sample of the remaining V - n_top entries.
    values  (N, K) float: the reference's logits at `indices`
    lse     (N,) float64: log-sum-exp of the reference's logits over the whole vocabulary
    std     (N,) float64: standard deviation of the reference's logits over the whole vocabulary
    tail    (N,) float64: the reference's probability mass outside the top n_top (0 when dense)
    """
    indices: np.ndarray
    values: np.ndarray
    n_top: int
    vocab: int
    lse: np.ndarray
    std: np.ndarray
    tail: np.ndarray

    @property
    def positions(self) -> int:
        return int(self.indices.shape[0])

    @property
    def dense(self) -> bool:
        return self.n_top == self.vocab

    @classmethod
    def from_dense(cls, logits, top: int | None = None, sample: int = 0, seed: int = 0) -> "RefLogits":
        """From full reference logits (N, V). top=None keeps every entry (exact metrics); else the
        `top` largest plus `sample` entries drawn uniformly from the rest, per position."""
        x = np.asarray(logits)
        if x.ndim != 2:
            raise KvtraceError(f"reference logits must be (positions, vocab), got shape {x.shape}")
        N, V = x.shape
        x64 = x.astype(np.float64)
        lse = _logsumexp(x64)  # (N,)
        k = V if top is None else max(1, min(int(top), V))
        head = min(OVERLAP_K, k)
        if k < V:  # the k largest, unordered
            idx = np.argpartition(-x64, k - 1, axis=-1)[:, :k]
        else:  # every entry, the `head` largest first
            idx = np.argpartition(-x64, head - 1, axis=-1) if head < V else np.tile(np.arange(V), (N, 1))
        # order the stored top entries (all k when sparse, the first `head` when dense) by
        # descending value, lowest id first among equal values (numpy argmax's choice)
        n_sort = k if k < V else head
        lead = idx[:, :n_sort]
        order = np.lexsort((lead, -np.take_along_axis(x64, lead, -1)), axis=-1)
        idx[:, :n_sort] = np.take_along_axis(lead, order, -1)
        tail = np.zeros(N)
        if k < V:
            masked = x64.copy()
            np.put_along_axis(masked, idx, -np.inf, axis=-1)
            tail = np.exp(_logsumexp(masked) - lse)  # (N,) mass outside the top k
            m = max(0, min(int(sample), V - k))
            if m:
                rng = np.random.default_rng(seed)
                rest = np.empty((N, m), dtype=np.int64)
                for n in range(N):
                    free = np.ones(V, bool)
                    free[idx[n]] = False
                    rest[n] = rng.choice(np.flatnonzero(free), size=m, replace=False)
                idx = np.concatenate([idx, rest], axis=-1)
        return cls(indices=idx.astype(np.int64), values=np.take_along_axis(x, idx, -1), n_top=k, vocab=V,
                   lse=lse, std=x64.std(axis=-1), tail=tail)

    def __getitem__(self, rows) -> "RefLogits":
        """Positions `rows` (a slice or an index array)."""
        return RefLogits(self.indices[rows], self.values[rows], self.n_top, self.vocab, self.lse[rows],
                         self.std[rows], self.tail[rows])

    @staticmethod
    def concat(parts: list["RefLogits"]) -> "RefLogits":
        a = parts[0]
        if any(p.n_top != a.n_top or p.vocab != a.vocab or p.indices.shape[1] != a.indices.shape[1] for p in parts):
            raise KvtraceError("cannot join reference logits stored with different top-k / vocabulary")
        return RefLogits(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("indices", "values")),
                         a.n_top, a.vocab, *(np.concatenate([getattr(p, f) for p in parts])
                                              for f in ("lse", "std", "tail")))

    def argmax(self, axis: int = -1) -> np.ndarray:
        """(N,) the reference's argmax per position (the same call as on a dense (N, V) array)."""
        return self.indices[:, 0]


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log-sum-exp over the last axis, float64; -inf entries allowed (all -inf -> -inf)."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - m).sum(axis=-1, keepdims=True)) + m)[..., 0]


def log_softmax64(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x - _logsumexp(x)[..., None]


def compare(ref, got) -> dict:
    """Metrics of the artifact's logits `got` (N, V) against the reference's at the same N
    positions: `ref` dense (N, V) or a RefLogits (a golden file's sparse top-k). One definition,
    dense being the case where every entry is stored:

      max_abs    max |ref - got| over the stored entries (every entry when dense); a position whose
                 artifact logits are not all finite counts as inf
      mean_abs   mean |ref - got| over the stored entries
      max_rel    max over positions of (that position's max |Δ|) / std of the reference's logits
      top1       argmax agreement at the decisive positions (reference top-2 margin >= TIE_MARGIN):
                 the artifact's argmax is the reference's [0] entry (or a stored entry of equal value)
      top10_overlap  mean over positions of |ref top-10 ∩ artifact top-10| / 10
      KL         KL(reference || artifact) in float64: exact over the reference's top n_top
                 entries, plus the rest grouped into one outcome, P_tail·log(P_tail / Q_tail)
                 (P: reference mass outside the top n_top, stored; Q: the artifact's, computed
                 over its full logits). By the log-sum inequality this is a lower bound of the
                 full KL, short by P_tail·KL(p_tail/P_tail || q_tail/Q_tail) <= P_tail·(range of
                 ref - got over the tail entries); exact (tail 0) when dense.

    Non-finite artifact logits make max/mean/KL non-finite, which fails every tolerance."""
    if not isinstance(ref, RefLogits):
        ref = RefLogits.from_dense(ref)
    got = np.asarray(got, dtype=np.float64)
    if got.shape != (ref.positions, ref.vocab):
        raise KvtraceError(f"logits shapes differ: reference ({ref.positions}, {ref.vocab}), artifact {got.shape}")
    N = ref.positions
    pos_finite = np.isfinite(got).all(axis=-1)  # (N,)
    finite = bool(pos_finite.all())
    vals = ref.values.astype(np.float64)  # (N, K)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        g = np.take_along_axis(got, ref.indices, -1)  # (N, K) the artifact at the stored entries
        diff = np.abs(vals - g)
        pos_max = np.where(pos_finite, np.nan_to_num(diff, nan=np.inf).max(axis=-1), np.inf)  # (N,)
        scale = ref.std  # (N,) spread of the reference logits at each position
        rel = pos_max / np.maximum(scale, 1e-30)
        lse_g = _logsumexp(got)  # (N,)
        top = slice(0, ref.n_top)
        lp = vals[:, top] - ref.lse[:, None]  # (N, n_top) log p
        lq = g[:, top] - lse_g[:, None]  # (N, n_top) log q
        kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # (N,)
        if not ref.dense:
            masked = got.copy()
            np.put_along_axis(masked, ref.indices[:, top], -np.inf, axis=-1)
            log_q_tail = _logsumexp(masked) - lse_g  # (N,)
            p_tail = ref.tail
            kl = kl + np.where(p_tail > 0, p_tail * (np.log(np.where(p_tail > 0, p_tail, 1.0)) - log_q_tail), 0.0)
    art = got.argmax(axis=-1)  # (N,)
    hit = ref.indices == art[:, None]  # (N, K)
    at_art = np.where(hit.any(-1), np.where(hit, vals, -np.inf).max(-1), -np.inf)  # ref logit at the artifact's pick
    same = at_art >= vals[:, 0]  # (N,)
    decisive = (vals[:, 0] - vals[:, 1]) >= TIE_MARGIN if vals.shape[1] > 1 and ref.n_top > 1 else np.zeros(N, bool)
    ko = min(OVERLAP_K, ref.n_top)
    art_top = np.argpartition(-np.nan_to_num(got, nan=-np.inf), ko - 1, axis=-1)[:, :ko] if ko < ref.vocab \
        else np.tile(np.arange(ref.vocab), (N, 1))
    overlap = (ref.indices[:, :ko, None] == art_top[:, None, :]).any(-1).sum(-1) / ko  # (N,)
    return {
        "positions": N,
        "max_abs": float(pos_max.max()) if finite else math.inf,
        "mean_abs": float(diff.mean()) if finite else math.inf,
        "max_rel": float(rel.max()) if finite else math.inf,
        "decisive": int(decisive.sum()),
        "top1_agree": int(same[decisive].sum()),
        "top1": float(same[decisive].mean()) if decisive.any() else None,
        "top1_strict": float(same.mean()),
        "top10_overlap": float(overlap.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "tail_mass": float(ref.tail.max()),
        "finite": finite,
        # per-position figures, for the verdict's per-position bound and the per-row verdicts
        # (dropped from reports)
        "_pos_max": pos_max, "_scale": scale, "_finite": pos_finite, "_decisive": decisive, "_same": same,
        "_art": art, "_ref": ref.indices[:, 0].copy(),
    }


def within(step: dict, tol: dict) -> bool:
    """Per position: |Δ| <= max(max_abs, max_rel x std of the reference's logits there)."""
    bound = np.maximum(tol["max_abs"], tol.get("max_rel", 0.0) * step["_scale"])
    return bool(step["finite"] and (step["_pos_max"] <= bound).all())


def summarize(per_step: list[dict]) -> dict:
    n = sum(st["positions"] for st in per_step)
    decisive = sum(st["decisive"] for st in per_step)
    finite = all(st["finite"] for st in per_step)
    return {
        "positions": n,
        "max_abs": max(st["max_abs"] for st in per_step) if finite else math.inf,
        "mean_abs": sum(st["mean_abs"] * st["positions"] for st in per_step) / n,
        "max_rel": max(st["max_rel"] for st in per_step) if finite else math.inf,
        "decisive": decisive,
        "top1": sum(st["top1_agree"] for st in per_step) / decisive if decisive else None,
        "top1_strict": sum(st["top1_strict"] * st["positions"] for st in per_step) / n,
        "top10_overlap": sum(st["top10_overlap"] * st["positions"] for st in per_step) / n,
        "kl_mean": sum(st["kl_mean"] * st["positions"] for st in per_step) / n,
        "kl_max": max(st["kl_max"] for st in per_step),
        "tail_mass": max(st["tail_mass"] for st in per_step),
        "finite": finite,
    }


def verdict(summary: dict, per_step: list[dict], tol: dict) -> tuple[list[str], list[str]]:
    """(failures, notes) against a tolerance row {"max_abs", "max_rel", "top1"}; no failures = pass."""
    fails, notes = [], []
    if not summary["finite"]:
        fails.append("the artifact produced non-finite logits")
    elif not all(within(st, tol) for st in per_step):
        fails.append(f"max |Δlogit| {summary['max_abs']:.3g} > {tol['max_abs']:g} and beyond "
                     f"{tol.get('max_rel', 0):g} x the logits' std at some position (max relative {summary['max_rel']:.3g})")
    if summary["top1"] is None:
        notes.append("no position has a decisive reference top-1 (every top-2 margin < "
                     f"{TIE_MARGIN:g}): judged on the logit tolerances alone")
    elif not (summary["top1"] >= tol["top1"]):
        fails.append(f"top-1 agreement {summary['top1']:.4f} < {tol['top1']:g} over {summary['decisive']} "
                     "decisive positions")
    return fails, notes


# --------------------------------------------------------------------------- record / replay
@dataclass
class Trace:
    """A reference run: prompts, the token fed at each decode step (the reference's greedy
    choice), and the reference's logits: prefill[b] (T_b, V), decode[s] (B, V), each a float32
    array (record) or a RefLogits of as many positions (a golden file, kvtrace.runtime.golden)."""
    prompts: list[list[int]]
    tokens: list[list[int]] = field(default_factory=list)  # tokens[s][b], s = 0..steps-1
    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.tokens)


def record(reference, prompts: list[list[int]], steps: int) -> Trace:
    """Run the reference: prefill, then `steps` decode steps on its own greedy tokens."""
    t0 = time.perf_counter()
    pre = [np.asarray(r, dtype=np.float32) for r in reference.start(prompts)]
    trace = Trace(prompts=[list(p) for p in prompts], prefill=pre)
    _reference_finite([r[:len(p)] for r, p in zip(pre, prompts)], reference, "the prefill")
    last = np.stack([r[len(p) - 1] for r, p in zip(pre, prompts)])  # (B, V)
    for s in range(steps):
        tok = [int(t) for t in last.argmax(-1)]
        last = np.asarray(reference.step(tok), dtype=np.float32)  # (B, V)
        _reference_finite([last], reference, f"decode step {s + 1}")
        trace.tokens.append(tok)
        trace.decode.append(last)
    trace.seconds = time.perf_counter() - t0
    return trace


def _shape(x) -> tuple:
    return (x.positions, x.vocab) if isinstance(x, RefLogits) else tuple(np.shape(x))


def _concat(parts: list):
    return RefLogits.concat(parts) if isinstance(parts[0], RefLogits) else np.concatenate(parts)
def _reference_finite(rows, reference, where: str) -> None:
    """A reference with NaN/Inf logits cannot judge anything: say so instead of blaming the artifact."""
    if all(np.isfinite(r).all() for r in rows):
        return
    desc = getattr(reference, "description", None) or {}
    what = desc.get("path") or desc.get("kind") or "the reference"
    raise KvtraceError(f"the reference model ({what}) produced non-finite logits in {where}: its weights hold "
                       "NaN/Inf or its activations overflow, so it cannot judge the artifact")


def replay(artifact, trace: Trace) -> dict:
    """The artifact on the trace's prompts and tokens -> per-step metrics, greedy rows, summary."""
    prompts = trace.prompts
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    t0 = time.perf_counter()
    got = np.asarray(artifact.start(prompts))  # (B, T_max, V)
    if got.ndim != 3 or got.shape[0] != B or got.shape[1] < max(lengths):
        raise KvtraceError(f"artifact prefill returned logits of shape {got.shape}, expected "
                           f"({B}, >= {max(lengths)}, V)")
    ref_rows = _concat([r[:n] for r, n in zip(trace.prefill, lengths)])  # sum T_b positions
    got_rows = np.concatenate([got[b, :n] for b, n in enumerate(lengths)])  # (sum T_b, V)
    # which row and which sequence position each compared position is (for per-row verdicts)
    per_step = [{"step": 0, "kind": "prefill", **compare(ref_rows, got_rows),
                 "_row": np.repeat(np.arange(B), lengths), "_at": np.concatenate([np.arange(n) for n in lengths])}]
    art_greedy = [[int(got[b, n - 1].argmax())] for b, n in enumerate(lengths)]
    ref_greedy = [[int(trace.prefill[b][n - 1:n].argmax(-1)[0])] for b, n in enumerate(lengths)]
    for s, (tok, want) in enumerate(zip(trace.tokens, trace.decode), start=1):
        a = np.asarray(artifact.step(tok))  # (B, V)
        if a.shape != _shape(want):
            raise KvtraceError(f"artifact decode step {s} returned logits of shape {a.shape}, expected {_shape(want)}")
        per_step.append({"step": s, "kind": "decode", **compare(want, a), "_row": np.arange(B),
                         "_at": np.asarray(lengths) + s - 1})
        want_top = want.argmax(-1)
        for b in range(B):
            art_greedy[b].append(int(a[b].argmax()))
            ref_greedy[b].append(int(want_top[b]))
    seconds = time.perf_counter() - t0
    rows = []
    for b in range(B):
        diverge = next((i for i, (x, y) in enumerate(zip(ref_greedy[b], art_greedy[b])) if x != y), None)
        rows.append({"prompt_len": lengths[b], "match": diverge is None, "first_divergence": diverge,
                     "reference": ref_greedy[b], "artifact": art_greedy[b]})
    summary = summarize(per_step)
    summary["greedy_match"] = all(r["match"] for r in rows)
    return {"per_step": per_step, "summary": summary, "greedy": rows,
            "seconds": {"reference": round(trace.seconds, 3), "artifact": round(seconds, 3)}}


def row_verdicts(result: dict, tol: dict) -> list[dict]:
    """Per prompt row (the JUnit test cases): its max |Δ| and relative figure per step, and, when
    the overall verdict fails, whether this row contributes and from which step. A row fails
    where one of its positions has non-finite logits or lies beyond the per-position bound, or,
    when top-1 agreement failed overall, where its top-1 differs at a decisive position; so the
    rows all pass exactly when the verdict passes."""
    summary, per_step = result["summary"], result["per_step"]
    top1_failed = summary["top1"] is not None and not (summary["top1"] >= tol["top1"])
    B = len(result["greedy"])
    rows = [{"row": b, "prompt_len": result["greedy"][b]["prompt_len"], "passed": True, "max_abs": [],
             "max_rel": [], "failed_steps": [], "first_failure": None} for b in range(B)]
    for st in per_step:
        bound = np.maximum(tol["max_abs"], tol.get("max_rel", 0.0) * st["_scale"])  # (N,)
        ratio = st["_pos_max"] / bound
        beyond = ~st["_finite"] | (st["_pos_max"] > bound)
        flipped = st["_decisive"] & ~st["_same"] if top1_failed else np.zeros_like(beyond)
        for b, row in enumerate(rows):
            mine = np.flatnonzero(st["_row"] == b)
            if mine.size == 0:
                continue
            row["max_abs"].append(float(st["_pos_max"][mine].max()))
            row["max_rel"].append(float((st["_pos_max"][mine] / np.maximum(st["_scale"][mine], 1e-30)).max()))
            bad = mine[beyond[mine]]
            flips = mine[flipped[mine]]
            if bad.size == 0 and flips.size == 0:
                continue
            row["passed"] = False
            row["failed_steps"].append(st["step"])
            if row["first_failure"] is not None:
                continue
            i = bad[np.argmax(ratio[bad])] if bad.size else flips[0]
            reason = ("non-finite logits" if not st["_finite"][i] else
                      "|Δlogit| beyond tolerance" if bad.size else "top-1 differs")
            row["first_failure"] = {
                "step": st["step"], "kind": st["kind"], "position": int(st["_at"][i]), "reason": reason,
                "max_abs": float(st["_pos_max"][i]), "bound": float(bound[i]), "std": float(st["_scale"][i]),
                "max_rel": float(st["_pos_max"][i] / max(float(st["_scale"][i]), 1e-30)),
                "reference_top1": int(st["_ref"][i]), "artifact_top1": int(st["_art"][i]),
                "decisive": bool(st["_decisive"][i]),
            }
    return rows


def describe_failure(f: dict) -> str:
    """One line for a row's first failure (JUnit message, table, summary)."""
    where = "prefill" if f["kind"] == "prefill" else f"decode step {f['step']}"
    head = f"{where}, position {f['position']}: {f['reason']}"
    if f["reason"] == "top-1 differs":
        return f"{head} (reference {f['reference_top1']}, artifact {f['artifact_top1']}; max |Δlogit| {f['max_abs']:.3g})"
    return (f"{head}: max |Δlogit| {_fmt(f['max_abs'], '.3g')} > bound {f['bound']:.3g} (relative "
            f"{_fmt(f['max_rel'], '.3g')}, std of the reference's logits {f['std']:.3g})")


def judge(result: dict, tol: dict) -> dict:
    """Add the verdict to a replay result (passed, failures, notes, tolerance, per-row verdicts)
    and drop the per-position arrays (not JSON)."""
    fails, notes = verdict(result["summary"], result["per_step"], tol)
    rows = row_verdicts(result, tol)
    for st in result["per_step"]:
        for k in [k for k in st if k.startswith("_")]:
            del st[k]
    return {**result, "rows": rows, "tolerance": dict(tol), "passed": not fails, "failures": fails, "notes": notes}


def make_report(manifest: dict, *, artifact, backend: str, against: str, reference: dict, prompts, steps: int,
                seed, result: dict) -> dict:
    """The report of `kvtrace parity` (JSON, table, JUnit, summary): what was compared, then the
    judged result. manifest: the artifact's manifest dict."""
    io_ = manifest.get("io") or {}
    return {
        "report_version": REPORT_VERSION,
        "artifact": str(artifact),
        "architecture": manifest.get("architecture"),
        "dtype": manifest.get("dtype"),
        "quant": _quant_name(manifest.get("quant")),
        "layout": io_.get("layout"),
        "backend": backend,
        "against": against,
        "reference": reference,
        "batch": len(prompts),
        "steps": steps,
        "seed": seed,
        "prompt_lengths": [len(p) for p in prompts],
        **result,
    }


# Quantised artifacts run onnxruntime's fused low-bit MatMul, whose accuracy level 4 (the default)
# rounds activations to int8 per block: an error as large as the weights' own on small models, which
# hides a damaged stored scale. At level 1 the same kernel computes in fp32, so the artifact must
# match the reference holding its quantised weights to fp32 rounding: the exact check.
EXACT_ACCURACY_LEVEL = 1


def wants_exact_check(manifest: dict, backend_name: str) -> bool:
    """Whether a replay of a quantised artifact gets the exact check too (onnxruntime backends)."""
    return bool(manifest.get("quant")) and str(backend_name).startswith("onnxruntime")


def add_exact_check(result: dict, exact: dict) -> dict:
    """Fold the judged level-1 replay `exact` into the judged `result`: reported, and failing it
    fails the whole verdict."""
    s = exact["summary"]
    result["exact_check"] = {"accuracy_level": EXACT_ACCURACY_LEVEL, "passed": exact["passed"],
                             "failures": exact["failures"], "tolerance": exact["tolerance"],
                             "max_abs": s["max_abs"], "max_rel": s["max_rel"], "top1": s["top1"],
                             "positions": s["positions"]}
    if not exact["passed"]:
        result["passed"] = False
        result["failures"] = list(result["failures"]) + [
            "exact check (onnxruntime accuracy level 1: fp32 arithmetic on the stored quantised weights): "
            + "; ".join(exact["failures"])]
    return result


def _quant_name(q) -> str | None:
    """'int4 g32 search' for a manifest's "quant" entry (None when unquantised)."""
    if not q:
        return None
    return f"{q.get('scheme')} g{q.get('group_size')} {q.get('method')} (accuracy level {q.get('accuracy_level')})"


def run(artifact, reference, prompts: list[list[int]], steps: int, tol: dict) -> dict:
    """record, then replay, then judge."""
    return judge(replay(artifact, record(reference, prompts, steps)), tol)


def one_line(report: dict) -> str:
    s = report["summary"]
    top1 = "n/a (no decisive position)" if s["top1"] is None else f"{100 * s['top1']:.2f}%"
    return (f"max |Δlogit| {_fmt(s['max_abs'], '.3g')} (relative {_fmt(s['max_rel'], '.3g')}), top-1 {top1} "
            f"(strict {100 * s['top1_strict']:.2f}%) over {s['positions']} positions, "
            f"{'all finite' if s['finite'] else 'NON-FINITE logits'}")


# --------------------------------------------------------------------------- output
def _fmt(x, spec: str = ".2e") -> str:
    if x is None:
        return "n/a"
    return format(x, spec) if math.isfinite(x) else str(x)


def _streamed(report: dict) -> bool:
    """Whether the reference was the layer-streamed one (its tokens after the prompts are a fixed
    continuation, not its own greedy choice)."""
    ref = report.get("reference")
    return isinstance(ref, dict) and bool(ref.get("streamed"))


def format_table(report: dict) -> str:
    tol, s = report["tolerance"], report["summary"]
    fed = "a fixed continuation token" if _streamed(report) else "the reference's greedy token"
    lines = [
        f"kvtrace parity  {report['artifact']}",
        f"  artifact : {report['architecture']} {report['dtype']}"
        f"{', weights ' + report['quant'] if report.get('quant') else ''} {report['layout']} cache, "
        f"backend {report['backend']}",
        f"  reference: {report['against']} ({describe_reference(report['reference'])})",
        f"  prompts  : {report['batch']} rows, lengths {', '.join(map(str, report['prompt_lengths']))} "
        f"(seed {report['seed']}); {report['steps']} decode steps, each fed {fed}",
        f"  tolerance: |Δlogit| <= max({tol['max_abs']:g}, {tol.get('max_rel', 0):g} x std of the reference's "
        f"logits) per position, top-1 >= {tol['top1']:g} over decisive positions (configs.TOLERANCES"
        f"{'[' + repr(report['tolerance_row']) + ']' if report.get('tolerance_row') else ''})",
        "",
        f"  {'step':>7}  {'pos':>4}  {'max|Δlogit|':>11}  {'max rel':>9}  {'mean|Δlogit|':>12}  {'top-1':>6}  "
        f"{'top-10':>6}  {'KL mean':>9}  {'KL max':>9}",
    ]
    for st in report["per_step"]:
        name = "prefill" if st["kind"] == "prefill" else str(st["step"])
        t1 = "n/a" if st["top1"] is None else f"{st['top1']:.3f}"
        lines.append(f"  {name:>7}  {st['positions']:>4}  {_fmt(st['max_abs']):>11}  {_fmt(st['max_rel']):>9}  "
                     f"{_fmt(st['mean_abs']):>12}  {t1:>6}  {st['top10_overlap']:>6.3f}  {_fmt(st['kl_mean']):>9}  "
                     f"{_fmt(st['kl_max']):>9}")
    t1 = "n/a" if s["top1"] is None else f"{s['top1']:.3f}"
    lines.append(f"  {'all':>7}  {s['positions']:>4}  {_fmt(s['max_abs']):>11}  {_fmt(s['max_rel']):>9}  "
                 f"{_fmt(s['mean_abs']):>12}  {t1:>6}  {s['top10_overlap']:>6.3f}  {_fmt(s['kl_mean']):>9}  "
                 f"{_fmt(s['kl_max']):>9}")
    if s.get("tail_mass", 0) > 0:
        lines.append(f"  (sparse reference: KL is exact over the stored top entries plus the rest as one outcome, "
                     f"a lower bound; reference mass outside them <= {s['tail_mass']:.3g})")
    lines.append("")
    rows = report.get("rows") or [{} for _ in report["greedy"]]
    for b, (row, g) in enumerate(zip(rows, report["greedy"])):
        state = "match" if g["match"] else f"differ from token {g['first_divergence']}"
        verdict_ = "" if row.get("passed", True) else f"; FAILS from {describe_failure(row['first_failure'])}"
        lines.append(f"  row {b} (prompt {g['prompt_len']}): greedy {len(g['reference'])} tokens {state}{verdict_}")
    ex = report.get("exact_check")
    if ex:
        t = ex["tolerance"]
        lines.append(f"  exact check (accuracy level {ex['accuracy_level']}, fp32 arithmetic): max |Δlogit| "
                     f"{_fmt(ex['max_abs'], '.3g')} (relative {_fmt(ex['max_rel'], '.3g')}) against "
                     f"max({t['max_abs']:g}, {t.get('max_rel', 0):g} x std): {'pass' if ex['passed'] else 'FAIL'}")
    lines.append("")
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    if report["passed"]:
        lines.append("PASS" + ("" if s["greedy_match"] else "  (greedy sequences differ; within tolerance)"))
    else:
        lines.append("FAIL: " + "; ".join(report["failures"]))
    return "\n".join(lines)


def describe_reference(d: dict) -> str:
    if d.get("kind") == "golden":
        rec = d.get("recorded") or {}
        stored = d.get("logits") or {}
        what = ("every logit" if stored.get("top") == stored.get("vocab") else
                f"top-{stored.get('top')} + {stored.get('sample')} sampled of {stored.get('vocab')} logits")
        return (f"golden file {d.get('path')}: {describe_reference(rec)}, recorded with kvtrace "
                f"{d.get('kvtrace_version')}, {what} per position")
    if d.get("kind") == "builtin":
        return f"built-in {d['architecture']}, seed {d['seed']}, fp32"
    extra = f", {d['class']}, eager attention" if d.get("kind") == "transformers" else ""
    return f"{d.get('path')}{extra}, fp32"


def json_safe(x):
    """JSON has no NaN/Infinity: write non-finite floats as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write the JSON report atomically."""
    from kvtrace.files import atomic_write_text

    return atomic_write_text(Path(path), json.dumps(json_safe(report), indent=1) + "\n", what="--json")
