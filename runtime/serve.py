"""`kvtrace serve`: an OpenAI-compatible HTTP server over one artifact. No torch.

HTTP stack: Starlette (routing, requests, streaming responses) on uvicorn (the ASGI server),
the `serve` extra (docs/serving.md says why). The engine (runtime/scheduler.py) runs the model
on its own thread; each HTTP request becomes one engine Request per prompt, whose events come
back to the event loop through an asyncio queue.

    GET  /health               200 {"status": "ok"} once the model is loaded and warm; 503 while
                               loading or shutting down (readiness and liveness probes)
    GET  /metrics              Prometheus text format (runtime/metrics.py)
    GET  /v1/models            the one model served
    POST /v1/completions       runtime/openai_api.py lists the parameters and extensions
    POST /v1/chat/completions  when the artifact ships a chat template (runtime/chat.py), else 400

Status codes: 400 bad request (OpenAI's error shape, naming the field), 401 missing or wrong
bearer token (with --api-key; /health and /metrics stay open for probes and scrapers), 404 unknown
model or route, 413 body over --max-body, 429 slots and queue full (Retry-After), 503 loading,
shutting down, or the deadline passed while queued (Retry-After), 504 the deadline passed while
generating, 500 the model produced non-finite logits for this request or an internal error. A
stream that fails after its first chunk ends with an SSE `data: {"error": {...}}` event (what
OpenAI's own streams do), then `data: [DONE]`.

A client that disconnects cancels its request: out of the queue at once, or its slot freed at the
engine's next iteration (one decode step at most). SIGTERM: the listening socket closes, requests
in flight finish (up to --grace seconds; then they are cancelled), the process exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvtrace import options
from kvtrace.errors import KvtraceError
from . import openai_api as api
from .metrics import CONTENT_TYPE, Registry
from .scheduler import Done, Draining, Engine, Failed, Overloaded, Request, Token

log = logging.getLogger("kvtrace.serve")
_DISCONNECT = object()  # queue sentinel: the client went away


class ServerState:
    """Everything the handlers share: options, the model and engine once loaded, metrics."""

    def __init__(self, args):
        self.args = args
        self.artifact = Path(args.artifact)
        self.model_name = args.model_name or self.artifact.resolve().name
        self.api_key = args.api_key or os.environ.get("KVTRACE_API_KEY") or None
        self.registry = Registry()
        self.m_requests = self.registry.counter(
            "kvtrace_requests_total", "API requests by outcome: the HTTP status, or 'cancelled' (client gone)",
            ["status"])
        self.model = None
        self.engine: Engine | None = None
        self.ctx: api.Context | None = None
        self.status = "loading"  # loading | ok | draining | failed
        self.load_error: str | None = None
        self.server = None  # the uvicorn Server, to stop it when loading fails
        self.created = int(time.time())

    # ------------------------------------------------------------------ loading (a thread)
    def load(self) -> None:
        try:
            from .chat import load_chat_template
            from .model import Model

            a = self.args
            opts = {"threads": a.threads} if a.threads else {}
            model = Model.load(self.artifact, backend=a.backend, **opts)
            for note in model.skipped_backends:
                log.warning("backend %s; using %s", note, model.backend_name)
            template = load_chat_template(self.artifact, model.manifest.get("tokenizer"))
            engine = Engine(model, max_queue=a.max_queue, max_slots=a.max_slots, registry=self.registry,
                            step_delay=a.step_delay_ms / 1000.0)
            self.ctx = api.Context(model_name=self.model_name, max_seq=model.max_seq,
                                   vocab_size=model.config.vocab_size, tokenizer=model.tokenizer,
                                   chat_template=template, timeout=a.timeout, encode=model.encode)
            _warm_up(engine)
            engine.start()
            self.model, self.engine = model, engine
            self.status = "ok" if self.status == "loading" else self.status
            log.warning("ready: %s (%s, %s cache, %d %s slot%s, chat template: %s)", self.model_name,
                        model.backend_name, model.layout, engine.capacity, engine.slots.mode,
                        "" if engine.capacity == 1 else "s", "yes" if template else "no")
        except Exception as e:  # noqa: BLE001 - reported as one line by main()
            self.load_error = str(e) if isinstance(e, KvtraceError) else f"{type(e).__name__}: {e}"
            self.status = "failed"
            if self.server is not None:
                self.server.should_exit = True

    def drain(self) -> None:
        self.status = "draining"
        if self.engine is not None:
            self.engine.drain()


def _warm_up(engine: Engine) -> None:
    """One prefill and one step before reporting ready: onnxruntime's first runs allocate and
    plan, which would otherwise land on the first requests."""
    if engine.model.max_seq < 2:  # a prompt of one token and one new token need two positions
        raise KvtraceError(f"the artifact holds {engine.model.max_seq} position(s): no request could fit a prompt "
                           "and a completion; export it with a larger --max-seq")
    s = engine.slots
    b = s.acquire()
    try:
        tok = engine.model.pad_token_id
        s.prefill(b, [tok] * min(8, engine.model.max_seq - 1))
        s.step([b], [tok])
    finally:
        s.release(b)


# ---------------------------------------------------------------------------- helpers
def _error(state: ServerState, e: api.ApiError) -> JSONResponse:
    state.m_requests.inc(status=str(e.status))
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _retry_after(state: ServerState) -> str:
    """Seconds until a slot is likely free: the mean request duration times the queue ahead, per slot."""
    eng = state.engine
    h = eng.m_e2e if eng is not None else None
    mean = h.mean if h is not None and h.count else 1.0
    waiting = (eng.queue_depth + 1) if eng is not None else 1
    return str(int(min(60, max(1, math.ceil(mean * waiting / max(1, eng.capacity if eng else 1))))))


def _check_auth(state: ServerState, request: HttpRequest) -> None:
    if state.api_key is None:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise api.ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the "
                           "server's --api-key", type="invalid_request_error", code="invalid_api_key")


def _check_ready(state: ServerState) -> None:
    if state.status == "loading":
        raise api.ApiError(503, "the model is still loading; retry shortly", type="server_error",
                           code="model_loading", headers={"Retry-After": "1"})
    if state.status != "ok":
        raise api.ApiError(503, "the server is shutting down", type="server_error", code="server_shutdown")


async def _json_body(state: ServerState, request: HttpRequest) -> dict:
    limit = state.args.max_body
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise api.ApiError(413, f"request body of {cl} bytes exceeds the server's limit of {limit} bytes "
                           "(--max-body)", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise api.ApiError(413, f"request body exceeds the server's limit of {limit} bytes (--max-body)",
                               code="request_too_large")

    def no_constants(c):
        raise ValueError(f"{c} is not valid JSON")

    try:
        data = json.loads(bytes(body), parse_constant=no_constants)
    except RecursionError:  # '[[[[...' nested deeper than the parser recurses: a bad body, not a 500
        raise api.ApiError(400, "We could not parse the JSON body of your request: nested too deeply",
                           code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise api.ApiError(400, f"We could not parse the JSON body of your request: {e}",
                           code="invalid_json") from None
    if not isinstance(data, dict):
        raise api.ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


async def _watch_disconnect(request: HttpRequest, q: asyncio.Queue) -> None:
    """Put the sentinel into q when the client disconnects (the request body was read already:
    uvicorn's receive() then waits for the disconnect, or returns it once the response is sent)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            q.put_nowait((None, _DISCONNECT))
            return


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _SSEResponse(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (finished, client gone, cancelled
    by the server's shutdown), even when the body iterator never started."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# ---------------------------------------------------------------------------- generation
class _Job:
    """One HTTP request: its engine requests (one per prompt) and the queue their events arrive on."""

    def __init__(self, state: ServerState, p: api.GenParams, chat: bool):
        self.state, self.p, self.chat = state, p, chat
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()
        self.id = api.new_id("chatcmpl" if chat else "cmpl")
        self.created = api.now()
        eng = state.engine
        deadline = time.monotonic() + p.timeout
        stops = (eng.default_stops | p.extra_stop_ids) if p.extra_stop_ids else None
        self.reqs = []
        for i, (ids, mt) in enumerate(zip(p.prompts, p.max_tokens)):
            self.reqs.append(Request(prompt_ids=ids, max_tokens=mt, emit=self._emitter(i), params=p.sampling,
                                     seed=p.seed, stop_ids=stops, stop_strings=p.stop, logprobs=p.logprobs,
                                     deadline=deadline))
        self.outcome: str | None = None  # what kvtrace_requests_total counts

    def _emitter(self, i: int):
        loop, q = self.loop, self.q

        def emit(ev):  # engine thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, (i, ev))
            except RuntimeError:  # the event loop is closed: the server is gone
                pass
        return emit

    def cancel_all(self) -> int:
        return sum(self.state.engine.cancel(r) for r in self.reqs)

    def count(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.state.m_requests.inc(status=outcome)

    # ------------------------------------------------------------------ shapes
    def _chunk(self, i: int, text: str | None, finish: str | None, lp=None, token_ids=None, role=False) -> dict:
        if self.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
            if token_ids is not None:
                choice["token_ids"] = token_ids
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name,
                "choices": [choice]}

    def _usage_chunk(self, prompt: int, completion: int) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": [],
                "usage": api.usage(prompt, completion)}

    def _final(self, done: list[Done], lps: list) -> dict:
        choices = []
        for i, d in enumerate(done):
            text = d.text if d.text is not None else ""
            lp = lps[i].body() if lps[i] is not None else None
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": api.FINISH[d.finish_reason]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": api.FINISH[d.finish_reason],
                                "token_ids": d.token_ids})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": choices,
                "usage": api.usage(sum(d.prompt_tokens for d in done), sum(len(d.token_ids) for d in done))}

    def _lp(self):
        return api.LogprobsBuilder(self.state.model.tokenizer, self.chat) if self.p.logprobs is not None else None

    # ------------------------------------------------------------------ run
    async def respond(self, request: HttpRequest) -> Response:
        st = self.state
        most = st.engine.capacity + st.engine.max_queue
        if len(self.reqs) > most:  # would never fit, however long the client waits: not a 429
            raise api.ApiError(400, f"this request holds {len(self.reqs)} prompts; this server takes at most {most} "
                               "at once (slots + --max-queue): send them in smaller requests",
                               param="messages" if self.chat else "prompt")
        try:
            st.engine.submit(self.reqs)
        except Overloaded as e:
            raise api.ApiError(429, f"{e}; retry later", type="rate_limit_error", code="server_overloaded",
                               headers={"Retry-After": _retry_after(st)}) from None
        except Draining as e:
            raise api.ApiError(503, str(e), type="server_error", code="server_shutdown") from None
        watcher = asyncio.ensure_future(_watch_disconnect(request, self.q))
        try:
            if not self.p.stream:
                return await self._collect()
            first = await self.q.get()  # headers wait for the first event: an early failure keeps its status
        except BaseException:  # a failure, or this task cancelled (shutdown past --grace)
            self.cancel_all()
            raise
        finally:
            watcher.cancel()  # a stream: StreamingResponse listens for the disconnect itself from here on
        if first[1] is _DISCONNECT:
            return self._gone()
        if isinstance(first[1], Failed):
            self.cancel_all()
            raise self._api_error(first[1])
        return _SSEResponse(self._stream(first), on_close=self._closed)

    def _gone(self) -> Response:
        self.cancel_all()
        self.count("cancelled")
        return Response(status_code=499)  # nobody reads it

    def _closed(self) -> None:
        if self.cancel_all():
            self.count("cancelled")
        self.count("200")

    def _api_error(self, f: Failed) -> api.ApiError:
        headers = {"Retry-After": _retry_after(self.state)} if f.status in (429, 503) else None
        return api.ApiError(f.status, f.message, type=api.error_type(f.status), code=f.code, headers=headers)

    async def _collect(self) -> Response:
        n = len(self.reqs)
        done: list[Done | None] = [None] * n
        lps = [self._lp() for _ in range(n)]
        left = n
        while left:
            i, ev = await self.q.get()
            if ev is _DISCONNECT:
                return self._gone()
            if isinstance(ev, Token):
                if lps[i] is not None:
                    lps[i].add(ev)
            elif isinstance(ev, Done):
                done[i] = ev
                left -= 1
            elif isinstance(ev, Failed):
                self.cancel_all()
                raise self._api_error(ev)
        self.count("200")
        return JSONResponse(self._final(done, lps))

    async def _stream(self, first):
        n = len(self.reqs)
        lps = [self._lp() for _ in range(n)]
        left, pending = n, [first]
        prompt_tokens = completion_tokens = 0
        unsent: list[list[int]] = [[] for _ in range(n)]  # completions: token ids since the last chunk
        if self.chat:  # OpenAI's chat streams open with the role
            for i in range(n):
                yield _sse(self._chunk(i, "", None, role=True))
        while left:
            i, ev = pending.pop() if pending else await self.q.get()
            if ev is _DISCONNECT:
                return
            if isinstance(ev, Token):
                unsent[i].append(ev.token_id)
                lp = lps[i].entry(ev) if lps[i] is not None else None
                # a token whose text is held back (a possible stop string, an incomplete character)
                # goes out with the next chunk that has text
                if ev.text or lp is not None or self.state.model.tokenizer is None:
                    yield _sse(self._chunk(i, ev.text, None, lp, token_ids=None if self.chat else unsent[i]))
                    unsent[i] = []
            elif isinstance(ev, Done):
                left -= 1
                prompt_tokens += ev.prompt_tokens
                completion_tokens += len(ev.token_ids)
                yield _sse(self._chunk(i, "" if not self.chat else None, api.FINISH[ev.finish_reason],
                                       token_ids=None if self.chat else unsent[i]))
                unsent[i] = []
            elif isinstance(ev, Failed):  # after the headers: OpenAI's in-stream error event
                self.cancel_all()
                self.count(str(ev.status))
                yield _sse(api.error_body(ev.message, api.error_type(ev.status), None, ev.code))
                yield b"data: [DONE]\n\n"
                return
        if self.p.include_usage:
            yield _sse(self._usage_chunk(prompt_tokens, completion_tokens))
        yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------- the app
def build_app(state: ServerState) -> Starlette:
    async def generation(request: HttpRequest, chat: bool) -> Response:
        try:
            _check_auth(state, request)
            _check_ready(state)
            body = await _json_body(state, request)
            if chat:
                p, _ = api.parse_chat(body, state.ctx)
            else:
                p = api.parse_completion(body, state.ctx)
            job = _Job(state, p, chat)
            return await job.respond(request)
        except api.ApiError as e:
            return _error(state, e)
        except ClientDisconnect:  # the client left while sending its body: nothing ran, nobody to answer
            state.m_requests.inc(status="cancelled")
            return Response(status_code=499)

    async def completions(request):
        return await generation(request, chat=False)

    async def chat_completions(request):
        return await generation(request, chat=True)

    async def models(request):
        try:
            _check_auth(state, request)
        except api.ApiError as e:
            return _error(state, e)
        data = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kvtrace"}
        if state.model is not None:
            m = state.model
            data.update({"max_model_len": m.max_seq, "architecture": m.config.arch,
                         "chat": state.ctx.chat_template is not None})
        return JSONResponse({"object": "list", "data": [data]})

    async def health(request):
        code = 200 if state.status == "ok" else 503
        return JSONResponse({"status": state.status}, status_code=code)

    async def metrics(request):
        return Response(state.registry.render(), media_type=CONTENT_TYPE)

    async def http_error(request, exc: HTTPException):
        msg = {404: f"no route {request.url.path} (see /v1/models, /v1/completions, /v1/chat/completions)",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(state, api.ApiError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None))

    async def internal_error(request, exc: Exception):
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc, exc_info=exc)
        return _error(state, api.ApiError(500, "internal server error", type="server_error", code="internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="kvtrace-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


# ---------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("artifact")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port; the address is printed)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, onnxruntime-cuda, tensorrt")
    p.add_argument("--threads", type=options.integer(1), help="onnxruntime intra-op threads (default: onnxruntime's)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; past slots + queue: 429 (default 64)")
    p.add_argument("--max-slots", type=int, help="concurrent sequences (default and maximum: the artifact's max_batch)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $KVTRACE_API_KEY; "
                   "none: open)")
    p.add_argument("--model-name", help="the model id clients send (default: the artifact directory's name)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds (default 600)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="after SIGTERM, seconds to let requests in flight finish (default 30)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes (default 1 MiB)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--step-delay-ms", type=options.number(0.0), default=0.0,
                   help="sleep before every decode step (a testing aid: makes overload, deadlines and "
                   "disconnects reproducible on a tiny model)")


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise KvtraceError(f"--host {host}: cannot resolve it ({e})") from e
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise KvtraceError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from e
    sock.set_inheritable(True)
    return sock


def _check_api_key(args) -> None:
    """A key no client can send would lock everyone out; an explicitly empty one would serve with
    no key at all (`--api-key "$KEY"` with KEY unset)."""
    if args.api_key is not None and not args.api_key:
        raise KvtraceError("--api-key '': empty; leave --api-key out to serve without a key")
    name, key = ("--api-key", args.api_key) if args.api_key else ("$KVTRACE_API_KEY", os.environ.get("KVTRACE_API_KEY"))
    if key and not (key.isascii() and key.isprintable() and " " not in key):
        raise KvtraceError(f"{name}: the key must be printable ASCII without spaces: clients send it in an HTTP "
                           "header ('Authorization: Bearer KEY'), which cannot carry it as given")


def main(args) -> int:
    import uvicorn

    from kvtrace.manifest import load_manifest

    for name, v, lo in (("--port", args.port, 0), ("--max-queue", args.max_queue, 0), ("--max-body", args.max_body, 1)):
        if v < lo:
            raise KvtraceError(f"{name} {v}: must be >= {lo}")
    if args.port > 65535:
        raise KvtraceError(f"--port {args.port}: must be <= 65535")
    if args.max_slots is not None and args.max_slots < 1:
        raise KvtraceError(f"--max-slots {args.max_slots}: must be >= 1")
    for name, v in (("--timeout", args.timeout), ("--grace", args.grace)):
        if not (v > 0 and math.isfinite(v)):
            raise KvtraceError(f"{name} {v}: must be a positive number of seconds")
    if args.step_delay_ms < 0:
        raise KvtraceError(f"--step-delay-ms {args.step_delay_ms}: must be >= 0")
    _check_api_key(args)
    load_manifest(args.artifact)  # a bad artifact fails here, in one line, before anything listens
    logging.basicConfig(level=logging.WARNING, format="kvtrace serve: %(message)s", stream=sys.stderr)
    state = ServerState(args)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(state), log_level="warning", access_log=args.access_log, lifespan="on",
                            timeout_graceful_shutdown=args.grace, timeout_keep_alive=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop taking work, let the rest finish
            state.drain()
            super().handle_exit(sig, frame)

    server = Server(config)
    state.server = server
    shown = f"[{host}]" if ":" in host else host
    print(f"kvtrace serve: listening on http://{shown}:{port} (model {state.model_name}; loading)",
          file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM after a graceful
    # drain is a normal end here (exit 0), so its handler during that re-raise does nothing
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    if state.load_error:
        raise KvtraceError(f"{args.artifact}: {state.load_error}")
    print("kvtrace serve: stopped", file=sys.stderr, flush=True)
    return 0
