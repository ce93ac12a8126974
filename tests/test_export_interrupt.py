"""Interrupted and failed exports leave nothing behind: SIGINT / SIGTERM (exit 130 / 143, one
line), a killed export's staging directory removed by the next export to the same --out (which
says so), a live export's never touched, a second concurrent export refused naming the first's
PID, a full disk reported with the path and the bytes needed. Plus the progress line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="transformers builds the tiny reference checkpoints")

from kvtrace import cli, files  # noqa: E402
from kvtrace.exporter.export import export_checkpoint  # noqa: E402
from tests import tiny_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _entries(d):
    return sorted(p.name for p in Path(d).iterdir())


def _start_export(ck: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # SIGINT back to its default in the child: a test run started in the background by a
    # non-interactive shell (`cmd &`) inherits SIGINT ignored, and Python then keeps ignoring it
    return subprocess.Popen([sys.executable, "-m", "kvtrace.cli", "export", "--checkpoint", str(ck), "--max-seq", "32",
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_staging(p: subprocess.Popen, out: Path, timeout: float = 60.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = [d for d in out.parent.iterdir() if d.name.startswith(f".{out.name}.tmp-")]
        if found:
            return found[0]
        if p.poll() is not None:
            raise AssertionError(f"export ended before its staging directory was seen: {p.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError("no staging directory appeared")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signal_removes_staging(tmp_path, sig, code, word):
    ck = tiny_hf.checkpoint("llama_mha")
    out = tmp_path / "out"
    p = _start_export(ck, out)
    staging = _wait_for_staging(p, out)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    last = [line for line in err.splitlines() if not line.startswith("kvtrace export:")]
    assert len(last) == 1 and last[0].startswith(f"kvtrace: {word}: removed the unfinished export"), err
    assert "Traceback" not in err
    assert not staging.exists() and _entries(tmp_path) == []


def test_killed_export_leftover_removed_by_next(tmp_path, capsys):
    ck = tiny_hf.checkpoint("llama_mha")
    out = tmp_path / "out"
    p = _start_export(ck, out)
    staging = _wait_for_staging(p, out)
    p.kill()  # SIGKILL: no cleanup possible
    p.communicate(timeout=60)
    assert staging.exists()
    rc = cli.main(["export", "--checkpoint", str(ck), "--max-seq", "32", "--out", str(out), "--no-validate"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"removed {staging}" in err and f"(PID {p.pid})" in err and "no longer running" in err
    assert _entries(tmp_path) == ["out"]


def test_live_exports_staging_untouched(tmp_path, capsys):
    """A staging directory whose PID is alive is someone's work in progress: kept."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        live = tmp_path / f".out.tmp-{sleeper.pid}-abcd"
        live.mkdir()
        (live / "model.onnx.data").write_bytes(b"x" * 100)
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
        dead = tmp_path / f".out.tmp-{dead_pid}-efgh"
        dead.mkdir()
        rc = cli.main(["export", "--checkpoint", str(tiny_hf.checkpoint("llama_mha")), "--max-seq", "32",
                       "--out", str(out), "--no-validate"])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert live.exists() and (live / "model.onnx.data").read_bytes() == b"x" * 100
        assert not dead.exists() and f"removed {dead}" in err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_concurrent_export_refused_naming_the_pid(tmp_path, capsys):
    out = tmp_path / "out"
    with files.OutputLock(out):  # this process plays the export already running
        rc = cli.main(["export", "--checkpoint", str(tiny_hf.checkpoint("llama_mha")), "--max-seq", "32",
                       "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"another kvtrace export (PID {os.getpid()}) is writing it" in err, err
        assert _entries(tmp_path) == [".out.lock"]  # the holder's lock only
    assert _entries(tmp_path) == []
    # and from another process, while a real export runs
    p = _start_export(tiny_hf.checkpoint("llama_mha"), out)
    _wait_for_staging(p, out)
    rc = cli.main(["export", "--checkpoint", str(tiny_hf.checkpoint("llama_mha")), "--max-seq", "32",
                   "--out", str(out)])
    err = capsys.readouterr().err
    p.communicate(timeout=120)
    assert rc == 2 and f"(PID {p.pid})" in err, err
    assert p.returncode == 0 and _entries(tmp_path) == ["out"]


def test_interrupted_replacement_is_restored(tmp_path, capsys):
    """An export killed between moving the old artifact aside and moving the new one in: the
    next export puts the old one back before anything else."""
    ck = tiny_hf.checkpoint("llama_mha")
    out = tmp_path / "out"
    assert cli.main(["export", "--checkpoint", str(ck), "--max-seq", "32", "--out", str(out), "--no-validate"]) == 0
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    os.replace(out, tmp_path / f".out.old-{dead_pid}")
    rc = cli.main(["export", "--checkpoint", str(ck), "--max-seq", "32", "--out", str(out), "--no-validate"])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "restored" in err  # back in place, and not replaced
    assert _entries(tmp_path) == ["out"]


# ---------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here (needs root): {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_disk_full_before_writing(tmp_path, small_disk, capsys):
    ck = tiny_hf.with_vocab(tmp_path / "ck", 8192, scale=0.02)  # ~4 MB of weights: too big for 2 MB
    rc = cli.main(["export", "--checkpoint", str(ck), "--max-seq", "32", "--out", str(small_disk / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "not enough disk space" in err and "bytes" in err and str(small_disk) in err, err
    assert _entries(small_disk) == []


def test_disk_full_while_writing(tmp_path, small_disk, capsys, monkeypatch):
    """The space goes while the export writes (the check before writing saw enough): the write's
    own error, with the file and the bytes needed; nothing left."""
    import collections

    from kvtrace.exporter import export

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 40))
    ck = tiny_hf.with_vocab(tmp_path / "ck", 8192, scale=0.02)  # ~4 MB of weights: too big for 2 MB
    rc = cli.main(["export", "--checkpoint", str(ck), "--max-seq", "32", "--out", str(small_disk / "deep" / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len([line for line in err if line.startswith("kvtrace:")]) == 1
    msg = err[-1]
    assert "No space left on device" in msg and str(small_disk / "deep") in msg and "model.onnx" in msg, msg
    assert "the artifact needs" in msg and "nothing was left behind" in msg
    assert _entries(small_disk) == []


# ---------------------------------------------------------------------------------- progress
def test_progress_on_a_terminal(tmp_path, capsys):
    export_checkpoint(tiny_hf.checkpoint("llama_mha"), tmp_path / "a", max_seq=32, validate=False, progress=True,
                      log=lambda m: None)
    err = capsys.readouterr().err
    assert "\rkvtrace export: writing" in err and "MB/s" in err and "left" in err and "lm_head.weight" in err
    export_checkpoint(tiny_hf.checkpoint("llama_mha"), tmp_path / "b", max_seq=32, validate=False, progress=False,
                      log=lambda m: None)
    assert capsys.readouterr().err == ""
