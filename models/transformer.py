"""The reference decoder: one implementation for gpt_neox, llama, starcoder2 and xglm.

Architectures differ only through `ModelConfig` fields; `__init__` branches on them,
`forward` is straight-line. The KV cache is explicit and comes in the two layouts of the
I/O contract (runtime/io_spec.py):

  static : per layer K and V of (B, n_kv, S_max, hd), preallocated; the T new positions of
           row b are written at slots position_ids[b, 0] .. position_ids[b, 0] + T - 1, so a
           slot index *is* a position. Rows may have different lengths (right padding: a
           padding token's slot is overwritten by that row's next real token).
  dynamic: past (B, n_kv, P, hd) -> present (B, n_kv, P + T, hd) by concatenation, with an
           attention_mask (B, P + T) of 1 for real tokens and 0 for padding.

Scores and softmax run in fp32 whatever the weight dtype: GPT-NeoX and XGLM overflow fp16
attention scores otherwise.

The three fused points -- attention, rotary embedding, the static cache write -- are custom
operators (models/ops.py): eagerly they run the torch code there, and when the model is traced
for ONNX (exporter/trace_export.py) each becomes one standard fused node (Attention,
RotaryEmbedding, TensorScatter).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from kvtrace import numerics
from kvtrace.config import ModelConfig

from . import ops

# True while torch.export traces the model (torch >= 2.7; older torch cannot trace it anyway)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


_meta_lock = threading.Lock()
_meta_users = 0  # threads inside on_meta(): nn.init is patched while there is one
_meta_saved: dict = {}  # nn.init's own functions while patched
_meta_here = threading.local()  # .depth: this thread's on_meta() nesting


def _skipped_here(f):
    """nn.init's `f`, a no-op in a thread inside on_meta()."""
    def init(tensor, *args, **kwargs):
        return tensor if getattr(_meta_here, "depth", 0) else f(tensor, *args, **kwargs)
    return init


@contextlib.contextmanager
def on_meta():
    """Modules made inside are on the meta device (no parameter memory) and skip their
    initialisers (torch.nn.init's functions return the tensor untouched): every parameter is
    assigned from a checkpoint afterwards, and an initialiser run on a meta tensor goes through
    torch's Python decompositions, whose first use imports torch._dynamo and sympy (70 MB
    resident and a second of import for nothing). Thread-safe: the initialisers are skipped in
    the calling thread only, and nn.init is restored when the last thread inside leaves."""
    global _meta_users
    with _meta_lock:
        if _meta_users == 0:
            names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
            _meta_saved.update({n: getattr(nn.init, n) for n in names})
            for n, f in _meta_saved.items():
                setattr(nn.init, n, _skipped_here(f))
        _meta_users += 1
    _meta_here.depth = getattr(_meta_here, "depth", 0) + 1
    try:
        with torch.device("meta"):
            yield
    finally:
        _meta_here.depth -= 1
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                for n, f in _meta_saved.items():
                    setattr(nn.init, n, f)
                _meta_saved.clear()


# --------------------------------------------------------------------------- caches
class StaticCache:
    layout = "static"

    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int, dtype=torch.float32, device=None):
        shape = (batch, cfg.n_kv_heads, max_seq, cfg.head_dim)  # (B, n_kv, S_max, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_seq = max_seq

    @classmethod
    def of(cls, k: list, v: list) -> "StaticCache":
        """A cache over existing per-layer tensors (B, n_kv, S_max, hd), e.g. a traced graph's inputs."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_seq = list(k), list(v), k[0].shape[2]
        return cache

    def update(self, i: int, k_new: torch.Tensor, v_new: torch.Tensor, position_ids: torch.Tensor):
        # (B, n_kv, S_max, hd): row b's T new entries at slots position_ids[b, 0] + t
        self.k[i] = ops.cache_update(self.k[i], k_new, position_ids)
        self.v[i] = ops.cache_update(self.v[i], v_new, position_ids)
        return self.k[i], self.v[i]

    def key_positions(self, attention_mask):
        # slot j holds position j; every slot is "valid", causality does the rest
        return torch.arange(self.max_seq, device=self.k[0].device), None  # (S,)


class DynamicCache:
    layout = "dynamic"

    def __init__(self, cfg: ModelConfig, batch: int, dtype=torch.float32, device=None):
        shape = (batch, cfg.n_kv_heads, 0, cfg.head_dim)  # (B, n_kv, P=0, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @classmethod
    def of(cls, k: list, v: list) -> "DynamicCache":
        """A cache over existing per-layer tensors (B, n_kv, P, hd), e.g. a traced graph's inputs."""
        cache = cls.__new__(cls)
        cache.k, cache.v = list(k), list(v)
        return cache

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def update(self, i: int, k_new, v_new, position_ids):
        self.k[i] = torch.cat([self.k[i], k_new.to(self.k[i].dtype)], dim=2)  # (B, n_kv, P+T, hd)
        self.v[i] = torch.cat([self.v[i], v_new.to(self.v[i].dtype)], dim=2)
        return self.k[i], self.v[i]

    def key_positions(self, attention_mask):
        # the position of the token in slot j = number of real tokens before it
        kpos = torch.cumsum(attention_mask, dim=1) - 1  # (B, P+T)
        return kpos, attention_mask.bool()


def attention_mask_bool(cfg: ModelConfig, position_ids, key_pos, key_valid, q_slots, n_slots):
    """(B, 1, T, S) bool: which cached slots each new query may attend (kvtrace.numerics.allowed:
    causal by slot, padding excluded, sliding window by position, own slot always visible)."""
    k_slot = torch.arange(n_slots, device=position_ids.device)  # (S,)
    mask = numerics.allowed(q_slots, position_ids, k_slot, key_pos, key_valid, cfg.sliding_window)
    B, T = position_ids.shape
    return mask.expand(B, T, n_slots)[:, None]  # (B, 1, T, S)


# --------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # statistics in fp32
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


ACT = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, Fh, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.up = nn.Linear(D, Fh, bias=b)
        self.gate = nn.Linear(D, Fh, bias=b) if cfg.mlp == "gated" else None
        self.down = nn.Linear(Fh, D, bias=b)
        self.act = ACT[cfg.activation]

    def forward(self, x):
        if self.gate is not None:  # SwiGLU
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        D = cfg.hidden_size
        self.cfg, self.layer = cfg, layer
        self.q = nn.Linear(D, cfg.q_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(D, cfg.kv_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(D, cfg.kv_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.q_dim, D, bias=cfg.out_bias)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, rope, mask, cache, position_ids):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if rope is not None:  # rotate-half on the first rotary_dim dims
            cos, sin = rope  # (n_positions, r/2) tables, model dtype
            q = ops.rotary_embedding(q, cos, sin, position_ids, cfg.rotary_dim)
            k = ops.rotary_embedding(k, cos, sin, position_ids, cfg.rotary_dim)
        k_all, v_all = cache.update(self.layer, k, v, position_ids)  # (B, n_kv, S, hd)
        out = ops.attention(q, k_all, v_all, mask, self.scale)  # (B, H, T, hd); GQA inside, fp32 softmax
        return self.o(out.transpose(1, 2).reshape(B, T, cfg.q_dim))  # (B, T, H*hd) -> (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.parallel = cfg.parallel_residual

    def forward(self, x, rope, mask, cache, position_ids):
        a = self.attn(self.norm1(x), rope, mask, cache, position_ids)
        if self.parallel:  # GPT-NeoX: both branches read the block input
            return x + a + self.mlp(self.norm2(x))
        x = x + a
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # position tables (kvtrace.numerics, shared with the graph builder), fp32 and outside the
        # module's buffers: `.half()` / `.float()` must not round them (an fp32 copy of an fp16
        # model still reads exact tables); cast to the compute dtype where they are used
        self.pos_table = self.rope_cos = self.rope_sin = None
        if cfg.positions == "sinusoidal":
            self.pos_table = torch.from_numpy(numerics.sinusoidal_table(cfg, cfg.max_position + cfg.sinusoidal_offset))
        else:
            cos, sin = numerics.rope_tables(cfg, cfg.max_position)  # (max_position, r/2) each
            self.rope_cos, self.rope_sin = torch.from_numpy(cos), torch.from_numpy(sin)

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def rope(self, device):
        """The cos, sin tables (max_position, r/2) in the model dtype, or None: the rotary op reads
        row position_ids[b, t] of each (as the graph's RotaryEmbedding reads its caches)."""
        if self.rope_cos is None:
            return None
        return (self.rope_cos.to(device=device, dtype=self.dtype),
                self.rope_sin.to(device=device, dtype=self.dtype))

    def check_inputs(self, input_ids, position_ids):
        if input_ids.shape != position_ids.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
                             "must both be (batch, seq)")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"input_ids: token id {int(input_ids.max())} out of range [0, {self.cfg.vocab_size})")
        if position_ids.numel() and int(position_ids.max()) >= self.cfg.max_position:
            raise ValueError(f"position_ids: position {int(position_ids.max())} beyond the model's "
                             f"max_position {self.cfg.max_position}")

    def forward(self, input_ids, position_ids, cache, attention_mask=None, logits_index=None):
        """input_ids, position_ids (B, T) int64 -> logits (B, T, V) float32; updates `cache`.

        attention_mask (B, P + T) is used by the dynamic layout only (None: all real).
        logits_index (B, K) int64: logits only at these positions of each row -> (B, K, V)
        (the graph's logits_index input; None: every position).
        """
        if not _exporting():  # the value checks read tensors: not traceable
            self.check_inputs(input_ids, position_ids)
        x = self.embed_input(self.embed(input_ids), position_ids)  # (B, T, D)
        rope, mask = self.context(position_ids, cache, attention_mask)
        for block in self.layers:
            x = block(x, rope, mask, cache, position_ids)
        if logits_index is not None:  # x[b, logits_index[b, k]]
            x = x.gather(1, logits_index[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        x = self.norm_f(x)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return (x @ head.t()).float()  # (B, T, V)

    # the parts of forward that surround the blocks: the layer-streamed reference
    # (exporter/references.py) runs the same ones around blocks it loads one at a time
    def embed_input(self, e, position_ids):
        """Token embedding rows e (B, T, D) -> the first block's input: times embed_scale, plus
        sinusoidal positions (XGLM)."""
        cfg = self.cfg
        x = e * cfg.embed_scale
        if cfg.positions == "sinusoidal":
            x = x + self.pos_table[position_ids + cfg.sinusoidal_offset].to(x.dtype)
        return x

    def context(self, position_ids, cache, attention_mask=None):
        """(rope, mask) shared by every block of one call: rope cos/sin tables (max_position, r/2) or None,
        mask (B, 1, T, S) bool. Reads the cache's layout and length only."""
        B, T = position_ids.shape
        if cache.layout == "static":
            q_slots, n_slots = position_ids, cache.max_seq
        else:
            P = cache.length
            if attention_mask is None:
                attention_mask = torch.ones(B, P + T, dtype=torch.long, device=position_ids.device)
            q_slots = (P + torch.arange(T, device=position_ids.device)).expand(B, T)
            n_slots = P + T
        key_pos, key_valid = cache.key_positions(attention_mask)
        mask = attention_mask_bool(self.cfg, position_ids, key_pos, key_valid, q_slots, n_slots)  # (B,1,T,S)
        return self.rope(position_ids.device), mask


def random_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    """A model with deterministic random weights (the built-in smoke configurations)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm_f.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen) * (2.0 if "embed" in name else 1.0))
    return model.to(dtype).eval()
