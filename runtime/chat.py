"""Chat templates: the artifact's Jinja template turns a list of messages into one prompt string.

Where the template comes from (the manifest's "tokenizer" entry, written by `kvtrace export`):
  "chat_template": "chat_template.jinja"     a template file (transformers 5 saves it this way), or
  "config": "tokenizer_config.json"          its "chat_template" key (a string, or a list of
                                             {"name", "template"}: the one named "default")
The config's "bos_token" / "eos_token" (strings or {"content": ...}) are the template's variables
of the same names. Rendering follows transformers' apply_chat_template: an immutable sandboxed
Jinja environment (a template cannot touch Python objects beyond its data), trim_blocks and
lstrip_blocks, the loop-control extension, `raise_exception(message)` for the template's own
checks, and the rendered text is tokenized without adding special tokens (the template writes
them). Needs jinja2 (the `serve` extra).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from kvtrace.errors import KvtraceError


class TemplateRejected(Exception):
    """The template refused the messages (raise_exception, or an error while rendering)."""


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 origin: str = "chat template"):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateRejected(str(message))

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise KvtraceError(f"{origin}: the chat template does not compile: {e}") from e
        self.source = source
        self.origin = origin
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateRejected:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise TemplateRejected(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e


def load_chat_template(artifact_dir, spec: dict | None) -> ChatTemplate | None:
    """The artifact's chat template, or None when it ships none. KvtraceError naming the file when
    a file the manifest names is missing or unreadable."""
    if not isinstance(spec, dict):
        return None
    d = Path(artifact_dir)
    config = {}
    if spec.get("config"):
        path = d / spec["config"]
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KvtraceError(f"{path}: cannot read the tokenizer config named by the manifest: {e}") from e
        if not isinstance(config, dict):
            raise KvtraceError(f"{path}: the tokenizer config must be a JSON object")
    source, origin = None, None
    if spec.get("chat_template"):
        path = d / spec["chat_template"]
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KvtraceError(f"{path}: cannot read the chat template named by the manifest: {e}") from e
        origin = str(path)
    elif "chat_template" in config:
        t = config["chat_template"]
        if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default", next(iter(named.values()), None))
        if not isinstance(t, str):
            raise KvtraceError(f"{d / spec['config']}: 'chat_template' must be a string or a list of "
                               "{\"name\", \"template\"} objects")
        source, origin = t, f"{d / spec['config']} (chat_template)"
    if source is None:
        return None
    return ChatTemplate(source, bos_token=_token_str(config.get("bos_token")),
                        eos_token=_token_str(config.get("eos_token")), origin=origin)
