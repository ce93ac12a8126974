"""Tokenizers: the real GPT-NeoX tokenizer (fixture) and the built-in byte-level tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace.errors import KvtraceError
from kvtrace.runtime.tokenizer import ByteTokenizer, Tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "gpt_neox_20b_tokenizer.json"

SAMPLE = (
    "Hello world! Grüße aus Köln, 你好，世界。 こんにちは 🙂🚀 Привет, мир! مرحبا\n"
    "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n\n\n"
    "\tTabs\tand   runs   of    spaces\r\n  trailing   \n"
    "if (a && b) { printf(\"%d\\n\", a[i] >> 2); }\n"
    "        deeply indented\n\n\n\n   \u00a0nbsp and caf\u00e9 (NFC)"
)  # NFC text: the tokenizer normalizes to NFC, so only NFC text can round-trip exactly


@pytest.fixture(scope="module")
def neox():
    if not FIXTURE.is_file():
        pytest.skip(f"fixture {FIXTURE} absent")
    return Tokenizer.from_file(FIXTURE)


def test_neox_known_encodings(neox):
    # The issue and shared/seeds/gpt_neox.md quote [15496, 995] / [18435, 995]: those are GPT-2's
    # ids (transformers' GPTNeoXTokenizer docstring was copied from GPT-2). The GPT-NeoX-20B
    # vocabulary in the fixture maps "Hello" to 12092 and " world" to 1533 (15496 is " counting"),
    # and transformers' own tokenizer class on the same file agrees (test below).
    assert neox.encode("Hello world") == [12092, 1533]
    assert neox.encode(" Hello world") == [24387, 1533]
    assert neox.decode([12092, 1533]) == "Hello world"
    assert neox.decode([15496, 995]) != "Hello world"


def test_neox_matches_transformers(neox):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(FIXTURE))
    for text in ("Hello world", " Hello world", SAMPLE):
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert neox.encode(text) == ids
        assert neox.decode(ids) == ref.decode(ids)


def test_neox_normalizes_nfc(neox):
    # documented behaviour of this tokenizer (NFC normalizer): decomposed input comes back composed
    assert neox.decode(neox.encode("e\u0301")) == "\u00e9"


def test_neox_round_trip(neox):
    ids = neox.encode(SAMPLE)
    assert len(ids) > 50
    assert neox.decode(ids) == SAMPLE
    for line in SAMPLE.splitlines(keepends=True):
        assert neox.decode(neox.encode(line)) == line


def test_neox_specials(neox):
    assert 0 in neox.special_ids
    assert neox.decode([12092, 0]) == "Hello"
    assert neox.decode([12092, 0], skip_special=False) == "Hello<|endoftext|>"


def test_byte_tokenizer_round_trip():
    tok = Tokenizer.builtin_bytes()
    ids = tok.encode(SAMPLE)
    assert ids == [b + 2 for b in SAMPLE.encode("utf-8")]
    assert all(2 <= i < 258 for i in ids)
    assert tok.decode(ids) == SAMPLE


def test_byte_tokenizer_split_characters():
    tok = ByteTokenizer()
    ids = tok.encode("a€🙂b")  # 1 + 3 + 4 + 1 bytes
    assert len(ids) == 9
    # a prefix that cuts a character in half decodes with a replacement char, the whole with none
    assert tok.decode(ids[:3]) == "a\ufffd"
    assert tok.decode(ids) == "a€🙂b"
    # specials: 0 eos, 1 padding skipped by default
    assert tok.decode([0] + ids + [1]) == "a€🙂b"
    assert tok.decode([0] + ids, skip_special=False) == "<|endoftext|>a€🙂b"
    assert tok.vocab_size == 258


def test_from_manifest_specs(tmp_path):
    assert Tokenizer.from_manifest(tmp_path, None) is None
    assert isinstance(Tokenizer.from_manifest(tmp_path, {"type": "builtin-bytes"}), ByteTokenizer)
    with pytest.raises(KvtraceError, match="tokenizer.json"):
        Tokenizer.from_manifest(tmp_path, {"type": "file", "file": "tokenizer.json"})
    with pytest.raises(KvtraceError, match="unknown tokenizer"):
        Tokenizer.from_manifest(tmp_path, {"type": "sentencepiece"})
