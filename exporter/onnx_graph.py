"""Build the ONNX graph of a `ModelConfig` directly with `onnx.helper` (no tracing).

The graph mirrors models/transformer.py module for module: `ModelGraph` has one method per
module of the reference (embed, norm, attention, mlp, block, head), so the two read side by
side. The mask rule and the position tables are not restated here: they come from
kvtrace/numerics.py, the module the reference calls too (the mask rule runs on `Sym`, a
symbolic tensor whose operators emit ONNX nodes). Tensor names and shapes come from
kvtrace/io_spec.py.

Two forms:
  opset >= 24 ("fused"):  Attention (one per layer, 4-D Q/K/V, bool mask, no past/present
                          on the node), RotaryEmbedding, TensorScatter for the static cache,
                          LayerNormalization / RMSNormalization / Gelu.
  opset 17   ("portable"): MatMul/Softmax attention in fp32 with a Where mask, rotary from
                          Slice/Mul/Concat, RMSNorm and Gelu from elementary ops; dynamic
                          cache only (TensorScatter needs opset 24).

Weights are not copied into the graph eagerly: `build()` returns the graph without
initializers plus a list of `Initializer`s whose bytes are produced one at a time (cast, and
Q/K/V stacked), so the exporter can stream a 13 GB model to disk holding one tensor extra at
most. `build_graph()` is the convenience form that returns a complete in-memory ModelProto.

Weight layout: a linear weight is stored as the checkpoint stores it, (out, in), and the graph
computes x @ W.T (`matmul_t`). An fp16 checkpoint exported in fp16 is then written straight
from its own bytes: the 7B export spent 22 s of its 46 s transposing (numpy, torch and
onnxruntime all transpose fp16 at ~1.2 GB/s here), and its byte check compared transposed
bands at 1.7 GB/s instead of contiguous ones at 7. The product has two spellings (`linear`):
  * "fused" (model.onnx at opset 24, for onnxruntime, which alone runs that opset's fused
    operators anyway): FusedMatMul(x, W, transB=1), onnxruntime's contrib op (com.microsoft).
    MLAS packs W as stored; measured against MatMul on a pre-transposed copy (Pythia-160M MLP
    shapes, 12 layers, 2 threads): the same speed and memory with prepacking, 1.7x faster at
    batch 8 without it, and no copy at load.
  * "standard" (model.gpu.onnx, for TensorRT and onnxruntime-cuda, and both graphs of the
    portable opset-17 form, for any runtime): MatMul(x, Transpose(W)), standard ONNX; the
    TensorRT parser transposes constant weights while it builds, onnxruntime folds the
    Transpose into a copy when it loads.
ONNX's own checker and shape inference know no contrib op: `standard_twin` gives them the
standard spelling of the same graph, every value keeping its name.

Layout choices for onnxruntime's CPU kernels (they decide decode speed):
  * projections are FusedMatMul against constant (out, in) weights, which MLAS prepacks once;
  * Q, K and V come from one fused product (one pass over x, one GEMM) and a Split;
  * a tied head reads the embedding initializer itself (written once in the file, no copy);
  * static cache, attend="used" (the default, CPU): Attention sees only the slots in use. The cache is (B, n_kv, S_max, hd)
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
  * static cache, attend="full" (GPU form): no Slice; Attention reads the whole (B, n_kv, S_max,
    hd) cache with a (B, 1, T, S_max) mask, so every shape depends on input shapes only
    (no device->host read of position_ids, CUDA-graph capturable).

Attention precision (fp16/bf16 graphs; fp32 graphs are the same either way):
  * attention_precision="float32" (the CPU form, model.onnx): scores and softmax in fp32.
    Fused: Q, K, V are Cast to fp32 around the Attention node and its output cast back.
    onnxruntime's CPU Attention stores alpha*Q*K^T in the input dtype before the softmax and
    ignores `softmax_precision`, so an fp16 Attention goes non-finite once a scaled score
    passes 65504 (GPT-NeoX and XGLM checkpoints get there); docs/tensorrt.md has the
    measurements. Portable: q and k Cast to fp32 before the first MatMul.
  * attention_precision="native" (the GPU form, model.gpu.onnx, which TensorRT builds from):
    fused: the Attention node in the graph dtype, without `softmax_precision` (the TensorRT
    parser rejects it; the fused GPU kernels accumulate in fp32). Portable: the spelling
    TensorRT's Myelin fuses into one attention kernel (TensorRT without IAttention, e.g. 10.3
    on JetPack 6): fp16/bf16 MatMuls with Q pre-scaled, the softmax in fp32 between them, and
    GQA by repeating K/V to all heads (docs/tensorrt.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from kvtrace import files, io_spec, numerics
from kvtrace.config import ModelConfig
from kvtrace.errors import KvtraceError

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


def stacked(parts: list[np.ndarray]) -> np.ndarray:
    """Matrices (n_i, K) one above the other -> (sum n_i, K); one part is returned as it is (a
    view of the mapped checkpoint is then written straight from the mapping)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def transposed(a: np.ndarray, out: np.ndarray | None = None, tile: int = 128) -> np.ndarray:
    """a (m, n) -> a.T as a C-contiguous (n, m) array (or written into `out`, a view).

    `tile` rows of `a` at a time are copied into a small buffer (one sequential read of the
    memory-mapped checkpoint), then written out in tile x tile squares that stay within the
    caches. A plain np.ascontiguousarray(a.T) walks memory with the stride of a whole row;
    measured on (11008, 4096) fp16 matrices of a mapped checkpoint: 0.3 GB/s plain, 0.85 GB/s
    in whole-row strips, ~1.0 GB/s in squares read straight from the mapping, 1.1-1.25 GB/s
    through the buffer. A source of files.RELEASE_WHILE_READING bytes or more, mapped from a file has its pages released (from this
    process, not from the page cache) as soon as its rows are in the buffer."""
    m, n = a.shape
    release = a.nbytes >= files.RELEASE_WHILE_READING
    if out is None:
        out = np.empty((n, m), dtype=a.dtype)
    buf = np.empty((min(tile, m), n), dtype=a.dtype)
    for i in range(0, m, tile):
        rows = buf[:min(tile, m - i)]
        rows[...] = a[i:i + tile]
        if release:
            files.release_view(a[i:i + tile])  # (a no-op unless `a` is a view of a mapped file)
        for j in range(0, n, tile):
            out[j:j + tile, i:i + tile] = rows[:, j:j + tile].T
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
        if self.data_type in (TensorProto.INT4, TensorProto.UINT4):  # two values per byte
            return (math.prod(self.dims) + 1) // 2
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
    shape_of = getattr(weights, "shape", None)  # a mapping may tell shapes without reading the tensor
    for n, s in shapes.items():
        got = tuple(shape_of(n)) if callable(shape_of) else tuple(weights[n].shape)
        if got != tuple(s):
            raise KvtraceError(f"weights: tensor {n!r} has shape {got}, expected {tuple(s)}")




# ------------------------------------------------------------------------------------ graph
class Sym:
    """A symbolic graph tensor: its operators emit ONNX nodes, so rules written with operators
    (kvtrace.numerics.allowed) produce the graph form of exactly what they compute on arrays.

    Supports what the mask rule uses: `<=`, `>`, `==`, `&`, `|`, `- int`, and x[..., None, :] /
    x[..., :, None] (Unsqueeze at -2 / -1)."""

    __hash__ = None  # __eq__ builds a node

    def __init__(self, g: "_Builder", name: str):
        self.g, self.name = g, name

    def _bin(self, op: str, other) -> "Sym":
        return Sym(self.g, self.g.op(op, [self.name, other.name]))

    def __le__(self, other):
        return self._bin("LessOrEqual", other)

    def __gt__(self, other):
        return self._bin("Greater", other)

    def __eq__(self, other):
        return self._bin("Equal", other)

    def __and__(self, other):
        return self._bin("And", other)

    def __or__(self, other):
        return self._bin("Or", other)

    def __sub__(self, k: int):
        return Sym(self.g, self.g.op("Sub", [self.name, self.g.i64(int(k))]))

    def __getitem__(self, key):
        full = slice(None)
        if key == (Ellipsis, None, full):
            axis = -2
        elif key == (Ellipsis, full, None):
            axis = -1
        else:
            raise TypeError(f"Sym supports x[..., None, :] and x[..., :, None], not {key!r}")
        return Sym(self.g, self.g.op("Unsqueeze", [self.name, self.g.i64([axis])]))


class ModelGraph:
    """The ONNX graph of one model, built section by section like models/transformer.py.

    weights: canonical names of cfg.param_shapes() -> arrays in torch layout ((out, in) for
    linear weights), any float dtype, read lazily one tensor at a time when the file is written.
    attend: static cache only; "used" slices the cache to the slots in use (CPU), "full"
    attends over all S_max slots with the mask (GPU form; value-independent shapes).
    """

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, np.ndarray], *, dtype: str, layout: str,
                 max_seq: int, opset: int, attend: str = "used", attention_precision: str = "float32",
                 linear: str | None = None, quant=None):
        check_options(cfg, dtype=dtype, layout=layout, max_seq=max_seq, opset=opset)
        if attend not in ATTEND:
            raise KvtraceError(f"attend={attend!r}: expected one of {', '.join(ATTEND)}")
        if attention_precision not in ATTENTION_PRECISIONS:
            raise KvtraceError(f"attention_precision={attention_precision!r}: expected one of "
                               f"{', '.join(ATTENTION_PRECISIONS)}")
        if attend == "full" and layout != "static":
            raise KvtraceError("attend='full' (attention over the whole cache) needs --cache static")
        _check_weights(cfg, weights)
        self.cfg, self.weights, self.dtype, self.layout = cfg, weights, dtype, layout
        self.max_seq, self.opset, self.attend = max_seq, opset, attend
        # scores and softmax in fp32 ("float32", the CPU form) or as TensorRT fuses them ("native")
        self.fp32_attention = attention_precision == "float32" and dtype != "float32"
        self.attention_precision = attention_precision
        if linear is None:  # the portable form is standard ONNX throughout
            linear = "fused" if opset >= FUSED_MIN_OPSET else "standard"
        if linear not in LINEAR:
            raise KvtraceError(f"linear={linear!r}: expected one of {', '.join(LINEAR)}")
        self.linear_form = linear
        self.fused = opset >= FUSED_MIN_OPSET
        self.g = _Builder(dtype, opset)
        self.shapes = cfg.param_shapes()
        self.np_dtype = to_dtype(np.zeros(1), dtype).dtype
        self._params: dict[str, str] = {}
        # weight-only quantisation (exporter/quantize.py: QuantSpec), or None
        self.quant = quant
        if quant is not None:
            quant.make(cfg, quant.scheme, group_size=quant.group_size, method=quant.method,
                       accuracy_level=quant.accuracy_level, dtype=dtype, opset=opset)  # re-checked here

    # --------------------------------------------------------------- weights
    def param(self, name: str) -> str:
        """A parameter as stored ((out, in) for linear weights), cast to the graph dtype; one
        initializer however often it is used (the tied head reads the embedding)."""
        if name not in self._params:
            self._params[name] = self.g.weight(name, self.shapes[name],
                                               lambda: to_dtype(self.weights[name], self.dtype))
        return self._params[name]

    def matmul_weight(self, x: str, name: str, rows: list[str], hint: str, out: list[str] | None = None) -> str:
        """x @ W.T where W stacks the (out, in) parameters `rows` (one parameter, or Q/K/V for the
        fused projection) on its rows: the one place a weight matrix meets a product. W is stored
        as the checkpoint stores it, (out, in) (module docstring, "Weight layout"): one
        parameter in the graph dtype is written straight from the checkpoint's bytes."""
        sizes = [self.shapes[r][0] for r in rows]
        K = self.shapes[rows[0]][1]
        if self.quant is not None:
            w = self.quantized_matrix(name, rows, K, sizes)
            return self.g.op("MatMul", [x, w], hint=hint, out=out)

        def make():
            return stacked([to_dtype(self.weights[r], self.dtype) for r in rows])  # (N, K)

        w = self.g.weight(name, (sum(sizes), K), make)
        return self.matmul_t(x, w, hint=hint, out=out)

    def matmul_t(self, x: str, w: str, hint: str, out: list[str] | None = None) -> str:
        """x (..., K) @ w.T for a weight w (N, K) -> (..., N). onnxruntime (linear="fused"):
        com.microsoft FusedMatMul with transB=1, which MLAS packs from w as stored (no transposed
        copy at load). TensorRT and other runtimes (linear="standard"): MatMul(x, Transpose(w)),
        the Transpose of a constant folded by the builder or the session."""
        g = self.g
        if self.linear_form == "fused":
            return g.op("FusedMatMul", [x, w], hint=hint, out=out, domain=CONTRIB_DOMAIN, transB=1)
        wt = g.op("Transpose", [w], hint=w.replace(".", "_") + "_t", perm=[1, 0])  # (K, N)
        return g.op("MatMul", [x, wt], hint=hint, out=out)

    def quantized_matrix(self, name: str, rows: list[str], K: int, sizes: list[int]) -> str:
        """DequantizeLinear(q (K, N) INT4/INT8, scale (ceil(K/g), N), axis 0, block_size g): the
        (in, out) matrix [W0.T | W1.T | ...] of `matmul_weight`, quantised per parameter (so that
        fused Q/K/V hold exactly what Q, K and V quantised alone hold). One DequantizeLinear per
        MatMul: onnxruntime fuses only a DequantizeLinear with a single consumer."""
        from kvtrace.exporter import quantize as qz

        spec, N, g = self.quant, sum(sizes), self.quant.group_size
        nb = -(-K // g)
        scale_dtype = self.dtype
        pending = {}  # the scales of the matrix just quantised, until the writer asks for them

        def quantized():
            """(q (K, N) int8, s (nb, N)); computed once, the scales kept for scale()."""
            q = np.empty((K, N), dtype=np.int8)
            s = np.empty((nb, N), dtype=np.float32)
            col = 0
            for r, n in zip(rows, sizes):
                qr, sr = qz.quantize(self.weights[r], spec.bits, g, spec.method, scale_dtype)  # (n, K), (n, nb)
                transposed(qr, q[:, col:col + n])
                transposed(sr, s[:, col:col + n])
                col += n
            return q, s

        def make_q():
            q, s = quantized()
            pending["s"] = s
            return qz.pack_int4(q) if spec.bits == 4 else q

        def make_s():
            s = pending.pop("s", None)
            if s is None:
                s = quantized()[1]
            return to_dtype(s, self.dtype)

        qtype = TensorProto.INT4 if spec.bits == 4 else TensorProto.INT8
        q = self.g.weight(name + ".q", (K, N), make_q, qtype)
        s = self.g.weight(name + ".scale", (nb, N), make_s)
        return self.g.op("DequantizeLinear", [q, s], hint=name.replace(".", "_") + "_dq", axis=0, block_size=g)

    def linear(self, x: str, prefix: str, bias: bool) -> str:
        y = self.matmul_weight(x, prefix + ".weight", [prefix + ".weight"], prefix.replace(".", "_"))
        return self.g.op("Add", [y, self.param(prefix + ".bias")]) if bias else y

    # --------------------------------------------------------------- modules
    def embed(self, ids: str, pos: str) -> str:
        """Token embedding (times embed_scale) plus sinusoidal positions: (B, T, D)."""
        g, cfg = self.g, self.cfg
        if self.quant is not None:
            x = self.quantized_embed(ids)  # (B, T, D)
        else:
            x = g.op("Gather", [self.param("embed.weight"), ids], hint="embed", axis=0)  # (B, T, D)
        if cfg.embed_scale != 1.0:
            x = g.op("Mul", [x, g.const(cfg.embed_scale, self.np_dtype)], hint="embed_scaled")
        if cfg.positions == "sinusoidal":
            x = g.op("Add", [x, self.sinusoidal(pos)], hint="embed_pos")
        return x

    def quantized_embed(self, ids: str) -> str:
        """The 8-bit embedding (exporter/quantize.py): uint8 table u = q + 128 (V, D) and scales
        (V, D/ge); rows gathered, then (u - 128) * scale per group of ge along D -> (B, T, D).
        Standard ops both runtimes take: onnxruntime's Gather rejects INT4 and would dequantise a
        DequantizeLinear'd table whole on every run; TensorRT refuses INT8 constants outside a
        DequantizeLinear."""
        from kvtrace.exporter import quantize as qz

        g, cfg = self.g, self.cfg
        V, D = cfg.vocab_size, cfg.hidden_size
        ge = self.quant.embed_group(D)
        pending = {}

        def make_u():
            q, s = qz.quantize(self.weights["embed.weight"], qz.EMBED_BITS, ge, "rtn", self.dtype)  # (V, D), (V, D/ge)
            pending["s"] = s
            return (q.astype(np.int16) + qz.EMBED_OFFSET).astype(np.uint8)

        def make_s():
            s = pending.pop("s", None)
            if s is None:
                s = qz.quantize(self.weights["embed.weight"], qz.EMBED_BITS, ge, "rtn", self.dtype)[1]
            return to_dtype(s, self.dtype)

        u = g.weight("embed.weight.u8", (V, D), make_u, TensorProto.UINT8)
        sc = g.weight("embed.weight.scale", (V, D // ge), make_s)
        rows = g.op("Cast", [g.op("Gather", [u, ids], hint="embed_u8", axis=0)], to=g.tdtype)  # (B, T, D)
        rows = g.op("Sub", [rows, g.const(qz.EMBED_OFFSET, self.np_dtype)], hint="embed_q")  # (B, T, D) q
        s = g.op("Unsqueeze", [g.op("Gather", [sc, ids], axis=0), g.i64([-1])], hint="embed_s")  # (B, T, D/ge, 1)
        grouped = g.op("Reshape", [rows, g.i64([0, 0, D // ge, ge])])  # (B, T, D/ge, ge)
        return g.op("Reshape", [g.op("Mul", [grouped, s]), g.i64([0, 0, D])], hint="embed")  # (B, T, D)

    def sinusoidal(self, pos: str) -> str:
        """XGLM positions from position_ids: [sin(p' f), cos(p' f)], p' = p + offset, f from
        numerics.sinusoidal_freqs (fp32 angle, then cast), row pad_token_id zero — the table
        of numerics.sinusoidal_table computed per position instead of stored."""
        g, cfg = self.g, self.cfg
        p = g.op("Add", [pos, g.i64(cfg.sinusoidal_offset)], hint="sin_pos")  # (B, T)
        pf = g.op("Unsqueeze", [g.op("Cast", [p], to=TensorProto.FLOAT), g.i64([-1])])  # (B, T, 1)
        ang = g.op("Mul", [pf, g.f32(numerics.sinusoidal_freqs(cfg))], hint="sin_ang")  # (B, T, D/2) fp32
        emb = g.op("Concat", [g.op("Sin", [ang]), g.op("Cos", [ang])], axis=-1)  # (B, T, D)
        if cfg.pad_token_id is not None:
            is_pad = g.op("Unsqueeze", [g.op("Equal", [p, g.i64(cfg.pad_token_id)]), g.i64([-1])])
            emb = g.op("Where", [is_pad, g.f32(0.0), emb])
        if self.dtype != "float32":
            emb = g.op("Cast", [emb], to=ONNX_DTYPE[self.dtype])
        return emb

    def rope(self):
        """cos/sin caches (max_seq, r/2) in the compute dtype (numerics.rope_tables), or None."""
        if self.cfg.positions != "rope":
            return None
        cos, sin = (to_dtype(t, self.dtype) for t in numerics.rope_tables(self.cfg, self.max_seq))
        return self.g.weight("rope.cos", cos.shape, lambda: cos), self.g.weight("rope.sin", sin.shape, lambda: sin)

    def mask(self, pos: str):
        """The attention mask (B, 1, T, S), computed once and shared by all layers, from
        numerics.allowed; plus, static attend="used", L = the slots in use as a (1,) int64."""
        g, cfg, i64 = self.g, self.cfg, self.g.i64
        window = cfg.sliding_window
        used = None
        q_pos = Sym(g, pos)
        if self.layout == "static":
            if self.attend == "used":
                # L = min(max(position_ids) + 1, S_max): slots >= L are invisible to every query of
                # this call (slot j visible from position p only if j <= p), so Attention reads the
                # first L slots only; the min keeps shapes sane for out-of-range positions (which
                # the runtime refuses before running)
                top = g.op("ReduceMax", [pos], hint="max_pos", keepdims=0)  # () int64
                n = g.op("Min", [g.op("Add", [top, i64(1)]), i64(self.max_seq)], hint="used")  # () L
                used = g.op("Unsqueeze", [n, i64([0])], hint="used_1d")  # (1,)
                k_slot = Sym(g, g.op("Range", [i64(0), n, i64(1)], hint="slots"))  # (L,)
            else:
                k_slot = Sym(g, i64(np.arange(self.max_seq)))  # (S_max,) constant
            allowed = numerics.allowed(q_pos, q_pos, k_slot, k_slot, None, window)  # (B, T, L)
        else:
            am = io_spec.ATTENTION_MASK  # (B, P + T)
            total = g.op("Gather", [g.op("Shape", [am]), i64(1)], hint="total")  # () P+T
            t_new = g.op("Gather", [g.op("Shape", [io_spec.INPUT_IDS]), i64(1)], hint="t_new")  # () T
            past = g.op("Sub", [total, t_new], hint="past_len")  # () P
            k_slot = Sym(g, g.op("Range", [i64(0), total, i64(1)], hint="k_slot"))  # (S,)
            q_slot = Sym(g, g.op("Range", [past, total, i64(1)], hint="q_slot"))  # (T,)
            valid = Sym(g, g.op("Cast", [am], to=TensorProto.BOOL, hint="valid"))  # (B, S)
            # the position held in slot j = number of real tokens before it (window only)
            k_pos = Sym(g, g.op("Sub", [g.op("CumSum", [am, i64(1)]), i64(1)], hint="k_pos")) if window else None
            allowed = numerics.allowed(q_slot, q_pos, k_slot, k_pos, valid, window)  # (B, T, S)
        return g.op("Unsqueeze", [allowed.name, i64([1])], hint="attn_mask"), used  # (B, 1, T, S)

    def norm(self, x: str, prefix: str) -> str:
        g, cfg = self.g, self.cfg
        scale = self.param(prefix + ".weight")
        hint = prefix.replace(".", "_")
        if cfg.norm == "layernorm":
            # LayerNormalization computes its statistics in fp32 (stash_type=1) for fp16 inputs
            return g.op("LayerNormalization", [x, scale, self.param(prefix + ".bias")], hint=hint, axis=-1,
                        epsilon=cfg.norm_eps)
        if self.opset >= 23:
            return g.op("RMSNormalization", [x, scale], hint=hint, axis=-1, epsilon=cfg.norm_eps, stash_type=1)
        # portable RMSNorm: statistics in fp32, like the reference
        xf = x if self.dtype == "float32" else g.op("Cast", [x], to=TensorProto.FLOAT)
        ms = g.op("ReduceMean", [g.op("Mul", [xf, xf])], axes=[-1], keepdims=1)  # (B, T, 1)
        y = g.op("Mul", [xf, g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.f32(cfg.norm_eps)])])])])
        if self.dtype != "float32":
            y = g.op("Cast", [y], to=g.tdtype)
        return g.op("Mul", [scale, y], hint=hint)

    def act(self, x: str) -> str:
        g, kind = self.g, self.cfg.activation
        if kind == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x])], hint="silu")
        if kind == "relu":
            return g.op("Relu", [x])
        if self.opset >= 20:
            return g.op("Gelu", [x], approximate="tanh" if kind == "gelu_tanh" else "none")
        dt = self.np_dtype  # portable Gelu in the graph dtype
        half = g.op("Mul", [x, g.const(0.5, dt)])
        if kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            x3 = g.op("Mul", [g.op("Mul", [x, x]), x])
            inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [x3, g.const(0.044715, dt)])]),
                                 g.const(math.sqrt(2 / math.pi), dt)])
            t = g.op("Tanh", [inner])
        else:  # 0.5 x (1 + erf(x / sqrt 2))
            t = g.op("Erf", [g.op("Mul", [x, g.const(1 / math.sqrt(2), dt)])])
        return g.op("Mul", [half, g.op("Add", [t, g.const(1.0, dt)])], hint="gelu")

    def mlp(self, x: str, prefix: str) -> str:
        cfg, g = self.cfg, self.g
        up = self.linear(x, prefix + ".up", cfg.mlp_bias)  # (B, T, F)
        if cfg.mlp == "gated":  # SwiGLU: down(act(gate(x)) * up(x))
            h = g.op("Mul", [self.act(self.linear(x, prefix + ".gate", cfg.mlp_bias)), up])
        else:
            h = self.act(up)
        return self.linear(h, prefix + ".down", cfg.mlp_bias)  # (B, T, D)

    def heads(self, x: str, n: int, hint: str) -> str:
        """(B, T, n*hd) -> (B, n, T, hd)"""
        r = self.g.op("Reshape", [x, self.g.i64([0, 0, n, self.cfg.head_dim])])
        return self.g.op("Transpose", [r], hint=hint, perm=[0, 2, 1, 3])

    def rotate(self, x: str, rope, hint: str) -> str:
        """rotate-half RoPE on the first rotary_dim dims of x (B, h, T, hd)."""
        g, cfg = self.g, self.cfg
        cos, sin = rope
        if self.opset >= 23:
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

    def attention(self, i: int, x: str, rope, mask: str, write_idx: str | None, used: str | None) -> str:
        g, cfg = self.g, self.cfg
        p = f"layers.{i}.attn."
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # one MatMul for Q, K and V against [Wq.T | Wk.T | Wv.T] (D, q_dim + 2 kv_dim)
        qkv = self.matmul_weight(x, p + "qkv.weight", [p + n + ".weight" for n in "qkv"], f"l{i}_qkv")
        if cfg.qkv_bias:
            names = [p + n + ".bias" for n in "qkv"]
            b = g.weight(p + "qkv.bias", (cfg.q_dim + 2 * cfg.kv_dim,),
                         lambda: to_dtype(np.concatenate([np.asarray(self.weights[n]) for n in names]), self.dtype))
            qkv = g.op("Add", [qkv, b])
        q, k, v = g.op("Split", [qkv, g.i64([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])], n_out=3, axis=-1)
        q = self.heads(q, H, f"l{i}_q")  # (B, H, T, hd)
        k = self.heads(k, KV, f"l{i}_k")  # (B, n_kv, T, hd)
        v = self.heads(v, KV, f"l{i}_v")  # (B, n_kv, T, hd)
        if rope is not None:
            q = self.rotate(q, rope, f"l{i}_q_rot")
            k = self.rotate(k, rope, f"l{i}_k_rot")

        pk, pv = io_spec.past_key(i), io_spec.past_value(i)
        ok, ov = io_spec.present_key(i), io_spec.present_value(i)
        if self.layout == "static":  # in place: present aliases past (B, n_kv, S_max, hd)
            # TensorRT's KV_CACHE_UPDATE: input 0 is the graph input itself, the output the graph output
            g.op("TensorScatter", [pk, k, write_idx], out=[ok], axis=-2)
            g.op("TensorScatter", [pv, v, write_idx], out=[ov], axis=-2)
            kk, vv = ok, ov
            if used is not None:  # attend="used": the first L slots only, (B, n_kv, L, hd)
                ax, zero = g.i64([2]), g.i64([0])
                kk = g.op("Slice", [ok, zero, used, ax], hint=f"l{i}_k_used")
                vv = g.op("Slice", [ov, zero, used, ax], hint=f"l{i}_v_used")
        else:  # (B, n_kv, P + T, hd)
            g.op("Concat", [pk, k], out=[ok], axis=2)
            g.op("Concat", [pv, v], out=[ov], axis=2)
            kk, vv = ok, ov

        scale = 1.0 / math.sqrt(hd)
        if self.fused and self.fp32_attention:  # CPU form: fp32 scores (fp16 ones overflow past 65504)
            f32 = TensorProto.FLOAT
            q32, k32, v32 = (g.op("Cast", [t], to=f32) for t in (q, kk, vv))
            y = g.op("Attention", [q32, k32, v32, mask], hint=f"l{i}_attn32", scale=scale)  # (B, H, T, hd) fp32
            y = g.op("Cast", [y], to=g.tdtype, hint=f"l{i}_attn")
        elif self.fused:  # graph dtype; no softmax_precision (TensorRT's parser rejects it)
            y = g.op("Attention", [q, kk, vv, mask], hint=f"l{i}_attn", scale=scale)  # (B, H, T, hd)
        elif self.attention_precision == "native":
            y = self.fusable_attention(q, kk, vv, mask, scale, i)
        else:
            y = self.unfused_attention(q, kk, vv, mask, scale, i)
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.i64([0, 0, cfg.q_dim])])  # (B, T, H*hd)
        return self.linear(y, p + "o", cfg.out_bias)

    def unfused_attention(self, q: str, k: str, v: str, mask: str, scale: float, i: int) -> str:
        """MatMul/Softmax attention, scores and softmax in fp32; GQA by grouping query heads
        (B, n_kv, rep, T, hd) against (B, n_kv, 1, S, hd) instead of repeating K/V."""
        g, cfg = self.g, self.cfg
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        f32 = TensorProto.FLOAT
        qg = g.op("Reshape", [q, g.i64([0, KV, H // KV, -1, hd])])  # (B, n_kv, rep, T, hd)
        kg = g.op("Unsqueeze", [k, g.i64([2])])  # (B, n_kv, 1, S, hd)
        vg = g.op("Unsqueeze", [v, g.i64([2])])  # (B, n_kv, 1, S, hd)
        if self.dtype != "float32":
            qg, kg = g.op("Cast", [qg], to=f32), g.op("Cast", [kg], to=f32)
        kt = g.op("Transpose", [kg], perm=[0, 1, 2, 4, 3])  # (B, n_kv, 1, hd, S)
        scores = g.op("Mul", [g.op("MatMul", [qg, kt]), g.f32(scale)], hint=f"l{i}_scores")  # (B, n_kv, rep, T, S)
        m = g.op("Unsqueeze", [mask, g.i64([1])])  # (B, 1, 1, T, S)
        probs = g.op("Softmax", [g.op("Where", [m, scores, g.f32(-np.inf)])], axis=-1)
        if self.dtype != "float32":
            probs = g.op("Cast", [probs], to=g.tdtype)
        y = g.op("MatMul", [probs, vg])  # (B, n_kv, rep, T, hd)
        return g.op("Reshape", [y, g.i64([0, H, -1, hd])], hint=f"l{i}_attn")  # (B, H, T, hd)

    def fusable_attention(self, q: str, k: str, v: str, mask: str, scale: float, i: int) -> str:
        """MatMul/Softmax attention spelled the way TensorRT's Myelin fuses it into one MHA kernel
        (measured with TensorRT-RTX 1.7, docs/tensorrt.md): Q pre-scaled, Q*K^T and P*V in the
        graph dtype, the mask and softmax in fp32 between them, K/V repeated to all H heads (the
        5-D grouping of unfused_attention and an fp32 Cast of q/k before the first MatMul both
        block the fusion)."""
        g, cfg = self.g, self.cfg
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        f32 = TensorProto.FLOAT
        if H != KV:  # (B, n_kv, S, hd) -> (B, n_kv, rep, S, hd) -> (B, H, S, hd)
            rep = H // KV

            def repeat(x: str, name: str) -> str:
                x5 = g.op("Unsqueeze", [x, g.i64([2])])  # (B, n_kv, 1, S, hd)
                shape = g.op("Shape", [x5])
                target = g.op("Concat", [g.op("Slice", [shape, g.i64([0]), g.i64([2])]), g.i64([rep]),
                                         g.op("Slice", [shape, g.i64([3]), g.i64([5])])], axis=0)
                return g.op("Reshape", [g.op("Expand", [x5, target]), g.i64([0, H, -1, hd])], hint=name)

            k, v = repeat(k, f"l{i}_k_rep"), repeat(v, f"l{i}_v_rep")
        qs = g.op("Mul", [q, g.const(scale, self.np_dtype)], hint=f"l{i}_q_scaled")  # (B, H, T, hd)
        scores = g.op("MatMul", [qs, g.op("Transpose", [k], perm=[0, 1, 3, 2])], hint=f"l{i}_scores")  # (B, H, T, S)
        if self.dtype != "float32":
            scores = g.op("Cast", [scores], to=f32)
        probs = g.op("Softmax", [g.op("Where", [mask, scores, g.f32(-np.inf)])], axis=-1)  # (B, H, T, S) fp32
        if self.dtype != "float32":
            probs = g.op("Cast", [probs], to=g.tdtype)
        return g.op("MatMul", [probs, v], hint=f"l{i}_attn")  # (B, H, T, hd)

    def block(self, i: int, x: str, rope, mask: str, write_idx, used) -> str:
        g, p = self.g, f"layers.{i}."
        a = self.attention(i, self.norm(x, p + "norm1"), rope, mask, write_idx, used)
        if self.cfg.parallel_residual:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            m = self.mlp(self.norm(x, p + "norm2"), p + "mlp")
            return g.op("Add", [g.op("Add", [x, a]), m], hint=f"l{i}_out")
        x = g.op("Add", [x, a], hint=f"l{i}_res1")
        return g.op("Add", [x, self.mlp(self.norm(x, p + "norm2"), p + "mlp")], hint=f"l{i}_out")

    def head(self, x: str) -> None:
        """Final norm and lm_head on the positions asked for -> the graph output logits (B, K, V) fp32.

        A generation prefill needs one row per sequence, and the lm_head over all T positions was a
        quarter of a 128-token prefill (and a (B, T, V) float32 output). GatherND with batch_dims=1
        picks x[b, logits_index[b, k]]; onnxruntime and the TensorRT parser both take it."""
        g, cfg = self.g, self.cfg
        sel = g.op("Unsqueeze", [io_spec.LOGITS_INDEX, g.i64([2])], hint="logits_index_nd")  # (B, K, 1)
        x = g.op("GatherND", [x, sel], hint="x_selected", batch_dims=1)  # (B, K, D)
        x = self.norm(x, "norm_f")
        fp32 = self.dtype == "float32"
        out = [io_spec.LOGITS] if fp32 else None  # low precision: cast to fp32 below
        if cfg.tie_word_embeddings and self.quant is not None:
            # a second, quantised tensor: the embedding is an 8-bit Gather table, the head a fused MatMul
            logits = self.matmul_weight(x, "lm_head.weight", ["embed.weight"], "logits_lp", out=out)
        elif cfg.tie_word_embeddings:  # the embedding initializer (V, D), stored once
            logits = self.matmul_t(x, self.param("embed.weight"), hint="logits_lp", out=out)  # (B, K, V)
        else:
            logits = self.matmul_weight(x, "lm_head.weight", ["lm_head.weight"], "logits_lp", out=out)
        if not fp32:
            g.op("Cast", [logits], out=[io_spec.LOGITS], to=TensorProto.FLOAT)

    # --------------------------------------------------------------- the whole graph
    def build(self):
        """-> (ModelProto without weight initializers, [Initializer], description dict)."""
        cfg, g = self.cfg, self.g
        spec = io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                             vocab_size=cfg.vocab_size, dtype=self.dtype, layout=self.layout,
                             max_seq=self.max_seq, max_batch=1)
        inputs = [helper.make_tensor_value_info(t["name"], _tdtype(t["dtype"]), t["shape"]) for t in spec["inputs"]]
        outputs = [helper.make_tensor_value_info(t["name"], _tdtype(t["dtype"]), t["shape"]) for t in spec["outputs"]]
        pos = io_spec.POSITION_IDS
        x = self.embed(io_spec.INPUT_IDS, pos)  # (B, T, D)
        mask, used = self.mask(pos)
        rope = self.rope()
        # static: row b's new tokens go to slots position_ids[b, 0] + t
        write_idx = g.op("Gather", [pos, g.i64(0)], hint="write_idx", axis=1) if self.layout == "static" else None
        for i in range(cfg.n_layers):
            x = self.block(i, x, rope, mask, write_idx, used)
        self.head(x)

        graph = helper.make_graph(g.nodes, "kvtrace", inputs, outputs, initializer=g.small)
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == CONTRIB_DOMAIN for n in g.nodes):
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="kvtrace")
        model.ir_version = ir_version_for(self.opset)
        info = {"attention": "fused" if self.fused else "unfused",
                "rotary": None if cfg.positions != "rope" else ("fused" if self.fused else "unfused"),
                "cache_update": "TensorScatter" if self.layout == "static" else "concat",
                "attend": self.attend if self.layout == "static" else "all",
                "attention_precision": self.attention_precision}
        if self.quant is not None:
            info["weights"] = "DequantizeLinear + MatMul (%s)" % self.quant.scheme
        return model, g.inits, info


ATTEND = ("used", "full")
ATTENTION_PRECISIONS = ("float32", "native")
LINEAR = ("fused", "standard")  # x @ W.T: FusedMatMul (onnxruntime's contrib op) or MatMul(x, Transpose(W))
CONTRIB_DOMAIN = "com.microsoft"


def build(cfg: ModelConfig, weights: Mapping[str, np.ndarray], *, dtype: str = "float32",
          layout: str = "static", max_seq: int, opset: int = FUSED_MIN_OPSET, attend: str = "used",
          attention_precision: str = "float32", linear: str | None = None, quant=None):
    """-> (ModelProto without weight initializers, [Initializer], description dict); see ModelGraph."""
    return ModelGraph(cfg, weights, dtype=dtype, layout=layout, max_seq=max_seq, opset=opset,
                      attend=attend, attention_precision=attention_precision, linear=linear, quant=quant).build()


def build_graph(cfg: ModelConfig, weights: Mapping[str, np.ndarray], **options) -> onnx.ModelProto:
    """The complete ModelProto with weights inside (fine below 2 GB; the exporter streams);
    `options` are build()'s."""
    model, inits, _ = build(cfg, weights, **options)
    model.graph.initializer.extend(t.tensor() for t in inits)
    return model


def _transpose_of_weight(name: str, producer: dict, weights) -> onnx.NodeProto | None:
    """The Transpose node that makes value `name` from a weight (a name in `weights`), or None:
    how a linear layer's weight meets a MatMul in the standard spelling (with perm [1, 0])."""
    t = producer.get(name)
    return t if t is not None and t.op_type == "Transpose" and t.input[0] in weights else None


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def fused_linears(model, weights: set[str]) -> int:
    """In place: each MatMul(x, Transpose(w, perm=[1, 0])) of a weight w becomes FusedMatMul(x, w,
    transB=1) (a traced graph's linear layers in the builder's CPU form); a Transpose left without
    a reader goes. Returns how many were rewritten."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    out, done = [], 0
    for n in g.node:
        t = _transpose_of_weight(n.input[1], producer, weights) if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") \
            else None
        if t is not None and _perm(t) == [1, 0]:
            out.append(helper.make_node("FusedMatMul", [n.input[0], t.input[0]], list(n.output), name=n.name,
                                        domain=CONTRIB_DOMAIN, transB=1))
            readers[t.output[0]] -= 1
            done += 1
        else:
            out.append(n)
    out = [n for n in out if not (n.op_type == "Transpose" and readers.get(n.output[0], 1) == 0)]
    del g.node[:]
    g.node.extend(out)
    if done and not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=CONTRIB_DOMAIN, version=1)
    return done


def linear_reads(model, weights) -> dict[str, str]:
    """How each weight in `weights` (names) meets a matrix product in `model`: "fused"
    (FusedMatMul with transB=1 reads it), "transposed" (MatMul reads Transpose(it, perm=[1, 0]))
    or "direct" (MatMul reads it as it is: in this layout, a Transpose missing). A weight read
    two ways is reported as its last."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type == "FusedMatMul" and n.domain == CONTRIB_DOMAIN and n.input[1] in weights:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            out[n.input[1]] = "fused" if attrs == {"transB": 1} else f"FusedMatMul {attrs}"
        elif n.op_type == "MatMul" and n.domain in ("", "ai.onnx"):
            b, t = n.input[1], _transpose_of_weight(n.input[1], producer, weights)
            if b in weights:
                out[b] = "direct"
            elif t is not None:
                out[t.input[0]] = "transposed" if _perm(t) == [1, 0] else f"Transpose {_perm(t)}"
    return out


def check_linears(cpu, gpu, weights) -> None:
    """Both graph forms multiply the same (out, in) weights by x, each in its own spelling: model.onnx
    with FusedMatMul(transB=1) (opset 24) or MatMul of a Transpose (portable), model.gpu.onnx with
    MatMul of a Transpose; no weight meets a MatMul untransposed. Raises KvtraceError naming the
    first weight that differs (a dropped Transpose of a square weight passes shape inference)."""
    a, b = linear_reads(cpu, weights), linear_reads(gpu, weights)
    spelled = "fused" if any(o.domain == CONTRIB_DOMAIN for o in cpu.opset_import) else "transposed"
    for name in sorted(set(a) | set(b)):
        if a.get(name) != spelled or b.get(name) != "transposed":
            raise KvtraceError(f"weight {name!r} meets its product as {a.get(name, 'nothing')} in "
                               f"{io_spec.ONNX_NAME} and as {b.get(name, 'nothing')} in the GPU form; expected "
                               f"{spelled} and transposed (x @ W.T of the (out, in) weight)")


def standard_twin(model) -> onnx.ModelProto:
    """A copy of `model` in standard ONNX alone, for the tools that know no contrib op (ONNX's
    checker and shape inference): each FusedMatMul(x, w, transB=1) becomes MatMul(x,
    Transpose(w)) with the same output name, so every value keeps its name and inferred type."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    nodes, done = [], {}  # w -> the name of its Transpose's output (one per weight)
    for n in twin.graph.node:
        if n.domain != CONTRIB_DOMAIN:
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "FusedMatMul" or attrs != {"transB": 1}:
            raise KvtraceError(f"internal error: no standard twin for {n.op_type} {attrs} (node {n.name})")
        w = n.input[1]
        if w not in done:
            done[w] = f"{w}__t{len(done)}"
            nodes.append(helper.make_node("Transpose", [w], [done[w]], name=done[w], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [n.input[0], done[w]], list(n.output), name=n.name))
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    keep = [o for o in twin.opset_import if o.domain != CONTRIB_DOMAIN]
    del twin.opset_import[:]
    twin.opset_import.extend(keep)
    return twin


def ir_version_for(opset: int) -> int:
    """The IR version to stamp: as low as possible, because runtimes reject IR versions newer
    than they know (onnxruntime 1.31 rejects onnx 1.23's newest). onnx pairs opset 24 with
    IR 12, but nothing in these graphs needs more than IR 10, and IR 10/11 models with opset
    24 pass onnx.checker and load in onnxruntime 1.31/1.32 and the TensorRT parser
    (docs/tensorrt.md)."""
    return min(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]), 10)


def _tdtype(name: str) -> int:
    return {"int64": TensorProto.INT64, **ONNX_DTYPE}[name]
