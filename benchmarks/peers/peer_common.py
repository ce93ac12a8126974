"""Shared helpers for the peer runners (stdlib only; imported from each peer's own venv).

Every runner follows the protocol documented at the top of run_peers.py: it parses the common
arguments with `common_args()`, times `warmup` untimed + `repeats` timed runs with the same
definitions, and prints ONE JSON object (the last line of stdout) built by `result()`.

Timing definitions (identical for every peer):
  prefill_ms  wall time from the start of the generate call (prompt ids already in memory, KV
              cache empty) until the first new token of every row is chosen, i.e. the
              128-token prompt forward pass + greedy pick of token 1 (time to first token).
  decode_ms_per_token  (time at which token 64 is chosen - time at which token 1 is chosen)/63:
              63 one-token forward passes over the whole batch, each followed by the greedy pick.
  tokens_per_s  batch * 1000 / decode_ms_per_token (decode throughput over all rows).
  cpu_util     process CPU time (all threads) / wall time over the whole run; about T for an
              undisturbed run with T busy threads, lower when the machine is oversubscribed
              (spin-waiting runtimes such as OpenMP count their spinning as CPU time).
  Medians are over the timed repeats; the warm-up run(s) are discarded.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

now = time.perf_counter


def common_args(description):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint dir (source)")
    ap.add_argument("--model-dir", required=True, help="converted model dir/file for this peer")
    ap.add_argument("--variant", required=True, help="precision variant name (f32, q8_0, int8, ...)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-file", required=True, help="JSON {'ids': [[...]*128]*8}")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    return ap


def load_prompt(args):
    with open(args.prompt_file) as f:
        ids = json.load(f)["ids"]
    if len(ids) < args.batch:
        sys.exit(f"prompt file has {len(ids)} rows, batch {args.batch} asked")
    rows = [list(map(int, r[: args.prompt_len])) for r in ids[: args.batch]]
    assert all(len(r) == args.prompt_len for r in rows)
    return rows


def rss_mb():
    """Current resident set size (MB) from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run_repeats(args, once):
    """once() -> (prefill_s, decode_total_s, n_decode_steps, first_row_new_ids). Returns raw lists."""
    raw = {"prefill_ms": [], "decode_ms_per_token": [], "tokens_per_s": [], "e2e_ms": [],
           "cpu_util": []}
    first_ids = None
    for i in range(args.warmup + args.repeats):
        c0, w0 = time.process_time(), now()
        pre, dec, n_steps, ids = once()
        c1, w1 = time.process_time(), now()
        util = (c1 - c0) / max(w1 - w0, 1e-9)
        if n_steps != args.new_tokens - 1:
            raise RuntimeError(f"expected {args.new_tokens - 1} decode steps, got {n_steps}")
        if len(ids) != args.new_tokens:
            raise RuntimeError(f"expected {args.new_tokens} new tokens, got {len(ids)}")
        dms = dec * 1000.0 / n_steps
        tag = "warmup" if i < args.warmup else "rep"
        log(f"  {tag}: prefill {pre * 1000:.1f} ms, decode {dms:.2f} ms/tok, cpu util {util:.2f}")
        if i < args.warmup:
            continue
        raw["prefill_ms"].append(pre * 1000.0)
        raw["decode_ms_per_token"].append(dms)
        raw["tokens_per_s"].append(args.batch * 1000.0 / dms)
        raw["e2e_ms"].append((pre + dec) * 1000.0)
        raw["cpu_util"].append(util)
        first_ids = ids
    return raw, first_ids


def result(args, peer, raw, first_ids, versions, timing, load_s, rss_after_load, extra=None):
    med = {k: statistics.median(v) for k, v in raw.items() if v}
    out = {
        "peer": peer,
        "variant": args.variant,
        "batch": args.batch,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "median": med,
        "raw": raw,
        "load_s": load_s,
        "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
        "first_row_new_ids": first_ids,
        "versions": dict(versions, python=platform.python_version()),
        "timing": timing,
        "model_dir": args.model_dir,
    }
    if extra:
        out.update(extra)
    sys.stdout.flush()
    print(json.dumps(out), flush=True)
