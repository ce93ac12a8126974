"""Checks of what `kvtrace export` copies and writes (docs/validation.md):

  checked(weights, where, dtype) a weight mapping that refuses NaN/Inf (and values the export
                                dtype would turn into Inf, e.g. 7e4 for float16): the first tensor
                                holding one raises KvtraceError naming it (where(name) says which
                                checkpoint tensor it came from), when the tensor is first read.
                                Any weight mapping can be wrapped (the torch model's, a
                                streamed safetensors reader's); wrapping twice is a no-op.
  check_initializers(path, inits)
                                every weight written to model.onnx / model.onnx.data, read back
                                from the file and compared byte for byte with what the graph
                                builder makes of its source tensor (Initializer.data(): the
                                cast / fusion of the checkpoint tensor). The parity
                                prompts touch a few embedding rows; this covers every row of
                                every weight, so a write that is wrong only where no prompt looks
                                cannot pass validation.
Both stream: one tensor (or a 16 Mi-element piece of it) at a time. No torch.
"""
from __future__ import annotations

import mmap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import numpy as np

from kvtrace import files
from kvtrace.errors import CheckFailed, KvtraceError

_PIECE = 1 << 24  # elements per isfinite pass: bounded temporary memory for any tensor size
_BITS_PIECE = 1 << 18  # elements per exponent-bit pass (first_non_finite): fits in the L2 cache
_EXPONENT = {"float16": np.uint16(0x7C00), "bfloat16": np.uint16(0x7F80), "float32": np.uint32(0x7F800000)}


# ----------------------------------------------------------------------------- non-finite weights
def first_non_finite(arr: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN/Inf in a float array (fp32, fp16, ml_dtypes bf16), or None.

    A value is NaN or Inf when its exponent bits are all ones: the bits are masked into a small
    reused buffer (cache-sized pieces) and its maximum compared with the mask, ~4x faster than
    np.isfinite on fp16 (which converts); only a piece that holds one is searched."""
    a = np.asarray(arr)
    if a.dtype.kind not in "fV" and a.dtype.name != "bfloat16":
        return None
    mask = _EXPONENT.get(a.dtype.name)
    flat = a.reshape(-1)
    if mask is None:  # float64 and other widths: the plain test
        bad = ~np.isfinite(flat)
        return tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), a.shape)) if bad.any() else None
    bits = flat.view(mask.dtype)
    buf = np.empty(min(bits.size, _BITS_PIECE), dtype=mask.dtype)
    release = a.nbytes >= files.RELEASE_WHILE_READING  # a big mapped tensor: its pages go as they are read
    for i in range(0, bits.size, _BITS_PIECE):
        piece = bits[i:i + _BITS_PIECE]
        b = buf[:piece.size]
        np.bitwise_and(piece, mask, out=b)
        if b.max() == mask:
            j = int(np.argmax(b == mask))
            return tuple(int(k) for k in np.unravel_index(i + j, a.shape))
        if release:
            files.release_view(piece)
    return None


def first_overflow(arr: np.ndarray, dtype: str) -> tuple[int, ...] | None:
    """Index of the first (finite) value that becomes Inf when cast to `dtype` ("float16":
    magnitudes from 65520 up; "bfloat16": from about 3.3961e38), or None."""
    if dtype not in ("float16", "bfloat16"):
        return None
    a = np.asarray(arr)
    if a.dtype.name == dtype:
        return None
    import ml_dtypes

    target = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    flat = a.reshape(-1)
    with np.errstate(over="ignore"):
        for i in range(0, flat.size, _PIECE):
            piece = np.abs(flat[i:i + _PIECE].astype(np.float32))
            if a.nbytes >= files.RELEASE_WHILE_READING:
                files.release_view(flat[i:i + _PIECE])
            j = int(np.argmax(piece)) if piece.size else 0
            if piece.size and np.isinf(np.float32(piece[j]).astype(target)):  # the largest overflows: find the first
                bad = np.isinf(piece.astype(target))
                return tuple(int(k) for k in np.unravel_index(i + int(np.argmax(bad)), a.shape))
    return None


class Checked(Mapping):
    """A weight mapping whose tensors are checked for NaN/Inf (and, for a float16/bfloat16
    export, for values that would become Inf in that dtype) when first read (see `checked`)."""

    def __init__(self, inner: Mapping, where: Callable[[str], str], dtype: str | None = None):
        self._inner, self._where, self._dtype = inner, where, dtype
        self._ok: set[str] = set()  # names already checked (the builder reads shapes first, then data)

    def __getitem__(self, name):
        arr = self._inner[name]
        if name not in self._ok:
            at = first_non_finite(arr)
            if at is not None:
                v = np.asarray(arr)[at]
                raise KvtraceError(f"{self._where(name)} holds a non-finite value ({float(v)}) at index "
                                   f"{list(at)}: the checkpoint is damaged or was saved from a diverged run; "
                                   "nothing was exported")
            at = first_overflow(arr, self._dtype) if self._dtype else None
            if at is not None:
                v = float(np.asarray(arr)[at])
                raise KvtraceError(f"{self._where(name)} holds {v:g} at index {list(at)}, beyond the range of "
                                   f"{self._dtype} (it would be stored as Inf); export it in float32"
                                   f"{' or --bf16' if self._dtype == 'float16' else ''}; nothing was exported")
            self._ok.add(name)
        return arr

    def __contains__(self, name) -> bool:
        # Mapping's default __contains__ calls __getitem__, which would read (and check) every
        # tensor of a memory-mapped checkpoint when the builder only asks which names exist
        return name in self._inner

    def shape(self, name) -> tuple[int, ...]:
        """A tensor's shape without reading it (the builder's shape check must not fault in a
        memory-mapped checkpoint: the check above runs when the bytes are read for writing)."""
        inner_shape = getattr(self._inner, "shape", None)
        return tuple(inner_shape(name)) if callable(inner_shape) else tuple(self._inner[name].shape)

    def __getattr__(self, attr):  # release(), close(), digest(), ... of the wrapped mapping
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._inner, attr)

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)


def checked(weights: Mapping, where: Callable[[str], str] | None = None, dtype: str | None = None) -> Mapping:
    """`weights` with every tensor checked for NaN/Inf on first read, and for values the export
    dtype (`dtype`: "float16" / "bfloat16") cannot hold; where(name) describes the tensor for the
    message (default: "weight 'NAME'")."""
    if isinstance(weights, Checked):
        return weights
    return Checked(weights, where or (lambda n: f"weight '{n}'"), dtype)


# ----------------------------------------------------------------------------- read-back
def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end) of each protobuf field in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint(buf, i)
        elif wire == 1:
            j = i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            j = i + n
        elif wire == 5:
            j = i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if j > end:
            raise ValueError("field runs past its message")
        yield field, wire, i, j
        i = j


def embedded_raw_data(buf) -> dict[str, tuple[int, int]]:
    """Initializer name -> (start, end) of its raw_data bytes inside a serialized ModelProto
    (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, raw_data = 9)."""
    out = {}
    for f, w, s, e in _fields(buf, 0, len(buf)):
        if f != 7 or w != 2:
            continue
        for gf, gw, gs, ge in _fields(buf, s, e):
            if gf != 5 or gw != 2:
                continue
            name, raw = None, None
            for tf, tw, ts, te in _fields(buf, gs, ge):
                if tf == 8 and tw == 2:
                    name = bytes(buf[ts:te]).decode("utf-8")
                elif tf == 9 and tw == 2:
                    raw = (ts, te)
            if name is not None and raw is not None:
                out[name] = raw
    return out


_COMPARE_CHUNK = 16 << 20  # bytes read back per piece: the file is never mapped whole


def _first_difference(f, start: int, want: np.ndarray, buf: np.ndarray) -> int | None:
    """Compare the file's bytes from `start` with `want` (uint8), 16 MiB at a time through `buf`
    (read, not memory-mapped: mapped pages of a 13 GB file would count in the process's RSS)."""
    f.seek(start)
    for i in range(0, want.size, _COMPARE_CHUNK):
        n = min(_COMPARE_CHUNK, want.size - i)
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            k = f.readinto(view[got:])
            if not k:
                return i + got  # the file ends early
            got += k
        a, b = buf[:n], want[i:i + n]
        if not np.array_equal(a, b):
            return i + int(np.argmax(a != b))
    return None


def check_initializers(onnx_path: Path, inits, log=None) -> dict:
    """Compare every initializer in `inits` (onnx_graph.Initializer: name, nbytes, data()) with
    its bytes in the written file(s): model.onnx (embedded raw_data, located by walking the
    protobuf) or model.onnx.data (external: offset/length from the graph). Streams: one tensor is
    made at a time and the file is read back 16 MiB at a time. Raises CheckFailed naming the tensor and file
    at the first difference; returns {"initializers": n, "bytes": total}."""
    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    with open(onnx_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            where = {n: (onnx_path, s, e) for n, (s, e) in embedded_raw_data(mm).items()}
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise CheckFailed(f"{onnx_path}: cannot locate the weights in the written file ({e})") from None
    if any(t.name not in where for t in inits):  # external data: the graph names (location, offset, length)
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                kv = {e.key: e.value for e in t.external_data}
                off, n = int(kv.get("offset", 0)), int(kv["length"])
                where[t.name] = (onnx_path.with_name(kv["location"]), off, off + n)
    handles: dict[Path, object] = {}
    buf = np.empty(_COMPARE_CHUNK, dtype=np.uint8)
    total = 0
    try:
        for t in inits:
            if t.name not in where:
                raise CheckFailed(f"{onnx_path}: weight '{t.name}' is not in the written model")
            path, s, e = where[t.name]
            if path not in handles:
                handles[path] = open(path, "rb", buffering=0)
            want = np.ascontiguousarray(t.data()).reshape(-1).view(np.uint8)  # what the builder meant to write
            if e - s != want.size:
                raise CheckFailed(f"{path.name}: weight '{t.name}' occupies {e - s} bytes, expected {want.size}")
            first = _first_difference(handles[path], s, want, buf)
            if first is not None:
                raise CheckFailed(f"{path.name}: weight '{t.name}' as written differs from its source tensor "
                                  f"(first difference at byte {first} of {want.size}); the write is broken")
            del want
            total += e - s
    finally:
        for fh in handles.values():
            fh.close()
    if log is not None:
        log(f"every weight read back from the file equals its source tensor ({len(inits)} tensors, "
            f"{total / 1e6:.1f} MB, {time.perf_counter() - t0:.2f}s)")
    return {"initializers": len(inits), "bytes": total}
