"""Weight-only quantisation (`kvtrace export --quant int8|int4`): the maths, the scheme, its checks.

The scheme (the reasons and the measurements are in docs/quantization.md):
  * every matrix that meets a MatMul (fused Q/K/V, attention output, MLP up/gate/down, lm_head):
    signed INT8 or INT4 values q, symmetric (no zero point), one positive scale s per group of
    `group_size` consecutive *input* channels of each output channel; W ~ q * s.
    In the graph: DequantizeLinear(q (K, N), s (ceil(K/g), N), axis=0, block_size=g) -> MatMul,
    which onnxruntime fuses into its low-bit kernel (MatMulNBits) and TensorRT turns into a
    weight-only GEMM (INT4; INT8 blocked weights are dequantised per call by TensorRT).
    Scales are positive (TensorRT refuses negative DequantizeLinear scales) and stored in the
    compute dtype (fp32, or fp16 for an --fp16 artifact: TensorRT wants the scale dtype to be the
    activation dtype).
  * the token embedding: 8 bits whatever the scheme, groups of `group_size` along D (one group per
    row when D is not a multiple), stored as uint8 = q + 128, read by Gather + Cast + Sub + Mul:
    onnxruntime's Gather rejects INT4 tables and dequantises a whole DequantizeLinear'd table on
    every run, and TensorRT refuses an INT8 constant that does not feed a DequantizeLinear; both
    accept a uint8 table.
  * a tied lm_head is a second tensor (the embedding matrix quantised again, at the scheme's bits,
    in the head's (D, V) layout): one quantised tensor cannot feed both a Gather and a fused MatMul.
  * biases, norms, the KV cache and the activations stay in the compute dtype.

Rounding ("method"):
  rtn     s = max|w| / qmax over the group (qmax 127 or 7), q = round(w / s)
  search  per group, the scale among a few candidates max|w| / c (c from qmax to qmax / 0.7, and
          qmax + 1, which maps a negative extreme exactly to -2^(b-1)) that minimises the group's
          squared error sum (q s - w)^2 (a clipping search; int4's default: it lowers the
          reconstruction error by ~10% and the logit error of a trained model at no runtime cost)
Scales are rounded to their stored dtype *before* q is computed, so the stored (q, s) reproduce
exactly what the error was minimised for, and fake_quantize() (the reference's weights for
parity) is bit-identical to what the artifact holds.

All functions work on the torch layout (out, in) = (rows, K), groups along the last axis, one
chunk of rows at a time (a 7B model's largest matrix never needs more than a few hundred MB).
"""
from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Mapping

import numpy as np

from kvtrace.errors import KvtraceError

SCHEMES = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
METHODS = ("rtn", "search")
DEFAULT_GROUP = {"int8": 128, "int4": 32}
DEFAULT_METHOD = {"int8": "rtn", "int4": "search"}
# onnxruntime's MatMulNBits compute type (session.qdq_matmulnbits_accuracy_level): 1 fp32, 2 fp16,
# 3 bf16, 4 int8 activations per block (the fast one on CPU; 0 = unset is ~100x slower for 8 bits)
ACCURACY_LEVELS = (1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4
MIN_GROUP = 16
EMBED_BITS = 8
EMBED_OFFSET = 128  # uint8 storage of the embedding: q + 128
CHUNK_ELEMS = 1 << 22  # rows quantised together: ~4M weights (~100 MB of float32 temporaries)


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range: (-2^(b-1), 2^(b-1) - 1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def divisors(bits: int, method: str) -> list[float]:
    """Candidate divisors c (scale = max|w| / c), rtn's first (it wins ties)."""
    qmax = qrange(bits)[1]
    if method == "rtn":
        return [float(qmax)]
    if method != "search":
        raise KvtraceError(f"quantisation method {method!r}: expected one of {', '.join(METHODS)}")
    # clipping ratios 1.0 .. 0.7 of the range (int8: 1.0 .. 0.9, clipping buys nothing there), plus
    # qmax + 1: a group whose extreme is negative then maps it to -2^(b-1) exactly
    lo = 0.7 if bits <= 4 else 0.9
    cs = [qmax / r for r in np.linspace(1.0, lo, 13 if bits <= 4 else 6)] + [float(qmax + 1)]
    return [float(qmax)] + sorted(set(float(c) for c in cs) - {float(qmax)})


def _store(s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Scales as they will be stored, back in float32: rounded to `scale_dtype`, and never 0
    (TensorRT wants positive scales; an all-zero group gets 1, its q being 0 anyway)."""
    s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    if scale_dtype == "float16":  # tiny scales stay normal fp16 numbers (the group's q shrink instead)
        s = np.maximum(s, np.float32(np.finfo(np.float16).tiny)).astype(np.float16).astype(np.float32)
    elif scale_dtype != "float32":
        raise KvtraceError(f"scale dtype {scale_dtype!r}: expected float32 or float16")
    return s


def quantize(w: np.ndarray, bits: int, group: int, method: str = "rtn", scale_dtype: str = "float32"
             ) -> tuple[np.ndarray, np.ndarray]:
    """w (R, K) float -> (q (R, K) int8 in qrange(bits), s (R, ceil(K/group)) float32 holding
    values exactly representable in `scale_dtype`), groups of `group` along K (the last one short
    when K % group != 0). W ~ q * s[:, k // group]."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise KvtraceError(f"quantize: expected a matrix, got shape {w.shape}")
    R, K = w.shape
    nb = -(-K // group)
    qmin, qmax = qrange(bits)
    cands = divisors(bits, method)
    q_out = np.empty((R, K), dtype=np.int8)
    s_out = np.empty((R, nb), dtype=np.float32)
    step = max(1, CHUNK_ELEMS // (nb * group))
    for r0 in range(0, R, step):
        wc = np.asarray(w[r0:r0 + step], dtype=np.float32)  # (r, K)
        r = wc.shape[0]
        if nb * group != K:  # ragged last group: zeros quantise to 0 exactly, adding no error
            wc = np.concatenate([wc, np.zeros((r, nb * group - K), np.float32)], axis=1)
        wb = wc.reshape(r, nb, group)  # (r, nb, g)
        amax = np.abs(wb).max(axis=-1)  # (r, nb)
        best_s, best_e = None, None
        q = np.empty_like(wb)  # (r, nb, g) work buffer, float32
        for c in cands:
            s = _store(amax / np.float32(c), scale_dtype)  # (r, nb)
            if len(cands) == 1:
                best_s = s
                break
            np.divide(wb, s[..., None], out=q)  # q = clip(rint(w / s)), then the error (q s - w)^2
            np.rint(q, out=q)
            np.clip(q, qmin, qmax, out=q)
            q *= s[..., None]
            q -= wb
            q *= q
            err = q.sum(axis=-1)  # (r, nb)
            if best_s is None:
                best_s, best_e = s, err
            else:
                better = err < best_e  # strict: the earlier candidate (rtn first) wins ties
                best_s = np.where(better, s, best_s)
                best_e = np.where(better, err, best_e)
        np.divide(wb, best_s[..., None], out=q)
        np.rint(q, out=q)
        q = np.clip(q, qmin, qmax, out=q).astype(np.int8)
        q_out[r0:r0 + r] = q.reshape(r, nb * group)[:, :K]
        s_out[r0:r0 + r] = best_s
    return q_out, s_out


def dequantize(q: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """(q (R, K), s (R, ceil(K/group))) -> float32 (R, K): q * s of its group."""
    K = q.shape[1]
    return (q.astype(np.float32) * np.repeat(s.astype(np.float32), group, axis=1)[:, :K]).astype(np.float32)


def fake_quantize(w: np.ndarray, bits: int, group: int, method: str = "rtn", scale_dtype: str = "float32"
                  ) -> np.ndarray:
    """The float32 values an artifact's quantised copy of `w` (R, K) stands for."""
    q, s = quantize(w, bits, group, method, scale_dtype)
    return dequantize(q, s, group)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values (any shape, C order) -> ONNX INT4 raw bytes (uint8, ceil(n/2)): element
    2i in the low nibble of byte i, element 2i + 1 in the high nibble."""
    v = (np.ascontiguousarray(q).reshape(-1).astype(np.uint8) & np.uint8(0xF))
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return v[0::2] | (v[1::2] << np.uint8(4))


def unpack_int4(b: np.ndarray, n: int) -> np.ndarray:
    """ONNX INT4 raw bytes -> n signed values (int8)."""
    b = np.asarray(b, dtype=np.uint8).reshape(-1)
    v = np.empty(b.size * 2, np.uint8)
    v[0::2], v[1::2] = b & 0xF, b >> 4
    return ((v[:n].astype(np.int16) ^ 8) - 8).astype(np.int8)


# ------------------------------------------------------------------------------- the scheme
@dataclass(frozen=True)
class QuantSpec:
    """What `--quant` asked for, checked (make())."""
    scheme: str  # "int8" | "int4"
    group_size: int
    method: str
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL

    @property
    def bits(self) -> int:
        return BITS[self.scheme]

    def embed_group(self, hidden: int) -> int:
        """The embedding's group along D: group_size, or the whole row when D is not a multiple."""
        return self.group_size if hidden % self.group_size == 0 else hidden

    @classmethod
    def make(cls, cfg, scheme: str, *, group_size=None, method=None, accuracy_level=None, dtype: str = "float32",
             opset: int = 24) -> "QuantSpec":
        """Check `--quant` against the model and the other export options; KvtraceError naming
        the option otherwise."""
        if scheme not in SCHEMES:
            raise KvtraceError(f"--quant {scheme!r}: expected one of {', '.join(SCHEMES)}")
        if opset < 21:
            raise KvtraceError(f"--quant {scheme} with --opset {opset}: blocked DequantizeLinear (and INT4) needs "
                               "opset 21; use the default --opset 24")
        if dtype == "bfloat16":
            raise KvtraceError(f"--quant {scheme} with --bf16: onnxruntime's CPU low-bit kernels have no bfloat16 "
                               "path; use fp32 compute (CPU) or --fp16 (GPU)")
        if dtype not in ("float32", "float16"):
            raise KvtraceError(f"--quant {scheme}: compute dtype {dtype!r} must be float32 or float16")
        g = group_size
        if g is None:  # the default, capped for small models by their smallest input dimension
            g = min([DEFAULT_GROUP[scheme]] + [_largest_pow2_group(k) or MIN_GROUP for k in input_dims(cfg).values()])
        if not isinstance(g, int) or isinstance(g, bool) or g < MIN_GROUP or g & (g - 1):
            raise KvtraceError(f"--group-size {g!r}: must be a power of two >= {MIN_GROUP} (16, 32, 64, 128, ...)")
        m = DEFAULT_METHOD[scheme] if method is None else method
        if m not in METHODS:
            raise KvtraceError(f"--quant-method {m!r}: expected one of {', '.join(METHODS)}")
        lvl = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
        if lvl not in ACCURACY_LEVELS:
            raise KvtraceError(f"--accuracy-level {lvl!r}: expected one of {', '.join(map(str, ACCURACY_LEVELS))} "
                               "(1 fp32, 2 fp16, 3 bf16, 4 int8 compute)")
        for name, k in input_dims(cfg).items():
            if g > k:
                raise KvtraceError(f"--group-size {g} is larger than the input dimension {k} of {name}; use "
                                   f"--group-size {_largest_pow2_group(k) or MIN_GROUP} or less")
        return cls(scheme, g, m, lvl)

    def ragged(self, cfg) -> dict[str, int]:
        """{matrix: K} of the matrices whose input dimension K is not a multiple of group_size
        (their last group is short: onnxruntime runs it, TensorRT refuses it)."""
        return {n: k for n, k in input_dims(cfg).items() if k % self.group_size}

    def manifest(self, cfg) -> dict:
        """The manifest's "quant" entry."""
        ragged = self.ragged(cfg)
        D = cfg.hidden_size
        return {
            "scheme": self.scheme, "bits": self.bits, "group_size": self.group_size, "method": self.method,
            "symmetric": True, "weights": "weight-only: activations, KV cache, norms and biases in the compute dtype",
            "format": "DequantizeLinear(INT%d (K, N), scale (ceil(K/g), N), axis=0, block_size=g) -> MatMul"
                      % self.bits,
            "matrices": "fused QKV, attention output, MLP, lm_head",
            "embedding": {"bits": EMBED_BITS, "group_size": self.embed_group(D), "storage": "uint8 = q + 128",
                          "format": "Gather + Cast + Sub + Mul"},
            "head": "quantised" + (" (a separate tensor from the tied embedding)" if cfg.tie_word_embeddings else ""),
            "kv_cache": "compute dtype",
            "accuracy_level": self.accuracy_level,
            "ragged": ragged,
            "tensorrt": _tensorrt_note(self, ragged),
        }

    @classmethod
    def from_manifest(cls, entry: dict) -> "QuantSpec":
        try:
            return cls(entry["scheme"], int(entry["group_size"]), entry["method"],
                       int(entry.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)))
        except (KeyError, TypeError, ValueError) as e:
            raise KvtraceError(f"manifest quant entry {entry!r}: {e}") from e


def input_dims(cfg) -> dict[str, int]:
    """The input dimension K of every kind of quantised matrix."""
    dims = {"layers.*.attn.qkv (hidden_size)": cfg.hidden_size, "layers.*.attn.o (q_dim)": cfg.q_dim,
            "layers.*.mlp.down (intermediate_size)": cfg.intermediate_size}
    return dims


def _largest_pow2_group(k: int) -> int:
    g = 1 << (k.bit_length() - 1)
    return g if g >= MIN_GROUP else 0


def _tensorrt_note(spec: QuantSpec, ragged: dict) -> str:
    if ragged:
        first = next(iter(ragged))
        return (f"not buildable: {first} has K={ragged[first]}, not a multiple of group_size {spec.group_size} "
                "(TensorRT needs whole blocks)")
    if spec.bits == 4:
        return "INT4 weight-only GEMM (DequantizeLinear fused into the GEMM)"
    return "INT8 blocked weights are dequantised to a temporary on every call (TensorRT fuses only per-channel INT8)"


# ---------------------------------------------------------------------------- reference side
def fake_quantize_weights(cfg, weights, spec: QuantSpec, dtype: str = "float32") -> dict:
    """{param name: float32 array} the artifact's quantised tensors stand for, for the parameters
    the artifact quantises: linear weights at spec.bits, the embedding at 8 bits, and for a tied
    model "lm_head.weight" (the embedding at spec.bits). `weights`: name -> array (torch layout)."""
    scale_dtype = dtype
    out = {}
    for name, shape in cfg.param_shapes().items():
        if name == "embed.weight":
            E = np.asarray(weights[name], dtype=np.float32)
            out[name] = fake_quantize(E, EMBED_BITS, spec.embed_group(cfg.hidden_size), "rtn", scale_dtype)
            if cfg.tie_word_embeddings:
                out["lm_head.weight"] = fake_quantize(E, spec.bits, spec.group_size, spec.method, scale_dtype)
        elif len(shape) == 2:  # every other matrix meets a MatMul
            out[name] = fake_quantize(np.asarray(weights[name], dtype=np.float32), spec.bits, spec.group_size,
                                      spec.method, scale_dtype)
    return out


class FakeQuantized(Mapping):
    """`weights` (canonical name -> array, torch layout) as the quantised artifact stands for them,
    one tensor at a time (the streamed export's layer-streamed reference reads it): linear
    weights quantised and dequantised at spec.bits, the embedding at 8 bits; a tied model's head
    is its own quantised tensor, asked for as "lm_head.weight" (head_name)."""

    head_name = "lm_head.weight"

    def __init__(self, cfg, weights, spec: QuantSpec, dtype: str = "float32"):
        self.cfg, self.weights, self.spec, self.dtype = cfg, weights, spec, dtype
        self._shapes = cfg.param_shapes()

    def __getitem__(self, name: str) -> np.ndarray:
        spec, cfg = self.spec, self.cfg
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            E = np.asarray(self.weights["embed.weight"], dtype=np.float32)
            return fake_quantize(E, spec.bits, spec.group_size, spec.method, self.dtype)
        if name not in self._shapes:
            raise KeyError(name)
        w = self.weights[name]
        if name == "embed.weight":
            return fake_quantize(np.asarray(w, dtype=np.float32), EMBED_BITS, spec.embed_group(cfg.hidden_size),
                                 "rtn", self.dtype)
        if len(self._shapes[name]) == 2:
            return fake_quantize(np.asarray(w, dtype=np.float32), spec.bits, spec.group_size, spec.method, self.dtype)
        return w

    def release(self) -> None:
        rel = getattr(self.weights, "release", None)
        if rel is not None:
            rel()

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)


def fake_quantize_model(model, spec: QuantSpec, dtype: str = "float32"):
    """A float32 copy of a kvtrace Transformer whose weights are what the artifact's quantised
    tensors stand for (the quantisation-aware parity reference). A tied model gets an untied
    lm_head holding the head's own quantisation."""
    import copy

    import torch

    ref = copy.deepcopy(model).float().eval()
    params = dict(ref.named_parameters())
    weights = {n: p.detach().numpy() for n, p in params.items()}
    fq = fake_quantize_weights(ref.cfg, weights, spec, dtype)
    with torch.no_grad():
        for name, arr in fq.items():
            if name == "lm_head.weight" and ref.lm_head is None:
                ref.lm_head = torch.nn.Linear(ref.cfg.hidden_size, ref.cfg.vocab_size, bias=False)
                ref.lm_head.weight = torch.nn.Parameter(torch.from_numpy(arr), requires_grad=False)
            else:
                params[name].copy_(torch.from_numpy(arr))
    return ref


def describe(spec_or_entry) -> str:
    """'int4 g32 search' for messages and reports."""
    d = spec_or_entry if isinstance(spec_or_entry, dict) else {
        "scheme": spec_or_entry.scheme, "group_size": spec_or_entry.group_size, "method": spec_or_entry.method}
    return f"{d['scheme']} g{d['group_size']} {d['method']}"
