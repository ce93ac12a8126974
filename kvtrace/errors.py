"""Errors every kvtrace component raises for bad input or failed checks. No torch import.

The CLI (kvtrace/cli.py) prints `kvtrace: <label>: <message>` and exits with `exit_code`.
"""


class KvtraceError(Exception):
    """A user-facing error: the message names the file, tensor, option or manifest key and what
    would be right. Exit status 2."""

    exit_code = 2
    label = "error"


class ParityFailure(KvtraceError):
    """Parity outside tolerance. Exit status 1."""

    exit_code = 1
    label = "parity failed"


class NonFiniteLogits(KvtraceError):
    """The model produced NaN/Inf logits for a row being sampled: its tokens would be garbage,
    so the request fails instead. Exit status 1."""

    exit_code = 1
    label = "error"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt so that the same
    cleanup runs (an export removes its staging directory). Exit status 143."""
