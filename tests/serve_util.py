"""Helpers for the `kvtrace serve` tests: a tiny artifact with a real tokenizer and a chat
template, and a live server subprocess on 127.0.0.1 (a free port chosen by the OS, read back
from the server's first line), stopped by the test.

The tokenizer is built with the `tokenizers` library: one token per character (a BPE model
without merges), 3 special tokens (<s> 0 = BOS, <pad> 1, </s> 2 = EOS, as tests/tiny_hf.py's
config says) and 125 characters, so it covers the tiny models' vocabulary of 128 exactly; its
post-processor prepends <s> (as Llama's does). The chat template is a small Jinja template in
tokenizer_config.json, the way Hugging Face checkpoints ship it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import string

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<s>", "<pad>", "</s>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                 "{{ raise_exception('tool messages are not supported') }}{% endif %}"
                 "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def char_vocab(size: int = 128) -> list[str]:
    chars = list(string.ascii_letters + string.digits + " .,!?'\n:-;()<>/|_")
    i = 0x100
    while len(SPECIALS) + len(chars) < size:  # fill up with Latin Extended-A letters (2 UTF-8 bytes)
        chars.append(chr(i))
        i += 1
    return SPECIALS + chars[: size - len(SPECIALS)]


def write_tokenizer(dst: Path, size: int = 128) -> Path:
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {t: i for i, t in enumerate(char_vocab(size))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    return dst / "tokenizer.json"


def chat_checkpoint(tmp: Path, variant: str = "llama_gqa_linear_tied") -> Path:
    """A tiny_hf checkpoint plus tokenizer.json and a tokenizer_config.json with a chat template."""
    from tests import tiny_hf

    src = tiny_hf.checkpoint(variant)
    ck = tmp / f"ckpt-{variant}"
    shutil.copytree(src, ck)
    write_tokenizer(ck)
    (ck / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))
    return ck


def export_cli(ckpt: Path, out: Path, *extra: str) -> Path:
    """`kvtrace export --checkpoint` in this process (the real command path, no validation)."""
    from kvtrace.cli import main

    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--no-validate", *extra])
    assert rc == 0, rc
    return out


class Server:
    """`kvtrace serve ARTIFACT --port 0 ...` as a subprocess; .url once it is ready."""

    def __init__(self, artifact: Path, *args: str, env: dict | None = None, ready_timeout: float = 60.0):
        cmd = [sys.executable, "-m", "kvtrace.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port", "0",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, cwd=ROOT)
        self.lines: list[str] = []
        line = self.proc.stderr.readline()
        self.lines.append(line)
        m = re.search(r"listening on (http://[\d.]+:\d+)", line)
        if not m:
            rest = self.proc.communicate(timeout=30)[1]
            raise AssertionError(f"server did not start: {line}{rest}")
        self.url = m.group(1)
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout} s")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, dict, bytes]:
        """One HTTP request (http.client): (status, headers lower-cased, body bytes). body: a dict is
        sent as JSON, bytes/str as they are."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = dict(headers or {})
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
                h.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.request("GET", "/metrics")[2].decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def wait_metric(self, key: str, pred, timeout: float = 10.0) -> float:
        t0 = time.monotonic()
        v = None
        while time.monotonic() - t0 < timeout:
            v = self.metrics().get(key)
            if v is not None and pred(v):
                return v
            time.sleep(0.05)
        raise AssertionError(f"metric {key} = {v} after {timeout} s")

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        """SIGTERM, then wait; (exit status, the rest of stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"server did not stop within {timeout} s: {err}")
        return self.proc.returncode, "".join(self.lines) + err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
