"""`kvtrace bench`: prefill latency, decode latency per token, throughput and peak memory.

No torch import unless `--compare hf` asks for transformers' numbers.

Method (ours, per batch size B): random prompts of exactly --prompt-len tokens (one seeded
generator, the same prompts for both sides). A warm-up run first (session caches, allocator,
page faults of the weights), then --repeats runs of
    prefill  = Model.start(prompts, logits="last")  (all prompt tokens, one call; logits of each
               row's last token only, as generation does and as transformers' generate does)
    decode   = new_tokens - 1 calls of Model.step   (the first new token comes from the prefill),
               each fed the greedy token of the previous call
prefill ms = median over repeats; decode ms/token = median over repeats of (decode time) /
(new_tokens - 1); tokens/s = B * 1000 / decode ms per token.

transformers (--compare hf), timed the same way from the outside of `generate`: greedy,
min_new_tokens = max_new_tokens, use_cache, the same prompts;
    prefill ms       = median t(generate, 1 new token)
    decode ms/token  = (median t(generate, N new tokens) - prefill ms) / (N - 1)

Order: every warm-up first, then the timed runs of both sides interleaved (ours, hf, ours,
hf, ...), so a change of load on a shared machine hits both alike.

Peak memory is the process's peak RSS (resource.ru_maxrss), a high-water mark: ours is read
after our warm-ups, before transformers is loaded. Thread counts: onnxruntime intra-op and
torch both use every core available to the process (sched_getaffinity); the output says so.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from kvtrace import options
from kvtrace.errors import KvtraceError
from kvtrace.files import peak_rss_mb
from kvtrace.options import SEED_MAX, check_int

from .parity import make_prompts


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int, avoid=()) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_len` ids, avoiding special tokens (an early EOS
    would not stop anything here, but a pad id in a prompt means something to some models)."""
    return make_prompts(batch, prompt_len, vocab_size, seed, avoid, ragged=False)


def load_baseline(name: str):
    """A comparison side for --compare NAME, found through the "kvtrace.baselines" entry points
    (the runtime never imports torch code itself: kvtrace[export] registers "hf", transformers'
    generate, in kvtrace/exporter/hf_baseline.py). It has load(checkpoint, threads) -> (model,
    versions) and runner(model, prompts, new_tokens) -> run() -> (t(1 token) ms, t(N tokens) ms)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="kvtrace.baselines"):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as e:
                raise KvtraceError(f"--compare {name}: its baseline needs packages that are not installed ({e}); "
                                   "pip install 'kvtrace[export,test]'") from e
    raise KvtraceError(f"--compare {name}: no such baseline installed (kvtrace[export] provides 'hf')")


def _median(xs) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- ours
def load_model(artifact: str, backend: str, threads: int, verify: bool = False):
    """Model.load with onnxruntime's intra-op threads = `threads` (the backend option
    `threads`); a backend without that option (TensorRT) loads with its defaults."""
    from .model import Model

    try:
        return Model.load(artifact, backend=backend, verify=verify, threads=threads), f"{threads} threads"
    except TypeError as e:
        if "threads" not in str(e):
            raise
        return Model.load(artifact, backend=backend, verify=verify), "backend default"


def ours_runner(m, prompts: list[list[int]], new_tokens: int):
    """One run: prefill, then new_tokens - 1 greedy decode steps -> (prefill ms, decode ms/token)."""

    def run():
        t0 = time.perf_counter()
        logits = m.start(prompts, logits="last")  # (B, 1, V): what generation computes
        t1 = time.perf_counter()
        tok = np.asarray(logits)[:, -1].argmax(-1)  # (B,)
        for _ in range(new_tokens - 1):
            tok = np.asarray(m.step(tok.tolist())).argmax(-1)  # (B,)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / (new_tokens - 1)

    return run


def summarize_ours(runs) -> dict:
    pre, dec = [r[0] for r in runs], [r[1] for r in runs]
    return {"prefill_ms": _median(pre), "decode_ms_per_token": _median(dec),
            "prefill_ms_runs": [round(x, 2) for x in pre], "decode_ms_per_token_runs": [round(x, 3) for x in dec]}


def summarize_hf(runs, new_tokens: int) -> dict:
    t1, tn = [r[0] for r in runs], [r[1] for r in runs]
    pre = _median(t1)
    return {"prefill_ms": pre, "decode_ms_per_token": (_median(tn) - pre) / (new_tokens - 1),
            "generate_1_ms_runs": [round(x, 2) for x in t1],
            "generate_n_ms_runs": [round(x, 2) for x in tn]}


# --------------------------------------------------------------------------- driver
def _read_manifest(artifact: str) -> dict:
    from kvtrace.manifest import load_manifest

    return load_manifest(artifact).data


def _check_room(manifest: dict, batches, prompt_len: int, new_tokens: int) -> None:
    cfg, io = manifest["config"], manifest.get("io") or {}
    if io.get("max_batch") and max(batches) > io["max_batch"]:
        raise KvtraceError(f"--batch {max(batches)}: the artifact takes at most {io['max_batch']} rows")
    room = min(x for x in (io.get("max_seq"), cfg.get("max_position")) if x)
    if prompt_len + new_tokens > room:
        raise KvtraceError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the artifact's "
                           f"{room} positions (export with a larger --max-seq)")


def _baseline_checkpoint(manifest: dict, compare: str, checkpoint: str | None) -> str:
    src = manifest.get("source") or {}
    if src.get("kind") == "builtin" and not checkpoint:
        raise KvtraceError(f"--compare {compare}: this artifact was exported from a built-in configuration, which "
                           "has no Hugging Face checkpoint; pass --checkpoint DIR")
    path = checkpoint or src.get("path")
    if not path or not (Path(path) / "config.json").is_file():
        raise KvtraceError(f"--compare {compare}: checkpoint {path}: no config.json there; pass --checkpoint DIR")
    return str(path)


def _interleaved(runners: dict, repeats: int) -> dict:
    """{side: [run(), ...]}: the sides alternate run by run, so a change of load hits both alike."""
    runs = {side: [] for side in runners}
    for _ in range(repeats):
        for side, run in runners.items():
            runs[side].append(run())
    return runs


def _flat(batches: dict) -> dict:
    """batch size -> number views (for CI) of prefill, decode and throughput."""
    return {k: {b: v[k] for b, v in batches.items()} for k in ("prefill_ms", "decode_ms_per_token", "tokens_per_s")}


def bench(artifact: str, *, backend: str = "auto", batches=(1,), prompt_len: int = 128, new_tokens: int = 64,
          repeats: int = 3, compare: str | None = None, checkpoint: str | None = None, seed: int = 0,
          log=None, verify: bool = False) -> dict:
    """Run the benchmark; returns the JSON-able result dict.

    Warm-ups first (sessions, allocators, page faults of the weights), reading our peak RSS before
    the baseline is even loaded; then the timed runs, ours and the baseline's interleaved."""
    log = log or (lambda s: None)
    for name, v, lo in (("--prompt-len", prompt_len, 1), ("--new-tokens", new_tokens, 2), ("--repeats", repeats, 1)):
        check_int(name, v, lo)
    for b in batches:
        check_int("--batch", b, 1)
    check_int("seed", seed, 0, SEED_MAX - 1024)
    manifest = _read_manifest(artifact)
    _check_room(manifest, batches, prompt_len, new_tokens)
    baseline = ckpt = None
    if compare:  # a missing baseline or checkpoint fails before any timing
        baseline = load_baseline(compare)
        ckpt = _baseline_checkpoint(manifest, compare, checkpoint)
    cfg, io = manifest["config"], manifest.get("io") or {}
    n = cores()
    avoid = (cfg.get("bos_token_id"), cfg.get("eos_token_id"), cfg.get("pad_token_id"))
    prompts = {b: random_prompts(b, prompt_len, cfg["vocab_size"], seed + b, avoid) for b in batches}
    rss0 = peak_rss_mb()
    m, thread_note = load_model(artifact, backend, n, verify=verify)
    result = {
        "artifact": str(artifact), "architecture": manifest.get("architecture"), "dtype": manifest.get("dtype"),
        "layout": io.get("layout"), "backend": getattr(m, "backend_name", backend),
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "seed": seed,
        # how the prefill is timed: logits of each row's last prompt token only, as generation does
        # (and transformers' generate); "all" positions are for scoring and parity
        "prefill_logits": "last",
        "cores": n, "threads": {"onnxruntime_intra_op": n if thread_note.endswith("threads") else None, "how": thread_note},
        "load_avg_start": os.getloadavg()[0],
        "peak_rss_mb_before_load": round(rss0, 1),
        "batches": {},
    }
    log(f"kvtrace bench {artifact}: backend {result['backend']}, {n} cores; onnxruntime intra-op threads: "
        f"{thread_note}; load average {result['load_avg_start']:.2f}")
    runners = {b: {"ours": ours_runner(m, prompts[b], new_tokens)} for b in batches}
    for b in batches:
        runners[b]["ours"]()  # warm-up
        result["batches"][str(b)] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if baseline is not None:
        model, versions = baseline.load(ckpt, n)
        result["hf"] = {"checkpoint": ckpt, **versions, "batches": {}}
        log(f"transformers {versions['transformers']} (torch {versions['torch']}, {versions['torch_threads']} "
            f"threads, attention {versions['attention']}) on {ckpt}")
        for b in batches:
            runners[b]["hf"] = baseline.runner(model, prompts[b], new_tokens)
            runners[b]["hf"]()  # warm-up
            result["hf"]["batches"][str(b)] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    for b in batches:
        runs = _interleaved(runners[b], repeats)
        o = result["batches"][str(b)]
        o.update(summarize_ours(runs["ours"]))
        o["tokens_per_s"] = b * 1e3 / o["decode_ms_per_token"]
        log(f"  ours  batch {b}: prefill {o['prefill_ms']:.1f} ms, decode {o['decode_ms_per_token']:.2f} ms/token, "
            f"{o['tokens_per_s']:.1f} tokens/s, peak RSS {o['peak_rss_mb']:.0f} MiB")
        if "hf" in runs:
            h = result["hf"]["batches"][str(b)]
            h.update(summarize_hf(runs["hf"], new_tokens))
            h["tokens_per_s"] = b * 1e3 / h["decode_ms_per_token"]
            o["ratio_vs_hf"] = {k: o[k] / h[k] for k in ("prefill_ms", "decode_ms_per_token", "tokens_per_s")}
            log(f"  hf    batch {b}: prefill {h['prefill_ms']:.1f} ms, decode {h['decode_ms_per_token']:.2f} "
                f"ms/token, {h['tokens_per_s']:.1f} tokens/s")
    result["load_avg_end"] = os.getloadavg()[0]
    result.update(_flat(result["batches"]))
    if "hf" in result:
        result["hf"].update(_flat(result["hf"]["batches"]))
        result["ratio_vs_hf"] = {k: v["ratio_vs_hf"] for k, v in result["batches"].items()}
    return result


def format_table(r: dict) -> str:
    lines = [
        f"kvtrace bench  {r['artifact']}",
        f"  {r['architecture']} {r['dtype']} {r['layout']} cache, backend {r['backend']}; prompt {r['prompt_len']} "
        f"tokens, {r['new_tokens']} new tokens, median of {r['repeats']} runs after a warm-up",
        f"  threads: {r['cores']} cores; onnxruntime intra-op {r['threads']['how']}"
        + (f"; torch {r['hf']['torch_threads']}" if "hf" in r else ""),
        f"  load average {r['load_avg_start']:.2f} at start, {r['load_avg_end']:.2f} at end"
        + ("  (other work on the machine: numbers are noisy)" if max(r['load_avg_start'], r['load_avg_end']) > 0.5
           else ""),
        "  prefill: logits of each row's last prompt token only (as generation does, and like transformers' "
        "generate)",
        "",
    ]
    has_hf = "hf" in r
    head = f"  {'batch':>5}  {'side':<12} {'prefill ms':>10}  {'decode ms/tok':>13}  {'tokens/s':>9}  {'peak RSS MiB':>12}"
    lines.append(head)
    for b, o in r["batches"].items():
        lines.append(f"  {b:>5}  {'kvtrace':<12} {o['prefill_ms']:>10.1f}  {o['decode_ms_per_token']:>13.2f}  "
                     f"{o['tokens_per_s']:>9.1f}  {o['peak_rss_mb']:>12.0f}")
        if has_hf:
            h = r["hf"]["batches"][b]
            q = o["ratio_vs_hf"]
            lines.append(f"  {b:>5}  {'transformers':<12} {h['prefill_ms']:>10.1f}  {h['decode_ms_per_token']:>13.2f}  "
                         f"{h['tokens_per_s']:>9.1f}  {h['peak_rss_mb']:>12.0f}")
            lines.append(f"  {b:>5}  {'ours/hf':<12} {q['prefill_ms']:>10.2f}  {q['decode_ms_per_token']:>13.2f}  "
                         f"{q['tokens_per_s']:>9.2f}")
    if has_hf:
        lines.append("")
        lines.append("  (transformers' peak RSS includes ours: one process, ru_maxrss is a high-water mark)")
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser; kvtrace/options.py checks values)."""
    p.add_argument("artifact", type=options.artifact_path)
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=options.integer(1), nargs="+", default=[1])
    p.add_argument("--prompt-len", type=options.integer(1), default=128)
    p.add_argument("--new-tokens", type=options.integer(2), default=64)
    p.add_argument("--repeats", type=options.integer(1, 10000), default=3)
    p.add_argument("--compare", metavar="BASELINE",
                   help="also time a baseline in the same run, alternated: hf = transformers' generate "
                        "(needs kvtrace[export] and transformers)")
    p.add_argument("--checkpoint", type=options.existing_path,
                   help="checkpoint for --compare hf (default: the manifest's source)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="check the sha256 of every artifact file, however large (default: sizes of all, "
                        "digests of files up to 256 MiB)")


def main(args) -> int:
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: None)
    r = bench(args.artifact, backend=args.backend, batches=args.batch, prompt_len=args.prompt_len,
              new_tokens=args.new_tokens, repeats=args.repeats, compare=args.compare, checkpoint=args.checkpoint,
              seed=getattr(args, "seed", 0), log=log, verify=getattr(args, "verify", False))
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(format_table(r))
    return 0
