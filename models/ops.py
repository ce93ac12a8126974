"""The reference model's three fused points as custom operators (namespace "kvtrace").

Eagerly each op runs the reference's own torch code (this file *is* that code: attention with
fp32 scores and softmax, rotate-half rotary embedding, the static cache's scatter). To the
tracer each is one opaque node that exporter/trace_export.py maps to the standard ONNX op the
graph builder emits too: Attention, RotaryEmbedding, TensorScatter. So the traced graph gets
the same fused operators as the built one, and the eager numerics are unchanged.

Eager calls run the plain functions directly, not through the operator: the first eager call
of a custom operator imports torch._dynamo and sympy (~70 MB resident, a second of import),
which the streamed export's validation cannot afford in its memory budget (docs/validation.md).
Only while torch.export traces (torch.compiler.is_exporting) do calls go to the operators.

Shapes: B batch, H query heads, n_kv key/value heads (GQA: H % n_kv == 0), T new tokens,
S cached slots, hd head dim, r rotary dims.
"""
from __future__ import annotations

import torch

_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _routed(op, fn):
    """`fn` eagerly, the custom operator `op` while torch.export traces."""
    def call(*args):
        return op(*args) if _exporting() or torch.compiler.is_compiling() else fn(*args)
    call.__doc__, call.__name__ = fn.__doc__, fn.__name__
    return call


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v: q (B, H, T, hd), k/v (B, n_kv, S, hd), mask (B, 1, T, S)
    bool (True = may attend) -> (B, H, T, hd) in v's dtype. Scores and softmax in fp32 whatever
    the dtype (GPT-NeoX and XGLM overflow fp16 scores otherwise); ONNX: Attention(scale,
    softmax_precision=FLOAT for fp16/bf16), GQA kept as GQA."""
    rep = q.shape[1] // k.shape[1]  # GQA: query head h reads kv head h // rep
    k = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, S) fp32
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return probs @ v  # (B, H, T, hd)


_attention_op = torch.library.custom_op("kvtrace::attention", _attention, mutates_args=())
attention = _routed(_attention_op, _attention)


@_attention_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)


def _rotary_embedding(x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                     position_ids: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate-half RoPE on the first rotary_dim dims of x (B, h, T, hd); cos_cache/sin_cache
    (n_positions, r/2) in x's dtype, read at position_ids (B, T). ONNX: RotaryEmbedding
    (interleaved=0, rotary_embedding_dim=r)."""
    cos = cos_cache[position_ids][:, None]  # (B, 1, T, r/2)
    sin = sin_cache[position_ids][:, None]
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


_rotary_embedding_op = torch.library.custom_op("kvtrace::rotary_embedding", _rotary_embedding, mutates_args=())
rotary_embedding = _routed(_rotary_embedding_op, _rotary_embedding)


@_rotary_embedding_op.register_fake
def _(x, cos_cache, sin_cache, position_ids, rotary_dim):
    return x.new_empty(x.shape)


def _cache_update(cache: torch.Tensor, new: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The static cache with row b's T new entries written at slots position_ids[b, 0] + t
    along axis -2: cache (B, n_kv, S, hd), new (B, n_kv, T, hd) -> (B, n_kv, S, hd).
    ONNX: TensorScatter(axis=-2, write_indices = position_ids[:, 0]), its output aliasing the
    cache input at run time. Functional (a new tensor, not an in-place write): torch.export
    turns an in-place custom op into auto_functionalized nodes torch.onnx cannot translate."""
    B, n_kv, T, hd = new.shape
    slots = position_ids[:, :1] + torch.arange(T, device=new.device)  # (B, T)
    idx = slots[:, None, :, None].expand(B, n_kv, T, hd)
    return cache.scatter(2, idx, new.to(cache.dtype))


_cache_update_op = torch.library.custom_op("kvtrace::cache_update", _cache_update, mutates_args=())
cache_update = _routed(_cache_update_op, _cache_update)


@_cache_update_op.register_fake
def _(cache, new, position_ids):
    return cache.new_empty(cache.shape)
