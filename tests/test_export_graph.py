"""The exported graph's structure: the fused operators TensorRT and onnxruntime recognise,
weights stored once and in the export dtype, the portable opset-17 form, fp16 softmax
precision (GPT-NeoX/XGLM overflow fp16 attention scores otherwise)."""
from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import onnx
import onnx.reference
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace import configs  # noqa: E402
from kvtrace.exporter import onnx_graph, validate  # noqa: E402
from tests import helpers  # noqa: E402
from kvtrace.exporter.export import export_model  # noqa: E402
from kvtrace.models.transformer import random_model  # noqa: E402
from kvtrace import io_spec  # noqa: E402

ARCHS = list(configs.BUILTIN)
MAX_SEQ = 48


def _weights(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


_MODELS = {}


def _builtin(arch):
    if arch not in _MODELS:
        _MODELS[arch] = random_model(configs.BUILTIN[arch], configs.BUILTIN_SEED)
    return _MODELS[arch]


def _graph(arch, dtype="float32", layout="static", opset=24):
    m = _builtin(arch)
    return onnx_graph.build_graph(m.cfg, _weights(m), dtype=dtype, layout=layout, max_seq=MAX_SEQ, opset=opset)


@pytest.mark.parametrize("layout", ["static", "dynamic"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_operators(arch, layout):
    cfg = configs.BUILTIN[arch]
    g = _graph(arch, "float16", layout)
    ops = Counter(n.op_type for n in g.graph.node)
    L = cfg.n_layers
    assert ops["Attention"] == L
    assert ops["Softmax"] == 0
    assert ops["RotaryEmbedding"] == (2 * L if cfg.positions == "rope" else 0)
    assert ops["TensorScatter"] == (2 * L if layout == "static" else 0)
    assert ops["Expand"] == ops["Tile"] == 0  # GQA stays GQA: no repetition of K/V heads
    graph_inputs = {i.name for i in g.graph.input}
    graph_outputs = {o.name for o in g.graph.output}
    producer = {o: n for n in g.graph.node for o in n.output}
    consumers = Counter(i for n in g.graph.node for i in n.input)
    for n in g.graph.node:
        if n.op_type == "Attention":
            # the form TensorRT accepts: 4 inputs (Q, K, V, bool mask), one output, no softcap
            assert len(n.input) == 4 and len(n.output) == 1
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert "softcap" not in attrs and "is_causal" not in attrs
            assert math.isclose(attrs["scale"], 1 / math.sqrt(cfg.head_dim), rel_tol=1e-6)
            # no softmax_precision: the TensorRT parser rejects it and onnxruntime's CPU kernel ignores it
            assert "softmax_precision" not in attrs
            # fp16 CPU form: attention in fp32 (Q, K, V cast up, the output cast back to fp16)
            casts = [producer[t] for t in n.input[:3]]
            assert all(c.op_type == "Cast" and c.attribute[0].i == onnx.TensorProto.FLOAT for c in casts)
            after = [m for m in g.graph.node if n.output[0] in m.input]
            assert len(after) == 1 and consumers[n.output[0]] == 1
            assert after[0].op_type == "Cast" and after[0].attribute[0].i == onnx.TensorProto.FLOAT16
            if layout == "dynamic":  # K/V = the whole cache
                assert casts[1].input[0] in graph_outputs and casts[2].input[0] in graph_outputs
            # static: K/V = Slice of the cache in use (test_static_attention_reads_used_slots)
        if n.op_type == "TensorScatter":
            # TensorRT: input 0 must be the cache graph input, the output a graph output
            assert n.input[0] in graph_inputs and n.output[0] in graph_outputs
        if n.op_type == "RotaryEmbedding":
            assert n.input[3] == io_spec.POSITION_IDS
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["rotary_embedding_dim"] == cfg.rotary_dim
    assert g.ir_version == 10  # loads in onnxruntime 1.31 and TensorRT; onnx 1.23's newest does not
    onnx.checker.check_model(g)
    onnx.shape_inference.infer_shapes(g, strict_mode=True)
    # the I/O contract, names and dtypes
    spec = io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                         vocab_size=cfg.vocab_size, dtype="float16", layout=layout, max_seq=MAX_SEQ, max_batch=1)
    assert [i.name for i in g.graph.input] == [t["name"] for t in spec["inputs"]]
    assert [o.name for o in g.graph.output] == [t["name"] for t in spec["outputs"]]
    assert g.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # logits fp32


@pytest.mark.parametrize("arch", ARCHS)
def test_static_attention_reads_used_slots(arch):
    """Static cache: each Attention's K/V are Slice(present.*, [0:L] on axis 2) with
    L = min(max(position_ids) + 1, S_max) (not the whole (B, n_kv, S_max, hd) cache, whose
    cost onnxruntime pays in full however much is masked), the TensorScatter output stays the
    graph output, and the mask has L columns; checked on the graph and at run time."""
    cfg = configs.BUILTIN[arch]
    g = _graph(arch, "float32", "static")
    producer = {o: n for n in g.graph.node for o in n.output}
    graph_inputs = {i.name for i in g.graph.input}
    graph_outputs = {o.name for o in g.graph.output}
    attn = [n for n in g.graph.node if n.op_type == "Attention"]
    assert len(attn) == cfg.n_layers
    ends = set()
    for i, n in enumerate(attn):
        for kv, (past, present) in zip(n.input[1:3], [(io_spec.past_key(i), io_spec.present_key(i)),
                                                      (io_spec.past_value(i), io_spec.present_value(i))]):
            sl = producer[kv]
            assert sl.op_type == "Slice" and sl.input[0] == present
            assert present in graph_outputs and kv not in graph_outputs
            ts = producer[present]
            assert ts.op_type == "TensorScatter" and ts.input[0] == past and past in graph_inputs
            axes = onnx.numpy_helper.to_array(next(t for t in g.graph.initializer if t.name == sl.input[3]))
            starts = onnx.numpy_helper.to_array(next(t for t in g.graph.initializer if t.name == sl.input[1]))
            assert axes.tolist() == [2] and starts.tolist() == [0]
            ends.add(sl.input[2])
    assert len(ends) == 1  # L computed once per call, shared by every layer
    # ... from the graph input position_ids (Unsqueeze <- Min <- Add <- ReduceMax(position_ids))
    seen, todo = set(), list(ends)
    while todo:
        t = todo.pop()
        if t in producer and t not in seen:
            seen.add(t)
            todo.extend(producer[t].input)
    assert any(producer[t].op_type == "ReduceMax" and producer[t].input[0] == io_spec.POSITION_IDS for t in seen)

    # at run time: K/V and mask have L = max(position_ids) + 1 slots, present keeps S_max
    import onnxruntime as ort

    extra = [attn[0].input[1], attn[0].input[3]]
    g.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in extra)
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    B, T = 2, 3
    pos = np.array([[9, 10, 11], [4, 5, 6]], dtype=np.int64)  # ragged rows: L = 12
    feeds = {io_spec.INPUT_IDS: np.ones((B, T), np.int64), io_spec.POSITION_IDS: pos,
             io_spec.LOGITS_INDEX: np.zeros((B, 1), np.int64)}
    for i in range(cfg.n_layers):
        for name in (io_spec.past_key(i), io_spec.past_value(i)):
            feeds[name] = np.zeros((B, cfg.n_kv_heads, MAX_SEQ, cfg.head_dim), np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert outs[extra[0]].shape == (B, cfg.n_kv_heads, 12, cfg.head_dim)
    assert outs[extra[1]].shape == (B, 1, T, 12)
    assert outs[io_spec.present_key(0)].shape == (B, cfg.n_kv_heads, MAX_SEQ, cfg.head_dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_max_seq_512_matches_reference(arch, tmp_path):
    """A static graph with S_max = 512 far above the tokens in use (and past the sliding window
    of 64 for starcoder2): attending over the used slots only gives the reference's logits."""
    m = _builtin(arch)
    res = helpers.export_and_compare(m, tmp_path, dtype="float32", layout="static", max_seq=512,
                                     prompts=helpers.prompts(m.cfg, [70, 23]), steps=8)
    print(f"{arch} static max_seq 512: {res.summary()}")
    assert res.finite and res.max_abs <= 1e-4 and res.top1 == 1.0


def test_fp32_attention_is_not_cast():
    g = _graph("llama", "float32")
    producer = {o: n for n in g.graph.node for o in n.output}
    attn = [n for n in g.graph.node if n.op_type == "Attention"]
    assert len(attn) == configs.BUILTIN["llama"].n_layers
    assert all("softmax_precision" not in {a.name for a in n.attribute} for n in attn)
    assert not any(producer[t].op_type == "Cast" for n in attn for t in n.input[:3])  # fp32 already


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_weights_stored_in_export_dtype(arch, dtype):
    g = _graph(arch, dtype)
    want = onnx_graph.ONNX_DTYPE[dtype]
    big = [t for t in g.graph.initializer if math.prod(t.dims) >= configs.BUILTIN[arch].hidden_size]
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    wrong = [t.name for t in big if t.data_type in float_types and t.data_type != want]
    assert not wrong, f"weights not stored as {dtype}: {wrong}"
    names = {t.name for t in g.graph.initializer}
    assert "embed.weight" in names and "layers.0.attn.qkv.weight" in names


@pytest.mark.parametrize("arch", ARCHS)
def test_file_size_is_parameter_bytes(arch, tmp_path):
    """Weights are written once, for both graph forms: model.onnx.data is within 1% of the
    parameter bytes plus the rotary tables (derived buffers, not parameters; plus the 64-byte
    alignment), a duplicated tied head would add V*D*2 bytes; the two graph files hold no weights.
    Width 256 so that the graph's own few kB (nodes, names) are small against the weights."""
    cfg = configs.BUILTIN[arch].replace(hidden_size=256, head_dim=64, intermediate_size=512)
    m = random_model(cfg, 3)
    out = export_model(m, tmp_path / "a", dtype="float16", layout="static", max_seq=MAX_SEQ, validate=False,
                       log=lambda s: None)
    size = (out / "model.onnx.data").stat().st_size
    tables = 2 * MAX_SEQ * (cfg.rotary_dim // 2) * 2 if cfg.positions == "rope" else 0
    expect = cfg.n_params() * 2 + tables
    graphs = [(out / n).stat().st_size for n in (io_spec.ONNX_NAME, "model.gpu.onnx")]
    print(f"{arch}: weights {size} bytes, parameters {cfg.n_params() * 2} + tables {tables}; graphs {graphs}")
    assert abs(size - expect) <= 0.01 * cfg.n_params() * 2
    assert max(graphs) < 0.01 * cfg.n_params() * 2
    if cfg.tie_word_embeddings:
        head_sized = [t for t in onnx.load(out / io_spec.ONNX_NAME).graph.initializer
                      if tuple(t.dims) in ((cfg.vocab_size, cfg.hidden_size), (cfg.hidden_size, cfg.vocab_size))]
        assert len(head_sized) == 1


def test_streamed_file_equals_protobuf_serialization(tmp_path):
    """The hand-written protobuf stream (embedded weights: the bf16 validation twin uses it)
    parses to the same model as onnx's own serialization; so does the external-data file."""
    from kvtrace.exporter.export import write_onnx

    m = _builtin("starcoder2")
    graph, inits, _ = onnx_graph.build(m.cfg, _weights(m), dtype="float32", layout="static", max_seq=MAX_SEQ)
    write_onnx(graph, inits, tmp_path / io_spec.ONNX_NAME, external=False)
    out = export_model(m, tmp_path / "a", dtype="float32", layout="static", max_seq=MAX_SEQ, validate=False,
                       log=lambda s: None)
    for f in (tmp_path / io_spec.ONNX_NAME, out / io_spec.ONNX_NAME):
        onnx.checker.check_model(str(f), full_check=True)
        loaded = onnx.load(f)
        ref = _graph("starcoder2", "float32")
        assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == \
            {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in ref.graph.initializer}
        del loaded.graph.initializer[:]
        del ref.graph.initializer[:]
        assert loaded.SerializeToString() == ref.SerializeToString()  # everything but the weights


def test_external_data(tmp_path):
    """Weights always go to model.onnx.data (shared by both graph forms); the validation runs on it."""
    m = _builtin("gpt_neox")
    out = export_model(m, tmp_path / "a", dtype="float32", layout="static", max_seq=MAX_SEQ, log=lambda s: None)
    assert (out / "model.onnx.data").stat().st_size >= m.cfg.n_params() * 4
    assert (out / "model.onnx").stat().st_size < 100_000
    onnx.checker.check_model(str(out / "model.onnx"))
    from kvtrace.manifest import load_manifest

    assert load_manifest(out)["external_data"] == "model.onnx.data"


@pytest.mark.parametrize("arch", ARCHS)
def test_portable_opset17_matches(arch, tmp_path):
    m = _builtin(arch)
    g = _graph(arch, "float32", "dynamic", opset=17)
    ops = Counter(n.op_type for n in g.graph.node)
    assert ops["Attention"] == ops["RotaryEmbedding"] == ops["TensorScatter"] == 0
    assert ops["Softmax"] == m.cfg.n_layers
    # standard ONNX throughout (the linear layers MatMul of a Transpose): any runtime takes it
    assert [(o.domain, o.version) for o in g.opset_import] == [("", 17)] and g.ir_version == 8
    assert ops["FusedMatMul"] == 0 and {n.domain for n in g.graph.node} == {""}
    onnx.reference.ReferenceEvaluator(g)  # ONNX's own evaluator knows every node
    res = helpers.export_and_compare(m, tmp_path, dtype="float32", layout="dynamic", max_seq=MAX_SEQ, opset=17,
                                     prompts=helpers.prompts(m.cfg, [12, 7]), steps=16)
    print(f"{arch} opset 17: {res.summary()}")
    assert res.max_abs <= 1e-4


def test_portable_opset17_fp16_runs(tmp_path):
    m = _builtin("gpt_neox")
    res = helpers.export_and_compare(m, tmp_path, dtype="float16", layout="dynamic", max_seq=MAX_SEQ, opset=17,
                                     prompts=helpers.prompts(m.cfg), steps=4)
    assert res.finite and res.top1 >= 0.99 and res.max_abs <= 0.25, res.summary()


@pytest.mark.parametrize("arch", ["gpt_neox", "xglm"])
def test_fp16_attention_scores_beyond_fp16_range_stay_finite(arch, tmp_path):
    """Scale the Q/K projections so that the attention scores *after* the 1/sqrt(head_dim) scale
    exceed fp16's 65504 (GPT-NeoX and XGLM checkpoints get there): model.onnx (attention in fp32
    for onnxruntime's CPU kernel) must give finite logits with the fp32 reference's top-1.
    The GPU form of the same artifact (fp16 Attention, what TensorRT builds from) is run on the
    CPU too: onnxruntime's fp16 Attention overflows there, which shows that the check can fail."""
    m = random_model(configs.BUILTIN[arch], 7)
    cfg = m.cfg
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.q.weight.mul_(1500)
            layer.attn.k.weight.mul_(1500)
        x = m.layers[0].norm1(m.embed(torch.arange(12)[None]))
        q = m.layers[0].attn.q(x).view(12, cfg.n_heads, cfg.head_dim)
        k = m.layers[0].attn.k(x).view(12, cfg.n_kv_heads, cfg.head_dim)
        scaled = torch.einsum("thd,shd->hts", q, k).abs().max() / math.sqrt(cfg.head_dim)
    print(f"{arch}: largest scaled score {float(scaled):.0f}")
    assert scaled > 2 * 65504  # the test provokes the overflow
    art = helpers.export(m, tmp_path / "a", dtype="float16", layout="static", max_seq=MAX_SEQ)
    ps = helpers.prompts(cfg, [12, 7])
    res = helpers.replay_against(art, m, prompts=ps, steps=4, graph="cpu")
    print(f"{arch} fp16 model.onnx with huge scores: {res.summary()}")
    assert res.finite
    assert res.top1 >= 0.99
    native = helpers.replay_against(art, m, prompts=ps, steps=4, graph="gpu")
    print(f"{arch} fp16 model.gpu.onnx on onnxruntime CPU: {native.summary()}")
    assert not native.finite


@pytest.mark.parametrize("rope", [
    ("linear", {"factor": 2.0}),
    ("dynamic", {"factor": 2.0}),  # NTK only changes the base past max_position, which no export reaches
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16}),  # also scales cos/sin (attention factor)
])
def test_rope_scaling_types_match(rope, tmp_path):
    rope_type, params = rope
    cfg = configs.BUILTIN["llama"].replace(rope_type=rope_type, rope_params=params, max_position=MAX_SEQ)
    m = random_model(cfg, 5)
    res = helpers.export_and_compare(m, tmp_path, dtype="float32", layout="static", max_seq=MAX_SEQ,
                                     prompts=helpers.prompts(cfg, [20, 13]), steps=16)
    print(f"rope {rope_type}: {res.summary()}")
    assert res.max_abs <= 1e-4


def test_bf16_graph_checks():
    g = _graph("llama", "bfloat16", "static")
    onnx.checker.check_model(g)
    onnx.shape_inference.infer_shapes(g, strict_mode=True)
    emb = next(t for t in g.graph.initializer if t.name == "embed.weight")
    ref = _builtin("llama").embed.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    assert np.frombuffer(emb.raw_data, dtype=np.int16).reshape(ref.shape).tolist() == ref.tolist()  # RNE like torch


def test_builtin_bf16_export_validates(tmp_path):
    m = _builtin("gpt_neox")
    out = export_model(m, tmp_path / "a", dtype="bfloat16", layout="static", max_seq=MAX_SEQ, log=lambda s: None)
    from kvtrace.manifest import load_manifest

    v = load_manifest(out)["validation"]
    assert "twin" in v["method"] and v["max_abs"] <= configs.TOLERANCES["bfloat16"]["max_abs"]


@pytest.mark.parametrize("form", [("float32", "static", 24), ("float16", "static", 24),
                                  ("float32", "dynamic", 24), ("float32", "dynamic", 17)])
def test_logits_index_selects_rows(form):
    """logits_index (B, K) returns exactly the requested positions of each row: the same numbers
    as the all-positions call at those indices, in the order asked (repeats allowed)."""
    dtype, layout, opset = form
    arch = "gpt_neox"
    cfg = configs.BUILTIN[arch]
    import onnxruntime as ort

    sess = ort.InferenceSession(_graph(arch, dtype, layout, opset).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    B, T = 2, 7
    rng = np.random.default_rng(3)
    ids = rng.integers(2, cfg.vocab_size, size=(B, T), dtype=np.int64)
    pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))
    npdt = np.float16 if dtype == "float16" else np.float32
    S = MAX_SEQ if layout == "static" else 0

    def run(sel):
        feeds = {io_spec.INPUT_IDS: ids, io_spec.POSITION_IDS: pos, io_spec.LOGITS_INDEX: sel}
        if layout == "dynamic":
            feeds[io_spec.ATTENTION_MASK] = np.ones((B, T), np.int64)
        for src, _ in io_spec.cache_pairs(cfg.n_layers):
            feeds[src] = np.zeros((B, cfg.n_kv_heads, S, cfg.head_dim), npdt)
        return sess.run([io_spec.LOGITS], feeds)[0]

    full = run(pos)  # (B, T, V)
    assert full.shape == (B, T, cfg.vocab_size) and full.dtype == np.float32
    sel = np.array([[6, 0, 3], [2, 2, 5]], dtype=np.int64)  # (B, K=3): per row, any order
    got = run(sel)
    assert got.shape == (B, 3, cfg.vocab_size)
    want = full[np.arange(B)[:, None], sel]  # (B, 3, V)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if dtype == "float32" else 2e-2)
    last = run(np.array([[6], [4]], dtype=np.int64))  # (B, 1): a generation prefill
    np.testing.assert_allclose(last[:, 0], full[[0, 1], [6, 4]], rtol=0, atol=1e-5 if dtype == "float32" else 2e-2)
    # one GatherND (before the final norm and the lm_head), fed by logits_index
    g = _graph(arch, dtype, layout, opset)
    gather = [n for n in g.graph.node if n.op_type == "GatherND"]
    assert len(gather) == 1 and io_spec.LOGITS_INDEX in {i for n in g.graph.node for i in n.input}


# ------------------------------------------------------------------------- weight layout
@pytest.mark.parametrize("arch", ARCHS)
def test_linear_weights_stored_as_the_checkpoint_stores_them(arch):
    """Every linear weight is an (out, in) initializer read by model.onnx's FusedMatMul(transB=1)
    and by the GPU form's MatMul through a Transpose of it: the same initializer, the same bytes
    as the parameter (Q, K, V stacked on rows), and the GPU form is standard ONNX alone."""
    m = _builtin(arch)
    cfg, w = m.cfg, _weights(m)
    cpu = onnx_graph.build_graph(cfg, w, dtype="float32", layout="static", max_seq=MAX_SEQ)
    gpu = onnx_graph.build_graph(cfg, w, dtype="float32", layout="static", max_seq=MAX_SEQ, linear="standard",
                                 attend="full", attention_precision="native")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in cpu.graph.initializer}
    fused = [n for n in cpu.graph.node if n.op_type == "FusedMatMul"]
    assert fused and all(n.domain == "com.microsoft" and
                         [(a.name, a.i) for a in n.attribute] == [("transB", 1)] for n in fused)
    assert not [n for n in cpu.graph.node if n.op_type == "MatMul"]  # no projection left unfused
    read = {n.input[1] for n in fused}
    p = "layers.0.attn."
    np.testing.assert_array_equal(inits[p + "qkv.weight"], np.concatenate([w[p + x + ".weight"] for x in "qkv"]))
    for name in read - {p + "qkv.weight"} - {n for n in read if n.endswith("qkv.weight")}:
        np.testing.assert_array_equal(inits[name], w[name])  # (out, in) as stored
    head = "embed.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    assert head in read
    assert {o.domain for o in gpu.opset_import} == {""} and {n.domain for n in gpu.graph.node} <= {""}
    producer = {o: n for n in gpu.graph.node for o in n.output}
    gpu_read = {producer[n.input[1]].input[0] for n in gpu.graph.node
                if n.op_type == "MatMul" and n.input[1] in producer and producer[n.input[1]].op_type == "Transpose"}
    assert gpu_read == read


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_standard_twin_computes_the_same(arch, tmp_path):
    """standard_twin (what ONNX's checker and shape inference are given) is the same graph:
    onnxruntime gives the same logits for model.onnx and its twin, and strict shape inference
    types every value of the twin. A twin that transposed nothing would fail here."""
    import onnxruntime as ort

    m = _builtin(arch)
    cpu = onnx_graph.build_graph(m.cfg, _weights(m), dtype="float32", layout="dynamic", max_seq=MAX_SEQ)
    twin = onnx_graph.standard_twin(cpu)
    assert not [n for n in twin.graph.node if n.domain] and "FusedMatMul" not in {n.op_type for n in twin.graph.node}
    onnx.shape_inference.infer_shapes(twin, strict_mode=True)
    cfg, B, T = m.cfg, 2, 5
    feeds = {io_spec.INPUT_IDS: np.arange(B * T, dtype=np.int64).reshape(B, T) % cfg.vocab_size,
             io_spec.POSITION_IDS: np.tile(np.arange(T, dtype=np.int64), (B, 1)),
             io_spec.LOGITS_INDEX: np.tile(np.arange(T, dtype=np.int64), (B, 1)),
             io_spec.ATTENTION_MASK: np.ones((B, T), dtype=np.int64)}
    for i in range(cfg.n_layers):
        for kind in (io_spec.past_key(i), io_spec.past_value(i)):
            feeds[kind] = np.zeros((B, cfg.n_kv_heads, 0, cfg.head_dim), dtype=np.float32)
    outs = [ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [io_spec.LOGITS], feeds)[0] for g in (cpu, twin)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    broken = onnx.ModelProto()
    broken.CopyFrom(twin)
    square = [n for n in broken.graph.node if n.op_type == "Transpose" and n.input[0] == "layers.0.attn.o.weight"]
    assert len(square) == 1  # (D, D): the twin still runs with it not transposed, and must differ
    square[0].op_type = "Identity"
    del square[0].attribute[:]
    got = ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [io_spec.LOGITS], feeds)[0]
    assert np.abs(outs[0] - got).max() > 1e-3


def test_a_dropped_transpose_fails_the_export(tmp_path, monkeypatch):
    """The GPU form's linear layers are checked against model.onnx's at export: a MatMul that
    reads a square (D, D) weight untransposed passes ONNX's shape inference; the export fails
    naming it, leaving nothing behind."""
    from kvtrace.errors import KvtraceError

    real = onnx_graph.ModelGraph.matmul_t

    def dropped(self, x, w, hint, out=None):
        if self.linear_form == "standard" and w == "layers.0.attn.o.weight":
            return self.g.op("MatMul", [x, w], hint=hint, out=out)
        return real(self, x, w, hint, out)

    monkeypatch.setattr(onnx_graph.ModelGraph, "matmul_t", dropped)
    with pytest.raises(KvtraceError, match=r"model.gpu.onnx: weight 'layers.0.attn.o.weight' meets its product as "
                                           r"fused in model.onnx and as direct in the GPU form"):
        export_model(_builtin("llama"), tmp_path / "a", max_seq=MAX_SEQ, log=lambda s: None)
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
