"""The GPU code paths, run on the CPU against stand-ins (tests/gpu_fakes.py):

  * the CUDA driver layer and the tensorrt backend against a stub libcuda compiled here with gcc
    (per-thread contexts, 64-bit addresses, one stream, pinned staging, no allocation per step,
    release order, failing frees, stream capture and replay) with a fake TensorRT whose engine
    is the artifact's graph run by onnxruntime;
  * onnxruntime-cuda against an onnxruntime whose "CUDA" provider is the CPU one: strict session
    options, placement refusal, provider checks, CUDA-graph run options, fixed buffers.
Each compares the tokens/logits with the plain CPU backend, through Model. What these cannot
show is in docs/gpu.md.
"""
from __future__ import annotations

import ctypes
import json
import threading

import numpy as np
import pytest

from tests import gpu_fakes
from kvtrace import io_spec
from kvtrace.errors import KvtraceError
from kvtrace.runtime import backends, cuda_driver, trt_backend
from kvtrace.runtime.model import Model

PROMPTS = [[0, 5, 9, 33, 70, 2], [0, 11], [0, 7, 7, 7]]  # ragged
STEPS = 8


@pytest.fixture(scope="module")
def gpu_art(tmp_path_factory):
    """A static-cache llama artifact (GQA, rope) with the GPU form, tokenizer builtin-bytes."""
    from kvtrace import configs
    from kvtrace.exporter.export import export_model
    from kvtrace.models.transformer import random_model

    out = tmp_path_factory.mktemp("gpu") / "art"
    return export_model(random_model(configs.BUILTIN["llama"], 7), out, max_seq=32, max_batch=4, validate=False,
                        tokenizer="builtin-bytes", log=lambda m: None)


@pytest.fixture(scope="module")
def dyn_art(tmp_path_factory):
    from kvtrace import configs
    from kvtrace.exporter.export import export_model
    from kvtrace.models.transformer import random_model

    out = tmp_path_factory.mktemp("gpu") / "dyn"
    return export_model(random_model(configs.BUILTIN["llama"], 7), out, layout="dynamic", max_seq=32, max_batch=4,
                        validate=False, tokenizer="builtin-bytes", log=lambda m: None)


def _cpu_reference(art, **opts):
    """Prefill logits (last position per row) and STEPS greedy decode steps on the CPU backend."""
    m = Model.load(art, backend="onnxruntime", **opts)
    try:
        return _drive(m)
    finally:
        m.close()


def _drive(m, steps: int = STEPS, prompts=PROMPTS):
    first = m.start(prompts, logits="last")[:, 0]  # (B, V)
    out, toks = [first], []
    tok = first.argmax(-1)
    for _ in range(steps):
        toks.append(tok.tolist())
        logits = m.step(tok)
        out.append(logits)
        tok = logits.argmax(-1)
    return np.stack(out), toks  # (1 + steps, B, V)


# ------------------------------------------------------------------ the stub driver
@pytest.fixture(scope="module")
def stub_lib(tmp_path_factory):
    stub = gpu_fakes.StubCuda.build(tmp_path_factory.mktemp("stub"))
    if stub is None:
        print("test_gpu_paths: skipped, no C compiler (gcc/cc) to build the stub libcuda")
        pytest.skip("no C compiler (gcc/cc) to build the stub libcuda")
    return stub


@pytest.fixture
def stub(stub_lib, tmp_path, monkeypatch):
    stub_lib.reset(tmp_path / "cuda.log")
    monkeypatch.setattr(cuda_driver, "LIBCUDA_NAMES", (str(stub_lib.path),))
    yield stub_lib
    stub_lib.lib.stub_set_launch_callback(None)


def _rec(stub, fn):
    return [c for c in stub.calls() if c["fn"] == fn]


def test_stub_enforces_what_is_tested(stub):
    """The stub is strict where the tests rely on it: no current context on a thread -> 201;
    an address truncated to 32 bits -> 1. (So the passing tests below are not vacuous.)"""
    lib = stub.lib
    drv = cuda_driver.CudaDriver(0)
    ptr = drv.alloc(64)
    assert ptr >= gpu_fakes.TAG  # beyond 32 bits (and beyond 44)
    got = {}

    def bare():  # a thread that never made the context current
        p = ctypes.c_uint64(0)
        got["alloc"] = lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(8))

    t = threading.Thread(target=bare)
    t.start(), t.join()
    assert got["alloc"] == 201
    lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
    assert lib.cuMemFree_v2(ctypes.c_uint64(ptr & 0xFFFFFFFF)) == 1
    drv.free(ptr)
    drv.close()


def test_driver_threads_stream_pinned_and_release(stub):
    drv = cuda_driver.CudaDriver(0)
    ptr = drv.alloc(8 * 8)
    host = drv.host_alloc(64)
    host.view((8,), np.int64)[:] = np.arange(8)
    drv.to_device(ptr, host.view((8,), np.int64))
    out = np.zeros(8, np.int64)
    errors = []

    def worker():  # another thread: the driver must make its context current there first
        try:
            drv.to_host(out, ptr)
            drv.sync()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start(), t.join()
    assert not errors and out.tolist() == list(range(8))
    drv.free(ptr), drv.free_host(host)
    drv.close()
    drv.close()  # idempotent
    calls = stub.calls()
    tid_other = {c["tid"] for c in calls if c["fn"] == "cuMemcpyDtoHAsync"}
    assert len(tid_other) == 1 and tid_other != {calls[0]["tid"]}
    # on that thread the context was made current before its first driver call that needs one
    first_there = next(c for c in calls if c["tid"] in tid_other)
    assert first_there["fn"] == "cuCtxSetCurrent"
    (stream,) = [c["args"]["stream"] for c in _rec(stub, "cuStreamCreate")]
    assert _rec(stub, "cuStreamCreate")[0]["args"]["flags"] == "1"  # non-blocking
    async_calls = [c for c in calls if "stream" in c["args"] and c["fn"] != "cuStreamCreate"]
    assert async_calls and {c["args"]["stream"] for c in async_calls} == {stream}  # one stream
    assert _rec(stub, "cuMemcpyHtoDAsync")[0]["args"]["pinned"] == "1"
    order = [c["fn"] for c in calls[-3:]]
    assert order == ["cuStreamSynchronize", "cuStreamDestroy", "cuDevicePrimaryCtxRelease"]
    assert stub.lib.stub_context_refs() == 0 and stub.lib.stub_live(0) == 0 and stub.lib.stub_live(1) == 0
    assert all(c["rc"] == 0 for c in calls)


def test_driver_failing_free_is_reported(stub):
    drv = cuda_driver.CudaDriver(0)
    a, b = drv.alloc(16), drv.alloc(16)
    stub.fail("cuMemFree_v2", 1, 700)
    with pytest.raises(KvtraceError, match=r"cuMemFree\(0x[0-9a-f]+\) failed: error 700"):
        drv.free(a)
    stub.fail("cuMemFree_v2", 1, 700)
    drv.free_later(b)  # a finalizer's free: must not raise there ...
    with pytest.raises(KvtraceError, match="cuMemFree"):  # ... and is raised by the next call that can
        drv.raise_deferred()
    stub.fail("cuStreamDestroy_v2", 1, 999)
    with pytest.raises(KvtraceError, match="cuStreamDestroy failed: error 999"):
        drv.close()
    assert stub.lib.stub_context_refs() == 0  # the context is released even so


def test_memset_device_zeroes_from_any_thread(stub):
    drv = cuda_driver.CudaDriver(0)
    ptr = drv.alloc(32)
    assert (gpu_fakes.device_array(ptr, (32,), np.uint8) == 0xFF).all()  # the stub's fresh memory
    t = threading.Thread(target=cuda_driver.memset_device, args=(ptr, 32, 0))
    t.start(), t.join()
    assert (gpu_fakes.device_array(ptr, (32,), np.uint8) == 0).all()
    drv.free(ptr)
    drv.close()
    assert stub.lib.stub_context_refs() == 0


# ------------------------------------------------------------------ the tensorrt backend on the stub
def _trt(monkeypatch, stub, art, **kw):
    from kvtrace.manifest import load_manifest

    gpu_fakes.trt_section(art)
    data = load_manifest(art).data
    onnx_file = art / ((data.get("graphs") or {}).get("gpu", {}).get("onnx") or "model.onnx")
    trt, calls = gpu_fakes.fake_tensorrt(onnx_file, stub, aliases=data["io"]["cache_aliases"], **kw)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda flavour=None, minimum=None: (trt, "tensorrt"))
    return calls


@pytest.fixture
def trt_art(gpu_art, tmp_path):
    import shutil

    return shutil.copytree(gpu_art, tmp_path / "art")


def test_trt_backend_captures_decode_and_matches_cpu(stub, trt_art, monkeypatch):
    want, want_toks = _cpu_reference(trt_art)
    calls = _trt(monkeypatch, stub, trt_art)
    m = Model.load(trt_art, backend="tensorrt")
    got, toks = _drive(m)
    assert toks == want_toks
    np.testing.assert_allclose(got, want, atol=1e-5)
    be = m.backend
    (runs,) = be.graph_runs().values()
    # step 1: enqueued (a new configuration after the prefill); step 2: captured + launched; then replays
    assert runs["state"] == "captured" and runs["captures"] == 1
    assert runs["enqueued"] == 1 and runs["replays"] == STEPS - 1 == calls["replays"]
    log = stub.calls()
    launches = _rec(stub, "cuGraphLaunch")
    assert len(launches) == STEPS - 1
    first_launch = launches[0]["seq"]
    # nothing allocated or freed once the decode loop runs from its graph
    assert not [c for c in log if c["seq"] > first_launch and c["fn"] in ("cuMemAlloc", "cuMemFree", "cuMemHostAlloc")]
    # one stream for every copy, enqueue and launch; host sides of copies pinned
    (stream,) = [int(c["args"]["stream"], 16) for c in _rec(stub, "cuStreamCreate")]
    assert {int(c["args"]["stream"], 16) for c in log if "stream" in c["args"]} == {stream}
    assert calls["streams"] == {stream}
    assert all(c["args"]["pinned"] == "1" for c in _rec(stub, "cuMemcpyHtoDAsync") + _rec(stub, "cuMemcpyDtoHAsync"))
    assert {c["args"]["mode"] for c in _rec(stub, "cuStreamBeginCapture")} == {"1"}  # thread-local capture
    # a second request: the prefill changes the configuration, so the first step is enqueued again
    got2, toks2 = _drive(m, steps=3)
    assert toks2 == want_toks[:3]
    (runs,) = be.graph_runs().values()
    assert runs["captures"] == 1 and runs["enqueued"] == 2
    m.close()
    assert stub.lib.stub_context_refs() == 0 and stub.lib.stub_live(0) == 0 and stub.lib.stub_live(1) == 0


def test_trt_backend_without_graphs_and_failed_capture(stub, trt_art, monkeypatch):
    want, want_toks = _cpu_reference(trt_art)
    calls = _trt(monkeypatch, stub, trt_art)
    m = Model.load(trt_art, backend="tensorrt", cuda_graph=False)
    got, toks = _drive(m)
    assert toks == want_toks and not _rec(stub, "cuStreamBeginCapture")
    (runs,) = m.backend.graph_runs().values()
    assert runs["state"] == "off" and runs["enqueued"] == STEPS
    m.close()
    # a capture the driver invalidates: the key is marked, the step still runs, results unchanged
    calls["invalidate_capture"] = True
    m = Model.load(trt_art, backend="tensorrt")
    got, toks = _drive(m)
    np.testing.assert_allclose(got, want, atol=1e-5)
    (runs,) = m.backend.graph_runs().values()
    assert runs["state"] == "uncapturable" and "901" in runs["reason"] and runs["replays"] == 0
    m.close()


def test_trt_backend_from_another_thread(stub, trt_art, monkeypatch):
    want, _ = _cpu_reference(trt_art)
    _trt(monkeypatch, stub, trt_art)
    m = Model.load(trt_art, backend="tensorrt")
    m.start(PROMPTS, logits="last")
    out, errors = {}, []

    def worker():  # e.g. a server's worker thread
        try:
            out["logits"] = m.step(want[0].argmax(-1))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start(), t.join()
    assert not errors, errors
    np.testing.assert_allclose(out["logits"], want[1], atol=1e-5)
    m.close()


def test_trt_backend_release_order(stub, trt_art, monkeypatch):
    _trt(monkeypatch, stub, trt_art)
    m = Model.load(trt_art, backend="tensorrt")
    _drive(m, steps=4)
    m.close()
    seq = [c["fn"] if c["fn"] != "note" else c["text"] for c in stub.calls()]
    tail = seq[seq.index("cuGraphExecDestroy") - 2:]
    tail = [f for f in tail if f != "cuCtxSetCurrent"]
    frees = {"cuMemFree", "cuMemFreeHost"}
    # sync, graphs, buffers, TensorRT objects (dependants first), stream, context
    assert tail[0] == "cuStreamSynchronize" and tail[1] == "cuGraphExecDestroy"
    i = 2
    while tail[i] in frees:
        i += 1
    assert i > 4  # device and pinned buffers were freed
    assert tail[i:] == ["trt.context.destroyed", "trt.engine.destroyed", "trt.runtime.destroyed",
                        "cuStreamSynchronize", "cuStreamDestroy", "cuDevicePrimaryCtxRelease"]
    assert stub.lib.stub_context_refs() == 0 and stub.lib.stub_live(0) == 0 and stub.lib.stub_live(1) == 0


def test_trt_backend_refusal_and_error_paths(stub, trt_art, monkeypatch):
    calls = _trt(monkeypatch, stub, trt_art)
    # an engine of another TensorRT version is refused; what was taken is released
    sec = trt_art / "kvtrace.json"
    import json

    data = json.loads(sec.read_text())
    data["tensorrt"]["version"] = "10.99.0"
    sec.write_text(json.dumps(data))
    with pytest.raises(KvtraceError, match="only run on the version that built them"):
        Model.load(trt_art, backend="tensorrt")
    assert stub.lib.stub_context_refs() == 0 and _rec(stub, "cuStreamDestroy")
    _trt(monkeypatch, stub, trt_art)  # a correct section again
    calls = _trt(monkeypatch, stub, trt_art)
    m = Model.load(trt_art, backend="tensorrt")
    # a profile switch the binding raises on (the full TensorRT raises instead of returning False)
    calls["raise_on_profile"] = True
    with pytest.raises(KvtraceError, match="cannot switch to optimization profile 1"):
        m.start(PROMPTS)
    calls["raise_on_profile"] = False
    # dtype checks on the device path
    with pytest.raises(KvtraceError, match="feed dtype int32"):
        m.backend.run({io_spec.INPUT_IDS: np.zeros((1, 1), np.int32)})
    with pytest.raises(KvtraceError, match="buffer dtype float16"):
        m.backend.bind_output(io_spec.LOGITS, m.backend.alloc((1, 1, 8), "float16"))
    # a free failing at close is reported, and everything else is still released
    m.start(PROMPTS, logits="last")
    stub.fail("cuMemFree_v2", 2, 700)
    with pytest.raises(KvtraceError, match="cuMemFree.*error 700"):
        m.close()
    assert stub.lib.stub_context_refs() == 0 and _rec(stub, "cuStreamDestroy")


def test_trt_backend_dynamic_cache_alternates_buffers(stub, dyn_art, tmp_path, monkeypatch):
    import shutil

    art = shutil.copytree(dyn_art, tmp_path / "dyn")
    want, want_toks = _cpu_reference(art)
    _trt(monkeypatch, stub, art)
    m = Model.load(art, backend="tensorrt")
    steps = 12
    first = m.start(PROMPTS, logits="last")[:, 0]
    n0 = len(_rec(stub, "cuMemAlloc"))
    tok, outs, seen = first.argmax(-1), [], []
    for _ in range(steps):
        logits = m.step(tok)
        outs.append(logits)
        tok = logits.argmax(-1)
        seen.append(m.backend.output(io_spec.present_key(0)).ptr)
    allocs = len(_rec(stub, "cuMemAlloc")) - n0
    # two buffers per present, each grown geometrically over lengths 7..18 (at most 3 allocations),
    # plus the growing attention_mask's staging (at most 4): not one allocation per present per step
    n_presents = 2 * m.config.n_layers
    assert allocs <= n_presents * 2 * 3 + 4 < n_presents * steps, allocs
    assert len(set(seen[-4:])) == 2  # alternating between two buffers once grown
    np.testing.assert_allclose(np.stack([first] + outs)[: STEPS + 1], want, atol=1e-5)
    m.close()
    assert stub.lib.stub_live(0) == 0


# ------------------------------------------------------------------ onnxruntime-cuda on a fake provider
@pytest.fixture
def fake_ort(monkeypatch):
    def make(**kw):
        fake = gpu_fakes.FakeOrtCuda(**kw)
        monkeypatch.setattr(backends, "_import_ort", lambda: fake)
        monkeypatch.setattr(backends, "_zero_device", gpu_fakes.zero_host_memory)
        backends.cuda_status.cache_clear()
        return fake

    yield make
    backends.cuda_status.cache_clear()


def test_ort_cuda_strict_session_graph_ids_and_fixed_buffers(gpu_art, fake_ort):
    want, want_toks = _cpu_reference(gpu_art)
    fake = fake_ort()
    m = Model.load(gpu_art, backend="onnxruntime-cuda")
    be = m.backend
    assert be.name == "onnxruntime-cuda" and be.graph_form == "gpu" and be.cuda_graph
    (s,) = fake.sessions  # strict: CUDA alone, CPU fallback disabled, placement recorded, no Python fallback
    assert s["providers"] == ["CUDAExecutionProvider"] and s["enable_fallback"] == 0
    assert s["config"] == {"session.disable_cpu_ep_fallback": "1", "session.record_ep_graph_assignment_info": "1"}
    assert s["options"]["CUDAExecutionProvider"]["enable_cuda_graph"] == "1"
    assert be.onnx_file.name == "model.gpu.onnx" and be.placement["cpu"] == []
    got, toks = _drive(m)
    assert toks == want_toks
    np.testing.assert_allclose(got, want, atol=1e-5)
    # prefill: -1 (never captured); every decode step of this batch: one graph id
    assert fake.runs[0] == "-1" and len(set(fake.runs[1:])) == 1 and int(fake.runs[1]) > 0
    (g,) = be.graph_runs().values()
    assert g["captures"] == 1 and g["runs"] == STEPS
    assert set(g["buffers"]) == {io_spec.INPUT_IDS, io_spec.POSITION_IDS, io_spec.LOGITS_INDEX, io_spec.LOGITS,
                                 *[n for pair in io_spec.cache_pairs(m.config.n_layers) for n in pair]}
    assert fake.syncs >= 2 * (STEPS + 1)
    # --no-cuda-graph / --allow-cpu-nodes reach the backend from the command line
    from kvtrace.runtime import generate_cli

    args = type("A", (), {"allow_cpu_nodes": True, "no_cuda_graph": True})()
    m2 = Model.load(gpu_art, backend="onnxruntime-cuda", **generate_cli.gpu_options(args))
    assert not m2.backend.cuda_graph and "enable_cuda_graph" not in fake.sessions[-1]["options"]["CUDAExecutionProvider"]
    m2.close()
    # a new batch size: its own graph; the same size again later: new caches, so a new id
    _drive(m, steps=2, prompts=PROMPTS[:2])
    _drive(m, steps=2)
    ids = [int(r) for r in fake.runs if r != "-1"]
    assert len(set(ids)) == 3 and fake.released  # the stale graph of the first batch was released
    m.close()


def test_ort_cuda_cpu_nodes_refused_or_allowed(gpu_art, fake_ort):
    fake = fake_ort(cpu_nodes=3)
    with pytest.raises(KvtraceError, match=r"would run 3 node\(s\) of model.gpu.onnx on the CPU.*allow-cpu-nodes"):
        Model.load(gpu_art, backend="onnxruntime-cuda")
    # the second session (diagnosis) lets onnxruntime place nodes on the CPU and says where
    assert fake.sessions[1]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    m = Model.load(gpu_art, backend="onnxruntime-cuda", allow_cpu_nodes=True)
    assert not m.backend.cuda_graph and any("CUDA graphs off" in n for n in m.backend.notes)
    assert len(m.backend.placement["cpu"]) == 3
    m.close()
    # the CPU form computes shapes from position_ids: the message points to the GPU form
    with pytest.raises(KvtraceError, match="use the GPU form"):
        Model.load(gpu_art, backend="onnxruntime-cuda", graph="cpu")


def test_ort_cuda_provider_failure_version_and_auto(gpu_art, fake_ort, capsys):
    fake_ort(cuda_starts=False)
    with pytest.raises(KvtraceError, match="CUDA provider did not initialise"):
        Model.load(gpu_art, backend="onnxruntime-cuda")
    ok, why = backends.cuda_status()
    assert not ok and "did not initialise" in why or "cannot create a CUDA session" in why
    # auto: onnxruntime-cuda is tried (onnxruntime-gpu is installed), fails, and says so
    m = Model.load(gpu_art)
    assert m.backend_name == "onnxruntime" and m.skipped_backends[0].startswith("onnxruntime-cuda:")
    m.close()
    from kvtrace import cli

    assert cli.main(["generate", str(gpu_art), "--input-ids", "5,6", "--max-new-tokens", "2", "--json"]) == 0
    assert "kvtrace: note: backend onnxruntime-cuda: " in capsys.readouterr().err  # never silently
    fake_ort(version="1.24.4")
    with pytest.raises(KvtraceError, match=r"1.24.4 is older than 1.31.1"):
        Model.load(gpu_art, backend="onnxruntime-cuda")
    assert not backends.cuda_available()
    fake_ort()
    assert backends.cuda_status() == (True, "onnxruntime-gpu 1.31.1, CUDA device 0")
    with pytest.raises(KvtraceError, match="CUDA graphs need the GPU form"):
        Model.load(gpu_art, backend="onnxruntime-cuda", graph="cpu", cuda_graph=True)


def test_cpu_backend_gpu_form_fixed_buffers(gpu_art):
    """The buffer discipline CUDA graphs rely on, on the plain CPU backend: every bound buffer
    of every decode step at the same address; the GPU form gives the CPU form's logits."""
    want, want_toks = _cpu_reference(gpu_art)
    m = Model.load(gpu_art, backend="onnxruntime", graph="gpu", check_fixed_buffers=True)
    assert m.backend.onnx_file.name == "model.gpu.onnx"
    got, toks = _drive(m)
    assert toks == want_toks
    np.testing.assert_allclose(got, want, atol=1e-5)
    (g,) = m.backend.graph_runs().values()
    assert g["captures"] == 1 and g["runs"] == STEPS
    m.close()


def test_probe_model_is_valid_onnx():
    import onnx

    m = onnx.load_from_string(backends._probe_model())
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["Add"] and m.ir_version == 10
    import onnxruntime as ort

    s = ort.InferenceSession(backends._probe_model(), providers=["CPUExecutionProvider"])
    assert s.run(None, {"x": np.arange(4, dtype=np.float32)})[0].tolist() == [0, 2, 4, 6]


# ------------------------------------------------------------------ kvtrace gpu-check
def test_gpu_check_without_gpu(gpu_art, tmp_path, monkeypatch, capsys):
    from kvtrace import cli

    monkeypatch.setattr(cuda_driver, "LIBCUDA_NAMES", (str(tmp_path / "no-libcuda.so"),))
    out = tmp_path / "report.json"
    assert cli.main(["gpu-check", str(gpu_art), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvtrace: error: no usable GPU here:") and "libcuda" in err[0]
    rep = json.loads(out.read_text())
    assert set(rep) == {"gpu_available", "reason"} and rep["gpu_available"] is False and "libcuda" in rep["reason"]
    # bad input is reported as such, GPU or not, and nothing is written
    assert cli.main(["gpu-check", str(tmp_path / "nope"), "--json", str(tmp_path / "r2.json")]) == 2
    assert "not an artifact directory" in capsys.readouterr().err and not (tmp_path / "r2.json").exists()
    assert cli.main(["gpu-check", str(gpu_art), "--json", str(tmp_path / "no" / "dir.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gpu_check_report_on_fakes(stub, trt_art, fake_ort, monkeypatch, tmp_path, capsys):
    """The whole report, driven through the stub driver, the fake TensorRT and the fake
    onnxruntime-CUDA: every check runs and passes; a broken engine fails parity (exit 1)."""
    from kvtrace import cli
    from kvtrace.runtime import gpu_check

    calls = _trt(monkeypatch, stub, trt_art)
    fake_ort()
    rep = gpu_check.gpu_check(trt_art, steps=4, repeats=1, prompt_len=8, log=lambda s: None)
    assert rep["gpu_available"] and rep["ok"], rep["failed"]
    assert rep["device"]["devices"][0]["name"] == "Stub GPU" and rep["device"]["driver_cuda_version"] == "13.0"
    assert rep["versions"]["onnxruntime_cuda"]["usable"] and rep["versions"]["tensorrt"]["version"] == "10.15.1"
    ort_r, trt_r = rep["backends"]["onnxruntime-cuda"], rep["backends"]["tensorrt"]
    assert set(ort_r["checks"]) == {"placement", "parity_vs_cpu", "in_place_cache", "cuda_graph_replay"}
    assert set(trt_r["checks"]) == {"parity_vs_cpu", "in_place_cache", "cuda_graph_replay"}
    assert ort_r["graph_file"] == "model.gpu.onnx" and ort_r["checks"]["parity_vs_cpu"]["max_abs"] <= 1e-5
    assert trt_r["checks"]["cuda_graph_replay"]["captured"] and trt_r["checks"]["in_place_cache"]["same_addresses"]
    assert trt_r["checks"]["parity_vs_cpu"]["positions"] == sum(rep["settings"]["prompt_lengths"]) + 4 * 3
    assert len(trt_r["timings"]) == 2 and all(t["decode_ms_per_token"] > 0 for t in trt_r["timings"].values())
    # the command: report file and exit 0; a broken engine: exit 1 naming the failed check
    out = tmp_path / "r.json"
    assert cli.main(["gpu-check", str(trt_art), "--steps", "3", "--repeats", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] and "all checks passed" in capsys.readouterr().out
    calls["perturb"] = 0.05
    assert cli.main(["gpu-check", str(trt_art), "--steps", "3", "--repeats", "1", "--backends", "tensorrt"]) == 1
    text = capsys.readouterr().out
    assert "FAIL tensorrt parity_vs_cpu" in text and "FAILED: tensorrt: parity_vs_cpu" in text
