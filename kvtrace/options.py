"""The one validation layer for user-given values. No torch.

Two faces of the same checks:
  - argparse `type=` callables (integer, number, text, token_ids, out_dir): argparse reports a
    failure as `argument --seed: <message>`, which kvtrace's parser prints as one line, exit 2;
  - check_int / check_number for the Python API (generate(), parity(), bench(), SamplingParams),
    which raise KvtraceError naming the option the same way (`--seed -1: ...`).
Every command module declares its options with these, so a negative seed, a NaN tolerance, an
id beyond int64 or a prompt that is not UTF-8 is refused before any work starts.

Paths: out_dir refuses the empty string and the root directory and turns `.` / `..` into the
absolute directory they name (so a temporary directory beside it can be made);
check_apart refuses an output directory that is, holds or lies inside an input.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from .errors import KvtraceError

INT64_MAX = 2**63 - 1
SEED_MAX = 2**64 - 1  # numpy's generators take any non-negative integer; 64 bits is plenty
INT_MAX = 2**31 - 1  # sizes and counts (batch, steps, tokens): far beyond any real run

_INT = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "١٢" or "1_000"


def _fail(msg: str):
    raise argparse.ArgumentTypeError(msg)


def _parse_int(s: str) -> int:
    t = s.strip()
    if not _INT.fullmatch(t):
        _fail(f"{s!r} is not an integer")
    return int(t)


def _range_msg(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"expected {lo}..{hi}"
    if lo is not None:
        return f"expected >= {lo}"
    return f"expected <= {hi}"


def integer(lo: int | None = None, hi: int | None = INT_MAX):
    """argparse type: an integer in [lo, hi]."""
    def parse(s: str) -> int:
        v = _parse_int(s)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail(f"{v} is out of range ({_range_msg(lo, hi)})")
        return v
    parse.__name__ = "integer"
    return parse


def seed(s: str) -> int:
    """argparse type: a random seed, 0..2**64-1."""
    return integer(0, SEED_MAX)(s)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """argparse type: a finite number in [lo, hi] (or (lo, hi] with lo_open); nan/inf refused."""
    def parse(s: str) -> float:
        try:
            v = float(s.strip())
        except ValueError:
            _fail(f"{s!r} is not a number")
        msg = _number_problem(v, lo, hi, lo_open)
        if msg:
            _fail(msg)
        return v
    parse.__name__ = "number"
    return parse


def _number_problem(v, lo, hi, lo_open) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"{v!r} is not a number"
    if not math.isfinite(v):
        return f"{v} is not a finite number"
    if lo is not None and (v <= lo if lo_open else v < lo):
        return f"{v:g} is out of range (expected {'>' if lo_open else '>='} {lo:g}" + \
            (f" and <= {hi:g})" if hi is not None else ")")
    if hi is not None and v > hi:
        return f"{v:g} is out of range (expected <= {hi:g})"
    return None


def text(s: str) -> str:
    """argparse type: text that is valid UTF-8. On POSIX, argv bytes that are not UTF-8 arrive
    as lone surrogates (PEP 383); a tokenizer cannot encode them."""
    bad = utf8_problem(s)
    if bad:
        _fail(bad)
    return s


def utf8_problem(s: str) -> str | None:
    """Why `s` cannot be encoded as UTF-8 (naming the offending byte), or None."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        raw = s[e.start:e.end].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(s[e.start]) <= 0xDCFF else b""
        what = f"byte 0x{raw[0]:02x}" if raw else f"character U+{ord(s[e.start]):04X}"
        return f"not valid UTF-8 ({what} at character {e.start}); give text in UTF-8"


_SEP = re.compile(r"\s*,\s*|\s+")


def token_ids(s: str) -> list[int]:
    """argparse type: one prompt's token ids, separated by commas and/or whitespace ("1,2,3",
    "1 2 3", "1, 2, 3" are the same prompt). Each id is a non-negative integer that fits int64
    (the vocabulary range is checked against the artifact later); an empty item ("1,,2") is an
    error, not silently skipped."""
    t = s.strip()
    if not t:
        _fail("empty token list (expected ids like 1,2,3)")
    out = []
    for i, item in enumerate(_SEP.split(t)):
        if not item:
            _fail(f"{s!r}: empty item at position {i} (expected ids like 1,2,3 or '1 2 3')")
        if not _INT.fullmatch(item):
            _fail(f"{s!r}: {item!r} is not a token id (expected non-negative integers like 1,2,3)")
        v = int(item)
        if v < 0:
            _fail(f"{s!r}: token id {v} is negative")
        if v > INT64_MAX:
            _fail(f"{s!r}: token id {v} does not fit in int64")
        out.append(v)
    return out


def out_dir(s: str) -> Path:
    """argparse type: an output directory. Not empty, not the root; `.`, `..` and paths ending
    in them become the absolute directory they name."""
    if not s or not s.strip():
        _fail("empty path")
    p = Path(s)
    if p.name in ("", ".", ".."):
        p = Path(os.path.abspath(s))
    if p.name == "":  # "/" (or "//", "/.."): the root has no parent to write beside
        _fail(f"{s!r} is the root directory; name a directory to create")
    return p


def artifact_path(s: str) -> Path:
    """argparse type: an artifact directory (to read, or --out to write). Its path must be UTF-8:
    onnxruntime and TensorRT take file names as UTF-8 strings and cannot open any other."""
    if not s or not s.strip():
        _fail("empty path")
    bad = utf8_problem(s)
    if bad:
        _fail(f"the path is {bad.split(';')[0]}; onnxruntime cannot open such a path: use a UTF-8 name")
    return Path(s)


def artifact_out(s: str) -> Path:
    """argparse type: --out of `kvtrace export` (out_dir's rules and artifact_path's)."""
    artifact_path(s)
    return out_dir(s)


def existing_path(s: str) -> str:
    """argparse type: a non-empty path (existence is checked, with a message, by the command)."""
    if not s:
        _fail("empty path")
    return s


# ---------------------------------------------------------------------------------- Python API
def check_int(name: str, v, lo: int | None = None, hi: int | None = INT_MAX) -> int:
    """`v` as an int in [lo, hi], else KvtraceError naming `name` (an option, e.g. "--seed")."""
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import numpy as np

            if isinstance(v, np.integer):
                v = int(v)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise KvtraceError(f"{name} {v!r}: expected an integer") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise KvtraceError(f"{name} {v}: out of range ({_range_msg(lo, hi)})")
    return v


def check_number(name: str, v, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    """`v` as a finite float in [lo, hi] (or (lo, hi]), else KvtraceError naming `name`."""
    try:
        import numpy as np

        if isinstance(v, np.floating | np.integer):
            v = float(v)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    msg = _number_problem(v, lo, hi, lo_open)
    if msg:
        raise KvtraceError(f"{name}: {msg}")
    return float(v)


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def check_report_file(opt: str, value, artifact) -> Path:
    """A report file the command will write (--json, --junit-xml, --save-golden ...): its directory
    exists, it is not a directory, and it does not land inside the artifact directory -- compared
    with symlinks resolved, so `LINK/kvtrace.json` (LINK -> the artifact) or a link to the manifest
    cannot overwrite a file of the artifact."""
    path = Path(value)
    if not path.parent.is_dir():
        raise KvtraceError(f"{opt} {value}: directory {path.parent} does not exist")
    if path.is_dir():
        raise KvtraceError(f"{opt} {value}: is a directory; name a file")
    real, art = _real(path), _real(Path(artifact))
    if art == real or art in real.parents:
        raise KvtraceError(f"{opt} {value}: inside the artifact directory {artifact}; write it elsewhere")
    return real


def check_apart(out: Path, out_name: str, src: Path, src_name: str) -> None:
    """Refuse an output directory that is the input, lies inside it, or holds it (replacing the
    output would delete the input, or the input would be read while it is replaced)."""
    o, i = _real(out), _real(src)
    if o == i:
        raise KvtraceError(f"{out_name} {out} and {src_name} {src} are the same place: the output would replace "
                           f"the input; choose another {out_name}")
    if i in o.parents:
        raise KvtraceError(f"{out_name} {out} is inside {src_name} {src}: write the output somewhere else")
    if o in i.parents:
        raise KvtraceError(f"{src_name} {src} is inside {out_name} {out}: replacing {out_name} would delete the "
                           f"input; choose another {out_name}")
