"""The numbers every implementation of the model shares: rotary tables, sinusoidal position
tables and the attention mask rule. One module, called by the torch reference
(models/transformer.py), the ONNX graph builder (exporter/onnx_graph.py) and the tests, so a
change here changes every implementation at once. numpy only (no torch): the runtime and the
builder import it.

The mask rule (`allowed`) is written with operators only (`<=`, `>`, `==`, `&`, `|`, `-`, and
indexing with None to add an axis), so the same function runs on numpy arrays, on torch
tensors (the reference) and on the graph builder's symbolic tensors (which emit the ONNX
nodes): there is one rule, not three copies of it.
"""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


# ------------------------------------------------------------------------ attention mask
def allowed(q_slot, q_pos, k_slot, k_pos, k_valid, window: int | None):
    """Which cached slots each new query may attend: bool (B, T, S).

    q_slot (B, T) or (T,): the cache slot each new token is written to;
    q_pos  (B, T): its position (for the sliding window);
    k_slot (S,): slot indices 0..S-1; k_pos (B, S) or (S,): the position held in each slot;
    k_valid (B, S) bool or None: slots holding a real token (dynamic cache padding is False);
    window: sliding window (key visible iff q_pos - k_pos < window) or None.

    Causal by slot (a slot written after the query is invisible), padding excluded, sliding
    window by position; a query always sees its own slot, so a padding query's row is never
    empty (its softmax stays finite).
    """
    ks, qs = k_slot[..., None, :], q_slot[..., :, None]  # (.., 1, S), (.., T, 1)
    a = ks <= qs  # (B, T, S) causal by slot
    if k_valid is not None:
        a = a & k_valid[..., None, :]
    if window is not None:
        a = a & (k_pos[..., None, :] > q_pos[..., :, None] - window)
    return a | (ks == qs)


# ------------------------------------------------------------------------ rotary embedding
def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies (rotary_dim/2,) float32 and the cos/sin multiplier (YaRN's
    attention factor; 1.0 otherwise).

    `seq_len` only matters for dynamic NTK scaling (the base grows once positions pass
    max_position; exports never go past max_position, so within an artifact the dynamic
    tables equal the unscaled ones, exactly as in transformers).
    """
    dim = cfg.rotary_dim
    base = cfg.rope_theta
    p = cfg.rope_params
    attention_factor = 1.0
    if cfg.rope_type == "dynamic" and seq_len is not None and seq_len > cfg.max_position:
        f = p["factor"]
        base = base * ((f * seq_len / cfg.max_position) - (f - 1)) ** (dim / (dim - 2))
    # fp32 arithmetic, as the reference implementations do, so tables agree bit for bit
    inv = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(p["factor"])
    elif cfg.rope_type == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old / lo, old / hi
        scaled = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif cfg.rope_type == "yarn":
        inv, attention_factor = _yarn(cfg, base, dim)
    return inv.astype(np.float32), float(attention_factor)


def _yarn(cfg: ModelConfig, base: float, dim: int) -> tuple[np.ndarray, float]:
    p = cfg.rope_params
    factor = p["factor"]
    orig = p.get("original_max_position_embeddings") or cfg.max_position
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = ((1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap).astype(np.float32)
    return inv, attention_factor


def rope_tables(cfg: ModelConfig, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (n_positions, rotary_dim/2) float32, row p for position p: the
    RotaryEmbedding caches of the graph and the reference's lookup table alike.

    angle = float32(p) * inv_freq in fp32, then cos/sin times the attention factor.
    """
    seq_len = n_positions if cfg.rope_type == "dynamic" else None
    inv, scale = rope_inv_freq(cfg, seq_len)
    ang = np.arange(n_positions, dtype=np.int64).astype(np.float32)[:, None] * inv[None, :]  # (S, r/2)
    cos = (np.cos(ang) * np.float32(scale)).astype(np.float32)
    sin = (np.sin(ang) * np.float32(scale)).astype(np.float32)
    return cos, sin


# ------------------------------------------------------------------------ sinusoidal positions
def sinusoidal_freqs(cfg: ModelConfig) -> np.ndarray:
    """fairseq/XGLM frequencies (hidden/2,) float32: exp(-i log(10000) / (hidden/2 - 1))."""
    half = cfg.hidden_size // 2
    step = math.log(10000) / (half - 1)
    return np.exp(np.arange(half, dtype=np.int64).astype(np.float32) * np.float32(-step)).astype(np.float32)


def sinusoidal_table(cfg: ModelConfig, n_rows: int) -> np.ndarray:
    """Table (n_rows, hidden) float32 with row r = [sin(r f), cos(r f)]; row pad_token_id is zero
    (fairseq's padding_idx). Position p reads row p + cfg.sinusoidal_offset."""
    ang = np.arange(n_rows, dtype=np.int64).astype(np.float32)[:, None] * sinusoidal_freqs(cfg)[None, :]
    table = np.concatenate([np.sin(ang), np.cos(ang)], axis=1).astype(np.float32)
    if cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < n_rows:
        table[cfg.pad_token_id] = 0.0
    return table
