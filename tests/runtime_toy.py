"""A hand-built toy artifact for runtime tests that need no exporter.

The graph is the I/O contract with trivial arithmetic:
  - every cache tensor stores the token ids themselves: the update written for a token is
    float(input_id) (static: TensorScatter at position_ids[:, 0]; dynamic: Concat), so a test
    can read back exactly which slot each token went to;
  - logits = one_hot((input_id + 1) % V): greedy generation counts upwards from the last token.
It follows the contract of artifacts exported before `logits_index` existed (logits at every
new position, no logits_index input, manifest io "logits": "all_positions"), so the runtime's
path for those older artifacts stays tested; exported graphs cover logits_index.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvtrace import io_spec


def build_toy(out_dir: Path, *, layout: str = "static", vocab: int = 320, max_seq: int = 32,
              max_batch: int = 4, n_layers: int = 2, tokenizer: dict | None = {"type": "builtin-bytes"},
              format_version: int = io_spec.FORMAT_VERSION, eos: int | None = 0,
              nan_token: int | None = None) -> Path:
    """nan_token: a token id whose logits are all NaN (a model that breaks on one input)."""
    import onnx
    from onnx import TensorProto as TP, helper as h

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_kv, hd = 1, 2
    spec = io_spec.build(n_layers=n_layers, n_kv_heads=n_kv, head_dim=hd, vocab_size=vocab, dtype="float32",
                         layout=layout, max_seq=max_seq, max_batch=max_batch)
    # the older contract: no logits_index input, logits (B, T, V) at every position
    spec["inputs"] = [t for t in spec["inputs"] if t["name"] != io_spec.LOGITS_INDEX]
    spec["outputs"][0] = {"name": io_spec.LOGITS, "dtype": "float32", "shape": ["batch", "seq", vocab]}
    spec["logits"] = "all_positions"
    def vi(t):
        et = {"int64": TP.INT64, "float32": TP.FLOAT}[t["dtype"]]
        return h.make_tensor_value_info(t["name"], et, t["shape"])
    nodes = [
        # upd (B, 1, T, hd) = float(input_ids) broadcast over the head dim
        h.make_node("Cast", ["input_ids"], ["idf"], to=TP.FLOAT),  # (B, T)
        h.make_node("Unsqueeze", ["idf", "ax13"], ["idf4"]),  # (B, 1, T, 1)
        h.make_node("Expand", ["idf4", "upd_shape_tail"], ["upd"]),  # (B, 1, T, hd)
        # logits (B, T, V) = one_hot((ids + 1) % V)
        h.make_node("Add", ["input_ids", "one"], ["nxt0"]),
        h.make_node("Mod", ["nxt0", "vocab"], ["nxt"]),
        h.make_node("OneHot", ["nxt", "vocab", "onehot_vals"], ["logits" if nan_token is None else "logits0"],
                    axis=-1),
    ]
    if nan_token is not None:  # logits (B, T, V) = NaN where input_ids == nan_token
        nodes += [h.make_node("Equal", ["input_ids", "nan_tok"], ["is_nan"]),  # (B, T)
                  h.make_node("Unsqueeze", ["is_nan", "ax_last"], ["is_nan3"]),  # (B, T, 1)
                  h.make_node("Where", ["is_nan3", "nan_val", "logits0"], ["logits"])]
    inits = [
        h.make_tensor("ax13", TP.INT64, [2], [1, 3]),
        h.make_tensor("upd_shape_tail", TP.INT64, [4], [1, 1, 1, hd]),
        h.make_tensor("one", TP.INT64, [], [1]),
        h.make_tensor("vocab", TP.INT64, [], [vocab]),
        h.make_tensor("onehot_vals", TP.FLOAT, [2], [0.0, 1.0]),
    ]
    if nan_token is not None:
        inits += [h.make_tensor("nan_tok", TP.INT64, [], [nan_token]), h.make_tensor("ax_last", TP.INT64, [1], [-1]),
                  h.make_tensor("nan_val", TP.FLOAT, [], [float("nan")])]
    if layout == "static":
        nodes.append(h.make_node("Slice", ["position_ids", "z1", "o1", "o1"], ["pos0_2d"]))  # (B, 1)
        nodes.append(h.make_node("Squeeze", ["pos0_2d", "o1"], ["write_idx"]))  # (B,)
        inits += [h.make_tensor("z1", TP.INT64, [1], [0]), h.make_tensor("o1", TP.INT64, [1], [1])]
        for past, present in io_spec.cache_pairs(n_layers):
            nodes.append(h.make_node("TensorScatter", [past, "upd", "write_idx"], [present], axis=-2))
    else:
        for past, present in io_spec.cache_pairs(n_layers):
            nodes.append(h.make_node("Concat", [past, "upd"], [present], axis=2))
        # use the mask so the input is not dangling: mask_sum is an extra, unused output
        nodes.append(h.make_node("ReduceSum", ["attention_mask"], ["mask_sum"], keepdims=0))
    outputs = [vi(t) for t in spec["outputs"]]
    if layout == "dynamic":
        outputs.append(h.make_tensor_value_info("mask_sum", TP.INT64, []))
    graph = h.make_graph(nodes, "toy", [vi(t) for t in spec["inputs"]], outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 24)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, out_dir / io_spec.ONNX_NAME)

    from kvtrace.configs import BUILTIN

    cfg = BUILTIN["llama"].replace(vocab_size=vocab, n_layers=n_layers, n_heads=1, n_kv_heads=n_kv,
                                   head_dim=hd, rotary_dim=hd, hidden_size=8)
    manifest = {
        "format_version": format_version, "kvtrace_version": "0.1.0", "architecture": cfg.arch,
        "config": cfg.to_dict(), "dtype": "float32", "opset": 24, "onnx": io_spec.ONNX_NAME,
        "external_data": None, "io": spec, "tokenizer": tokenizer,
        "generation": {"bos_token_id": 0, "eos_token_id": eos, "pad_token_id": 1},
        "source": {"kind": "builtin", "path": None, "sha256": None, "seed": 0},
        "graph": {"attention": "none", "rotary": None,
                  "cache_update": "TensorScatter" if layout == "static" else "concat"},
    }
    (out_dir / io_spec.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out_dir


def cache_contents(model) -> list[np.ndarray]:
    """Static toy: per cache tensor, the token id stored at each slot, (B, S)."""
    return [model.backend.to_host(buf)[:, 0, :, 0].astype(np.int64) for _, buf in model.cache_buffers()]
