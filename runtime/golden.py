"""Golden files: a reference run recorded where the reference can run (torch, transformers), and
replayed through the runtime alone where it cannot (an edge device, a GPU server with TensorRT
but no torch, a CI job re-checking last month's artifact after a runtime upgrade). No torch here:
numpy and the standard library read and write the format.

    kvtrace parity ART --save-golden golden.npz --batch 4 --steps 32   # where torch is installed
    kvtrace parity ART --golden golden.npz [--backend tensorrt] [--junit-xml ...]  # anywhere

Format (FORMAT_VERSION 1): a NumPy .npz archive (zip; every member CRC-checked on reading),
read with allow_pickle=False. Members:
  header          uint8 (n,)    UTF-8 JSON, below
  prompt_lengths  int32 (B,)    T_b
  prompt_ids      int32 (sum T_b,)  the prompts, concatenated
  tokens          int32 (S, B)  the token fed to row b at decode step s+1 (the reference's greedy choice)
  indices         int32 (N, K)  per compared position, the stored vocabulary entries: the reference's
                                top `top` logits (descending, lowest id first among equal values),
                                then `sample` entries drawn uniformly from the rest (K = top + sample,
                                or K = V with every entry when V <= top + sample)
  values          float32 (N, K)  the reference's logits there (exactly as the fp32 reference gave them)
  lse             float64 (N,)  log-sum-exp of the reference's logits over the whole vocabulary
  std             float64 (N,)  their standard deviation (the scale of the relative tolerance)
  tail            float64 (N,)  the reference's probability mass outside the top `top` entries
Positions (N = sum T_b + S·B): every prefill position of row 0, of row 1, ..., then decode step
1's B rows, step 2's, ... . These are kvtrace.runtime.parity.RefLogits, so the comparison is the
harness's one `compare` (sparse: metrics over the stored entries; KL exact over the top entries
plus the tail as one outcome, a lower bound: parity.METRICS).

Header: {"format": "kvtrace-golden", "format_version", "kvtrace_version", "created" (UTC),
  "model": identity(manifest) — what a replaying artifact must match,
  "artifact": {"path", "dtype", "layout", "digest": {"sha256", "of"}} — the artifact it was recorded
             beside (informational: another export of the same model replays it too),
  "reference": the reference's description (kind, path/seed, sha256, torch/transformers version),
  "prompts": {"seed", "batch", "prompt_len", "avoid"}, "steps",
  "logits": {"vocab", "top", "sample", "stored", "sample_seed"},
  "metrics": parity.METRICS, "tie_margin", "tolerance": {"dtype", "row"} (the row in force when recorded)}

Identity: a golden belongs to a *model*, not to one artifact: the architecture, the whole model
config (vocabulary, shapes, positions, norms, special token ids ...) and the source weights (the
checkpoint's sha256, or the built-in configuration's seed), all from the manifest. A golden from
the same checkpoint replays on any export of it (fp32, fp16, bf16, static or dynamic cache, an
engine built later): that is the point. A difference in any of them is refused, naming it.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtrace.errors import KvtraceError, ParityFailure
from kvtrace.runtime import parity

FORMAT = "kvtrace-golden"
FORMAT_VERSION = 1
# Stored entries per position. Top 64: the top-1, the top-10 overlap and a KL whose missing
# part (P_tail x range of Δ over the tail) is small for trained models, whose top 64 entries
# usually hold most of the probability mass; 64 more sampled uniformly from the rest, so max |Δ|
# also sees the low logits. 4 prompts x 32 steps (180 positions) of 128 entries: 140 kB compressed
# (measured at a 50k vocabulary; tests/test_golden.py keeps it under 1 MB).
DEFAULT_TOP = 64
DEFAULT_SAMPLE = 64
ARRAYS = ("header", "prompt_lengths", "prompt_ids", "tokens", "indices", "values", "lse", "std", "tail")


@dataclass
class Golden:
    header: dict
    trace: parity.Trace  # prefill / decode as parity.RefLogits
    path: Path | None = None

    @property
    def prompts(self) -> list[list[int]]:
        return self.trace.prompts

    @property
    def steps(self) -> int:
        return self.trace.steps


# --------------------------------------------------------------------------- identity
def identity(manifest: dict) -> dict:
    """What a golden is for: architecture, model config, source weights (from a manifest dict)."""
    src = manifest.get("source") or {}
    source = {"kind": src.get("kind")}
    if src.get("kind") == "builtin":
        source["seed"] = src.get("seed")
    elif src.get("sha256"):
        source["sha256"] = src["sha256"]
    return {"architecture": manifest.get("architecture"), "config": dict(manifest.get("config") or {}),
            "source": source}


def artifact_digest(manifest: dict) -> dict:
    """The artifact's bytes: sha256 of its manifest's "files" entry (every file's size and
    sha256), or, for artifacts written before that entry existed, of the manifest without the
    entries later commands add (validation, tensorrt)."""
    import hashlib

    if manifest.get("files"):
        blob, of = manifest["files"], "files"
    else:
        blob, of = {k: v for k, v in manifest.items() if k not in ("validation", "tensorrt")}, "manifest"
    text = json.dumps(blob, sort_keys=True, separators=(",", ":"))
    return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "of": of}


def check_compatible(golden: Golden, manifest: dict, artifact) -> list[str]:
    """Refuse (KvtraceError naming every difference) a golden recorded for another model, or one
    whose prompts do not fit the artifact; returns notes (same artifact or another export)."""
    want, have = golden.header["model"], identity(manifest)
    label = f"--golden {golden.path}" if golden.path else "golden"
    diffs = []
    if want.get("architecture") != have["architecture"]:
        diffs.append(f"architecture {want.get('architecture')} (artifact: {have['architecture']})")
    wc, hc = want.get("config") or {}, have["config"]
    if wc.get("vocab_size") != hc.get("vocab_size"):
        diffs.append(f"vocabulary of {wc.get('vocab_size')} tokens (artifact: {hc.get('vocab_size')})")
    other = sorted(k for k in set(wc) | set(hc) if k not in ("vocab_size", "arch") and wc.get(k) != hc.get(k))
    if other:
        diffs.append("model config " + ", ".join(f"{k}={wc.get(k)!r} (artifact: {hc.get(k)!r})" for k in other[:6])
                     + (f" and {len(other) - 6} more" if len(other) > 6 else ""))
    ws, hs = want.get("source") or {}, have["source"]
    notes = []
    if ws.get("kind") and hs.get("kind") and ws["kind"] != hs["kind"]:
        diffs.append(f"source weights {_source(ws)} (artifact: {_source(hs)})")
    elif ws.get("kind") == "builtin" and ws.get("seed") != hs.get("seed"):
        diffs.append(f"source weights {_source(ws)} (artifact: {_source(hs)})")
    elif ws.get("sha256") and hs.get("sha256") and ws["sha256"] != hs["sha256"]:
        diffs.append(f"source weights {_source(ws)} (artifact: {_source(hs)})")
    elif ws.get("kind") != "builtin" and not (ws.get("sha256") and hs.get("sha256")):
        notes.append("the source checkpoint's digest is not recorded on "
                     f"{'both sides' if not ws.get('sha256') and not hs.get('sha256') else 'one side'}: "
                     "the model is matched on its architecture and config only")
    if diffs:
        raise KvtraceError(f"{label} was recorded for a different model than {artifact}: " + "; ".join(diffs)
                           + ". Record a golden for this model with `kvtrace parity ART --save-golden FILE`")
    io_ = manifest.get("io") or {}
    B, longest, S = len(golden.prompts), max(len(p) for p in golden.prompts), golden.steps
    if io_.get("max_batch") and B > int(io_["max_batch"]):
        raise KvtraceError(f"{label} has {B} prompt rows; artifact {artifact} takes at most {io_['max_batch']} "
                           "(max_batch): export it with a larger --max-batch, or record a golden with fewer --batch")
    room = min(x for x in (io_.get("max_seq"), hc.get("max_position")) if x)
    if longest + S > room:
        raise KvtraceError(f"{label} needs {longest + S} positions (prompt {longest} + {S} steps); artifact "
                           f"{artifact} holds {room} (max_seq)")
    rec = golden.header.get("artifact") or {}
    digest = artifact_digest(manifest)
    if (rec.get("digest") or {}).get("sha256") == digest["sha256"]:
        notes.append("the artifact's manifest records the same file digests as the artifact the golden was "
                     "recorded beside")
    else:
        notes.append(f"another artifact of the same model as the one the golden was recorded beside "
                     f"({rec.get('dtype')} {rec.get('layout')} then, {manifest.get('dtype')} "
                     f"{(manifest.get('io') or {}).get('layout')} now)")
    return notes


def _source(s: dict) -> str:
    if s.get("kind") == "builtin":
        return f"built-in, seed {s.get('seed')}"
    if s.get("sha256"):
        return f"checkpoint sha256 {s['sha256'][:12]}…"
    return s.get("kind") or "unknown"


# --------------------------------------------------------------------------- writing
def from_trace(trace: parity.Trace, *, manifest: dict, artifact, reference: dict, prompt_spec: dict,
               top: int = DEFAULT_TOP, sample: int = DEFAULT_SAMPLE, sample_seed: int = 0,
               tolerance: dict | None = None) -> Golden:
    """A golden from a recorded (dense) trace: each position's top `top` logits plus `sample`
    sampled ones (all of them when the vocabulary is that small)."""
    from kvtrace import __version__

    if top < parity.OVERLAP_K:
        raise KvtraceError(f"--golden-top {top}: must be at least {parity.OVERLAP_K} (the top-10 overlap and "
                           "the top-1 margin are recomputed from the stored top entries)")
    if sample < 0:
        raise KvtraceError(f"--golden-sample {sample}: must be >= 0")
    V = int(manifest["config"]["vocab_size"])
    if V <= top + sample:  # as small as the sparse form: keep every entry (exact metrics)
        top, sample = V, 0

    def sparse(x, i):
        return parity.RefLogits.from_dense(x, top=top, sample=sample, seed=sample_seed + i)

    lengths = [len(p) for p in trace.prompts]
    parts = [sparse(np.asarray(r)[:n], i) for i, (r, n) in enumerate(zip(trace.prefill, lengths))]
    parts += [sparse(np.asarray(d), len(lengths) + s) for s, d in enumerate(trace.decode)]
    for p in parts:
        if not (np.isfinite(p.values).all() and np.isfinite(p.lse).all()):
            raise KvtraceError("the reference produced non-finite logits: no golden file written")
    import datetime

    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kvtrace_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": identity(manifest),
        "artifact": {"path": str(artifact), "dtype": manifest.get("dtype"),
                     "layout": (manifest.get("io") or {}).get("layout"), "digest": artifact_digest(manifest)},
        "reference": dict(reference),
        "prompts": dict(prompt_spec), "steps": trace.steps,
        "logits": {"vocab": V, "top": top, "sample": sample, "stored": top + sample, "sample_seed": sample_seed},
        "metrics": parity.METRICS, "tie_margin": parity.TIE_MARGIN,
        "tolerance": {"dtype": manifest.get("dtype"), "row": dict(tolerance or {})},
    }
    g = Golden(header=header, trace=parity.Trace(prompts=[list(p) for p in trace.prompts],
                                                 tokens=[list(t) for t in trace.tokens], seconds=trace.seconds))
    g.trace.prefill, g.trace.decode = parts[:len(lengths)], parts[len(lengths):]
    return g


def to_bytes(golden: Golden) -> bytes:
    t = golden.trace
    allp = parity.RefLogits.concat(list(t.prefill) + list(t.decode))
    arrays = {
        "header": np.frombuffer(json.dumps(golden.header, indent=1).encode("utf-8"), dtype=np.uint8),
        "prompt_lengths": np.asarray([len(p) for p in t.prompts], np.int32),
        "prompt_ids": np.asarray([x for p in t.prompts for x in p], np.int32),
        "tokens": np.asarray(t.tokens, np.int32).reshape(t.steps, len(t.prompts)),
        "indices": allp.indices.astype(np.int32), "values": allp.values.astype(np.float32),
        "lse": allp.lse.astype(np.float64), "std": allp.std.astype(np.float64), "tail": allp.tail.astype(np.float64),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def save(golden: Golden, path) -> Path:
    """Write atomically (complete or not at all)."""
    from kvtrace.files import atomic_write_bytes

    path = atomic_write_bytes(Path(path), to_bytes(golden), what="--save-golden")
    golden.path = path
    return path


# --------------------------------------------------------------------------- reading
def load(path) -> Golden:
    """Read and check a golden file; KvtraceError naming the file and what is wrong."""
    path = Path(path)
    label = f"--golden {path}"
    if not path.is_file():
        raise KvtraceError(f"{label}: file not found" if not path.exists() else f"{label}: not a file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in ARRAYS if n not in z.files]
            if missing:
                raise KvtraceError(f"{label}: not a kvtrace golden file (array(s) {', '.join(missing)} missing)")
            a = {n: z[n] for n in ARRAYS}  # zipfile checks each member's CRC as it is read
    except KvtraceError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise KvtraceError(f"{label}: not a readable kvtrace golden file ({e})") from e
    try:
        header = json.loads(bytes(a["header"].astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvtraceError(f"{label}: its header is not JSON ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise KvtraceError(f"{label}: not a kvtrace golden file (header 'format' is {header.get('format')!r})"
                           if isinstance(header, dict) else f"{label}: its header is not a JSON object")
    v = header.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise KvtraceError(f"{label}: header 'format_version' missing or invalid ({v!r})")
    if v > FORMAT_VERSION:
        raise KvtraceError(f"{label}: golden format_version {v} is newer than this kvtrace reads ({FORMAT_VERSION}); "
                           "upgrade kvtrace (pip install -U kvtrace)")
    for key in ("model", "logits", "steps", "prompts", "reference"):
        if key not in header:
            raise KvtraceError(f"{label}: header lacks '{key}'")
    lg = header["logits"]

    def need(cond, what):
        if not cond:
            raise KvtraceError(f"{label}: {what}")

    # the header's shape (a hand-edited or foreign file): objects where objects are read, integers
    # where integers are read, numeric arrays -- named, instead of an internal error later
    def obj(key, v, null=False):
        need(isinstance(v, dict) or (null and v is None), f"header '{key}' must be a JSON object, got {v!r:.40}")

    def count(key, v, lo):
        need(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
             f"header '{key}' must be an integer >= {lo}, got {v!r:.40}")

    for key in ("model", "logits", "prompts", "reference"):
        obj(key, header[key])
    obj("artifact", header.get("artifact"), null=True)
    for key in ("config", "source"):
        obj(f"model.{key}", header["model"].get(key), null=True)
    obj("artifact.digest", (header.get("artifact") or {}).get("digest"), null=True)
    count("steps", header["steps"], 0)
    for key in ("vocab", "top", "stored"):
        count(f"logits.{key}", lg.get(key), 1)
    for n in ARRAYS:
        if n != "header":
            need(a[n].dtype.kind in ("iu" if n in ("prompt_lengths", "prompt_ids", "tokens", "indices") else "fiu"),
                 f"array '{n}' has dtype {a[n].dtype}, not a number type")

    lengths = a["prompt_lengths"]
    need(lengths.ndim == 1 and lengths.size >= 1 and (lengths >= 1).all(), "prompt_lengths must be positive (B,)")
    B = int(lengths.size)
    need(a["prompt_ids"].shape == (int(lengths.sum()),), "prompt_ids do not add up to prompt_lengths")
    S = int(header["steps"])
    need(a["tokens"].shape == (S, B), f"tokens has shape {a['tokens'].shape}, expected ({S}, {B}) (steps, batch)")
    V, top, K = int(lg.get("vocab", 0)), int(lg.get("top", 0)), int(lg.get("stored", 0))
    N = int(lengths.sum()) + S * B
    need(V >= 1 and 1 <= top <= K <= V, f"header 'logits' is inconsistent ({lg})")
    for n in ("indices", "values"):
        need(a[n].shape == (N, K), f"{n} has shape {a[n].shape}, expected ({N}, {K}) (positions, stored entries)")
    for n in ("lse", "std", "tail"):
        need(a[n].shape == (N,), f"{n} has shape {a[n].shape}, expected ({N},)")
    ids = a["indices"]
    need(ids.min() >= 0 and ids.max() < V, f"indices outside the vocabulary of {V}")
    need(all(0 <= x < V for x in (a["prompt_ids"].min(), a["prompt_ids"].max(), a["tokens"].min() if S else 0,
                                  a["tokens"].max() if S else 0)), f"token ids outside the vocabulary of {V}")
    need(np.isfinite(a["values"]).all() and np.isfinite(a["lse"]).all() and np.isfinite(a["std"]).all(),
         "the recorded reference logits are not all finite")
    need(((a["tail"] >= 0) & (a["tail"] <= 1)).all(), "tail masses outside [0, 1]")

    ref = parity.RefLogits(indices=ids.astype(np.int64), values=a["values"], n_top=top, vocab=V,
                           lse=a["lse"].astype(np.float64), std=a["std"].astype(np.float64),
                           tail=a["tail"].astype(np.float64))
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    flat = a["prompt_ids"].astype(int).tolist()
    trace = parity.Trace(prompts=[flat[offs[b]:offs[b + 1]] for b in range(B)],
                         tokens=a["tokens"].astype(int).tolist(),
                         prefill=[ref[offs[b]:offs[b + 1]] for b in range(B)],
                         decode=[ref[offs[-1] + s * B: offs[-1] + (s + 1) * B] for s in range(S)])
    return Golden(header=header, trace=trace, path=path)


# --------------------------------------------------------------------------- replay
def replay(artifact, golden, *, backend: str = "auto", tolerance: dict | None = None, threads=None) -> dict:
    """Replay `golden` (a path or a Golden) through the runtime on `artifact`, teacher forced on
    its tokens, judged by configs.TOLERANCES[the artifact's dtype] (entries of `tolerance` that
    are not None override it). Returns the report (report["passed"] is the verdict). Imports
    nothing from torch, kvtrace.models or kvtrace.exporter."""
    from kvtrace import configs
    from kvtrace.manifest import load_manifest
    from kvtrace.runtime.model import Model

    g = golden if isinstance(golden, Golden) else load(golden)
    manifest = load_manifest(artifact).data
    notes = check_compatible(g, manifest, artifact)
    key, row = _tolerance_row(g, manifest, notes)
    tol = {**row, **{k: v for k, v in (tolerance or {}).items() if v is not None}}
    opts = {} if threads is None else {"threads": threads}
    m = Model.load(artifact, backend=backend, **opts)
    try:
        result = parity.judge(parity.replay(m, g.trace), tol)
    finally:
        close = getattr(m, "close", None)
        if close:
            close()
    if key == (manifest.get("quant") or {}).get("scheme") and parity.wants_exact_check(manifest, m.backend_name):
        # recorded from the same quantised weights: the exact check too (runtime/parity.py)
        exact = Model.load(artifact, backend=m.backend_name, accuracy_level=parity.EXACT_ACCURACY_LEVEL, **opts)
        try:
            row = {**configs.TOLERANCES[manifest["dtype"]],
                   **{k: v for k, v in (tolerance or {}).items() if v is not None}}
            parity.add_exact_check(result, parity.judge(parity.replay(exact, g.trace), row))
        finally:
            exact.close()
    result["notes"] = notes + result["notes"]
    result["tolerance_row"] = key
    result["seconds"]["reference"] = None  # recorded elsewhere, earlier
    p = g.header["prompts"]
    reference = {"kind": "golden", "path": str(g.path), "format_version": g.header["format_version"],
                 "kvtrace_version": g.header.get("kvtrace_version"), "created": g.header.get("created"),
                 "recorded": g.header["reference"], "recorded_beside": g.header.get("artifact"),
                 "logits": g.header["logits"]}
    return parity.make_report(manifest, artifact=artifact, backend=getattr(m, "backend_name", backend),
                              against="golden", reference=reference, prompts=g.prompts, steps=g.steps,
                              seed=p.get("seed"), result=result)


def _tolerance_row(g: Golden, manifest: dict, notes: list) -> tuple[str, dict]:
    """The TOLERANCES row for replaying `g` on an artifact: its dtype's; for a quantised artifact
    the scheme's row when the golden was recorded from the same quantised weights, else the
    scheme's ":unquantized" (accuracy) row. A golden of quantised weights replayed on an
    unquantised artifact is judged by that scheme's accuracy row too."""
    from kvtrace import configs

    art_q = manifest.get("quant")
    ref_q = (g.header.get("reference") or {}).get("quant")
    if art_q:
        same = bool(ref_q) and all(ref_q.get(k) == art_q.get(k) for k in ("scheme", "group_size", "method")) \
            and ref_q.get("scale_dtype") == manifest.get("dtype")
        if not same:
            notes.append("the golden was recorded from " + ("other quantised weights" if ref_q else
                         "the unquantised weights") + f": judged by the {art_q['scheme']} accuracy row")
        return configs.tolerance_for(manifest, unquantized=not same)
    if ref_q:
        notes.append(f"the golden was recorded from {ref_q['scheme']}-quantised weights: judged by that scheme's "
                     "accuracy row")
        key = configs.tolerance_key(manifest["dtype"], ref_q["scheme"], unquantized=True)
        return key, configs.TOLERANCES[key]
    return configs.tolerance_for(manifest)


def check(golden, artifact, *, backend: str = "auto", **tolerance) -> dict:
    """For users' own test suites: replay and raise ParityFailure (naming each failing row's first
    failing step) unless it passes; returns the report.

        from kvtrace.runtime.golden import check
        def test_parity():
            check("golden.npz", "my-artifact/")
    """
    report = replay(artifact, golden, backend=backend, tolerance=tolerance)
    if not report["passed"]:
        rows = [f"row {r['row']}: {parity.describe_failure(r['first_failure'])}" for r in report["rows"]
                if not r["passed"]]
        raise ParityFailure("; ".join(report["failures"] + rows))
    return report


def size_summary(path: Path) -> str:
    n = Path(path).stat().st_size
    return f"{n / 1024:.0f} KiB" if n < (1 << 20) else f"{n / (1 << 20):.1f} MiB"

