"""A second hostile pass (after tests/test_hostile.py): each test is a defect a new user hit,
reproduced through the whole command (kvtrace.cli.main) where it can be. Each case: the
documented answer, the user's files as they were, no "Traceback" (docs/errors.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace import cli  # noqa: E402
from tests.test_hostile import run, state  # noqa: E402


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """The built-in gpt_neox model, 32 positions, no validation (the tests judge themselves)."""
    out = tmp_path_factory.mktemp("hostile2") / "art"
    assert cli.main(["export", "--arch", "gpt_neox", "--max-seq", "32", "--no-validate", "--out", str(out)]) == 0
    return out


# ------------------------------------------------ reports never overwrite the artifact's files
def test_parity_report_through_a_symlinked_artifact_dir_is_refused(art, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(art, target_is_directory=True)
    before = state(art)
    for opt in ("--json", "--junit-xml", "--summary", "--save-golden"):
        rc, _, err = run(capsys, "parity", art, "--steps", "1", opt, link / "kvtrace.json")
        assert rc == 2 and f"{opt} {link / 'kvtrace.json'}: inside the artifact directory" in err, err
    # a symlinked file naming the manifest
    (tmp_path / "r.json").symlink_to(art / "kvtrace.json")
    rc, _, err = run(capsys, "parity", art, "--steps", "1", "--json", tmp_path / "r.json")
    assert rc == 2 and "inside the artifact directory" in err
    assert state(art) == before


def test_gpu_check_json_never_overwrites_the_manifest(art, tmp_path, capsys):
    before = state(art)
    for target in (art / "kvtrace.json", art / "model.onnx"):
        rc, _, err = run(capsys, "gpu-check", art, "--json", target)
        assert rc == 2 and f"--json {target}: inside the artifact directory" in err, err
    assert state(art) == before
    out = tmp_path / "gc.json"  # elsewhere: written (no GPU here: the report says why), an ordinary file
    rc, _, err = run(capsys, "gpu-check", art, "--json", out)
    assert rc == 2 and json.loads(out.read_text())["gpu_available"] in (False, True)
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_gpu_check_counts_are_range_checked(art, capsys):
    for opt in ("--batch", "--prompt-len", "--steps", "--repeats"):
        rc, _, err = run(capsys, "gpu-check", art, opt, "-3")
        assert rc == 2 and f"argument {opt}: -3 is out of range" in err, err


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
