"""Tiny random Hugging Face models of each architecture, built with transformers' own classes.

The independent reference for every parity test: a variant name -> a checkpoint directory
(config.json + model.safetensors) written by `save_pretrained`, which our loader then reads
through the real code path.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

_common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=128, initializer_range=0.1,
               bos_token_id=0, eos_token_id=2)

# name -> (transformers class name, config kwargs)
VARIANTS: dict[str, tuple[str, dict]] = {
    "neox_parallel_r025": ("GPTNeoX", dict(use_parallel_residual=True, rotary_pct=0.25, rotary_emb_base=10000,
                                           tie_word_embeddings=False, hidden_act="gelu")),
    "neox_sequential_r100": ("GPTNeoX", dict(use_parallel_residual=False, rotary_pct=1.0, rotary_emb_base=500,
                                             attention_bias=False, hidden_act="gelu")),
    "llama_mha": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0)),
    "llama_gqa_linear_tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                                            rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_mqa_llama3": ("Llama", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0,
                                       attention_bias=True, mlp_bias=True,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 32})),
    "starcoder2_gqa_window_bias": ("Starcoder2", dict(num_key_value_heads=2, sliding_window=8, use_bias=True,
                                                      rope_theta=100000.0, norm_epsilon=1e-5)),
    "starcoder2_nobias": ("Starcoder2", dict(num_key_value_heads=2, sliding_window=None, use_bias=False)),
    "xglm_scaled": ("XGLM", dict(scale_embedding=True)),
    "xglm_unscaled": ("XGLM", dict(scale_embedding=False)),
}

ARCH_OF = {"GPTNeoX": "gpt_neox", "Llama": "llama", "Starcoder2": "starcoder2", "XGLM": "xglm"}


def _xglm_kwargs(kw: dict) -> dict:
    c = dict(kw)
    out = dict(vocab_size=c.pop("vocab_size"), d_model=c.pop("hidden_size"), num_layers=c.pop("num_hidden_layers"),
               attention_heads=c.pop("num_attention_heads"), ffn_dim=c.pop("intermediate_size"),
               max_position_embeddings=c.pop("max_position_embeddings"), init_std=c.pop("initializer_range"),
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    out.update(c)
    return out


def hf_model(variant: str, seed: int = 0, **override):
    """A fresh transformers model for `variant` (eval mode, fp32, eager attention); `override`
    changes the common config keys (e.g. num_hidden_layers=4)."""
    import torch
    import transformers

    cls_name, extra = VARIANTS[variant]
    kw = {**_common, **extra, **override}
    if cls_name == "XGLM":
        kw = _xglm_kwargs(kw)
    config = getattr(transformers, f"{cls_name}Config")(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls_name}ForCausalLM")(config)
    # give every bias and norm weight random values: transformers initialises them to 0 / 1,
    # which would hide a missing or mis-mapped tensor
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@functools.lru_cache(maxsize=None)
def checkpoint(variant: str) -> Path:
    """Directory with config.json + model.safetensors for `variant` (cached per process)."""
    root = Path(os.environ.get("KVTRACE_TEST_TMP") or tempfile.mkdtemp(prefix="kvtrace-hf-"))
    out = root / variant
    if not (out / "config.json").exists():
        hf_model(variant).save_pretrained(out, safe_serialization=True)
    return out


@functools.lru_cache(maxsize=None)
def deeper(variant: str, n_layers: int) -> Path:
    """Like checkpoint(variant), with n_layers blocks (the default is 2)."""
    root = Path(os.environ.get("KVTRACE_TEST_TMP") or tempfile.mkdtemp(prefix="kvtrace-hf-"))
    out = root / f"{variant}-{n_layers}-layers"
    if not (out / "config.json").exists():
        hf_model(variant, num_hidden_layers=n_layers).save_pretrained(out, safe_serialization=True)
    return out


def with_vocab(dest: Path, vocab: int, scale: float = 1.0, variant: str = "llama_mha") -> Path:
    """A copy of `variant`'s checkpoint at `dest` with a `vocab`-row embedding and head of
    N(0, scale^2) fp32 values: a larger weight file (to see in RSS, or too big for a small disk)."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(checkpoint(variant), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["vocab_size"] = vocab
    (dest / "config.json").write_text(json.dumps(cfg))
    t = load_file(dest / "model.safetensors")
    rng = np.random.default_rng(0)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = scale * rng.standard_normal((vocab, cfg["hidden_size"]), dtype=np.float32)
    save_file(t, dest / "model.safetensors", metadata={"format": "pt"})
    return dest
