"""The quantisation maths (exporter/quantize.py) against plain references written here from the
scheme's definition (docs/quantization.md), and the stored form against ONNX's own packing and
DequantizeLinear semantics (onnx.reference, not onnxruntime)."""
from __future__ import annotations

import numpy as np
import pytest

from kvtrace.exporter import quantize as qz


def _ref_group(w: np.ndarray, bits: int, divisors: list[float], scale_dtype=np.float32):
    """One group, one output channel, by the definition: for each candidate divisor c (in order)
    s = max|w| / c rounded to the stored dtype, q = clip(round-half-even(w / s)); keep the first
    candidate with the smallest sum (q s - w)^2."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = float(np.max(np.abs(w)))
    best = None
    for c in divisors:
        s = np.float32(np.float32(amax) / np.float32(c))
        s = np.float32(scale_dtype(s)) if scale_dtype is not np.float32 else s
        if not s > 0:
            s = np.float32(1.0)
        q = np.clip(np.rint(w.astype(np.float32) / s), qmin, qmax)
        err = float(np.sum((q * s - w.astype(np.float32)) ** 2, dtype=np.float32))
        if best is None or err < best[0]:
            best = (err, q.astype(np.int8), s)
    return best[1], best[2]


def _reference(w: np.ndarray, bits: int, group: int, divisors: list[float], scale_dtype=np.float32):
    R, K = w.shape
    nb = -(-K // group)
    q = np.zeros((R, K), np.int8)
    s = np.zeros((R, nb), np.float32)
    for r in range(R):
        for b in range(nb):
            sl = slice(b * group, min(K, (b + 1) * group))
            q[r, sl], s[r, b] = _ref_group(w[r, sl], bits, divisors, scale_dtype)
    return q, s


# the scheme's candidate divisors, restated from docs/quantization.md
RTN = {8: [127.0], 4: [7.0]}
SEARCH = {4: [7.0] + sorted(set([7.0 / r for r in np.linspace(1.0, 0.7, 13)] + [8.0]) - {7.0}),
          8: [127.0] + sorted(set([127.0 / r for r in np.linspace(1.0, 0.9, 6)] + [128.0]) - {127.0})}


def _weights(R=6, K=80, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((R, K)) * 0.05).astype(np.float32)
    w[1, 3] = 0.9  # an outlier (positive extreme)
    w[2, K // 2] = -0.7  # a negative extreme
    w[3, :16] = 0.0  # an all-zero group
    return w


@pytest.mark.parametrize("bits,method", [(8, "rtn"), (4, "rtn"), (4, "search"), (8, "search")])
@pytest.mark.parametrize("group", [16, 32])
def test_quantize_matches_the_definition(bits, method, group):
    w = _weights()  # K = 80: with group 32 the last group is 16 wide (ragged)
    q, s = qz.quantize(w, bits, group, method)
    divs = (RTN if method == "rtn" else SEARCH)[bits]
    rq, rs = _reference(w, bits, group, divs)
    assert q.dtype == np.int8 and s.dtype == np.float32
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(q, rq)
    assert (s > 0).all()  # TensorRT refuses non-positive scales
    lo, hi = qz.qrange(bits)
    assert q.min() >= lo and q.max() <= hi


def test_search_never_worse_and_measurably_better_than_rtn():
    w = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32) * 0.02
    e = {}
    for m in ("rtn", "search"):
        r = qz.fake_quantize(w, 4, 32, m)
        e[m] = ((r - w) ** 2).reshape(256, 16, 32).sum(-1)  # per group
    assert (e["search"] <= e["rtn"] + 1e-12).all()
    assert e["search"].sum() < 0.9 * e["rtn"].sum()  # ~20% lower squared error on Gaussian weights


def test_rtn_error_bound_and_chunking():
    w = _weights(R=300, K=64, seed=3)
    q, s = qz.quantize(w, 8, 16, "rtn")
    r = qz.dequantize(q, s, 16)
    bound = np.repeat(s, 16, axis=1) / 2 * (1 + 1e-6)
    assert (np.abs(r - w) <= bound).all()
    # rows are independent: a chunk size of 7 rows gives the same result
    old = qz.CHUNK_ELEMS
    try:
        qz.CHUNK_ELEMS = 7 * 64
        q2, s2 = qz.quantize(w, 8, 16, "rtn")
    finally:
        qz.CHUNK_ELEMS = old
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(s, s2)


def test_fp16_scales_are_stored_values():
    w = _weights()
    q, s = qz.quantize(w, 4, 16, "search", "float16")
    np.testing.assert_array_equal(s.astype(np.float16).astype(np.float32), s)  # exactly representable
    rq, rs = _reference(w, 4, 16, SEARCH[4], np.float16)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(q, rq)


def test_int4_packing_matches_onnx():
    import ml_dtypes
    from onnx import numpy_helper

    vals = np.array([[-8, 7, 0, -1, 3], [1, -2, 5, -7, 6]], dtype=np.int8)  # odd count per row, 10 in all
    t = numpy_helper.from_array(vals.astype(ml_dtypes.int4), "w")
    packed = qz.pack_int4(vals)
    assert packed.tobytes() == t.raw_data
    np.testing.assert_array_equal(qz.unpack_int4(packed, vals.size).reshape(vals.shape), vals)
    odd = np.array([1, -8, 7], np.int8)
    assert qz.pack_int4(odd).tobytes() == numpy_helper.from_array(odd.astype(ml_dtypes.int4), "o").raw_data


@pytest.mark.parametrize("bits", [4, 8])
def test_stored_form_dequantizes_as_onnx_defines(bits):
    """q (K, N) + scale (ceil(K/g), N) with DequantizeLinear(axis 0, block_size g) -> MatMul, evaluated
    by onnx's reference implementation, equals x @ dequantize(...).T (ragged last block included)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    w = _weights(R=24, K=40)  # torch layout (N=24, K=40), group 16: blocks of 16, 16, 8
    q, s = qz.quantize(w, bits, 16, "search")
    qt, st = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)  # (K, N), (3, N)
    if bits == 4:
        qi = TensorProto()
        qi.name, qi.data_type = "q", TensorProto.INT4
        qi.dims.extend(qt.shape)
        qi.raw_data = qz.pack_int4(qt).tobytes()
    else:
        qi = numpy_helper.from_array(qt, "q")
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["wd"], axis=0, block_size=16),
         helper.make_node("MatMul", ["x", "wd"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 24])],
        initializer=[qi, numpy_helper.from_array(st, "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    x = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    y = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ qz.dequantize(q, s, 16).T, rtol=1e-5, atol=1e-6)


def test_spec_checks_name_the_option():
    from kvtrace import configs
    from kvtrace.errors import KvtraceError

    cfg = configs.BUILTIN["gpt_neox"]  # hidden 64, intermediate 256
    for kw, words in ((dict(scheme="int3"), "--quant"), (dict(scheme="int4", group_size=24), "power of two"),
                      (dict(scheme="int4", group_size=8), "power of two"),
                      (dict(scheme="int4", group_size=128), "larger than the input dimension 64"),
                      (dict(scheme="int4", opset=17), "--opset 17"), (dict(scheme="int8", dtype="bfloat16"), "--bf16"),
                      (dict(scheme="int4", method="gptq"), "--quant-method"),
                      (dict(scheme="int4", accuracy_level=0), "--accuracy-level")):
        scheme = kw.pop("scheme")
        with pytest.raises(KvtraceError, match=words):
            qz.QuantSpec.make(cfg, scheme, **kw)
    spec = qz.QuantSpec.make(cfg, "int4")
    assert (spec.group_size, spec.method, spec.accuracy_level) == (32, "search", 4)
    assert qz.QuantSpec.make(cfg, "int8").group_size == 64  # the default 128, capped by hidden_size 64
