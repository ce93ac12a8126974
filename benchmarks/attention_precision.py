"""What computing attention in fp32 costs model.onnx on the CPU (fp16 artifacts).

    python3 benchmarks/attention_precision.py [--work DIR] [--repeats R] [--batch 1 8]

model.onnx of an fp16/bf16 artifact Casts Q, K and V to fp32 around each Attention node (and the
output back): onnxruntime's CPU Attention keeps the scaled scores in the input dtype, so an fp16
Attention goes non-finite once a score passes 65504 (exporter/onnx_graph.py, docs/tensorrt.md).
This measures the price on the Pythia-160M-shaped checkpoint (benchmarks/pythia160m.py, made once
and cached in DIR): the fp16 static artifact (max_seq 256) as exported, against the same graph
with the Casts removed (fp16 Attention, the "native" precision of model.gpu.onnx but with the
CPU form's sliced cache), sharing the weight file. Both models are loaded in one process and
timed alternately (A, B, A, B, ...): prefill of --prompt-len tokens, then --new-tokens - 1 decode
steps, greedy; medians over --repeats. Prints decode ms/token and prefill ms per batch size and
the ratio fp32-attention / fp16-attention. --steps-only instead times one decode step (position
128) through onnxruntime directly, alternated, and reads onnxruntime's per-node profile: the ms
per step spent in Cast and in Attention nodes, which a loaded machine disturbs less than totals.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _export(ckpt: Path, art: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "kvtrace.cli", "export", "--checkpoint", str(ckpt), "--fp16", "--max-seq", "256",
           "--max-batch", "8", "--out", str(art), "--force", "--no-validate"]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def native_variant(art: Path, out: Path) -> Path:
    """A copy of the artifact whose model.onnx has the fp32 Casts around Attention removed (the
    weights hard-linked, not copied)."""
    import onnx

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    drop = set()
    for n in m.graph.node:
        if n.op_type != "Attention":
            continue
        for i in range(3):
            cast = producer[n.input[i]]
            assert cast.op_type == "Cast", cast.op_type
            n.input[i] = cast.input[0]
            drop.add(id(cast))
        after = [c for c in m.graph.node if n.output[0] in c.input]
        assert len(after) == 1 and after[0].op_type == "Cast"
        n.output[0] = after[0].output[0]
        drop.add(id(after[0]))
    keep = [n for n in m.graph.node if id(n) not in drop]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, str(out / "model.onnx"))
    for f in art.iterdir():  # the weights, the GPU form, the tokenizer: hard links
        if f.name not in ("model.onnx", "kvtrace.json"):
            os.link(f, out / f.name)
    data = json.loads((art / "kvtrace.json").read_text())
    data.pop("files", None)
    data["graph"]["attention_precision"] = "native"
    (out / "kvtrace.json").write_text(json.dumps(data))
    return out


def time_run(model, prompts, new_tokens: int) -> tuple[float, float]:
    """(prefill ms, decode ms per token) of one greedy run."""
    import numpy as np

    t0 = time.perf_counter()
    logits = model.start(prompts, logits="last")[:, 0]
    t1 = time.perf_counter()
    tok = logits.argmax(-1)
    for _ in range(new_tokens - 1):
        tok = np.asarray(model.step(tok)).argmax(-1)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / (new_tokens - 1)


def step_profile(files: dict[str, Path], io: dict, cfg, batch: int, position: int, runs: int) -> dict:
    """One decode step at `position` through onnxruntime directly (no kvtrace runtime around it),
    each graph `runs` times, alternated: median ms per step, and onnxruntime's per-node profile:
    ms per step spent in the Cast nodes and in the Attention nodes."""
    import numpy as np
    import onnxruntime as ort

    sessions, prof_files = {}, {}
    for k, f in files.items():
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(f.parent / f"profile-{f.stem}")
        sessions[k] = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.full((batch, 1), 5, np.int64), "position_ids": np.full((batch, 1), position, np.int64),
             "logits_index": np.zeros((batch, 1), np.int64)}
    for t in io["inputs"]:
        if t["name"].startswith("past_key_values"):
            feeds[t["name"]] = np.random.default_rng(0).standard_normal(
                (batch, cfg.n_kv_heads, io["max_seq"], cfg.head_dim)).astype(np.float16)
    times = {k: [] for k in sessions}
    for k, s in sessions.items():  # warm-up
        s.run(None, feeds)
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, s in sessions.items():
        path = s.end_profiling()
        events = json.loads(Path(path).read_text())
        per_op = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3
        n = runs + 1
        out[k] = {"step_ms": round(statistics.median(times[k]), 3),
                  "cast_ms": round(per_op.get("Cast", 0.0) / n, 3),
                  "attention_ms": round(per_op.get("Attention", 0.0) / n, 3),
                  "all_nodes_ms": round(sum(per_op.values()) / n, 3)}
        Path(path).unlink()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.environ.get("KVTRACE_BENCH_DIR",
                                                     str(Path.home() / ".cache" / "kvtrace-bench")))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reexport", action="store_true")
    ap.add_argument("--steps-only", action="store_true",
                    help="time single decode steps through onnxruntime directly, with its per-node profile")
    ap.add_argument("--runs", type=int, default=40, help="--steps-only: runs per graph")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.pythia160m import make_checkpoint
    from kvtrace.runtime.model import Model
    from kvtrace.runtime.bench import random_prompts

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(make_checkpoint(work / "pythia160m", "float32", seed=0))
    art = work / "pythia160m-fp16-static-256"
    if a.reexport or not (art / "kvtrace.json").is_file():
        _export(ckpt, art)
    native = native_variant(art, work / "pythia160m-fp16-static-256-native-attention")
    if a.steps_only:
        from kvtrace.manifest import load_manifest

        m = load_manifest(art)
        for b in a.batch:
            r = step_profile({"fp32 attention (model.onnx)": art / "model.onnx",
                              "fp16 attention": native / "model.onnx"}, m.io, m.config(), b, 128, a.runs)
            print(json.dumps({"batch": b, "position": 128, **r}), flush=True)
        return 0
    models = {"fp32 attention (model.onnx)": Model.load(art, backend="onnxruntime"),
              "fp16 attention": Model.load(native, backend="onnxruntime")}
    cfg = models["fp32 attention (model.onnx)"].config
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    rows = []
    for b in a.batch:
        prompts = random_prompts(b, a.prompt_len, cfg.vocab_size, 0)
        for m in models.values():  # warm-up
            time_run(m, prompts, 4)
        res = {k: [] for k in models}
        for _ in range(a.repeats):
            for k, m in models.items():  # alternated
                res[k].append(time_run(m, prompts, a.new_tokens))
        med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in res.items()}
        (pa, da), (pb, db) = med.values()
        rows.append({"batch": b, **{k: {"prefill_ms": round(p, 2), "decode_ms_per_token": round(d, 3)}
                                    for k, (p, d) in med.items()},
                     "decode_ratio": round(da / db, 3), "prefill_ratio": round(pa / pb, 3)})
        print(f"batch {b}: decode ms/token fp32-attention {da:.2f} vs fp16-attention {db:.2f} (x{da / db:.3f}); "
              f"prefill ms {pa:.1f} vs {pb:.1f} (x{pa / pb:.3f})", flush=True)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print(json.dumps(rows, indent=1))
    for m in models.values():
        m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
