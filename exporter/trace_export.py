"""`kvtrace export --via trace`: the ONNX graph traced from the reference model itself.

The default export builds the graph from the config (exporter/onnx_graph.py). This module
instead traces models/transformer.py with torch.export (non-strict) and converts it with
torch.onnx (dynamo, opset 24), so a change to the reference model is exported without a
matching change to the builder. The reference's three fused points are custom operators
(models/ops.py); the translation table below maps each to the node the builder emits:

  kvtrace::attention         -> Attention(q, k, v, bool mask; scale), 4-D, one output, GQA kept
                                as GQA; fp16/bf16: q/k/v cast to fp32 around it (the builder's
                                CPU form; the GPU form drops the casts' need: exporter/gpu_form.py)
  kvtrace::rotary_embedding  -> RotaryEmbedding(x, cos, sin, position_ids; interleaved=0,
                                rotary_embedding_dim)
  kvtrace::cache_update      -> TensorScatter(past, new, position_ids[:, 0]; axis=-2), input 0
                                the graph input past_key_values.i.*, output the graph output
                                present.i.* (TensorRT's KV_CACHE_UPDATE)

The traced module takes and returns flat tensors in the order of the I/O contract
(kvtrace/io_spec.py): input_ids, position_ids, logits_index, [attention_mask], then the
caches; logits, then the presents. Batch, sequence, n_logits (and past length) are dynamic.

Afterwards the graph is put into the builder's form, so everything downstream (validation,
runtime, `kvtrace build`, parity) takes it unchanged: weights become named initializers
(canonical parameter names, linear weights stored (out, in) as the builder stores them and
multiplied by FusedMatMul(transB=1) as the builder does, produced lazily one at a time when
written), the graph I/O carries io_spec's names,
dtypes and symbolic dims, and the IR version is stamped as low as the builder's.

Supported: opset 24 only, static and dynamic caches, fp32/fp16/bf16. The static form attends
over the whole cache (the builder's attend="full" GPU form: the reference masks slots >= the
positions in use instead of slicing them away), so onnxruntime's CPU decode cost grows with
--max-seq; the builder's default slices. The portable opset-17 form is build-only.
"""
from __future__ import annotations

import contextlib
import io
import linecache
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from kvtrace import io_spec
from kvtrace.errors import KvtraceError

from .onnx_graph import FUSED_MIN_OPSET, Initializer, fused_linears, ir_version_for, to_dtype

TRACE_OPSET = FUSED_MIN_OPSET
_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def check_options(*, opset: int) -> None:
    if opset != TRACE_OPSET:
        raise KvtraceError(f"--via trace with --opset {opset}: the traced export writes opset {TRACE_OPSET} only "
                           f"(fused Attention/RotaryEmbedding/TensorScatter); use --via build for --opset {opset}")


def _onnxscript():
    try:
        import onnx_ir
        import onnxscript
    except ImportError as e:
        raise KvtraceError(f"--via trace needs onnxscript (pip install 'kvtrace[trace]'): {e}") from e
    return onnxscript, onnx_ir


# ------------------------------------------------------------------ the custom ops in ONNX
def _translation_table():
    """kvtrace custom op -> a function emitting its standard ONNX node (onnxscript, opset 24)."""
    import torch

    onnxscript, ir = _onnxscript()
    op = onnxscript.values.Opset("", TRACE_OPSET)

    def attention(q, k, v, mask, scale):
        # the op has 4 optional outputs; only Y is used (TensorRT takes one-output Attention only)
        if q.dtype == ir.DataType.FLOAT:
            return op.Attention(q, k, v, mask, scale=scale)[0]  # (B, H, T, hd)
        # fp16/bf16: scores and softmax in fp32, as the builder's CPU form (model.onnx) does:
        # onnxruntime ignores softmax_precision and fp16 scores overflow past 65504 (GPT-NeoX/XGLM)
        f32 = ir.DataType.FLOAT.value
        y = op.Attention(op.Cast(q, to=f32), op.Cast(k, to=f32), op.Cast(v, to=f32), mask, scale=scale)[0]
        return op.Cast(y, to=q.dtype.value)  # (B, H, T, hd)

    def rotary_embedding(x, cos_cache, sin_cache, position_ids, rotary_dim):
        return op.RotaryEmbedding(x, cos_cache, sin_cache, position_ids, interleaved=0,
                                  rotary_embedding_dim=rotary_dim)

    def cache_update(cache, new, position_ids):
        write_idx = op.Gather(position_ids, op.Constant(value_int=0), axis=1)  # (B,) = position_ids[:, 0]
        return op.TensorScatter(cache, new, write_idx, axis=-2)  # (B, n_kv, S_max, hd)

    ops = torch.ops.kvtrace
    return {ops.attention.default: attention, ops.rotary_embedding.default: rotary_embedding,
            ops.cache_update.default: cache_update}


# ------------------------------------------------------------------ the traced module
def _wrapper(model, layout: str):
    """The reference model as a function of flat tensors (the I/O contract's order)."""
    import torch

    from kvtrace.models.transformer import DynamicCache, StaticCache

    L = model.cfg.n_layers
    cache_cls = StaticCache if layout == "static" else DynamicCache

    class Traced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, logits_index, *rest):
            attention_mask = rest[0] if layout == "dynamic" else None
            caches = rest[1:] if layout == "dynamic" else rest  # past key, value per layer
            cache = cache_cls.of(caches[0::2], caches[1::2])
            logits = self.model(input_ids, position_ids, cache, attention_mask=attention_mask,
                                logits_index=logits_index)  # (B, K, V) fp32
            return (logits, *[t for i in range(L) for t in (cache.k[i], cache.v[i])])

    return Traced().eval()


def _example(cfg, layout: str, max_seq: int, dtype):
    """Example inputs and their dynamic dims. Sizes >= 2 and pairwise distinct where the dims
    are independent (torch.export specialises sizes 0 and 1)."""
    import torch
    from torch.export import Dim

    B, T, K, P = 2, 3, 2, 4
    batch, seq, n_logits = Dim("batch"), Dim("seq"), Dim("n_logits")
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.arange(T).repeat(B, 1) + (P if layout == "dynamic" else 0)
    args = [ids, pos, torch.zeros(B, K, dtype=torch.long)]
    dims = [{0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: n_logits}]
    rest, rest_dims = [], []  # forward's *rest: [attention_mask,] caches
    n = 2 * cfg.n_layers
    if layout == "static":
        rest += [torch.zeros(B, cfg.n_kv_heads, max_seq, cfg.head_dim, dtype=dtype) for _ in range(n)]
        rest_dims += [{0: batch} for _ in range(n)]
    else:
        past = Dim("past_seq", min=0)
        rest.append(torch.ones(B, P + T, dtype=torch.long))
        rest_dims.append({0: batch, 1: Dim.AUTO})  # total_seq = past_seq + seq: torch.export derives it
        rest += [torch.zeros(B, cfg.n_kv_heads, P, cfg.head_dim, dtype=dtype) for _ in range(n)]
        rest_dims += [{0: batch, 2: past} for _ in range(n)]
    return tuple(args + rest), (*dims, tuple(rest_dims))


@contextlib.contextmanager
def _quiet():
    """torch.export / torch.onnx chatter (missing torchvision, deprecations, the FX graph dumped
    with a failed guard) off the CLI's stderr: what failed is raised as one KvtraceError line."""
    import logging

    names = ["torch", "onnxscript", "onnx_ir"] + [n for n in logging.root.manager.loggerDict
                                                  if n.split(".")[0] in ("torch", "onnxscript", "onnx_ir")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    # torch.export prints the partial FX graph of a failed trace straight to sys.stderr
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def _export_program(wrapper, args, dynamic_shapes, model):
    import torch

    try:
        with _quiet():
            return torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types; all become one line naming the code
        raise KvtraceError(_trace_failure(e, model)) from e


def _trace_failure(e: BaseException, model) -> str:
    """One line: where in the reference model tracing failed, and why."""
    names = {id(m): n for n, m in model.named_modules()}
    frame = None
    for fs, tb in zip(traceback.extract_tb(e.__traceback__), _tb_frames(e.__traceback__)):
        f = os.path.abspath(fs.filename)
        if not _is_library(f) and f != os.path.abspath(__file__):
            frame = (fs, tb)  # the deepest frame of user code (the reference model, or a patch of it)
    why = _reason(e)
    if frame is None:
        return f"--via trace: torch.export could not trace the reference model: {why}"
    fs, fr = frame
    self_obj = fr.f_locals.get("self")
    where = fs.name
    if self_obj is not None:
        mod = names.get(id(self_obj))
        where = f"{type(self_obj).__name__}.{fs.name}" + (f" (module {mod!r})" if mod else "")
    code = (fs.line or linecache.getline(fs.filename, fs.lineno)).strip()
    return (f"--via trace: cannot trace {where} at {_short(fs.filename)}:{fs.lineno} `{code}`: {why}")


def _tb_frames(tb):
    out = []
    while tb is not None:
        out.append(tb.tb_frame)
        tb = tb.tb_next
    return out


def _is_library(path: str) -> bool:
    """torch, onnxscript, the standard library, installed packages -- but not kvtrace's own model
    code (kvtrace.models, the numerics in kvtrace/), wherever it is installed."""
    import sysconfig

    import kvtrace
    import kvtrace.models

    ours = [os.path.dirname(os.path.abspath(m.__file__)) for m in (kvtrace, kvtrace.models)]
    if any(path.startswith(r + os.sep) for r in ours):
        return False
    libs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.startswith(os.path.abspath(r) + os.sep) for r in libs) or "site-packages" in path


def _short(path: str) -> str:
    """The path relative to the checkout / install root or the working directory if under them."""
    p = Path(path).resolve()
    for root in (_MODELS_DIR.parent, Path.cwd()):
        try:
            return str(p.relative_to(root))
        except ValueError:
            pass
    return str(p)


def _reason(e: BaseException) -> str:
    text = str(e)
    kind = type(e).__name__
    if "data-dependent" in text or "DataDependent" in kind or "GuardOnDataDependent" in text:
        return ("Python control flow depends on a tensor's value (data-dependent), which a trace cannot "
                "capture; keep control flow on shapes and config only (torch.where / masks for values)")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), kind)
    return f"{kind}: {first}"


def _to_onnx(program, table, input_names, output_names):
    import torch

    try:
        with _quiet():
            return torch.onnx.export(program, opset_version=TRACE_OPSET, dynamo=True, optimize=False, verbose=False,
                                     custom_translation_table=table, input_names=input_names,
                                     output_names=output_names)
    except Exception as e:  # noqa: BLE001
        cause, msg = e, ""
        while cause is not None:  # the innermost error names the node that failed
            lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
            msg = lines[0] if lines else type(cause).__name__
            cause = cause.__cause__
        raise KvtraceError(f"--via trace: torch.onnx could not convert the traced reference model: {msg}") from e


# ------------------------------------------------------------------ into the builder's form
class _Weights:
    """The traced graph's weights, taken out of the IR while it is optimised (as graph inputs,
    so nothing folds or copies them) and produced lazily, one tensor at a time, when written."""

    def __init__(self):
        # value name -> (dims, ONNX data type, producer of the array)
        self.make: dict[str, tuple[tuple[int, ...], int, Callable[[], np.ndarray]]] = {}

    def detach(self, graph, ir, prefix: str) -> None:
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or (tensor.size <= 1024 and not name.startswith(prefix)):
                continue  # small constants stay in the graph (shapes, axes, scalars)
            graph.initializers.pop(name)
            value.const_value = None
            canonical = name[len(prefix):] if name.startswith(prefix) else name
            canonical = _RENAME.get(canonical, canonical)
            if canonical != name and canonical not in graph.initializers:
                value.name = canonical
            self.make[value.name] = (tuple(int(d) for d in tensor.shape), int(tensor.dtype.value), _numpy_of(tensor))
            graph.inputs.append(value)
        # fold what torch.onnx put between a weight and its use: a Cast (the rope tables in the
        # compute dtype), when every use of the weight is such a node. The (out, in) -> (in, out)
        # Transpose feeding a linear layer's MatMul stays: the weight is stored as the builder
        # stores it, (out, in), and the pair becomes FusedMatMul(transB=1) (onnx_graph.fused_linears)
        changed = True
        while changed:
            changed = False
            for value in [v for v in graph.inputs if v.name in self.make]:
                users = [u for u, _ in value.uses()]
                if not users or not all(_foldable(u) for u in users):
                    continue
                kinds = {(u.op_type, _attr_key(u)) for u in users}
                if len(kinds) != 1:
                    continue
                dims, dt, make = _fold(users[0], *self.make.pop(value.name))
                new = ir.Value(name=value.name, type=ir.TensorType(ir.DataType(dt)), shape=ir.Shape(dims))
                self.make[new.name] = (dims, dt, make)
                graph.inputs.remove(value)
                value.name = None
                graph.inputs.append(new)
                for u in users:
                    u.outputs[0].replace_all_uses_with(new)
                    graph.remove(u, safe=True)
                changed = True

    def attach(self, graph) -> list[Initializer]:
        """Take the weight inputs back out of the graph: -> [Initializer] (graph order)."""
        inits = []
        for value in [v for v in graph.inputs if v.name in self.make]:
            graph.inputs.remove(value)
            if value.uses():
                dims, dt, make = self.make[value.name]
                inits.append(Initializer(value.name, dims, dt, make))
        return inits


def _foldable(node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ("Cast", "Identity")


def _attr_key(node):
    return tuple(sorted((k, str(a.value)) for k, a in node.attributes.items()))


def _fold(node, dims, dt, src: Callable[[], np.ndarray]):
    """-> (dims, data type, producer) of `node` applied to a weight."""
    if node.op_type == "Cast":
        to = int(node.attributes["to"].value)
        return dims, to, lambda: to_dtype(src(), _DTYPE_NAME[to])
    return dims, dt, src


_RENAME = {"rope_cos": "rope.cos", "rope_sin": "rope.sin"}  # the builder's names for the rotary caches
_DTYPE_NAME = {1: "float32", 10: "float16", 16: "bfloat16"}


def _numpy_of(tensor) -> Callable[[], np.ndarray]:
    """A producer of the IR tensor's data as a numpy array (no copy for torch tensors)."""
    raw = getattr(tensor, "raw", None)
    try:
        import torch
    except ImportError:  # pragma: no cover - tracing needs torch
        torch = None
    if torch is not None and isinstance(raw, torch.Tensor):
        def make(t=raw):
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:
                import ml_dtypes

                return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.contiguous().numpy()
        return make
    return tensor.numpy


def _finish(model_ir, ir, spec: dict) -> None:
    """The builder's graph conventions: io_spec names/dtypes/dims on the graph I/O, Attention
    with one output, no stale value_info."""
    graph = model_ir.graph
    by_name = {t["name"]: t for t in spec["inputs"] + spec["outputs"]}
    for v in list(graph.inputs) + list(graph.outputs):
        t = by_name.get(v.name)
        if t is None:
            continue
        v.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in t["shape"]])
    for node in graph:
        if node.op_type == "Attention":
            unused = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
            if unused:
                raise KvtraceError("--via trace: an Attention node's optional outputs are used; TensorRT takes "
                                   "one-output Attention only")
            node.resize_outputs(1)


FUSED_OPS = ("Attention", "RotaryEmbedding", "TensorScatter")
# attributes exporter/onnx_graph.py sets explicitly even where they equal the default
_SPELLED = {"RotaryEmbedding": {"interleaved", "rotary_embedding_dim"}, "TensorScatter": {"axis"}}


def _drop_default_attributes(proto) -> None:
    """onnxscript spells out every attribute of the fused ops (is_causal=0, softcap=0.0, mode=
    "linear", ...); drop those equal to the schema's default that the builder leaves out, so the
    nodes read exactly as the builder's."""
    import onnx
    from onnx import helper

    for node in proto.graph.node:
        if node.op_type not in FUSED_OPS:
            continue
        schema = onnx.defs.get_schema(node.op_type, TRACE_OPSET, node.domain)
        keep = []
        for a in node.attribute:
            d = schema.attributes[a.name].default_value if a.name in schema.attributes else None
            if a.name not in _SPELLED.get(node.op_type, ()) and d is not None and \
                    d.type != onnx.AttributeProto.UNDEFINED and \
                    helper.get_attribute_value(d) == helper.get_attribute_value(a):
                continue
            keep.append(a)
        del node.attribute[:]
        node.attribute.extend(keep)


def _check_io(proto, spec: dict) -> None:
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    want_in = [t["name"] for t in spec["inputs"]]
    want_out = [t["name"] for t in spec["outputs"]]
    if got_in != want_in or got_out != want_out:
        raise KvtraceError(f"--via trace: the traced graph's I/O {got_in} -> {got_out} differs from the I/O "
                           f"contract {want_in} -> {want_out}")
    # TensorRT's KV_CACHE_UPDATE: input 0 the cache graph input, the output the graph output
    for node in proto.graph.node:
        if node.op_type == "TensorScatter":
            src, dst = node.input[0], node.output[0]
            if spec["cache_aliases"].get(dst) != src:
                raise KvtraceError(f"--via trace: TensorScatter writes {src!r} -> {dst!r}; the static cache needs "
                                   f"a graph input -> its graph output (io_spec cache_aliases)")


# ------------------------------------------------------------------ entry point
def trace(model, *, dtype: str, layout: str, max_seq: int, opset: int = TRACE_OPSET, log=None):
    """Trace `model` (models.transformer.Transformer) -> (ModelProto without weight initializers,
    [Initializer], description dict), like onnx_graph.build. The model is traced in `dtype`
    (a converted copy when its parameters are in another dtype)."""
    import torch

    check_options(opset=opset)
    _, ir = _onnxscript()
    import kvtrace.models.ops  # noqa: F401 - registers the kvtrace custom ops

    log = log or (lambda msg: None)
    cfg = model.cfg
    tdtype = getattr(torch, dtype)  # float32 / float16 / bfloat16 (checked by the caller)
    src = model if model.dtype == tdtype else _as_dtype(model, tdtype)
    spec = io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                         vocab_size=cfg.vocab_size, dtype=dtype, layout=layout, max_seq=max_seq, max_batch=1)
    t0 = time.perf_counter()
    wrapper = _wrapper(src, layout)
    args, dims = _example(cfg, layout, max_seq, tdtype)
    with torch.no_grad():
        program = _export_program(wrapper, args, dims, src)
    log(f"torch.export: {len(program.graph.nodes)} FX nodes ({time.perf_counter() - t0:.2f}s)")
    t0 = time.perf_counter()
    onnx_program = _to_onnx(program, _translation_table(), [t["name"] for t in spec["inputs"]],
                            [t["name"] for t in spec["outputs"]])
    del program
    model_ir = onnx_program.model
    del onnx_program
    weights = _Weights()
    weights.detach(model_ir.graph, ir, prefix="model.")
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model_ir)  # fold small constants, CSE, drop unused nodes
    inits = weights.attach(model_ir.graph)
    _finish(model_ir, ir, spec)
    model_ir.graph.name = "kvtrace"
    model_ir.producer_name, model_ir.producer_version = "kvtrace (traced by torch.onnx)", torch.__version__
    proto = ir.serde.serialize_model(model_ir)
    del model_ir
    proto.graph.ClearField("value_info")
    proto.ir_version = ir_version_for(TRACE_OPSET)
    del proto.opset_import[:]
    proto.opset_import.add(domain="", version=TRACE_OPSET)
    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign or proto.functions:
        raise KvtraceError(f"--via trace: the traced graph uses non-standard operators ({foreign or 'functions'})")
    _drop_default_attributes(proto)
    fused_linears(proto, {t.name for t in inits})  # the CPU form's linear layers, as the builder's
    _check_io(proto, spec)
    names = [t.name for t in inits] + [i.name for i in proto.graph.initializer] + \
        [i.name for i in proto.graph.input] + [o for n in proto.graph.node for o in n.output if o]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise KvtraceError(f"--via trace: the traced graph names two values alike: {dup[:5]}")
    log(f"torch.onnx + rewrite: {len(proto.graph.node)} nodes, {len(inits)} weights "
        f"({time.perf_counter() - t0:.2f}s)")
    info = {"attention": "fused", "rotary": "fused" if cfg.positions == "rope" else None,
            "cache_update": "TensorScatter" if layout == "static" else "concat",
            "attend": "full" if layout == "static" else "all"}
    return proto, inits, info


def _as_dtype(model, tdtype):
    """A copy of `model` with parameters in `tdtype`, made tensor by tensor (peak: the model plus
    the converted copy, never two full copies in the old dtype)."""
    import torch

    from kvtrace.models.transformer import Transformer, on_meta

    with on_meta():
        out = Transformer(model.cfg)
    out.load_state_dict({k: v.to(tdtype) for k, v in model.state_dict().items()}, assign=True)
    for name in ("pos_table", "rope_cos", "rope_sin"):  # fp32 tables (not module state)
        setattr(out, name, getattr(model, name))
    return out.eval()


def node_counts(proto) -> dict[str, int]:
    """op_type -> count (tests, the benchmark and the report print them)."""
    out: dict[str, int] = {}
    for n in proto.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))

