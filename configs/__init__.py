"""Per-architecture defaults: built-in smoke configurations, export profiles, parity tolerances.

Pure data (no torch): the runtime reads the tolerance table too.
"""
from __future__ import annotations

from kvtrace.config import ModelConfig

# Small built-in models (random weights from BUILTIN_SEED) for smoke runs and the README's
# main command. Vocabulary 320 = the 256 byte tokens + specials of the built-in byte-level
# tokenizer (runtime/tokenizer.py), rounded up.
BUILTIN_SEED = 1234
BUILTIN_VOCAB = 320

_common = dict(vocab_size=BUILTIN_VOCAB, hidden_size=64, n_layers=2, n_heads=4, head_dim=16,
               intermediate_size=256, max_position=512, bos_token_id=0, eos_token_id=0, pad_token_id=1)

BUILTIN: dict[str, ModelConfig] = {
    # Pythia-like: partial rotary, parallel residual, biases everywhere, untied head
    "gpt_neox": ModelConfig(arch="gpt_neox", n_kv_heads=4, norm="layernorm", mlp="plain", activation="gelu",
                            qkv_bias=True, out_bias=True, mlp_bias=True, positions="rope", rotary_dim=4,
                            parallel_residual=True, **_common),
    # Llama-like: RMSNorm, SwiGLU, GQA, tied head
    "llama": ModelConfig(arch="llama", n_kv_heads=2, norm="rmsnorm", norm_eps=1e-6, mlp="gated",
                         activation="silu", positions="rope", rotary_dim=16, rope_theta=10000.0,
                         tie_word_embeddings=True, **{**_common, "intermediate_size": 172}),
    # StarCoder2-like: LayerNorm with bias, tanh-GELU, GQA, sliding window, tied head
    "starcoder2": ModelConfig(arch="starcoder2", n_kv_heads=2, norm="layernorm", mlp="plain",
                              activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True,
                              positions="rope", rotary_dim=16, rope_theta=100000.0, sliding_window=64,
                              tie_word_embeddings=True, **_common),
    # XGLM-like: sinusoidal positions with offset 2, scaled embeddings, tied head
    "xglm": ModelConfig(arch="xglm", n_kv_heads=4, norm="layernorm", mlp="plain", activation="gelu",
                        qkv_bias=True, out_bias=True, mlp_bias=True, positions="sinusoidal",
                        embed_scale=8.0, tie_word_embeddings=True, **_common),
}

# Export profile defaults: the static cache length and the batch range of the graph/engine.
DEFAULT_MAX_SEQ = 2048  # capped by the model's max_position (default_max_seq)
DEFAULT_MAX_BATCH = 8
DEFAULT_OPSET = 24


def default_max_seq(cfg: ModelConfig) -> int:
    """The static cache length / longest sequence when --max-seq is not given."""
    return min(DEFAULT_MAX_SEQ, cfg.max_position)


# Parity tolerances per artifact dtype (reference: our PyTorch model in fp32, or transformers).
# What is compared (kvtrace/runtime/parity.py has the one definition of each metric): every real
# position of a ragged prefill and of each decode step, all vocabulary entries.
#   max_abs: |logit difference| allowed at a position ...
#   max_rel: ... or, where looser, this fraction of the standard deviation of the reference's
#            logits at that position (large real models' logits span tens of units, and rounding
#            errors grow with them)
#   top1:    minimum fraction of *decisive* positions (reference top-2 margin >= 0.01) whose argmax
#            agrees; positions that are near ties do not count (they flip under any rounding)
# fp32: onnxruntime vs torch differ by summation order only (3.8e-6 on the Pythia-160M shape, up to
# 1e-4 on the trained stories260K whose logits span ~30 units); 1e-4 absolute still catches a 1%
# error in a single weight row. fp16 rounds every activation to 11 significant bits: on stories260K
# the torch fp16 model itself is 0.15 from fp32 and our fp16 graph 0.23; a broken graph misses by
# whole logits and fails top-1 as well. bf16 keeps 8 bits, 8x coarser.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"max_abs": 1e-4, "max_rel": 2e-5, "top1": 0.99},
    "float16": {"max_abs": 0.5, "max_rel": 0.1, "top1": 0.99},
    "bfloat16": {"max_abs": 2.0, "max_rel": 0.4, "top1": 0.95},
}

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
