"""References for parity: models whose fp32 logits an artifact is compared with.

Each has start(prompts) -> [(T_b, V) float32 per row] and step(tokens) -> (B, V) float32 (the
protocol of kvtrace.runtime.parity.record), runs one row at a time (no padding on the reference
side, so a batching or padding bug in the artifact shows as a difference), and a `description`
dict for reports.
  TorchReference  our PyTorch model (kvtrace.models.transformer), fp32, dynamic cache per row
  HFReference     transformers' AutoModelForCausalLM, fp32, eager attention
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from kvtrace.errors import KvtraceError


class TorchReference:
    """Our PyTorch model, fp32, one row at a time with a dynamic cache (no padding at all)."""

    def __init__(self, model, description: dict):
        self.model = model  # an fp16/bf16 model runs as an fp32 copy, made at start()
        self.description = description
        self._rows = []

    def close(self) -> None:
        """Drop the model (and its fp32 copy): the caller may free the weights now."""
        self.model, self._rows = None, []

    def start(self, prompts):
        import copy

        import torch
        from kvtrace.models.transformer import DynamicCache

        if self.model.dtype != torch.float32:
            self.model = copy.deepcopy(self.model).float().eval()

        self._rows, out = [], []
        with torch.no_grad():
            for p in prompts:
                cache = DynamicCache(self.model.cfg, 1, dtype=torch.float32)
                ids = torch.tensor([p], dtype=torch.long)  # (1, T)
                pos = torch.arange(len(p), dtype=torch.long)[None]  # (1, T)
                logits = self.model(ids, pos, cache)  # (1, T, V)
                self._rows.append([cache, len(p)])
                out.append(logits[0].numpy())
        return out  # per row (T_b, V)

    def step(self, tokens):
        import torch

        out = []
        with torch.no_grad():
            for row, tok in zip(self._rows, tokens):
                cache, pos = row
                logits = self.model(torch.tensor([[tok]], dtype=torch.long),
                                    torch.tensor([[pos]], dtype=torch.long), cache)  # (1, 1, V)
                row[1] = pos + 1
                out.append(logits[0, -1].numpy())
        return np.stack(out)  # (B, V)


class HFReference:
    """transformers' model, fp32, eager attention, one row at a time with its own cache."""

    def __init__(self, model, description: dict):
        import inspect

        self.model = model
        self.description = description
        self._caches = []
        # transformers 5.2x renamed the cache argument/output `past_key_values` -> `cache`
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def close(self) -> None:
        self.model, self._caches = None, []

    def _cache_of(self, out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    def start(self, prompts):
        import torch

        self._caches, out = [], []
        with torch.no_grad():
            for p in prompts:
                r = self.model(input_ids=torch.tensor([p], dtype=torch.long), use_cache=True)  # logits (1, T, V)
                self._caches.append(self._cache_of(r))
                out.append(r.logits[0].float().numpy())
        return out

    def step(self, tokens):
        import torch

        out = []
        with torch.no_grad():
            for b, tok in enumerate(tokens):
                r = self.model(input_ids=torch.tensor([[tok]], dtype=torch.long), use_cache=True,
                               **{self._cache_kw: self._caches[b]})  # logits (1, 1, V)
                self._caches[b] = self._cache_of(r)
                out.append(r.logits[0, -1].float().numpy())
        return np.stack(out)  # (B, V)


def quantized_reference(ref: TorchReference, spec, dtype: str = "float32") -> TorchReference:
    """`ref`'s model with the weights a quantised artifact holds (exporter/quantize.py
    fake_quantize_model: the same quantisation recomputed from the checkpoint, dequantised,
    fp32 arithmetic): what a correct quantised graph computes, up to onnxruntime's activation
    rounding. A damaged stored scale or a wrong packing shows as a difference from it."""
    from kvtrace.exporter.quantize import describe, fake_quantize_model

    desc = {**ref.description, "weights": f"quantised as the artifact ({describe(spec)}, scales {dtype}), "
                                          "dequantised to fp32",
            "quant": {"scheme": spec.scheme, "group_size": spec.group_size, "method": spec.method,
                      "scale_dtype": dtype}}
    return TorchReference(fake_quantize_model(ref.model, spec, dtype), desc)


def for_artifact(ref: TorchReference, manifest: dict, unquantized: bool = False) -> TorchReference:
    """The reference an artifact is judged against: for a quantised artifact (manifest "quant"),
    the model with the same quantised weights unless `unquantized`."""
    q = manifest.get("quant")
    if not q or unquantized:
        return ref
    from kvtrace.exporter.quantize import QuantSpec

    return quantized_reference(ref, QuantSpec.from_manifest(q), manifest.get("dtype", "float32"))


def _source(manifest: dict) -> dict:
    return manifest.get("source") or {}


def torch_reference(manifest: dict, checkpoint: str | None) -> TorchReference:
    """Our model in fp32: the checkpoint (given or recorded), or the seeded built-in."""
    import torch

    src = _source(manifest)
    if checkpoint is None and src.get("kind") == "builtin":
        from kvtrace.configs import BUILTIN, BUILTIN_SEED
        from kvtrace.config import ModelConfig
        from kvtrace.models.transformer import random_model

        arch = manifest.get("architecture")
        if arch not in BUILTIN:
            raise KvtraceError(f"manifest: built-in source of unknown architecture {arch!r}")
        cfg = BUILTIN[arch]
        if ModelConfig.from_dict(manifest["config"]) != cfg:
            print(f"warning: the manifest's config differs from the built-in {arch} configuration; "
                  "comparing against the built-in", file=sys.stderr)
        seed = src.get("seed", BUILTIN_SEED)
        model = random_model(cfg, seed, dtype=torch.float32)
        return TorchReference(model, {"kind": "builtin", "architecture": arch, "seed": seed, "dtype": "float32"})
    path = _checkpoint_path(manifest, checkpoint)
    from kvtrace.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(path, dtype=torch.float32)
    desc = {"kind": "checkpoint", "path": str(path), "sha256": loaded.digest, "dtype": "float32"}
    if src.get("sha256") and src["sha256"] != loaded.digest:
        desc["digest_mismatch"] = src["sha256"]
        print(f"warning: checkpoint {path} (sha256 {loaded.digest[:12]}…) is not the one the artifact was "
              f"exported from (sha256 {src['sha256'][:12]}…)", file=sys.stderr)
    return TorchReference(loaded.model, desc)


def hf_reference(manifest: dict, checkpoint: str | None) -> HFReference:
    if checkpoint is None and _source(manifest).get("kind") == "builtin":
        raise KvtraceError("--against hf: this artifact was exported from a built-in configuration, which has no "
                           "Hugging Face checkpoint; use --against torch, or pass --checkpoint DIR")
    path = _checkpoint_path(manifest, checkpoint)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise KvtraceError(f"--against hf needs transformers and torch installed ({e}); "
                           "pip install 'kvtrace[test]'") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise KvtraceError(f"--against hf: transformers cannot load checkpoint {path}: {e}") from e
    model.eval()
    import transformers

    return HFReference(model, {"kind": "transformers", "path": str(path), "class": type(model).__name__,
                               "transformers_version": transformers.__version__, "dtype": "float32",
                               "attention": "eager"})


def _checkpoint_path(manifest: dict, checkpoint: str | None) -> Path:
    if checkpoint is not None:
        path = Path(checkpoint)
        what = "--checkpoint"
    else:
        src = _source(manifest)
        if not src.get("path"):
            raise KvtraceError("manifest: no source checkpoint path recorded; pass --checkpoint DIR")
        path = Path(src["path"])
        what = "the manifest's source checkpoint"
    if not (path / "config.json").is_file():
        raise KvtraceError(f"{what} {path}: no config.json there (expected a Hugging Face checkpoint directory); "
                           "pass --checkpoint DIR")
    return path
