"""Export time and peak memory on the Pythia-160M-shaped checkpoint (issues 3 and 10).

    python3 benchmarks/export_160m.py [--work DIR] [--repeats N] [--optimum-python PY] [--json]
                                      [--modes default bounded no-validate]

1. makes the random Pythia-160M-shaped GPT-NeoX fp32 checkpoint once (benchmarks/pythia160m.py,
   ~650 MB), cached in DIR/pythia160m;
2. runs `kvtrace export --checkpoint DIR/pythia160m --force --out DIR/art` (fp32, static cache,
   validation on: the full command a user runs) in a subprocess, N times, and reports each
   run's wall time, the subprocess's peak RSS (from wait4's rusage) and its sampled anonymous /
   file-backed peaks (benchmarks/measure.py); --modes adds `--validation bounded` and
   `--no-validate` runs, alternated with the default;
3. with --optimum-python PY (a separate environment with optimum-onnx installed), also times
   `PY -m optimum.commands.optimum_cli export onnx --task text-generation-with-past` on the
   same checkpoint the same way (runs alternate between the two tools), and prints both.

Issue 3's goal: at most half of optimum's time, and at most 2x the checkpoint bytes of peak
RSS; issue 10's: peak RSS <= 1.0x the checkpoint, time no worse than 7 s. The machine is shared:
the load average is printed beside the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def measure(cmd: list[str], env=None) -> dict:
    """Run `cmd`: wall seconds, peak RSS (MB), sampled anonymous / file-backed peaks, exit code."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.measure import run_measured

    return run_measured(cmd, env=env, cwd=ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kvtrace-bench"),
                    help="cache directory for the checkpoint and the artifact")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--optimum-python", help="python of an environment with optimum-onnx installed")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    ap.add_argument("--modes", nargs="+", default=["default"], choices=["default", "bounded", "no-validate"],
                    help="kvtrace export validations to run (alternated)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from benchmarks.pythia160m import make_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work / "pythia160m", "float32", seed=0)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    report = {"checkpoint": str(ckpt), "checkpoint_mb": round(ckpt_bytes / 1e6, 1),
              "load_average": os.getloadavg(), "optimum": [], **{f"kvtrace {m}": [] for m in args.modes}}
    art = work / "art"
    kv_cmd = [sys.executable, "-m", "kvtrace.cli", "export", "--checkpoint", str(ckpt), "--force", "--out", str(art)]
    opt_out = work / "optimum-out"
    opt_cmd = [args.optimum_python, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(ckpt),
               "--task", "text-generation-with-past", str(opt_out)] if args.optimum_python else None
    # alternate the two tools so that both see the same (shared, fluctuating) machine load
    extra = {"default": [], "bounded": ["--validation", "bounded"], "no-validate": ["--no-validate"]}
    for _ in range(args.repeats):
        for m in args.modes:
            r = measure(kv_cmd + extra[m], env)
            report[f"kvtrace {m}"].append(r)
            if r["rc"] != 0:
                print(r["stderr_tail"], file=sys.stderr)
                return 1
        if opt_cmd:
            shutil.rmtree(opt_out, ignore_errors=True)
            r = measure(opt_cmd, dict(os.environ, HF_HUB_OFFLINE="1"))
            report["optimum"].append(r)
            if r["rc"] != 0:
                print(r["stderr_tail"], file=sys.stderr)
                opt_cmd = None
    report["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"checkpoint {report['checkpoint_mb']} MB, load average before {report['load_average']}, "
          f"after {report['load_average_after']}")
    for name in [f"kvtrace {m}" for m in args.modes] + ["optimum"]:
        for r in report[name]:
            ratio = r["peak_rss_mb"] * 2**20 / ckpt_bytes
            print(f"{name:20s} wall {r['wall_s']:6.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MiB ({ratio:.2f}x checkpoint; "
                  f"sampled anonymous {r['peak_anon_mb_sampled']:.0f}, file-backed {r['peak_file_mb_sampled']:.0f})"
                  f"{'' if r['rc'] == 0 else '  FAILED rc=%d' % r['rc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
