"""kvtrace fp32 / int8 / int4 against the CPU peers, side by side in one run, alternated.

    python3 benchmarks/cpu_peers.py --rounds 3 --json cpu_peers.json [--markdown table.md]

Peers (each in its own virtualenv under --peers-root, made by benchmarks/peers/install_peers.sh):
llama.cpp (llama-cpp-python 0.3.36) f32 / q8_0 / q4_0, onnxruntime-genai 0.18 fp32 / int4,
CTranslate2 4.8.5 float32 / int8. All run the same random Llama-shaped checkpoint (hidden 768,
12 layers, 12 heads, 4 kv heads, intermediate 2048, vocab 50304: 153M parameters; made by
benchmarks/peers/make_random_checkpoint.py --preset small153m when absent), prompt 128, 64 new
tokens, greedy, batch 1 and 8, 2 threads. benchmarks/peers/run_peers.py converts the checkpoint
for each peer (cached) and runs every (entry, batch) once per round in a fresh process, the
entries alternated; kvtrace joins the rotation through benchmarks/peers/runner_kvtrace.py (same
protocol and timing definitions: prefill = time to the first token of every row; decode =
(t(token 64) - t(token 1)) / 63). The kvtrace artifacts are exported here first (`kvtrace export
--checkpoint CKPT --max-seq 256 [--quant int8|int4]`, validated), cached by checkpoint and options.

The goals of issue 11 are printed with the measured ratios:
  int4 decode <= llama.cpp q4_0; int8 decode <= llama.cpp q8_0; fp32 decode and prefill ahead of
  every fp32 peer; prefill 128 of int8 and int4 <= CTranslate2 int8; batch 8 int4 tokens/s >= every
  peer's batch-8 tokens/s.
Every call records the CPU time other processes took meanwhile (foreign cores): on a shared
machine the figures are indicative; rerun on a quiet one (--quiet-wait 60 waits for idle CPUs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
sys.path.insert(0, str(PEERS))
import run_peers  # noqa: E402  (stdlib only)

VARIANTS = {  # name -> extra `kvtrace export` options
    "fp32": [],
    "int8": ["--quant", "int8"],
    "int4": ["--quant", "int4"],
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def variant_options(name: str) -> list[str]:
    """fp32 | int8 | int4 | int8:G | int4:G (group size G) | NAME:G:METHOD."""
    parts = name.split(":")
    if parts[0] not in VARIANTS:
        raise SystemExit(f"--kvtrace {name}: expected fp32, int8, int4 (optionally :GROUP[:METHOD])")
    opts = list(VARIANTS[parts[0]])
    if len(parts) > 1:
        opts += ["--group-size", parts[1]]
    if len(parts) > 2:
        opts += ["--quant-method", parts[2]]
    return opts


def export(kvtrace_bin: str, ckpt: Path, out: Path, opts: list[str]) -> Path:
    """kvtrace export, unless `out` holds an export of the same checkpoint and options."""
    stamp = hashlib.sha256((run_peers.ckpt_fingerprint(str(ckpt)) + " ".join(opts)).encode()).hexdigest()[:16]
    sfile = out.with_name(out.name + ".stamp")
    if out.is_dir() and sfile.is_file() and sfile.read_text() == stamp:
        log(f"kvtrace {out.name}: cached")
        return out
    cmd = [kvtrace_bin, "export", "--checkpoint", str(ckpt), "--max-seq", "256", "--max-batch", "8",
           "--external-data", "--out", str(out), "--force", *opts]
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True)
    sfile.write_text(stamp)
    return out


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def goals(summary: list[dict], stat: str = "median") -> list[dict]:
    """The issue's goals against the measured medians (stat="median") or the fastest run of each
    entry (stat="min": on a shared machine the least disturbed run; tokens/s then from the fastest
    decode)."""
    m = {}
    for r in summary:
        v = r.get(stat)
        if v and stat == "min":
            v = {**v, "tokens_per_s": r["batch"] * 1000.0 / v["decode_ms_per_token"]}
        m[(r["entry"], r["batch"])] = v

    def get(entry, batch, key):
        v = m.get((entry, batch))
        return None if not v else v.get(key)

    out = []

    def goal(text, ours, theirs, lower_is_better=True):
        r = ratio(ours, theirs)
        met = None if r is None else (r <= 1.0 if lower_is_better else r >= 1.0)
        out.append({"goal": text, "stat": stat, "kvtrace": ours, "peer": theirs, "ratio": r, "met": met})

    goal("int4 decode ms/token <= llama.cpp q4_0 (batch 1)", get("kvtrace-int4", 1, "decode_ms_per_token"),
         get("llamacpp-q4_0", 1, "decode_ms_per_token"))
    goal("int8 decode ms/token <= llama.cpp q8_0 (batch 1)", get("kvtrace-int8", 1, "decode_ms_per_token"),
         get("llamacpp-q8_0", 1, "decode_ms_per_token"))
    for peer in ("llamacpp-f32", "ortgenai-fp32", "ct2-float32"):
        goal(f"fp32 decode ms/token <= {peer} (batch 1)", get("kvtrace-fp32", 1, "decode_ms_per_token"),
             get(peer, 1, "decode_ms_per_token"))
        goal(f"fp32 prefill ms <= {peer} (batch 1)", get("kvtrace-fp32", 1, "prefill_ms"), get(peer, 1, "prefill_ms"))
    for ours in ("kvtrace-int8", "kvtrace-int4"):
        goal(f"{ours.split('-')[1]} prefill 128 ms <= CTranslate2 int8 (batch 1)", get(ours, 1, "prefill_ms"),
             get("ct2-int8", 1, "prefill_ms"))
    peers8 = {e: v["tokens_per_s"] for (e, b), v in m.items() if b == 8 and v and not e.startswith("kvtrace")}
    if peers8:
        best = max(peers8, key=peers8.get)
        goal(f"int4 batch-8 tokens/s >= every peer (best: {best})", get("kvtrace-int4", 8, "tokens_per_s"),
             peers8[best], lower_is_better=False)
    return out


def markdown(summary: list[dict], gl: list[dict], load: dict) -> str:
    lines = ["| system | batch | prefill 128 ms | decode ms/token | tokens/s | peak RSS MB | foreign cores |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        if "median" not in r:
            lines.append(f"| {r['entry']} | {r['batch']} | failed | | | | |")
            continue
        md, lo, hi = r["median"], r["min"], r["max"]
        fc = r.get("foreign_cpu_cores") or []
        lines.append(f"| {r['entry']} | {r['batch']} | {md['prefill_ms']:.0f} ({lo['prefill_ms']:.0f}–"
                     f"{hi['prefill_ms']:.0f}) | {md['decode_ms_per_token']:.2f} ({lo['decode_ms_per_token']:.2f}–"
                     f"{hi['decode_ms_per_token']:.2f}) | {md['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{max(fc) if fc else 0:.2f} |")
    lines += ["", "| goal | statistic | kvtrace | peer | ratio | met |", "|---|---|---|---|---|---|"]
    for g in gl:
        f = (lambda x: "n/a" if x is None else f"{x:.2f}")
        lines.append(f"| {g['goal']} | {g['stat']} | {f(g['kvtrace'])} | {f(g['peer'])} | {f(g['ratio'])} | "
                     f"{'n/a' if g['met'] is None else ('yes' if g['met'] else 'no')} |")
    lines.append("")
    lines.append(f"load average at start {load.get('start')}, at end {load.get('end')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers-root", default=run_peers.DEFAULT_PEERS_ROOT)
    ap.add_argument("--checkpoint", help="Llama-shaped HF checkpoint (default PEERS_ROOT/ckpt/llama153m, made when "
                                         "absent)")
    ap.add_argument("--work", help="kvtrace artifacts (default PEERS_ROOT/kvtrace-artifacts)")
    ap.add_argument("--kvtrace", nargs="+", default=["fp32", "int8", "int4"],
                    help="kvtrace variants: fp32, int8, int4, int4:128 (group size), int4:32:rtn (method)")
    ap.add_argument("--kvtrace-python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="Python of the environment where kvtrace is installed")
    ap.add_argument("--peers", nargs="*", default=None, help="passed to run_peers.py (default: all three)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-wait", type=float, default=0)
    ap.add_argument("--retries", type=int, default=0)
    ap.add_argument("--json", required=True, help="run_peers.py's full report, plus the goals")
    ap.add_argument("--markdown", help="also write the table (Markdown) here")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="passed to run_peers.py: a call during which other processes took more cores is disturbed")
    ap.add_argument("--report-only", action="store_true", help="only re-render the goals and table of --json")
    args = ap.parse_args(argv)

    if args.report_only:
        return _report(args)
    root = Path(args.peers_root)
    ckpt = Path(args.checkpoint) if args.checkpoint else root / "ckpt" / "llama153m"
    if not (ckpt / "config.json").is_file():
        tok = ROOT.parent / "shared" / "fixtures" / "gpt_neox_20b_tokenizer.json"
        cmd = [sys.executable, str(PEERS / "make_random_checkpoint.py"), "--out", str(ckpt), "--preset", "small153m"]
        if tok.is_file():
            cmd += ["--tokenizer", str(tok)]
        log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    work = Path(args.work) if args.work else root / "kvtrace-artifacts"
    work.mkdir(parents=True, exist_ok=True)
    kv_bin = str(Path(args.kvtrace_python).with_name("kvtrace"))
    extra = []
    for v in args.kvtrace:
        art = export(kv_bin, ckpt, work / f"{ckpt.name}-{v.replace(':', '-')}", variant_options(v))
        name = f"kvtrace-{v.replace(':', '-g', 1).replace(':', '-')}"
        extra += ["--extra", f"{name}={args.kvtrace_python} {PEERS / 'runner_kvtrace.py'} --model-dir {art} "
                             f"--variant {v}"]
    cmd = [sys.executable, str(PEERS / "run_peers.py"), "--peers-root", str(root), "--checkpoint", str(ckpt),
           "--rounds", str(args.rounds), "--threads", str(args.threads), "--batches", *map(str, args.batches),
           "--quiet-wait", str(args.quiet_wait), "--retries", str(args.retries), "--membw",
           "--max-foreign", str(args.max_foreign),
           "--parity-ref", "llamacpp-f32", "--out", args.json, *extra]
    if args.peers is not None:
        cmd += ["--peers", *args.peers]
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True)
    return _report(args)


def _report(args) -> int:
    report = json.loads(Path(args.json).read_text())
    gl = goals(report["summary"]) + goals(report["summary"], "min")
    report["goals"] = gl
    Path(args.json).write_text(json.dumps(report, indent=1))
    md = markdown(report["summary"], gl, {"start": report.get("loadavg_start"), "end": report.get("loadavg_end")})
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
