"""llama2.c legacy checkpoints: conversion, parity with a direct llama2.c-style forward and with
transformers, the stories260K fixture, and bad input."""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from kvtrace.cli import main as cli  # noqa: E402
from kvtrace.models.checkpoint import load_checkpoint  # noqa: E402
from kvtrace.models.llama2c import convert  # noqa: E402
from kvtrace.models.transformer import StaticCache  # noqa: E402
from kvtrace.errors import KvtraceError  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "stories260K.bin"
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")


def _write_v0(path: Path, *, dim=32, hidden=48, layers=2, heads=4, kv=2, vocab=40, seq=32, shared=True, seed=0):
    """A random llama2.c legacy v0 file (the layout of ../shared/fixtures/README.md)."""
    rng = np.random.default_rng(seed)
    hd = dim // heads
    shapes = [(vocab, dim), (layers, dim), (layers, dim, dim), (layers, kv * hd, dim), (layers, kv * hd, dim),
              (layers, dim, dim), (layers, dim), (layers, hidden, dim), (layers, dim, hidden),
              (layers, hidden, dim), (dim,), (seq, hd // 2), (seq, hd // 2)] + ([] if shared else [(vocab, dim)])
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv, vocab if shared else -vocab, seq))
        for s in shapes:
            f.write((rng.standard_normal(s) * 0.2 + (1.0 if len(s) <= 2 and s[-1] == dim and s != (vocab, dim)
                                                     else 0.0)).astype("<f4").tobytes())
    return path


def _llama2c_forward(path: Path, tokens: list[int]) -> np.ndarray:
    """Logits (T, V) computed as llama2.c's run.c does: interleaved-pair RoPE on the raw arrays."""
    raw = path.read_bytes()
    h = dict(zip(FIELDS, struct.unpack("<7i", raw[:28])))
    shared, V = h["vocab_size"] > 0, abs(h["vocab_size"])
    D, Fh, L, H, KV, S = h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["max_seq_len"]
    hd = D // H
    flat = np.frombuffer(raw, "<f4", offset=28).astype(np.float64)
    names = [("emb", (V, D)), ("att_norm", (L, D)), ("wq", (L, D, D)), ("wk", (L, KV * hd, D)),
             ("wv", (L, KV * hd, D)), ("wo", (L, D, D)), ("ffn_norm", (L, D)), ("w1", (L, Fh, D)),
             ("w2", (L, D, Fh)), ("w3", (L, Fh, D)), ("final", (D,)), ("fr", (S, hd // 2)), ("fi", (S, hd // 2))]
    names += [] if shared else [("wcls", (V, D))]
    A, off = {}, 0
    for n, s in names:
        A[n] = flat[off:off + int(np.prod(s))].reshape(s)
        off += int(np.prod(s))
    wcls = A["emb"] if shared else A["wcls"]

    def rms(x, w):
        return x / np.sqrt((x * x).mean() + 1e-5) * w

    def rope(x, pos):  # (heads, hd), pairs (2i, 2i+1)
        ang = pos / 10000.0 ** (np.arange(0, hd, 2) / hd)
        a, b = x[:, 0::2].copy(), x[:, 1::2].copy()
        out = x.copy()
        out[:, 0::2], out[:, 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
        return out

    ks, vs, logits = [[] for _ in range(L)], [[] for _ in range(L)], []
    for pos, t in enumerate(tokens):
        x = A["emb"][t]
        for i in range(L):
            xb = rms(x, A["att_norm"][i])
            q = rope((A["wq"][i] @ xb).reshape(H, hd), pos)
            ks[i].append(rope((A["wk"][i] @ xb).reshape(KV, hd), pos))
            vs[i].append((A["wv"][i] @ xb).reshape(KV, hd))
            K, Vv = np.stack(ks[i]), np.stack(vs[i])  # (P, KV, hd)
            heads = []
            for hh in range(H):
                g = hh // (H // KV)
                s = K[:, g] @ q[hh] / np.sqrt(hd)
                p = np.exp(s - s.max())
                heads.append((p / p.sum()) @ Vv[:, g])
            x = x + A["wo"][i] @ np.concatenate(heads)
            xb = rms(x, A["ffn_norm"][i])
            g1 = A["w1"][i] @ xb
            x = x + A["w2"][i] @ ((g1 / (1 + np.exp(-g1))) * (A["w3"][i] @ xb))
        logits.append(wcls @ rms(x, A["final"]))
    return np.stack(logits)


def _ours(model, cfg, tokens):
    with torch.no_grad():
        ids = torch.tensor([tokens])
        return model(ids, torch.arange(len(tokens))[None], StaticCache(cfg, 1, len(tokens)))[0].double().numpy()


@pytest.mark.parametrize("shared", [True, False])
def test_synthetic_conversion_matches_llama2c_forward(tmp_path, shared):
    """Checks the interleaved -> rotate-half permutation against llama2.c's own RoPE."""
    src = _write_v0(tmp_path / "m.bin", shared=shared)
    out = convert(src, tmp_path / "hf")
    ld = load_checkpoint(out)
    assert ld.config.tie_word_embeddings == shared and ld.config.n_kv_heads == 2
    tokens = [1, 5, 9, 33, 2, 17, 17, 8, 30]
    ref = _llama2c_forward(src, tokens)
    assert np.abs(_ours(ld.model, ld.config, tokens) - ref).max() < 1e-4


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not FIXTURE.is_file():
        pytest.skip(f"fixture {FIXTURE} not found (../shared/fixtures beside the checkout)")
    out = tmp_path_factory.mktemp("stories") / "stories260K"
    assert cli(["convert-llama2c", str(FIXTURE), "--out", str(out)]) == 0
    return out


def test_stories260k_against_llama2c_forward(stories):
    ld = load_checkpoint(stories)
    tokens = [1, 461, 461, 401, 401, 401, 461, 378, 455, 473]
    assert np.abs(_ours(ld.model, ld.config, tokens) - _llama2c_forward(FIXTURE, tokens)).max() < 1e-4


def test_stories260k_greedy_200_matches_transformers(stories):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    N = 200
    ld = load_checkpoint(stories)
    cfg = ld.config
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == ("llama", 5, 8, 4, 512)
    ours, tok = [], torch.tensor([[1]])
    cache = StaticCache(cfg, 1, N)
    with torch.no_grad():
        for i in range(N):
            tok = ld.model(tok, torch.tensor([[i]]), cache)[:, -1].argmax(-1, keepdim=True)
            ours.append(int(tok))
    hf = transformers.LlamaForCausalLM.from_pretrained(stories, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    import inspect
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    theirs, tok, past = [], torch.tensor([[1]]), None
    with torch.no_grad():
        for _ in range(N):
            r = hf(tok, use_cache=True, **({key: past} if past is not None else {}))
            past = getattr(r, key)
            tok = r.logits[:, -1].argmax(-1, keepdim=True)
            theirs.append(int(tok))
    assert len(set(ours)) > 10  # a real continuation, not one token repeated
    assert ours == theirs


def _no_leftovers(parent: Path, keep: set[str]):
    assert {p.name for p in parent.iterdir()} == keep


def test_truncated_bin_leaves_nothing(tmp_path, capsys):
    src = _write_v0(tmp_path / "m.bin")
    data = src.read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[:-100])
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    with pytest.raises(KvtraceError, match=rf"{bad}: file is truncated"):
        convert(bad, out_parent / "hf")
    _no_leftovers(out_parent, set())
    assert cli(["convert-llama2c", str(bad), "--out", str(out_parent / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtrace: error:") and str(bad) in err
    bad.write_bytes(data[:20])  # inside the header
    with pytest.raises(KvtraceError, match=rf"{bad}: file is truncated"):
        convert(bad, out_parent / "hf")
    bad.write_bytes(data + b"\0" * 8)
    with pytest.raises(KvtraceError, match="unexpected bytes"):
        convert(bad, out_parent / "hf")
    bad.write_bytes(struct.pack("<I", 0x616B3432) + data[4:])
    with pytest.raises(KvtraceError, match="version-0"):
        convert(bad, out_parent / "hf")
    bad.write_bytes(struct.pack("<7i", 32, 48, 2, 5, 2, 40, 32) + data[28:])  # 32 not divisible by 5 heads
    with pytest.raises(KvtraceError, match="n_heads=5"):
        convert(bad, out_parent / "hf")
    _no_leftovers(out_parent, set())


def test_existing_output_needs_force(tmp_path):
    src = _write_v0(tmp_path / "m.bin")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(KvtraceError, match="--force"):
        convert(src, out)
    assert (out / "old.txt").exists()
    # --force never deletes a directory the converter did not write (issue 8: data loss)
    assert cli(["convert-llama2c", str(src), "--out", str(out), "--force"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    shutil.rmtree(out)
    assert cli(["convert-llama2c", str(src), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "kvtrace-convert.json", "model.safetensors"]
    assert cli(["convert-llama2c", str(src), "--out", str(out), "--force"]) == 0  # its own output: replaced
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "kvtrace-convert.json", "model.safetensors"]
    _no_leftovers(tmp_path, {"m.bin", "hf"})
    shutil.rmtree(out)


def test_stale_staging_of_a_killed_conversion_is_removed(tmp_path, capsys):
    """What a killed conversion to the same --out left (.OUT.tmp-PID-*, PID dead) is removed by the
    next conversion, which says so; a live process's directory is left alone."""
    import subprocess

    src = _write_v0(tmp_path / "m.bin", shared=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".hf.tmp-{dead.pid}-abcdef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".hf.tmp-{os.getpid()}-live01"  # this process is alive
    live.mkdir()
    assert cli(["convert-llama2c", str(src), "--out", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and f"removed {stale}" in err
    assert live.exists()
