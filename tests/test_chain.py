"""Full validation piece by piece (exporter/chain.py): the exported graph cut into a context
piece, one piece per block and a head piece, replayed one piece at a time through the runtime.
It must compute what one whole-graph session computes (every architecture, both cache layouts,
a quantised graph), hold every node exactly once, and fail on a damaged weight of a late block,
which the bounded validation's two-block graph never runs."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="transformers builds the tiny reference checkpoints")

from kvtrace import configs  # noqa: E402
from kvtrace.exporter import chain, validate  # noqa: E402
from kvtrace.exporter.export import ExportSpec, export_checkpoint  # noqa: E402
from kvtrace.exporter.references import LayerStreamedReference  # noqa: E402
from kvtrace.manifest import load_manifest  # noqa: E402
from kvtrace.models.checkpoint import open_checkpoint  # noqa: E402
from kvtrace.models.stream import CheckpointWeights  # noqa: E402
from kvtrace.runtime import parity  # noqa: E402
from kvtrace.runtime.model import Model  # noqa: E402
from tests import tiny_hf  # noqa: E402

QUIET = dict(log=lambda m: None)
VARIANTS = ["neox_parallel_r025", "llama_gqa_linear_tied", "starcoder2_gqa_window_bias", "xglm_scaled"]


def _trace(ck, max_seq=32):
    """The layer-streamed reference's trace over the checkpoint (what validation replays)."""
    weights = CheckpointWeights(open_checkpoint(ck))
    try:
        cfg = weights.cfg
        prompts, steps = validate.validation_prompts(cfg, max_seq)
        tr = LayerStreamedReference(cfg, weights, {}).run(prompts, validate.continuation(cfg, steps),
                                                          [cfg.n_layers])[cfg.n_layers]
        tr.seconds = 0.0
        return tr
    finally:
        weights.close()


def _whole(art, trace, **kw):
    m = Model.load(art, backend="onnxruntime", threads=1, **kw)
    try:
        return parity.replay(m, trace)
    finally:
        m.close()


@pytest.mark.parametrize("layout", ["static", "dynamic"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_chain_computes_what_the_whole_graph_computes(variant, layout, tmp_path):
    ck = tiny_hf.checkpoint(variant)
    art = export_checkpoint(ck, tmp_path / "a", max_seq=32, layout=layout, validate=False, **QUIET)
    trace = _trace(ck)
    tol = configs.TOLERANCES["float32"]
    got = chain.replay(art, trace)
    whole = _whole(art, trace, prepack=False)
    n_layers = load_manifest(art)["config"]["n_layers"]
    assert got["chain"]["pieces"] == n_layers + 2
    # the same artifact logits position by position (the same kernels on the same inputs)
    for a, b in zip(got["per_step"], whole["per_step"]):
        assert a["max_abs"] == pytest.approx(b["max_abs"], abs=1e-6)
    assert [r["artifact"] for r in got["greedy"]] == [r["artifact"] for r in whole["greedy"]]
    assert parity.judge(got, tol)["passed"]


def test_pieces_hold_every_node_once_and_only_their_blocks_weights(tmp_path):
    import onnx

    ck = tiny_hf.checkpoint("neox_parallel_r025")
    art = export_checkpoint(ck, tmp_path / "a", max_seq=32, validate=False, **QUIET)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    L = load_manifest(art)["config"]["n_layers"]
    pieces = chain.split(model, L)
    assert [p.what for p in pieces] == ["context"] + [f"block {i}" for i in range(L)] + ["head"]
    names = [n.name for p in pieces for n in p.nodes]
    assert sorted(names) == sorted(n.name for n in model.graph.node) and len(set(names)) == len(names)
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for i, p in enumerate(pieces[1:-1]):
        mine = [x for x in p.initializers if x in external and not x.startswith("rope.")]  # (shared tables)
        assert mine and all(x.startswith(f"layers.{i}.") for x in mine), (p.what, mine)
    assert {x for x in pieces[-1].initializers if x in external} == {"norm_f.weight", "norm_f.bias", "lm_head.weight"}
    # what a block hands to the next is an output of one piece and an input of the next
    assert set(pieces[1].keep) & set(pieces[2].inputs)
    for p in pieces:  # each piece a well-formed graph of its own
        onnx.shape_inference.infer_shapes(onnx.load_from_string(p.graph_bytes), strict_mode=True)


def test_a_tied_head_reads_the_embedding_in_the_head_piece(tmp_path, monkeypatch):
    """A tied head reads the embedding initializer in the head piece: model.onnx's FusedMatMul
    directly, and in the standard spelling (MatMul(x, Transpose(embed.weight))) the Transpose,
    a node that reads a weight alone, goes to the head piece too. Put in the context piece, its
    (D, V) output was handed on and kept once per call of the trace (five copies of the
    embedding, held through every block's pass)."""
    import onnx

    from kvtrace.exporter.onnx_graph import standard_twin

    ck = tiny_hf.checkpoint("llama_gqa_linear_tied")
    art = export_checkpoint(ck, tmp_path / "a", max_seq=32, validate=False, **QUIET)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    cfg = load_manifest(art)["config"]
    pieces = chain.split(model, cfg["n_layers"])
    head = [n.name for n in model.graph.node if n.op_type == "FusedMatMul" and "embed.weight" in n.input]
    assert head and head[0] in {n.name for n in pieces[-1].nodes}
    assert "embed.weight" in pieces[-1].initializers
    twin = standard_twin(model)
    head_t = [n.name for n in twin.graph.node if n.op_type == "Transpose" and "embed.weight" in n.input]
    assert head_t and head_t[0] in {n.name for n in chain.split(twin, cfg["n_layers"])[-1].nodes}
    peak = [0]
    run = chain._PieceBackend.run

    def counting(self, feeds):
        run(self, feeds)
        peak[0] = max(peak[0], sum(a.nbytes for v in self.store.values() for a in v))

    monkeypatch.setattr(chain._PieceBackend, "run", counting)
    assert parity.judge(chain.replay(art, _trace(ck)), configs.TOLERANCES["float32"])["passed"]
    assert 0 < peak[0] < cfg["vocab_size"] * cfg["hidden_size"] * 4  # less than the embedding

def _perturb(art, name: str, k: int = 0, by: float = 0.5) -> None:
    """Add `by` to element k of initializer `name` in model.onnx.data (fp32)."""
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == name)
    ext = {e.key: e.value for e in t.external_data}
    with open(art / ext["location"], "r+b") as f:
        f.seek(int(ext["offset"]) + 4 * k)
        v = np.frombuffer(f.read(4), dtype=np.float32)[0]
        f.seek(int(ext["offset"]) + 4 * k)
        f.write(np.float32(v + by).tobytes())


@pytest.mark.parametrize("name", ["layers.{last}.mlp.down.weight", "lm_head.weight", "layers.{last}.attn.qkv.bias"])
def test_a_damaged_weight_of_a_late_block_fails_the_chain(name, tmp_path):
    ck = tiny_hf.deeper("neox_parallel_r025", 4)
    art = export_checkpoint(ck, tmp_path / "a", max_seq=32, validate=False, **QUIET)
    L = load_manifest(art)["config"]["n_layers"]
    assert L > validate.TRUNCATED_LAYERS  # a block the bounded validation does not run
    trace = _trace(ck)
    tol = configs.TOLERANCES["float32"]
    assert parity.judge(chain.replay(art, trace), tol)["passed"]
    _perturb(art, name.format(last=L - 1), by=2.0)
    bad = parity.judge(chain.replay(art, trace), tol)
    assert not bad["passed"], bad["summary"]


def test_quantised_graph_chains_like_the_whole(tmp_path):
    ck = tiny_hf.checkpoint("llama_gqa_linear_tied")
    art = export_checkpoint(ck, tmp_path / "a", max_seq=32, quant="int8", validate=False, **QUIET)
    spec = ExportSpec.make(open_checkpoint(ck).config, quant="int8", max_seq=32)
    weights = CheckpointWeights(open_checkpoint(ck))
    try:
        from kvtrace.exporter.quantize import FakeQuantized

        cfg = weights.cfg
        prompts, steps = validate.validation_prompts(cfg, 32)
        ref = LayerStreamedReference(cfg, FakeQuantized(cfg, weights, spec.quant_spec, spec.dtype), {})
        trace = ref.run(prompts, validate.continuation(cfg, steps), [cfg.n_layers])[cfg.n_layers]
        trace.seconds = 0.0
    finally:
        weights.close()
    got = chain.replay(art, trace, prepack=True)
    whole = _whole(art, trace, prepack=True)
    for a, b in zip(got["per_step"], whole["per_step"]):
        assert a["max_abs"] == pytest.approx(b["max_abs"], abs=1e-5)


def test_export_full_validation_runs_the_chain_and_says_so(tmp_path):
    out = export_checkpoint(tiny_hf.checkpoint("xglm_scaled"), tmp_path / "a", max_seq=32, validation="full",
                            **QUIET)
    v = load_manifest(out)["validation"]
    L = load_manifest(out)["config"]["n_layers"]
    assert v["mode"] == "full" and v["chain"]["pieces"] == L + 2 and "the whole graph in" in v["method"] and "pieces one after another" in v["method"]
    assert sorted(p.name for p in out.iterdir()) == ["kvtrace.json", "model.gpu.onnx", "model.onnx", "model.onnx.data"]


# ------------------------------------------------------------------ kvtrace parity --streamed
@pytest.mark.parametrize("variant", ["neox_parallel_r025", "starcoder2_gqa_window_bias"])
def test_streamed_parity_passes_and_says_how_it_ran(variant, tmp_path, capsys):
    from kvtrace import cli

    art = export_checkpoint(tiny_hf.checkpoint(variant), tmp_path / "a", max_seq=64, **QUIET)
    rc = cli.main(["parity", str(art), "--streamed", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["passed"] and r["backend"] == "onnxruntime (piece by piece)" and "one block at a time" in r["reference"]["streamed"]
    # the table says what the decode steps were fed: the fixed continuation, not the reference's choice
    assert "each fed a fixed continuation token" in out.out and "greedy token" not in out.out, out.out


def test_streamed_parity_is_chosen_when_memory_is_short_and_fails_a_damaged_late_block(tmp_path, monkeypatch):
    from kvtrace import files
    from kvtrace.exporter.parity import parity

    art = export_checkpoint(tiny_hf.deeper("llama_gqa_linear_tied", 4), tmp_path / "a", max_seq=64, **QUIET)
    said = []
    monkeypatch.setattr(files, "available_memory", lambda: (1000, "test"))
    assert parity(str(art), log=said.append)["passed"]
    assert any("streaming it one block at a time" in m for m in said), said
    _perturb(art, "layers.3.mlp.down.weight", by=2.0)  # the last block: bounded export validation never runs it
    bad = parity(str(art), log=said.append, verify=False)  # (the digests would refuse the file first)
    assert not bad["passed"] and bad["backend"] == "onnxruntime (piece by piece)"


@pytest.mark.parametrize("args, message", [
    (["--streamed", "--against", "hf"], "--streamed: only with --against torch"),
    (["--streamed", "--golden", "g.npz"], "--streamed: not with --golden"),
])
def test_streamed_parity_refuses_what_it_cannot_stream(args, message, tmp_path, capsys):
    from kvtrace import cli

    art = export_checkpoint(tiny_hf.checkpoint("xglm_scaled"), tmp_path / "a", max_seq=64, **QUIET)
    (tmp_path / "g.npz").write_bytes(b"")
    rc = cli.main(["parity", str(art), *[str(tmp_path / a) if a == "g.npz" else a for a in args]])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err, err


def test_streamed_parity_of_a_builtin_artifact_is_refused(tmp_path, capsys):
    from kvtrace import cli

    rc = cli.main(["export", "--arch", "llama", "--out", str(tmp_path / "b"), "--max-seq", "32"])
    assert rc == 0
    capsys.readouterr()
    rc = cli.main(["parity", str(tmp_path / "b"), "--streamed"])
    err = capsys.readouterr().err
    assert rc != 0 and "built-in configuration" in err and "--checkpoint DIR" in err, err


def test_bounded_whole_graph_step_runs_piece_by_piece_and_fails_on_inf(tmp_path):
    """Bounded validation's whole-graph step (one-token prompt, one decode step) runs piece by
    piece; an Inf planted in the last block (beyond the truncated graph) makes it fail."""
    from kvtrace.errors import ParityFailure

    ck = tiny_hf.deeper("neox_parallel_r025", 4)
    art = export_checkpoint(ck, tmp_path / "a", max_seq=32, validation="bounded", **QUIET)
    v = load_manifest(art)["validation"]
    assert v["whole_graph"]["finite"] is True and "piece by piece (6 pieces)" in v["whole_graph"]["ran"]
    cfg = open_checkpoint(ck).config
    assert validate._smoke(art, cfg, lambda m: None)["finite"]
    _perturb(art, "layers.3.mlp.down.bias", by=float("inf"))
    with pytest.raises(ParityFailure, match="non-finite logits"):
        validate._smoke(art, cfg, lambda m: None)
