"""Stand-ins for a GPU, so the GPU code paths run on the CPU in CI (tests/test_gpu_paths.py).

  * StubCuda: tests/stub_libcuda.c compiled with gcc: a libcuda that enforces per-thread current
    contexts, 64-bit device addresses and capture rules, and logs every call;
  * fake_tensorrt(): the few TensorRT classes the tensorrt backend uses; the "engine" runs the
    artifact's ONNX graph with onnxruntime on the CPU on whatever the stub's device memory holds
    at the addresses TensorRT was given, and replays captured enqueues on cuGraphLaunch;
  * FakeOrtCuda: onnxruntime whose "CUDA" provider is the CPU one: device "cuda" OrtValues are
    CPU OrtValues, and it records what the backend asked for (providers, session and run
    options) and can report nodes placed on the CPU or a CUDA provider that failed to start.
What these fakes cannot show (real kernels, real device timing, driver quirks) is listed in
docs/gpu.md.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np

TAG = 0x100000000000  # stub device address = host address + TAG
SOURCE = Path(__file__).with_name("stub_libcuda.c")


# ------------------------------------------------------------------ the stub driver
class StubCuda:
    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.stub_set_log.argtypes = [ctypes.c_char_p]
        self.lib.stub_note.argtypes = [ctypes.c_char_p]
        self.lib.stub_fail.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        self.log_path: Path | None = None
        self._cb = None

    @classmethod
    def build(cls, out_dir: Path) -> "StubCuda | None":
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            return None
        path = Path(out_dir) / "libcuda_stub.so"
        subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-Wall", "-o", str(path), str(SOURCE)], check=True,
                       capture_output=True)
        return cls(path)

    def reset(self, log_path: Path) -> None:
        self.lib.stub_reset()
        self.log_path = Path(log_path)
        self.lib.stub_set_log(str(log_path).encode())

    def note(self, text: str) -> None:
        self.lib.stub_note(text.encode())

    def fail(self, fn: str, nth: int = 1, rc: int = 700) -> None:
        self.lib.stub_fail(fn.encode(), nth, rc)

    def capturing(self) -> int:
        return self.lib.stub_capturing()

    def on_launch(self, fn) -> None:
        self._cb = ctypes.CFUNCTYPE(None, ctypes.c_int)(fn)  # kept alive here
        self.lib.stub_set_launch_callback(self._cb)

    def calls(self) -> list[dict]:
        """The log: [{"seq", "tid", "fn", "args": {k: v}, "text", "rc"}]."""
        out = []
        for line in self.log_path.read_text().splitlines():
            seq, tid, fn, *rest = line.split(" ")
            rc = int(rest[-1].removeprefix("rc="))
            args = dict(a.split("=", 1) for a in rest[:-1] if "=" in a)
            out.append({"seq": int(seq), "tid": int(tid), "fn": fn, "args": args, "text": " ".join(rest[:-1]), "rc": rc})
        return out


def device_array(ptr: int, shape, dtype) -> np.ndarray:
    """The stub's device memory at `ptr` as a numpy array (no copy)."""
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * max(n, 1)).from_address(ptr - TAG)
    return np.frombuffer(raw, dtype=np.uint8)[:n].view(dtype).reshape(shape)


# ------------------------------------------------------------------ a fake TensorRT
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def fake_tensorrt(onnx_file: Path, stub: StubCuda, *, version: str = "10.15.1", aliases=None):
    """(module, calls): a TensorRT stand-in whose engine is `onnx_file` run by onnxruntime (CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    io = {i.name: ("in", _NP[i.type]) for i in sess.get_inputs()}
    io.update({o.name: ("out", _NP[o.type]) for o in sess.get_outputs()})
    out_names = [o.name for o in sess.get_outputs()]
    aliases = aliases or {}
    calls = {"profiles": [], "enqueues": 0, "replays": 0, "streams": set(), "raise_on_profile": False,
             "invalidate_capture": False, "perturb": 0.0}
    captured: dict[int, tuple[dict, dict]] = {}
    trt = types.SimpleNamespace(__version__=version)

    class ILogger:
        Severity = types.SimpleNamespace(ERROR=1, WARNING=2)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT=np.float32, HALF=np.float16, BF16="bf16", INT64=np.int64,
                                         INT32=np.int32, BOOL=np.bool_)

    def compute(addr: dict, shape: dict, write: bool = True) -> dict:
        feeds = {n: device_array(addr[n], shape[n], io[n][1]).copy() for n in io if io[n][0] == "in"}
        res = dict(zip(out_names, sess.run(None, feeds)))
        if calls["perturb"]:  # a broken engine, for tests that must fail
            res["logits"] = res["logits"] + np.float32(calls["perturb"])
        if write:
            for name, arr in res.items():
                if aliases.get(name) and addr[name] != addr[aliases[name]]:
                    raise AssertionError(f"{name} not bound in place")
                device_array(addr[name], arr.shape, arr.dtype)[...] = arr
        return res

    def replay(capture_id: int) -> None:  # cuGraphLaunch
        addr, shape = captured[capture_id]
        compute(addr, shape)
        calls["replays"] += 1

    stub.on_launch(replay)

    class Context:
        def __init__(self):
            self.shape, self.addr = {}, {}

        def set_optimization_profile_async(self, idx, stream):
            calls["streams"].add(stream)
            if calls["raise_on_profile"]:
                raise RuntimeError("profile switch failed (as the full TensorRT's binding raises)")
            calls["profiles"].append(idx)
            return True

        def set_input_shape(self, name, shape):
            self.shape[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            assert isinstance(ptr, int) and ptr >= TAG, f"{name}: not a 64-bit stub device address: {ptr:#x}"
            self.addr[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return compute(self.addr, self.shape, write=False)[name].shape

        def execute_async_v3(self, stream):
            calls["streams"].add(stream)
            cap = stub.capturing()
            if cap:  # recorded, not run: the graph launch runs it
                captured[cap] = (dict(self.addr), dict(self.shape))
                if calls["invalidate_capture"]:
                    stub.lib.stub_invalidate_capture()
                return True
            for name in out_names:
                if aliases.get(name) and self.addr[name] != self.addr[aliases[name]]:
                    return False  # TensorRT: the cache output must be the cache input's memory
            compute(self.addr, self.shape)
            calls["enqueues"] += 1
            return True

        def __del__(self):
            stub.note("trt.context.destroyed")

    shapes = {t.name: [d if isinstance(d, int) else -1 for d in t.shape]
              for t in list(sess.get_inputs()) + list(sess.get_outputs())}

    class Engine:
        """Built with the profiles the artifact's manifest records (as `kvtrace build` builds)."""
        num_io_tensors = len(io)

        def __init__(self):
            import json

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

        def __del__(self):
            stub.note("trt.engine.destroyed")

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine()

        def __del__(self):
            stub.note("trt.runtime.destroyed")

    trt.Runtime = Runtime
    return trt, calls


def trt_section(artifact: Path, *, version: str = "10.15.1", max_seq: int | None = None) -> dict:
    """A manifest "tensorrt" entry as `kvtrace build` writes it, for a fake engine file."""
    import json

    from kvtrace.exporter.trt import plan_profiles

    data = json.loads((artifact / "kvtrace.json").read_text())
    profiles, limits = plan_profiles(data["io"], max_seq=max_seq)
    (artifact / "model.engine").write_bytes(b"fake engine")
    data["tensorrt"] = {"flavour": "tensorrt", "version": version, "engine": "model.engine",
                        "compute_capabilities": ["current"], "built_on_cc": "sm89", "profiles": profiles,
                        "limits": limits}
    (artifact / "kvtrace.json").write_text(json.dumps(data))
    return data["tensorrt"]


# ------------------------------------------------------------------ a fake onnxruntime-gpu
class FakeOrtCuda:
    """onnxruntime with a pretend CUDA provider (the CPU one underneath)."""

    def __init__(self, *, version: str = "1.31.1", cpu_nodes: int = 0, cuda_starts: bool = True):
        import onnxruntime as real

        self.real = real
        self.__version__ = version
        self.cpu_nodes = cpu_nodes  # how many nodes the "CUDA" provider leaves to the CPU
        self.cuda_starts = cuda_starts  # False: the provider fails to initialise (onnxruntime goes on with CPU)
        self.sessions: list[dict] = []  # what each InferenceSession was asked for
        self.runs: list[str | None] = []  # gpu_graph_id of each run_with_iobinding
        self.released: list[int] = []
        self.syncs = 0
        self.SessionOptions = real.SessionOptions
        self.RunOptions = real.RunOptions
        self.GraphOptimizationLevel = real.GraphOptimizationLevel
        fake = self

        class OrtValue:  # device "cuda" -> the CPU
            @staticmethod
            def ortvalue_from_shape_and_type(shape, element_type, device_type="cpu", device_id=0):
                return real.OrtValue.ortvalue_from_shape_and_type(shape, element_type, "cpu", 0)

            @staticmethod
            def ortvalue_from_numpy(arr, device_type="cpu", device_id=0):
                return real.OrtValue.ortvalue_from_numpy(arr if device_type == "cpu" else arr.copy())

            @staticmethod
            def ortvalue_from_numpy_with_onnx_type(arr, onnx_type):
                return real.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, onnx_type)

        self.OrtValue = OrtValue

        class IOBinding:
            def __init__(self, inner):
                self.inner = inner

            def bind_output(self, name, device, device_id=0, *a):
                return self.inner.bind_output(name, "cpu", 0, *a)

            def synchronize_inputs(self):
                fake.syncs += 1

            def synchronize_outputs(self):
                fake.syncs += 1

            def __getattr__(self, attr):
                return getattr(self.inner, attr)

        class Node:
            def __init__(self, op_type, name):
                self.op_type, self.name, self.domain = op_type, name, ""

        class Subgraph:
            def __init__(self, ep, nodes):
                self.ep_name, self._nodes = ep, nodes

            def get_nodes(self):
                return self._nodes

        class Session:
            def __init__(self, inner, providers, nodes):
                self.inner, self._providers, self._nodes = inner, providers, nodes

            def get_providers(self):
                return self._providers

            def get_provider_graph_assignment_info(self):
                cpu = self._nodes[: fake.cpu_nodes] if "CPUExecutionProvider" in self._providers else []
                rest = self._nodes[len(cpu):]
                first = self._providers[0]
                return [Subgraph(first, [Node(*n) for n in rest])] + ([Subgraph("CPUExecutionProvider",
                                                                                [Node(*n) for n in cpu])] if cpu else [])

            def disable_fallback(self):
                pass

            def io_binding(self):
                return IOBinding(self.inner.io_binding())

            def run_with_iobinding(self, io, run_options=None):
                fake.runs.append(run_options.get_run_config_entry("gpu_graph_id") if run_options else None)
                self.inner.run_with_iobinding(io.inner, run_options)

            def release_captured_graph(self, gid):
                fake.released.append(gid)

            def __getattr__(self, attr):
                return getattr(self.inner, attr)

        def InferenceSession(path, sess_options=None, providers=None, enable_fallback=1, **kw):
            names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
            opts = {p[0]: dict(p[1]) for p in providers or [] if isinstance(p, tuple)}
            cfg = {}
            for key in ("session.disable_cpu_ep_fallback", "session.record_ep_graph_assignment_info"):
                try:
                    cfg[key] = sess_options.get_session_config_entry(key)
                except RuntimeError:
                    pass
            self.sessions.append({"providers": names, "options": opts, "config": cfg,
                                  "enable_fallback": enable_fallback})
            strict = cfg.get("session.disable_cpu_ep_fallback") == "1"
            if strict and "CPUExecutionProvider" in names:
                raise RuntimeError("Conflicting session configuration: explicitly added the CPU EP")
            if strict and (self.cpu_nodes or not self.cuda_starts):
                raise RuntimeError("This session contains graph nodes that are assigned to the default CPU EP, "
                                   "but fallback to CPU EP has been explicitly disabled by the user.")
            so = real.SessionOptions()
            so.log_severity_level = 3
            inner = real.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            nodes = _node_list(path)
            provs = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.cuda_starts
                     else ["CPUExecutionProvider"])
            return Session(inner, provs, nodes)

        self.InferenceSession = InferenceSession

    def get_available_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _node_list(path) -> list[tuple[str, str]]:
    import onnx

    if isinstance(path, (bytes, bytearray)):
        m = onnx.load_from_string(bytes(path))
    else:
        m = onnx.load(str(path), load_external_data=False)
    return [(n.op_type, n.name) for n in m.graph.node]


def zero_host_memory(ov, nbytes: int, device_id: int) -> None:
    """backends._zero_device for FakeOrtCuda's "device" values (CPU memory)."""
    ctypes.memset(ov.data_ptr(), 0, nbytes)
