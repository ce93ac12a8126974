#!/usr/bin/env python3
"""Peer CPU decode benchmark driver: convert a Hugging Face Llama checkpoint once for each peer
(cached), then run the peers' runners ALTERNATED, each in its own virtualenv, and write one JSON.

Stdlib only; run it with any Python 3.9+:
  python3 benchmarks/peers/run_peers.py --checkpoint PEERS_ROOT/ckpt/llama153m \
      --rounds 3 --out results.json
  # add kvtrace (or anything else that speaks the protocol) to the rotation:
  python3 run_peers.py --checkpoint CKPT --extra 'kvtrace-int8=.venv/bin/python \
      benchmarks/peers/runner_kvtrace.py --model-dir ARTIFACT --variant int8'
  (benchmarks/cpu_peers.py does all of this: exports kvtrace's artifacts, then runs this driver)

Rotation order: round r = 1..R: for every (entry, batch) in order: call its runner once with
--warmup W --repeats K (peer A b1, peer A b8, peer B b1, ... then round 2 ...). Each call is a
fresh process (load, W untimed warm-up runs, K timed runs). Aggregates pool the R*K timed runs.

Shared machine: --quiet-wait S waits (at most S s) before each call until the CPUs are
--quiet-idle idle; each call records foreign_cpu_cores = (machine busy CPU s - the runner's own CPU
s) / wall s during the call, i.e. how many cores other processes took meanwhile. A call above
--max-foreign is flagged "disturbed" and, with --retries N, re-run (the earlier attempt is kept
in "calls" with superseded=true but left out of the aggregates).

RUNNER PROTOCOL (what every entry, built-in or --extra, must implement)
  Command: <python of the peer's venv> <runner script> ARGS   (for --extra: the given command
           line, split with shlex, followed by ARGS; an arg already present in the given command
           line, e.g. --model-dir or --variant, is not added again)
  ARGS (all always passed except where noted):
    --checkpoint DIR     the Hugging Face checkpoint (config.json + safetensors + tokenizer.json)
    --model-dir PATH     the converted model for this entry (built-ins: under --work-dir;
                         --extra: the checkpoint dir unless the command line gives its own)
    --variant NAME       precision variant (f32, q8_0, q4_0, fp32, int4, float32, int8, ...;
                         --extra: the entry name unless given)
    --batch B            rows decoded together (1 or 8)
    --prompt-file F      JSON {"ids": [[int]*prompt_len]*8, ...}; row b of the batch is ids[b];
                         the same file for every entry (seeded, no special/added token ids)
    --prompt-len 128  --new-tokens 64  --threads 2  --warmup W  --repeats K
  Work per run: empty KV cache, prompt ids already in memory, greedy decoding (argmax), exactly
  new-tokens new tokens per row (EOS must not stop it: min length / ignore EOS), batch rows all
  decoded together.
  Timing (same definitions for everyone):
    prefill_ms           start of the run -> first new token of every row chosen (prompt forward
                         pass + greedy pick of token 1) = time to first token
    decode_ms_per_token  (time token 64 chosen - time token 1 chosen) / 63  (63 one-token steps)
    tokens_per_s         B * 1000 / decode_ms_per_token
  Output: ONE JSON object on the LAST line of stdout (anything else: stderr or earlier lines):
    {"peer": str, "variant": str, "batch": int, "threads": int,
     "raw": {"prefill_ms": [K floats], "decode_ms_per_token": [K], "tokens_per_s": [K],
             "e2e_ms": [K], "cpu_util": [K] (optional: process CPU s / wall s per run)},
     "median": {same keys: median over the K runs},
     "peak_rss_mb": float (getrusage ru_maxrss of the runner process),
     "rss_after_load_mb": float, "load_s": float,
     "first_row_new_ids": [new-tokens ints] (row 0 of the last timed run; for a parity check),
     "versions": {pkg: version}, "timing": str (how this runner measures)}  (+ free extra keys)
  Exit status 0 on success; non-zero (or no JSON) is recorded as a failure for that call.
  A reference implementation of the bookkeeping is peer_common.py (stdlib only, importable).
"""
import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# where the peers' virtualenvs, llama.cpp's sources, converted models and logs live (install_peers.sh
# makes them); --peers-root or $KVTRACE_PEERS_ROOT
DEFAULT_PEERS_ROOT = os.environ.get("KVTRACE_PEERS_ROOT", "/work/peers")
PEERS_ROOT = DEFAULT_PEERS_ROOT
VENV = {}


def set_peers_root(root):
    """Point the venvs and llama.cpp's converter at `root` (called by main())."""
    global PEERS_ROOT, LLAMACPP_CONVERT
    PEERS_ROOT = os.path.abspath(root)
    for p in ("llamacpp", "ortgenai", "ct2", "optimum"):
        VENV[p] = os.path.join(PEERS_ROOT, "venv-" + p)
    LLAMACPP_CONVERT = os.path.join(PEERS_ROOT, "src", "llama_cpp_python-0.3.36", "vendor", "llama.cpp",
                                    "convert_hf_to_gguf.py")


RUNNER = {
    "llamacpp": os.path.join(HERE, "runner_llamacpp.py"),
    "ortgenai": os.path.join(HERE, "runner_ortgenai.py"),
    "ct2": os.path.join(HERE, "runner_ct2.py"),
    "optimum": os.path.join(HERE, "runner_optimum.py"),
}
DEFAULT_VARIANTS = {"llamacpp": ["f32", "q8_0", "q4_0"], "ortgenai": ["fp32", "int4"],
                    "ct2": ["float32", "int8"], "optimum": ["fp32"]}
DEFAULT_ROTATION = ["llamacpp", "ortgenai", "ct2"]  # optimum only when asked: --peers ... optimum
VERSION_PKGS = {
    "llamacpp": ["llama_cpp_python", "gguf", "torch", "transformers", "numpy"],
    "ortgenai": ["onnxruntime-genai", "onnxruntime", "onnx", "onnx_ir", "torch", "transformers", "numpy"],
    "ct2": ["ctranslate2", "torch", "transformers", "numpy"],
    "optimum": ["optimum", "optimum-onnx", "onnxruntime", "onnx", "torch", "transformers", "numpy"],
}
LLAMACPP_CONVERT = None
set_peers_root(DEFAULT_PEERS_ROOT)


def membw_exe():
    """PEERS_ROOT/bin/membw, compiled from membw.c beside this script when missing."""
    exe = os.path.join(PEERS_ROOT, "bin", "membw")
    if not os.path.exists(exe):
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", os.path.join(HERE, "membw.c"), "-o", exe],
                       check=True)
    return exe


def py(peer):
    return os.path.join(VENV[peer], "bin", "python")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def loadavg():
    return list(os.getloadavg())


def busy_cpu_seconds():
    """Non-idle CPU seconds of the whole machine so far (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_idle_fraction(seconds=1.0):
    """Fraction of all CPUs idle over `seconds` (from /proc/stat: idle + iowait)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(max_wait, min_idle):
    """Block until the machine is at least min_idle idle (1 s samples) or max_wait s passed."""
    t0 = time.time()
    idle = cpu_idle_fraction()
    while idle < min_idle and time.time() - t0 < max_wait:
        idle = cpu_idle_fraction()
    return {"idle_before": round(idle, 3), "waited_s": round(time.time() - t0, 1)}


# ---------------------------------------------------------------- conversion (cached)

def ckpt_fingerprint(ckpt):
    h = hashlib.sha256()
    for name in sorted(os.listdir(ckpt)):
        p = os.path.join(ckpt, name)
        if not os.path.isfile(p):
            continue
        st = os.stat(p)
        h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}\n".encode())
        if name.endswith(".json") and st.st_size < 1 << 20 and name != "tokenizer.json":
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def cached(out_path, stamp, build, what):
    """Run build() unless out_path exists with a matching stamp file."""
    sfile = out_path.rstrip("/") + ".stamp.json"
    if os.path.exists(out_path) and os.path.exists(sfile):
        with open(sfile) as f:
            if json.load(f).get("stamp") == stamp:
                log(f"convert {what}: cached ({out_path})")
                return {"cached": True}
    log(f"convert {what} -> {out_path}")
    t0 = time.time()
    build()
    info = {"stamp": stamp, "seconds": round(time.time() - t0, 1), "what": what}
    with open(sfile, "w") as f:
        json.dump(info, f)
    return dict(info, cached=False)


def run_logged(cmd, logfile, env=None):
    with open(logfile, "w") as lf:
        lf.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        lf.flush()
        r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        with open(logfile) as lf:
            tail = lf.read()[-3000:]
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{tail}")


def convert_all(args, fp, variants):
    W = args.work_dir
    os.makedirs(os.path.join(W, "logs"), exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    lg = lambda n: os.path.join(W, "logs", n + ".log")  # noqa: E731
    paths, info = {}, {}
    ck = args.checkpoint

    if "llamacpp" in variants:
        base_t = args.gguf_base
        base = os.path.join(W, f"llamacpp-{base_t}.gguf")
        info["llamacpp-" + base_t] = cached(base, fp + base_t, lambda: run_logged(
            [py("llamacpp"), LLAMACPP_CONVERT, ck, "--outtype", base_t, "--outfile", base],
            lg("llamacpp-convert"), env), f"llama.cpp convert_hf_to_gguf --outtype {base_t}")
        for v in variants["llamacpp"]:
            p = os.path.join(W, f"llamacpp-{v}.gguf")
            if v != base_t:
                info["llamacpp-" + v] = cached(p, fp + v, lambda v=v, p=p: run_logged(
                    [py("llamacpp"), os.path.join(HERE, "llamacpp_quantize.py"), base, p, v,
                     "--threads", str(args.threads)], lg("llamacpp-quantize-" + v), env),
                    f"llama_model_quantize {v}")
            paths[("llamacpp", v)] = p
    if "ortgenai" in variants:
        for v in variants["ortgenai"]:
            p = os.path.join(W, f"ortgenai-{v}")
            info["ortgenai-" + v] = cached(p, fp + v, lambda v=v, p=p: run_logged(
                [py("ortgenai"), "-m", "onnxruntime_genai.models.builder", "-i", ck, "-o", p,
                 "-p", v, "-e", "cpu", "-c", os.path.join(W, "ortgenai-cache"),
                 "--extra_options", "hf_token=false"], lg("ortgenai-build-" + v), env),
                f"onnxruntime_genai.models.builder -p {v} -e cpu")
            paths[("ortgenai", v)] = p
    if "ct2" in variants:
        for v in variants["ct2"]:
            q = {"float32": "float32", "int8": "int8", "int8_float32": "int8", "int16": "int16"}.get(v, v)
            p = os.path.join(W, f"ct2-{q}")
            info["ct2-" + q] = cached(p, fp + q, lambda q=q, p=p: run_logged(
                [os.path.join(VENV["ct2"], "bin", "ct2-transformers-converter"), "--model", ck,
                 "--output_dir", p, "--quantization", q, "--force"], lg("ct2-convert-" + q), env),
                f"ct2-transformers-converter --quantization {q}")
            paths[("ct2", v)] = p
    if "optimum" in variants:
        for v in variants["optimum"]:
            if v != "fp32":
                raise SystemExit("optimum: only the fp32 export is wired (optimum-cli export onnx)")
            p = os.path.join(W, f"optimum-{v}")
            info["optimum-" + v] = cached(p, fp + v, lambda p=p: run_logged(
                [os.path.join(VENV["optimum"], "bin", "optimum-cli"), "export", "onnx", "--model", ck,
                 "--task", "text-generation-with-past", p], lg("optimum-export-" + v), env),
                "optimum-cli export onnx --task text-generation-with-past")
            paths[("optimum", v)] = p
    return paths, info


# ---------------------------------------------------------------- prompt

def make_prompt(args, path):
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        cfg = json.load(f)
    vocab = cfg["vocab_size"]
    special = {cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {x for s in special for x in (s if isinstance(s, list) else [s]) if x is not None}
    tok = os.path.join(args.checkpoint, "tokenizer.json")
    allowed = None
    if os.path.exists(tok):
        with open(tok) as f:
            t = json.load(f)
        base_ids = set(t["model"]["vocab"].values()) if isinstance(t["model"].get("vocab"), dict) else None
        added = {a["id"] for a in t.get("added_tokens", [])}
        special |= added
        if base_ids:
            allowed = sorted(i for i in base_ids if i < vocab and i not in special)
    if allowed is None:
        allowed = [i for i in range(vocab) if i not in special]
    rng = random.Random(args.seed)
    ids = [[rng.choice(allowed) for _ in range(args.prompt_len)] for _ in range(max(args.batches))]
    doc = {"seed": args.seed, "method": "random.Random(seed).choice over non-special tokenizer ids < vocab_size",
           "n_allowed": len(allowed), "excluded_ids": sorted(special), "ids": ids}
    with open(path, "w") as f:
        json.dump(doc, f)
    return doc


# ---------------------------------------------------------------- running

def versions_of(peer):
    code = ("import json,importlib.metadata as m\nout={}\nfor p in %r:\n"
            "    try: out[p]=m.version(p)\n    except Exception: pass\nprint(json.dumps(out))" % VERSION_PKGS[peer])
    try:
        r = subprocess.run([py(peer), "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}


def has_flag(cmd, flag):
    return any(c == flag or c.startswith(flag + "=") for c in cmd)


def build_cmd(entry, batch, args, prompt_file):
    cmd = list(entry["cmd"])
    common = [("--checkpoint", args.checkpoint), ("--model-dir", entry["model_dir"]),
              ("--variant", entry["variant"]), ("--batch", batch), ("--prompt-file", prompt_file),
              ("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens),
              ("--threads", args.threads), ("--warmup", args.warmup), ("--repeats", args.repeats_per_call)]
    for k, v in common:
        if entry.get("extra") and has_flag(cmd, k) and k in ("--model-dir", "--variant", "--checkpoint"):
            continue
        cmd += [k, str(v)]
    return cmd


def run_call_once(entry, batch, args, prompt_file, rnd, attempt):
    cmd = build_cmd(entry, batch, args, prompt_file)
    env = dict(os.environ)
    env.update(entry.get("env", {}))
    quiet = wait_for_quiet(args.quiet_wait, args.quiet_idle) if args.quiet_wait > 0 else {}
    la0 = loadavg()
    b0, c0 = busy_cpu_seconds(), children_cpu_seconds()
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.call_timeout, env=env)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", "", str(e)
    wall = time.time() - t0
    # CPU used on the machine by everything except this call's runner, in cores (0 = quiet)
    foreign = max(0.0, (busy_cpu_seconds() - b0) - (children_cpu_seconds() - c0)) / max(wall, 1e-9)
    rec = {"entry": entry["name"], "batch": batch, "round": rnd, "attempt": attempt, "rc": rc,
           "wall_s": round(wall, 2), "foreign_cpu_cores": round(foreign, 3),
           "loadavg_before": la0, "loadavg_after": loadavg(), "cmd": cmd, **quiet}
    res = None
    if rc == 0:
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        try:
            res = json.loads(lines[-1])
        except Exception:  # noqa: BLE001
            rec["error"] = "no JSON on last stdout line"
    else:
        rec["error"] = f"exit {rc}"
    if res is None:
        rec["stderr_tail"] = err[-2000:]
        log(f"  FAILED {entry['name']} b{batch} round {rnd}: {rec['error']}")
    else:
        rec["result"] = res
        m = res["median"]
        log(f"  {entry['name']:<22} b{batch} r{rnd}.{attempt}: prefill {m['prefill_ms']:8.1f} ms  decode "
            f"{m['decode_ms_per_token']:7.2f} ms/tok  {m['tokens_per_s']:7.1f} tok/s  "
            f"rss {res['peak_rss_mb']:.0f} MB  idle-before {quiet.get('idle_before', -1):.2f}  "
            f"foreign {foreign:.2f} cores  util {statistics.median(res['raw'].get('cpu_util') or [0]):.2f}")
    return rec


def run_call(entry, batch, args, prompt_file, rnd):
    """Run one call; while the machine was busy with other work during it (foreign CPU above
    --max-foreign cores) retry, up to --retries times. Returns all attempts; the last counts."""
    attempts = []
    for attempt in range(args.retries + 1):
        rec = run_call_once(entry, batch, args, prompt_file, rnd, attempt)
        attempts.append(rec)
        disturbed = rec["foreign_cpu_cores"] > args.max_foreign
        rec["disturbed"] = disturbed
        if "result" not in rec or not disturbed:
            break
    for r in attempts[:-1]:
        r["superseded"] = True
    return attempts


def aggregate(calls, entries, args):
    out = []
    for e in entries:
        for b in args.batches:
            cs = [c for c in calls if c["entry"] == e["name"] and c["batch"] == b and not c.get("superseded")]
            ok = [c["result"] for c in cs if "result" in c]
            row = {"entry": e["name"], "peer": e["peer"], "variant": e["variant"], "batch": b,
                   "calls": len(cs), "failed_calls": len(cs) - len(ok)}
            if ok:
                keys = sorted({k for r in ok for k in r["raw"]})
                raw = {k: [x for r in ok for x in r["raw"].get(k, [])] for k in keys}
                row["median"] = {k: statistics.median(v) for k, v in raw.items() if v}
                row["min"] = {k: min(v) for k, v in raw.items() if v}
                row["max"] = {k: max(v) for k, v in raw.items() if v}
                row["n_timed"] = len(raw["decode_ms_per_token"])
                row["disturbed_calls"] = sum(1 for c in cs if c.get("disturbed"))
                row["foreign_cpu_cores"] = [c["foreign_cpu_cores"] for c in cs]
                row["raw"] = raw
                row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
                row["rss_after_load_mb"] = statistics.median(r["rss_after_load_mb"] for r in ok)
                row["load_s"] = statistics.median(r["load_s"] for r in ok)
                row["first_row_new_ids"] = ok[-1].get("first_row_new_ids")
                row["timing"] = ok[-1].get("timing")
                row["runner_versions"] = ok[-1].get("versions")
                for k in ("system_info", "compute_type", "n_ctx"):
                    if k in ok[-1]:
                        row[k] = ok[-1][k]
            else:
                row["errors"] = [c.get("error") for c in cs]
                row["stderr_tail"] = cs[-1].get("stderr_tail") if cs else None
            out.append(row)
    return out


def parity(summary, ref_name):
    ref = {r["batch"]: r.get("first_row_new_ids") for r in summary if r["entry"] == ref_name}
    res = {}
    for r in summary:
        a, b = r.get("first_row_new_ids"), ref.get(r["batch"])
        if not a or not b:
            continue
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        res[f"{r['entry']}/b{r['batch']}"] = n
    return {"reference": ref_name, "common_prefix_len_of_row0_new_tokens": res}


def table(summary):
    lines = [f"{'entry':<24}{'batch':>5}{'prefill ms':>12}{'decode ms/tok':>15}{'tok/s':>9}{'peak RSS MB':>13}"
             f"{'n':>4}{'disturbed':>10}"]
    for r in summary:
        if "median" not in r:
            lines.append(f"{r['entry']:<24}{r['batch']:>5}  FAILED: {r.get('errors')}")
            continue
        m = r["median"]
        lines.append(f"{r['entry']:<24}{r['batch']:>5}{m['prefill_ms']:>12.1f}{m['decode_ms_per_token']:>15.2f}"
                     f"{m['tokens_per_s']:>9.1f}{r['peak_rss_mb']:>13.0f}{r['n_timed']:>4}{r['disturbed_calls']:>10}")
    return "\n".join(lines)


def machine_info():
    info = {"platform": platform.platform(), "nproc": os.cpu_count(), "python_driver": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        for ln in txt.splitlines():
            if ln.startswith("model name"):
                info["cpu"] = ln.split(":", 1)[1].strip()
            if ln.startswith("flags"):
                fl = ln.split(":", 1)[1].split()
                info["isa"] = [x for x in fl if x.startswith(("avx", "amx", "fma", "f16c"))]
                break
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--peers-root", default=DEFAULT_PEERS_ROOT,
                    help="directory holding venv-llamacpp, venv-ortgenai, venv-ct2, venv-optimum and llama.cpp's "
                         "sources (install_peers.sh; default $KVTRACE_PEERS_ROOT or /work/peers)")
    ap.add_argument("--work-dir", help="converted models + prompt (default PEERS_ROOT/conv/<ckpt name>)")
    ap.add_argument("--peers", nargs="*", default=None,
                    help="built-in entries peer[:v1,v2]; default llamacpp:f32,q8_0,q4_0 ortgenai:fp32,int4 "
                         "ct2:float32,int8 (optimum:fp32 also available); --peers with no value runs only "
                         "the --extra entries")
    ap.add_argument("--extra", action="append", default=[],
                    help="NAME=COMMAND LINE for another runner speaking the protocol (repeatable); "
                         "environment variables: start the command with 'env VAR=VAL ...'")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats-per-call", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--gguf-base", default="f32", help="convert_hf_to_gguf --outtype (f32, f16, bf16)")
    ap.add_argument("--call-timeout", type=float, default=900)
    ap.add_argument("--quiet-wait", type=float, default=0,
                    help="before each call wait up to this many seconds for the CPUs to be --quiet-idle idle "
                         "(shared machine); the idle fraction seen is recorded per call")
    ap.add_argument("--quiet-idle", type=float, default=0.9)
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="a call during which other processes used more than this many CPU cores on "
                         "average counts as disturbed (recorded; retried when --retries > 0)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="set OMP_WAIT_POLICY=PASSIVE for every entry (llama.cpp and CTranslate2 use OpenMP; "
                         "their spinning barriers collapse when other processes share the cores). Not the "
                         "peers' default: leave it off on a quiet machine")
    ap.add_argument("--retries", type=int, default=0, help="re-run a disturbed call up to this many times")
    ap.add_argument("--convert-only", action="store_true")
    ap.add_argument("--membw", action="store_true",
                    help="also run the streaming-read bandwidth probe (membw.c, built into PEERS_ROOT/bin) and record it")
    ap.add_argument("--parity-ref", default=None, help="entry whose row-0 tokens the others are compared to")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    set_peers_root(args.peers_root)
    args.checkpoint = os.path.abspath(args.checkpoint)
    if not args.work_dir:
        args.work_dir = os.path.join(PEERS_ROOT, "conv", os.path.basename(args.checkpoint.rstrip("/")))
    os.makedirs(args.work_dir, exist_ok=True)

    specs = args.peers if args.peers is not None else [f"{p}:{','.join(DEFAULT_VARIANTS[p])}"
                                                        for p in DEFAULT_ROTATION]
    variants = {}
    for s in specs:
        p, _, vs = s.partition(":")
        if p not in RUNNER:
            sys.exit(f"unknown built-in peer {p} (have {sorted(RUNNER)})")
        variants[p] = vs.split(",") if vs else DEFAULT_VARIANTS[p]

    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": loadavg(),
              "machine": machine_info(), "checkpoint": args.checkpoint,
              "settings": {k: getattr(args, k) for k in ("batches", "rounds", "repeats_per_call", "warmup",
                                                         "threads", "prompt_len", "new_tokens", "seed",
                                                         "omp_passive", "quiet_wait", "quiet_idle",
                                                         "max_foreign", "retries")}}
    fp = ckpt_fingerprint(args.checkpoint)
    report["checkpoint_fingerprint"] = fp
    for meta in ("random_checkpoint.json", "config.json"):
        p = os.path.join(args.checkpoint, meta)
        if os.path.exists(p):
            with open(p) as f:
                report["checkpoint_" + meta.split(".")[0]] = json.load(f)
    paths, conv_info = convert_all(args, fp, variants)
    report["conversions"] = conv_info
    if args.convert_only:
        log("conversions done")
        return

    prompt_file = os.path.join(args.work_dir, f"prompt-seed{args.seed}-len{args.prompt_len}.json")
    pdoc = make_prompt(args, prompt_file)
    report["prompt"] = {k: v for k, v in pdoc.items() if k != "ids"}
    report["prompt"]["file"] = prompt_file
    report["prompt"]["row0_first8"] = pdoc["ids"][0][:8]

    entries = []
    for p, vs in variants.items():
        for v in vs:
            entries.append({"name": f"{p}-{v}", "peer": p, "variant": v, "model_dir": paths[(p, v)],
                            "cmd": [py(p), RUNNER[p]], "env": {"OMP_NUM_THREADS": str(args.threads)}})
    for x in args.extra:
        name, _, cmdline = x.partition("=")
        if not name or not cmdline:
            sys.exit(f"--extra needs NAME=COMMAND, got {x!r}")
        entries.append({"name": name, "peer": name, "variant": name, "model_dir": args.checkpoint,
                        "cmd": shlex.split(cmdline), "env": {}, "extra": True})
    if args.omp_passive:
        for e in entries:
            e["env"]["OMP_WAIT_POLICY"] = "PASSIVE"

    report["versions"] = {p: versions_of(p) for p in variants}
    if args.membw:
        exe = membw_exe()
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait, args.quiet_idle)
        r = subprocess.run([exe, "2", "10", str(args.threads)], capture_output=True, text=True)
        report["membw_start"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr

    calls = []
    report["entries"] = [{k: v for k, v in e.items()} for e in entries]
    ref = args.parity_ref or next((e["name"] for e in entries if e["variant"] in ("f32", "fp32", "float32")),
                                  entries[0]["name"])

    def finish(done_rounds):
        report["rounds_done"] = done_rounds
        report["loadavg_end"] = loadavg()
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        summary = aggregate(calls, entries, args)
        report["summary"] = summary
        report["parity"] = parity(summary, ref)
        report["calls"] = calls
        report["table"] = table(summary)
        with open(args.out, "w") as f:  # rewritten after every round: usable if the run is cut off
            json.dump(report, f, indent=1)

    for rnd in range(1, args.rounds + 1):
        log(f"round {rnd}/{args.rounds}")
        for e in entries:
            for b in args.batches:
                calls.extend(run_call(e, b, args, prompt_file, rnd))
        finish(rnd)
    if args.membw:
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait, args.quiet_idle)
        r = subprocess.run([membw_exe(), "2", "10", str(args.threads)],
                           capture_output=True, text=True)
        report["membw_end"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(report["table"])
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
