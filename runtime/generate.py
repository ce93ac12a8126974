"""Generation: prefill, then one decode step per new token, for a batch of prompts. No torch.

Rows that finish (stop token, stop string) keep stepping with the pad token so the batch and
its bound buffers keep their shape; their outputs are ignored. The loop ends when every row has
finished or max_new_tokens is reached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from kvtrace.errors import KvtraceError
from kvtrace.options import SEED_MAX, check_int
from .sampling import SamplingParams, next_tokens


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids, prompt excluded
    text: str | None = None  # decoded generated text (None without a tokenizer), cut before a stop string
    finish_reason: str = "length"  # "length" | "stop_token" | "stop_string"

    def to_json(self) -> dict:
        d = {"token_ids": list(self.token_ids), "finish_reason": self.finish_reason}
        if self.text is not None:
            d["text"] = self.text
        return d


class _TextTracker:
    """Decoded text of one row and how much of it was already streamed.

    Text that could still turn into a stop string, or ends in an incomplete UTF-8 sequence
    (decoded as U+FFFD), is held back from the stream until it is settled.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tok = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.emitted = 0
        self.text = ""

    def update(self, ids: list[int]) -> tuple[str | None, int]:
        """Decode; return (stop string found or None, index where the kept text ends)."""
        self.text = self.tok.decode(ids)
        best = None
        for s in self.stops:
            i = self.text.find(s)
            if i >= 0 and (best is None or i < best[1]):
                best = (s, i)
        if best is not None:
            return best[0], best[1]
        return None, len(self.text)

    def delta(self, end: int, final: bool) -> str:
        """Text in [emitted, safe end) not yet streamed."""
        safe = end
        if not final:
            t = self.text[:end]
            hold = 0
            for s in self.stops:  # longest suffix of t that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(t)), hold, -1):
                    if t.endswith(s[:k]):
                        hold = k
                        break
            safe = end - hold
            while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # maybe an incomplete character
                safe -= 1
        if safe <= self.emitted:
            return ""
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out


class Continuation:
    """One sequence's continuation: the token ids generated, the text settled so far, and whether
    (and why) it stopped. One per row in generate(), one per request in the server
    (runtime/scheduler.py): both stop, cut and stream text the same way.

        c = Continuation(prompt_ids, tokenizer, stop_ids={eos}, stop_strings=["\\n\\n"], max_new_tokens=16)
        delta = c.push(token_id)   # settled text not streamed before ("" while held back)
        c.finished, c.result.finish_reason, c.result.text (set once finished)
    """

    def __init__(self, prompt_ids: Sequence[int], tokenizer, *, stop_ids: set[int],
                 stop_strings: Sequence[str] = (), max_new_tokens: int):
        self.result = GenerationResult(prompt_ids=list(prompt_ids))
        self.tracker = _TextTracker(tokenizer, stop_strings) if tokenizer is not None else None
        self.stop_ids = stop_ids
        self.max_new_tokens = int(max_new_tokens)
        self.finished = self.max_new_tokens <= 0
        self._end = 0  # where the kept text ends
        if self.finished:
            self.result.text = "" if self.tracker is not None else None

    def push(self, token: int) -> str:
        """Append a generated token; returns the newly settled text ("" without a tokenizer)."""
        if self.finished:
            raise KvtraceError("Continuation.push after the sequence finished")
        t = int(token)
        r, tr = self.result, self.tracker
        r.token_ids.append(t)
        if t in self.stop_ids:
            r.finish_reason = "stop_token"
            self.finished = True
            if tr is not None:  # the stop token's own text is not part of the result
                _, self._end = tr.update(r.token_ids[:-1])
        elif tr is not None:
            hit, self._end = tr.update(r.token_ids)
            if hit is not None:
                r.finish_reason = "stop_string"
                self.finished = True
        if not self.finished and len(r.token_ids) >= self.max_new_tokens:
            self.finished = True  # finish_reason stays "length"
        if tr is None:
            return ""
        delta = tr.delta(self._end, final=self.finished)
        if self.finished:
            r.text = tr.text[: self._end]
        return delta


def _stop_ids(model, stop_token_ids) -> set[int]:
    if stop_token_ids is None:
        eos = model.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
        raise KvtraceError(f"stop_token_ids {stop_token_ids!r}: expected a list of token ids")
    V = model.vocab_size
    ids = set()
    for t in stop_token_ids:  # an id that can never be produced would never stop anything
        t = check_int("stop_token_ids", t, 0, V - 1)
        ids.add(t)
    return ids


def _prompt_ids(model, prompts) -> list[list[int]]:
    """Text prompts through the tokenizer, or token id lists; a batch of one kind."""
    if isinstance(prompts, (str, bytes)):
        raise KvtraceError("prompts must be a list (of strings or of token id lists)")
    prompts = list(prompts)
    if not prompts:
        raise KvtraceError("no prompts given")
    if all(isinstance(p, str) for p in prompts):
        return [model.encode(p) for p in prompts]
    if any(isinstance(p, str) for p in prompts):
        raise KvtraceError("prompts mix text and token ids")
    return prompts  # Model.check_prompts checks every id


def _check_room(model, ids: list[list[int]], max_new_tokens: int) -> None:
    longest = max(len(p) for p in ids)
    if longest + max_new_tokens > model.max_seq:
        raise KvtraceError(f"prompt of {longest} tokens + {max_new_tokens} new tokens is longer than the "
                           f"cache ({model.max_seq} positions); shorten the prompt, lower --max-new-tokens "
                           "or export with a larger --max-seq")


def generate(model, prompts, *, max_new_tokens: int = 32, greedy: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, seed: int | None = None,
             stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             on_token: Callable[[int, int, str], None] | None = None) -> list[GenerationResult]:
    """Generate for a batch of prompts (list[str] through the tokenizer, or list[list[int]]).

    stop_token_ids: None -> the manifest's eos; [] -> never stop on a token.
    on_token(row, token_id, text_delta): called for every token a live row produces, in step
    order; text_delta is the newly settled text ("" while it is held back; always "" without
    a tokenizer).
    Raises NonFiniteLogits (kvtrace.errors; exit 1 in the CLI, a failed request in a server)
    when a live row's logits hold NaN/Inf: no token is produced from them.
    """
    ids = _prompt_ids(model, prompts)
    check_int("max_new_tokens", max_new_tokens, 0, None)
    if seed is not None:
        check_int("seed", seed, 0, SEED_MAX)
    if greedy is not None and not isinstance(greedy, bool):
        raise KvtraceError(f"greedy {greedy!r}: expected True, False or None")
    params = SamplingParams.make(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty)
    if stop_strings and model.tokenizer is None:
        raise KvtraceError("stop strings need a tokenizer; this artifact has none (use stop token ids)")
    ids = [r[:n].tolist() for r, n in zip(*model.check_prompts(ids))]  # batch, empty, ids, length
    _check_room(model, ids, max_new_tokens)
    stops = _stop_ids(model, stop_token_ids)
    rows = [Continuation(p, model.tokenizer, stop_ids=stops, stop_strings=stop_strings,
                         max_new_tokens=max_new_tokens) for p in ids]
    if max_new_tokens > 0:
        _decode_loop(model, ids, rows, params, np.random.default_rng(seed), max_new_tokens, on_token)
    return [c.result for c in rows]


def _decode_loop(model, ids, rows: list[Continuation], params: SamplingParams, rng, max_new_tokens: int,
                 on_token) -> None:
    """Prefill, then one decode step per new token until every row has finished."""
    B = len(ids)
    use_penalty = params.repetition_penalty not in (None, 1.0)
    seen = [list(p) for p in ids] if use_penalty else None
    # only each row's last real position: the graph skips the lm_head for the other prompt tokens
    last = np.asarray(model.start(ids, logits="last"))[:, 0, :]  # (B, V)
    live = np.ones(B, dtype=bool)
    pad = model.pad_token_id
    for step in range(max_new_tokens):
        nxt = next_tokens(last, params, rng, seen, step=step, rows=live)  # (B,); NaN/Inf -> NonFiniteLogits
        for b in np.flatnonzero(live):
            t = int(nxt[b])
            if seen is not None:
                seen[b].append(t)
            delta = rows[b].push(t)
            live[b] = not rows[b].finished
            if on_token is not None:
                on_token(int(b), t, delta)
        if not live.any():
            return
        feed = np.where(live, nxt, pad)  # finished rows step on padding; their outputs are ignored
        last = model.step(feed)
