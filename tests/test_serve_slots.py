"""Continuous batching without HTTP: the slot API over the static cache (runtime/slots.py), the
engine (runtime/scheduler.py), chat templates (runtime/chat.py, against transformers'
apply_chat_template), the export of a checkpoint's chat template, and the metrics format.

References: Model.generate on one prompt alone (the code `kvtrace generate` runs) on a separate
Model instance; the toy artifact (tests/runtime_toy.py), whose cache holds the token ids
themselves, for which rows a prefill and a step touch.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from kvtrace.runtime.model import Model
from kvtrace.runtime.sampling import SamplingParams
from kvtrace.runtime.scheduler import Done, Engine, Failed, Request, Token
from kvtrace.runtime.slots import SerialSlots, SlotBatch, make_slots
from tests.runtime_toy import build_toy


def ids(text):
    return [2 + b for b in text.encode()]


def rows_of(sb, model):
    """Per cache tensor, (B, S) token ids stored in each toy slot."""
    return [model.backend.to_host(buf)[:, 0, :, 0].astype(np.int64) for _, buf in sb.cache_rows()]


# ------------------------------------------------------------------ slot isolation (toy)
def test_prefill_writes_only_its_row(tmp_path):
    m = Model.load(build_toy(tmp_path / "toy", max_batch=4), backend="onnxruntime")
    sb = make_slots(m)
    assert isinstance(sb, SlotBatch) and sb.capacity == 4
    a, b = sb.acquire(), sb.acquire()
    assert (a, b) == (0, 1)
    assert sb.prefill(a, [5, 6, 7]).argmax() == 8 and sb.prefill(b, [9]).argmax() == 10
    assert sb.step([a, b], [50, 60]).argmax(-1).tolist() == [51, 61]
    before = [c.copy() for c in rows_of(sb, m)]
    c = sb.acquire()
    assert c == 2
    assert sb.prefill(c, [100, 101]).argmax() == 102
    for old, new in zip(before, rows_of(sb, m)):
        assert (new[[0, 1, 3]] == old[[0, 1, 3]]).all(), "a prefill touched another row"
        assert new[2, :3].tolist() == [100, 101, 0]
        assert new[0, :5].tolist() == [5, 6, 7, 50, 0] and new[1, :3].tolist() == [9, 60, 0]
    # row 0 finishes; rows 1..2 step together; row 0 is outside the span and stays as it was
    sb.release(a)
    assert sb.step([b, c], [61, 102]).argmax(-1).tolist() == [62, 103]
    for new in rows_of(sb, m):
        assert new[0, :5].tolist() == [5, 6, 7, 50, 0] and new[1, :3].tolist() == [9, 60, 61]
        assert new[2, :4].tolist() == [100, 101, 102, 0] and not new[3].any()
    # a free row inside the span [0, 3) steps on the pad token (1) at its own slot 0 only
    sb.release(b)
    a2 = sb.acquire()
    assert a2 == 0
    sb.prefill(a2, [7])
    sb.step([a2, c], [8, 103])
    for new in rows_of(sb, m):
        assert new[1, :3].tolist() == [1, 60, 61], "the free row in the span: pad at slot 0, the rest untouched"
        assert new[0, :2].tolist() == [7, 8] and new[2, :5].tolist() == [100, 101, 102, 103, 0]
    with pytest.raises(Exception, match="free or not prefilled"):
        sb.step([1], [3])


# ------------------------------------------------------------------ engine helpers
class Collector:
    """emit() target for one engine request: its events, and an Event set when it ends."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, (Done, Failed)):
            self.done.set()

    @property
    def tokens(self):
        return [e.token_id for e in self.events if isinstance(e, Token)]

    @property
    def end(self):
        return self.events[-1]


def run_engine(model, prompts, max_tokens, *, max_slots=None, params=SamplingParams(), seeds=None, timeout=60):
    eng = Engine(model, max_queue=len(prompts), max_slots=max_slots)
    eng.start()
    try:
        cols = [Collector() for _ in prompts]
        reqs = [Request(prompt_ids=list(p), max_tokens=mt, emit=c, params=params, seed=None if seeds is None else s)
                for p, mt, c, s in zip(prompts, max_tokens, cols, seeds or [None] * len(prompts))]
        eng.submit(reqs)
        for c in cols:
            assert c.done.wait(timeout), "engine request did not finish"
        return eng, cols
    finally:
        eng.stop()


PROMPTS = [[0, 5, 9, 33, 70, 2 + 9], [0, 11], [0, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [0, 7, 7],
           [0, 100, 3, 17, 64], [0, 1 + 90], [0, 12, 13, 14, 15, 16, 17, 18, 19], [0, 77, 78]]
NEW = [20, 6, 15, 30, 9, 25, 12, 18]  # different lengths: slots free and refill at different steps


@pytest.mark.parametrize("variant", ["llama_gqa_linear_tied", "neox_parallel_r025"])
def test_continuous_batching_equals_generate_alone(exported, variant):
    art = exported(variant, max_seq=64, max_batch=4)
    ref = Model.load(art, backend="onnxruntime")
    want = [ref.generate([p], max_new_tokens=n, greedy=True)[0] for p, n in zip(PROMPTS, NEW)]
    m = Model.load(art, backend="onnxruntime")
    eng, cols = run_engine(m, PROMPTS, NEW, max_slots=3)  # 8 requests through 3 slots
    assert eng.slots.mode == "continuous" and eng.m_steps.value() > 0
    for w, c in zip(want, cols):
        assert isinstance(c.end, Done) and c.end.finish_reason == w.finish_reason
        assert c.tokens == w.token_ids == c.end.token_ids
    # more decode steps than the longest request alone, fewer than all of them one after another:
    # requests overlapped
    assert max(len(w.token_ids) for w in want) <= eng.m_steps.value() < sum(len(w.token_ids) for w in want)

    # the check can fail: noise in one row of the cache after its prefill changes that row's tokens
    sb = SlotBatch(m, 2)
    b0, b1 = sb.acquire(), sb.acquire()
    logits = [sb.prefill(b0, PROMPTS[0]), sb.prefill(b1, PROMPTS[3])]
    rng = np.random.default_rng(0)
    for _, buf in sb.cache_rows():
        host = m.backend.to_host(buf)
        host[b1, :, : len(PROMPTS[3])] += rng.standard_normal(host[b1, :, : len(PROMPTS[3])].shape).astype(host.dtype)
    got = [[int(x.argmax())] for x in logits]
    for _ in range(NEW[3] - 1):
        out = sb.step([b0, b1], [got[0][-1], got[1][-1]])
        for g, row in zip(got, out):
            g.append(int(row.argmax()))
    n0, n3 = len(want[0].token_ids), len(want[3].token_ids)
    assert got[0][:n0] == want[0].token_ids, "the untouched row must not change"
    assert got[1][:n3] != want[3].token_ids, "noise in a row's cache went unnoticed"


def test_sampling_seeded_per_request(exported):
    """With a seed, a sampled request draws the same tokens alone or among others."""
    art = exported("llama_gqa_linear_tied", max_seq=64, max_batch=4)
    m = Model.load(art, backend="onnxruntime")
    params = SamplingParams(greedy=False, temperature=1.3, top_k=20)
    _, alone = run_engine(m, [PROMPTS[0]], [16], params=params, seeds=[7])
    _, mixed = run_engine(m, PROMPTS[:4], [16, 9, 16, 16], params=params, seeds=[7, 1, 2, 3])
    _, other = run_engine(m, [PROMPTS[0]], [16], params=params, seeds=[8])
    assert alone[0].tokens == mixed[0].tokens
    assert alone[0].tokens != other[0].tokens  # the seed matters


def test_dynamic_cache_served_one_at_a_time(exported):
    art = exported("neox_sequential_r100", layout="dynamic", max_seq=64, max_batch=4)
    ref = Model.load(art, backend="onnxruntime")
    want = [ref.generate([p], max_new_tokens=n, greedy=True)[0].token_ids for p, n in zip(PROMPTS[:4], NEW[:4])]
    m = Model.load(art, backend="onnxruntime")
    assert isinstance(make_slots(m), SerialSlots)
    eng, cols = run_engine(m, PROMPTS[:4], NEW[:4])
    assert eng.capacity == 1 and eng.slots.mode == "serial"
    assert [c.tokens for c in cols] == want


def test_non_finite_logits_fail_that_request_only(tmp_path):
    nan_id = ids("z")[0]
    m = Model.load(build_toy(tmp_path / "nan", max_batch=4, max_seq=32, nan_token=nan_id), backend="onnxruntime")
    # "w" -> x, y, z: the step that feeds z returns NaN logits; "a" counts up from b and is never near z
    eng, (bad, good) = run_engine(m, [ids("w"), ids("a")], [10, 10])
    assert isinstance(bad.end, Failed) and bad.end.status == 500 and bad.end.code == "non_finite_logits"
    assert bad.tokens == ids("xyz")
    assert isinstance(good.end, Done) and good.tokens == ids("bcdefghijk")
    assert eng.m_fail.value(code="non_finite_logits") == 1 and eng.active == 0


# ------------------------------------------------------------------ chat templates
def test_export_carries_chat_template_and_renders_like_transformers(tmp_path):
    from tests import serve_util as su
    from transformers import PreTrainedTokenizerFast

    from kvtrace.runtime.chat import load_chat_template

    ck = su.chat_checkpoint(tmp_path)
    art = su.export_cli(ck, tmp_path / "art", "--max-seq", "64")
    man = json.loads((art / "kvtrace.json").read_text())
    assert man["tokenizer"] == {"type": "file", "file": "tokenizer.json", "config": "tokenizer_config.json"}
    assert json.loads((art / "tokenizer_config.json").read_text())["chat_template"] == su.CHAT_TEMPLATE
    m = Model.load(art, backend="onnxruntime")
    tpl = load_chat_template(art, man["tokenizer"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ck / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    hf.chat_template = su.CHAT_TEMPLATE
    want_text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tpl.render(msgs) == want_text
    want_ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert m.tokenizer.encode(tpl.render(msgs), add_special_tokens=False) == list(want_ids)
    assert tpl.render(msgs, add_generation_prompt=False) != want_text

    # a checkpoint without a chat template: no config copied, nothing to render
    (ck / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    art2 = su.export_cli(ck, tmp_path / "art2", "--max-seq", "64")
    man2 = json.loads((art2 / "kvtrace.json").read_text())
    assert man2["tokenizer"] == {"type": "file", "file": "tokenizer.json"}
    assert not (art2 / "tokenizer_config.json").exists() and load_chat_template(art2, man2["tokenizer"]) is None


def test_chat_template_sandboxed_and_bad_templates(tmp_path):
    from kvtrace.errors import KvtraceError
    from kvtrace.runtime.chat import ChatTemplate, TemplateRejected, load_chat_template

    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateRejected):  # the sandbox refuses attribute access to Python internals
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateRejected, match="no tools"):
        ChatTemplate("{{ raise_exception('no tools') }}").render([])
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{% for %}"}')
    with pytest.raises(KvtraceError, match="tokenizer_config.json.*does not compile"):
        load_chat_template(tmp_path, {"type": "file", "config": "tokenizer_config.json"})
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(KvtraceError, match="tokenizer_config.json: cannot read"):
        load_chat_template(tmp_path, {"type": "file", "config": "tokenizer_config.json"})


# ------------------------------------------------------------------ metrics text format
def test_metrics_text_format():
    from kvtrace.runtime.metrics import Registry

    r = Registry()
    c = r.counter("x_total", "things", ["status"])
    c.inc(status="200")
    c.inc(2, status="429")
    r.gauge("q", "depth", lambda: 3)
    h = r.histogram("lat_seconds", "latency", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 5.0):
        h.observe(v)
    lines = r.render().splitlines()
    assert "# TYPE x_total counter" in lines and 'x_total{status="429"} 2' in lines
    assert "q 3" in lines and "# TYPE lat_seconds histogram" in lines
    assert ['lat_seconds_bucket{le="0.1"} 1', 'lat_seconds_bucket{le="1"} 3', 'lat_seconds_bucket{le="+Inf"} 4',
            "lat_seconds_count 4"] == [x for x in lines if x.startswith(("lat_seconds_b", "lat_seconds_c"))]
