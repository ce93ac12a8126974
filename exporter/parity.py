"""`kvtrace parity`: an artifact's logits against a reference, step by step.

Both sides see the same prompts (a ragged batch, deterministic from a seed) and the same
tokens: a prefill, then N single-token decode steps in which every row is fed the
*reference's* greedy token, so a difference at step s never leaks into the inputs of step
s + 1. The artifact runs through its own cache path (`Model.start` then `Model.step`: the
preallocated, IO-bound cache of the runtime), the reference runs one row at a time in fp32
with its own cache, so a batching or padding bug in the artifact shows up as a difference.

References:
  torch  our PyTorch model (models/transformer.py) from the checkpoint recorded in the
         manifest (or --checkpoint), or the built-in configuration's seeded random weights.
  hf     transformers' AutoModelForCausalLM on the checkpoint (fp32, eager attention).

Per step: max |Δlogit|, mean |Δlogit|, top-1 agreement, KL(ref || artifact) (float64, from
log-softmax), and per row whether the greedy sequences agree. The verdict uses
configs.TOLERANCES[manifest dtype]: max |Δlogit| over every compared position, and the
top-1 agreement over all of them. Exit 0 (pass) or 1 (ParityFailure).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from kvtrace.errors import KvtraceError, ParityFailure

REPORT_VERSION = 1


# --------------------------------------------------------------------------- metrics
def log_softmax64(x: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Metrics over rows of logits. ref, got (N, V): N positions to compare.

    Non-finite artifact logits make max/mean/KL non-finite, which fails every tolerance.
    """
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise KvtraceError(f"logits shapes differ: reference {ref.shape}, artifact {got.shape}")
    diff = np.abs(ref - got)  # (N, V)
    lp_ref, lp_got = log_softmax64(ref), log_softmax64(got)
    with np.errstate(invalid="ignore", over="ignore"):
        kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(axis=-1)  # (N,) KL(ref || artifact)
    agree = ref.argmax(axis=-1) == got.argmax(axis=-1)  # (N,)
    return {
        "positions": int(ref.shape[0]),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "top1": float(agree.mean()),
        "top1_agree": int(agree.sum()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "finite": bool(np.isfinite(got).all()),
    }


def make_prompts(batch: int, longest: int, vocab_size: int, seed: int, avoid=()) -> list[list[int]]:
    """`batch` prompts of different lengths (longest first, then shorter by ~1/(2·batch) steps),
    token ids drawn uniformly from the vocabulary minus `avoid` (special tokens: XGLM and
    some tokenizers treat bos/pad specially, which is not what parity is about)."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), np.array([a for a in avoid if a is not None], dtype=np.int64))
    step = max(1, longest // (2 * max(batch, 1)))
    lengths = [max(1, longest - b * step) for b in range(batch)]
    return [rng.choice(allowed, size=n).astype(np.int64).tolist() for n in lengths]


# --------------------------------------------------------------------------- references
class TorchReference:
    """Our PyTorch model, fp32, one row at a time with a dynamic cache (no padding at all)."""

    def __init__(self, model, description: dict):
        self.model = model
        self.description = description
        self._rows = []

    def start(self, prompts):
        import torch
        from kvtrace.models.transformer import DynamicCache

        self._rows, out = [], []
        with torch.no_grad():
            for p in prompts:
                cache = DynamicCache(self.model.cfg, 1, dtype=torch.float32)
                ids = torch.tensor([p], dtype=torch.long)  # (1, T)
                pos = torch.arange(len(p), dtype=torch.long)[None]  # (1, T)
                logits = self.model(ids, pos, cache)  # (1, T, V)
                self._rows.append([cache, len(p)])
                out.append(logits[0].numpy())
        return out  # per row (T_b, V)

    def step(self, tokens):
        import torch

        out = []
        with torch.no_grad():
            for row, tok in zip(self._rows, tokens):
                cache, pos = row
                logits = self.model(torch.tensor([[tok]], dtype=torch.long),
                                    torch.tensor([[pos]], dtype=torch.long), cache)  # (1, 1, V)
                row[1] = pos + 1
                out.append(logits[0, -1].numpy())
        return np.stack(out)  # (B, V)


class HFReference:
    """transformers' model, fp32, eager attention, one row at a time with its own cache."""

    def __init__(self, model, description: dict):
        import inspect

        self.model = model
        self.description = description
        self._caches = []
        # transformers 5.2x renamed the cache argument/output `past_key_values` -> `cache`
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _cache_of(self, out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    def start(self, prompts):
        import torch

        self._caches, out = [], []
        with torch.no_grad():
            for p in prompts:
                r = self.model(input_ids=torch.tensor([p], dtype=torch.long), use_cache=True)  # logits (1, T, V)
                self._caches.append(self._cache_of(r))
                out.append(r.logits[0].float().numpy())
        return out

    def step(self, tokens):
        import torch

        out = []
        with torch.no_grad():
            for b, tok in enumerate(tokens):
                r = self.model(input_ids=torch.tensor([[tok]], dtype=torch.long), use_cache=True,
                               **{self._cache_kw: self._caches[b]})  # logits (1, 1, V)
                self._caches[b] = self._cache_of(r)
                out.append(r.logits[0, -1].float().numpy())
        return np.stack(out)  # (B, V)


def _source(manifest: dict) -> dict:
    return manifest.get("source") or {}


def torch_reference(manifest: dict, checkpoint: str | None) -> TorchReference:
    """Our model in fp32: the checkpoint (given or recorded), or the seeded built-in."""
    import torch

    src = _source(manifest)
    if checkpoint is None and src.get("kind") == "builtin":
        from kvtrace.configs import BUILTIN, BUILTIN_SEED
        from kvtrace.config import ModelConfig
        from kvtrace.models.transformer import random_model

        arch = manifest.get("architecture")
        if arch not in BUILTIN:
            raise KvtraceError(f"manifest: built-in source of unknown architecture {arch!r}")
        cfg = BUILTIN[arch]
        if ModelConfig.from_dict(manifest["config"]) != cfg:
            print(f"warning: the manifest's config differs from the built-in {arch} configuration; "
                  "comparing against the built-in", file=sys.stderr)
        seed = src.get("seed", BUILTIN_SEED)
        model = random_model(cfg, seed, dtype=torch.float32)
        return TorchReference(model, {"kind": "builtin", "architecture": arch, "seed": seed, "dtype": "float32"})
    path = _checkpoint_path(manifest, checkpoint)
    from kvtrace.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(path, dtype=torch.float32)
    desc = {"kind": "checkpoint", "path": str(path), "sha256": loaded.digest, "dtype": "float32"}
    if src.get("sha256") and src["sha256"] != loaded.digest:
        desc["digest_mismatch"] = src["sha256"]
        print(f"warning: checkpoint {path} (sha256 {loaded.digest[:12]}…) is not the one the artifact was "
              f"exported from (sha256 {src['sha256'][:12]}…)", file=sys.stderr)
    return TorchReference(loaded.model, desc)


def hf_reference(manifest: dict, checkpoint: str | None) -> HFReference:
    if checkpoint is None and _source(manifest).get("kind") == "builtin":
        raise KvtraceError("--against hf: this artifact was exported from a built-in configuration, which has no "
                           "Hugging Face checkpoint; use --against torch, or pass --checkpoint DIR")
    path = _checkpoint_path(manifest, checkpoint)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise KvtraceError(f"--against hf needs transformers and torch installed ({e}); "
                           "pip install 'kvtrace[test]'") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise KvtraceError(f"--against hf: transformers cannot load checkpoint {path}: {e}") from e
    model.eval()
    import transformers

    return HFReference(model, {"kind": "transformers", "path": str(path), "class": type(model).__name__,
                               "transformers_version": transformers.__version__, "dtype": "float32",
                               "attention": "eager"})


def _checkpoint_path(manifest: dict, checkpoint: str | None) -> Path:
    if checkpoint is not None:
        path = Path(checkpoint)
        what = "--checkpoint"
    else:
        src = _source(manifest)
        if not src.get("path"):
            raise KvtraceError("manifest: no source checkpoint path recorded; pass --checkpoint DIR")
        path = Path(src["path"])
        what = "the manifest's source checkpoint"
    if not (path / "config.json").is_file():
        raise KvtraceError(f"{what} {path}: no config.json there (expected a Hugging Face checkpoint directory); "
                           "pass --checkpoint DIR")
    return path


# --------------------------------------------------------------------------- the run
def run_parity(artifact, reference, prompts: list[list[int]], steps: int) -> dict:
    """Prefill + `steps` decode steps on both sides. Returns per-step metrics and greedy tokens.

    artifact: has start(prompts) -> (B, T_max, V) and step(tokens) -> (B, V) (runtime.model.Model)
    reference: has start(prompts) -> [ (T_b, V) per row ] and step(tokens) -> (B, V)
    """
    lengths = [len(p) for p in prompts]
    t0 = time.perf_counter()
    ref_pre = reference.start(prompts)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    art_pre = np.asarray(artifact.start(prompts))  # (B, T_max, V)
    t_art = time.perf_counter() - t0
    if art_pre.ndim != 3 or art_pre.shape[0] != len(prompts) or art_pre.shape[1] < max(lengths):
        raise KvtraceError(f"artifact prefill returned logits of shape {art_pre.shape}, expected "
                           f"({len(prompts)}, >= {max(lengths)}, V)")
    ref_rows = np.concatenate([r[:n] for r, n in zip(ref_pre, lengths)])  # (sum T_b, V)
    art_rows = np.concatenate([art_pre[b, :n] for b, n in enumerate(lengths)])
    per_step = [{"step": 0, "kind": "prefill", **compare(ref_rows, art_rows)}]

    # greedy token after each call: the reference's is fed to both sides
    ref_last = np.stack([r[n - 1] for r, n in zip(ref_pre, lengths)])  # (B, V)
    art_last = np.stack([art_pre[b, n - 1] for b, n in enumerate(lengths)])
    ref_greedy = [[int(t)] for t in ref_last.argmax(-1)]
    art_greedy = [[int(t)] for t in art_last.argmax(-1)]
    for s in range(1, steps + 1):
        feed = [row[-1] for row in ref_greedy]
        t0 = time.perf_counter()
        r = np.asarray(reference.step(feed))  # (B, V)
        t_ref += time.perf_counter() - t0
        t0 = time.perf_counter()
        a = np.asarray(artifact.step(feed))  # (B, V)
        t_art += time.perf_counter() - t0
        if a.shape != r.shape:
            raise KvtraceError(f"artifact decode step {s} returned logits of shape {a.shape}, expected {r.shape}")
        per_step.append({"step": s, "kind": "decode", **compare(r, a)})
        for b in range(len(prompts)):
            ref_greedy[b].append(int(r[b].argmax()))
            art_greedy[b].append(int(a[b].argmax()))

    rows = []
    for b in range(len(prompts)):
        diverge = next((i for i, (x, y) in enumerate(zip(ref_greedy[b], art_greedy[b])) if x != y), None)
        rows.append({"prompt_len": lengths[b], "match": diverge is None, "first_divergence": diverge,
                     "reference": ref_greedy[b], "artifact": art_greedy[b]})
    n = sum(st["positions"] for st in per_step)
    summary = {
        "positions": n,
        "max_abs": max(st["max_abs"] for st in per_step) if all(st["finite"] for st in per_step) else math.inf,
        "mean_abs": sum(st["mean_abs"] * st["positions"] for st in per_step) / n,
        "top1": sum(st["top1_agree"] for st in per_step) / n,
        "kl_mean": sum(st["kl_mean"] * st["positions"] for st in per_step) / n,
        "kl_max": max(st["kl_max"] for st in per_step),
        "greedy_match": all(r["match"] for r in rows),
        "finite": all(st["finite"] for st in per_step),
    }
    return {"per_step": per_step, "summary": summary, "greedy": rows,
            "seconds": {"reference": round(t_ref, 3), "artifact": round(t_art, 3)}}


def verdict(summary: dict, tol: dict) -> list[str]:
    """Failures against the tolerance row (empty: pass). NaN fails every comparison."""
    fails = []
    if not summary["finite"]:
        fails.append("the artifact produced non-finite logits")
    if not (summary["max_abs"] <= tol["max_abs"]):
        fails.append(f"max |Δlogit| {summary['max_abs']:.3g} > {tol['max_abs']:g}")
    if not (summary["top1"] >= tol["top1"]):
        fails.append(f"top-1 agreement {summary['top1']:.4f} < {tol['top1']:g}")
    return fails


# --------------------------------------------------------------------------- output
def _fmt(x: float, spec: str = ".2e") -> str:
    return format(x, spec) if math.isfinite(x) else str(x)


def format_table(report: dict) -> str:
    tol, s = report["tolerance"], report["summary"]
    lines = [
        f"kvtrace parity  {report['artifact']}",
        f"  artifact : {report['architecture']} {report['dtype']} {report['layout']} cache, backend {report['backend']}",
        f"  reference: {report['against']} ({_describe_ref(report['reference'])})",
        f"  prompts  : {report['batch']} rows, lengths {', '.join(map(str, report['prompt_lengths']))} "
        f"(seed {report['seed']}); {report['steps']} decode steps, each fed the reference's greedy token",
        f"  tolerance: max |Δlogit| <= {tol['max_abs']:g}, top-1 agreement >= {tol['top1']:g}  "
        f"(configs.TOLERANCES[{report['dtype']!r}])",
        "",
        f"  {'step':>7}  {'pos':>4}  {'max|Δlogit|':>11}  {'mean|Δlogit|':>12}  {'top-1':>6}  "
        f"{'KL mean':>9}  {'KL max':>9}",
    ]
    for st in report["per_step"]:
        name = "prefill" if st["kind"] == "prefill" else str(st["step"])
        lines.append(f"  {name:>7}  {st['positions']:>4}  {_fmt(st['max_abs']):>11}  {_fmt(st['mean_abs']):>12}  "
                     f"{st['top1']:>6.3f}  {_fmt(st['kl_mean']):>9}  {_fmt(st['kl_max']):>9}")
    lines.append(f"  {'all':>7}  {s['positions']:>4}  {_fmt(s['max_abs']):>11}  {_fmt(s['mean_abs']):>12}  "
                 f"{s['top1']:>6.3f}  {_fmt(s['kl_mean']):>9}  {_fmt(s['kl_max']):>9}")
    lines.append("")
    for b, row in enumerate(report["greedy"]):
        state = "match" if row["match"] else f"differ from token {row['first_divergence']}"
        lines.append(f"  greedy row {b} (prompt {row['prompt_len']}): {len(row['reference'])} tokens, {state}")
    lines.append("")
    if report["passed"]:
        lines.append("PASS" + ("" if s["greedy_match"] else "  (greedy sequences differ; within tolerance)"))
    else:
        lines.append("FAIL: " + "; ".join(report["failures"]))
    return "\n".join(lines)


def _describe_ref(d: dict) -> str:
    if d.get("kind") == "builtin":
        return f"built-in {d['architecture']}, seed {d['seed']}, fp32"
    extra = f", {d['class']}, eager attention" if d.get("kind") == "transformers" else ""
    return f"{d.get('path')}{extra}, fp32"


def _json_safe(x):
    """JSON has no NaN/Infinity: write non-finite floats as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write the JSON report atomically (temporary name, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise KvtraceError(f"--json {path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_json_safe(report), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KvtraceError(f"--json {path}: cannot write the report: {e}") from e
    return path


# --------------------------------------------------------------------------- CLI
def read_manifest(artifact: str | os.PathLike) -> dict:
    """The raw manifest dict, checked by the runtime's loader (format version, files present)."""
    from kvtrace.manifest import load_manifest

    return load_manifest(artifact).data


def parity(artifact: str, *, against: str = "torch", checkpoint: str | None = None, steps: int = 16,
           batch: int = 2, backend: str = "auto", prompt_len: int | None = None, seed: int = 0,
           tolerance: dict | None = None) -> dict:
    """Run the comparison and return the report dict (report["passed"] is the verdict)."""
    from kvtrace.configs import TOLERANCES
    from kvtrace.runtime.model import Model

    if steps < 0:
        raise KvtraceError(f"--steps {steps}: must be >= 0")
    if batch < 1:
        raise KvtraceError(f"--batch {batch}: must be >= 1")
    manifest = read_manifest(artifact)
    m = Model.load(artifact, backend=backend)
    dtype = manifest["dtype"]
    if dtype not in TOLERANCES:
        raise KvtraceError(f"manifest dtype {dtype!r}: no tolerance in configs.TOLERANCES")
    cfg = manifest["config"]
    io = manifest.get("io") or {}
    max_batch = io.get("max_batch")
    if max_batch and batch > max_batch:
        raise KvtraceError(f"--batch {batch}: the artifact takes at most {max_batch} rows (max_batch)")
    # cache room: the longest row needs prompt + steps slots
    room = min(x for x in (io.get("max_seq"), cfg.get("max_position")) if x)
    if prompt_len is None:
        prompt_len = min(16, room - steps)
    if prompt_len < 1 or prompt_len + steps > room:
        raise KvtraceError(f"--prompt-len {prompt_len} + --steps {steps} exceed the artifact's {room} positions")
    prompts = make_prompts(batch, prompt_len, cfg["vocab_size"], seed,
                           avoid=(cfg.get("bos_token_id"), cfg.get("eos_token_id"), cfg.get("pad_token_id")))

    try:
        import torch  # noqa: F401  (the reference side; the artifact side needs none)
    except ImportError as e:
        raise KvtraceError(f"kvtrace parity needs PyTorch for the reference model ({e}); pip install torch") from e
    ref = torch_reference(manifest, checkpoint) if against == "torch" else hf_reference(manifest, checkpoint)
    result = run_parity(m, ref, prompts, steps)
    tol = {**TOLERANCES[dtype], **{k: v for k, v in (tolerance or {}).items() if v is not None}}
    failures = verdict(result["summary"], tol)
    return {
        "report_version": REPORT_VERSION,
        "artifact": str(artifact),
        "architecture": manifest.get("architecture"),
        "dtype": dtype,
        "layout": io.get("layout"),
        "backend": getattr(m, "backend_name", backend),
        "against": against,
        "reference": ref.description,
        "batch": batch,
        "steps": steps,
        "seed": seed,
        "prompt_lengths": [len(p) for p in prompts],
        "tolerance": tol,
        **result,
        "passed": not failures,
        "failures": failures,
    }


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("artifact")
    p.add_argument("--against", choices=["torch", "hf"], default="torch")
    p.add_argument("--checkpoint", help="reference checkpoint (default: the one recorded in the manifest)")
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prefill")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt-len", type=int, help="longest prompt; the others are shorter (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", dest="json_report", metavar="REPORT", help="write the JSON report here")
    p.add_argument("--max-abs", type=float, help="override the dtype's max |Δlogit| tolerance (configs.TOLERANCES)")
    p.add_argument("--min-top1", type=float, help="override the dtype's minimum top-1 agreement")


def main(args) -> int:
    report = parity(args.artifact, against=args.against, checkpoint=args.checkpoint, steps=args.steps,
                    batch=args.batch, backend=args.backend, prompt_len=getattr(args, "prompt_len", None),
                    seed=getattr(args, "seed", 0),
                    tolerance={"max_abs": getattr(args, "max_abs", None), "top1": getattr(args, "min_top1", None)})
    print(format_table(report))
    if getattr(args, "json_report", None):
        write_report(args.json_report, report)
    if not report["passed"]:
        raise ParityFailure("; ".join(report["failures"]))
    return 0
