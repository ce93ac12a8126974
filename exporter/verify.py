"""Every initializer of a written artifact against the checkpoint tensor(s) it came from.

The documented transform (docs/validation.md), graph initializer <- canonical parameters
(ModelConfig.param_shapes(), torch layout, (out, in) for linear weights):
  layers.{i}.attn.qkv.weight   [Wq; Wk; Wv] stacked on rows: (q_dim + 2 kv_dim, D)
  layers.{i}.attn.qkv.bias     [bq; bk; bv] concatenated
  rope.cos, rope.sin           not from the checkpoint: kvtrace.numerics.rope_tables(cfg, max_seq),
                               the tables the reference model reads
  everything else              as stored
each then cast to the graph dtype (round to nearest even; no cast when the dtype is kept).
Nothing is transposed: the graph multiplies by W.T itself (exporter/onnx_graph.py, matmul_t).

The expected tensor is the checkpoint's own bytes when the dtype is kept, and torch's cast of
them otherwise (not the graph builder's numpy code, exporter/onnx_graph.py); it is compared bit
for bit (same_bytes: 8 bytes at a time) with the bytes read back from the file (a read-only
mapping of that range: no copy) at the offset the writer recorded. A tensor of
files.RELEASE_WHILE_READING bytes or more is compared in bands of rows (BAND_BYTES), its written
bytes read back by pread and each band's checkpoint pages released once compared, so the check
holds two bands of it, not three copies. The check runs inside the writing pass (on the
writer's job thread), right after each tensor is written, while its pages are still in the page
cache (no second read of the checkpoint or of the artifact from disk); `check_table` then
confirms that model.onnx's external-data entries point where the bytes were checked.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from pathlib import Path

import numpy as np

from kvtrace import files
from kvtrace.errors import KvtraceError, ParityFailure


class WeightMismatch(ParityFailure):
    """A written weight is not what its checkpoint tensor becomes. Exit status 1 (a failed check)."""

    label = "check failed"

_TORCH_INT = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
_UINT = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}
BAND_BYTES = 32 << 20  # a big tensor is compared this many source bytes at a time


def _torch(arr: np.ndarray):
    """A torch tensor sharing memory with a numpy array of any float dtype (bf16 included)."""
    import torch

    with warnings.catch_warnings():  # read-only mmap views: we never write through them
        warnings.simplefilter("ignore", UserWarning)
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def parts(cfg, weights, name: str, max_seq: int):
    """How the initializer `name` is made (the documented transform, before the cast):
    [(source, first)]: each source is an array in torch layout (a view of the checkpoint, or the
    computed rope table) whose row j is, after the cast, the initializer's row first + j. Q, K
    and V of the fused projection are three sources one above the other."""
    if name in ("rope.cos", "rope.sin"):
        from kvtrace import numerics

        cos, sin = numerics.rope_tables(cfg, max_seq)  # (max_seq, r/2) fp32
        return [(cos if name == "rope.cos" else sin, 0)]
    shapes = cfg.param_shapes()
    if name.endswith(".attn.qkv.weight") or name.endswith(".attn.qkv.bias"):
        prefix, leaf = name[:-len("qkv.weight")] if name.endswith("weight") else name[:-len("qkv.bias")], \
            name.rsplit(".", 1)[1]
        out, first = [], 0
        for n in "qkv":
            a = np.asarray(weights[f"{prefix}{n}.{leaf}"])
            out.append((a, first))
            first += a.shape[0]
        return out
    if name not in shapes:
        raise KvtraceError(f"internal error: initializer {name!r} is not a parameter of the model")
    return [(np.asarray(weights[name]), 0)]


def _shape(srcs) -> tuple[int, ...]:
    return (sum(a.shape[0] for a, _ in srcs), *srcs[0][0].shape[1:])


def _mapped(fd: int, path: Path, offset: int, nbytes: int, populate: bool = True):
    """(mmap, uint8 view) of bytes [offset, offset + nbytes) of the file just written: read
    through the page cache without a copy; closing the mapping releases its pages."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = os.fstat(fd).st_size
    if offset + nbytes > size:
        raise KvtraceError(f"{path}: ends at byte {size}, a weight was written up to byte {offset + nbytes}")
    # MAP_POPULATE: the pages (just written, in the page cache) are mapped in one call instead of
    # one fault per 4 KiB page as the comparison walks them
    if populate and hasattr(mmap, "MAP_POPULATE"):
        mm = mmap.mmap(fd, offset + nbytes - start, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                       prot=mmap.PROT_READ, offset=start)
    else:  # not Linux
        mm = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    return mm, np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset - start)


class _Bands:
    """A big written tensor read back a band of rows at a time with pread (one contiguous read:
    nothing of it stays mapped)."""

    def __init__(self, fd: int, offset: int, dims: tuple[int, ...], nbytes: int):
        self.fd, self.offset, self.dims = fd, offset, dims
        size = os.fstat(fd).st_size
        if offset + nbytes > size:
            raise KvtraceError(f"the written file ends at byte {size}, a weight was written up to byte "
                               f"{offset + nbytes}")

    def read(self, lo: int, hi: int, dtype) -> np.ndarray:
        """Rows [lo, hi) of the tensor as a new array."""
        inner = int(np.prod(self.dims[1:], dtype=np.int64))
        out = np.empty((hi - lo, *self.dims[1:]), dtype=dtype)
        mv = memoryview(out.reshape(-1).view(np.uint8))
        at, done = self.offset + lo * inner * dtype.itemsize, 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], at + done)
            if n <= 0:
                raise KvtraceError(f"the written file ended early reading back byte {at + done}")
            done += n
        return out


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch's intra-op threads set to n for the block. The exporter's torch work is casts and
    small matrix products: one thread is as fast on a quiet machine and an order of magnitude
    faster on a busy one (two OpenMP threads wait for each other)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_PIECE = 1 << 17  # 8-byte words compared at a time (1 MiB), into a reused bool buffer


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two C-contiguous arrays hold the same bytes. Compared as 8-byte words a cache-sized
    piece at a time: 7.4 GB/s on this project's 2-core machine, where torch.equal on int16 views
    gives 1.8 and np.array_equal 3.6 (it allocates a whole bool array)."""
    x = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # (no copy: the callers' arrays are contiguous)
    y = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    if x.size != y.size:
        return False
    n8 = x.size - x.size % 8
    x8, y8 = x[:n8].view(np.uint64), y[:n8].view(np.uint64)
    out = np.empty(min(_PIECE, x8.size), dtype=bool)
    for i in range(0, x8.size, _PIECE):
        o = out[:min(_PIECE, x8.size - i)]
        np.equal(x8[i:i + _PIECE], y8[i:i + _PIECE], out=o)
        if not o.all():
            return False
    return bool(np.array_equal(x[n8:], y[n8:]))


class InitializerCheck:
    """Called by the writer after each tensor (on_tensor); raises KvtraceError on the first
    initializer that differs, naming it and the parameters it came from."""

    def __init__(self, cfg, weights, dtype: str, max_seq: int):
        self.cfg, self.weights, self.dtype, self.max_seq = cfg, weights, dtype, max_seq
        self.checked, self.bytes = 0, 0
        self.where: dict[str, tuple[str, int, int]] = {}
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __call__(self, t, path: Path, offset: int) -> None:
        with torch_threads(1):
            self._check(t, path, offset)

    def _check(self, t, path: Path, offset: int) -> None:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        srcs = parts(self.cfg, self.weights, t.name, self.max_seq)
        want_shape = _shape(srcs)
        if want_shape != tuple(t.dims):
            raise KvtraceError(f"{path.name}: initializer '{t.name}' has shape {list(t.dims)}, the "
                               f"documented transform of its parameter gives {list(want_shape)}")
        if t.nbytes >= files.RELEASE_WHILE_READING:  # band by band, read with pread: nothing of it stays mapped
            self._compare(t, path, srcs, _Bands(self._fds[path], offset, tuple(t.dims), t.nbytes))
        else:
            mm, got_raw = _mapped(self._fds[path], path, offset, t.nbytes)
            try:
                self._compare(t, path, srcs, got_raw)
            finally:
                del got_raw
                try:
                    mm.close()
                except BufferError:  # an error's traceback still holds a view: the mapping goes with it
                    pass
        self.checked += 1
        self.bytes += t.nbytes
        self.where[t.name] = (path.name, offset, t.nbytes)

    def _expected(self, src: np.ndarray) -> np.ndarray:
        """The bytes `src` becomes in the graph dtype, as an unsigned integer array of its shape:
        the checkpoint's own bytes when the dtype is kept, else torch's cast (round to nearest
        even), not the builder's numpy cast."""
        if src.dtype.name == self.dtype:
            return src.view(_UINT[src.dtype.itemsize])
        import torch

        w = _torch(np.ascontiguousarray(src)).to(getattr(torch, self.dtype))
        return w.view(getattr(torch, _TORCH_INT[w.element_size()])).numpy().view(_UINT[w.element_size()])

    def _compare(self, t, path: Path, srcs, got_bytes) -> None:
        """Source rows against the written rows. got_bytes: the written tensor mapped (uint8), or
        a _Bands reader for a big one: then it is compared a band of BAND_BYTES source bytes at a
        time, read into a buffer, and each band's checkpoint pages are released once compared
        (the check holds two bands, not the tensor)."""
        int_np = _UINT[4 if self.dtype == "float32" else 2]
        bands = got_bytes if isinstance(got_bytes, _Bands) else None
        got = None if bands is not None else got_bytes.view(int_np).reshape(tuple(t.dims))
        for src, first in srcs:
            n = src.shape[0]
            row_bytes = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * int_np.itemsize)
            band = n if bands is None else max(1, BAND_BYTES // row_bytes)
            for r in range(0, n, band):
                w = self._expected(src[r:r + band])
                lo, hi = first + r, first + min(n, r + band)
                g = got[lo:hi] if bands is None else bands.read(lo, hi, int_np)
                if not same_bytes(g, w):
                    self._mismatch(t, path, g, w, src, lo)
                if bands is not None:
                    files.release_view(src[r:r + band])  # (a no-op unless a view of the mapped checkpoint)

    def _mismatch(self, t, path: Path, g, w, src, row0: int) -> None:
        """Raise WeightMismatch for the band g (written) != w (expected), whose first row is the
        initializer's row row0."""
        diff = np.argwhere(g != w)
        first = [int(i) for i in diff[0]]
        first[0] += row0  # band -> initializer coordinates
        finite = src.dtype.kind != "f" and src.dtype.name != "bfloat16" or \
            bool(np.isfinite(np.asarray(src, dtype=np.float32)).all())
        raise WeightMismatch(
            f"{path.name}: initializer '{t.name}' differs from what its checkpoint tensor becomes "
            f"({self.dtype}) at {len(diff)} element(s)"
            f"{' of the first differing band' if g.size < int(np.prod(t.dims)) else ''}, "
            f"first at index {first}" + ("" if finite else " (the checkpoint tensor holds NaN or Inf)"))

    def check_table(self, onnx_path: Path) -> None:
        """model.onnx's external-data entries name the file, offset and length checked above."""
        import onnx

        m = onnx.load(str(onnx_path), load_external_data=False)
        seen = 0
        for init in m.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ext = {e.key: e.value for e in init.external_data}
            got = (ext.get("location"), int(ext.get("offset", 0)), int(ext.get("length", -1)))
            if self.where.get(init.name) != got:
                raise KvtraceError(f"{onnx_path.name}: initializer '{init.name}' refers to {got}, but its "
                                   f"checked bytes are at {self.where.get(init.name)}")
            seen += 1
        if seen != len(self.where):
            raise KvtraceError(f"{onnx_path.name}: {seen} external initializers, {len(self.where)} were written")

    def summary(self) -> dict:
        return {"checked": self.checked, "bytes": self.bytes,
                "rule": "byte-exact against the documented transform of the checkpoint tensors "
                        "(docs/validation.md), read back from the written file"}
