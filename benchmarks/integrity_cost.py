"""What the reliability checks cost (issue 8), measured on this machine. No model needed.

    python3 benchmarks/integrity_cost.py [--mib 256] [--repeats 5] [--json out.json]

1. sha256 throughput: hashlib on an in-memory buffer, and kvtrace.files.sha256_file on a file
   just written (page cache; a cold file is read at the disk's speed, which is then the limit).
   From it: the cost of kvtrace.manifest.verify_files on a 13 GB artifact, and of the default
   check (sha256 of files up to manifest.HASH_LIMIT, sizes of the rest).
2. The non-finite guard (kvtrace.runtime.sampling.check_finite) on (B, 50257) float32 logits,
   B = 1 and 8, per decode step, timed alternately with np.argmax on the same rows (what greedy
   decoding does on every step anyway) as the baseline of the same run.
3. The NaN/Inf check of export (kvtrace.exporter.checks.first_non_finite) per GB of weights,
   fp32 / fp16 / bf16.
Timings on a shared machine are indicative; re-run on a quiet one for figures to quote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtrace.files import sha256_file  # noqa: E402
from kvtrace.manifest import HASH_LIMIT  # noqa: E402
from kvtrace.runtime.sampling import check_finite  # noqa: E402

ARTIFACT_13GB = 13.5e9  # CodeLlama-7B fp16: model.onnx.data


def _best(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def sha256_speed(mib: int, repeats: int) -> dict:
    buf = np.random.default_rng(0).integers(0, 256, size=mib << 20, dtype=np.uint8)
    mv = memoryview(buf)
    chunk = 16 << 20

    def in_memory():
        h = hashlib.sha256()
        for i in range(0, len(mv), chunk):
            h.update(mv[i:i + chunk])

    t_mem = _best(in_memory, repeats)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "blob"
        p.write_bytes(mv)
        t_file = _best(lambda: sha256_file(p), repeats)
    gbs_mem, gbs_file = buf.nbytes / t_mem / 1e9, buf.nbytes / t_file / 1e9
    return {"bytes": buf.nbytes, "in_memory_GBps": round(gbs_mem, 3), "file_page_cache_GBps": round(gbs_file, 3),
            "13GB_artifact_full_verify_s": round(ARTIFACT_13GB / 1e9 / gbs_file, 1),
            "default_limit_MiB": HASH_LIMIT >> 20,
            "default_worst_file_s": round(HASH_LIMIT / 1e9 / gbs_file, 3)}


def guard_cost(repeats: int, steps: int = 2000) -> dict:
    out = {}
    for B in (1, 8):
        x = np.random.default_rng(B).standard_normal((B, 50257)).astype(np.float32)
        live = np.ones(B, dtype=bool)
        guard, argmax = [], []
        for _ in range(repeats):  # alternated: the same load hits both
            t0 = time.perf_counter()
            for _ in range(steps):
                check_finite(x, step=0, rows=live)
            guard.append((time.perf_counter() - t0) / steps * 1e6)
            t0 = time.perf_counter()
            for _ in range(steps):
                np.argmax(x, axis=-1)
            argmax.append((time.perf_counter() - t0) / steps * 1e6)
        g, a = statistics.median(guard), statistics.median(argmax)
        out[f"batch_{B}"] = {"guard_us_per_step": round(g, 1), "argmax_us_per_step": round(a, 1),
                             "guard_over_argmax": round(g / a, 2)}
    return out


def weight_check_speed(repeats: int) -> dict:
    import ml_dtypes

    from kvtrace.exporter.checks import first_non_finite

    out = {}
    for name, dt in (("float32", np.float32), ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        a = np.ones(64 << 20, dtype=dt)  # 64 Mi elements
        t = _best(lambda: first_non_finite(a), repeats)
        out[name] = {"GBps": round(a.nbytes / t / 1e9, 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of the sha256 test buffer")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import os

    r = {"load_average": os.getloadavg()[0], "sha256": sha256_speed(args.mib, args.repeats),
         "non_finite_guard_V50257": guard_cost(args.repeats), "export_weight_check": weight_check_speed(args.repeats)}
    r["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(r, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
