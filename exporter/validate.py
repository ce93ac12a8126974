"""Export-time checks of a written artifact, before it is moved into place (docs/validation.md).

validate_artifact (an in-memory reference: export_model, the built-in models):
  1. onnx.checker and strict shape inference on the graph (its weights declared as typed inputs,
     so nothing is read back), and onnx.checker by path for external data (file, offsets);
  2. the artifact, loaded by the runtime itself (kvtrace.runtime.model.Model on onnxruntime CPU),
     against the reference through the one parity harness (kvtrace.runtime.parity): a ragged
     batch of two prompts, then decode steps on the reference's greedy tokens, judged by
     configs.TOLERANCES[dtype].
  The reference runs first and is dropped (and the caller's weights released) before onnxruntime
  loads the graph, so the two never sit in memory together.
validate_streamed (checkpoint exports; never holds the model, whatever its size):
  1. as above, plus model.onnx's external-data table against the bytes checked while writing
     (exporter/verify.py checked every initializer against its checkpoint tensor then);
  2. the reference is the layer-streamed one (exporter/references.py): one block in fp32 at a
     time, over the prompts and a fixed continuation (teacher forcing);
  3. "full": the whole exported graph replays that trace (the artifact's own weights, mapped by
     onnxruntime), piece by piece (exporter/chain.py: context, each block, head; one piece's
     weights in memory at a time); "bounded": a graph truncated after TRUNCATED_LAYERS blocks (same builder, the
     artifact's own weight bytes) replays the reference truncated at the same depth, and the
     whole graph is loaded and run for one decode step if it fits in memory (else a log line
     says why not). "auto" picks full when the whole graph's weights and validation cache fit
     in half the available memory (kvtrace.files.available_memory).
bfloat16: onnxruntime's CPU provider has no bf16 MatMul, so the same builder writes an fp32 twin
of the graph from the bf16-rounded weights, which runs instead (bf16 arithmetic itself is left to
the GPU backends); the manifest's validation.method says so.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kvtrace import configs, files, io_spec
from kvtrace.errors import KvtraceError, ParityFailure
from kvtrace.runtime import parity

# the export's sample: 2 rows of 8 and 6 tokens, then 4 decode steps (fewer when max_seq is tiny)
PROMPT_LEN, BATCH, STEPS, SEED = 8, 2, 4, 0
TRUNCATED_LAYERS = 2  # bounded validation: blocks kept (two: the residual stream crosses a block boundary) ...
TRUNCATED_MAX_BYTES = 2 << 30  # ... while onnxruntime needs at most this for them, else one (bounded means bounded)
FULL_FRACTION = 0.5  # auto: the whole graph runs when it needs at most this fraction of available memory


def check_graph(model) -> None:
    """onnx.checker and strict shape inference on an in-memory ModelProto."""
    import onnx

    from kvtrace.exporter.onnx_graph import standard_twin

    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(standard_twin(model), strict_mode=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; report them alike
        raise KvtraceError(f"ONNX check failed: {e}") from e


def validation_prompts(cfg, max_seq: int) -> tuple[list[list[int]], int]:
    steps = min(STEPS, max_seq // 2)
    longest = max(1, min(PROMPT_LEN, max_seq - steps))
    prompts = parity.make_prompts(BATCH, longest, cfg.vocab_size, SEED,
                                  avoid=(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id))
    return prompts, steps


def validate_artifact(art: Path, graph, inits, cfg, weights: Mapping, reference, *, spec, release=None,
                      model=None, log=print, accuracy_reference=None) -> dict:
    """Check the artifact being written at `art` (manifest included); returns the manifest's
    "validation" entry or raises ParityFailure / KvtraceError naming the artifact."""
    from kvtrace.exporter.export import DATA_NAME, skeleton

    onnx_path = art / io_spec.ONNX_NAME
    t0 = time.perf_counter()
    try:
        check_graph(skeleton(graph, inits))
        if (art / DATA_NAME).exists():
            import onnx

            onnx.checker.check_model(str(onnx_path))  # external references: file, offsets, lengths
    except Exception as e:  # noqa: BLE001
        raise KvtraceError(f"{onnx_path.name}: {e}") from e
    log(f"onnx.checker + shape inference ok ({time.perf_counter() - t0:.2f}s)")

    prompts, steps = validation_prompts(cfg, spec.max_seq)
    trace = parity.record(reference, prompts, steps)
    if hasattr(reference, "close"):
        reference.close()
    log(f"reference model run ({trace.seconds:.1f}s)")
    accuracy_trace = None
    if accuracy_reference is not None:  # a quantised export: also the unquantised model, reported
        accuracy_trace = parity.record(accuracy_reference, prompts, steps)
        if hasattr(accuracy_reference, "close"):
            accuracy_reference.close()
    run_dir, method = art, "onnxruntime-cpu through kvtrace.runtime"
    if spec.dtype == "bfloat16":
        run_dir = _bf16_twin(art, cfg, weights, spec, model)
        method += ", fp32 twin graph of the bf16-rounded weights"
    if release is not None:
        release()
    key = configs.tolerance_key(spec.dtype, spec.quant)
    tol = configs.TOLERANCES[key]
    accuracy = None
    try:
        report = _judged_replay(run_dir, trace, spec, tol)
        if accuracy_trace is not None:
            acc = _replay(run_dir, accuracy_trace, configs.TOLERANCES[key + configs.UNQUANTIZED],
                          quantized=True)["summary"]
            accuracy = {"reference": "kvtrace torch model (fp32), unquantised weights", "kl_mean": acc["kl_mean"],
                        "top1": acc["top1"], "top1_strict": acc["top1_strict"], "max_rel": acc["max_rel"],
                        "positions": acc["positions"]}
    finally:
        if run_dir != art:
            shutil.rmtree(run_dir, ignore_errors=True)
    _log_report(report, log, accuracy)
    if not report["passed"]:
        raise ParityFailure(f"the exported graph's onnxruntime output differs from the reference model: "
                            f"{'; '.join(report['failures'])} ({parity.one_line(report)}; tolerance for "
                            f"{key}: {tol})")
    s = report["summary"]
    ref_name = "kvtrace torch model (fp32)" + (" with the artifact's quantised weights" if spec.quant else "")
    out = {"method": method, "reference": ref_name, "harness": "kvtrace.runtime.parity",
           "prompt_lengths": [len(p) for p in prompts], "steps": steps, "tolerance": key,
           "max_abs": s["max_abs"], "max_rel": s["max_rel"], "top1": s["top1"], "top1_strict": s["top1_strict"],
           "decisive_positions": s["decisive"], "positions": s["positions"], "notes": report["notes"]}
    if "exact_check" in report:
        out["exact_check"] = {k: report["exact_check"][k] for k in ("accuracy_level", "max_abs", "max_rel", "top1")}
    if accuracy is not None:
        out["accuracy_vs_unquantized"] = accuracy
    return out


def _judged_replay(run_dir: Path, trace, spec, tol: dict, chained: bool = False) -> dict:
    """The replay judged by `tol`; a quantised artifact also runs at accuracy level 1 (fp32
    arithmetic), judged by the compute dtype's row: exact up to rounding (runtime/parity.py).
    chained: the graph runs piece by piece (exporter/chain.py)."""
    report = _replay(run_dir, trace, tol, quantized=spec.quant is not None, chained=chained)
    if spec.quant is not None:
        parity.add_exact_check(report, _replay(run_dir, trace, configs.TOLERANCES[spec.dtype], quantized=True,
                                               accuracy_level=parity.EXACT_ACCURACY_LEVEL, chained=chained))
    return report


def _log_report(report: dict, log, accuracy=None, what: str = "") -> None:
    log(f"onnxruntime{what} vs reference: {parity.one_line(report)} ({report['seconds']['artifact']:.1f}s)")
    if "exact_check" in report:
        ex = report["exact_check"]
        log(f"exact check (accuracy level {ex['accuracy_level']}, fp32 arithmetic): max |Δlogit| {ex['max_abs']:.3g} "
            f"(relative {ex['max_rel']:.3g}){'' if ex['passed'] else ' FAILED'}")
    if accuracy is not None:
        log(f"quantisation vs the unquantised model: KL {accuracy['kl_mean']:.3g} nats/token, top-1 "
            f"{'n/a' if accuracy['top1'] is None else format(accuracy['top1'], '.3f')} (reported, not judged)")
    for note in report["notes"]:
        log(f"note: {note}")


def _replay(run_dir: Path, trace, tol: dict, quantized: bool = False, accuracy_level=None,
            chained: bool = False) -> dict:
    from kvtrace.runtime.model import Model

    # one thread: a few tokens; no MLAS prepacking: one copy of the weights, not two (a quantised
    # graph keeps it: its low-bit kernel without prepacking is slow and holds more, not less)
    if chained:
        from kvtrace.exporter import chain

        return parity.judge(chain.replay(run_dir, trace, threads=1, prepack=quantized,
                                         accuracy_level=accuracy_level), tol)
    m = Model.load(run_dir, backend="onnxruntime", threads=1, prepack=quantized, accuracy_level=accuracy_level)
    try:
        return parity.judge(parity.replay(m, trace), tol)
    finally:
        m.close()


def _bf16_twin(art: Path, cfg, weights: Mapping, spec, model=None) -> Path:
    """An fp32 artifact (inside `art`, removed afterwards) of the same graph (built, or traced from
    `model`) with the bf16-rounded weights."""
    from kvtrace.exporter.export import DATA_NAME, TWO_GB, make_graph, write_onnx
    from kvtrace.manifest import file_digests, load_manifest, write_manifest

    twin = art / ".bf16-twin"
    twin.mkdir()
    graph, inits, _ = make_graph(cfg, _Bf16Rounded(weights), spec, _bf16_rounded_copy(model) if model else None,
                                 dtype="float32")
    external = sum(t.nbytes for t in inits) + (1 << 20) >= TWO_GB
    written = write_onnx(graph, inits, twin / io_spec.ONNX_NAME, external=external,
                         on_tensor=(lambda *a: weights.release()) if hasattr(weights, "release") else None)
    data = dict(load_manifest(art).data)
    data["dtype"], data["external_data"], data["tokenizer"] = "float32", DATA_NAME if external else None, None
    data.pop("graphs", None)  # the twin is model.onnx alone
    data["files"] = written.files or file_digests(twin, [p.name for p in twin.iterdir()])  # the twin's own
    data["io"] = io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                               vocab_size=cfg.vocab_size, dtype="float32", layout=spec.layout,
                               max_seq=spec.max_seq, max_batch=spec.max_batch)
    write_manifest(twin, data)
    return twin


def _bf16_rounded_copy(model):
    """An fp32 copy of `model` whose parameters are rounded to bfloat16 (the traced bf16 twin)."""
    import copy

    import torch

    twin = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for t in twin.state_dict().values():
            t.copy_(t.to(torch.bfloat16))
    return twin


class _Bf16Rounded(Mapping):
    """Weights rounded to bfloat16 and widened back to fp32 (for the bf16 validation twin)."""

    def __init__(self, inner: Mapping):
        self._inner = inner

    def __getitem__(self, name):
        from kvtrace.exporter.onnx_graph import to_dtype

        return to_dtype(self._inner[name], "bfloat16").astype(np.float32)

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)


# ---------------------------------------------------------------------------- streamed validation
def continuation(cfg, steps: int) -> list[list[int]]:
    """The tokens fed after the prompts (teacher forcing): one per row and step, drawn like the
    prompts (another seed)."""
    if steps == 0:
        return [[] for _ in range(BATCH)]
    return parity.make_prompts(BATCH, steps, cfg.vocab_size, SEED + 1, ragged=False,
                               avoid=(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id))


def cache_bytes(cfg, spec, batch: int) -> int:
    """The KV cache a validation run of `batch` rows allocates (static: max_seq slots)."""
    if spec.layout != "static":
        return 0
    item = 4 if spec.dtype == "float32" else 2
    return 2 * cfg.n_layers * batch * cfg.n_kv_heads * spec.max_seq * cfg.head_dim * item


# onnxruntime's CPU provider has no fp16 MatMul on x86: it casts every fp16 weight to an fp32
# copy when it loads the graph (TinyLlama-1.1B shape, 2.2 GB of fp16 weights: 4.6 GB resident);
# bf16 runs as an fp32 twin. Memory estimates count the weights this many times their size.
CPU_WEIGHT_FACTOR = {"float32": 1, "float16": 2, "bfloat16": 2}


def graph_bytes(cfg, dtype: str, n_layers: int | None = None) -> int:
    """Weight bytes of the graph of the first n_layers blocks (all by default) in `dtype`."""
    item = 4 if dtype == "float32" else 2
    n = cfg.n_layers if n_layers is None else n_layers
    total = 0
    for name, shape in cfg.param_shapes().items():
        if name.startswith("layers.") and int(name.split(".")[1]) >= n:
            continue
        total += item * int(np.prod(shape))
    return total


def plan(cfg, spec, weight_bytes: int | None = None) -> dict:
    """Which validation runs: {"mode", "why", "layers" (bounded: blocks of the truncated graph),
    "smoke", "smoke_why", "available"}. Memory needs are onnxruntime's (weights x
    CPU_WEIGHT_FACTOR, plus the validation cache), against FULL_FRACTION of available memory."""
    avail, where = files.available_memory()
    f = CPU_WEIGHT_FACTOR[spec.dtype]
    weights = graph_bytes(cfg, spec.dtype) if weight_bytes is None else weight_bytes
    full_need = f * weights + cache_bytes(cfg, spec, BATCH)
    smoke_need = f * weights + cache_bytes(cfg, spec, 1)
    budget = None if avail is None else int(FULL_FRACTION * avail)

    def fits(n):
        return budget is not None and n <= budget

    def gb(n):
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    where_txt = f"{gb(avail)} available ({where})" if avail is not None else "(unknown) available memory"
    mode = spec.validation
    if mode == "auto":
        mode = "full" if fits(full_need) else "bounded"
        why = (f"auto: onnxruntime needs about {gb(full_need)} for the whole graph, "
               f"{'within' if mode == 'full' else 'more than'} half of the {where_txt}")
    else:
        why = f"--validation {mode}"
    layers = min(TRUNCATED_LAYERS, cfg.n_layers)
    smoke, smoke_why = False, None
    if mode == "bounded":
        # two blocks when onnxruntime needs at most TRUNCATED_MAX_BYTES (and half the available
        # memory) for them, else one: the truncated graph's memory must not grow with the model
        while layers > 1 and not (f * graph_bytes(cfg, spec.dtype, layers) <= TRUNCATED_MAX_BYTES
                                  and fits(f * graph_bytes(cfg, spec.dtype, layers))):
            layers -= 1
        if spec.dtype == "bfloat16":
            smoke_why = "onnxruntime's CPU provider has no bfloat16 MatMul"
        elif fits(smoke_need):
            smoke = True
        else:
            # (the run is piece by piece, so memory does not forbid it: the rule keeps the extra pass
            # over every block's weights to models whose whole graph would fit in one session)
            smoke_why = (f"skipped at this size: onnxruntime would need about {gb(smoke_need)} for the whole graph in "
                         f"one session, more than half of the {where_txt}; --validation full runs every block, "
                         "piece by piece, in bounded memory")
    return {"mode": mode, "why": why, "layers": layers, "smoke": smoke, "smoke_why": smoke_why, "available": avail}


class StreamedReference:
    """The reference side of validate_streamed, started before the artifact is written: the plan
    (full or bounded, and the depth) and the layer-streamed reference's trace over the prompts
    and the fixed continuation, computed in a background thread while the writer streams the
    weights (it reads the checkpoint alone: nothing written is needed). The thread reads through
    weights.fork() where the mapping has one (models/stream.py), so that its page releases and the
    writer's never touch each other's pages. cancel() ends it between blocks (a failed export)."""

    def __init__(self, cfg, weights: Mapping, spec, weight_bytes: int):
        import threading

        from kvtrace.exporter.references import LayerStreamedReference

        self.plan = plan(cfg, spec, weight_bytes)
        self.depth = cfg.n_layers if self.plan["mode"] == "full" else self.plan["layers"]
        self.prompts, self.steps = validation_prompts(cfg, spec.max_seq)
        self.cont = continuation(cfg, self.steps)
        fork = getattr(weights, "fork", None)
        ref_weights = fork() if callable(fork) else weights
        self._own = ref_weights if ref_weights is not weights else None
        if spec.quant is not None:  # the reference holds the artifact's quantised weights (dequantised, fp32)
            from kvtrace.exporter.quantize import FakeQuantized

            ref_weights = FakeQuantized(cfg, ref_weights, spec.quant_spec, spec.dtype)
        self._stop = False
        self._ref = LayerStreamedReference(cfg, ref_weights, {"kind": "checkpoint", "dtype": "float32"},
                                           stop=lambda: self._stop)
        self._trace, self._error = None, None
        self._thread = threading.Thread(target=self._run, name="kvtrace-validation-reference", daemon=True)

    def start(self) -> "StreamedReference":
        """Start the thread (apart from __init__, so that whoever holds the object can cancel it
        even when an interrupt lands right after the start)."""
        self._thread.start()
        return self

    def _run(self):
        t0 = time.perf_counter()
        try:
            self._trace = self._ref.run(self.prompts, self.cont, [self.depth])[self.depth]
            self._trace.seconds = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the thread that asks for the trace
            self._error = e
        finally:
            if self._own is not None:
                self._own.close()

    def trace(self):
        """The reference's trace (waits for the thread; raises what it raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._trace

    def cancel(self) -> None:
        self._stop = True
        if self._thread.ident is not None:  # started: it closes its own mappings
            self._thread.join()
        elif self._own is not None:
            self._own.close()


def validate_streamed(art: Path, graph, inits, cfg, weights: Mapping, *, spec, written, check, release=None,
                      log=print, reference: StreamedReference | None = None) -> dict:
    """The streamed export's validation (module docstring); returns the manifest's entry or
    raises ParityFailure / KvtraceError. reference: the StreamedReference started before writing
    (None: started here)."""
    from kvtrace.exporter.export import skeleton

    onnx_path = art / io_spec.ONNX_NAME
    t0 = time.perf_counter()
    try:
        check_graph(skeleton(graph, inits))
        if written.external:
            import onnx

            onnx.checker.check_model(str(onnx_path))  # external references: file, offsets, lengths
    except Exception as e:  # noqa: BLE001
        raise KvtraceError(f"{onnx_path.name}: {e}") from e
    if check is None:  # quantised: the written bytes were read back against the quantiser's (export.py)
        log(f"onnx.checker + shape inference ok ({time.perf_counter() - t0:.2f}s)")
    else:
        if written.external:
            check.check_table(onnx_path)
        log(f"onnx.checker + shape inference ok; {check.checked} weights ({check.bytes / 1e9:.2f} GB) equal their "
            f"checkpoint tensors under the documented transform ({time.perf_counter() - t0:.2f}s)")

    if reference is None:
        reference = StreamedReference(cfg, weights, spec, sum(t.nbytes for t in inits)).start()
    p, k, depth, prompts, steps = reference.plan, reference.plan["layers"], reference.depth, reference.prompts, \
        reference.steps
    log(f"{p['mode']} validation ({p['why']})")
    t0 = time.perf_counter()
    trace = reference.trace()
    waited = time.perf_counter() - t0
    log(f"reference run, {depth} of {cfg.n_layers} blocks streamed one at a time in fp32 ({trace.seconds:.1f}s, "
        f"beside the writing; waited {waited:.1f}s for it)")
    key = configs.tolerance_key(spec.dtype, spec.quant)
    tol = configs.TOLERANCES[key]
    result = {"mode": p["mode"], "why": p["why"],
              "reference": "kvtrace torch model (fp32), blocks streamed one at a time from the checkpoint"
                           + (", with the artifact's quantised weights" if spec.quant else ""),
              "harness": "kvtrace.runtime.parity", "tokens": "prompts, then a fixed continuation (teacher forcing)",
              "prompt_lengths": [len(x) for x in prompts], "steps": steps,
              "initializers": check.summary() if check is not None else "read back (written_weights)",
              "tolerance": key}

    run_dir, method = art, "onnxruntime-cpu through kvtrace.runtime"
    try:
        if p["mode"] == "full":
            if spec.dtype == "bfloat16":
                run_dir = _bf16_twin(art, cfg, weights, spec)
                method += ", fp32 twin graph of the bf16-rounded weights"
            if release is not None:
                release()
            what = "whole graph, piece by piece"
        else:
            run_dir = _truncated(art, cfg, weights, spec, k, written)
            method += (f", graph truncated after {k} of {cfg.n_layers} blocks" +
                       (" (fp32 twin of the bf16-rounded weights)" if spec.dtype == "bfloat16"
                        else " (the artifact's own weight bytes)" if written.external else ""))
            what = f"truncated graph ({k} blocks), piece by piece"
        report = _judged_replay(run_dir, trace, spec, tol, chained=True)  # one piece in memory at a time
    finally:
        if run_dir != art:
            shutil.rmtree(run_dir, ignore_errors=True)
    if "chain" in report:
        c = report["chain"]
        method += (f", {'the whole graph' if p['mode'] == 'full' else 'run'} in {c['pieces']} pieces one after another "
                   f"(context, each block, head: "
                   f"all {c['nodes']} nodes; at most {c['largest_piece_bytes'] / 1e6:.1f} MB of weights in memory)")
    _log_report(report, log, what=f" ({what})")
    if not report["passed"]:
        raise ParityFailure(f"the exported graph's onnxruntime output differs from the reference model: "
                            f"{'; '.join(report['failures'])} ({parity.one_line(report)}; tolerance for "
                            f"{key}: {tol})")
    s = report["summary"]
    result.update(method=method, layers=depth,
                  max_abs=s["max_abs"], max_rel=s["max_rel"], top1=s["top1"], top1_strict=s["top1_strict"],
                  decisive_positions=s["decisive"], positions=s["positions"], notes=report["notes"])
    if "exact_check" in report:
        result["exact_check"] = {k: report["exact_check"][k] for k in ("accuracy_level", "max_abs", "max_rel", "top1")}
    if "chain" in report:
        result["chain"] = report["chain"]
    if p["mode"] == "bounded":
        if p["smoke"]:
            result["whole_graph"] = _smoke(art, cfg, log)
        else:
            log(f"whole graph not run: {p['smoke_why']}")
            result["whole_graph"] = {"skipped": p["smoke_why"]}
    return result


def _truncated(art: Path, cfg, weights: Mapping, spec, k: int, written) -> Path:
    """An artifact (inside `art`, removed afterwards) of the same builder's graph truncated after
    k blocks. With external data it reads the artifact's own bytes: its model.onnx.data is a
    hard link to the artifact's and its initializers point at the offsets the artifact uses."""
    from kvtrace.exporter import onnx_graph
    from kvtrace.exporter.export import DATA_NAME, write_onnx
    from kvtrace.manifest import load_manifest, write_manifest
    from onnx import TensorProto

    sub = art / ".validate-truncated"
    sub.mkdir()
    cfg_k = cfg.replace(n_layers=k)
    dtype = "float32" if spec.dtype == "bfloat16" else spec.dtype
    w = _Bf16Rounded(weights) if spec.dtype == "bfloat16" else weights
    graph, inits, _ = onnx_graph.build(cfg_k, w, **{**spec.graph_options(), "dtype": dtype})
    linked = False
    if written.external and spec.dtype != "bfloat16":
        try:
            os.link(art / DATA_NAME, sub / DATA_NAME)
            linked = True
        except OSError:  # a file system without hard links: write the k blocks' weights instead
            pass
    if linked:
        metas = []
        for t in inits:
            loc, offset, length = written.offsets[t.name]
            if loc != DATA_NAME or length != t.nbytes:
                raise KvtraceError(f"internal error: truncated graph initializer {t.name} does not match the artifact's")
            m = t.meta()
            m.data_location = TensorProto.EXTERNAL
            for key, v in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(length))):
                e = m.external_data.add()
                e.key, e.value = key, v
            metas.append(m)
        graph.graph.initializer.extend(metas)
        (sub / io_spec.ONNX_NAME).write_bytes(graph.SerializeToString())
    else:
        write_onnx(graph, inits, sub / io_spec.ONNX_NAME, external=True,
                   on_tensor=(lambda *a: weights.release()) if hasattr(weights, "release") else None)
    data = dict(load_manifest(art).data)
    data.pop("files", None)
    data.pop("graphs", None)  # the truncated graph is model.onnx alone
    data["config"] = cfg_k.to_dict()
    data["dtype"], data["external_data"], data["tokenizer"] = dtype, DATA_NAME, None
    data["io"] = io_spec.build(n_layers=k, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                               vocab_size=cfg.vocab_size, dtype=dtype, layout=spec.layout,
                               max_seq=spec.max_seq, max_batch=spec.max_batch)
    write_manifest(sub, data)
    return sub


def _smoke(art: Path, cfg, log) -> dict:
    """The whole graph loaded by the runtime and run for a one-token prompt and one decode step,
    piece by piece (exporter/chain.py: one block's weights in memory at a time): it loads, its
    external data resolves, and its logits are finite."""
    from kvtrace.exporter import chain

    t0 = time.perf_counter()
    prompt, tok = validation_prompts(cfg, 2)[0][0][:1], continuation(cfg, 1)[0][0]
    (a, b), info = chain.run(art, [prompt], [[tok]])
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    dt = time.perf_counter() - t0
    if not finite:
        raise ParityFailure("the whole exported graph produced non-finite logits on a one-token prompt and one "
                            "decode step (the truncated graph was finite: a weight beyond the first blocks "
                            "holds NaN/Inf, or activations overflow)")
    log(f"whole graph loaded and run piece by piece (prompt of 1 token + 1 decode step): logits finite ({dt:.1f}s)")
    return {"ran": f"one-token prompt + one decode step, piece by piece ({info['pieces']} pieces)", "finite": True,
            "seconds": round(dt, 2)}
