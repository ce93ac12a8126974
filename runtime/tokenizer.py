"""Text <-> token ids for the runtime. No torch.

Two kinds, one interface (`encode(text) -> list[int]`, `decode(ids) -> str`):
  - a `tokenizers` JSON file shipped in the artifact (`{"type": "file", "file": "tokenizer.json"}`);
  - the built-in byte-level tokenizer of the built-in small configurations
    (`{"type": "builtin-bytes"}`): id 0 "<|endoftext|>" (bos/eos), id 1 "<|padding|>",
    ids 2..257 = the bytes 0..255. Any UTF-8 text round-trips; a multi-byte character may be
    split across tokens, so bytes are joined first and decoded (errors="replace") only at the end.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

from kvtrace.errors import KvtraceError

BYTE_OFFSET = 2  # id of byte 0 in the built-in tokenizer
BUILTIN_SPECIALS = {0: "<|endoftext|>", 1: "<|padding|>"}


class Tokenizer(ABC):
    """Common interface. `special_ids` are skipped by `decode(..., skip_special=True)`."""

    kind = "abstract"
    special_ids: frozenset = frozenset()

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """add_special_tokens: apply the tokenizer's own template (e.g. Llama's BOS), as
        transformers' tokenizer(text) does; off by default (the raw text's tokens)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Token ids -> text (special tokens dropped unless skip_special=False)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce."""

    # ------------------------------------------------------------ constructors
    @staticmethod
    def builtin_bytes() -> "ByteTokenizer":
        return ByteTokenizer()

    @staticmethod
    def from_file(path: str | Path) -> "HFTokenizer":
        return HFTokenizer(path)

    @staticmethod
    def from_manifest(artifact_dir: str | Path, spec: dict | None) -> "Tokenizer | None":
        """The tokenizer an artifact's manifest names (`manifest["tokenizer"]`), or None."""
        if spec is None:
            return None
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "builtin-bytes":
            return ByteTokenizer()
        if kind == "file":
            path = Path(artifact_dir) / spec.get("file", "tokenizer.json")
            return HFTokenizer(path)
        raise KvtraceError(f"manifest field 'tokenizer': unknown tokenizer spec {spec!r}; "
                           "expected {\"type\": \"file\", \"file\": ...}, {\"type\": \"builtin-bytes\"} or null")


class ByteTokenizer(Tokenizer):
    kind = "builtin-bytes"
    special_ids = frozenset(BUILTIN_SPECIALS)

    @property
    def vocab_size(self) -> int:
        return BYTE_OFFSET + 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]  # no template: nothing to add

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                out.append(i - BYTE_OFFSET)
            elif i in BUILTIN_SPECIALS:
                if not skip_special:
                    out += BUILTIN_SPECIALS[i].encode()
            # ids beyond 257 (the built-in vocabulary is padded to 320) carry no text
        return out.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A `tokenizers` JSON file (byte-level BPE, SentencePiece-style, ...)."""

    kind = "file"

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise KvtraceError(f"tokenizer file {path} not found")
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - a runtime dependency
            raise KvtraceError("the 'tokenizers' package is needed to read "
                               f"{path} (pip install tokenizers)") from e
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise KvtraceError(f"tokenizer file {path}: cannot be read by tokenizers: {e}") from e
        self.path = path
        self.special_ids = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def check_tokenizer_file(path: str | Path, vocab_size: int) -> int:
    """A tokenizer.json about to be copied into an artifact: it must load, and every id it can
    produce (its vocabulary and added tokens) must be below the model's vocab_size, or the
    artifact could never run its own prompts. KvtraceError names the file and the first token
    beyond the vocabulary. Returns the largest id."""
    tok = HFTokenizer(path)
    vocab = tok._tok.get_vocab(with_added_tokens=True)  # token -> id
    if not vocab:
        raise KvtraceError(f"tokenizer file {path}: it has no tokens")
    name, top = max(vocab.items(), key=lambda kv: kv[1])
    if top >= vocab_size:
        beyond = sum(1 for i in vocab.values() if i >= vocab_size)
        raise KvtraceError(f"tokenizer file {path}: token {name!r} has id {top}, beyond the model's vocabulary of "
                           f"{vocab_size} (config.json vocab_size; {beyond} token(s) out of range): this tokenizer "
                           "belongs to another model. Put the model's own tokenizer.json beside it, or export "
                           "with --no-tokenizer")
    # ids the pipeline adds itself (a post-processor's BOS/EOS are not in the vocabulary)
    probe = tok._tok.encode("Hello", add_special_tokens=True).ids
    if probe and max(probe) >= vocab_size:
        raise KvtraceError(f"tokenizer file {path}: encoding a prompt adds token id {max(probe)} (its "
                           f"post-processor's special tokens), beyond the model's vocabulary of {vocab_size} "
                           "(config.json vocab_size): every text prompt would be refused. Fix the tokenizer's "
                           "post_processor, or export with --no-tokenizer")
    return max(top, max(probe, default=0))
