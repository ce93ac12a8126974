"""The one parity harness: an artifact's logits against a reference's, step by step. No torch.

Used by `kvtrace export` (validation), `kvtrace parity` (against our torch model or
transformers) and the tests; golden files are a recorded `Trace`.

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

Metrics (one definition each, everywhere):
  max_abs / mean_abs  |logit difference| over every compared position and vocabulary entry
  max_rel             max over positions of max|Δ| / std(reference logits at that position): a
                      tolerance that scales with the logits (large real models span tens of units)
  top1                argmax agreement over the *decisive* positions only: those where the
                      reference's top-2 margin is at least TIE_MARGIN (a near tie may flip either
                      way under any rounding, in torch too). None when no position is decisive:
                      the verdict then rests on the logit tolerances alone and says so.
  top1_strict         argmax agreement over every position (reported, not judged)
  kl_mean / kl_max    KL(reference || artifact) in float64 from log-softmax
  greedy match        per row, whether the artifact's argmax equals the trace's token at every step
Verdict (configs.TOLERANCES[dtype]): finite logits, max_abs <= max_abs tolerance or, per
position, |Δ| <= max_rel tolerance x std (whichever is looser at that position), and top1 >= the
top-1 tolerance when top1 is not None.
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

REPORT_VERSION = 2
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


# --------------------------------------------------------------------------- metrics
def log_softmax64(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Metrics over rows of logits. ref, got (N, V): N positions to compare.

    Non-finite artifact logits make max/mean/KL non-finite, which fails every tolerance."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise KvtraceError(f"logits shapes differ: reference {ref.shape}, artifact {got.shape}")
    finite = bool(np.isfinite(got).all())
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(ref - got)  # (N, V)
        pos_max = np.nan_to_num(diff, nan=np.inf).max(axis=-1)  # (N,)
        scale = ref.std(axis=-1)  # (N,) spread of the reference logits at each position
        rel = pos_max / np.maximum(scale, 1e-30)
        lp_ref, lp_got = log_softmax64(ref), log_softmax64(got)
        kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(axis=-1)  # (N,) KL(ref || artifact)
    same = ref.argmax(axis=-1) == got.argmax(axis=-1)  # (N,)
    top2 = np.sort(ref, axis=-1)[:, -2:] if ref.shape[-1] > 1 else np.concatenate([ref, ref], -1)
    decisive = (top2[:, 1] - top2[:, 0]) >= TIE_MARGIN  # (N,)
    return {
        "positions": int(ref.shape[0]),
        "max_abs": float(pos_max.max()) if finite else math.inf,
        "mean_abs": float(diff.mean()) if finite else math.inf,
        "max_rel": float(rel.max()) if finite else math.inf,
        "decisive": int(decisive.sum()),
        "top1_agree": int(same[decisive].sum()),
        "top1": float(same[decisive].mean()) if decisive.any() else None,
        "top1_strict": float(same.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "finite": finite,
        # per-position figures, for the verdict's per-position bound (dropped from reports)
        "_pos_max": pos_max, "_scale": scale,
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
        "kl_mean": sum(st["kl_mean"] * st["positions"] for st in per_step) / n,
        "kl_max": max(st["kl_max"] for st in per_step),
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
    choice), and the reference's logits: prefill[b] (T_b, V) float32, decode[s] (B, V) float32."""
    prompts: list[list[int]]
    tokens: list[list[int]] = field(default_factory=list)  # tokens[s][b], s = 0..steps-1
    prefill: list[np.ndarray] = field(default_factory=list)
    decode: list[np.ndarray] = field(default_factory=list)
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
    lengths = [len(p) for p in prompts]
    t0 = time.perf_counter()
    got = np.asarray(artifact.start(prompts))  # (B, T_max, V)
    if got.ndim != 3 or got.shape[0] != len(prompts) or got.shape[1] < max(lengths):
        raise KvtraceError(f"artifact prefill returned logits of shape {got.shape}, expected "
                           f"({len(prompts)}, >= {max(lengths)}, V)")
    ref_rows = np.concatenate([r[:n] for r, n in zip(trace.prefill, lengths)])  # (sum T_b, V)
    got_rows = np.concatenate([got[b, :n] for b, n in enumerate(lengths)])
    per_step = [{"step": 0, "kind": "prefill", **compare(ref_rows, got_rows)}]
    art_greedy = [[int(got[b, n - 1].argmax())] for b, n in enumerate(lengths)]
    ref_greedy = [[int(trace.prefill[b][n - 1].argmax())] for b, n in enumerate(lengths)]
    for s, (tok, want) in enumerate(zip(trace.tokens, trace.decode), start=1):
        a = np.asarray(artifact.step(tok))  # (B, V)
        if a.shape != want.shape:
            raise KvtraceError(f"artifact decode step {s} returned logits of shape {a.shape}, expected {want.shape}")
        per_step.append({"step": s, "kind": "decode", **compare(want, a)})
        for b in range(len(prompts)):
            art_greedy[b].append(int(a[b].argmax()))
            ref_greedy[b].append(int(want[b].argmax()))
    seconds = time.perf_counter() - t0
    rows = []
    for b in range(len(prompts)):
        diverge = next((i for i, (x, y) in enumerate(zip(ref_greedy[b], art_greedy[b])) if x != y), None)
        rows.append({"prompt_len": lengths[b], "match": diverge is None, "first_divergence": diverge,
                     "reference": ref_greedy[b], "artifact": art_greedy[b]})
    summary = summarize(per_step)
    summary["greedy_match"] = all(r["match"] for r in rows)
    return {"per_step": per_step, "summary": summary, "greedy": rows,
            "seconds": {"reference": round(trace.seconds, 3), "artifact": round(seconds, 3)}}


def judge(result: dict, tol: dict) -> dict:
    """Add the verdict to a replay result (passed, failures, notes, tolerance) and drop the
    per-position arrays (not JSON)."""
    fails, notes = verdict(result["summary"], result["per_step"], tol)
    for st in result["per_step"]:
        st.pop("_pos_max", None), st.pop("_scale", None)
    return {**result, "tolerance": dict(tol), "passed": not fails, "failures": fails, "notes": notes}


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


def format_table(report: dict) -> str:
    tol, s = report["tolerance"], report["summary"]
    lines = [
        f"kvtrace parity  {report['artifact']}",
        f"  artifact : {report['architecture']} {report['dtype']} {report['layout']} cache, backend {report['backend']}",
        f"  reference: {report['against']} ({describe_reference(report['reference'])})",
        f"  prompts  : {report['batch']} rows, lengths {', '.join(map(str, report['prompt_lengths']))} "
        f"(seed {report['seed']}); {report['steps']} decode steps, each fed the reference's greedy token",
        f"  tolerance: |Δlogit| <= max({tol['max_abs']:g}, {tol.get('max_rel', 0):g} x std of the reference's "
        f"logits) per position, top-1 >= {tol['top1']:g} over decisive positions (configs.TOLERANCES)",
        "",
        f"  {'step':>7}  {'pos':>4}  {'max|Δlogit|':>11}  {'max rel':>9}  {'mean|Δlogit|':>12}  {'top-1':>6}  "
        f"{'KL mean':>9}  {'KL max':>9}",
    ]
    for st in report["per_step"]:
        name = "prefill" if st["kind"] == "prefill" else str(st["step"])
        t1 = "n/a" if st["top1"] is None else f"{st['top1']:.3f}"
        lines.append(f"  {name:>7}  {st['positions']:>4}  {_fmt(st['max_abs']):>11}  {_fmt(st['max_rel']):>9}  "
                     f"{_fmt(st['mean_abs']):>12}  {t1:>6}  {_fmt(st['kl_mean']):>9}  {_fmt(st['kl_max']):>9}")
    t1 = "n/a" if s["top1"] is None else f"{s['top1']:.3f}"
    lines.append(f"  {'all':>7}  {s['positions']:>4}  {_fmt(s['max_abs']):>11}  {_fmt(s['max_rel']):>9}  "
                 f"{_fmt(s['mean_abs']):>12}  {t1:>6}  {_fmt(s['kl_mean']):>9}  {_fmt(s['kl_max']):>9}")
    lines.append("")
    for b, row in enumerate(report["greedy"]):
        state = "match" if row["match"] else f"differ from token {row['first_divergence']}"
        lines.append(f"  greedy row {b} (prompt {row['prompt_len']}): {len(row['reference'])} tokens, {state}")
    lines.append("")
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    if report["passed"]:
        lines.append("PASS" + ("" if s["greedy_match"] else "  (greedy sequences differ; within tolerance)"))
    else:
        lines.append("FAIL: " + "; ".join(report["failures"]))
    return "\n".join(lines)


def describe_reference(d: dict) -> str:
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
