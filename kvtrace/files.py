"""Files the way every kvtrace command writes them, and the figures they report. No torch.

  atomic_write_bytes / atomic_write_text  a file appears complete or not at all (temporary name
                                          in the same directory, fsync, rename), mode from umask
  staging_dir(out)                        a temporary directory beside `out` for a whole artifact,
                                          renamed into place when complete (see replace_dir); it
                                          carries the writer's PID so a later run can tell a dead
                                          writer's leftovers from a live one's
  OutputLock(out)                         one writer per --out: a second export to the same place
                                          fails naming the live one's PID (flock, released by the
                                          kernel when the holder dies, even by SIGKILL)
  remove_stale(out)                       staging directories of dead writers, removed (with what
                                          was removed, for the message); a live writer's are kept
  sha256_file                             a file's digest, read in 16 MiB pieces
  peak_rss_mb, rss_mb                     this process's peak / current resident set size
  available_memory                        memory this process may still use: MemAvailable, or less
                                          under a cgroup limit (v1 or v2)
  release_view(arr)                       a view of a read-only file mapping: its resident pages
                                          leave this process's RSS (they stay in the page cache)
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


def rss_mb() -> dict[str, float]:
    """Current RSS split as the kernel counts it, MiB: {"total", "anon", "file"}, and "peak" (the
    high-water mark so far, VmHWM) (Linux; {} elsewhere).
    File-backed pages (mapped weight files) count in RSS while resident but are clean and
    reclaimable: the kernel drops them under memory pressure instead of killing the process."""
    keys = {"VmRSS": "total", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[keys[k]] = int(v.split()[0]) / 1024.0
    except OSError:
        pass
    return out


# A tensor this large (the embedding and the head of most models) is released from memory while
# it is read, where the export can: the NaN/Inf scan (exporter/checks.py), the quantised path's
# transposes (exporter/onnx_graph.py) and the byte check (exporter/verify.py, a band at a time).
# Holding it whole and copied at each step tripled it: 460 MB for the 154 MB fp32 head of
# Pythia-160M, more than a pass over all its blocks holds. Smaller tensors are released whole
# after their check.
RELEASE_WHILE_READING = 128 << 20


def _mapping_of(arr):
    """(mmap, its numpy root array) when `arr` is a view of a read-only mmap.mmap, else None."""
    import mmap

    import numpy as np

    a = arr
    while isinstance(a, np.ndarray):
        b = a.base
        if isinstance(b, memoryview):  # np.frombuffer(mm): a memoryview of the mapping
            b = b.obj
        if isinstance(b, mmap.mmap):
            return b, a
        a = b
    return None


def release_view(arr) -> None:
    """Drop this process's resident pages under `arr` (every page it touches, rounded outwards)
    when it is a C-contiguous view of a read-only file mapping (mmap ACCESS_READ: the mapped
    safetensors shards, a written file mapped back for checking). The pages leave RSS and stay
    in the page cache: a later read faults them in again without touching the disk. Anything
    else (an anonymous array, a writable mapping, a strided view) is left alone: MADV_DONTNEED
    on private anonymous memory would zero it."""
    import mmap

    import numpy as np

    if not hasattr(mmap, "MADV_DONTNEED") or not getattr(arr, "nbytes", 0):
        return
    found = _mapping_of(arr)
    if found is None or not arr.flags.c_contiguous or found[1].flags.writeable:
        return
    mm = found[0]
    start = arr.ctypes.data - np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data  # offset in the mapping
    end = start + arr.nbytes
    start -= start % mmap.PAGESIZE
    end = min(len(mm), end + (-end) % mmap.PAGESIZE)
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def available_memory() -> tuple[int | None, str]:
    """(bytes this process may still use, where the figure comes from): /proc/meminfo's
    MemAvailable, or, when this process is in a memory cgroup with a lower limit, that limit
    minus the cgroup's usage plus its page cache (file pages, which the kernel reclaims at the
    limit, as MemAvailable counts them). None when unknown."""
    best, why = None, "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                best, why = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    for limit, usage, cache, where in _cgroup_memory():
        if limit is None:
            continue
        free = max(0, min(limit, limit - usage + cache))
        if best is None or free < best:
            best, why = free, f"cgroup limit {limit / 2**30:.1f} GiB ({where})"
    return best, why


def _cgroup_memory():
    """(limit, usage, file page bytes, path) of this process's memory cgroup(s), v2 and v1."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            d = Path("/sys/fs/cgroup") / rel.lstrip("/")
            names = ("memory.max", "memory.current", ("active_file", "inactive_file"))
        elif "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_active_file", "total_inactive_file"))
        else:
            continue
        try:
            raw = (d / names[0]).read_text().strip()
            limit = None if raw == "max" or int(raw) >= 1 << 60 else int(raw)
            usage = int((d / names[1]).read_text())
            cache = 0
            for st in (d / "memory.stat").read_text().splitlines():
                k, _, v = st.partition(" ")
                if k in names[2]:
                    cache += int(v)
        except (OSError, ValueError):
            continue
        yield limit, usage, cache, str(d)


# ------------------------------------------------------------------ artifact directories
STAGING_TAG = ".tmp-"  # .OUT.tmp-PID-XXXX beside OUT
OLD_TAG = ".old-"  # .OUT.old-PID: the previous artifact while replace_dir swaps in the new one


def staging_dir(out: Path) -> tuple[Path, list[Path]]:
    """A new temporary directory beside `out` (same file system, so the final rename is atomic),
    named .OUT.tmp-PID-XXXXXX; returns (it, the parent directories this call had to create,
    deepest first, for removal on failure)."""
    out = Path(out)
    made = make_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_TAG}{os.getpid()}-", dir=out.absolute().parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; an artifact is an ordinary directory
    except OSError as e:
        remove_dirs(made)
        raise KvtraceError(f"--out {out}: cannot create a directory there ({e.strerror or e})") from e
    return tmp, made


def make_parents(out: Path) -> list[Path]:
    """Create the missing parent directories of `out`; returns them deepest first (for
    remove_dirs on failure)."""
    parent = Path(out).absolute().parent
    made = []
    p = parent
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_dirs(made)
        raise KvtraceError(f"--out {out}: cannot create a directory there ({e.strerror or e})") from e
    return made


def remove_dirs(made: list[Path]) -> None:
    """Remove directories a failed run created (deepest first), stopping at the first non-empty one."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            break


def own_staging_dirs(out: Path) -> list[Path]:
    """Staging directories of `out` made by this process."""
    parent = Path(out).absolute().parent
    prefix = f".{Path(out).name}{STAGING_TAG}{os.getpid()}-"
    return [d for d in parent.iterdir() if d.name.startswith(prefix) and d.is_dir()] if parent.is_dir() else []


def stale_staging_dirs(out: Path) -> list[Path]:
    """Staging directories of `out` (and `.OUT.old-PID` directories of an interrupted
    replace_dir) left by processes that are no longer running."""
    out = Path(out)
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    stale = []
    for prefix in (f".{out.name}{STAGING_TAG}", f".{out.name}{OLD_TAG}"):
        for d in parent.iterdir():
            if not d.name.startswith(prefix) or not d.is_dir() or d.is_symlink():
                continue
            pid = d.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                stale.append(d)
            elif not pid.isdigit():  # an older kvtrace's name (no PID): its writer cannot be asked
                stale.append(d)
    return sorted(stale)


def dir_bytes(d: Path) -> int:
    total = 0
    for root, _, names in os.walk(d):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


def remove_stale(out: Path) -> list[str]:
    """Remove what dead writers left beside `out`; returns one description per directory.

    A staging directory (.OUT.tmp-PID-*) of a dead PID is removed. An `.OUT.old-PID` directory
    is the previous artifact that an interrupted replacement had moved aside: it is removed when
    `out` exists (the new artifact made it), and moved back to `out` when it does not."""
    import shutil

    out = Path(out)
    done = []
    for d in stale_staging_dirs(out):
        size = dir_bytes(d)
        if OLD_TAG in d.name and not (out.exists() or out.is_symlink()):
            os.replace(d, out)
            done.append(f"restored {out} from {d.name}, which an interrupted replacement had moved aside")
            continue
        shutil.rmtree(d, ignore_errors=True)
        pid = d.name.rsplit(OLD_TAG if OLD_TAG in d.name else STAGING_TAG, 1)[1].split("-", 1)[0]
        done.append(f"removed {d} ({size / 1e9:.2f} GB), left by an export that is no longer running"
                    + (f" (PID {pid})" if pid.isdigit() else ""))
    return done


class OutputLock:
    """An exclusive lock on `out` for the length of one export: the file `.OUT.lock` beside it,
    flock()ed and holding the owner's PID. The kernel drops the lock when the holder dies, so a
    killed export never blocks the next one; a live one makes the next fail with its PID."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out.absolute().parent / f".{self.out.name}.lock"
        self.fd = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        for _ in range(10):  # the holder may unlink the file between our open and flock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
            except OSError as e:
                raise KvtraceError(f"--out {self.out}: cannot create the lock file {self.path} "
                                   f"({e.strerror or e})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                finally:
                    os.close(fd)
                raise KvtraceError(f"--out {self.out}: another kvtrace export (PID {pid}) is writing it right "
                                   "now; wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)
        raise KvtraceError(f"--out {self.out}: could not lock {self.path}")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()  # while still holding the lock (see the inode check above)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


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
        old = out.with_name(f".{out.name}{OLD_TAG}{os.getpid()}")
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
