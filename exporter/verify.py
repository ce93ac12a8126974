"""Every initializer of a written artifact against the checkpoint tensor(s) it came from.

The documented transform (docs/validation.md), graph initializer <- canonical parameters
(ModelConfig.param_shapes(), torch layout):
  layers.{i}.attn.qkv.weight   [Wq; Wk; Wv] stacked on rows, transposed: (D, q_dim + 2 kv_dim)
  layers.{i}.attn.qkv.bias     [bq; bk; bv] concatenated
  other 2-D weights except embed.weight (linear layers, lm_head): transposed, (in, out)
  everything else (embed.weight, norm weights and biases, other biases): as stored
  rope.cos, rope.sin           not from the checkpoint: kvtrace.numerics.rope_tables(cfg, max_seq),
                               the tables the reference model reads
each then cast to the graph dtype (round to nearest even; no cast when the dtype is kept).

The expected tensor is made here with torch operations on the checkpoint's own arrays, not by
the graph builder's numpy code (exporter/onnx_graph.py), and compared bit for bit with the bytes
read back from the file (a read-only mapping of that range: no copy) at the offset the writer
recorded: byte-exact when the dtype is kept, equal to torch's exact cast otherwise. The check
runs inside the writing pass (on the writer's job thread), right after each tensor is written,
while its pages are still in the page cache (no second read of the checkpoint or of the
artifact from disk); `check_table` then confirms that model.onnx's external-data entries point where
the bytes were checked.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from pathlib import Path

import numpy as np

from kvtrace.errors import KvtraceError, ParityFailure


class WeightMismatch(ParityFailure):
    """A written weight is not what its checkpoint tensor becomes. Exit status 1 (a failed check)."""

    label = "check failed"

_TORCH_INT = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _torch(arr: np.ndarray):
    """A torch tensor sharing memory with a numpy array of any float dtype (bf16 included)."""
    import torch

    with warnings.catch_warnings():  # read-only mmap views: we never write through them
        warnings.simplefilter("ignore", UserWarning)
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def expected(cfg, weights, name: str, dtype: str, max_seq: int):
    """The initializer `name` as the documented transform makes it (a torch tensor, maybe a
    strided view)."""
    import torch

    target = getattr(torch, dtype)
    if name in ("rope.cos", "rope.sin"):
        from kvtrace import numerics

        cos, sin = numerics.rope_tables(cfg, max_seq)  # (max_seq, r/2) fp32
        return torch.from_numpy(cos if name == "rope.cos" else sin).to(target)
    shapes = cfg.param_shapes()
    if name.endswith(".attn.qkv.weight") or name.endswith(".attn.qkv.bias"):
        prefix, leaf = name[:-len("qkv.weight")] if name.endswith("weight") else name[:-len("qkv.bias")], \
            name.rsplit(".", 1)[1]
        parts = torch.cat([_torch(np.asarray(weights[f"{prefix}{n}.{leaf}"])) for n in "qkv"]).to(target)
        return parts.t() if leaf == "weight" else parts
    if name not in shapes:
        raise KvtraceError(f"internal error: initializer {name!r} is not a parameter of the model")
    t = _torch(np.asarray(weights[name])).to(target)
    if len(shapes[name]) == 2 and name != "embed.weight":
        return t.t()
    return t


def _mapped(fd: int, path: Path, offset: int, nbytes: int):
    """(mmap, uint8 view) of bytes [offset, offset + nbytes) of the file just written: read
    through the page cache without a copy; closing the mapping releases its pages."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = os.fstat(fd).st_size
    if offset + nbytes > size:
        raise KvtraceError(f"{path}: ends at byte {size}, a weight was written up to byte {offset + nbytes}")
    # MAP_POPULATE: the pages (just written, in the page cache) are mapped in one call instead of
    # one fault per 4 KiB page as the comparison walks them
    if hasattr(mmap, "MAP_POPULATE"):
        mm = mmap.mmap(fd, offset + nbytes - start, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                       prot=mmap.PROT_READ, offset=start)
    else:  # not Linux
        mm = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    return mm, np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset - start)


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch's intra-op threads set to n for the block. The exporter's torch work is small
    matrix products and memory-bound comparisons: one thread is as fast on a quiet machine and
    an order of magnitude faster on a busy one (two OpenMP threads wait for each other)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _equal(a, b, block: int = 64) -> bool:
    """Bitwise equality of two integer views; a transposed `b` is compared 64 columns at a time
    (a strided walk over a whole matrix is ~4x slower)."""
    import torch

    if a.dim() != 2 or b.is_contiguous():
        return torch.equal(a, b)
    return all(torch.equal(a[:, j:j + block], b[:, j:j + block]) for j in range(0, a.shape[1], block))


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
        mm, got_raw = _mapped(self._fds[path], path, offset, t.nbytes)
        try:
            self._compare(t, path, got_raw)
        finally:
            del got_raw
            try:
                mm.close()
            except BufferError:  # an error's traceback still holds a view: the mapping goes with it
                pass
        self.checked += 1
        self.bytes += t.nbytes
        self.where[t.name] = (path.name, offset, t.nbytes)

    def _compare(self, t, path: Path, got_raw: np.ndarray) -> None:
        import torch

        want = expected(self.cfg, self.weights, t.name, self.dtype, self.max_seq)
        if tuple(want.shape) != tuple(t.dims):
            raise KvtraceError(f"{path.name}: initializer '{t.name}' has shape {list(t.dims)}, the "
                               f"documented transform of its parameter gives {list(want.shape)}")
        int_dtype = getattr(torch, _TORCH_INT[want.element_size()])
        with warnings.catch_warnings():  # a read-only mapping: never written through
            warnings.simplefilter("ignore", UserWarning)
            got = torch.from_numpy(got_raw).view(int_dtype).view(tuple(t.dims))
        if not _equal(got, want.view(int_dtype)):
            diff = (got != want.view(int_dtype)).nonzero()
            first = tuple(int(i) for i in diff[0])
            finite = bool(torch.isfinite(want.float()).all())
            raise WeightMismatch(
                f"{path.name}: initializer '{t.name}' differs from what its checkpoint tensor becomes "
                f"({self.dtype}{', transposed' if want.dim() == 2 and t.name != 'embed.weight' else ''}) at "
                f"{len(diff)} element(s), first at index {list(first)}"
                + ("" if finite else " (the checkpoint tensor holds NaN or Inf)"))

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
