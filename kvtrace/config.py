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
    """A model configuration that cannot describe a model we can build. `field` names the
    ModelConfig field (when one is at fault) and `reason` says what is wrong with it, so a
    caller can name the field its own way (config.json's key, the manifest's 'config.x')."""

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field, self.reason = field, reason


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# the numbers each rope scaling type reads (kvtrace/numerics.py); all must be finite and > 0,
# original_max_position_embeddings a positive integer; beta_* and mscale* finite numbers
_ROPE_POSITIVE = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow")
_ROPE_NUMBERS = ("mscale", "mscale_all_dim")
FLOAT32_MAX = 3.4028234663852886e38
MAX_POSITIONS = 1 << 24  # the reference model holds (max_position, rotary_dim/2) tables


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
        """Types and ranges of every field; ConfigError names the field."""
        def need(cond: bool, fld: str, msg: str):
            if not cond:
                raise ConfigError(f"model config field '{fld}': {msg}", field=fld, reason=msg)

        need(isinstance(self.arch, str) and self.arch in ARCHITECTURES, "arch",
             f"unknown architecture {self.arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "intermediate_size", "max_position"):
            v = getattr(self, f)
            need(_is_int(v) and 0 < v < 1 << 31, f, f"must be a positive integer below 2**31, got {v!r}")
        # a language model chooses between tokens: with one there is nothing to predict (and
        # top-2 margins, sampling and prompts drawn from non-special ids have nothing to work on)
        need(self.vocab_size >= 2, "vocab_size", f"must be at least 2, got {self.vocab_size}")
        need(self.max_position <= MAX_POSITIONS, "max_position",
             f"{self.max_position} is beyond the {MAX_POSITIONS} positions kvtrace supports")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"{self.n_kv_heads} does not divide n_heads={self.n_heads}")
        for f, choices in (("norm", NORMS), ("mlp", MLPS), ("activation", ACTIVATIONS), ("positions", POSITIONS),
                           ("rope_type", ROPE_TYPES)):
            v = getattr(self, f)
            need(isinstance(v, str) and v in choices, f, f"{v!r} not in {choices}")
        for f in ("norm_eps", "rope_theta", "embed_scale"):
            v = getattr(self, f)
            need(_is_num(v) and v > 0, f, f"must be a finite number > 0, got {v!r}")
        need(self.norm_eps < 1, "norm_eps", f"must be below 1 (it is added to a variance), got {self.norm_eps!r}")
        # rope tables are computed in float32: theta**(i/d) must be a finite float32 above 1
        need(1 < self.rope_theta <= FLOAT32_MAX, "rope_theta", f"must be in (1, 3.4e38], got {self.rope_theta!r}")
        for f in ("qkv_bias", "out_bias", "mlp_bias", "parallel_residual", "tie_word_embeddings", "softmax_fp32"):
            v = getattr(self, f)
            need(isinstance(v, bool), f, f"must be true or false, got {v!r}")
        need(_is_int(self.rotary_dim) and self.rotary_dim >= 0, "rotary_dim",
             f"must be a non-negative integer, got {self.rotary_dim!r}")
        need(_is_int(self.sinusoidal_offset) and 0 <= self.sinusoidal_offset < 1 << 20, "sinusoidal_offset",
             f"must be a small non-negative integer, got {self.sinusoidal_offset!r}")
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, f)
            need(v is None or (_is_int(v) and 0 <= v < self.vocab_size), f,
                 f"must be a token id in 0..{self.vocab_size - 1} or null, got {v!r}")
        need(isinstance(self.rope_params, dict), "rope_params", f"must be an object, got {self.rope_params!r}")
        if self.positions == "rope":
            need(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0, "rotary_dim",
                 f"must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
            required = {"linear": ("factor",), "dynamic": ("factor",),
                        "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings"),
                        "yarn": ("factor",)}.get(self.rope_type, ())
            for k in required:
                need(k in self.rope_params, f"rope_params.{k}", f"required by rope type {self.rope_type!r}")
            for k, v in self.rope_params.items():
                if k in _ROPE_POSITIVE:
                    need(_is_num(v) and v > 0, f"rope_params.{k}", f"must be a finite number > 0, got {v!r}")
                elif k in _ROPE_NUMBERS:
                    need(_is_num(v), f"rope_params.{k}", f"must be a finite number, got {v!r}")
                elif k == "original_max_position_embeddings":
                    need(_is_int(v) and v > 0, f"rope_params.{k}", f"must be a positive integer, got {v!r}")
                elif k == "truncate":
                    need(isinstance(v, bool), f"rope_params.{k}", f"must be true or false, got {v!r}")
                else:
                    need(False, f"rope_params.{k}", "unknown rope scaling parameter")
            if self.rope_type == "llama3":
                need(self.rope_params["high_freq_factor"] > self.rope_params["low_freq_factor"],
                     "rope_params.high_freq_factor", "must be greater than low_freq_factor (llama3 rope scaling "
                     "divides by their difference)")
        else:
            need(self.hidden_size % 2 == 0 and self.hidden_size >= 4, "hidden_size",
                 "sinusoidal positions need an even width of at least 4")
        if self.sliding_window is not None:
            need(_is_int(self.sliding_window) and self.sliding_window > 0, "sliding_window",
                 f"must be a positive integer or null, got {self.sliding_window!r}")
        if self.mlp == "gated":
            need(self.activation == "silu", "activation", "gated (SwiGLU) MLPs use silu")

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
        if not isinstance(d, dict):
            raise ConfigError(f"model config: expected an object, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config has unknown field(s) {unknown}", field=unknown[0],
                              reason="unknown field")
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"model config lacks field(s) {missing}", field=missing[0],
                              reason="a required field is missing")
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
