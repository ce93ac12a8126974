"""Build the ONNX graph of a `ModelConfig` directly with `onnx.helper` (no tracing).

The graph mirrors models/transformer.py op for op: same masks (causal by slot, sliding
window by position, padding excluded, own slot always visible), same positions, same
cache layouts. Tensor names and shapes come from runtime/io_spec.py.

Two forms:
  opset >= 24 ("fused"):  Attention (one per layer, 4-D Q/K/V, bool mask, no past/present
                          on the node), RotaryEmbedding, TensorScatter for the static cache,
                          LayerNormalization / RMSNormalization / Gelu.
  opset 17   ("portable"): MatMul/Softmax attention in fp32 with a Where mask, rotary from
                          Slice/Mul/Concat, RMSNorm and Gelu from elementary ops; dynamic
                          cache only (TensorScatter needs opset 24).

Weights are not copied into the graph eagerly: `build()` returns the graph without
initializers plus a list of `Initializer`s whose bytes are produced one at a time
(transposed to (in, out) and cast), so the exporter can stream a 650 MB model to disk
holding one tensor extra at most. `build_graph()` is the convenience form that returns a
complete in-memory ModelProto.

Layout choices for onnxruntime's CPU kernels (they decide decode speed):
  * projections are MatMul against constant (in, out) weights, which MLAS prepacks once;
  * Q, K and V come from one fused MatMul (one pass over x, one GEMM) and a Split;
  * a tied head reuses the embedding initializer through a Transpose that onnxruntime
    constant-folds at load time (written once in the file);
  * static cache: Attention sees only the slots in use. The cache is (B, n_kv, S_max, hd)
    with S_max = --max-seq, and onnxruntime's CPU Attention costs O(S) however much of it
    the mask hides (nonpad_kv_seqlen does not help there either), so attending over the whole
    cache made decode cost grow with --max-seq (Pythia-160M fp32, batch 8: 22.7 ms/token at
    max_seq 256, 52.6 at 2048). L = min(max(position_ids) + 1, S_max) is computed once per
    call; each layer's K/V are Slice(present, [0:L] on axis 2) and the shared bool mask is
    (B, 1, T, L). Slots >= L are masked for every row anyway, so the result is the same.
    The price is the Slice's copy of the used part (onnxruntime's Slice copies): ~1-2 ms per
    step at batch 8 when L is close to S_max, against ~30 ms saved at max_seq 2048.
    TensorScatter is untouched (input 0 = the cache graph input, output = the graph output
    present.*, updated in place), which TensorRT's KV_CACHE_UPDATE requires; the Slice sits
    between it and Attention, which TensorRT still fuses (ATTENTION_INPUT/OUTPUT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from models.config import ModelConfig, rope_inv_freq
from runtime import io_spec
from runtime.errors import KvtraceError

ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
FUSED_MIN_OPSET = 24  # TensorScatter (24), Attention (23), RotaryEmbedding (23), RMSNormalization (23)
PORTABLE_OPSET = 17  # LayerNormalization (17) is the newest op the portable form needs
SUPPORTED_OPSETS = (PORTABLE_OPSET, FUSED_MIN_OPSET)


def to_dtype(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A float array (fp32/fp16/ml_dtypes bf16) -> C-contiguous array whose bytes are `dtype`
    (no copy when it already is); casts round to nearest even, like torch's."""
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(arr, dtype=np.float16)
    if dtype == "bfloat16":
        import ml_dtypes  # a dependency of onnx

        return np.ascontiguousarray(arr, dtype=ml_dtypes.bfloat16)
    raise KvtraceError(f"dtype {dtype!r}: expected one of {', '.join(ONNX_DTYPE)}")


def transposed(a: np.ndarray, out: np.ndarray | None = None, block: int = 64) -> np.ndarray:
    """a (m, n) -> a.T as a C-contiguous (n, m) array (or written into `out`, a view).

    Copied `block` rows at a time: a plain np.ascontiguousarray(a.T) walks memory with a
    stride of a whole row and is ~4x slower on the 154 MB embedding matrix (0.16 s vs 0.04 s).
    """
    m, n = a.shape
    if out is None:
        out = np.empty((n, m), dtype=a.dtype)
    for i in range(0, m, block):
        out[:, i:i + block] = a[i:i + block].T
    return out


@dataclass
class Initializer:
    """One weight of the graph: its bytes are made on demand by `data()` (C-contiguous)."""
    name: str
    dims: tuple[int, ...]
    data_type: int
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * onnx.helper.tensor_dtype_to_np_dtype(self.data_type).itemsize

    def meta(self) -> TensorProto:
        t = TensorProto()
        t.name = self.name
        t.data_type = self.data_type
        t.dims.extend(self.dims)
        return t

    def tensor(self) -> TensorProto:
        t = self.meta()
        t.raw_data = self.data().tobytes()
        return t


class _Builder:
    """A small graph-building helper: unique names, nodes, constants, initializers."""

    def __init__(self, dtype: str, opset: int):
        self.dtype, self.opset = dtype, opset
        self.tdtype = ONNX_DTYPE[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[Initializer] = []
        self.small: list[TensorProto] = []  # constants made here (shapes, axes, scalars)
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, hint: str | None = None,
           out: list[str] | None = None, **attrs):
        outs = out or [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"n_{op_type}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, np_dtype, hint="c") -> str:
        arr = np.asarray(value, dtype=np_dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            n = self.name(hint)
            self.small.append(onnx.numpy_helper.from_array(arr, n))
            self._consts[key] = n
        return self._consts[key]

    def i64(self, value, hint="i64") -> str:
        return self.const(value, np.int64, hint)

    def f32(self, value, hint="f32") -> str:
        return self.const(value, np.float32, hint)

    def weight(self, name: str, dims, make: Callable[[], np.ndarray], data_type: int | None = None) -> str:
        self.inits.append(Initializer(name, tuple(int(d) for d in dims), data_type or self.tdtype, make))
        return name


# ----------------------------------------------------------------------------------- checks
def check_options(cfg: ModelConfig, *, dtype: str, layout: str, max_seq: int, opset: int) -> None:
    if dtype not in ONNX_DTYPE:
        raise KvtraceError(f"dtype {dtype!r}: expected one of {', '.join(ONNX_DTYPE)}")
    if layout not in io_spec.LAYOUTS:
        raise KvtraceError(f"--cache {layout!r}: expected one of {', '.join(io_spec.LAYOUTS)}")
    if opset not in SUPPORTED_OPSETS:
        raise KvtraceError(f"--opset {opset}: supported are {FUSED_MIN_OPSET} (fused Attention/RotaryEmbedding/"
                           f"TensorScatter) and {PORTABLE_OPSET} (portable, unfused)")
    if opset < FUSED_MIN_OPSET and layout == "static":
        raise KvtraceError(f"--opset {opset} with --cache static: the static cache is updated by TensorScatter "
                           f"(opset 24); use --cache dynamic or --opset {FUSED_MIN_OPSET}")
    if opset < FUSED_MIN_OPSET and dtype == "bfloat16":
        raise KvtraceError(f"--opset {opset} with --bf16: bfloat16 graphs need opset {FUSED_MIN_OPSET}; "
                           f"use --opset {FUSED_MIN_OPSET} or --fp16")
    if not isinstance(max_seq, int) or max_seq < 1:
        raise KvtraceError(f"--max-seq {max_seq!r}: must be a positive integer")
    if max_seq > cfg.max_position:
        raise KvtraceError(f"--max-seq {max_seq} is beyond the model's {cfg.max_position} positions "
                           f"(max_position_embeddings); use --max-seq {cfg.max_position} or less")


def _check_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> None:
    shapes = cfg.param_shapes()
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise KvtraceError(f"weights: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for n, s in shapes.items():
        if tuple(weights[n].shape) != tuple(s):
            raise KvtraceError(f"weights: tensor {n!r} has shape {tuple(weights[n].shape)}, expected {tuple(s)}")


# ------------------------------------------------------------------------------------ graph
def build(cfg: ModelConfig, weights: Mapping[str, np.ndarray], *, dtype: str = "float32",
          layout: str = "static", max_seq: int, opset: int = FUSED_MIN_OPSET):
    """-> (ModelProto without weight initializers, [Initializer]) and a description dict.

    `weights`: canonical names of cfg.param_shapes() -> numpy arrays in torch layout
    ((out, in) for linear weights), any float dtype; read lazily, one tensor at a time.
    """
    check_options(cfg, dtype=dtype, layout=layout, max_seq=max_seq, opset=opset)
    _check_weights(cfg, weights)
    fused = opset >= FUSED_MIN_OPSET
    g = _Builder(dtype, opset)
    KV, hd = cfg.n_kv_heads, cfg.head_dim

    shapes = cfg.param_shapes()

    def w(name, transpose=False):
        # read lazily, one tensor at a time: (out, in) -> (in, out), cast to the graph dtype
        shape = shapes[name]

        def make():
            arr = to_dtype(weights[name], dtype)
            return transposed(arr) if transpose else arr

        return g.weight(name, shape[::-1] if transpose else shape, make)

    # ---- graph inputs (names/shapes from the I/O contract)
    spec = io_spec.build(n_layers=cfg.n_layers, n_kv_heads=KV, head_dim=hd, vocab_size=cfg.vocab_size,
                         dtype=dtype, layout=layout, max_seq=max_seq, max_batch=1)
    inputs = [helper.make_tensor_value_info(t["name"], _tdtype(t["dtype"]), t["shape"]) for t in spec["inputs"]]
    outputs = [helper.make_tensor_value_info(t["name"], _tdtype(t["dtype"]), t["shape"]) for t in spec["outputs"]]
    ids, pos = io_spec.INPUT_IDS, io_spec.POSITION_IDS

    # ---- embeddings
    embed = w("embed.weight")  # (V, D)
    x = g.op("Gather", [embed, ids], hint="embed", axis=0)  # (B, T, D)
    if cfg.embed_scale != 1.0:
        x = g.op("Mul", [x, g.const(cfg.embed_scale, to_dtype(np.zeros(()), dtype).dtype)], hint="embed_scaled")
    if cfg.positions == "sinusoidal":
        x = g.op("Add", [x, _sinusoidal(g, cfg, pos, dtype)], hint="embed_pos")

    # ---- the mask (B, 1, T, S), computed once and shared by all layers. Static cache: S is the
    # number of slots in use this call, L (see _used_slots), not S_max.
    used = None
    if layout == "static":
        used = _used_slots(g, pos, max_seq)
        mask = _static_mask(g, cfg, pos, used[0])
    else:
        mask = _dynamic_mask(g, cfg, pos)

    # ---- rotary tables (max_seq, r/2) in the compute dtype, like the reference
    rope = None
    if cfg.positions == "rope":
        rope = _rope_tables(g, cfg, max_seq, dtype)

    write_idx = None  # static: row b's new tokens go to slots position_ids[b, 0] + t
    if layout == "static":
        write_idx = g.op("Gather", [pos, g.i64(0)], hint="write_idx", axis=1)  # (B,) int64

    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = _norm(g, cfg, x, p + "norm1", w)
        a = _attention(g, cfg, i, h, w, weights, rope, mask, layout, write_idx, used, fused)
        if cfg.parallel_residual:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            m = _mlp(g, cfg, _norm(g, cfg, x, p + "norm2", w), p + "mlp", w)
            x = g.op("Add", [g.op("Add", [x, a]), m], hint=f"l{i}_out")
        else:
            x = g.op("Add", [x, a], hint=f"l{i}_res1")
            m = _mlp(g, cfg, _norm(g, cfg, x, p + "norm2", w), p + "mlp", w)
            x = g.op("Add", [x, m], hint=f"l{i}_out")

    # ---- only the positions asked for reach the final norm and the lm_head: a generation prefill
    # needs one row per sequence, and the lm_head over all T positions was a quarter of a
    # 128-token prefill (and a (B, T, V) float32 output). GatherND with batch_dims=1 picks
    # x[b, logits_index[b, k]]; onnxruntime and the TensorRT parser both take it.
    sel = g.op("Unsqueeze", [io_spec.LOGITS_INDEX, g.i64([2])], hint="logits_index_nd")  # (B, K, 1)
    x = g.op("GatherND", [x, sel], hint="x_selected", batch_dims=1)  # (B, K, D)
    x = _norm(g, cfg, x, "norm_f", w)
    if cfg.tie_word_embeddings:
        head = g.op("Transpose", [embed], hint="head_t", perm=[1, 0])  # (D, V), folded by the runtime
    else:
        head = w("lm_head.weight", transpose=True)  # (D, V)
    if dtype == "float32":
        g.op("MatMul", [x, head], out=[io_spec.LOGITS])  # (B, K, V)
    else:
        g.op("Cast", [g.op("MatMul", [x, head], hint="logits_lp")], out=[io_spec.LOGITS], to=TensorProto.FLOAT)

    graph = helper.make_graph(g.nodes, "kvtrace", inputs, outputs, initializer=g.small)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="kvtrace")
    model.ir_version = ir_version_for(opset)
    info = {"attention": "fused" if fused else "unfused",
            "rotary": None if cfg.positions != "rope" else ("fused" if fused else "unfused"),
            "cache_update": "TensorScatter" if layout == "static" else "concat"}
    return model, g.inits, info


def build_graph(cfg: ModelConfig, weights: Mapping[str, np.ndarray], *, dtype: str = "float32",
                layout: str = "static", max_seq: int, opset: int = FUSED_MIN_OPSET) -> onnx.ModelProto:
    """The complete ModelProto with weights inside (fine below 2 GB; the exporter streams)."""
    model, inits, _ = build(cfg, weights, dtype=dtype, layout=layout, max_seq=max_seq, opset=opset)
    model.graph.initializer.extend(t.tensor() for t in inits)
    return model


def ir_version_for(opset: int) -> int:
    """The IR version to stamp: as low as possible, because runtimes reject IR versions newer
    than they know (onnxruntime 1.31 rejects onnx 1.23's newest). onnx pairs opset 24 with
    IR 12, but nothing in these graphs needs more than IR 10, and IR 10/11 models with opset
    24 pass onnx.checker and load in onnxruntime 1.31/1.32 and the TensorRT parser (measured,
    DESIGN.md and notes/trt_findings.md)."""
    return min(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]), 10)


def _tdtype(name: str) -> int:
    return {"int64": TensorProto.INT64, **ONNX_DTYPE}[name]


# ------------------------------------------------------------------------------ components
def _norm(g: _Builder, cfg: ModelConfig, x: str, prefix: str, w) -> str:
    scale = w(prefix + ".weight")
    if cfg.norm == "layernorm":
        # LayerNormalization computes its statistics in fp32 (stash_type=1) for fp16 inputs
        return g.op("LayerNormalization", [x, scale, w(prefix + ".bias")], hint=prefix.replace(".", "_"),
                    axis=-1, epsilon=cfg.norm_eps)
    if g.opset >= 23:
        return g.op("RMSNormalization", [x, scale], hint=prefix.replace(".", "_"), axis=-1,
                    epsilon=cfg.norm_eps, stash_type=1)
    # portable RMSNorm: statistics in fp32, like the reference
    xf = x if g.dtype == "float32" else g.op("Cast", [x], to=TensorProto.FLOAT)
    ms = g.op("ReduceMean", [g.op("Mul", [xf, xf])], axes=[-1], keepdims=1)  # (B, T, 1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.f32(cfg.norm_eps)])])])
    y = g.op("Mul", [xf, inv])
    if g.dtype != "float32":
        y = g.op("Cast", [y], to=g.tdtype)
    return g.op("Mul", [scale, y], hint=prefix.replace(".", "_"))


def _linear(g: _Builder, x: str, prefix: str, w, cfg_bias: bool) -> str:
    y = g.op("MatMul", [x, w(prefix + ".weight", transpose=True)])
    if cfg_bias:
        y = g.op("Add", [y, w(prefix + ".bias")])
    return y


def _act(g: _Builder, kind: str, x: str) -> str:
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])], hint="silu")
    if kind == "relu":
        return g.op("Relu", [x])
    if g.opset >= 20:
        return g.op("Gelu", [x], approximate="tanh" if kind == "gelu_tanh" else "none")
    # portable Gelu in the graph dtype
    dt = to_dtype(np.zeros(()), g.dtype).dtype
    half = g.op("Mul", [x, g.const(0.5, dt)])
    if kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = g.op("Mul", [g.op("Mul", [x, x]), x])
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [x3, g.const(0.044715, dt)])]),
                             g.const(math.sqrt(2 / math.pi), dt)])
        t = g.op("Tanh", [inner])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        t = g.op("Erf", [g.op("Mul", [x, g.const(1 / math.sqrt(2), dt)])])
    return g.op("Mul", [half, g.op("Add", [t, g.const(1.0, dt)])], hint="gelu")


def _mlp(g: _Builder, cfg: ModelConfig, x: str, prefix: str, w) -> str:
    up = _linear(g, x, prefix + ".up", w, cfg.mlp_bias)  # (B, T, F)
    if cfg.mlp == "gated":  # SwiGLU: down(act(gate(x)) * up(x))
        gate = _linear(g, x, prefix + ".gate", w, cfg.mlp_bias)
        hmid = g.op("Mul", [_act(g, cfg.activation, gate), up])
    else:
        hmid = _act(g, cfg.activation, up)
    return _linear(g, hmid, prefix + ".down", w, cfg.mlp_bias)  # (B, T, D)


def _sinusoidal(g: _Builder, cfg: ModelConfig, pos: str, dtype: str) -> str:
    """XGLM positions computed from position_ids: [sin(p' f), cos(p' f)], p' = p + offset.

    Same arithmetic as `sinusoidal_table` (fp32 angle, then cast), without storing a
    (max_position, D) table; the row of pad_token_id is zero as in the table.
    """
    half = cfg.hidden_size // 2
    step = math.log(10000) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.int64).astype(np.float32) * np.float32(-step)).astype(np.float32)
    p = g.op("Add", [pos, g.i64(cfg.sinusoidal_offset)], hint="sin_pos")  # (B, T)
    pf = g.op("Unsqueeze", [g.op("Cast", [p], to=TensorProto.FLOAT), g.i64([-1])])  # (B, T, 1)
    ang = g.op("Mul", [pf, g.f32(freqs)], hint="sin_ang")  # (B, T, D/2) fp32
    emb = g.op("Concat", [g.op("Sin", [ang]), g.op("Cos", [ang])], axis=-1)  # (B, T, D)
    if cfg.pad_token_id is not None:
        is_pad = g.op("Unsqueeze", [g.op("Equal", [p, g.i64(cfg.pad_token_id)]), g.i64([-1])])
        emb = g.op("Where", [is_pad, g.f32(0.0), emb])
    if dtype != "float32":
        emb = g.op("Cast", [emb], to=ONNX_DTYPE[dtype])
    return emb


def _rope_tables(g: _Builder, cfg: ModelConfig, max_seq: int, dtype: str):
    """cos/sin (max_seq, r/2) in the compute dtype, computed like Transformer.rope.

    rope_type "dynamic" (NTK) only changes the base once a position reaches
    max_position; exports never allow --max-seq beyond max_position, so within the
    artifact's range the dynamic tables equal the unscaled ones, exactly as in the
    reference. (rope_inv_freq gets seq_len=max_seq for that reason.)
    """
    inv, scale = rope_inv_freq(cfg, max_seq if cfg.rope_type == "dynamic" else None)
    freqs = np.arange(max_seq, dtype=np.int64).astype(np.float32)[:, None] * inv[None, :]  # (S, r/2) fp32
    cos = to_dtype((np.cos(freqs) * np.float32(scale)).astype(np.float32), dtype)
    sin = to_dtype((np.sin(freqs) * np.float32(scale)).astype(np.float32), dtype)
    c = g.weight("rope.cos", cos.shape, lambda: cos)
    s = g.weight("rope.sin", sin.shape, lambda: sin)
    return c, s


def _used_slots(g: _Builder, pos: str, max_seq: int) -> tuple[str, str]:
    """L = min(max(position_ids) + 1, S_max), the number of static-cache slots any query of
    this call can see, as a scalar () and as a 1-D (1,) int64 (for Range and Slice).

    Every row's slots >= L are masked anyway (causal by slot: slot j is visible from position
    p only if j <= p <= max(position_ids)), so attending over the first L slots gives the same
    result as over all S_max, while onnxruntime's CPU Attention costs O(S) whatever the mask
    says: at --max-seq 2048 a decode step read the whole cache (B, n_kv, 2048, hd) per layer.
    The min() only keeps shapes consistent for out-of-range positions (which the runtime
    refuses before running)."""
    top = g.op("ReduceMax", [pos], hint="max_pos", keepdims=0)  # () int64
    n = g.op("Min", [g.op("Add", [top, g.i64(1)]), g.i64(max_seq)], hint="used")  # () L
    return n, g.op("Unsqueeze", [n, g.i64([0])], hint="used_1d")  # (1,)


def _static_mask(g: _Builder, cfg: ModelConfig, pos: str, used: str) -> str:
    """(B, 1, T, L) bool over the first L = `used` slots (see _used_slots): slot j visible from
    the query at position p iff j <= p (causal by slot; slot j holds position j) and
    j > p - window. The own slot j == p passes both."""
    slots = g.op("Range", [g.i64(0), used, g.i64(1)], hint="slots")  # (L,)
    p = g.op("Unsqueeze", [pos, g.i64([-1])], hint="q_pos")  # (B, T, 1)
    allowed = g.op("LessOrEqual", [slots, p], hint="causal")  # (B, T, L)
    if cfg.sliding_window is not None:
        lo = g.op("Sub", [p, g.i64(cfg.sliding_window)])
        allowed = g.op("And", [allowed, g.op("Greater", [slots, lo])], hint="windowed")
    return g.op("Unsqueeze", [allowed, g.i64([1])], hint="attn_mask")  # (B, 1, T, L)


def _dynamic_mask(g: _Builder, cfg: ModelConfig, pos: str) -> str:
    """(B, 1, T, P+T) bool from attention_mask (B, P+T), as the reference's DynamicCache:
    query t sits in slot P + t; causal by slot, padding slots excluded, sliding window by
    key position (= number of real tokens before the slot), own slot always visible."""
    am = io_spec.ATTENTION_MASK
    total = g.op("Gather", [g.op("Shape", [am]), g.i64(1)], hint="total")  # () P+T
    t_new = g.op("Gather", [g.op("Shape", [io_spec.INPUT_IDS]), g.i64(1)], hint="t_new")  # () T
    past = g.op("Sub", [total, t_new], hint="past_len")  # () P
    k_slot = g.op("Range", [g.i64(0), total, g.i64(1)], hint="k_slot")  # (S,)
    q_slot = g.op("Unsqueeze", [g.op("Range", [past, total, g.i64(1)]), g.i64([-1])], hint="q_slot")  # (T, 1)
    valid = g.op("Unsqueeze", [g.op("Cast", [am], to=TensorProto.BOOL), g.i64([1])], hint="valid")  # (B, 1, S)
    allowed = g.op("And", [g.op("LessOrEqual", [k_slot, q_slot]), valid], hint="causal")  # (B, T, S)
    if cfg.sliding_window is not None:
        kpos = g.op("Sub", [g.op("CumSum", [am, g.i64(1)]), g.i64(1)], hint="k_pos")  # (B, S)
        kpos = g.op("Unsqueeze", [kpos, g.i64([1])])  # (B, 1, S)
        lo = g.op("Sub", [g.op("Unsqueeze", [pos, g.i64([-1])]), g.i64(cfg.sliding_window)])  # (B, T, 1)
        allowed = g.op("And", [allowed, g.op("Greater", [kpos, lo])], hint="windowed")
    allowed = g.op("Or", [allowed, g.op("Equal", [k_slot, q_slot])], hint="own_slot")  # (B, T, S)
    return g.op("Unsqueeze", [allowed, g.i64([1])], hint="attn_mask")  # (B, 1, T, S)


def _heads(g: _Builder, x: str, n: int, hd: int, hint: str) -> str:
    """(B, T, n*hd) -> (B, n, T, hd)"""
    r = g.op("Reshape", [x, g.i64([0, 0, n, hd])])
    return g.op("Transpose", [r], hint=hint, perm=[0, 2, 1, 3])


def _rotate(g: _Builder, cfg: ModelConfig, x: str, rope, hint: str) -> str:
    """rotate-half RoPE on the first rotary_dim dims of x (B, h, T, hd)."""
    cos, sin = rope
    if g.opset >= 23:
        return g.op("RotaryEmbedding", [x, cos, sin, io_spec.POSITION_IDS], hint=hint, interleaved=0,
                    rotary_embedding_dim=cfg.rotary_dim)
    half, r = cfg.rotary_dim // 2, cfg.rotary_dim
    c = g.op("Unsqueeze", [g.op("Gather", [cos, io_spec.POSITION_IDS], axis=0), g.i64([1])])  # (B, 1, T, r/2)
    s = g.op("Unsqueeze", [g.op("Gather", [sin, io_spec.POSITION_IDS], axis=0), g.i64([1])])
    ax = g.i64([-1])
    x1 = g.op("Slice", [x, g.i64([0]), g.i64([half]), ax])
    x2 = g.op("Slice", [x, g.i64([half]), g.i64([r]), ax])
    parts = [g.op("Sub", [g.op("Mul", [x1, c]), g.op("Mul", [x2, s])]),
             g.op("Add", [g.op("Mul", [x2, c]), g.op("Mul", [x1, s])])]
    if r < cfg.head_dim:
        parts.append(g.op("Slice", [x, g.i64([r]), g.i64([cfg.head_dim]), ax]))
    return g.op("Concat", parts, hint=hint, axis=-1)


def _attention(g: _Builder, cfg: ModelConfig, i: int, x: str, w, weights, rope, mask: str, layout: str,
               write_idx, used, fused: bool) -> str:
    p = f"layers.{i}.attn."
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # one MatMul for Q, K and V: weight (D, q_dim + 2 kv_dim)
    names = [p + n + ".weight" for n in ("q", "k", "v")]

    def qkv_weight():
        out = np.empty((cfg.hidden_size, cfg.q_dim + 2 * cfg.kv_dim), dtype=to_dtype(np.zeros(1), g.dtype).dtype)
        col = 0
        for n in names:  # [Wq.T | Wk.T | Wv.T]
            src = to_dtype(weights[n], g.dtype)  # (rows, D)
            transposed(src, out[:, col:col + src.shape[0]])
            col += src.shape[0]
        return out

    wqkv = g.weight(p + "qkv.weight", (cfg.hidden_size, cfg.q_dim + 2 * cfg.kv_dim), qkv_weight)
    qkv = g.op("MatMul", [x, wqkv], hint=f"l{i}_qkv")  # (B, T, q_dim + 2 kv_dim)
    if cfg.qkv_bias:
        bnames = [p + n + ".bias" for n in ("q", "k", "v")]
        b = g.weight(p + "qkv.bias", (cfg.q_dim + 2 * cfg.kv_dim,),
                     lambda: to_dtype(np.concatenate([np.asarray(weights[n]) for n in bnames]), g.dtype))
        qkv = g.op("Add", [qkv, b])
    q, k, v = g.op("Split", [qkv, g.i64([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])], n_out=3, axis=-1)
    q = _heads(g, q, H, hd, f"l{i}_q")  # (B, H, T, hd)
    k = _heads(g, k, KV, hd, f"l{i}_k")  # (B, n_kv, T, hd)
    v = _heads(g, v, KV, hd, f"l{i}_v")  # (B, n_kv, T, hd)
    if rope is not None:
        q = _rotate(g, cfg, q, rope, f"l{i}_q_rot")
        k = _rotate(g, cfg, k, rope, f"l{i}_k_rot")

    pk, pv = io_spec.past_key(i), io_spec.past_value(i)
    ok, ov = io_spec.present_key(i), io_spec.present_value(i)
    if layout == "static":  # in place: present aliases past (B, n_kv, S_max, hd)
        # TensorRT's KV_CACHE_UPDATE: input 0 is the graph input itself, the output the graph output
        g.op("TensorScatter", [pk, k, write_idx], out=[ok], axis=-2)
        g.op("TensorScatter", [pv, v, write_idx], out=[ov], axis=-2)
        # attend over the L slots in use only (see _used_slots): (B, n_kv, L, hd)
        ax, zero = g.i64([2]), g.i64([0])
        kk = g.op("Slice", [ok, zero, used[1], ax], hint=f"l{i}_k_used")
        vv = g.op("Slice", [ov, zero, used[1], ax], hint=f"l{i}_v_used")
    else:  # (B, n_kv, P + T, hd)
        g.op("Concat", [pk, k], out=[ok], axis=2)
        g.op("Concat", [pv, v], out=[ov], axis=2)
        kk, vv = ok, ov

    scale = 1.0 / math.sqrt(hd)
    if fused:
        attrs = dict(scale=scale)
        if g.dtype != "float32":
            attrs["softmax_precision"] = TensorProto.FLOAT  # fp16 scores overflow for GPT-NeoX/XGLM
        y = g.op("Attention", [q, kk, vv, mask], hint=f"l{i}_attn", **attrs)  # (B, H, T, hd)
    else:
        y = _unfused_attention(g, cfg, q, kk, vv, mask, scale, i)
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.i64([0, 0, cfg.q_dim])])  # (B, T, H*hd)
    return _linear(g, y, p + "o", w, cfg.out_bias)


def _unfused_attention(g: _Builder, cfg: ModelConfig, q: str, k: str, v: str, mask: str, scale: float,
                       i: int) -> str:
    """MatMul/Softmax attention, scores and softmax in fp32; GQA by grouping query heads
    (B, n_kv, rep, T, hd) against (B, n_kv, 1, S, hd) instead of repeating K/V."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rep = H // KV
    f32 = TensorProto.FLOAT
    qg = g.op("Reshape", [q, g.i64([0, KV, rep, -1, hd])])  # (B, n_kv, rep, T, hd)
    kg = g.op("Unsqueeze", [k, g.i64([2])])  # (B, n_kv, 1, S, hd)
    vg = g.op("Unsqueeze", [v, g.i64([2])])  # (B, n_kv, 1, S, hd)
    if g.dtype != "float32":
        qg, kg = g.op("Cast", [qg], to=f32), g.op("Cast", [kg], to=f32)
    kt = g.op("Transpose", [kg], perm=[0, 1, 2, 4, 3])  # (B, n_kv, 1, hd, S)
    scores = g.op("Mul", [g.op("MatMul", [qg, kt]), g.f32(scale)], hint=f"l{i}_scores")  # (B, n_kv, rep, T, S)
    m = g.op("Unsqueeze", [mask, g.i64([1])])  # (B, 1, 1, T, S)
    scores = g.op("Where", [m, scores, g.f32(-np.inf)])
    probs = g.op("Softmax", [scores], axis=-1)
    if g.dtype != "float32":
        probs = g.op("Cast", [probs], to=g.tdtype)
    y = g.op("MatMul", [probs, vg])  # (B, n_kv, rep, T, hd)
    return g.op("Reshape", [y, g.i64([0, H, -1, hd])], hint=f"l{i}_attn")  # (B, H, T, hd)
