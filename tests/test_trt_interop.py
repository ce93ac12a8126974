"""Artifacts a TensorRT user takes as they are (issue 15), checked with TensorRT-RTX and no GPU:

* the artifact's TensorRT graph (manifest graphs.gpu, model.gpu.onnx) parses with the raw
  TensorRT-RTX OnnxParser.parse_from_file, no kvtrace code in between, into the fused layers,
  for every architecture and dtype (and the quantised forms, once they exist: QUANT);
* `kvtrace build ART --print-trtexec` prints a command whose profiles, when built with the raw
  TensorRT-RTX API (outside kvtrace), give an engine that `kvtrace build ART --import` accepts;
  engines from another graph, files that are no engines, truncated engines are refused in one
  line with the artifact untouched;
* the binding check of a deserialized engine (which needs a GPU: here on stand-in engines), used
  by --import on a GPU machine and by the tensorrt backend before every run;
* the portable (--opset 17) GPU form is the spelling TensorRT fuses into one attention kernel per
  layer (TensorRT without IAttention, e.g. 10.3 on JetPack 6), where model.onnx's is not.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if importlib.util.find_spec("tensorrt_rtx") is None:
    print("test_trt_interop: skipped, tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13)")
    pytest.skip("tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

import tensorrt_rtx as trt  # noqa: E402

from kvtrace import cli, configs, io_spec  # noqa: E402
from kvtrace.errors import KvtraceError  # noqa: E402
from kvtrace.runtime import trt_backend, trt_engine  # noqa: E402

ARCHS = sorted(configs.BUILTIN)
DTYPES = ["float32", "float16", "bfloat16"]
# weight-only quantisation (issue 11) adds its forms here, e.g. "int8", "int4": the GPU form is
# built by the same builder from the same options, so it must parse the same way
QUANT = [None]
MAX_SEQ = 32


class _Logger(trt.ILogger):
    def __init__(self):
        trt.ILogger.__init__(self)
        self.errors = []

    def log(self, severity, msg):
        if severity <= trt.ILogger.Severity.ERROR:
            self.errors.append(str(msg))


def _export(tmp_path: Path, arch: str, dtype: str, *, layout="static", opset=None, quant=None, seed=None) -> Path:
    import torch

    from kvtrace.exporter.export import export_model
    from kvtrace.models.transformer import random_model

    model = random_model(configs.BUILTIN[arch], configs.BUILTIN_SEED if seed is None else seed, getattr(torch, dtype))
    opts = {"quant": quant} if quant else {}
    if opset:
        opts["opset"] = opset
    return export_model(model, tmp_path / f"{arch}-{dtype}-{layout}", dtype=dtype, layout=layout, max_seq=MAX_SEQ,
                        max_batch=4, validate=False, tokenizer="builtin-bytes", log=lambda m: None, **opts)


def _raw_parse(path: Path):
    """The raw TensorRT-RTX parser on a file: (ok, errors, network, keep-alive objects)."""
    logger = _Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return ok, errors, network, (logger, builder, parser)


# ------------------------------------------------------------------ 1. the TensorRT graph, as it is
@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_tensorrt_graph_parses_as_is_into_fused_layers(tmp_path, arch, dtype, quant):
    art = _export(tmp_path, arch, dtype, quant=quant)
    manifest = json.loads((art / io_spec.MANIFEST_NAME).read_text())
    graph = art / manifest["graphs"]["gpu"]["onnx"]  # what a trtexec user is told to take
    ok, errors, network, _keep = _raw_parse(graph)
    assert ok, errors
    layers = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    L = configs.BUILTIN[arch].n_layers
    assert layers["ATTENTION_INPUT"] == layers["ATTENTION_OUTPUT"] == L, layers
    assert layers["KV_CACHE_UPDATE"] == 2 * L, layers
    assert layers["ROTARY_EMBEDDING"] == (2 * L if configs.BUILTIN[arch].positions == "rope" else 0), layers
    assert layers["SOFTMAX"] == 0, layers
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    assert names == {t["name"] for t in manifest["io"]["inputs"]}


def test_parser_rejects_softmax_precision(tmp_path):
    """The check above can fail: the same graph with `softmax_precision` on its Attention nodes
    (what model.onnx carried before) is refused by the parser, with the text docs/tensorrt.md quotes."""
    import onnx

    art = _export(tmp_path, "gpt_neox", "float16")
    m = onnx.load(str(art / "model.gpu.onnx"), load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "Attention":
            n.attribute.append(onnx.helper.make_attribute("softmax_precision", onnx.TensorProto.FLOAT))
    bad = art / "with_softmax_precision.onnx"  # beside model.onnx.data, which it shares
    onnx.save(m, str(bad))
    ok, errors, _, _keep = _raw_parse(bad)
    assert not ok
    assert "Setting softmax precision is not supported in TensorRT Attention." in " ".join(errors)


def test_old_artifact_builds_from_model_onnx(tmp_path, capsys):
    """An artifact exported before graphs.gpu existed: `kvtrace build` takes model.onnx and drops
    softmax_precision in memory, as it always did; --print-trtexec says to export again."""
    import onnx

    art = _export(tmp_path, "llama", "float16")
    m = onnx.load(str(art / "model.gpu.onnx"), load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "Attention":
            n.attribute.append(onnx.helper.make_attribute("softmax_precision", onnx.TensorProto.FLOAT))
    onnx.save(m, str(art / "model.onnx"))
    data = json.loads((art / io_spec.MANIFEST_NAME).read_text())
    del data["graphs"]
    data.pop("files", None)
    (art / "model.gpu.onnx").unlink()
    (art / io_spec.MANIFEST_NAME).write_text(json.dumps(data))
    assert cli.main(["build", str(art), "--compute-capability", "sm89", "--optimization-level", "0"]) == 0
    sec = json.loads((art / io_spec.MANIFEST_NAME).read_text())["tensorrt"]
    assert sec["onnx"] == "model.onnx" and sec["stripped_attributes"] == {"softmax_precision": 2}
    capsys.readouterr()
    assert cli.main(["build", str(art), "--print-trtexec"]) == 2
    assert "export it again" in capsys.readouterr().err


# ------------------------------------------------------------------ 2. --print-trtexec, a raw build, --import
def _parse_command(text: str) -> dict:
    """The printed command -> {"tool", "onnx", "profiles": [{name: (min, opt, max)}], "flags", "engine"}."""
    argv = shlex.split(text.replace("\\\n", " "))
    out = {"tool": argv[0], "profiles": [], "flags": []}
    for a in argv[1:]:
        key, _, val = a.partition("=")
        if key == "--onnx":
            out["onnx"] = val
        elif key == "--profile":
            assert int(val) == len(out["profiles"])
            out["profiles"].append({})
        elif key in ("--minShapes", "--optShapes", "--maxShapes"):
            slot = ("--minShapes", "--optShapes", "--maxShapes").index(key)
            for spec in val.split(","):
                name, _, dims = spec.rpartition(":")
                shape = [int(x) for x in dims.split("x")]
                out["profiles"][-1].setdefault(name, [None, None, None])[slot] = shape
        elif key == "--saveEngine":
            out["engine"] = val
        else:
            out["flags"].append(a)
    return out


def _raw_build(cmd: dict, engine: Path, onnx_file: str | None = None, rename: dict | None = None) -> Path:
    """Build what the command asks with the raw TensorRT-RTX API (as tensorrt_rtx/trtexec would)."""
    ok, errors, network, (logger, builder, _parser) = _raw_parse(Path(onnx_file or cmd["onnx"]))
    assert ok, errors
    if "--decomposableAttentions=*" in cmd["flags"]:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.ATTENTION_OUTPUT:
                layer.__class__ = trt.IAttentionBoundaryLayer
                layer.attention.decomposable = True
    config = builder.create_builder_config()
    ccs = [f for f in cmd["flags"] if f.startswith("--computeCapabilities=")]
    caps = ccs[0].split("=")[1].split(",") if ccs else ["89"]
    config.num_compute_capabilities = len(caps)
    for i, c in enumerate(caps):
        config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{c}"), i)
    config.builder_optimization_level = 0
    for prof in cmd["profiles"]:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape((rename or {}).get(name, name), lo, opt, hi)
        config.add_optimization_profile(p)
    blob = builder.build_serialized_network(network, config)
    assert blob is not None, logger.errors
    engine.write_bytes(bytes(blob))
    return engine


def _print(capsys, art: Path, *extra) -> str:
    capsys.readouterr()
    assert cli.main(["build", str(art), "--print-trtexec", *extra]) == 0
    return capsys.readouterr().out


def test_print_trtexec_exact(tmp_path, capsys):
    """The whole command for a small fp32 artifact, written out by hand from the I/O contract:
    decode profile (one token) then prefill (1..max_seq, opt min(128, max_seq)), batch 1..max_batch,
    the static cache fixed; fp32 fused attention marked decomposable; no inference run."""
    art = _export(tmp_path, "llama", "float32")
    text = _print(capsys, art, "--max-batch", "2", "--max-seq", "8")
    cache = lambda b: ",".join(f"past_key_values.{i}.{kv}:{b}x2x{MAX_SEQ}x16" for i in range(2)  # noqa: E731
                               for kv in ("key", "value"))
    ids = lambda b, t, n: f"input_ids:{b}x{t},position_ids:{b}x{t},logits_index:{b}x{n}"  # noqa: E731
    want = [
        "trtexec", f"--onnx={art}/model.gpu.onnx",
        "--profile=0", f"--minShapes={ids(1, 1, 1)},{cache(1)}", f"--optShapes={ids(1, 1, 1)},{cache(1)}",
        f"--maxShapes={ids(2, 1, 1)},{cache(2)}",
        "--profile=1", f"--minShapes={ids(1, 1, 1)},{cache(1)}", f"--optShapes={ids(1, 8, 1)},{cache(1)}",
        f"--maxShapes={ids(2, 8, 8)},{cache(2)}",
        "--stronglyTyped", "--decomposableAttentions=*", f"--saveEngine={art}/model.engine", "--skipInference"]
    assert text.strip() == " \\\n  ".join(shlex.quote(a) for a in want)
    # fp16: no decomposable attention; TensorRT-RTX's tool names its targets instead of --stronglyTyped
    art16 = _export(tmp_path, "llama", "float16")
    cmd = _parse_command(_print(capsys, art16, "tensorrt_rtx", "--compute-capability", "sm89", "sm120"))
    assert cmd["tool"] == "tensorrt_rtx" and cmd["flags"] == ["--computeCapabilities=89,120", "--skipInference"]


@pytest.mark.parametrize("arch,dtype,layout,opset", [("llama", "float16", "static", None),
                                                     ("gpt_neox", "float32", "static", None),
                                                     ("starcoder2", "float16", "dynamic", 17)])
def test_engine_built_outside_kvtrace_is_imported(tmp_path, capsys, arch, dtype, layout, opset):
    art = _export(tmp_path, arch, dtype, layout=layout, opset=opset)
    opts = ["--max-batch", "2", "--max-seq", "16"]
    cmd = _parse_command(_print(capsys, art, "tensorrt_rtx", "--compute-capability", "sm89", *opts))
    assert cmd["onnx"] == str(art / "model.gpu.onnx") and len(cmd["profiles"]) == 2
    engine = _raw_build(cmd, tmp_path / "outside.engine")
    capsys.readouterr()
    assert cli.main(["build", str(art), "--import", str(engine), *opts, "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["flavour"] == "tensorrt_rtx" and out["version"] == ".".join(trt.__version__.split(".")[:3])
    assert "header (magic, size, version)" in out["checked"] and "no NVIDIA GPU" in out["not_checked"]
    sec = json.loads((art / io_spec.MANIFEST_NAME).read_text())["tensorrt"]
    assert (art / "model.engine").read_bytes() == engine.read_bytes()
    import hashlib

    assert sec["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    got = [{n: [r["min"], r["opt"], r["max"]] for n, r in p["inputs"].items()} for p in sec["profiles"]]
    assert got == cmd["profiles"] and sec["limits"] == {"max_batch": 2, "max_seq": 16}
    assert sec["imported"]["from"] == str(engine)
    # the recorded version is accepted by the installed TensorRT-RTX (three parts from the header)
    trt_backend.check_engine_compatible(sec, flavour="tensorrt_rtx", version=trt.__version__, device_cc="sm89")
    with pytest.raises(KvtraceError, match="built with tensorrt_rtx"):
        trt_backend.check_engine_compatible(sec, flavour="tensorrt_rtx", version="1.8.0.1", device_cc="sm89")


@pytest.fixture(scope="module")
def art_and_engine(tmp_path_factory):
    """An fp16 llama artifact and an engine built outside kvtrace from its printed command."""
    tmp = tmp_path_factory.mktemp("imp")
    art = _export(tmp, "llama", "float16")
    from kvtrace.exporter.trt import plan_profiles
    from kvtrace.exporter.trt_interop import trtexec_command
    from kvtrace.manifest import load_manifest

    m = load_manifest(art)
    argv = trtexec_command(m, plan_profiles(m.io)[0], tool="tensorrt_rtx", compute_capabilities=["sm89"])
    cmd = _parse_command(" ".join(shlex.quote(a) for a in argv))
    return art, cmd, _raw_build(cmd, tmp / "good.engine")


def _unchanged(art: Path):
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    return lambda: {p.name: p.read_bytes() for p in art.iterdir()} == before


def test_import_refuses_an_engine_of_another_graph(tmp_path, capsys, art_and_engine):
    """An engine built from a graph whose input `position_ids` is called `positions`: one line naming
    the tensor, exit 2, the artifact untouched."""
    import onnx

    art, cmd, _ = art_and_engine
    m = onnx.load(str(art / "model.gpu.onnx"), load_external_data=False)
    for vi in m.graph.input:
        if vi.name == "position_ids":
            vi.name = "positions"
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x == "position_ids":
                n.input[i] = "positions"
    other = tmp_path / "other"
    other.mkdir()
    os.link(art / "model.onnx.data", other / "model.onnx.data")
    onnx.save(m, str(other / "model.gpu.onnx"))
    engine = _raw_build(cmd, tmp_path / "renamed.engine", onnx_file=str(other / "model.gpu.onnx"),
                        rename={"position_ids": "positions"})
    same = _unchanged(art)
    capsys.readouterr()
    assert cli.main(["build", str(art), "--import", str(engine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--import {engine}: the engine does not have the artifact's tensor(s) position_ids" in err
    assert same()


def test_import_refuses_files_that_are_not_engines(tmp_path, capsys, art_and_engine):
    art, _, good = art_and_engine
    same = _unchanged(art)
    truncated = tmp_path / "truncated.engine"
    truncated.write_bytes(good.read_bytes()[:-100])
    cases = [(art / "model.gpu.onnx", "not a TensorRT engine (an ONNX model"),
             (truncated, f"the engine header records {good.stat().st_size} bytes but the file has"),
             (tmp_path / "absent.engine", "cannot read the engine")]
    for path, msg in cases:
        capsys.readouterr()
        assert cli.main(["build", str(art), "--import", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
    # options of a build make no sense with --import or --print-trtexec
    for flag in ("--import", "--print-trtexec"):
        args = [flag, str(good)] if flag == "--import" else [flag]
        assert cli.main(["build", str(art), *args, "--timing-cache", str(tmp_path / "t")]) == 2
        assert "--timing-cache only apply to a build" in capsys.readouterr().err
    assert same()


def test_header_of_full_tensorrt_engines():
    """'ftrt' (the full TensorRT): the flavour is known, the version is not in a documented place."""
    h = trt_engine.read_header(b"ftrt" + bytes(60), "x.engine")
    assert h == {"flavour": "tensorrt", "version": None, "checked": ["magic"]}
    with pytest.raises(ValueError, match="x.engine: not a TensorRT engine"):
        trt_engine.read_header(b"PK\x03\x04" + bytes(60), "x.engine")


# ------------------------------------------------------------------ 3. the binding check (a GPU's part), on stand-ins
class _Engine:
    """A deserialized engine as the TensorRT API shows it, made from an I/O spec and profiles."""

    def __init__(self, io: dict, profiles: list[dict]):
        self.tensors = {}
        for t in io["inputs"]:
            self.tensors[t["name"]] = ["in", t["dtype"], [d if isinstance(d, int) else -1 for d in t["shape"]]]
        for t in io["outputs"]:
            self.tensors[t["name"]] = ["out", t["dtype"], [d if isinstance(d, int) else -1 for d in t["shape"]]]
        self.tensors["logits"][2][1] = 1  # the engine-level output shape follows the decode profile
        self.profiles = json.loads(json.dumps(profiles))
        self.aliases = dict(io.get("cache_aliases") or {})

    @property
    def num_io_tensors(self):
        return len(self.tensors)

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def get_tensor_shape(self, name):
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name, idx):
        r = self.profiles[idx]["inputs"][name]
        return r["min"], r["opt"], r["max"]

    def get_aliased_input_tensor(self, name):
        return self.aliases.get(name)


_FAKE_TRT = types.SimpleNamespace(
    TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
    DataType=types.SimpleNamespace(FLOAT="float32", HALF="float16", BF16="bfloat16", INT64="int64",
                                   INT32="int32", BOOL="bool"))


def _contract(layout="static"):
    from kvtrace.exporter.trt import plan_profiles

    cfg = configs.BUILTIN["llama"]
    io = io_spec.build(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                       vocab_size=cfg.vocab_size, dtype="float16", layout=layout, max_seq=MAX_SEQ, max_batch=4)
    return io, plan_profiles(io)[0]


def test_check_bindings_finds_each_mismatch():
    io, profiles = _contract()
    assert trt_engine.check_bindings(_FAKE_TRT, _Engine(io, profiles), io, profiles) == ([], profiles)
    cases = [
        (lambda e: e.tensors["past_key_values.1.value"].__setitem__(1, "float32"),
         "past_key_values.1.value is float32 in the engine, float16 in the contract"),
        (lambda e: e.tensors["past_key_values.0.key"][2].__setitem__(2, 16),
         "past_key_values.0.key has dims [-1, 2, 16, 16] in the engine"),
        (lambda e: e.tensors.__setitem__("positions", e.tensors.pop("position_ids")),
         "tensor(s) position_ids missing from the engine"),
        (lambda e: e.profiles[1]["inputs"]["input_ids"].__setitem__("max", [4, 16]),
         "profile 1 (prefill) of input_ids: engine min/opt/max [1, 1]/[1, 32]/[4, 16]"),
        (lambda e: e.profiles.pop(), "the engine has 1 optimization profile(s), the manifest records 2"),
        (lambda e: e.aliases.pop("present.0.key"), "present.0.key should update past_key_values.0.key in place"),
        (lambda e: e.tensors["logits"].__setitem__(0, "in"), "logits is an input of the engine"),
    ]
    for mutate, msg in cases:
        eng = _Engine(io, profiles)
        mutate(eng)
        problems, _ = trt_engine.check_bindings(_FAKE_TRT, eng, io, profiles)
        assert any(msg in p for p in problems), (msg, problems)


def test_import_on_a_gpu_machine_checks_bindings(tmp_path, capsys, monkeypatch, art_and_engine):
    """With a GPU (stood in for: the engine file is real, its deserialization is a stand-in built
    from the artifact's contract), --import reads the profiles from the engine and refuses a
    binding mismatch in one line."""
    art0, _, good = art_and_engine
    art = Path(shutil.copytree(art0, tmp_path / "art"))
    io = json.loads((art / io_spec.MANIFEST_NAME).read_text())["io"]
    from kvtrace.exporter.trt import plan_profiles

    profiles = plan_profiles(io, max_batch=2)[0]
    engines = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            assert bytes(blob) == good.read_bytes()
            return engines[-1]

    fake = types.SimpleNamespace(__version__="1.7.1.116", Runtime=Runtime, ILogger=trt.ILogger, **vars(_FAKE_TRT))
    monkeypatch.setattr("kvtrace.exporter.trt_interop.gpu_compute_capability", lambda: "sm89")
    monkeypatch.setattr("kvtrace.exporter.trt_interop.import_tensorrt", lambda flavour=None, minimum=None:
                        (fake, "tensorrt_rtx"))
    engines.append(_Engine(io, profiles))
    capsys.readouterr()
    assert cli.main(["build", str(art), "--import", str(good)]) == 0, capsys.readouterr().err
    sec = json.loads((art / io_spec.MANIFEST_NAME).read_text())["tensorrt"]
    assert sec["profiles"] == profiles and sec["limits"] == {"max_batch": 2, "max_seq": MAX_SEQ}  # from the engine
    assert sec["version"] == "1.7.1.116" and sec["compute_capabilities"] == ["sm89"]
    assert sec["imported"]["not_checked"] is None and sec["imported"]["profiles"] == "read from the engine"
    bad = _Engine(io, profiles)
    bad.tensors["input_ids"][1] = "int32"
    engines.append(bad)
    same = _unchanged(art)
    capsys.readouterr()
    assert cli.main(["build", str(art), "--import", str(good)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input_ids is int32 in the engine, int64 in the contract" in err
    assert same()


def test_backend_checks_an_imported_engine_before_running(tmp_path, art_and_engine, monkeypatch):
    """An engine imported without a GPU (profiles assumed as documented) whose real profiles
    differ: the tensorrt backend refuses it when loading, before any run, naming the mismatch."""
    from kvtrace.runtime.model import Model

    art0, _, good = art_and_engine
    art = Path(shutil.copytree(art0, tmp_path / "art"))
    assert cli.main(["build", str(art), "--import", str(good), "--max-batch", "2"]) == 0
    data = json.loads((art / io_spec.MANIFEST_NAME).read_text())
    io, recorded = data["io"], data["tensorrt"]["profiles"]
    from kvtrace.exporter.trt import plan_profiles

    actual = plan_profiles(io)[0]  # the engine was built for batch 8, not 2

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return _Engine(io, actual)

    class Cuda:
        compute_capability = "sm89"

        def __init__(self, device=0):
            pass

        def current(self):
            pass

        def sync(self):
            pass

        def close(self):
            pass

    fake = types.SimpleNamespace(__version__=trt.__version__, Runtime=Runtime, ILogger=trt.ILogger, **vars(_FAKE_TRT))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda flavour=None, minimum=None: (fake, "tensorrt_rtx"))
    monkeypatch.setattr(trt_backend, "CudaDriver", Cuda)
    assert recorded != actual
    with pytest.raises(KvtraceError, match=r"does not match the artifact: profile 0 \(decode\) of input_ids"):
        Model.load(art, backend="tensorrt")


# ------------------------------------------------------------------ 4. older TensorRT: the portable form
def test_tensorrt_10_runs_portable_artifacts_only(tmp_path, monkeypatch):
    """TensorRT 10.3 (JetPack 6) has no IAttention importer: refused for the fused graphs, accepted
    for the portable --opset 17 ones."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0.30"))
    portable = {"graphs": {"gpu": {"attention": "unfused"}}}
    fused = {"graphs": {"gpu": {"attention": "fused"}}}
    assert trt_backend.min_tensorrt(portable) == (10, 0) and trt_backend.min_tensorrt(fused) == (10, 15)
    mod, flavour = trt_backend.import_tensorrt("tensorrt", trt_backend.min_tensorrt(portable))
    assert flavour == "tensorrt" and mod.__version__ == "10.3.0.30"
    with pytest.raises(KvtraceError, match=r"tensorrt 10.3.0.30 is older than 10.15 \(no fused attention layers; "
                                           r"the portable --opset 17 artifacts build with TensorRT 10\)"):
        trt_backend.import_tensorrt("tensorrt", trt_backend.min_tensorrt(fused))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])  # GQA (K/V repeated to all heads), MHA
def test_portable_gpu_form_fuses_attention(tmp_path, arch):
    """TensorRT-RTX's builder report: the portable GPU form (fp16 MatMuls, fp32 softmax between,
    K/V repeated to all heads) gets one fused attention kernel per layer in both profiles, where
    model.onnx of the same artifact (q/k cast to fp32, GQA as 5-D groups) gets none."""
    from kvtrace.exporter import trt as build
    from kvtrace.manifest import load_manifest

    art = _export(tmp_path, arch, "float16", layout="dynamic", opset=17)
    m = load_manifest(art)
    L = configs.BUILTIN[arch].n_layers
    kernels = {}
    for f in (art / "model.gpu.onnx", art / "model.onnx"):
        logger = trt_backend.TrtLogger(trt)
        builder = trt.Builder(logger)
        network, _parser, _ = build.parse_network(trt, builder, logger, f)
        profiles, _ = build.plan_profiles(m.io, max_seq=16)
        config = build.configure(trt, builder, "tensorrt_rtx", ccs=["sm89"], optimization_level=0)
        build.add_profiles(builder, config, network, profiles, f)
        build.build_serialized(builder, network, config, logger, f)
        kernels[f.name] = build.attention_kernels(logger.layer_info, len(profiles))
    print(kernels)
    gpu = kernels["model.gpu.onnx"]
    assert [sum(k.values()) for k in gpu] == [L, L] and all("_mha" in n for k in gpu for n in k), gpu
    assert kernels["model.onnx"] == [{}, {}]


def test_print_and_import_need_no_torch_onnx_or_tensorrt(tmp_path, art_and_engine):
    """On the device only the runtime is installed: --print-trtexec and --import (no GPU path)
    import neither torch nor onnx nor TensorRT."""
    import subprocess
    import textwrap

    art0, _, good = art_and_engine
    art = Path(shutil.copytree(art0, tmp_path / "art"))
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "tensorrt", "tensorrt_rtx"):
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, _Block())
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvtrace.cli", "build", str(art), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    p = run("--print-trtexec")
    assert p.returncode == 0 and p.stdout.startswith("trtexec"), p.stderr
    p = run("--import", str(good))
    assert p.returncode == 0 and "imported" in p.stdout, p.stderr
    p = run("--compute-capability", "sm89")  # a build does need TensorRT: one line saying which extra
    assert p.returncode == 2 and "TensorRT is not installed" in p.stderr, p.stderr
