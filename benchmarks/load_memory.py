"""Peak memory of load_checkpoint on the Pythia-160M-shaped checkpoint, in a fresh process.

    python -m benchmarks.load_memory [--dir DIR] [--dtype float32|float16|bfloat16] [--hf] [--json]

Peak RSS = resource.getrusage(RUSAGE_SELF).ru_maxrss after loading, minus the same figure right
after `import torch` (the baseline every torch program pays). The ratio is that peak over the
bytes of the weight files: 1.0 means the weights are held once and nothing else; the issue
allows at most one extra copy (2.0). `--hf` measures transformers' from_pretrained the same way
for comparison (its tensors stay mmapped from the file, so they count only once touched).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path, dtype, which = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "ours":
    from kvtrace.models.checkpoint import load_checkpoint
    t0 = time.perf_counter()
    loaded = load_checkpoint(path, dtype=dtype)
    model, seconds = loaded.model, time.perf_counter() - t0
else:
    import transformers
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - t0
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_kb": base, "peak_kb": peak, "seconds": seconds, "param_bytes": param_bytes}))
"""


def measure(path: Path, dtype: str = "float32", which: str = "ours") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), dtype, which], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"measurement process failed:\n{r.stderr[-3000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    ckpt_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    delta = (m["peak_kb"] - m["baseline_kb"]) * 1024  # ru_maxrss is in KiB on Linux
    return {"loader": which, "dtype": dtype, "checkpoint_bytes": ckpt_bytes, "param_bytes": m["param_bytes"],
            "peak_rss_over_baseline_bytes": delta, "ratio_to_checkpoint": delta / ckpt_bytes,
            "ratio_to_loaded_params": delta / m["param_bytes"], "load_seconds": m["seconds"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "kvtrace-pythia160m-float32"),
                    help="checkpoint directory (created with benchmarks.pythia160m if absent)")
    ap.add_argument("--dtype", nargs="+", default=["float32", "float16"], help="dtype(s) to load as")
    ap.add_argument("--hf", action="store_true", help="also measure transformers' from_pretrained")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.pythia160m import make_checkpoint

    path = make_checkpoint(a.dir, "float32")
    rows = [measure(path, dt, "ours") for dt in a.dtype]
    if a.hf:
        rows += [measure(path, dt, "transformers") for dt in a.dtype]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"checkpoint {path}: {rows[0]['checkpoint_bytes'] / 1e6:.1f} MB of weight files (float32)")
    print(f"{'loader':13s} {'as':9s} {'params MB':>10s} {'peak RSS MB':>12s} {'x ckpt':>7s} {'x params':>9s} {'s':>6s}")
    for r in rows:
        print(f"{r['loader']:13s} {r['dtype']:9s} {r['param_bytes'] / 1e6:10.1f} "
              f"{r['peak_rss_over_baseline_bytes'] / 1e6:12.1f} {r['ratio_to_checkpoint']:7.2f} "
              f"{r['ratio_to_loaded_params']:9.2f} {r['load_seconds']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
