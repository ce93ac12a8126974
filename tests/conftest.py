"""Shared pytest fixtures (add fixtures only). Exports are cached per session: exporting is
the slow part of most tests, and many tests need the same artifacts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import FIXTURES

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(variant, layout="static", dtype="float32", max_seq=64, max_batch=4) -> artifact dir.

    variant: a tests/tiny_hf.py VARIANTS name (its checkpoint loaded by models.checkpoint) or
    "stories260K" (../shared/fixtures/stories260K.bin through models.llama2c; skips when absent).
    Each combination is exported once per session (no validation: tests compare themselves).
    """
    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple, Path] = {}

    def get(variant: str, layout: str = "static", dtype: str = "float32", max_seq: int = 64,
            max_batch: int = 4) -> Path:
        key = (variant, layout, dtype, max_seq, max_batch)
        if key not in cache:
            from kvtrace.exporter.export import export_model
            from kvtrace.models.checkpoint import load_checkpoint

            ck = checkpoint_dir(variant, tmp_path_factory)
            loaded = load_checkpoint(ck)
            out = root / "-".join(map(str, key))
            export_model(loaded.model, out, dtype=dtype, layout=layout, max_seq=max_seq, max_batch=max_batch,
                         tokenizer=loaded.tokenizer_file, validate=False, log=lambda msg: None,
                         source={"kind": "checkpoint", "path": str(ck), "sha256": loaded.digest})
            cache[key] = out
        return cache[key]

    return get


_CKPTS: dict[str, Path] = {}


def checkpoint_dir(variant: str, tmp_path_factory) -> Path:
    """A Hugging Face checkpoint directory for a tiny_hf variant or the stories260K fixture."""
    if variant not in _CKPTS:
        if variant == "stories260K":
            bin_path = FIXTURES / "stories260K.bin"
            if not bin_path.is_file():
                pytest.skip(f"fixture {bin_path} absent")
            from kvtrace.models.llama2c import convert

            _CKPTS[variant] = convert(bin_path, tmp_path_factory.mktemp("ckpt") / "stories260K")
        else:
            from tests import tiny_hf

            _CKPTS[variant] = tiny_hf.checkpoint(variant)
    return _CKPTS[variant]
