"""`kvtrace export --via trace` against the built graph (the default export).

One tiny transformers variant per architecture (loaded by the real checkpoint loader), both
cache layouts. The traced and the built artifact are driven by the runtime (Model.start on a
ragged batch, then greedy Model.step decode steps): the logits must agree (fp32, <= 1e-5), the
greedy tokens must be the same, the graphs must have the same I/O and the same fused nodes
(one Attention per layer, two TensorScatter per layer in the static layout, two RotaryEmbedding
per layer for rope architectures, with the builder's attributes), and TensorRT-RTX must parse
the traced static graph into the same fused layers. Each check is shown to fail on a broken
input (a perturbed weight, an unfused graph). Node counts of both graphs are printed.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if importlib.util.find_spec("onnxscript") is None:
    print("test_trace_export: skipped, onnxscript is not installed (pip install 'kvtrace[trace]')")
    pytest.skip("onnxscript is not installed (pip install 'kvtrace[trace]'): torch.onnx needs it",
                allow_module_level=True)
from tests import tiny_hf  # noqa: E402
pytest.importorskip("transformers", reason="transformers builds the tiny reference checkpoints")

import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from kvtrace import cli, io_spec  # noqa: E402
from kvtrace.errors import KvtraceError  # noqa: E402
from kvtrace.exporter.export import export_model  # noqa: E402
from kvtrace.exporter.trace_export import FUSED_OPS, node_counts  # noqa: E402
from kvtrace.manifest import load_manifest  # noqa: E402
from kvtrace.runtime.model import Model  # noqa: E402

MAX_SEQ = 64
VARIANTS = {  # one per architecture, covering what differs between them
    "gpt_neox": "neox_parallel_r025",  # partial rotary (1/4), parallel residual, LayerNorm, GELU
    "llama": "llama_gqa_linear_tied",  # GQA 4:2, linear rope scaling, tied head, RMSNorm, SwiGLU
    "starcoder2": "starcoder2_gqa_window_bias",  # sliding window 8, biases, GQA
    "xglm": "xglm_scaled",  # sinusoidal positions, embedding scale
}
PROMPTS = [[5, 17, 99, 3, 42, 7, 64, 11, 23, 90, 31, 8], [1, 2, 3], [100, 50, 25, 12, 6, 77, 9]]  # ragged
STEPS = 10  # > starcoder2's window of 8 beyond the longest prompt
TOL_FP32 = 1e-5


@functools.lru_cache(maxsize=None)
def _loaded(variant: str):
    from kvtrace.models.checkpoint import load_checkpoint

    return load_checkpoint(tiny_hf.checkpoint(variant))


_ARTS: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """artifacts(variant, layout, via) -> artifact dir (fp32, no validation: the tests compare)."""
    root = tmp_path_factory.mktemp("trace-arts")

    def get(variant: str, layout: str, via: str) -> Path:
        key = (variant, layout, via)
        if key not in _ARTS:
            ld = _loaded(variant)
            _ARTS[key] = export_model(ld.model, root / "-".join(key), layout=layout, max_seq=MAX_SEQ, max_batch=4,
                                      validate=False, via=via, log=lambda m: None,
                                      source={"kind": "checkpoint", "path": str(tiny_hf.checkpoint(variant)),
                                              "sha256": ld.digest})
        return _ARTS[key]

    return get


# ----------------------------------------------------------------------------- the checks
def run_greedy(art: Path, prompts=PROMPTS, steps: int = STEPS):
    """Prefill (every position's logits) then greedy decode through the runtime: ([logits per
    call], tokens (B, steps))."""
    m = Model.load(art, backend="onnxruntime")
    first = m.start(prompts)  # (B, T_max, V)
    lens = np.array([len(p) for p in prompts])
    outs = [np.where((np.arange(first.shape[1]) < lens[:, None])[..., None], first, 0.0)]  # padding zeroed
    tok = first[np.arange(len(prompts)), lens - 1].argmax(-1)  # (B,)
    tokens = [tok]
    for _ in range(steps - 1):
        logits = m.step(tok)  # (B, V)
        outs.append(logits)
        tok = logits.argmax(-1)
        tokens.append(tok)
    m.close()
    return outs, np.stack(tokens, axis=1)


def assert_same_outputs(built: Path, traced: Path, tol: float = TOL_FP32) -> float:
    """Same greedy tokens and logits within `tol` over the prefill and every decode step."""
    a_logits, a_tok = run_greedy(built)
    b_logits, b_tok = run_greedy(traced)
    assert np.array_equal(a_tok, b_tok), f"greedy tokens differ:\nbuilt  {a_tok.tolist()}\ntraced {b_tok.tolist()}"
    worst = max(float(np.abs(a - b).max()) for a, b in zip(a_logits, b_logits))
    assert worst <= tol, f"max |Δlogit| traced vs built {worst:.3g} > {tol}"
    return worst


def fused_signature(model: onnx.ModelProto) -> list:
    """The fused nodes as (op, n_inputs, n_outputs, attributes), sorted: what TensorRT keys on."""
    sig = []
    for n in model.graph.node:
        if n.op_type in FUSED_OPS:
            attrs = tuple(sorted((a.name, repr(helper.get_attribute_value(a))) for a in n.attribute))
            sig.append((n.op_type, len(n.input), len(n.output), attrs))
    return sorted(sig)


def assert_fused_ops(model: onnx.ModelProto, cfg, layout: str) -> None:
    c = node_counts(model)
    L = cfg.n_layers
    assert c.get("Attention", 0) == L, c
    assert c.get("TensorScatter", 0) == (2 * L if layout == "static" else 0), c
    assert c.get("RotaryEmbedding", 0) == (2 * L if cfg.positions == "rope" else 0), c
    assert c.get("Softmax", 0) == 0, c


def io_of(model: onnx.ModelProto):
    def one(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    return [one(v) for v in model.graph.input], [one(v) for v in model.graph.output]


def counts_line(name: str, built: onnx.ModelProto, traced: onnx.ModelProto) -> str:
    a, b = node_counts(built), node_counts(traced)
    ops = sorted(set(a) | set(b))
    cells = " ".join(f"{op} {a.get(op, 0)}/{b.get(op, 0)}" for op in ops)
    return (f"node counts {name} (built/traced; total {sum(a.values())}/{sum(b.values())}): {cells}")


def _graph(art: Path) -> onnx.ModelProto:
    return onnx.load(str(art / io_spec.ONNX_NAME), load_external_data=False)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", ["static", "dynamic"])
@pytest.mark.parametrize("arch", list(VARIANTS))
def test_traced_equals_built(artifacts, capsys, arch, layout):
    variant = VARIANTS[arch]
    cfg = _loaded(variant).config
    built, traced = artifacts(variant, layout, "build"), artifacts(variant, layout, "trace")
    gb, gt = _graph(built), _graph(traced)
    with capsys.disabled():
        print("\n" + counts_line(f"{arch}/{layout}", gb, gt))

    assert load_manifest(traced)["via"] == "trace" and load_manifest(built)["via"] == "build"
    assert load_manifest(traced).io == load_manifest(built).io
    assert io_of(gt) == io_of(gb)  # names, dtypes, symbolic dims: the I/O contract
    opsets = [(o.domain, o.version) for o in gt.opset_import]
    assert gt.ir_version == gb.ir_version and opsets == [(o.domain, o.version) for o in gb.opset_import]
    assert opsets == [("", 24), ("com.microsoft", 1)]  # FusedMatMul(transB=1): the linear layers (onnx_graph)
    for g in (gb, gt):
        assert_fused_ops(g, cfg, layout)
    assert fused_signature(gt) == fused_signature(gb)
    if layout == "static":  # TensorRT's KV_CACHE_UPDATE: the cache graph input in, the graph output out
        aliases = load_manifest(traced).io["cache_aliases"]
        pairs = {(n.input[0], n.output[0]) for n in gt.graph.node if n.op_type == "TensorScatter"}
        assert pairs == {(src, dst) for dst, src in aliases.items()}
    # weights are named initializers (canonical parameter names), none left as anonymous values
    names = {i.name for i in gt.graph.initializer}
    assert "embed.weight" in names and "layers.0.attn.q.weight" in names, sorted(names)[:10]

    worst = assert_same_outputs(built, traced)
    with capsys.disabled():
        print(f"  {arch}/{layout}: traced vs built max |Δlogit| {worst:.3g}, same greedy tokens")


def _perturbed_copy(art: Path, dest: Path, name: str, scale: float = 1.01) -> Path:
    out = Path(shutil.copytree(art, dest))
    model = onnx.load(str(out / io_spec.ONNX_NAME))
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[0] = arr.flat[0] * scale + 1e-3
            t.CopyFrom(numpy_helper.from_array(arr, name))
            break
    else:
        raise AssertionError(f"no initializer {name}")
    onnx.save(model, str(out / io_spec.ONNX_NAME))
    # a wrong *export* (its digests describe the wrong weights), not a file damaged afterwards
    from kvtrace.manifest import file_digests, load_manifest, write_manifest

    data = dict(load_manifest(out).data)
    data["files"] = file_digests(out, list(data["files"]))
    write_manifest(out, data)
    return out


def test_comparison_fails_on_a_perturbed_weight(artifacts, tmp_path, capsys):
    """The logits check is not vacuous: one weight element of the traced graph moved -> it fails."""
    variant = VARIANTS["llama"]
    built, traced = artifacts(variant, "static", "build"), artifacts(variant, "static", "trace")
    bad = _perturbed_copy(traced, tmp_path / "bad", "layers.1.mlp.down.weight")
    with pytest.raises(AssertionError, match=r"max \|Δlogit\||greedy tokens differ") as failed:
        assert_same_outputs(built, bad)
    with capsys.disabled():
        print(f"\nperturbed layers.1.mlp.down.weight[0, 0] -> check fails: {str(failed.value).splitlines()[0]}")


def test_fused_op_check_fails_on_an_unfused_graph(tmp_path):
    """The fused-op checks are not vacuous: the portable (opset 17, unfused) graph fails them."""
    ld = _loaded(VARIANTS["llama"])
    art = export_model(ld.model, tmp_path / "p", layout="dynamic", opset=17, max_seq=MAX_SEQ, validate=False,
                       log=lambda m: None)
    with pytest.raises(AssertionError):
        assert_fused_ops(_graph(art), ld.config, "dynamic")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                    reason="tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13)")
@pytest.mark.parametrize("arch", list(VARIANTS))
def test_tensorrt_parses_traced_graph_into_fused_layers(artifacts, tmp_path, capsys, arch):
    variant = VARIANTS[arch]
    cfg = _loaded(variant).config
    layers = {}
    for via in ("build", "trace"):
        art = Path(shutil.copytree(artifacts(variant, "static", via), tmp_path / via))  # build adds files
        rc = cli.main(["build", str(art), "--compute-capability", "sm89", "--inspect", "--json",
                       "--optimization-level", "0"])
        out = capsys.readouterr().out
        assert rc == 0, out
        layers[via] = json.loads(out.strip().splitlines()[-1])["layers"]
    fused = ("ATTENTION", "ATTENTION_INPUT", "ATTENTION_OUTPUT", "KV_CACHE_UPDATE", "ROTARY_EMBEDDING", "SOFTMAX")
    got = {k: layers["trace"].get(k, 0) for k in fused}
    with capsys.disabled():
        print(f"\nTensorRT-RTX layers {arch} traced: {got}")
    assert got == {k: layers["build"].get(k, 0) for k in fused}
    L = cfg.n_layers
    assert got["ATTENTION"] == L and got["ATTENTION_INPUT"] == L and got["KV_CACHE_UPDATE"] == 2 * L
    assert got["ROTARY_EMBEDDING"] == (2 * L if cfg.positions == "rope" else 0)
    assert got["SOFTMAX"] == 0


def test_traced_fp16_export_validates_and_matches_the_builders_form(tmp_path):
    """fp16 through the export's own validation (onnxruntime vs the reference); attention runs in
    fp32 (q/k/v cast around it) like the builder's CPU form, and the rope tables are fp16 initializers."""
    ld = _loaded(VARIANTS["gpt_neox"])
    kw = dict(dtype="float16", layout="static", max_seq=MAX_SEQ, log=lambda m: None)
    traced = export_model(ld.model, tmp_path / "t", via="trace", **kw)
    built = export_model(ld.model, tmp_path / "b", validate=False, **kw)
    man = load_manifest(traced)
    assert man["via"] == "trace" and man["validation"]["max_abs"] <= 0.25 and man["validation"]["top1"] == 1.0
    gt, gb = _graph(traced), _graph(built)
    assert fused_signature(gt) == fused_signature(gb)
    casts = {n.output[0] for n in gt.graph.node if n.op_type == "Cast"
             and {a.name: a.i for a in n.attribute}.get("to") == onnx.TensorProto.FLOAT}
    attn = [n for n in gt.graph.node if n.op_type == "Attention"]
    assert attn and all(set(n.input[:3]) <= casts for n in attn)  # fp32 q, k, v
    inits = {i.name: i for i in gt.graph.initializer}
    assert inits["rope.cos"].data_type == onnx.TensorProto.FLOAT16
    assert io_of(gt) == io_of(gb)


def test_traced_bf16_export_validates(tmp_path):
    """bf16: the export's validation runs the fp32 twin of the *traced* graph (onnxruntime CPU has
    no bf16 MatMul); the artifact itself is bf16 with the builder's fused nodes."""
    ld = _loaded(VARIANTS["starcoder2"])
    art = export_model(ld.model, tmp_path / "t", dtype="bfloat16", layout="dynamic", max_seq=MAX_SEQ,
                       via="trace", log=lambda m: None)
    man = load_manifest(art)
    assert "twin" in man["validation"]["method"] and man["validation"]["top1"] == 1.0
    g = _graph(art)
    inputs = {name: elem for name, elem, _ in io_of(g)[0]}
    assert inputs[io_spec.past_key(0)] == onnx.TensorProto.BFLOAT16
    assert_fused_ops(g, ld.config, "dynamic")


def test_parity_command_on_a_traced_artifact(artifacts, capsys):
    """`kvtrace parity` (torch reference from the manifest's checkpoint) takes the traced artifact."""
    art = artifacts(VARIANTS["xglm"], "static", "trace")
    rc = cli.main(["parity", str(art), "--steps", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err


# ----------------------------------------------------------------------------- bad input
def test_cli_rejects_trace_with_opset_17(tmp_path, capsys):
    rc = cli.main(["export", "--arch", "llama", "--via", "trace", "--opset", "17", "--cache", "dynamic",
                   "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("kvtrace: error:")]
    assert rc == 2 and len(errors) == 1 and errors[0] == err[-1], err
    assert "--via trace with --opset 17" in errors[0] and not any("Traceback" in ln for ln in err)
    assert not (tmp_path / "x").exists()


def test_data_dependent_control_flow_is_one_line_naming_the_module(monkeypatch, tmp_path, capsys):
    """A reference-model change the tracer cannot follow (a Python branch on a tensor's value)
    -> one line naming the module, its file and line; exit 2; nothing written."""
    from kvtrace.models import transformer

    original = transformer.MLP.forward

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: the trace cannot take both branches
            return original(self, x)
        return original(self, -x)

    monkeypatch.setattr(transformer.MLP, "forward", forward)
    out = tmp_path / "art"
    rc = cli.main(["export", "--arch", "llama", "--via", "trace", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    msg = err[-1]
    assert msg.startswith("kvtrace: error: --via trace: cannot trace MLP.forward (module 'layers.0.mlp')"), msg
    assert "test_trace_export.py:" in msg and "if x.sum() > 0" in msg and "data-dependent" in msg, msg
    assert not any("Traceback" in ln for ln in err)
    assert not out.exists() and not list(tmp_path.iterdir())

    with pytest.raises(KvtraceError, match="cannot trace MLP.forward"):
        ld = _loaded(VARIANTS["gpt_neox"])
        export_model(ld.model, tmp_path / "api", via="trace", max_seq=MAX_SEQ, validate=False, log=lambda m: None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_traced_low_precision_gpu_form_attends_natively(tmp_path, dtype):
    """The traced fp16/bf16 graph attends in fp32 (q/k/v cast around Attention, like the builder's
    CPU form); its GPU form attends in the graph dtype, like the builder's GPU form: no Cast
    around any Attention, and (fp16, on onnxruntime's CPU) the reference's logits within the fp16
    tolerances. TensorRT-RTX then fuses it (without the rewrite it refused to build: "Attention
    operation was not supported by a dedicated kernel")."""
    from kvtrace import configs
    from tests import helpers

    ld = _loaded(VARIANTS["llama"])
    art = export_model(ld.model, tmp_path / "t", dtype=dtype, layout="static", max_seq=MAX_SEQ, via="trace",
                       validate=False, log=lambda m: None)
    gpu = onnx.load(str(art / "model.gpu.onnx"), load_external_data=False)
    producer = {o: n for n in gpu.graph.node for o in n.output}
    attn = [n for n in gpu.graph.node if n.op_type == "Attention"]
    assert len(attn) == ld.config.n_layers
    assert not [x for n in attn for x in n.input[:3] if producer.get(x) is not None and producer[x].op_type == "Cast"]
    assert load_manifest(art)["graphs"]["gpu"]["attention_precision"] == "native"
    if dtype == "float16":  # (onnxruntime's CPU provider has no bf16 kernels)
        res = helpers.replay_against(art, ld.model, prompts=PROMPTS[:2], steps=4, graph="gpu")
        tol = configs.TOLERANCES["float16"]
        assert res.finite and res.max_abs <= tol["max_abs"] and res.top1 >= tol["top1"], res.summary()
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13): the TensorRT build is not checked")
    rc = cli.main(["build", str(art), "--compute-capability", "sm89", "--inspect", "--json", "--optimization-level", "0"])
    assert rc == 0
