"""ModelConfig: the four architectures as data.

Every difference between GPT-NeoX, Llama/CodeLlama, StarCoder2 and XGLM that the model,
the ONNX graph builder and the runtime care about is a field here. The config checks
itself (`validate`) and names the offending field. Pure Python: the runtime reads configs
from manifests without importing torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kvtrace.errors import KvtraceError

ARCHITECTURES = ("gpt_neox", "llama", "starcoder2", "xglm")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("plain", "gated")  # plain: down(act(up(x))); gated: down(act(gate(x)) * up(x))
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
POSITIONS = ("rope", "sinusoidal")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class ConfigError(KvtraceError, ValueError):
    """A model configuration that cannot describe a model we can build."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: GQA; 1: MQA. Kept as is in every graph (no K/V repetition).
    head_dim: int  # Llama allows head_dim != hidden_size / n_heads
    intermediate_size: int
    max_position: int  # positions the model was built for (rope tables, sinusoidal table)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "plain"
    activation: str = "gelu"
    qkv_bias: bool = False
    out_bias: bool = False  # attention output projection bias
    mlp_bias: bool = False
    positions: str = "rope"
    rotary_dim: int = 0  # leading head dims that are rotated (GPT-NeoX rotary_pct < 1)
    rope_theta: float = 10000.0
    # rope scaling, one of ROPE_TYPES plus its numbers (factor, low_freq_factor, ...).
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)
    sliding_window: int | None = None  # key j visible from query at position p iff p - j < window
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    embed_scale: float = 1.0  # XGLM scale_embedding: sqrt(hidden_size)
    tie_word_embeddings: bool = False
    sinusoidal_offset: int = 2  # XGLM/fairseq: position p reads table row p + 2
    softmax_fp32: bool = True  # scores and softmax in fp32 even for fp16/bf16 weights
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, fld: str, msg: str):
            if not cond:
                raise ConfigError(f"model config field '{fld}': {msg}")

        need(self.arch in ARCHITECTURES, "arch",
             f"unknown architecture {self.arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "intermediate_size", "max_position"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f,
                 f"must be a positive integer, got {v!r}")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"{self.n_kv_heads} does not divide n_heads={self.n_heads}")
        need(self.norm in NORMS, "norm", f"{self.norm!r} not in {NORMS}")
        need(self.mlp in MLPS, "mlp", f"{self.mlp!r} not in {MLPS}")
        need(self.activation in ACTIVATIONS, "activation", f"{self.activation!r} not in {ACTIVATIONS}")
        need(self.positions in POSITIONS, "positions", f"{self.positions!r} not in {POSITIONS}")
        need(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.positions == "rope":
            need(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0, "rotary_dim",
                 f"must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
            need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
            need(self.rope_type in ROPE_TYPES, "rope_type",
                 f"unsupported rope scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
            required = {"linear": ("factor",), "dynamic": ("factor",),
                        "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings"),
                        "yarn": ("factor",)}.get(self.rope_type, ())
            for k in required:
                need(k in self.rope_params, f"rope_params.{k}", f"required by rope type {self.rope_type!r}")
        else:
            need(self.hidden_size % 2 == 0, "hidden_size", "sinusoidal positions need an even width")
        if self.sliding_window is not None:
            need(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                 f"must be a positive integer or null, got {self.sliding_window!r}")
        if self.mlp == "gated":
            need(self.activation == "silu", "activation", "gated (SwiGLU) MLPs use silu")
        need(self.embed_scale > 0, "embed_scale", "must be > 0")

    # ----------------------------------------------------------------- helpers
    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config has unknown field(s) {unknown}")
        return cls(**d)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def n_params(self) -> int:
        """Parameter count (tied head counted once)."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names and shapes: the contract between loaders and the model."""
        D, F, V = self.hidden_size, self.intermediate_size, self.vocab_size
        ln_bias = self.norm == "layernorm"
        s: dict[str, tuple[int, ...]] = {"embed.weight": (V, D)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            for n in ("norm1", "norm2"):
                s[p + n + ".weight"] = (D,)
                if ln_bias:
                    s[p + n + ".bias"] = (D,)
            for n, rows in (("q", self.q_dim), ("k", self.kv_dim), ("v", self.kv_dim)):
                s[p + f"attn.{n}.weight"] = (rows, D)
                if self.qkv_bias:
                    s[p + f"attn.{n}.bias"] = (rows,)
            s[p + "attn.o.weight"] = (D, self.q_dim)
            if self.out_bias:
                s[p + "attn.o.bias"] = (D,)
            s[p + "mlp.up.weight"] = (F, D)
            if self.mlp == "gated":
                s[p + "mlp.gate.weight"] = (F, D)
            s[p + "mlp.down.weight"] = (D, F)
            if self.mlp_bias:
                s[p + "mlp.up.bias"] = (F,)
                if self.mlp == "gated":
                    s[p + "mlp.gate.bias"] = (F,)
                s[p + "mlp.down.bias"] = (D,)
        s["norm_f.weight"] = (D,)
        if ln_bias:
            s["norm_f.bias"] = (D,)
        if not self.tie_word_embeddings:
            s["lm_head.weight"] = (V, D)
        return s
