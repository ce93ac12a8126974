"""Decode speed on the Pythia-160M-shaped checkpoint: kvtrace (onnxruntime) against transformers.

    python3 benchmarks/decode_160m.py [--work DIR] [--repeats R] [--check]

1. makes the random Pythia-160M-shaped GPT-NeoX fp32 checkpoint (benchmarks/pythia160m.py,
   ~650 MB) once, cached in DIR/pythia160m;
2. exports it once: `kvtrace export --checkpoint ... --max-seq 256` (fp32, static cache);
3. runs `kvtrace bench ART --batch 1 8 --prompt-len 128 --new-tokens 64 --compare hf --json`
   (both sides in one process, same prompts) and prints the numbers against the goal of
   issue 4: decode ms/token at batch 1 <= 0.65 x transformers'.

The JSON of each run is kept as DIR/bench-<UTC time>.json. --check exits 1 when the goal is
missed (for CI on a quiet machine; shared machines make the numbers noisy: see the load
average printed with them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL = 0.65  # ours / transformers, decode ms per token at batch 1


def _cli(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "kvtrace.cli", *args]
    print("$ kvtrace " + " ".join(args), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if p.returncode != 0:
        sys.exit(f"decode_160m: `kvtrace {' '.join(args)}` failed with exit status {p.returncode}")
    return p


def ensure_checkpoint(work: Path) -> Path:
    """The checkpoint, made once (make_checkpoint reuses a directory with the same seed/dtype)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.pythia160m import make_checkpoint

    ckpt = work / "pythia160m"
    print(f"checkpoint: {ckpt} (made once, then reused)", file=sys.stderr, flush=True)
    return Path(make_checkpoint(ckpt, "float32", seed=0))


def ensure_artifact(work: Path, ckpt: Path, force: bool) -> Path:
    art = work / "pythia160m-fp32-static-256"
    if force or not (art / "kvtrace.json").is_file():
        _cli("export", "--checkpoint", str(ckpt), "--max-seq", "256", "--max-batch", "8", "--out", str(art),
             "--force")
    return art


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.environ.get("KVTRACE_BENCH_DIR", str(Path.home() / ".cache" / "kvtrace-bench")),
                    help="where the checkpoint, the artifact and the results are kept")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reexport", action="store_true", help="export again even if the artifact exists")
    ap.add_argument("--check", action="store_true", help="exit 1 when the goal is missed")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(work)
    art = ensure_artifact(work, ckpt, a.reexport)
    print(f"load average before the run: {os.getloadavg()}", file=sys.stderr, flush=True)
    p = _cli("bench", str(art), "--backend", a.backend, "--batch", "1", "8", "--prompt-len", "128",
             "--new-tokens", "64", "--repeats", str(a.repeats), "--compare", "hf", "--checkpoint", str(ckpt),
             "--json", capture=True)
    r = json.loads(p.stdout)
    out = work / f"bench-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(r, indent=1) + "\n")

    from kvtrace.runtime.bench import format_table

    print(format_table(r))
    ratio = r["ratio_vs_hf"]["1"]["decode_ms_per_token"]
    ok = ratio <= GOAL
    print(f"\ngoal (issue 4): decode ms/token at batch 1 <= {GOAL} x transformers: "
          f"{r['decode_ms_per_token']['1']:.2f} / {r['hf']['decode_ms_per_token']['1']:.2f} = {ratio:.3f} "
          f"-> {'MET' if ok else 'MISSED'}")
    print(f"results: {out}")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
