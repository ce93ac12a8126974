"""Writing model.onnx (+ model.onnx.data) one tensor at a time.

    write_onnx(model, inits, path, external=..., on_tensor=None, jobs=None) -> Written

Embedded (below 2 GB): the protobuf wire format written by hand (field tags and lengths computed
from the tensor sizes, then the raw bytes), so the weights never sit in a protobuf object; it
parses to the same ModelProto as the model with the initializers appended (protobuf fields may
come in any order: the graph field is written last). External: each weight goes to
model.onnx.data at an aligned offset (data_alignment) and the graph, written last, refers to it.

Each file's sha256 is computed from the bytes as they go out (the manifest needs no second
read). With a `jobs` worker (Jobs, a background thread), the digests and then on_tensor(t,
path, offset) run there, in order, while this thread prepares and writes the next tensor: a
tensor written straight from the mapped checkpoint is hashed from its pages before the
exporter's on_tensor (the byte check, then the page release) drops them. At 7B that worker is
busy ~13 s of a ~35 s write (sha256 at 1.2 GB/s, the byte check at ~7 GB/s).
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtrace import io_spec
from kvtrace.errors import KvtraceError

TWO_GB = 2 * 1024**3
DATA_NAME = io_spec.ONNX_NAME + ".data"

# external data layout: a tensor of at least ALIGN_BIG_FROM bytes starts at a multiple of
# ALIGN_BIG, smaller ones at multiples of ALIGN_SMALL. onnxruntime's CPU provider maps external
# initializers into memory (mmap: file-backed pages, no anonymous copy). On Linux, onnxruntime
# 1.32 maps at any offset (measured: a 64 MB MatMul weight at offsets 0, 7, 64, 4160 and 65536 is
# mapped in every case: RssFile grows by 64 MB, RssAnon does not), rounding the mapping down to the
# page itself; Windows maps only at multiples of its 64 KiB allocation granularity, onnxruntime's
# own writer page-aligns tensors over 1 MiB, and aligned data keeps SIMD loads aligned. 64 KiB for
# every large tensor serves all of them, at < 64 KiB of padding per large tensor.
ALIGN_BIG, ALIGN_BIG_FROM, ALIGN_SMALL = 1 << 16, 1 << 20, 64


def data_alignment(nbytes: int) -> int:
    return ALIGN_BIG if nbytes >= ALIGN_BIG_FROM else ALIGN_SMALL


def external_data_bytes(inits) -> int:
    """Size of model.onnx.data for these initializers (padding included)."""
    offset = 0
    for t in inits:
        offset += (-offset) % data_alignment(t.nbytes) + t.nbytes
    return offset


@dataclass
class Written:
    """What write_onnx wrote: total bytes; each file's {"bytes", "sha256"}; each initializer's
    (file name, offset, length) in the file that holds its bytes."""
    size: int
    external: bool
    files: dict
    offsets: dict


class Jobs:
    """One background thread running submitted functions in order. At most `depth` wait (the
    writer blocks beyond that, which bounds the memory they hold). The first exception is
    raised again in the submitting thread (at the next submit or at finish)."""

    def __init__(self, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="kvtrace-export-jobs", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            fn = self._q.get()
            if fn is None:
                return
            if self._error is None and not self._abort:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 - handed to the submitting thread
                    self._error = e

    def _raise(self):
        if self._error is not None:
            e, self._error = self._error, None
            self._abort = True
            raise e

    def submit(self, fn) -> None:
        self._raise()
        self._q.put(fn)

    def finish(self) -> None:
        """Wait for every submitted function; raise the first error."""
        self._q.put(None)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without running what is queued (after an error or an interrupt), and wait for the
        function running now to return: the caller then closes what the jobs use (the byte check's
        file descriptors), and a worker still inside torch when the interpreter exits aborts the
        process (SIGABRT, "terminate called without an active exception", instead of exit 130)."""
        self._abort = True
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(None)  # this thread alone submits: after the drain there is room
        self._thread.join()


class _Inline:
    """Jobs' interface, running each function at once (no worker thread)."""

    def submit(self, fn):
        fn()

    def finish(self):
        pass

    def abort(self):
        pass


# Large files are written behind (Linux): each write is handed to the disk at once
# (sync_file_range, asynchronous) and, once the per-tensor jobs have read it back, dropped from the
# page cache (posix_fadvise DONTNEED). Left to the kernel, a 13.5 GB model.onnx.data fills the page
# cache with dirty pages while the checkpoint is being read, and reclaim runs in system time:
# writing 14 GB took 14.3 s (12 s of it system time) plainly, 8.9 s (4.7 s) written behind.
WRITE_BEHIND_FROM = 2 * 1024**3


class _WriteBehind:
    """sync_file_range + posix_fadvise through libc; does nothing where either is missing."""

    START, WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self):
        self._sfr = None
        self.jobs = None  # the worker that talks to the disk (started by the first call)
        if hasattr(os, "posix_fadvise"):
            try:
                import ctypes

                sfr = ctypes.CDLL(None, use_errno=True).sync_file_range
                sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                sfr.restype = ctypes.c_int
                self._sfr = sfr
            except (OSError, AttributeError):
                pass

    def start(self, fd: int, offset: int, n: int) -> None:
        """Hand [offset, offset + n) to the disk now (in the worker: the call blocks while the
        disk's queue is full, 4 s of a 7B export when the writing thread made it)."""
        if self._sfr is not None:
            self._worker().submit(lambda: self._sfr(fd, offset, n, self.START))

    def _worker(self):
        if self.jobs is None:
            self.jobs = Jobs(depth=16)
        return self.jobs

    def drop(self, fd: int, offset: int, n: int) -> None:
        """Drop [offset, offset + n) from the page cache once it is on disk (advice only: errors
        are ignored, the bytes are written either way). The wait for the disk runs in a worker
        of its own, so that the caller (the per-tensor check) does not wait for it."""
        if self._sfr is None:
            return

        def run():
            self._sfr(fd, offset, n, self.WAIT)
            try:
                os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        self._worker().submit(run)

    def finish(self) -> None:
        if self.jobs is not None:
            self.jobs.finish()

    def abort(self) -> None:
        if self.jobs is not None:
            self.jobs.abort()


class _Out:
    """A file written through a raw descriptor, its sha256 fed (through `jobs`, in order) with
    every byte. Errors name the file (a full disk must say where). behind: write behind
    (WRITE_BEHIND_FROM)."""

    def __init__(self, path: Path, jobs, behind: bool = False):
        self.path, self.jobs = path, jobs
        self.behind = _WriteBehind() if behind else None
        self.h = hashlib.sha256()
        self.n = 0
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e

    def write(self, b) -> None:
        mv = memoryview(b).cast("B")
        done = 0
        try:
            while done < len(mv):
                done += os.write(self.fd, mv[done:done + (1 << 30)])
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        self.jobs.submit(lambda: self.h.update(mv))
        if self.behind is not None:
            self.behind.start(self.fd, self.n, len(mv))
        self.n += len(mv)

    def drop(self, offset: int, n: int) -> None:
        """Done with bytes [offset, offset + n): out of the page cache once on disk (if behind)."""
        if self.behind is not None:
            self.behind.drop(self.fd, offset, n)

    def pad_to(self, align: int) -> None:
        pad = (-self.n) % align
        if pad:
            self.write(bytes(pad))

    def close(self) -> None:
        os.close(self.fd)

    def digest(self) -> dict:
        return {"bytes": self.n, "sha256": self.h.hexdigest()}


def _raw_bytes(arr: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array (bf16 has no buffer format of its own)."""
    return memoryview(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# protobuf tags (field number << 3 | wire type 2 = length-delimited)
_TAG_MODEL_GRAPH = _varint(7 << 3 | 2)  # ModelProto.graph
_TAG_GRAPH_INITIALIZER = _varint(5 << 3 | 2)  # GraphProto.initializer
_TAG_TENSOR_RAW = _varint(9 << 3 | 2)  # TensorProto.raw_data


def _without_graph(model) -> bytes:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ClearField("graph")
    return m.SerializeToString()


def write_onnx(model, inits, path: Path, *, external: bool, on_tensor=None, jobs=None) -> Written:
    """Write `model` (graph without weights) plus `inits` to `path` (module docstring).
    on_tensor(t, file_path, offset): after each tensor's bytes are in the file."""
    from onnx import TensorProto

    path = Path(path)
    jobs = jobs or _Inline()
    offsets = {}
    outs = []

    def tensor(f: _Out, t):
        offset = f.n
        arr = t.data()
        if arr.nbytes != t.nbytes:
            raise KvtraceError(f"internal error: weight {t.name} has {arr.nbytes} bytes, its declaration "
                               f"{t.nbytes}")
        f.write(_raw_bytes(arr))
        del arr
        offsets[t.name] = (f.path.name, offset, t.nbytes)
        if on_tensor is not None:
            jobs.submit(lambda: on_tensor(t, f.path, offset))
        if f.behind is not None:  # after on_tensor has read the bytes back
            jobs.submit(lambda: f.drop(offset, t.nbytes))

    try:
        if external:
            f = _Out(path.with_name(DATA_NAME), jobs,
                     behind=external_data_bytes(inits) >= WRITE_BEHIND_FROM)
            outs.append(f)
            metas = []
            for t in inits:
                f.pad_to(data_alignment(t.nbytes))
                m = t.meta()
                m.data_location = TensorProto.EXTERNAL
                for k, v in (("location", DATA_NAME), ("offset", str(f.n)), ("length", str(t.nbytes))):
                    e = m.external_data.add()
                    e.key, e.value = k, v
                metas.append(m)
                tensor(f, t)
            model.graph.initializer.extend(metas)
            try:
                blob = model.SerializeToString()
            finally:
                del model.graph.initializer[len(model.graph.initializer) - len(metas):]
            g = _Out(path, jobs)
            outs.append(g)
            g.write(blob)
            total = len(blob) + f.n
        else:
            graph_bytes = model.graph.SerializeToString()  # nodes, I/O, small constants
            entries = []
            graph_len = len(graph_bytes)
            for t in inits:
                meta = t.meta().SerializeToString()
                entry_len = len(meta) + len(_TAG_TENSOR_RAW) + len(_varint(t.nbytes)) + t.nbytes
                entries.append((t, meta, entry_len))
                graph_len += len(_TAG_GRAPH_INITIALIZER) + len(_varint(entry_len)) + entry_len
            # ModelProto: fields in any order; the graph field is written last
            head_wo_graph = _without_graph(model)
            total = len(head_wo_graph) + len(_TAG_MODEL_GRAPH) + len(_varint(graph_len)) + graph_len
            if total >= TWO_GB:
                raise KvtraceError("model.onnx would exceed protobuf's 2 GB limit; use --external-data")
            f = _Out(path, jobs)
            outs.append(f)
            f.write(head_wo_graph)
            f.write(_TAG_MODEL_GRAPH + _varint(graph_len))
            f.write(graph_bytes)
            for t, meta, entry_len in entries:
                f.write(_TAG_GRAPH_INITIALIZER + _varint(entry_len) + meta + _TAG_TENSOR_RAW + _varint(t.nbytes))
                tensor(f, t)
        jobs.finish()
        for o in outs:  # after the jobs that queue its drops
            if o.behind is not None:
                o.behind.finish()
    except BaseException:
        jobs.abort()
        for o in outs:
            if o.behind is not None:
                o.behind.abort()
        raise
    finally:
        for o in outs:
            o.close()
    return Written(total, external, {o.path.name: o.digest() for o in outs}, offsets)
