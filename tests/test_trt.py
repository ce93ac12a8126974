"""`kvtrace build` and the tensorrt backend, up to where a GPU is needed.

Engines are built without a GPU by TensorRT-RTX for a named compute capability (sm89), from
artifacts made by the real exporter: every architecture's tiny transformers variants (loaded by
the real checkpoint loader) and built-in configurations, fp16 and fp32. The network TensorRT
parsed must hold the fused layers: one attention per transformer layer, two in-place cache
updates per layer, rotary embeddings for the rope architectures, and no softmax anywhere.
Engine execution needs a supported GPU (not H100/H200 for TensorRT-RTX): not tested here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace.errors import KvtraceError  # noqa: E402

if importlib.util.find_spec("tensorrt_rtx") is None:
    print("test_trt: skipped, tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13)")
    pytest.skip("tensorrt_rtx is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

from kvtrace import configs  # noqa: E402
from kvtrace import cli  # noqa: E402
from kvtrace.runtime import trt_backend  # noqa: E402
from kvtrace.manifest import load_manifest  # noqa: E402

# Lowest builder optimization level: the network (what is checked) is the same; the build is faster.
OPT = ["--optimization-level", "0"]
MAX_SEQ = 64


def _export(model, out: Path, dtype: str, layout: str = "static", **kw) -> Path:
    from kvtrace.exporter.export import export_model

    return export_model(model, out, dtype=dtype, layout=layout, max_seq=MAX_SEQ, max_batch=4, validate=False,
                        source={"kind": "test"}, log=lambda *a, **k: None, **kw)


def _model(kind: str, name: str, dtype: str):
    import torch
    from kvtrace.models.transformer import random_model

    assert kind == "builtin"
    return random_model(configs.BUILTIN[name], configs.BUILTIN_SEED, getattr(torch, dtype))


def _build(capsys, art: Path, *extra) -> dict:
    rc = cli.main(["build", str(art), "--compute-capability", "sm89", "--inspect", "--json", *OPT, *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


def _cases():
    from tests import tiny_hf

    cases = [("builtin", a) for a in configs.BUILTIN] + [("hf", v) for v in tiny_hf.VARIANTS]
    return [(k, n, d) for k, n in cases for d in ("float16", "float32")] + [("builtin", "gpt_neox", "bfloat16")]


@pytest.mark.parametrize("kind,name,dtype", _cases())
def test_static_engine_has_fused_layers(tmp_path, capsys, exported, kind, name, dtype):
    if kind == "hf":  # the session's shared export (tests/conftest.py), copied: building adds files
        art = Path(shutil.copytree(exported(name, "static", dtype, max_seq=MAX_SEQ), tmp_path / "art"))
    else:
        art = _export(_model(kind, name, dtype), tmp_path / "art", dtype)
    cfg = load_manifest(art).config()
    res = _build(capsys, art)
    layers, L = res["layers"], cfg.n_layers
    assert layers.get("ATTENTION") == L and layers.get("ATTENTION_INPUT") == L, layers
    assert layers.get("KV_CACHE_UPDATE") == 2 * L, layers
    assert layers.get("SOFTMAX", 0) == 0, layers
    if cfg.positions == "rope":
        assert layers.get("ROTARY_EMBEDDING") == 2 * L, layers  # q and k
    else:
        assert layers.get("ROTARY_EMBEDDING", 0) == 0, layers
    engine = Path(res["engine"])
    assert engine.parent == art and engine.stat().st_size > 0
    sec = load_manifest(art).data["tensorrt"]
    assert sec["flavour"] == "tensorrt_rtx" and sec["compute_capabilities"] == ["sm89"]
    assert sec["engine"] == engine.name and sec["attention_decomposable"] == (dtype == "float32")
    assert [p["name"] for p in sec["profiles"]] == ["decode", "prefill"]
    assert not list(art.glob(".*tmp")), "temporary files left behind"


@pytest.mark.parametrize("arch", sorted(configs.BUILTIN))
def test_dynamic_cache_engine_builds(tmp_path, capsys, arch):
    # fp16 for every architecture, fp32 (decomposable attention) for one
    dtype = "float32" if arch == "llama" else "float16"
    model = _model("builtin", arch, dtype)
    art = _export(model, tmp_path / "dyn", dtype, layout="dynamic")
    layers = _build(capsys, art)["layers"]
    L = model.cfg.n_layers
    assert layers.get("ATTENTION") == L and layers.get("SOFTMAX", 0) == 0, layers
    assert layers.get("KV_CACHE_UPDATE", 0) == 0, layers  # concatenation, not in place
    prof = load_manifest(art).data["tensorrt"]["profiles"][1]["inputs"]["past_key_values.0.key"]
    assert prof["min"][2] == 0 and prof["max"][2] == MAX_SEQ - 1


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A built fp16 gpt_neox static artifact (default optimization level)."""
    art = _export(_model("builtin", "gpt_neox", "float16"), tmp_path_factory.mktemp("t") / "neox", "float16")
    assert load_manifest(art).data["external_data"]
    assert cli.main(["build", str(art), "--compute-capability", "sm89", "sm120", "--max-batch", "2",
                     "--max-seq", "32", "--opt-seq", "8"]) == 0
    return art


def test_build_records_profiles_and_limits(built):
    sec = load_manifest(built).data["tensorrt"]
    assert sec["compute_capabilities"] == ["sm89", "sm120"]
    assert sec["limits"] == {"max_batch": 2, "max_seq": 32}
    dec, pre = sec["profiles"]
    assert dec["inputs"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 1]}
    assert pre["inputs"]["input_ids"] == {"min": [1, 1], "opt": [1, 8], "max": [2, 32]}
    # logits_index: one row per sequence when decoding; 1 (generation, the opt) to all tokens in a prefill
    assert dec["inputs"]["logits_index"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 1]}
    assert pre["inputs"]["logits_index"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 32]}
    # a static cache keeps its exported length MAX_SEQ in every profile
    assert pre["inputs"]["past_key_values.0.key"]["max"][2] == MAX_SEQ
    # built from the GPU form, parsed from the file as it is (nothing stripped in memory)
    assert sec["onnx"] == "model.gpu.onnx" and sec["stripped_attributes"] == {}
    assert sec["attention_kernels"] == [{"_gemv_mha_v1": 2}, {"_gemm_mha_v2": 2}]  # one fused kernel per layer
    import hashlib
    assert hashlib.sha256((built / sec["engine"]).read_bytes()).hexdigest() == sec["engine_sha256"]


def test_request_must_fit_profiles(built):
    sec = load_manifest(built).data["tensorrt"]
    cache = (2, 4, MAX_SEQ, 16)
    caches = {f"past_key_values.{i}.{kv}": cache for i in range(2) for kv in ("key", "value")}
    assert trt_backend.fit_profile(sec, {"input_ids": (2, 1), **caches}) == 0  # decode
    assert trt_backend.fit_profile(sec, {"input_ids": (1, 32), **caches}) == 1  # prefill
    with pytest.raises(KvtraceError, match=r"input_ids \(1, 33\).*--max-seq"):
        trt_backend.fit_profile(sec, {"input_ids": (1, 33), **caches})
    big = {k: (3, *v[1:]) for k, v in caches.items()}
    with pytest.raises(KvtraceError, match=r"batch <= 2.*--max-batch"):
        trt_backend.fit_profile(sec, {"input_ids": (3, 1), **big})


def test_engine_from_other_version_or_gpu_is_refused(built):
    sec = load_manifest(built).data["tensorrt"]
    ok = dict(flavour="tensorrt_rtx", version=sec["version"])
    trt_backend.check_engine_compatible(sec, **ok, device_cc="sm89")
    trt_backend.check_engine_compatible(sec, **ok, device_cc="sm120")
    with pytest.raises(KvtraceError, match="built with tensorrt_rtx .* but tensorrt_rtx 9.9.9 is installed"):
        trt_backend.check_engine_compatible(sec, flavour="tensorrt_rtx", version="9.9.9", device_cc="sm89")
    with pytest.raises(KvtraceError, match="built with tensorrt_rtx .* but tensorrt "):
        trt_backend.check_engine_compatible(sec, flavour="tensorrt", version=sec["version"], device_cc="sm89")
    with pytest.raises(KvtraceError, match="built for compute capability sm89, sm120, but this GPU is sm86"):
        trt_backend.check_engine_compatible(sec, **ok, device_cc="sm86")
    with pytest.raises(KvtraceError, match="compute capability 9.0"):
        trt_backend.check_engine_compatible(sec, **ok, device_cc="sm90")


def _has_gpu() -> bool:
    return trt_backend.gpu_compute_capability() is not None


@pytest.mark.skipif(_has_gpu(), reason="this machine has an NVIDIA GPU (the no-GPU error cannot occur)")
def test_backend_without_gpu_says_so(built):
    from kvtrace.runtime.model import Model

    with pytest.raises(KvtraceError, match="needs an NVIDIA GPU"):
        Model.load(built, backend="tensorrt")
    # backend auto tries tensorrt (the manifest has an engine) and falls back to onnxruntime
    m = Model.load(built, backend="auto")
    try:
        assert m.backend_name == "onnxruntime"
    finally:
        m.close()


@pytest.mark.skipif(_has_gpu(), reason="this machine has an NVIDIA GPU")
def test_build_without_gpu_needs_compute_capability(built, capsys):
    before = (built / "kvtrace.json").read_bytes()
    assert cli.main(["build", str(built)]) == 2
    assert "--compute-capability" in capsys.readouterr().err
    assert (built / "kvtrace.json").read_bytes() == before


def test_missing_tensorrt_names_the_packages(built, capsys, monkeypatch):
    for mod in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import` now raises ImportError
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    assert cli.main(["build", str(built), "--compute-capability", "sm89"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "tensorrt>=10.15" in err and "tensorrt-rtx-cu13" in err
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before  # nothing written
    with pytest.raises(KvtraceError, match="tensorrt-rtx-cu13"):
        trt_backend.TrtBackend(built, load_manifest(built))


@pytest.mark.parametrize("argv,msg", [
    (["--max-seq", str(MAX_SEQ + 1)], f"--max-seq {MAX_SEQ + 1} exceeds the artifact's static cache length"),
    (["--opt-seq", "40", "--max-seq", "32"], "--opt-seq 40"),
    (["--max-batch", "0"], "argument --max-batch: 0 is out of range"),
    (["--workspace", "0"], "argument --workspace: 0 is out of range"),
])
def test_bad_build_options(built, capsys, argv, msg):
    before = (built / "kvtrace.json").read_bytes()
    assert cli.main(["build", str(built), "--compute-capability", "sm89", *argv]) == 2
    assert msg in capsys.readouterr().err
    assert (built / "kvtrace.json").read_bytes() == before


def test_unknown_compute_capability(built, capsys):
    assert cli.main(["build", str(built), "--compute-capability", "sm90"]) == 2
    assert "--compute-capability 'sm90': expected one of sm75, sm80, sm86, sm89, sm120" in capsys.readouterr().err
    assert trt_backend.normalize_cc("8.9") == trt_backend.normalize_cc("SM_89") == "sm89"


def test_not_an_artifact(tmp_path, capsys):
    assert cli.main(["build", str(tmp_path / "nope"), "--compute-capability", "sm89"]) == 2
    assert "not an artifact directory" in capsys.readouterr().err


# ------------------------------------------------------------------ the backend's data flow, emulated
# No GPU here, so the TensorRT engine and the CUDA driver are replaced by host stand-ins: "device"
# memory is numpy memory addressed by pointer, and the "engine" runs the artifact's model.onnx with
# onnxruntime on whatever those pointers hold, writing outputs where the bound addresses point,
# and refusing a cache output not bound to its input's address (as KV_CACHE_UPDATE requires).
# This checks the backend's glue through the runtime's real Model/generate code (profile choice,
# staging of feeds, in-place cache binding, outputs the backend allocates), not TensorRT's API.
class _FakeCuda:
    compute_capability = "sm89"
    stream_handle = 0

    def __init__(self):
        self.mem: dict[int, "np.ndarray"] = {}

    def alloc(self, nbytes):
        import numpy as np

        a = np.zeros(max(int(nbytes), 1), np.uint8)
        self.mem[a.ctypes.data] = a
        return a.ctypes.data

    def free(self, ptr):
        self.mem.pop(ptr, None)

    free_later = free

    def host_alloc(self, nbytes):  # "pinned" host memory: plain numpy here
        import numpy as np

        from kvtrace.runtime.cuda_driver import HostBuffer

        a = np.zeros(max(int(nbytes), 1), np.uint8)
        self.mem[-a.ctypes.data] = a  # kept alive
        return HostBuffer(a.ctypes.data, a.nbytes)

    def free_host(self, buf):
        self.mem.pop(-buf.ptr, None)

    def current(self):
        pass

    def raise_deferred(self):
        pass

    def can_capture(self):
        return "emulated driver"

    def close(self):
        pass

    def view(self, ptr, shape, dtype):
        import numpy as np

        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[ptr][:n].view(dtype).reshape(shape)

    def zero(self, ptr, nbytes):
        self.mem[ptr][:nbytes] = 0

    def to_device(self, ptr, host):
        self.mem[ptr][: host.nbytes] = host.reshape(-1).view("uint8")

    def to_host(self, host, ptr):
        host.reshape(-1).view("uint8")[:] = self.mem[ptr][: host.nbytes]

    def sync(self):
        pass


def _fake_trt(onnx_file: Path, cuda: _FakeCuda, version: str, aliases: dict[str, str]):
    import types

    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    np_of = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    trt = types.SimpleNamespace(__version__=version)

    class ILogger:
        Severity = types.SimpleNamespace(ERROR=1, WARNING=2)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT=np.float32, HALF=np.float16, BF16="bf16", INT64=np.int64,
                                         INT32=np.int32, BOOL=np.bool_)
    io = {i.name: ("in", np_of[i.type]) for i in sess.get_inputs()}
    io.update({o.name: ("out", np_of[o.type]) for o in sess.get_outputs()})
    calls = {"profiles": [], "runs": 0}

    class Context:
        def __init__(self):
            self.shape, self.addr, self.result = {}, {}, None

        def set_optimization_profile_async(self, idx, stream):
            calls["profiles"].append(idx)
            return True

        def set_input_shape(self, name, shape):
            self.shape[name], self.result = tuple(shape), None
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def _compute(self):
            if self.result is None:
                feeds = {n: cuda.view(self.addr[n], self.shape[n], io[n][1]).copy()
                         for n in io if io[n][0] == "in"}
                self.result = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            return self.result

        def get_tensor_shape(self, name):
            return self._compute()[name].shape

        def execute_async_v3(self, stream):
            res = self._compute()
            for name, arr in res.items():
                alias = aliases.get(name)
                if alias and self.addr[name] != self.addr[alias]:
                    return False  # TensorRT: the cache output must be the cache input's memory
                cuda.view(self.addr[name], arr.shape, arr.dtype)[...] = arr
            calls["runs"] += 1
            self.result = None
            return True

    shapes = {t.name: [d if isinstance(d, int) else -1 for d in t.shape]
              for t in list(sess.get_inputs()) + list(sess.get_outputs())}

    class Engine:
        """Built with the profiles the artifact's manifest records (as `kvtrace build` builds)."""
        num_io_tensors = len(io)

        def __init__(self):
            manifest = json.loads((Path(onnx_file).parent / "kvtrace.json").read_text())
            self.profiles = manifest["tensorrt"]["profiles"]
            self.num_optimization_profiles = len(self.profiles)

        def get_tensor_name(self, i):
            return list(io)[i]

        def get_tensor_dtype(self, name):
            return io[name][1]

        def get_tensor_mode(self, name):
            return io[name][0]

        def get_tensor_shape(self, name):
            return shapes[name]

        def get_tensor_profile_shape(self, name, idx):
            r = self.profiles[idx]["inputs"][name]
            return r["min"], r["opt"], r["max"]

        def get_aliased_input_tensor(self, name):
            return aliases.get(name)

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine()

    trt.Runtime = Runtime
    return trt, calls


@pytest.mark.parametrize("layout", ["static", "dynamic"])
def test_backend_data_flow_emulated(tmp_path, capsys, monkeypatch, layout):
    from kvtrace.runtime.model import Model

    art = _export(_model("builtin", "llama", "float32"), tmp_path / layout, "float32", layout=layout,
                  tokenizer="builtin-bytes")
    _build(capsys, art, "--max-seq", "48")
    cuda = _FakeCuda()
    data = load_manifest(art).data
    trt, calls = _fake_trt(art / "model.onnx", cuda, data["tensorrt"]["version"], data["io"]["cache_aliases"])
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda flavour=None, minimum=None: (trt, "tensorrt_rtx"))
    monkeypatch.setattr(trt_backend, "CudaDriver", lambda device=0: cuda)
    prompts = [[0, 5, 9, 33, 70, 2], [0, 11]]
    ref = Model.load(art, backend="onnxruntime")
    want = [r.token_ids for r in ref.generate(prompts, max_new_tokens=12, greedy=True, stop_token_ids=[])]
    ref.close()
    m = Model.load(art, backend="tensorrt")
    assert m.backend_name == "tensorrt"
    got = [r.token_ids for r in m.generate(prompts, max_new_tokens=12, greedy=True, stop_token_ids=[])]
    assert got == want
    assert calls["runs"] == 12 and calls["profiles"][:2] == [1, 0]  # prefill profile, then decode
    # a prompt beyond the engine's --max-seq 48 (the cache holds 64) is refused with the remedy
    with pytest.raises(KvtraceError, match="--max-seq"):
        m.start([[3] * 50])
    m.close()
    assert not cuda.mem, "device or pinned buffers left after close()"
