"""The artifact manifest (kvtrace.json): what the runtime needs to know, so it never guesses.

No torch here: the runtime reads manifests on machines without it.

Schema (format_version 1):
  {"format_version": 1, "kvtrace_version", "architecture", "config": ModelConfig.to_dict(),
   "dtype": "float32|float16|bfloat16", "opset", "onnx": "model.onnx",
   "external_data": null | "model.onnx.data", "io": io_spec.build(...),
   "tokenizer": {"type": "file", "file": "tokenizer.json"} | {"type": "builtin-bytes"} | null,
   "generation": {"bos_token_id", "eos_token_id", "pad_token_id"},
   "source": {"kind": "builtin"|"checkpoint", "path", "sha256", "seed"},
   "graph": {"attention": "fused"|"unfused", "rotary": "fused"|"unfused"|null,
             "cache_update": "TensorScatter"|"concat", "attend": "used"|"full"|"all"},
   "graphs": {"gpu": {"onnx": "model.gpu.onnx", "attend": "full", "softmax_precision": "dropped"|"absent",
                      ...the "graph" fields}} (optional: other forms of the graph beside model.onnx,
             sharing its weights; written by `kvtrace export --target gpu`, docs/gpu.md),
   "quant": {"scheme": "int8"|"int4", "bits", "group_size", "method": "rtn"|"search", "symmetric",
             "accuracy_level" (onnxruntime's MatMulNBits compute type, set by the runtime), "embedding",
             "head", "kv_cache", "ragged": {matrix: K}, "tensorrt", ...} (optional: weight-only
             quantisation, `kvtrace export --quant`; docs/quantization.md),
   "validation": {...} (what the exporter checked), "tensorrt": {...} (added by `kvtrace build`),
   "files": {name: {"bytes", "sha256"}} for every file of the artifact (format_version 1 artifacts
            written before this entry existed lack it)}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrace import io_spec
from kvtrace.errors import KvtraceError
from kvtrace.config import ModelConfig
from kvtrace.files import atomic_write_text, sha256_file

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
    """Read and check `artifact_dir/kvtrace.json`; KvtraceError naming the file otherwise."""
    d = Path(artifact_dir)
    path = manifest_path(d)
    if not d.is_dir():
        raise KvtraceError(f"{d}: not an artifact directory (expected a directory with {io_spec.MANIFEST_NAME}; "
                           "make one with `kvtrace export`)")
    if not path.is_file():
        raise KvtraceError(f"{path}: manifest not found; is {d} an artifact made by `kvtrace export`?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvtraceError(f"{path}: cannot read the manifest: {e}") from e
    if not isinstance(data, dict):
        raise KvtraceError(f"{path}: the manifest must be a JSON object")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise KvtraceError(f"{path}: 'format_version' missing or not an integer")
    if version > io_spec.FORMAT_VERSION:
        raise KvtraceError(f"{path}: manifest format_version {version} is newer than this kvtrace understands "
                           f"({io_spec.FORMAT_VERSION}); upgrade kvtrace (pip install -U kvtrace)")
    if version < 1:
        raise KvtraceError(f"{path}: invalid format_version {version}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise KvtraceError(f"{path}: manifest lacks field(s) {', '.join(missing)}")
    m = Manifest(d, data)
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
    return m


def write_manifest(artifact_dir, data: dict) -> Path:
    """Write kvtrace.json atomically (temporary file in the same directory, then rename)."""
    data = {"format_version": io_spec.FORMAT_VERSION, **data}
    return atomic_write_text(manifest_path(artifact_dir), json.dumps(data, indent=2, sort_keys=False) + "\n")


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
