"""Peak memory of generating from fp32 / fp16 / int8 / int4 artifacts on onnxruntime CPU, against
the artifact's weight bytes plus its KV cache.

    python3 benchmarks/quant_memory.py --checkpoint CKPT [--work DIR] [--json OUT] [--prepack-off]

Exports the checkpoint (default: the peers' random Llama-153M, benchmarks/peers/make_random_checkpoint.py
--preset small153m) as fp32, fp16, int8 and int4 artifacts (external weights, --max-seq 256), then per
artifact, in a fresh process: the runtime imports (numpy, onnxruntime, kvtrace.runtime), then what
`kvtrace generate` does (Model.load, 2 threads; generate: batch 1, prompt 128, 64 new tokens, greedy).
Memory is read from /proc/self/status: VmHWM (peak RSS) and, at the end, RssAnon / RssFile (anonymous
vs file-backed: memory-mapped weight pages are reclaimable). The ratio the issue asks about:
    (VmHWM - baseline) / (weight bytes + KV cache bytes)
baseline = VmHWM of the same process right after the imports (the interpreter, numpy, onnxruntime's
library); weight bytes = the artifact's model.onnx + model.onnx.data; KV cache = 2 x layers x batch x
kv heads x max_seq x head_dim x the cache dtype's size. --prepack-off repeats every artifact with
onnxruntime's weight prepacking disabled (session.disable_prepacking).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CHILD = r"""
import json, sys
from kvtrace.files import rss_mb as status  # {"peak" (VmHWM), "total", "anon", "file"}, MiB
import numpy as np, onnxruntime
from kvtrace.runtime.model import Model
from kvtrace.runtime import generate as _g
base = status()
art, prepack = sys.argv[1], sys.argv[2] == "1"
m = Model.load(art, backend="onnxruntime", threads=2, prepack=prepack)
loaded = status()
rng = np.random.default_rng(0)
prompt = rng.integers(10, m.config.vocab_size - 10, size=128).tolist()
out = m.generate([prompt], max_new_tokens=64, greedy=True, stop_token_ids=[])
end = status()
print(json.dumps({"base": base, "loaded": loaded, "end": end, "new_tokens": len(out[0].token_ids)}))
"""


def export(kvtrace_bin: str, ckpt: Path, out: Path, opts: list[str]) -> Path:
    if not (out / "kvtrace.json").is_file():
        subprocess.run([kvtrace_bin, "export", "--checkpoint", str(ckpt), "--max-seq", "256", "--external-data",
                        "--no-validate", "--out", str(out), "--force", *opts], check=True)
    return out


def kv_bytes(manifest: dict, batch: int = 1) -> int:
    io, cfg = manifest["io"], manifest["config"]
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[manifest["dtype"]]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["n_heads"]
    return 2 * cfg["n_layers"] * batch * cfg["n_kv_heads"] * int(io["max_seq"]) * hd * item


def measure(art: Path, python: str, prepack: bool) -> dict:
    r = subprocess.run([python, "-c", _CHILD, str(art), "1" if prepack else "0"], capture_output=True, text=True,
                       check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    man = json.loads((art / "kvtrace.json").read_text())
    weights = sum(p.stat().st_size for p in art.iterdir() if p.name.startswith("model.onnx"))
    kv = kv_bytes(man)
    mb = 1 << 20
    peak = d["end"]["peak"] - d["base"]["peak"]
    return {"artifact": art.name, "prepack": prepack, "weights_mb": weights / mb, "kv_mb": kv / mb,
            "baseline_mb": d["base"]["peak"], "peak_mb": d["end"]["peak"], "peak_over_baseline_mb": peak,
            "ratio": peak / ((weights + kv) / mb), "after_load_mb": d["loaded"]["total"] - d["base"]["total"],
            "end_anon_mb": d["end"]["anon"], "end_file_mb": d["end"]["file"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="/work/peers/ckpt/llama153m")
    ap.add_argument("--work", help="artifact directory (default: temporary)")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--variants", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    ap.add_argument("--prepack-off", action="store_true", help="also measure with prepacking disabled")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    opts = {"fp32": [], "fp16": ["--fp16"], "int8": ["--quant", "int8"], "int4": ["--quant", "int4"]}
    work = Path(args.work or tempfile.mkdtemp(prefix="kvtrace-mem-"))
    ckpt = Path(args.checkpoint)
    kv_bin = str(Path(args.python).with_name("kvtrace"))
    rows = []
    print(f"{'artifact':<28} {'prepack':>7} {'weights':>8} {'KV':>6} {'base':>6} {'peak-base':>9} {'ratio':>6} "
          f"{'anon':>6} {'file':>6}  (MB)")
    for v in args.variants:
        art = export(kv_bin, ckpt, work / f"{ckpt.name}-{v}", opts[v])
        for prepack in ([True, False] if args.prepack_off else [True]):
            r = measure(art, args.python, prepack)
            r["variant"] = v
            rows.append(r)
            print(f"{art.name:<28} {str(prepack):>7} {r['weights_mb']:>8.1f} {r['kv_mb']:>6.1f} {r['baseline_mb']:>6.0f} "
                  f"{r['peak_over_baseline_mb']:>9.1f} {r['ratio']:>6.2f} {r['end_anon_mb']:>6.0f} "
                  f"{r['end_file_mb']:>6.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
