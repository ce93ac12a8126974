"""`kvtrace gpu-check ART [--json FILE]`: what a first session on an NVIDIA GPU must verify, in one
report. No torch (unless --compare hf).

On a machine with a usable GPU, for each GPU backend (onnxruntime-cuda; tensorrt when the
artifact has an engine):
  device and driver      name, compute capability, memory, driver CUDA version (libcuda)
  versions               onnxruntime(-gpu), TensorRT; cuda_status() (a real CUDA session?)
  placement              onnxruntime-cuda: nodes per provider, nodes on the CPU (refused unless
                         --allow-cpu-nodes), graph form used, CUDA graphs on/off and why
  parity                 a ragged prefill (logits at every real position) and --steps decode
                         steps, teacher-forced with the CPU path's greedy tokens, against
                         backend "onnxruntime" (CPU) on the same artifact; tolerance per dtype
                         (kvtrace.configs.TOLERANCES)
  in-place cache         the cache buffers keep their device addresses across the steps, and
                         hold the CPU path's keys/values afterwards (every real slot)
  CUDA graphs            decode with graphs against decode without (same inputs), and the
                         backend's capture bookkeeping (TensorRT: captured / why not)
  timings                prefill ms and decode ms/token with and without CUDA graphs, runs
                         alternated, medians (and transformers on the GPU with --compare hf)
Exit status 0: every check passed; 1: a check failed; 2: no usable GPU (one line saying why;
--json FILE gets {"gpu_available": false, "reason": ...}) or bad input.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from kvtrace import files, options
from kvtrace.errors import KvtraceError

GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt")


# ------------------------------------------------------------------ pieces
def _versions() -> dict:
    from . import backends

    out = {}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        out["onnxruntime"] = None
    ok, why = backends.cuda_status()
    out["onnxruntime_cuda"] = {"usable": ok, "detail": why,
                               "minimum": ".".join(map(str, backends.MIN_ORT_GPU))}
    try:
        from .trt_backend import import_tensorrt

        trt, flavour = import_tensorrt()
        out["tensorrt"] = {"flavour": flavour, "version": trt.__version__}
    except KvtraceError as e:
        out["tensorrt"] = {"flavour": None, "detail": str(e)}
    return out


def _prompts(vocab: int, batch: int, prompt_len: int, avoid) -> list[list[int]]:
    """Ragged: lengths prompt_len, then shorter rows (the padding path is what differs on a GPU)."""
    from .bench import random_prompts

    full = random_prompts(batch, prompt_len, vocab, seed=11, avoid=avoid)
    return [p[: max(1, prompt_len - (i * prompt_len) // (batch + 1))] for i, p in enumerate(full)]


def _drive(m, prompts, tokens=None, steps: int = 0) -> dict:
    """Prefill (logits at every position) then decode steps; tokens: per step (B,) ids to feed
    (teacher forcing), None = greedy. -> {"prefill": (B, T, V), "steps": [(B, V)], "tokens"}."""
    pre = m.start(prompts)  # (B, T, V)
    # static cache: where the cache buffers are after the prefill (they must not move)
    ptrs = [buf.data_ptr() for _, buf in m.cache_buffers()] if m.layout == "static" else None
    lens = np.array([len(p) for p in prompts])
    tok = pre[np.arange(len(prompts)), lens - 1].argmax(-1)
    out, fed = [], []
    for i in range(steps):
        t = np.asarray(tokens[i]) if tokens is not None else tok
        fed.append(t.tolist())
        logits = m.step(t)
        out.append(logits)
        tok = logits.argmax(-1)
    return {"prefill": pre, "steps": out, "tokens": fed, "lengths": lens, "cache_ptrs": ptrs}


def _compare(got: dict, want: dict, tol: dict) -> dict:
    lens = want["lengths"]
    real_g = np.concatenate([got["prefill"][b, :n] for b, n in enumerate(lens)] + list(got["steps"]))
    real_w = np.concatenate([want["prefill"][b, :n] for b, n in enumerate(lens)] + list(want["steps"]))
    d = np.abs(real_g.astype(np.float64) - real_w)
    finite = bool(np.isfinite(real_g).all())
    max_abs = float(np.nan_to_num(d, nan=np.inf).max())
    top1 = float((real_g.argmax(-1) == real_w.argmax(-1)).mean())
    ok = finite and max_abs <= tol["max_abs"] and top1 >= tol["top1"]
    return {"ok": ok, "max_abs": max_abs, "top1": top1, "finite": finite, "positions": int(real_w.shape[0]),
            "tolerance": tol}


def _cache_state(m) -> list[tuple[str, int, np.ndarray]]:
    return [(name, buf.data_ptr(), m.backend.to_host(buf)) for name, buf in m.cache_buffers()]


def _timings(models: dict, prompts, new_tokens: int, repeats: int, hf=None) -> dict:
    """Prefill ms (logits of the last token) and decode ms/token per model, runs alternated."""
    from .bench import _median, ours_runner

    runners = {name: ours_runner(m, prompts, new_tokens) for name, m in models.items()}
    if hf is not None:
        runners["transformers"] = hf
    for run in runners.values():
        run()  # warm-up (and capture)
    runs = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            runs[name].append(run())
    out = {}
    for name, rs in runs.items():
        if name == "transformers":
            t1, tn = [r[0] for r in rs], [r[1] for r in rs]
            pre = _median(t1)
            out[name] = {"prefill_ms": round(pre, 3), "decode_ms_per_token": round((_median(tn) - pre) / (new_tokens - 1), 4)}
        else:
            out[name] = {"prefill_ms": round(_median([r[0] for r in rs]), 3),
                         "decode_ms_per_token": round(_median([r[1] for r in rs]), 4)}
    return out


# ------------------------------------------------------------------ one backend
def check_backend(name: str, art: Path, prompts, ref, *, steps: int, repeats: int, tol: dict,
                  allow_cpu_nodes: bool, hf=None) -> dict:
    from .model import Model

    res: dict = {"checks": {}}
    checks = res["checks"]
    opts = {"allow_cpu_nodes": True} if allow_cpu_nodes else {}
    try:
        m = Model.load(art, backend=name, **opts)
    except KvtraceError as e:
        res["loaded"] = False
        res["reason"] = str(e)
        checks["load"] = {"ok": False, "detail": str(e)}
        return res
    res["loaded"] = True
    be = m.backend
    res["graph_file"] = getattr(getattr(be, "onnx_file", None), "name", None)
    res["placement"] = getattr(be, "placement", None)
    res["cuda_graph"] = bool(getattr(be, "cuda_graph", False))
    res["notes"] = list(getattr(be, "notes", []))
    if res["placement"] is not None:
        checks["placement"] = {"ok": not res["placement"]["cpu"], "nodes": res["placement"]["nodes"],
                               "cpu": res["placement"]["cpu"][:20]}
    plain = None
    try:
        got = _drive(m, prompts, ref["tokens"] if ref else None, steps)
        if ref is not None:
            checks["parity_vs_cpu"] = _compare(got, ref, tol)
        if m.layout == "static":
            state = _cache_state(m)  # after the prefill and the steps
            cache = {"same_addresses": [p for _, p, _ in state] == got["cache_ptrs"]}
            cache["ok"] = cache["same_addresses"]
            if ref is not None and ref.get("caches") is not None:
                lens = ref["lengths"] + steps  # every real slot of every row
                worst = 0.0
                for (_, _, g), w in zip(state, ref["caches"]):
                    for b, n in enumerate(lens):
                        worst = max(worst, float(np.abs(g[b, :, :n].astype(np.float64) - w[b, :, :n]).max()))
                cache["max_abs_vs_cpu"] = worst
                cache["ok"] = cache["same_addresses"] and worst <= tol["max_abs"]
            checks["in_place_cache"] = cache
        runs = be.graph_runs() if hasattr(be, "graph_runs") else {}
        res["graph_runs"] = {str(k): {kk: vv for kk, vv in v.items() if kk != "buffers"} for k, v in runs.items()}
        if res["cuda_graph"]:
            plain = Model.load(art, backend=name, cuda_graph=False, **opts)
            nog = _drive(plain, prompts, got["tokens"], steps)
            d = max(float(np.abs(a - b).max()) for a, b in zip(got["steps"], nog["steps"]))
            replay = {"ok": d <= tol["max_abs"], "max_abs_graph_vs_no_graph": d,
                      "bitwise_equal": all(np.array_equal(a, b) for a, b in zip(got["steps"], nog["steps"]))}
            if name == "tensorrt":
                states = {k: v["state"] for k, v in res["graph_runs"].items()}
                replay["captured"] = all(s == "captured" for s in states.values()) and bool(states)
                replay["ok"] = replay["ok"] and replay["captured"]
                replay["states"] = {k: [v["state"], v["reason"]] for k, v in res["graph_runs"].items()}
            checks["cuda_graph_replay"] = replay
        models = {f"{name} (CUDA graphs)" if res["cuda_graph"] else name: m}
        if plain is not None:
            models[f"{name} (no CUDA graphs)"] = plain
        res["timings"] = _timings(models, prompts, steps + 1, repeats, hf=hf)
    except KvtraceError as e:
        checks["run"] = {"ok": False, "detail": str(e)}
    finally:
        m.close()
        if plain is not None:
            plain.close()
    return res


# ------------------------------------------------------------------ the whole check
def gpu_check(artifact, *, backends=GPU_BACKENDS, batch: int | None = None, prompt_len: int | None = None, steps: int = 8,
              repeats: int = 3, allow_cpu_nodes: bool = False, compare: str | None = None,
              checkpoint: str | None = None, log=print) -> dict:
    from kvtrace import __version__, configs
    from kvtrace.manifest import load_manifest

    from . import cuda_driver

    art = Path(artifact)
    manifest = load_manifest(art)  # bad input first: it is an error whatever the machine
    data = manifest.data
    io, cfg = data["io"], data["config"]
    batch = batch if batch is not None else min(3, int(io["max_batch"]))
    prompt_len = prompt_len if prompt_len is not None else max(2, min(16, int(io["max_seq"]) - steps - 1))
    for opt, v, lo in (("--batch", batch, 1), ("--prompt-len", prompt_len, 2), ("--steps", steps, 1),
                       ("--repeats", repeats, 1)):
        if v < lo:
            raise KvtraceError(f"{opt} {v}: must be >= {lo}")
    if batch > int(io["max_batch"]):
        raise KvtraceError(f"--batch {batch}: the artifact takes at most {io['max_batch']} rows")
    if prompt_len + steps + 1 > int(io["max_seq"]):
        raise KvtraceError(f"--prompt-len {prompt_len} + --steps {steps} exceed the artifact's {io['max_seq']} positions")
    try:
        device = cuda_driver.driver_info()
    except KvtraceError as e:
        return {"gpu_available": False, "reason": str(e)}
    if not device["devices"]:
        return {"gpu_available": False, "reason": "the CUDA driver lists no devices"}
    report = {"gpu_available": True, "kvtrace_version": __version__, "device": device, "versions": _versions(),
              "artifact": {"path": str(art.absolute()), "architecture": data.get("architecture"),
                           "dtype": data.get("dtype"), "layout": io.get("layout"),
                           "graph_forms": {"cpu": data.get("onnx"), **{k: v.get("onnx") for k, v in
                                                                      (data.get("graphs") or {}).items()}},
                           "tensorrt_engine": (data.get("tensorrt") or {}).get("engine")},
              "settings": {"batch": batch, "prompt_len": prompt_len, "steps": steps, "repeats": repeats},
              "backends": {}}
    tol = configs.tolerance_for(data)[1]
    prompts = _prompts(cfg["vocab_size"], batch, prompt_len,
                       (cfg.get("bos_token_id"), cfg.get("eos_token_id"), cfg.get("pad_token_id")))
    report["settings"]["prompt_lengths"] = [len(p) for p in prompts]
    # the reference: this artifact on the CPU (the path the exporter validated)
    from .model import Model

    ref = None
    try:
        cpu = Model.load(art, backend="onnxruntime")
        try:
            ref = _drive(cpu, prompts, None, steps)
            ref["caches"] = [h.copy() for _, _, h in _cache_state(cpu)] if cpu.layout == "static" else None
        finally:
            cpu.close()
        report["reference"] = {"backend": "onnxruntime (CPU)", "graph": data.get("onnx")}
    except KvtraceError as e:
        report["reference"] = {"backend": None, "reason": f"the CPU path cannot run this artifact ({e}); "
                                                          "parity not checked (a golden file option is future work)"}
    hf = None
    if compare == "hf":
        hf = _hf_runner(data, checkpoint, prompts, steps + 1)
        report["transformers"] = hf[1]
        hf = hf[0]
    for name in backends:
        if name == "tensorrt" and not data.get("tensorrt"):
            report["backends"][name] = {"loaded": False, "reason": "the artifact has no engine (kvtrace build)",
                                        "checks": {}}
            continue
        log(f"kvtrace gpu-check: {name} ...")
        report["backends"][name] = check_backend(name, art, prompts, ref, steps=steps, repeats=repeats,
                                                 tol=tol, allow_cpu_nodes=allow_cpu_nodes, hf=hf)
    failed = [f"{b}: {c}" for b, r in report["backends"].items() for c, v in r["checks"].items() if not v.get("ok")]
    report["ok"] = not failed
    report["failed"] = failed
    return report


def _hf_runner(data: dict, checkpoint, prompts, new_tokens: int):
    """transformers' generate on the GPU, timed like kvtrace bench --compare hf (rows of equal length)."""
    from .bench import load_baseline  # the "hf" baseline entry point: torch lives outside the runtime

    baseline = load_baseline("hf")

    src = data.get("source") or {}
    ckpt = checkpoint or src.get("path")
    if not ckpt or not (Path(ckpt) / "config.json").is_file():
        raise KvtraceError(f"--compare hf: checkpoint {ckpt}: no config.json there; pass --checkpoint DIR")
    model, versions = baseline.load(str(ckpt), os.cpu_count() or 1, device="cuda", dtype=data["dtype"])
    n = min(len(p) for p in prompts)
    return baseline.runner(model, [p[:n] for p in prompts], new_tokens), {"checkpoint": str(ckpt), **versions,
                                                                          "prompt_len": n}


# ------------------------------------------------------------------ CLI
def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("artifact")
    p.add_argument("--json", metavar="FILE", help="also write the report to FILE (JSON)")
    p.add_argument("--backends", nargs="+", choices=GPU_BACKENDS, default=list(GPU_BACKENDS))
    p.add_argument("--batch", type=options.integer(1), help="rows of the ragged batch (default 3, or the artifact's max batch)")
    p.add_argument("--prompt-len", type=options.integer(1), help="longest prompt (default 16, or what the cache leaves room for)")
    p.add_argument("--steps", type=options.integer(1), default=8, help="decode steps (default 8)")
    p.add_argument("--repeats", type=options.integer(1), default=3, help="timed runs per configuration (default 3)")
    p.add_argument("--allow-cpu-nodes", action="store_true",
                   help="onnxruntime-cuda: run even if some nodes are placed on the CPU (reported)")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' generate on the GPU")
    p.add_argument("--checkpoint", help="checkpoint for --compare hf (default: the manifest's source)")


def _write_json(path: Path, report: dict) -> None:
    files.atomic_write_text(Path(path), json.dumps(report, indent=2, default=str) + "\n", what="--json")


def main(args) -> int:
    if args.json:  # before anything runs; never a file of the artifact (symlinks resolved)
        options.check_report_file("--json", args.json, args.artifact)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    report = gpu_check(args.artifact, backends=args.backends, batch=args.batch, prompt_len=args.prompt_len,
                       steps=args.steps, repeats=args.repeats, allow_cpu_nodes=args.allow_cpu_nodes,
                       compare=args.compare, checkpoint=args.checkpoint, log=log)
    if args.json:
        _write_json(Path(args.json), report)
    if not report["gpu_available"]:
        raise KvtraceError(f"no usable GPU here: {report['reason']}")
    d = report["device"]
    devices = ", ".join(f"{x['name']} ({x['compute_capability']}, {x['memory_gib']} GiB)" for x in d["devices"])
    print(f"device: {devices}; driver supports CUDA {d['driver_cuda_version']}")
    v = report["versions"]
    trt = v["tensorrt"]
    trt_text = f"{trt['flavour']} {trt['version']}" if trt.get("flavour") else trt.get("detail")
    print(f"onnxruntime {v.get('onnxruntime')}: {v['onnxruntime_cuda']['detail']}; TensorRT: {trt_text}")
    for name, r in report["backends"].items():
        if not r.get("loaded"):
            print(f"{name}: not run: {r.get('reason')}")
            continue
        for check, c in r["checks"].items():
            detail = {k: c[k] for k in c if k not in ("ok", "tolerance", "cpu", "states")}
            print(f"{'ok  ' if c.get('ok') else 'FAIL'} {name} {check}: {json.dumps(detail, default=str)}")
        for cfg_name, t in (r.get("timings") or {}).items():
            print(f"     {cfg_name}: prefill {t['prefill_ms']:.2f} ms, decode {t['decode_ms_per_token']:.3f} ms/token")
    print(f"kvtrace gpu-check: {'all checks passed' if report['ok'] else 'FAILED: ' + '; '.join(report['failed'])} "
          f"({time.perf_counter() - t0:.1f}s)")
    return 0 if report["ok"] else 1
