"""Export time and peak RSS: `kvtrace export --via trace` against the builder (`--via build`).

    python3 benchmarks/trace_vs_build.py [--work DIR] [--repeats N] [--only pythia160m|tinyllama] [--json]

Two random checkpoints of real shapes (nothing downloaded):
  pythia160m  GPT-NeoX, Pythia-160M's shapes, fp32 (~650 MB; benchmarks/pythia160m.py), exported
              fp32 with the static cache and the export's own validation (the command a user runs);
  tinyllama   Llama, TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads, 4 kv heads,
              intermediate 5632, vocab 32000), written streamed in fp16 (~2.2 GB), exported fp16
              with the static cache and --no-validate (validation is the same code for both and
              dominates at this size: it runs an fp32 reference and onnxruntime), then deleted.
Each export runs in a fresh subprocess (wall time, and peak RSS from wait4's rusage); build and
trace alternate, so both see the same machine load (printed before and after). Node counts of
both graphs are printed per op type.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.export_160m import measure  # noqa: E402
from benchmarks.pythia160m import make_checkpoint  # noqa: E402

TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "num_attention_heads": 32, "num_hidden_layers": 22,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "vocab_size": 32000,
}
CASES = {  # name -> (checkpoint config or None for Pythia's, checkpoint dtype, export options)
    "pythia160m": (None, "float32", []),
    "tinyllama": (TINYLLAMA, "float16", ["--fp16", "--no-validate"]),
}


def node_counts(art: Path) -> dict:
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    out: dict[str, int] = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def run_case(name: str, work: Path, repeats: int, keep: bool) -> dict:
    config, dtype, opts = CASES[name]
    ckpt_dir = work / name
    if config is None:
        ckpt = make_checkpoint(ckpt_dir, dtype, seed=0)
    else:
        ckpt = make_checkpoint(ckpt_dir, dtype, seed=0, tokenizer=None, config=config)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    res = {"checkpoint_mb": round(ckpt_bytes / 1e6, 1), "options": opts, "load_average": os.getloadavg(),
           "build": [], "trace": []}
    try:
        for _ in range(repeats):
            for via in ("build", "trace"):  # alternated
                art = work / f"{name}-{via}"
                cmd = [sys.executable, "-m", "kvtrace.cli", "export", "--checkpoint", str(ckpt), "--via", via,
                       "--force", "--out", str(art), *opts]
                r = measure(cmd, env)
                res[via].append(r)
                if r["rc"] != 0:
                    print(r["stderr_tail"], file=sys.stderr)
                    raise SystemExit(f"{name} --via {via} failed (rc {r['rc']})")
        for via in ("build", "trace"):
            art = work / f"{name}-{via}"
            res[f"nodes_{via}"] = node_counts(art)
            res[f"artifact_mb_{via}"] = round(sum(f.stat().st_size for f in art.iterdir()) / 1e6, 1)
            shutil.rmtree(art, ignore_errors=True)
    finally:
        if not keep and config is not None:  # the 1.1B checkpoint is 2.2 GB: do not leave it behind
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    res["load_average_after"] = os.getloadavg()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kvtrace-bench"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", choices=list(CASES))
    ap.add_argument("--keep", action="store_true", help="keep the TinyLlama-shaped checkpoint")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {name: run_case(name, work, args.repeats, args.keep) for name in CASES if args.only in (None, name)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, res in report.items():
        print(f"{name}: checkpoint {res['checkpoint_mb']} MB, export options {' '.join(res['options']) or '(defaults)'}, "
              f"load average {res['load_average']} -> {res['load_average_after']}")
        for via in ("build", "trace"):
            for r in res[via]:
                print(f"  --via {via:5s} wall {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MiB "
                      f"({r['peak_rss_mb'] * 2**20 / (res['checkpoint_mb'] * 1e6):.2f}x checkpoint)  "
                      f"artifact {res[f'artifact_mb_{via}']} MB")
        b = min(r["wall_s"] for r in res["build"])
        t = min(r["wall_s"] for r in res["trace"])
        bm = min(r["peak_rss_mb"] for r in res["build"])
        tm = min(r["peak_rss_mb"] for r in res["trace"])
        print(f"  trace / build: time {t / b:.2f}x, peak RSS {tm / bm:.2f}x")
        nb, nt = res["nodes_build"], res["nodes_trace"]
        print(f"  nodes built/traced (total {sum(nb.values())}/{sum(nt.values())}): "
              + " ".join(f"{op} {nb.get(op, 0)}/{nt.get(op, 0)}" for op in sorted(set(nb) | set(nt))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
