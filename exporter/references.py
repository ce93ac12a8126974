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

from kvtrace import files
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


def _trim_heap() -> None:
    import gc

    gc.collect()
    try:  # glibc keeps freed heap pages mapped unless asked
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Past:
    """The dynamic cache's bookkeeping that Transformer.context reads (layout, length, key
    positions), without tensors: P tokens of one row already cached, none padding."""
    layout = "dynamic"

    def __init__(self, length: int):
        self.length = length

    def key_positions(self, attention_mask):
        from kvtrace.models.transformer import DynamicCache

        return DynamicCache.key_positions(self, attention_mask)


class Cancelled(Exception):
    """A LayerStreamedReference run ended early by its stop() (the export it served failed)."""


class LayerStreamedReference:
    """Our PyTorch model in fp32, run one block at a time with weights taken from a Mapping
    (canonical name -> array, e.g. models/stream.py's memory-mapped checkpoint), so the whole
    model is never held: memory is one block in fp32 plus activations.

    The blocks are the reference's own (models/transformer.py `Block`, and Transformer's
    embed_input / context / norm_f), run in the same order of calls as TorchReference: each row
    alone, its prompt in one call, then one call per continuation token with a dynamic cache.
    Layer-major order computes exactly the same numbers as token-major order (a block's output
    at a position depends only on the previous block's outputs at that and earlier positions);
    only the head is applied in vocabulary chunks. The continuation is fixed in advance (teacher
    forcing; the model's own greedy choice would need the whole model per step).

    run(prompts, continuation, depths) -> {depth: kvtrace.runtime.parity.Trace}: the logits of
    the model truncated after `depth` blocks (final norm and head applied), for every depth
    asked, from one pass over the blocks.
    """

    HEAD_CHUNK_BYTES = 16 << 20  # fp32 head rows converted at a time (their source pages released after)

    def __init__(self, cfg, weights, description: dict, release=None, stop=None):
        self.cfg, self.weights, self.description = cfg, weights, description
        self._release = release or getattr(weights, "release", None) or (lambda: None)
        self._stop = stop or (lambda: False)  # asked before each block: True ends the run (Cancelled)

    def _f32(self, name: str):
        import torch

        return torch.from_numpy(np.array(self.weights[name], dtype=np.float32))  # a copy

    def _module(self, module, prefix: str):
        """`module` (built on the meta device) with its parameters read from the weights in fp32."""
        sd = {k: self._f32(prefix + k) for k, _ in module.named_parameters()}
        module.load_state_dict(sd, strict=True, assign=True)
        self._release()
        return module.eval()

    def run(self, prompts, continuation, depths):
        from kvtrace.exporter.verify import torch_threads

        with torch_threads(1):
            traces = self._run(prompts, continuation, depths)
        _trim_heap()  # the blocks' fp32 copies are gone: hand their pages back before onnxruntime loads
        return traces

    def _run(self, prompts, continuation, depths):
        import torch

        from kvtrace.models.transformer import Block, DynamicCache, Transformer, make_norm, on_meta
        from kvtrace.runtime.parity import Trace

        cfg = self.cfg
        depths = sorted(set(int(d) for d in depths))
        if not depths or depths[0] < 1 or depths[-1] > cfg.n_layers:
            raise ValueError(f"depths {depths} outside 1..{cfg.n_layers}")
        B, steps = len(prompts), len(continuation[0]) if continuation else 0
        with on_meta():
            skel = Transformer(cfg)  # position tables are real (numpy); no parameter memory
        emb = self.weights["embed.weight"]  # (V, D) view: only the rows used are read
        rows = []  # per row: [(position_ids (1, T), rope, mask, x (1, T, D))] for its calls
        with torch.no_grad():
            for b, p in enumerate(prompts):
                calls, P = [], 0
                for ids in [list(p)] + [[continuation[b][s]] for s in range(steps)]:
                    pos = torch.arange(P, P + len(ids), dtype=torch.long)[None]  # (1, T)
                    rope, mask = skel.context(pos, _Past(P))
                    e = torch.from_numpy(np.array(emb[np.asarray(ids)], dtype=np.float32))[None]  # (1, T, D)
                    calls.append([pos, rope, mask, skel.embed_input(e, pos)])
                    P += len(ids)
                rows.append(calls)
            self._release()
            kept = {}
            for i in range(depths[-1]):
                if self._stop():
                    raise Cancelled()
                with on_meta():
                    blk = Block(cfg, i)
                blk = self._module(blk, f"layers.{i}.")
                for calls in rows:
                    cache = DynamicCache(cfg, 1, dtype=torch.float32)
                    for c in calls:
                        c[3] = blk(c[3], c[1], c[2], cache, c[0])  # (1, T, D)
                del blk
                if i + 1 in depths:
                    kept[i + 1] = torch.cat([c[3][0] for calls in rows for c in calls])  # (N, D)
            with on_meta():
                norm = make_norm(cfg)
            norm = self._module(norm, "norm_f.")
            hidden = {d: norm(x) for d, x in kept.items()}  # (N, D) each
            logits = self._head(hidden)
        traces = {}
        for d, lg in logits.items():  # (N, V): the rows' calls back to back
            lg = lg.numpy()
            pre, dec, at = [], [[None] * B for _ in range(steps)], 0
            for b, p in enumerate(prompts):
                pre.append(lg[at:at + len(p)])
                at += len(p)
                for s in range(steps):
                    dec[s][b] = lg[at]
                    at += 1
            traces[d] = Trace(prompts=[list(p) for p in prompts],
                              tokens=[[int(continuation[b][s]) for b in range(B)] for s in range(steps)],
                              prefill=pre, decode=[np.stack(r) for r in dec])
        return traces

    def _head(self, hidden: dict):
        """{depth: (N, D)} -> {depth: (N, V) float32}, the head read HEAD_CHUNK_BYTES at a time."""
        import torch

        name = getattr(self.weights, "head_name", None) or \
            ("embed.weight" if self.cfg.tie_word_embeddings else "lm_head.weight")
        W = self.weights[name]  # (V, D) view
        V, D = W.shape
        out = {d: torch.empty(x.shape[0], V, dtype=torch.float32) for d, x in hidden.items()}
        step = max(1, self.HEAD_CHUNK_BYTES // (4 * D))
        for r in range(0, V, step):
            w = torch.from_numpy(np.array(W[r:r + step], dtype=np.float32))  # (v, D), a copy
            for d, x in hidden.items():
                out[d][:, r:r + step] = x @ w.t()
            files.release_view(W[r:r + step])  # the mapped rows just read (release() drops a tensor once)
            self._release()
        return out
