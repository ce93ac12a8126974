"""A checkpoint read one tensor at a time, for the streamed export. No torch.

    weights = CheckpointWeights(open_checkpoint(dir))
    weights["layers.3.attn.q.weight"]   # numpy view of the memory-mapped shard, torch layout
    weights.release()                   # drop the pages read since the last release

The plan (config.json, shards, headers, the strict checks) is models/checkpoint.py's
`open_checkpoint`, the one the torch loader uses too; the adapter fixups are models/hf.py's
(`weight_table`, `split_tensor`): GPT-NeoX's fused per-head interleaved query_key_value is split
with the loader's own code, StarCoder2's biases are ordinary tensors of the table, XGLM's
embedding scale is a config field the graph applies (the stored embedding is unscaled), and the
head of a tied model is the embedding itself (a stored copy is compared with it once).

Memory: each safetensors shard is mapped read-only (mmap, MAP_SHARED) and a tensor is a numpy
view of its bytes, so nothing is copied unless the graph builder casts or stacks it. Pages
of the mapping that have been read count in the process's RSS (as file-backed pages: RssFile)
until they are released, so `release()` is called after every tensor is written: it drops the
pages of the tensors handed out since the last call (madvise(MADV_DONTNEED); they stay in the
page cache and a later read is served from there). Peak RSS is then the largest tensor or two,
not the checkpoint.

Digest: the checkpoint's sha256 (the weight files' bytes concatenated in file order, the same
definition as load_checkpoint's) is computed by a background thread reading the files front to
back while the export reads tensors in graph order: a single sequential digest cannot follow the
graph's order (safetensors sorts names, so layer 10 precedes layer 2 in a shard), and the two
readers share the page cache, so the files are read from disk about once.
"""
from __future__ import annotations

import mmap
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kvtrace.errors import KvtraceError

from .checkpoint import Checkpoint, Entry, digest_files, tied_head_error
from .hf import split_tensor

_PAGE = mmap.PAGESIZE
_COMPARE_ROWS = 4096  # rows compared at a time when checking a stored tied head


def np_dtype(name: str):
    """numpy dtype of a checkpoint dtype name (bfloat16 from ml_dtypes, a dependency of onnx)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class CheckpointWeights(Mapping):
    """Canonical name (ModelConfig.param_shapes()) -> numpy array in the checkpoint's dtype and
    torch layout ((out, in) for linear weights), read lazily from the mapped shards."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.cfg = ck.config
        self._shapes = ck.config.param_shapes()
        self._of: dict[str, tuple[str, tuple[str, ...]]] = {}  # canonical -> (HF name, its canonical parts)
        for hf_name, canon in ck.table.items():
            for c in canon:
                self._of[c] = (hf_name, canon)
        self._maps: dict[Path, tuple[mmap.mmap, np.ndarray]] = {}
        # read-ahead: the first access to a block's tensor asks the kernel for that block's and the
        # next block's bytes at once (madvise(MADV_WILLNEED): large asynchronous reads into the page
        # cache, not into this process's RSS), instead of one small read per page fault
        self._group: dict[str, int] = {}
        groups: dict[int, list[Entry]] = {}
        for hf_name, canon in ck.table.items():
            g = int(canon[0].split(".")[1]) + 1 if canon[0].startswith("layers.") else \
                (0 if canon[0].startswith("embed") else ck.config.n_layers + 1)
            self._group[hf_name] = g
            groups.setdefault(g, []).append(ck.entries[hf_name])
        self._groups = groups
        self._prefetched: set[int] = set()
        # tensors handed out and not released: (file, start, end) -> (sequence number of the
        # latest hand-out, entry); the writer's job thread releases while the main thread reads
        self._touched: dict[tuple, tuple[int, Entry]] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._digest_thread = None
        self._digest = None
        self._stop = False
        self.nbytes = ck.weight_bytes

    # ---------------------------------------------------------------- Mapping
    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._of:
            raise KeyError(name)
        hf_name, canon = self._of[name]
        arr = self.hf_tensor(hf_name)
        return split_tensor(self.ck.adapter, self.cfg, canon, arr, only=name)[0][1]

    def __iter__(self):
        return iter(self._shapes)

    def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's default would)
        return name in self._of

    def shape(self, name: str) -> tuple[int, ...]:
        """The canonical tensor's shape, without reading it."""
        return tuple(self._shapes[name])

    def where(self, name: str) -> str:
        """The checkpoint tensor a canonical weight comes from, for messages."""
        hf_name = self._of.get(name, (None,))[0]
        if hf_name is None:
            return f"checkpoint {self.ck.root}: parameter {name}"
        return f"{self.ck.entries[hf_name].file}: tensor '{hf_name}' (parameter {name})"

    def __len__(self):
        return len(self._shapes)

    # ---------------------------------------------------------------- raw access
    def hf_tensor(self, hf_name: str) -> np.ndarray:
        """The checkpoint tensor itself (a view of the mapped file), shape and dtype as stored."""
        e = self.ck.entries[hf_name]
        with self._lock:
            self._seq += 1
            self._touched.pop((e.file, e.start, e.end), None)
            self._touched[(e.file, e.start, e.end)] = (self._seq, e)
        if e.tensor is not None:  # a pickle checkpoint (torch.load(mmap=True) already mapped it)
            t = e.tensor.detach()
            if e.dtype == "bfloat16":
                import torch

                return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
            return t.numpy()
        raw = self._mapped(e.file)
        g = self._group.get(hf_name)
        if g is not None and g not in self._prefetched:
            for h in (g, g + 1):
                if h not in self._prefetched:
                    self._prefetched.add(h)
                    self._willneed(self._groups.get(h, []))
        return raw[e.start:e.end].view(np_dtype(e.dtype)).reshape(e.shape)

    def _willneed(self, entries) -> None:
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for e in entries:
            if e.tensor is not None:
                continue
            mm = self._mapped(e.file) is not None and self._maps[e.file][0]
            start = e.start - e.start % _PAGE
            mm.madvise(mmap.MADV_WILLNEED, start, min(len(mm), e.end) - start)

    def fork(self) -> "CheckpointWeights":
        """The same checkpoint through mappings of its own, for a second reader in another thread
        (the export's background reference): its release() drops its own pages only, never those
        the writer is reading, and the writer's never drop its. No digest thread."""
        return CheckpointWeights(self.ck)

    def _mapped(self, path: Path) -> np.ndarray:
        with self._lock:
            return self._mapped_locked(path)

    def _mapped_locked(self, path: Path) -> np.ndarray:
        if path not in self._maps:
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise KvtraceError(f"{path}: cannot map the weight file ({e})") from e
            self._maps[path] = (mm, np.frombuffer(mm, dtype=np.uint8))
        return self._maps[path][1]

    def mark(self) -> int:
        """A point in the sequence of hand-outs, for release(upto=...)."""
        with self._lock:
            return self._seq

    def release(self, upto: int | None = None) -> None:
        """Drop the resident pages of the tensors handed out (all of them, or those last handed
        out at or before mark `upto`).

        The writer releases from its job thread, after checking a tensor, while the main thread
        is already reading the next ones: `upto` (the mark taken when that tensor's bytes were
        made) leaves the pages of tensors handed out since alone. Dropping pages under a reader
        is harmless but costly: they fault in again (at 7B, the transposes ran at half speed)."""
        with self._lock:
            gone = [k for k, (seq, _) in self._touched.items() if upto is None or seq <= upto]
            entries = [self._touched.pop(k)[1] for k in gone]
        for e in entries:
            if e.file not in self._maps or not hasattr(mmap, "MADV_DONTNEED"):
                continue
            mm = self._maps[e.file][0]
            start = e.start - e.start % _PAGE
            end = min(len(mm), e.end + (-e.end) % _PAGE)
            if end > start:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self._stop = True
        if self._digest_thread is not None:
            self._digest_thread.join()
        self._touched = {}
        maps, self._maps = self._maps, {}
        for mm, _ in maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass

    # ---------------------------------------------------------------- checks
    def check_tied_head(self) -> None:
        """A tied checkpoint that still stores its head must store the embedding there (compared
        in its dtype, a few thousand rows at a time)."""
        embed_hf = self._of["embed.weight"][0]
        for e in self.ck.tied_head:
            emb, head = self.hf_tensor(embed_hf), self.hf_tensor(e.name)
            for i in range(0, emb.shape[0], _COMPARE_ROWS):
                a, b = emb[i:i + _COMPARE_ROWS], head[i:i + _COMPARE_ROWS].astype(emb.dtype)
                if not np.array_equal(a.view(np.uint8), np.ascontiguousarray(b).view(np.uint8)):
                    raise tied_head_error(e, self.ck.adapter)
                self.release()
            self.release()

    # ---------------------------------------------------------------- digest
    def start_digest(self) -> None:
        """Start hashing the weight files in a background thread (see the module docstring)."""
        if self._digest_thread is None:
            def run():
                try:
                    self._digest = digest_files(self.ck.files, stop=lambda: self._stop)
                except OSError as e:
                    self._digest = e
            self._digest_thread = threading.Thread(target=run, name="kvtrace-checkpoint-digest", daemon=True)
            self._digest_thread.start()

    def digest(self) -> str:
        """The checkpoint's sha256 (waits for the background thread)."""
        self.start_digest()
        self._digest_thread.join()
        if isinstance(self._digest, OSError):
            raise KvtraceError(f"cannot read the checkpoint to compute its digest ({self._digest})")
        return self._digest
