"""The "tensorrt" backend: runs an engine built by `kvtrace build`. No torch.

Thin on purpose: everything except device memory and the engine call (cache bookkeeping,
sampling, generation, tokenizer) is the runtime's shared code, checked through onnxruntime.
Engine *execution* has not been run by us: TensorRT-RTX refuses compute capability 9.0
(H100/H200, the GPUs we have), and the full TensorRT does not install on our machines. What
runs without a GPU (module import, version/compute-capability/profile checks, the no-GPU error)
is tested in tests/test_trt.py.

Device memory, pinned staging, the stream and CUDA graphs come from the CUDA driver API through
ctypes (runtime/cuda_driver.py), so neither torch nor cuda-python/cupy is needed. TensorRT's own
CUDA runtime uses the device's primary context, which is made current on the calling thread
before every driver call and at the start of every run. What the driver side does was checked
against a stub libcuda that records every call (tests/test_gpu_paths.py); docs/gpu.md says what
has and has not been executed on a GPU.

Also home of the helpers `kvtrace build` (exporter/trt.py) shares with the backend: which
TensorRT module is installed, compute-capability names, and the profile check of a request.
"""
from __future__ import annotations

import importlib
import math
import weakref
from pathlib import Path

import numpy as np

from . import trt_engine
from .backends import NUMPY_STORAGE, register_backend, version_tuple
# gpu_compute_capability: re-exported for `kvtrace build` (exporter/trt.py) and the tests
from .cuda_driver import CudaDriver, DeviceBuffer, HostBuffer, gpu_compute_capability  # noqa: F401
from kvtrace.errors import KvtraceError

# Module names, in the order they are tried: the full TensorRT first (it runs on every
# NVIDIA GPU it supports), then TensorRT-RTX (builds for a named GPU without one).
FLAVOURS = ("tensorrt", "tensorrt_rtx")
# IAttention / IKVCacheUpdateLayer / IRotaryEmbeddingLayer and their ONNX importers
MIN_TENSORRT = (10, 15)
# the portable (--opset 17) graphs need none of them: TensorRT 10 (JetPack 6 ships 10.3) builds
# and runs them (strongly typed networks, execute_async_v3); docs/tensorrt.md
MIN_TENSORRT_PORTABLE = (10, 0)
INSTALL_HINT = ("install one of: `pip install 'tensorrt>=10.15'` (TensorRT, module tensorrt) or "
                "`pip install tensorrt-rtx-cu13` (TensorRT-RTX, module tensorrt_rtx)")
COMPUTE_CAPABILITIES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


def min_tensorrt(manifest) -> tuple[int, int]:
    """The oldest full TensorRT that builds and runs an artifact's TensorRT graph: 10.15 for the
    fused layers, 10.0 for the portable (unfused attention) graphs."""
    forms = _get(manifest, "graphs") or {}
    graph = forms.get("gpu") or _get(manifest, "graph") or {}
    return MIN_TENSORRT_PORTABLE if graph.get("attention") == "unfused" else MIN_TENSORRT


def import_tensorrt(flavour: str | None = None, minimum: tuple[int, int] = MIN_TENSORRT):
    """(module, flavour) of the installed TensorRT; `flavour` forces one module name; the full
    TensorRT must be at least `minimum` (min_tensorrt of the artifact)."""
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
        if name == "tensorrt" and version_tuple(mod.__version__) < tuple(minimum):
            why = ("no fused attention layers; the portable --opset 17 artifacts build with TensorRT 10"
                   if tuple(minimum) == MIN_TENSORRT else "too old")
            errors.append(f"tensorrt {mod.__version__} is older than {'.'.join(map(str, minimum))} ({why})")
            continue
        return mod, name
    raise KvtraceError("TensorRT is not installed (" + "; ".join(errors) + "): " + INSTALL_HINT)


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
    """A TensorRT logger that keeps errors (for our messages) and prints at `print_level`; it also
    keeps the builder's per-layer report (`layer_info`: the text after "Layers:", logged at the end
    of a build with DETAILED profiling verbosity; exporter/trt.py reads the kernels from it)."""

    def __new__(cls, trt, print_level: str = "ERROR"):
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []
                self.layer_info: str | None = None
                self.print_at = getattr(trt.ILogger.Severity, print_level)

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(str(msg))
                elif str(msg).startswith("Layers:"):
                    self.layer_info = str(msg)
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


# ------------------------------------------------------------------ the backend
def _trt_dtype_name(trt, dt) -> str:
    name = trt_engine.dtype_name(trt, dt)
    if name is None:
        raise KvtraceError(f"engine tensor type {dt} is not supported by the tensorrt backend")
    return name


def _get(manifest, key, default=None):
    if isinstance(manifest, dict):
        return manifest.get(key, default)
    data = getattr(manifest, "data", None)
    if isinstance(data, dict):
        return data.get(key, default)
    return getattr(manifest, key, default)


def same_version(built: str | None, installed: str) -> bool:
    """An engine's recorded TensorRT version against the installed one. An imported engine's
    version may come from its header (TensorRT-RTX: major.minor.patch only): then those three
    parts are compared."""
    if built is None:  # not known (an engine imported without a GPU): TensorRT checks it when loading
        return True
    parts = built.split(".")
    return built == installed or (len(parts) == 3 and installed.split(".")[:3] == parts)


def check_engine_compatible(section: dict, *, flavour: str, version: str, device_cc: str | None) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, before deserializing it."""
    built_flavour, built_version = section.get("flavour"), section.get("version")
    if built_flavour != flavour or not same_version(built_version, version):
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
    """Protocol of runtime/backends.py on a TensorRT engine; buffers are DeviceBuffers.

    Memory discipline (no allocation or free per step once warm):
      * feeds go host -> pinned staging (cuMemHostAlloc, per input, grown when too small) ->
        device staging (per input; per key for run_graph), async on the one stream;
      * outputs the backend allocates (dynamic cache: presents of growing length) alternate
        between two device buffers per output, grown geometrically: the outputs of run N are
        valid until run N + 2 (the model binds them as the pasts of run N + 1);
      * device memory is allocated and zeroed on the device (cuMemAlloc + cuMemsetD8Async).
    CUDA graphs (cuda_graph=None: where possible, False: off): run_graph(key, ...) is enqueued
    normally while its configuration (profile, shapes, addresses) is new; the next call with the
    same configuration is captured (cuStreamBeginCapture thread-local, execute_async_v3,
    cuStreamEndCapture, cuGraphInstantiate) and launched, and later ones replay it. A run of
    another configuration in between (a prefill) makes the next call enqueue normally first, so
    TensorRT's shape-dependent state is refreshed before a replay (conservative: TensorRT
    documents that an enqueue must precede capture; replay after another configuration's enqueue
    is not documented either way). A capture that fails (invalidated stream, enqueue refused)
    marks the key uncapturable, with the reason, and the step runs normally.
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(self, artifact_dir: Path, manifest, *, device_index: int = 0, log_level: str = "ERROR",
                 cuda_graph: bool | None = None, allow_cpu_nodes: bool = False, threads: int | None = None):
        # allow_cpu_nodes: accepted for option parity with onnxruntime-cuda; TensorRT runs every layer on the GPU.
        # threads (onnxruntime's intra-op threads): accepted so that backend="auto" with threads=N can
        # try this backend first (a TypeError ended the fallback); TensorRT has no such setting
        self.cuda = None
        self.context = self.engine = self._runtime = None
        self._closed = False
        section = _get(manifest, "tensorrt")
        if not section:
            raise KvtraceError(f"artifact {artifact_dir} has no TensorRT engine: run `kvtrace build {artifact_dir}` "
                               "on a machine with TensorRT")
        self.section = section
        engine_file = Path(artifact_dir) / section["engine"]
        if not engine_file.is_file():
            raise KvtraceError(f"engine file {engine_file} not found (named by the manifest of {artifact_dir}): "
                               f"run `kvtrace build {artifact_dir}`")
        trt, flavour = import_tensorrt(section.get("flavour"), min_tensorrt(manifest))
        # the GPU first: without one nothing below can work, and that is the clearest message
        try:
            self.cuda = CudaDriver(device_index)
        except KvtraceError as e:
            raise KvtraceError(f"backend 'tensorrt' needs an NVIDIA GPU: {e}; use --backend onnxruntime") from e
        try:
            self._load(trt, flavour, engine_file, manifest, log_level)
        except BaseException:
            self._close_quietly()  # the refusal path releases what was taken, context included
            raise
        self._bound_in: dict[str, DeviceBuffer] = {}
        self._bound_out: dict[str, DeviceBuffer | None] = {}
        self._auto: dict[str, DeviceBuffer] = {}  # outputs the backend allocated on the last run
        self._auto_pairs: dict[str, list] = {}  # output -> [buffer, buffer], alternated
        self._auto_turn: dict[str, int] = {}
        self._staging: dict[str, DeviceBuffer] = {}  # run(): device copies of host feeds
        self._graph_staging: dict[object, dict[str, DeviceBuffer]] = {}  # run_graph(): per key
        self._pinned: dict[str, HostBuffer] = {}  # host feeds are copied here first
        self._readback: HostBuffer | None = None  # to_host() goes through this
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._profile = 0
        self._config = None  # the key of the configuration TensorRT was last enqueued with (None: run())
        self._graphs: dict[object, dict] = {}  # key -> {"signature", "exec", "state", "reason", counters}
        why = self.cuda.can_capture()
        self.cuda_graph = cuda_graph is not False and why is None
        self._no_capture_reason = ("off (cuda_graph=False)" if cuda_graph is False else why)
        if cuda_graph and why:
            self._close_quietly()
            raise KvtraceError(f"CUDA graphs requested but unavailable: {why}")

    def _load(self, trt, flavour, engine_file: Path, manifest, log_level) -> None:
        check_engine_compatible(self.section, flavour=flavour, version=trt.__version__,
                                device_cc=self.cuda.compute_capability)
        self.trt = trt
        self._logger = TrtLogger(trt, log_level)
        self.cuda.current()
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise KvtraceError(f"TensorRT cannot load {engine_file}: " + " | ".join(self._logger.errors[-3:]))
        # the engine against the artifact's I/O contract and the recorded profiles, before any run
        # (an engine built outside kvtrace and imported without a GPU is fully checked here first)
        problems, _ = trt_engine.check_bindings(trt, self.engine, _get(manifest, "io") or {},
                                                self.section.get("profiles"))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise KvtraceError(f"engine {engine_file} does not match the artifact: {problems[0]}{more}; build it "
                               f"again (`kvtrace build`, or `kvtrace build ARTIFACT --print-trtexec`) and import it")
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
        # (check_bindings confirmed the pairs where the engine's API reports them)
        io = _get(manifest, "io") or {}
        self.aliases = {out: src for out, src in (io.get("cache_aliases") or {}).items() if out in self.outputs}

    # --------------------------------------------------------------- memory
    def _new(self, shape, dtype: str, capacity: int | None = None) -> DeviceBuffer:
        nbytes = math.prod(shape) * np.dtype(NUMPY_STORAGE[dtype]).itemsize
        cap = max(int(capacity or nbytes), 1)
        buf = DeviceBuffer(self.cuda.alloc(cap), tuple(shape), dtype, cap, free=self.cuda.free_later)
        self._live.add(buf)
        return buf

    def alloc(self, shape, dtype: str) -> DeviceBuffer:
        buf = self._new(tuple(int(s) for s in shape), dtype)
        self.cuda.zero(buf.ptr, buf.capacity)  # on the device: nothing copied up from the host
        self.cuda.sync()
        return buf

    def _host(self, slot: HostBuffer | None, nbytes: int) -> HostBuffer:
        """A pinned buffer of at least `nbytes` (`slot` when it is large enough)."""
        if slot is not None and slot.capacity >= nbytes:
            return slot
        if slot is not None:
            self.cuda.free_host(slot)
        return self.cuda.host_alloc(max(nbytes, 2 * (slot.capacity if slot else 0), 256))

    def to_host(self, buf: DeviceBuffer) -> np.ndarray:
        dt = NUMPY_STORAGE[buf.dtype]
        self._readback = self._host(self._readback, buf.nbytes)
        view = self._readback.view(buf.shape, dt)
        self.cuda.to_host(view, buf.ptr)
        self.cuda.sync()
        return view.copy()  # the pinned buffer is reused by the next call

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
        if buf is not None and buf.dtype != self.outputs[name]:
            raise KvtraceError(f"output {name!r}: buffer dtype {buf.dtype}, the engine gives {self.outputs[name]}")
        alias = self.aliases.get(name)
        if alias is not None and (buf is None or self._bound_in.get(alias) is not buf):
            raise KvtraceError(f"output {name!r} is updated in place by TensorRT: bind it to the same buffer as "
                               f"its input {alias!r} (bind the input first)")
        self._bound_out[name] = buf

    # --------------------------------------------------------------- run
    def run(self, feeds: dict[str, np.ndarray]) -> None:
        self._run(feeds, None)

    def run_graph(self, key, feeds: dict[str, np.ndarray]) -> None:
        """A run repeated under `key` with the same buffers and feed shapes (a decode step):
        captured into a CUDA graph and replayed where possible (see the class docstring)."""
        self._run(feeds, key)

    def _run(self, feeds: dict[str, np.ndarray], key) -> None:
        cuda = self.cuda
        if self._closed:
            raise KvtraceError("the tensorrt backend was closed")
        cuda.current()  # this thread: TensorRT's enqueue runs in the current context too
        cuda.raise_deferred()
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
        # feeds: host -> pinned -> device, async on the stream (the last run was synchronised)
        pool = self._staging if key is None else self._graph_staging.setdefault(key, {})
        staged = {}
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr)
            pinned = self._pinned[name] = self._host(self._pinned.get(name), arr.nbytes)
            host = pinned.view(arr.shape, arr.dtype)
            np.copyto(host, arr)
            buf = pool.get(name)
            if buf is None or buf.capacity < arr.nbytes:  # grown geometrically (a growing attention_mask)
                cap = max(arr.nbytes, 2 * (buf.capacity if buf is not None else 0), 64)
                buf = pool[name] = self._new(arr.shape, self.inputs[name], capacity=cap)
            buf.shape = tuple(arr.shape)
            cuda.to_device(buf.ptr, host)
            staged[name] = buf
        ins = {**self._bound_in, **staged}
        outs = self._outputs_for(key)
        if key is None:
            self._configure(profile, ins, outs, None)
            self._enqueue()
        else:
            self._run_keyed(key, profile, ins, outs)
        cuda.sync()

    def _outputs_for(self, key) -> dict[str, DeviceBuffer]:
        """The buffer of every output this run: bound ones, or the backend's alternating pair."""
        outs = {}
        self._auto.clear()
        for name in self.outputs:
            buf = self._bound_out.get(name)
            if buf is None:
                buf = self._auto_slot(name)
                self._auto[name] = buf
            outs[name] = buf
        return outs

    def _auto_slot(self, name: str) -> DeviceBuffer | None:
        """Placeholder until the shape is known (_configure sizes it): the pair member to write."""
        turn = self._auto_turn.get(name, 1) ^ 1
        self._auto_turn[name] = turn
        pair = self._auto_pairs.setdefault(name, [None, None])
        return pair[turn]

    def _configure(self, profile: int, ins: dict, outs: dict, key) -> None:
        ctx = self.context
        if profile != self._profile:
            try:
                ok = ctx.set_optimization_profile_async(profile, self.cuda.stream_handle)
            except Exception as e:  # the full TensorRT's binding raises where TensorRT-RTX returns False
                ok, err = False, f": {e}"
            else:
                err = ""
            if not ok:
                raise KvtraceError(f"TensorRT cannot switch to optimization profile {profile}{err} "
                                   + " | ".join(self._logger.errors[-2:]))
            self._profile = profile
        for name, buf in ins.items():
            if not ctx.set_input_shape(name, buf.shape):
                raise KvtraceError(f"TensorRT refused shape {buf.shape} for input {name!r}: "
                                   + " | ".join(self._logger.errors[-2:]))
            if not ctx.set_tensor_address(name, buf.ptr):
                raise KvtraceError(f"TensorRT refused the address of input {name!r}")
        for name in self.outputs:
            buf = outs[name]
            if name in self._auto:  # allocated here: size it now that TensorRT knows the shape
                shape = tuple(ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise KvtraceError(f"TensorRT could not infer the shape of output {name!r}")
                buf = self._fit_auto(name, shape)
                outs[name] = self._auto[name] = buf
            if not ctx.set_tensor_address(name, buf.ptr):
                raise KvtraceError(f"TensorRT refused the address of output {name!r}")
        self._config = key

    def _fit_auto(self, name: str, shape) -> DeviceBuffer:
        pair, turn = self._auto_pairs[name], self._auto_turn[name]
        dtype = self.outputs[name]
        need = math.prod(shape) * np.dtype(NUMPY_STORAGE[dtype]).itemsize
        buf = pair[turn]
        if buf is None or buf.capacity < need:
            # grown geometrically: O(log length) allocations over a sequence, none per step after
            old = buf.capacity if buf is not None else 0
            buf = pair[turn] = self._new(shape, dtype, capacity=max(need, 2 * old))
        buf.shape = tuple(shape)
        return buf

    def _enqueue(self) -> None:
        try:
            ok = self.context.execute_async_v3(self.cuda.stream_handle)
        except Exception as e:  # noqa: BLE001 - a binding that raises instead of returning False
            raise KvtraceError(f"TensorRT execution failed: {e}") from e
        if not ok:
            raise KvtraceError("TensorRT execution failed: " + " | ".join(self._logger.errors[-3:]))

    def _run_keyed(self, key, profile: int, ins: dict, outs: dict) -> None:
        sig = tuple(sorted((n, b.ptr, b.shape) for n, b in ins.items())) + \
            tuple(sorted((n, b.ptr if b is not None else None, None) for n, b in outs.items()))
        g = self._graphs.get(key)
        if g is None or g["signature"] != sig:
            if g is not None and g["exec"] is not None:
                self.cuda.destroy_exec(g["exec"])
            g = self._graphs[key] = {"signature": sig, "exec": None, "state": "pending", "reason": None,
                                     "enqueued": 0, "replays": 0, "captures": (g or {}).get("captures", 0)}
            if self._config == key:
                self._config = None  # the new buffers are not set in TensorRT yet
            if not self.cuda_graph:
                g["state"], g["reason"] = "off", self._no_capture_reason
            elif self._auto:
                g["state"], g["reason"] = "uncapturable", "outputs allocated per run (dynamic cache)"
        same = self._config == key  # TensorRT was last enqueued with exactly this configuration
        if g["exec"] is not None and same:
            self.cuda.launch(g["exec"])
            g["replays"] += 1
            return
        if not same:
            self._configure(profile, ins, outs, key)
            self._enqueue()
            g["enqueued"] += 1
            return
        if g["state"] == "pending":
            self._capture(g)
            if g["exec"] is not None:
                self.cuda.launch(g["exec"])  # capturing did not run anything: run it now
                g["replays"] += 1
                return
        self._enqueue()
        g["enqueued"] += 1

    def _capture(self, g: dict) -> None:
        """Capture one enqueue of the current configuration; on failure mark the key uncapturable."""
        cuda = self.cuda
        try:
            cuda.begin_capture()
        except KvtraceError as e:
            g["state"], g["reason"] = "uncapturable", str(e)
            return
        try:
            ok = self.context.execute_async_v3(cuda.stream_handle)
            err = None if ok else "execute_async_v3 returned False during capture: " + \
                " | ".join(self._logger.errors[-2:])
        except Exception as e:  # noqa: BLE001 - whatever TensorRT raises: no capture
            err = f"execute_async_v3 raised during capture: {e}"
        graph, why = cuda.end_capture()  # always: leaves capture mode
        if err or graph is None:
            if graph is not None:
                cuda.fns["cuGraphDestroy"](graph)
            g["state"], g["reason"] = "uncapturable", err or why
            return
        g["exec"] = cuda.instantiate(graph)
        g["state"] = "captured"
        g["captures"] += 1

    def graph_runs(self) -> dict:
        """run_graph bookkeeping per key: state (pending/captured/uncapturable/off), reason,
        enqueued (normal runs), replays, captures, and the bound buffers' addresses."""
        return {k: {"state": g["state"], "reason": g["reason"], "enqueued": g["enqueued"], "replays": g["replays"],
                    "captures": g["captures"], "buffers": {n: (p, s) for n, p, s in g["signature"]}}
                for k, g in self._graphs.items()}

    def output(self, name: str) -> DeviceBuffer:
        buf = self._bound_out.get(name)
        if buf is not None:
            return buf
        if name not in self._auto:
            raise KvtraceError(f"output {name!r} has not been produced yet")
        return self._auto[name]

    # --------------------------------------------------------------- teardown
    def release(self) -> None:
        """Everything, for good: the model is done with this backend (close())."""
        self.close()

    def close(self) -> None:
        """Synchronise, then release in order: captured graphs, device and pinned buffers, the
        execution context, the engine, the runtime, the stream and the primary context. Every
        step is attempted; KvtraceError names the ones that failed. Idempotent."""
        if self._closed or self.cuda is None:
            self._closed = True
            return
        self._closed = True
        cuda, errors = self.cuda, []

        def attempt(what, fn):
            try:
                fn()
            except KvtraceError as e:
                errors.append(str(e).removeprefix("CUDA "))
            except Exception as e:  # noqa: BLE001 - TensorRT objects may raise anything
                errors.append(f"{what}: {e}")

        attempt("cuStreamSynchronize", cuda.sync)
        for g in getattr(self, "_graphs", {}).values():
            if g["exec"] is not None:
                attempt("cuGraphExecDestroy", lambda ex=g["exec"]: cuda.destroy_exec(ex))
                g["exec"] = None
        for attr in ("_bound_in", "_bound_out", "_auto", "_auto_pairs", "_staging", "_graph_staging"):
            getattr(self, attr, {}).clear()
        for buf in list(getattr(self, "_live", ())):
            attempt("cuMemFree", buf.free)  # the finalizer: runs once, failures go to cuda.errors
        self._live = weakref.WeakSet()
        for hb in list(getattr(self, "_pinned", {}).values()) + [getattr(self, "_readback", None)]:
            if hb is not None:
                attempt("cuMemFreeHost", lambda hb=hb: cuda.free_host(hb))
        self._pinned, self._readback = {}, None
        attempt("cuCtxSetCurrent", cuda.current)  # TensorRT frees its device memory in this context
        for attr in ("context", "engine", "_runtime"):  # dependants first
            if getattr(self, attr, None) is not None:
                attempt(f"releasing the TensorRT {attr.strip('_')}", lambda a=attr: setattr(self, a, None))
        attempt("CUDA driver", cuda.close)  # deferred free failures, stream, primary context
        if errors:
            raise KvtraceError("closing the tensorrt backend: " + "; ".join(errors))

    def _close_quietly(self) -> None:
        try:
            self.close()
        except KvtraceError:
            pass  # the error being raised on this path says more


def create_backend(artifact_dir: Path, manifest, **options) -> TrtBackend:
    return TrtBackend(Path(artifact_dir), manifest, **options)


register_backend("tensorrt", create_backend)
