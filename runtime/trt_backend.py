"""The "tensorrt" backend: runs an engine built by `kvtrace build`. No torch.

Thin on purpose: everything except device memory and the engine call (cache bookkeeping,
sampling, generation, tokenizer) is the runtime's shared code, checked through onnxruntime.
Engine *execution* has not been run by us: TensorRT-RTX refuses compute capability 9.0
(H100/H200, the GPUs we have), and the full TensorRT does not install on our machines. What
runs without a GPU (module import, version/compute-capability/profile checks, the no-GPU error)
is tested in tests/test_trt.py.

Device memory comes from the CUDA driver API through ctypes (libcuda ships with every NVIDIA
driver), so neither torch nor cuda-python/cupy is needed. TensorRT's own CUDA runtime uses the
device's primary context, which is the context made current here.

Also home of the helpers `kvtrace build` (exporter/trt.py) shares with the backend: which
TensorRT module is installed, compute-capability names, and the profile check of a request.
"""
from __future__ import annotations

import ctypes
import importlib
import math
import weakref
from pathlib import Path

import numpy as np

from .backends import NUMPY_STORAGE, register_backend
from kvtrace.errors import KvtraceError

# Module names, in the order they are tried: the full TensorRT first (it runs on every
# NVIDIA GPU it supports), then TensorRT-RTX (builds for a named GPU without one).
FLAVOURS = ("tensorrt", "tensorrt_rtx")
# IAttention / IKVCacheUpdateLayer / IRotaryEmbeddingLayer and their ONNX importers
MIN_TENSORRT = (10, 15)
INSTALL_HINT = ("install one of: `pip install 'tensorrt>=10.15'` (TensorRT, module tensorrt) or "
                "`pip install tensorrt-rtx-cu13` (TensorRT-RTX, module tensorrt_rtx)")
COMPUTE_CAPABILITIES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


def import_tensorrt(flavour: str | None = None):
    """(module, flavour) of the installed TensorRT; `flavour` forces one module name."""
    names = FLAVOURS if flavour is None else (flavour,)
    if flavour is not None and flavour not in FLAVOURS:
        raise KvtraceError(f"TensorRT flavour {flavour!r}: expected one of {', '.join(FLAVOURS)}")
    errors = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:  # also a broken install (missing shared libraries)
            errors.append(f"{name}: {e}")
            continue
        if name == "tensorrt" and _version_tuple(mod.__version__) < MIN_TENSORRT:
            errors.append(f"tensorrt {mod.__version__} is older than 10.15 (no fused attention layers)")
            continue
        return mod, name
    raise KvtraceError("TensorRT is not installed (" + "; ".join(errors) + "): " + INSTALL_HINT)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def normalize_cc(text: str) -> str:
    """'sm89', 'SM89', '8.9', '89' -> 'sm89'."""
    t = str(text).strip().lower().replace("sm_", "sm")
    if t.startswith("sm"):
        t = t[2:]
    if "." in t:
        major, _, minor = t.partition(".")
        t = major + minor
    if not t.isdigit() or f"sm{t}" not in COMPUTE_CAPABILITIES:
        raise KvtraceError(f"--compute-capability {text!r}: expected one of {', '.join(COMPUTE_CAPABILITIES)}")
    return f"sm{t}"


def cc_of(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


class TrtLogger:
    """A TensorRT logger that keeps errors (for our messages) and prints at `print_level`."""

    def __new__(cls, trt, print_level: str = "ERROR"):
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []
                self.print_at = getattr(trt.ILogger.Severity, print_level)

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(str(msg))
                if severity <= self.print_at:
                    print(f"[TensorRT] {msg}", flush=True)

        return _Logger()


# ------------------------------------------------------------------ profiles and requests
def fit_profile(section: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first optimization profile that holds every input shape in `shapes`.

    `section` is the manifest's "tensorrt" entry; its profiles are listed decode first, so a
    one-token step runs on the profile tuned for it. Raises KvtraceError naming the input, its
    shape and the engine's range, and what to rebuild with.
    """
    profiles = section.get("profiles") or []
    misfits = []
    for idx, prof in enumerate(profiles):
        bad = None
        for name, shape in shapes.items():
            rng = prof["inputs"].get(name)
            if rng is None:
                continue
            lo, hi = rng["min"], rng["max"]
            if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
                bad = f"{name} {tuple(shape)} outside {tuple(lo)}..{tuple(hi)}"
                break
        if bad is None:
            return idx
        misfits.append(f"profile {prof.get('name', idx)}: {bad}")
    lim = section.get("limits", {})
    raise KvtraceError(
        "the request does not fit the TensorRT engine's optimization profiles ("
        + "; ".join(misfits) + f"). The engine takes batch <= {lim.get('max_batch', '?')} and "
        f"<= {lim.get('max_seq', '?')} tokens per call: rebuild with `kvtrace build ARTIFACT "
        "--max-batch N --max-seq N` (within the artifact's export limits) or send a smaller request")


# ------------------------------------------------------------------ CUDA driver via ctypes
_CUDA_ERROR_NO_DEVICE = 100
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76


def _open_driver(device: int = 0, lib_names=("libcuda.so.1", "libcuda.so", "nvcuda.dll")):
    """(libcuda with argtypes set, compute capability of `device`); KvtraceError without a GPU."""
    lib = None
    for name in lib_names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise KvtraceError("backend 'tensorrt' needs an NVIDIA GPU, and this machine has none "
                           "(no CUDA driver library libcuda found); use --backend onnxruntime")
    u64, vp, sz, ci = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    for fn, args in {
        "cuInit": [ctypes.c_uint], "cuDeviceGetCount": [ctypes.POINTER(ci)],
        "cuDeviceGet": [ctypes.POINTER(ci), ci], "cuDeviceGetAttribute": [ctypes.POINTER(ci), ci, ci],
        "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), ci], "cuCtxSetCurrent": [vp],
        "cuStreamCreate": [ctypes.POINTER(vp), ctypes.c_uint], "cuStreamSynchronize": [vp],
        "cuStreamDestroy_v2": [vp], "cuMemAlloc_v2": [ctypes.POINTER(u64), sz], "cuMemFree_v2": [u64],
        "cuMemcpyHtoDAsync_v2": [u64, vp, sz, vp], "cuMemcpyDtoHAsync_v2": [vp, u64, sz, vp],
        "cuMemsetD8Async": [u64, ctypes.c_ubyte, sz, vp],
        "cuGetErrorString": [ci, ctypes.POINTER(ctypes.c_char_p)],
    }.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = args, ci
    rc = lib.cuInit(0)
    count = ci(0)
    if rc == 0:
        rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc == _CUDA_ERROR_NO_DEVICE or (rc == 0 and count.value <= device):
        raise KvtraceError(f"backend 'tensorrt' needs an NVIDIA GPU, and the CUDA driver finds "
                           f"{'none' if not count.value else f'no device {device}'} on this machine; "
                           "use --backend onnxruntime")
    if rc != 0:
        raise KvtraceError(f"the CUDA driver failed to start (cuInit/cuDeviceGetCount error {rc}); "
                           "backend 'tensorrt' needs a working NVIDIA GPU and driver")
    dev, major, minor = ci(0), ci(0), ci(0)
    if (lib.cuDeviceGet(ctypes.byref(dev), device) or
            lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev) or
            lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev)):
        raise KvtraceError(f"the CUDA driver cannot query device {device}")
    return lib, cc_of(major.value, minor.value)


def gpu_compute_capability(device: int = 0) -> str | None:
    """'sm89' etc. of the local GPU, or None when there is none (no error)."""
    try:
        return _open_driver(device)[1]
    except KvtraceError:
        return None


class CudaDriver:
    """The few CUDA driver calls the backend needs (libcuda through ctypes)."""

    def __init__(self, device: int = 0):
        lib, cc = _open_driver(device)
        self.lib = lib
        self.compute_capability = cc
        vp = ctypes.c_void_p
        dev = ctypes.c_int(0)
        self._check(lib.cuDeviceGet(ctypes.byref(dev), device), f"cuDeviceGet({device})")
        self.ctx = vp()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self._check(lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.stream = vp()
        self._check(lib.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            s = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(s))
            raise KvtraceError(f"CUDA {what} failed: error {rc} ({(s.value or b'?').decode()})")

    @property
    def stream_handle(self) -> int:
        return self.stream.value or 0

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64(0)
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(int(nbytes), 1)), f"cuMemAlloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ptr)

    def zero(self, ptr: int, nbytes: int) -> None:
        self._check(self.lib.cuMemsetD8Async(ptr, 0, nbytes, self.stream), "cuMemsetD8")

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        self._check(self.lib.cuMemcpyHtoDAsync_v2(ptr, host.ctypes.data, host.nbytes, self.stream), "cuMemcpyHtoD")

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        self._check(self.lib.cuMemcpyDtoHAsync_v2(host.ctypes.data, ptr, host.nbytes, self.stream), "cuMemcpyDtoH")

    def sync(self) -> None:
        self._check(self.lib.cuStreamSynchronize(self.stream), "cuStreamSynchronize")


class DeviceBuffer:
    """Device memory of `capacity` bytes seen as `shape`/`dtype` (a view may be smaller).

    Freed when the last reference goes (or by the backend's release()), so buffers handed to
    the caller (prefill logits, dynamic-cache presents) do not pile up.
    """

    __slots__ = ("ptr", "shape", "dtype", "capacity", "free", "__weakref__")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str, capacity: int, free=None):
        self.ptr, self.shape, self.dtype, self.capacity = ptr, tuple(shape), dtype, capacity
        self.free = weakref.finalize(self, free, ptr) if free is not None else None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(NUMPY_STORAGE[self.dtype]).itemsize

    def data_ptr(self) -> int:
        return self.ptr


# ------------------------------------------------------------------ the backend
def _trt_dtype_name(trt, dt) -> str:
    table = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16",
             trt.DataType.INT64: "int64", trt.DataType.INT32: "int32", trt.DataType.BOOL: "bool"}
    if dt not in table:
        raise KvtraceError(f"engine tensor type {dt} is not supported by the tensorrt backend")
    return table[dt]


def _get(manifest, key, default=None):
    if isinstance(manifest, dict):
        return manifest.get(key, default)
    data = getattr(manifest, "data", None)
    if isinstance(data, dict):
        return data.get(key, default)
    return getattr(manifest, key, default)


def check_engine_compatible(section: dict, *, flavour: str, version: str, device_cc: str | None) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, before deserializing it."""
    built_flavour, built_version = section.get("flavour"), section.get("version")
    if built_flavour != flavour or built_version != version:
        raise KvtraceError(
            f"the engine was built with {built_flavour} {built_version}, but {flavour} {version} is installed; "
            f"TensorRT engines only run on the version that built them: rebuild with `kvtrace build ARTIFACT`")
    if device_cc is None:
        return
    if flavour == "tensorrt_rtx" and device_cc == "sm90":
        raise KvtraceError("TensorRT-RTX does not run engines on compute capability 9.0 (H100/H200): use the "
                           "full TensorRT (`pip install 'tensorrt>=10.15'`, then `kvtrace build`) or "
                           "--backend onnxruntime-cuda on this GPU")
    ccs = section.get("compute_capabilities") or []
    if ccs and "current" not in ccs and device_cc not in ccs:
        raise KvtraceError(
            f"the engine was built for compute capability {', '.join(ccs)}, but this GPU is {device_cc}: "
            f"rebuild with `kvtrace build ARTIFACT --compute-capability {device_cc}`")
    if "current" in ccs and section.get("built_on_cc") and section["built_on_cc"] != device_cc:
        raise KvtraceError(
            f"the engine was built for the GPU of the build machine ({section['built_on_cc']}), but this GPU "
            f"is {device_cc}: rebuild with `kvtrace build ARTIFACT` on this machine")


class TrtBackend:
    """Protocol of runtime/backends.py on a TensorRT engine; buffers are DeviceBuffers."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, artifact_dir: Path, manifest, *, device_index: int = 0, log_level: str = "ERROR"):
        section = _get(manifest, "tensorrt")
        if not section:
            raise KvtraceError(f"artifact {artifact_dir} has no TensorRT engine: run `kvtrace build {artifact_dir}` "
                               "on a machine with TensorRT")
        self.section = section
        engine_file = Path(artifact_dir) / section["engine"]
        if not engine_file.is_file():
            raise KvtraceError(f"engine file {engine_file} not found (named by the manifest of {artifact_dir}): "
                               f"run `kvtrace build {artifact_dir}`")
        trt, flavour = import_tensorrt(section.get("flavour"))
        # the GPU first: without one nothing below can work, and that is the clearest message
        self.cuda = CudaDriver(device_index)
        check_engine_compatible(section, flavour=flavour, version=trt.__version__,
                                device_cc=self.cuda.compute_capability)
        self.trt = trt
        self._logger = TrtLogger(trt, log_level)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise KvtraceError(f"TensorRT cannot load {engine_file}: " + " | ".join(self._logger.errors[-3:]))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise KvtraceError(f"TensorRT cannot create an execution context for {engine_file}: "
                               + " | ".join(self._logger.errors[-3:]))
        self.inputs, self.outputs = {}, {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            dt = _trt_dtype_name(trt, self.engine.get_tensor_dtype(n))
            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                self.inputs[n] = dt
            else:
                self.outputs[n] = dt
        # KV_CACHE_UPDATE: each static cache output is its input's memory, updated in place
        # (the I/O contract names the pairs; the engine confirms where its API can say so)
        io = _get(manifest, "io") or {}
        self.aliases = {out: src for out, src in (io.get("cache_aliases") or {}).items() if out in self.outputs}
        if hasattr(self.engine, "get_aliased_input_tensor"):
            for out, src in self.aliases.items():
                got = self.engine.get_aliased_input_tensor(out)
                if got and got != src:
                    raise KvtraceError(f"engine {engine_file}: output {out!r} updates input {got!r} in place, "
                                       f"but the manifest pairs it with {src!r}; rebuild the engine")
        self._bound_in: dict[str, DeviceBuffer] = {}
        self._bound_out: dict[str, DeviceBuffer | None] = {}
        self._auto: dict[str, DeviceBuffer] = {}  # outputs the backend allocated on the last run
        self._staging: dict[str, DeviceBuffer] = {}  # host feeds, reused while they fit
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._profile = 0

    # --------------------------------------------------------------- memory
    def _new(self, shape, dtype: str, capacity: int | None = None) -> DeviceBuffer:
        nbytes = math.prod(shape) * np.dtype(NUMPY_STORAGE[dtype]).itemsize
        cap = max(int(capacity or nbytes), 1)
        buf = DeviceBuffer(self.cuda.alloc(cap), tuple(shape), dtype, cap, free=self.cuda.free)
        self._live.add(buf)
        return buf

    def alloc(self, shape, dtype: str) -> DeviceBuffer:
        buf = self._new(tuple(int(s) for s in shape), dtype)
        self.cuda.zero(buf.ptr, buf.capacity)
        self.cuda.sync()
        return buf

    def to_host(self, buf: DeviceBuffer) -> np.ndarray:
        host = np.empty(buf.shape, dtype=NUMPY_STORAGE[buf.dtype])
        self.cuda.to_host(host, buf.ptr)
        self.cuda.sync()
        return host

    # --------------------------------------------------------------- binding
    def bind_input(self, name: str, buf: DeviceBuffer) -> None:
        if name not in self.inputs:
            raise KvtraceError(f"engine has no input {name!r} (inputs: {', '.join(self.inputs)})")
        if buf.dtype != self.inputs[name]:
            raise KvtraceError(f"input {name!r}: buffer dtype {buf.dtype}, the engine takes {self.inputs[name]}")
        self._bound_in[name] = buf

    def bind_output(self, name: str, buf: DeviceBuffer | None) -> None:
        if name not in self.outputs:
            raise KvtraceError(f"engine has no output {name!r} (outputs: {', '.join(self.outputs)})")
        alias = self.aliases.get(name)
        if alias is not None and (buf is None or self._bound_in.get(alias) is not buf):
            raise KvtraceError(f"output {name!r} is updated in place by TensorRT: bind it to the same buffer as "
                               f"its input {alias!r} (bind the input first)")
        self._bound_out[name] = buf

    # --------------------------------------------------------------- run
    def run(self, feeds: dict[str, np.ndarray]) -> None:
        ctx, cuda = self.context, self.cuda
        keep = []  # host arrays stay alive until the copies are done
        shapes = {n: b.shape for n, b in self._bound_in.items()}
        for name, arr in feeds.items():
            if name not in self.inputs:
                raise KvtraceError(f"engine has no input {name!r} (inputs: {', '.join(self.inputs)})")
            want = np.dtype(NUMPY_STORAGE[self.inputs[name]])
            if arr.dtype != want:
                raise KvtraceError(f"input {name!r}: feed dtype {arr.dtype}, the engine takes {want}")
            shapes[name] = tuple(arr.shape)
        missing = set(self.inputs) - set(shapes)
        if missing:
            raise KvtraceError(f"engine inputs not bound or fed: {', '.join(sorted(missing))}")
        profile = fit_profile(self.section, shapes)
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, cuda.stream_handle):
                raise KvtraceError(f"TensorRT cannot switch to optimization profile {profile}")
            self._profile = profile
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr)
            keep.append(arr)
            buf = self._staging.get(name)
            if buf is None or buf.capacity < arr.nbytes:  # (the last run is synchronized: free to drop)
                buf = self._new(arr.shape, self.inputs[name], capacity=max(arr.nbytes, 64))
                self._staging[name] = buf
            buf.shape = tuple(arr.shape)
            cuda.to_device(buf.ptr, arr)
            self._set_input(name, buf)
        for name, buf in self._bound_in.items():
            if name not in feeds:
                self._set_input(name, buf)
        self._auto.clear()  # the caller may still hold (and bind) last run's outputs: never reused
        for name in self.outputs:
            buf = self._bound_out.get(name)
            if buf is None:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise KvtraceError(f"TensorRT could not infer the shape of output {name!r}")
                buf = self._new(shape, self.outputs[name])
                self._auto[name] = buf
            if not ctx.set_tensor_address(name, buf.ptr):
                raise KvtraceError(f"TensorRT refused the address of output {name!r}")
        if not ctx.execute_async_v3(cuda.stream_handle):
            raise KvtraceError("TensorRT execution failed: " + " | ".join(self._logger.errors[-3:]))
        cuda.sync()
        del keep

    def _set_input(self, name: str, buf: DeviceBuffer) -> None:
        if not self.context.set_input_shape(name, buf.shape):
            raise KvtraceError(f"TensorRT refused shape {buf.shape} for input {name!r}: "
                               + " | ".join(self._logger.errors[-2:]))
        if not self.context.set_tensor_address(name, buf.ptr):
            raise KvtraceError(f"TensorRT refused the address of input {name!r}")

    def output(self, name: str) -> DeviceBuffer:
        buf = self._bound_out.get(name)
        if buf is not None:
            return buf
        if name not in self._auto:
            raise KvtraceError(f"output {name!r} has not been produced yet")
        return self._auto[name]

    def release(self) -> None:
        self._bound_in.clear()
        self._bound_out.clear()
        self._auto.clear()
        self._staging.clear()
        for buf in list(self._live):
            buf.free()  # idempotent: a finalizer runs once
        self._live = weakref.WeakSet()


def create_backend(artifact_dir: Path, manifest, **options) -> TrtBackend:
    return TrtBackend(Path(artifact_dir), manifest, **options)


register_backend("tensorrt", create_backend)
