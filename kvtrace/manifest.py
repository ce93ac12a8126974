"""The artifact manifest (kvtrace.json): what the runtime needs to know, so it never guesses.

No torch here: the runtime reads manifests on machines without it.

Schema (format_version 1):
  {"format_version": 1, "kvtrace_version", "architecture", "config": ModelConfig.to_dict(),
   "dtype": "float32|float16|bfloat16", "opset", "onnx": "model.onnx",
   "external_data": null | "model.onnx.data", "io": io_spec.build(...),
   "tokenizer": {"type": "file", "file": "tokenizer.json"[, "config": "tokenizer_config.json"]
                 [, "chat_template": "chat_template.jinja"]} | {"type": "builtin-bytes"} | null,
                 (config / chat_template: the checkpoint's chat template, carried for `kvtrace serve`)
   "generation": {"bos_token_id", "eos_token_id", "pad_token_id"},
   "source": {"kind": "builtin"|"checkpoint", "path", "sha256", "seed"},
   "via": "build"|"trace" (graph built from the config, or traced from the reference model;
          absent in artifacts exported before --via existed),
   "graph": {"attention": "fused"|"unfused", "rotary": "fused"|"unfused"|null,
             "cache_update": "TensorScatter"|"concat", "attend": "used"|"full"|"all"},
   "graphs": {"gpu": {"onnx": "model.gpu.onnx", "attend": "full"|"all", "attention_precision": "native",
                      "for": ["tensorrt", "onnxruntime-cuda"], ...the "graph" fields}} (other forms of the
             graph beside model.onnx, sharing its weights; every export since the GPU form writes
             graphs.gpu, the graph TensorRT builds from: docs/gpu.md, docs/tensorrt.md),
   "validation": {...} (what the exporter checked),
   "tensorrt": {"flavour", "version", "engine", "engine_sha256", "onnx", "profiles", "limits", ...}
             (added by `kvtrace build`; an engine built elsewhere and recorded by `kvtrace build
             --import` also has "imported": {"from", "checked", "not_checked", "profiles"}),
   "quant": {"scheme": "int8"|"int4", "bits", "group_size", "method": "rtn"|"search", "symmetric",
             "accuracy_level" (onnxruntime's MatMulNBits compute type, set by the runtime), "embedding",
             "head", "kv_cache", "ragged": {matrix: K}, "tensorrt", ...} (optional: weight-only
             quantisation, `kvtrace export --quant`; docs/quantization.md),
   "files": {name: {"bytes", "sha256"}} for every file of the artifact (format_version 1 artifacts
            written before this entry existed lack it)}
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrace import io_spec
from kvtrace.errors import KvtraceError
from kvtrace.config import ModelConfig
from kvtrace.files import atomic_write_bytes, sha256_file

REQUIRED = ("format_version", "architecture", "config", "dtype", "onnx", "io")


@dataclass
class Manifest:
    dir: Path
    data: dict[str, Any]

    # convenient views of the fields the runtime uses most
    @property
    def format_version(self) -> int:
        return int(self.data["format_version"])

    @property
    def architecture(self) -> str:
        return self.data["architecture"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def io(self) -> dict:
        return self.data["io"]

    @property
    def layout(self) -> str:
        return self.data["io"]["layout"]

    @property
    def max_seq(self) -> int:
        return int(self.data["io"]["max_seq"])

    @property
    def max_batch(self) -> int:
        return int(self.data["io"]["max_batch"])

    @property
    def onnx_path(self) -> Path:
        return self.dir / self.data["onnx"]

    @property
    def tokenizer(self) -> dict | None:
        return self.data.get("tokenizer")

    @property
    def generation(self) -> dict:
        return self.data.get("generation") or {}

    def graph_form(self, form: str) -> dict | None:
        """The manifest's entry for another form of the graph ("gpu"), or None."""
        return (self.data.get("graphs") or {}).get(form)

    def config(self):
        """The ModelConfig (models.config is pure Python, no torch)."""
        return ModelConfig.from_dict(self.data["config"])

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)


def manifest_path(artifact_dir) -> Path:
    return Path(artifact_dir) / io_spec.MANIFEST_NAME


def load_manifest(artifact_dir) -> Manifest:
    """Read and check `artifact_dir/kvtrace.json` against the schema (check_manifest); a
    KvtraceError names the file and the manifest key otherwise. File digests are checked
    separately (verify_files), by the commands that read the files."""
    d = Path(artifact_dir)
    path = manifest_path(d)
    if not d.is_dir():
        raise KvtraceError(f"{d}: not an artifact directory (expected a directory with {io_spec.MANIFEST_NAME}; "
                           "make one with `kvtrace export`)")
    if not path.is_file():
        raise KvtraceError(f"{path}: manifest not found; is {d} an artifact made by `kvtrace export`?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise KvtraceError(f"{path}: cannot read the manifest: {e}") from e
    if not isinstance(data, dict):
        raise KvtraceError(f"{path}: the manifest must be a JSON object")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise KvtraceError(f"{path}: manifest key 'format_version' missing or not an integer")
    if version > io_spec.FORMAT_VERSION:
        raise KvtraceError(f"{path}: manifest format_version {version} is newer than this kvtrace understands "
                           f"({io_spec.FORMAT_VERSION}); upgrade kvtrace (pip install -U kvtrace)")
    if version < 1:
        raise KvtraceError(f"{path}: invalid format_version {version}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise KvtraceError(f"{path}: manifest lacks key(s) {', '.join(repr(k) for k in missing)}")
    m = Manifest(d, data)
    for key in ("onnx", "external_data"):
        name = data.get(key)
        if key == "onnx" or name is not None:
            _file_name(path, key, name)
    if not m.onnx_path.is_file():
        raise KvtraceError(f"{m.onnx_path}: model file named in {path} is missing")
    ext = data.get("external_data")
    if ext and not (d / ext).is_file():
        raise KvtraceError(f"{d / ext}: external weight file named in {path} is missing")
    graphs = data.get("graphs") or {}
    if not isinstance(graphs, dict):
        raise KvtraceError(f"{path}: 'graphs' must be an object of graph forms")
    for form, entry in graphs.items():
        name = entry.get("onnx") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise KvtraceError(f"{path}: graphs.{form}.onnx must name a file in the artifact directory")
        if not (d / name).is_file():
            raise KvtraceError(f"{d / name}: model file of graph form {form!r} named in {path} is missing")
    check_manifest(data, path)
    return m


# ------------------------------------------------------------------ the schema
TENSOR_DTYPES = ("int64", "int32", "bool") + io_spec.DTYPES
LOGITS_MODES = ("selected", "all_positions")
HASH_LIMIT = 256 << 20  # files up to this size get their sha256 checked at every load (see verify_files)
_HEX = re.compile(r"[0-9a-f]{64}")


def _bad(path, key: str, msg: str):
    raise KvtraceError(f"{path}: manifest key '{key}': {msg}")


def _got(v) -> str:
    return "null" if v is None else f"{_tname(v)} {v!r}"


def _tname(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _obj(path, key: str, v, *, null: bool = False) -> dict | None:
    if v is None and null:
        return None
    if not isinstance(v, dict):
        _bad(path, key, f"expected an object{' or null' if null else ''}, got {_tname(v)}")
    return v


def _int(path, key: str, v, lo: int | None = None, hi: int | None = None, *, null: bool = False) -> int | None:
    if v is None and null:
        return None
    if not _is_int(v):
        _bad(path, key, f"expected an integer{' or null' if null else ''}, got {_got(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        _bad(path, key, f"{v} is out of range (expected {rng})")
    return v


def _str(path, key: str, v, choices=None, *, null: bool = False) -> str | None:
    if v is None and null:
        return None
    if not isinstance(v, str):
        _bad(path, key, f"expected a string{' or null' if null else ''}, got {_got(v)}")
    if choices is not None and v not in choices:
        _bad(path, key, f"{v!r} is not one of {', '.join(choices)}")
    return v


def _file_name(path, key: str, v) -> str:
    """A plain file name inside the artifact directory (no directories, no '..')."""
    _str(path, key, v)
    if not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
        _bad(path, key, f"{v!r} is not a plain file name inside the artifact directory")
    return v


def _tensors(path, key: str, v) -> dict[str, dict]:
    if not isinstance(v, list) or not v:
        _bad(path, key, f"expected a non-empty list of tensors, got {_tname(v)}")
    out = {}
    for i, t in enumerate(v):
        k = f"{key}[{i}]"
        _obj(path, k, t)
        for f in ("name", "dtype", "shape"):
            if f not in t:
                _bad(path, k, f"lacks '{f}'")
        _str(path, f"{k}.name", t["name"])
        _str(path, f"{k}.dtype", t["dtype"], TENSOR_DTYPES)
        if not isinstance(t["shape"], list):
            _bad(path, f"{k}.shape", f"expected a list, got {_tname(t['shape'])}")
        for j, dim in enumerate(t["shape"]):
            if not (isinstance(dim, str) and dim) and not (_is_int(dim) and dim >= 1):
                _bad(path, f"{k}.shape[{j}]", f"expected a positive integer or a symbolic name, got {dim!r}")
        if t["name"] in out:
            _bad(path, k, f"tensor {t['name']!r} is listed twice")
        out[t["name"]] = t
    return out


def _token_id(path, key: str, v, vocab: int):
    if isinstance(v, list):  # several stop ids
        for i, x in enumerate(v):
            _int(path, f"{key}[{i}]", x, 0, vocab - 1)
        return
    _int(path, key, v, 0, vocab - 1, null=True)


def check_manifest(data: dict, path) -> None:
    """The manifest schema: every key the runtime, `kvtrace build`, parity and bench read, with
    its type and range, and the I/O spec against the model config. KvtraceError names the key
    (e.g. manifest key 'io.inputs[3].dtype')."""
    from kvtrace.config import ARCHITECTURES, ConfigError

    _str(path, "kvtrace_version", data.get("kvtrace_version"), null=True)
    arch = _str(path, "architecture", data["architecture"], ARCHITECTURES)
    _obj(path, "config", data["config"])
    try:
        cfg = ModelConfig.from_dict(data["config"])
    except ConfigError as e:
        key = f"config.{e.field}" if getattr(e, "field", None) else "config"
        raise KvtraceError(f"{path}: manifest key '{key}': {e.reason if getattr(e, 'reason', None) else e}") from None
    if cfg.arch != arch:
        _bad(path, "config.arch", f"{cfg.arch!r} disagrees with 'architecture' {arch!r}")
    dtype = _str(path, "dtype", data["dtype"], io_spec.DTYPES)
    _int(path, "opset", data.get("opset"), 1, null=True)

    io = _obj(path, "io", data["io"])
    for k in ("layout", "max_seq", "max_batch", "inputs", "outputs"):
        if k not in io:
            _bad(path, "io", f"lacks '{k}'")
    layout = _str(path, "io.layout", io["layout"], io_spec.LAYOUTS)
    max_seq = _int(path, "io.max_seq", io["max_seq"], 1)
    _int(path, "io.max_batch", io["max_batch"], 1)
    _str(path, "io.logits", io.get("logits", "all_positions"), LOGITS_MODES)
    ins = _tensors(path, "io.inputs", io["inputs"])
    outs = _tensors(path, "io.outputs", io["outputs"])
    need_in = [io_spec.INPUT_IDS, io_spec.POSITION_IDS] + ([io_spec.ATTENTION_MASK] if layout == "dynamic" else [])
    for n in need_in:
        if n not in ins:
            _bad(path, "io.inputs", f"lacks the input {n!r}")
        _str(path, f"io.inputs[{n}].dtype", ins[n]["dtype"], ("int64",))
    if io_spec.LOGITS not in outs:
        _bad(path, "io.outputs", f"lacks the output {io_spec.LOGITS!r}")
    lshape = outs[io_spec.LOGITS]["shape"]
    if len(lshape) != 3 or lshape[-1] != cfg.vocab_size:
        _bad(path, "io.outputs[logits].shape", f"{lshape} is not (batch, positions, vocab_size={cfg.vocab_size})")
    for past, present in io_spec.cache_pairs(cfg.n_layers):
        for name, table, key in ((past, ins, "io.inputs"), (present, outs, "io.outputs")):
            if name not in table:
                _bad(path, key, f"lacks the cache tensor {name!r} (config.n_layers = {cfg.n_layers})")
            t = table[name]
            if t["dtype"] != dtype:  # the cache dtype is the artifact's dtype
                _bad(path, f"{key}[{name}].dtype", f"{t['dtype']!r} differs from the manifest's dtype {dtype!r}")
            shape = t["shape"]
            if len(shape) != 4 or shape[1] != cfg.n_kv_heads or shape[3] != cfg.head_dim:
                _bad(path, f"{key}[{name}].shape", f"{shape} is not (batch, n_kv_heads={cfg.n_kv_heads}, "
                     f"seq, head_dim={cfg.head_dim})")
            if layout == "static" and shape[2] != max_seq:
                _bad(path, f"{key}[{name}].shape", f"{shape}: a static cache holds io.max_seq = {max_seq} slots")
    aliases = io.get("cache_aliases", {})
    _obj(path, "io.cache_aliases", aliases)
    for k, v in aliases.items():
        _str(path, f"io.cache_aliases[{k}]", v)

    tok = data.get("tokenizer")
    if tok is not None:
        _obj(path, "tokenizer", tok)
        kind = _str(path, "tokenizer.type", tok.get("type"), ("file", "builtin-bytes"))
        if kind == "file":
            _file_name(path, "tokenizer.file", tok.get("file"))
    gen = _obj(path, "generation", data.get("generation"), null=True) or {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        _token_id(path, f"generation.{k}", gen.get(k), cfg.vocab_size)
    src = _obj(path, "source", data.get("source"), null=True) or {}
    for k in ("kind", "path", "sha256"):
        _str(path, f"source.{k}", src.get(k), null=True)
    _int(path, "source.seed", src.get("seed"), 0, 2**64 - 1, null=True)
    for k in ("graph", "validation"):
        _obj(path, k, data.get(k), null=True)

    trt = _obj(path, "tensorrt", data.get("tensorrt"), null=True)
    if trt is not None:
        _file_name(path, "tensorrt.engine", trt.get("engine"))
        for k in ("flavour", "version", "engine_sha256", "onnx_sha256", "built_on_cc"):
            _str(path, f"tensorrt.{k}", trt.get(k), null=True)
        ccs = trt.get("compute_capabilities", [])
        if not isinstance(ccs, list) or not all(isinstance(c, str) for c in ccs):
            _bad(path, "tensorrt.compute_capabilities", f"expected a list of strings, got {ccs!r}")
        lim = _obj(path, "tensorrt.limits", trt.get("limits"), null=True) or {}
        for k in ("max_batch", "max_seq"):
            _int(path, f"tensorrt.limits.{k}", lim.get(k), 1, null=True)
        profiles = trt.get("profiles", [])
        if not isinstance(profiles, list):
            _bad(path, "tensorrt.profiles", f"expected a list, got {_tname(profiles)}")
        for i, prof in enumerate(profiles):
            _obj(path, f"tensorrt.profiles[{i}]", prof)
            _obj(path, f"tensorrt.profiles[{i}].inputs", prof.get("inputs"))

    files = _obj(path, "files", data.get("files"), null=True)
    for name, entry in (files or {}).items():
        _file_name(path, f"files[{name!r}]", name)
        _obj(path, f"files.{name}", entry)
        _int(path, f"files.{name}.bytes", entry.get("bytes"), 0)
        h = _str(path, f"files.{name}.sha256", entry.get("sha256"))
        if not _HEX.fullmatch(h):
            _bad(path, f"files.{name}.sha256", f"{h!r} is not a sha256 hex digest")


def verify_files(manifest: Manifest, *, full: bool = False, limit: int | None = None) -> dict:
    """Check the artifact's files against the manifest's "files" entry: every listed file must
    exist with its recorded size (a truncated or grown file is caught for free), and its sha256
    must match for files up to `limit` bytes (default HASH_LIMIT), or for all with full=True.

    Cost: sha256 runs at ~1.1 GB/s on one core here (benchmarks/integrity_cost.py), so the
    default costs <= 0.25 s per file; a 13 GB artifact's model.onnx.data takes ~12 s from the page
    cache (longer from disk), which is why only --verify (and `kvtrace parity`) hash it.
    Artifacts written before "files" existed are not checked. Returns {name: "sha256"|"size"}."""
    files = manifest.data.get("files")
    if not files:
        return {}
    limit = HASH_LIMIT if limit is None else limit
    done = {}
    trt = manifest.data.get("tensorrt")
    engine = trt.get("engine") if isinstance(trt, dict) else None
    for name, entry in files.items():
        p = manifest.dir / name
        key = f"files.{name}"
        # the engine is `kvtrace build`'s: rebuilding it (or importing it again) is the remedy
        again = ("build the engine again (`kvtrace build`, or `kvtrace build --import`)" if name == engine
                 else "export the artifact again")
        if not p.is_file():
            raise KvtraceError(f"{p}: missing (the manifest {manifest_path(manifest.dir)} lists it under '{key}'); "
                               f"the artifact is incomplete: {again}")
        size = p.stat().st_size
        if size != entry["bytes"]:
            how = "truncated" if size < entry["bytes"] else "longer than written"
            raise KvtraceError(f"{p}: {size} bytes, but manifest key '{key}.bytes' records {entry['bytes']}: the file "
                               f"is {how} or was replaced after it was written; {again}")
        if full or size <= limit:
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise KvtraceError(f"{p}: sha256 {digest[:16]}... differs from manifest key '{key}.sha256' "
                                   f"({entry['sha256'][:16]}...): the file is corrupted or was changed after it was "
                                   f"written; {again}")
            done[name] = "sha256"
        else:
            done[name] = "size"
    return done


def manifest_bytes(data: dict) -> bytes:
    """kvtrace.json's bytes for `data` (format_version first)."""
    data = {"format_version": io_spec.FORMAT_VERSION, **data}
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")


def write_manifest(artifact_dir, data: dict) -> Path:
    """Write kvtrace.json atomically (temporary file in the same directory, then rename)."""
    return atomic_write_bytes(manifest_path(artifact_dir), manifest_bytes(data))


def file_digests(artifact_dir, names) -> dict:
    """{"model.onnx": {"bytes": N, "sha256": hex}, ...}: the manifest's "files" entry, which
    lets a loader notice a truncated or corrupted artifact file."""
    d = Path(artifact_dir)
    return {n: {"bytes": (d / n).stat().st_size, "sha256": sha256_file(d / n)} for n in names}


def not_an_artifact(d: Path) -> str | None:
    """None when `d` is an artifact directory kvtrace wrote (a kvtrace.json manifest, and nothing
    in the directory that the manifest does not name); otherwise why not, for the message that
    refuses to replace it (`--force` only ever replaces kvtrace's own directories)."""
    d = Path(d)
    path = manifest_path(d)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        entries = sorted(p.name for p in d.iterdir())[:3]
        return f"it has no {io_spec.MANIFEST_NAME}" + (f" (it holds {', '.join(entries)}...)" if entries else "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {io_spec.MANIFEST_NAME} is not a kvtrace manifest"
    if not isinstance(data, dict) or "format_version" not in data or "kvtrace_version" not in data:
        return f"its {io_spec.MANIFEST_NAME} is not a kvtrace manifest"
    named = set(_strings(data)) | {io_spec.MANIFEST_NAME}
    foreign = sorted(p.name for p in d.iterdir() if p.name not in named)
    if foreign:
        return f"it holds files kvtrace did not write ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''})"
    return None


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)
