"""The few CUDA driver API calls the GPU backends need, through ctypes. No torch, no cuda-python.

libcuda ships with every NVIDIA driver, so nothing beyond the driver is needed. Rules kept here
(each was a defect of the first version, docs/gpu.md):
  * every call first makes the device's primary context current on the *calling* thread
    (cuCtxSetCurrent is per thread: a server's worker thread would otherwise get
    CUDA_ERROR_INVALID_CONTEXT);
  * every return code is checked, frees included; a free that fails inside a finalizer (which
    must not raise) is kept and raised by the next call;
  * one non-blocking stream per driver; every copy, memset, enqueue and capture goes to it;
  * host staging memory is pinned (cuMemHostAlloc), so async copies are real DMA;
  * close() synchronises, then releases the stream and the primary context, once.

Device pointers are CUdeviceptr = unsigned 64-bit (the *_v2 entry points); handles (context,
stream, graph, graph exec) are pointers. The signatures are cuda.h's (CUDA 11.4+: the graph
entry point cuGraphInstantiateWithFlags).
"""
from __future__ import annotations

import ctypes
import math
import threading
import weakref

import numpy as np

from kvtrace.errors import KvtraceError

LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901
CU_STREAM_NON_BLOCKING = 1
CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1  # only this thread's unsafe calls break the capture
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76

_u64, _vp, _sz, _ci, _cu = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint
_P = ctypes.POINTER
# name -> argtypes (every function returns CUresult, an int); "optional" ones may be missing
_SIGNATURES = {
    "cuInit": [_cu], "cuDriverGetVersion": [_P(_ci)], "cuDeviceGetCount": [_P(_ci)],
    "cuDeviceGet": [_P(_ci), _ci], "cuDeviceGetAttribute": [_P(_ci), _ci, _ci],
    "cuDeviceGetName": [ctypes.c_char_p, _ci, _ci], "cuDeviceTotalMem_v2": [_P(_sz), _ci],
    "cuDevicePrimaryCtxRetain": [_P(_vp), _ci], "cuDevicePrimaryCtxRelease_v2": [_ci],
    "cuCtxSetCurrent": [_vp], "cuCtxSynchronize": [],
    "cuStreamCreate": [_P(_vp), _cu], "cuStreamSynchronize": [_vp], "cuStreamDestroy_v2": [_vp],
    "cuMemAlloc_v2": [_P(_u64), _sz], "cuMemFree_v2": [_u64],
    "cuMemHostAlloc": [_P(_vp), _sz, _cu], "cuMemFreeHost": [_vp],
    "cuMemcpyHtoDAsync_v2": [_u64, _vp, _sz, _vp], "cuMemcpyDtoHAsync_v2": [_vp, _u64, _sz, _vp],
    "cuMemsetD8Async": [_u64, ctypes.c_ubyte, _sz, _vp], "cuMemsetD8_v2": [_u64, ctypes.c_ubyte, _sz],
    "cuGetErrorString": [_ci, _P(ctypes.c_char_p)],
    # CUDA graphs (stream capture)
    "cuStreamBeginCapture_v2": [_vp, _ci], "cuStreamEndCapture": [_vp, _P(_vp)],
    "cuGraphInstantiateWithFlags": [_P(_vp), _vp, ctypes.c_ulonglong], "cuGraphLaunch": [_vp, _vp],
    "cuGraphDestroy": [_vp], "cuGraphExecDestroy": [_vp],
}
_OPTIONAL = {"cuDeviceGetName", "cuDeviceTotalMem_v2", "cuDriverGetVersion", "cuStreamBeginCapture_v2",
             "cuStreamEndCapture", "cuGraphInstantiateWithFlags", "cuGraphLaunch", "cuGraphDestroy",
             "cuGraphExecDestroy"}
CAPTURE_FUNCTIONS = ("cuStreamBeginCapture_v2", "cuStreamEndCapture", "cuGraphInstantiateWithFlags",
                     "cuGraphLaunch", "cuGraphDestroy", "cuGraphExecDestroy")


def load_libcuda(names=None):
    """libcuda with argtypes set (missing optional functions become None); KvtraceError without it."""
    lib = None
    for name in names or LIBCUDA_NAMES:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise KvtraceError("this machine has no NVIDIA GPU driver (the CUDA driver library libcuda was not found)")
    fns = {}
    for fn, args in _SIGNATURES.items():
        try:
            f = getattr(lib, fn)
        except AttributeError:
            if fn in _OPTIONAL:
                fns[fn] = None
                continue
            raise KvtraceError(f"the CUDA driver library lacks {fn} (driver too old)") from None
        f.argtypes, f.restype = args, _ci
        fns[fn] = f
    return lib, fns


def _error_text(fns, rc: int) -> str:
    s = ctypes.c_char_p()
    try:
        if fns["cuGetErrorString"](rc, ctypes.byref(s)) == 0 and s.value:
            return s.value.decode(errors="replace")
    except Exception:  # noqa: BLE001 - only for the message
        pass
    return "?"


def open_driver(device: int = 0, names=None):
    """(lib, functions, compute capability 'sm89' of `device`); KvtraceError without a usable GPU."""
    lib, fns = load_libcuda(names)
    count = _ci(0)
    rc = fns["cuInit"](0)
    if rc == 0:
        rc = fns["cuDeviceGetCount"](ctypes.byref(count))
    if rc == CUDA_ERROR_NO_DEVICE or (rc == 0 and count.value <= device):
        raise KvtraceError(f"the CUDA driver finds {'no GPU' if not count.value else f'no device {device}'} "
                           "on this machine")
    if rc != 0:
        raise KvtraceError(f"the CUDA driver failed to start (cuInit/cuDeviceGetCount error {rc}: "
                           f"{_error_text(fns, rc)})")
    dev, major, minor = _ci(0), _ci(0), _ci(0)
    rc = (fns["cuDeviceGet"](ctypes.byref(dev), device) or
          fns["cuDeviceGetAttribute"](ctypes.byref(major), ATTR_CC_MAJOR, dev) or
          fns["cuDeviceGetAttribute"](ctypes.byref(minor), ATTR_CC_MINOR, dev))
    if rc:
        raise KvtraceError(f"the CUDA driver cannot query device {device} (error {rc}: {_error_text(fns, rc)})")
    return lib, fns, f"sm{major.value}{minor.value}"


def driver_info(names=None) -> dict:
    """What the driver says about this machine (for `kvtrace gpu-check`): driver version and each
    device's name, compute capability and memory. KvtraceError without a usable GPU."""
    lib, fns, _ = open_driver(0, names)
    v = _ci(0)
    version = None
    if fns["cuDriverGetVersion"] is not None and fns["cuDriverGetVersion"](ctypes.byref(v)) == 0:
        version = f"{v.value // 1000}.{v.value % 1000 // 10}"  # CUDA version the driver supports
    count = _ci(0)
    fns["cuDeviceGetCount"](ctypes.byref(count))
    devices = []
    for i in range(count.value):
        dev, major, minor = _ci(0), _ci(0), _ci(0)
        if fns["cuDeviceGet"](ctypes.byref(dev), i):
            continue
        fns["cuDeviceGetAttribute"](ctypes.byref(major), ATTR_CC_MAJOR, dev)
        fns["cuDeviceGetAttribute"](ctypes.byref(minor), ATTR_CC_MINOR, dev)
        name = ctypes.create_string_buffer(256)
        mem = _sz(0)
        if fns["cuDeviceGetName"] is not None:
            fns["cuDeviceGetName"](name, 256, dev)
        if fns["cuDeviceTotalMem_v2"] is not None:
            fns["cuDeviceTotalMem_v2"](ctypes.byref(mem), dev)
        devices.append({"index": i, "name": name.value.decode(errors="replace") or None,
                        "compute_capability": f"sm{major.value}{minor.value}",
                        "memory_gib": round(mem.value / 2**30, 2) if mem.value else None})
    return {"driver_cuda_version": version, "devices": devices}


def gpu_compute_capability(device: int = 0) -> str | None:
    """'sm89' etc. of the local GPU, or None when there is none (no error)."""
    try:
        return open_driver(device)[2]
    except KvtraceError:
        return None


class HostBuffer:
    """Pinned (page-locked) host memory of `capacity` bytes, seen as a numpy uint8 array."""

    __slots__ = ("ptr", "capacity", "array")

    def __init__(self, ptr: int, capacity: int):
        self.ptr, self.capacity = ptr, capacity
        self.array = np.frombuffer((ctypes.c_char * capacity).from_address(ptr), dtype=np.uint8)

    def view(self, shape, dtype) -> np.ndarray:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        return self.array[:n].view(dtype).reshape(shape)


class CudaDriver:
    """Primary context + one stream on `device`; device and pinned memory; copies; stream capture."""

    def __init__(self, device: int = 0, names=None):
        lib, fns, cc = open_driver(device, names)
        self.lib, self.fns, self.compute_capability, self.device = lib, fns, cc, device
        self.errors: list[str] = []  # failures reported where raising was impossible (finalizers)
        self._lock = threading.Lock()
        self.ctx, self.stream = _vp(), _vp()
        self._open = False
        dev = _ci(0)
        self._check(fns["cuDeviceGet"](ctypes.byref(dev), device), f"cuDeviceGet({device})")
        self._dev = dev
        self._check(fns["cuDevicePrimaryCtxRetain"](ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self._open = True
        try:
            self.current()
            # non-blocking: no implicit synchronisation with the legacy default stream that other
            # libraries use; our copies and enqueues are ordered on this stream alone
            self._check(fns["cuStreamCreate"](ctypes.byref(self.stream), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ basics
    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise KvtraceError(f"CUDA {what} failed: error {rc} ({_error_text(self.fns, rc)})")

    def current(self) -> None:
        """Make the primary context current on the calling thread (every call does this first)."""
        if not self._open:
            raise KvtraceError("the CUDA driver of this backend was closed")
        self._check(self.fns["cuCtxSetCurrent"](self.ctx), "cuCtxSetCurrent")

    def raise_deferred(self) -> None:
        """Raise the failures finalizers recorded (a free that failed during garbage collection)."""
        if self.errors:
            errs, self.errors = self.errors, []
            raise KvtraceError("CUDA " + "; ".join(errs))

    @property
    def stream_handle(self) -> int:
        return self.stream.value or 0

    # ------------------------------------------------------------ memory
    def alloc(self, nbytes: int) -> int:
        self.current()
        ptr = _u64(0)
        self._check(self.fns["cuMemAlloc_v2"](ctypes.byref(ptr), max(int(nbytes), 1)), f"cuMemAlloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.current()
        self._check(self.fns["cuMemFree_v2"](ptr), f"cuMemFree(0x{ptr:x})")

    def free_later(self, ptr: int) -> None:
        """free() for finalizers: never raises; a failure is kept for raise_deferred()."""
        if not self._open:
            self.errors.append(f"cuMemFree(0x{ptr:x}) after the driver was closed: device memory leaked")
            return
        try:
            self.free(ptr)
        except KvtraceError as e:
            with self._lock:
                self.errors.append(str(e).removeprefix("CUDA "))

    def host_alloc(self, nbytes: int) -> HostBuffer:
        self.current()
        p = _vp()
        n = max(int(nbytes), 1)
        self._check(self.fns["cuMemHostAlloc"](ctypes.byref(p), n, 0), f"cuMemHostAlloc({nbytes})")
        return HostBuffer(p.value, n)

    def free_host(self, buf: HostBuffer) -> None:
        self.current()
        self._check(self.fns["cuMemFreeHost"](buf.ptr), f"cuMemFreeHost(0x{buf.ptr:x})")

    def zero(self, ptr: int, nbytes: int) -> None:
        self.current()
        self._check(self.fns["cuMemsetD8Async"](ptr, 0, nbytes, self.stream), "cuMemsetD8Async")

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        """Async copy of `host` (pinned memory for a real async DMA) to `ptr` on the stream."""
        self.current()
        self._check(self.fns["cuMemcpyHtoDAsync_v2"](ptr, host.ctypes.data, host.nbytes, self.stream),
                    "cuMemcpyHtoDAsync")

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        self.current()
        self._check(self.fns["cuMemcpyDtoHAsync_v2"](host.ctypes.data, ptr, host.nbytes, self.stream),
                    "cuMemcpyDtoHAsync")

    def sync(self) -> None:
        self.current()
        self._check(self.fns["cuStreamSynchronize"](self.stream), "cuStreamSynchronize")

    # ------------------------------------------------------------ CUDA graphs
    def can_capture(self) -> str | None:
        """None when stream capture is available, else why not."""
        missing = [f for f in CAPTURE_FUNCTIONS if self.fns.get(f) is None]
        return f"the CUDA driver lacks {', '.join(missing)}" if missing else None

    def begin_capture(self) -> None:
        self.current()
        self._check(self.fns["cuStreamBeginCapture_v2"](self.stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                    "cuStreamBeginCapture")

    def end_capture(self) -> tuple[int | None, str | None]:
        """(graph, None), or (None, why) when the capture was invalidated (e.g. a synchronising
        call inside it); the stream is out of capture mode either way."""
        self.current()
        g = _vp()
        rc = self.fns["cuStreamEndCapture"](self.stream, ctypes.byref(g))
        if rc != 0:
            if g.value:  # a graph came back with an error: not to be used
                self.fns["cuGraphDestroy"](g)
            return None, f"cuStreamEndCapture error {rc} ({_error_text(self.fns, rc)})"
        return g.value, None

    def instantiate(self, graph: int) -> int:
        self.current()
        ex = _vp()
        try:
            self._check(self.fns["cuGraphInstantiateWithFlags"](ctypes.byref(ex), graph, 0), "cuGraphInstantiate")
        finally:
            self._check(self.fns["cuGraphDestroy"](graph), "cuGraphDestroy")  # the exec keeps what it needs
        return ex.value

    def launch(self, graph_exec: int) -> None:
        self.current()
        self._check(self.fns["cuGraphLaunch"](graph_exec, self.stream), "cuGraphLaunch")

    def destroy_exec(self, graph_exec: int) -> None:
        self.current()
        self._check(self.fns["cuGraphExecDestroy"](graph_exec), "cuGraphExecDestroy")

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        """Synchronise, destroy the stream, release the primary context. Idempotent; raises
        KvtraceError naming every call that failed (after trying them all)."""
        if not self._open:
            return
        errors = list(self.errors)
        self.errors = []
        steps = []
        if self.stream.value:
            steps += [("cuStreamSynchronize", lambda: self.fns["cuStreamSynchronize"](self.stream)),
                      ("cuStreamDestroy", lambda: self.fns["cuStreamDestroy_v2"](self.stream))]
        try:
            rc = self.fns["cuCtxSetCurrent"](self.ctx)
            if rc:
                errors.append(f"cuCtxSetCurrent failed: error {rc} ({_error_text(self.fns, rc)})")
            for what, call in steps:
                rc = call()
                if rc:
                    errors.append(f"{what} failed: error {rc} ({_error_text(self.fns, rc)})")
            self.stream = _vp()
        finally:
            self._open = False
            rc = self.fns["cuDevicePrimaryCtxRelease_v2"](self._dev)
            if rc:
                errors.append(f"cuDevicePrimaryCtxRelease failed: error {rc} ({_error_text(self.fns, rc)})")
        if errors:
            raise KvtraceError("CUDA " + "; ".join(errors))


class DeviceBuffer:
    """Device memory of `capacity` bytes seen as `shape`/`dtype` (a view may be smaller).

    Freed when the last reference goes (a finalizer calling the driver's free_later), or by the
    backend's release(), whichever comes first (the finalizer runs once)."""

    __slots__ = ("ptr", "shape", "dtype", "capacity", "free", "__weakref__")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str, capacity: int, free=None):
        self.ptr, self.shape, self.dtype, self.capacity = ptr, tuple(shape), dtype, capacity
        self.free = weakref.finalize(self, free, ptr) if free is not None else None

    @property
    def nbytes(self) -> int:
        from .backends import NUMPY_STORAGE

        return math.prod(self.shape) * np.dtype(NUMPY_STORAGE[self.dtype]).itemsize

    def data_ptr(self) -> int:
        return self.ptr


def memset_device(ptr: int, nbytes: int, device: int = 0, names=None) -> None:
    """Zero `nbytes` of device memory at `ptr` (memory of `device`'s primary context, e.g. from
    onnxruntime's CUDA allocator), synchronously, from any thread."""
    lib, fns, _ = open_driver(device, names)
    dev, ctx = _ci(0), _vp()

    def check(rc, what):
        if rc:
            raise KvtraceError(f"CUDA {what} failed: error {rc} ({_error_text(fns, rc)})")

    check(fns["cuDeviceGet"](ctypes.byref(dev), device), "cuDeviceGet")
    check(fns["cuDevicePrimaryCtxRetain"](ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    try:
        check(fns["cuCtxSetCurrent"](ctx), "cuCtxSetCurrent")
        check(fns["cuMemsetD8_v2"](ptr, 0, nbytes), "cuMemsetD8")
        check(fns["cuCtxSynchronize"](), "cuCtxSynchronize")
    finally:
        check(fns["cuDevicePrimaryCtxRelease_v2"](dev), "cuDevicePrimaryCtxRelease")
