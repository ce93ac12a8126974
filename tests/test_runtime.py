"""The runtime on a hand-built toy artifact (tests/runtime_toy.py) and sampling against transformers.

The toy graph stores each token id in the cache at the slot it was written to and predicts
token + 1, so cache bookkeeping (slots, in-place update, dynamic growth), generation control
(stops, streaming, padding of finished rows) and the CLI are checked exactly, independent of
the exporter. Real-model parity is in test_generate_hf.py.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace import io_spec
from kvtrace.errors import KvtraceError
from kvtrace.runtime.model import Model
from kvtrace.runtime.sampling import SamplingParams, next_tokens, probabilities
from tests.runtime_toy import build_toy, cache_contents


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {layout: build_toy(root / layout, layout=layout) for layout in io_spec.LAYOUTS}


def ids(text):
    return [2 + b for b in text.encode()]


# ------------------------------------------------------------------ cache bookkeeping
def test_static_cache_in_place(toy_dirs, capfd):
    # log_severity 2 (warnings): onnxruntime warns "in-place optimization not activated" when
    # TensorScatter has to copy the cache because input and output are different buffers
    m = Model.load(toy_dirs["static"], backend="onnxruntime", log_severity=2)
    assert m.backend_name == "onnxruntime" and m.layout == "static"
    logits = m.start([[5, 6, 7], [9]])
    assert logits.shape == (2, 3, 320) and logits.dtype == np.float32
    assert logits.argmax(-1)[0].tolist() == [6, 7, 8] and logits.argmax(-1)[1, 0] == 10
    assert m.lengths == [3, 1]
    bufs = m.cache_buffers()
    assert len(bufs) == 2 * m.config.n_layers
    ptrs = [b.data_ptr() for _, b in bufs]
    hosts = [m.backend.to_host(b) for _, b in bufs]
    for c in cache_contents(m):  # each row's tokens at slots 0..T-1 (padding 1 after row 1's end)
        assert c[0, :4].tolist() == [5, 6, 7, 0] and c[1, :3].tolist() == [9, 1, 1]
    last = m.step([50, 60])
    assert last.shape == (2, 320) and last.argmax(-1).tolist() == [51, 61]
    assert m.lengths == [4, 2]
    for c in cache_contents(m):  # row 1's token went to its own position 1, over the padding
        assert c[0, :5].tolist() == [5, 6, 7, 50, 0] and c[1, :3].tolist() == [9, 60, 1]
    # no copy: the same buffers, bound as both input and output, were written by the graph
    assert [b.data_ptr() for _, b in m.cache_buffers()] == ptrs
    assert all(h is m.backend.to_host(b) for h, (_, b) in zip(hosts, m.cache_buffers()))
    for n, (past, present) in enumerate(m.cache_pairs):
        assert m.backend.output(present).data_ptr() == ptrs[n]
    assert "in-place optimization not activated" not in capfd.readouterr().err
    # control: the same check sees a copy when an output is bound to a separate buffer
    m2 = Model.load(toy_dirs["static"], backend="onnxruntime", log_severity=2)
    m2.start([[5]])
    m2.backend.bind_output(io_spec.present_key(0), m2.backend.alloc(m2.cache_buffers()[0][1].shape, "float32"))
    m2.step([6])
    assert "in-place optimization not activated" in capfd.readouterr().err
    # the returned step logits are the caller's: the next step does not overwrite them
    m.step([51, 61])
    assert last.argmax(-1).tolist() == [51, 61]
    # a new batch of the same size reuses the buffers; another size reallocates them
    m.start([[3], [4]])
    assert [b.data_ptr() for _, b in m.cache_buffers()] == ptrs
    m.start([[3], [4], [5]])
    assert m.lengths == [1, 1, 1] and cache_contents(m)[0][:, 0].tolist() == [3, 4, 5]


@pytest.mark.parametrize("layout", io_spec.LAYOUTS)
def test_start_last_without_logits_index(toy_dirs, layout):
    """The toy graph predates logits_index (every position out): the runtime feeds only what the
    manifest's io lists, and start(logits="last") picks each row's last token on the host."""
    m = Model.load(toy_dirs[layout], backend="onnxruntime")
    assert not m.has_logits_index
    last = m.start([[5, 6, 7], [9]], logits="last")
    assert last.shape == (2, 1, 320) and last[:, 0].argmax(-1).tolist() == [8, 10]
    assert m.step([50, 60]).argmax(-1).tolist() == [51, 61]
    with pytest.raises(KvtraceError, match="logits="):
        m.start([[5]], logits="first")


def test_dynamic_cache_grows(toy_dirs):
    m = Model.load(toy_dirs["dynamic"], backend="onnxruntime")
    m.start([[5, 6, 7], [9]])
    out = m.backend.to_host(m.cache_buffers()[0][1])  # (B, n_kv, P, hd): the last present
    assert m.cache_buffers()[0][0] == io_spec.past_key(0)
    assert out.shape[2] == 3 and out[:, 0, :, 0].tolist() == [[5, 6, 7], [9, 1, 1]]
    last = m.step([50, 60])
    assert last.argmax(-1).tolist() == [51, 61] and m.lengths == [4, 2]
    out = m.backend.to_host(m.cache_buffers()[0][1])
    assert out[:, 0, :, 0].tolist() == [[5, 6, 7, 50], [9, 1, 1, 60]]
    np.testing.assert_array_equal(m._mask[:, :4], [[1, 1, 1, 1], [1, 0, 0, 1]])


# ------------------------------------------------------------------ generation control
@pytest.mark.parametrize("layout", io_spec.LAYOUTS)
def test_generate_stops_and_padding(toy_dirs, layout):
    m = Model.load(toy_dirs[layout])
    r = m.generate(["abc", "x"], max_new_tokens=5, stop_strings=["fg"])
    assert r[0].token_ids == ids("defg") and r[0].text == "de" and r[0].finish_reason == "stop_string"
    assert r[1].token_ids == ids("yz{|}") and r[1].text == "yz{|}" and r[1].finish_reason == "length"
    # stop token: token id 104 ("f") ends row 0; the stop token is kept in token_ids, not in text
    r = m.generate([ids("abc"), ids("m")], max_new_tokens=6, stop_token_ids=[ids("f")[0]])
    assert r[0].token_ids == ids("def") and r[0].text == "de" and r[0].finish_reason == "stop_token"
    assert r[1].token_ids == ids("nopqrs") and r[1].finish_reason == "length"
    # the manifest eos (0) stops by default: 319 -> (319 + 1) % 320 = 0
    r = m.generate([[318]], max_new_tokens=5)
    assert r[0].token_ids == [319, 0] and r[0].finish_reason == "stop_token"
    r = m.generate([[318]], max_new_tokens=5, stop_token_ids=[])
    assert r[0].token_ids == [319, 0, 1, 2, 3] and r[0].finish_reason == "length"
    assert m.generate([[5]], max_new_tokens=0)[0].token_ids == []


def test_generate_finished_rows_step_on_padding(toy_dirs):
    m = Model.load(toy_dirs["static"])
    r = m.generate([ids("a"), ids("k")], max_new_tokens=4, stop_token_ids=[ids("c")[0]])
    assert r[0].token_ids == ids("bc") and r[1].token_ids == ids("lmno")
    # row 0 finished on its 2nd token (never fed back); it kept stepping on the pad token (1) at its own positions
    c = cache_contents(m)[0]
    assert c[0, :4].tolist() == ids("ab") + [1, 1] and c[1, :4].tolist() == ids("klmn")
    assert m.lengths == [4, 4]


def test_streaming_deltas_hold_back_stop_prefix_and_split_chars(toy_dirs):
    m = Model.load(toy_dirs["static"])
    events = []
    r = m.generate(["abc"], max_new_tokens=6, stop_strings=["ef", "zz"],
                   on_token=lambda row, tok, d: events.append((row, tok, d)))
    assert [e[1] for e in events] == ids("def")
    assert "".join(e[2] for e in events) == r[0].text == "d"
    assert events[1][2] == ""  # "e" could start "ef": held back, then dropped with the stop string


def test_stream_tracker_split_characters():
    from kvtrace.runtime.generate import _TextTracker
    from kvtrace.runtime.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    toks = tok.encode("a€🙂b")  # 1 + 3 + 4 + 1 bytes
    tr = _TextTracker(tok, ["🙂b!"])
    pieces = []
    for n in range(1, len(toks) + 1):
        hit, end = tr.update(toks[:n])
        assert hit is None
        pieces.append(tr.delta(end, final=n == len(toks)))
    # a character split over tokens is streamed only once complete; "🙂b" is held back while it
    # could still become the stop string, then released at the end
    assert pieces[0] == "a" and pieces[1] == pieces[2] == "" and pieces[3] == "€"
    assert pieces[4:8] == ["", "", "", ""] and pieces[8] == "🙂b"
    assert "".join(pieces) == "a€🙂b" and "\ufffd" not in "".join(pieces)


def test_prompt_and_step_validation(toy_dirs):
    m = Model.load(toy_dirs["static"])
    with pytest.raises(KvtraceError, match="step\\(\\) before start"):
        m.step([1])
    with pytest.raises(KvtraceError, match="token id 320"):
        m.start([[1, 320]])
    with pytest.raises(KvtraceError, match="max_batch 4"):
        m.start([[1]] * 5)
    with pytest.raises(KvtraceError, match="empty"):
        m.start([[1], []])
    m.start([[1] * 31])
    m.step([2])
    with pytest.raises(KvtraceError, match="longer than the cache"):
        m.step([2])
    with pytest.raises(KvtraceError, match="2 tokens for a batch of 1"):
        m.step([2, 3])
    with pytest.raises(KvtraceError, match="token id 400"):
        m.step([400])


# ------------------------------------------------------------------ sampling
def test_sampling_seeded_and_bounded(toy_dirs):
    m = Model.load(toy_dirs["static"])
    kw = dict(max_new_tokens=3, temperature=1.0, seed=7, stop_token_ids=[])
    a = m.generate([[5], [6]], **kw)
    b = m.generate([[5], [6]], **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    # toy logits are one-hot with value 1: with top_k=1 sampling is the argmax
    r = m.generate([[5]], max_new_tokens=3, temperature=0.7, top_k=1, seed=1, stop_token_ids=[])
    assert r[0].token_ids == [6, 7, 8]


def test_sampling_matches_transformers_warpers():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    seen = [np.array([1, 2, 2, 40]), np.array([], dtype=np.int64), np.array([7])]
    prompt = torch.tensor([[1, 2, 2, 40], [0, 0, 0, 0], [7, 7, 7, 7]])
    for params in (SamplingParams.make(temperature=0.8, top_k=5, repetition_penalty=1.3),
                   SamplingParams.make(temperature=1.5, top_p=0.7),
                   SamplingParams.make(temperature=1.0, top_k=10, top_p=0.5, repetition_penalty=0.7)):
        ours = probabilities(logits, params, seen)
        x = torch.from_numpy(logits.copy())
        if params.repetition_penalty:
            # row 1 has no history: give transformers a history whose ids we then restore
            pen = lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(prompt, x.clone())
            pen[1] = x[1]
            x = pen
        x = lp.TemperatureLogitsWarper(params.temperature)(prompt, x)
        if params.top_k:
            x = lp.TopKLogitsWarper(params.top_k)(prompt, x)
        if params.top_p:
            x = lp.TopPLogitsWarper(params.top_p)(prompt, x)
        ref = torch.softmax(x.double(), -1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    # greedy with a repetition penalty is the argmax of the penalised logits
    p = SamplingParams.make(greedy=True, repetition_penalty=1.3)
    pen = lp.RepetitionPenaltyLogitsProcessor(1.3)(prompt[:1], torch.from_numpy(logits[:1].copy()))
    assert next_tokens(logits[:1], p, None, seen[:1])[0] == int(pen.argmax())


def test_sampling_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    params = SamplingParams.make(temperature=1.0, top_p=0.75)  # nucleus {0, 1}: 0.5 / 0.3
    rng = np.random.default_rng(123)
    draws = np.array([next_tokens(logits, params, rng)[0] for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.625) < 0.03
    with pytest.raises(KvtraceError, match="top_p"):
        SamplingParams.make(temperature=1.0, top_p=1.5)
    with pytest.raises(KvtraceError, match="temperature"):
        SamplingParams.make(greedy=False, temperature=-1.0)


# ------------------------------------------------------------------ CLI
def run_cli(argv, capsys):
    from kvtrace.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generate_json_and_stream(toy_dirs, capsys):
    d = str(toy_dirs["static"])
    rc, out, err = run_cli(["generate", d, "--prompt", "abc", "x", "--max-new-tokens", "4", "--json",
                            "--stop", "fg"], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["token_ids"] == ids("defg") and rows[0]["text"] == "de"
    assert rows[1]["token_ids"] == ids("yz{|") and rows[1]["text"] == "yz{|"
    rc, out, err = run_cli(["generate", d, "--input-ids", "5,6", "--max-new-tokens", "3", "--json",
                            "--greedy"], capsys)
    assert rc == 0 and json.loads(out) == {"token_ids": [7, 8, 9], "text": "\x05\x06\x07",
                                           "finish_reason": "length"}
    rc, out, err = run_cli(["generate", d, "--prompt", "hello", "--max-new-tokens", "3", "--stream"], capsys)
    assert rc == 0 and out == "pqr\n"


# ------------------------------------------------------------------ backend registry
def test_register_backend_and_auto_fallback(toy_dirs, tmp_path, capsys):
    import shutil

    from kvtrace.runtime import backends

    calls = []

    class Counting(backends.OrtBackend):  # a plug-in backend: the protocol, here on top of onnxruntime
        def run(self, feeds):
            calls.append(sorted(feeds))
            super().run(feeds)

    backends.register_backend("counting", lambda d, mf, **o: Counting(d, mf, **o))
    try:
        assert "counting" in backends.known_backends()
        m = Model.load(toy_dirs["static"], backend="counting")
        assert m.generate([[5]], max_new_tokens=3, stop_token_ids=[])[0].token_ids == [6, 7, 8]
        # one prefill and two decode runs; per step only ids and positions are fed
        assert calls == [["input_ids", "position_ids"]] * 3
    finally:
        backends._REGISTRY.pop("counting")
    # "auto" tries the engine a manifest names, and falls back (saying why) when it cannot run here
    d = tmp_path / "with_engine"
    shutil.copytree(toy_dirs["static"], d)
    mf = json.loads((d / io_spec.MANIFEST_NAME).read_text())
    mf["tensorrt"] = {"engine": "model.engine", "flavour": "tensorrt_rtx", "compute_capabilities": ["sm89"]}
    (d / io_spec.MANIFEST_NAME).write_text(json.dumps(mf))
    m = Model.load(d)
    assert m.backend_name == "onnxruntime" and m.skipped_backends and m.skipped_backends[0].startswith("tensorrt")
    rc, out, err = run_cli(["generate", str(d), "--input-ids", "5", "--max-new-tokens", "2", "--json"], capsys)
    assert rc == 0 and "kvtrace: note: backend tensorrt" in err and json.loads(out)["token_ids"] == [6, 7]
