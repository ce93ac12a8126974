"""`kvtrace serve` under load, against `kvtrace bench` on the same artifact, in the same run.

    python3 benchmarks/serve_throughput.py [--work DIR] [--repeats R] [--rounds N] [--clients 1 8 16]

1. the random Pythia-160M-shaped GPT-NeoX fp32 checkpoint and its static artifact (max_seq 256,
   max_batch 8), made once and cached in DIR (benchmarks/decode_160m.py's helpers);
2. starts `kvtrace serve ART --port 0` (one process, kept for the whole run, warm);
3. R repeats, alternated: `kvtrace bench ART --batch 1 8 --prompt-len 128 --new-tokens 64`
   (the baseline: decode tokens/s at batch 8, prefill ms of one 128-token prompt), then for each
   client count C: C concurrent streaming clients, each sending N requests one after another
   (prompt: 128 random token ids, different for every request; max_tokens 64; greedy). Per
   request: time to first token (send -> first token chunk), inter-token latency (between token
   chunks, per token: every chunk lists its tokens in the `token_ids` extension). Aggregate
   tokens/s = all generated tokens / wall time of the C-client run.

Goals (issue 12): with 8 clients, aggregate tokens/s >= 0.8 x bench's batch-8 decode tokens/s,
and median TTFT <= 2 x bench's batch-1 prefill ms. Both numbers of each ratio come from the same
repeat (medians over repeats are printed). The results go to DIR/serve-<UTC time>.json.
Timings on a shared machine are indicative: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PROMPT_LEN, NEW_TOKENS = 128, 64
GOAL_TPUT, GOAL_TTFT = 0.8, 2.0


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def start_server(art: Path, threads: int | None) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "kvtrace.cli", "serve", str(art), "--port", "0", "--max-queue", "64",
           "--model-name", "bench"]
    if threads:
        cmd += ["--threads", str(threads)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    m = re.search(r"listening on http://[\d.]+:(\d+)", line)
    if not m:
        sys.exit(f"serve_throughput: the server did not start: {line}{p.stderr.read()}")
    port = int(m.group(1))
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()  # drain its log
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return p, port
        except OSError:
            pass
        time.sleep(0.2)
    p.kill()
    sys.exit("serve_throughput: the server was not ready after 300 s")


def one_request(port: int, prompt: list[int]) -> dict:
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                       "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, last, itl, n = None, None, [], 0
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now = time.perf_counter()
        obj = json.loads(line[6:])
        if "error" in obj:
            raise RuntimeError(obj["error"]["message"])
        k = len(obj["choices"][0].get("token_ids") or [])
        if k == 0:
            continue
        if ttft is None:
            ttft = now - t0
            k -= 1
        elif last is not None:
            itl += [(now - last) / k] * k
        n += len(obj["choices"][0]["token_ids"])
        last = now
    conn.close()
    return {"ttft": ttft, "itl": itl, "tokens": n, "e2e": time.perf_counter() - t0}


def load_run(port: int, clients: int, rounds: int, vocab: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = [[rng.integers(3, vocab).item() for _ in range(PROMPT_LEN)] for _ in range(clients * rounds)]
    results, errors = [], []

    def client(k):
        for j in range(rounds):
            try:
                results.append(one_request(port, prompts[k * rounds + j]))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"serve_throughput: {len(errors)} requests failed, e.g. {errors[0]}")
    toks = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] * 1e3 for r in results]
    itl = [x * 1e3 for r in results for x in r["itl"]]
    return {"clients": clients, "requests": len(results), "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(itl, 50),
            "itl_ms_p99": pct(itl, 99)}


def bench(art: Path, repeats: int) -> dict:
    from decode_160m import _cli

    p = _cli("bench", str(art), "--batch", "1", "8", "--prompt-len", str(PROMPT_LEN), "--new-tokens",
             str(NEW_TOKENS), "--repeats", str(repeats), "--json", capture=True)
    r = json.loads(p.stdout)
    return {"prefill_ms_b1": r["prefill_ms"]["1"], "decode_tokens_per_s_b8": 8 * 1000 / r["decode_ms_per_token"]["8"],
            "decode_ms_per_token_b8": r["decode_ms_per_token"]["8"], "decode_ms_per_token_b1": r["decode_ms_per_token"]["1"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.environ.get("KVTRACE_BENCH_DIR", str(Path.home() / ".cache" / "kvtrace-bench")))
    ap.add_argument("--repeats", type=int, default=2, help="alternated baseline/server repeats")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client per run")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--bench-repeats", type=int, default=2, help="kvtrace bench --repeats")
    ap.add_argument("--threads", type=int, help="onnxruntime threads of the server (default: onnxruntime's)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from decode_160m import ensure_artifact, ensure_checkpoint

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    art = ensure_artifact(work, ensure_checkpoint(work), False)
    vocab = json.loads((art / "kvtrace.json").read_text())["config"]["vocab_size"]
    proc, port = start_server(art, a.threads)
    runs = []
    try:
        print(f"load average before the run: {os.getloadavg()}", file=sys.stderr, flush=True)
        load_run(port, 2, 1, vocab, seed=999)  # warm-up
        for rep in range(a.repeats):
            base = bench(art, a.bench_repeats)
            row = {"repeat": rep, "baseline": base, "serve": {}}
            for c in a.clients:
                row["serve"][str(c)] = r = load_run(port, c, a.rounds, vocab, seed=rep * 100 + c)
                print(f"repeat {rep}: {c:2d} clients: {r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_ms_p50']:.0f} "
                      f"ms, ITL p50 {r['itl_ms_p50']:.1f} ms (bench b8 {base['decode_tokens_per_s_b8']:.1f} tok/s, "
                      f"b1 prefill {base['prefill_ms_b1']:.0f} ms)", file=sys.stderr, flush=True)
            runs.append(row)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"load average after the run: {os.getloadavg()}", file=sys.stderr, flush=True)

    med = statistics.median
    lines = ["| clients | tokens/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) |", "|---|---|---|---|"]
    for c in a.clients:
        rs = [r["serve"][str(c)] for r in runs]
        lines.append(f"| {c} | {med(x['tokens_per_s'] for x in rs):.1f} | {med(x['ttft_ms_p50'] for x in rs):.0f} / "
                     f"{med(x['ttft_ms_p99'] for x in rs):.0f} | {med(x['itl_ms_p50'] for x in rs):.1f} / "
                     f"{med(x['itl_ms_p99'] for x in rs):.1f} |")
    b8 = med(r["baseline"]["decode_tokens_per_s_b8"] for r in runs)
    p1 = med(r["baseline"]["prefill_ms_b1"] for r in runs)
    lines.append(f"\nbaseline `kvtrace bench --batch 1 8`: decode {b8:.1f} tokens/s at batch 8, prefill {p1:.0f} ms "
                 "for one 128-token prompt")
    summary = {}
    if "8" in runs[0]["serve"]:
        tput = [r["serve"]["8"]["tokens_per_s"] / r["baseline"]["decode_tokens_per_s_b8"] for r in runs]
        ttft = [r["serve"]["8"]["ttft_ms_p50"] / r["baseline"]["prefill_ms_b1"] for r in runs]
        summary = {"throughput_ratio_8": med(tput), "ttft_ratio_8": med(ttft)}
        lines.append(f"8 clients: throughput {med(tput):.2f} x bench batch 8 (goal >= {GOAL_TPUT}: "
                     f"{'MET' if med(tput) >= GOAL_TPUT else 'MISSED'}); median TTFT {med(ttft):.2f} x one prefill "
                     f"(goal <= {GOAL_TTFT}: {'MET' if med(ttft) <= GOAL_TTFT else 'MISSED'})")
    print("\n".join(lines))
    out = work / f"serve-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps({"runs": runs, "summary": summary, "args": vars(a)}, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
