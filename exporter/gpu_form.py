"""The GPU graph form, model.gpu.onnx, written beside model.onnx by every `kvtrace export`:
the graph TensorRT builds from (`kvtrace build`, or `trtexec --onnx=model.gpu.onnx`) and
onnxruntime-cuda runs. docs/gpu.md and docs/tensorrt.md have the decisions and the evidence.

It is built by the same builder with the same options as model.onnx (so every option of the
export, quantisation included, reaches both), except:
  * static cache: attend="full" instead of "used". model.onnx slices each layer's cache to the
    slots in use, L = max(position_ids) + 1: a shape computed from input *values*, which on a GPU
    costs a device->host copy every step (onnxruntime-cuda's Slice, TensorRT's
    DeviceToShapeHost layer) and rules out CUDA graphs. The GPU form attends over all S_max slots
    with the bool mask: every shape depends on input shapes only (checked here with ONNX's strict
    shape inference).
  * attention_precision="native" instead of "float32" (fp16/bf16 graphs): the Attention node in
    the graph dtype and without `softmax_precision`, which TensorRT's parser rejects ("Setting
    softmax precision is not supported in TensorRT Attention."); TensorRT's fused attention
    kernels and onnxruntime-cuda's accumulate the scores in fp32. model.onnx, for onnxruntime's
    CPU kernel, which does not, computes attention in fp32. The portable (--opset 17) GPU form
    is the MatMul/Softmax spelling TensorRT's Myelin fuses into one attention kernel.

The weights are not written twice: model.gpu.onnx's initializers point into model.onnx.data at
the offsets model.onnx uses (same names, dims and types, checked), so the second graph costs
kilobytes at any model size.
"""
from __future__ import annotations

from pathlib import Path

from kvtrace import io_spec
from kvtrace.errors import KvtraceError

GPU_ONNX_NAME = "model.gpu.onnx"
FORM = "gpu"  # the key of this form in the manifest's "graphs"
USED_BY = ["tensorrt", "onnxruntime-cuda"]  # the manifest entry's "for"


def drop_attention_attribute(model, name: str = "softmax_precision") -> list[str]:
    """Remove attribute `name` from every standard-domain Attention node of `model` (in place);
    returns the names of the nodes changed. (`kvtrace build` of artifacts exported before the
    GPU form existed, whose model.onnx still carries softmax_precision.)"""
    changed = []
    for node in model.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            keep = [a for a in node.attribute if a.name != name]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)
                changed.append(node.name or node.output[0])
    return changed


def graph_options(cpu_options: dict) -> dict:
    """The builder options of the GPU form from those of model.onnx (ExportSpec.graph_options())."""
    opts = dict(cpu_options, attention_precision="native", linear="standard")
    if opts.get("layout", "static") == "static":
        opts["attend"] = "full"
    return opts


def build(cfg, weights, **cpu_options):
    """-> (ModelProto without weights, [Initializer], graph description) of the GPU form;
    `cpu_options` are onnx_graph.build's options for model.onnx (dtype, layout, max_seq, opset, ...)."""
    from kvtrace.exporter import onnx_graph

    model, inits, info = onnx_graph.build(cfg, weights, **graph_options(cpu_options))
    return model, inits, {**info, "for": list(USED_BY)}


def _external_metas(onnx_path: Path) -> dict:
    """name -> TensorProto (external-data metadata only) of the initializers of `onnx_path`."""
    import onnx
    from onnx import TensorProto

    m = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            out[t.name] = t
    return out


def native_attention(model) -> int:
    """In place: each Attention(Cast(q), Cast(k), Cast(v), mask) whose casts are to fp32 and whose
    output goes only to a Cast back to fp16/bf16 (a traced low-precision graph attends in fp32,
    as the builder's CPU form does) becomes Attention(q, k, v, mask) in that dtype, as in the
    builder's GPU form: TensorRT has no fused fp32 attention kernel for it ("Attention operation
    was not supported by a dedicated kernel"), and its fused kernels accumulate in fp32. Casts
    left without a reader go. Returns the number of Attention nodes changed."""
    from onnx import TensorProto, helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)

    def cast_to(n):
        return helper.get_attribute_value(next(a for a in n.attribute if a.name == "to")) if n.op_type == "Cast" else None

    changed, gone = 0, set()
    for n in g.node:
        if n.op_type != "Attention" or len(n.input) < 3:
            continue
        casts = [producer.get(x) for x in n.input[:3]]
        back = readers.get(n.output[0], [])
        if (any(c is None or cast_to(c) != TensorProto.FLOAT for c in casts) or len(n.output) != 1
                or len(back) != 1 or cast_to(back[0]) not in (TensorProto.FLOAT16, TensorProto.BFLOAT16)):
            continue
        for i, c in enumerate(casts):
            n.input[i] = c.input[0]
            if all(r is n for r in readers[c.output[0]]):
                gone.add(id(c))
        n.output[0] = back[0].output[0]
        gone.add(id(back[0]))
        changed += 1
    keep = [n for n in g.node if id(n) not in gone]
    del g.node[:]
    g.node.extend(keep)
    return changed


def from_traced(graph, inits, info):
    """The GPU form of a traced graph (`kvtrace export --via trace`): the traced static graph
    already attends over the whole cache with the mask, so it is the same graph in standard ONNX
    (its linear layers MatMul(x, Transpose(w)), as the builder's GPU form), its fp16/bf16
    attention in the graph dtype (native_attention) and without `softmax_precision` (which
    TensorRT's parser rejects)."""
    from kvtrace.exporter.onnx_graph import standard_twin

    model = standard_twin(graph)
    native = native_attention(model)
    drop_attention_attribute(model, "softmax_precision")
    return model, inits, {**info, "softmax_precision": "dropped", "for": list(USED_BY),
                          **({"attention_precision": "native"} if native else {})}


def write(cfg, weights, out_dir: Path, *, built=None, **cpu_options) -> tuple[dict, object]:
    """Write out_dir/model.gpu.onnx, its weights referring to out_dir/model.onnx.data (which
    must exist: the export writes model.onnx with external data first). built: (graph, inits,
    info) of the GPU form when it is not built here from the options (a traced graph).

    Returns (the manifest's graphs["gpu"] entry, the weightless skeleton for check())."""
    from kvtrace.exporter.export import skeleton

    out_dir = Path(out_dir)
    model, inits, info = built if built is not None else build(cfg, weights, **cpu_options)
    metas = _external_metas(out_dir / io_spec.ONNX_NAME)
    refs = []
    for t in inits:
        meta = metas.get(t.name)
        if meta is None:
            raise KvtraceError(f"{GPU_ONNX_NAME}: weight {t.name!r} is not stored externally by "
                               f"{io_spec.ONNX_NAME}; the GPU form shares {io_spec.ONNX_NAME}.data")
        if tuple(meta.dims) != tuple(t.dims) or meta.data_type != t.data_type:
            raise KvtraceError(f"{GPU_ONNX_NAME}: weight {t.name!r} is {tuple(meta.dims)} type {meta.data_type} in "
                               f"{io_spec.ONNX_NAME} but {tuple(t.dims)} type {t.data_type} in the GPU form")
        refs.append(meta)
    sk = skeleton(model, inits)  # before the initializers are attached: only dims and types matter
    model.graph.initializer.extend(refs)
    (out_dir / GPU_ONNX_NAME).write_bytes(model.SerializeToString())
    return {"onnx": GPU_ONNX_NAME, **info}, sk


def attention_input_dims(model) -> dict[str, list]:
    """Strict ONNX shape inference on `model` (weights as typed inputs, e.g. export.skeleton):
    Attention input name -> its dims (int, or the symbolic name)."""
    import onnx

    from kvtrace.exporter.onnx_graph import standard_twin

    inf = onnx.shape_inference.infer_shapes(standard_twin(model), strict_mode=True)
    known = {v.name: v for v in list(inf.graph.input) + list(inf.graph.value_info) + list(inf.graph.output)}
    out = {}
    for node in inf.graph.node:
        if node.op_type != "Attention":
            continue
        for name in node.input:
            if not name:
                continue
            vi = known.get(name)
            if vi is None or not vi.type.tensor_type.HasField("shape"):
                out[name] = None  # no shape at all
                continue
            out[name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in vi.type.tensor_type.shape.dim]
    return out


def value_dependent_dims(model) -> list[str]:
    """Attention inputs whose inferred shape is not a function of the graph input shapes: a dim
    that is neither an integer nor one of the graph inputs' symbolic dims (shape inference names
    a dim it cannot derive 'unk__N'). [] for the GPU form; the CPU form's sliced K/V and mask
    have such a dim (L)."""
    input_dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    bad = []
    for name, dims in attention_input_dims(model).items():
        if dims is None:
            bad.append(f"{name} (no inferred shape)")
        elif any(not isinstance(d, int) and d not in input_dims for d in dims):
            bad.append(f"{name} {dims}")
    return bad


def check(skeleton_model, path: Path, *, layout: str = "static", traced: bool = False, cpu=None) -> dict:
    """The export's checks of the GPU form: onnx.checker (by path, so the external references
    are checked against model.onnx.data), strict shape inference, the linear layers against
    model.onnx's (`cpu`, its graph: onnx_graph.check_linears) and (static cache)
    value-independent Attention input shapes. Its logits are compared with model.onnx's on the
    CPU by the tests (tests/test_gpu_form.py) and on a GPU by `kvtrace gpu-check`; TensorRT-RTX
    parses it in CI (tests/test_trt_interop.py)."""
    import onnx

    from kvtrace.exporter import validate as v

    try:
        v.check_graph(skeleton_model)
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise KvtraceError(f"{path.name}: ONNX check failed: {e}") from e
    if cpu is not None:
        from kvtrace.exporter.onnx_graph import check_linears

        try:
            check_linears(cpu, skeleton_model, {i.name for i in skeleton_model.graph.input})
        except KvtraceError as e:
            raise KvtraceError(f"{path.name}: {e}") from e
    linears = "; every linear weight read as model.onnx reads it, through a Transpose" if cpu is not None else ""
    if layout != "static":  # past + new tokens: shape inference cannot name the sum, nothing to check
        return {"method": "onnx.checker + strict shape inference" + linears}
    if traced:  # torch.onnx's reshapes hide the dims from ONNX shape inference; nothing to prove with it
        return {"method": "onnx.checker + strict shape inference" + linears + " (a traced graph: its Attention "
                          "input shapes cannot be proven value-independent by shape inference; the traced static "
                          "graph has no Slice to the slots in use)"}
    bad = value_dependent_dims(skeleton_model)
    if bad:
        raise KvtraceError(f"{path.name}: Attention inputs with shapes that depend on input values: "
                           + "; ".join(bad[:4]))
    return {"method": "onnx.checker + strict shape inference" + linears + "; every Attention input shape "
                      "static or named from the graph inputs' dims"}
