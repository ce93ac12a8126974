"""Files the way every kvtrace command writes them, and the figures they report. No torch.

  atomic_write_bytes / atomic_write_text  a file appears complete or not at all (temporary name
                                          in the same directory, fsync, rename), mode from umask
  staging_dir(out)                        a temporary directory beside `out` for a whole artifact,
                                          renamed into place when complete (see replace_dir); it
                                          carries the writer's PID so a later run can tell a dead
                                          writer's leftovers from a live one's
  sha256_file                             a file's digest, read in 16 MiB pieces
  peak_rss_mb                             this process's peak resident set size
"""
from __future__ import annotations

import hashlib
import os
import resource
import tempfile
from pathlib import Path

from .errors import KvtraceError

_CHUNK = 16 << 20


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def stage_file(path: Path, data, *, what: str | None = None) -> Path:
    """Write `data` (bytes-like) to a new temporary file beside `path` (same directory, fsynced,
    mode from umask) and return its name; the caller renames it onto `path` (os.replace) or
    removes it. On failure nothing is left and a KvtraceError names `what` / the path."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.parent.is_dir():
        raise KvtraceError(f"{label}: directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KvtraceError(f"{label}: cannot write there ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; ours are ordinary files
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise KvtraceError(f"{label}: writing failed ({e.strerror or e}); nothing was written") from e
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data, *, what: str | None = None) -> Path:
    """Write `data` (bytes-like) to `path` atomically. `what` names the option or file kind in
    the one-line error (e.g. "--json"); the default is the path itself."""
    path = Path(path)
    tmp = stage_file(path, data, what=what)
    try:
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            label = f"{what} {path}" if what else str(path)
            raise KvtraceError(f"{label}: writing failed ({e.strerror or e}); nothing was written") from e
        raise
    return path


def atomic_write_text(path: Path, text: str, *, what: str | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what=what)


def sha256_file(path: Path, digest=None) -> str:
    """sha256 hex of a file (or feed it into `digest` and return its hex so far)."""
    h = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------ artifact directories
STAGING_TAG = ".tmp-"  # .OUT.tmp-PID-XXXX beside OUT


def staging_dir(out: Path) -> tuple[Path, list[Path]]:
    """A new temporary directory beside `out` (same file system, so the final rename is atomic),
    named .OUT.tmp-PID-XXXXXX; returns (it, the parent directories this call had to create,
    deepest first, for removal on failure)."""
    out = Path(out)
    parent = out.absolute().parent
    made = []
    p = parent
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_TAG}{os.getpid()}-", dir=parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; an artifact is an ordinary directory
    except OSError as e:
        remove_dirs(made)
        raise KvtraceError(f"--out {out}: cannot create a directory there ({e.strerror or e})") from e
    return tmp, made


def remove_dirs(made: list[Path]) -> None:
    """Remove directories a failed run created (deepest first), stopping at the first non-empty one."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            break


def stale_staging_dirs(out: Path) -> list[Path]:
    """Staging directories of `out` left by processes that are no longer running."""
    out = Path(out)
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    prefix = f".{out.name}{STAGING_TAG}"
    stale = []
    for d in parent.iterdir():
        if not d.name.startswith(prefix) or not d.is_dir():
            continue
        pid = d.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.append(d)
        elif not pid.isdigit():  # an older kvtrace's name (no PID): its writer cannot be asked
            stale.append(d)
    return stale


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def replace_dir(tmp: Path, out: Path, *, force: bool, is_ours) -> None:
    """Move the finished directory `tmp` to `out`. An existing `out` is replaced only with
    force=True and only when is_ours(out) says kvtrace made it (else KvtraceError naming what is
    there); the old one is removed after the new one is in place."""
    import shutil

    old = None
    if out.exists() or out.is_symlink():
        check_replaceable(out, force=force, is_ours=is_ours)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise KvtraceError(f"--out {out}: cannot move the finished result into place ({e.strerror or e})") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out: Path, *, force: bool, is_ours) -> None:
    """Refuse to replace `out` unless force=True and kvtrace made it (is_ours(out) -> reason or None).
    The current directory (or one holding it) is never replaced."""
    cwd = Path.cwd()
    if not out.is_symlink() and out.is_dir() and (out.resolve() == cwd or out.resolve() in cwd.parents):
        raise KvtraceError(f"--out {out}: is the current directory (or holds it); it will not be replaced. "
                           "Choose another --out")
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise KvtraceError(f"--out {out}: exists and is {kind}, not a directory kvtrace made; "
                           "choose another --out")
    if not force:
        raise KvtraceError(f"--out {out}: already exists; pass --force to replace it")
    why_not = is_ours(out)
    if why_not:
        raise KvtraceError(f"--out {out}: will not replace it with --force: {why_not}; "
                           "only directories kvtrace made are replaced. Choose another --out")
