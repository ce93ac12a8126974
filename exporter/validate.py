"""Export-time checks: onnx.checker, shape inference, and onnxruntime (CPU) against the
reference model on a ragged batch (prefill + decode steps) through the artifact's own
cache layout.

`compare()` is shared with the tests: it drives the ONNX graph with numpy the way the
runtime does (static: one preallocated cache per layer, updated by TensorScatter and fed
back; dynamic: past -> present with an attention_mask) and the reference Transformer with
the matching cache, and returns per-step logits differences.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvtrace import io_spec
from kvtrace.errors import KvtraceError, ParityFailure

NP_DTYPE = {"float32": np.float32, "float16": np.float16}
# top-1 agreement is judged where the fp32 reference is decisive: a top-2 margin below this is a
# tie that fp16 rounding (about 3 significant digits) may legitimately break either way.
TIE_MARGIN = 1e-2


@dataclass
class ParityResult:
    max_abs: float = 0.0
    top1: float = 1.0  # over positions where the reference's top-2 margin >= TIE_MARGIN
    top1_strict: float = 1.0  # over every position
    finite: bool = True
    per_step: list = field(default_factory=list)  # max |Δ| per call (prefill first)
    positions: int = 0

    def summary(self) -> str:
        return (f"max |Δlogit| {self.max_abs:.3g}, top-1 agreement {100 * self.top1:.2f}% "
                f"(strict {100 * self.top1_strict:.2f}%) over {self.positions} positions, "
                f"{'all finite' if self.finite else 'NON-FINITE logits'}")


def check_graph(model) -> None:
    """onnx.checker and strict shape inference on an in-memory ModelProto (the exporter
    passes the weightless skeleton of what it wrote)."""
    import onnx

    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; report them alike
        raise KvtraceError(f"ONNX check failed: {e}") from e


def sample_prompts(cfg, batch: int = 2, lengths=None, seed: int = 0):
    """A ragged batch: prompts of different lengths, token ids avoiding nothing in particular."""
    rng = np.random.default_rng(seed)
    lengths = lengths or [max(2, 11 - 4 * b) for b in range(batch)]
    return [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in lengths]


def session(path: Path, threads: int | None = None, prepack: bool = True):
    """An onnxruntime CPU session. prepack=False skips MLAS's packed copies of the MatMul
    weights (the same kernels run; ~0.3x the weights less memory, slower on long runs):
    the export's validation uses it to stay near 2x the weight bytes of peak memory."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def session_from_bytes(data: bytes, threads: int | None = 1):
    """An onnxruntime CPU session from an in-memory model (tests, small graphs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


@dataclass
class Step:
    feeds: dict  # input_ids, position_ids, logits_index (+ attention_mask) as int64 numpy
    want: np.ndarray  # reference logits (B, T, V) float32
    real: np.ndarray  # (B, T) bool: positions holding real tokens


def reference_trace(ref_model, *, layout: str, prompts, steps: int = 16, pad_id: int = 0) -> list[Step]:
    """Run the reference on a right-padded ragged batch: prefill, then `steps` greedy decode
    steps (each row continues from its own last real token). Returns every call's inputs and
    logits, so the ONNX side can replay them after the reference's weights are released."""
    import torch

    from kvtrace.models.transformer import DynamicCache, StaticCache

    cfg = ref_model.cfg
    B = len(prompts)
    lens = [len(p) for p in prompts]
    L = max(lens)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    pos = np.tile(np.arange(L, dtype=np.int64), (B, 1))  # padding positions continue the row
    real = np.arange(L)[None, :] < np.array(lens)[:, None]  # (B, L)
    am = real.astype(np.int64)  # (B, P + T), dynamic layout only
    # the static reference needs only the slots this trace reaches: later slots are masked
    cache = StaticCache(cfg, B, L + steps) if layout == "static" else DynamicCache(cfg, B)
    trace = []
    nexts = list(lens)
    # one thread: the batch is a few tokens, and on a busy machine torch's thread-pool barriers
    # cost more than they save (measured: 6 s against 0.3 s for the 160M model's trace)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps + 1):
            T = ids.shape[1]
            # logits at every new position (the reference computes all of them)
            sel = np.tile(np.arange(T, dtype=np.int64), (B, 1))  # (B, T)
            feeds = {io_spec.INPUT_IDS: ids, io_spec.POSITION_IDS: pos, io_spec.LOGITS_INDEX: sel}
            if layout == "dynamic":
                feeds[io_spec.ATTENTION_MASK] = am
            with torch.no_grad():
                want = ref_model(torch.from_numpy(ids), torch.from_numpy(pos), cache,
                                 attention_mask=torch.from_numpy(am) if layout == "dynamic" else None).numpy()
            trace.append(Step(feeds, want, real))
            # next token of each row: the reference's greedy choice at the row's last real position
            last = want[np.arange(B), np.array(nexts) - 1 if step == 0 else 0]  # (B, V)
            ids = last.argmax(-1).astype(np.int64)[:, None]  # (B, 1)
            pos = np.array(nexts, dtype=np.int64)[:, None]
            nexts = [n + 1 for n in nexts]
            real = np.ones((B, 1), dtype=bool)
            if layout == "dynamic":
                am = np.concatenate([am, np.ones((B, 1), dtype=np.int64)], axis=1)
    finally:
        torch.set_num_threads(threads)
    return trace


def replay(sess, trace: list[Step], cfg, *, layout: str, dtype: str, max_seq: int) -> ParityResult:
    """Run the ONNX graph on the trace's inputs through its own cache path and compare.

    static: one cache OrtValue per tensor, bound as the input *and* the output of its
    TensorScatter (the runtime's in-place update); dynamic: present fed back as past.
    """
    import onnxruntime as ort

    B = trace[0].feeds[io_spec.INPUT_IDS].shape[0]
    last = trace[-1].feeds[io_spec.POSITION_IDS].max() + 1
    if layout == "static" and last > max_seq:
        raise KvtraceError(f"validation needs {last} positions; the artifact has max_seq {max_seq}")
    npdt = NP_DTYPE[dtype]
    pairs = io_spec.cache_pairs(cfg.n_layers)
    if layout == "static":
        shape = (B, cfg.n_kv_heads, max_seq, cfg.head_dim)
        caches = {src: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=npdt)) for src, _ in pairs}
    else:
        caches = {src: np.zeros((B, cfg.n_kv_heads, 0, cfg.head_dim), dtype=npdt) for src, _ in pairs}
    res = ParityResult()
    agree = total = agree_strict = decisive = 0
    for st in trace:
        if layout == "static":
            io = sess.io_binding()
            for name, arr in st.feeds.items():
                io.bind_cpu_input(name, arr)
            # logits into a buffer of our own: copy_outputs_to_cpu() would also copy every cache
            out = np.empty(st.want.shape, dtype=np.float32)  # (B, T, V)
            io.bind_output(io_spec.LOGITS, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            for src, dst in pairs:
                io.bind_ortvalue_input(src, caches[src])
                io.bind_ortvalue_output(dst, caches[src])  # in place: present aliases past
            sess.run_with_iobinding(io)
            logits = out
        else:
            outs = sess.run(None, {**st.feeds, **caches})
            got = dict(zip([o.name for o in sess.get_outputs()], outs))
            logits = got[io_spec.LOGITS]
            caches = {src: got[dst] for src, dst in pairs}
        logits = logits.astype(np.float32)  # (B, T, V)
        want, real = st.want, st.real
        d = np.abs(logits - want)[real]
        res.finite &= bool(np.isfinite(logits[real]).all())
        res.per_step.append(float(np.nan_to_num(d, nan=np.inf).max()))
        same = logits.argmax(-1) == want.argmax(-1)  # (B, T)
        top2 = np.sort(want, axis=-1)[..., -2:]
        clear = real & (top2[..., 1] - top2[..., 0] >= TIE_MARGIN)
        agree_strict += int(same[real].sum())
        agree += int(same[clear].sum())
        decisive += int(clear.sum())
        total += int(real.sum())
    res.max_abs = max(res.per_step)
    res.top1 = agree / max(decisive, 1)
    res.top1_strict = agree_strict / max(total, 1)
    res.positions = total
    return res


def compare(sess, ref_model, *, layout: str, dtype: str, max_seq: int, prompts, steps: int = 16,
            pad_id: int = 0) -> ParityResult:
    """Prefill `prompts` (right padded) then `steps` greedy decode steps (tokens chosen by
    the reference) on both; the largest |Δlogit| over every real position and more."""
    if max(len(p) for p in prompts) + steps > max_seq:
        raise KvtraceError(f"validation needs {max(len(p) for p in prompts) + steps} positions; "
                           f"the artifact has max_seq {max_seq}")
    trace = reference_trace(ref_model, layout=layout, prompts=prompts, steps=steps, pad_id=pad_id)
    return replay(sess, trace, ref_model.cfg, layout=layout, dtype=dtype, max_seq=max_seq)


def validation_trace(ref_model, *, layout: str, max_seq: int) -> list[Step]:
    """The export's sample: a ragged batch of 2 (8 and 5 tokens), then 4 decode steps."""
    cfg = ref_model.cfg
    steps = min(4, max_seq // 2)
    first = min(8, max_seq - steps)
    prompts = sample_prompts(cfg, lengths=[first, max(1, first - 3)])
    return reference_trace(ref_model, layout=layout, prompts=prompts, steps=steps,
                           pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0)


def check_parity(model_path: Path, trace: list[Step], cfg, *, layout: str, dtype: str, max_seq: int,
                 tolerances: dict, log=print, sess_dtype: str | None = None) -> ParityResult:
    """The export's final check: onnxruntime on `model_path` replays `trace`; raises
    ParityFailure outside tolerance."""
    t0 = time.perf_counter()
    sess = session(model_path, prepack=False)
    log(f"onnxruntime session ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    res = replay(sess, trace, cfg, layout=layout, dtype=sess_dtype or dtype, max_seq=max_seq)
    del sess
    log(f"onnxruntime vs reference: {res.summary()} ({time.perf_counter() - t0:.1f}s)")
    if not res.finite or res.max_abs > tolerances["max_abs"] or res.top1 < tolerances["top1"]:
        raise ParityFailure(f"{model_path}: onnxruntime output differs from the reference model: {res.summary()}; "
                            f"tolerance for {dtype}: max |Δ| {tolerances['max_abs']}, top-1 {tolerances['top1']}")
    return res
