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
   "graph": {"attention": "fused"|"unfused", "rotary": "fused"|"unfused"|null,
             "cache_update": "TensorScatter"|"concat"},
   "validation": {...} (what the exporter checked), "tensorrt": {...} (added by `kvtrace build`)}
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrace import io_spec
from kvtrace.errors import KvtraceError

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

    def config(self):
        """The ModelConfig (models.config is pure Python, no torch)."""
        from kvtrace.config import ModelConfig

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
    return m


def write_manifest(artifact_dir, data: dict) -> Path:
    """Write kvtrace.json atomically (temp file in the same directory, then rename)."""
    d = Path(artifact_dir)
    path = manifest_path(d)
    data = {"format_version": io_spec.FORMAT_VERSION, **data}
    fd, tmp = tempfile.mkstemp(prefix=".kvtrace-", suffix=".json.tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; a manifest is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
