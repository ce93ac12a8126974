"""The one I/O contract: graph tensor names, dtypes, dynamic axes and cache layouts.

Used by the ONNX exporter (graph inputs/outputs), the TensorRT builder (profiles), the runtime
(buffers and bindings) and the tests. The contract is described in docs/architecture.md (the
table of tensors, the static and dynamic cache layouts); this module is its code.
"""
from __future__ import annotations

FORMAT_VERSION = 1
LAYOUTS = ("static", "dynamic")
DTYPES = ("float32", "float16", "bfloat16")
MANIFEST_NAME = "kvtrace.json"
ONNX_NAME = "model.onnx"

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS_INDEX = "logits_index"
LOGITS = "logits"


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def has_logits_index(io: dict) -> bool:
    """Whether an artifact's graph takes logits_index (exported after it was added)."""
    return any(t["name"] == LOGITS_INDEX for t in io.get("inputs", []))


def cache_pairs(n_layers: int):
    """[(input name, output name)] for every cache tensor, layer-major, key before value."""
    out = []
    for i in range(n_layers):
        out.append((past_key(i), present_key(i)))
        out.append((past_value(i), present_value(i)))
    return out


def build(*, n_layers: int, n_kv_heads: int, head_dim: int, vocab_size: int, dtype: str,
          layout: str, max_seq: int, max_batch: int) -> dict:
    """The I/O spec stored in every manifest: {"inputs": [...], "outputs": [...], ...}.

    Each tensor: {"name", "dtype", "shape"} with symbolic dims as strings.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"cache layout {layout!r}: expected one of {LAYOUTS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    ids = {"dtype": "int64", "shape": ["batch", "seq"]}
    inputs = [dict(name=INPUT_IDS, **ids), dict(name=POSITION_IDS, **ids),
              {"name": LOGITS_INDEX, "dtype": "int64", "shape": ["batch", "n_logits"]}]
    outputs = [{"name": LOGITS, "dtype": "float32", "shape": ["batch", "n_logits", vocab_size]}]
    if layout == "static":
        cshape_in = cshape_out = ["batch", n_kv_heads, max_seq, head_dim]
    else:
        inputs.append({"name": ATTENTION_MASK, "dtype": "int64", "shape": ["batch", "total_seq"]})
        cshape_in = ["batch", n_kv_heads, "past_seq", head_dim]
        cshape_out = ["batch", n_kv_heads, "total_seq", head_dim]
    for src, dst in cache_pairs(n_layers):
        inputs.append({"name": src, "dtype": dtype, "shape": list(cshape_in)})
        outputs.append({"name": dst, "dtype": dtype, "shape": list(cshape_out)})
    return {
        "layout": layout,
        "max_seq": max_seq,
        "max_batch": max_batch,
        # "selected": logits only at logits_index (older artifacts: "all_positions", no logits_index)
        "logits": "selected",
        "cache_aliases": {dst: src for src, dst in cache_pairs(n_layers)} if layout == "static" else {},
        "inputs": inputs,
        "outputs": outputs,
    }
