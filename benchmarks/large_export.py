"""Export of the seed models' real shapes in bounded memory (issue 10).

    python -m benchmarks.large_export --shape codellama-7b  [--work DIR] [--keep]
    python -m benchmarks.large_export --shape codellama-13b --memory-limit 8G
    python -m benchmarks.large_export --shape tinyllama-1.1b --optimum-python /path/to/venv/bin/python

1. writes the random checkpoint of that shape (benchmarks/shapes.py: sharded fp16 safetensors
   with an index, streamed to disk, never held in memory), unless DIR already holds it;
2. `cp -r` of the checkpoint on the same disk, timed (the baseline of the time goal), then the
   copy is deleted;
3. `kvtrace export --checkpoint CK --fp16 --out ART` with the default validation, in a child
   process (inside a fresh memory cgroup with --memory-limit), measured by benchmarks/measure.py:
   wall time, peak RSS (ru_maxrss), sampled anonymous / file-backed peaks, and the cgroup's figures;
4. with --optimum-python, `optimum-cli export onnx --task text-generation-with-past` on the same
   checkpoint, measured the same way;
5. deletes the artifact (and the checkpoint unless --keep).
The page cache is dropped before each timed command when run as root (both read from disk);
otherwise the report says the runs were warm. The machine's load average is printed with the
numbers: on a shared machine they are indicative.

Goals (issue 10): CodeLlama-7B shape, peak RSS <= 3 GB and wall <= 1.5x the cp -r; CodeLlama-13B
shape exports under an 8 GB memory limit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks.measure import drop_caches, load_average, run_measured  # noqa: E402
from benchmarks.shapes import SHAPES, checkpoint_bytes, make_checkpoint  # noqa: E402


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--work", default="/work/tmp-bench", help="directory for the checkpoint, its copy and the artifact")
    ap.add_argument("--memory-limit", help="run the export under this memory cgroup limit, e.g. 8G")
    ap.add_argument("--optimum-python", help="python of a venv with optimum-onnx: time optimum-cli too")
    ap.add_argument("--no-cp", action="store_true", help="skip the cp -r baseline")
    ap.add_argument("--export-args", default="", help="extra kvtrace export options, e.g. '--validation full'")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    ap.add_argument("--sparse", action="store_true",
                    help="a checkpoint whose blocks beyond the second are holes (a 26 GB checkpoint in ~2 GB of "
                         "disk: memory figures only; its reads cost no I/O, so no timing goal applies)")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ck = work / (a.shape + ("-sparse" if a.sparse else ""))
    art, copy = work / f"{a.shape}-art", work / f"{a.shape}-copy"
    report = {"shape": a.shape, "load_average_start": load_average(), "cold": os.geteuid() == 0}
    t0 = time.perf_counter()
    print(f"checkpoint {ck} ...", flush=True)
    make_checkpoint(ck, a.shape, "float16", sparse=a.sparse, log=lambda m: print(m, flush=True))
    report["sparse"] = a.sparse
    nbytes = checkpoint_bytes(ck)
    report["checkpoint_gb"] = round(nbytes / 1e9, 2)
    report["make_checkpoint_s"] = round(time.perf_counter() - t0, 1)
    free = shutil.disk_usage(work).free
    if free < nbytes * 1.05 + (5 << 30):  # the artifact, and 5 GB for everyone else on the disk
        print(f"not enough disk space for the artifact: {free / 1e9:.1f} GB free, {nbytes / 1e9:.1f} GB needed",
              file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    try:
        if not a.no_cp and free > 2.1 * nbytes:
            drop_caches()
            report["cp"] = run_measured(["cp", "-r", str(ck), str(copy)])
            shutil.rmtree(copy, ignore_errors=True)
            print(f"cp -r: {report['cp']['wall_s']} s", flush=True)
        elif not a.no_cp:
            report["cp"] = {"skipped": f"{free / 1e9:.1f} GB free: not enough for a copy and the artifact"}
        shutil.rmtree(art, ignore_errors=True)
        report["cold"] = drop_caches()
        cmd = [sys.executable, "-m", "kvtrace.cli", "export", "--checkpoint", str(ck), "--fp16", "--out", str(art),
               *a.export_args.split()]
        report["load_average_before_export"] = load_average()
        r = run_measured(cmd, env=env, cwd=ROOT, memory_limit=_size(a.memory_limit) if a.memory_limit else None)
        report["kvtrace"] = r
        report["load_average_after_export"] = load_average()
        print(r["stderr_tail"], flush=True)
        if r["rc"] == 0:
            report["validation"] = json.loads((art / "kvtrace.json").read_text())["validation"]
        shutil.rmtree(art, ignore_errors=True)
        if a.optimum_python:
            out = work / f"{a.shape}-optimum"
            shutil.rmtree(out, ignore_errors=True)
            drop_caches()
            report["optimum"] = run_measured([a.optimum_python, "-m", "optimum.commands.optimum_cli", "export", "onnx",
                                              "--model", str(ck), "--task", "text-generation-with-past", str(out)],
                                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(art, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(ck, ignore_errors=True)
    report["load_average_end"] = load_average()

    print(f"\n{a.shape}: checkpoint {report['checkpoint_gb']} GB fp16{' (sparse)' if a.sparse else ''}; page cache "
          f"{'dropped before each timed command' if report['cold'] else 'warm (not root)'}; load average "
          f"start {report['load_average_start']}, end {report['load_average_end']} (2 cores)")
    cp = report.get("cp", {})
    if "wall_s" in cp:
        print(f"  cp -r          {cp['wall_s']:7.1f} s")
    for name in ("kvtrace", "optimum"):
        r = report.get(name)
        if not r:
            continue
        ratio = f" ({r['wall_s'] / cp['wall_s']:.2f}x cp -r)" if "wall_s" in cp else ""
        failed = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']}"
        print(f"  {name:14s} {r['wall_s']:7.1f} s{ratio}, peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB "
              f"(sampled: anonymous {r['peak_anon_mb_sampled'] / 1024:.2f} GiB, file-backed "
              f"{r['peak_file_mb_sampled'] / 1024:.2f} GiB){failed}")
        if "cgroup" in r:
            c = r["cgroup"]
            print(f"    memory cgroup {c['cgroup']}: limit {c['limit_mb'] / 1024:.1f} GiB, peak usage "
                  f"{(c['peak_usage_mb'] or 0) / 1024:.2f} GiB (page cache included), OOM kills {c['oom_kills']}")
    v = report.get("validation")
    if v:
        print(f"  validation: {v['mode']} ({v['method']}), max |dlogit| {v['max_abs']:.3g}, "
              f"whole graph: {v.get('whole_graph', 'run')}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report.get("kvtrace", {}).get("rc") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
