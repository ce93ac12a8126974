"""The GPU graph form (exporter/gpu_form.py, model.gpu.onnx, written by every export): shapes that depend
on input shapes only (ONNX strict shape inference), and the same logits as model.onnx on the CPU
over a ragged prefill and decode steps, for every architecture (transformers' tiny models,
loaded by the real checkpoint loader), including a sliding window shorter than the sequence."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace import cli, configs, io_spec  # noqa: E402
from kvtrace.errors import KvtraceError  # noqa: E402
from kvtrace.exporter import gpu_form, onnx_graph  # noqa: E402
from kvtrace.exporter.export import export_model, skeleton  # noqa: E402
from kvtrace.runtime.model import Model  # noqa: E402

ARCHS = list(configs.BUILTIN)
# one transformers variant per architecture; starcoder2's window (8) is shorter than the sequences
VARIANTS = ["neox_parallel_r025", "llama_gqa_linear_tied", "starcoder2_gqa_window_bias", "xglm_scaled"]
PROMPTS = [[3, 17, 9, 44, 5, 8, 21, 30, 2, 11, 6, 60, 7], [4, 9, 1, 15], [7, 7, 8, 9, 10, 12, 13, 1, 2]]
STEPS = 12


def _weights(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_form_shapes_depend_on_input_shapes_only(arch):
    from kvtrace.models.transformer import random_model

    m = random_model(configs.BUILTIN[arch], 0)
    w = _weights(m)
    gpu, ginits, info = gpu_form.build(m.cfg, w, dtype="float16", max_seq=48, opset=24)
    cpu, cinits, _ = onnx_graph.build(m.cfg, w, dtype="float16", layout="static", max_seq=48, opset=24)
    sk_gpu, sk_cpu = skeleton(gpu, ginits), skeleton(cpu, cinits)
    assert gpu_form.value_dependent_dims(sk_gpu) == []
    dims = gpu_form.attention_input_dims(sk_gpu)
    assert len(dims) == 3 * m.cfg.n_layers + 1  # Q, K, V per layer + one shared mask
    for d in dims.values():
        assert all(isinstance(x, int) or x in ("batch", "seq") for x in d), d
    # the check fails where it should: model.onnx's sliced K/V and mask have a dim from position_ids
    bad = gpu_form.value_dependent_dims(sk_cpu)
    assert len(bad) == 2 * m.cfg.n_layers + 1 and all("unk__" in b for b in bad)
    # no Slice to the used slots; attention in fp32 for the CPU (Cast around it), fp16 in the GPU
    # form; softmax_precision in neither (the TensorRT parser rejects it)
    assert "Slice" not in {n.op_type for n in gpu.graph.node} and info["attend"] == "full"
    assert info["attention_precision"] == "native" and info["for"] == ["tensorrt", "onnxruntime-cuda"]
    for g, cast in ((cpu, True), (gpu, False)):
        producer = {o: n for n in g.graph.node for o in n.output}
        attn = [n for n in g.graph.node if n.op_type == "Attention"]
        assert len(attn) == m.cfg.n_layers
        for n in attn:
            assert not any(a.name == "softmax_precision" for a in n.attribute)
            assert all((producer[t].op_type == "Cast") == cast for t in n.input[:3])


@pytest.fixture(scope="module")
def gpu_artifacts(tmp_path_factory):
    from tests.conftest import checkpoint_dir
    from kvtrace.models.checkpoint import load_checkpoint

    out = {}
    for v in VARIANTS:
        loaded = load_checkpoint(checkpoint_dir(v, tmp_path_factory))
        out[v] = export_model(loaded.model, tmp_path_factory.mktemp("gf") / v, max_seq=48, max_batch=4,
                              validate=False, log=lambda m: None)
    return out


def _logits(art, graph: str):
    """Prefill logits at every real position, then STEPS greedy steps (tokens from the CPU form)."""
    m = Model.load(art, backend="onnxruntime", graph=graph)
    try:
        assert m.backend.onnx_file.name == ("model.gpu.onnx" if graph == "gpu" else "model.onnx")
        pre = m.start(PROMPTS)  # (B, T, V)
        lens = [len(p) for p in PROMPTS]
        real = np.concatenate([pre[b, :n] for b, n in enumerate(lens)])
        tok = pre[np.arange(len(PROMPTS)), np.array(lens) - 1].argmax(-1)
        steps = []
        for _ in range(STEPS):
            out = m.step(tok)
            steps.append(out)
            tok = out.argmax(-1)
        return real, np.stack(steps)
    finally:
        m.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_form_matches_cpu_form(gpu_artifacts, variant):
    art = gpu_artifacts[variant]
    cpu_pre, cpu_steps = _logits(art, "cpu")
    gpu_pre, gpu_steps = _logits(art, "gpu")
    assert np.abs(cpu_pre - gpu_pre).max() <= 1e-5
    assert np.abs(cpu_steps - gpu_steps).max() <= 1e-5
    assert (cpu_steps.argmax(-1) == gpu_steps.argmax(-1)).all()


def test_gpu_form_comparison_can_fail(gpu_artifacts, tmp_path, tmp_path_factory, monkeypatch):
    """The comparison above detects a wrong GPU form: one whose mask lets each query also see the
    next slot (an off-by-one an attention over the whole cache could have; the unused slots hold
    zeros, not -inf)."""
    from tests.conftest import checkpoint_dir
    from kvtrace import numerics
    from kvtrace.manifest import load_manifest
    from kvtrace.models.checkpoint import load_checkpoint

    art = shutil.copytree(gpu_artifacts["llama_gqa_linear_tied"], tmp_path / "art")
    real_allowed = numerics.allowed

    def leaky(q_slot, q_pos, k_slot, k_pos, valid, window):
        return real_allowed(q_slot, q_pos, k_slot - 1, k_pos, valid, window)  # slot j allowed from j - 1

    monkeypatch.setattr(onnx_graph.numerics, "allowed", leaky)
    cfg = load_manifest(art).config()
    loaded = load_checkpoint(checkpoint_dir("llama_gqa_linear_tied", tmp_path_factory))
    from kvtrace.exporter.export import TorchWeights

    gpu_form.write(cfg, TorchWeights(loaded.model), art, dtype="float32", layout="static", max_seq=48, opset=24)
    monkeypatch.undo()
    # a wrong *export* (its digests describe the wrong graph), not a file damaged afterwards
    from kvtrace.manifest import file_digests, write_manifest

    data = dict(load_manifest(art).data)
    data["files"] = file_digests(art, list(data["files"]))
    write_manifest(art, data)
    cpu_pre, cpu_steps = _logits(art, "cpu")
    gpu_pre, gpu_steps = _logits(art, "gpu")
    assert max(np.abs(cpu_pre - gpu_pre).max(), np.abs(cpu_steps - gpu_steps).max()) > 1e-3


def test_every_export_writes_the_gpu_form(tmp_path, capsys):
    out = tmp_path / "art"
    rc = cli.main(["export", "--arch", "xglm", "--max-seq", "32", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / io_spec.MANIFEST_NAME).read_text())
    entry = data["graphs"]["gpu"]
    assert entry["onnx"] == "model.gpu.onnx" and entry["attend"] == "full" and data["graph"]["attend"] == "used"
    assert data["external_data"] == "model.onnx.data"
    assert "strict shape inference" in data["validation"]["gpu"]["method"]
    # the weights are shared: the second graph is a small file, its initializers point into model.onnx.data
    g = onnx.load(str(out / "model.gpu.onnx"), load_external_data=False)
    ext = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in ext} >= {"embed.weight", "layers.0.attn.qkv.weight"}
    assert {e.value for t in ext for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert all(len(t.raw_data) < 4096 for t in g.graph.initializer if t not in ext)  # small constants only
    assert (out / "model.gpu.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size / 10
    onnx.checker.check_model(str(out / "model.gpu.onnx"))
    # a manifest naming a GPU form that is not there is refused, naming the file
    (out / "model.gpu.onnx").unlink()
    with pytest.raises(KvtraceError, match="model.gpu.onnx: model file of graph form 'gpu'"):
        Model.load(out)
    # the dynamic cache and the portable opset have their GPU form too (attention over the whole
    # cache anyway); --target gpu, from before every export wrote it, is still accepted
    for extra in (["--cache", "dynamic"], ["--cache", "dynamic", "--opset", "17", "--fp16"]):
        dyn = tmp_path / "_".join(a.strip("-") for a in extra)
        assert cli.main(["export", "--arch", "llama", "--target", "gpu", "--max-seq", "32", "--out", str(dyn),
                         *extra]) == 0, capsys.readouterr().err
        entry = json.loads((dyn / io_spec.MANIFEST_NAME).read_text())["graphs"]["gpu"]
        assert entry["attend"] == "all" and entry["attention_precision"] == "native"
        onnx.checker.check_model(str(dyn / "model.gpu.onnx"))


def test_backend_graph_option_errors(gpu_artifacts, tmp_path):
    art = shutil.copytree(gpu_artifacts["xglm_scaled"], tmp_path / "art")
    with pytest.raises(KvtraceError, match="graph 'tpu': expected auto, cpu or gpu"):
        Model.load(art, backend="onnxruntime", graph="tpu")
    data = json.loads((art / io_spec.MANIFEST_NAME).read_text())
    del data["graphs"]
    (art / io_spec.MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(KvtraceError, match="no GPU form of the graph.*export it again"):
        Model.load(art, backend="onnxruntime", graph="gpu")


@pytest.mark.parametrize("layout,opset", [("static", 24), ("dynamic", 17)])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_gpu_form_matches_reference(arch, layout, opset, tmp_path):
    """The fp16 GPU form gives the fp32 reference's logits within the fp16 tolerances (ragged
    prefill, decode steps) on onnxruntime's CPU: the fused form (fp16 Attention), and the portable
    (--opset 17) form spelled the way TensorRT fuses attention (fp16 MatMuls with Q pre-scaled,
    the mask and softmax in fp32 between them, K/V repeated to all heads)."""
    from kvtrace.models.transformer import random_model
    from tests import helpers

    m = random_model(configs.BUILTIN[arch], 3)
    art = helpers.export(m, tmp_path / "a", dtype="float16", layout=layout, max_seq=48, opset=opset)
    assert json.loads((art / io_spec.MANIFEST_NAME).read_text())["graphs"]["gpu"]["attention_precision"] == "native"
    res = helpers.replay_against(art, m, prompts=helpers.prompts(m.cfg, [12, 7]), steps=8, graph="gpu")
    tol = configs.TOLERANCES["float16"]
    print(f"{arch} {layout} opset {opset} GPU form: {res.summary()}")
    assert res.finite and res.max_abs <= tol["max_abs"] and res.top1 >= tol["top1"], res.summary()


def test_portable_gpu_form_comparison_can_fail(tmp_path, monkeypatch):
    """The comparison above detects a GQA mistake in the repeated K/V: the same export with the
    key/value heads taken in the wrong order (what a wrong Expand/Reshape would do) fails it."""
    from kvtrace.models.transformer import random_model
    from tests import helpers

    real = onnx_graph.ModelGraph.fusable_attention

    def swapped(self, q, k, v, mask, scale, i):
        g = self.g
        order = g.i64(list(reversed(range(self.cfg.n_kv_heads))))
        return real(self, q, g.op("Gather", [k, order], axis=1), g.op("Gather", [v, order], axis=1), mask, scale, i)

    monkeypatch.setattr(onnx_graph.ModelGraph, "fusable_attention", swapped)
    m = random_model(configs.BUILTIN["llama"], 3)
    assert m.cfg.n_kv_heads > 1
    art = helpers.export(m, tmp_path / "a", dtype="float16", layout="dynamic", max_seq=48, opset=17)
    res = helpers.replay_against(art, m, prompts=helpers.prompts(m.cfg, [12, 7]), steps=8, graph="gpu")
    assert res.max_abs > configs.TOLERANCES["float16"]["max_abs"], res.summary()
