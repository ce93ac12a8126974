"""Bad input to `kvtrace export`, through the CLI entry point: a clear message, a non-zero
exit, and nothing left behind (no artifact, no temporary directory)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtrace import cli  # noqa: E402
from kvtrace import io_spec  # noqa: E402
from kvtrace.errors import KvtraceError  # noqa: E402
from kvtrace.manifest import load_manifest, write_manifest  # noqa: E402


def _run(capsys, *argv):
    rc = cli.main(["export", *argv])
    err = capsys.readouterr().err
    return rc, err


def _tiny_ckpt(tmp_path, variant="llama_mha"):
    from tests import tiny_hf
    pytest.importorskip("transformers", reason="transformers builds the tiny checkpoints")
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_hf.checkpoint(variant), dst)
    return dst


def _entries(d):
    return sorted(p.name for p in d.iterdir())


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, err = _run(capsys, "--arch", "llama", "--out", str(blocker / "art"), "--max-seq", "32")
    assert rc == 2 and "--out" in err and str(blocker / "art") in err
    assert _entries(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, err = _run(capsys, "--arch", "llama", "--out", str(ro / "art"), "--max-seq", "32")
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "--out" in err
    assert _entries(ro) == []


def test_existing_out_needs_force_and_force_replaces_only_artifacts(tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc, err = _run(capsys, "--arch", "xglm", "--out", str(out), "--max-seq", "32")
    assert rc == 2 and "already exists" in err and "--force" in err
    assert _entries(out) == ["keep.txt"]
    # --force never deletes a directory kvtrace did not make (a user's notes)
    rc, err = _run(capsys, "--arch", "xglm", "--out", str(out), "--max-seq", "32", "--force")
    assert rc == 2 and "will not replace" in err and "keep.txt" in err
    assert _entries(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    # ... but replaces an artifact
    art = tmp_path / "art2"
    assert _run(capsys, "--arch", "xglm", "--out", str(art), "--max-seq", "32")[0] == 0
    rc, err = _run(capsys, "--arch", "xglm", "--out", str(art), "--max-seq", "16", "--force")
    assert rc == 0, err
    assert _entries(art) == ["kvtrace.json", "model.gpu.onnx", "model.onnx", "model.onnx.data"]
    assert json.loads((art / "kvtrace.json").read_text())["io"]["max_seq"] == 16
    # an artifact in which the user left a file of their own is not replaced either
    (art / "notes.md").write_text("mine")
    rc, err = _run(capsys, "--arch", "xglm", "--out", str(art), "--max-seq", "32", "--force")
    assert rc == 2 and "notes.md" in err and (art / "notes.md").read_text() == "mine"
    assert _entries(tmp_path) == ["art", "art2"]


def test_checkpoint_and_arch_disagree(tmp_path, capsys):
    ckpt = _tiny_ckpt(tmp_path)
    out = tmp_path / "out"
    rc, err = _run(capsys, "--checkpoint", str(ckpt), "--arch", "gpt_neox", "--out", str(out))
    assert rc == 2 and "--arch gpt_neox" in err and "llama" in err and "config.json" in err
    assert _entries(tmp_path) == ["ckpt"]


def test_max_seq_beyond_model_positions(tmp_path, capsys):
    ckpt = _tiny_ckpt(tmp_path)  # max_position_embeddings 128
    rc, err = _run(capsys, "--checkpoint", str(ckpt), "--max-seq", "129", "--out", str(tmp_path / "out"))
    assert rc == 2 and "--max-seq 129" in err and "128" in err
    rc, err = _run(capsys, "--arch", "gpt_neox", "--max-seq", "100000", "--out", str(tmp_path / "out"))
    assert rc == 2 and "--max-seq 100000" in err
    rc, err = _run(capsys, "--arch", "gpt_neox", "--max-seq", "0", "--out", str(tmp_path / "out"))
    assert rc == 2 and "--max-seq" in err
    assert _entries(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("argv, words", [
    (["--opset", "17", "--cache", "static"], ["--cache dynamic", "--opset 24"]),
    (["--opset", "17", "--cache", "dynamic", "--bf16"], ["--bf16", "--opset 24"]),
    (["--opset", "20"], ["--opset 20", "24", "17"]),
    (["--max-batch", "0"], ["--max-batch"]),
])
def test_unsupported_combinations(tmp_path, capsys, argv, words):
    rc, err = _run(capsys, "--arch", "starcoder2", "--max-seq", "32", "--out", str(tmp_path / "out"), *argv)
    assert rc == 2
    for w in words:
        assert w in err, err
    assert _entries(tmp_path) == []


def test_missing_inputs(tmp_path, capsys):
    rc, err = _run(capsys, "--out", str(tmp_path / "out"))
    assert rc == 2 and "--arch is required" in err
    rc, err = _run(capsys, "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert rc == 2 and str(tmp_path / "nope") in err
    assert _entries(tmp_path) == []


def test_validation_failure_leaves_no_artifact(tmp_path, capsys, monkeypatch):
    """One weight written wrong (the reference keeps the right one): parity fails, exit 1,
    no artifact and no temporary directory."""
    import numpy as np

    from kvtrace.exporter import export

    real_getitem = export.TorchWeights.__getitem__

    def perturbed(self, name):
        arr = real_getitem(self, name)
        return arr + np.float32(0.5) if name == "layers.1.mlp.up.weight" else arr

    monkeypatch.setattr(export.TorchWeights, "__getitem__", perturbed)
    rc, err = _run(capsys, "--arch", "gpt_neox", "--max-seq", "32", "--out", str(tmp_path / "out"))
    assert rc == 1 and "differs from the reference" in err
    assert _entries(tmp_path) == []


def test_write_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
    """An OSError while writing (a full disk, say) becomes a clear error; the temporary
    directory is removed."""
    from kvtrace.exporter import export

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_onnx", full_disk)
    rc, err = _run(capsys, "--arch", "xglm", "--max-seq", "32", "--out", str(tmp_path / "deep" / "out"))
    assert rc == 2 and "No space left on device" in err and "--out" in err
    assert _entries(tmp_path) == []  # not even the parent directory it created


def test_no_validate_skips_the_check(tmp_path, capsys):
    rc, err = _run(capsys, "--arch", "gpt_neox", "--max-seq", "32", "--out", str(tmp_path / "out"), "--no-validate")
    assert rc == 0 and "validate:" not in err
    assert load_manifest(tmp_path / "out")["validation"] is None


def test_progress_lines(tmp_path, capsys):
    rc, err = _run(capsys, "--arch", "llama", "--fp16", "--max-seq", "32", "--out", str(tmp_path / "out"))
    assert rc == 0
    for step in ("built graph", "wrote model.onnx", "validate: onnxruntime", "artifact ready"):
        assert step in err, err


# ------------------------------------------------------------------------------- manifest
def test_manifest_newer_format_version(tmp_path):
    rc = cli.main(["export", "--arch", "llama", "--max-seq", "32", "--out", str(tmp_path / "a"), "--no-validate"])
    assert rc == 0
    p = tmp_path / "a" / io_spec.MANIFEST_NAME
    data = json.loads(p.read_text())
    data["format_version"] = io_spec.FORMAT_VERSION + 1
    p.write_text(json.dumps(data))
    with pytest.raises(KvtraceError, match="upgrade kvtrace"):
        load_manifest(tmp_path / "a")


def test_manifest_missing(tmp_path):
    with pytest.raises(KvtraceError, match="kvtrace.json"):
        load_manifest(tmp_path)
    with pytest.raises(KvtraceError, match="not an artifact directory"):
        load_manifest(tmp_path / "absent")


def test_manifest_missing_model_file(tmp_path):
    write_manifest(tmp_path, {"architecture": "llama", "config": {}, "dtype": "float32", "onnx": "model.onnx",
                              "io": {}})
    with pytest.raises(KvtraceError, match="model.onnx"):
        load_manifest(tmp_path)


def test_write_manifest_is_atomic_and_round_trips(tmp_path):
    from tests.runtime_toy import build_toy

    build_toy(tmp_path, layout="dynamic")
    d = json.loads((tmp_path / io_spec.MANIFEST_NAME).read_text())
    write_manifest(tmp_path, d)
    assert _entries(tmp_path) == ["kvtrace.json", "model.onnx"]  # no temporary file left
    m = load_manifest(tmp_path)
    assert m.format_version == io_spec.FORMAT_VERSION and m.dtype == "float32" and m.layout == "dynamic"
