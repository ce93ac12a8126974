"""The GPU graph form, written beside model.onnx by `kvtrace export --target gpu`.

model.onnx (the CPU form, attend="used") slices each layer's static cache to the slots in use,
L = max(position_ids) + 1: a shape computed from input *values*. On a GPU that costs a
device->host copy of position_ids every step (onnxruntime's CUDA Slice reads its ends on the
host) and rules out CUDA graphs (a captured graph replays fixed shapes). The GPU form
(exporter/onnx_graph.py, attend="full") attends over all S_max slots with the bool mask instead:
every shape depends on input shapes only (checked here with ONNX's strict shape inference).

It differs from model.onnx in two ways only:
  * attend="full" (no Slice; k_slot is a constant (S_max,) range);
  * no `softmax_precision` on Attention. onnxruntime-gpu builds before the CUDA kernel accepted
    the attribute fail at run time on any non-default value (onnxruntime PR #27542 rejected it,
    #27714 then accepted it, stating that every CUDA attention kernel already computes softmax
    in fp32), and TensorRT's parser rejects it (`kvtrace build` drops it too). Dropping it costs
    nothing on the GPU and lets one file serve builds either side of that change without onnx
    installed on the GPU machine. On the CPU (which uses model.onnx) fp16 softmax precision is
    kept.

The weights are not written twice: model.gpu.onnx's initializers point into model.onnx.data at
the offsets model.onnx uses (same names, dims and types, checked), so the second graph costs
kilobytes. docs/gpu.md has the decisions and what was and was not executed.
"""
from __future__ import annotations

from pathlib import Path

from kvtrace import io_spec
from kvtrace.errors import KvtraceError

GPU_ONNX_NAME = "model.gpu.onnx"
FORM = "gpu"  # the key of this form in the manifest's "graphs"


def drop_attention_attribute(model, name: str = "softmax_precision") -> list[str]:
    """Remove attribute `name` from every standard-domain Attention node of `model` (in place);
    returns the names of the nodes changed."""
    changed = []
    for node in model.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            keep = [a for a in node.attribute if a.name != name]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)
                changed.append(node.name or node.output[0])
    return changed


def build(cfg, weights, *, dtype: str, max_seq: int, opset: int, quant=None):
    """-> (ModelProto without weights, [Initializer], graph description) of the GPU form."""
    from kvtrace.exporter import onnx_graph

    model, inits, info = onnx_graph.build(cfg, weights, dtype=dtype, layout="static", max_seq=max_seq,
                                          opset=opset, attend="full", quant=quant)
    dropped = drop_attention_attribute(model, "softmax_precision")
    info = {**info, "softmax_precision": "dropped" if dropped else "absent"}
    return model, inits, info


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


def write(cfg, weights, out_dir: Path, *, dtype: str, max_seq: int, opset: int, quant=None) -> tuple[dict, object]:
    """Write out_dir/model.gpu.onnx, its weights referring to out_dir/model.onnx.data (which
    must exist: the export writes model.onnx with external data first).

    Returns (the manifest's graphs["gpu"] entry, the weightless skeleton for check())."""
    from kvtrace.exporter.export import skeleton

    out_dir = Path(out_dir)
    model, inits, info = build(cfg, weights, dtype=dtype, max_seq=max_seq, opset=opset, quant=quant)
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

    inf = onnx.shape_inference.infer_shapes(model, strict_mode=True)
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


def check(skeleton_model, path: Path) -> dict:
    """The export's checks of the GPU form: onnx.checker (by path, so the external references
    are checked against model.onnx.data), strict shape inference, and value-independent
    Attention input shapes. Its logits are compared with model.onnx's on the CPU by the tests
    (tests/test_gpu_form.py) and on a GPU by `kvtrace gpu-check`."""
    import onnx

    from kvtrace.exporter import validate as v

    try:
        v.check_graph(skeleton_model)
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise KvtraceError(f"{path.name}: ONNX check failed: {e}") from e
    bad = value_dependent_dims(skeleton_model)
    if bad:
        raise KvtraceError(f"{path.name}: Attention inputs with shapes that depend on input values: "
                           + "; ".join(bad[:4]))
    return {"method": "onnx.checker + strict shape inference; every Attention input shape static or "
                      "named from the graph inputs' dims"}
