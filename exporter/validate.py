"""Export-time checks of a written artifact, before it is moved into place:
  1. onnx.checker and strict shape inference on the graph (its weights declared as typed inputs,
     so nothing is read back), and onnx.checker by path for external data (file, offsets);
  2. the artifact, loaded by the runtime itself (kvtrace.runtime.model.Model on onnxruntime CPU),
     against the reference through the one parity harness (kvtrace.runtime.parity): a ragged
     batch of two prompts, then decode steps on the reference's greedy tokens, judged by
     configs.TOLERANCES[dtype].
The reference runs first and is dropped (and the caller's weights released) before onnxruntime
loads the graph, so the two never sit in memory together.
bfloat16: onnxruntime's CPU provider has no bf16 MatMul, so the same builder writes an fp32 twin
of the graph from the bf16-rounded weights, which runs instead (bf16 arithmetic itself is left to
the GPU backends); the manifest's validation.method says so.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kvtrace import configs, io_spec
from kvtrace.errors import KvtraceError, ParityFailure
from kvtrace.runtime import parity

# the export's sample: 2 rows of 8 and 6 tokens, then 4 decode steps (fewer when max_seq is tiny)
PROMPT_LEN, BATCH, STEPS, SEED = 8, 2, 4, 0


def check_graph(model) -> None:
    """onnx.checker and strict shape inference on an in-memory ModelProto."""
    import onnx

    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; report them alike
        raise KvtraceError(f"ONNX check failed: {e}") from e


def validation_prompts(cfg, max_seq: int) -> tuple[list[list[int]], int]:
    steps = min(STEPS, max_seq // 2)
    longest = max(1, min(PROMPT_LEN, max_seq - steps))
    prompts = parity.make_prompts(BATCH, longest, cfg.vocab_size, SEED,
                                  avoid=(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id))
    return prompts, steps


def validate_artifact(art: Path, graph, inits, cfg, weights: Mapping, reference, *, spec, release=None,
                      log=print, accuracy_reference=None) -> dict:
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
        run_dir = _bf16_twin(art, cfg, weights, spec)
        method += ", fp32 twin graph of the bf16-rounded weights"
    if release is not None:
        release()
    key = configs.tolerance_key(spec.dtype, spec.quant)
    tol = configs.TOLERANCES[key]
    accuracy = None
    try:
        report = _replay(run_dir, trace, tol, quantized=spec.quant is not None)
        if spec.quant is not None:  # and in fp32 arithmetic: exact up to rounding (runtime/parity.py)
            parity.add_exact_check(report, _replay(run_dir, trace, configs.TOLERANCES[spec.dtype], quantized=True,
                                                   accuracy_level=parity.EXACT_ACCURACY_LEVEL))
        if accuracy_trace is not None:
            acc = _replay(run_dir, accuracy_trace, configs.TOLERANCES[key + configs.UNQUANTIZED],
                          quantized=True)["summary"]
            accuracy = {"reference": "kvtrace torch model (fp32), unquantised weights", "kl_mean": acc["kl_mean"],
                        "top1": acc["top1"], "top1_strict": acc["top1_strict"], "max_rel": acc["max_rel"],
                        "positions": acc["positions"]}
    finally:
        if run_dir != art:
            shutil.rmtree(run_dir, ignore_errors=True)
    log(f"onnxruntime vs reference: {parity.one_line(report)} ({report['seconds']['artifact']:.1f}s)")
    if "exact_check" in report:
        ex = report["exact_check"]
        log(f"exact check (accuracy level {ex['accuracy_level']}, fp32 arithmetic): max |Δlogit| {ex['max_abs']:.3g} "
            f"(relative {ex['max_rel']:.3g}){'' if ex['passed'] else ' FAILED'}")
    if accuracy is not None:
        log(f"quantisation vs the unquantised model: KL {accuracy['kl_mean']:.3g} nats/token, top-1 "
            f"{'n/a' if accuracy['top1'] is None else format(accuracy['top1'], '.3f')} (reported, not judged)")
    for note in report["notes"]:
        log(f"note: {note}")
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


def _replay(run_dir: Path, trace, tol: dict, quantized: bool = False, accuracy_level=None) -> dict:
    from kvtrace.runtime.model import Model

    # one thread: a few tokens; no MLAS prepacking: one copy of the weights, not two (a quantised
    # graph keeps it: its low-bit kernel without prepacking is slow and holds more, not less)
    m = Model.load(run_dir, backend="onnxruntime", threads=1, prepack=quantized, accuracy_level=accuracy_level)
    try:
        return parity.judge(parity.replay(m, trace), tol)
    finally:
        m.close()


def _bf16_twin(art: Path, cfg, weights: Mapping, spec) -> Path:
    """An fp32 artifact (inside `art`, removed afterwards) of the same builder's graph with the
    bf16-rounded weights."""
    from kvtrace.exporter import onnx_graph
    from kvtrace.exporter.export import write_onnx
    from kvtrace.manifest import load_manifest, write_manifest

    twin = art / ".bf16-twin"
    twin.mkdir()
    graph, inits, _ = onnx_graph.build(cfg, _Bf16Rounded(weights), dtype="float32", layout=spec.layout,
                                       max_seq=spec.max_seq, opset=spec.opset, attend=spec.attend)
    write_onnx(graph, inits, twin / io_spec.ONNX_NAME, external=False)
    data = dict(load_manifest(art).data)
    data["dtype"], data["external_data"], data["tokenizer"] = "float32", None, None
    data["io"] = io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                               vocab_size=cfg.vocab_size, dtype="float32", layout=spec.layout,
                               max_seq=spec.max_seq, max_batch=spec.max_batch)
    write_manifest(twin, data)
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
