"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions. No torch, no HTTP.

Requests are checked strictly, as OpenAI does: a wrong type, a value out of range or an unknown
field is a 400 in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}), naming
the field. Parameters OpenAI has and this server does not implement (n > 1, best_of, echo, suffix,
logit_bias, presence/frequency penalties, tools, response formats) are accepted at their
defaults only, and refused with a 400 saying so otherwise.

Extensions (not in OpenAI's API): `top_k` (int, 0 or -1: off), `repetition_penalty` (> 0,
transformers' rule, runtime/sampling.py), `timeout` (seconds; shortens the server's --timeout
for this request). Completion choices also carry `token_ids` (the generated ids).

Semantics follow OpenAI: temperature defaults to 1 (sampling); temperature 0 is greedy. max_tokens
defaults to 16 for completions and to the rest of the cache for chat.
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

from kvtrace.errors import KvtraceError
from .sampling import SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # completions: logprobs 0..5
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs 0..20

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "presence_penalty", "frequency_penalty", "logit_bias", "user",
           "top_k", "repetition_penalty", "timeout"}  # the last three: extensions
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                         "tools", "tool_choice", "parallel_tool_calls", "metadata", "store", "service_tier"}
MESSAGE_FIELDS = {"role", "content", "name"}
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error",
            504: "timeout_error"}.get(status, "server_error")


# ------------------------------------------------------------------------ field checks
def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _int(body, name, default=None, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"'{name}' must be an integer, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"'{name}' must be {_range(lo, hi)}, got {v}")
    return v


def _num(body, name, default=None, lo=None, hi=None, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"'{name}' must be a number, got {_show(v)}")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        lo_txt = f"> {lo}" if lo_open else f">= {lo}" if lo is not None else None
        rng = " and ".join(x for x in (lo_txt, f"<= {hi}" if hi is not None else None) if x)
        raise _bad(name, f"'{name}' must be {rng}, got {v}")
    return float(v)


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be a boolean, got {_show(v)}")
    return v


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _show(v) -> str:
    t = {str: "a string", list: "an array", dict: "an object", bool: "a boolean", float: "a number",
         int: "an integer", type(None): "null"}.get(type(v), type(v).__name__)
    return t


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"'{param}' {what} is not supported by this server", param=param, code="unsupported_parameter")


# ------------------------------------------------------------------------ parsed requests
@dataclass
class Context:
    """What parsing needs to know about the served model."""
    model_name: str
    max_seq: int
    vocab_size: int
    tokenizer: object | None  # runtime/tokenizer.py Tokenizer
    chat_template: object | None  # runtime/chat.py ChatTemplate
    timeout: float  # the server's per-request deadline, seconds
    encode: object = None  # text -> ids with the tokenizer's template (Model.encode)


@dataclass
class GenParams:
    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt
    sampling: SamplingParams
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: off; k: the chosen token and the top k
    timeout: float
    extra_stop_ids: set[int] = field(default_factory=set)


def _check_common(body: dict, allowed: set[str], ctx: Context) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}",
                   code="unknown_parameter")
    model = body.get("model")
    if model is None:
        raise _bad("model", "you must provide a model parameter ('model')", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _bad("model", f"'model' must be a string, got {_show(model)}")
    if model != ctx.model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{ctx.model_name}`",
                       param="model", code="model_not_found")
    if _int(body, "n", 1, lo=1) != 1:
        raise _unsupported("n", "other than 1")
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, 0.0, lo=-2.0, hi=2.0) != 0.0:
            raise _unsupported(name, "other than 0")
    lb = body.get("logit_bias")
    if lb is not None and not isinstance(lb, dict):
        raise _bad("logit_bias", f"'logit_bias' must be an object, got {_show(lb)}")
    if lb:
        raise _unsupported("logit_bias", "(non-empty)")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", f"'user' must be a string, got {_show(body['user'])}")


def _sampling(body: dict, ctx: Context) -> tuple[SamplingParams, int | None, float]:
    temperature = _num(body, "temperature", 1.0, lo=0.0, hi=2.0)
    top_p = _num(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
    top_k = _int(body, "top_k", 0, lo=-1)
    rep = _num(body, "repetition_penalty", None, lo=0.0, lo_open=True)
    seed = _int(body, "seed", None, lo=0, hi=2**63 - 1)
    timeout = _num(body, "timeout", ctx.timeout, lo=0.0, lo_open=True)
    greedy = temperature == 0.0
    params = SamplingParams(greedy=greedy, temperature=1.0 if greedy else temperature,
                            top_k=top_k if top_k > 0 else None, top_p=top_p if top_p < 1.0 else None,
                            repetition_penalty=rep)
    return params, seed, min(timeout, ctx.timeout)


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if not isinstance(opts, dict):
        raise _bad("stream_options", f"'stream_options' must be an object, got {_show(opts)}")
    bad = sorted(set(opts) - {"include_usage"})
    if bad:
        raise _bad("stream_options", f"Unrecognized stream option: {bad[0]}", code="unknown_parameter")
    return stream, _bool(opts, "include_usage", False)


def _stop(body: dict, ctx: Context) -> list[str]:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) for x in s):
        raise _bad("stop", "'stop' must be a string or an array of strings")
    if len(s) > MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} sequences, got {len(s)}")
    s = [x for x in s if x]
    if s and ctx.tokenizer is None:
        raise _bad("stop", "stop strings need a tokenizer, and this model's artifact has none")
    return s


def _fit(ctx: Context, prompt: list[int], max_tokens: int | None, param: str, prompt_param: str = "prompt") -> int:
    """max_tokens for this prompt (None: the rest of the cache); 400 when it does not fit."""
    room = ctx.max_seq - len(prompt)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {ctx.max_seq} tokens, but the prompt has "
                       f"{len(prompt)} tokens (at least one must be left for the completion)",
                       param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        return room
    if len(prompt) + max_tokens > ctx.max_seq:
        raise ApiError(400, f"This model's maximum context length is {ctx.max_seq} tokens. However, you requested "
                       f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                       f"completion). Please reduce the prompt or '{param}'.", param=param,
                       code="context_length_exceeded")
    return max_tokens


def _check_ids(ids: list, ctx: Context, param: str) -> list[int]:
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad(param, f"'{param}': token ids must be integers, got {_show(t)}")
        if not 0 <= t < ctx.vocab_size:
            raise _bad(param, f"'{param}': token id {t} is out of range for the vocabulary of size {ctx.vocab_size}")
    return list(ids)


def _encode(ctx: Context, text: str, param: str) -> list[int]:
    if ctx.tokenizer is None:
        raise _bad(param, "this model's artifact has no tokenizer: give the prompt as token ids")
    try:
        return ctx.encode(text)
    except KvtraceError as e:
        raise _bad(param, str(e)) from e


def parse_completion(body: dict, ctx: Context) -> GenParams:
    _check_common(body, COMPLETION_FIELDS, ctx)
    if _int(body, "best_of", 1, lo=1) != 1:
        raise _unsupported("best_of", "other than 1")
    if _bool(body, "echo", False):
        raise _unsupported("echo", "true")
    if body.get("suffix") not in (None, ""):
        raise _unsupported("suffix", "(non-empty)")
    p = body.get("prompt")
    if p is None:
        raise _bad("prompt", "you must provide a prompt ('prompt')", code="missing_required_parameter")
    if isinstance(p, str):
        prompts = [_encode(ctx, p, "prompt")]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = [_encode(ctx, x, "prompt") for x in p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [_check_ids(p, ctx, "prompt")]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        prompts = [_check_ids(x, ctx, "prompt") for x in p]
    else:
        raise _bad("prompt", "'prompt' must be a string, an array of strings, an array of token ids or an array "
                   "of token id arrays (non-empty)")
    if any(len(x) == 0 for x in prompts):
        raise _bad("prompt", "the prompt is empty (it has no tokens)")
    max_tokens = _int(body, "max_tokens", 16, lo=1)
    sampling, seed, timeout = _sampling(body, ctx)
    stream, usage = _stream_opts(body)
    lp = _int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    return GenParams(prompts=prompts, max_tokens=[_fit(ctx, x, max_tokens, "max_tokens") for x in prompts],
                     sampling=sampling, seed=seed, stop=_stop(body, ctx), stream=stream, include_usage=usage,
                     logprobs=lp, timeout=timeout)


def _message_text(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                           "are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", f"'content' must be a string or an array of text parts, got {_show(c)}")


def parse_chat(body: dict, ctx: Context) -> tuple[GenParams, list[dict]]:
    _check_common(body, CHAT_FIELDS, ctx)
    if ctx.chat_template is None:
        raise ApiError(400, f"model `{ctx.model_name}` has no chat template (its artifact's tokenizer ships none): "
                       "use /v1/completions, or export from a checkpoint whose tokenizer_config.json has a "
                       "chat_template", param="messages", code="no_chat_template")
    if body.get("tools"):
        raise _unsupported("tools", "(tool calling)")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise _unsupported("tool_choice", f"{body.get('tool_choice')!r}")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise _unsupported("response_format", "other than {\"type\": \"text\"}")
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "you must provide 'messages'", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty array of message objects")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"each message must be an object, got {_show(m)}")
        bad = sorted(set(m) - MESSAGE_FIELDS)
        if bad:
            raise _bad(f"messages[{i}].{bad[0]}", f"Unrecognized message field: {bad[0]}", code="unknown_parameter")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"'role' must be one of {', '.join(ROLES)}, got {role!r}")
        msg = {"role": role, "content": _message_text(m, i)}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        clean.append(msg)
    from .chat import TemplateRejected

    try:
        text = ctx.chat_template.render(clean, add_generation_prompt=True)
    except TemplateRejected as e:
        raise _bad("messages", str(e), code="chat_template_error") from e
    ids = ctx.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens
    if not ids:
        raise _bad("messages", "the rendered conversation has no tokens")
    mt = body.get("max_completion_tokens")
    param = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _int(body, param, None, lo=1)
    sampling, seed, timeout = _sampling(body, ctx)
    stream, usage = _stream_opts(body)
    lp = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if top is not None and not lp:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    extra = set()
    eos = getattr(ctx.chat_template, "eos_token", None)
    if eos:  # the template's end-of-turn token ends the reply
        e = ctx.tokenizer.encode(eos, add_special_tokens=False)
        if len(e) == 1:
            extra.add(e[0])
    return GenParams(prompts=[ids], max_tokens=[_fit(ctx, ids, max_tokens, param, "messages")], sampling=sampling, seed=seed,
                     stop=_stop(body, ctx), stream=stream, include_usage=usage,
                     logprobs=(top or 0) if lp else None, timeout=timeout, extra_stop_ids=extra), clean


# ------------------------------------------------------------------------ responses
FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobsBuilder:
    """Accumulates one choice's log-probabilities in the completions or the chat shape."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat
        self.tokens, self.lps, self.tops, self.offsets = [], [], [], []
        self._offset = 0

    def piece(self, t: int) -> str:
        return self.tok.decode([t], skip_special=False) if self.tok is not None else f"<{t}>"

    def entry(self, ev) -> dict:
        """The logprobs object of one token alone (a stream chunk's)."""
        one = LogprobsBuilder(self.tok, self.chat)
        one._offset = self._offset
        one.add(ev)
        self.add(ev)
        return one.body()

    def add(self, ev) -> None:
        s = self.piece(ev.token_id)
        self.tokens.append(s)
        self.lps.append(ev.logprob)
        self.tops.append([(self.piece(i), lp) for i, lp in (ev.top_logprobs or [])])
        self.offsets.append(self._offset)
        self._offset += len(s)

    def body(self) -> dict:
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                                 "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in top]}
                                for s, lp, top in zip(self.tokens, self.lps, self.tops)]}
        return {"tokens": list(self.tokens), "token_logprobs": list(self.lps),
                "top_logprobs": [dict(top) for top in self.tops] if any(self.tops) else None,
                "text_offset": list(self.offsets)}
