"""Reference model vs transformers, through the real loader, for every tiny variant.

Batch of two prompts of different lengths (right padded) prefilled in one call, then 16
single-token decode steps, in both cache layouts. The reference runs transformers per row on
that row's own unpadded tokens with its own cache, so padding conventions cannot differ.
"""
from __future__ import annotations

import inspect
import json
import os
import zlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers is the independent reference")

from tests import tiny_hf  # noqa: E402
from kvtrace.models.checkpoint import load_checkpoint  # noqa: E402
from kvtrace.models.transformer import DynamicCache, StaticCache  # noqa: E402

LENGTHS = (16, 21)  # prompt lengths of the two rows
STEPS = 16  # decode steps after the prefill
TOL = 1e-4


def _hf_reference(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(variant):
        if variant not in cache:
            path = tiny_hf.checkpoint(variant)
            cache[variant] = (load_checkpoint(path), _hf_reference(path))
        return cache[variant]
    return get


def _tokens(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]
    steps = torch.randint(3, vocab, (STEPS, len(LENGTHS)), generator=g)  # (STEPS, B) fed to both sides
    return prompts, steps


def _hf_step(hf, ids, past):
    """One transformers forward with its KV cache; (logits, cache). transformers 5.2x renamed
    `past_key_values` to `cache`; accept both."""
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    r = hf(ids, use_cache=True, **({key: past} if past is not None else {}))
    return r.logits, getattr(r, key)


def _reference_logits(hf, prompts, steps):
    """Per row: [prefill logits (L, V)] + [decode logits (V,)] * STEPS, each row on its own."""
    out = []
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            logits, past = _hf_step(hf, prompt[None], None)
            rows = [logits[0]]
            for s in range(STEPS):
                logits, past = _hf_step(hf, steps[s, b].view(1, 1), past)
                rows.append(logits[0, -1])
            out.append(rows)
    return out


def _our_logits(model, cfg, prompts, steps, layout):
    B, T = len(prompts), max(LENGTHS)
    ids = torch.zeros(B, T, dtype=torch.long)  # right padding with token 0
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
        mask[b, :len(p)] = 1
    pos = torch.arange(T).expand(B, T).contiguous()
    lens = torch.tensor(LENGTHS)
    out = [[] for _ in range(B)]
    with torch.no_grad():
        if layout == "static":
            cache = StaticCache(cfg, B, T + STEPS + 3)
            logits = model(ids, pos, cache)
        else:
            cache = DynamicCache(cfg, B)
            logits = model(ids, pos, cache, attention_mask=mask)
        for b in range(B):
            out[b].append(logits[b, :LENGTHS[b]])
        for s in range(STEPS):
            step_pos = (lens + s)[:, None]  # (B, 1): each row continues at its own position
            if layout == "static":
                logits = model(steps[s][:, None], step_pos, cache)
            else:
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)  # (B, P+1)
                logits = model(steps[s][:, None], step_pos, cache, attention_mask=mask)
            for b in range(B):
                out[b].append(logits[b, -1])
    return out


@pytest.mark.parametrize("layout", ["static", "dynamic"])
@pytest.mark.parametrize("variant", list(tiny_hf.VARIANTS))
def test_parity_with_transformers(loaded, variant, layout):
    ld, hf = loaded(variant)
    cfg = ld.config
    assert ld.model.dtype == torch.float32
    prompts, steps = _tokens(cfg.vocab_size, seed=zlib.crc32(variant.encode()))
    ref = _reference_logits(hf, prompts, steps)
    ours = _our_logits(ld.model, cfg, prompts, steps, layout)
    worst = 0.0
    for b in range(len(prompts)):
        for k, (o, r) in enumerate(zip(ours[b], ref[b])):
            assert o.shape == r.shape, (b, k)
            d = (o - r.float()).abs().max().item()
            assert d <= TOL, f"{variant}/{layout}: row {b} {'prefill' if k == 0 else f'step {k}'}: max |dlogit| {d}"
            worst = max(worst, d)
    print(f"\n{variant:28s} {layout:8s} max|dlogit| {worst:.2e}")


def _save_llama(tmp_path, name, **kw):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      **kw)
    torch.manual_seed(1)
    m = transformers.LlamaForCausalLM(config).eval()
    m.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("scaling", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0,
     "beta_slow": 2.0, "attention_factor": 1.2},
])
def test_rope_scaling_dynamic_and_yarn(tmp_path, scaling):
    path = _save_llama(tmp_path, scaling["rope_type"], rope_scaling=dict(scaling))
    ld = load_checkpoint(path)
    assert ld.config.rope_type == scaling["rope_type"]
    hf = _hf_reference(path)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ld.model(ids, torch.arange(40)[None], StaticCache(ld.config, 1, 48))
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= TOL


def test_tiny_checkpoints_use_both_config_forms():
    """The tiny checkpoints are written by transformers 5 (rope_parameters); sanity of what we read."""
    cfg = json.loads((tiny_hf.checkpoint("neox_parallel_r025") / "config.json").read_text())
    assert "rope_parameters" in cfg
    ld = load_checkpoint(tiny_hf.checkpoint("neox_parallel_r025"))
    assert ld.config.rotary_dim == 4 and ld.config.parallel_residual
