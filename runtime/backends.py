"""Execution backends behind one small protocol. No torch.

The model (runtime/model.py) owns the cache bookkeeping; a backend only owns memory on its
device and runs the graph:

    b = create_backend(name, artifact_dir, manifest, **options)
    buf = b.alloc(shape, dtype)          # zeroed buffer on the backend's device ("float32", "int64", ...)
    b.bind_input(name, buf)              # stays bound until rebound
    b.bind_output(name, buf)             # a static cache: the SAME buffer as its input (in-place update)
    b.bind_output(name, None)            # the backend allocates this output on every run (dynamic shapes)
    b.run({"input_ids": arr, ...})       # host numpy feeds, copied into staging buffers for this call
    b.run_graph(key, feeds)              # optional: a run the caller repeats with the same bound buffers
                                         # and feed shapes (a decode step); the backend may capture it
                                         # once per key (CUDA graphs) and replay it
    b.output(name)                       # the buffer the output went to on the last run
    b.to_host(buf)                       # numpy; on CPU a view of the buffer itself (no copy)
    b.rows(buf, lo, hi)                  # optional: rows [lo, hi) of the batch axis, same memory
                                         # (continuous batching, runtime/slots.py)
    b.release()                          # drop bindings and buffers

Backends register by name: `register_backend("tensorrt", factory)`, where
`factory(artifact_dir: Path, manifest, **options) -> Backend`. "tensorrt" is looked up lazily
in runtime/trt_backend.py, which registers itself on import (or exposes `create_backend`).

onnxruntime on CUDA ("onnxruntime-cuda") never falls back to the CPU silently: the session is
created with CPU fallback disabled, CUDA must be its first provider, and node placement is
checked at load (docs/gpu.md).
"""
from __future__ import annotations

import functools
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
# dtypes a host feed may have (input_ids, position_ids, logits_index, attention_mask)
_FEED_DTYPE = {np.dtype(np.int64): "int64", np.dtype(np.int32): "int32", np.dtype(np.bool_): "bool"}

# The oldest onnxruntime-gpu seen running this project's graphs on CUDA: Attention-24 (bool mask,
# GQA), RotaryEmbedding-23 and TensorScatter-24 on the CUDA provider with CPU fallback disabled
# (1.31.1, CUDA 13 build, H100; the project's design notes). Older builds place Attention on the CPU
# (1.24.x) or register a CUDA Attention kernel that throws at *run* time on bool masks, GQA or
# softmax_precision, which no placement check can see; see docs/gpu.md for the history.
MIN_ORT_GPU = (1, 31, 1)
CPU_FALLBACK_OFF = "session.disable_cpu_ep_fallback"  # session config: no node may go to the CPU
RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"  # session config: keep node placement
GRAPH_ID = "gpu_graph_id"  # run config: which captured CUDA graph a run is (-1: never capture)
# session config: the folder of a graph's external data when the graph is loaded from bytes
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
# session config: compute type of the MatMulNBits that DequantizeLinear + MatMul fuse into
QDQ_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


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


def version_tuple(v: str) -> tuple[int, ...]:
    """'1.31.1' -> (1, 31, 1); '1.32.0.dev2026' -> (1, 32, 0); stops at the first part without digits."""
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _import_ort():
    """onnxruntime (tests replace this to drive the CUDA code path on the CPU)."""
    import onnxruntime

    return onnxruntime


# ------------------------------------------------------------------------- CUDA: is it real?
def _probe_model() -> bytes:
    """A one-node ONNX model, y = x + x over float32 (4,), serialized by hand: the runtime has
    no onnx package. ModelProto{ir_version 10, graph, opset_import {"" 17}} in protobuf wire format."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def fld(num: int, payload) -> bytes:  # field `num`: int -> varint, bytes/str -> length-delimited
        if isinstance(payload, int):
            return varint(num << 3) + varint(payload)
        data = payload.encode() if isinstance(payload, str) else payload
        return varint(num << 3 | 2) + varint(len(data)) + data

    def value_info(name: str) -> bytes:  # ValueInfoProto{name, type{tensor_type{elem_type 1, shape{dim{4}}}}}
        shape = fld(2, fld(1, fld(1, 4)))
        return fld(1, name) + fld(2, fld(1, fld(1, 1) + shape))

    node = fld(1, "x") + fld(1, "x") + fld(2, "y") + fld(3, "probe_add") + fld(4, "Add")
    graph = fld(1, node) + fld(2, "kvtrace_cuda_probe") + fld(11, value_info("x")) + fld(12, value_info("y"))
    return fld(1, 10) + fld(7, graph) + fld(8, fld(1, "") + fld(2, 17))


@functools.lru_cache(maxsize=None)
def cuda_status(device_id: int = 0) -> tuple[bool, str]:
    """(True, what) when a CUDA session really can be created and run here: onnxruntime-gpu
    >= MIN_ORT_GPU, a session with CPU fallback disabled whose first provider is CUDA, and one
    run whose result is right. (False, why) otherwise. Cached per process."""
    try:
        ort = _import_ort()
    except ImportError:
        return False, "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, (f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu "
                       f">= {'.'.join(map(str, MIN_ORT_GPU))}, and not the CPU package beside it)")
    if version_tuple(ort.__version__) < MIN_ORT_GPU:
        return False, _old_ort_message(ort.__version__)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4  # our message says what failed
        so.add_session_config_entry(CPU_FALLBACK_OFF, "1")
        sess = ort.InferenceSession(_probe_model(), sess_options=so,
                                    providers=[("CUDAExecutionProvider", {"device_id": str(device_id)})],
                                    enable_fallback=0)
        first = (sess.get_providers() or ["none"])[0]
        if first != "CUDAExecutionProvider":
            return False, f"onnxruntime-gpu {ort.__version__}: the CUDA provider did not initialise (first provider {first})"
        x = np.arange(4, dtype=np.float32)
        y = sess.run(None, {"x": x})[0]
        if not np.array_equal(y, x + x):
            return False, f"onnxruntime-gpu {ort.__version__}: a CUDA test run returned {y.tolist()}, not {(x + x).tolist()}"
    except Exception as e:  # noqa: BLE001 - any failure means: no usable CUDA session
        return False, f"onnxruntime-gpu {ort.__version__} cannot create a CUDA session: {_one_line(e)}"
    return True, f"onnxruntime-gpu {ort.__version__}, CUDA device {device_id}"


def cuda_available(device_id: int = 0) -> bool:
    """Whether a CUDA onnxruntime session can really be created and run here (cuda_status)."""
    return cuda_status(device_id)[0]


def _old_ort_message(version: str) -> str:
    return (f"onnxruntime-gpu {version} is older than {'.'.join(map(str, MIN_ORT_GPU))}, the oldest build seen "
            "running Attention-24, RotaryEmbedding-23 and TensorScatter-24 on CUDA (older builds run attention on "
            f"the CPU or fail at run time): pip install -U 'onnxruntime-gpu>={'.'.join(map(str, MIN_ORT_GPU))}'")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400]


def placement(sess) -> dict | None:
    """Where onnxruntime put each node (the session must have been created with
    RECORD_PLACEMENT=1): {"nodes": {provider: count}, "cpu": ["OpType name", ...]}, or None when
    this onnxruntime cannot say."""
    try:
        subgraphs = sess.get_provider_graph_assignment_info()
    except AttributeError:
        return None
    nodes: dict[str, int] = {}
    cpu = []
    for sg in subgraphs:
        members = list(sg.get_nodes())
        nodes[sg.ep_name] = nodes.get(sg.ep_name, 0) + len(members)
        if sg.ep_name == "CPUExecutionProvider":
            cpu.extend(f"{n.op_type} {n.name}" for n in members)
    return {"nodes": nodes, "cpu": cpu}


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


def _zero_device(ov, nbytes: int, device_id: int) -> None:
    """Zero a CUDA OrtValue's memory on the device (cuMemsetD8 through the CUDA driver: the
    onnxruntime Python API has no memset, and zeros copied up from the host would cost a
    host->device transfer of the whole buffer)."""
    from .cuda_driver import memset_device

    memset_device(ov.data_ptr(), nbytes, device_id)


class OrtBackend:
    """onnxruntime with IO binding, CPU or CUDA: the same code path, buffers on the device.

    Options:
      threads: intra-op threads (None: onnxruntime's default); optimization: "all"|"basic"|"none".
      graph: "auto" | "cpu" | "gpu": which form of the graph to load; auto: the GPU form
        (model.gpu.onnx, written by every `kvtrace export`) on CUDA when the artifact has it, else model.onnx.
      cuda_graph: None (auto: on for CUDA with a graph whose shapes do not depend on input values,
        i.e. the GPU form) | True (required: error where impossible) | False (off). Decode steps
        (run_graph) are then captured once per batch size and replayed (onnxruntime's
        enable_cuda_graph + the gpu_graph_id run option).
      allow_cpu_nodes: CUDA only; accept a graph some of whose nodes onnxruntime places on the CPU
        (refused by default, naming them).
      check_fixed_buffers: record every run_graph's bound buffer addresses and shapes on any
        device (what capture relies on) without capturing: graph_runs() shows them.
      accuracy_level: quantised artifacts: the compute type of onnxruntime's fused low-bit MatMul
        (session.qdq_matmulnbits_accuracy_level), default the manifest's quant.accuracy_level.
      graph_bytes: CPU only; a serialized graph to run instead of the artifact's file (a piece of
        it, exporter/chain.py), its external data resolved in the artifact directory.
    """

    def __init__(self, artifact_dir: Path, manifest, *, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", log_severity: int = 3, graph: str = "auto",
                 cuda_graph: bool | None = None, allow_cpu_nodes: bool = False,
                 check_fixed_buffers: bool = False, device_id: int = 0, prepack: bool = True,
                 accuracy_level: int | None = None, graph_bytes: bytes | None = None):
        try:
            ort = _import_ort()
        except ImportError as e:
            raise KvtraceError("onnxruntime is not installed (pip install onnxruntime, "
                               "or onnxruntime-gpu for CUDA)") from e
        self._ort = ort
        self.device = device
        self.device_id = int(device_id)
        self.name = "onnxruntime-cuda" if device == "cuda" else "onnxruntime"
        self.notes: list[str] = []  # what the caller should know (graph form, capture off and why)
        artifact_dir = Path(artifact_dir)
        onnx_file, self.graph_form, attend = _graph_file(artifact_dir, manifest, graph, device)
        ext = _manifest_get(manifest, "external_data", None)
        if ext and not (artifact_dir / ext).is_file():
            raise KvtraceError(f"external weight file {artifact_dir / ext} not found "
                               f"(named by the manifest of {artifact_dir})")
        if optimization not in ("all", "basic", "none"):
            raise KvtraceError(f"optimization {optimization!r}: expected all, basic or none")
        static = ((_manifest_get(manifest, "io", None) or {}).get("layout")) == "static"
        # capture needs every shape to follow from the input shapes (no Slice to max(position_ids)+1)
        capturable = static and attend == "full"
        if cuda_graph and device != "cuda":
            raise KvtraceError("cuda_graph=True needs the onnxruntime-cuda backend")
        if cuda_graph and not capturable:
            raise KvtraceError(f"CUDA graphs need the GPU form of the graph (static cache, attention over the whole "
                               f"cache); {onnx_file.name} has attend={attend!r}: use the GPU form (graph='gpu'; artifacts "
                               f"exported before it existed: export again)")
        capture = device == "cuda" and capturable and cuda_graph is not False
        # a quantised artifact (manifest "quant"): the compute type of onnxruntime's fused low-bit
        # MatMul, as exported (4: int8 activations per block, the fast one on CPU)
        quant = _manifest_get(manifest, "quant", None) or {}
        if accuracy_level is None:
            accuracy_level = quant.get("accuracy_level")
        if device == "cuda" and cuda_graph is None and not capturable:
            self.notes.append(f"CUDA graphs off: {onnx_file.name} has shapes that depend on input values "
                              f"(attend={attend!r}); the GPU form (model.gpu.onnx) has none")

        def options():
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
            if accuracy_level is not None:
                so.add_session_config_entry(QDQ_ACCURACY_LEVEL, str(int(accuracy_level)))
            if graph_bytes is not None:  # where its external data lives; a few runs: no arena kept
                so.add_session_config_entry(EXTERNAL_FOLDER, str(artifact_dir))
                so.enable_cpu_mem_arena = False
            return so

        self.placement = None
        if graph_bytes is not None and device == "cuda":
            raise KvtraceError("graph_bytes: onnxruntime on the CPU only")
        if device == "cuda":
            self.session, self.placement, capture = self._cuda_session(onnx_file, options, capture, allow_cpu_nodes)
        else:
            try:
                self.session = ort.InferenceSession(str(onnx_file) if graph_bytes is None else graph_bytes,
                                                    sess_options=options(), providers=["CPUExecutionProvider"])
            except Exception as e:
                if _manifest_get(manifest, "dtype", None) == "bfloat16" and "NOT_IMPLEMENTED" in str(e):
                    raise KvtraceError(f"{artifact_dir} is a bfloat16 artifact, and onnxruntime's CPU provider has "
                                       "no bfloat16 kernels (MatMul); run it on a GPU (--backend tensorrt or "
                                       "onnxruntime-cuda), or export float32 / --fp16 for the CPU") from e
                raise KvtraceError(f"onnxruntime cannot load {onnx_file}: {e}") from e
        self.onnx_file = onnx_file
        self.cuda_graph = capture
        self._track = capture or bool(check_fixed_buffers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        self._io = self.session.io_binding()
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._in_bound: dict[str, _Buf] = {}  # what each input is bound to now
        self._out_bound: dict[str, _Buf | None] = {}
        self._out_last: dict[str, _Buf] = {}
        self._staging: dict[str, _Buf] = {}  # run(): per feed name, a reusable buffer of the last shape
        self._graph_staging: dict[Any, dict[str, _Buf]] = {}  # run_graph(): per key, fixed buffers
        self._graphs: dict[Any, dict] = {}  # run_graph key -> {"id", "signature", "runs", "captures"}
        self._next_graph_id = 1
        self._skip_ro = None
        if capture:
            self._skip_ro = ort.RunOptions()
            self._skip_ro.add_run_config_entry(GRAPH_ID, "-1")  # prefill and other one-off shapes

    # --------------------------------------------------------------- CUDA session
    def _cuda_session(self, onnx_file: Path, options, capture: bool, allow_cpu_nodes: bool):
        """(session, placement, capture) on CUDA, or KvtraceError saying why not.

        First a strict session: CUDA the only provider named, session.disable_cpu_ep_fallback=1
        (onnxruntime then refuses any node it would put on the CPU), Python-level fallback off.
        If that fails, a second session with the CPU allowed tells where the nodes went: CPU nodes
        are refused by default, naming them, or accepted with allow_cpu_nodes (capture off then:
        onnxruntime captures only all-CUDA graphs)."""
        ort = self._ort
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise KvtraceError("backend 'onnxruntime-cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not "
                               f"available in onnxruntime {ort.__version__}; with both onnxruntime and "
                               "onnxruntime-gpu installed the CPU package may shadow the GPU one)")
        if version_tuple(ort.__version__) < MIN_ORT_GPU:
            raise KvtraceError(_old_ort_message(ort.__version__))
        cuda_opts = {"device_id": str(self.device_id)}
        if capture:
            cuda_opts["enable_cuda_graph"] = "1"
        so = options()
        so.log_severity_level = max(so.log_severity_level, 4)  # a refusal is reported by us, below
        so.add_session_config_entry(CPU_FALLBACK_OFF, "1")
        so.add_session_config_entry(RECORD_PLACEMENT, "1")
        strict_error = None
        try:
            sess = ort.InferenceSession(str(onnx_file), sess_options=so,
                                        providers=[("CUDAExecutionProvider", cuda_opts)], enable_fallback=0)
        except Exception as e:  # noqa: BLE001 - diagnosed below
            sess, strict_error = None, e
        if sess is not None:
            _check_cuda_first(sess, onnx_file)
            where = placement(sess)
            if where is None or not where["cpu"]:
                sess.disable_fallback()
                return sess, where, capture
            diag = sess  # (cannot happen with fallback disabled; handled like the diagnosis below)
        else:
            so = options()
            so.add_session_config_entry(RECORD_PLACEMENT, "1")
            diag_opts = {"device_id": str(self.device_id)}
            try:
                diag = ort.InferenceSession(str(onnx_file), sess_options=so,
                                            providers=[("CUDAExecutionProvider", diag_opts), "CPUExecutionProvider"],
                                            enable_fallback=0)
            except Exception as e:
                raise KvtraceError(f"onnxruntime-cuda cannot load {onnx_file}: {_one_line(strict_error or e)}") from e
            _check_cuda_first(diag, onnx_file)
            where = placement(diag)
            if where is None or not where["cpu"]:
                raise KvtraceError(f"onnxruntime-cuda cannot load {onnx_file} with CPU fallback disabled: "
                                   f"{_one_line(strict_error)}")
        cpu = where["cpu"]
        listed = ", ".join(cpu[:8]) + (f" and {len(cpu) - 8} more" if len(cpu) > 8 else "")
        if not allow_cpu_nodes:
            hint = ("; use the GPU form (graph='gpu', model.gpu.onnx): it has no shapes computed from input values"
                    if self.graph_form == "cpu" else "")
            raise KvtraceError(f"onnxruntime-cuda would run {len(cpu)} node(s) of {onnx_file.name} on the CPU, with "
                               f"device<->host copies every step: {listed}{hint}; pass --allow-cpu-nodes to run anyway")
        self.notes.append(f"{len(cpu)} node(s) run on the CPU (--allow-cpu-nodes): {listed}")
        if capture:
            self.notes.append("CUDA graphs off: onnxruntime captures only graphs whose nodes all run on CUDA")
        diag.disable_fallback()
        return diag, where, False

    # --------------------------------------------------------------- memory
    def alloc(self, shape, dtype: str) -> _Buf:
        shape = tuple(int(s) for s in shape)
        if self._ort_device == "cpu":
            # np.empty + fill, not np.zeros: calloc'd pages would be faulted in by the first
            # TensorScatter instead (seconds at batch 8 x 2048 slots), i.e. during the first request
            host = np.empty(shape, dtype=NUMPY_STORAGE[dtype])
            host.fill(0)
            return self._wrap(host, dtype)
        # on the device: allocated there and zeroed there, nothing copied up from the host
        ov = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _ONNX_TYPE[dtype], "cuda", self.device_id)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY_STORAGE[dtype]).itemsize
        if nbytes:
            _zero_device(ov, nbytes, self.device_id)
        return _Buf(ov, None, dtype)

    def _wrap(self, host: np.ndarray, dtype: str) -> _Buf:
        """A buffer holding `host`'s values: on the CPU its very memory, on CUDA one upload."""
        ort = self._ort
        if self._ort_device == "cpu":
            # shares memory with `host`: writing the array writes the tensor and vice versa
            ov = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, _ONNX_TYPE[dtype]) \
                if dtype == "bfloat16" else ort.OrtValue.ortvalue_from_numpy(host)
            return _Buf(ov, host, dtype)
        ov = ort.OrtValue.ortvalue_from_shape_and_type(list(host.shape), _ONNX_TYPE[dtype], "cuda", self.device_id)
        ov.update_inplace(np.ascontiguousarray(host))
        return _Buf(ov, None, dtype)

    def rows(self, buf: _Buf, lo: int, hi: int) -> _Buf:
        """Rows [lo, hi) of the first (outermost) axis of `buf`, sharing its memory: a contiguous
        part, so an OrtValue over the numpy view binds it (runtime/slots.py). CPU only: the Python
        API of onnxruntime cannot wrap device memory at an offset."""
        if buf.host is None:
            raise KvtraceError(f"backend {self.name}: binding part of a device buffer is not supported")
        return self._wrap(buf.host[lo:hi], buf.dtype)

    def to_host(self, buf: _Buf) -> np.ndarray:
        if buf.host is not None:
            return buf.host
        return buf.ov.numpy()  # device -> host copy

    # --------------------------------------------------------------- binding
    def bind_input(self, name: str, buf: _Buf) -> None:
        self._io.bind_ortvalue_input(name, buf.ov)
        self._in_bound[name] = buf

    def bind_output(self, name: str, buf: _Buf | None) -> None:
        if buf is None:
            self._io.bind_output(name, self._ort_device, self.device_id)
        else:
            self._io.bind_ortvalue_output(name, buf.ov)
        self._out_bound[name] = buf
        self._out_last.pop(name, None)

    def clear_outputs(self) -> None:
        self._io.clear_binding_outputs()
        self._out_bound.clear()
        self._out_last.clear()

    def _stage(self, name: str, arr: np.ndarray, pool: dict[str, _Buf]) -> None:
        """Copy a small host feed into a buffer of `pool` (reused while shape and dtype match) and
        bind it as input `name`."""
        dtype = _FEED_DTYPE.get(arr.dtype)
        if dtype is None:
            raise KvtraceError(f"input {name!r}: unsupported feed dtype {arr.dtype}")
        want = self._input_types.get(name)
        if want is not None and want != f"tensor({dtype})":
            raise KvtraceError(f"input {name!r}: feed dtype {arr.dtype}, the graph takes {want}")
        buf = pool.get(name)
        if buf is None or buf.shape != arr.shape or buf.dtype != dtype:
            buf = self._wrap(np.array(arr, copy=True), dtype)
            pool[name] = buf
        elif buf.host is not None:
            np.copyto(buf.host, arr)  # the bound OrtValue sees it: same memory
        else:
            buf.ov.update_inplace(np.ascontiguousarray(arr))  # into the same device memory
        if self._in_bound.get(name) is not buf:
            self.bind_input(name, buf)

    # --------------------------------------------------------------- run
    def run(self, feeds: dict[str, np.ndarray]) -> None:
        self._run(feeds, None)

    def run_graph(self, key, feeds: dict[str, np.ndarray]) -> None:
        """A run the caller repeats under `key` with the same bound buffers and feed shapes (a
        decode step of one batch size): feeds go to buffers fixed per key, and with CUDA graphs
        the run is captured once (after onnxruntime's warm-up runs) and replayed. If a bound
        buffer moved since (e.g. new caches for a new batch), the key gets a new graph."""
        if not self._track:
            self.run(feeds)  # (honours a subclass's run())
            return
        self._run(feeds, key)

    def _run(self, feeds: dict[str, np.ndarray], key) -> None:
        pool = self._staging if key is None else self._graph_staging.setdefault(key, {})
        for name, arr in feeds.items():
            self._stage(name, arr, pool)
        run_options = self._skip_ro
        if key is not None:
            gid = self._graph_for(key)
            if self.cuda_graph:
                run_options = self._ort.RunOptions()
                run_options.add_run_config_entry(GRAPH_ID, str(gid))
        if self._ort_device != "cpu":
            self._io.synchronize_inputs()  # the feed copies are complete before the graph reads them
        try:
            self.session.run_with_iobinding(self._io, run_options)
        except Exception as e:
            raise KvtraceError(f"onnxruntime run failed: {e}") from e
        if self._ort_device != "cpu":
            self._io.synchronize_outputs()
        self._out_last.clear()

    def _signature(self) -> tuple:
        """(name, address, shape) of every bound input and output: what a captured graph replays."""
        ins = tuple((n, b.data_ptr(), b.shape) for n, b in sorted(self._in_bound.items()))
        outs = []
        for n, b in sorted(self._out_bound.items()):
            if b is None:
                raise KvtraceError(f"output {n!r} is allocated by onnxruntime on every run: a captured step needs "
                                   "every output bound to a fixed buffer")
            outs.append((n, b.data_ptr(), b.shape))
        return ins + tuple(outs)

    def _graph_for(self, key) -> int:
        sig = self._signature()
        g = self._graphs.get(key)
        if g is None or g["signature"] != sig:
            if g is not None and self.cuda_graph and hasattr(self.session, "release_captured_graph"):
                self.session.release_captured_graph(g["id"])  # (a no-op where the provider cannot)
            # a new id: a captured graph replays the old addresses, never reuse its id
            g = {"id": self._next_graph_id, "signature": sig, "runs": 0,
                 "captures": (g or {}).get("captures", 0) + 1}
            self._next_graph_id += 1
            self._graphs[key] = g
        g["runs"] += 1
        return g["id"]

    def graph_runs(self) -> dict:
        """run_graph bookkeeping: key -> {"id", "runs", "captures", "buffers": {name: (address, shape)}}
        ("captures": how often the key got a new graph; 1 when every step kept its buffers)."""
        return {k: {"id": g["id"], "runs": g["runs"], "captures": g["captures"],
                    "buffers": {n: (p, s) for n, p, s in g["signature"]}} for k, g in self._graphs.items()}

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
        self._in_bound.clear()
        self._out_bound.clear()
        self._out_last.clear()
        self._staging.clear()
        self._graph_staging.clear()
        if self.cuda_graph and hasattr(self.session, "release_captured_graph"):
            for g in self._graphs.values():
                self.session.release_captured_graph(g["id"])
        self._graphs.clear()


def _check_cuda_first(sess, onnx_file: Path) -> None:
    first = (sess.get_providers() or ["none"])[0]
    if first != "CUDAExecutionProvider":
        raise KvtraceError(f"onnxruntime-cuda: the CUDA provider did not initialise for {onnx_file.name} (the "
                           f"session's first provider is {first}; onnxruntime's log above says why, e.g. missing "
                           "CUDA or cuDNN libraries)")


def _graph_file(artifact_dir: Path, manifest, graph: str, device: str) -> tuple[Path, str, str | None]:
    """(file, form, attend) of the graph form a backend loads: "cpu" is model.onnx, "gpu" the
    manifest's graphs["gpu"] (model.gpu.onnx); "auto" picks gpu on CUDA when the artifact has it."""
    if graph not in ("auto", "cpu", "gpu"):
        raise KvtraceError(f"graph {graph!r}: expected auto, cpu or gpu")
    forms = _manifest_get(manifest, "graphs", None) or {}
    form = graph if graph != "auto" else ("gpu" if device == "cuda" and "gpu" in forms else "cpu")
    if form == "gpu":
        entry = forms.get("gpu")
        if not entry:
            raise KvtraceError(f"artifact {artifact_dir} has no GPU form of the graph (graphs.gpu in its manifest): "
                               "export it again: every export now writes model.gpu.onnx")
        path, attend = artifact_dir / entry["onnx"], entry.get("attend")
    else:
        path = artifact_dir / _manifest_get(manifest, "onnx", "model.onnx")
        attend = (_manifest_get(manifest, "graph", None) or {}).get("attend")
    if not path.is_file():
        raise KvtraceError(f"model file {path} not found (artifact {artifact_dir})")
    return path, form, attend


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
    """Candidates for backend="auto", best first. onnxruntime-cuda is a candidate wherever
    onnxruntime-gpu is installed, so that when it cannot run here Model.load says why (a note)
    before falling back to the CPU, instead of passing over it silently."""
    order = []
    if _manifest_get(manifest, "tensorrt", None):
        order.append("tensorrt")
    try:
        if "CUDAExecutionProvider" in _import_ort().get_available_providers():
            order.append("onnxruntime-cuda")
    except ImportError:
        pass
    order.append("onnxruntime")
    return order
