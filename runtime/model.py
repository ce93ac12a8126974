"""A loaded artifact: manifest, backend, and the KV cache bookkeeping. No torch.

    m = Model.load(artifact_dir, backend="auto")
    logits = m.start(prompts)      # (B, T_max, V) float32, every position; row b valid up to len_b
    first = m.start(prompts, logits="last")  # (B, 1, V): each row's last prompt token only (generation)
    last = m.step(tokens)          # (B, V): one token per row, at that row's own position
    m.lengths                      # tokens held per row
    m.generate(prompts, ...)       # runtime/generate.py

Cache layouts (runtime/io_spec.py):
  static : every cache buffer (B, n_kv, S, hd) is allocated once per batch size and bound as
           BOTH the graph input past_key_values.i.* and its output present.i.* (TensorScatter
           writes the new rows in place). Ragged prompts are right padded: row b's token t sits
           at slot/position t; a padding slot is overwritten by the row's next real token before
           any query can see it (attention is causal by slot). Per step only input_ids and
           position_ids (B, 1) change; the logits buffer (B, 1, V) is bound once, and logits_index
           (artifacts that have it) is the same zeros (B, 1) every step (the backend's staging
           buffer for it is bound once and refreshed in place).
  dynamic: past (B, n_kv, P, hd) -> present (B, n_kv, P + T, hd): the presents of one run are
           bound as the pasts of the next; attention_mask (B, P + T) marks padding with 0 and
           grows by one column per step; row b's next position is its own token count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from kvtrace.config import ModelConfig

from kvtrace import io_spec
from .backends import Backend, _manifest_get, choose_backend, create_backend
from kvtrace.errors import KvtraceError
from kvtrace.options import utf8_problem
from .tokenizer import Tokenizer


def _load_manifest(artifact_dir: Path):
    """The manifest through runtime/manifest.py (the exporter's schema and checks)."""
    from kvtrace.manifest import load_manifest

    return load_manifest(artifact_dir)


class Model:
    def __init__(self, artifact_dir: Path, manifest, backend: Backend, tokenizer: Tokenizer | None):
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        self.backend = backend
        self.backend_name = backend.name
        self.tokenizer = tokenizer
        cfg = _manifest_get(manifest, "config")
        self.config = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)
        io = _manifest_get(manifest, "io")
        self.io = io
        self.layout = io["layout"]
        self.max_seq = min(int(io["max_seq"]), self.config.max_position)
        self.max_batch = int(io["max_batch"])
        by_name = {t["name"]: t for t in io["inputs"]}
        self.cache_dtype = by_name[io_spec.past_key(0)]["dtype"]
        self.cache_pairs = io_spec.cache_pairs(self.config.n_layers)  # [(past name, present name)]
        gen = _manifest_get(manifest, "generation", None) or {}
        self.bos_token_id = gen.get("bos_token_id", self.config.bos_token_id)
        self.eos_token_id = gen.get("eos_token_id", self.config.eos_token_id)
        pad = gen.get("pad_token_id", self.config.pad_token_id)
        self.pad_token_id = int(pad) if pad is not None else 0
        self._B: int | None = None  # batch size the buffers are bound for
        self._lengths = np.zeros(0, dtype=np.int64)  # (B,) tokens held per row
        self._caches = []  # static: one buffer per cache tensor, bound in and out
        self._step_logits = None  # (B, 1, V) logits buffer for decode steps
        # artifacts exported before logits_index existed return every position (K = T)
        self.has_logits_index = io_spec.has_logits_index(io)
        self._step_index = None  # (B, 1) int64 zeros: a decode step's one new token
        self._mask = None  # dynamic: (B, S) int64, columns [0, P) in use
        self._P = 0  # dynamic: cached slots (padded length)
        self.skipped_backends: list[str] = []

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, artifact_dir, backend: str = "auto", *, verify: bool = False, **backend_options) -> "Model":
        """Load an artifact directory. backend: "auto" | "onnxruntime" | "onnxruntime-cuda" |
        "tensorrt" | any registered name; backend_options go to the backend (threads=...).

        Integrity (kvtrace.manifest.verify_files): every file the manifest lists must have its
        recorded size, and files up to manifest.HASH_LIMIT bytes their recorded sha256;
        verify=True checks the sha256 of every file, however large."""
        artifact_dir = Path(artifact_dir)
        if not artifact_dir.is_dir():
            what = "is not a directory" if artifact_dir.exists() else "not found"
            raise KvtraceError(f"artifact directory {artifact_dir} {what} (an artifact is the directory "
                               "`kvtrace export` writes)")
        manifest = _load_manifest(artifact_dir)
        from kvtrace.manifest import verify_files

        verify_files(manifest, full=verify)
        tokenizer = Tokenizer.from_manifest(artifact_dir, _manifest_get(manifest, "tokenizer", None))
        if backend == "auto":
            errors = []
            for name in choose_backend(manifest):
                try:
                    be = create_backend(name, artifact_dir, manifest, **backend_options)
                    break
                except KvtraceError as e:  # e.g. an engine for another GPU: fall back to the next
                    errors.append(f"{name}: {e}")
            else:
                raise KvtraceError("no backend could load the artifact: " + "; ".join(errors))
        else:
            errors = []
            be = create_backend(backend, artifact_dir, manifest, **backend_options)
        m = cls(artifact_dir, manifest, be, tokenizer)
        m.skipped_backends = errors  # "name: reason" for every backend "auto" tried and passed over
        return m

    # ------------------------------------------------------------------ state
    @property
    def lengths(self) -> list[int]:
        return [int(x) for x in self._lengths]

    @property
    def batch_size(self) -> int | None:
        return self._B

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _check_ids(self, ids: np.ndarray, what: str) -> None:
        V = self.config.vocab_size
        bad = (ids < 0) | (ids >= V)
        if bad.any():
            tok = int(ids[bad][0])
            raise KvtraceError(f"{what}: token id {tok} out of range for the vocabulary of size {V} "
                               f"(valid ids 0..{V - 1})")

    def _id_row(self, p, what: str) -> np.ndarray:
        """One row of token ids as int64 (1-D); anything that is not a list of integers that fit
        int64 (floats, bools, strings, 2**70) is a KvtraceError naming the row, not a silent cast."""
        if isinstance(p, (str, bytes)):
            raise KvtraceError(f"{what}: expected a list of token ids, got text {p[:20]!r}")
        try:
            arr = np.asarray(p)
        except (ValueError, TypeError, OverflowError) as e:
            raise KvtraceError(f"{what}: expected a list of integer token ids ({e})") from None
        if arr.ndim == 1 and arr.dtype.kind == "O" and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            big = next(t for t in p if not -2**63 <= t < 2**63)
            raise KvtraceError(f"{what}: token id {big} does not fit in int64 (valid ids 0..{self.config.vocab_size - 1})")
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise KvtraceError(f"{what}: expected a flat list of integer token ids (0..{self.config.vocab_size - 1}), "
                               f"got {repr(p)[:80]}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise KvtraceError(f"{what}: token id {int(arr.max())} does not fit in int64")
        return arr.astype(np.int64)

    def _bind_batch(self, B: int) -> None:
        """(Re)allocate and bind the per-batch-size buffers: caches (static) and step logits."""
        be, cfg = self.backend, self.config
        if self._B == B:
            return
        self._caches = []
        if self.layout == "static":
            shape = (B, cfg.n_kv_heads, self.max_seq_graph, cfg.head_dim)  # (B, n_kv, S, hd)
            for past, present in self.cache_pairs:
                buf = be.alloc(shape, self.cache_dtype)
                be.bind_input(past, buf)
                be.bind_output(present, buf)  # same buffer: TensorScatter updates it in place
                self._caches.append(buf)
        self._step_logits = be.alloc((B, 1, cfg.vocab_size), "float32")  # (B, 1, V)
        self._step_index = np.zeros((B, 1), dtype=np.int64)  # (B, 1): logits of the one new token
        self._B = B

    @property
    def max_seq_graph(self) -> int:
        """The static cache length the graph was exported with."""
        return int(self.io["max_seq"])

    # ------------------------------------------------------------------ prefill
    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Validate a batch -> (ids (B, T_max) int64 right padded with the pad token, lengths (B,))."""
        if len(prompts) == 0:
            raise KvtraceError("no prompts given")
        B = len(prompts)
        if B > self.max_batch:
            raise KvtraceError(f"batch of {B} prompts exceeds the artifact's max_batch {self.max_batch} "
                               "(export with a larger --max-batch)")
        rows = [self._id_row(p, f"prompt {b}") for b, p in enumerate(prompts)]
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        if (lens == 0).any():
            raise KvtraceError(f"prompt {int(np.argmin(lens))} is empty (give at least one token, e.g. BOS)")
        T = int(lens.max())
        ids = np.full((B, T), self.pad_token_id, dtype=np.int64)  # (B, T) right padded
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        self._check_ids(ids, "prompt")
        if T > self.max_seq:
            raise KvtraceError(f"prompt of {T} tokens is longer than the cache ({self.max_seq} positions)")
        return ids, lens

    def start(self, prompts: Sequence[Sequence[int]], logits: str = "all") -> np.ndarray:
        """Begin a new batch: prefill every prompt in one call (right padded).

        logits="all": returns (B, T_max, V) float32 for every position; row b is valid up to len_b
        (scoring, parity). logits="last": returns (B, 1, V), each row's last prompt token
        (len_b - 1) only, which is all generation needs: the graph then runs its final norm and
        lm_head on one position per row instead of T_max.
        """
        if logits not in ("all", "last"):
            raise KvtraceError(f"start(logits={logits!r}): expected 'all' or 'last'")
        ids, lens = self.check_prompts(prompts)
        B, T = ids.shape
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()  # (B, T)
        if logits == "all":
            sel = pos  # (B, T): every position
        else:
            sel = (lens - 1).reshape(B, 1)  # (B, 1): each row's last real token
        # an artifact without logits_index computes every position; "last" is then picked here
        K = sel.shape[1] if self.has_logits_index else T

        be = self.backend
        self._bind_batch(B)
        out_buf = be.alloc((B, K, self.config.vocab_size), "float32")  # (B, K, V), handed to the caller
        be.bind_output(io_spec.LOGITS, out_buf)
        feeds = {io_spec.INPUT_IDS: ids, io_spec.POSITION_IDS: pos}
        if self.has_logits_index:
            feeds[io_spec.LOGITS_INDEX] = np.ascontiguousarray(sel)
        if self.layout == "dynamic":
            cfg = self.config
            empty = (B, cfg.n_kv_heads, 0, cfg.head_dim)  # (B, n_kv, P=0, hd)
            self._caches = [be.alloc(empty, self.cache_dtype) for _ in self.cache_pairs]
            for (past, present), buf in zip(self.cache_pairs, self._caches):
                be.bind_input(past, buf)
                be.bind_output(present, None)
            self._mask = np.zeros((B, self.max_seq), dtype=np.int64)  # (B, S)
            self._mask[:, :T] = np.arange(T)[None, :] < lens[:, None]
            self._P = T
            feeds[io_spec.ATTENTION_MASK] = np.ascontiguousarray(self._mask[:, :T])
        be.run(feeds)
        if self.layout == "dynamic":
            self._swap_presents()
        self._lengths = lens
        out = be.to_host(out_buf)
        be.bind_output(io_spec.LOGITS, self._step_logits)
        if logits == "last" and not self.has_logits_index:
            out = out[np.arange(B), lens - 1][:, None, :]  # (B, 1, V)
        return out

    def _swap_presents(self) -> None:
        be = self.backend
        presents = [be.output(present) for _, present in self.cache_pairs]
        self._caches = presents  # the pasts of the next run
        for (past, present), buf in zip(self.cache_pairs, presents):
            be.bind_input(past, buf)
            be.bind_output(present, None)  # a fresh, longer output next run

    # ------------------------------------------------------------------ decode
    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Append one token per row at that row's own position. Returns logits (B, V) float32."""
        if self._B is None or len(self._lengths) != self._B:
            raise KvtraceError("step() before start(): begin a batch with start(prompts)")
        B = self._B
        tok = self._id_row(np.asarray(tokens).reshape(-1) if np.ndim(tokens) else [tokens], "step tokens")
        if tok.shape[0] != B:
            raise KvtraceError(f"step() got {tok.shape[0]} tokens for a batch of {B}")
        self._check_ids(tok, "step token")
        pos = self._lengths
        if int(pos.max()) >= self.max_seq:
            raise KvtraceError(f"sequence of {int(pos.max()) + 1} tokens is longer than the cache "
                               f"({self.max_seq} positions)")
        feeds = {io_spec.INPUT_IDS: tok.reshape(B, 1), io_spec.POSITION_IDS: pos.reshape(B, 1)}
        if self.has_logits_index:
            feeds[io_spec.LOGITS_INDEX] = self._step_index  # (B, 1) zeros: the one new token
        if self.layout == "dynamic":
            if self._P >= self._mask.shape[1]:
                raise KvtraceError(f"padded sequence of {self._P + 1} slots is longer than the cache "
                                   f"({self._mask.shape[1]} positions)")
            self._mask[:, self._P] = 1
            self._P += 1
            feeds[io_spec.ATTENTION_MASK] = np.ascontiguousarray(self._mask[:, : self._P])
        be = self.backend
        run_graph = getattr(be, "run_graph", None)
        if run_graph is not None and self.layout == "static":
            # every bound buffer (caches, logits) is fixed per batch size and the feeds are (B, 1):
            # the backend may capture this step once and replay it (CUDA graphs)
            run_graph(("decode", B), feeds)
        else:
            be.run(feeds)
        if self.layout == "dynamic":
            self._swap_presents()
        self._lengths = self._lengths + 1
        return np.array(be.to_host(self._step_logits)[:, 0, :])  # (B, V) copy: the buffer is reused

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, **kwargs):
        from .generate import generate

        return generate(self, prompts, **kwargs)

    def encode(self, text: str) -> list[int]:
        """A text prompt's ids, with the tokenizer's own template (Llama's BOS; nothing for GPT-NeoX)."""
        if self.tokenizer is None:
            raise KvtraceError(f"artifact {self.artifact_dir} has no tokenizer: give token ids instead of text")
        if not isinstance(text, str):
            raise KvtraceError(f"prompt: expected text, got {type(text).__name__}")
        bad = utf8_problem(text)
        if bad:
            raise KvtraceError(f"prompt {text[:20]!r}: {bad}")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def close(self) -> None:
        self.backend.release()
        self._caches = []
        self._B = None

    def cache_buffers(self) -> list:
        """The cache buffers bound as the graph's pasts (for tests and tools): [(past name, buffer)].
        Static: the persistent buffers; dynamic: the presents of the last run."""
        return list(zip([p for p, _ in self.cache_pairs], self._caches))

    def __repr__(self) -> str:
        return (f"Model({str(self.artifact_dir)!r}, arch={self.config.arch}, backend={self.backend_name}, "
                f"layout={self.layout}, dtype={self.cache_dtype})")
