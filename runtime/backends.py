"""Execution backends behind one small protocol. No torch.

The model (runtime/model.py) owns the cache bookkeeping; a backend only owns memory on its
device and runs the graph:

    b = create_backend(name, artifact_dir, manifest, **options)
    buf = b.alloc(shape, dtype)          # zeroed buffer on the backend's device ("float32", "int64", ...)
    b.bind_input(name, buf)              # stays bound until rebound
    b.bind_output(name, buf)             # a static cache: the SAME buffer as its input (in-place update)
    b.bind_output(name, None)            # the backend allocates this output on every run (dynamic shapes)
    b.run({"input_ids": arr, ...})       # host numpy feeds, copied into staging buffers for this call
    b.output(name)                       # the buffer the output went to on the last run
    b.to_host(buf)                       # numpy; on CPU a view of the buffer itself (no copy)
    b.release()                          # drop bindings and buffers

Backends register by name: `register_backend("tensorrt", factory)`, where
`factory(artifact_dir: Path, manifest, **options) -> Backend`. "tensorrt" is looked up lazily
in runtime/trt_backend.py, which registers itself on import (or exposes `create_backend`).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from kvtrace.errors import KvtraceError

# ONNX TensorProto element types (onnx is not a runtime dependency, so the numbers are here)
_ONNX_TYPE = {"float32": 1, "int64": 7, "float16": 10, "bfloat16": 16, "bool": 9, "int32": 6}
# numpy storage for each dtype; bfloat16 has no numpy dtype: stored as raw uint16
NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                 "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class Backend(Protocol):
    name: str
    device: str  # "cpu" | "cuda"

    def alloc(self, shape: tuple[int, ...], dtype: str) -> Any: ...
    def bind_input(self, name: str, buf: Any) -> None: ...
    def bind_output(self, name: str, buf: Any | None) -> None: ...
    def run(self, feeds: dict[str, np.ndarray]) -> None: ...
    def output(self, name: str) -> Any: ...
    def to_host(self, buf: Any) -> np.ndarray: ...
    def release(self) -> None: ...


BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}
# names whose module registers them when imported (kept lazy: tensorrt is optional)
_LAZY: dict[str, str] = {"tensorrt": "kvtrace.runtime.trt_backend"}


def register_backend(name: str, factory: BackendFactory) -> None:
    _REGISTRY[name] = factory


def known_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def get_factory(name: str) -> BackendFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _LAZY:
        try:
            mod = importlib.import_module(_LAZY[name])
        except ImportError as e:
            raise KvtraceError(f"backend {name!r} is not available: {e}") from e
        if name not in _REGISTRY and hasattr(mod, "create_backend"):
            _REGISTRY[name] = mod.create_backend
        if name in _REGISTRY:
            return _REGISTRY[name]
        raise KvtraceError(f"backend {name!r}: module {_LAZY[name]} did not register it")
    raise KvtraceError(f"unknown backend {name!r}; expected auto or one of {', '.join(known_backends())}")


def create_backend(name: str, artifact_dir: Path, manifest, **options) -> Backend:
    return get_factory(name)(Path(artifact_dir), manifest, **options)


def cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


# ------------------------------------------------------------------------- onnxruntime
class _Buf:
    """An OrtValue plus, on the CPU, the numpy array that owns its memory (zero-copy views)."""

    __slots__ = ("ov", "host", "dtype")

    def __init__(self, ov, host: np.ndarray | None, dtype: str):
        self.ov, self.host, self.dtype = ov, host, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ov.shape())

    def data_ptr(self) -> int:
        return self.ov.data_ptr()


class OrtBackend:
    """onnxruntime with IO binding, CPU or CUDA: the same code path, buffers on the device.

    Options: threads (intra-op threads; None: onnxruntime's default), optimization
    ("all" | "basic" | "none"), prepack (False: no MLAS-packed second copy of the MatMul
    weights; slower, half the memory; export validation uses it).
    """

    def __init__(self, artifact_dir: Path, manifest, *, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", log_severity: int = 3, prepack: bool = True):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise KvtraceError("onnxruntime is not installed (pip install onnxruntime, "
                               "or onnxruntime-gpu for CUDA)") from e
        self._ort = ort
        self.device = device
        self.name = "onnxruntime-cuda" if device == "cuda" else "onnxruntime"
        onnx_file = Path(artifact_dir) / _manifest_get(manifest, "onnx", "model.onnx")
        if not onnx_file.is_file():
            raise KvtraceError(f"model file {onnx_file} not found (artifact {artifact_dir})")
        ext = _manifest_get(manifest, "external_data", None)
        if ext and not (Path(artifact_dir) / ext).is_file():
            raise KvtraceError(f"external weight file {Path(artifact_dir) / ext} not found "
                               f"(named by the manifest of {artifact_dir})")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise KvtraceError("backend 'onnxruntime-cuda' needs onnxruntime-gpu "
                                   "(CUDAExecutionProvider is not available)")
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.log_severity_level = log_severity
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        if threads:
            so.intra_op_num_threads = int(threads)
        if not prepack:  # MLAS keeps no packed copy of the MatMul weights: one copy in memory, not two
            so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self.session = ort.InferenceSession(str(onnx_file), sess_options=so, providers=providers)
        except Exception as e:
            raise KvtraceError(f"onnxruntime cannot load {onnx_file}: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._io = self.session.io_binding()
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._out_bound: dict[str, _Buf | None] = {}
        self._out_last: dict[str, _Buf] = {}
        self._staging: dict[str, _Buf] = {}  # per feed name: a reusable buffer of the last shape

    # --------------------------------------------------------------- memory
    def alloc(self, shape, dtype: str) -> _Buf:
        # np.empty + fill, not np.zeros: calloc'd pages would be faulted in by the first
        # TensorScatter instead (seconds at batch 8 x 2048 slots), i.e. during the first request
        host = np.empty(tuple(shape), dtype=NUMPY_STORAGE[dtype])
        host.fill(0)
        return self._wrap(host, dtype)

    def _wrap(self, host: np.ndarray, dtype: str) -> _Buf:
        ort = self._ort
        if self._ort_device == "cpu":
            # shares memory with `host`: writing the array writes the tensor and vice versa
            ov = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, _ONNX_TYPE[dtype]) \
                if dtype == "bfloat16" else ort.OrtValue.ortvalue_from_numpy(host)
            return _Buf(ov, host, dtype)
        if dtype == "bfloat16":
            ov = ort.OrtValue.ortvalue_from_shape_and_type(list(host.shape), _ONNX_TYPE[dtype], "cuda", 0)
            ov.update_inplace(host)
        else:
            ov = ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)  # one host->device copy, once
        return _Buf(ov, None, dtype)

    def to_host(self, buf: _Buf) -> np.ndarray:
        if buf.host is not None:
            return buf.host
        arr = buf.ov.numpy()  # device -> host copy
        return arr

    # --------------------------------------------------------------- binding
    def bind_input(self, name: str, buf: _Buf) -> None:
        self._io.bind_ortvalue_input(name, buf.ov)

    def bind_output(self, name: str, buf: _Buf | None) -> None:
        if buf is None:
            self._io.bind_output(name, self._ort_device, 0)
        else:
            self._io.bind_ortvalue_output(name, buf.ov)
        self._out_bound[name] = buf
        self._out_last.pop(name, None)

    def clear_outputs(self) -> None:
        self._io.clear_binding_outputs()
        self._out_bound.clear()
        self._out_last.clear()

    def _stage(self, name: str, arr: np.ndarray) -> None:
        """Copy a small host feed into a reusable buffer bound as input `name`."""
        buf = self._staging.get(name)
        if buf is None or buf.shape != arr.shape or buf.host is not None and buf.host.dtype != arr.dtype:
            dtype = {np.dtype(np.int64): "int64", np.dtype(np.int32): "int32",
                     np.dtype(np.bool_): "bool"}.get(arr.dtype)
            if dtype is None:
                raise KvtraceError(f"input {name!r}: unsupported feed dtype {arr.dtype}")
            buf = self._wrap(np.array(arr, copy=True), dtype)
            self._staging[name] = buf
            self._io.bind_ortvalue_input(name, buf.ov)
            return
        if buf.host is not None:
            np.copyto(buf.host, arr)  # the bound OrtValue sees it: same memory
        else:
            buf.ov.update_inplace(np.ascontiguousarray(arr))

    def run(self, feeds: dict[str, np.ndarray]) -> None:
        for name, arr in feeds.items():
            self._stage(name, arr)
        if self._ort_device != "cpu":
            self._io.synchronize_inputs()
        try:
            self.session.run_with_iobinding(self._io)
        except Exception as e:
            raise KvtraceError(f"onnxruntime run failed: {e}") from e
        if self._ort_device != "cpu":
            self._io.synchronize_outputs()
        self._out_last.clear()

    def output(self, name: str) -> _Buf:
        buf = self._out_bound.get(name)
        if buf is not None:
            return buf
        if name not in self._out_last:
            # outputs come back in binding order
            names = list(self._out_bound)
            for n, ov in zip(names, self._io.get_outputs()):
                b = self._out_bound[n]
                self._out_last[n] = b if b is not None else _Buf(ov, None, "")
        return self._out_last[name]

    def release(self) -> None:
        self._io.clear_binding_inputs()
        self._io.clear_binding_outputs()
        self._out_bound.clear()
        self._out_last.clear()
        self._staging.clear()


def _manifest_get(manifest, key, default=None):
    if isinstance(manifest, dict):
        return manifest.get(key, default)
    data = getattr(manifest, "data", None)
    if isinstance(data, dict):
        return data.get(key, default)
    return getattr(manifest, key, default)


register_backend("onnxruntime", lambda d, m, **o: OrtBackend(d, m, device="cpu", **o))
register_backend("onnxruntime-cuda", lambda d, m, **o: OrtBackend(d, m, device="cuda", **o))


def choose_backend(manifest) -> list[str]:
    """Candidates for backend="auto", best first."""
    order = []
    if _manifest_get(manifest, "tensorrt", None):
        order.append("tensorrt")
    if cuda_available():
        order.append("onnxruntime-cuda")
    order.append("onnxruntime")
    return order
