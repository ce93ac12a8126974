"""Weight-only int8/int4 artifacts (`kvtrace export --quant`) on onnxruntime CPU.

References: the fp32 torch model holding the quantised weights (recomputed from the checkpoint by
exporter/quantize.py, never read back from the artifact), the original model, and transformers on
the tiny variants of every architecture (tests/tiny_hf.py, loaded by the real checkpoint loader).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace import cli, configs  # noqa: E402
from kvtrace.exporter import quantize as qz  # noqa: E402
from kvtrace.runtime import parity  # noqa: E402
from tests.conftest import checkpoint_dir  # noqa: E402

# one tiny transformers variant per architecture (the tied Llama among them)
VARIANTS = ["neox_parallel_r025", "llama_gqa_linear_tied", "starcoder2_gqa_window_bias", "xglm_scaled"]
GROUP = 16  # tiny models: hidden 64, intermediate 128


def _load(variant, tmp_path_factory):
    from kvtrace.models.checkpoint import load_checkpoint

    ck = checkpoint_dir(variant, tmp_path_factory)
    return ck, load_checkpoint(ck)


def _export(model, out: Path, scheme: str, **kw) -> Path:
    from kvtrace.exporter.export import export_model

    kw = {"max_seq": 64, "max_batch": 4, "group_size": GROUP, **kw}
    return export_model(model, out, validate=False, log=lambda m: None, quant=scheme, **kw)


def _replay(art, trace, **opts):
    from kvtrace.runtime.model import Model

    m = Model.load(art, backend="onnxruntime", threads=1, **opts)
    try:
        return parity.replay(m, trace)
    finally:
        m.close()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_artifact_against_references(tmp_path, tmp_path_factory, variant, scheme):
    from kvtrace.exporter.references import HFReference, TorchReference, quantized_reference
    from kvtrace.runtime.model import Model
    from tests import tiny_hf

    ck, loaded = _load(variant, tmp_path_factory)
    model = loaded.model
    art = _export(model, tmp_path / "art", scheme)
    man = json.loads((art / "kvtrace.json").read_text())
    assert man["quant"]["scheme"] == scheme and man["quant"]["group_size"] == GROUP
    assert man["quant"]["bits"] == qz.BITS[scheme] and man["quant"]["ragged"] == {}

    spec = qz.QuantSpec.from_manifest(man["quant"])
    prompts = parity.make_prompts(3, 12, model.cfg.vocab_size, 1)
    qtrace = parity.record(quantized_reference(TorchReference(model, {}), spec), prompts, 10)
    # as deployed (accuracy level 4: onnxruntime rounds activations to int8 per block): the scheme's row
    deployed = parity.judge(_replay(art, qtrace), configs.TOLERANCES[scheme])
    assert deployed["passed"], deployed["failures"]
    # in fp32 arithmetic (level 1) the artifact computes exactly what the quantised weights do
    exact = _replay(art, qtrace, accuracy_level=1)
    assert exact["summary"]["max_rel"] < 1e-4 and exact["summary"]["greedy_match"], parity.one_line(exact)
    assert deployed["summary"]["max_abs"] > 10 * exact["summary"]["max_abs"]  # level 4 really is in effect
    # greedy generation through the runtime = the quantised reference's greedy continuation
    m = Model.load(art, backend="onnxruntime", threads=1, accuracy_level=1)
    try:
        out = m.generate(prompts, max_new_tokens=10, greedy=True, stop_token_ids=[])
    finally:
        m.close()
    ref_greedy = [[t[b] for t in qtrace.tokens] for b in range(len(prompts))]  # the reference's own greedy picks
    assert _new_tokens(out, prompts) == ref_greedy
    # against transformers on the original weights: the quantisation's cost, within the accuracy row
    hf = HFReference(tiny_hf.hf_model(variant), {"kind": "transformers"})
    acc = parity.judge(_replay(art, parity.record(hf, prompts, 10)),
                       configs.TOLERANCES[scheme + configs.UNQUANTIZED])
    assert acc["passed"], acc["failures"]
    assert 0 < acc["summary"]["kl_mean"] < (0.01 if scheme == "int8" else 0.1)


def _new_tokens(out, prompts):
    """Model.generate's results -> the new token ids per row."""
    return [list(r.token_ids) for r in out]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_onnxruntime_fuses_at_its_default_level(tmp_path, tmp_path_factory, scheme):
    """With onnxruntime's default session options every DequantizeLinear + MatMul becomes one
    MatMulNBits of the scheme's bits (the weight is never dequantised per call)."""
    import onnx
    import onnxruntime as ort

    _, loaded = _load("llama_mha", tmp_path_factory)
    art = _export(loaded.model, tmp_path / "art", scheme)
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False)
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    L = loaded.model.cfg.n_layers
    assert len(dq) == 5 * L + 1  # qkv, o, gate, up, down per layer + the head
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art / "model.onnx"), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    nbits = [n for n in opt.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(dq)
    assert not [n for n in opt.graph.node if n.op_type in ("DequantizeLinear", "MatMul")]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == qz.BITS[scheme] and attrs["block_size"] == GROUP


def test_artifact_stores_exactly_the_reference_weights(tmp_path, tmp_path_factory):
    """The packed tensors in the file, unpacked here, are the fake-quantised weights the parity
    reference uses (tied model: the int4 head is its own tensor, the embedding an 8-bit table)."""
    import onnx
    from onnx import numpy_helper

    _, loaded = _load("llama_gqa_linear_tied", tmp_path_factory)
    model, cfg = loaded.model, loaded.model.cfg
    art = _export(model, tmp_path / "art", "int4", quant_method="search")
    inits = {t.name: t for t in onnx.load(str(art / "model.onnx")).graph.initializer}
    spec = qz.QuantSpec.make(cfg, "int4", group_size=GROUP)
    want = qz.fake_quantize_weights(cfg, {n: p.detach().numpy() for n, p in model.named_parameters()}, spec)

    def stored(name, rows_k):  # DequantizeLinear(q (K, N), s (nb, N), axis 0) -> (N, K) torch layout
        t = inits[name + ".q"]
        K, N = t.dims
        q = qz.unpack_int4(np.frombuffer(t.raw_data, np.uint8), K * N).reshape(K, N)
        s = numpy_helper.to_array(inits[name + ".scale"])
        return qz.dequantize(np.ascontiguousarray(q.T), np.ascontiguousarray(s.T), GROUP)

    qkv = stored("layers.1.attn.qkv.weight", cfg.hidden_size)
    np.testing.assert_array_equal(qkv, np.concatenate([want[f"layers.1.attn.{n}.weight"] for n in "qkv"]))
    np.testing.assert_array_equal(stored("layers.0.mlp.down.weight", cfg.intermediate_size),
                                  want["layers.0.mlp.down.weight"])
    np.testing.assert_array_equal(stored("lm_head.weight", cfg.hidden_size), want["lm_head.weight"])
    u = numpy_helper.to_array(inits["embed.weight.u8"]).astype(np.int16) - 128
    es = numpy_helper.to_array(inits["embed.weight.scale"])
    np.testing.assert_array_equal(qz.dequantize(u.astype(np.int8), es, spec.embed_group(cfg.hidden_size)),
                                  want["embed.weight"])
    assert "embed.weight" not in inits and (art / "model.onnx").stat().st_size < 0.4 * _fp32_bytes(model)


def _fp32_bytes(model):
    return sum(p.numel() for p in model.parameters()) * 4


def test_manifest_accuracy_level_reaches_the_session(tmp_path, tmp_path_factory):
    """An artifact exported with --accuracy-level 1 runs in fp32 arithmetic by default."""
    from kvtrace.exporter.references import TorchReference, quantized_reference

    _, loaded = _load("starcoder2_nobias", tmp_path_factory)
    art = _export(loaded.model, tmp_path / "art", "int4", accuracy_level=1)
    spec = qz.QuantSpec.from_manifest(json.loads((art / "kvtrace.json").read_text())["quant"])
    trace = parity.record(quantized_reference(TorchReference(loaded.model, {}), spec),
                          parity.make_prompts(2, 9, loaded.model.cfg.vocab_size, 0), 4)
    assert _replay(art, trace)["summary"]["max_rel"] < 1e-4  # the default (4) would be ~1e-2
    assert _replay(art, trace, accuracy_level=4)["summary"]["max_rel"] > 1e-3


def test_dynamic_cache_fp16_and_gpu_form(tmp_path, tmp_path_factory):
    """--quant with --cache dynamic, with --fp16 (fp16 scales), and the GPU form every artifact
    carries (it shares the quantised weights)."""
    from kvtrace.exporter.references import TorchReference, quantized_reference

    _, loaded = _load("llama_mqa_llama3", tmp_path_factory)
    model = loaded.model
    prompts = parity.make_prompts(2, 9, model.cfg.vocab_size, 0)
    for name, kw, tol in (("dyn", {"layout": "dynamic"}, configs.TOLERANCES["float32"]),
                          ("fp16", {"dtype": "float16"}, configs.TOLERANCES["float16"]),
                          ("gpu", {}, configs.TOLERANCES["float32"])):
        art = _export(model, tmp_path / name, "int8", **kw)
        man = json.loads((art / "kvtrace.json").read_text())
        spec = qz.QuantSpec.from_manifest(man["quant"])
        ref = quantized_reference(TorchReference(model, {}), spec, man["dtype"])
        r = parity.judge(_replay(art, parity.record(ref, prompts, 4), accuracy_level=1), tol)
        assert r["passed"], (name, r["failures"])
        if name == "gpu":
            assert "gpu" in man["graphs"] and (art / "model.gpu.onnx").stat().st_size < 100_000


# ------------------------------------------------------------------------------ bad input
def _cli_export(capsys, *argv):
    try:
        rc = cli.main(["export", *argv])
    except SystemExit as e:  # argparse's own refusals (an unknown choice): usage + one error line, exit 2
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["--quant", "int4", "--opset", "17", "--cache", "dynamic"], "--opset 17"),
    (["--quant", "int4", "--group-size", "24"], "--group-size 24: must be a power of two"),
    (["--quant", "int8", "--group-size", "8"], "--group-size 8: must be a power of two"),
    (["--quant", "int4", "--group-size", "128"], "larger than the input dimension 64"),
    (["--quant", "int8", "--bf16"], "--bf16"),
    (["--group-size", "32"], "only with --quant"),
    (["--quant", "int4", "--accuracy-level", "0"], "--accuracy-level"),
    (["--quant", "int5"], "invalid choice"),
])
def test_bad_quant_options(tmp_path, capsys, argv, words):
    out = tmp_path / "art"
    rc, err = _cli_export(capsys, "--arch", "gpt_neox", "--max-seq", "32", "--out", str(out), *argv)
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert words in lines[-1] and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_ragged_groups_run_on_onnxruntime_and_tensorrt_says_no(tmp_path, capsys):
    """The built-in llama's intermediate size 172 is no multiple of 16: its down projection's last
    group is short. onnxruntime runs it (export validation passes); the manifest and the export
    log say TensorRT cannot build it."""
    out = tmp_path / "art"
    rc, err = _cli_export(capsys, "--arch", "llama", "--max-seq", "32", "--out", str(out), "--quant", "int4",
                          "--group-size", "16")
    assert rc == 0, err
    assert "K=172 is not a multiple of --group-size 16" in err and "exact check" in err
    man = json.loads((out / "kvtrace.json").read_text())
    assert man["quant"]["ragged"] == {"layers.*.mlp.down (intermediate_size)": 172}
    assert man["quant"]["tensorrt"].startswith("not buildable")
    assert man["validation"]["exact_check"]["max_rel"] < 1e-4
    assert "accuracy_vs_unquantized" in man["validation"]


# ------------------------------------------------------------------------------ damage
def _perturbed_copy(art: Path, dst: Path, tensor: str, row: int, col: int) -> Path:
    from tests.helpers import perturb_scale

    shutil.copytree(art, dst)
    perturb_scale(dst, tensor, row, col, 1.1)
    return dst


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_parity_fails_on_one_scale_off_by_ten_percent(tmp_path, tmp_path_factory, capsys, scheme):
    """stories260K (trained weights): `kvtrace parity` passes the honest artifact (exit 0) and fails
    (exit 1) when one group's stored scale is 10% off: the lm_head group of its most frequent token
    with the largest scale x activation, or group 0 of the first QKV column. It is the exact check
    (accuracy level 1) that catches it: at level 4 onnxruntime's own activation rounding moves the
    logits of this 64-wide model more than the damage does (docs/quantization.md)."""
    from tests.helpers import head_group_that_matters
    from kvtrace.exporter.references import TorchReference, quantized_reference

    ck, loaded = _load("stories260K", tmp_path_factory)
    model = loaded.model
    art = _export(model, tmp_path / "art", scheme, group_size=None,
                  source={"kind": "checkpoint", "path": str(ck), "sha256": loaded.digest})
    rc = cli.main(["parity", str(art), "--steps", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "exact check (accuracy level 1, fp32 arithmetic)" in out and ": pass" in out
    spec = qz.QuantSpec.from_manifest(json.loads((art / "kvtrace.json").read_text())["quant"])
    trace = parity.record(quantized_reference(TorchReference(model, {}), spec),
                          parity.make_prompts(2, 16, model.cfg.vocab_size, 0), 8)
    g, tok = head_group_that_matters(model, spec, trace)
    for what, tensor, row, col in (("head", "lm_head.weight.scale", g, tok),
                                   ("body", "layers.0.attn.qkv.weight.scale", 0, 0)):
        bad = _perturbed_copy(art, tmp_path / f"bad-{what}", tensor, row, col)
        rc = cli.main(["parity", str(bad), "--steps", "8"])
        out = capsys.readouterr().out
        assert rc == 1, (what, out)
        assert "FAIL" in out and "exact check" in out.split("FAIL:")[-1], out


def test_golden_of_a_quantized_artifact(tmp_path, tmp_path_factory, capsys):
    """A golden recorded from the quantised reference replays through the runtime alone with the exact
    check; a damaged scale fails it (exit 1); an fp32 golden of the same checkpoint is judged by the
    scheme's accuracy row (noted)."""
    ck, loaded = _load("llama_mha", tmp_path_factory)
    src = {"kind": "checkpoint", "path": str(ck), "sha256": loaded.digest}
    art = _export(loaded.model, tmp_path / "art", "int4", source=src)
    golden = tmp_path / "q.golden.npz"
    assert cli.main(["parity", str(art), "--steps", "6", "--save-golden", str(golden)]) == 0
    capsys.readouterr()
    assert cli.main(["parity", str(art), "--golden", str(golden)]) == 0
    out = capsys.readouterr().out
    assert "exact check" in out and "configs.TOLERANCES['int4']" in out, out
    bad = _perturbed_copy(art, tmp_path / "bad", "lm_head.weight.scale", 0, 5)
    assert cli.main(["parity", str(bad), "--golden", str(golden)]) == 1
    capsys.readouterr()
    from kvtrace.exporter.export import export_model

    fp32 = export_model(loaded.model, tmp_path / "fp32", max_seq=64, validate=False, log=lambda m: None, source=src)
    g32 = tmp_path / "fp32.golden.npz"
    assert cli.main(["parity", str(fp32), "--steps", "6", "--save-golden", str(g32)]) == 0
    capsys.readouterr()
    assert cli.main(["parity", str(art), "--golden", str(g32)]) == 0
    out = capsys.readouterr().out
    assert "int4:unquantized" in out and "unquantised weights" in out, out


@pytest.mark.parametrize("mode", ["full", "bounded"])
def test_streamed_checkpoint_export_quantised(tmp_path, capsys, monkeypatch, mode):
    """`kvtrace export --checkpoint --quant`: the streamed export validates against the layer-streamed
    reference holding the artifact's quantised weights (exporter/quantize.py FakeQuantized), with
    the exact check at accuracy level 1; a reference that disagrees with the stored weights by one
    scale fails it (exit 1, nothing written)."""
    from tests import tiny_hf

    ck = tiny_hf.checkpoint("llama_gqa_linear_tied")
    out = tmp_path / "a"
    argv = ["--checkpoint", str(ck), "--quant", "int4", "--max-seq", "32", "--validation", mode, "--out", str(out)]
    rc, err = _cli_export(capsys, *argv)
    assert rc == 0, err
    v = json.loads((out / "kvtrace.json").read_text())["validation"]
    assert v["mode"] == mode and v["tolerance"] == "int4" and v["exact_check"]["max_abs"] < 1e-4
    real = qz.FakeQuantized.__getitem__

    def one_scale_off(self, name):
        w = real(self, name)
        if name == "layers.0.attn.q.weight":
            w = w.copy()
            w[0, :32] *= 1.1  # row 0's first group: one scale 10% off
        return w

    monkeypatch.setattr(qz.FakeQuantized, "__getitem__", one_scale_off)
    rc, err = _cli_export(capsys, *argv[:-1], str(tmp_path / "b"))
    assert rc == 1 and "differs from the reference" in err, err
    assert not (tmp_path / "b").exists()
