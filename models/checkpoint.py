"""Strict reading of Hugging Face checkpoints: the plan (config, files, headers, checks) and the
loader into the reference Transformer.

    open_checkpoint(dir, allow_pickle=False) -> Checkpoint(root, hf_config, adapter, config, kind,
                                                           files, entries, table, tied_head, ...)
        config.json, the weight files and their headers, every check below; no tensor is read.
        Shared by the two readers: load_checkpoint (torch) and models/stream.py (the streamed
        export, numpy views of memory-mapped shards).
    load_checkpoint(dir, dtype=None, allow_pickle=False) -> Loaded(model, config, hf_config,
                                                                   digest, tokenizer_file, files)

A checkpoint directory holds config.json and either model.safetensors, or shards listed by
model.safetensors.index.json, or (refused unless allow_pickle) pytorch_model.bin[.index.json].

Strict: every tensor the model needs must be present with the right shape, every tensor in the
files must be used (or be a known buffer such as rotary inv_freq), and a tied checkpoint that
still stores its head must store the embedding there. Errors name the HF tensor, the canonical
parameter and the file.

Memory: the model is built on the meta device, and each tensor is read straight from the file
into its final buffer (`readinto`, no mmap), converted to the target dtype one tensor at a time.
Peak RSS is the model itself plus a 16 MiB staging buffer for dtype conversions and, for
GPT-NeoX, one fused qkv tensor while it is split: never a second copy of the checkpoint.
The files are read front to back once, and the sha256 digest is computed in the same pass.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrace.errors import KvtraceError
from kvtrace.files import sha256_file

from kvtrace.config import ConfigError, ModelConfig
from .hf import Adapter, adapter_for, hf_shape, is_ignored, split_tensor, weight_table

# torch is imported by the functions that need it: the plan (open_checkpoint) and the streamed
# export's writing pass do not

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype code -> (dtype name, bytes per element); names are torch's and numpy's
_ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8)}
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
_LOADABLE = ("float32", "float16", "bfloat16")  # a model's dtype; float64 tensors are read and converted
ITEMSIZE = {name: size for name, size in _ST_DTYPES.values()}
_CHUNK = 1 << 30  # Linux read() returns at most ~2 GiB per call: read big tensors in pieces
_STAGE_BYTES = 16 << 20  # staging buffer for dtype conversion


@dataclass
class Loaded:
    model: Any  # a kvtrace.models.transformer.Transformer, eval mode, parameters in `dtype` (or the checkpoint's)
    config: ModelConfig
    hf_config: dict
    digest: str  # sha256 hex of the weight files' bytes, concatenated in `files` order
    tokenizer_file: Path | None  # tokenizer.json beside the weights, when present
    files: list[Path]  # the weight files read


@dataclass
class Entry:
    """One tensor in one weight file."""
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str | None  # "float32" | "float16" | "bfloat16" | "float64"; None: one we cannot load
    dtype_name: str  # as the file names it (F16, I8, torch.int8, ...)
    start: int = 0  # absolute byte offsets in the file (safetensors)
    end: int = 0
    tensor: Any = None  # pickle checkpoints: the tensor itself


# --------------------------------------------------------------------------- small helpers
def _canonical_dtype(dtype) -> str | None:
    """None, or a dtype name / alias / torch dtype -> "float32" | "float16" | "bfloat16"."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise KvtraceError(f"dtype {dtype!r}: expected one of float32, float16, bfloat16 (or fp32, fp16, bf16)")
    return _DTYPES[name]


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise KvtraceError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KvtraceError(f"{path}: {what} is not valid JSON ({e})") from None


def _byte_view(t) -> memoryview:
    """Writable bytes of a contiguous CPU torch tensor (any dtype, bf16 included)."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _readinto(f, buf: memoryview, path: Path, what: str) -> None:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:done + _CHUNK])
        if not n:
            raise KvtraceError(f"{path}: file is truncated (ended while reading {what})")
        done += n


# --------------------------------------------------------------------------- safetensors headers
def _safetensors_header(path: Path) -> tuple[int, dict[str, Entry]]:
    """(header length incl. the 8-byte size, entries) with every offset checked against the file size."""
    if not path.is_file():
        raise KvtraceError(f"{path}: weight file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise KvtraceError(f"{path}: not a safetensors file (truncated: {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or 8 + n > size:
            raise KvtraceError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, "
                               f"file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        assert isinstance(header, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise KvtraceError(f"{path}: corrupt safetensors file (header is not a JSON object)") from None
    base = 8 + n
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise KvtraceError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        dtype, itemsize = _ST_DTYPES.get(dtype_name, (None, None))
        if not 0 <= b <= e or (itemsize is not None and e - b != math.prod(shape) * itemsize):
            raise KvtraceError(f"{path}: corrupt safetensors header: tensor '{name}' of shape {list(shape)} "
                               f"{dtype_name} has data offsets [{b}, {e}]")
        if base + e > size:
            raise KvtraceError(f"{path}: file is truncated: tensor '{name}' needs bytes up to {base + e}, "
                               f"the file has {size}")
        entries[name] = Entry(name, path, shape, dtype, dtype_name, base + b, base + e)
    end = base
    for ent in sorted(entries.values(), key=lambda x: (x.start, x.end)):
        if ent.start < end:
            raise KvtraceError(f"{path}: corrupt safetensors file: tensor '{ent.name}' overlaps another")
        end = ent.end
    return base, entries


# --------------------------------------------------------------------------- finding the weights
def _weight_files(root: Path, allow_pickle: bool) -> tuple[str, list[Path], dict[str, str] | None]:
    """('safetensors' | 'pickle', files sorted by name, index weight_map or None)."""
    def from_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
        index = _read_json(index_path, "weight index")
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise KvtraceError(f"{index_path}: no 'weight_map' object in the weight index")
        names = sorted(set(wmap.values()))
        for n in names:
            if not isinstance(n, str) or Path(n).name != n:
                raise KvtraceError(f"{index_path}: shard name {n!r} is not a plain file name")
            if not (root / n).is_file():
                raise KvtraceError(f"{root / n}: shard listed in {index_path.name} is missing")
        return [root / n for n in names], wmap

    if (root / SAFETENSORS_INDEX).is_file():
        files, wmap = from_index(root / SAFETENSORS_INDEX)
        return "safetensors", files, wmap
    if (root / SAFETENSORS).is_file():
        return "safetensors", [root / SAFETENSORS], None
    pickled = root / PICKLE_INDEX if (root / PICKLE_INDEX).is_file() else root / PICKLE
    if pickled.is_file():
        if not allow_pickle:
            raise KvtraceError(
                f"{pickled}: refusing to load a pickle checkpoint: loading pickle can execute arbitrary code. "
                "Convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its source")
        if pickled.name == PICKLE_INDEX:
            files, wmap = from_index(pickled)
            return "pickle", files, wmap
        return "pickle", [pickled], None
    raise KvtraceError(f"{root}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX} for a sharded "
                       f"checkpoint, or {PICKLE} with --allow-pickle)")


def _pickle_entries(path: Path) -> dict[str, Entry]:
    import torch

    try:  # the safe unpickler first; the full one only for old files that need it (the user allowed it)
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise KvtraceError(f"{path}: cannot read the pickle checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise KvtraceError(f"{path}: expected a state dict, got {type(sd).__name__}")
    out = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise KvtraceError(f"{path}: entry '{name}' is not a tensor")
        dtype = str(t.dtype).removeprefix("torch.")
        out[name] = Entry(name, path, tuple(t.shape), dtype if dtype in ITEMSIZE else None, str(t.dtype), tensor=t)
    return out


def _collect(kind: str, files: list[Path], wmap: dict[str, str] | None) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for f in files:
        found = _safetensors_header(f)[1] if kind == "safetensors" else _pickle_entries(f)
        for name, e in found.items():
            if name in entries:
                raise KvtraceError(f"tensor '{name}' is stored twice: in {entries[name].file} and in {f}")
            entries[name] = e
    if wmap is not None:  # the index must describe the shards
        for name, shard in wmap.items():
            if name not in entries or entries[name].file.name != shard:
                where = f"it is in {entries[name].file}" if name in entries else "no shard holds it"
                raise KvtraceError(f"{files[0].parent / shard}: the weight index lists tensor '{name}' "
                                   f"in this shard, but {where}")
    return entries


# --------------------------------------------------------------------------- the plan
def _check(adapter: Adapter, cfg: ModelConfig, table: dict, entries: dict[str, Entry], root: Path) -> list:
    """Every needed tensor present with its shape; nothing unexpected. Returns the tied-head entry list."""
    for hf_name, canon in table.items():
        label = f"tensor '{hf_name}' (parameter {', '.join(canon)})"
        if hf_name not in entries:
            raise KvtraceError(f"{root}: missing {label}; the weight files have no such tensor")
        e = entries[hf_name]
        want = hf_shape(cfg, canon)
        if e.shape != want:
            raise KvtraceError(f"{e.file}: {label} has shape {list(e.shape)}, expected {list(want)} "
                               "from config.json")
        if e.dtype is None:
            raise KvtraceError(f"{e.file}: {label} has dtype {e.dtype_name}; only F32, F16, BF16 (and F64) "
                               "weights can be loaded")
    tied_head = []
    for name, e in entries.items():
        if name in table or is_ignored(adapter, name):
            continue
        if cfg.tie_word_embeddings and name == adapter.head_name:
            embed_shape = cfg.param_shapes()["embed.weight"]
            if e.shape != embed_shape or e.dtype is None:
                raise KvtraceError(f"{e.file}: tensor '{name}' (tied output head) has shape {list(e.shape)} "
                                   f"{e.dtype_name}, expected the embedding's {list(embed_shape)}")
            tied_head.append(e)
            continue
        raise KvtraceError(f"{e.file}: unexpected tensor '{name}' (shape {list(e.shape)}): no parameter of the "
                           f"{adapter.hf_arch} model described by config.json takes it")
    return tied_head


def _checkpoint_dtype(table: dict, entries: dict[str, Entry]) -> str:
    """The dtype holding most of the parameter elements (a few fp32 norms in an fp16 file do not count)."""
    count: dict[str, int] = {}
    for hf_name in table:
        e = entries[hf_name]
        count[e.dtype] = count.get(e.dtype, 0) + math.prod(e.shape)
    best = max(count, key=count.get)
    return best if best in _LOADABLE else "float32"


@dataclass
class Checkpoint:
    """A checked checkpoint directory: what is in it and where, nothing read yet."""
    root: Path
    hf_config: dict
    adapter: Adapter
    config: ModelConfig
    kind: str  # "safetensors" | "pickle"
    files: list[Path]  # the weight files, in digest order
    entries: dict[str, Entry]  # every tensor of every file
    table: dict[str, tuple[str, ...]]  # HF tensor name -> the canonical parameter(s) it fills
    tied_head: list[Entry]  # a stored head of a tied model (must equal the embedding)

    @property
    def dtype(self) -> str:
        """The checkpoint's own dtype (most parameter elements)."""
        return _checkpoint_dtype(self.table, self.entries)

    @property
    def tokenizer_file(self) -> Path | None:
        tok = self.root / "tokenizer.json"
        return tok if tok.is_file() else None

    @property
    def weight_bytes(self) -> int:
        return sum(e.end - e.start if self.kind == "safetensors" else math.prod(e.shape) * ITEMSIZE[e.dtype]
                   for e in self.entries.values() if e.name in self.table)


def open_checkpoint(path, *, allow_pickle: bool = False) -> Checkpoint:
    """config.json, the weight files, every header and every check; no tensor data is read."""
    root = Path(path)
    if not root.is_dir():
        raise KvtraceError(f"{root}: not a checkpoint directory (expected config.json + *.safetensors)")
    cfg_path = root / "config.json"
    hf_config = _read_json(cfg_path, "config.json")
    try:
        adapter = adapter_for(hf_config)
        cfg = adapter.make_config(hf_config)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    kind, files, wmap = _weight_files(root, allow_pickle)
    entries = _collect(kind, files, wmap)
    table = weight_table(adapter, cfg)
    tied_head = _check(adapter, cfg, table, entries, root)
    return Checkpoint(root, hf_config, adapter, cfg, kind, files, entries, table, tied_head)


def digest_files(files: list[Path], digest=None, stop=None) -> str:
    """sha256 hex of the weight files' bytes, concatenated in order (the checkpoint digest that
    manifests record). stop(): polled between pieces; a true value abandons the digest (None)."""
    h = digest if digest is not None else hashlib.sha256()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                if stop is not None and stop():
                    return None
    return h.hexdigest()


def tied_head_error(e: Entry, adapter: Adapter) -> KvtraceError:
    return KvtraceError(f"{e.file}: tensor '{e.name}' differs from the embedding "
                        f"'{adapter.global_names['embed']}.weight', but config.json says "
                        "tie_word_embeddings is true (set it to false if the head is separate)")


def _set_param(model, canon: str, t) -> None:
    from torch import nn

    module_path, leaf = canon.rsplit(".", 1)
    setattr(model.get_submodule(module_path), leaf, nn.Parameter(t, requires_grad=False))


# --------------------------------------------------------------------------- reading
def _read_entry(f, e: Entry, dtype: str):
    """Tensor `e` from open file `f` (positioned at e.start), as torch dtype `dtype`.

    Same dtype: read straight into the result. Otherwise through a small staging buffer, so a
    conversion never holds a whole second tensor (an fp32 embedding is the largest one).
    """
    import torch

    out = torch.empty(e.shape, dtype=getattr(torch, dtype))
    what = f"tensor '{e.name}'"
    if e.dtype == dtype:
        _readinto(f, _byte_view(out), e.file, what)
        return out
    flat = out.view(-1)  # (numel,)
    step = max(1, _STAGE_BYTES // ITEMSIZE[e.dtype])
    stage = torch.empty(min(step, flat.numel()), dtype=getattr(torch, e.dtype))
    for i in range(0, flat.numel(), step):
        part = stage[:min(step, flat.numel() - i)]
        _readinto(f, _byte_view(part), e.file, what)
        flat[i:i + part.numel()].copy_(part)  # converts
    return out


class _HashingReader:
    """Wraps a raw file so that every byte read also goes into the digest."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def readinto(self, buf):
        n = self.f.readinto(buf)
        if n:
            self.digest.update(buf[:n])
        return n


def _stream_file(path: Path, entries: list[Entry], digest, use) -> None:
    """Read one safetensors file front to back, every byte into `digest`.

    use(entry, f) is called with f positioned at each tensor's data; it reads the tensor or
    returns None, and then the bytes are read here (hashed, not kept).
    """
    base, _ = _safetensors_header(path)
    with open(path, "rb", buffering=0) as raw:
        f = _HashingReader(raw, digest)
        _readinto(f, memoryview(bytearray(base)), path, "the header")
        pos = base
        for e in sorted(entries, key=lambda e: e.start):  # no overlaps: _safetensors_header checked
            if e.start > pos:  # alignment padding
                _readinto(f, memoryview(bytearray(e.start - pos)), path, "padding")
            if use(e, f) is None:  # an ignored buffer or a tied head (compared later)
                _readinto(f, memoryview(bytearray(e.end - e.start)), path, f"tensor '{e.name}'")
            pos = e.end
        while f.readinto(memoryview(bytearray(1 << 20))):  # trailing bytes, if any, count too
            pass


# --------------------------------------------------------------------------- the loader
def load_checkpoint(path, *, dtype=None, allow_pickle: bool = False) -> Loaded:
    """Load a Hugging Face checkpoint directory strictly into a `Transformer` (eval mode)."""
    import torch

    from .transformer import Transformer, on_meta

    want_dtype = _canonical_dtype(dtype)
    ck = open_checkpoint(path, allow_pickle=allow_pickle)
    root, cfg, adapter, table, entries = ck.root, ck.config, ck.adapter, ck.table, ck.entries
    dtype = want_dtype or ck.dtype

    with on_meta():
        model = Transformer(cfg)  # no memory for parameters yet

    def take(e: Entry, t) -> bool:
        """Put HF tensor `e` (already in `dtype`) into the model, splitting fused tensors."""
        for canon, part in split_tensor(adapter, cfg, table[e.name], t):
            _set_param(model, canon, part.contiguous())
        return True

    digest = hashlib.sha256()
    if ck.kind == "safetensors":
        for path_ in ck.files:
            _stream_file(path_, [e for e in entries.values() if e.file == path_], digest,
                         lambda e, f: take(e, _read_entry(f, e, dtype)) if e.name in table else None)
        for e in ck.tied_head:  # re-read the stored head and compare it with the embedding
            with open(e.file, "rb", buffering=0) as f:
                f.seek(e.start)
                head = _read_entry(f, e, dtype)
            if not torch.equal(head, model.embed.weight):
                raise tied_head_error(e, adapter)
    else:
        for path_ in ck.files:
            sha256_file(path_, digest)
        for e in entries.values():
            if e.name in table:
                take(e, e.tensor.to(getattr(torch, dtype), copy=True))
        for e in ck.tied_head:
            if not torch.equal(e.tensor.to(getattr(torch, dtype)), model.embed.weight):
                raise tied_head_error(e, adapter)
        entries.clear()  # drop the mmapped pickle storage

    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:  # cannot happen when the table covers param_shapes(); guard against drift
        raise KvtraceError(f"{root}: internal error: parameters not filled: {left[:5]}")
    return Loaded(model=model.eval(), config=cfg, hf_config=ck.hf_config, digest=digest.hexdigest(),
                  tokenizer_file=ck.tokenizer_file, files=ck.files)
