"""Greedy generation through onnxruntime equals transformers' greedy `generate`, token for token.

Every tests/tiny_hf.py variant, both cache layouts, a batch of 2 prompts of different lengths,
32 new tokens; and the trained stories260K model, 200 tokens from BOS. transformers runs each
prompt alone with its own cache; min_new_tokens = max_new_tokens there and stop_token_ids=[]
here, so neither side stops early on eos.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import tiny_hf  # noqa: E402
from tests.conftest import checkpoint_dir  # noqa: E402
from kvtrace.runtime.model import Model  # noqa: E402

N_NEW = 32
PROMPTS = [[3, 17, 99, 5, 64, 8, 21, 90, 11], [40, 9, 77, 12]]  # ragged: 9 and 4 tokens


@pytest.fixture(scope="module")
def hf_greedy():
    """variant -> transformers' greedy continuations of PROMPTS (computed once per variant)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            model = tiny_hf.hf_model(variant)
            outs = []
            with torch.no_grad():
                for p in PROMPTS:
                    g = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                       do_sample=False, pad_token_id=0)
                    outs.append(g[0, len(p):].tolist())
            cache[variant] = (model, outs)
        return cache[variant]

    return get


def _first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("layout", ["static", "dynamic"])
@pytest.mark.parametrize("variant", sorted(tiny_hf.VARIANTS))
def test_greedy_matches_transformers(variant, layout, exported, hf_greedy):
    model, ref = hf_greedy(variant)
    m = Model.load(exported(variant, layout), backend="onnxruntime")
    assert m.layout == layout
    res = m.generate(PROMPTS, max_new_tokens=N_NEW, greedy=True, stop_token_ids=[])
    for row, (r, want) in enumerate(zip(res, ref)):
        assert len(r.token_ids) == N_NEW and r.finish_reason == "length"
        i = _first_divergence(r.token_ids, want)
        if i is not None:
            # report the logit gap at the divergence: a near tie is not a bug, a large gap is
            seq = torch.tensor([PROMPTS[row] + want[:i]])
            with torch.no_grad():
                logits = model(seq).logits[0, -1]
            top2 = torch.topk(logits, 2)
            pytest.fail(f"{variant}/{layout} row {row}: first divergence at new token {i}: ours "
                        f"{r.token_ids[i]}, transformers {want[i]}; transformers' top-2 gap "
                        f"{float(top2.values[0] - top2.values[1]):.3g}")


@pytest.mark.parametrize("layout", ["static", "dynamic"])
def test_start_last_equals_last_valid_row_of_all(layout, exported):
    """start(logits="last") returns (B, 1, V): each row's last prompt token, equal to that row of
    start(logits="all") on a ragged batch; the decode steps after it are the same as after "all"."""
    v = "neox_parallel_r025"
    m = Model.load(exported(v, layout), backend="onnxruntime")
    assert m.has_logits_index and m.io["logits"] == "selected"
    full = m.start(PROMPTS)  # (B, T_max, V)
    step_full = m.step([7, 8])  # (B, V)
    last = m.start(PROMPTS, logits="last")
    assert full.shape == (2, 9, m.vocab_size) and last.shape == (2, 1, m.vocab_size)
    lens = np.array([len(p) for p in PROMPTS])
    np.testing.assert_allclose(last[:, 0], full[np.arange(2), lens - 1], rtol=0, atol=1e-5)
    assert not np.allclose(last[1, 0], full[1, -1])  # row 1's padding position differs: the index matters
    np.testing.assert_allclose(m.step([7, 8]), step_full, rtol=0, atol=1e-5)
    assert m.lengths == [10, 5]


def test_stories260k_greedy_200(exported, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    ck = checkpoint_dir("stories260K", tmp_path_factory)  # skips when the fixture is absent
    n = 200
    hf = transformers.LlamaForCausalLM.from_pretrained(ck, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        g = hf.generate(torch.tensor([[1]]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
    want = g[0, 1:].tolist()
    assert len(want) == n
    for layout in ("static", "dynamic"):
        m = Model.load(exported("stories260K", layout, max_seq=256, max_batch=2), backend="onnxruntime")
        # batch of 2: BOS alone and BOS + the first 5 reference tokens (a ragged batch)
        res = m.generate([[1], [1] + want[:5]], max_new_tokens=n - 5, greedy=True, stop_token_ids=[])
        assert res[0].token_ids == want[: n - 5], f"{layout}: diverges at {_first_divergence(res[0].token_ids, want)}"
        assert res[1].token_ids == want[5:], f"{layout}: row 1 diverges"
        res = m.generate([[1]], max_new_tokens=n, greedy=True, stop_token_ids=[])
        assert res[0].token_ids == want


def test_fp16_static_cache(exported):
    """fp16 artifacts get fp16 cache buffers; greedy tokens match the fp32 artifact here (checked
    on this model; an fp16 near tie could legitimately differ, the failure message gives the row)."""
    v = "llama_gqa_linear_tied"
    m16 = Model.load(exported(v, "static", dtype="float16"), backend="onnxruntime")
    m32 = Model.load(exported(v, "static"), backend="onnxruntime")
    assert m16.cache_dtype == "float16"
    m16.start(PROMPTS)
    assert all(m16.backend.to_host(b).dtype == np.float16 for _, b in m16.cache_buffers())
    a = m16.generate(PROMPTS, max_new_tokens=12, greedy=True, stop_token_ids=[])
    b = m32.generate(PROMPTS, max_new_tokens=12, greedy=True, stop_token_ids=[])
    for row, (x, y) in enumerate(zip(a, b)):
        assert x.token_ids == y.token_ids, f"row {row}"


def test_text_through_real_tokenizer(tmp_path, capsys):
    """Text in, text out: a small random GPT-NeoX with the real 50k vocabulary and the fixture
    tokenizer.json copied into its checkpoint; tokens and text equal transformers'."""
    import shutil

    import transformers
    from tests.helpers import FIXTURES
    from kvtrace.cli import main
    from kvtrace.exporter.export import export_model
    from kvtrace.models.checkpoint import load_checkpoint

    tok_file = FIXTURES / "gpt_neox_20b_tokenizer.json"
    if not tok_file.is_file():
        pytest.skip(f"fixture {tok_file} absent")
    cfg = transformers.GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, rotary_pct=0.25,
                                     initializer_range=0.5, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    ck = tmp_path / "ckpt"
    hf.save_pretrained(ck)
    shutil.copyfile(tok_file, ck / "tokenizer.json")
    loaded = load_checkpoint(ck)
    art = export_model(loaded.model, tmp_path / "art", max_seq=64, max_batch=2, tokenizer=loaded.tokenizer_file,
                       validate=False, log=lambda m: None, source={"kind": "checkpoint"})
    m = Model.load(art)
    ref_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    prompts = ["Hello world", "The quick brown fox jumps over"]
    res = m.generate(prompts, max_new_tokens=12, greedy=True, stop_token_ids=[])
    for text, r in zip(prompts, res):
        ids = ref_tok(text)["input_ids"]
        assert r.prompt_ids == ids
        with torch.no_grad():
            g = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=1)
        want = g[0, len(ids):].tolist()
        assert r.token_ids == want
        assert r.text == ref_tok.decode(want) and len(r.text) > 0
    # the CLI streams the same text
    assert main(["generate", str(art), "--prompt", prompts[0], "--max-new-tokens", "12", "--stream"]) == 0
    out = capsys.readouterr().out
    eos_cut = res[0].text if 0 not in res[0].token_ids else m.tokenizer.decode(res[0].token_ids[: res[0].token_ids.index(0)])
    assert out == eos_cut + "\n"
