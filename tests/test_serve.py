"""`kvtrace serve` against live servers on 127.0.0.1 (tests/serve_util.py starts them as
subprocesses on a port the OS picks, and stops them). Clients: the official `openai` package, and
http.client / raw sockets where the test needs the bytes on the wire (errors, disconnects).

Every load loop is bounded in count and time. References: `kvtrace generate` (the CLI, in this
process) for the same prompt alone, and transformers' apply_chat_template for the chat prompt.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra (starlette, uvicorn, jinja2) is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client (the 'test' extra) is not installed")

from tests import serve_util as su  # noqa: E402
from tests.runtime_toy import build_toy  # noqa: E402

KEY = "test-key-123"
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def chat_art(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    return su.export_cli(su.chat_checkpoint(tmp), tmp / NAME, "--max-seq", "128", "--max-batch", "4")


@pytest.fixture(scope="module")
def server(chat_art):
    """Full speed, 4 slots, API key required."""
    with su.Server(chat_art, "--api-key", KEY, "--max-queue", "64") as s:
        yield s
        rc, err = s.stop()
        assert rc == 0, err
        assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def slow(chat_art):
    """2 slots, a queue of 2, 20 ms per decode step: requests stay in flight long enough to
    overload, time out and disconnect deterministically."""
    with su.Server(chat_art, "--max-slots", "2", "--max-queue", "2", "--step-delay-ms", "20") as s:
        yield s
        rc, err = s.stop()
        assert rc == 0, err


def client(s, key=KEY, **kw):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def generate_cli(art, prompt: str, n: int, capsys) -> dict:
    """`kvtrace generate ART --prompt P --greedy --json`: the reference, one prompt alone."""
    from kvtrace.cli import main

    capsys.readouterr()
    assert main(["generate", str(art), "--prompt", prompt, "--max-new-tokens", str(n), "--greedy", "--json",
                 "--backend", "onnxruntime"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def post(s, path, body, key=KEY, **kw):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    return s.request("POST", path, body, headers=h, **kw)


# ------------------------------------------------------------------ the openai client
def test_completions_openai_client(server, chat_art, capsys):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [NAME]
    want = generate_cli(chat_art, "Hello world", 12, capsys)
    r = c.completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0)
    ch = r.choices[0]
    assert ch.text == want["text"] and ch.token_ids == want["token_ids"]
    assert ch.finish_reason == {"length": "length"}.get(want["finish_reason"], "stop")
    assert r.usage.prompt_tokens == 12 and r.usage.completion_tokens == len(want["token_ids"])
    assert r.usage.total_tokens == 12 + len(want["token_ids"])
    # streaming: the same text, chunk by chunk, then the usage chunk
    chunks = list(c.completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(x.choices[0].text for x in chunks if x.choices) == want["text"]
    assert sum(1 for x in chunks if x.choices and x.choices[0].text) > 1  # it did stream
    assert chunks[-1].usage.completion_tokens == len(want["token_ids"]) and chunks[-1].choices == []
    # token ids in, several prompts in one request, logprobs of the chosen token
    ids = [0] + [5, 6, 7]
    r = c.completions.create(model=NAME, prompt=[ids, [0, 9]], max_tokens=5, temperature=0, logprobs=2)
    assert [x.index for x in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 and max(t.values()) >= v - 1e-9 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-9 for t, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_chat_openai_client(server, chat_art):
    from transformers import PreTrainedTokenizerFast

    from kvtrace.runtime.model import Model

    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(chat_art / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    hf.chat_template = su.CHAT_TEMPLATE
    prompt_ids = list(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    want = Model.load(chat_art, backend="onnxruntime").generate([prompt_ids], max_new_tokens=10, greedy=True)[0]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(want.token_ids)
    stream = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(x.choices[0].delta.content or "" for x in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    # sampling with a seed is reproducible
    a, b = (c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=1.0, top_p=0.9,
                                      seed=5).choices[0].message.content for _ in range(2))
    assert a == b
    # the template's own check (tool messages) is a 400 naming the messages
    with pytest.raises(openai.BadRequestError, match="tool messages are not supported"):
        c.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x"}], max_tokens=2)


def test_stop_strings(server):
    c = client(server)
    full = c.completions.create(model=NAME, prompt="Hello world", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:7]
    cut = full[: full.index(stop)]
    r = c.completions.create(model=NAME, prompt="Hello world", max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model=NAME, prompt="Hello world", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut  # held back text that began the stop string is never streamed


# ------------------------------------------------------------------ concurrency
def test_64_requests_from_16_clients_equal_generate_alone(server, chat_art, capsys):
    prompts = [f"Prompt {i}: " + "abcdefghij"[: i % 10] + " the end" * (i % 3) for i in range(16)]
    n_new = [8 + (i * 5) % 23 for i in range(16)]
    want = [generate_cli(chat_art, p, n, capsys) for p, n in zip(prompts, n_new)]
    before = server.metrics()

    def one_client(k):
        c = client(server)
        got = []
        for j in range(4):  # 16 clients x 4 requests; half of them stream
            i = (k + 5 * j) % 16
            if (k + j) % 2:
                chunks = list(c.completions.create(model=NAME, prompt=prompts[i], max_tokens=n_new[i], temperature=0,
                                                   stream=True))
                text = "".join(x.choices[0].text for x in chunks)
                ids = [t for x in chunks for t in x.choices[0].token_ids]  # extension: each chunk's tokens
                got.append((i, text, ids, chunks[-1].choices[0].finish_reason))
            else:
                r = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=n_new[i], temperature=0)
                got.append((i, r.choices[0].text, r.choices[0].token_ids, r.choices[0].finish_reason))
        return got

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as ex:
        results = [x for f in [ex.submit(one_client, k) for k in range(16)] for x in f.result(timeout=120)]
    elapsed = time.monotonic() - t0
    assert len(results) == 64
    for i, text, ids, finish in results:
        assert text == want[i]["text"], (i, prompts[i])
        if ids is not None:
            assert ids == want[i]["token_ids"]
        assert finish == ("length" if want[i]["finish_reason"] == "length" else "stop")
    after = server.metrics()
    assert after['kvtrace_requests_total{status="200"}'] - before['kvtrace_requests_total{status="200"}'] == 64
    # requests were batched: fewer decode steps than tokens generated
    steps = after["kvtrace_decode_steps_total"] - before["kvtrace_decode_steps_total"]
    toks = after["kvtrace_generation_tokens_total"] - before["kvtrace_generation_tokens_total"]
    assert steps < 0.6 * toks, (steps, toks)
    assert after["kvtrace_active_slots"] == 0 and after["kvtrace_queue_depth"] == 0
    print(f"64 requests / 16 clients: {elapsed:.1f} s, {toks:.0f} tokens in {steps:.0f} decode steps")


# ------------------------------------------------------------------ overload, disconnects, deadlines
def test_overload_gets_clean_429(slow):
    body = {"model": NAME, "prompt": "Overload", "max_tokens": 40, "temperature": 0}

    def one(_):
        return post(slow, "/v1/completions", body, key=None, timeout=30)

    with ThreadPoolExecutor(12) as ex:
        res = list(ex.map(one, range(12), timeout=60))
    ok = [json.loads(b) for st, h, b in res if st == 200]
    busy = [(h, json.loads(b)) for st, h, b in res if st == 429]
    assert len(ok) + len(busy) == 12, [r[0] for r in res]
    assert len(ok) >= 4 and busy  # 2 slots + 2 queue places at least; the rest refused
    for r in ok:
        assert r["choices"][0]["finish_reason"] == "length" and len(r["choices"][0]["token_ids"]) == 40
    for h, b in busy:
        assert int(h["retry-after"]) >= 1
        assert set(b["error"]) == {"message", "type", "param", "code"} and b["error"]["type"] == "rate_limit_error"
    slow.wait_metric("kvtrace_active_slots", lambda v: v == 0)


def _open_stream(s, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnect_frees_the_slot(slow):
    before = slow.metrics()
    sock = _open_stream(slow, {"model": NAME, "prompt": "Bye", "max_tokens": 120, "temperature": 0, "stream": True})
    got = b""
    t0 = time.monotonic()
    while got.count(b"data: ") < 3 and time.monotonic() - t0 < 10:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"data: ") >= 3
    slow.wait_metric("kvtrace_active_slots", lambda v: v == 1)
    sock.close()  # 120 tokens x 20 ms = 2.4 s: the request is far from done
    slow.wait_metric("kvtrace_active_slots", lambda v: v == 0, timeout=1.5)
    m = slow.metrics()
    assert m.get('kvtrace_requests_total{status="cancelled"}', 0) == \
        before.get('kvtrace_requests_total{status="cancelled"}', 0) + 1
    assert m["kvtrace_generation_tokens_total"] - before["kvtrace_generation_tokens_total"] < 100
    # a non-streaming request whose client leaves at once is cancelled too
    body = {"model": NAME, "prompt": "Bye", "max_tokens": 120, "temperature": 0}
    sock = _open_stream(slow, body)
    slow.wait_metric("kvtrace_active_slots", lambda v: v == 1)
    sock.close()
    slow.wait_metric("kvtrace_active_slots", lambda v: v == 0, timeout=1.5)
    slow.wait_metric('kvtrace_requests_total{status="cancelled"}',
                     lambda v: v == before.get('kvtrace_requests_total{status="cancelled"}', 0) + 2)


def test_deadlines(slow):
    t0 = time.monotonic()
    # greedy: a sampled EOS could end the request before its deadline (measured: 1 run in 60 with
    # sampling finished after 10 tokens with 200); greedy "Slow" runs all 100 tokens (2 s)
    st, h, b = post(slow, "/v1/completions", {"model": NAME, "prompt": "Slow", "max_tokens": 100, "timeout": 0.3,
                                              "temperature": 0}, key=None)
    assert st == 504 and json.loads(b)["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - t0 < 1.5
    # streaming: the deadline arrives after the first chunks -> an error event ends the stream
    c = client(slow)
    with pytest.raises(openai.APIError, match="deadline"):
        for _ in c.completions.create(model=NAME, prompt="Slow", max_tokens=100, stream=True, temperature=0,
                                      extra_body={"timeout": 0.3}):
            pass
    # waiting in the queue past the deadline: 503 with Retry-After
    body = {"model": NAME, "prompt": "Hold", "max_tokens": 30, "temperature": 0}
    with ThreadPoolExecutor(2) as ex:
        holders = [ex.submit(post, slow, "/v1/completions", body, None) for _ in range(2)]
        slow.wait_metric("kvtrace_active_slots", lambda v: v == 2)
        st, h, b = post(slow, "/v1/completions", {**body, "timeout": 0.2}, key=None)
        assert st == 503 and json.loads(b)["error"]["code"] == "queue_timeout" and "retry-after" in h
        assert all(f.result(timeout=30)[0] == 200 for f in holders)
    slow.wait_metric("kvtrace_active_slots", lambda v: v == 0)


# ------------------------------------------------------------------ bad requests and auth
BAD = [  # (body, status, param or None, message fragment)
    ({"model": NAME, "prompt": "x", "foo": 1}, 400, "foo", "Unrecognized request argument"),
    ({"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({"model": NAME, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ({"model": NAME, "prompt": "x", "max_tokens": True}, 400, "max_tokens", "integer"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "<= 2"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "> 0"),
    ({"model": NAME, "prompt": "x", "top_k": -2}, 400, "top_k", ">= -1"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream", "boolean"),
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"model": NAME, "prompt": 5}, 400, "prompt", "must be a string"),
    ({"model": NAME, "prompt": []}, 400, "prompt", "must be a string"),
    ({"model": NAME, "prompt": [[]]}, 400, "prompt", "empty"),
    ({"model": NAME, "prompt": [1, 999]}, 400, "prompt", "token id 999 is out of range"),
    ({"model": NAME, "prompt": ["a", 1]}, 400, "prompt", "must be a string"),
    ({"model": NAME}, 400, "prompt", "provide a prompt"),
    ({"prompt": "x"}, 400, "model", "model parameter"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "n", "not supported"),
    ({"model": NAME, "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"model": NAME, "prompt": "x", "logprobs": 6}, 400, "logprobs", "between 0 and 5"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": NAME, "prompt": "x", "stop": 3}, 400, "stop", "string"),
    ({"model": NAME, "prompt": "x", "seed": -1}, 400, "seed", "between 0"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"model": NAME, "prompt": "x" * 120, "max_tokens": 16}, 400, "max_tokens", "maximum context length is 128"),
    ({"model": NAME, "prompt": "x" * 200}, 400, "prompt", "maximum context length is 128"),
    ({"model": NAME, "prompt": "x", "max_tokens": 500}, 400, "max_tokens", "maximum context length is 128"),
]
BAD_CHAT = [
    ({"model": NAME, "messages": []}, 400, "messages", "non-empty"),
    ({"model": NAME, "messages": "hi"}, 400, "messages", "non-empty"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "must be one of"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x", "mood": 1}]}, 400, "messages[0].mood",
     "Unrecognized"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools",
     "not supported"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs",
     "logprobs"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x" * 130}]}, 400, "messages",
     "maximum context length"),
]


def _check_error(st, h, b, status, param, fragment):
    assert st == status, (st, b)
    err = json.loads(b)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"] and err["param"] == param, err
    assert "Traceback" not in b.decode()


def test_bad_requests(server):
    for body, status, param, frag in BAD:
        _check_error(*post(server, "/v1/completions", body), status, param, frag)
    for body, status, param, frag in BAD_CHAT:
        _check_error(*post(server, "/v1/chat/completions", body), status, param, frag)
    for raw, frag in ((b"{bad", "could not parse"), (b"[1, 2]", "JSON object"), (b'{"model": NaN}', "NaN"),
                      (b"\xff\xfe", "could not parse")):
        _check_error(*post(server, "/v1/completions", raw), 400, None, frag)
    st, h, b = post(server, "/v1/completions", b"{" + b" " * (2 << 20) + b"}")
    assert st == 413 and json.loads(b)["error"]["code"] == "request_too_large"
    st, h, b = server.request("GET", "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert st == 404 and json.loads(b)["error"]["message"].startswith("no route")
    st, h, b = server.request("GET", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert st == 405 and "error" in json.loads(b)
    # the server is fine afterwards
    assert post(server, "/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 2})[0] == 200
    m = server.metrics()
    assert m.get('kvtrace_requests_total{status="500"}', 0) == 0


def test_auth(server):
    body = {"model": NAME, "prompt": "x", "max_tokens": 2}
    for key in (None, "wrong"):
        st, h, b = post(server, "/v1/completions", body, key=key)
        assert st == 401 and json.loads(b)["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, key="nope").completions.create(model=NAME, prompt="x", max_tokens=2)
    assert post(server, "/v1/completions", body)[0] == 200
    # probes and scrapers need no key
    assert server.request("GET", "/health")[0] == 200 and server.request("GET", "/metrics")[0] == 200


# ------------------------------------------------------------------ per-request faults, shutdown
def test_non_finite_logits_fail_one_request(tmp_path):
    nan_id = 2 + ord("z")
    art = build_toy(tmp_path / "nan-toy", max_batch=4, max_seq=32, nan_token=nan_id)
    with su.Server(art, "--model-name", "toy") as s:
        c = client(s)
        # 'w' -> x, y, z: the step fed z gives NaN logits; 'a' counts b, c, ... and never gets near z
        with ThreadPoolExecutor(2) as ex:
            bad = ex.submit(post, s, "/v1/completions", {"model": "toy", "prompt": "w", "max_tokens": 10,
                                                           "temperature": 0}, None)
            good = ex.submit(c.completions.create, model="toy", prompt="a", max_tokens=10, temperature=0)
            st, h, b = bad.result(timeout=30)
            assert good.result(timeout=30).choices[0].text == "bcdefghijk"
        assert st == 500 and json.loads(b)["error"]["code"] == "non_finite_logits"
        # streamed: the failure arrives as an error event after the first chunks
        with pytest.raises(openai.APIError, match="non-finite"):
            list(c.completions.create(model="toy", prompt="w", max_tokens=10, stream=True, temperature=0))
        assert c.completions.create(model="toy", prompt="a", max_tokens=3, temperature=0).choices[0].text == "bcd"
        # no chat template in this artifact: a clear 400
        st, h, b = post(s, "/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": "x"}]},
                        None)
        assert st == 400 and json.loads(b)["error"]["code"] == "no_chat_template"
        rc, err = s.stop()
        assert rc == 0, err


def test_sigterm_drains_in_flight_requests(chat_art):
    with su.Server(chat_art, "--step-delay-ms", "20", "--grace", "20") as s:
        body = {"model": NAME, "prompt": "Drain", "max_tokens": 30, "temperature": 0, "stream": True}
        c = client(s)
        results = []

        def consume():
            chunks = list(c.completions.create(**body))
            results.append(("".join(x.choices[0].text for x in chunks), chunks[-1].choices[0].finish_reason))

        threads = [threading.Thread(target=consume) for _ in range(3)]
        for t in threads:
            t.start()
        s.wait_metric("kvtrace_active_slots", lambda v: v == 3)
        t0 = time.monotonic()
        s.proc.send_signal(__import__("signal").SIGTERM)
        time.sleep(0.2)
        with pytest.raises(OSError):  # no longer accepting connections
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
        for t in threads:
            t.join(30)
        rc, err = s.stop()
        assert rc == 0, err
        assert len(results) == 3 and all(f == "length" for _, f in results), results
        assert len({text for text, _ in results}) == 1  # complete and identical (same prompt, greedy)
        assert time.monotonic() - t0 < 15


def test_serve_bad_options(tmp_path, capsys):
    from kvtrace.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    art = build_toy(tmp_path / "t")
    assert main(["serve", str(art), "--max-queue", "-1"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    # a model file onnxruntime cannot load: found by the loading thread, the server stops, one line
    (art / "model.onnx").write_bytes(b"not an onnx file")
    p = __import__("subprocess").run([__import__("sys").executable, "-m", "kvtrace.cli", "serve", str(art), "--port", "0"],
                                     capture_output=True, text=True, timeout=60, cwd=su.ROOT)
    assert p.returncode == 2 and "onnxruntime cannot load" in p.stderr and "Traceback" not in p.stderr, p.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", str(art), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen" in capsys.readouterr().err


def test_serve_modules_import_without_torch(tmp_path):
    from tests.test_no_torch import _run_blocked

    p = _run_blocked(tmp_path, "import sys, kvtrace.runtime.serve, kvtrace.runtime.scheduler, kvtrace.runtime.chat; "
                     "print(sorted(n for n in sys.modules if n.split('.')[0] == 'torch'))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
